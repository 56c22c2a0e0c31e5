"""The ``bdgf`` command line. Every subcommand prints one-line errors (no traceback) for bad
input and exits with status 2; ``BDGF_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from bdgf.errors import BDGFError

app = typer.Typer(
    help="BDGF: Balanced Diffusion-Guided Fusion for multimodal (HSI + LiDAR/SAR) land-cover classification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Scene store to create (a folder, e.g. demo.zarr)."),
    preset: str = typer.Option("demo", help="Scene preset: tiny, demo, imbalance or sar."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same scene."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Make a deterministic synthetic scene (classes with spectra, elevation, labels) and store it."""
    try:
        from bdgf.data.scene import write_scene
        from bdgf.data.synthetic import make_scene

        scene = write_scene(make_scene(preset, seed), out, overwrite=overwrite, progress=True)
        typer.echo(scene.summary())
    except (BDGFError, KeyError) as exc:
        _fail(exc)


@app.command()
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
    seed: int = typer.Option(0, help="Seed for sampled and carved splits."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Read a benchmark's native files (or any co-registered rasters) into a scene store."""
    try:
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
        kwargs["seed"] = seed
        if Path(out).exists() and not overwrite:
            raise BDGFError(f"{out}: already exists (pass --overwrite to replace it)")
        scene = write_scene(read_dataset(dataset, **kwargs), out, overwrite=overwrite, progress=True)
        typer.echo(scene.summary())
    except (BDGFError, KeyError) as exc:
        _fail(exc)


@app.command()
def info(store: Path = typer.Argument(..., help="Scene store.")) -> None:
    """Print a scene's modalities, bands, grid, classes and split counts."""
    try:
        from bdgf.data.scene import Scene

        typer.echo(Scene.open(store).summary())
    except BDGFError as exc:
        _fail(exc)


@app.command()
def preview(
    store: Path = typer.Argument(..., help="Scene store."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Save a PNG: false-colour HSI, elevation and labels side by side."""
    try:
        from bdgf.data.scene import Scene
        from bdgf.preview import save_preview

        path = save_preview(Scene.open(store), out)
        typer.echo(f"wrote {path}")
    except BDGFError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
