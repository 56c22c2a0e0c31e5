"""Adaptive modality masking (DESIGN §1.2) for M >= 2 modalities.

Glossary (letters as in docs/glossary.md)
    B   batch size
    M   number of modalities

Each step, modality m of a sample is masked (present = 0) with probability p_m. The probabilities
adapt to how much the denoiser leans on each modality:

    L̄_{¬m|m}    EMA of the loss on the other modalities in samples where m is masked
    L̄_{¬m|none} EMA of the loss on the other modalities in samples where nothing is masked
    D_m = L̄_{¬m|m} / L̄_{¬m|none} − 1
    p_m = clip(p0 · (1 + D_m) / mean_k (1 + D_k), p_min, p_max)

Choices where the paper is silent (all configurable, all recorded by ``state_dict``):
  * Never all masked: if a draw masks every modality of a sample, ONE modality chosen uniformly at
    random is unmasked again (no resampling loop, so the cost is fixed and export-friendly).
  * Reference samples: a fraction ``reference_fraction`` of each batch has nothing masked, so
    L̄_{¬m|none} is always estimated. The count is floor(f·B) plus one more with probability
    frac(f·B) (stochastic rounding), at random positions. The effective mask rate of modality m
    is therefore about (1 − f)·p_m.
  * "Loss on the other modalities when m is masked" counts, by default (``exclusive=True``), only
    samples where m is the ONLY masked modality, so the comparison with the unmasked samples
    changes one input and nothing else. With ``exclusive=False`` every sample with m masked
    counts, and the loss is averaged over the other modalities that are present.
  * The EMA starts at the first batch value (no zero bias). p_m stays p0 until ``warmup_steps``
    updates have passed and every EMA has a value.

Modes: "adaptive" (the method), "uniform" (p_m = p0 fixed: ablation), "none" (nothing masked:
ablation). Statistics are kept in every mode, so D_m can be logged for ablations too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["MaskingConfig", "AdaptiveModalityMasking"]

_MODES = ("adaptive", "uniform", "none")


@dataclass(frozen=True)
class MaskingConfig:
    p0: float = 0.3
    p_min: float = 0.05
    p_max: float = 0.7
    ema: float = 0.9  # weight of the old value: ema_new = ema * ema_old + (1 - ema) * batch_value
    warmup_steps: int = 100
    mode: str = "adaptive"  # "adaptive" | "uniform" | "none"
    reference_fraction: float = 0.25  # share of each batch with nothing masked
    exclusive: bool = True  # L̄_{¬m|m masked} only from samples where m alone is masked
    history_every: int = 1  # record p every this many updates (0: never)

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"masking mode must be one of {_MODES}, got {self.mode!r}")
        if not 0.0 <= self.p_min <= self.p0 <= self.p_max <= 1.0:
            raise ValueError(f"need 0 <= p_min <= p0 <= p_max <= 1, got {self.p_min}, {self.p0}, {self.p_max}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.reference_fraction <= 1.0:
            raise ValueError(f"reference_fraction must be in [0, 1], got {self.reference_fraction}")
        if self.warmup_steps < 0 or self.history_every < 0:
            raise ValueError("warmup_steps and history_every must be >= 0")


class AdaptiveModalityMasking:
    """Samples per-modality presence flags and adapts the mask probabilities p (M,).

    Plain-Python state (CPU tensors and lists); call ``sample`` then ``update`` once per step.
    """

    def __init__(self, num_modalities: int, config: MaskingConfig | None = None, **overrides):
        if num_modalities < 2:
            raise ValueError(f"modality masking needs at least 2 modalities, got {num_modalities}")
        config = config or MaskingConfig()
        if overrides:
            config = MaskingConfig(**{**asdict(config), **overrides})
        self.config = config
        self.num_modalities = M = num_modalities
        self.step = 0
        self.ema_masked = torch.zeros(M, dtype=torch.float64)  # L̄_{¬m|m masked}
        self.ema_none = torch.zeros(M, dtype=torch.float64)  # L̄_{¬m|none}
        self.seen_masked = torch.zeros(M, dtype=torch.bool)
        self.seen_none = torch.zeros(M, dtype=torch.bool)
        self._p = torch.full((M,), 0.0 if config.mode == "none" else config.p0, dtype=torch.float64)
        self.history: list[list[float]] = []

    # ------------------------------------------------------------------ sampling
    @property
    def probabilities(self) -> torch.Tensor:
        """Current per-modality mask probabilities p (M,) float32 (zeros in mode "none")."""
        return self._p.to(torch.float32).clone()

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Presence flags (B,M) float32, 1 = present, 0 = masked; never all 0 in a row.

        Draws on the generator's device (CPU if none), returns on ``device`` (default: same)."""
        M, cfg = self.num_modalities, self.config
        gdev = generator.device if generator is not None else torch.device("cpu")
        out_dev = device if device is not None else gdev
        if cfg.mode == "none" or batch_size == 0:
            return torch.ones(batch_size, M, device=out_dev)
        p = self._p.to(device=gdev, dtype=torch.float32)
        masked = torch.rand(batch_size, M, generator=generator, device=gdev) < p  # (B,M) bool
        # Never all masked: unmask one modality drawn uniformly at random.
        rescue = torch.randint(0, M, (batch_size,), generator=generator, device=gdev)
        all_masked = masked.all(dim=1, keepdim=True)
        masked = masked & ~(all_masked & torch.nn.functional.one_hot(rescue, M).bool())
        # Reference samples: floor(f·B) (+1 with prob frac(f·B)) rows at random positions unmasked.
        fb = cfg.reference_fraction * batch_size
        n_ref = int(math.floor(fb))
        extra = torch.rand(1, generator=generator, device=gdev)
        n_ref += int(float(extra) < fb - math.floor(fb))
        order = torch.randperm(batch_size, generator=generator, device=gdev)
        is_ref = torch.zeros(batch_size, dtype=torch.bool, device=gdev)
        is_ref[order[:n_ref]] = True
        masked = masked & ~is_ref[:, None]
        return (~masked).to(torch.float32).to(out_dev)

    # ------------------------------------------------------------------ adaptation
    def _batch_stats(self, loss: torch.Tensor, present: torch.Tensor):
        """loss, present (B,M) float64 on CPU -> per-m (mean, count) for 'm masked' and 'none'."""
        M = self.num_modalities
        masked = present < 0.5  # (B,M)
        n_masked = masked.sum(dim=1)  # (B,)
        others = 1.0 - torch.eye(M, dtype=loss.dtype)  # (M,M): others[m, k] = k != m
        # Loss on the others of m, per sample: mean over k != m of loss[b, k] -> (B,M).
        l_others_all = loss @ others.T / (M - 1)
        # Same but only over the present others (used when exclusive=False).
        w = present[:, None, :] * others[None]  # (B,M,M): present others of m
        l_others_present = (w * loss[:, None, :]).sum(-1) / w.sum(-1).clamp_min(1.0)

        none = (n_masked == 0)[:, None].expand(-1, M).to(loss.dtype)  # (B,M)
        if self.config.exclusive:
            sel = (masked & (n_masked == 1)[:, None]).to(loss.dtype)
            l_m = l_others_all
        else:
            sel = (masked & (w.sum(-1) > 0)).to(loss.dtype)
            l_m = l_others_present
        cnt_m, cnt_n = sel.sum(0), none.sum(0)
        mean_m = (sel * l_m).sum(0) / cnt_m.clamp_min(1.0)
        mean_n = (none * l_others_all).sum(0) / cnt_n.clamp_min(1.0)
        return mean_m, cnt_m > 0, mean_n, cnt_n > 0

    def _ema(self, old: torch.Tensor, seen: torch.Tensor, new: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        a = self.config.ema
        blended = torch.where(seen, a * old + (1 - a) * new, new)
        return torch.where(has, blended, old)

    def update(self, per_modality_loss: torch.Tensor, present: torch.Tensor) -> None:
        """Fold one step's losses into the EMAs and recompute p.

        per_modality_loss (B,M): per-sample loss of each modality (detached); present (B,M) 0/1,
        exactly the flags the step used."""
        M = self.num_modalities
        if per_modality_loss.shape != present.shape or per_modality_loss.ndim != 2 or present.shape[1] != M:
            raise ValueError(f"per_modality_loss and present must both be (B,{M}), got "
                             f"{tuple(per_modality_loss.shape)} and {tuple(present.shape)}")
        loss = per_modality_loss.detach().to("cpu", torch.float64)
        pres = present.detach().to("cpu", torch.float64)
        mean_m, has_m, mean_n, has_n = self._batch_stats(loss, pres)
        self.ema_masked = self._ema(self.ema_masked, self.seen_masked, mean_m, has_m)
        self.ema_none = self._ema(self.ema_none, self.seen_none, mean_n, has_n)
        self.seen_masked |= has_m
        self.seen_none |= has_n
        self.step += 1
        if self.config.mode == "adaptive" and self.step >= self.config.warmup_steps and self.ready:
            self._p = self._adapted()
        every = self.config.history_every
        if every and self.step % every == 0:
            self.history.append([float(v) for v in self._p])

    @property
    def ready(self) -> bool:
        """True once every modality has both EMAs."""
        return bool(self.seen_masked.all() and self.seen_none.all())

    @property
    def dependence(self) -> torch.Tensor:
        """D_m (M,) float32 = L̄_{¬m|m masked} / L̄_{¬m|none} − 1; NaN where not yet estimated."""
        d = self.ema_masked / self.ema_none.clamp_min(1e-12) - 1.0
        d = torch.where(self.seen_masked & self.seen_none, d, torch.full_like(d, float("nan")))
        return d.to(torch.float32)

    def _adapted(self) -> torch.Tensor:
        cfg = self.config
        r = (self.ema_masked / self.ema_none.clamp_min(1e-12)).clamp_min(0.0)  # 1 + D_m
        r = r / r.mean().clamp_min(1e-12)
        return (cfg.p0 * r).clamp(cfg.p_min, cfg.p_max)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain-Python state (floats, bools, lists) with the config, for checkpoints and metadata."""
        return {
            "config": asdict(self.config),
            "num_modalities": self.num_modalities,
            "step": self.step,
            "probabilities": [float(v) for v in self._p],
            "ema_masked": [float(v) for v in self.ema_masked],
            "ema_none": [float(v) for v in self.ema_none],
            "seen_masked": [bool(v) for v in self.seen_masked],
            "seen_none": [bool(v) for v in self.seen_none],
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_modalities"] != self.num_modalities:
            raise ValueError(f"masking state is for {state['num_modalities']} modalities, "
                             f"this one has {self.num_modalities}")
        self.config = MaskingConfig(**state["config"])
        self.step = int(state["step"])
        self._p = torch.tensor(state["probabilities"], dtype=torch.float64)
        self.ema_masked = torch.tensor(state["ema_masked"], dtype=torch.float64)
        self.ema_none = torch.tensor(state["ema_none"], dtype=torch.float64)
        self.seen_masked = torch.tensor(state["seen_masked"], dtype=torch.bool)
        self.seen_none = torch.tensor(state["seen_none"], dtype=torch.bool)
        self.history = [list(h) for h in state["history"]]

    def __repr__(self) -> str:
        p = ", ".join(f"{v:.3f}" for v in self._p)
        return f"AdaptiveModalityMasking(M={self.num_modalities}, mode={self.config.mode!r}, step={self.step}, p=[{p}])"
