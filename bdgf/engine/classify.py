"""Stage 2, single process: train the diffusion-guided classifier, select on val, evaluate.

``classifier_step`` and ``train_epochs`` are the loop pieces the Ray Train entry point reuses;
``train`` and ``evaluate`` wire them to a scene store and a run directory.

Glossary: B batch, C bands, P patch, K classes, N pixels of a split.
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
from torch.utils.data import DataLoader

from bdgf.config import RunConfig, TrainConfig
from bdgf.data.patches import PatchDataset
from bdgf.data.scene import Scene
from bdgf.diffusion.features import LEVELS, cached_spec
from bdgf.engine.loop import TorchStepper, check_finite
from bdgf.errors import BDGFError
from bdgf.losses import MutualLearningConfig, MutualLearningLoss
from bdgf.metrics import classification_report
from bdgf.models.classifier import BDGFClassifier, ClassifierConfig
from bdgf.run import JsonlLogger, Run, atomic_save, read_jsonl

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


def _inputs(batch: dict, device) -> tuple[torch.Tensor, ...]:
    return tuple(batch[k].to(device) for k in ("patch", *LEVELS))


def classifier_step(model, criterion, batch: dict, device="cpu") -> tuple[torch.Tensor, dict[str, float]]:
    """Forward + mutual-learning loss of one batch -> (loss, logs with every term)."""
    out = model(*_inputs(batch, device))
    loss, terms = criterion(out["logits"], out["z"], batch["label"].to(device))
    return loss, {("loss" if k == "loss" else f"term/{k}"): float(v) for k, v in terms.items()}


@torch.no_grad()
def predict(model, loader: Iterable[dict], device="cpu") -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(labels (N,), ensemble probs (N, K), {branch: probs (N, K)}, coords (N, 2)) over a loader."""
    model.eval()
    ys, ps, cs, per = [], [], [], {}
    for batch in loader:
        out = model(*_inputs(batch, device))
        ys.append(batch["label"].numpy())
        cs.append(batch["coords"].numpy())
        ps.append(out["probs"].cpu().numpy())
        for b, lg in out["logits"].items():
            per.setdefault(b, []).append(lg.softmax(-1).cpu().numpy())
    model.train()
    return (np.concatenate(ys), np.concatenate(ps), {b: np.concatenate(v) for b, v in per.items()},
            np.concatenate(cs))


def train_epochs(model, criterion, train_loader, val_loader, stepper, *, epochs: int, val_every: int = 1,
                 patience: int = 10, on_log: Callable[[dict], None] | None = None,
                 on_best: Callable[[int, float], None] | None = None, progress: bool = False,
                 device="cpu", set_epoch: Callable[[int], None] | None = None) -> dict:
    """Train for up to ``epochs``; after every ``val_every`` epochs score val OA and call
    ``on_best(epoch, oa)`` when it improves (ties in OA broken by the lower val NLL). Stops after ``patience`` epochs without improvement.
    NaN loss stops with TrainingDiverged (the best checkpoint so far is kept)."""
    best = {"epoch": 0, "val_oa": -1.0, "val_nll": float("inf")}
    step, since_best = 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * len(train_loader), desc="train", unit="batch")
    model.train()
    t0, seen = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        if set_epoch is not None:
            set_epoch(epoch)
        for batch in train_loader:
            step += 1
            loss, logs = classifier_step(model, criterion, batch, device)
            check_finite(loss, step, best["epoch"] or None, "train")
            stepper.step(loss)
            seen += int(batch["label"].shape[0])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", val_oa=f"{max(best['val_oa'], 0):.3f}")
            if on_log is not None:
                on_log({"step": step, "epoch": epoch, **logs})
        if epoch % val_every == 0 or epoch == epochs:
            y, p, _, _ = predict(model, val_loader, device)
            oa = float((p.argmax(1) == y).mean())
            nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
            dt = time.perf_counter() - t0
            if on_log is not None:
                on_log({"epoch": epoch, "val_oa": oa, "val_nll": nll, "patches_per_s": seen / max(dt, 1e-9)})
            t0, seen = time.perf_counter(), 0
            # Higher val OA wins; a tie (common on small val splits) goes to the lower val NLL.
            if oa > best["val_oa"] or (oa == best["val_oa"] and nll < best["val_nll"]):
                best = {"epoch": epoch, "val_oa": oa, "val_nll": nll}
                since_best = 0
                if on_best is not None:
                    on_best(epoch, oa)
            else:
                since_best += val_every
                if since_best >= patience:
                    break
    if bar is not None:
        bar.close()
    return best


def _features_ready(store: str | Path) -> dict[str, int]:
    spec, complete = cached_spec(store)
    if spec is None or not complete:
        raise BDGFError(f"{store}: no complete diffusion features; run `bdgf features {store} --run RUN` first")
    scene = Scene.open(store)
    return {name: int(scene.root["features"][name].shape[0]) for name in LEVELS}


def _loaders(store, cfg: TrainConfig, seed: int):
    kw = dict(patch_size=cfg.patch_size, features=LEVELS)
    train_ds = PatchDataset(store, "train", seed=seed, shuffle=True, **kw)
    split = "val" if "val" in Scene.open(store).splits else "train"
    if split == "train":
        log.warning("%s has no val split: model selection falls back to train accuracy", store)
    val_ds = PatchDataset(store, split, **kw)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                              num_workers=cfg.num_workers, drop_last=len(train_ds) > cfg.batch_size)
    val_loader = DataLoader(val_ds, batch_size=256, num_workers=cfg.num_workers)
    return train_ds, train_loader, val_loader


def seed_dir(run: Run, seed: int) -> Path:
    return run.path / "train" / f"seed{seed}"


def train(store: str | Path, run_dir: str | Path, *, seed: int | None = None,
          overrides: dict | None = None, progress: bool = True) -> dict:
    """Train one classifier (one seed) on a store with cached features into ``run_dir``."""
    scene = Scene.open(store)
    run = Run(run_dir)
    run.check_scene(scene)
    config = run.config()
    if overrides:
        config = config.with_overrides(overrides)
    cfg = config.train
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    feature_channels = _features_ready(store)
    train_ds, train_loader, val_loader = _loaders(store, cfg, seed)
    model, criterion = build_classifier(cfg, scene.total_bands, feature_channels, scene.num_classes)
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stepper = TorchStepper(model, optimizer, cfg.grad_clip)
    out = seed_dir(run, seed)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    logger = JsonlLogger(out / "log.jsonl")

    def save_best(epoch: int, oa: float) -> None:
        atomic_save({"model": model.state_dict(), "classifier_config": model.config.to_dict(),
                     "epoch": epoch, "val_oa": oa, "seed": seed, "train_config": asdict(cfg)},
                    out / "classifier.pt")

    t0 = time.perf_counter()
    try:
        best = train_epochs(model, criterion, train_loader, val_loader, stepper, epochs=cfg.epochs,
                            val_every=cfg.val_every, patience=cfg.patience, on_log=logger, on_best=save_best,
                            progress=progress, set_epoch=train_ds.set_epoch)
    finally:
        logger.close()
    from bdgf.plots import plot_train_curves

    plot_train_curves(read_jsonl(out / "log.jsonl"), out / "curves.png")
    summary = {"seed": seed, **best, "wall_s": time.perf_counter() - t0, "branches": list(cfg.branches)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_classifier(path: Path, device="cpu") -> BDGFClassifier:
    if not path.exists():
        raise BDGFError(f"{path}: no classifier checkpoint; run `bdgf train` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = BDGFClassifier(ClassifierConfig.from_dict(ckpt["classifier_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def evaluate(store: str | Path, run_dir: str | Path, split: str = "test", seeds: list[int] | None = None,
             write_map: bool = True) -> dict:
    """Score every trained seed on ``split``; writes ``eval/metrics.json`` (per seed, per branch,
    mean ± std over seeds) and a classification map PNG beside the ground truth."""
    scene = Scene.open(store)
    run = Run(run_dir)
    run.check_scene(scene)
    if split not in scene.splits:
        raise BDGFError(f"{store}: no split {split!r}; has {scene.splits}")
    _features_ready(store)
    found = sorted(int(p.name[4:]) for p in (run.path / "train").glob("seed*") if (p / "classifier.pt").exists())
    seeds = seeds if seeds is not None else found
    if not seeds:
        raise BDGFError(f"{run.path}: no trained classifier; run `bdgf train` first")
    cfg = run.config().train
    loader = DataLoader(PatchDataset(store, split, patch_size=cfg.patch_size, features=LEVELS), batch_size=256)
    names = scene.class_names
    per_seed = {}
    first_pred = None
    for s in seeds:
        model = load_classifier(seed_dir(run, s) / "classifier.pt")
        y, p, per_branch, coords = predict(model, loader)
        rep = classification_report(y, p.argmax(1), names)
        rep["branches"] = {b: classification_report(y, q.argmax(1), names) for b, q in per_branch.items()}
        per_seed[s] = rep
        if first_pred is None:
            first_pred = (coords, p.argmax(1))
    summary = {"split": split, "seeds": seeds, "per_seed": {str(k): v for k, v in per_seed.items()}}
    for key in ("oa", "aa", "kappa"):
        vals = np.array([per_seed[s][key] for s in seeds])
        summary[key] = {"mean": float(vals.mean()), "std": float(vals.std())}
    branches = list(next(iter(per_seed.values()))["branches"])
    summary["branches"] = {
        b: {k: {"mean": float(np.mean([per_seed[s]["branches"][b][k] for s in seeds])),
                "std": float(np.std([per_seed[s]["branches"][b][k] for s in seeds]))} for k in ("oa", "aa", "kappa")}
        for b in branches
    }
    out = run.stage_dir("eval")
    (out / f"metrics_{split}.json").write_text(json.dumps(summary, indent=2))
    if split == "test":
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if write_map and first_pred is not None:
        from bdgf.preview import save_preview

        pred_map = np.zeros(scene.shape, np.int64)
        coords, labels = first_pred
        pred_map[coords[:, 0], coords[:, 1]] = labels + 1
        save_preview(scene, out / f"map_{split}.png", prediction=pred_map)
    return summary
