"""The `real_data` fixture: $BDGF_REAL_DATA chooses the folder; a missing folder skips the tests that
need it (function- and module-scoped uses alike), or fails them under BDGF_REQUIRE_REAL_DATA=1 (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest


@pytest.fixture(scope="module")
def module_pieces(real_data):
    return sorted(p.name for p in real_data.iterdir())


def test_function_use(real_data):
    assert (real_data / "piece.txt").read_text() == "x"


def test_module_use_a(module_pieces):
    assert module_pieces == ["piece.txt"]


def test_module_use_b(module_pieces):
    assert module_pieces == ["piece.txt"]
'''


def run_probe(tmp_path: Path, real: Path, require: str | None) -> subprocess.CompletedProcess:
    """pytest on the probe module, with tests/conftest.py loaded as a plugin (`-p conftest`)."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("BDGF_REQUIRE_REAL_DATA", "PYTEST_ADDOPTS")}
    env.update(BDGF_REAL_DATA=str(real), PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])))
    if require is not None:
        env["BDGF_REQUIRE_REAL_DATA"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rsE",
                           "--rootdir", str(tmp_path), str(probe)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_present_folder_from_the_variable(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "piece.txt").write_text("x")
    out = run_probe(tmp_path, real, require="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout


@pytest.mark.parametrize("require", [None, "", "0"], ids=["unset", "empty", "zero"])
def test_missing_folder_skips_with_the_reason(tmp_path, require):
    missing = tmp_path / "no-such-folder"
    out = run_probe(tmp_path, missing, require)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 skipped" in out.stdout and "error" not in out.stdout
    skips = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(str(missing) in line and "BDGF_REAL_DATA" in line for line in skips), out.stdout


def test_missing_folder_fails_when_required(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = run_probe(tmp_path, missing, require="1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "3 errors" in out.stdout and "skipped" not in out.stdout
    assert str(missing) in out.stdout and "BDGF_REQUIRE_REAL_DATA is set" in out.stdout
