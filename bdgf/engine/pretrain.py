"""Stage 1: the balanced multimodal DDPM with adaptive modality masking (docs/method.md, Stage 1).

One driver for every way it runs. :func:`pretrain` checks its input, prepares the run directory
and then runs :func:`pretrain_body` either here (``workers=0``: a plain single process) or on
``workers`` Ray Train workers (:mod:`bdgf.distributed`); both leave the same files in the run
and return the same :class:`~bdgf.summaries.PretrainSummary`. Inside the body only the context
differs (rank, stepper, where checkpoints go); :func:`pretrain_loop` is the loop itself.

Glossary (letters as in docs/glossary.md): B tiles in a batch, C bands, T tile side.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, Subset

from bdgf.config import PretrainConfig, RunConfig
from bdgf.data.chunks import ChunkWindowSampler, cache_budget, chunk_shard, fallback_shard
from bdgf.data.stores import open_stores
from bdgf.data.tiles import TileDataset, random_augment, random_augment_with_valid
from bdgf.diffusion.masking import AdaptiveModalityMasking, MaskingConfig
from bdgf.diffusion.schedules import NoiseSchedule, ScheduleConfig
from bdgf.diffusion.step import diffusion_training_step, unwrap_model
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
from bdgf.engine.loop import LocalContext, check_finite, cycle, restore_rng, restored_stream, rng_state
from bdgf.errors import BDGFError
from bdgf.progress import Progress
from bdgf.run import Run, read_checkpoint, read_jsonl
from bdgf.summaries import PretrainSummary, most_masked

log = logging.getLogger("bdgf.pretrain")


def build_denoiser(cfg: PretrainConfig, bands: list[int]) -> tuple[DenoiserUNet, NoiseSchedule, AdaptiveModalityMasking]:
    """Denoiser, schedule and masking for a scene with the given band count per modality."""
    unet_cfg = UNetConfig(in_channels=sum(bands), num_modalities=len(bands), **cfg.unet)
    if cfg.tile_size % unet_cfg.tile_multiple:
        raise BDGFError(f"pretrain.tile_size {cfg.tile_size} must be a multiple of {unet_cfg.tile_multiple}")
    model = DenoiserUNet(unet_cfg)
    schedule = NoiseSchedule(ScheduleConfig(**cfg.schedule))
    masking = AdaptiveModalityMasking(len(bands), MaskingConfig(**cfg.masking))
    return model, schedule, masking


def denoiser_checkpoint(model, schedule, masking, stepper, step: int, cfg: PretrainConfig,
                        modality_names: list[str], bands: list[int], rng: dict | None = None,
                        stepper_state: dict | None = None) -> dict:
    """The denoiser checkpoint dict (the format ``Run.load_denoiser`` reads); ``rng``: the
    writing rank's random streams (:func:`~bdgf.engine.loop.rng_state`, with its ``world``), so a
    ``--resume`` of the same world size continues them exactly. ``stepper_state``: the plain
    optimiser state when the caller gathered it (a partitioned engine's), else the stepper's own."""
    bare = unwrap_model(model)
    state = stepper_state if stepper_state is not None else (stepper.state_dict() if stepper is not None else None)
    return {
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "unet_config": asdict(bare.config),
        "schedule": schedule.state_dict(),
        "masking": masking.state_dict(),
        "stepper": state,
        "step": step,
        "config": asdict(cfg),
        "modality_names": list(modality_names),
        "bands": list(bands),
        "rng": rng,
    }


def pretrain_signature(cfg: PretrainConfig, names: list[str], bands: list[int]) -> dict:
    """What a resumable checkpoint must match: model, data layout and the settings of the loop
    (a distributed launch adds the job's identity: run dir, stores, world size)."""
    model, _, _ = build_denoiser(cfg, bands)
    return {"stage": "pretrain", "unet_config": json.loads(json.dumps(asdict(model.config))),
            "modalities": list(names), "bands": list(bands), "schedule": dict(cfg.schedule),
            "masking": dict(cfg.masking), "loss_kind": cfg.loss_kind, "tile_size": cfg.tile_size,
            "seed": cfg.seed}


def pretrain_loop(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    masking: AdaptiveModalityMasking,
    batches: Iterable[torch.Tensor],
    stepper,
    *,
    steps: int,
    channel_modality: torch.Tensor,
    modality_names: list[str],
    loss_kind: str = "balanced",
    generator: torch.Generator,
    start_step: int = 0,
    log_every: int = 10,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> dict:
    """Run steps ``start_step+1 .. steps``; returns the last step's logs.

    batches: an endless iterator of TileDataset batches {"tile": x0 (B, C, T, T), "valid": (B, T, T)}
    (or of plain x0 tensors, all pixels valid); the flip/rotation is drawn once per batch and
    applied to tile and validity alike. stepper.step(loss) does the
    update. NaN/inf loss stops the loop with TrainingDiverged (no update is applied). Under
    torch.distributed the logged "loss", "loss/<name>", "t_mean" and "present/<name>" are the
    means over ranks (every rank must pass ``on_log``); the returned logs are this rank's.
    """
    model.train()
    it = iter(batches)
    logs: dict = {}
    last_good = start_step if start_step > 0 else None
    bar = Progress(steps, "pretrain", "step", initial=start_step, enabled=progress)
    t0, n_seen = time.perf_counter(), 0
    try:
        for step in range(start_step + 1, steps + 1):
            batch = next(it)
            if isinstance(batch, dict):  # TileDataset batches: {"tile" (B, C, T, T), "valid" (B, T, T)}
                x0, valid = random_augment_with_valid(batch["tile"], batch["valid"], generator)
                x0, valid = x0.to(device), valid.to(device)
            else:  # plain tiles (B, C, T, T), every pixel valid
                x0, valid = random_augment(batch, generator).to(device), None
            loss, logs = diffusion_training_step(
                model, schedule, masking, x0, channel_modality, generator, loss_kind=loss_kind,
                modality_names=modality_names, valid=valid,
            )
            check_finite(loss, step, last_good, "pretrain")
            stepper.step(loss)
            n_seen += x0.shape[0]
            bar.update(1, loss=logs["loss"])
            if on_log is not None and (step % log_every == 0 or step == steps):
                dt = time.perf_counter() - t0
                rec = dict(logs)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # the mean over ranks of this step's micro-batch figures, not rank 0's alone
                    # (a collective: every rank passes on_log, and logs at the same steps)
                    keys = [k for k in rec if k in ("loss", "t_mean") or k.startswith(("loss/", "present/"))]
                    vals = torch.tensor([rec[k] for k in keys], dtype=torch.float64, device=device)
                    torch.distributed.all_reduce(vals)
                    rec.update(zip(keys, (vals / torch.distributed.get_world_size()).tolist()))
                on_log({"step": step, **rec, "tiles_per_s": n_seen / max(dt, 1e-9)})
                t0, n_seen = time.perf_counter(), 0
            if on_checkpoint is not None and ((checkpoint_every and step % checkpoint_every == 0) or step == steps):
                on_checkpoint(step)
                last_good = step
    finally:
        bar.close()
    return logs


def tile_batches(stores: Sequence[str], cfg: PretrainConfig, *, micro_batch: int, rank: int = 0, world: int = 1,
                 start: int = 0) -> tuple[DataLoader, torch.Generator]:
    """(loader of ``steps - start`` random tile batches for this rank, augmentation generator).

    With ``world > 1`` each rank draws only tiles of the store chunks it owns
    (:func:`bdgf.data.chunks.chunk_shard`: chunks dealt to ranks, deterministic in seed and world;
    tile-level shards when there are fewer chunks than ranks). Scenes that fit the cache budget
    (the process's budget, :func:`~bdgf.data.chunks.cache_budget`, split evenly over the stores)
    are sampled uniformly with replacement; larger ones chunk-window by chunk-window
    (:class:`~bdgf.data.chunks.ChunkWindowSampler`) so each chunk is read about once per pass.
    The streams are a pure function of (seed, rank, start step), so a resumed run draws fresh
    tiles deterministically. Batches are {"tile" (B, C, T, T), "valid" (B, T, T)}; tiles under
    ``cfg.min_valid_fraction`` valid are never drawn.
    """
    share = cache_budget() // max(len(stores), 1)  # the process's one memory budget, split over the stores
    datasets = [TileDataset(s, cfg.tile_size, cache_bytes=share, min_valid_fraction=cfg.min_valid_fraction)
                for s in stores]
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    groups = None  # per owned chunk, positions in `data` of its tiles
    if world > 1:
        shard = chunk_shard([d.chunk_keys for d in datasets], rank, world, seed=cfg.seed)
        if shard is None:
            data = Subset(data, fallback_shard(len(data), rank, world, cfg.seed).tolist())
        else:
            indices, owned = shard
            data = Subset(data, indices.tolist())
            groups = [indices.searchsorted(g) for g in owned]
    base = cfg.seed + start + 1_000_003 * rank
    num_samples = max(cfg.steps - start, 1) * micro_batch
    if all(d.cache for d in datasets):
        sampler = RandomSampler(data, replacement=True, num_samples=num_samples,
                                generator=torch.Generator().manual_seed(base))
    else:
        if groups is None:  # one process: every chunk; fallback shards: one group of the shard
            groups = chunk_shard([d.chunk_keys for d in datasets], 0, 1)[1] if world == 1 else [range(len(data))]
        window = min(d.window for d in datasets)
        sampler = ChunkWindowSampler(groups, window, num_samples, torch.Generator().manual_seed(base))
    return DataLoader(data, batch_size=micro_batch, sampler=sampler, drop_last=True), torch.Generator().manual_seed(base)


def tile_loader(store: str | Path, cfg: PretrainConfig, num_samples: int, seed: int) -> DataLoader:
    """Random tiles of one store (for tests and benchmarks that drive ``pretrain_loop`` by hand):
    batches {"tile" (B, C, T, T), "valid" (B, T, T)}, tiles under ``cfg.min_valid_fraction`` valid
    skipped; a scene over the cache budget is drawn chunk-window by chunk-window (as ``tile_batches``)."""
    data = TileDataset(store, cfg.tile_size, min_valid_fraction=cfg.min_valid_fraction)
    gen = torch.Generator().manual_seed(seed)
    if data.cache:
        sampler = RandomSampler(data, replacement=True, num_samples=num_samples, generator=gen)
    else:
        sampler = ChunkWindowSampler(chunk_shard([data.chunk_keys], 0, 1)[1], data.window, num_samples, gen)
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)


# ----------------------------------------------------------------------------------------
# The body: what one process (or each Ray Train worker) runs
# ----------------------------------------------------------------------------------------


def pretrain_body(job: dict, ctx) -> None:
    """Build the denoiser, restore what there is to restore, run the loop, checkpoint.

    job: {"stores", "run_config", "signature", "init_from" (a denoiser.pt to continue from, or
    None), "micro_batch", "progress", "fault" (tests: kill a worker once)}.
    ctx: :class:`~bdgf.engine.loop.LocalContext` or :class:`~bdgf.distributed.workers.RayContext`.
    """
    scenes = open_stores(job["stores"], where=ctx.where)
    pc = RunConfig.from_dict(job["run_config"]).pretrain
    names = scenes[0].modality_names
    bands = [scenes[0].bands[n] for n in names]
    torch.manual_seed(pc.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's too)
    model, schedule, masking = build_denoiser(pc, bands)
    start, stepper_state, rng = 0, None, None
    if job.get("init_from"):  # continue a run's denoiser.pt (weights, masking, step, optimiser, RNG)
        state = read_checkpoint(job["init_from"], "denoiser checkpoint")
        model.load_state_dict(state["model"])
        masking.load_state_dict(state["masking"])
        start, stepper_state = int(state["step"]), state.get("stepper")
        ranks = state.get("rng_ranks") or []
        if len(ranks) == ctx.world:  # written by a run of this world size: every rank's streams
            rng = ranks[ctx.rank]
        elif (state.get("rng") or {}).get("world") == ctx.world == 1:
            rng = state["rng"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    engine, stepper = ctx.make_stepper(model, optimizer, pc.grad_clip)
    if job.get("init_from") and start and not ctx.load_optimizer_state(stepper, model, stepper_state):
        log.warning("rank %d: %s holds no optimiser state for this model; the optimiser starts afresh",
                    ctx.rank, job["init_from"])

    restored_log = ""
    local, meta = ctx.restore(job["signature"])
    if local is not None:  # a restarted worker: Ray Train's last checkpoint
        state = read_checkpoint(local / "denoiser.pt", "denoiser checkpoint")
        masking.load_state_dict(state["masking"])
        stepper.load(local / "engine")
        start = int(state["step"])
        mine = local / f"rng_rank{ctx.rank}.pt"
        rng = read_checkpoint(mine, "RNG state") if mine.exists() else None
        restored_log = (local / "log.jsonl").read_text() if (local / "log.jsonl").exists() else ""
        log.warning("rank %d: resumed from the checkpoint of step %d", ctx.rank, start)
        ctx.note_restart({"resumed_from_step": start})
    if start >= pc.steps:
        return

    micro = int(job["micro_batch"])
    # The tile stream of an uninterrupted run (a pure function of seed and rank), from where it stopped.
    loader, generator = tile_batches(job["stores"], pc, micro_batch=micro, rank=ctx.rank, world=ctx.world)
    if start:
        order = list(iter(loader.sampler))[start * micro:]
        loader = DataLoader(loader.dataset, batch_size=micro, sampler=order, drop_last=True)
    batches = cycle(loader)
    if rng is not None:
        batches = restored_stream(batches, lambda: restore_rng(rng, {"augment": generator}))
    elif start:
        generator.manual_seed(pc.seed + start + 1_000_003 * ctx.rank)
        log.warning("rank %d: no saved RNG state for this world size; random streams reseeded from "
                    "(seed, rank, step %d): consistent, not bit-exact", ctx.rank, start)
    logger = ctx.logger("log.jsonl", restored_log, append=start > 0) if ctx.rank == 0 else None
    last: dict = {}

    def on_log(rec: dict) -> None:
        rec = {**rec, "workers": ctx.world, "global_tiles_per_s": rec["tiles_per_s"] * ctx.world}
        last.clear()
        last.update(rec)
        if logger is not None:
            logger(rec)

    def on_checkpoint(step: int) -> None:
        streams = rng_state({"augment": generator}, world=ctx.world, rank=ctx.rank, step=step)
        plain = ctx.optimizer_state(stepper, model)  # collective: every rank takes part in the gathers
        every = ctx.gather(streams)
        files = {}
        if ctx.rank == 0:
            files["denoiser.pt"] = {**denoiser_checkpoint(engine, schedule, masking, stepper, step, pc, names, bands,
                                                          rng=streams, stepper_state=plain), "rng_ranks": every}
        ctx.checkpoint(f"checkpoint_step{step:08d}", {**last, "step": step}, files,
                       {"stage": "pretrain", "step": step, "signature": job["signature"], "final": step >= pc.steps},
                       stepper=stepper, rank_state=streams)

    from bdgf.distributed.faults import fault_injection  # noqa: PLC0415 - tests only, no Ray import

    synced = masking
    if ctx.world > 1:
        from bdgf.distributed.workers import SyncedMasking

        synced = SyncedMasking(masking)
    try:
        pretrain_loop(
            engine, schedule, synced, fault_injection(batches, start, ctx.rank, job.get("fault")), stepper,
            steps=pc.steps, channel_modality=torch.as_tensor(scenes[0].channel_modality), modality_names=names,
            loss_kind=pc.loss_kind, generator=generator, start_step=start, log_every=pc.log_every, on_log=on_log,
            checkpoint_every=pc.checkpoint_every, on_checkpoint=on_checkpoint, progress=bool(job.get("progress")),
            device=ctx.device,
        )
    finally:
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def pretrain(stores: str | Path | Sequence[str | Path], run_dir: str | Path, config: RunConfig | None = None, *,
             resume: bool = False, overwrite: bool = False, progress: bool = True, workers: int = 0,
             address: str | None = None, storage: str | None = None, max_failures: int | None = None,
             ds_config: str | None = None, device: str = "auto") -> PretrainSummary:
    """Pretrain the denoiser on one or more scene stores (of one band layout) into ``run_dir``.

    ``workers=0`` runs here; ``workers=N`` runs on N Ray Train workers (DeepSpeed inside each) of
    the cluster at ``address`` (default: RAY_ADDRESS, else a local Ray). Everything that can be
    checked is checked before anything is written or launched. ``resume`` continues the run's
    ``pretrain/denoiser.pt`` (weights, optimiser, masking and, for one process, its random
    streams); ``overwrite`` starts over (every old stage output is removed, and this run's Ray
    experiments in ``storage``). ``device`` "auto" | "cpu" | "gpu": "auto" takes a GPU where the
    work runs has one (the cluster's resources, or this machine's with ``workers=0``).
    """
    paths = [str(Path(s).resolve()) for s in ([stores] if isinstance(stores, (str, os.PathLike)) else stores)]
    scenes = open_stores(paths, where="driver")
    run = Run(run_dir)
    config, continuing = run.pretrain_config(config, resume=resume, overwrite=overwrite)
    if continuing:
        run.check_scene(scenes[0])
    pc = config.pretrain
    names = scenes[0].modality_names
    bands = [scenes[0].bands[n] for n in names]
    signature = pretrain_signature(pc, names, bands)
    job = {"stores": paths, "run_config": config.to_dict(), "signature": signature, "micro_batch": pc.batch_size,
           "init_from": str(run.denoiser_path.resolve()) if continuing else None, "progress": progress}
    launch = None
    if workers:
        from bdgf.distributed.launch import prepare_launch

        launch = prepare_launch("pretrain", run, name="pretrain", workers=workers, address=address,
                                micro_batch=pc.batch_size, grad_clip=pc.grad_clip, ds_config=ds_config,
                                storage=storage, max_failures=max_failures, signature=signature, fresh=overwrite,
                                stores=paths, out="pretrain", device=device)
        job.update(micro_batch=launch.micro_batch, progress=False, signature=launch.signature)
        choice = (launch.device, launch.device_reason)
        if launch.continuing:  # a restarted job: Ray Train's checkpoint, not denoiser.pt, is the state
            job["init_from"] = None
    else:
        from bdgf.distributed.launch import clear_run_storage, local_device  # noqa: PLC0415 - no Ray import

        c = local_device(device)
        choice = (c.device, c.reason)
        log.info("device: %s (%s)", *choice)
        if overwrite and storage:  # this run's old Ray experiments go too, wherever they are
            clear_run_storage(storage, run.path)
    if continuing or (launch is not None and launch.continuing):
        run.check_scene(scenes[0])
        config.save(run.config_path)
    else:
        run.create(scenes[0], config, overwrite=overwrite)
    run.record("stores", paths)

    t0 = time.perf_counter()
    if launch is None:
        pretrain_body(job, LocalContext(run.stage_dir("pretrain"), "cuda" if choice[0] == "gpu" else "cpu",
                                        progress=progress))
        engine, checkpoint = "torch", None
    else:
        checkpoint = launch.fit(pretrain_body, job, out_dir=run.stage_dir("pretrain"))
        engine = launch.engine
    wall = time.perf_counter() - t0

    from bdgf.plots import plot_pretrain_curves

    records = [r for r in read_jsonl(run.pretrain_dir / "log.jsonl") if "loss" in r]
    try:
        plot_pretrain_curves(records, run.pretrain_dir / "curves.png")
    except Exception as exc:  # noqa: BLE001 - a plot never fails a finished run
        log.warning("pretrain curves not drawn: %s", exc)
    last = records[-1] if records else {}
    rates = [r["global_tiles_per_s"] for r in records if r.get("global_tiles_per_s")]
    p_mask = {n: last.get(f"p_mask/{n}") for n in names}
    summary = PretrainSummary(
        steps=int(run.denoiser_checkpoint()["step"]),
        final_loss=last.get("loss"),
        loss_per_modality={n: last.get(f"loss/{n}") for n in names},
        p_mask=p_mask,
        most_masked=most_masked(p_mask),
        wall_s=wall,
        tiles_per_s=sum(rates) / len(rates) if rates else None,
        workers=max(workers, 1),
        engine=engine,
        checkpoint=checkpoint,
        device=choice[0],
        device_reason=choice[1],
    )
    run.record("pretrain", summary.to_dict())
    return summary
