"""Adaptive modality masking (docs/method.md, Stage 1) for M >= 2 modalities, with a paired dependence estimate.

Glossary (letters as in docs/glossary.md)
    B   batch size
    M   number of modalities
    N   pairs: samples of a batch denoised twice (see ``pair_plan``)

Each step, modality m of a training row is masked (present = 0) with probability p_m (never all
modalities of a row at once: if a draw masks all of them, ONE modality chosen uniformly at random
is unmasked again). The probabilities adapt to how much the denoiser leans on each modality.

Dependence, measured on pairs. The loss of a row varies with its timestep far more than with any
masking effect, so comparing rows where m was masked with OTHER rows (another t, eps, tile) measures
mostly the timestep mix. Instead, on N rows of each batch (``pair_plan``) the same (x0, t, eps) is
denoised twice, once with one modality m masked and once with nothing masked, and each pair gives

    r = log L_{¬m | m masked} − log L_{¬m | none}

where L_{¬m|·} is the mean over the other modalities k ≠ m of their x0-MSE in that row. D_m is an
exponentially weighted mean of the r of modality m, with decay ``ema`` per step (weights
w_i = ema^(age in steps)); with V1 = Σ w_i and V2 = Σ w_i²:

    D_m     = Σ w_i r_i / V1
    s²_m    = Σ w_i (r_i − D_m)² / (V1 − V2 / V1)          (reliability-weighted, unbiased)
    se_m    = s_m · sqrt(V2) / V1                           (n_eff = V1² / V2 pairs)

Adaptation. D_m is used only when it is distinguishable from zero:

    D̃_m = D_m  if n_eff_m >= min_pairs and |D_m| > z · se_m,  else 0
    p_m = clip(p0 · exp(D̃_m) / mean_k exp(D̃_k), p_min, p_max)

exp(D_m) is the geometric-mean loss ratio, the analogue of the paper's 1 + D_m. A modality whose
masking hurts the others' reconstruction more (the model leans on it) is masked MORE, so the
model learns to use the others. p is a function of the current estimate: a modality whose D stops
being distinguishable from zero goes back to its neutral weight (a chance excursion of the gate is
not kept). p stays p0 until ``warmup_steps`` updates have passed. The default z = 3: with no
dependence at all, a z = 2 gate still opens by chance on about 5 % of the steps per modality
(synthetic losses: 6-18 % of the steps for either of 2 modalities over 8 seeds), z = 3 on under 2 %.

Cost: one extra forward of 2N rows per step, without gradient (N = B/4 by default).

Modes: "adaptive" (the method), "uniform" (p_m = p0 fixed: ablation), "none" (nothing masked in
training rows: ablation). The pairs and the statistics are kept in every mode, so D_m can be
logged for ablations too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from bdgf.errors import InputError

__all__ = ["MaskingConfig", "AdaptiveModalityMasking"]

_MODES = ("adaptive", "uniform", "none")


@dataclass(frozen=True)
class MaskingConfig:
    p0: float = 0.3
    p_min: float = 0.05
    p_max: float = 0.7
    ema: float = 0.95  # per-step decay of the pair weights (memory ~ 1 / (1 - ema) steps)
    warmup_steps: int = 100
    mode: str = "adaptive"  # "adaptive" | "uniform" | "none"
    paired_fraction: float = 0.25  # share of each batch evaluated as (m masked, none masked) pairs
    z: float = 3.0  # D_m is used only when |D_m| > z * se_m
    min_pairs: float = 10.0  # ... and its effective number of pairs is at least this
    history_every: int = 1  # record p every this many updates (0: never)

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"masking mode must be one of {_MODES}, got {self.mode!r}")
        if not 0.0 <= self.p_min <= self.p0 <= self.p_max <= 1.0:
            raise ValueError(f"need 0 <= p_min <= p0 <= p_max <= 1, got {self.p_min}, {self.p0}, {self.p_max}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"masking ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.paired_fraction <= 1.0:
            raise ValueError(f"masking paired_fraction must be in [0, 1], got {self.paired_fraction}")
        if not (math.isfinite(self.z) and self.z >= 0.0):
            raise ValueError(f"masking z must be a finite number >= 0, got {self.z}")
        if not (math.isfinite(self.min_pairs) and self.min_pairs >= 1.0):
            raise ValueError(f"masking min_pairs must be >= 1, got {self.min_pairs}")
        if self.warmup_steps < 0 or self.history_every < 0:
            raise ValueError("masking warmup_steps and history_every must be >= 0")


class AdaptiveModalityMasking:
    """Samples per-modality presence flags and adapts the mask probabilities p (M,).

    Plain-Python state (CPU float64 tensors and lists). Per step: ``sample`` (training rows),
    ``pair_plan`` (which rows to pair, masking which modality), then ``update`` with the pairs'
    log ratios. :func:`bdgf.diffusion.step.diffusion_training_step` does all three.
    """

    def __init__(self, num_modalities: int, config: MaskingConfig | None = None, **overrides):
        if num_modalities < 2:
            raise InputError(f"modality masking needs at least 2 modalities, got {num_modalities}: BDGF fuses "
                             "co-registered modalities (an HSI and LiDAR or SAR); give the scene both")
        config = config or MaskingConfig()
        if overrides:
            config = MaskingConfig(**{**asdict(config), **overrides})
        self.config = config
        self.num_modalities = M = num_modalities
        self.step = 0
        # Exponentially weighted sums over the pairs of each modality (M,): Σw, Σw², Σw·r, Σw·r².
        self.w_sum = torch.zeros(M, dtype=torch.float64)
        self.w2_sum = torch.zeros(M, dtype=torch.float64)
        self.r_sum = torch.zeros(M, dtype=torch.float64)
        self.r2_sum = torch.zeros(M, dtype=torch.float64)
        self._p = torch.full((M,), 0.0 if config.mode == "none" else config.p0, dtype=torch.float64)
        self.history: list[list[float]] = []

    # ------------------------------------------------------------------ sampling
    @property
    def probabilities(self) -> torch.Tensor:
        """Current per-modality mask probabilities p (M,) float32 (zeros in mode "none")."""
        return self._p.to(torch.float32).clone()

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Presence flags of the training rows (B, M) float32, 1 = present, 0 = masked; never all 0.

        Draws on the generator's device (CPU if none), returns on ``device`` (default: same)."""
        M = self.num_modalities
        gdev = generator.device if generator is not None else torch.device("cpu")
        out_dev = device if device is not None else gdev
        if self.config.mode == "none" or batch_size == 0:
            return torch.ones(batch_size, M, device=out_dev)
        p = self._p.to(device=gdev, dtype=torch.float32)
        masked = torch.rand(batch_size, M, generator=generator, device=gdev) < p  # (B, M) bool
        rescue = torch.randint(0, M, (batch_size,), generator=generator, device=gdev)  # (B,)
        all_masked = masked.all(dim=1, keepdim=True)
        masked = masked & ~(all_masked & torch.nn.functional.one_hot(rescue, M).bool())
        return (~masked).to(torch.float32).to(out_dev)

    def num_pairs(self, batch_size: int) -> int:
        """N = ceil(paired_fraction · B), raised to M where the batch allows (one pair per modality);
        0 when paired_fraction is 0."""
        f = self.config.paired_fraction
        if f == 0.0 or batch_size == 0:
            return 0
        return min(batch_size, max(math.ceil(f * batch_size - 1e-9), self.num_modalities))

    def pair_plan(self, batch_size: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (N,), modality (N,)) int64: N distinct rows at random positions, and the modality
        each pair masks; modalities cycle from a random start, so each gets floor or ceil of N/M."""
        N, M = self.num_pairs(batch_size), self.num_modalities
        gdev = generator.device if generator is not None else torch.device("cpu")
        out_dev = device if device is not None else gdev
        rows = torch.randperm(batch_size, generator=generator, device=gdev)[:N]
        start = torch.randint(0, M, (1,), generator=generator, device=gdev)
        modality = (start + torch.arange(N, device=gdev)) % M
        return rows.to(out_dev), modality.to(out_dev)

    # ------------------------------------------------------------------ adaptation
    def update(self, pair_log_ratio: torch.Tensor, pair_masked: torch.Tensor) -> None:
        """Fold one step's pairs into the statistics and recompute p.

        pair_log_ratio (N, M): at [i, m], log L_{¬m|m masked} − log L_{¬m|none} of pair i (other
        entries are ignored); pair_masked (N, M) 0/1: 1 at the modality pair i masked (one-hot
        rows). N may be 0 (the statistics still decay by one step). A NaN/inf ratio (a diverged
        model) is left out, so the statistics stay finite; the step's own loss check stops the run."""
        M = self.num_modalities
        if pair_log_ratio.shape != pair_masked.shape or pair_log_ratio.ndim != 2 or pair_masked.shape[1] != M:
            raise ValueError(f"pair_log_ratio and pair_masked must both be (N,{M}), got "
                             f"{tuple(pair_log_ratio.shape)} and {tuple(pair_masked.shape)}")
        r = pair_log_ratio.detach().to("cpu", torch.float64)
        finite = torch.isfinite(r)
        w = ((pair_masked.detach().to("cpu", torch.float64) > 0.5) & finite).to(torch.float64)  # (N, M)
        r = torch.where(w > 0, r, torch.zeros_like(r))
        a = self.config.ema
        self.w_sum = a * self.w_sum + w.sum(0)
        self.w2_sum = a * a * self.w2_sum + w.sum(0)
        self.r_sum = a * self.r_sum + (w * r).sum(0)
        self.r2_sum = a * self.r2_sum + (w * r * r).sum(0)
        self.step += 1
        self._p = self._probabilities_now()
        every = self.config.history_every
        if every and self.step % every == 0:
            self.history.append([float(v) for v in self._p])

    def _estimate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(D, se, n_eff), each (M,) float64; D NaN where no pair yet, se inf where n_eff <= 1."""
        has = self.w_sum > 0
        V1 = torch.where(has, self.w_sum, torch.ones_like(self.w_sum))
        d = torch.where(has, self.r_sum / V1, torch.full_like(V1, math.nan))
        n_eff = torch.where(has, self.w_sum ** 2 / self.w2_sum.clamp_min(1e-300), torch.zeros_like(V1))
        denom = V1 - self.w2_sum / V1  # V1 (1 - 1/n_eff)
        spread = (self.r2_sum - self.r_sum ** 2 / V1).clamp_min(0.0)
        ok = has & (denom > 1e-9 * V1)
        var = torch.where(ok, spread / torch.where(ok, denom, torch.ones_like(denom)), torch.full_like(V1, math.inf))
        se = torch.where(ok, (var * self.w2_sum).sqrt() / V1, torch.full_like(V1, math.inf))
        return d, se, n_eff

    @property
    def dependence(self) -> torch.Tensor:
        """D_m (M,) float32: mean paired log loss ratio; NaN where no pair has been seen."""
        return self._estimate()[0].to(torch.float32)

    @property
    def dependence_se(self) -> torch.Tensor:
        """se_m (M,) float32: standard error of D_m; inf until two effective pairs."""
        return self._estimate()[1].to(torch.float32)

    @property
    def significant(self) -> torch.Tensor:
        """(M,) bool: D_m is used by the adaptation (n_eff >= min_pairs and |D_m| > z · se_m)."""
        d, se, n_eff = self._estimate()
        return (n_eff >= self.config.min_pairs) & torch.isfinite(se) & (d.abs() > self.config.z * se)

    def _probabilities_now(self) -> torch.Tensor:
        cfg = self.config
        if cfg.mode == "none":
            return torch.zeros(self.num_modalities, dtype=torch.float64)
        if cfg.mode == "uniform" or self.step < cfg.warmup_steps:
            return torch.full((self.num_modalities,), cfg.p0, dtype=torch.float64)
        d = torch.where(self.significant, self._estimate()[0], torch.zeros(self.num_modalities, dtype=torch.float64))
        weight = torch.exp(d)
        return (cfg.p0 * weight / weight.mean()).clamp(cfg.p_min, cfg.p_max)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain-Python state (floats, lists) with the config, for checkpoints and metadata."""
        return {
            "config": asdict(self.config),
            "num_modalities": self.num_modalities,
            "step": self.step,
            "probabilities": [float(v) for v in self._p],
            "w_sum": [float(v) for v in self.w_sum],
            "w2_sum": [float(v) for v in self.w2_sum],
            "r_sum": [float(v) for v in self.r_sum],
            "r2_sum": [float(v) for v in self.r2_sum],
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_modalities"] != self.num_modalities:
            raise ValueError(f"masking state is for {state['num_modalities']} modalities, "
                             f"this one has {self.num_modalities}")
        missing = {"w_sum", "w2_sum", "r_sum", "r2_sum"} - set(state)
        if missing:
            raise InputError(f"masking state has no {sorted(missing)}: it was saved by the unpaired masking "
                             "of an older version; start the run over (--overwrite)")
        self.config = MaskingConfig(**state["config"])
        self.step = int(state["step"])
        self._p = torch.tensor(state["probabilities"], dtype=torch.float64)
        for name in ("w_sum", "w2_sum", "r_sum", "r2_sum"):
            setattr(self, name, torch.tensor(state[name], dtype=torch.float64))
        self.history = [list(h) for h in state["history"]]

    def __repr__(self) -> str:
        p = ", ".join(f"{v:.3f}" for v in self._p)
        return f"AdaptiveModalityMasking(M={self.num_modalities}, mode={self.config.mode!r}, step={self.step}, p=[{p}])"
