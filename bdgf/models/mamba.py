"""Mamba branch, guided by the **mid** diffusion features through grouped channel attention.

Glossary (letters as in docs/glossary.md; shapes after johnma2006/mamba-minimal)
    B       batch (labelled pixels)
    C       input bands, all modalities concatenated
    P       patch side (odd); r = P // 2
    L       tokens in the sequence, one per cell of the token grid (``bdgf.models._shapes``):
            P * P pixel tokens at ``token_stride`` 1, r * r tokens of 3 x 3 windows at stride 2
    F_mid   channels of the mid diffusion features
    D       model width (``MambaConfig.d_model``)
    E       expanded inner width, E = expand * D (``d_inner``)
    N_s     SSM state size (``d_state``)
    R       rank of the delta projection (``dt_rank``)
    k       kernel side of the depthwise causal conv1d (``d_conv``)
    G       channel groups gated by the mid features (``groups``); D % G == 0
    Ly      number of layers (``n_layers``)
    T       tile side (``dense``)
    N       windows (pixels) of one chunk of ``dense``

Tokens: an unpadded convolution (kernel ``2 * token_stride - 1``, stride ``token_stride``) over
the patch. The default stride 2 gives an r x r grid of overlapping 3 x 3 windows that covers the
patch exactly: the selective scan, whose cost is per token and dominated by elementwise state
updates (L * E * N_s per direction), runs over 25 tokens instead of 121 at P = 11 (about 5x less
scan work per classified pixel; ``benchmarks/bench_inference.py``), while every band of every
pixel still reaches the tokens. ``token_stride=1`` is one token per pixel.

Scan order (``centre_out_order``): grid cells are sorted by squared Euclidean distance to the grid
centre, ties broken by angle atan2(-(row - c), col - c) in [0, 2*pi) (counter-clockwise from
"east", image rows pointing down), then by flat index. So token 0 is the centre one (for an even
grid side, r even, the first of the four around the centre pixel; all four windows contain it),
then its 4-neighbours (east, north, west, south), then the diagonal ones, ... out to the corners.
Each layer is bidirectional: one MambaBlock scans centre-out, a second (own weights) scans the
reversed sequence (outside-in, ending at the centre), and their outputs are averaged. z_mamba =
LayerNorm(centre token + mean of all tokens): the centre token has seen every token through the
outside-in scan; the mean adds the forward scan's context (whose first token has seen only itself).
The last layer computes its output projections for those two rows only (exact: linear, no bias).

Grouped channel attention: mid (B, F_mid, P, P) is averaged over the window -> (B, F_mid) -> MLP ->
(B, Ly, G) -> sigmoid; at the input of layer i, each of the G groups of D/G token channels is
multiplied by its gate (the same gate for every token).

``dense(region, mid)``: z of every window of a region at once, equal to ``forward`` on each P x P
window. The token embedding (a stride-1 convolution over the region) and the gates (the window
mean is a P x P average pool, then the MLP) are computed once per pixel; the tokens are gathered
into windows in scan order (``bdgf.models._shapes.gather_windows``) chunk by chunk for the scans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdgf.errors import InputError
from bdgf.models._shapes import DENSE_CHUNK, check_region, check_shape, gather_windows, token_grid, window_index
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
    token_stride: int = 2      # 1: a token per pixel; 2: 3 x 3 windows at stride 2 (module docstring)



def centre_out_order(side: int) -> torch.Tensor:
    """Centre-out scan order of a side x side grid: (side * side,) int64, a permutation.

    ``order[j]`` is the flat (row * side + col) index of the cell at scan position j; position 0 is
    the centre cell (for an even side, the first of the four around the centre). See the module
    docstring for the tie-breaking rule.
    """
    if side < 1:
        raise InputError(f"grid side must be positive, got {side}")

    def key(idx: int) -> tuple[int, float, int]:
        row, col = divmod(idx, side)
        dy, dx = (side - 1) - 2 * row, 2 * col - (side - 1)      # twice the offset from the centre
        return (dy * dy + dx * dx, math.atan2(dy, dx) % (2 * math.pi), idx)

    return torch.tensor(sorted(range(side * side), key=key), dtype=torch.long)


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
        return self.out_proj(self.inner(x))

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> y * SiLU(res) (B, L, E): everything before ``out_proj`` (which is linear
        without bias, so it commutes with a mean over tokens)."""
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
        return y.to(x.dtype) * F.silu(res)                                    # (B, L, E)


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


def _first_and_mean(t: torch.Tensor, first: int) -> torch.Tensor:
    """(B, L, channels) -> (B, 2, channels): token ``first`` and the mean over tokens."""
    return torch.stack([t[:, first], t.mean(dim=1)], dim=1)


class BiMambaLayer(nn.Module):
    """Bidirectional layer: mean of a forward and a reversed-sequence MambaBlock. (B, L, D) -> (B, L, D)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        args = (cfg.d_model, cfg.d_state, cfg.expand, cfg.d_conv, cfg.dt_rank)
        self.fwd, self.bwd = MambaBlock(*args), MambaBlock(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.fwd(x) + self.bwd(x.flip(1)).flip(1))

    def centre_and_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, 2, D): token 0 and the mean over tokens of ``forward(x)``, with each
        ``out_proj`` applied to those two rows only (exact: it is linear without bias)."""
        check_shape("BiMambaLayer input", x, (None, None, self.fwd.d_model), "(B, L, D)")
        uf = self.fwd.mixer.inner(self.fwd.norm(x))                             # (B, L, E)
        ub = self.bwd.mixer.inner(self.bwd.norm(x.flip(1)))                     # (B, L, E), reversed order
        fwd = self.fwd.mixer.out_proj(_first_and_mean(uf, 0))                   # (B, 2, D)
        bwd = self.bwd.mixer.out_proj(_first_and_mean(ub, -1))                  # token 0 is last when reversed
        return _first_and_mean(x, 0) + 0.5 * (fwd + bwd)


class MambaBranch(nn.Module):
    """forward(patch (B, C, P, P), mid (B, F_mid, P, P)) -> z_mamba (B, D);
    dense(region (B, C, T+2r, T+2r), mid (B, F_mid, T+2r, T+2r)) -> z_mamba of every pixel (B, D, T, T)."""

    def __init__(self, in_channels: int, mid_channels: int, patch_size: int, cfg: MambaConfig = MambaConfig()):
        super().__init__()
        if cfg.d_model % cfg.groups:
            raise InputError(f"Mamba branch: d_model {cfg.d_model} is not divisible by groups {cfg.groups}")
        self.in_channels, self.mid_channels, self.patch_size = in_channels, mid_channels, patch_size
        self.cfg, self.out_dim, self.stride = cfg, cfg.d_model, cfg.token_stride
        self.kernel, self.grid_side = token_grid(patch_size, cfg.token_stride)
        L = self.grid_side ** 2
        self.register_buffer("order", centre_out_order(self.grid_side), persistent=False)  # (L,)
        self.embed = nn.Conv2d(in_channels, cfg.d_model, self.kernel)
        self.pos = nn.Parameter(torch.zeros(1, L, cfg.d_model))                       # in scan order
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.gate = nn.Sequential(
            nn.Linear(mid_channels, cfg.gate_hidden), nn.SiLU(),
            nn.Linear(cfg.gate_hidden, cfg.n_layers * cfg.groups),
        )
        self.layers = nn.ModuleList([BiMambaLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)

    def tokens(self, patch: torch.Tensor) -> torch.Tensor:
        """(B, C, P, P) -> embedded tokens (B, L, D) in centre-out scan order, without positions."""
        x = F.conv2d(patch, self.embed.weight, self.embed.bias, stride=self.stride)   # (B, D, side, side)
        return x.flatten(2).transpose(1, 2)[:, self.order]

    def gates_of_means(self, mean: torch.Tensor) -> torch.Tensor:
        """Window means of mid (..., F_mid) -> per-layer channel gates (..., Ly, D), constant within
        each group."""
        g = torch.sigmoid(self.gate(mean)).unflatten(-1, (self.cfg.n_layers, self.cfg.groups))  # (..., Ly, G)
        return g.repeat_interleave(self.cfg.d_model // self.cfg.groups, dim=-1)               # (..., Ly, D)

    def gates(self, mid: torch.Tensor) -> torch.Tensor:
        """mid (B, F_mid, P, P) -> per-layer channel gates (B, Ly, D), constant within each group."""
        return self.gates_of_means(mid.mean(dim=(-2, -1)))

    def _mix(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, D) with positions, gates (B, Ly, D) -> z (B, D)."""
        *layers, last = self.layers
        for i, layer in enumerate(layers):
            x = layer(x * gates[:, i : i + 1])                                 # (B, L, D)
        rows = last.centre_and_mean(x * gates[:, -1:])                          # (B, 2, D)
        return self.norm(rows[:, 0] + rows[:, 1])                              # (B, D) centre + mean

    def forward(self, patch: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        check_shape("patch", patch, (None, self.in_channels, P, P), "(B, C, P, P)")
        check_shape("mid", mid, (patch.shape[0], self.mid_channels, P, P), "(B, F_mid, P, P)")
        return self._mix(self.tokens(patch) + self.pos, self.gates(mid))

    def dense(self, region: torch.Tensor, mid: torch.Tensor, chunk_pixels: int = DENSE_CHUNK) -> torch.Tensor:
        """(B, C, rows, cols), (B, F_mid, rows, cols) -> z_mamba (B, D, rows-P+1, cols-P+1): entry
        [..., i, j] equals ``forward`` on the window whose top-left corner is (i, j) (for a region
        of side T + 2r: every pixel of the T x T tile). ``chunk_pixels`` windows are scanned at a time."""
        out_rows, out_cols = check_region("mamba", region, mid, self.in_channels, self.mid_channels,
                                          self.patch_size, "mid")
        if chunk_pixels < 1:
            raise InputError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
        B, D, P = region.shape[0], self.out_dim, self.patch_size
        x = self.embed(region).permute(0, 2, 3, 1)                             # (B, rows', cols', D)
        means = F.avg_pool2d(mid, P, stride=1).permute(0, 2, 3, 1)             # (B, T, T, F_mid)
        gates = self.gates_of_means(means).flatten(1, 2)                       # (B, T*T, Ly, D)
        n_out, zs = out_rows * out_cols, []
        for start in range(0, n_out, chunk_pixels):
            stop = min(start + chunk_pixels, n_out)
            index = window_index(out_cols, x.shape[2], self.stride, self.grid_side, start, stop, self.order)
            tokens = gather_windows(x, index) + self.pos                       # (B*N, L, D)
            zs.append(self._mix(tokens, gates[:, start:stop].flatten(0, 1)).view(B, -1, D))
        return torch.cat(zs, dim=1).transpose(1, 2).reshape(B, D, out_rows, out_cols)
