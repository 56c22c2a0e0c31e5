"""Pieces shared by the training loops: the optimiser step, divergence, batch cycling, the RNG
state a checkpoint carries, and the single-process context a stage body runs in."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from bdgf.errors import BDGFError
from bdgf.run import JsonlLogger, write_checkpoint


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


def rng_state(generators: dict[str, torch.Generator] | None = None, **extra) -> dict:
    """Every random stream a resumed run must continue exactly: torch's (CPU and, where used,
    CUDA), numpy's, python's, and the loop's own ``generators``; ``extra`` (e.g. ``world``)
    is stored beside them."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items() if g is not None}, **extra}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what :func:`rng_state` saved (a generator the state lacks is left as it is)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if g is not None and name in state.get("generators", {}):
            g.set_state(state["generators"][name])


def restored_stream(batches: Iterable, restore) -> Iterator:
    """Pass ``batches`` through, calling ``restore()`` (e.g. putting back the RNG state of a
    checkpoint) right after the first batch is fetched: creating a DataLoader's iterator draws its
    base seed from torch's RNG, which the uninterrupted run did at its start, not here."""
    it = iter(batches)
    first = next(it)
    restore()
    yield first
    yield from it


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


class LocalContext:
    """Where a stage body runs when it is a plain single process: rank 0 of 1, the plain
    :class:`TorchStepper`, checkpoints written straight into the stage's folder of the run.

    The distributed twin is :class:`bdgf.distributed.workers.RayContext` (same attributes and
    methods); a stage body (``pretrain_body``, ``train_body``) is written once against both.
    """

    rank = 0
    world = 1
    engine = "torch"
    where = "single process"

    def __init__(self, out_dir: str | Path, device: str | torch.device = "cpu", progress: bool = False):
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.progress = progress

    def make_stepper(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None):
        """(model to call, stepper)."""
        model = model.to(self.device)
        return model, TorchStepper(model, optimizer, grad_clip)

    def optimizer_state(self, stepper, model) -> dict | None:
        """The stepper's plain optimiser state (for ``denoiser.pt``)."""
        return stepper.state_dict()

    def load_optimizer_state(self, stepper, model, plain: dict) -> bool:
        """Load a plain optimiser state into the stepper (True) when it has one."""
        if not (plain or {}).get("optimizer"):
            return False
        stepper.load_state_dict(plain)
        return True

    def gather(self, obj) -> list:
        """Every rank's ``obj``: here only this one."""
        return [obj]

    def restore(self, signature: dict) -> tuple[Path | None, dict | None]:
        """A single process has no checkpoint service to resume from (``--resume`` reads the
        run's own files instead): always (None, None)."""
        return None, None

    def logger(self, name: str, restored: str = "", append: bool = False) -> JsonlLogger:
        path = self.out_dir / name
        if restored:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(restored)
            append = True
        return JsonlLogger(path, append=append)

    def checkpoint(self, tag: str, metrics: dict, files: dict, meta: dict, stepper=None,
                   rank_state: dict | None = None) -> None:
        """Write each of ``files`` {name: checkpoint dict} into the stage folder (atomically); the
        one rank's RNG state travels inside them."""
        for name, obj in files.items():
            if obj is not None:
                write_checkpoint(obj, self.out_dir / name)

    def note_restart(self, record: dict) -> None:  # pragma: no cover - never restarts
        pass
