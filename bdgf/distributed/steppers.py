"""The optimiser step inside each Ray Train worker: DeepSpeed, or DDP where DeepSpeed cannot run.

``choose_engine`` is the ONE place the choice is made (and logged); ``resolve_ds_config`` turns a
``bdgf/distributed/configs/deepspeed_*.json`` template into a concrete config for a world size and fails
before anything is launched when it does not fit; ``make_engine`` wraps the model and returns a
stepper with the same ``step(loss)`` interface as :class:`bdgf.engine.loop.TorchStepper`, so the
single-process loops (``pretrain_loop``, ``train_epochs``) run unchanged.

Precision is settled on the worker, for its own device (``resolve_precision``, called by
``make_engine``): ``bf16: auto`` is bf16 autocast on a CUDA device with native bf16 and fp32
elsewhere; ``bf16: true`` is bf16 autocast on any device (the CPU too); the losses and metrics
are computed in fp32 from the autocast outputs (``bdgf.diffusion.loss``, ``bdgf.losses``).

Failures: Ray Train's ``max_failures`` restarts the worker group after any worker error, a
deterministic one (a ValueError in the step) included: Ray Train 2.60 has no public way to mark an
error as not retryable, so such an error is raised ``max_failures + 1`` times before the run fails.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from bdgf.engine.loop import TorchStepper
from bdgf.errors import BDGFError
from bdgf.run import read_checkpoint, write_checkpoint

log = logging.getLogger("bdgf.distributed")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ENGINE_ENV = "BDGF_DISTRIBUTED_ENGINE"  # "deepspeed" (default) | "ddp"


class DistributedConfigError(BDGFError, ValueError):
    """A DeepSpeed config that does not fit the model, the batch or the world size."""


def choose_engine() -> str:
    """"deepspeed" unless it cannot be imported or BDGF_DISTRIBUTED_ENGINE=ddp; then "ddp"."""
    want = os.environ.get(ENGINE_ENV, "deepspeed").lower()
    if want not in ("deepspeed", "ddp"):
        raise DistributedConfigError(f"{ENGINE_ENV} must be 'deepspeed' or 'ddp', got {want!r}")
    if want == "ddp":
        log.warning("engine: DDP (%s=ddp)", ENGINE_ENV)
        return "ddp"
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means it cannot run here
        log.warning("engine: DDP fallback, DeepSpeed cannot be imported here (%s)", exc)
        return "ddp"
    log.info("engine: DeepSpeed %s", deepspeed.__version__)
    return "deepspeed"


def load_ds_template(stage: str, path: str | Path | None = None) -> dict:
    """The DeepSpeed JSON for ``stage`` ("pretrain" | "train"), or the file at ``path``."""
    p = Path(path) if path else CONFIG_DIR / f"deepspeed_{stage}.json"
    if not p.exists():
        raise DistributedConfigError(f"{p}: DeepSpeed config not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DistributedConfigError(f"{p}: not valid JSON ({exc})") from exc


def resolve_ds_config(template: dict, *, micro_batch: int, world_size: int, grad_clip: float | None,
                      cuda: bool | None = None, where: str = "DeepSpeed config") -> dict:
    """Fill the "auto" entries and check train_batch_size = micro × world_size × accumulation.

    micro_batch (the run config's batch_size) is per worker; "auto" entries are derived from it.
    ``bf16.enabled`` is checked (true, false or "auto") but left as written: precision depends on
    the device of the worker, not of the driver, and :func:`make_engine` settles it there
    (:func:`resolve_precision`). ``cuda`` is accepted for older callers and not used.
    """
    cfg = copy.deepcopy(template)
    tbs = cfg.get("train_batch_size", "auto")
    mb = cfg.get("train_micro_batch_size_per_gpu", "auto")
    acc = cfg.get("gradient_accumulation_steps", "auto")
    acc = 1 if acc == "auto" else acc
    for key, v in (("gradient_accumulation_steps", acc), ("train_micro_batch_size_per_gpu", mb),
                   ("train_batch_size", tbs)):
        if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DistributedConfigError(f"{where}: {key} must be a positive integer or \"auto\", got {v!r}")
    if mb == "auto":
        if tbs != "auto":
            if tbs % (world_size * acc):
                raise DistributedConfigError(
                    f"{where}: train_batch_size {tbs} is not divisible by world_size {world_size} × "
                    f"gradient_accumulation_steps {acc} = {world_size * acc}")
            mb = tbs // (world_size * acc)
        else:
            mb = micro_batch
    if tbs == "auto":
        tbs = mb * world_size * acc
    if tbs != mb * world_size * acc:
        raise DistributedConfigError(
            f"{where}: train_batch_size {tbs} != micro batch {mb} × world_size {world_size} × "
            f"gradient_accumulation_steps {acc} = {mb * world_size * acc}; fix the batch sizes or the "
            f"number of workers")
    cfg.update(train_batch_size=tbs, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=acc)
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(grad_clip or 0.0)
    stage = int(cfg.setdefault("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise DistributedConfigError(
            f"{where}: zero_optimization.stage {stage} is not supported (0, 1 or 2: the models fit one "
            f"device; stage 3 would need gathered weights for the plain checkpoint)")
    bf16 = cfg.setdefault("bf16", {})
    if not isinstance(bf16, dict):
        raise DistributedConfigError(f"{where}: bf16 must be an object like {{\"enabled\": \"auto\"}}, got {bf16!r}")
    bf16.setdefault("enabled", "auto")
    if bf16["enabled"] not in (True, False, "auto"):
        raise DistributedConfigError(f"{where}: bf16.enabled must be true, false or \"auto\", got {bf16['enabled']!r}")
    if stage > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)  # a plain torch AdamW (no JIT-built op)
    return cfg


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 autocast is worth it on ``device``: a CUDA device with native bf16 (Ampere and
    later). CPUs can run it (see ``resolve_precision``) but only when asked for."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(ds_config: dict, device: torch.device | str) -> dict:
    """``ds_config`` with its precision settled for ``device`` (the worker's own device).

    ``bf16.enabled``:
      "auto"  bf16 autocast where the device has native bf16 (CUDA, compute capability >= 8),
              else fp32 (every CPU, older GPUs);
      true    bf16 autocast on any device, CPU included (torch's CPU autocast);
      false   fp32.
    bf16 here is autocast (DeepSpeed's ``torch_autocast`` section: the engine's forward runs under
    ``torch.autocast(dtype=bfloat16)``, weights and optimiser stay fp32, and the losses are
    computed in fp32 from its bf16 outputs), never DeepSpeed's bf16 weights: those need bf16
    inputs, and the loops feed fp32 tensors (``F.conv2d`` refuses the mix). The ``bf16`` section
    handed to DeepSpeed is therefore always disabled. An explicit ``torch_autocast`` section is
    kept as written.
    """
    cfg = copy.deepcopy(ds_config)
    bf16 = cfg.get("bf16")
    bf16 = dict(bf16) if isinstance(bf16, dict) else {"enabled": "auto"}
    want = bf16.get("enabled", "auto")
    if want not in (True, False, "auto"):
        raise DistributedConfigError(f"bf16.enabled must be true, false or \"auto\", got {want!r}")
    use = bf16_supported(device) if want == "auto" else bool(want)
    cfg["bf16"] = {**bf16, "enabled": False}
    if use:
        cfg.setdefault("torch_autocast", {"enabled": True, "dtype": "bfloat16"})
    return cfg


def autocast_dtype(ds_config: dict) -> torch.dtype | None:
    """The autocast dtype a resolved config runs the forward in (None: fp32)."""
    ta = ds_config.get("torch_autocast") or {}
    if not ta.get("enabled", False):
        return None
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16}.get(str(ta.get("dtype", "bfloat16")), torch.bfloat16)


class DeepSpeedStepper:
    """``step(loss)`` through a DeepSpeed engine: engine.backward(loss); engine.step().

    Gradient clipping and accumulation are the engine's (from its config). ``state_dict`` gives the
    torch optimiser state only where it is the plain, unpartitioned one (ZeRO stage 0), so that a
    single-process ``bdgf pretrain --resume`` can read it; the full state lives in DeepSpeed's own
    checkpoint (``engine.save_checkpoint``) inside the Ray checkpoint.
    """

    def __init__(self, engine, optimizer: torch.optim.Optimizer):
        self.engine = engine
        self.optimizer = optimizer
        self.model = engine

    def step(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def state_dict(self) -> dict | None:
        if self.engine.zero_optimization_stage() == 0 and self.engine.world_size == 1:
            return {"optimizer": self.optimizer.state_dict()}
        return None

    def save(self, directory: Path) -> None:
        """Collective: every rank calls it and writes its own shard."""
        self.engine.save_checkpoint(str(directory), tag="ds")

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise BDGFError(f"{directory}: no DeepSpeed checkpoint could be loaded")


class DDPStepper(TorchStepper):
    """The fallback: torch DDP around the model, the plain TorchStepper step."""

    def save(self, directory: Path) -> None:
        if torch.distributed.get_rank() == 0:
            Path(directory).mkdir(parents=True, exist_ok=True)
            write_checkpoint({"model": self.model.module.state_dict(), **self.state_dict()}, Path(directory) / "ddp.pt")

    def load(self, directory: Path) -> None:
        state = read_checkpoint(Path(directory) / "ddp.pt", "DDP checkpoint")
        self.model.module.load_state_dict(state["model"])
        self.load_state_dict(state)


def make_engine(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
                device: torch.device):
    """(wrapped model, stepper) for ``kind`` ("deepspeed" | "ddp"); torch.distributed is already
    initialised by Ray Train (gloo on CPU, NCCL on GPU)."""
    model = model.to(device)
    if kind == "deepspeed":
        import deepspeed

        cfg = resolve_precision(ds_config, device)
        log.info("precision: %s on %s", autocast_dtype(cfg) or torch.float32, device)
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        return engine, DeepSpeedStepper(engine, optimizer)
    from torch.nn.parallel import DistributedDataParallel as DDP

    if autocast_dtype(resolve_precision(ds_config, device)) is not None:
        log.warning("precision: the DDP fallback runs fp32 (bf16 autocast is a DeepSpeed setting)")
    # find_unused_parameters: the mutual-learning projectors of a single-branch ablation get no gradient.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return ddp, DDPStepper(ddp, optimizer, ds_config.get("gradient_clipping") or None)
