"""Run configuration as plain data: dataclasses, saved to and loaded from YAML.

A run's ``config.yaml`` holds three sections (``pretrain``, ``features``, ``train``). Nested model
settings (``pretrain.unet``, ``pretrain.schedule``, ``pretrain.masking``, ``train.model`` with its
``cnn``/``mamba``/``transformer`` sub-sections, ``train.mutual``) are dicts handed to the
dataclasses of the modules that own them. All of it is checked when a config is built
(``from_dict``, ``load``, ``with_overrides``), not when a stage first uses it: unknown keys, values
of the wrong type, out-of-range values, and whatever the owning dataclasses and modules reject,
each as a ``ConfigError`` naming the full key path::

    config.yaml: train.model.mamba: unknown key(s) ['d_stat']; known: [...]
    config.yaml: train.model.mamba.d_state must be an integer >= 1, got 0
    overrides: features.halo 16 must be a multiple of 4 and at least the denoiser's receptive radius 28 ...
"""

from __future__ import annotations

import dataclasses
import numbers
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

    # Defaults for a real benchmark scene (Houston2013-sized); `bdgf demo` overrides them small.
    # 64-px tiles so that the centre of a tile is farther than the receptive radius (28 px) from
    # its zero-padded edges, as every pixel is when features are extracted with a halo.
    tile_size: int = 64
    batch_size: int = 8
    steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_kind: str = "balanced"  # balanced | concat (ablation)
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    # A tile is skipped when fewer than this share of its pixels is valid (nodata borders).
    min_valid_fraction: float = 0.5
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
    # Context on each side of a tile, cropped after the pass. null: the denoiser's receptive
    # radius rounded up to its stride phase (the least halo whose features do not depend on the
    # tiling); a smaller one is refused.
    halo: int | None = None
    batch_size: int = 8
    timestep_reduce: str = "concat"  # concat | mean over timesteps
    # Also cache, for each modality, the features computed with it absent (masked as in
    # pretraining): what stage 2's modality dropout trains on and `--absent` evaluates. Costs
    # one more denoiser pass per modality.
    absent_variants: bool = True


@dataclass
class TrainConfig:
    """Stage 2: the diffusion-guided multi-branch classifier with mutual learning."""

    patch_size: int = 11
    batch_size: int = 64
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    branches: list = field(default_factory=lambda: ["cnn", "mamba", "transformer"])
    val_every: int = 1  # epochs
    patience: int = 20  # epochs without val improvement before stopping
    # An epoch is better than the best so far with a higher val OA, or the same OA and a val NLL
    # lower by more than this (nats per pixel): so a val split that saturates at OA 1.0 still stops.
    nll_min_delta: float = 0.01
    # Which epoch's classifier is kept: "val" (the better epochs above, early stopping)
    # or "last" (a fixed schedule: every epoch runs and the last one is kept; the protocol for
    # training on a whole official train split with no val carved from it).
    selection: str = "val"
    seed: int = 0
    num_workers: int = 0
    # Share of training patches that see one modality (drawn uniformly) as absent: its bands
    # zeroed and marked unavailable, its features the cached "<level>_without_<m>". So the
    # classifier copes when a scene lacks a modality (`bdgf evaluate --absent`). 0: off.
    modality_dropout: float = 0.2
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
            for depth, p in enumerate(parts[:-1]):
                if p not in node and depth >= 2:
                    node[p] = {}  # a sub-section of a nested dict (train.model.cnn): checked below
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(f"override {key!r}: no section {p!r}")
                node = node[p]
            node[parts[-1]] = value
        return RunConfig.from_dict(data, where="overrides")

    # --- checks ---------------------------------------------------------------------------
    def validate(self, where: str = "config") -> None:
        """Raise ConfigError naming the key path of the first bad value, nested sections included."""
        p, f, t = self.pretrain, self.features, self.train
        for name, section in (("pretrain", p), ("features", f), ("train", t)):
            _check_types(type(section), asdict(section), f"{where}: {name}")
        _positive(where, "pretrain", p, ("tile_size", "batch_size", "steps", "log_every", "checkpoint_every"))
        _positive(where, "features", f, ("draws", "tile_size", "batch_size"))
        _positive(where, "train", t, ("patch_size", "batch_size", "epochs", "val_every", "patience"))
        for sec, obj, names in (("pretrain", p, ("lr",)), ("train", t, ("lr",))):
            for n in names:
                if not 0 < getattr(obj, n) < 1:
                    raise ConfigError(f"{where}: {sec}.{n} must be in (0, 1), got {getattr(obj, n)}")
        if p.loss_kind not in ("balanced", "concat"):
            raise ConfigError(f"{where}: pretrain.loss_kind must be 'balanced' or 'concat', got {p.loss_kind!r}")
        if not 0.0 <= p.min_valid_fraction <= 1.0:
            raise ConfigError(f"{where}: pretrain.min_valid_fraction must be in [0, 1], got {p.min_valid_fraction}")
        if not f.timesteps or any(int(s) < 0 for s in f.timesteps):
            raise ConfigError(f"{where}: features.timesteps must be a non-empty list of steps >= 0")
        if f.timestep_reduce not in ("concat", "mean"):
            raise ConfigError(f"{where}: features.timestep_reduce must be 'concat' or 'mean'")
        if t.patch_size % 2 == 0:
            raise ConfigError(f"{where}: train.patch_size must be odd (a centre pixel), got {t.patch_size}")
        known = {"cnn", "mamba", "transformer"}
        if not t.branches or set(t.branches) - known or len(set(t.branches)) != len(t.branches):
            raise ConfigError(f"{where}: train.branches must be a non-empty subset of {sorted(known)}, got {t.branches}")
        if t.nll_min_delta < 0:
            raise ConfigError(f"{where}: train.nll_min_delta must be >= 0, got {t.nll_min_delta}")
        if t.selection not in ("val", "last"):
            raise ConfigError(f"{where}: train.selection must be 'val' or 'last', got {t.selection!r}")
        if not 0.0 <= t.modality_dropout < 1.0:
            raise ConfigError(f"{where}: train.modality_dropout must be in [0, 1), got {t.modality_dropout}")
        if t.num_workers < 0:
            raise ConfigError(f"{where}: train.num_workers must be >= 0")
        # Nested sections: let their owners check them now rather than at step 1000. The UNet's
        # scene sizes (in_channels, num_modalities) are placeholders: no other check uses them.
        from bdgf.diffusion.masking import MaskingConfig
        from bdgf.diffusion.schedules import ScheduleConfig
        from bdgf.diffusion.unet import UNetConfig
        from bdgf.losses import MutualLearningConfig

        unet = _nested(UNetConfig, p.unet, where, "pretrain.unet", in_channels=1, num_modalities=1)
        if not 0 <= unet.dropout < 1:
            raise ConfigError(f"{where}: pretrain.unet.dropout must be in [0, 1), got {unet.dropout!r}")
        if p.tile_size % unet.tile_multiple:
            raise ConfigError(f"{where}: pretrain.tile_size {p.tile_size} must be a multiple of "
                              f"{unet.tile_multiple} (2^(levels-1) for pretrain.unet.channel_mults)")
        _check_feature_window(f, unet, where)
        _nested(ScheduleConfig, p.schedule, where, "pretrain.schedule")
        _nested(MaskingConfig, p.masking, where, "pretrain.masking")
        for step in f.timesteps:
            if int(step) >= int(p.schedule.get("num_timesteps", 1000)):
                raise ConfigError(f"{where}: features.timesteps {step} >= schedule num_timesteps")
        _check_model(t, where)
        _nested(MutualLearningConfig, t.mutual, where, "train.mutual")


def _check_feature_window(f: "FeatureConfig", unet, where: str) -> None:
    """features.tile_size and features.halo against the denoiser's stride phase and receptive
    radius (both depend on the UNet's layout only, not on the scene's bands)."""
    import torch

    from bdgf.diffusion.features import aligned_halo
    from bdgf.diffusion.unet import DenoiserUNet

    m = unet.tile_multiple
    if f.tile_size % m:
        raise ConfigError(f"{where}: features.tile_size {f.tile_size} must be a multiple of {m} "
                          f"(2^(levels-1) for pretrain.unet.channel_mults)")
    if f.halo is None:
        return
    with torch.random.fork_rng(devices=[]):
        R = DenoiserUNet(unet).receptive_radius
    if f.halo < R or f.halo % m:
        raise ConfigError(f"{where}: features.halo {f.halo} must be a multiple of {m} and at least the "
                          f"denoiser's receptive radius {R} (features would depend on the tiling); "
                          f"use {aligned_halo(R, m)} or leave it unset")


# --- nested sections ------------------------------------------------------------------------
# Sizes their owners do not range-check (0 would build a degenerate or broken model): the least
# value of each integer key, per nested section. Lists: every item.
_AT_LEAST = {
    "pretrain.unet": {"base_channels": 1, "blocks_per_level": 1, "embed_mult": 1, "channel_mults": 1},
    "train.model.cnn": {"width": 1, "low_width": 1, "num_blocks": 0},
    "train.model.mamba": {"d_model": 1, "n_layers": 1, "d_state": 1, "expand": 1, "d_conv": 1, "dt_rank": 1,
                          "groups": 1, "gate_hidden": 1, "token_stride": 1},
    "train.model.transformer": {"dim": 1, "depth": 1, "heads": 1, "mlp_ratio": 1, "token_stride": 1},
    "train.mutual": {"proj_dim": 1, "proj_hidden": 0, "lambda_kl": 0, "lambda_ent": 0, "lambda_sim": 0},
}
# Keys of the owners' dataclasses that a run sets itself (from the scene or another config key).
_SET_ELSEWHERE = {
    "pretrain.unet": {"in_channels": "taken from the scene's bands",
                      "num_modalities": "taken from the scene's modalities"},
    "train.model": {"in_channels": "taken from the scene's bands",
                    "feature_channels": "taken from the diffusion features",
                    "num_classes": "taken from the scene's classes", "patch_size": "set by train.patch_size",
                    "branches": "set by train.branches"},
}


def _check_model(t: "TrainConfig", where: str) -> None:
    """train.model (and its cnn/mamba/transformer sub-sections) -> ClassifierConfig and the branch
    modules, built with placeholder scene sizes and this config's patch_size and branches."""
    import torch

    from bdgf.models.classifier import FEATURE_OF, ClassifierConfig
    from bdgf.models.cnn import CNNBranch, CNNConfig
    from bdgf.models.mamba import MambaBranch, MambaConfig
    from bdgf.models.transformer import TransformerBranch, TransformerConfig

    path, values = "train.model", t.model
    _check_nested(ClassifierConfig, values, where, path)
    subs = {"cnn": (CNNConfig, CNNBranch), "mamba": (MambaConfig, MambaBranch),
            "transformer": (TransformerConfig, TransformerBranch)}
    for name, (sub_cls, _) in subs.items():
        if name in values:
            _check_nested(sub_cls, values[name], where, f"{path}.{name}")
    placeholders = {"in_channels": 1, "feature_channels": {"low": 1, "mid": 1, "high": 1}, "num_classes": 2}
    model = _owner(f"{where}: {path}", ClassifierConfig.from_dict,
                   {**values, **placeholders, "patch_size": t.patch_size, "branches": tuple(t.branches)})
    # The branch modules check the rest (widths vs groups and heads, patch size vs CNN blocks). Built
    # on the CPU at placeholder input sizes, with the global RNG state put back afterwards.
    with torch.random.fork_rng(devices=[]):
        for name in model.branches:
            branch_cls = subs[name][1]
            fc = model.feature_channels[FEATURE_OF[name]]
            _owner(f"{where}: {path}.{name}", branch_cls, 1, fc, model.patch_size, getattr(model, name))


def _nested(cls, values, where: str, path: str, **placeholders):
    """The owner's dataclass built from a nested dict section, once ``_check_nested`` passed it."""
    _check_nested(cls, values, where, path)
    return _owner(f"{where}: {path}", cls, **placeholders, **values)


def _check_nested(cls, values, where: str, path: str) -> None:
    """A nested dict section: a mapping of the owner's keys (less those set elsewhere), each of the
    type of its default and, for sizes, at least its ``_AT_LEAST`` value."""
    loc = f"{where}: {path}"
    if not isinstance(values, dict):
        raise ConfigError(f"{loc} must be a mapping, got {values!r}")
    elsewhere = _SET_ELSEWHERE.get(path, {})
    taken = sorted(set(values) & set(elsewhere))
    if taken:
        raise ConfigError(f"{loc}: {taken} cannot be set here ("
                          + "; ".join(f"{k} is {elsewhere[k]}" for k in taken) + ")")
    known = {f.name for f in dataclasses.fields(cls) if f.init} - set(elsewhere)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{loc}: unknown key(s) {unknown}; known: {sorted(known)}")
    _check_types(cls, values, loc)
    for key, least in _AT_LEAST.get(path, {}).items():
        if key not in values or values[key] is None:
            continue
        items = values[key] if isinstance(values[key], (list, tuple)) else [values[key]]
        if any(v < least for v in items):
            what = "integers" if isinstance(values[key], (list, tuple)) else (
                "an integer" if isinstance(values[key], numbers.Integral) else "a number")
            raise ConfigError(f"{loc}.{key} must be {what} >= {least}, got {values[key]!r}")


def _owner(loc: str, make, *args, **kwargs):
    """``make(*args, **kwargs)``, with what the owning module raises turned into a ConfigError at ``loc``."""
    try:
        return make(*args, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as exc:  # InputError is a ValueError
        raise ConfigError(f"{loc}: {exc}") from exc


def _check_types(cls, values: dict, loc: str) -> None:
    """Each value must have the type of the field's default: bool, int, number, str, list (of the
    default's item type) or mapping; a None default accepts None or an int where annotated so."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = (f.default, f.type)
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = (f.default_factory(), f.type)
    for key, value in values.items():
        if key not in defaults:
            continue
        default, annotation = defaults[key]
        problem = _type_problem(default, value, str(annotation))
        if problem:
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if problem == "a number" and _numeric(value) else ""
            raise ConfigError(f"{loc}.{key} must be {problem}, got {value!r}{hint}")


def _numeric(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _type_problem(default, value, annotation: str) -> str | None:
    """What ``value`` should be (a phrase), or None when its type matches ``default``'s."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if is_int(default):
        return None if is_int(value) else "an integer"
    if is_number(default):
        return None if is_number(value) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping"
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return "a list"
        if default and is_int(default[0]) and not all(is_int(v) for v in value):
            return "a list of integers"
        if default and isinstance(default[0], str) and not all(isinstance(v, str) for v in value):
            return "a list of strings"
        return None
    if default is None and "int" in annotation:
        return None if value is None or is_int(value) else "an integer or null"
    return None


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    return _owner(where, cls, **values)


def _positive(where: str, section: str, obj, names) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {section}.{n} must be a positive integer, got {v!r}")
