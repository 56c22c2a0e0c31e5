"""Dense diffusion features (docs/method.md, Dense diffusion features): the frozen denoiser over a tile's window.

Each tile of T×T pixels is seen through a window with a halo of h pixels on every side (cut by
:mod:`bdgf.tiler`), noised to a few timesteps with noise that depends only on the *global pixel
position* (so overlapping windows see the same noise and any batch size or worker count gives
the same features), passed once through the UNet, and the decoder activations at three depths
are upsampled to the window and cropped to the tile. One UNet pass serves every pixel of a tile;
never one pass per classified pixel.

Tile invariance: the denoiser is local (``DenoiserUNet.receptive_radius`` Rf), so a feature pixel
is a function of the scene (and the position-keyed noise) alone, whatever tile it was computed
in, provided the window reaches Rf past it and the window's corner is on the UNet's stride phase
in scene coordinates (a multiple of m = ``tile_multiple``). :func:`aligned_halo` gives the
least halo that does both for tiles whose origins are multiples of m; :func:`check_window`
refuses windows that do not; :func:`region_features` computes any rectangle, at any offset, by
widening it to an aligned window. Where the features are kept (the scene store's cache) is
:mod:`bdgf.data.feature_cache`; the loop that fills it is :mod:`bdgf.engine.features`.

Glossary (letters as in docs/glossary.md)
    B   tiles in a batch                     C   input bands (all modalities)
    T   tile side                            h   halo
    S   T + 2h, the window side              F   stored channels of a level
    n_t timesteps                            n   n_t × draws noise inputs
    M   modalities                           Rf  the denoiser's receptive radius
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet
# The position-keyed noise lives in bdgf.noise (numpy only: the ONNX back end runs without torch);
# re-exported here for the callers that import it from this module.
from bdgf.noise import _hash32, draw_seed, position_noise, tile_noise  # noqa: F401
from bdgf.tiler import TileGrid, crop
from kernels.dispatch import noise_and_mask

LEVELS = ("low", "mid", "high")


def feature_name(level: str, absent: str | None = None) -> str:
    """The cache's array name of a level's features, computed with modality ``absent`` missing
    (None: every modality present)."""
    return level if absent is None else f"{level}_without_{absent}"


@dataclass(frozen=True)
class FeatureSpec:
    checkpoint: str  # hash of the denoiser's weights
    timesteps: tuple[int, ...]
    draws: int
    noise_seed: int
    tile_size: int
    halo: int
    reduce: str  # "concat" | "mean"
    # Modalities m for which the features are also kept as computed with m absent (masked as in
    # pretraining): "<level>_without_<m>", for classification with a modality missing.
    absent: tuple[str, ...] = ()

    def channels(self, model: DenoiserUNet) -> dict[str, int]:
        """{array name: F}: the three levels, then each level without each modality in ``absent``."""
        per = model.feature_channels
        mult = len(self.timesteps) if self.reduce == "concat" else 1
        return {feature_name(level, m): per[level] * mult for m in (None, *self.absent) for level in LEVELS}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(d["timesteps"])
        d["absent"] = list(d["absent"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**{**d, "timesteps": tuple(int(t) for t in d["timesteps"]),
                      "absent": tuple(d.get("absent", ()))})

    def grid(self, height: int, width: int) -> TileGrid:
        """The tiles (side ``tile_size``, halo ``halo``) that partition an H×W grid."""
        return TileGrid(height, width, self.tile_size, self.halo)


def aligned_halo(radius: int, multiple: int) -> int:
    """The least halo >= ``radius`` that is a multiple of ``multiple`` (the stride phase)."""
    return -(-int(radius) // multiple) * multiple


def check_window(model: DenoiserUNet, halo: int, tile_size: int, need: int | None = None) -> None:
    """ValueError unless tiles of ``tile_size`` seen with ``halo`` give tile-invariant features:
    halo >= ``need`` (default the model's receptive radius Rf) and tile_size and halo multiples of
    the stride phase m (so every window corner is on the phase in scene coordinates)."""
    R, m = model.receptive_radius, model.config.tile_multiple
    need = R if need is None else need
    if halo < need:
        raise ValueError(f"halo {halo} is smaller than the {need} px this needs (the denoiser's receptive "
                         f"radius R = {R}): features would depend on the tiling; use halo >= {aligned_halo(need, m)}")
    if halo % m or tile_size % m:
        raise ValueError(f"tile size {tile_size} and halo {halo} must be multiples of {m} (the denoiser's "
                         f"stride phase, 2^(levels-1)); use halo {aligned_halo(halo, m)}")


# ----------------------------------------------------------------------------------------
# One batch of tiles
# ----------------------------------------------------------------------------------------


def level_maps(feats: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The decoder activations {level: (B, F_l, S/2^i, S/2^i)} upsampled (bilinear) to S×S."""
    out = {}
    for name in LEVELS:
        f = feats[name]
        if f.shape[-1] != size:
            f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
        out[name] = f
    return out


@torch.no_grad()
def window_features(model: DenoiserUNet, schedule: NoiseSchedule, windows: torch.Tensor,
                    corners: Sequence[tuple[int, int]], spec: FeatureSpec,
                    present: torch.Tensor | None = None, channel_modality: torch.Tensor | None = None,
                    noise: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """windows (B, C, S, S) clean normalised, ``corners`` their global top-left (row, col), on the
    stride phase -> {level: (B, F, S, S)} float32 over the whole window (exact only at least Rf
    from its edges). Noise, timesteps, draws and reduction from ``spec``. ``present`` (M,) 0/1
    (default all 1) with ``channel_modality`` (C,): an absent modality's channels are replaced
    by the mask embedding and its presence flag is 0, as in masked pretraining. ``noise``: the
    windows' ``tile_noise`` when the caller already made it (several presence variants of the
    same windows share it)."""
    B, C, S, _ = windows.shape
    device = windows.device
    m = model.config.tile_multiple
    if any(int(r) % m or int(c) % m for r, c in corners):
        raise ValueError(f"window corners {[tuple(map(int, o)) for o in corners]} must be multiples of {m} "
                         "(the denoiser's stride phase) in scene coordinates")
    M = model.config.num_modalities
    flags = torch.ones(M) if present is None else torch.as_tensor(present, dtype=torch.float32)
    flags = flags.to(device)[None].expand(B, M)
    cm = (torch.zeros(C, dtype=torch.int64) if channel_modality is None
          else torch.as_tensor(channel_modality, dtype=torch.int64)).to(device)
    if present is not None and channel_modality is None:
        raise ValueError("window_features: present needs channel_modality")
    per_step = {name: [] for name in LEVELS}
    if noise is None:
        noise = tile_noise(spec, C, corners, S)
    noise = torch.from_numpy(noise).to(device=device, dtype=windows.dtype)
    for i, step in enumerate(spec.timesteps):
        t = torch.full((B,), int(step), dtype=torch.int64, device=device)
        sqrt_ab, sqrt_1mab = schedule.coefficients(t, torch.float32)
        acc = {name: 0.0 for name in LEVELS}
        for d in range(spec.draws):
            x_t = noise_and_mask(windows, noise[:, i * spec.draws + d], sqrt_ab, sqrt_1mab, flags,
                                 model.mask_embedding, cm)
            _, feats = model.forward_with_features(x_t, t, flags)
            for name, f in level_maps(feats, S).items():
                acc[name] = acc[name] + f / spec.draws
        for name in LEVELS:
            per_step[name].append(acc[name])
    if spec.reduce == "concat":
        return {name: torch.cat(per_step[name], dim=1) for name in LEVELS}
    return {name: torch.stack(per_step[name]).mean(0) for name in LEVELS}


def tile_features(model: DenoiserUNet, schedule: NoiseSchedule, windows: torch.Tensor,
                  origins: Sequence[tuple[int, int]], spec: FeatureSpec, present: torch.Tensor | None = None,
                  channel_modality: torch.Tensor | None = None, noise: np.ndarray | None = None
                  ) -> dict[str, torch.Tensor]:
    """windows (B, C, S, S) clean normalised tiles with halo, origins their windows' global
    top-left (row, col) -> {level: (B, F, T, T)} features of the tiles' centre T×T, float32.
    The halo must reach the receptive radius (``check_window``); ``present`` and ``noise`` as in
    :func:`window_features`."""
    check_window(model, spec.halo, spec.tile_size)
    feats = window_features(model, schedule, windows, origins, spec, present, channel_modality, noise)
    return {name: crop(f, spec.halo, spec.tile_size) for name, f in feats.items()}


def region_features(model: DenoiserUNet, schedule: NoiseSchedule, read, spec: FeatureSpec,
                    row0: int, col0: int, rows: int, cols: int, present: torch.Tensor | None = None,
                    channel_modality: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{level: (F, rows, cols)} features of any rectangle of the scene, at any offset.

    ``read(r0, c0, h, w)`` returns the normalised (C, h, w) scene there (reflect-padded past the
    grid, as ``Scene.read_window``). The rectangle is widened by at least Rf on every side to a
    square window whose corner and side are on the stride phase, computed once, and cropped back;
    the result equals the cached features at those pixels (tile invariance)."""
    R, m = model.receptive_radius, model.config.tile_multiple
    r0, c0 = (row0 - R) // m * m, (col0 - R) // m * m
    side = max(row0 + rows + R - r0, col0 + cols + R - c0)
    side = -(-side // m) * m
    window = torch.as_tensor(np.asarray(read(r0, c0, side, side), np.float32))[None]
    feats = window_features(model, schedule, window, [(r0, c0)], spec, present, channel_modality)
    dr, dc = row0 - r0, col0 - c0
    return {name: f[0, :, dr : dr + rows, dc : dc + cols] for name, f in feats.items()}
