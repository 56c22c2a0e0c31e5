"""What the library defaults cost on a real benchmark scene, measured here and extrapolated.

The defaults (``bdgf.config``: ``RunConfig()``) are what a real scene should use; the demo keeps
its own small overrides. This script times each stage's unit of work with those defaults at a
scene's band count and extrapolates to the whole scene (default: Houston2013, 349×1905 px,
HSI 144 + LiDAR 1, 15 classes, 2,832 official training pixels of which 80 % train after `val` is
carved). Random tensors, no store I/O, so the figures are compute only.

* pretrain: one optimiser step (batch × tile², forward + backward + AdamW) of the default UNet;
* features: one denoiser pass over a tile's window (tile + 2·halo)² per timestep and per
  presence variant (all present, and each modality absent), per scene pixel;
* train: one classifier step (batch of P×P patches, three branches, mutual learning), per
  training patch, times the default epochs.

    .venv/bin/python benchmarks/bench_defaults.py [--threads 2] [--bands 144,1] [--height 349 --width 1905]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bands", default="144,1", help="bands per modality, comma-separated")
    ap.add_argument("--height", type=int, default=349)
    ap.add_argument("--width", type=int, default=1905)
    ap.add_argument("--classes", type=int, default=15)
    ap.add_argument("--train-pixels", type=int, default=2266, help="training patches per epoch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from bdgf.config import RunConfig
    from bdgf.diffusion.features import aligned_halo
    from bdgf.engine.classify import build_classifier
    from bdgf.engine.pretrain import build_denoiser
    from bdgf.losses import MutualLearningLoss  # noqa: F401  (built by build_classifier)
    from bdgf.models.inputs import input_channels

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bands = [int(b) for b in args.bands.split(",")]
    C, M = sum(bands), len(bands)
    cfg = RunConfig()
    pc, fc, tc = cfg.pretrain, cfg.features, cfg.train
    model, schedule, masking = build_denoiser(pc, bands)
    params = sum(p.numel() for p in model.parameters())
    cm = torch.repeat_interleave(torch.arange(M), torch.tensor(bands))

    # --- pretrain: one step
    from bdgf.diffusion.step import diffusion_training_step

    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr)
    x0 = torch.randn(pc.batch_size, C, pc.tile_size, pc.tile_size)
    gen = torch.Generator().manual_seed(0)

    def pre_step():
        loss, _ = diffusion_training_step(model, schedule, masking, x0, cm, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_step = _median_time(pre_step, args.repeats)

    # --- features: one window pass per timestep and variant
    model.eval()
    halo = fc.halo if fc.halo is not None else aligned_halo(model.receptive_radius, model.config.tile_multiple)
    S = fc.tile_size + 2 * halo
    win = torch.randn(1, C, S, S)
    t = torch.tensor([5])
    present = torch.ones(1, M)

    def pass_once():
        with torch.no_grad():
            model.forward_with_features(win, t, present)

    t_pass = _median_time(pass_once, args.repeats)
    variants = 1 + (M if fc.absent_variants and M > 1 else 0)
    per_tile = t_pass * len(fc.timesteps) * fc.draws * variants
    tiles = -(-args.height // fc.tile_size) * -(-args.width // fc.tile_size)

    # --- train: one classifier step
    mult = len(fc.timesteps) if fc.timestep_reduce == "concat" else 1
    feat_ch = {k: v * mult for k, v in model.feature_channels.items()}
    clf, crit = build_classifier(tc, input_channels(C, M), feat_ch, args.classes)
    P = tc.patch_size
    xs = [torch.randn(tc.batch_size, input_channels(C, M), P, P)] + [
        torch.randn(tc.batch_size, feat_ch[k], P, P) for k in ("low", "mid", "high")]
    y = torch.randint(0, args.classes, (tc.batch_size,))
    opt2 = torch.optim.AdamW(list(clf.parameters()) + list(crit.parameters()), lr=tc.lr)

    def train_step():
        out = clf(*xs)
        loss, _ = crit(out["logits"], out["z"], y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()

    t_train = _median_time(train_step, args.repeats)
    per_epoch = t_train * -(-args.train_pixels // tc.batch_size)

    load = os.getloadavg()
    print(f"# Library defaults on a {args.height}x{args.width} scene, bands {bands}, {args.classes} classes "
          f"({args.threads} torch threads, load {load[0]:.1f}; median of {args.repeats})")
    print(f"denoiser: {params / 1e6:.2f} M parameters, receptive radius {model.receptive_radius} px, halo {halo}")
    print("| stage | default | unit cost | whole scene (extrapolated) |")
    print("| --- | --- | --- | --- |")
    print(f"| pretrain | {pc.steps} steps × batch {pc.batch_size} of {pc.tile_size}² tiles | {t_step:.2f} s/step "
          f"| {pc.steps * t_step / 3600:.2f} h |")
    print(f"| features | tile {fc.tile_size} + halo {halo}, {len(fc.timesteps)} timesteps × {variants} presence "
          f"variants | {per_tile:.2f} s/tile | {tiles * per_tile / 60:.1f} min ({tiles} tiles) |")
    print(f"| train | ≤ {tc.epochs} epochs × {args.train_pixels} patches, batch {tc.batch_size}, P {P} "
          f"| {t_train:.3f} s/step | {tc.epochs * per_epoch / 60:.1f} min per seed (at most) |")


if __name__ == "__main__":
    main()
