"""A run directory: config, the scene it belongs to, checkpoints, logs, curves, metrics.

    RUN/
      config.yaml          the RunConfig used (written by pretrain, reused by later stages)
      run.json             scene signature, code version, creation time, stages done
      pretrain/denoiser.pt  {"model", "unet_config", "schedule", "masking", "step", ...}
      pretrain/log.jsonl    one JSON line per logged step (loss per modality, p_mask per modality)
      train/classifier.pt  best-on-val classifier state, and train/log.jsonl
      eval/metrics.json    test metrics, eval/map.png

Checkpoints are plain ``torch.save`` dicts written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import torch

import bdgf
from bdgf.config import RunConfig
from bdgf.data.scene import Scene
from bdgf.errors import BDGFError, InputError


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{bdgf.__version__}+{sha}{'.dirty' if dirty else ''}" if sha else bdgf.__version__


def scene_signature(scene: Scene) -> dict:
    """What a model depends on: modalities in order with band counts, and the classes."""
    return {
        "name": scene.name,
        "modalities": [[m.name, m.bands] for m in scene.meta.modalities],
        "class_names": list(scene.class_names),
    }


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def state_hash(state_dict: dict) -> str:
    """sha256 of a model state dict's tensors (order and names included); 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(name.encode())
        if torch.is_tensor(t):
            buf = io.BytesIO()
            buf.write(t.detach().cpu().contiguous().numpy().tobytes())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(buf.getvalue())
    return h.hexdigest()[:16]


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- files ------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def denoiser_path(self) -> Path:
        return self.path / "pretrain" / "denoiser.pt"

    @property
    def classifier_path(self) -> Path:
        return self.path / "train" / "classifier.pt"

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    # --- creation and checks ------------------------------------------------------------
    def create(self, scene: Scene, config: RunConfig, *, overwrite: bool = False) -> "Run":
        if self.denoiser_path.exists() and not overwrite:
            raise BDGFError(f"{self.path}: already holds a pretrained run (pass --overwrite to start over)")
        self.path.mkdir(parents=True, exist_ok=True)
        config.save(self.config_path)
        info = {
            "scene": scene_signature(scene),
            "store": str(Path(scene.path).resolve()),
            "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (self.path / "run.json").write_text(json.dumps(info, indent=2))
        return self

    def info(self) -> dict:
        p = self.path / "run.json"
        if not p.exists():
            raise BDGFError(f"{self.path}: not a BDGF run directory (no run.json); run `bdgf pretrain` first")
        return json.loads(p.read_text())

    def config(self) -> RunConfig:
        return RunConfig.load(self.config_path)

    def check_scene(self, scene: Scene) -> None:
        """Refuse a store whose modalities/bands/classes differ from the run's scene."""
        want = self.info()["scene"]
        have = scene_signature(scene)
        for key in ("modalities", "class_names"):
            if [list(x) if isinstance(x, (list, tuple)) else x for x in want[key]] != [
                list(x) if isinstance(x, (list, tuple)) else x for x in have[key]
            ]:
                raise InputError(
                    f"run {self.path} was made for scene {want['name']!r} with {key} {want[key]}, "
                    f"but {scene.path} has {have[key]}"
                )

    def record(self, key: str, value) -> None:
        info = self.info()
        info[key] = value
        (self.path / "run.json").write_text(json.dumps(info, indent=2))


class JsonlLogger:
    """Appends one JSON object per line; flushes each write so a crash loses nothing logged."""

    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a" if append else "w")

    def __call__(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
