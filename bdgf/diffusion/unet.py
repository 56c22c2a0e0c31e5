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
    G      GroupNorm channel groups (``norm_groups``)
    Hh     attention heads of the coarsest level (``attention_heads``)
    Dh     head width there, F_i / Hh
    t      diffusion timestep of each sample, (B,)

Layout
    conv_in (C -> F_0)
    encoder  level i: blocks_per_level ResBlocks at F_i, skip saved, Downsample unless
             i = n_lev - 1
    middle   ResBlock, SelfAttention (coarsest level), ResBlock
    decoder  level i = n_lev - 1 .. 0: ResBlock(cat(activation, skip_i)) + (blocks_per_level - 1)
             ResBlocks at F_i, the output is the decoder feature of level i, then Upsample
             unless i = 0
    out      GroupNorm, SiLU, conv (F_0 -> C)  -> x0_hat (B, C, S, S)

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
    attention_at_coarsest: bool = True
    attention_heads: int = 4
    norm_groups: int = 8
    embed_mult: int = 4
    dropout: float = 0.0
    # Decoder levels (low, mid, high) whose outputs are the diffusion features (DESIGN §1.3);
    # level i has side S_i = S/2^i, so the default gives full, 1/2 and 1/4 resolution.
    feature_levels: tuple[int, int, int] = (0, 1, 2)

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        if self.in_channels < 1 or self.num_modalities < 1:
            raise ValueError("in_channels and num_modalities must be >= 1")
        if not self.channel_mults or self.blocks_per_level < 1:
            raise ValueError("channel_mults must be non-empty and blocks_per_level >= 1")
        for c in self.level_channels:
            if c % self.norm_groups:
                raise ValueError(f"level width {c} is not divisible by norm_groups={self.norm_groups}")
        if self.attention_at_coarsest and self.level_channels[-1] % self.attention_heads:
            raise ValueError(f"coarsest width {self.level_channels[-1]} is not divisible by "
                             f"attention_heads={self.attention_heads}")
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
        """The window's sides must be multiples of this (2^(n_lev - 1))."""
        return 2 ** (self.num_levels - 1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: t (B,) int or float -> (B, dim), [sin | cos] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResBlock(nn.Module):
    """x (B, cin, S_i, S_i), emb (B, D_emb) -> (B, cout, S_i, S_i); GroupNorm -> SiLU -> conv,
    + emb, twice; residual."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the S_i * S_i positions: (B, channels, S_i, S_i) -> same,
    residual. (The local h, w are S_i's two sides, not the halo.)"""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (B, Hh, S_i*S_i, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, Hh, S_i*S_i, Dh)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """(B, channels, S_i, S_i) -> (B, channels, S_i/2, S_i/2), stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(B, channels, S_i, S_i) -> (B, channels, 2 S_i, 2 S_i), nearest then conv."""

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
        E, G = cfg.base_channels * cfg.embed_mult, cfg.norm_groups
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
                [ResBlock(cin if j == 0 else c, c, E, G, cfg.dropout) for j in range(cfg.blocks_per_level)]))
            cin = c
            self.down.append(Downsample(c) if i < cfg.num_levels - 1 else nn.Identity())

        cl = chans[-1]
        self.mid1 = ResBlock(cl, cl, E, G, cfg.dropout)
        self.mid_attn = SelfAttention(cl, cfg.attention_heads, G) if cfg.attention_at_coarsest else nn.Identity()
        self.mid2 = ResBlock(cl, cl, E, G, cfg.dropout)

        # Decoder, stored finest-first (index = level); run from the coarsest level up.
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, c in enumerate(chans):
            below = chans[i + 1] if i < cfg.num_levels - 1 else chans[-1]  # width arriving from below
            self.dec.append(nn.ModuleList(
                [ResBlock(below + c if j == 0 else c, c, E, G, cfg.dropout) for j in range(cfg.blocks_per_level)]))
            self.up.append(Upsample(c) if i > 0 else nn.Identity())

        self.norm_out = nn.GroupNorm(G, chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.in_channels, 3, padding=1)

    @property
    def feature_channels(self) -> dict[str, int]:
        """{"low": F_low, "mid": F_mid, "high": F_high}: channels of the decoder features."""
        chans = self.config.level_channels
        return {name: chans[lvl] for name, lvl in self.config.named_feature_levels.items()}

    def feature_strides(self) -> dict[str, int]:
        """{"low": 1, "mid": 2, "high": 4} by default: downsampling factor of each feature map."""
        return {name: 2 ** lvl for name, lvl in self.config.named_feature_levels.items()}

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
        p = present.to(torch.float32)
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
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
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
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
