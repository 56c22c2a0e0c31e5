"""Run configuration as plain data: dataclasses, saved to and loaded from YAML.

A run's ``config.yaml`` holds three sections (``pretrain``, ``features``, ``train``). Unknown keys
and out-of-range values are rejected with the section and key named. Nested model settings
(``unet``, ``schedule``, ``masking``, ``model``, ``mutual``) are dicts handed to the dataclasses of
the modules that own them, which validate them in turn (see ``RunConfig.validate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bdgf.errors import BDGFError


class ConfigError(BDGFError, ValueError):
    """A configuration key is unknown or a value is out of range."""


@dataclass
class PretrainConfig:
    """Stage 1: balanced multimodal DDPM on random tiles of the scene."""

    tile_size: int = 32
    batch_size: int = 16
    steps: int = 400
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_kind: str = "balanced"  # balanced | concat (ablation)
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    unet: dict = field(default_factory=lambda: {"base_channels": 32, "channel_mults": [1, 2, 2]})
    schedule: dict = field(default_factory=lambda: {"kind": "cosine", "num_timesteps": 1000})
    masking: dict = field(default_factory=lambda: {"mode": "adaptive", "warmup_steps": 50})


@dataclass
class FeatureConfig:
    """Dense diffusion features: the frozen denoiser over overlapping tiles."""

    timesteps: list = field(default_factory=lambda: [5, 50, 150])
    draws: int = 1  # noise draws averaged per timestep
    noise_seed: int = 1234
    tile_size: int = 64  # also the chunk size of the feature arrays: each tile owns its chunks
    halo: int = 16  # context on each side of a tile, cropped after the pass
    batch_size: int = 8
    timestep_reduce: str = "concat"  # concat | mean over timesteps


@dataclass
class TrainConfig:
    """Stage 2: the diffusion-guided multi-branch classifier with mutual learning."""

    patch_size: int = 11
    batch_size: int = 64
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    branches: list = field(default_factory=lambda: ["cnn", "mamba", "transformer"])
    val_every: int = 1  # epochs
    patience: int = 10  # epochs without val improvement before stopping
    seed: int = 0
    num_workers: int = 0
    # Mamba sized for CPUs: its parallel scan materialises (B, L, E, N) states.
    model: dict = field(default_factory=lambda: {"mamba": {"d_model": 32, "d_state": 8, "n_layers": 1}})
    mutual: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # --- I/O ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, *, where: str = "config") -> "RunConfig":
        data = dict(data or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            section_cls = {"pretrain": PretrainConfig, "features": FeatureConfig, "train": TrainConfig}[f.name]
            built[f.name] = _build(section_cls, data.get(f.name) or {}, f"{where}: {f.name}")
        cfg = cls(**built)
        cfg.validate(where)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """Apply dotted overrides, e.g. {"train.epochs": 5, "pretrain.unet.base_channels": 16}."""
        data = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            node = data
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(f"override {key!r}: no section {p!r}")
                node = node[p]
            node[parts[-1]] = value
        return RunConfig.from_dict(data, where="overrides")

    # --- checks ---------------------------------------------------------------------------
    def validate(self, where: str = "config") -> None:
        p, f, t = self.pretrain, self.features, self.train
        _positive(where, "pretrain", p, ("tile_size", "batch_size", "steps", "log_every", "checkpoint_every"))
        _positive(where, "features", f, ("draws", "tile_size", "batch_size"))
        _positive(where, "train", t, ("patch_size", "batch_size", "epochs", "val_every", "patience"))
        for sec, obj, names in (("pretrain", p, ("lr",)), ("train", t, ("lr",))):
            for n in names:
                if not 0 < getattr(obj, n) < 1:
                    raise ConfigError(f"{where}: {sec}.{n} must be in (0, 1), got {getattr(obj, n)}")
        if p.loss_kind not in ("balanced", "concat"):
            raise ConfigError(f"{where}: pretrain.loss_kind must be 'balanced' or 'concat', got {p.loss_kind!r}")
        if f.halo < 0:
            raise ConfigError(f"{where}: features.halo must be >= 0, got {f.halo}")
        if not f.timesteps or any(int(s) < 0 for s in f.timesteps):
            raise ConfigError(f"{where}: features.timesteps must be a non-empty list of steps >= 0")
        if f.timestep_reduce not in ("concat", "mean"):
            raise ConfigError(f"{where}: features.timestep_reduce must be 'concat' or 'mean'")
        if t.patch_size % 2 == 0:
            raise ConfigError(f"{where}: train.patch_size must be odd (a centre pixel), got {t.patch_size}")
        known = {"cnn", "mamba", "transformer"}
        if not t.branches or set(t.branches) - known or len(set(t.branches)) != len(t.branches):
            raise ConfigError(f"{where}: train.branches must be a non-empty subset of {sorted(known)}, got {t.branches}")
        if t.num_workers < 0:
            raise ConfigError(f"{where}: train.num_workers must be >= 0")
        # Nested sections: let their owners check them now rather than at step 1000.
        from bdgf.diffusion.masking import MaskingConfig
        from bdgf.diffusion.schedules import ScheduleConfig

        _build(ScheduleConfig, p.schedule, f"{where}: pretrain.schedule")
        _build(MaskingConfig, p.masking, f"{where}: pretrain.masking")
        for step in f.timesteps:
            if int(step) >= int(p.schedule.get("num_timesteps", 1000)):
                raise ConfigError(f"{where}: features.timesteps {step} >= schedule num_timesteps")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _positive(where: str, section: str, obj, names) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {section}.{n} must be a positive integer, got {v!r}")
