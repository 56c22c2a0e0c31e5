"""The back ends of :mod:`bdgf.backends` side by side: pixels/s of each one that runs here against
eager PyTorch on the same tiles, the max abs difference of their probabilities, and what int8
costs in accuracy.

"Eager" is :meth:`bdgf.pipeline.Pipeline.from_run(...).classify_windows`: the run's inference
graph (:class:`bdgf.inference.TileClassifier`) as a plain ``nn.Module``, with the eager code paths
(e.g. the chunked in-place selective scan). The back ends run the exported package through
``open_backend(pkg, kind).classify(windows, origins, normalised=True)``:

* ``onnx``       ONNX Runtime, CPU provider (``model.onnx``; session options of ``onnx_session``)
* ``onnx-int8``  ONNX Runtime on ``model_int8.onnx`` (``bdgf export --int8``)
* ``aoti``       the AOTInductor package (``model_aoti.pt2``, compiled for the CPU)
* ``torch``      the torch.export program run by PyTorch (``program.pt2``): the *traced* graph
                 (the exported code paths, e.g. the parallel scan formulation), not eager

Both sides include the position-keyed noise (numpy, the same code) and take windows already
normalised; the back ends also make the class map. Timing: every (back end, batch) first runs
once untimed (warm-up: ONNX Runtime plans its memory per shape), then ``--repeats`` rounds, each
round running every back end once in turn (so drift of a shared machine hits all alike); pixels/s
= B·T² / seconds of one call; median and sample std (ddof 1) over the rounds; "x eager" is the
ratio of medians, measured in the same process and rounds. The noise alone (``package.noise``,
numpy) is timed in the same rounds: it is a fixed cost in every row, which caps the ratios.

Configurations:

* ``demo``: a trained run (``--run RUN``; default: the demo config trained on the ``tiny``
  scene as ``bdgf demo --preset tiny`` does, into a temporary folder, ~20-60 s): the demo classifier (CNN + Mamba + transformer), T = 64. Its test
  pixels give the accuracy: OA of eager, ONNX and int8 on the ``test`` split (the scene tiled by
  the run's grid, each pixel classified once) and the max abs probability difference of int8.
* ``cnn``: random weights (costs do not depend on them), the CNN branch only, T = 16 (the test
  suite's random run): where the UNet and convolutions dominate.

    .venv/bin/python benchmarks/bench_backends.py [--run RUN] [--configs demo cnn] [--repeats 3]
        [--threads 1] [--batches 1 4 16] [--demo-batches 1] [--backends onnx onnx-int8 aoti torch]
        [--demo-aoti]

Threads: PyTorch, AOTInductor (OpenMP) and ONNX Runtime all get ``--threads`` intra-op threads.
AOTInductor on the demo run only with ``--demo-aoti``: compiling its graph (the Mamba scan and the
token-mixing chunks unrolled) took ~1.5 of the 2.25 min its export took on the shared 2-core
machine (9 of 16 min before the graph mixed 4 chunks a tile instead of 16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")) if p not in sys.path]

KINDS = ("onnx", "onnx-int8", "aoti", "torch")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a trained run for the demo configuration (default: train one)")
    ap.add_argument("--configs", nargs="+", default=["demo", "cnn"], choices=["demo", "cnn"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16], help="batch sizes (cnn)")
    ap.add_argument("--demo-batches", nargs="+", type=int, default=[1],
                    help="batch sizes of the demo configuration (a demo tile takes ~1 s eager on one core; "
                         "a batch of 4 ran out of memory, >11 GB, on the shared 23 GB machine)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--demo-aoti", action="store_true",
                    help="also compile and time AOTInductor on the demo run (+~1.5 min of export and ~40%% "
                         "more timing on 2 cores; the cnn configuration always times it)")
    ap.add_argument("--work", type=Path, help="folder for the runs and packages (default: a temporary one)")
    return ap.parse_args(argv)


def quick_demo_run(work: Path) -> Path:
    """The stages of `bdgf demo --preset tiny` that make a trained run (scene store, pretraining,
    features, classifier seed 0, with ``bdgf.demo.DEMO_OVERRIDES``), output muted: the run's directory."""
    import contextlib
    import io

    from bdgf.config import RunConfig
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.demo import DEMO_OVERRIDES
    from bdgf.engine.classify import train
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain

    t = time.perf_counter()
    store, run = work / "demo" / "tiny.zarr", work / "demo" / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        write_scene(make_scene("tiny", 0), store, overwrite=True)
        pretrain(store, run, RunConfig().with_overrides(DEMO_OVERRIDES), overwrite=True)
        compute_features(store, run)
        train(store, run, seed=0)
    print(f"trained the demo config on the tiny scene in {time.perf_counter() - t:.0f} s -> {run}", flush=True)
    return run


def random_cnn_run(work: Path) -> Path:
    from test_export_package import make_random_run

    return make_random_run(work / "cnn")[1]


def export(run: Path, out: Path, kinds, max_batch: int) -> dict:
    from bdgf.export import export_run

    formats = [k for k in ("onnx", "onnx-int8", "aoti") if k in kinds or (k == "onnx" and "onnx-int8" in kinds)]
    t = time.perf_counter()
    manifest = export_run(run, out, formats, max_batch=max_batch, overwrite=True)
    print(f"exported {formats} + torch program in {time.perf_counter() - t:.0f} s -> {out}")
    for fmt, check in manifest["checks"].items():
        extra = f", class agreement {check['class_agreement']:.4f}" if "class_agreement" in check else ""
        print(f"  export check {fmt}: max abs diff vs PyTorch {check['max_abs_diff']:.2e}{extra}")
    return manifest


def scene_tiles(pipe, batch: int):
    """``batch`` normalised windows (B, C, S, S) of the run's scene and their tile origins: the
    scene's own tiles in turn, repeated at further origins on the tile grid when the scene has
    fewer (the noise differs, the cost does not)."""
    import numpy as np

    from bdgf.data.scene import Scene
    from bdgf.tiler import read_windows

    scene = Scene.open(pipe.run.info()["store"])
    grid = pipe.grid(*scene.shape)
    own = [tuple(map(int, o)) for o in grid.origins()]
    windows = read_windows(scene, grid, own, nodata=np.nan)
    T, cols = pipe.tile_size, grid.shape[1]
    origins = [(own[i % len(own)][0], own[i % len(own)][1] + (i // len(own)) * T * (cols + 1)) for i in range(batch)]
    return np.stack([windows[i % len(own)] for i in range(batch)]).astype(np.float32), origins


def time_backends(pipe, backends: dict, batches, repeats: int) -> None:
    """The table: px/s median ± sample std, x eager, max abs diff of probabilities vs eager."""
    import numpy as np

    from stats import sample_std

    T, halo = pipe.tile_size, pipe.halo
    print(f"\n{'batch':>5}  {'back end':<10} {'px/s median':>12} {'± std':>9} {'x eager':>8}  {'max |Δp| vs eager':>17}")
    for B in batches:
        windows, origins = scene_tiles(pipe, B)
        corners = [(r - halo, c - halo) for r, c in origins]
        calls = {"eager": lambda: pipe.classify_windows(windows, corners)}
        for kind, be in backends.items():
            calls[kind] = (lambda be=be: be.classify(windows, origins, normalised=True, probabilities=True).probabilities)
        outs = {name: np.asarray(fn()) for name, fn in calls.items()}  # warm-up, and the outputs compared
        if backends:  # the position-keyed noise alone (numpy), part of every call above
            package = next(iter(backends.values())).package
            calls["noise"] = lambda: package.noise(origins)
        rates = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                t = time.perf_counter()
                fn()
                rates[name].append(B * T * T / (time.perf_counter() - t))
        eager = statistics.median(rates["eager"])
        noise = rates.pop("noise", None)
        for name, r in rates.items():
            med = statistics.median(r)
            diff = "" if name == "eager" else f"{float(np.abs(outs[name] - outs['eager']).max()):.2e}"
            print(f"{B:>5}  {name:<10} {med:>12.0f} {sample_std(r) if len(r) > 1 else float('nan'):>9.0f} "
                  f"{med / eager:>8.2f}  {diff:>17}")
        if noise:
            per_tile = 1e3 * T * T / statistics.median(noise)
            print(f"{B:>5}  (the position-keyed noise alone: {per_tile:.1f} ms a tile, "
                  f"{100 * statistics.median(rates['eager']) / statistics.median(noise):.0f}% of an eager call; "
                  "numpy, in every row)")


def accuracy(pipe, backends: dict) -> None:
    """OA on the test split: the scene tiled by the run's grid, eager vs each back end, and the
    max abs probability difference over the labelled test pixels."""
    import numpy as np

    from bdgf.data.scene import Scene
    from bdgf.tiler import read_windows

    scene = Scene.open(pipe.run.info()["store"])
    H, W = scene.shape
    grid = pipe.grid(H, W)
    origins = [tuple(map(int, o)) for o in grid.origins()]
    windows = read_windows(scene, grid, origins, nodata=np.nan)
    T, halo = pipe.tile_size, pipe.halo

    def stitch(probs):
        full = np.zeros((probs.shape[1], H, W), np.float32)
        for (r, c), p in zip(origins, probs):
            h, w = min(T, H - r), min(T, W - c)
            full[:, r : r + h, c : c + w] = p[:, :h, :w]
        return full

    labels = scene.labels("test")
    mask = labels > 0
    maps = {"eager": stitch(pipe.classify_windows(windows, [(r - halo, c - halo) for r, c in origins]))}
    for kind in ("onnx", "onnx-int8"):
        if kind in backends:
            maps[kind] = stitch(backends[kind].classify(windows, origins, normalised=True, probabilities=True).probabilities)
    print(f"\naccuracy on the test split: {int(mask.sum())} labelled pixels, {len(origins)} tile(s) of {T} px")
    oa = {name: float(((p.argmax(0) + 1) == labels)[mask].mean()) for name, p in maps.items()}
    for name, p in maps.items():
        line = f"  {name:<10} OA {100 * oa[name]:6.2f}%"
        if name != "eager":
            line += (f"   ΔOA vs eager {100 * (oa[name] - oa['eager']):+.2f} pt   max |Δp| on test pixels "
                     f"{float(np.abs(p - maps['eager'])[:, mask].max()):.2e}   same class as eager "
                     f"{100 * float((p.argmax(0) == maps['eager'].argmax(0))[mask].mean()):.2f}%")
        print(line)
    if "onnx" in maps and "onnx-int8" in maps:
        print(f"  int8 vs fp32 ONNX: ΔOA {100 * (oa['onnx-int8'] - oa['onnx']):+.2f} pt, max |Δp| "
              f"{float(np.abs(maps['onnx-int8'] - maps['onnx'])[:, mask].max()):.2e}")


def bench_config(name: str, run: Path, work: Path, args, batches) -> None:
    from bdgf.backends import open_backend
    from bdgf.pipeline import Pipeline

    print(f"\n=== {name}: {run}")
    pipe = Pipeline.from_run(run)
    cfg = pipe.config.train
    print(f"tile T = {pipe.tile_size}, halo {pipe.halo}, window {pipe.tile_size + 2 * pipe.halo} px, "
          f"{int(pipe.graph.channel_modality.numel())} bands, timesteps {list(pipe.spec.timesteps)}, "
          f"branches {list(cfg.branches)}, P = {cfg.patch_size}, {args.threads} thread(s)")
    kinds = [k for k in args.backends if k != "aoti" or name != "demo" or args.demo_aoti]
    export(run, work / f"{name}_pkg", kinds, max(batches))
    backends = {kind: open_backend(work / f"{name}_pkg", kind) for kind in kinds}
    time_backends(pipe, backends, batches, args.repeats)
    if name == "demo":
        accuracy(pipe, backends)


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = threads  # AOTInductor's OpenMP, read when torch loads
    os.environ["BDGF_ORT_THREADS"] = threads
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, repeats {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="bench_backends_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.configs:
            if name == "demo":
                bench_config("demo", args.run or quick_demo_run(work), work, args, args.demo_batches)
            else:
                bench_config("cnn", random_cnn_run(work), work, args, args.batches)


if __name__ == "__main__":
    main()
