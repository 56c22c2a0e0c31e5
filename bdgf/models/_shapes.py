"""Shapes shared by the branches: input checks, and the token grid with its window gather.

Input checks: a wrong shape is an InputError with names, not a matmul error ten frames deep.
Checks look at shapes only (never at values), so they are safe inside torch.export; ``None`` in an
expected shape means "any size" (used for the batch axis).

Token grid (Mamba and Transformer branches): a branch's tokens are the outputs of an unpadded
``token_kernel`` x ``token_kernel`` convolution at stride ``token_stride`` over the P x P patch,
``token_kernel = 2 * token_stride - 1``: stride 1 gives one token per pixel (kernel 1), stride 2 a
``r`` x ``r`` grid of overlapping 3 x 3 windows that exactly covers the patch, symmetric about its
centre pixel. Densely, the same tokens are a stride-1 convolution over a whole region, sampled
per window: the token (a, b) of the window whose top-left corner is (i, j) is the map pixel
(i + stride * a, j + stride * b). ``window_index`` builds those indices, ``gather_windows`` reads
them from channel-last maps, for a chunk of windows at a time.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from bdgf.errors import InputError

# Default windows per chunk of the branches' ``dense``: at C = 145, P = 11 a 64 x 64 tile then
# peaks near 120 MiB on one CPU thread, and larger chunks were not faster (bench_inference.py).
DENSE_CHUNK = 256


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """Raise InputError unless ``x.shape`` matches ``expected`` (``None`` = any size)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(x).__name__}")
    ok = x.dim() == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        hint = f" {what}" if what else ""
        raise InputError(f"{name}: expected shape {want}{hint}, got {tuple(x.shape)}")


def check_region(branch: str, region: torch.Tensor, feats: torch.Tensor, in_channels: int, feat_channels: int,
                 patch_size: int, feat_name: str) -> tuple[int, int]:
    """Checks of a dense call: region (B, C, rows, cols) and features (B, F, rows, cols) with
    rows, cols >= P. Returns the output grid (rows - P + 1, cols - P + 1)."""
    check_shape(f"{branch} region", region, (None, in_channels, None, None), "(B, C, rows, cols)")
    rows, cols = region.shape[-2:]
    if rows < patch_size or cols < patch_size:
        raise InputError(f"{branch} region: needs rows, cols >= patch_size {patch_size}, got {tuple(region.shape)}")
    check_shape(f"{branch} {feat_name}", feats, (region.shape[0], feat_channels, rows, cols),
                f"(B, {feat_name} channels, rows, cols) like the region")
    return rows - patch_size + 1, cols - patch_size + 1


def token_grid(patch_size: int, token_stride: int) -> tuple[int, int]:
    """(token_kernel, grid side) of the token grid of a P x P patch; InputError if it does not
    tile the patch exactly."""
    if token_stride < 1:
        raise InputError(f"token_stride must be >= 1, got {token_stride}")
    kernel = 2 * token_stride - 1
    if patch_size < kernel or (patch_size - kernel) % token_stride:
        raise InputError(f"token_stride {token_stride} (kernel {kernel}) does not tile a patch of side "
                         f"{patch_size} exactly; needs (patch_size - {kernel}) % {token_stride} == 0")
    return kernel, (patch_size - kernel) // token_stride + 1


def window_index(out_cols: int, map_cols: int, token_stride: int, grid_side: int, start: int, stop: int,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """Flat map indices (N, L) of the tokens of windows ``start..stop-1`` (row-major over an output
    grid ``out_cols`` wide) in a map ``map_cols`` wide; tokens row-major over the grid, or in
    ``order`` (L,) (flat grid indices) when given."""
    p = torch.arange(start, stop)
    i, j = p // out_cols, p % out_cols                                         # (N,) window corners
    a = torch.arange(grid_side * grid_side)
    if order is not None:
        a = order.to(torch.long)
    ty, tx = token_stride * (a // grid_side), token_stride * (a % grid_side)   # (L,)
    return (i[:, None] + ty[None]) * map_cols + j[:, None] + tx[None]          # (N, L)


def gather_windows(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Channel-last maps (B, rows, cols, channels), index (N, L) from ``window_index`` -> tokens
    (B * N, L, channels), batch-major (entry b * N + w is window w of batch item b)."""
    N, L = index.shape
    g = maps.flatten(1, 2).index_select(1, index.flatten().to(maps.device))      # (B, N * L, channels)
    return g.reshape(-1, L, maps.shape[-1])
