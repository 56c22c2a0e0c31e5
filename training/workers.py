"""What runs inside each Ray Train worker (and each feature task).

Every worker opens its own shard straight from the Zarr store(s) by path: nothing scene-sized goes
through the driver or the object store. The loops are the single-process ones
(``bdgf.engine.pretrain.pretrain_loop``, ``bdgf.engine.classify.train_epochs``); only the stepper,
the masking statistics (gathered over ranks) and the checkpoint callbacks differ.

A checkpoint directory (one per report, merged from all ranks by Ray Train) holds:
    meta.json       stage, step/epoch, the signature of model + data layout (checked on resume)
    denoiser.pt     (pretrain) exactly the single-process checkpoint, readable by ``load_denoiser``
    classifier.pt   (train) the best-on-val classifier, readable by ``load_classifier``
    train_state.pt  (train) epochs done and the best so far
    engine/         DeepSpeed's own checkpoint (every rank's shard) or ddp.pt
    log.jsonl       rank 0's log up to this checkpoint (so a restart drops the lost steps' lines)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from bdgf.errors import BDGFError, StoreError

log = logging.getLogger("bdgf.distributed")


class CheckpointMismatch(BDGFError):
    """A checkpoint written for another model, data layout or config."""


# ----------------------------------------------------------------------------------------
# Stores
# ----------------------------------------------------------------------------------------


def open_stores(paths: Iterable[str | os.PathLike], where: str = "driver") -> list:
    """Open every store (clear error naming the path and who could not read it); all must share
    one band layout (modalities in order with their band counts)."""
    from bdgf.data.scene import Scene

    scenes = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise StoreError(f"{where}: scene store {p} does not exist or is not readable from {where}")
        if not os.access(p, os.R_OK | os.X_OK):
            raise StoreError(f"{where}: scene store {p} is not readable (permission denied)")
        try:
            scenes.append(Scene.open(p))
        except BDGFError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr/OS errors: name the store and the reader
            raise StoreError(f"{where}: cannot read scene store {p}: {type(exc).__name__}: {exc}") from exc
    if not scenes:
        raise StoreError(f"{where}: no scene store given")
    layout = [(m.name, m.bands) for m in scenes[0].meta.modalities]
    for s in scenes[1:]:
        other = [(m.name, m.bands) for m in s.meta.modalities]
        if other != layout:
            raise StoreError(
                f"stores {scenes[0].path} and {s.path} have different band layouts: {layout} vs {other}; "
                "multi-scene pretraining needs the same modalities with the same band counts")
    return scenes


def check_signature(have: dict, want: dict, checkpoint: str) -> None:
    """Refuse to resume from a checkpoint of another model/config, naming both."""
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        detail = "; ".join(f"{k}: checkpoint {have.get(k)!r} vs this run {want.get(k)!r}" for k in diff)
        raise CheckpointMismatch(
            f"cannot resume from checkpoint {checkpoint}: it was written for another model/config ({detail}). "
            "Use another run directory, or --overwrite to start over.")


# ----------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------


class SyncedMasking:
    """Adaptive modality masking whose statistics see every rank's batch.

    ``update`` all-gathers the per-sample modality losses and presence flags, so each rank folds
    the same global batch into its EMAs and every rank keeps the same masking probabilities.
    Everything else is the wrapped :class:`AdaptiveModalityMasking`.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, per_modality_loss: torch.Tensor, present: torch.Tensor) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        both = torch.cat([per_modality_loss.detach().float(), present.detach().float().to(per_modality_loss.device)], 1)
        parts = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(parts, both.contiguous())
        allb = torch.cat(parts, 0)
        m = per_modality_loss.shape[1]
        self.inner.update(allb[:, :m], allb[:, m:])


def fault_injection(batches: Iterable, start: int, rank: int, fault: dict | None) -> Iterator:
    """Pass batches through; with ``fault`` = {"step", "rank", "marker"} SIGKILL this worker
    process when it is about to run that step, once (the marker file records that it fired).
    A real process death, for the fault-tolerance test and benchmark."""
    step = start
    for batch in batches:
        step += 1
        if fault and rank == int(fault["rank"]) and step == int(fault["step"]):
            marker = Path(fault["marker"])
            if not marker.exists():
                marker.write_text(f"killed rank {rank} (pid {os.getpid()}) before step {step}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def _ctx():
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _live_log(run_dir: str, rel: str, restored: str, rank: int):
    """Rank 0's JSONL logger: in the run dir when this node sees it, else a temporary folder;
    restarted from the checkpoint's lines (the steps after it were lost and are run again)."""
    from bdgf.run import JsonlLogger

    if rank != 0:
        return None
    path = Path(run_dir) / rel
    if not Path(run_dir).exists():
        path = Path(tempfile.mkdtemp(prefix="bdgf-log-")) / Path(rel).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(restored)
    return JsonlLogger(path, append=True)


def _note_restart(run_dir: str, stage: str, rank: int, rec: dict) -> None:
    """Rank 0 appends a line to RUN/<stage>/restarts.jsonl (where this node sees the run dir)."""
    import time

    d = Path(run_dir) / stage
    if rank == 0 and d.exists():
        with open(d / "restarts.jsonl", "a") as f:
            f.write(json.dumps({**rec, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _report(stepper, rank: int, metrics: dict, name: str, write_rank0) -> None:
    """Write this rank's part of a checkpoint and report it (a barrier across ranks)."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"bdgf-{name}-r{rank}-"))
    try:
        stepper.save(tmp / "engine")
        if rank == 0:
            write_rank0(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name)
        # Wait until the controller has committed it: a worker killed right after a report must
        # still restart from this checkpoint (so at most checkpoint_every steps are ever lost).
        from ray.train import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(where: str, signature: dict):
    """(checkpoint dir copy, meta) of Ray Train's latest checkpoint, or (None, None)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    local = Path(tempfile.mkdtemp(prefix="bdgf-restore-"))
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    meta_path = local / "meta.json"
    if not meta_path.exists():
        raise CheckpointMismatch(f"{where}: checkpoint {ckpt.path} has no meta.json (not a BDGF checkpoint)")
    meta = json.loads(meta_path.read_text())
    check_signature(meta.get("signature", {}), signature, ckpt.path)
    return local, meta


# ----------------------------------------------------------------------------------------
# Stage 1: pretraining
# ----------------------------------------------------------------------------------------


def pretrain_worker(c: dict) -> None:
    from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, Subset

    from bdgf.config import RunConfig
    from bdgf.data.patches import shard_indices
    from bdgf.data.tiles import TileDataset
    from bdgf.engine.loop import cycle
    from bdgf.engine.pretrain import build_denoiser, denoiser_checkpoint, pretrain_loop
    from bdgf.run import atomic_save
    from training.engine import make_engine

    rank, world = _ctx()
    scenes = open_stores(c["stores"], where=f"worker rank {rank}")
    pc = RunConfig.from_dict(c["run_config"]).pretrain
    names = scenes[0].modality_names
    bands = [scenes[0].bands[n] for n in names]
    device = _device()
    torch.manual_seed(pc.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's too)
    model, schedule, masking = build_denoiser(pc, bands)
    start = 0
    if c.get("init_from"):  # warm start from a run's denoiser.pt (weights, masking, step)
        state = torch.load(c["init_from"], map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        masking.load_state_dict(state["masking"])
        start = int(state["step"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    engine, stepper = make_engine(c["engine"], model, optimizer, c["ds_config"], device)

    restored_log = ""
    local, meta = _restore(f"worker rank {rank}", c["signature"])
    if local is not None:
        state = torch.load(local / "denoiser.pt", map_location="cpu", weights_only=False)
        masking.load_state_dict(state["masking"])
        stepper.load(local / "engine")
        start = int(state["step"])
        if (local / "log.jsonl").exists():
            restored_log = (local / "log.jsonl").read_text()
        shutil.rmtree(local, ignore_errors=True)
        log.warning("rank %d: resumed from the checkpoint of step %d", rank, start)
        _note_restart(c["run_dir"], "pretrain", rank, {"resumed_from_step": start})
    if start >= pc.steps:
        return

    micro = int(c["ds_config"]["train_micro_batch_size_per_gpu"])
    data = ConcatDataset([TileDataset(s, pc.tile_size) for s in c["stores"]])
    shard = Subset(data, shard_indices(len(data), rank, world, seed=pc.seed, shuffle=True).tolist())
    base = pc.seed * 1_000_003 + rank * 7919 + start  # deterministic in (seed, rank, world, start)
    sampler = RandomSampler(shard, replacement=True, num_samples=(pc.steps - start) * micro,
                            generator=torch.Generator().manual_seed(base + 1))
    loader = DataLoader(shard, batch_size=micro, sampler=sampler, drop_last=True)
    generator = torch.Generator().manual_seed(base)
    logger = _live_log(c["run_dir"], "pretrain/log.jsonl", restored_log, rank)
    last: dict = {}

    def on_log(rec: dict) -> None:
        rec = {**rec, "workers": world, "global_tiles_per_s": rec["tiles_per_s"] * world}
        last.clear()
        last.update(rec)
        if logger is not None:
            logger(rec)

    def write_rank0(d: Path, step: int) -> None:
        atomic_save(denoiser_checkpoint(engine, schedule, masking, stepper, step, pc, names, bands), d / "denoiser.pt")
        (d / "meta.json").write_text(json.dumps({"stage": "pretrain", "step": step, "signature": c["signature"]}))
        if logger is not None:
            shutil.copy(logger.path, d / "log.jsonl")

    def on_checkpoint(step: int) -> None:
        metrics = {**last, "step": step}
        _report(stepper, rank, metrics, f"checkpoint_step{step:08d}", lambda d: write_rank0(d, step))

    batches = fault_injection(cycle(loader), start, rank, c.get("fault"))
    try:
        pretrain_loop(
            engine, schedule, SyncedMasking(masking) if world > 1 else masking, batches, stepper,
            steps=pc.steps, channel_modality=torch.as_tensor(scenes[0].channel_modality), modality_names=names,
            loss_kind=pc.loss_kind, generator=generator, start_step=start, log_every=pc.log_every, on_log=on_log,
            checkpoint_every=pc.checkpoint_every, on_checkpoint=on_checkpoint, device=device,
        )
    finally:
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------------------
# Stage 2: classifier
# ----------------------------------------------------------------------------------------


class JointModule(nn.Module):
    """Classifier + mutual-learning loss as one module, so one engine holds (and all-reduces)
    both parameter sets; its forward is the classifier's."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def train_worker(c: dict) -> None:
    from torch.utils.data import DataLoader

    from bdgf.config import RunConfig
    from bdgf.data.patches import PatchDataset
    from bdgf.diffusion.features import LEVELS
    from bdgf.engine.classify import build_classifier, train_epochs
    from bdgf.run import atomic_save
    from training.engine import make_engine

    rank, world = _ctx()
    scene = open_stores([c["store"]], where=f"worker rank {rank}")[0]
    tc = RunConfig.from_dict(c["run_config"]).train
    seed = int(c["seed"])
    device = _device()
    torch.manual_seed(seed)
    micro = int(c["ds_config"]["train_micro_batch_size_per_gpu"])
    kw = dict(patch_size=tc.patch_size, features=LEVELS)
    train_ds = PatchDataset(c["store"], "train", rank=rank, world_size=world, seed=seed, shuffle=True, **kw)
    val_ds = PatchDataset(c["store"], c["val_split"], **kw)
    train_loader = DataLoader(train_ds, batch_size=micro, shuffle=False, num_workers=tc.num_workers,
                              drop_last=len(train_ds) > micro)
    val_loader = DataLoader(val_ds, batch_size=256, num_workers=tc.num_workers)
    model, criterion = build_classifier(tc, scene.total_bands, c["feature_channels"], scene.num_classes)
    joint = JointModule(model, criterion)
    optimizer = torch.optim.AdamW(joint.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    engine, stepper = make_engine(c["engine"], joint, optimizer, c["ds_config"], device)

    done, restored_log = 0, ""
    best: dict = {"epoch": 0, "val_oa": -1.0}
    best_state: dict | None = None
    local, meta = _restore(f"worker rank {rank}", c["signature"])
    if local is not None:
        st = torch.load(local / "train_state.pt", map_location="cpu", weights_only=False)
        done, best, best_state = int(st["epoch"]), st["best"], st["best_ckpt"]
        stepper.load(local / "engine")
        if (local / "log.jsonl").exists():
            restored_log = (local / "log.jsonl").read_text()
        shutil.rmtree(local, ignore_errors=True)
        log.warning("rank %d: resumed after epoch %d", rank, done)
        _note_restart(c["run_dir"], f"train/seed{seed}", rank, {"resumed_after_epoch": done})
    logger = _live_log(c["run_dir"], f"train/seed{seed}/log.jsonl", restored_log, rank)
    state = {"epoch": done}

    def on_log(rec: dict) -> None:
        if "epoch" in rec:
            rec = {**rec, "epoch": rec["epoch"] + done}
        if "patches_per_s" in rec:
            rec["global_patches_per_s"] = rec["patches_per_s"] * world
        if logger is not None:
            logger(rec)

    def on_best(epoch: int, oa: float) -> None:
        nonlocal best, best_state
        if oa > best["val_oa"]:  # across restarts too
            best = {"epoch": epoch + done, "val_oa": oa}
            best_state = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                          "classifier_config": model.config.to_dict(), "epoch": epoch + done, "val_oa": oa,
                          "seed": seed, "train_config": asdict(tc)}

    def write_rank0(d: Path, epoch: int) -> None:
        torch.save({"epoch": epoch, "best": best, "best_ckpt": best_state}, d / "train_state.pt")
        if best_state is not None:
            atomic_save(best_state, d / "classifier.pt")
        (d / "meta.json").write_text(json.dumps({"stage": "train", "epoch": epoch, "signature": c["signature"]}))
        if logger is not None:
            shutil.copy(logger.path, d / "log.jsonl")

    def report(epoch: int) -> None:
        _report(stepper, rank, {"epoch": epoch, **best}, f"checkpoint_epoch{epoch:05d}", lambda d: write_rank0(d, epoch))

    def set_epoch(e: int) -> None:  # called at the start of each epoch: checkpoint the one before
        if e > 1:
            report(done + e - 1)
        state["epoch"] = done + e
        train_ds.set_epoch(done + e)

    try:
        if done < tc.epochs:
            train_epochs(engine, criterion, train_loader, val_loader, stepper, epochs=tc.epochs - done,
                         val_every=tc.val_every, patience=tc.patience, on_log=on_log, on_best=on_best,
                         set_epoch=set_epoch, device=device)
            report(state["epoch"])
    finally:
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------------------
# Features: a Ray task per disjoint set of tiles
# ----------------------------------------------------------------------------------------


def feature_task(store: str, denoiser: dict, spec: dict, origins, batch_size: int) -> int:
    """Load the denoiser from its checkpoint dict, compute and write the given tiles' features
    (each tile owns whole chunks and its own ``_done`` flag). Returns tiles computed."""
    from bdgf.diffusion.features import FeatureSpec, extract_tiles
    from bdgf.diffusion.schedules import NoiseSchedule
    from bdgf.diffusion.unet import DenoiserUNet, UNetConfig

    open_stores([store], where="feature task")
    model = DenoiserUNet(UNetConfig(**denoiser["unet_config"]))
    model.load_state_dict(denoiser["model"])
    model.eval().requires_grad_(False)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    fs = FeatureSpec(**{**spec, "timesteps": tuple(spec["timesteps"])})
    return extract_tiles(store, model, NoiseSchedule.from_state_dict(denoiser["schedule"]), fs,
                         [tuple(int(v) for v in o) for o in origins], batch_size, device=device)
