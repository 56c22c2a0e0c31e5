"""Dense per-tile diffusion features vs one UNet pass per classified pixel's patch.

Both paths use the same denoiser (the demo config's UNet: base 16, mults [1, 2, 2], tile-invariant;
random weights, since cost does not depend on them) on the same scene (the synthetic ``demo``
preset, 128×128, HSI 32 + LiDAR 1) with the same timesteps (5, 50, 150; one noise draw each), and
both give the same features (tile invariance):

* **dense** (ours, docs/method.md): non-overlapping T×T tiles (T = 64) read with a halo h = the
  receptive radius rounded up to the stride phase (28), so one UNet pass over a (T + 2h)² window
  per tile and timestep serves all T² pixels.
* **per-patch**: one UNet pass per classified pixel over the smallest window that gives its
  P×P patch the same features: the patch plus the receptive radius on every side, widened to the
  stride phase (68×68 for P = 11).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (counts matmul/conv/SDPA; a
multiply-add is 2 FLOPs; norms and activations are not counted). Wall time: the dense path over the
whole scene; the per-patch path over a subset of pixels (``--pixels``, batched), extrapolated per
pixel. Via ``bdgf.diffusion.features.tile_features`` and ``window_features`` (noise + UNet), no store writes.

    .venv/bin/python benchmarks/bench_dense_features.py [--pixels 256] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOAD0 = __import__("os").getloadavg()  # 1/5/15-min load when the script started
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=256, help="pixels timed on the per-patch path")
    ap.add_argument("--batch", type=int, default=64, help="windows per UNet call on the per-patch path")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of the dense path (best kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--work", default="/tmp/bdgf_bench/dense")
    ap.add_argument("--results", default=None, help="write the section into this RESULTS.md")
    args = ap.parse_args(argv)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bdgf.config import RunConfig
    from bdgf.data.scene import Scene, write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.demo import DEMO_OVERRIDES
    from bdgf.diffusion.features import FeatureSpec, tile_features
    from bdgf.engine.pretrain import build_denoiser

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "demo.zarr"
    write_scene(make_scene("demo", 0), store, overwrite=True, progress=False)
    scene = Scene.open(store)
    H, W = scene.shape
    cfg = RunConfig().with_overrides(DEMO_OVERRIDES)
    bands = [scene.bands[n] for n in scene.modality_names]
    model, schedule, _ = build_denoiser(cfg.pretrain, bands)
    model.eval().requires_grad_(False)
    fc = cfg.features
    steps = tuple(int(t) for t in fc.timesteps)
    from bdgf.diffusion.features import aligned_halo, window_features

    m, Rf = model.config.tile_multiple, model.receptive_radius
    T, h = fc.tile_size, aligned_halo(Rf, m)
    S = T + 2 * h
    P = cfg.train.patch_size
    Wp = aligned_halo(P + 2 * Rf + m - 1, m)  # covers the patch + Rf from any stride phase
    dense_spec = FeatureSpec(checkpoint="bench", timesteps=steps, draws=1, noise_seed=fc.noise_seed,
                             tile_size=T, halo=h, reduce=fc.timestep_reduce)
    patch_spec = dense_spec

    # --- dense: every tile of the scene ---------------------------------------------------
    from bdgf.tiler import read_windows

    grid = dense_spec.grid(H, W)
    origins = grid.origins()
    windows = torch.from_numpy(read_windows(scene, grid, origins))
    win_origins = [grid.window(o)[:2] for o in origins]
    with FlopCounterMode(display=False) as counter:
        tile_features(model, schedule, windows[:1], win_origins[:1], dense_spec)
    dense_flops_tile = counter.get_total_flops()  # one tile, all timesteps
    dense_flops = dense_flops_tile * len(origins)
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, len(origins), fc.batch_size):
            tile_features(model, schedule, windows[i : i + fc.batch_size], win_origins[i : i + fc.batch_size], dense_spec)
        best = min(best, time.perf_counter() - t0)
    dense_pixels = H * W
    dense_s_px = best / dense_pixels
    dense_flops_px = dense_flops / dense_pixels

    # --- per-patch: one 12×12 window per pixel, on a random subset of pixels --------------
    rng = np.random.default_rng(0)
    flat = rng.choice(H * W, size=min(args.pixels, H * W), replace=False)
    centres = [(int(i // W), int(i % W)) for i in flat]
    lo = P // 2
    po = [((r - lo - Rf) // m * m, (c - lo - Rf) // m * m) for r, c in centres]  # on the stride phase
    pw = torch.from_numpy(np.stack([scene.read_window(r0, c0, Wp, Wp, concat=True) for r0, c0 in po]))
    with FlopCounterMode(display=False) as counter:
        window_features(model, schedule, pw[:1], po[:1], patch_spec)
    patch_flops_px = counter.get_total_flops()
    window_features(model, schedule, pw[: args.batch], po[: args.batch], patch_spec)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(centres), args.batch):
        window_features(model, schedule, pw[i : i + args.batch], po[i : i + args.batch], patch_spec)
    patch_wall = time.perf_counter() - t0
    patch_s_px = patch_wall / len(centres)

    n_params = sum(p.numel() for p in model.parameters())
    rows = [
        ("UNet input per pass", f"{S}×{S} (tile {T} + halo {h} each side)", f"{Wp}×{Wp} (patch {P} + receptive radius {Rf}, on the stride phase)"),
        ("passes per pixel", f"{len(steps)}/{T * T} = {len(steps) / (T * T):.2e}", f"{len(steps)}"),
        ("GFLOP per pass", f"{dense_flops_tile / len(steps) / 1e9:.3f}", f"{patch_flops_px / len(steps) / 1e9:.4f}"),
        ("MFLOP per classified pixel", f"{dense_flops_px / 1e6:.2f}", f"{patch_flops_px / 1e6:.2f}"),
        ("wall per pixel (µs)", f"{1e6 * dense_s_px:.1f}", f"{1e6 * patch_s_px:.1f}"),
        ("whole 128×128 scene (s)", f"{best:.2f} (measured)", f"{patch_s_px * dense_pixels:.1f} (extrapolated from {len(centres)} px)"),
    ]
    table = "\n".join(["| | dense per tile (ours) | one pass per patch |", "| --- | --- | --- |"]
                      + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    ratio_f = patch_flops_px / dense_flops_px
    ratio_t = patch_s_px / dense_s_px
    summary = (f"Per classified pixel, per-patch / dense: **{ratio_f:.1f}× the FLOPs, {ratio_t:.1f}× the wall time**. "
               f"(The dense path pays a halo overhead of ({S}/{T})² = {(S / T) ** 2:.2f}× and still wins because a "
               f"{Wp}×{Wp} pass serves one pixel while a {S}×{S} pass serves {T * T}.)")
    print(table + "\n\n" + summary)
    section = "\n".join([
        "## Dense per-tile features vs one UNet pass per patch",
        "",
        f"Run {_dt.date.today().isoformat()} on {platform.node() or 'this machine'}: 2 CPU cores shared with other jobs "
        f"(load average {LOAD0[0]:.1f} / {LOAD0[1]:.1f} / {LOAD0[2]:.1f} at start; end {__import__('os').getloadavg()[0]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} torch threads. Command: "
        f"`.venv/bin/python benchmarks/bench_dense_features.py --pixels {args.pixels}"
        f"{' --threads ' + str(args.threads) if args.threads else ''}`.",
        "",
        f"Scene: synthetic `demo` (128×128, {scene.total_bands} bands: HSI 32 + LiDAR 1). Model: the demo UNet "
        f"({n_params / 1e6:.2f} M parameters, base 16, mults [1, 2, 2], receptive radius {Rf} px), "
        f"timesteps {list(steps)}, 1 draw. The per-patch path uses the smallest window that gives a pixel's 11×11 "
        f"patch the features the dense path gives it ({Wp}×{Wp}, on the stride phase). FLOPs: "
        "`FlopCounterMode` (matmul/conv/attention, multiply-add = 2). Wall: the dense path over all "
        f"{len(origins)} tiles (best of {args.repeats}); the per-patch path over {len(centres)} random pixels in "
        f"batches of {args.batch}, per pixel. No store I/O in either.",
        "",
        table,
        "",
        summary,
        "",
    ])
    if args.results:
        from bench_ablation import write_results

        write_results(Path(args.results), section)
        print(f"wrote section into {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
