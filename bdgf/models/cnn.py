"""CNN branch, guided by the **low** (fine) diffusion features through feature fusion.

Glossary (letters as in docs/glossary.md)
    B       batch (labelled pixels)
    C       input bands, all modalities concatenated (``in_channels``)
    P       patch side (odd, default 11); the classified pixel is the centre one; r = P // 2
    T       tile side (``dense``: every pixel of a T x T tile at once)
    F_low   channels of the low diffusion features
    D       branch width (``CNNConfig.width``)
    D_low   width of the 1x1-projected low features (``CNNConfig.low_width``)
    V       side of the window left after the unpadded convolutions: V = P - 2 * (1 + num_blocks)

Every convolution is unpadded and every normalisation is per pixel (LayerNorm over channels), so
the branch is exactly computable densely over a tile: running it on the (T + 2r) x (T + 2r)
region around a T x T tile gives, at each of the tile's pixels, what it gives on the patch
centred there. The final window pooling (mean over the V x V window) is a stride-1 average pool
in that dense form. Helpers that take maps of any size write their sides as ``rows, cols``.

    patch (B, C, P, P) --conv3x3--> (B, D, P-2, P-2) --+
    low (B, F_low, P, P) --1x1, crop 1--> (B, D_low, P-2, P-2) --+--concat, 1x1--> (B, D, P-2, P-2)
    --num_blocks x ResBlock (each -2)--> (B, D, V, V) --window mean--> z_cnn (B, D)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdgf.errors import InputError
from bdgf.models._shapes import check_region, check_shape


@dataclass(frozen=True)
class CNNConfig:
    width: int = 64        # D
    low_width: int = 32    # D_low
    num_blocks: int = 2    # residual blocks, each trims 1 pixel per side


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel: (B, D, rows, cols) -> (B, D, rows, cols). Pixel-local."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def crop(x: torch.Tensor, n: int) -> torch.Tensor:
    """Trim ``n`` pixels from every side: (B, D, rows, cols) -> (B, D, rows-2n, cols-2n)."""
    return x[..., n : x.shape[-2] - n, n : x.shape[-1] - n] if n > 0 else x


class ResBlock(nn.Module):
    """Unpadded residual block: (B, D, rows, cols) -> (B, D, rows-2, cols-2); the skip path is cropped."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = ChannelNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=0)
        self.norm2 = ChannelNorm(dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return crop(x, 1) + h


class CNNBranch(nn.Module):
    """forward(patch (B, C, P, P), low (B, F_low, P, P)) -> z_cnn (B, D)."""

    def __init__(self, in_channels: int, low_channels: int, patch_size: int, cfg: CNNConfig = CNNConfig()):
        super().__init__()
        side = patch_size - 2 * (1 + cfg.num_blocks)
        if side < 1:
            raise InputError(
                f"CNN branch: patch_size {patch_size} is too small for {cfg.num_blocks} unpadded "
                f"blocks (needs patch_size >= {2 * (1 + cfg.num_blocks) + 1})"
            )
        self.in_channels, self.low_channels, self.patch_size = in_channels, low_channels, patch_size
        self.out_dim = cfg.width
        self.stem = nn.Conv2d(in_channels, cfg.width, 3, padding=0)
        self.stem_norm = ChannelNorm(cfg.width)
        self.low_proj = nn.Conv2d(low_channels, cfg.low_width, 1)
        self.fuse = nn.Conv2d(cfg.width + cfg.low_width, cfg.width, 1)
        self.blocks = nn.Sequential(*[ResBlock(cfg.width) for _ in range(cfg.num_blocks)])
        self.out_norm = ChannelNorm(cfg.width)

    def _maps(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """(B, C, rows, cols), (B, F_low, rows, cols) -> (B, D, rows-P+V, cols-P+V): everything
        before the pooling."""
        x = F.silu(self.stem_norm(self.stem(x)))                  # (B, D, rows-2, cols-2)
        g = crop(self.low_proj(low), 1)                           # (B, D_low, rows-2, cols-2)
        x = self.fuse(torch.cat([x, g], dim=1))                   # (B, D, rows-2, cols-2)
        return self.out_norm(self.blocks(x))                      # (B, D, rows-P+V, cols-P+V)

    def forward(self, patch: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        check_shape("patch", patch, (None, self.in_channels, P, P), "(B, C, P, P)")
        check_shape("low", low, (patch.shape[0], self.low_channels, P, P), "(B, F_low, P, P)")
        return self._maps(patch, low).mean(dim=(-2, -1))          # (B, D) window pooling

    def dense(self, region: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """z_cnn of every P x P window at once: (B, C, T+2r, T+2r), (B, F_low, T+2r, T+2r)
        -> (B, D, T, T), z of every pixel of the T x T tile (any input of at least P x P works,
        non-square too: (B, C, rows, cols) -> (B, D, rows-P+1, cols-P+1)). Entry [..., i, j]
        equals forward() on the patch whose top-left corner is (i, j), i.e. centred on input
        pixel (i + r, j + r). Exactly dense (no chunks): the maps are (B, D, rows, cols) at most."""
        check_region("cnn", region, low, self.in_channels, self.low_channels, self.patch_size, "low")
        V = self.patch_size - 2 * (1 + len(self.blocks))
        return F.avg_pool2d(self._maps(region, low), V, stride=1)   # window pooling, V x V
