"""A run directory: the one module that knows its layout and reads and writes its checkpoints.

    RUN/
      config.yaml                the RunConfig used (written by pretrain, reused by later stages)
      run.json                   scene signature, normalisation statistics, band wavelengths and names,
                                 code version, stages done
      pretrain/denoiser.pt       {"model", "unet_config", "schedule", "masking", "stepper" (the whole optimiser
                                 state, gathered from every rank), "step", "rng" / "rng_ranks" (random streams), ...}
      pretrain/log.jsonl         one JSON line per logged step (loss and p_mask per modality)
      pretrain/curves.png
      train/seed<k>/classifier.pt     best-on-val classifier {"model", "classifier_config", "epoch", ...}
      train/seed<k>/train_state.pt    epochs done, the best so far, the patience counter, RNG streams
                                      (what a resumed run continues)
      train/seed<k>/{config.yaml, log.jsonl, summary.json, curves.png}
      eval/metrics.json, eval/metrics_<split>.json, eval/predictions_<split>.npz, eval/map_<split>.png
      ray/<stage>-r<h>-i<h>/     Ray Train's experiment folder (distributed runs only; hashes of the run
                                 dir and of the job's identity: run dir, stores, world size, stage folder)

Single-process and distributed runs leave the same files (the distributed driver copies the final
Ray checkpoint's files here). Checkpoints are plain ``torch.save`` dicts written atomically
(temporary file, then rename); :func:`write_checkpoint` and :func:`read_checkpoint` are the only
places that save or load one, here or inside a Ray checkpoint folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import bdgf
from bdgf.config import RunConfig
from bdgf.data.scene import Scene
from bdgf.errors import BDGFError, InputError

#: Stage outputs that ``--overwrite`` removes so that nothing of the old run survives.
STAGE_DIRS = ("pretrain", "train", "eval", "ray")


class CheckpointMismatch(BDGFError):
    """A checkpoint written for another model, data layout or config."""


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


def scene_bands(scene: Scene) -> dict[str, dict]:
    """Per modality, its bands as the store describes them: ``wavelengths_nm`` (centre wavelength
    of each band in nm, None where the store has none: its ``modalities/band_<name>`` coordinate
    then holds band indices) and ``band_names``."""
    return {m.name: {"wavelengths_nm": None if m.wavelengths_nm is None else [float(v) for v in m.wavelengths_nm],
                     "band_names": list(m.band_names)}
            for m in scene.meta.modalities}


def scene_normalisation(scene: Scene) -> dict[str, dict[str, list[float]]]:
    """Per-modality, per-band mean and std the scene was normalised with (raw -> model input)."""
    out = {}
    for name in scene.modality_names:
        mean, std = scene.statistics(name)
        out[name] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return out


# ----------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------


def write_checkpoint(obj, path: str | Path) -> Path:
    """Save ``obj`` at ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, what: str = "checkpoint", hint: str = "") -> dict:
    """Load a checkpoint dict on the CPU; a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise BDGFError(f"{path}: no {what}{'; ' + hint if hint else ''}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise BDGFError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise BDGFError(f"{path}: not a BDGF {what} (a {type(obj).__name__}, not a dict)")
    return obj


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


def check_signature(have: dict, want: dict, checkpoint: str) -> None:
    """Refuse to resume from a checkpoint of another model/config, naming both."""
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        detail = "; ".join(f"{k}: checkpoint {have.get(k)!r} vs this run {want.get(k)!r}" for k in diff)
        raise CheckpointMismatch(
            f"cannot resume from checkpoint {checkpoint}: it was written for another model/config ({detail}). "
            "Use another run directory, or --overwrite to start over.")


def denoiser_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu"):
    """(frozen eval-mode DenoiserUNet, NoiseSchedule) from a denoiser checkpoint dict."""
    from bdgf.diffusion.schedules import NoiseSchedule
    from bdgf.diffusion.unet import DenoiserUNet, UNetConfig

    model = DenoiserUNet(UNetConfig(**ckpt["unet_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False).to(device)
    return model, NoiseSchedule.from_state_dict(ckpt["schedule"])


def classifier_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu"):
    """Eval-mode BDGFClassifier from a classifier checkpoint dict."""
    from bdgf.models.classifier import BDGFClassifier, ClassifierConfig

    model = BDGFClassifier(ClassifierConfig.from_dict(ckpt["classifier_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- layout ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def pretrain_dir(self) -> Path:
        return self.path / "pretrain"

    @property
    def denoiser_path(self) -> Path:
        return self.pretrain_dir / "denoiser.pt"

    def seed_dir(self, seed: int) -> Path:
        return self.path / "train" / f"seed{int(seed)}"

    def classifier_path(self, seed: int) -> Path:
        return self.seed_dir(seed) / "classifier.pt"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def ray_storage(self) -> Path:
        """Default Ray Train storage for this run's distributed stages."""
        return (self.path / "ray").resolve()

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def trained_seeds(self) -> list[int]:
        """Seeds with a classifier checkpoint, sorted."""
        found = []
        for p in (self.path / "train").glob("seed*"):
            if p.name[4:].isdigit() and (p / "classifier.pt").exists():
                found.append(int(p.name[4:]))
        return sorted(found)

    # --- creation and checks ------------------------------------------------------------
    def pretrain_config(self, config: RunConfig | None, *, resume: bool, overwrite: bool) -> tuple[RunConfig, bool]:
        """(config to pretrain with, whether it continues this run's denoiser.pt). Writes nothing."""
        if resume and self.denoiser_path.exists():
            return self.config(), True
        if self.denoiser_path.exists() and not overwrite:
            raise BDGFError(f"{self.path}: already holds a pretrained run "
                            "(pass --resume to continue, --overwrite to start over)")
        if config is None:
            config = self.config() if self.config_path.exists() and not overwrite else RunConfig()
        return config, False

    def create(self, scene: Scene, config: RunConfig, *, overwrite: bool = False) -> "Run":
        """Start the run: config.yaml and run.json; with ``overwrite`` every old stage output goes."""
        if self.denoiser_path.exists() and not overwrite:
            raise BDGFError(f"{self.path}: already holds a pretrained run (pass --overwrite to start over)")
        if overwrite:
            for name in STAGE_DIRS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        config.save(self.config_path)
        info = {
            "scene": scene_signature(scene),
            "store": str(Path(scene.path).resolve()),
            "normalisation": scene_normalisation(scene),
            "bands": scene_bands(scene),
            "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._write_info(info)
        return self

    def info(self) -> dict:
        if not self.info_path.exists():
            raise BDGFError(f"{self.path}: not a BDGF run directory (no run.json); run `bdgf pretrain` first")
        return json.loads(self.info_path.read_text())

    def config(self) -> RunConfig:
        return RunConfig.load(self.config_path)

    def normalisation(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{modality: (mean (C_m,), std (C_m,))} recorded at creation (older runs: read from
        the store they were made from)."""
        info = self.info()
        stats = info.get("normalisation")
        if stats is None:
            stats = scene_normalisation(Scene.open(info["store"]))
        return {m: (np.asarray(s["mean"], np.float32), np.asarray(s["std"], np.float32)) for m, s in stats.items()}

    def bands(self) -> dict[str, dict] | None:
        """{modality: {"wavelengths_nm": [...] | None, "band_names": [...]}} recorded at creation
        (older runs: read from the store they were made from; None when it is gone)."""
        info = self.info()
        if "bands" in info:
            return info["bands"]
        store = info.get("store")
        return scene_bands(Scene.open(store)) if store and Path(store).exists() else None

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
        self._write_info(info)

    def _write_info(self, info: dict) -> None:
        tmp = self.info_path.with_name(".run.json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.info_path)

    # --- checkpoints ----------------------------------------------------------------------
    def denoiser_checkpoint(self) -> dict:
        return read_checkpoint(self.denoiser_path, "denoiser checkpoint", "run `bdgf pretrain` first")

    def load_denoiser(self, device: str | torch.device = "cpu"):
        """(frozen denoiser, schedule, raw checkpoint dict)."""
        ckpt = self.denoiser_checkpoint()
        model, schedule = denoiser_from_checkpoint(ckpt, device)
        return model, schedule, ckpt

    def classifier_checkpoint(self, seed: int) -> dict:
        return read_checkpoint(self.classifier_path(seed), "classifier checkpoint", "run `bdgf train` first")

    def load_classifier(self, seed: int, device: str | torch.device = "cpu"):
        return classifier_from_checkpoint(self.classifier_checkpoint(seed), device)


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
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
