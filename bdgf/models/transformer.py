"""Transformer branch, guided by the **high** (coarse, semantic) diffusion features by cross-attention.

Glossary (letters as in docs/glossary.md)
    B       batch (labelled pixels)
    C       input bands, all modalities concatenated
    P       patch side (odd); r = P // 2
    L       tokens of the token grid (``bdgf.models._shapes``): P * P pixel tokens at
            ``token_stride`` 1, r * r tokens of 3 x 3 windows at stride 2 (the default); the
            branch's sequence is L + 1 tokens (class token first)
    F_high  channels of the high diffusion features
    D       model width (``TransformerConfig.dim``)
    Hh      attention heads (``heads``)
    Dh      head width, D = Hh * Dh
    Nq, Nk  query and key/value tokens of one attention
    T       tile side (``dense``)
    N       windows (pixels) of one chunk of ``dense``

    patch (B, C, P, P) --conv (token_kernel, stride token_stride)--> tokens (B, L, D)
    high (B, F_high, P, P) --mean over each token window, Linear--> high tokens (B, L, D)
    [cls; tokens] (B, L+1, D) -> depth x [ self-attention(L+1 <- L+1);
        cross-attention(L+1 <- L high tokens); MLP ] (pre-norm residual)
    z_tr = LayerNorm(class token) (B, D)

Positions (DETR style): the learned token positions (and the high tokens' own) are added to the
*normalised query and key inputs* of every attention, not to the token stream. So everything
before the first token mixing is per pixel: the token embedding, the first block's LayerNorm and
q/k/v projections, and every block's cross-attention keys/values (LayerNorm + projections of the
high tokens, which no block updates). The last block computes only the class token's query,
attention output and MLP (z reads only it; exact).

Why a 3 x 3 / stride-2 token grid by default (measured at C = 145, P = 11, the library sizes,
``benchmarks/bench_inference.py``): with one token per pixel (L = 121) the token mixing costs
~44 MFLOP per classified pixel, and ~15 MFLOP even with the per-pixel parts done densely (the
self-attention over 122 tokens and the per-token MLP are per patch). The high features come from
a stride-4 decoder level upsampled bilinearly, so a stride-2 grid of overlapping 3 x 3 windows
(25 tokens for P = 11, covering the patch exactly, centred on the classified pixel for odd r)
keeps their information, and the convolutional tokens see every band of every pixel of the patch
(fine, pixel-level detail is the CNN branch's job). Cost: ~2.6 MFLOP per pixel. ``token_stride=1``
gives the per-pixel-token transformer (same code, same exactness).

``dense(region, high)``: z of every window of a region at once, equal to ``forward`` on each
P x P window; the per-pixel parts are computed once over the region, then gathered into windows
(``bdgf.models._shapes.gather_windows``) chunk by chunk for the token mixing, so memory per
chunk is (N, L + 1, a few D), never (T*T, C, P, P).

Both attentions go through ``kernels.dispatch.cross_attention`` (self-attention with k, v taken from
the same tokens as q).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdgf.errors import InputError
from bdgf.models._shapes import DENSE_CHUNK, check_region, check_shape, gather_windows, token_grid, window_index
from kernels.dispatch import cross_attention


@dataclass(frozen=True)
class TransformerConfig:
    dim: int = 64          # D
    depth: int = 2         # self-attention + cross-attention pairs
    heads: int = 4         # Hh
    mlp_ratio: int = 2
    token_stride: int = 2  # 1: a token per pixel; 2: 3 x 3 windows at stride 2 (see the module docstring)


class Attention(nn.Module):
    """Multi-head attention on projected inputs: q (B, Nq, D), k, v (B, Nk, D) -> (B, Nq, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InputError(f"attention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:        # (B, Nq|Nk, D) -> (B, Hh, Nq|Nk, Dh)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def position(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query and key terms of positions pos (Nq|Nk, D) added to the inputs: W_q pos, W_k pos."""
        return F.linear(pos, self.q.weight), F.linear(pos, self.k.weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = cross_attention(self._split(q), self._split(k), self._split(v))   # (B, Hh, Nq, Dh)
        return self.out(o.transpose(1, 2).flatten(2))                         # (B, Nq, D)


class Block(nn.Module):
    """Self-attention, cross-attention to the high tokens, MLP (pre-norm residual).

    The per-token projections are methods (``self_qkv``, ``high_kv``) so that the dense path can
    run them per pixel; ``forward`` mixes the tokens."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.dim
        self.norm_sa, self.sa = nn.LayerNorm(D), Attention(D, cfg.heads)
        self.norm_q, self.norm_kv, self.ca = nn.LayerNorm(D), nn.LayerNorm(D), Attention(D, cfg.heads)
        self.norm_mlp = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(), nn.Linear(cfg.mlp_ratio * D, D))

    def self_qkv(self, x: torch.Tensor, query_rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., L+1, D) -> self-attention q, k, v (..., L+1, D) each, without the position terms
        (per token); q of the first ``query_rows`` tokens only when given."""
        y = self.norm_sa(x)
        return self.sa.q(y if query_rows is None else y[..., :query_rows, :]), self.sa.k(y), self.sa.v(y)

    def high_kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """High tokens (..., D) -> cross-attention k, v (..., D) each, without the position term. Per token."""
        y = self.norm_kv(h)
        return self.ca.k(y), self.ca.v(y)

    def forward(self, x: torch.Tensor, qkv, hkv, pos: torch.Tensor, high_pos: torch.Tensor,
                cls_only: bool = False) -> torch.Tensor:
        """x (B, L+1, D); qkv = self_qkv(x); hkv = high_kv(high tokens), each (B, L, D); pos (L+1, D)
        (zero row for the class token), high_pos (L, D) -> (B, L+1, D), or (B, 1, D), the class
        token only, when ``cls_only``."""
        q, k, v = qkv
        if cls_only:
            x, q = x[:, :1], q[:, :1]
        pq, pk = self.sa.position(pos)
        q, k = q + pq[: q.shape[1]], k + pk
        x = x + self.sa(q, k, v)
        hk, hv = hkv
        cq = self.ca.q(self.norm_q(x)) + self.ca.position(pos[: x.shape[1]])[0]
        x = x + self.ca(cq, hk + self.ca.position(high_pos)[1], hv)
        return x + self.mlp(self.norm_mlp(x))


class TransformerBranch(nn.Module):
    """forward(patch (B, C, P, P), high (B, F_high, P, P)) -> z_tr (B, D);
    dense(region (B, C, T+2r, T+2r), high (B, F_high, T+2r, T+2r)) -> z_tr of every pixel (B, D, T, T)."""

    def __init__(self, in_channels: int, high_channels: int, patch_size: int,
                 cfg: TransformerConfig = TransformerConfig()):
        super().__init__()
        self.in_channels, self.high_channels, self.patch_size = in_channels, high_channels, patch_size
        self.out_dim, self.stride = cfg.dim, cfg.token_stride
        self.kernel, self.grid_side = token_grid(patch_size, cfg.token_stride)
        L, D = self.grid_side ** 2, cfg.dim
        self.embed = nn.Conv2d(in_channels, D, self.kernel)
        self.high_proj = nn.Linear(high_channels, D)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Parameter(torch.zeros(L, D))
        self.high_pos = nn.Parameter(torch.zeros(L, D))
        for p in (self.cls, self.pos, self.high_pos):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D)

    def _high_map(self, high: torch.Tensor, stride: int) -> torch.Tensor:
        """(B, F_high, rows, cols) -> high tokens, channel-last (B, rows', cols', D): the mean over
        each token window, projected."""
        return self.high_proj(F.avg_pool2d(high, self.kernel, stride=stride).permute(0, 2, 3, 1))

    def _mix(self, x: torch.Tensor, first_qkv, hkvs) -> torch.Tensor:
        """Tokens x (B, L, D), the first block's q, k, v of [cls; x] (each (B, L+1, D)), each block's
        high k, v (B, L, D) -> z (B, D)."""
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)         # (B, L+1, D)
        pos = torch.cat([self.pos.new_zeros(1, self.out_dim), self.pos])       # (L+1, D)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            qkv = first_qkv if i == 0 else block.self_qkv(x, 1 if i == last else None)
            x = block(x, qkv, hkvs[i], pos, self.high_pos, cls_only=i == last)
        return self.norm(x[:, 0])                                               # (B, D)

    def _with_cls(self, qkv) -> tuple[torch.Tensor, ...]:
        """The first block's q, k, v of the tokens (B, L, D) each -> of [cls; tokens] (B, L+1, D)."""
        return tuple(torch.cat([c.expand(t.shape[0], -1, -1), t], dim=1)
                     for c, t in zip(self.blocks[0].self_qkv(self.cls), qkv))

    def forward(self, patch: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        check_shape("patch", patch, (None, self.in_channels, P, P), "(B, C, P, P)")
        check_shape("high", high, (patch.shape[0], self.high_channels, P, P), "(B, F_high, P, P)")
        x = F.conv2d(patch, self.embed.weight, self.embed.bias, stride=self.stride)   # (B, D, side, side)
        x = x.flatten(2).transpose(1, 2)                                       # (B, L, D)
        h = self._high_map(high, self.stride).flatten(1, 2)                    # (B, L, D)
        first = self._with_cls(self.blocks[0].self_qkv(x))
        return self._mix(x, first, [block.high_kv(h) for block in self.blocks])

    def dense(self, region: torch.Tensor, high: torch.Tensor, chunk_pixels: int = DENSE_CHUNK) -> torch.Tensor:
        """(B, C, rows, cols), (B, F_high, rows, cols) -> z_tr (B, D, rows-P+1, cols-P+1): entry
        [..., i, j] equals ``forward`` on the window whose top-left corner is (i, j) (for a region
        of side T + 2r: every pixel of the T x T tile). ``chunk_pixels`` windows are mixed at a time."""
        out_rows, out_cols = check_region("transformer", region, high, self.in_channels, self.high_channels,
                                          self.patch_size, "high")
        if chunk_pixels < 1:
            raise InputError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
        D, B = self.out_dim, region.shape[0]
        x = self.embed(region).permute(0, 2, 3, 1)                             # (B, rows', cols', D)
        h = self._high_map(high, 1)                                            # (B, rows', cols', D)
        per_pixel = [x, *self.blocks[0].self_qkv(x)]
        for block in self.blocks:
            per_pixel += block.high_kv(h)
        maps = torch.cat(per_pixel, dim=-1)                                    # (B, rows', cols', (4 + 2 depth) D)
        n_out, zs = out_rows * out_cols, []
        for start in range(0, n_out, chunk_pixels):
            index = window_index(out_cols, maps.shape[2], self.stride, self.grid_side, start,
                                 min(start + chunk_pixels, n_out))
            x, q, k, v, *hkv = gather_windows(maps, index).split(D, dim=-1)   # (B*N, L, D) each
            hkvs = [(hkv[2 * i], hkv[2 * i + 1]) for i in range(len(self.blocks))]
            zs.append(self._mix(x, self._with_cls((q, k, v)), hkvs).view(B, -1, D))
        return torch.cat(zs, dim=1).transpose(1, 2).reshape(B, D, out_rows, out_cols)
