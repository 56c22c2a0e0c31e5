"""The seeded fake dataset generators (tests/data/<dataset>/data.py): the same seed writes the same
content, another seed other content, and each runs as a script."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SMALL = {"augsburg": dict(height=8, width=6), "generic": {}, "houston2013": dict(height=8, width=6), "muufl": {},
         "trento": dict(height=8, width=6)}


def content(path: Path) -> bytes:
    """The file's bytes, less a MATLAB file's 128-byte text header (it holds the writing date)."""
    data = path.read_bytes()
    return data[128:] if path.suffix == ".mat" else data


@pytest.mark.parametrize("name", sorted(SMALL))
def test_generator_is_deterministic_in_the_seed(name, tmp_path):
    make = importlib.import_module(f"data.{name}.data").make
    runs = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        (tmp_path / run).mkdir()
        paths = make(tmp_path / run, seed=seed, **SMALL[name])
        assert all(p.parent == tmp_path / run and p.is_file() for p in paths.values())
        runs[run] = {role: content(p) for role, p in paths.items()}
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


@pytest.mark.parametrize("name", ["generic", "muufl"])
def test_generator_runs_as_a_script(name, tmp_path):
    out = subprocess.run([sys.executable, str(TESTS / "data" / name / "data.py"), str(tmp_path / "out"), "--seed", "1"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    paths = {role: Path(p) for role, p in json.loads(out.stdout).items()}
    assert paths and all(p.parent == tmp_path / "out" and p.is_file() for p in paths.values())
    make = importlib.import_module(f"data.{name}.data").make
    again = make(tmp_path, seed=1)
    assert {role: content(p) for role, p in paths.items()} == {role: content(p) for role, p in again.items()}
