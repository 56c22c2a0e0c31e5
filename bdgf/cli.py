"""The ``bdgf`` command line. Every subcommand prints one-line errors (no traceback) for bad
input and exits with status 2; ``BDGF_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from bdgf.errors import BDGFError

app = typer.Typer(
    help="BDGF: Balanced Diffusion-Guided Fusion for multimodal (HSI + LiDAR/SAR) land-cover classification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(also: tuple[type[BaseException], ...] = ()):
    """Register a function as a subcommand whose BDGFError (and ``also``) becomes a one-line
    ``error:`` message with exit status 2 (``BDGF_DEBUG=1``: the traceback)."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (BDGFError, *also) as exc:
                _fail(exc)

        return app.command()(run)

    return register


def _fail(exc: BaseException) -> None:
    if os.environ.get("BDGF_DEBUG"):
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise BDGFError(f"{what} must look like NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


VAL_SPLIT_HELP = ("How val is carved from train: regions (whole labelled regions, train pixels within 5 px "
                  "dropped), blocks (spatial blocks) or random (pixels; val then sits next to train).")


@command(also=(KeyError,))
def synth(
    out: Path = typer.Argument(..., help="Scene store to create (a folder, e.g. demo.zarr)."),
    preset: str = typer.Option("demo", help="Scene preset: tiny, demo, imbalance, hard, sar, or mosaic (a large "
                               "unlabelled mosaic with the demo preset's modalities, written chunk by chunk)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same scene."),
    val_split: str = typer.Option("regions", "--val-split", help=VAL_SPLIT_HELP),
    size: Optional[int] = typer.Option(None, "--size", help="mosaic preset: side in pixels (default 8192)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Make a deterministic synthetic scene (classes with spectra, elevation, labels) and store it."""
    from bdgf.data.scene import Scene, write_scene
    from bdgf.data.synthetic import make_scene

    if preset == "mosaic":
        from bdgf.bulk.synthetic import write_mosaic

        path = write_mosaic(out, size or 8192, seed, overwrite=overwrite, progress=True)
        typer.echo(Scene.open(path).summary())
        return
    if size is not None:
        raise BDGFError(f"--size is for --preset mosaic; the {preset} preset has a fixed size")
    scene = write_scene(make_scene(preset, seed, val_split=val_split), out, overwrite=overwrite, progress=True)
    typer.echo(scene.summary())


@command(also=(KeyError,))
def ingest(
    dataset: str = typer.Argument(..., help="houston2013, trento, muufl, augsburg or generic."),
    out: Path = typer.Argument(..., help="Scene store to create."),
    hsi: Optional[Path] = typer.Option(None, help="Hyperspectral file (GeoTIFF or .mat)."),
    lidar: Optional[Path] = typer.Option(None, help="LiDAR file (GeoTIFF or .mat)."),
    sar: Optional[Path] = typer.Option(None, help="SAR file (Augsburg data_SAR_HR.mat)."),
    dsm: Optional[Path] = typer.Option(None, help="DSM file (Augsburg data_DSM.mat)."),
    train: Optional[Path] = typer.Option(None, help="Training label raster."),
    test: Optional[Path] = typer.Option(None, help="Test label raster."),
    gt: Optional[Path] = typer.Option(None, help="Full ground truth (Trento allgrd.mat) when no split files."),
    mat: Optional[Path] = typer.Option(None, help="MUUFL: muufl_gulfport_campus_1_hsi_220_label.mat."),
    modality: Optional[list[str]] = typer.Option(None, help="generic: NAME=PATH, repeatable."),
    labels: Optional[list[str]] = typer.Option(None, help="generic: SPLIT=PATH, repeatable."),
    classes: Optional[str] = typer.Option(None, help="generic: comma-separated class names."),
    per_class: int = typer.Option(20, help="Training pixels per class where there is no official split."),
    val_fraction: float = typer.Option(0.2, help="Fraction of train carved into val (0 disables)."),
    val_split: str = typer.Option("regions", "--val-split", help=VAL_SPLIT_HELP),
    seed: int = typer.Option(0, help="Seed for sampled and carved splits."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Read a benchmark's native files (or any co-registered rasters) into a scene store."""
    from bdgf.data.readers import read_dataset
    from bdgf.data.scene import write_scene

    given = dict(hsi=hsi, lidar=lidar, sar=sar, dsm=dsm, train=train, test=test, gt=gt, path=mat)
    kwargs = {k: v for k, v in given.items() if v is not None}
    if dataset == "generic":
        kwargs = {
            "modalities": _parse_pairs(modality, "--modality"),
            "labels": _parse_pairs(labels, "--labels"),
            "class_names": classes.split(",") if classes else None,
        }
    if dataset in ("muufl", "trento"):
        kwargs["per_class"] = per_class
    kwargs["val_fraction"] = val_fraction
    kwargs["val_split"] = val_split
    kwargs["seed"] = seed
    if Path(out).exists() and not overwrite:
        raise BDGFError(f"{out}: already exists (pass --overwrite to replace it)")
    scene = write_scene(read_dataset(dataset, **kwargs), out, overwrite=overwrite, progress=True)
    typer.echo(scene.summary())


@command()
def info(store: Path = typer.Argument(..., help="Scene store.")) -> None:
    """Print a scene's modalities, bands, grid, classes, split counts and how val was carved."""
    from bdgf.data.scene import Scene

    typer.echo(Scene.open(store).summary())


@command()
def preview(
    store: Path = typer.Argument(..., help="Scene store."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Save a PNG: false-colour HSI, elevation and labels side by side."""
    from bdgf.data.scene import Scene
    from bdgf.preview import save_preview

    path = save_preview(Scene.open(store), out)
    typer.echo(f"wrote {path}")


def _overrides(items: list[str] | None) -> dict:
    """--set key=value pairs, values parsed as YAML (numbers, lists, mappings)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in _parse_pairs(items, "--set").items()}


def _run_config(config: Optional[Path], overrides: list[str] | None):
    from bdgf.config import RunConfig

    cfg = RunConfig.load(config) if config else RunConfig()
    if overrides:
        cfg = cfg.with_overrides(_overrides(overrides))
    return cfg


def _seeds(seeds: Optional[str]) -> list[int] | None:
    if not seeds:
        return None
    try:
        return [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise BDGFError(f"--seeds must be comma-separated integers, got {seeds!r}") from None


# Options shared by the stages that can run on Ray Train (one definition each).
Workers = Annotated[int, typer.Option(help="Ray Train workers (0: a plain single process here).")]
Address = Annotated[Optional[str], typer.Option(help="Ray cluster address (default with --workers: RAY_ADDRESS, else a local Ray).")]
Storage = Annotated[Optional[str], typer.Option(
    help="Ray Train storage for checkpoints (default RUN/ray; a shared path or bucket on a multi-node cluster).")]
MaxFailures = Annotated[Optional[int], typer.Option(help="Worker restarts Ray Train may make (default 3).")]
DeepSpeedConfig = Annotated[Optional[str], typer.Option(help="DeepSpeed JSON template (default: the bundled one).")]
Device = Annotated[str, typer.Option(
    help="auto, cpu or gpu. auto: a GPU per worker when the Ray cluster has them (with --workers), or this "
         "machine's GPU (without); gpu is refused before launch where there is none. Never the driver's device.")]


@command()
def pretrain(
    stores: list[Path] = typer.Argument(..., help="Scene store(s); several must share one band layout."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    config: Optional[Path] = typer.Option(None, help="YAML run config (sections pretrain/features/train)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: pretrain.steps=200 (repeatable)."),
    resume: bool = typer.Option(False, help="Continue from the run's last checkpoint."),
    overwrite: bool = typer.Option(False, help="Start over in an existing run directory (removes its old stages)."),
    workers: Workers = 0,
    address: Address = None,
    storage: Storage = None,
    max_failures: MaxFailures = None,
    deepspeed_config: DeepSpeedConfig = None,
    device: Device = "auto",
) -> None:
    """Stage 1: pretrain the balanced multimodal denoiser with adaptive modality masking."""
    from bdgf.engine.pretrain import pretrain as run_pretrain

    cfg = _run_config(config, set_)
    summary = run_pretrain(stores, out, cfg, resume=resume, overwrite=overwrite, workers=workers, address=address,
                           storage=storage, max_failures=max_failures, ds_config=deepspeed_config, device=device)
    typer.echo(summary.line())


@command()
def features(
    store: Path = typer.Argument(..., help="Scene store (features are cached into it)."),
    run: Path = typer.Option(..., "--run", help="Run directory with a pretrained denoiser."),
    workers: int = typer.Option(0, help="Ray tasks over disjoint tiles (0: a plain single process here)."),
    address: Address = None,
    device: Device = "auto",
) -> None:
    """Compute dense diffusion features (low/mid/high) and cache them in the store."""
    from bdgf.engine.features import compute_features

    typer.echo(compute_features(store, run, workers=workers, address=address, device=device).line())


@command()
def train(
    store: Path = typer.Argument(..., help="Scene store with cached features."),
    run: Path = typer.Option(..., "--run", help="Run directory."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2 (default: the config's)."),
    branches: Optional[str] = typer.Option(None, help="Subset of cnn,mamba,transformer (ablations)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: train.epochs=10."),
    workers: Workers = 0,
    address: Address = None,
    storage: Storage = None,
    max_failures: MaxFailures = None,
    deepspeed_config: DeepSpeedConfig = None,
    device: Device = "auto",
) -> None:
    """Stage 2: train the diffusion-guided multi-branch classifier (model selection on val)."""
    from bdgf.engine.classify import train as run_train

    overrides = _overrides(set_)
    if branches:
        overrides["train.branches"] = [b.strip() for b in branches.split(",")]
    for s in _seeds(seeds) or [None]:
        r = run_train(store, run, seed=s, overrides=overrides, workers=workers, address=address,
                      storage=storage, max_failures=max_failures, ds_config=deepspeed_config, device=device)
        typer.echo(r.line())


@command()
def evaluate(
    store: Path = typer.Argument(..., help="Scene store with cached features."),
    run: Path = typer.Option(..., "--run", help="Run directory with trained classifiers."),
    split: str = typer.Option("test", help="Split to score."),
    seeds: Optional[str] = typer.Option(None, help="Seeds to score (default: every trained seed)."),
    absent: Optional[str] = typer.Option(None, "--absent", help="Classify without this modality (e.g. lidar), "
                                         "as for a scene that lacks it."),
) -> None:
    """Score the trained classifiers: OA, AA, kappa, per class, per branch; metrics.json + map PNG."""
    from bdgf.engine.classify import evaluate as run_evaluate

    typer.echo(run_evaluate(store, run, split=split, seeds=_seeds(seeds), absent=absent).text())


@command()
def cv(
    store: Path = typer.Argument(..., help="Scene store with cached features."),
    run: Path = typer.Option(..., "--run", help="Run directory with a pretrained denoiser (features computed)."),
    folds: int = typer.Option(5, help="Folds; whole labelled regions are dealt to them, stratified by class."),
    seed: int = typer.Option(0, help="Seed of the folds, the carved val and the classifiers."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: train.epochs=10."),
) -> None:
    """Grouped cross-validation: one classifier per fold (regions never straddle folds); OA/AA/kappa
    mean ± sample std over folds, written to RUN/eval/cv.json."""
    from bdgf.engine.cv import cross_validate

    typer.echo(cross_validate(store, run, folds=folds, seed=seed, overrides=_overrides(set_)).text())


@command()
def export(
    run: Path = typer.Argument(..., help="Run directory with a trained classifier."),
    out: Path = typer.Option(..., "--out", help="Package directory to write (graph files + model.json)."),
    format_: str = typer.Option("onnx", "--format", help="onnx, onnx-int8, aoti, tensorrt, a comma list, or all "
                                "(onnx, aoti, tensorrt: every one this machine can build; the others are listed "
                                "as skipped)."),
    int8: bool = typer.Option(False, "--int8", help="Also write model_int8.onnx: model.onnx dynamically quantised "
                              "to int8 for the CPU (back end onnx-int8, only when named; the manifest's checks give "
                              "its difference from PyTorch)."),
    seed: Optional[int] = typer.Option(None, help="Classifier seed (default: the config's train seed)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Largest batch the graphs take (TensorRT profile 1..N)."),
    aoti_device: str = typer.Option("cpu", "--aoti-device", help="Device the AOTInductor package is compiled "
                                    "for and runs on: cpu, or cuda on a GPU host."),
    overwrite: bool = typer.Option(False, help="Replace an existing package directory."),
) -> None:
    """Export a trained run as a self-contained model package (bdgf.export; run it with bdgf.backends)."""
    from bdgf.export import export_run, parse_formats

    formats = parse_formats(format_, int8=int8)
    manifest = export_run(run, out, formats, seed=seed, max_batch=max_batch, overwrite=overwrite,
                          strict=format_.strip() != "all", aoti_device=aoti_device)
    for name, entry in manifest["files"].items():
        typer.echo(f"{out / name}  {entry['format']}  {entry['bytes']} bytes")
    for fmt, check in manifest["checks"].items():
        agree = f", same class at {100 * check['class_agreement']:.2f}% of pixels" if "class_agreement" in check else ""
        typer.echo(f"{fmt}: max abs difference vs PyTorch {check['max_abs_diff']:.2e}{agree} on {check['inputs']}")
    for fmt, why in manifest["skipped"].items():
        typer.echo(f"{fmt}: skipped ({why})")
    typer.echo(f"{out / 'model.json'}")


@command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the store, the run and the PNGs."),
    seed: int = typer.Option(0, help="Scene and training seed."),
    preset: str = typer.Option("demo", help="Synthetic preset (tiny for a quick look)."),
    workers: int = typer.Option(2, help="Ray Train workers for pretraining, features and training "
                                "(0: in this process, no Ray)."),
    mosaic_size: int = typer.Option(768, "--mosaic-size", help="Side in px of the mosaic bulk-classified."),
    chunk: int = typer.Option(256, help="Chunk side in px of the bulk classification (several per mosaic)."),
) -> None:
    """Every stage on a synthetic scene, nothing to download (what `make demo` runs): training on
    local Ray workers, evaluation, export, the HTTP endpoint, Dask bulk classification."""
    from bdgf.demo import run_demo

    run_demo(out, seed=seed, preset=preset, workers=workers, mosaic_size=mosaic_size, chunk=chunk)


# Commands kept in their own modules register themselves on `app` when imported.
from bdgf import cli_bulk, cli_serve  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Run the command line on ``argv`` (default: sys.argv[1:]) and exit with its status; the
    scripts in ``training/`` call it with their stage's subcommand first."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
