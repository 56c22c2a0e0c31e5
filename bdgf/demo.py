"""`make demo`: the whole pipeline on the embedded default, with nothing to download.

synthetic `demo` scene -> scene store -> summary + PNG preview -> pretrain (balanced DDPM with
adaptive masking) -> dense diffusion features -> classifier (three branches, mutual learning)
-> evaluation (OA / AA / kappa, metrics.json, classification map). Everything lands in ``--out``.

The demo config (``DEMO_OVERRIDES``) is sized to finish in a few minutes on 2 CPU cores; the
library defaults are what a real scene should use.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_OVERRIDES = {
    "pretrain.steps": 300,
    "pretrain.batch_size": 8,
    "pretrain.tile_size": 32,
    "pretrain.log_every": 10,
    "pretrain.checkpoint_every": 100,
    "pretrain.unet": {"base_channels": 16, "channel_mults": [1, 2, 2]},
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 30},
    "features.tile_size": 64,
    "features.halo": 16,
    "features.timesteps": [5, 50, 150],
    "train.epochs": 25,
    "train.batch_size": 32,
    "train.patience": 8,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for the store, the run and the PNGs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="demo", help="synthetic preset (tiny for a quick look)")
    args = parser.parse_args(argv)

    from bdgf.config import RunConfig
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.engine.classify import evaluate, train
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain
    from bdgf.preview import save_preview
    from bdgf.cli import _fmt_pretrain, format_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, run = out / f"{args.preset}.zarr", out / "run"
    t_all = time.perf_counter()

    def stage(name: str) -> float:
        print(f"\n== {name}", flush=True)
        return time.perf_counter()

    t = stage(f"1/6 synthetic scene '{args.preset}' (seed {args.seed}) -> {store}")
    scene = write_scene(make_scene(args.preset, args.seed), store, overwrite=True, progress=True)
    print(scene.summary())
    print(f"preview: {save_preview(scene, out / 'preview.png')}  ({time.perf_counter() - t:.1f} s)")

    cfg = RunConfig().with_overrides(DEMO_OVERRIDES)
    t = stage("2/6 pretrain the balanced multimodal denoiser")
    print(_fmt_pretrain(pretrain(store, run, cfg, overwrite=True)), f"({time.perf_counter() - t:.1f} s)")

    t = stage("3/6 dense diffusion features, cached in the store")
    f = compute_features(store, run)
    print(f"features {f['state']} for checkpoint {f['checkpoint']}: {f['channels']} ({time.perf_counter() - t:.1f} s)")

    t = stage("4/6 train the diffusion-guided classifier (cnn + mamba + transformer, mutual learning)")
    r = train(store, run, seed=args.seed)
    print(f"best val OA {r['val_oa']:.4f} at epoch {r['epoch']} ({time.perf_counter() - t:.1f} s)")

    t = stage("5/6 evaluate on the test split")
    m = evaluate(store, run, split="test")
    print(format_metrics(m))

    stage("6/6 outputs")
    for p in (store, out / "preview.png", run / "pretrain" / "curves.png", run / "train" / f"seed{args.seed}" / "curves.png",
              run / "eval" / "metrics.json", run / "eval" / "map_test.png"):
        print(f"  {p}")
    summary = {"oa": m["oa"]["mean"], "aa": m["aa"]["mean"], "kappa": m["kappa"]["mean"],
               "wall_s": time.perf_counter() - t_all}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nOA {100 * summary['oa']:.2f}%  AA {100 * summary['aa']:.2f}%  kappa {summary['kappa']:.4f}"
          f"  in {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
