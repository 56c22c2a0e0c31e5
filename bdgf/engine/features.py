"""Dense diffusion features of a run's denoiser, cached in the scene store (docs/method.md, Dense diffusion features).

One driver, :func:`compute_features`: here (``workers=0``) or as Ray tasks over disjoint sets of
tiles (``workers=N``); either way every tile goes through :func:`extract_tiles`, each tile writes
only its own chunks and ``_done`` flag, and an interrupted extraction resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import torch

from bdgf.config import FeatureConfig
from bdgf.data import feature_cache
from bdgf.data.scene import Scene
from bdgf.data.stores import open_stores
from bdgf.diffusion.features import FeatureSpec, aligned_halo, check_window, feature_name, tile_features, tile_noise
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet
from bdgf.errors import BDGFError
from bdgf.progress import Progress
from bdgf.run import Run, denoiser_from_checkpoint, state_hash
from bdgf.summaries import FeatureSummary
from bdgf.tiler import read_windows

log = logging.getLogger("bdgf.features")


def feature_spec(cfg: FeatureConfig, model: DenoiserUNet, checkpoint_hash: str,
                 modalities: list[str] | None = None) -> FeatureSpec:
    """The cache's settings: ``features.halo`` or, unset, the model's receptive radius rounded up
    to its stride phase (refused when smaller: features would depend on the tiling); with
    ``features.absent_variants`` and two or more ``modalities``, one variant per modality absent."""
    m = model.config.tile_multiple
    halo = aligned_halo(model.receptive_radius, m) if cfg.halo is None else int(cfg.halo)
    try:
        check_window(model, halo, cfg.tile_size)
    except ValueError as exc:
        raise BDGFError(f"features: {exc}") from exc
    return FeatureSpec(checkpoint=checkpoint_hash, timesteps=tuple(int(t) for t in cfg.timesteps),
                       draws=cfg.draws, noise_seed=cfg.noise_seed, tile_size=cfg.tile_size, halo=halo,
                       reduce=cfg.timestep_reduce,
                       absent=tuple(modalities) if cfg.absent_variants and modalities and len(modalities) > 1 else ())


def extract_tiles(store: str | Path, model: DenoiserUNet, schedule: NoiseSchedule, spec: FeatureSpec,
                  origins: Iterable, batch_size: int = 8, progress: bool = False,
                  device: str | torch.device = "cpu") -> int:
    """Compute and write the features of the given tiles (skipping finished ones). Returns the
    number of tiles computed."""
    scene = Scene.open(store)
    grid = spec.grid(*scene.shape)
    names = scene.modality_names
    cm = torch.as_tensor(scene.channel_modality, dtype=torch.int64)
    todo = feature_cache.pending(store, grid, origins)
    group = feature_cache.open_for_writing(store)
    bar = Progress(len(todo), "features", "tile", enabled=progress)
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            windows = torch.from_numpy(read_windows(scene, grid, batch)).to(device)
            corners = [grid.window(o)[:2] for o in batch]
            noise = tile_noise(spec, windows.shape[1], corners, windows.shape[-1])  # once for every variant
            feats = {}
            for absent in (None, *spec.absent):
                present = None if absent is None else torch.tensor([float(m != absent) for m in names])
                got = tile_features(model, schedule, windows, corners, spec, present, cm, noise)
                feats.update({feature_name(level, absent): f for level, f in got.items()})
            for j, origin in enumerate(batch):
                feature_cache.write(group, grid, origin, {n: f[j].float().cpu().numpy() for n, f in feats.items()})
            bar.update(len(batch))
    finally:
        bar.close()
    return len(todo)


def extract_part(store: str, denoiser: dict, spec: dict, origins: list, batch_size: int, device: str = "cpu") -> int:
    """One worker's share: rebuild the denoiser from its checkpoint dict and extract ``origins``
    (a Ray task; any process that sees the store can run it) on ``device`` ("cpu" | "gpu", chosen
    by the driver from the cluster's resources; the task then holds one GPU)."""
    open_stores([store], where="feature task")
    if device == "gpu" and not torch.cuda.is_available():
        raise BDGFError("feature task: the job asked for a GPU but torch sees no CUDA device on this node")
    device = torch.device("cuda") if device == "gpu" else torch.device("cpu")
    model, schedule = denoiser_from_checkpoint(denoiser, device)
    return extract_tiles(store, model, schedule, FeatureSpec.from_dict(spec),
                         [tuple(int(v) for v in o) for o in origins], batch_size, device=device)


def compute_features(store: str | Path, run_dir: str | Path, *, progress: bool = True, workers: int = 0,
                     address: str | None = None, batch_size: int | None = None,
                     device: str = "auto") -> FeatureSummary:
    """Make sure ``store`` holds the features of ``run_dir``'s denoiser (reuse, resume, new, or
    recompute when the cache was made for another checkpoint or setting). ``device`` "auto" |
    "cpu" | "gpu": the Ray tasks' (``workers=N``: from the cluster's resources) or this process's."""
    if workers < 0:
        raise BDGFError(f"--workers must be >= 0, got {workers}")
    from bdgf.distributed.launch import DEVICES, cluster_device, local_device, probe

    if (device or "auto").lower() not in DEVICES:
        raise BDGFError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if workers:
        probe(address)
        choice = cluster_device(device, address)
    else:
        choice = local_device(device)
    store = str(Path(store).resolve())
    scene = open_stores([store], where="driver")[0]
    run = Run(run_dir)
    run.check_scene(scene)
    cfg = run.config().features
    model, schedule, ckpt = run.load_denoiser()
    spec = feature_spec(cfg, model, state_hash(ckpt["model"]), scene.modality_names)
    channels = spec.channels(model)
    grid = spec.grid(*scene.shape)
    batch_size = batch_size or cfg.batch_size
    t0 = time.perf_counter()
    state = feature_cache.prepare(store, grid, spec.as_dict(), channels)
    if state == "recompute":
        log.warning("features in %s were cached for another checkpoint or setting; recomputing", store)
    if state != "reuse":
        tiles = grid.origins()
        if workers:
            from bdgf.distributed.launch import run_tasks

            denoiser = {k: ckpt[k] for k in ("model", "unet_config", "schedule")}
            parts = [p for p in (tiles[i::workers] for i in range(workers)) if len(p)]  # disjoint, balanced
            run_tasks(extract_part, [(store, denoiser, spec.as_dict(), p.tolist(), batch_size, choice.device)
                                     for p in parts], address=address, what="features", device=choice.device)
        else:
            local = torch.device("cuda") if choice.device == "gpu" else torch.device("cpu")
            extract_tiles(store, model.to(local), schedule, spec, tiles, batch_size, progress, device=local)
        if not feature_cache.mark_complete(store):
            raise BDGFError(f"{store}: some feature tiles are still missing; rerun to resume")
    wall = time.perf_counter() - t0
    h, w = scene.shape
    return FeatureSummary(state=state, checkpoint=spec.checkpoint, channels=channels, wall_s=wall,
                          pixels_per_s=(h * w / wall) if state != "reuse" else None, workers=max(workers, 1),
                          device=choice.device, device_reason=choice.reason)
