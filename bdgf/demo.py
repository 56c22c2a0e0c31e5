"""`make demo`: the whole pipeline on the embedded default, with nothing to download.

synthetic `demo` scene -> scene store -> summary + PNG preview -> pretrain (balanced DDPM with
adaptive masking) -> dense diffusion features -> classifier (three branches, mutual learning)
-> evaluation (OA / AA / kappa, metrics.json, classification map). Everything lands in ``--out``.

The demo config (``DEMO_OVERRIDES``) is sized to finish in a few minutes on 2 CPU cores; the
library defaults are what a real scene should use.
"""

from __future__ import annotations

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
    "features.timesteps": [5, 50, 150],
    "train.epochs": 25,
    "train.batch_size": 32,
    "train.patience": 8,
}


def run_demo(out: str | Path = "demo", *, seed: int = 0, preset: str = "demo") -> dict:
    """Run every stage into ``out``; returns the summary also written to ``out/summary.json``."""
    from bdgf.config import RunConfig
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.engine.classify import evaluate, train
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain
    from bdgf.preview import save_preview
    from bdgf.run import Run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store, run = out / f"{preset}.zarr", Run(out / "run")
    t_all = time.perf_counter()

    def stage(name: str) -> float:
        print(f"\n== {name}", flush=True)
        return time.perf_counter()

    t = stage(f"1/6 synthetic scene '{preset}' (seed {seed}) -> {store}")
    scene = write_scene(make_scene(preset, seed), store, overwrite=True, progress=True)
    print(scene.summary())
    print(f"preview: {save_preview(scene, out / 'preview.png')}  ({time.perf_counter() - t:.1f} s)")

    cfg = RunConfig().with_overrides(DEMO_OVERRIDES)
    t = stage("2/6 pretrain the balanced multimodal denoiser")
    print(pretrain(store, run.path, cfg, overwrite=True).line(), flush=True)

    t = stage("3/6 dense diffusion features, cached in the store")
    print(compute_features(store, run.path).line(), flush=True)

    t = stage("4/6 train the diffusion-guided classifier (cnn + mamba + transformer, mutual learning)")
    print(train(store, run.path, seed=seed).line(), flush=True)

    t = stage("5/6 evaluate on the test split (and with each modality absent)")
    m = evaluate(store, run.path, split="test")
    print(m.text(), f"({time.perf_counter() - t:.1f} s)")
    without = {}
    for modality in scene.modality_names:
        mm = evaluate(store, run.path, split="test", absent=modality, write_map=False)
        without[modality] = mm.oa["mean"]
        print(f"  without {modality}: OA {100 * mm.oa['mean']:.2f}%  AA {100 * mm.aa['mean']:.2f}%  "
              f"kappa {mm.kappa['mean']:.4f}")

    stage("6/6 outputs")
    for p in (store, out / "preview.png", run.pretrain_dir / "curves.png", run.seed_dir(seed) / "curves.png",
              run.eval_dir / "metrics.json", run.eval_dir / "map_test.png"):
        print(f"  {p}")
    summary = {"oa": m.oa["mean"], "aa": m.aa["mean"], "kappa": m.kappa["mean"],
               "oa_without": without, "wall_s": time.perf_counter() - t_all}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nOA {100 * summary['oa']:.2f}%  AA {100 * summary['aa']:.2f}%  kappa {summary['kappa']:.4f}"
          f"  in {summary['wall_s']:.0f} s")
    return summary


if __name__ == "__main__":  # `python -m bdgf.demo --out demo` is `bdgf demo --out demo`
    import sys

    from bdgf.cli import main

    main(["demo", *sys.argv[1:]])
