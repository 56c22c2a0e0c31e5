"""Mutual-learning loss of the BDGF classifier (docs/method.md, Stage 2).

Glossary (letters as in docs/glossary.md)
    B     batch (labelled pixels)
    K     classes
    Dz_b  embedding width of branch b's z

    loss = sum_b CE_b
      + lambda_kl  * sum_b KL(p_b^tau || sg(pbar_{not b}^tau)) * tau^2
      + lambda_ent * sum_b |H(p_b) - Hbar|
      + lambda_sim * sum_{b<b'} (1 - cos(g_b(z_b), g_b'(z_b')))

Notation, per sample i (every term is then averaged over the batch):
    p_b^tau        softmax(logits_b / tau), the branch's temperature-softened prediction
    pbar_{not b}   mean of p_b'^tau over the *other* branches b' != b, under stop-gradient (sg):
                   the peer **target**; no gradient flows into the peers through branch b's term
    KL(p || q)     sum_j p_j (log p_j - log q_j) over the K classes. As written in the method's description, the
                   first argument is the live branch distribution p_b (expectation under p_b,
                   "reverse"/mode-seeking KL) and the second is the detached target pbar.
                   ``kl_direction="target_first"`` gives the classic deep-mutual-learning/
                   distillation direction KL(pbar || p_b) instead; the default
                   ``"branch_first"`` follows that description literally.
    H(p_b)         batch-mean entropy of the untempered softmax(logits_b), in nats (H(.) is the
                   entropy function here, not the grid height)
    Hbar           mean of H(p_b) over branches (not detached: the term pulls entropies together)
    g_b            a small per-branch projector z_b (Dz_b) -> proj_dim; cos is per sample
Pairs b < b' follow the order of the branches given at construction.

With a single branch there are no peers: the loss is CE only, and kl/ent/sim are reported as 0.

Precision: the loss is computed in float32 (float64 inputs stay float64) whatever the forward ran
in: bf16/fp16 logits and z from an autocast forward are upcast, and autocast is off inside (the
projectors g_b run in float32 too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdgf.errors import InputError


@dataclass(frozen=True)
class MutualLearningConfig:
    lambda_kl: float = 1.0
    tau: float = 2.0
    lambda_ent: float = 0.1
    lambda_sim: float = 0.1
    proj_dim: int = 64
    proj_hidden: int = 128              # 0 -> the projector g_b is one Linear layer
    kl_direction: str = "branch_first"  # "branch_first": KL(p_b || sg(pbar)); "target_first": KL(sg(pbar) || p_b)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise InputError(f"tau must be > 0, got {self.tau}")
        if self.kl_direction not in ("branch_first", "target_first"):
            raise InputError(f"kl_direction must be 'branch_first' or 'target_first', got {self.kl_direction!r}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32; float32/float64 as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _projector(d_in: int, cfg: MutualLearningConfig) -> nn.Module:
    if cfg.proj_hidden <= 0:
        return nn.Linear(d_in, cfg.proj_dim)
    return nn.Sequential(nn.Linear(d_in, cfg.proj_hidden), nn.ReLU(), nn.Linear(cfg.proj_hidden, cfg.proj_dim))


class MutualLearningLoss(nn.Module):
    """forward(logits {b: (B, K)}, z {b: (B, Dz_b)}, target (B,) int64) -> (loss (), terms).

    ``terms`` holds detached 0-d tensors: "loss", the unweighted sums "ce", "kl" (already times
    tau^2), "ent", "sim", and per branch "ce/<b>", "kl/<b>", "entropy/<b>" (H(p_b)).
    """

    def __init__(self, z_dims: dict[str, int], config: MutualLearningConfig = MutualLearningConfig()):
        super().__init__()
        if not z_dims:
            raise InputError("MutualLearningLoss needs at least one branch")
        self.config = config
        self.branches = tuple(z_dims)
        self.projectors = nn.ModuleDict({b: _projector(d, config) for b, d in z_dims.items()})

    def forward(self, logits: dict[str, torch.Tensor], z: dict[str, torch.Tensor],
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, names = self.config, self.branches
        missing = [b for b in names if b not in logits or b not in z]
        if missing:
            raise InputError(f"mutual-learning loss: no logits/z for branches {missing}")
        if target.dim() != 1 or any(logits[b].shape[0] != target.shape[0] for b in names):
            raise InputError(f"target must be (B,) matching the logits' batch, got {tuple(target.shape)}")
        with torch.autocast(logits[names[0]].device.type, enabled=False):
            return self._loss({b: _upcast(logits[b]) for b in names}, {b: _upcast(z[b]) for b in names}, target)

    def _loss(self, logits: dict[str, torch.Tensor], z: dict[str, torch.Tensor],
              target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, names = self.config, self.branches
        terms: dict[str, torch.Tensor] = {}
        zero = logits[names[0]].new_zeros(())

        ce = {b: F.cross_entropy(logits[b], target) for b in names}
        ce_sum = sum(ce.values(), zero)
        kl_sum, ent_sum, sim_sum = zero, zero, zero
        n = len(names)
        if n > 1:
            tau = cfg.tau
            logp_tau = {b: F.log_softmax(logits[b] / tau, dim=-1) for b in names}        # (B, K)
            for b in names:
                peers = torch.stack([logp_tau[o].detach() for o in names if o != b])     # (branches - 1, B, K)
                log_pbar = torch.logsumexp(peers, dim=0) - math.log(n - 1)                # log mean prob
                lp = logp_tau[b]
                if cfg.kl_direction == "branch_first":
                    kl = (lp.exp() * (lp - log_pbar)).sum(-1).mean()
                else:
                    kl = (log_pbar.exp() * (log_pbar - lp)).sum(-1).mean()
                terms[f"kl/{b}"] = kl.detach() * tau**2
                kl_sum = kl_sum + kl * tau**2

            ent = {}
            for b in names:
                lp = F.log_softmax(logits[b], dim=-1)
                ent[b] = -(lp.exp() * lp).sum(-1).mean()                                  # H(p_b), batch mean
                terms[f"entropy/{b}"] = ent[b].detach()
            h_bar = torch.stack(list(ent.values())).mean()
            ent_sum = sum(((ent[b] - h_bar).abs() for b in names), zero)

            g = {b: self.projectors[b](z[b]) for b in names}                              # (B, proj_dim)
            for i in range(n):
                for j in range(i + 1, n):
                    sim_sum = sim_sum + (1 - F.cosine_similarity(g[names[i]], g[names[j]], dim=-1)).mean()

        loss = ce_sum + cfg.lambda_kl * kl_sum + cfg.lambda_ent * ent_sum + cfg.lambda_sim * sim_sum
        for b in names:
            terms[f"ce/{b}"] = ce[b].detach()
        terms.update(loss=loss.detach(), ce=ce_sum.detach(), kl=kl_sum.detach(),
                     ent=ent_sum.detach(), sim=sim_sum.detach())
        return loss, terms
