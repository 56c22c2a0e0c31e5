"""Driver side of the distributed stages: checks before launch, Ray connection, TorchTrainer.

Everything that can be checked before workers start is checked in :func:`prepare_launch` (the
DeepSpeed batch sizes fit the world size, a resumable checkpoint belongs to this model and config,
the cluster answers), so bad input fails in seconds with nothing launched or lost. Ray Train's
own experiment folder (checkpoints, restart state) lives under ``RUN/ray/<name>`` unless
``storage`` names another (a shared file system or bucket on a multi-node cluster); the final
checkpoint's files are copied into the run directory, which ends up as a single process leaves it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import torch

from bdgf.distributed.faults import fault_from_env
from bdgf.distributed.steppers import DistributedConfigError, choose_engine, load_ds_template, resolve_ds_config
from bdgf.errors import BDGFError
from bdgf.run import Run, check_signature

log = logging.getLogger("bdgf.distributed")

MAX_FAILURES_ENV = "BDGF_MAX_FAILURES"


class ClusterUnreachable(BDGFError, ConnectionError):
    """The Ray cluster address does not answer."""


# ----------------------------------------------------------------------------------------
# Ray connection
# ----------------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    if address in ("auto", "local"):
        return None
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if not u.hostname:
        raise ClusterUnreachable(f"Ray cluster address {address!r} is not host:port or ray://host:port")
    return u.hostname, u.port or (10001 if u.scheme == "ray" else 6379)


def probe(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail within ``timeout_s``, naming the address, when a named cluster does not answer."""
    hp = _host_port(address) if address else None
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachable(
            f"Ray cluster at {address} does not answer ({exc}); is `ray start --head` running "
            f"there, and is the port open?") from None


def connect(address: str | None = None, timeout_s: float = 3.0) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS under ``ray job submit``), or start a
    local one. An address that does not answer fails within ``timeout_s`` naming it."""
    import ray

    probe(address, timeout_s)  # an address named explicitly is probed even when Ray is already up here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        probe(address, timeout_s)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


def run_tasks(fn: Callable, args: Sequence[tuple], *, address: str | None, what: str) -> list:
    """Run ``fn(*a)`` for each ``a`` as Ray tasks (one CPU, or one GPU where the driver has one)."""
    connect(address)
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if torch.cuda.is_available() else 0, max_retries=2)(fn)
    try:
        return ray.get([task.remote(*a) for a in args])
    except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error; keep its message
        raise BDGFError(f"distributed {what} failed (finished work is kept; rerun to resume): {exc}") from exc


# ----------------------------------------------------------------------------------------
# Checks before launch, then the TorchTrainer
# ----------------------------------------------------------------------------------------


def _latest_meta(experiment: Path) -> tuple[Path, dict] | None:
    """The newest BDGF checkpoint (by step/epoch) in a local Ray experiment folder."""
    best = None
    for m in experiment.glob("*/meta.json"):
        meta = json.loads(m.read_text())
        key = meta.get("step", meta.get("epoch", 0))
        if best is None or key > best[0]:
            best = (key, m.parent, meta)
    return (best[1], best[2]) if best else None


def _max_failures(value: int | None) -> int:
    return int(value if value is not None else os.environ.get(MAX_FAILURES_ENV, 3))


@dataclass
class Launch:
    """A checked distributed launch of one stage; :meth:`fit` runs it."""

    stage: str
    name: str  # Ray Train run name (the experiment folder under storage)
    workers: int
    address: str | None
    engine: str  # "deepspeed" | "ddp"
    ds_config: dict
    storage: str
    max_failures: int
    run_dir: str
    continuing: bool  # a checkpoint of this experiment exists: the job continues it
    fault: dict | None = field(default=None)

    @property
    def micro_batch(self) -> int:
        return int(self.ds_config["train_micro_batch_size_per_gpu"])

    def fit(self, body: Callable[[dict, object], None], job: dict, *, out_dir: Path) -> str:
        """Run ``body(job, RayContext)`` on every worker; copy the final checkpoint's files into
        ``out_dir``; return the checkpoint's path."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from bdgf.distributed.workers import run_body

        connect(self.address)
        log.warning("%s: %d workers, engine %s, train_batch_size %d%s", self.name, self.workers, self.engine,
                    self.ds_config["train_batch_size"], ", continuing from the last checkpoint" if self.continuing else "")
        out_dir = Path(out_dir)
        launch = {"engine": self.engine, "ds_config": self.ds_config, "run_dir": self.run_dir,
                  "stage_rel": str(out_dir.resolve().relative_to(Path(self.run_dir)))}
        cuda = torch.cuda.is_available()
        trainer = TorchTrainer(
            run_body,
            train_loop_config={"body": body, "job": {**job, "fault": self.fault}, "launch": launch},
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=cuda),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            run_config=RayRunConfig(name=self.name, storage_path=self.storage,
                                    failure_config=FailureConfig(max_failures=self.max_failures),
                                    checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; keep its message
            raise BDGFError(f"distributed run {self.name!r} failed: {exc}") from exc
        if getattr(result, "error", None):
            raise BDGFError(f"distributed run {self.name!r} failed: {result.error}")
        if result.checkpoint is None:
            raise BDGFError(f"distributed run {self.name!r} finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            adopt_checkpoint_files(Path(d), out_dir)
        return str(result.checkpoint.path)


def adopt_checkpoint_files(src: Path, dst: Path) -> list[str]:
    """Copy a Ray checkpoint's BDGF files (all but meta.json and the engine's shards) into the
    run's stage folder, each atomically."""
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name != "meta.json":
            tmp = dst / f".{p.name}.tmp"
            shutil.copy(p, tmp)
            os.replace(tmp, dst / p.name)
            copied.append(p.name)
    return copied


def prepare_launch(stage: str, run: Run, *, name: str, workers: int, address: str | None, micro_batch: int,
                   grad_clip: float | None, ds_config: str | None, storage: str | None,
                   max_failures: int | None, signature: dict, fresh: bool = False) -> Launch:
    """Check everything a launch needs before anything is written: the worker count, the
    DeepSpeed config against it, the cluster address, and a resumable checkpoint of ``name``
    against ``signature``. ``fresh`` drops that experiment's old checkpoints (``--overwrite``)."""
    if workers < 1:
        raise DistributedConfigError(f"--workers must be >= 1, got {workers}")
    kind = choose_engine()
    where = ds_config or f"bdgf/distributed/configs/deepspeed_{stage}.json"
    ds = resolve_ds_config(load_ds_template(stage, ds_config), micro_batch=micro_batch, world_size=workers,
                           grad_clip=grad_clip, cuda=torch.cuda.is_available(), where=where)
    probe(address)
    storage = storage or str(run.ray_storage())
    continuing = False
    if "://" not in storage:  # remote storage: the workers check what they restore
        experiment = Path(storage) / name
        if fresh:
            shutil.rmtree(experiment, ignore_errors=True)
        found = _latest_meta(experiment)
        if found is not None:
            check_signature(found[1].get("signature", {}), signature, str(found[0]))
            continuing = True
    return Launch(stage=stage, name=name, workers=workers, address=address, engine=kind, ds_config=ds,
                  storage=storage, max_failures=_max_failures(max_failures), run_dir=str(run.path.resolve()),
                  continuing=continuing, fault=fault_from_env())
