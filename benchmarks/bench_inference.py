"""Stage-2 inference per classified pixel: the patch-wise classifier (unfold + predict) vs dense
(``BDGFClassifier.predict_dense``), with the UNet feature pass for scale.

Two configurations, random weights (cost does not depend on them) and random inputs:

* **demo**: ``bdgf.demo.DEMO_OVERRIDES`` on the library config: the ``demo`` scene (HSI 32 +
  LiDAR 1, 6 classes), UNet base 16 mults (1, 2, 2), library classifier sizes.
* **houston**: C = 145 bands (HSI 144 + LiDAR 1), 15 classes, the library defaults (UNet base 32
  mults (1, 2, 2) -> F_low 96, F_mid 192, F_high 192 over 3 concatenated timesteps).

The classifier sees C + M channels (bands + one availability map per modality,
``bdgf.models.inputs``). Tile T = ``features.tile_size`` (64), P = ``train.patch_size`` (11).

Measured, per classified pixel (divided by T²):

* MFLOP: ``torch.utils.flop_counter.FlopCounterMode`` (matmul / conv / attention; a multiply-add
  is 2 FLOPs; norms, pooling, gathers and the scan's elementwise updates are not counted).
  UNet: one ``forward_with_features`` per timestep on a window of side T + 2·halo (halo =
  ``denoiser.receptive_radius`` if the UNet has it, else 16; rounded up to the UNet's multiple).
  Patch-wise: counted on ``--flop-patches`` patches (the cost per patch is fixed). Dense: the
  whole tile, including the per-pixel maps over the (T + 2r)² region.
* wall time: median of ``--repeats`` runs of one whole tile, both paths in the same process, one
  torch thread by default. Patch-wise = unfold every input of the tile (as the old
  ``TileClassifier._patches`` did), then ``predict`` in batches of ``--batch`` patches.
* peak memory per tile: extra peak resident memory of one tile's classification over the
  process's resident set right after building the model and the tile's inputs, each path in a
  fresh subprocess: on Linux the RSS high-water mark is reset (``/proc/self/clear_refs``) and
  read back (``VmHWM``) around the one call; elsewhere ``ru_maxrss`` after minus before. It
  includes the unfolded patches and every intermediate the path allocates (torch's CPU
  allocator returns large blocks to the OS, so the high-water mark is the path's own peak).

Reference row: the same patch-wise measurement with the models of ``--baseline`` (a git revision,
default the commit before the dense path and the token-grid branches; its ``bdgf`` and
``kernels`` are extracted with ``git archive`` into a temporary folder and run in a subprocess).
That is a different model (per-pixel tokens), so only its cost is comparable; ``--baseline ''``
skips it.

    .venv/bin/python benchmarks/bench_inference.py [--configs demo houston] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--_baseline" in sys.argv:  # a baseline child imports the extracted old package instead
    sys.path.insert(0, sys.argv[sys.argv.index("--_baseline") + 1])
else:
    sys.path[:0] = [p for p in (str(ROOT),) if p not in sys.path]

CONFIGS = ("demo", "houston")
BASELINE = "4970543"  # the last commit with per-pixel tokens and no predict_dense


def build(name: str, seed: int = 0):
    """(denoiser, classifier, run config) of a configuration, random weights."""
    import torch

    from bdgf.config import RunConfig
    from bdgf.demo import DEMO_OVERRIDES
    from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
    from bdgf.models.classifier import BDGFClassifier, ClassifierConfig

    if name == "demo":
        cfg, bands, classes = RunConfig().with_overrides(DEMO_OVERRIDES), [32, 1], 6
    elif name == "houston":
        cfg, bands, classes = RunConfig(), [144, 1], 15
    else:
        raise SystemExit(f"unknown configuration {name!r}; known: {CONFIGS}")
    torch.manual_seed(seed)
    denoiser = DenoiserUNet(UNetConfig(in_channels=sum(bands), num_modalities=len(bands), **cfg.pretrain.unet)).eval()
    n_t = len(cfg.features.timesteps)
    fc = {k: v * n_t if cfg.features.timestep_reduce == "concat" else v for k, v in denoiser.feature_channels.items()}
    classifier = BDGFClassifier(ClassifierConfig.from_dict({
        **cfg.train.model, "in_channels": sum(bands) + len(bands), "feature_channels": fc, "num_classes": classes,
        "patch_size": cfg.train.patch_size, "branches": tuple(cfg.train.branches)})).eval()
    return denoiser, classifier, cfg


def tile_inputs(classifier, T: int, seed: int = 0):
    """Random (region, low, mid, high), each (1, channels, T + 2r, T + 2r)."""
    import torch

    c = classifier.config
    side = T + c.patch_size - 1
    g = torch.Generator().manual_seed(seed)
    chans = (c.in_channels, c.feature_channels["low"], c.feature_channels["mid"], c.feature_channels["high"])
    return tuple(torch.randn(1, ch, side, side, generator=g) for ch in chans)


def patchwise(classifier, x, batch: int):
    """The old path: unfold the P x P patch of every pixel, then ``predict`` -> probs (1, K, T, T)."""
    import torch
    import torch.nn.functional as F

    P = classifier.config.patch_size
    T = x[0].shape[-1] - P + 1
    patches = [F.unfold(t, P).transpose(1, 2).reshape(T * T, t.shape[1], P, P) for t in x]
    probs = torch.cat([classifier.predict(*(p[i : i + batch] for p in patches)) for i in range(0, T * T, batch)])
    return probs.view(1, T, T, -1).permute(0, 3, 1, 2)


def dense(classifier, x, chunk: int):
    return classifier.predict_dense(*x, chunk_pixels=chunk)


def mflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e6


def unet_mflop_per_pixel(denoiser, cfg) -> tuple[float, int]:
    """(MFLOP per classified pixel of the UNet feature pass, halo used)."""
    import torch

    T = cfg.features.tile_size
    halo = int(getattr(denoiser, "receptive_radius", 16))
    m = denoiser.config.tile_multiple
    S = -(-(T + 2 * halo) // m) * m
    n = len(cfg.features.timesteps) * cfg.features.draws
    x = torch.randn(n, denoiser.config.in_channels, S, S)
    t = torch.tensor([int(s) for s in cfg.features.timesteps for _ in range(cfg.features.draws)])
    present = torch.ones(n, denoiser.config.num_modalities)
    return mflop(lambda: denoiser.forward_with_features(x, t, present)) / (T * T), halo


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS: resident now, VmHWM: its high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_child(name: str, path: str, batch: int, chunk: int, threads: int) -> None:
    """Subprocess body: print the extra peak resident memory (MiB) of one tile on one path."""
    import torch

    torch.set_num_threads(threads)
    _, classifier, cfg = build(name)
    x = tile_inputs(classifier, cfg.features.tile_size)
    with torch.no_grad():
        # Linux: reset this process's RSS high-water mark (clear_refs 5), so VmHWM is the peak of
        # the tile alone. Elsewhere: ru_maxrss (a high-water mark since the process started).
        try:
            Path("/proc/self/clear_refs").write_text("5")
            before, how = _status_kib("VmRSS"), "VmHWM"
        except OSError:
            before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        patchwise(classifier, x, batch) if path == "patchwise" else dense(classifier, x, chunk)
        after = _status_kib("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024, "how": how}))


def peak_mib(name: str, path: str, args) -> float:
    cmd = [sys.executable, __file__, "--_peak", name, path, "--batch", str(args.batch), "--chunk", str(args.chunk),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def measure(name: str, args) -> dict:
    import torch

    denoiser, classifier, cfg = build(name)
    T, P = cfg.features.tile_size, classifier.config.patch_size
    x = tile_inputs(classifier, T)
    row: dict = {"config": name, "T": T, "P": P, "C_in": classifier.config.in_channels,
                 "F": dict(classifier.config.feature_channels)}
    with torch.no_grad():
        row["unet_mflop"], row["halo"] = unet_mflop_per_pixel(denoiser, cfg)
        row["dense_mflop"] = mflop(lambda: dense(classifier, x, args.chunk)) / (T * T)
        row["branch_mflop"] = {}
        feats = {"cnn": x[1], "mamba": x[2], "transformer": x[3]}
        for b, br in classifier.branches.items():
            f = feats[{"cnn": "cnn", "mamba": "mamba", "transformer": "transformer"}[b]]
            call = (lambda br=br, f=f: br.dense(x[0], f)) if b == "cnn" else \
                (lambda br=br, f=f: br.dense(x[0], f, args.chunk))
            row["branch_mflop"][b] = mflop(call) / (T * T)
            row.setdefault("branch_ms", {})[b] = median_seconds(call, args.repeats)[0] * 1e3 / (T * T)
        row["patch_mflop"], row["patch_ms"] = patchwise_cost(classifier, x, args)
        t_dense, p_dense = median_seconds(lambda: dense(classifier, x, args.chunk), args.repeats)
        row["max_abs_diff"] = float((patchwise(classifier, x, args.batch) - p_dense).abs().max())
    row["dense_ms"] = t_dense * 1e3 / (T * T)
    row["unfolded_mib"] = T * T * sum(t.shape[1] for t in x) * P * P * 4 / 2**20
    row["patch_peak_mib"] = peak_mib(name, "patchwise", args)
    row["dense_peak_mib"] = peak_mib(name, "dense", args)
    if args.baseline:
        row["baseline"] = baseline(name, args)
    return row


def patchwise_cost(classifier, x, args) -> tuple[float, float]:
    """(MFLOP, ms) per classified pixel of the patch-wise path on tile inputs x."""
    P = classifier.config.patch_size
    T = x[0].shape[-1] - P + 1
    sub = tuple(t[..., : P + 3, : P + 3] for t in x)            # a 4 x 4 tile: 16 patches per call
    reps = -(-min(args.flop_patches, T * T) // 16)
    flops = mflop(lambda: [patchwise(classifier, sub, args.batch) for _ in range(reps)]) / (16 * reps)
    return flops, median_seconds(lambda: patchwise(classifier, x, args.batch), args.repeats)[0] * 1e3 / (T * T)


def baseline_child(name: str, args) -> None:
    """Subprocess body (old package first on sys.path): print the patch-wise cost as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    _, classifier, cfg = build(name)
    x = tile_inputs(classifier, cfg.features.tile_size)
    with torch.no_grad():
        flops, ms = patchwise_cost(classifier, x, args)
    print(json.dumps({"mflop": flops, "ms": ms}))


def baseline(name: str, args) -> dict:
    """The patch-wise cost with the models of git revision ``args.baseline``."""
    with tempfile.TemporaryDirectory(prefix="bdgf_baseline_") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "bdgf", "kernels"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        cmd = [sys.executable, __file__, "--_baseline", tmp, name, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--flop-patches", str(args.flop_patches)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp).stdout
    return json.loads(out.strip().splitlines()[-1])




BASELINE_LABEL = [BASELINE]


def table(rows: list[dict]) -> str:
    lines = ["| config | path | MFLOP / px | ms / px | peak MiB / tile |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['config']} | UNet features (3 timesteps, halo {r['halo']}) | {r['unet_mflop']:.2f} | | |")
        lines.append(f"| {r['config']} | classifier patch-wise (unfold + predict) | {r['patch_mflop']:.2f} | "
                     f"{r['patch_ms']:.3f} | {r['patch_peak_mib']:.0f} |")
        lines.append(f"| {r['config']} | classifier dense (predict_dense) | {r['dense_mflop']:.2f} | "
                     f"{r['dense_ms']:.3f} | {r['dense_peak_mib']:.0f} |")
        if "baseline" in r:
            b = r["baseline"]
            lines.append(f"| {r['config']} | pre-change models, patch-wise ({BASELINE_LABEL[0]}) | {b['mflop']:.2f} | "
                         f"{b['ms']:.3f} | |")
            lines.append(f"| {r['config']} | ratio pre-change patch-wise / dense | {b['mflop'] / r['dense_mflop']:.1f}x | "
                         f"{b['ms'] / r['dense_ms']:.1f}x | |")
        lines.append(f"| {r['config']} | **ratio patch-wise / dense** | **{r['patch_mflop'] / r['dense_mflop']:.1f}x** | "
                     f"**{r['patch_ms'] / r['dense_ms']:.1f}x** | **{r['patch_peak_mib'] / max(r['dense_peak_mib'], 1):.1f}x** |")
    lines.append("")
    lines.append("Dense path by branch (MFLOP / px, ms / px), and checks:")
    for r in rows:
        parts = ", ".join(f"{b} {r['branch_mflop'][b]:.2f} / {r['branch_ms'][b]:.3f}" for b in r["branch_mflop"])
        lines.append(f"- {r['config']} (C_in {r['C_in']}, F {r['F']}, T {r['T']}, P {r['P']}): {parts}; "
                     f"max |dense - patch-wise| = {r['max_abs_diff']:.1e}; unfolded inputs of one tile "
                     f"{r['unfolded_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path (median kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--batch", type=int, default=1024, help="patches per predict call on the patch-wise path")
    ap.add_argument("--chunk", type=int, default=None, help="chunk_pixels of predict_dense (default: the library's)")
    ap.add_argument("--flop-patches", type=int, default=64, help="patches FLOP-counted on the patch-wise path")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the reference models ('' skips)")
    ap.add_argument("--_peak", nargs=2, metavar=("CONFIG", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--_baseline", nargs=2, metavar=("DIR", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._baseline:
        baseline_child(args._baseline[1], args)
        return 0
    from bdgf.models._shapes import DENSE_CHUNK

    args.chunk = args.chunk or DENSE_CHUNK
    if args._peak:
        peak_child(*args._peak, args.batch, args.chunk, args.threads)
        return 0
    BASELINE_LABEL[0] = args.baseline

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        t0 = time.perf_counter()
        rows.append(measure(name, args))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), chunk {args.chunk}, patch batch {args.batch}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
