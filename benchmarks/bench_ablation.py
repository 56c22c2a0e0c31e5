"""Ablations of BDGF on a synthetic preset (default ``hard``), with paired seed statistics.

Variants (docs/method.md, Stages 1 and 2):

=============  =========================================  ===============================
variant        pretraining (one per group and seed)       classifier
=============  =========================================  ===============================
full           balanced loss + adaptive masking           cnn + mamba + transformer
cnn_only       same denoiser and features as ``full``      cnn
mamba_only     same denoiser and features as ``full``      mamba
tr_only        same denoiser and features as ``full``      transformer
no_mask        balanced loss, ``masking.mode: none``        all three
uniform_mask   balanced loss, ``masking.mode: uniform``     all three
concat_mse     plain MSE over the concatenation,           all three
               adaptive masking
=============  =========================================  ===============================

Seeds. Every pretraining group is pretrained once per **pretraining seed** (``--pretrain-seeds``,
default 0 1 2: the denoiser's initial weights and its tile stream), and its dense features are
recomputed from that checkpoint; on each, a classifier is trained per **classifier seed**
(``--seeds``, default 0 1 2). So a variant has one run per (pretraining seed, classifier seed)
pair, and every variant has the same pairs as ``full``.

Statistics (benchmarks/stats.py). Per variant: mean ± sample std (ddof 1) of OA / AA / κ over its
runs. Per variant vs full: the paired difference ``variant − full`` over matched (pretraining seed,
classifier seed) pairs, its mean and 95 % t-interval (n − 1 df), and whether that interval
excludes 0. Runs that share a pretraining seed are not independent of each other, so a second,
conservative interval averages the differences within each pretraining seed first (n = number
of pretraining seeds). The scene (seed 0) and the scored test pixels are the same for every run.

Everything is written incrementally under ``--work`` (one JSON per group and pretraining seed, one
per variant and seed pair), so a killed run resumes where it stopped; a work dir remembers its
preset and config and refuses to resume under another. ``--quick`` is a smoke check (1 × 1 seeds,
a few steps and epochs); its numbers mean nothing. The expected runtime is printed before
anything runs (``--estimate`` prints it and exits).

    .venv/bin/python benchmarks/bench_ablation.py                 # full run (see --estimate)
    .venv/bin/python benchmarks/bench_ablation.py --quick         # smoke check
    .venv/bin/python benchmarks/bench_ablation.py --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOAD0 = os.getloadavg()  # 1/5/15-min load when the script started
for _p in (ROOT, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import stats as bench_stats  # noqa: E402  (benchmarks/stats.py)

DEFAULT_PRESET = "hard"
SCENE_SEED = 0
METRICS = ("oa", "aa", "kappa")
REFERENCE = "full"

# The ablation config: DEMO_OVERRIDES (sized for 2 CPU cores: 300 pretraining steps, 25 classifier
# epochs) with the masking warm-up at 30 % of the steps (as in the earlier ablations), every
# epoch's best-val checkpoint kept (patience = epochs) and one checkpoint at the end. 12
# pretrainings (4 groups × 3 seeds) and 63 classifier runs (7 variants × 3 × 3 seeds) take ~17 min
# on 2 cores at load ~5 (see COST_S); the pilot's best val epoch was still 17-25 of 25.
ABLATION_OVERRIDES = {
    "pretrain.steps": 300,
    "pretrain.log_every": 30,
    "pretrain.checkpoint_every": 300,
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 90},
    "train.epochs": 25,
    "train.patience": 25,
}
QUICK_OVERRIDES = {
    "pretrain.steps": 12,
    "pretrain.log_every": 2,
    "pretrain.checkpoint_every": 12,
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 4},
    "features.timesteps": [5, 50],
    "train.epochs": 2,
    "train.patience": 2,
}
# Which test pixels are scored: all of them by default (TEST_SUBSET = 0); N > 0 scores a fixed
# random subset of N (the same pixels for every variant and seed, drawn with TEST_SUBSET_SEED
# before anything is trained). Either way they are written into each store copy as SCORED_SPLIT.
TEST_SUBSET = 0
QUICK_TEST_SUBSET = 300
TEST_SUBSET_SEED = 12345
SCORED_SPLIT = "scored"  # the split the subset is written to in each store copy

# Runtime model for the estimate, seconds: measured 2026-12-03 with 1 torch thread on 2 cores at
# load ~5 (shared with other jobs), on the ``hard`` preset (117 train + val px, 7396 test px). A
# quiet machine is ~2× faster. A classifier run costs "run" (model, loaders, evaluate's set-up)
# plus, per branch, epochs × "epoch" (per 100 train + val px, val pass included) + scored test
# pixels × "px".
COST_S = {
    "scene": 1.5,  # write the scene store copy
    "pretrain_step": 0.1,  # one step, batch 8 of 32×32 tiles
    "features_per_timestep": 0.8,  # dense features over the 128×128 scene, per timestep
    "run": 4.0,
}
BRANCH_COST_S = {b: {"epoch": 0.06, "px": 0.0001} for b in ("cnn", "mamba", "transformer")}

# group -> pretraining overrides (on top of the base config)
GROUPS = {
    "full": {},
    "no_mask": {"pretrain.masking": {"mode": "none"}},
    "uniform_mask": {"pretrain.masking": {"mode": "uniform"}},
    "concat_mse": {"pretrain.loss_kind": "concat"},
}
ALL_BRANCHES = ["cnn", "mamba", "transformer"]
# variant -> (pretraining group, classifier branches, description)
VARIANTS = {
    "full": ("full", ALL_BRANCHES, "balanced loss + adaptive masking + 3 branches"),
    "cnn_only": ("full", ["cnn"], "CNN branch alone (same features)"),
    "mamba_only": ("full", ["mamba"], "Mamba branch alone (same features)"),
    "tr_only": ("full", ["transformer"], "Transformer branch alone (same features)"),
    "no_mask": ("no_mask", ALL_BRANCHES, "no modality masking"),
    "uniform_mask": ("uniform_mask", ALL_BRANCHES, "uniform masking, p = p0"),
    "concat_mse": ("concat_mse", ALL_BRANCHES, "plain MSE over the concatenation"),
}


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def step_overrides(pretrain_steps: int, epochs: int) -> dict:
    """Overrides for ``--pretrain-steps`` / ``--epochs`` (0: keep); masking warm-up = 30 % of the steps."""
    extra = {}
    if pretrain_steps:
        n = pretrain_steps
        extra.update({"pretrain.steps": n, "pretrain.checkpoint_every": n, "pretrain.log_every": max(1, n // 10),
                      "pretrain.masking": {"mode": "adaptive", "warmup_steps": max(1, round(0.3 * n))}})
    if epochs:
        extra.update({"train.epochs": epochs, "train.patience": epochs})
    return extra


def ablation_overrides(quick: bool, extra: dict | None = None) -> dict:
    """The overrides on top of RunConfig(): DEMO_OVERRIDES + the ablation's (+ quick) + ``extra``."""
    from bdgf.demo import DEMO_OVERRIDES

    over = {**DEMO_OVERRIDES, **ABLATION_OVERRIDES}
    if quick:
        over.update(QUICK_OVERRIDES)
    over.update(extra or {})
    return over


def group_config(over: dict, group: str, pretrain_seed: int):
    """RunConfig of one pretraining group and seed: the ablation overrides + the group's change."""
    from bdgf.config import RunConfig

    base = RunConfig().with_overrides({**over, "pretrain.seed": int(pretrain_seed)})
    change = dict(GROUPS[group])
    if "pretrain.masking" in change:  # keep the base warm-up, change the mode only
        change["pretrain.masking"] = {**base.pretrain.masking, **change["pretrain.masking"]}
    return base.with_overrides(change)


def groups_of(variants: list[str]) -> list[str]:
    """The pretraining groups the variants need, in first-use order."""
    out: list[str] = []
    for v in variants:
        if VARIANTS[v][0] not in out:
            out.append(VARIANTS[v][0])
    return out


def check_stamp(work: Path, stamp: dict) -> None:
    """Write ``work/config.json``, or refuse when it already holds another config."""
    path = work / "config.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(stamp)):
        raise SystemExit(f"{work} holds results of another preset or config ({path}); pass another --work or delete it")
    _write_json(path, stamp)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Runtime estimate
# ----------------------------------------------------------------------------------------


def estimate_seconds(plan: dict, over: dict, train_px: int, test_px: int) -> dict:
    """{"pretrain", "classify", "total"} expected seconds for the units of ``plan`` not done yet
    (plan from :func:`todo`), from COST_S / BRANCH_COST_S, the config and the pixel counts."""
    per_group = (COST_S["scene"] + over["pretrain.steps"] * COST_S["pretrain_step"]
                 + len(over["features.timesteps"]) * COST_S["features_per_timestep"])
    classify = 0.0
    for variant in plan["runs"]:
        classify += COST_S["run"]
        for branch in VARIANTS[variant][1]:
            cost = BRANCH_COST_S[branch]
            classify += over["train.epochs"] * cost["epoch"] * train_px / 100 + test_px * cost["px"]
    pretrain = per_group * len(plan["groups"])
    return {"pretrain": pretrain, "classify": classify, "total": pretrain + classify}


def todo(work: Path, variants: list[str], pretrain_seeds: list[int], seeds: list[int]) -> dict:
    """{"groups": [(group, pretraining seed)], "runs": [variant per missing run]} not yet on disk."""
    groups = [(g, p) for p in pretrain_seeds for g in groups_of(variants)
              if not (group_dir(work, g, p) / "group.json").exists()]
    runs = [v for p in pretrain_seeds for s in seeds for v in variants if not result_path(work, v, p, s).exists()]
    return {"groups": groups, "runs": runs}


def pixel_counts(preset: str, test_subset: int) -> tuple[int, int]:
    """(train + val pixels: what one classifier epoch walks over, scored test pixels) of the preset's
    benchmark scene (SCENE_SEED) with this ``--test-subset``."""
    from bdgf.data.synthetic import get_config, make_scene

    cfg = get_config(preset)
    n_test = int(np.count_nonzero(make_scene(preset, SCENE_SEED).labels["test"]))
    return len(cfg.classes) * (cfg.train_per_class + cfg.val_per_class), min(test_subset or n_test, n_test)


# ----------------------------------------------------------------------------------------
# Work units
# ----------------------------------------------------------------------------------------


def group_dir(work: Path, group: str, pretrain_seed: int) -> Path:
    return work / group / f"p{pretrain_seed}"


def result_path(work: Path, variant: str, pretrain_seed: int, seed: int) -> Path:
    return work / "results" / variant / f"p{pretrain_seed}_s{seed}.json"


def prepare_group(work: Path, preset: str, group: str, pretrain_seed: int, over: dict, test_subset: int,
                  log) -> dict:
    """Scene store copy (with the scored test subset as split SCORED_SPLIT) + pretrain + features
    for one pretraining group and seed (resumable)."""
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain
    from bdgf.run import read_jsonl

    gdir = group_dir(work, group, pretrain_seed)
    done = gdir / "group.json"
    if done.exists():
        return json.loads(done.read_text())
    gdir.mkdir(parents=True, exist_ok=True)
    tag = f"[{group} p{pretrain_seed}]"
    store, run = gdir / f"{preset}.zarr", gdir / "run"
    t0 = time.perf_counter()
    data = make_scene(preset, SCENE_SEED)
    data.labels[SCORED_SPLIT] = scored_labels(data.labels["test"], test_subset)
    write_scene(data, store, overwrite=True, progress=False)
    cfg = group_config(over, group, pretrain_seed)
    log(f"{tag} pretrain {cfg.pretrain.steps} steps, loss={cfg.pretrain.loss_kind}, masking={cfg.pretrain.masking}")
    summary = pretrain(store, run, cfg, overwrite=True, progress=False).to_dict()
    log(f"{tag} pretrain done in {summary['wall_s']:.0f} s; loss/mod={_fmt(summary['loss_per_modality'])} "
        f"p_mask={_fmt(summary['p_mask'])}")
    feats = compute_features(store, run, progress=False).to_dict()
    log(f"{tag} features {feats['state']} in {feats['wall_s']:.0f} s")
    trajectory = [
        {k: v for k, v in row.items() if k == "step" or k.startswith(("loss/", "p_mask/", "loss"))}
        for row in read_jsonl(run / "pretrain" / "log.jsonl") if "step" in row
    ]
    out = {"group": group, "pretrain_seed": pretrain_seed, "store": str(store), "run": str(run),
           "pretrain": summary, "features_wall_s": feats["wall_s"], "trajectory": trajectory,
           "config": cfg.to_dict(), "wall_s": time.perf_counter() - t0}
    _write_json(done, out)
    return out


def scored_test_indices(n_test: int, subset: int) -> np.ndarray:
    """Sorted indices of the scored test pixels: a fixed random subset (all when subset is 0)."""
    if not subset or subset >= n_test:
        return np.arange(n_test)
    return np.sort(np.random.default_rng(TEST_SUBSET_SEED).choice(n_test, subset, replace=False))


def scored_labels(test: np.ndarray, subset: int) -> np.ndarray:
    """(H, W) the test raster kept on a fixed random subset of ``subset`` of its labelled pixels
    (row-major order, drawn with TEST_SUBSET_SEED; all of them when 0), 0 elsewhere."""
    coords = np.argwhere(test > 0)
    keep = tuple(coords[scored_test_indices(len(coords), subset)].T)
    out = np.zeros_like(test)
    out[keep] = test[keep]
    return out


#: Variants also scored with each modality absent (``evaluate(absent=m)``): does masked
#: pretraining let the model cope without a modality?
ABSENT_VARIANTS = ("full", "no_mask")


def score(store: str, run_dir: str, seed: int, absent: str | None = None) -> dict:
    """Test metrics of run_dir's classifier ``seed`` on the store's SCORED_SPLIT (the fixed test
    subset written with the scene), through the library's own ``evaluate`` (``absent``: without
    that modality)."""
    from bdgf.data.scene import Scene
    from bdgf.engine.classify import evaluate

    rep = evaluate(store, run_dir, split=SCORED_SPLIT, seeds=[seed], write_map=False,
                   absent=absent).per_seed[str(seed)]
    return {**rep, "n_scored": int(np.count_nonzero(Scene.open(store).labels(SCORED_SPLIT)))}


def run_one(work: Path, variant: str, pretrain_seed: int, seed: int, group_info: dict, log) -> dict:
    """Train and score one (variant, pretraining seed, classifier seed) run (resumable)."""
    from bdgf.engine.classify import train

    path = result_path(work, variant, pretrain_seed, seed)
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    branches = VARIANTS[variant][1]
    t0 = time.perf_counter()
    # Variants that share a group share its run dir: train() writes train/seed{s}/, so train and
    # score one (variant, seed) at a time, and keep only the metrics.
    r = train(group_info["store"], group_info["run"], seed=seed, overrides={"train.branches": branches},
              progress=False).to_dict()
    rep = score(group_info["store"], group_info["run"], seed)
    absent = {}
    if variant in ABSENT_VARIANTS:
        from bdgf.data.scene import Scene

        for m in Scene.open(group_info["store"]).modality_names:
            got = score(group_info["store"], group_info["run"], seed, absent=m)
            absent[m] = {k: got[k] for k in METRICS}
    out = {"absent": absent, "variant": variant, "pretrain_seed": pretrain_seed, "seed": seed, "branches": branches,
           "val_oa": r["val_oa"], "epoch": r["epoch"], **{k: rep[k] for k in METRICS},
           "per_branch": {b: {k: v[k] for k in METRICS} for b, v in rep["branches"].items()},
           "per_class": rep.get("per_class"), "n_scored": rep["n_scored"], "wall_s": time.perf_counter() - t0}
    _write_json(path, out)
    log(f"[{variant} p{pretrain_seed} s{seed}] OA {out['oa']:.4f} AA {out['aa']:.4f} kappa {out['kappa']:.4f} "
        f"(val OA {r['val_oa']:.3f} @ epoch {r['epoch']}, {out['wall_s']:.0f} s)")
    return out


# ----------------------------------------------------------------------------------------
# Statistics and tables
# ----------------------------------------------------------------------------------------


def by_pair(runs: list[dict], metric: str) -> dict[tuple[int, int], float]:
    """{(pretraining seed, classifier seed): metric} of one variant's runs."""
    return {(r["pretrain_seed"], r["seed"]): float(r[metric]) for r in runs}


def aggregate(rows: dict[str, list[dict]], reference: str = REFERENCE) -> dict:
    """Per variant: n, and per metric {"mean", "sd"} over its runs, plus (vs ``reference``, when
    both have matched runs) "diff": the paired difference variant − reference with its 95 %
    t-interval, and "diff_by_pretrain": the same over per-pretraining-seed means."""
    agg = {}
    for v, runs in rows.items():
        if not runs:
            continue
        agg[v] = {"n": len(runs)}
        for k in METRICS:
            vals = [float(r[k]) for r in runs]
            agg[v][k] = {"mean": float(np.mean(vals)), "sd": bench_stats.sample_std(vals)}
            if v != reference and rows.get(reference):
                mine, ref = by_pair(runs, k), by_pair(rows[reference], k)
                if set(mine) & set(ref):
                    agg[v][k]["diff"] = bench_stats.paired_difference(mine, ref).to_dict()
                    agg[v][k]["diff_by_pretrain"] = bench_stats.clustered_paired_difference(mine, ref).to_dict()
    return agg


def format_absent(rows: dict[str, list[dict]], names: list[str]) -> str:
    """OA (%) with each modality absent, for ABSENT_VARIANTS: mean ± sample std, and no_mask −
    full paired over matched (pretraining seed, classifier seed) with its 95 % t-interval."""
    lines = ["| modality absent | " + " | ".join(v for v in ABSENT_VARIANTS) + " | no_mask − full [95 % CI] |",
             "| --- | " + " | ".join("---" for _ in ABSENT_VARIANTS) + " | --- |"]
    for m in [None, *names]:
        def oa(r):
            return float(r["oa"] if m is None else r["absent"][m]["oa"])

        cells, pairs = [], {}
        for v in ABSENT_VARIANTS:
            runs = [r for r in rows.get(v, []) if m is None or m in (r.get("absent") or {})]
            vals = [oa(r) for r in runs]
            cells.append(_pm(float(np.mean(vals)), bench_stats.sample_std(vals), 100, 2) if vals else "–")
            pairs[v] = {(r["pretrain_seed"], r["seed"]): oa(r) for r in runs}
        try:
            d = bench_stats.paired_difference(pairs[ABSENT_VARIANTS[1]], pairs[ABSENT_VARIANTS[0]]).to_dict()
            diff = format_interval(d, 100, 2)
        except (ValueError, KeyError):
            diff = "–"
        lines.append(f"| {m or 'none (all present)'} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def _pm(mean: float, sd: float, scale: float, digits: int) -> str:
    sd_txt = "—" if np.isnan(sd) else f"{scale * sd:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {sd_txt}"


def format_interval(d: dict, scale: float, digits: int) -> str:
    """'−1.23 [−2.10, −0.36] *' (* = the interval excludes 0); '−1.23 (n = 1)' without one."""
    if d["n"] < 2:
        return f"{scale * d['mean']:+.{digits}f} (n = {d['n']})"
    mark = " *" if d["excludes_zero"] else ""
    return f"{scale * d['mean']:+.{digits}f} [{scale * d['low']:+.{digits}f}, {scale * d['high']:+.{digits}f}]{mark}"


_SCALES = {"oa": (100, 2), "aa": (100, 2), "kappa": (1, 4)}


def format_table(agg: dict) -> str:
    """Mean ± sample std per variant (OA, AA in %; κ)."""
    lines = ["| variant | what changes | runs | OA (%) | AA (%) | κ |", "| --- | --- | --- | --- | --- | --- |"]
    for v, (_, _, desc) in VARIANTS.items():
        if v in agg:
            cells = [_pm(agg[v][k]["mean"], agg[v][k]["sd"], *_SCALES[k]) for k in METRICS]
            lines.append(f"| {v} | {desc} | {agg[v]['n']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def format_diff_table(agg: dict, key: str = "diff") -> str:
    """Paired differences variant − full: mean [95 % CI] per metric; * = the CI excludes 0.
    ``key`` "diff" (over runs) or "diff_by_pretrain" (over per-pretraining-seed means)."""
    unit = "pairs" if key == "diff" else "pretraining seeds"
    lines = [f"| variant − full | {unit} | ΔOA (pts) | ΔAA (pts) | Δκ | CI excludes 0 (OA / AA / κ) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        if v not in agg or key not in agg[v]["oa"]:
            continue
        ds = [agg[v][k][key] for k in METRICS]
        cells = [format_interval(d, *_SCALES[k]) for d, k in zip(ds, METRICS)]
        flags = " / ".join("yes" if d["excludes_zero"] else "no" for d in ds)
        lines.append(f"| {v} | {ds[0]['n']} | {' | '.join(cells)} | {flags} |")
    return "\n".join(lines)


def format_per_class(rows: dict[str, list[dict]]) -> str:
    """Per-class test accuracy (mean over runs) per variant, to see which class pairs move."""
    variants = [v for v in rows if rows[v] and rows[v][0].get("per_class")]
    if not variants:
        return ""
    names = list(rows[variants[0]][0]["per_class"])
    lines = ["| class | " + " | ".join(variants) + " |", "|" + " --- |" * (1 + len(variants))]
    for n in names:
        cells = []
        for v in variants:
            vals = [r["per_class"][n] for r in rows[v] if r["per_class"].get(n) is not None]
            cells.append(f"{100 * np.mean(vals):.1f}" if vals else "—")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_branches(runs: list[dict]) -> str:
    """'cnn 90.1 ± 2.0, ...': the full model's branches scored on their own (OA %, mean ± sample std)."""
    if not runs:
        return ""
    out = []
    for b in runs[0]["per_branch"]:
        oas = [r["per_branch"][b]["oa"] for r in runs]
        out.append(f"{b} {_pm(float(np.mean(oas)), bench_stats.sample_std(oas), 100, 2)}")
    return ", ".join(out)


def format_trajectory(info: dict, names: list[str], n_points: int = 6) -> str:
    traj = [r for r in info["trajectory"] if any(k.startswith("p_mask/") for k in r)]
    s = info["pretrain"]
    lines = [f"- most masked at the end: **{s['most_masked']}**; final p_m: {_fmt(s['p_mask'])}",
             f"- final per-modality x0-MSE (last step's batch): {_fmt(s['loss_per_modality'])}"]
    if traj:
        idx = sorted(set(np.linspace(0, len(traj) - 1, min(n_points, len(traj))).round().astype(int).tolist()))
        head = "| step | " + " | ".join(f"p_mask/{n}" for n in names) + " | " + \
               " | ".join(f"loss/{n}" for n in names) + " |"
        lines += ["", head, "|" + " --- |" * (1 + 2 * len(names))]
        for i in idx:
            r = traj[i]
            cells = [f"{r.get(f'p_mask/{n}', float('nan')):.3f}" for n in names]
            cells += [f"{r.get(f'loss/{n}', float('nan')):.4f}" for n in names]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:.4f}" for k, v in d.items() if v is not None) + "}"


def write_results(path: Path, section: str) -> None:
    """Replace (or append) the section of RESULTS.md whose title is ``section``'s first line
    (a '## ...' heading); the other sections are kept."""
    title = section.splitlines()[0].strip()
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    from bdgf.data.synthetic import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="synthetic scene preset")
    ap.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="pretraining seeds (denoiser init and tile stream; features recomputed per seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    ap.add_argument("--quick", action="store_true", help="smoke check: 1 × 1 seeds, tiny steps/epochs")
    ap.add_argument("--estimate", action="store_true", help="print the expected runtime and exit")
    ap.add_argument("--work", default=None, help="work dir for stores, runs and per-run JSON "
                    "(default /tmp/bdgf_bench/ablation_<preset>[_quick])")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--results", default=None, help="write the section into this RESULTS.md")
    ap.add_argument("--title", default=None,
                    help="RESULTS.md section title (default: 'Ablations on the <preset> preset')")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="override pretrain.steps (masking warm-up = 30%% of it; 0: ABLATION_OVERRIDES)")
    ap.add_argument("--epochs", type=int, default=0, help="override train.epochs and patience (0: ABLATION_OVERRIDES)")
    ap.add_argument("--test-subset", type=int, default=None,
                    help=f"score a fixed random subset of this many test pixels (0: all; default {TEST_SUBSET}, "
                         f"{QUICK_TEST_SUBSET} with --quick)")
    args = ap.parse_args(argv)
    if REFERENCE not in args.variants:
        ap.error(f"--variants must include {REFERENCE!r}: every other variant is compared with it")
    if args.quick:
        args.pretrain_seeds, args.seeds = args.pretrain_seeds[:1], args.seeds[:1]
    if args.test_subset is None:
        args.test_subset = QUICK_TEST_SUBSET if args.quick else TEST_SUBSET
    args.title = args.title or f"Ablations on the {args.preset} preset"
    return args


def command_line(args) -> str:
    """The command that reproduces this table."""
    parts = [".venv/bin/python benchmarks/bench_ablation.py", f"--preset {args.preset}"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--pretrain-seeds {' '.join(map(str, args.pretrain_seeds))}",
              f"--seeds {' '.join(map(str, args.seeds))}",
              f"--test-subset {args.test_subset}"]
    parts += [f"--pretrain-steps {args.pretrain_steps}"] if args.pretrain_steps else []
    parts += [f"--epochs {args.epochs}"] if args.epochs else []
    parts += [f"--variants {' '.join(args.variants)}"] if args.variants != list(VARIANTS) else []
    parts += [f"--work {args.work}"] if args.work else []
    parts += [f"--threads {args.threads}"] if args.threads else []
    return " ".join(parts)


def scene_line(preset: str) -> str:
    from bdgf.data.synthetic import get_config

    c = get_config(preset)
    return (f"synthetic `{preset}` (seed {SCENE_SEED}; {c.height}×{c.width}, HSI {c.hsi_bands} + "
            f"{c.elevation_name} {c.lidar_bands}, {len(c.classes)} classes, {c.train_per_class} train / "
            f"{c.val_per_class} val px per class)")


def make_logger(work: Path):
    logf = open(work / "progress.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    return log


def run_all(args, work: Path, over: dict, log) -> tuple[dict, dict]:
    """Every (pretraining seed, classifier seed, variant) run, pretraining-seed-major so that a run
    cut short holds complete blocks; each group prepared when first needed. (infos, rows)."""
    infos: dict[tuple[str, int], dict] = {}
    rows: dict[str, list[dict]] = {v: [] for v in args.variants}
    for p in args.pretrain_seeds:
        for s in args.seeds:
            for v in args.variants:
                g = VARIANTS[v][0]
                if (g, p) not in infos:
                    infos[g, p] = prepare_group(work, args.preset, g, p, over, args.test_subset, log)
                rows[v].append(run_one(work, v, p, s, infos[g, p], log))
    return infos, rows


def build_section(args, infos: dict, rows: dict, agg: dict, over: dict, wall: float) -> str:
    import torch

    from bdgf.data.scene import Scene

    first = infos[REFERENCE, args.pretrain_seeds[0]]
    names = Scene.open(first["store"]).modality_names
    recorded = sum(i["wall_s"] for i in infos.values()) + sum(r["wall_s"] for rs in rows.values() for r in rs)
    n_test = rows[REFERENCE][0]["n_scored"]
    finals = [f"| {g} | {p} | {_fmt(i['pretrain']['loss_per_modality'])} | {_fmt(i['pretrain']['p_mask'])} | "
              f"{i['pretrain']['wall_s']:.0f} |" for (g, p), i in sorted(infos.items())]
    return "\n".join([
        f"## {args.title}",
        "",
        f"Run {_dt.date.today().isoformat()} on {platform.node() or 'this machine'}: {os.cpu_count()} CPU cores "
        f"(load average {LOAD0[0]:.1f} / {LOAD0[1]:.1f} / {LOAD0[2]:.1f} at start; end {os.getloadavg()[0]:.1f}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; compute recorded for the whole "
        f"ablation {recorded / 60:.1f} min (this invocation {wall / 60:.1f} min).",
        "",
        f"Command: `{command_line(args)}`. Scene: {scene_line(args.preset)}. Config: `DEMO_OVERRIDES` + "
        f"`{changed_from_demo(over)}`.",
        f"Pretraining seeds {args.pretrain_seeds} × classifier seeds {args.seeds}: one denoiser per group and "
        "pretraining seed (the branch-alone variants reuse the full model's), features recomputed from each. "
        f"Model selection on val; numbers on {n_test} test pixels (the same for every run"
        + (f"; a fixed random subset drawn with seed {TEST_SUBSET_SEED})." if args.test_subset
           else "; the whole split)."),
        "",
        "Mean ± sample std (ddof 1) over runs:",
        "",
        format_table(agg),
        "",
        "Paired difference variant − full over matched (pretraining seed, classifier seed) pairs: mean "
        "[95 % t-interval, n − 1 df]; negative = the variant is worse; * = the interval excludes 0.",
        "",
        format_diff_table(agg, "diff"),
        "",
        "The same, conservative: differences averaged within each pretraining seed first (runs that share "
        "a denoiser are not independent), t-interval over those means.",
        "",
        format_diff_table(agg, "diff_by_pretrain"),
        "",
        "Branches of the full model scored on their own (OA %, its 3-branch ensemble's heads): "
        + format_branches(rows[REFERENCE]),
        "",
        "OA (%) with one modality absent at test time (`evaluate --absent`: presence flag 0 and the mask "
        "embedding in the denoiser, the modality unavailable to the classifier), the full model vs the "
        "no-masking ablation (whose denoiser never saw a modality masked); mean ± sample std, and the "
        "paired difference:",
        "",
        format_absent(rows, names),
        "",
        "Per-class test accuracy (%, mean over runs):",
        "",
        format_per_class(rows),
        "",
        f"### Masking trajectory of the full run (pretraining seed {args.pretrain_seeds[0]})",
        "",
        format_trajectory(first, names),
        "",
        "Final state of every pretraining (last step's batch):",
        "",
        "| group | pretraining seed | loss per modality | p_mask | pretrain wall (s) |",
        "| --- | --- | --- | --- | --- |",
        *finals,
        "",
    ])


def changed_from_demo(over: dict) -> dict:
    """The overrides that differ from DEMO_OVERRIDES (what the section's config line shows)."""
    from bdgf.demo import DEMO_OVERRIDES

    return {k: v for k, v in over.items() if DEMO_OVERRIDES.get(k) != v}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    over = ablation_overrides(args.quick, step_overrides(args.pretrain_steps, args.epochs))
    work = Path(args.work or f"/tmp/bdgf_bench/ablation_{args.preset}{'_quick' if args.quick else ''}")
    est = estimate_seconds(todo(work, args.variants, args.pretrain_seeds, args.seeds), over,
                           *pixel_counts(args.preset, args.test_subset))
    n_runs = len(args.variants) * len(args.pretrain_seeds) * len(args.seeds)
    print(f"expected runtime ~{est['total'] / 60:.0f} min (1 torch thread, 2 cores at load ~5; quiet ~2× faster) "
          f"for what is not done yet in {work}: pretraining + features {est['pretrain'] / 60:.1f} min, "
          f"classifiers {est['classify'] / 60:.1f} min ({n_runs} runs in all)", flush=True)
    if args.estimate:
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    check_stamp(work, {"preset": args.preset, "scene_seed": SCENE_SEED, "test_subset": args.test_subset,
                       "overrides": over})
    log = make_logger(work)
    log(f"work dir {work}; preset {args.preset}; pretraining seeds {args.pretrain_seeds}; classifier seeds "
        f"{args.seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads; overrides {over}")
    t_all = time.perf_counter()
    infos, rows = run_all(args, work, over, log)
    agg = aggregate(rows)
    _write_json(work / "summary.json", {"aggregate": agg, "pretrain_seeds": args.pretrain_seeds,
                                        "seeds": args.seeds, "preset": args.preset, "overrides": over})
    wall = time.perf_counter() - t_all
    section = build_section(args, infos, rows, agg, over, wall)
    print("\n" + format_table(agg) + "\n\n" + format_diff_table(agg) + "\n\n" + format_per_class(rows) + "\n")
    if any(rows.get(v) for v in ABSENT_VARIANTS):
        first = next(r for v in ABSENT_VARIANTS for r in rows.get(v, []))
        names = sorted(first.get("absent") or {})
        print(format_absent(rows, names) + "\n")
    (work / "section.md").write_text(section)
    if args.results:
        write_results(Path(args.results), section)
        log(f"wrote section into {args.results}")
    log(f"done in {wall / 60:.1f} min (estimated {est['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
