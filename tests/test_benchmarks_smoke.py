"""Fast checks of the benchmark scripts' pure helpers (no training): the ablation table's
margins and the RESULTS.md section replacement. The benchmarks themselves run by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    assert path.exists(), f"{path} missing"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(v, seed, oa):
    return {"variant": v, "seed": seed, "oa": oa, "aa": oa, "kappa": oa, "wall_s": 1.0,
            "per_class": {"a": oa, "b": None}, "per_branch": {}}


def test_ablation_table_margins_in_units_of_the_ablation_std():
    b = _load("bench_ablation")
    rows = {"full": [_row("full", 0, 0.90), _row("full", 1, 0.92)],
            "no_mask": [_row("no_mask", 0, 0.88), _row("no_mask", 1, 0.90)]}
    agg = b.aggregate(rows)
    assert agg["no_mask"]["oa"]["mean"] == pytest.approx(0.89)
    assert agg["no_mask"]["oa"]["std"] == pytest.approx(0.01)
    table = b.format_table(agg)
    assert "+2.00 pts (+2.0σ)" in table  # (0.91 - 0.89) / 0.01
    assert "| a |" in b.format_per_class(rows)


def test_write_results_replaces_only_its_own_section(tmp_path):
    b = _load("bench_ablation")
    path = tmp_path / "RESULTS.md"
    b.write_results(path, "## A\n\nold a\n")
    b.write_results(path, "## B\n\nb\n")
    b.write_results(path, "## A\n\nnew a\n")
    text = path.read_text()
    assert "new a" in text and "old a" not in text and "## B\n\nb" in text
    assert text.count("## A") == 1
