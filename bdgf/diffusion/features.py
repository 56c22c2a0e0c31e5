"""Dense diffusion features (DESIGN §1.3): the frozen denoiser over overlapping tiles.

Each tile of T×T pixels is read with a halo of h pixels on every side (reflect-padded at the
scene border), noised to a few timesteps with noise that depends only on the *global pixel
position* (so overlapping tiles see the same noise and any batch size or worker count gives the
same features), passed once through the UNet, and the decoder activations at three depths are
upsampled to the tile grid, the halo cropped, and written to ``features/<level>`` (F, H, W)
float16. One UNet pass serves every pixel of a tile; never one pass per classified pixel.

Glossary
    C   input channels (all modalities)      T  tile size (= feature chunk size)
    h   halo                                  S  T + 2h, the side of the window the UNet sees
    F_l channels of level l per timestep     n_t number of timesteps
    F   stored channels: F_l * n_t (concat) or F_l (mean)

Cache: ``features`` group attributes hold the spec (checkpoint hash, timesteps, draws, noise
seed, tile, halo, reduce) and ``complete``; ``features/_done`` (rows, cols of tiles) marks
finished tiles so an interrupted extraction resumes. Each tile owns whole chunks.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from bdgf.data.scene import Scene
from bdgf.data.tiles import tile_origins
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet

log = logging.getLogger("bdgf.features")
LEVELS = ("low", "mid", "high")


@dataclass(frozen=True)
class FeatureSpec:
    checkpoint: str  # hash of the denoiser's weights
    timesteps: tuple[int, ...]
    draws: int
    noise_seed: int
    tile_size: int
    halo: int
    reduce: str  # "concat" | "mean"

    def channels(self, model: DenoiserUNet) -> dict[str, int]:
        per = model.feature_channels
        mult = len(self.timesteps) if self.reduce == "concat" else 1
        return {name: per[name] * mult for name in LEVELS}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(d["timesteps"])
        return d


# ----------------------------------------------------------------------------------------
# Position-keyed noise
# ----------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (xor-shift-multiply); x uint64 holding 32-bit values."""
    x = x & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    x ^= x >> np.uint64(16)
    return x


def position_noise(seed: int, channels: int, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Standard-normal noise (C, height, width) float32 for the window at global (row0, col0).

    A pure function of (seed, channel, row, column): the same pixel gets the same value in
    every tile that covers it. Box–Muller on two hashed uniforms.
    """
    off = np.uint64(1 << 20)  # rows/cols of reflect-padded halos may be negative
    c = np.arange(channels, dtype=np.uint64)[:, None, None]
    r = (np.arange(height, dtype=np.int64) + row0).astype(np.uint64)[None, :, None] + off
    q = (np.arange(width, dtype=np.int64) + col0).astype(np.uint64)[None, None, :] + off
    base = _hash32(_hash32(_hash32(np.uint64(seed & 0xFFFFFFFF) + c * np.uint64(0x9E3779B9)) + r) + q)
    u1 = (_hash32(base ^ np.uint64(0x68E31DA4)).astype(np.float64) + 0.5) / 4294967296.0
    u2 = (_hash32(base ^ np.uint64(0xB5297A4D)).astype(np.float64) + 0.5) / 4294967296.0
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def draw_seed(spec: FeatureSpec, step_index: int, draw: int) -> int:
    """Seed of the position-keyed noise for timestep ``step_index`` and noise draw ``draw``."""
    return spec.noise_seed * 1_000_003 + step_index * 7919 + draw


def tile_noise(spec: FeatureSpec, channels: int, origins: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """(B, n, C, S, S) float32 noise, n = timesteps x draws (timestep-major), for the S×S windows
    whose global top-left corners are ``origins``."""
    return np.stack([
        np.stack([position_noise(draw_seed(spec, i, d), channels, r, c, size, size)
                  for i in range(len(spec.timesteps)) for d in range(spec.draws)])
        for r, c in origins
    ])


# ----------------------------------------------------------------------------------------
# One batch of tiles
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def tile_features(model: DenoiserUNet, schedule: NoiseSchedule, windows: torch.Tensor,
                  origins: Sequence[tuple[int, int]], spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """windows (B, C, S, S) clean normalised tiles with halo, origins their global top-left
    (row, col) -> {level: (B, F, T, T)} features of the tiles' centre T×T, float32."""
    B, C, S, _ = windows.shape
    device = windows.device
    h, T = spec.halo, spec.tile_size
    present = torch.ones(B, model.config.num_modalities, device=device)
    per_step = {name: [] for name in LEVELS}
    noise = torch.from_numpy(tile_noise(spec, C, origins, S)).to(device=device, dtype=windows.dtype)
    for i, step in enumerate(spec.timesteps):
        t = torch.full((B,), int(step), dtype=torch.int64, device=device)
        acc = {name: 0.0 for name in LEVELS}
        for d in range(spec.draws):
            x_t = schedule.add_noise(windows, noise[:, i * spec.draws + d], t)
            _, feats = model.forward_with_features(x_t, t, present)
            for name in LEVELS:
                f = feats[name]
                if f.shape[-1] != S:
                    f = F.interpolate(f, size=(S, S), mode="bilinear", align_corners=False)
                acc[name] = acc[name] + f[:, :, h : h + T, h : h + T] / spec.draws
        for name in LEVELS:
            per_step[name].append(acc[name])
    if spec.reduce == "concat":
        return {name: torch.cat(per_step[name], dim=1) for name in LEVELS}
    return {name: torch.stack(per_step[name]).mean(0) for name in LEVELS}


# ----------------------------------------------------------------------------------------
# Whole scene, into the store
# ----------------------------------------------------------------------------------------


def feature_tiles(scene: Scene, spec: FeatureSpec) -> np.ndarray:
    """(N, 2) origins of the non-overlapping T×T tiles that partition the grid (chunk-aligned)."""
    H, W = scene.shape
    T = spec.tile_size
    return np.array([(r, c) for r in range(0, H, T) for c in range(0, W, T)], dtype=np.int64)


def cached_spec(store: str | Path) -> tuple[dict | None, bool]:
    """(spec dict, complete) of the features cached in a store, or (None, False)."""
    root = zarr.open_group(str(store), mode="r")
    if "features" not in root:
        return None, False
    attrs = dict(root["features"].attrs)
    return attrs.get("spec"), bool(attrs.get("complete", False))


def prepare_store(store: str | Path, scene: Scene, spec: FeatureSpec, channels: dict[str, int]) -> str:
    """Make ``features/`` ready for ``spec``: reuse, resume, or (re)create. Returns
    "reuse" | "resume" | "new" | "recompute" (the cached features were for another spec)."""
    root = zarr.open_group(str(store), mode="r+")
    old, complete = cached_spec(store)
    if old == spec.as_dict():
        return "reuse" if complete else "resume"
    state = "recompute" if old is not None else "new"
    if "features" in root:
        del root["features"]
    group = root.create_group("features")
    H, W = scene.shape
    T = spec.tile_size
    for name in LEVELS:
        group.create_array(name, shape=(channels[name], H, W), chunks=(channels[name], T, T), dtype="float16",
                           dimension_names=(f"feature_{name}", "y", "x"), fill_value=0.0)
    n_r, n_c = -(-H // T), -(-W // T)
    group.create_array("_done", shape=(n_r, n_c), chunks=(1, 1), dtype="bool", fill_value=False,
                       dimension_names=("tile_row", "tile_col"))
    group.attrs.update({"spec": spec.as_dict(), "complete": False, "channels": channels})
    return state


def extract_tiles(store: str | Path, model: DenoiserUNet, schedule: NoiseSchedule, spec: FeatureSpec,
                  origins: Iterable[tuple[int, int]], batch_size: int = 8, progress: bool = False,
                  device: str | torch.device = "cpu") -> int:
    """Compute and write the features of the given tiles (skipping finished ones). Each tile
    writes its own whole chunks and its ``_done`` flag, so workers on disjoint tiles never
    touch the same chunk. Returns the number of tiles computed."""
    scene = Scene.open(store)
    group = zarr.open_group(str(store), mode="r+")["features"]
    done = group["_done"][...]
    T, h = spec.tile_size, spec.halo
    todo = [(int(r), int(c)) for r, c in origins if not done[r // T, c // T]]
    H, W = scene.shape
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="features", unit="tile")
    for i in range(0, len(todo), batch_size):
        batch = todo[i : i + batch_size]
        S = T + 2 * h
        windows = torch.from_numpy(
            np.stack([scene.read_window(r - h, c - h, S, S, concat=True) for r, c in batch])
        ).to(device)
        feats = tile_features(model, schedule, windows, [(r - h, c - h) for r, c in batch], spec)
        for j, (r, c) in enumerate(batch):
            th, tw = min(T, H - r), min(T, W - c)
            for name in LEVELS:
                group[name][:, r : r + th, c : c + tw] = feats[name][j, :, :th, :tw].cpu().numpy().astype(np.float16)
            group["_done"][r // T, c // T] = True
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return len(todo)


def mark_complete(store: str | Path) -> bool:
    """Set ``complete`` when every tile is done; returns whether it is."""
    group = zarr.open_group(str(store), mode="r+")["features"]
    ok = bool(group["_done"][...].all())
    if ok:
        group.attrs["complete"] = True
    return ok


def extract_features(store: str | Path, model: DenoiserUNet, schedule: NoiseSchedule, spec: FeatureSpec,
                     *, batch_size: int = 8, progress: bool = False, device: str | torch.device = "cpu") -> str:
    """Ensure ``store`` holds complete features for ``spec``; returns what happened
    ("reuse", "resume", "new" or "recompute"), and says it on the log."""
    scene = Scene.open(store)
    model = model.to(device).eval()
    state = prepare_store(store, scene, spec, spec.channels(model))
    if state == "reuse":
        log.info("features for checkpoint %s already cached in %s: reused", spec.checkpoint, store)
        return state
    if state == "recompute":
        log.warning("features in %s were cached for another checkpoint or setting; recomputing", store)
    extract_tiles(store, model, schedule, spec, feature_tiles(scene, spec), batch_size, progress, device)
    mark_complete(store)
    return state
