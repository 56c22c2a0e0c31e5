"""Driver side of the distributed stages: checks, Ray connection, TorchTrainer, final files.

Everything that can be checked before workers start is checked here (stores readable and of one
band layout, DeepSpeed batch sizes fit the world size, a resumed checkpoint belongs to this model
and config, the cluster answers), so bad input fails in seconds with nothing launched or lost.
The run directory ends up exactly as the single-process path leaves it (``pretrain/denoiser.pt``,
``pretrain/log.jsonl``, ``train/seed<k>/classifier.pt`` ...); Ray Train's own experiment folder
(checkpoints, restart state) lives under ``RUN/ray/<name>`` unless ``storage`` names another
(a shared file system or bucket on a multi-node cluster).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch

from bdgf.config import RunConfig
from bdgf.errors import BDGFError
from bdgf.run import Run, atomic_save, read_jsonl
from training.engine import DistributedConfigError, choose_engine, load_ds_template, resolve_ds_config
from training.workers import check_signature, open_stores

log = logging.getLogger("bdgf.distributed")

FAULT_ENV = "BDGF_FAULT_INJECT"  # "STEP:MARKER_PATH[:RANK]" kill a worker once (tests, benchmark)
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


def _probe(address: str, timeout_s: float) -> None:
    hp = _host_port(address)
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

    if address:  # an address named explicitly is probed even when Ray is already up here
        _probe(address, timeout_s)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe(address, timeout_s)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


# ----------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------


def _fault_from_env() -> dict | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    return {"step": int(parts[0]), "marker": parts[1], "rank": int(parts[2]) if len(parts) > 2 else 1}


def _max_failures(value: int | None) -> int:
    return int(value if value is not None else os.environ.get(MAX_FAILURES_ENV, 3))


def _latest_meta(experiment: Path) -> tuple[Path, dict] | None:
    """The newest BDGF checkpoint (by step/epoch) in a local Ray experiment folder."""
    best = None
    for m in experiment.glob("*/meta.json"):
        meta = json.loads(m.read_text())
        key = meta.get("step", meta.get("epoch", 0))
        if best is None or key > best[0]:
            best = (key, m.parent, meta)
    return (best[1], best[2]) if best else None


def _storage(run: Run, storage: str | None) -> str:
    return storage or str((run.path / "ray").resolve())


def _precheck_resume(storage: str, name: str, signature: dict) -> bool:
    """Check the newest checkpoint of a local experiment against this run; True if one exists."""
    if "://" in storage:
        return False  # remote storage: the workers check it
    found = _latest_meta(Path(storage) / name)
    if found is None:
        return False
    check_signature(found[1].get("signature", {}), signature, str(found[0]))
    return True


def _fit(worker, loop_config: dict, *, workers: int, name: str, storage: str, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = torch.cuda.is_available()
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cuda),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=RayRunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; keep its message
        raise BDGFError(f"distributed run {name!r} failed: {exc}") from exc
    if getattr(result, "error", None):
        raise BDGFError(f"distributed run {name!r} failed: {result.error}")
    if result.checkpoint is None:
        raise BDGFError(f"distributed run {name!r} finished without a checkpoint")
    return result


def _ds_config(stage: str, micro: int, workers: int, grad_clip: float, ds_config: str | None) -> tuple[str, dict]:
    if workers < 1:
        raise DistributedConfigError(f"--workers must be >= 1, got {workers}")
    kind = choose_engine()
    where = ds_config or f"training/configs/deepspeed_{stage}.json"
    cfg = resolve_ds_config(load_ds_template(stage, ds_config), micro_batch=micro, world_size=workers,
                            grad_clip=grad_clip, cuda=torch.cuda.is_available(), where=where)
    return kind, cfg


# ----------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------


def pretrain_signature(cfg, names: list[str], bands: list[int]) -> dict:
    from bdgf.engine.pretrain import build_denoiser

    model, _, _ = build_denoiser(cfg, bands)
    return {"stage": "pretrain", "unet_config": json.loads(json.dumps(asdict(model.config))),
            "modalities": list(names), "bands": list(bands), "schedule": dict(cfg.schedule),
            "masking": dict(cfg.masking), "loss_kind": cfg.loss_kind, "tile_size": cfg.tile_size,
            "seed": cfg.seed}


def distributed_pretrain(store: str | Path | Sequence[str | Path], out: str | Path, cfg: RunConfig | None = None, *,
                         workers: int, address: str | None = None, resume: bool = False, overwrite: bool = False,
                         storage: str | None = None, max_failures: int | None = None,
                         ds_config: str | None = None) -> dict:
    """Stage 1 over ``workers`` Ray Train workers; same run dir and summary as ``pretrain``.

    A job restarted with the same run dir (same Ray experiment name and storage) continues from
    its last checkpoint; ``resume`` continues a finished or single-process run from denoiser.pt.
    """
    stores = [str(Path(s).resolve()) for s in ([store] if isinstance(store, (str, os.PathLike)) else store)]
    scenes = open_stores(stores, where="driver")
    run = Run(out)
    storage = _storage(run, storage)
    name = "pretrain"
    init_from = None
    if resume and run.denoiser_path.exists():
        run.check_scene(scenes[0])
        config = run.config()
    elif run.denoiser_path.exists() and not overwrite:
        raise BDGFError(f"{run.path}: already holds a pretrained run (pass --resume to continue, --overwrite to start over)")
    else:
        config = cfg or (run.config() if run.config_path.exists() and not overwrite else RunConfig())
    pc = config.pretrain
    names = scenes[0].modality_names
    bands = [scenes[0].bands[n] for n in names]
    signature = pretrain_signature(pc, names, bands)
    kind, ds = _ds_config("pretrain", pc.batch_size, workers, pc.grad_clip, ds_config)
    if address:
        _probe(address, 3.0)  # before anything is written
    if overwrite and "://" not in storage:
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
    continuing = _precheck_resume(storage, name, signature)
    if resume and run.denoiser_path.exists() and not continuing:
        init_from = str(run.denoiser_path.resolve())
    if continuing or (resume and run.denoiser_path.exists()):
        run.check_scene(scenes[0])
        config.save(run.config_path)
    else:
        run.create(scenes[0], config, overwrite=overwrite)
    run.record("stores", stores)
    connect(address)
    log.warning("pretrain: %d workers, engine %s, train_batch_size %d%s", workers, kind, ds["train_batch_size"],
                ", continuing from the last checkpoint" if continuing else "")
    loop = {"stores": stores, "run_dir": str(run.path.resolve()), "run_config": config.to_dict(),
            "ds_config": ds, "engine": kind, "signature": signature, "init_from": init_from,
            "fault": _fault_from_env()}
    from training.workers import pretrain_worker

    t0 = time.perf_counter()
    result = _fit(pretrain_worker, loop, workers=workers, name=name, storage=storage, max_failures=_max_failures(max_failures))
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        ckpt = torch.load(d / "denoiser.pt", map_location="cpu", weights_only=False)
        atomic_save(ckpt, run.denoiser_path)
        if (d / "log.jsonl").exists():
            shutil.copy(d / "log.jsonl", run.stage_dir("pretrain") / "log.jsonl")
    records = read_jsonl(run.path / "pretrain" / "log.jsonl") if (run.path / "pretrain" / "log.jsonl").exists() else []
    try:
        from bdgf.plots import plot_pretrain_curves

        plot_pretrain_curves(records, run.path / "pretrain" / "curves.png")
    except Exception as exc:  # noqa: BLE001 - a plot never fails a finished run
        log.warning("pretrain curves not drawn: %s", exc)
    last = records[-1] if records else {}
    summary = {
        "steps": int(ckpt["step"]),
        "final_loss": last.get("loss"),
        "loss_per_modality": {n: last.get(f"loss/{n}") for n in names},
        "p_mask": {n: last.get(f"p_mask/{n}") for n in names},
        "most_masked": max(names, key=lambda n: last.get(f"p_mask/{n}") or 0.0) if last else None,
        "wall_s": wall,
        "tiles_per_s": last.get("global_tiles_per_s"),
        "workers": workers,
        "engine": kind,
        "checkpoint": str(result.checkpoint.path),
    }
    run.record("pretrain", summary)
    return summary


# ----------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------


def distributed_features(store: str | Path, run_dir: str | Path, *, workers: int, address: str | None = None,
                         batch_size: int | None = None) -> dict:
    """Dense features with ``workers`` Ray tasks over disjoint tile sets; same result as
    ``compute_features``. The driver prepares the store and marks it complete."""
    from bdgf.diffusion.features import feature_tiles, mark_complete, prepare_store
    from bdgf.engine.features import feature_spec
    from bdgf.engine.pretrain import load_denoiser
    from bdgf.run import state_hash

    if workers < 1:
        raise DistributedConfigError(f"--workers must be >= 1, got {workers}")
    if address:
        _probe(address, 3.0)
    store = str(Path(store).resolve())
    scene = open_stores([store], where="driver")[0]
    run = Run(run_dir)
    run.check_scene(scene)
    cfg = run.config().features
    model, schedule, ckpt = load_denoiser(run.denoiser_path)
    spec = feature_spec(cfg, state_hash(ckpt["model"]), model.config.tile_multiple)
    channels = spec.channels(model)
    t0 = time.perf_counter()
    state = prepare_store(store, scene, spec, channels)
    if state != "reuse":
        connect(address)
        import ray

        tiles = feature_tiles(scene, spec)
        parts = [p for p in (tiles[i::workers] for i in range(workers)) if len(p)]  # disjoint, balanced
        denoiser = ray.put({k: ckpt[k] for k in ("model", "unet_config", "schedule")})
        from training.workers import feature_task

        task = ray.remote(num_cpus=1, num_gpus=1 if torch.cuda.is_available() else 0, max_retries=2)(feature_task)
        try:
            ray.get([task.remote(store, denoiser, spec.as_dict(), p.tolist(), batch_size or cfg.batch_size) for p in parts])
        except Exception as exc:  # noqa: BLE001
            raise BDGFError(f"distributed features failed (finished tiles are kept; rerun to resume): {exc}") from exc
        if not mark_complete(store):
            raise BDGFError(f"{store}: some feature tiles are still missing after the workers finished; rerun to resume")
    wall = time.perf_counter() - t0
    h, w = scene.shape
    return {"state": state, "checkpoint": spec.checkpoint, "channels": channels, "wall_s": wall,
            "pixels_per_s": (h * w / wall) if state != "reuse" else None, "workers": workers}


# ----------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------


def distributed_train(store: str | Path, run_dir: str | Path, *, seed: int | None = None, overrides: dict | None = None,
                      workers: int, address: str | None = None, storage: str | None = None,
                      max_failures: int | None = None, ds_config: str | None = None) -> dict:
    """Stage 2 (one seed) over ``workers`` Ray Train workers; writes ``train/seed<k>/`` as ``train``."""
    from bdgf.engine.classify import _features_ready, build_classifier, seed_dir

    store = str(Path(store).resolve())
    scene = open_stores([store], where="driver")[0]
    run = Run(run_dir)
    run.check_scene(scene)
    config = run.config()
    if overrides:
        config = config.with_overrides(overrides)
    tc = config.train
    seed = tc.seed if seed is None else int(seed)
    feature_channels = _features_ready(store)
    kind, ds = _ds_config("train", tc.batch_size, workers, tc.grad_clip, ds_config)
    if address:
        _probe(address, 3.0)
    model, _ = build_classifier(tc, scene.total_bands, feature_channels, scene.num_classes)
    signature = {"stage": "train", "classifier_config": json.loads(json.dumps(model.config.to_dict())),
                 "seed": seed, "lr": tc.lr, "weight_decay": tc.weight_decay}
    del model
    storage = _storage(run, storage)
    name = f"train-seed{seed}"
    _precheck_resume(storage, name, signature)
    val_split = "val" if "val" in scene.splits else "train"
    out = seed_dir(run, seed)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    connect(address)
    loop = {"store": store, "run_dir": str(run.path.resolve()), "run_config": config.to_dict(), "seed": seed,
            "ds_config": ds, "engine": kind, "signature": signature, "feature_channels": feature_channels,
            "val_split": val_split}
    from training.workers import train_worker

    t0 = time.perf_counter()
    result = _fit(train_worker, loop, workers=workers, name=name, storage=storage, max_failures=_max_failures(max_failures))
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        st = torch.load(d / "train_state.pt", map_location="cpu", weights_only=False)
        if (d / "classifier.pt").exists():
            shutil.copy(d / "classifier.pt", out / ".classifier.pt.tmp")
            os.replace(out / ".classifier.pt.tmp", out / "classifier.pt")
        if (d / "log.jsonl").exists():
            shutil.copy(d / "log.jsonl", out / "log.jsonl")
    try:
        from bdgf.plots import plot_train_curves

        plot_train_curves(read_jsonl(out / "log.jsonl"), out / "curves.png")
    except Exception as exc:  # noqa: BLE001
        log.warning("train curves not drawn: %s", exc)
    summary = {"seed": seed, **st["best"], "wall_s": time.perf_counter() - t0, "branches": list(tc.branches),
               "workers": workers, "engine": kind}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------
# Script entry points (training/pretrain.py, features.py, train.py)
# ----------------------------------------------------------------------------------------


def _parser(what: str):
    import argparse

    p = argparse.ArgumentParser(description=what)
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return p


def _run(fn) -> int:
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        fn()
        return 0
    except BDGFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _overrides(pairs: list[str] | None) -> dict:
    import yaml

    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise BDGFError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def main_pretrain(argv: list[str] | None = None) -> int:
    p = _parser("BDGF stage 1 (denoiser pretraining) on Ray Train + DeepSpeed")
    p.add_argument("--store", action="append", required=True, help="scene store (repeat for several scenes)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", default=None, help="YAML run config")
    p.add_argument("--set", action="append", dest="set_", help="override, e.g. pretrain.steps=200")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--storage", default=None, help="Ray Train storage path (default RUN/ray)")
    p.add_argument("--max-failures", type=int, default=None)
    p.add_argument("--deepspeed-config", default=None)
    a = p.parse_args(argv)

    def go():
        cfg = RunConfig.load(a.config) if a.config else RunConfig()
        if a.set_:
            cfg = cfg.with_overrides(_overrides(a.set_))
        s = distributed_pretrain(a.store, a.out, cfg, workers=a.workers, address=a.address, resume=a.resume,
                                 overwrite=a.overwrite, storage=a.storage, max_failures=a.max_failures,
                                 ds_config=a.deepspeed_config)
        mods = ", ".join(f"{n}: loss {s['loss_per_modality'][n]:.4f} p_mask {s['p_mask'][n]:.2f}" for n in s["loss_per_modality"])
        print(f"pretrained {s['steps']} steps on {s['workers']} workers ({s['engine']}), loss {s['final_loss']:.4f} "
              f"({mods}); most masked: {s['most_masked']}; {s['tiles_per_s']:.1f} tiles/s; {s['wall_s']:.1f} s")

    return _run(go)


def main_features(argv: list[str] | None = None) -> int:
    p = _parser("BDGF dense diffusion features over Ray tasks")
    p.add_argument("--store", required=True)
    p.add_argument("--run", required=True)
    a = p.parse_args(argv)

    def go():
        s = distributed_features(a.store, a.run, workers=a.workers, address=a.address)
        print(f"features {s['state']} for checkpoint {s['checkpoint']}: {s['channels']} ({s['wall_s']:.1f} s)")

    return _run(go)


def main_train(argv: list[str] | None = None) -> int:
    p = _parser("BDGF stage 2 (classifier) on Ray Train + DeepSpeed")
    p.add_argument("--store", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    p.add_argument("--set", action="append", dest="set_", help="override, e.g. train.epochs=5")
    p.add_argument("--storage", default=None)
    p.add_argument("--max-failures", type=int, default=None)
    p.add_argument("--deepspeed-config", default=None)
    a = p.parse_args(argv)

    def go():
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [None]
        for seed in seeds:
            r = distributed_train(a.store, a.run, seed=seed, overrides=_overrides(a.set_), workers=a.workers,
                                  address=a.address, storage=a.storage, max_failures=a.max_failures,
                                  ds_config=a.deepspeed_config)
            print(f"seed {r['seed']}: best val OA {r['val_oa']:.4f} at epoch {r['epoch']} ({r['workers']} workers, {r['engine']})")

    return _run(go)
