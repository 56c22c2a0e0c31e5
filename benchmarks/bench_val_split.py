"""Does val predict test? Val OA vs test OA under ``--val-split regions`` and ``random``.

On a synthetic preset whose labelled pixels lie in regions (default ``hard`` with its training
pixels drawn in clusters of 4, ``CLUSTERED``; ``demo`` already draws them so, but saturates: val
and test OA both ~99 %), each scene seed is made twice, once per val split method:
``random`` (the old behaviour: train and val drawn together, val carved at random, so val pixels
sit next to train pixels) and ``regions`` (val drawn only farther than the patch radius from every
train pixel). The modalities are the same for both (only the labels differ), so one denoiser is
pretrained per scene seed and its features are computed into both stores; then a classifier is
trained on each store with model selection on its val, and scored on its test split.

Reported: per method, the gap ``val OA − test OA`` (the val OA of the selected epoch, and the test
OA of that same model) as mean ± sample std over scene seeds; and the paired difference of the
gaps ``gap(random) − gap(regions)`` with its 95 % t-interval (benchmarks/stats.py). A leaking val
is optimistic, so the gap should be larger under ``random``.

    .venv/bin/python benchmarks/bench_val_split.py                # 8 scene seeds (~3 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_val_split.py --quick        # smoke check; numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import stats as bench_stats  # noqa: E402  (benchmarks/stats.py)

METHODS = ("random", "regions")
# Small enough for 2 busy cores: DEMO_OVERRIDES with fewer pretraining steps, the CNN branch only
# (the question is about the split, not the branches) and the library's stopping rule.
OVERRIDES = {
    "pretrain.steps": 300,
    "pretrain.batch_size": 8,
    "pretrain.tile_size": 32,
    "pretrain.log_every": 50,
    "pretrain.checkpoint_every": 300,
    "pretrain.unet": {"base_channels": 16, "channel_mults": [1, 2, 2]},
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 30},
    "features.tile_size": 64,
    "features.timesteps": [5, 50, 150],
    "train.epochs": 30,
    "train.batch_size": 32,
    "train.patience": 8,
    "train.branches": ["cnn"],
}
# ``hard`` draws isolated training pixels; here they come in clusters of 4 (12 train + 8 val per
# class), as polygons do, so a randomly carved val pixel has train pixels of its cluster beside it.
CLUSTERED = {"hard": {"train_cluster": 4, "train_per_class": 12, "val_per_class": 8}}
QUICK = {"pretrain.steps": 10, "pretrain.checkpoint_every": 10, "pretrain.log_every": 5, "train.epochs": 2}


def scene_config(preset: str):
    """The preset with its training pixels in clusters (``CLUSTERED``), so labels are regions."""
    from dataclasses import replace

    from bdgf.data.synthetic import get_config

    cfg = get_config(preset)
    return replace(cfg, **CLUSTERED.get(preset, {}))


def one_seed(preset: str, seed: int, overrides: dict, work: Path) -> dict:
    """{method: {"val_oa", "test_oa", "gap", "epoch", "epochs_run"}} for one scene seed."""
    from bdgf.config import RunConfig
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.engine.classify import evaluate, train
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain

    run = work / f"run{seed}"
    stores = {m: work / f"{preset}-s{seed}-{m}.zarr" for m in METHODS}
    for m, store in stores.items():
        write_scene(make_scene(scene_config(preset), seed, val_split=m), store, overwrite=True)
    pretrain(stores["regions"], run, RunConfig().with_overrides(overrides), progress=False, overwrite=True)
    out = {}
    for m, store in stores.items():
        compute_features(store, run, progress=False)
        ts = train(store, run, seed=0, progress=False)
        test = evaluate(store, run, split="test", seeds=[0], write_map=False)
        out[m] = {"val_oa": ts.val_oa, "test_oa": test.oa["mean"], "gap": ts.val_oa - test.oa["mean"],
                  "epoch": ts.epoch, "epochs_run": ts.epochs_run}
    return out


def table(results: dict[int, dict]) -> str:
    seeds = sorted(results)
    lines = [f"scene seeds {seeds}; gap = val OA (selected epoch) - test OA of that model, in % points",
             "",
             "| val split | val OA | test OA | gap (mean ± sd) |",
             "| --- | --- | --- | --- |"]
    for m in METHODS:
        val = [100 * results[s][m]["val_oa"] for s in seeds]
        test = [100 * results[s][m]["test_oa"] for s in seeds]
        gap = [100 * results[s][m]["gap"] for s in seeds]
        lines.append(f"| {m} | {sum(val) / len(val):.2f} | {sum(test) / len(test):.2f} | "
                     f"{sum(gap) / len(gap):+.2f} ± {bench_stats.sample_std(gap):.2f} |")
    d = bench_stats.paired_difference({s: 100 * results[s]["random"]["gap"] for s in seeds},
                                      {s: 100 * results[s]["regions"]["gap"] for s in seeds})
    lines += ["", f"gap(random) - gap(regions), paired over {d.n} seeds: {d.mean:+.2f} points, "
              f"95 % t-interval [{d.low:+.2f}, {d.high:+.2f}]"
              f"{' (excludes 0)' if d.excludes_zero else ' (includes 0)'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="hard")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--quick", action="store_true", help="smoke check: 2 seeds, a few steps and epochs")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-seed figures here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    overrides = {**OVERRIDES, **(QUICK if a.quick else {})}
    seeds = a.seeds[:2] if a.quick else a.seeds
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for s in seeds:
            t0 = time.perf_counter()
            results[s] = one_seed(a.preset, s, overrides, work)
            print(f"seed {s}: " + "; ".join(f"{m}: val {100 * r['val_oa']:.2f} test {100 * r['test_oa']:.2f} "
                                            f"(epoch {r['epoch']}/{r['epochs_run']})" for m, r in results[s].items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
