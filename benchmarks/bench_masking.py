"""The adaptive-masking trajectory of a short single-process pretraining on a synthetic preset.

Writes the preset's scene store once (``--work``, default /tmp/bdgf_bench/masking), pretrains the
demo-sized denoiser with ``bdgf.engine.pretrain`` (build_denoiser, tile_batches, pretrain_loop) and
prints, every ``--every`` steps, the loss and per modality p_m and D_m ± se_m (the paired
dependence estimate; ``*`` where it is distinguishable from zero and so used), then which modality
ends masked most. Plain program, no assertion; defaults take a few minutes on 2 loaded cores.

    .venv/bin/python benchmarks/bench_masking.py [--preset imbalance] [--steps 300] [--every 20]
        [--batch 8] [--tile 32] [--z 2] [--paired-fraction 0.25] [--mode adaptive] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="imbalance", help="synthetic preset (bdgf.data.synthetic.PRESETS)")
    ap.add_argument("--seed", type=int, default=0, help="scene and training seed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=20, help="print every this many steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--mode", default="adaptive", choices=["adaptive", "uniform", "none"])
    ap.add_argument("--warmup", type=int, default=30, help="masking warm-up steps")
    ap.add_argument("--z", type=float, default=None, help="gate (default: MaskingConfig's)")
    ap.add_argument("--paired-fraction", type=float, default=None, help="default: MaskingConfig's")
    ap.add_argument("--ema", type=float, default=None, help="default: MaskingConfig's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/bdgf_bench/masking")
    return ap.parse_args(argv)


def scene_store(preset: str, seed: int, work: Path) -> Path:
    """The preset's store under ``work`` (written once, reused)."""
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene

    store = work / f"{preset}_seed{seed}.zarr"
    if not store.exists():  # write_scene is atomic: a store that exists is complete
        work.mkdir(parents=True, exist_ok=True)
        write_scene(make_scene(preset, seed), store)
    return store


def format_row(step: int, logs: dict, names: list[str], significant: list[bool]) -> str:
    cells = [f"{step:>5}", f"{logs['loss']:.4f}"]
    for n, sig in zip(names, significant):
        d, se = logs.get(f"dep/{n}"), logs.get(f"dep_se/{n}")
        dep = f"{d:+.3f} ± {se:.3f}{'*' if sig else ' '}" if d is not None else f"{'–':^16}"
        cells.append(f"{logs[f'p_mask/{n}']:.3f}  {dep}")
    return " | ".join(cells)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from bdgf.config import RunConfig
    from bdgf.data.scene import Scene
    from bdgf.engine.loop import TorchStepper, cycle
    from bdgf.engine.pretrain import build_denoiser, pretrain_loop, tile_batches
    from bdgf.summaries import most_masked

    torch.set_num_threads(args.threads)
    store = scene_store(args.preset, args.seed, Path(args.work))
    scene = Scene.open(store)
    names = scene.modality_names
    bands = [scene.bands[n] for n in names]
    masking_cfg = {"mode": args.mode, "warmup_steps": args.warmup}
    for key, value in (("z", args.z), ("paired_fraction", args.paired_fraction), ("ema", args.ema)):
        if value is not None:
            masking_cfg[key] = value
    cfg = RunConfig().with_overrides({
        "pretrain.steps": args.steps, "pretrain.batch_size": args.batch, "pretrain.tile_size": args.tile,
        "pretrain.lr": args.lr, "pretrain.seed": args.seed, "pretrain.masking": masking_cfg,
        "pretrain.unet": {"base_channels": args.base_channels, "channel_mults": [1, 2, 2]},
    }).pretrain
    torch.manual_seed(cfg.seed)
    model, schedule, masking = build_denoiser(cfg, bands)
    stepper = TorchStepper(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), cfg.grad_clip)
    loader, generator = tile_batches([str(store)], cfg, micro_batch=cfg.batch_size)

    print(f"preset {args.preset!r} seed {args.seed}: {scene.shape[0]}x{scene.shape[1]}, "
          f"modalities {dict(zip(names, bands))}; {args.steps} steps of {args.batch} tiles of {args.tile}², "
          f"masking {masking.config}")
    print(f"pairs per step: {masking.num_pairs(args.batch)}; '*' = |D| > z·se (used by the adaptation)")
    head = ["step ", "loss  "] + [f"p/{n}  D/{n} ± se" for n in names]
    print(" | ".join(head))

    def on_log(rec: dict) -> None:
        print(format_row(rec["step"], rec, names, [bool(v) for v in masking.significant]), flush=True)

    t0 = time.perf_counter()
    logs = pretrain_loop(model, schedule, masking, cycle(loader), stepper, steps=cfg.steps,
                         channel_modality=torch.as_tensor(scene.channel_modality), modality_names=names,
                         loss_kind=cfg.loss_kind, generator=generator, log_every=args.every, on_log=on_log)
    wall = time.perf_counter() - t0

    p = {n: logs[f"p_mask/{n}"] for n in names}
    d, se = masking.dependence.tolist(), masking.dependence_se.tolist()
    print(f"\nfinal after {cfg.steps} steps ({wall:.0f} s, {wall / cfg.steps:.2f} s/step):")
    for i, n in enumerate(names):
        print(f"  {n:>8}: p = {p[n]:.3f}   D = {d[i]:+.4f} ± {se[i]:.4f}   "
              f"({'used' if bool(masking.significant[i]) else 'not distinguishable from 0'})")
    print(f"most masked: {most_masked(p)}")


if __name__ == "__main__":
    main()
