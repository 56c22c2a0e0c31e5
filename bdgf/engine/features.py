"""Dense diffusion features of a run's denoiser, cached in the scene store."""

from __future__ import annotations

import time
from pathlib import Path

from bdgf.config import FeatureConfig
from bdgf.data.scene import Scene
from bdgf.diffusion.features import FeatureSpec, extract_features
from bdgf.engine.pretrain import load_denoiser
from bdgf.errors import BDGFError
from bdgf.run import Run, state_hash


def feature_spec(cfg: FeatureConfig, checkpoint_hash: str, tile_multiple: int) -> FeatureSpec:
    side = cfg.tile_size + 2 * cfg.halo
    if side % tile_multiple:
        raise BDGFError(
            f"features.tile_size + 2*halo = {side} must be a multiple of {tile_multiple} for this denoiser"
        )
    return FeatureSpec(checkpoint=checkpoint_hash, timesteps=tuple(int(t) for t in cfg.timesteps),
                       draws=cfg.draws, noise_seed=cfg.noise_seed, tile_size=cfg.tile_size, halo=cfg.halo,
                       reduce=cfg.timestep_reduce)


def compute_features(store: str | Path, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Make sure ``store`` holds the features of ``run_dir``'s denoiser; returns a summary with
    ``state`` = reuse | resume | new | recompute."""
    scene = Scene.open(store)
    run = Run(run_dir)
    run.check_scene(scene)
    cfg = run.config().features
    model, schedule, ckpt = load_denoiser(run.denoiser_path)
    spec = feature_spec(cfg, state_hash(ckpt["model"]), model.config.tile_multiple)
    t0 = time.perf_counter()
    state = extract_features(store, model, schedule, spec, batch_size=cfg.batch_size, progress=progress)
    wall = time.perf_counter() - t0
    h, w = scene.shape
    return {"state": state, "checkpoint": spec.checkpoint, "wall_s": wall,
            "pixels_per_s": (h * w / wall) if state != "reuse" else None,
            "channels": spec.channels(model)}
