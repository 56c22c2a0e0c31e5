"""Stage 2: the diffusion-guided classifier (docs/method.md, Stage 2): train, select on val, evaluate.

One driver, :func:`train`, runs :func:`train_body` here (``workers=0``) or on Ray Train workers;
both write ``train/seed<k>/`` the same way and return a :class:`~bdgf.summaries.TrainSummary`.
:func:`train_epochs` is the loop; :func:`evaluate` scores every trained seed.

Model selection and early stopping (:func:`train_epochs`): an epoch is *better* when its val OA
is higher than the best so far, or equal to it with a val NLL lower than the best by more than
``train.nll_min_delta`` (default ``NLL_MIN_DELTA``, 0.01 nats per pixel). Only a better epoch is
kept and resets the patience counter, so when val saturates (OA 1.0, common on small val splits) the run stops ``patience``
epochs after the NLL last dropped by 0.01, instead of training on the NLL's ever smaller gains to
the last epoch. The summary reports the selected epoch with its val figures and the train OA /
NLL of that same model (all train pixels, no modality dropout).

Glossary (letters as in docs/glossary.md): B batch, C bands, P patch side, K classes, N pixels of a split.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bdgf.config import RunConfig, TrainConfig
from bdgf.data import feature_cache
from bdgf.data.patches import PatchDataset
from bdgf.data.scene import Scene
from bdgf.data.stores import open_stores
from bdgf.diffusion.features import LEVELS, feature_name
from bdgf.engine.loop import LocalContext, check_finite, restore_rng, rng_state
from bdgf.errors import BDGFError
from bdgf.losses import MutualLearningConfig, MutualLearningLoss
from bdgf.metrics import classification_report
from bdgf.models.classifier import BDGFClassifier, ClassifierConfig
from bdgf.engine.modality_view import ModalityView
from bdgf.models.inputs import input_channels
from bdgf.progress import Progress
from bdgf.run import Run, classifier_from_checkpoint, read_checkpoint, read_jsonl
from bdgf.summaries import EvalSummary, TrainSummary

log = logging.getLogger("bdgf.train")


def build_classifier(cfg: TrainConfig, in_channels: int, feature_channels: dict[str, int],
                     num_classes: int) -> tuple[BDGFClassifier, MutualLearningLoss]:
    model_cfg = ClassifierConfig.from_dict({
        **cfg.model, "in_channels": in_channels, "feature_channels": dict(feature_channels),
        "num_classes": num_classes, "patch_size": cfg.patch_size, "branches": tuple(cfg.branches),
    })
    model = BDGFClassifier(model_cfg)
    criterion = MutualLearningLoss(model.z_dims, MutualLearningConfig(**cfg.mutual))
    return model, criterion


class JointModule(nn.Module):
    """Classifier + mutual-learning loss as one module, so one optimiser (and one engine, which
    all-reduces and clips) holds both parameter sets; its forward is the classifier's."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def classifier_step(model, criterion, batch: dict, view: ModalityView, device="cpu"
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward + mutual-learning loss of one batch (with modality dropout) -> (loss, logs)."""
    out = model(*view.inputs(batch, device, view.draw(batch["patch"].shape[0])))
    loss, terms = criterion(out["logits"], out["z"], batch["label"].to(device))
    return loss, {("loss" if k == "loss" else f"term/{k}"): float(v) for k, v in terms.items()}


@torch.no_grad()
def predict(model, loader: Iterable[dict], view: ModalityView, device="cpu", absent: int = -1
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(labels (N,), ensemble probs (N, K), {branch: probs (N, K)}, coords (N, 2)) over a loader;
    ``absent``: index of a modality to classify without (-1: none)."""
    model.eval()
    ys, ps, cs, per = [], [], [], {}
    for batch in loader:
        B = batch["patch"].shape[0]
        out = model(*view.inputs(batch, device, torch.full((B,), absent, dtype=torch.int64)))
        ys.append(batch["label"].numpy())
        cs.append(batch["coords"].numpy())
        ps.append(out["probs"].float().cpu().numpy())
        for b, lg in out["logits"].items():
            per.setdefault(b, []).append(lg.float().softmax(-1).cpu().numpy())
    model.train()
    return (np.concatenate(ys), np.concatenate(ps), {b: np.concatenate(v) for b, v in per.items()},
            np.concatenate(cs))


#: a tie on val OA counts as better only when the val NLL drops by more than this (nats per pixel)
NLL_MIN_DELTA = 0.01


def better(oa: float, nll: float, best: dict, min_delta: float = NLL_MIN_DELTA) -> bool:
    """Whether val (``oa``, ``nll``) beats ``best`` {"val_oa", "val_nll"}: a higher OA, or the same
    OA with an NLL lower by more than ``min_delta``."""
    return oa > best["val_oa"] or (oa == best["val_oa"] and nll < best["val_nll"] - min_delta)


def train_epochs(model, criterion, train_loader, val_loader, stepper, view: ModalityView, *, epochs: int,
                 start_epoch: int = 0,
                 best: dict | None = None, val_every: int = 1, patience: int = 10, keep_last: bool = False,
                 min_delta: float = NLL_MIN_DELTA,
                 on_log: Callable[[dict], None] | None = None, on_best: Callable[[int, float], None] | None = None,
                 on_epoch_end: Callable[[int, dict], None] | None = None, progress: bool = False,
                 device="cpu", set_epoch: Callable[[int], None] | None = None,
                 counters: dict | None = None) -> dict:
    """Train epochs ``start_epoch+1 .. epochs``; after every ``val_every`` epochs score val and
    call ``on_best(epoch, oa)`` when it is :func:`better` (higher OA; on a tie, common on small or
    saturated val splits, an NLL lower by more than ``min_delta``); ``on_epoch_end(epoch, best)``
    after each epoch. Stops after ``patience`` epochs without a better one. ``keep_last``: a fixed
    schedule instead (every epoch runs, each scored epoch replaces the kept one). NaN loss stops
    with TrainingDiverged (the best checkpoint so far is kept). Returns the kept {"epoch",
    "val_oa", "val_nll", "stopped_early"} (``stopped_early``: patience ran out before ``epochs``).

    ``counters`` {"step", "since_best"}: the loop's own state, read at the start (a resumed run
    continues its patience count) and updated in place after every epoch (a checkpoint saves it)."""
    best = dict(best) if best else {"epoch": 0, "val_oa": -1.0, "val_nll": float("inf")}
    counters = {} if counters is None else counters
    step, since_best = int(counters.get("step", 0)), int(counters.get("since_best", 0))
    bar = Progress(epochs, "train", "epoch", initial=start_epoch, enabled=progress)
    model.train()
    t0, seen = time.perf_counter(), 0
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            if set_epoch is not None:
                set_epoch(epoch)
            for batch in train_loader:
                step += 1
                loss, logs = classifier_step(model, criterion, batch, view, device)
                check_finite(loss, step, best["epoch"] or None, "train")
                stepper.step(loss)
                seen += int(batch["label"].shape[0])
                if on_log is not None:
                    on_log({"step": step, "epoch": epoch, **logs})
            figures = {"loss": logs["loss"]}
            if epoch % val_every == 0 or epoch == epochs:
                y, p, _, _ = predict(model, val_loader, view, device)
                oa = float((p.argmax(1) == y).mean())
                nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
                dt = time.perf_counter() - t0
                if on_log is not None:
                    on_log({"epoch": epoch, "val_oa": oa, "val_nll": nll, "patches_per_s": seen / max(dt, 1e-9)})
                t0, seen = time.perf_counter(), 0
                figures.update(val_oa=oa, val_nll=nll)
                if keep_last or better(oa, nll, best, min_delta):
                    best = {"epoch": epoch, "val_oa": oa, "val_nll": nll}
                    since_best = 0
                    if on_best is not None:
                        on_best(epoch, oa)
                else:
                    since_best += val_every
            stop = since_best >= patience and epoch < epochs
            if stop:
                best = {**best, "stopped_early": True}
            counters.update(step=step, since_best=since_best)
            bar.update(1, **figures, best_epoch=best["epoch"])
            if on_epoch_end is not None:
                on_epoch_end(epoch, best)
            if stop:
                break
    finally:
        bar.close()
    return best


def patch_loaders(store: str, cfg: TrainConfig, seed: int, val_split: str, view: ModalityView, *,
                  micro_batch: int, rank: int = 0, world: int = 1, train_split: str = "train"):
    """(train dataset, train loader, val loader) for this rank: a seeded, reshuffled-per-epoch
    shard of the ``train_split`` pixels (all of them for one process), and every val pixel."""
    train_ds = PatchDataset(store, train_split, rank=rank, world_size=world, seed=seed, shuffle=True,
                            patch_size=cfg.patch_size, features=view.feature_names)
    val_ds = PatchDataset(store, val_split, patch_size=cfg.patch_size, features=LEVELS)
    g = torch.Generator().manual_seed(seed) if world == 1 else None
    train_loader = DataLoader(train_ds, batch_size=micro_batch, shuffle=world == 1, generator=g,
                              num_workers=cfg.num_workers, drop_last=len(train_ds) > micro_batch)
    val_loader = DataLoader(val_ds, batch_size=256, num_workers=cfg.num_workers)
    return train_ds, train_loader, val_loader


# ----------------------------------------------------------------------------------------
# The body: what one process (or each Ray Train worker) runs
# ----------------------------------------------------------------------------------------


def train_body(job: dict, ctx) -> None:
    """Train one classifier (one seed); after every epoch checkpoint the best classifier so far
    (``classifier.pt``) and the progress (``train_state.pt``).

    job: {"store", "run_config", "seed", "signature", "feature_channels", "val_split",
    "micro_batch", "progress"}, and optionally "train_split" (default "train").
    """
    tc = RunConfig.from_dict(job["run_config"]).train
    seed = int(job["seed"])
    scene = open_stores([job["store"]], where=ctx.where)[0]
    torch.manual_seed(seed)
    view = ModalityView(scene.modality_names, scene.channel_modality, tc.modality_dropout, seed + 1_000 * ctx.rank)
    train_ds, train_loader, val_loader = patch_loaders(job["store"], tc, seed, job["val_split"], view,
                                                       micro_batch=int(job["micro_batch"]), rank=ctx.rank,
                                                       world=ctx.world, train_split=job.get("train_split", "train"))
    model, criterion = build_classifier(tc, input_channels(scene.total_bands, len(scene.modality_names)),
                                        job["feature_channels"], scene.num_classes)
    joint = JointModule(model, criterion)
    optimizer = torch.optim.AdamW(joint.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    engine, stepper = ctx.make_stepper(joint, optimizer, tc.grad_clip)

    done, restored_log, best, best_state, rng = 0, "", None, None, None
    counters: dict = {}
    local, _ = ctx.restore(job["signature"])
    if local is not None:  # a restarted worker, or a resumed single process: the last checkpoint
        st = read_checkpoint(local / "train_state.pt", "training state")
        done, best = int(st["epoch"]), st["best"]
        counters.update(st.get("counters") or {})
        if (local / "classifier.pt").exists():
            best_state = read_checkpoint(local / "classifier.pt", "classifier checkpoint")
        if (local / "engine").exists():
            stepper.load(local / "engine")
        elif st.get("stepper"):
            stepper.load_state_dict(st["stepper"])
        mine = local / f"rng_rank{ctx.rank}.pt"
        if mine.exists():
            rng = read_checkpoint(mine, "RNG state")
        elif (st.get("rng") or {}).get("world") == ctx.world == 1:
            rng = st["rng"]
        restored_log = (local / "log.jsonl").read_text() if (local / "log.jsonl").exists() else ""
        log.warning("rank %d: resumed after epoch %d", ctx.rank, done)
        ctx.note_restart({"resumed_after_epoch": done})
    if done >= tc.epochs or (best or {}).get("stopped_early"):
        return  # finished, or early-stopped: a resumed run trains no further
    streams = {"view": view.generator, "shuffle": getattr(train_loader, "generator", None)}
    if rng is not None:
        restore_rng(rng, streams)
    logger = ctx.logger("log.jsonl", restored_log) if ctx.rank == 0 else None

    def on_log(rec: dict) -> None:
        if "patches_per_s" in rec:
            rec = {**rec, "global_patches_per_s": rec["patches_per_s"] * ctx.world}
        if logger is not None:
            logger(rec)

    def on_best(epoch: int, oa: float) -> None:
        nonlocal best_state
        best_state = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                      "classifier_config": model.config.to_dict(), "epoch": epoch, "val_oa": oa,
                      "seed": seed, "train_config": asdict(tc)}

    def on_epoch_end(epoch: int, best_now: dict) -> None:
        mine = rng_state(streams, world=ctx.world, rank=ctx.rank, epoch=epoch)
        final = epoch >= tc.epochs or bool(best_now.get("stopped_early"))
        files = {}
        if ctx.rank == 0:
            sd = stepper.state_dict() if hasattr(stepper, "state_dict") else None
            files = {"train_state.pt": {"epoch": epoch, "best": best_now, "counters": dict(counters), "rng": mine,
                                        "stepper": sd},
                     "classifier.pt": best_state}
        ctx.checkpoint(f"checkpoint_epoch{epoch:05d}", {"epoch": epoch, **best_now}, files,
                       {"stage": "train", "epoch": epoch, "signature": job["signature"], "final": final},
                       stepper=stepper, rank_state=mine)

    batches = train_loader
    if job.get("fault"):  # tests: kill this worker once before a given global step
        from bdgf.distributed.faults import FaultyLoader

        batches = FaultyLoader(train_loader, counters, ctx.rank, job["fault"])
    try:
        train_epochs(engine, criterion, batches, val_loader, stepper, view, epochs=tc.epochs, start_epoch=done,
                     best=best, val_every=tc.val_every, patience=tc.patience, keep_last=tc.selection == "last",
                     min_delta=tc.nll_min_delta,
                     on_log=on_log, on_best=on_best,
                     on_epoch_end=on_epoch_end, progress=bool(job.get("progress")), device=ctx.device,
                     set_epoch=train_ds.set_epoch, counters=counters)
    finally:
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------------------
# The drivers
# ----------------------------------------------------------------------------------------


def train(store: str | Path, run_dir: str | Path, *, seed: int | None = None, overrides: dict | None = None,
          progress: bool = True, workers: int = 0, address: str | None = None, storage: str | None = None,
          max_failures: int | None = None, ds_config: str | None = None, train_split: str = "train",
          val_split: str | None = None, out_dir: str | Path | None = None, device: str = "auto") -> TrainSummary:
    """Train one classifier (one seed) on a store with cached features into ``run_dir``
    (``workers=N``: on N Ray Train workers). ``train_split`` / ``val_split`` name the store's
    label splits to fit and select on (default "train", and "val" where the store has one, else
    the train split); ``out_dir``: where the classifier goes (default ``RUN/train/seed<k>``);
    ``device`` "auto" | "cpu" | "gpu" (see :func:`bdgf.distributed.launch.choose_device`)."""
    store = str(Path(store).resolve())
    scene = open_stores([store], where="driver")[0]
    run = Run(run_dir)
    run.check_scene(scene)
    config = run.config()
    if overrides:
        config = config.with_overrides(overrides)
    tc = config.train
    seed = tc.seed if seed is None else int(seed)
    view = ModalityView(scene.modality_names, scene.channel_modality, tc.modality_dropout)
    feature_channels = feature_cache.ready_channels(store, view.feature_names)
    feature_channels = {level: feature_channels[level] for level in LEVELS}
    for name in (train_split, val_split):
        if name is not None and name not in scene.splits:
            raise BDGFError(f"{store}: no split {name!r}; has {scene.splits}")
    if val_split is None:
        val_split = "val" if "val" in scene.splits else train_split
    if val_split == train_split and tc.selection == "val":
        log.warning("%s has no val split: model selection falls back to train accuracy "
                    "(set train.selection: last for a fixed schedule)", store)
    model, _ = build_classifier(tc, input_channels(scene.total_bands, len(scene.modality_names)), feature_channels,
                                scene.num_classes)  # fails early on a bad config
    signature = {"stage": "train", "classifier_config": json.loads(json.dumps(model.config.to_dict())),
                 "seed": seed, "lr": tc.lr, "weight_decay": tc.weight_decay}
    del model
    job = {"store": store, "run_config": config.to_dict(), "seed": seed, "signature": signature,
           "feature_channels": feature_channels, "val_split": val_split, "micro_batch": tc.batch_size,
           "progress": progress, "train_split": train_split}
    out = run.seed_dir(seed) if out_dir is None else Path(out_dir)
    launch = None
    if workers:
        from bdgf.distributed.launch import prepare_launch

        try:
            rel = str(out.resolve().relative_to(run.path.resolve()))
        except ValueError:
            rel = str(out.resolve())
        launch = prepare_launch("train", run, name=f"train-seed{seed}", workers=workers, address=address,
                                micro_batch=tc.batch_size, grad_clip=tc.grad_clip, ds_config=ds_config,
                                storage=storage, max_failures=max_failures, signature=signature, stores=[store],
                                out=rel, device=device,
                                hint="delete that experiment folder or use another --storage")
        job.update(micro_batch=launch.micro_batch, progress=False, signature=launch.signature)
        choice = (launch.device, launch.device_reason)
    else:
        from bdgf.distributed.launch import local_device  # noqa: PLC0415 - no Ray import at module level

        c = local_device(device)
        choice = (c.device, c.reason)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")

    t0 = time.perf_counter()
    if launch is None:
        train_body(job, LocalContext(out, "cuda" if choice[0] == "gpu" else "cpu", progress=progress))
        engine = "torch"
    else:
        launch.fit(train_body, job, out_dir=out)
        engine = launch.engine
    wall = time.perf_counter() - t0
    state = read_checkpoint(out / "train_state.pt", "training state")
    from bdgf.plots import plot_train_curves

    try:
        plot_train_curves(read_jsonl(out / "log.jsonl"), out / "curves.png")
    except Exception as exc:  # noqa: BLE001 - a plot never fails a finished run
        log.warning("train curves not drawn: %s", exc)
    best = state["best"]
    fit = score_checkpoint(store, out / "classifier.pt", train_split, patch_size=tc.patch_size, modalities=view)
    summary = TrainSummary(seed=seed, epoch=int(best["epoch"]), val_oa=float(best["val_oa"]),
                           val_nll=float(best["val_nll"]), wall_s=wall, branches=list(tc.branches),
                           workers=max(workers, 1), engine=engine, epochs_run=int(state["epoch"]),
                           train_oa=fit["oa"], train_nll=fit["nll"], stopped_early=bool(best.get("stopped_early")),
                           patience=tc.patience, train_split=train_split, val_split=val_split,
                           device=choice[0], device_reason=choice[1])
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


def score_checkpoint(store: str | Path, checkpoint: str | Path, split: str, *, patch_size: int,
                     modalities: ModalityView | None = None) -> dict:
    """OA, NLL and the classification report of the classifier saved at ``checkpoint`` on every
    pixel of ``split`` (no modality absent): {"oa", "nll", "report"}."""
    scene = Scene.open(store)
    view = modalities or ModalityView(scene.modality_names, scene.channel_modality)
    model = classifier_from_checkpoint(read_checkpoint(checkpoint, "classifier checkpoint"))
    ds = PatchDataset(str(store), split, patch_size=patch_size, features=LEVELS)
    y, p, _, _ = predict(model, DataLoader(ds, batch_size=256), view)
    nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    return {"oa": float((p.argmax(1) == y).mean()), "nll": nll,
            "report": classification_report(y, p.argmax(1), scene.class_names)}


def _mean_std(values) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(list(values), np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def evaluate(store: str | Path, run_dir: str | Path, split: str = "test", seeds: list[int] | None = None,
             write_map: bool = True, absent: str | None = None) -> EvalSummary:
    """Score every trained seed on ``split``. Writes ``eval/metrics_<split>.json`` (per seed, per
    branch, mean ± sample std over seeds; ``metrics.json`` for test), ``eval/predictions_<split>.npz``
    (pixel coords and every seed's ensemble probabilities) and a map PNG beside the ground truth.
    ``absent``: a modality to classify without (its bands unavailable, its features the cached
    ones computed without it); the files then end in ``_without_<modality>``."""
    scene = Scene.open(store)
    run = Run(run_dir)
    run.check_scene(scene)
    if split not in scene.splits:
        raise BDGFError(f"{store}: no split {split!r}; has {scene.splits}")
    modalities = scene.modality_names
    if absent is not None and absent not in modalities:
        raise BDGFError(f"--absent {absent!r}: not a modality of {store}; it has {modalities}")
    if absent is not None and len(modalities) < 2:
        raise BDGFError(f"--absent {absent!r}: the scene has no other modality to classify from")
    names_needed = tuple(feature_name(level, absent) for level in LEVELS)
    feature_cache.ready_channels(store, names_needed)
    seeds = seeds if seeds is not None else run.trained_seeds()
    if not seeds:
        raise BDGFError(f"{run.path}: no trained classifier; run `bdgf train` first")
    cfg = run.config().train
    view = ModalityView(modalities, scene.channel_modality)
    ds = PatchDataset(store, split, patch_size=cfg.patch_size, features=sorted(set(LEVELS + names_needed)))
    loader = DataLoader(ds, batch_size=256)
    which = -1 if absent is None else modalities.index(absent)
    suffix = "" if absent is None else f"_without_{absent}"
    names = scene.class_names
    per_seed, probs = {}, {}
    coords = None
    for s in seeds:
        model = run.load_classifier(s)
        y, p, per_branch, coords = predict(model, loader, view, absent=which)
        rep = classification_report(y, p.argmax(1), names)
        rep["branches"] = {b: classification_report(y, q.argmax(1), names) for b, q in per_branch.items()}
        per_seed[s] = rep
        probs[s] = p
    branches = list(next(iter(per_seed.values()))["branches"])
    summary = EvalSummary(
        split=split, seeds=list(seeds),
        oa=_mean_std(per_seed[s]["oa"] for s in seeds),
        aa=_mean_std(per_seed[s]["aa"] for s in seeds),
        kappa=_mean_std(per_seed[s]["kappa"] for s in seeds),
        branches={b: {k: _mean_std(per_seed[s]["branches"][b][k] for s in seeds) for k in ("oa", "aa", "kappa")}
                  for b in branches},
        per_seed={str(k): v for k, v in per_seed.items()}, absent=absent,
    )
    out = run.stage_dir("eval")
    (out / f"metrics_{split}{suffix}.json").write_text(json.dumps(summary.to_dict(), indent=2))
    if split == "test" and absent is None:
        (out / "metrics.json").write_text(json.dumps(summary.to_dict(), indent=2))
    np.savez_compressed(out / f"predictions_{split}{suffix}.npz", coords=coords, seeds=np.asarray(seeds),
                        probs=np.stack([probs[s] for s in seeds]).astype(np.float32))
    if write_map:
        from bdgf.preview import save_preview

        pred_map = np.zeros(scene.shape, np.int64)
        pred_map[coords[:, 0], coords[:, 1]] = probs[seeds[0]].argmax(1) + 1
        save_preview(scene, out / f"map_{split}{suffix}.png", prediction=pred_map)
    return summary
