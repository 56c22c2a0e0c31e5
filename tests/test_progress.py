"""bdgf.progress: a tqdm bar on a terminal, a few whole lines on anything else, nothing when off."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bdgf.progress import ENV_VAR, Progress, format_figures, progress

REPO = Path(__file__).resolve().parents[1]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_pipe_gets_a_line_per_tenth_and_a_final_line():
    out = io.StringIO()
    with Progress(total=1000, desc="pretrain", unit="step", file=out) as bar:
        for step in range(1000):
            bar.update(1, loss=1.0 / (step + 1))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # 10 %, ..., 90 %, then the final line
    assert lines[0] == "pretrain: 100/1000 step  loss=0.01"
    assert lines[8] == "pretrain: 900/1000 step  loss=0.001111"
    assert re.fullmatch(r"pretrain: 1000/1000 step in \d+\.\ds  loss=0\.001", lines[-1])


def test_milestones_print_one_line_each_with_their_figures():
    out = io.StringIO()
    with Progress(total=30, desc="train", unit="epoch", file=out) as bar:
        for epoch in range(1, 4):
            bar.update(1)
            bar.line(loss=0.41234, val_oa=0.953)
    lines = out.getvalue().splitlines()
    # epoch 3 crosses the 10 % mark: one line for it, and one per line() call
    assert lines == [
        "train: 1/30 epoch  loss=0.4123 val_oa=0.953",
        "train: 2/30 epoch  loss=0.4123 val_oa=0.953",
        "train: 3/30 epoch  loss=0.4123 val_oa=0.953",
        "train: 3/30 epoch  loss=0.4123 val_oa=0.953",
        lines[-1],
    ]
    assert lines[-1].startswith("train: 3/30 epoch in ") and lines[-1].endswith("  loss=0.4123 val_oa=0.953")


def test_a_jump_prints_one_line_and_a_resumed_count_starts_after_initial():
    out = io.StringIO()
    with Progress(total=100, desc="pretrain", unit="step", initial=55, file=out) as bar:
        bar.update(40)  # 55 -> 95: past 60 %, ..., 90 %: one line
        bar.update(5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "pretrain: 95/100 step"
    assert lines[1].startswith("pretrain: 100/100 step in ")
    assert len(lines) == 2


def test_unknown_total_prints_only_milestones_and_the_final_line():
    out = io.StringIO()
    for _ in progress(iter(range(500)), "features", "tile", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"features: 500 tile in \d+\.\ds", lines[0])


def test_progress_wraps_an_iterable_and_takes_its_length():
    out = io.StringIO()
    bar = progress(["hsi", "lidar"], "writing modalities", "modality", file=out)
    assert bar.total == 2
    seen = []
    for name in bar:
        seen.append(name)
        bar.update(0, modality=name)
    assert seen == ["hsi", "lidar"]
    lines = out.getvalue().splitlines()
    assert lines[0] == "writing modalities: 1/2 modality  modality=hsi"  # 50 %
    assert lines[-1].startswith("writing modalities: 2/2 modality in ") and lines[-1].endswith("modality=lidar")
    assert len(lines) == 2


def test_tty_gets_a_tqdm_bar_with_the_figures():
    out = FakeTTY()
    with Progress(total=20, desc="pretrain", unit="step", file=out) as bar:
        for _ in range(20):
            bar.update(1, loss=0.123456)
        bar.line(val_oa=0.5)
    text = out.getvalue()
    assert "\r" in text
    assert "pretrain" in text and "20/20" in text
    assert "loss=0.1235" in text and "val_oa=0.5" in text
    assert " in " not in text  # no plain final line on a terminal


def test_disabled_prints_nothing():
    for stream in (io.StringIO(), FakeTTY()):
        with Progress(total=10, desc="x", unit="it", enabled=False, file=stream) as bar:
            bar.update(10, loss=1.0)
            bar.line(loss=1.0)
        assert list(progress(range(3), "y", "it", enabled=False, file=stream)) == [0, 1, 2]
        assert stream.getvalue() == ""


@pytest.mark.parametrize("stream_cls", [io.StringIO, FakeTTY])
def test_env_off_prints_nothing(monkeypatch, stream_cls):
    monkeypatch.setenv(ENV_VAR, "off")
    out = stream_cls()
    with Progress(total=10, desc="x", unit="it", file=out) as bar:
        bar.update(10)
        bar.line(loss=1.0)
    assert out.getvalue() == ""


def test_env_forces_lines_on_a_tty_and_a_bar_on_a_pipe(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "lines")
    tty = FakeTTY()
    with Progress(total=10, desc="x", unit="it", file=tty) as bar:
        bar.update(10)
    assert "\r" not in tty.getvalue() and tty.getvalue().startswith("x: 10/10 it in ")
    monkeypatch.setenv(ENV_VAR, "BAR")
    pipe = io.StringIO()
    with Progress(total=10, desc="x", unit="it", file=pipe) as bar:
        bar.update(10)
    assert "\r" in pipe.getvalue()
    monkeypatch.setenv(ENV_VAR, "sideways")
    with pytest.warns(UserWarning, match="BDGF_PROGRESS"):
        Progress(total=1, desc="x", unit="it", file=io.StringIO()).close()


def test_close_is_idempotent_and_updates_after_it_are_ignored():
    out = io.StringIO()
    bar = Progress(total=4, desc="x", unit="it", file=out)
    bar.update(4)
    bar.close()
    bar.close()
    bar.update(1)
    bar.line(loss=1.0)
    assert len(out.getvalue().splitlines()) == 1


def test_figures_are_compact():
    figures = {"loss": 0.000123456, "oa": np.float32(0.95312), "t": torch.tensor(2.5), "step": 7,
               "n": np.int64(3), "ok": True, "mode": "adaptive", "big": 123456.7}
    assert format_figures(figures) == "loss=0.0001235 oa=0.9531 t=2.5 step=7 n=3 ok=True mode=adaptive big=1.235e+05"


def test_synth_piped_writes_no_bar(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-m", "bdgf.cli", "synth", str(tmp_path / "s.zarr"), "--preset", "tiny"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("writing modalities")]
    assert lines and re.fullmatch(r"writing modalities: (\d+)/\1 modality in \d+\.\ds", lines[-1])
