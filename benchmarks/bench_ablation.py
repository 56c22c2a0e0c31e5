"""Ablations of BDGF on the synthetic ``imbalance`` preset (20 train px per class).

Variants (DESIGN §1.2, §1.4):

=============  =========================================  ===============================
variant        pretraining (shared per group, seed 0)     classifier
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

Each pretraining group gets its own copy of the scene store (features are cached in the store and
a different checkpoint would recompute them). Pretraining and feature extraction use seed 0 for
every variant; only the classifier is trained with seeds ``--seeds`` (default 0 1 2), so the
reported std is over classifier seeds only, not over pretraining seeds.

Everything is written incrementally under ``--work`` (one JSON per variant and seed, one per
pretraining group), so a killed run resumes where it stopped. ``--quick`` is a smoke check
(1 seed, a few steps and epochs); its numbers mean nothing.

    .venv/bin/python benchmarks/bench_ablation.py                 # full run (~25 min, 2 cores)
    .venv/bin/python benchmarks/bench_ablation.py --quick         # smoke check (~2 min)
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
LOAD0 = __import__("os").getloadavg()  # 1/5/15-min load when the script started
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESET = "imbalance"
SCENE_SEED = 0
PRETRAIN_SEED = 0

# The ablation config: DEMO_OVERRIDES (sized for 2 CPU cores) cut further so that 4 pretrainings
# + 21 classifier runs fit in ~40 minutes on a 2-core machine shared with other jobs (load ~4-8):
# fewer pretraining steps (masking warm-up scaled with them) and classifier epochs.
ABLATION_OVERRIDES = {
    "pretrain.steps": 40,
    "pretrain.log_every": 4,
    "pretrain.checkpoint_every": 40,
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 12},
    "train.epochs": 4,
    "train.patience": 4,
}
# Scoring every one of the 7268 test pixels costs ~2 min per 3-branch model on the loaded machine;
# by default score a fixed random subset (same pixels for every variant and seed, drawn with
# TEST_SUBSET_SEED before anything is trained; 0 = the whole test split).
TEST_SUBSET = 1500
TEST_SUBSET_SEED = 12345
QUICK_OVERRIDES = {
    "pretrain.steps": 12,
    "pretrain.log_every": 2,
    "pretrain.checkpoint_every": 12,
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 4},
    "features.timesteps": [5, 50],
    "train.epochs": 2,
    "train.patience": 2,
}

# group -> pretraining overrides (on top of the base config)
GROUPS = {
    "full": {},
    "no_mask": {"pretrain.masking": {"mode": "none"}},
    "uniform_mask": {"pretrain.masking": {"mode": "uniform"}},
    "concat_mse": {"pretrain.loss_kind": "concat"},
}
# variant -> (pretraining group, classifier branches, description)
VARIANTS = {
    "full": ("full", ["cnn", "mamba", "transformer"], "balanced loss + adaptive masking + 3 branches"),
    "cnn_only": ("full", ["cnn"], "CNN branch alone (same features)"),
    "mamba_only": ("full", ["mamba"], "Mamba branch alone (same features)"),
    "tr_only": ("full", ["transformer"], "Transformer branch alone (same features)"),
    "no_mask": ("no_mask", ["cnn", "mamba", "transformer"], "no modality masking"),
    "uniform_mask": ("uniform_mask", ["cnn", "mamba", "transformer"], "uniform masking, p = p0"),
    "concat_mse": ("concat_mse", ["cnn", "mamba", "transformer"], "plain MSE over the concatenation"),
}


def base_config(quick: bool, extra: dict | None = None):
    from bdgf.config import RunConfig
    from bdgf.demo import DEMO_OVERRIDES

    over = {**DEMO_OVERRIDES, **ABLATION_OVERRIDES}
    if quick:
        over.update(QUICK_OVERRIDES)
    over.update(extra or {})
    over["pretrain.seed"] = PRETRAIN_SEED
    return RunConfig().with_overrides(over), over


def group_config(base, group: str, quick: bool):
    over = dict(GROUPS[group])
    if "pretrain.masking" in over:  # keep the base warmup, change the mode only
        over["pretrain.masking"] = {**base.pretrain.masking, **over["pretrain.masking"]}
    return base.with_overrides(over)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def prepare_group(work: Path, group: str, base, quick: bool, log) -> dict:
    """Scene store copy + pretrain + features for one pretraining group (resumable)."""
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain
    from bdgf.run import read_jsonl

    gdir = work / group
    gdir.mkdir(parents=True, exist_ok=True)
    done = gdir / "group.json"
    if done.exists():
        return json.loads(done.read_text())
    store, run = gdir / f"{PRESET}.zarr", gdir / "run"
    t0 = time.perf_counter()
    write_scene(make_scene(PRESET, SCENE_SEED), store, overwrite=True, progress=False)
    cfg = group_config(base, group, quick)
    log(f"[{group}] pretrain {cfg.pretrain.steps} steps, loss={cfg.pretrain.loss_kind}, "
        f"masking={cfg.pretrain.masking}")
    summary = pretrain(store, run, cfg, overwrite=True, progress=False).to_dict()
    log(f"[{group}] pretrain done in {summary['wall_s']:.0f} s ({summary['tiles_per_s']:.1f} tiles/s); "
        f"loss/mod={_fmt(summary['loss_per_modality'])} p_mask={_fmt(summary['p_mask'])}")
    feats = compute_features(store, run, progress=False).to_dict()
    log(f"[{group}] features {feats['state']} in {feats['wall_s']:.0f} s")
    trajectory = [
        {k: v for k, v in row.items() if k == "step" or k.startswith(("loss/", "p_mask/", "loss"))}
        for row in read_jsonl(run / "pretrain" / "log.jsonl") if "step" in row
    ]
    out = {"group": group, "store": str(store), "run": str(run), "pretrain": summary,
           "features_wall_s": feats["wall_s"], "trajectory": trajectory,
           "config": cfg.to_dict(), "wall_s": time.perf_counter() - t0}
    _write_json(done, out)
    return out


def score(store: str, run_dir: str, seed: int, subset: int) -> dict:
    """Test metrics of run_dir's classifier for ``seed``: engine.classify.evaluate on the whole
    test split, or the same computation on a fixed random subset of ``subset`` test pixels."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from bdgf.data.patches import PatchDataset
    from bdgf.data.scene import Scene
    from bdgf.diffusion.features import LEVELS
    from bdgf.engine.classify import evaluate, predict
    from bdgf.metrics import classification_report
    from bdgf.run import Run

    if not subset:
        return evaluate(store, run_dir, split="test", seeds=[seed], write_map=False).per_seed[str(seed)]
    cfg = Run(run_dir).config().train
    ds = PatchDataset(store, "test", patch_size=cfg.patch_size, features=LEVELS)
    idx = np.sort(np.random.default_rng(TEST_SUBSET_SEED).choice(len(ds), min(subset, len(ds)), replace=False))
    model = Run(run_dir).load_classifier(seed)
    with torch.no_grad():
        y, p, per_branch, _ = predict(model, DataLoader(Subset(ds, idx.tolist()), batch_size=256))
    names = Scene.open(store).class_names
    rep = classification_report(y, p.argmax(1), names)
    rep["branches"] = {b: classification_report(y, q.argmax(1), names) for b, q in per_branch.items()}
    return rep


def run_variant_seed(work: Path, variant: str, seed: int, group_info: dict, log, subset: int) -> dict:
    from bdgf.engine.classify import train

    vdir = work / "results" / variant
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / f"seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    _, branches, _ = VARIANTS[variant]
    t0 = time.perf_counter()
    # Variants that share a group share its run dir: train() writes train/seed{s}/, so train and
    # evaluate one (variant, seed) at a time, and keep only the metrics.
    r = train(group_info["store"], group_info["run"], seed=seed, overrides={"train.branches": branches},
              progress=False).to_dict()
    rep = score(group_info["store"], group_info["run"], seed, subset)
    out = {"variant": variant, "seed": seed, "branches": branches, "val_oa": r["val_oa"], "epoch": r["epoch"],
           "oa": rep["oa"], "aa": rep["aa"], "kappa": rep["kappa"],
           "per_branch": {b: {k: v[k] for k in ("oa", "aa", "kappa")} for b, v in rep["branches"].items()},
           "per_class": rep.get("per_class"), "wall_s": time.perf_counter() - t0}
    _write_json(path, out)
    log(f"[{variant} seed {seed}] OA {out['oa']:.4f} AA {out['aa']:.4f} kappa {out['kappa']:.4f} "
        f"(val OA {r['val_oa']:.3f} @ epoch {r['epoch']}, {out['wall_s']:.0f} s)")
    return out


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:.4f}" for k, v in d.items() if v is not None) + "}"


def aggregate(rows: dict[str, list[dict]]) -> dict:
    agg = {}
    for v, rs in rows.items():
        if not rs:
            continue
        agg[v] = {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                  for k in ("oa", "aa", "kappa")}
        agg[v]["n"] = len(rs)
    return agg


def format_table(agg: dict) -> str:
    lines = [
        "| variant | what changes | OA (%) | AA (%) | κ | full − variant, OA (in variant σ) | AA (in σ) | κ (in σ) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = agg.get("full")
    for v, (_, _, desc) in VARIANTS.items():
        if v not in agg:
            continue
        a = agg[v]
        cells = [f"{100 * a['oa']['mean']:.2f} ± {100 * a['oa']['std']:.2f}",
                 f"{100 * a['aa']['mean']:.2f} ± {100 * a['aa']['std']:.2f}",
                 f"{a['kappa']['mean']:.4f} ± {a['kappa']['std']:.4f}"]
        margins = []
        for k, scale in (("oa", 100), ("aa", 100), ("kappa", 1)):
            if v == "full" or full is None:
                margins.append("—")
                continue
            d = full[k]["mean"] - a[k]["mean"]
            s = a[k]["std"]
            unit = f"{d / s:+.1f}σ" if s > 0 else "σ=0"
            margins.append(f"{scale * d:+.2f}{' pts' if scale == 100 else ''} ({unit})")
        lines.append(f"| {v} | {desc} | {' | '.join(cells)} | {' | '.join(margins)} |")
    return "\n".join(lines)


def format_per_class(rows: dict[str, list[dict]]) -> str:
    """Per-class test accuracy (mean over seeds) per variant, to see which class pairs move."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    ap.add_argument("--quick", action="store_true", help="smoke check: 1 seed, tiny steps/epochs")
    ap.add_argument("--work", default=None, help="work dir for stores, runs and per-variant JSON "
                    "(default /tmp/bdgf_bench/ablation[_quick])")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--results", default=None, help="write the section into this RESULTS.md")
    ap.add_argument("--title", default="Ablations on the imbalance preset",
                    help="RESULTS.md section title (a rerun with another config can get its own section)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="override pretrain.steps (masking warm-up = 30%% of it; 0: ABLATION_OVERRIDES)")
    ap.add_argument("--epochs", type=int, default=0, help="override train.epochs and patience (0: ABLATION_OVERRIDES)")
    ap.add_argument("--test-subset", type=int, default=TEST_SUBSET,
                    help=f"score a fixed random subset of this many test pixels (0: all; default {TEST_SUBSET})")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.quick and args.test_subset == TEST_SUBSET:
        args.test_subset = 300
    work = Path(args.work or f"/tmp/bdgf_bench/ablation{'_quick' if args.quick else ''}")
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "progress.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    extra = {}
    if args.pretrain_steps:
        n = args.pretrain_steps
        extra.update({"pretrain.steps": n, "pretrain.checkpoint_every": n, "pretrain.log_every": max(1, n // 10),
                      "pretrain.masking": {"mode": "adaptive", "warmup_steps": max(1, round(0.3 * n))}})
    if args.epochs:
        extra.update({"train.epochs": args.epochs, "train.patience": args.epochs})
    base, over = base_config(args.quick, extra)
    stamp = work / "config.json"
    if stamp.exists() and json.loads(stamp.read_text()) != json.loads(json.dumps(over)):
        raise SystemExit(f"{work} holds results of another config ({stamp}); pass another --work or delete it")
    _write_json(stamp, over)
    log(f"work dir {work}; seeds {seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"overrides {over}")
    t_all = time.perf_counter()
    groups_needed = []
    for v in args.variants:
        g = VARIANTS[v][0]
        if g not in groups_needed:
            groups_needed.append(g)
    infos = {}
    rows: dict[str, list[dict]] = {v: [] for v in args.variants}
    # Seed-major: every variant with seed 0 first (each pretraining group prepared when first
    # needed), then seed 1, ...: a run cut short still has a complete table for the first seeds.
    for s in seeds:
        for v in args.variants:
            g = VARIANTS[v][0]
            if g not in infos:
                infos[g] = prepare_group(work, g, base, args.quick, log)
            rows[v].append(run_variant_seed(work, v, s, infos[g], log, args.test_subset))
    agg = aggregate(rows)
    recorded = sum(i["wall_s"] for i in infos.values()) + sum(r["wall_s"] for rs in rows.values() for r in rs)
    _write_json(work / "summary.json", {"aggregate": agg, "seeds": seeds, "overrides": over})
    wall = time.perf_counter() - t_all

    from bdgf.data.scene import Scene

    names = Scene.open(infos[groups_needed[0]]["store"]).modality_names
    table = format_table(agg)
    traj = format_trajectory(infos["full"], names) if "full" in infos else ""
    other = []
    for g in groups_needed:
        s = infos[g]["pretrain"]
        other.append(f"| {g} | {_fmt(s['loss_per_modality'])} | {_fmt(s['p_mask'])} | {s['wall_s']:.0f} |")
    branch_rows = []
    for v in args.variants:
        if v == "full" and rows[v]:
            for b in rows[v][0]["per_branch"]:
                oas = [r["per_branch"][b]["oa"] for r in rows[v]]
                branch_rows.append(f"{b} {100 * np.mean(oas):.2f} ± {100 * np.std(oas):.2f}")
    print("\n" + table + "\n")
    print(format_per_class(rows) + "\n")
    print("Masking trajectory of the full run:\n" + traj + "\n")
    section = "\n".join([
        f"## {args.title}",
        "",
        f"Run {_dt.date.today().isoformat()} on {platform.node() or 'this machine'}: 2 CPU cores shared with other "
        f"jobs (load average {LOAD0[0]:.1f} / {LOAD0[1]:.1f} / {LOAD0[2]:.1f} at start; end {__import__('os').getloadavg()[0]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
        f"compute recorded for the whole ablation {recorded / 60:.1f} min (sum over pretraining groups and "
        f"classifier runs; this invocation {wall / 60:.1f} min).",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_ablation.py{' --quick' if args.quick else ''}"
        f" --seeds {' '.join(map(str, seeds))} --test-subset {args.test_subset}"
        f"{' --pretrain-steps ' + str(args.pretrain_steps) if args.pretrain_steps else ''}"
        f"{' --epochs ' + str(args.epochs) if args.epochs else ''}"
        f"{' --variants ' + ' '.join(args.variants) if args.variants != list(VARIANTS) else ''}"
        f"{' --work ' + str(args.work) if args.work else ''}"
        f"{' --threads ' + str(args.threads) if args.threads else ''}`. "
        f"Scene: synthetic `{PRESET}` (seed {SCENE_SEED}; 128×128, "
        "HSI 80 + LiDAR 1, 8 classes, 20 train / 5 val px per class). Config: `DEMO_OVERRIDES` + "
        f"`{({**ABLATION_OVERRIDES, **QUICK_OVERRIDES} if args.quick else ABLATION_OVERRIDES) | extra}`. "
        f"Pretraining and features: seed {PRETRAIN_SEED}, shared by every variant of a group (the "
        "branch-alone variants reuse the full model's denoiser and features); classifier seeds "
        f"{seeds}. ± is the population std over classifier seeds (not over pretraining seeds). "
        "Margin = (full − variant) in points and in units of the variant's std; positive = full wins. "
        "Model selection on val, numbers on test"
        + (f" (a fixed random subset of {args.test_subset} of the 7268 test pixels, the same for every "
           f"variant and seed, drawn with seed {TEST_SUBSET_SEED})." if args.test_subset else " (whole split)."),
        "",
        table,
        "",
        "Branches of the full model scored on their own (its 3-branch ensemble's heads): " + ", ".join(branch_rows),
        "",
        "Per-class test accuracy (%, mean over seeds). Elevation-only pairs: grass/trees, "
        "parking_lot/roof_concrete; HSI-only pairs: road/parking_lot, grass/soil, roof_concrete/roof_metal.",
        "",
        format_per_class(rows),
        "",
        "### Masking trajectory of the full run (adaptive masking, balanced loss)",
        "",
        traj,
        "",
        "Final state of every pretraining group (last step's batch):",
        "",
        "| group | loss per modality | p_mask | pretrain wall (s) |",
        "| --- | --- | --- | --- |",
        *other,
        "",
    ])
    (work / "section.md").write_text(section)
    if args.results:
        write_results(Path(args.results), section)
        log(f"wrote section into {args.results}")
    log(f"done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
