"""Grouped cross-validation of the classifier (``bdgf cv``): an accuracy estimate for a scene with
a few hundred labelled pixels and no separate test set.

Design:

* **Groups.** Every labelled pixel of the store's own splits (train, val, test; any earlier
  ``cv*`` split is ignored) is pooled; a *region* is a connected (8-neighbour) group of one
  class's pixels. :func:`bdgf.data.splits.grouped_folds` deals whole regions to ``folds`` folds,
  stratified by class (per class, largest region first, to the fold with the fewest pixels of
  that class), so a region never straddles two folds.
* **Per fold k.** test = fold k's regions; train = the other folds' pixels farther than the
  buffer (5 px, Chebyshev: the patch radius) from any test pixel; val (for model selection and
  early stopping) is carved from that train like an ingest's val (whole regions, buffered). The
  three rasters are written into the store as label splits ``cv<k>_train``, ``cv<k>_val``,
  ``cv<k>_test`` (the previous run's ``cv*`` splits are removed first).
* **Shared stages.** The run's pretrained denoiser and the features cached in the store are
  used as they are; only the classifier is trained per fold (:func:`bdgf.engine.classify.train`
  with the fold's split names, into ``RUN/cv/fold<k>/``), with the run's config and one seed.
* **Report.** OA, AA and κ of each fold's classifier on its test regions, and their mean ± sample
  standard deviation (ddof=1) over folds, in ``RUN/eval/cv.json`` (:class:`~bdgf.summaries.CVSummary`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import zarr

from bdgf.data.scene import DEFAULT_CHUNK, Scene
from bdgf.data.splits import DEFAULT_BUFFER, fold_splits, grouped_folds, regions
from bdgf.engine.classify import score_checkpoint, train
from bdgf.errors import BDGFError
from bdgf.progress import Progress
from bdgf.run import Run
from bdgf.summaries import CVSummary

log = logging.getLogger("bdgf.cv")

CV_SPLIT = re.compile(r"cv\d+_(train|val|test)")


def cv_split_name(fold: int, part: str) -> str:
    """The store's label split of ``part`` (train, val, test) of fold ``fold``: ``cv<fold>_<part>``."""
    return f"cv{int(fold)}_{part}"


def pooled_labels(scene: Scene) -> np.ndarray:
    """(H, W) int64 every labelled pixel of the store's own splits (train, val, test; not cv*)."""
    out = np.zeros(scene.shape, np.int64)
    for split in scene.splits:
        if not CV_SPLIT.fullmatch(split):
            lab = scene.labels(split)
            out = np.where(lab > 0, lab, out)
    return out


def write_cv_splits(store: str | Path, rasters: dict[str, np.ndarray]) -> Scene:
    """Replace the store's ``cv*`` label splits with ``rasters`` {name: (H, W)} and update the
    split counts in its metadata; returns the store reopened."""
    root = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
    labels = root["labels"]
    meta = dict(root.attrs["bdgf"])
    counts = {k: v for k, v in meta["split_counts"].items() if not CV_SPLIT.fullmatch(k)}
    for name in list(labels.array_keys()):
        if CV_SPLIT.fullmatch(name):
            del labels[name]
    for name, lab in rasters.items():
        labels.create_array(name, data=np.asarray(lab, np.uint16), chunks=(DEFAULT_CHUNK, DEFAULT_CHUNK),
                            dimension_names=("y", "x"))
        counts[name] = int(np.count_nonzero(lab))
    meta["split_counts"] = counts
    root.attrs["bdgf"] = meta
    return Scene.open(store)


def cross_validate(store: str | Path, run_dir: str | Path, *, folds: int = 5, seed: int = 0,
                   overrides: dict | None = None, val_fraction: float = 0.2, val_split: str = "regions",
                   buffer: int = DEFAULT_BUFFER, progress: bool = True) -> CVSummary:
    """Grouped ``folds``-fold cross-validation of the run's classifier on ``store`` (see the module
    docstring); writes ``RUN/eval/cv.json`` and returns the summary."""
    store = Path(store)
    scene = Scene.open(store)
    run = Run(run_dir)
    run.check_scene(scene)
    pooled = pooled_labels(scene)
    fold = grouped_folds(pooled, folds, seed)
    n_regions = regions(pooled)[1]
    rasters = {}
    for k in range(folds):
        parts = fold_splits(pooled, fold, k, val_fraction=val_fraction, seed=seed + k, method=val_split,
                            buffer=buffer)
        for part, lab in parts.items():
            if not lab.any():
                raise BDGFError(f"cv fold {k}: its {part} split is empty (too few labelled regions for {folds} folds)")
            rasters[cv_split_name(k, part)] = lab
    scene = write_cv_splits(store, rasters)
    region_id = regions(pooled)[0]
    t0 = time.perf_counter()
    per_fold = []
    bar = Progress(folds, "cv", "fold", enabled=progress)
    try:
        for k in range(folds):
            out = run.path / "cv" / f"fold{k}"
            ts = train(store, run.path, seed=seed, overrides=overrides, progress=False,
                       train_split=cv_split_name(k, "train"), val_split=cv_split_name(k, "val"), out_dir=out)
            tc = run.config().with_overrides(overrides).train if overrides else run.config().train
            score = score_checkpoint(store, out / "classifier.pt", cv_split_name(k, "test"), patch_size=tc.patch_size)
            rep = score["report"]
            test = rasters[cv_split_name(k, "test")]
            per_fold.append({
                "fold": k, "test_regions": int(len(np.unique(region_id[test > 0]))), "test_pixels": int(rep["n"]),
                "train_pixels": int(np.count_nonzero(rasters[cv_split_name(k, "train")])),
                "val_pixels": int(np.count_nonzero(rasters[cv_split_name(k, "val")])),
                "oa": rep["oa"], "aa": rep["aa"], "kappa": rep["kappa"], "per_class": rep["per_class"],
                "epoch": ts.epoch, "epochs_run": ts.epochs_run, "val_oa": ts.val_oa, "val_nll": ts.val_nll,
                "train_oa": ts.train_oa, "train_nll": ts.train_nll,
            })
            bar.update(1, oa=rep["oa"])
    finally:
        bar.close()

    def mean_std(key: str) -> dict[str, float]:
        v = np.asarray([f[key] for f in per_fold], np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    summary = CVSummary(folds=folds, seed=seed, oa=mean_std("oa"), aa=mean_std("aa"), kappa=mean_std("kappa"),
                        per_fold=per_fold, regions=int(n_regions), buffer=int(buffer),
                        wall_s=time.perf_counter() - t0)
    (run.stage_dir("eval") / "cv.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary
