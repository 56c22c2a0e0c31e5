"""Transformer branch, guided by the **high** (coarse, semantic) diffusion features by cross-attention.

Glossary (letters as in docs/glossary.md)
    B       batch (labelled pixels)
    C       input bands, all modalities concatenated
    P       patch side (odd)
    L       pixel tokens, L = P * P (row-major); the branch's sequence is L + 1 tokens (class
            token first)
    F_high  channels of the high diffusion features
    D       model width (``TransformerConfig.dim``)
    Hh      attention heads (``heads``)
    Dh      head width, D = Hh * Dh
    Nq, Nk  query and key/value tokens of one attention

    patch (B, C, P, P) -> pixel tokens (B, L, D) + learned position -> [cls; tokens] (B, L+1, D)
    high (B, F_high, P, P) -> high tokens (B, L, D) + learned position (keys/values)
    depth x [ self-attention(L+1 <- L+1); cross-attention(L+1 <- L high tokens); MLP ]
    (pre-norm residual)
    z_tr = LayerNorm(class token) (B, D)

Both attentions go through ``kernels.dispatch.cross_attention`` (self-attention with k, v taken from
the same tokens as q).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdgf.errors import InputError
from bdgf.models._shapes import check_shape
from kernels.dispatch import cross_attention


@dataclass(frozen=True)
class TransformerConfig:
    dim: int = 64          # D
    depth: int = 2         # self-attention + cross-attention pairs
    heads: int = 4         # Hh
    mlp_ratio: int = 2


class Attention(nn.Module):
    """Multi-head attention: x (B, Nq, D), ctx (B, Nk, D) -> (B, Nq, D); queries from x, keys/values from ctx."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InputError(f"attention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:        # (B, Nq|Nk, D) -> (B, Hh, Nq|Nk, Dh)
        # (the local T below is that token count, Nq or Nk; not the tile side)
        B, T, D = t.shape
        return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        o = cross_attention(self._split(self.q(x)), self._split(k), self._split(v))  # (B, Hh, Nq, Dh)
        return self.out(o.transpose(1, 2).flatten(2))                                # (B, Nq, D)


class Block(nn.Module):
    """Self-attention, cross-attention to the high-feature tokens, MLP.

    x (B, L+1, D), h (B, L, D) -> (B, L+1, D); ``h`` is the high-feature tokens (not the halo)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.dim
        self.norm_sa, self.sa = nn.LayerNorm(D), Attention(D, cfg.heads)
        self.norm_q, self.norm_kv, self.ca = nn.LayerNorm(D), nn.LayerNorm(D), Attention(D, cfg.heads)
        self.norm_mlp = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(), nn.Linear(cfg.mlp_ratio * D, D))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y = self.norm_sa(x)
        x = x + self.sa(y, y)
        x = x + self.ca(self.norm_q(x), self.norm_kv(h))
        return x + self.mlp(self.norm_mlp(x))


class TransformerBranch(nn.Module):
    """forward(patch (B, C, P, P), high (B, F_high, P, P)) -> z_tr (B, D)."""

    def __init__(self, in_channels: int, high_channels: int, patch_size: int,
                 cfg: TransformerConfig = TransformerConfig()):
        super().__init__()
        self.in_channels, self.high_channels, self.patch_size = in_channels, high_channels, patch_size
        self.out_dim = cfg.dim
        L, D = patch_size * patch_size, cfg.dim
        self.embed = nn.Linear(in_channels, D)
        self.high_proj = nn.Linear(high_channels, D)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Parameter(torch.zeros(1, L, D))
        self.high_pos = nn.Parameter(torch.zeros(1, L, D))
        for p in (self.cls, self.pos, self.high_pos):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D)

    def forward(self, patch: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        check_shape("patch", patch, (None, self.in_channels, P, P), "(B, C, P, P)")
        check_shape("high", high, (patch.shape[0], self.high_channels, P, P), "(B, F_high, P, P)")
        x = self.embed(patch.flatten(2).transpose(1, 2)) + self.pos           # (B, L, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)       # (B, L+1, D)
        h = self.high_proj(high.flatten(2).transpose(1, 2)) + self.high_pos   # (B, L, D)
        for block in self.blocks:
            x = block(x, h)
        return self.norm(x[:, 0])                                             # (B, D)
