"""Checks of the benchmark scripts: the ablation's statistics, tables, resumable plan and runtime
estimate (fast, no training), the RESULTS.md section replacement, and (marked slow) its --quick path."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    assert path.exists(), f"{path} missing"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def _run(variant, pretrain_seed, seed, oa):
    return {"variant": variant, "pretrain_seed": pretrain_seed, "seed": seed, "oa": oa, "aa": oa, "kappa": oa,
            "wall_s": 1.0, "per_class": {"a": oa, "b": None}, "per_branch": {}, "n_scored": 10}


def _rows(full: dict, **variants: dict) -> dict:
    rows = {"full": [_run("full", p, s, v) for (p, s), v in full.items()]}
    for name, runs in variants.items():
        rows[name] = [_run(name, p, s, v) for (p, s), v in runs.items()]
    return rows


def test_aggregate_sample_std_and_paired_difference_over_matched_seed_pairs():
    b = _load("bench_ablation")
    # full OA 0.90, 0.92, 0.94: mean 0.92, sample std 0.02 (population std would be 0.0163)
    # no_mask − full = −0.01, −0.02, −0.03: mean −0.02, sd 0.01, 95 % CI −0.02 ± 4.303 · 0.01 / √3
    rows = _rows({(0, 0): 0.90, (0, 1): 0.92, (1, 0): 0.94},
                 no_mask={(0, 0): 0.89, (0, 1): 0.90, (1, 0): 0.91})
    agg = b.aggregate(rows)
    assert agg["full"]["oa"]["mean"] == pytest.approx(0.92) and agg["full"]["oa"]["sd"] == pytest.approx(0.02)
    d = agg["no_mask"]["oa"]["diff"]
    assert (d["n"], d["mean"], d["sd"]) == (3, pytest.approx(-0.02), pytest.approx(0.01))
    assert d["high"] == pytest.approx(-0.02 + 4.303 * 0.01 / math.sqrt(3), abs=1e-4) and not d["excludes_zero"]
    # per pretraining seed: p0 mean −0.015, p1 −0.03 -> 2 values
    c = agg["no_mask"]["oa"]["diff_by_pretrain"]
    assert c["n"] == 2 and c["mean"] == pytest.approx(-0.0225)
    assert "diff" not in agg["full"]["oa"]


def test_unmatched_runs_are_left_out_of_the_pairs():
    b = _load("bench_ablation")
    rows = _rows({(0, 0): 0.90, (0, 1): 0.92, (1, 0): 0.94}, cnn_only={(0, 0): 0.80, (1, 0): 0.84, (2, 2): 0.1})
    d = b.aggregate(rows)["cnn_only"]["oa"]["diff"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(-0.10)


def test_tables_show_intervals_and_flag_those_that_exclude_zero():
    b = _load("bench_ablation")
    rows = _rows({(0, 0): 0.90, (0, 1): 0.92, (1, 0): 0.94},
                 tr_only={(0, 0): 0.80, (0, 1): 0.81, (1, 0): 0.85},  # −0.10, −0.11, −0.09: excludes 0
                 no_mask={(0, 0): 0.95, (0, 1): 0.90, (1, 0): 0.93})  # +0.05, −0.02, −0.01: does not
    agg = b.aggregate(rows)
    table, diffs = b.format_table(agg), b.format_diff_table(agg)
    assert "| full | balanced loss + adaptive masking + 3 branches | 3 | 92.00 ± 2.00 |" in table
    tr = next(line for line in diffs.splitlines() if line.startswith("| tr_only"))
    nm = next(line for line in diffs.splitlines() if line.startswith("| no_mask"))
    assert "-10.00 [" in tr and "] *" in tr and tr.endswith("yes / yes / yes |")
    assert "*" not in nm and nm.endswith("no / no / no |")
    assert "σ" not in table + diffs
    assert "| a |" in b.format_per_class(rows)


def test_a_single_run_has_no_std_and_no_interval():
    b = _load("bench_ablation")
    agg = b.aggregate(_rows({(0, 0): 0.9}, cnn_only={(0, 0): 0.8}))
    assert "90.00 ± —" in b.format_table(agg)
    assert "-10.00 (n = 1)" in b.format_diff_table(agg)


def test_plan_skips_what_is_on_disk_and_the_estimate_shrinks(tmp_path):
    b = _load("bench_ablation")
    over = b.ablation_overrides(quick=False)
    variants, pseeds, seeds = ["full", "cnn_only", "no_mask"], [0, 1], [0, 1, 2]
    plan = b.todo(tmp_path, variants, pseeds, seeds)
    assert sorted(plan["groups"]) == [("full", 0), ("full", 1), ("no_mask", 0), ("no_mask", 1)]
    assert len(plan["runs"]) == 3 * 2 * 3
    before = b.estimate_seconds(plan, over, train_px=117, test_px=1000)
    (b.group_dir(tmp_path, "full", 0)).mkdir(parents=True)
    (b.group_dir(tmp_path, "full", 0) / "group.json").write_text("{}")
    b.result_path(tmp_path, "cnn_only", 0, 0).parent.mkdir(parents=True)
    b.result_path(tmp_path, "cnn_only", 0, 0).write_text("{}")
    plan = b.todo(tmp_path, variants, pseeds, seeds)
    assert ("full", 0) not in plan["groups"] and len(plan["runs"]) == 17
    after = b.estimate_seconds(plan, over, train_px=117, test_px=1000)
    assert 0 < after["pretrain"] < before["pretrain"] and 0 < after["classify"] < before["classify"]
    assert b.estimate_seconds({"groups": [], "runs": []}, over, 117, 1000)["total"] == 0


def test_default_full_run_is_budgeted_for_30_to_40_minutes_at_most():
    """The default run (7 variants, 3 × 3 seeds, hard preset, whole test split) must be estimated
    at 10-30 min by the cost model (calibrated at load ~5), leaving room under ~30-40 min."""
    b = _load("bench_ablation")
    over = b.ablation_overrides(quick=False)
    plan = {"groups": [(g, p) for p in range(3) for g in b.GROUPS], "runs": list(b.VARIANTS) * 9}
    train_px, test_px = b.pixel_counts("hard", b.TEST_SUBSET)
    assert train_px == 9 * 13 and test_px > 5000
    est = b.estimate_seconds(plan, over, train_px, test_px)
    assert 10 * 60 < est["total"] <= 30 * 60, est


def test_scored_labels_are_a_fixed_subset_of_the_test_split():
    import numpy as np

    b = _load("bench_ablation")
    rng = np.random.default_rng(0)
    test = np.where(rng.random((40, 50)) < 0.3, rng.integers(1, 5, (40, 50)), 0).astype(np.uint16)
    sub = b.scored_labels(test, 100)
    assert np.count_nonzero(sub) == 100 and sub.dtype == test.dtype
    assert np.array_equal(sub[sub > 0], test[sub > 0])  # true labels, only where test has them
    assert np.array_equal(b.scored_labels(test, 100), sub)  # the same pixels every time
    assert np.array_equal(b.scored_labels(test, 0), test) and np.array_equal(b.scored_labels(test, 10**6), test)


def test_pretraining_seed_reaches_the_config():
    b = _load("bench_ablation")
    over = b.ablation_overrides(quick=True)
    assert b.group_config(over, "full", 2).pretrain.seed == 2
    uniform = b.group_config(over, "uniform_mask", 1)
    assert uniform.pretrain.seed == 1 and uniform.pretrain.masking["mode"] == "uniform"
    assert uniform.pretrain.masking["warmup_steps"] == b.QUICK_OVERRIDES["pretrain.masking"]["warmup_steps"]


def test_write_results_replaces_only_its_own_section(tmp_path):
    b = _load("bench_ablation")
    path = tmp_path / "RESULTS.md"
    b.write_results(path, "## A\n\nold a\n")
    b.write_results(path, "## B\n\nb\n")
    b.write_results(path, "## A\n\nnew a\n")
    text = path.read_text()
    assert "new a" in text and "old a" not in text and "## B\n\nb" in text
    assert text.count("## A") == 1


@pytest.mark.slow
def test_quick_ablation_runs_end_to_end_and_resumes(tmp_path):
    """--quick on two variants (one pretraining, two classifiers): every run JSON and the section
    are written, and a second invocation reuses them (same numbers, nothing retrained)."""
    b = _load("bench_ablation")
    argv = ["--quick", "--variants", "full", "cnn_only", "--work", str(tmp_path), "--threads", "1"]
    assert b.main(argv) == 0
    first = json.loads(b.result_path(tmp_path, "cnn_only", 0, 0).read_text())
    assert 0.0 <= first["oa"] <= 1.0 and first["n_scored"] == b.QUICK_TEST_SUBSET
    assert first["branches"] == ["cnn"] and first["per_branch"].keys() == {"cnn"}
    section = (tmp_path / "section.md").read_text()
    assert section.startswith("## Ablations on the hard preset") and "| cnn_only | 1 |" in section
    mtime = b.result_path(tmp_path, "cnn_only", 0, 0).stat().st_mtime_ns
    assert b.main(argv) == 0
    assert b.result_path(tmp_path, "cnn_only", 0, 0).stat().st_mtime_ns == mtime
