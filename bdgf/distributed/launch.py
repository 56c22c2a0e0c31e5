"""Driver side of the distributed stages: checks before launch, Ray connection, TorchTrainer.

Everything that can be checked before workers start is checked in :func:`prepare_launch` (the
DeepSpeed batch sizes fit the world size, the device asked for exists in the cluster, a resumable
checkpoint belongs to this model, config and job, the cluster answers), so bad input fails in
seconds with nothing launched or lost. Ray Train's own experiment folder (checkpoints, restart
state) lives under ``RUN/ray/<name>`` unless ``storage`` names another (a shared file system or
bucket on a multi-node cluster); the final checkpoint's files are copied into the run directory,
which ends up as a single process leaves it.

Where the work runs decides the device, never the driver: :func:`choose_device` reads the
cluster's resources (``ray.cluster_resources()``), or this machine's for a single process.

A run's identity (:func:`run_identity`: run directory, store(s), world size, stage folder) is in
the Ray run name (:func:`experiment_name`, ``<stage>-r<hash of run dir>-i<hash of identity>``) and
in the resume signature, so two jobs sharing a ``storage`` never continue each other's
checkpoints, and an unfinished checkpoint of this run made by another job (other store, other
world size) is refused before launch, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence
from urllib.parse import urlparse

import torch

from bdgf.distributed.faults import fault_from_env
from bdgf.distributed.steppers import DistributedConfigError, choose_engine, load_ds_template, resolve_ds_config
from bdgf.errors import BDGFError
from bdgf.run import CheckpointMismatch, Run, check_signature

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


def cluster_resources(address: str | None) -> dict:
    """The Ray cluster's total resources ({"CPU": 16.0, "GPU": 4.0, ...}), connecting first."""
    connect(address)
    import ray

    return dict(ray.cluster_resources())


def run_tasks(fn: Callable, args: Sequence[tuple], *, address: str | None, what: str, device: str = "cpu") -> list:
    """Run ``fn(*a)`` for each ``a`` as Ray tasks: one CPU each, plus one GPU each when
    ``device`` is "gpu" (see :func:`choose_device`; the driver's own device plays no part)."""
    connect(address)
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if device == "gpu" else 0, max_retries=2)(fn)
    try:
        return ray.get([task.remote(*a) for a in args])
    except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error; keep its message
        raise BDGFError(f"distributed {what} failed (finished work is kept; rerun to resume): {exc}") from exc


# ----------------------------------------------------------------------------------------
# Device: decided from where the work runs
# ----------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "gpu")


class DeviceChoice(NamedTuple):
    device: str  # "cpu" | "gpu"
    reason: str  # why, e.g. "cluster has no GPU"


def _resources_text(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] or sorted(resources)[:4]
    return ", ".join(f"{k} {float(resources[k]):g}" for k in keys) or "none"


def choose_device(requested: str | None, resources: dict, *, workers: int = 1, where: str = "cluster") -> DeviceChoice:
    """Where the work runs decides: "gpu" when asked for (refused when ``where`` has fewer GPUs
    than ``workers``, one each) or, on "auto", when ``resources`` (``ray.cluster_resources()``, or
    {"GPU": n} of this machine) holds a GPU for every worker; else "cpu". ``reason`` says why."""
    req = (requested or "auto").lower()
    if req not in DEVICES:
        raise BDGFError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    gpus = float(resources.get("GPU", 0) or 0)
    need = max(int(workers), 1)
    place = "the Ray cluster" if where == "cluster" else where
    if req == "cpu":
        return DeviceChoice("cpu", "requested with --device cpu")
    if req == "gpu":
        if gpus < 1:
            raise BDGFError(f"--device gpu: {place} has no GPU (resources: {_resources_text(resources)}); "
                            "use --device cpu, or auto, or add GPU nodes first")
        if gpus < need:
            raise BDGFError(f"--device gpu: {place} has {gpus:g} GPU(s) but {need} workers need one each; "
                            "use fewer --workers or add GPU nodes")
        return DeviceChoice("gpu", f"requested with --device gpu ({where} has {gpus:g} GPU(s))")
    if gpus < 1:
        return DeviceChoice("cpu", f"{where} has no GPU")
    if gpus < need:
        return DeviceChoice("cpu", f"{where} has {gpus:g} GPU(s), fewer than the {need} workers (one each)")
    return DeviceChoice("gpu", f"{where} has {gpus:g} GPU(s)")


def local_device(requested: str | None) -> DeviceChoice:
    """The device of a plain single process here: this machine's GPUs decide."""
    return choose_device(requested, {"GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0},
                         where="this machine")


def cluster_device(requested: str | None, address: str | None, workers: int = 1) -> DeviceChoice:
    """The device of Ray workers/tasks: the cluster's resources decide (logged)."""
    choice = choose_device(requested, cluster_resources(address), workers=workers, where="cluster")
    log.warning("device: %s (%s)", choice.device, choice.reason)
    return choice


# ----------------------------------------------------------------------------------------
# Run identity: which job a Ray experiment belongs to
# ----------------------------------------------------------------------------------------


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def run_identity(run_dir: str | Path, stores: Sequence[str | Path], world_size: int, out: str = "") -> dict:
    """What makes a distributed job *this* job: its run directory, its store(s), its world size
    and the stage folder it fills (``out``, relative to the run directory)."""
    return {"run_dir": str(Path(run_dir).resolve()), "stores": [str(Path(s).resolve()) for s in stores],
            "world_size": int(world_size), "out": str(out)}


def experiment_name(base: str, identity: dict) -> str:
    """The Ray run name: ``<base>-r<hash of the run dir>-i<hash of the whole identity>``."""
    return f"{base}-r{_hash(identity['run_dir'])}-i{_hash(identity)}"


def _describe(identity: dict, out: bool = False) -> str:
    stores = identity.get("stores", [])
    n = identity.get("world_size")
    what = f"store{'s' if len(stores) != 1 else ''} {', '.join(stores)} with {n} worker{'s' if n != 1 else ''}"
    return f"{what} (into {identity.get('out') or 'the run'})" if out else what


def _filesystem(storage: str):
    """(pyarrow filesystem, root path) of a Ray Train storage path or URI (the same as Ray's)."""
    import pyarrow.fs as pafs

    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), str(Path(storage).resolve())


def _children(fs, path: str) -> list:
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, FileNotFoundError):
        return []


def _latest_meta(fs, experiment: str) -> tuple[str, dict] | None:
    """The newest BDGF checkpoint (by step/epoch) in a Ray experiment folder: (path, meta)."""
    import pyarrow.fs as pafs

    best = None
    for info in _children(fs, experiment):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/meta.json") as f:
                meta = json.loads(f.read().decode())
        except (OSError, FileNotFoundError, ValueError):
            continue
        key = meta.get("step", meta.get("epoch", 0))
        if best is None or key > best[0]:
            best = (key, info.path, meta)
    return (best[1], best[2]) if best else None


def run_experiments(storage: str, run_dir: str | Path, base: str | None = None) -> list[str]:
    """Names of the Ray experiments in ``storage`` that belong to the run at ``run_dir`` (of the
    stage ``base``, or of every stage)."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(storage)
    tag = f"-r{_hash(str(Path(run_dir).resolve()))}-i"
    names = []
    for info in _children(fs, root):
        name = info.base_name
        if info.type == pafs.FileType.Directory and tag in name and re.fullmatch(r".+-r[0-9a-f]{10}-i[0-9a-f]{10}", name):
            if base is None or name.rsplit(tag, 1)[0] == base:
                names.append(name)
    return sorted(names)


def clear_run_storage(storage: str, run_dir: str | Path) -> list[str]:
    """``--overwrite``: remove every Ray experiment of this run from ``storage`` (local or remote)."""
    fs, root = _filesystem(storage)
    gone = run_experiments(storage, run_dir)
    for name in gone:
        fs.delete_dir(f"{root}/{name}")
    if gone:
        log.warning("removed this run's old Ray experiments from %s: %s", storage, ", ".join(gone))
    return gone


def check_other_jobs(storage: str, base: str, identity: dict, name: str, hint: str) -> None:
    """Refuse when ``storage`` holds an unfinished checkpoint of this run (same run dir, same
    stage) made by another job: other store(s), world size or stage folder."""
    fs, root = _filesystem(storage)
    for other in run_experiments(storage, identity["run_dir"], base):
        if other == name:
            continue
        found = _latest_meta(fs, f"{root}/{other}")
        if found is None or found[1].get("final"):
            continue  # nothing to continue, or a finished job whose files are already in the run
        have = found[1].get("signature", {}).get("identity") or {}
        if have == identity:
            continue
        out = have.get("out") != identity.get("out")
        raise CheckpointMismatch(
            f"checkpoint in {storage.rstrip('/')}/{other} was made for {_describe(have, out)}; this job: "
            f"{_describe(identity, out)}; {hint}")


# ----------------------------------------------------------------------------------------
# Checks before launch, then the TorchTrainer
# ----------------------------------------------------------------------------------------


def _max_failures(value: int | None) -> int:
    return int(value if value is not None else os.environ.get(MAX_FAILURES_ENV, 3))


@dataclass
class Launch:
    """A checked distributed launch of one stage; :meth:`fit` runs it."""

    stage: str
    name: str  # Ray Train run name (the experiment folder under storage), with the job's identity hash
    workers: int
    address: str | None
    engine: str  # "deepspeed" | "ddp"
    ds_config: dict
    storage: str
    max_failures: int
    run_dir: str
    continuing: bool  # a checkpoint of this experiment exists: the job continues it
    fault: dict | None = field(default=None)
    device: str = "cpu"  # "cpu" | "gpu": what the workers train on (chosen from the cluster)
    device_reason: str = ""
    signature: dict = field(default_factory=dict)  # the resume signature, identity included

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
        log.warning("%s: %d workers on %s (%s), engine %s, train_batch_size %d%s", self.name, self.workers,
                    self.device, self.device_reason, self.engine, self.ds_config["train_batch_size"],
                    ", continuing from the last checkpoint" if self.continuing else "")
        out_dir = Path(out_dir)
        try:
            stage_rel = str(out_dir.resolve().relative_to(Path(self.run_dir)))
        except ValueError:  # an output folder outside the run: workers use its absolute path
            stage_rel = str(out_dir.resolve())
        launch = {"engine": self.engine, "ds_config": self.ds_config, "run_dir": self.run_dir,
                  "stage_rel": stage_rel, "device": self.device}
        gpu = self.device == "gpu"
        trainer = TorchTrainer(
            run_body,
            train_loop_config={"body": body, "job": {**job, "fault": self.fault}, "launch": launch},
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=gpu),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
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


#: files of a Ray checkpoint that stay there: its metadata and every rank's own RNG state
KEPT_IN_CHECKPOINT = re.compile(r"meta\.json|rng_rank\d+\.pt")


def adopt_checkpoint_files(src: Path, dst: Path) -> list[str]:
    """Copy a Ray checkpoint's BDGF files (all but meta.json, the per-rank RNG states and the
    engine's shards) into the run's stage folder, each atomically."""
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and not KEPT_IN_CHECKPOINT.fullmatch(p.name):
            tmp = dst / f".{p.name}.tmp"
            shutil.copy(p, tmp)
            os.replace(tmp, dst / p.name)
            copied.append(p.name)
    return copied


def prepare_launch(stage: str, run: Run, *, name: str, workers: int, address: str | None, micro_batch: int,
                   grad_clip: float | None, ds_config: str | None, storage: str | None,
                   max_failures: int | None, signature: dict, fresh: bool = False,
                   stores: Sequence[str] = (), out: str = "", device: str | None = "auto",
                   hint: str = "use --overwrite or another --storage") -> Launch:
    """Check everything a launch needs before anything is written: the worker count, the
    DeepSpeed config against it, the cluster address and its devices, and the checkpoints in
    ``storage``: one of this very job (``name`` + the identity hash) must match ``signature``, one
    of this run made by another job is refused. ``fresh`` (``--overwrite``) first removes every
    Ray experiment of this run from the storage, local or remote."""
    if workers < 1:
        raise DistributedConfigError(f"--workers must be >= 1, got {workers}")
    kind = choose_engine()
    where = ds_config or f"bdgf/distributed/configs/deepspeed_{stage}.json"
    # batch sizes against the world size, before connecting anywhere (precision is settled on the worker)
    ds = resolve_ds_config(load_ds_template(stage, ds_config), micro_batch=micro_batch, world_size=workers,
                           grad_clip=grad_clip, where=where)
    if (device or "auto").lower() not in DEVICES:
        raise BDGFError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    probe(address)
    choice = cluster_device(device, address, workers)
    storage = storage or str(run.ray_storage())
    if "://" not in storage:
        storage = str(Path(storage).resolve())  # Ray Train wants it absolute; so do the checks below
    identity = run_identity(run.path, stores, workers, out)
    signature = {**signature, "identity": identity}
    base, name = name, experiment_name(name, identity)
    if fresh:
        clear_run_storage(storage, run.path)
    check_other_jobs(storage, base, identity, name, hint)
    continuing = False
    fs, root = _filesystem(storage)
    found = _latest_meta(fs, f"{root}/{name}")
    if found is not None:
        check_signature(found[1].get("signature", {}), signature, found[0])
        continuing = True
    return Launch(stage=stage, name=name, workers=workers, address=address, engine=kind, ds_config=ds,
                  storage=storage, max_failures=_max_failures(max_failures), run_dir=str(run.path.resolve()),
                  continuing=continuing, fault=fault_from_env(), device=choice.device,
                  device_reason=choice.reason, signature=signature)
