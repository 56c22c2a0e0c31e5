"""Pieces shared by the training loops: the optimiser step, divergence, batch cycling."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from bdgf.errors import BDGFError


class TrainingDiverged(BDGFError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class TorchStepper:
    """The plain single-process optimiser step: zero grads, backward, clip, step.

    A distributed loop passes its own stepper with the same ``step(loss)`` (e.g. DeepSpeed's
    ``engine.backward(loss); engine.step()``), so the loops themselves are written once.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None = None):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip

    def step(self, loss: torch.Tensor) -> float:
        """Backward and update; returns the gradient norm before clipping (0 if not clipped)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = 0.0
        if self.grad_clip:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
        self.optimizer.step()
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def check_finite(loss: torch.Tensor, step: int, last_good: int | None, where: str) -> None:
    if not torch.isfinite(loss.detach()).all():
        kept = f"the last good checkpoint (step {last_good}) is kept" if last_good is not None else "no checkpoint was written yet"
        raise TrainingDiverged(f"{where}: loss became {float(loss.detach())} at step {step}; stopped, {kept}")


def cycle(loader: Iterable) -> Iterator:
    """Endless iteration over a loader, epoch after epoch (the sampler reshuffles each epoch)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise BDGFError("the data loader yielded no batch (empty dataset or shard)")
        epoch += 1
