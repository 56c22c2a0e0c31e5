"""Mamba branch, guided by the **mid** diffusion features through grouped channel attention.

Glossary (letters as in docs/glossary.md; shapes after johnma2006/mamba-minimal)
    B       batch (labelled pixels)
    C       input bands, all modalities concatenated
    P       patch side (odd)
    L       tokens in the sequence, L = P * P, one per pixel
    F_mid   channels of the mid diffusion features
    D       model width (``MambaConfig.d_model``)
    E       expanded inner width, E = expand * D (``d_inner``)
    N_s     SSM state size (``d_state``)
    R       rank of the delta projection (``dt_rank``)
    k       kernel side of the depthwise causal conv1d (``d_conv``)
    G       channel groups gated by the mid features (``groups``); D % G == 0
    Ly      number of layers (``n_layers``)

Scan order (``centre_out_order``): pixels are sorted by squared Euclidean distance to the centre
pixel, ties broken by angle atan2(-(row - c), col - c) in [0, 2*pi) (counter-clockwise from "east",
image rows pointing down), then by flat index. So token 0 is the centre pixel, then its 4-neighbours
(east, north, west, south), then the diagonal ones, ... out to the patch corners. Each layer is bidirectional:
one MambaBlock scans centre-out, a second (own weights) scans the reversed sequence (outside-in,
ending at the centre), and their outputs are averaged. z_mamba = LayerNorm(centre token + mean of
all tokens): the centre token has seen every pixel through the outside-in scan; the mean adds the
forward scan's context (whose first token, the centre, has seen only itself).

Grouped channel attention: mid (B, F_mid, P, P) is averaged over the window -> (B, F_mid) -> MLP ->
(B, Ly, G) -> sigmoid; at the input of layer i, each of the G groups of D/G token channels is
multiplied by its gate (the same gate for every token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdgf.errors import InputError
from bdgf.models._shapes import check_shape
from kernels.dispatch import selective_scan


@dataclass(frozen=True)
class MambaConfig:
    d_model: int = 64          # D
    n_layers: int = 2          # Ly (each layer: one forward + one reversed MambaBlock)
    d_state: int = 16          # N_s
    expand: int = 2            # E = expand * D
    d_conv: int = 4            # k
    dt_rank: int | None = None  # R; None -> ceil(D / 16)
    groups: int = 8            # G
    gate_hidden: int = 64      # hidden width of the mid-feature gate MLP


def centre_out_order(patch_size: int) -> torch.Tensor:
    """Centre-out scan order of a P x P patch: (L,) int64, a permutation of range(P * P).

    ``order[j]`` is the flat (row * P + col) index of the pixel at scan position j; position 0 is
    the centre. See the module docstring for the tie-breaking rule.
    """
    if patch_size < 1 or patch_size % 2 == 0:
        raise InputError(f"patch_size must be odd and positive, got {patch_size}")
    c = patch_size // 2

    def key(idx: int) -> tuple[int, float, int]:
        r, col = divmod(idx, patch_size)
        dy, dx = -(r - c), col - c
        return (dy * dy + dx * dx, math.atan2(dy, dx) % (2 * math.pi), idx)

    return torch.tensor(sorted(range(patch_size * patch_size), key=key), dtype=torch.long)


class MambaMixer(nn.Module):
    """The selective-SSM mixer of one Mamba block: (B, L, D) -> (B, L, D).

    in_proj -> (x, res) each (B, L, E); x -> depthwise causal conv1d -> SiLU; x -> delta (B, L, E)
    and Bm, Cm (B, L, N_s), input-dependent (Mamba's B and C matrices, named Bm, Cm here so they
    do not read as the batch and band letters); y = selective_scan(x, softplus(delta),
    -exp(A_log), Bm, Cm, self.D); y * SiLU(res); out_proj.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None):
        super().__init__()
        E = expand * d_model
        self.d_inner, self.d_state = E, d_state
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E)
        # delta starts log-uniform in [1e-3, 1e-1] (bias = softplus^-1(dt)), as in Mamba.
        dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N_s)
        self.D = nn.Parameter(torch.ones(E))                                                                   # (E,)
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        L = x.shape[1]
        x, res = self.in_proj(x).chunk(2, dim=-1)                             # (B, L, E) each
        x = self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2)           # (B, L, E) causal
        x = F.silu(x)
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))                                  # (B, L, E)
        A = -torch.exp(self.A_log.float())                                    # (E, N_s)
        # The scan runs in float32 whatever the autocast / parameter dtype (decays exp(delta*A)).
        f32 = torch.float32
        y = selective_scan(x.to(f32), delta.to(f32), A, Bm.to(f32), Cm.to(f32), self.D.to(f32))
        return self.out_proj(y.to(x.dtype) * F.silu(res))                     # (B, L, D)


class MambaBlock(nn.Module):
    """One Mamba block, pre-norm residual: x + mixer(LayerNorm(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None):
        super().__init__()
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.mixer = MambaMixer(d_model, d_state, expand, d_conv, dt_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("MambaBlock input", x, (None, None, self.d_model), "(B, L, D)")
        return x + self.mixer(self.norm(x))


class BiMambaLayer(nn.Module):
    """Bidirectional layer: mean of a forward and a reversed-sequence MambaBlock. (B, L, D) -> (B, L, D)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        args = (cfg.d_model, cfg.d_state, cfg.expand, cfg.d_conv, cfg.dt_rank)
        self.fwd, self.bwd = MambaBlock(*args), MambaBlock(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.fwd(x) + self.bwd(x.flip(1)).flip(1))


class MambaBranch(nn.Module):
    """forward(patch (B, C, P, P), mid (B, F_mid, P, P)) -> z_mamba (B, D)."""

    def __init__(self, in_channels: int, mid_channels: int, patch_size: int, cfg: MambaConfig = MambaConfig()):
        super().__init__()
        if cfg.d_model % cfg.groups:
            raise InputError(f"Mamba branch: d_model {cfg.d_model} is not divisible by groups {cfg.groups}")
        self.in_channels, self.mid_channels, self.patch_size = in_channels, mid_channels, patch_size
        self.cfg, self.out_dim = cfg, cfg.d_model
        L = patch_size * patch_size
        self.register_buffer("order", centre_out_order(patch_size), persistent=False)  # (L,)
        self.embed = nn.Linear(in_channels, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(1, L, cfg.d_model))                       # in scan order
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.gate = nn.Sequential(
            nn.Linear(mid_channels, cfg.gate_hidden), nn.SiLU(),
            nn.Linear(cfg.gate_hidden, cfg.n_layers * cfg.groups),
        )
        self.layers = nn.ModuleList([BiMambaLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, channels, P, P) -> (B, L, channels) in centre-out scan order."""
        return x.flatten(2).transpose(1, 2)[:, self.order]

    def gates(self, mid: torch.Tensor) -> torch.Tensor:
        """mid (B, F_mid, P, P) -> per-layer channel gates (B, Ly, D), constant within each group."""
        g = torch.sigmoid(self.gate(mid.mean(dim=(-2, -1))))                   # (B, Ly * G)
        g = g.view(-1, self.cfg.n_layers, self.cfg.groups)                     # (B, Ly, G)
        return g.repeat_interleave(self.cfg.d_model // self.cfg.groups, dim=-1)  # (B, Ly, D)

    def forward(self, patch: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        check_shape("patch", patch, (None, self.in_channels, P, P), "(B, C, P, P)")
        check_shape("mid", mid, (patch.shape[0], self.mid_channels, P, P), "(B, F_mid, P, P)")
        x = self.embed(self.tokens(patch)) + self.pos                          # (B, L, D)
        gates = self.gates(mid)                                                # (B, Ly, D)
        for i, layer in enumerate(self.layers):
            x = layer(x * gates[:, i : i + 1])                                 # (B, L, D)
        return self.norm(x[:, 0] + x.mean(dim=1))                              # (B, D) centre + mean
