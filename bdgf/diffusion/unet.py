"""Compact 2-D UNet denoiser for the stage-1 balanced multimodal DDPM (x0-prediction).

Glossary (letters as in docs/glossary.md)
    B      batch size
    C      input bands: all modalities concatenated channel-wise (e.g. 144 HSI + 1 LiDAR)
    M      number of modalities
    S      side of the window the denoiser sees (S = T + 2h for features; a pretraining tile,
           S = T, during pretraining); divisible by 2^(n_lev - 1). Non-square windows work too;
           the code's messages call the two sides H, W.
    n_lev  number of resolution levels, len(channel_mults)
    S_i    side at level i, S / 2^i
    F_i    channels at level i = base_channels * channel_mults[i]
    F_low, F_mid, F_high   channels of the three feature levels (F_i at ``feature_levels``)
    D_emb  embedding width (time + presence) = base_channels * embed_mult (the variable ``E``)
    Rf     receptive radius in input pixels (``receptive_radius``)
    t      diffusion timestep of each sample, (B,)

Layout
    conv_in (C -> F_0)
    encoder  level i: blocks_per_level ResBlocks at F_i, skip saved, Downsample unless
             i = n_lev - 1
    middle   one ResBlock at the coarsest level
    decoder  level i = n_lev - 1 .. 0: ResBlock(cat(activation, skip_i)) + (blocks_per_level - 1)
             ResBlocks at F_i, the output is the decoder feature of level i, then Upsample
             unless i = 0
    out      ChannelNorm, SiLU, conv (F_0 -> C)  -> x0_hat (B, C, S, S)

Tile invariance. Every operation is local: convolutions, per-pixel normalisation (LayerNorm over
channels at each position, ``ChannelNorm``), and nothing whose statistics span the window (no
GroupNorm, no global attention). So the output at a pixel depends only on the input within
``receptive_radius`` (Rf) pixels of it, and a window whose top-left corner is on the stride phase
(a multiple of 2^(n_lev - 1) in scene coordinates) computes, for every pixel at least Rf from
its edges, exactly what any other such window computes there. ``bdgf.diffusion.features`` cuts
windows that way; the feature halo defaults to R and a smaller one is refused.

Each ResBlock has one 3×3 and one 1×1 convolution (and the middle is one block) to keep R, and
with it the halo every tile pays, small: Rf = 28 px for the default three levels.

The embedding ``emb`` (B, D_emb) = MLP(sinusoidal(t)) + MLP(presence flags); every ResBlock adds a
projection of it to its feature map. The learned ``mask_embedding`` (C,) is owned here and is what
masked modalities' channels are replaced with in the noisy input (see kernels.dispatch.noise_and_mask).

No value-dependent Python control flow in ``forward``: it is torch.export-able with static shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "DenoiserUNet", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    num_modalities: int
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    embed_mult: int = 4
    dropout: float = 0.0
    # Decoder levels (low, mid, high) whose outputs are the diffusion features (docs/method.md);
    # level i has side S_i = S/2^i, so the default gives full, 1/2 and 1/4 resolution.
    feature_levels: tuple[int, int, int] = (0, 1, 2)

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        if self.in_channels < 1 or self.num_modalities < 1:
            raise ValueError("in_channels and num_modalities must be >= 1")
        if not self.channel_mults or self.blocks_per_level < 1:
            raise ValueError("channel_mults must be non-empty and blocks_per_level >= 1")
        if self.base_channels % 2:
            raise ValueError("base_channels must be even (sinusoidal timestep embedding)")
        object.__setattr__(self, "feature_levels", tuple(int(v) for v in self.feature_levels))
        if len(self.feature_levels) != 3:
            raise ValueError(f"feature_levels must be (low, mid, high), got {self.feature_levels}")
        for name, lvl in self.named_feature_levels.items():
            if not 0 <= lvl < self.num_levels:
                raise ValueError(f"feature level {name}={lvl} outside 0..{self.num_levels - 1} "
                                 f"(channel_mults has {self.num_levels} levels)")

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def named_feature_levels(self) -> dict[str, int]:
        return dict(zip(("low", "mid", "high"), self.feature_levels))

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def tile_multiple(self) -> int:
        """The window's sides, and its top-left corner in scene coordinates, must be multiples of
        this (2^(n_lev - 1)): the stride phase."""
        return 2 ** (self.num_levels - 1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: t (B,) int or float -> (B, dim), [sin | cos] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each position: (B, channels, S_i, S_i) -> same. Pixel-local,
    so it cannot make one pixel depend on the window around it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """x (B, cin, S_i, S_i), emb (B, D_emb) -> (B, cout, S_i, S_i): ChannelNorm -> SiLU -> 3×3
    conv, + emb, ChannelNorm -> SiLU -> 1×1 conv; residual. ``radius`` = 1 pixel of its level."""

    radius = 1

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = ChannelNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = ChannelNorm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """(B, channels, S_i, S_i) -> (B, channels, S_i/2, S_i/2), stride-2 3×3 conv: output j sees
    inputs 2j-1 .. 2j+1 (``radius`` 1 pixel of the finer level)."""

    radius = 1

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(B, channels, S_i, S_i) -> (B, channels, 2 S_i, 2 S_i), nearest then 3×3 conv: the nearest
    copy looks up to 1 finer pixel to the left and the conv 1 each side (``radius`` 2 = both,
    counted by ``DenoiserUNet.feature_radii``)."""

    radius = 2

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DenoiserUNet(nn.Module):
    """x0-predicting UNet. ``forward(x_t (B, C, S, S), t (B,) int64, present (B, M)) -> x0_hat (B, C, S, S)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        cfg, chans = config, config.level_channels
        E = cfg.base_channels * cfg.embed_mult
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.in_channels))  # (C,)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, E), nn.SiLU(), nn.Linear(E, E))
        # Presence flags enter as [present, 1 - present] (B, 2M): each modality has a learned vector
        # for "present" and one for "masked", summed over modalities, then an MLP.
        self.presence_mlp = nn.Sequential(nn.Linear(2 * cfg.num_modalities, E), nn.SiLU(), nn.Linear(E, E))
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)

        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        cin = chans[0]
        for i, c in enumerate(chans):
            self.enc.append(nn.ModuleList(
                [ResBlock(cin if j == 0 else c, c, E, cfg.dropout) for j in range(cfg.blocks_per_level)]))
            cin = c
            self.down.append(Downsample(c) if i < cfg.num_levels - 1 else nn.Identity())

        cl = chans[-1]
        self.mid = ResBlock(cl, cl, E, cfg.dropout)

        # Decoder, stored finest-first (index = level); run from the coarsest level up.
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, c in enumerate(chans):
            below = chans[i + 1] if i < cfg.num_levels - 1 else chans[-1]  # width arriving from below
            self.dec.append(nn.ModuleList(
                [ResBlock(below + c if j == 0 else c, c, E, cfg.dropout) for j in range(cfg.blocks_per_level)]))
            self.up.append(Upsample(c) if i > 0 else nn.Identity())

        self.norm_out = ChannelNorm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.in_channels, 3, padding=1)

    @property
    def feature_channels(self) -> dict[str, int]:
        """{"low": F_low, "mid": F_mid, "high": F_high}: channels of the decoder features."""
        chans = self.config.level_channels
        return {name: chans[lvl] for name, lvl in self.config.named_feature_levels.items()}

    def feature_strides(self) -> dict[str, int]:
        """{"low": 1, "mid": 2, "high": 4} by default: downsampling factor of each feature map."""
        return {name: 2 ** lvl for name, lvl in self.config.named_feature_levels.items()}

    def feature_radii(self) -> dict[str, int]:
        """{level name: R_l}: input pixels (each side) that the feature map of that level, once
        upsampled bilinearly to full resolution (``features.level_maps``), depends on.

        Interval arithmetic over the layers in the order ``forward_with_features`` runs them: a
        unit j of level i depends on inputs [2^i j - a, 2^i j + b]. A 3×3 conv or a stride-2 conv
        adds its ``radius`` (1) times the level's stride to both sides; nearest upsampling to
        level i-1 looks up to one level-(i-1) pixel to the left (a += 2^(i-1)) before its conv;
        bilinear upsampling from level l (align_corners=False) reads the coarse pixels within
        1.5·2^l - 1 to the left and 2^(l-1) to the right. R_l = max(a, b): exact for the
        default UNet, an upper bound in general (tests compare it with measured dependence)."""
        cfg = self.config
        a = b = 1  # conv_in (3×3, level 0)
        for i in range(cfg.num_levels):
            grow = sum(blk.radius for blk in self.enc[i]) * 2 ** i
            if i < cfg.num_levels - 1:
                grow += self.down[i].radius * 2 ** i
            a, b = a + grow, b + grow
        grow = self.mid.radius * 2 ** (cfg.num_levels - 1)
        a, b = a + grow, b + grow
        at_level = {}
        for i in range(cfg.num_levels - 1, -1, -1):
            grow = sum(blk.radius for blk in self.dec[i]) * 2 ** i
            a, b = a + grow, b + grow
            at_level[i] = (a, b)
            if i > 0:  # nearest (left only) then the conv of ``Upsample``
                a, b = a + 2 ** (i - 1) + (self.up[i].radius - 1) * 2 ** (i - 1), b + (self.up[i].radius - 1) * 2 ** (i - 1)
        radii = {}
        for name, lvl in cfg.named_feature_levels.items():
            la, lb = at_level[lvl]
            if lvl > 0:
                la, lb = la + 3 * 2 ** (lvl - 1) - 1, lb + 2 ** (lvl - 1)
            radii[name] = max(la, lb)
        return radii

    @property
    def receptive_radius(self) -> int:
        """R: the largest of ``feature_radii``: a feature pixel depends on no input pixel farther
        than R (in rows or columns) from it."""
        return max(self.feature_radii().values())

    def _check(self, x_t: torch.Tensor, t: torch.Tensor, present: torch.Tensor) -> None:
        cfg = self.config
        if x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"x_t must be (B,{cfg.in_channels},H,W), got {tuple(x_t.shape)}")
        h, w, k = x_t.shape[-2], x_t.shape[-1], cfg.tile_multiple
        if h % k or w % k:
            raise ValueError(f"tile size {h}x{w} is not divisible by {k} = 2^(levels-1) "
                             f"for channel_mults={cfg.channel_mults}; pad or crop the tile")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        if present.shape != (x_t.shape[0], cfg.num_modalities):
            raise ValueError(f"present must be (B,M) = ({x_t.shape[0]},{cfg.num_modalities}), "
                             f"got {tuple(present.shape)}")

    def embed(self, t: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """t (B,), present (B, M) -> emb (B, D_emb)."""
        dtype = self.time_mlp[0].weight.dtype
        p = present.to(dtype)
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(dtype))
        return temb + self.presence_mlp(torch.cat([p, 1.0 - p], dim=-1))

    def forward_with_features(self, x_t: torch.Tensor, t: torch.Tensor, present: torch.Tensor
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_t (B, C, S, S), t (B,), present (B, M) ->
        (x0_hat (B, C, S, S), {"low": (B, F_low, S, S), "mid": (B, F_mid, S/2, S/2),
        "high": (B, F_high, S/4, S/4)}) with default feature_levels; features are decoder outputs
        at those levels (before upsampling). (The local ``h`` is the running activation, not the
        halo.)"""
        self._check(x_t, t, present)
        emb = self.embed(t, present).to(x_t.dtype)
        h = self.conv_in(x_t)
        skips = []
        for blocks, down in zip(self.enc, self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        decoded: list[torch.Tensor] = [h] * self.config.num_levels
        for i in range(self.config.num_levels - 1, -1, -1):
            h = torch.cat([h, skips[i]], dim=1)
            for block in self.dec[i]:
                h = block(h, emb)
            decoded[i] = h
            h = self.up[i](h)
        x0_hat = self.conv_out(F.silu(self.norm_out(h)))
        feats = {name: decoded[lvl] for name, lvl in self.config.named_feature_levels.items()}
        return x0_hat, feats

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, S, S), t (B,) int64, present (B, M) 0/1 -> x0_hat (B, C, S, S)."""
        return self.forward_with_features(x_t, t, present)[0]
