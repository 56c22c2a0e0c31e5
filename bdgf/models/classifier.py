"""BDGF stage-2 classifier: any subset of the three feature-guided branches, one head each.

Glossary (letters as in docs/glossary.md)
    B       batch (labelled pixels)
    C       input bands, all modalities concatenated (``in_channels``)
    P       patch side (odd, default 11); the output is for the centre pixel
    F_low, F_mid, F_high   diffusion-feature channels (``feature_channels["low"|"mid"|"high"]``)
    K       classes
    Dz      a branch's embedding width (of z)
    T       tile side (``predict_dense``: every pixel of a T x T tile at once)

Branch <- guiding feature level (docs/method.md, Stage 2):  cnn <- low,  mamba <- mid,  transformer <- high.
The prediction is the mean of the branch softmaxes; each branch's logits and z are also returned
(for the mutual-learning loss and per-branch reporting).

Two paths, one function. ``forward`` / ``predict`` take one P x P patch per pixel (training, the
reference). ``predict_dense`` takes a (T + 2r) x (T + 2r) region and its features and returns the
probabilities of all T x T centre pixels, equal to ``predict`` on each pixel's patch: every
branch computes its per-pixel parts once over the region (``dense``) and mixes tokens window by
window in chunks of ``chunk_pixels`` (see each branch's docstring).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from bdgf.errors import InputError
from bdgf.models._shapes import DENSE_CHUNK, check_shape
from bdgf.models.cnn import CNNBranch, CNNConfig
from bdgf.models.mamba import MambaBranch, MambaConfig
from bdgf.models.transformer import TransformerBranch, TransformerConfig

BRANCHES: tuple[str, ...] = ("cnn", "mamba", "transformer")
FEATURE_OF: dict[str, str] = {"cnn": "low", "mamba": "mid", "transformer": "high"}


def _no_unknown(where: str, d: dict[str, Any], cls: type) -> None:
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; known: {sorted(f.name for f in fields(cls))}")


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int                      # C
    feature_channels: dict[str, int]      # {"low": F_low, "mid": F_mid, "high": F_high}; only the used levels are needed
    num_classes: int                      # K
    patch_size: int = 11                  # P (odd)
    branches: tuple[str, ...] = BRANCHES  # any non-empty subset of BRANCHES, in this order
    cnn: CNNConfig = field(default_factory=CNNConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "branches", tuple(self.branches))
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise InputError(f"patch_size must be odd and positive, got {self.patch_size}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise InputError(f"need in_channels >= 1 and num_classes >= 2, got {self.in_channels}, {self.num_classes}")
        bad = [b for b in self.branches if b not in BRANCHES]
        if not self.branches or bad or len(set(self.branches)) != len(self.branches):
            raise InputError(f"branches must be a non-empty subset of {BRANCHES} without repeats, got {self.branches}")
        for b in self.branches:
            lvl = FEATURE_OF[b]
            if self.feature_channels.get(lvl, 0) < 1:
                raise InputError(f"branch {b!r} needs feature_channels[{lvl!r}] >= 1, got {self.feature_channels}")

    @classmethod
    def tiny(cls, in_channels: int, feature_channels: dict[str, int], num_classes: int, patch_size: int = 7,
             branches: tuple[str, ...] = BRANCHES) -> "ClassifierConfig":
        """A very small model (width 16, one block/layer per branch) for tests, demos and smoke runs."""
        return cls(
            in_channels=in_channels, feature_channels=dict(feature_channels), num_classes=num_classes,
            patch_size=patch_size, branches=branches,
            cnn=CNNConfig(width=16, low_width=8, num_blocks=1),
            mamba=MambaConfig(d_model=16, n_layers=1, d_state=4, expand=2, d_conv=3, groups=4, gate_hidden=16),
            transformer=TransformerConfig(dim=16, depth=1, heads=2, mlp_ratio=2),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for run metadata and checkpoints)."""
        d = asdict(self)
        d["branches"] = list(self.branches)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierConfig":
        """Inverse of ``to_dict``; unknown keys are an InputError naming them."""
        d = dict(d)
        _no_unknown("classifier config", d, cls)
        for key, sub in (("cnn", CNNConfig), ("mamba", MambaConfig), ("transformer", TransformerConfig)):
            if isinstance(d.get(key), dict):
                _no_unknown(f"classifier config [{key}]", d[key], sub)
                d[key] = sub(**d[key])
        d["branches"] = tuple(d.get("branches", BRANCHES))
        return cls(**d)


class BDGFClassifier(nn.Module):
    """Multi-branch classifier.

    forward(patch (B, C, P, P), low (B, F_low, P, P), mid (B, F_mid, P, P), high (B, F_high, P, P))
      -> {"logits": {branch: (B, K)}, "z": {branch: (B, Dz)}, "probs": (B, K)}
    Feature maps of unused branches may be None.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config
        C, P, fc = cfg.in_channels, cfg.patch_size, cfg.feature_channels
        self.branches = nn.ModuleDict()
        for b in cfg.branches:
            if b == "cnn":
                self.branches[b] = CNNBranch(C, fc["low"], P, cfg.cnn)
            elif b == "mamba":
                self.branches[b] = MambaBranch(C, fc["mid"], P, cfg.mamba)
            else:
                self.branches[b] = TransformerBranch(C, fc["high"], P, cfg.transformer)
        self.heads = nn.ModuleDict({b: nn.Linear(m.out_dim, cfg.num_classes) for b, m in self.branches.items()})

    @property
    def z_dims(self) -> dict[str, int]:
        """Embedding width Dz of each branch (for the mutual-learning projectors)."""
        return {b: m.out_dim for b, m in self.branches.items()}

    def _run(self, patch, low, mid, high) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        feats = {"low": low, "mid": mid, "high": high}
        z, logits = {}, {}
        for b, branch in self.branches.items():          # static loop over the configured branches
            f = feats[FEATURE_OF[b]]
            if f is None:
                raise InputError(f"branch {b!r} needs the {FEATURE_OF[b]!r} features, got None")
            z[b] = branch(patch, f)                       # (B, Dz)
            logits[b] = self.heads[b](z[b])               # (B, K)
        return z, logits

    def forward(self, patch: torch.Tensor, low: torch.Tensor | None = None, mid: torch.Tensor | None = None,
                high: torch.Tensor | None = None) -> dict[str, Any]:
        z, logits = self._run(patch, low, mid, high)
        probs = torch.stack([l.softmax(-1) for l in logits.values()]).mean(0)    # (B, K)
        return {"logits": logits, "z": z, "probs": probs}

    def predict(self, patch: torch.Tensor, low: torch.Tensor, mid: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """(B, C, P, P), (B, F_*, P, P) x 3 -> probs (B, K). Export path: a fixed graph, no branching on data."""
        _, logits = self._run(patch, low, mid, high)
        return torch.stack([l.softmax(-1) for l in logits.values()]).mean(0)

    def predict_dense(self, region: torch.Tensor, low: torch.Tensor | None, mid: torch.Tensor | None,
                      high: torch.Tensor | None, chunk_pixels: int = DENSE_CHUNK) -> torch.Tensor:
        """region (B, C, T+2r, T+2r), features (B, F_*, T+2r, T+2r) -> probs (B, K, T, T): entry
        [..., i, j] equals ``predict`` on the P x P patch centred on region pixel (i + r, j + r).
        Non-square regions work too ((B, C, rows, cols) -> (B, K, rows-P+1, cols-P+1)). At most
        ``chunk_pixels`` windows are token-mixed at a time (bounds the memory per tile). Feature
        maps of unused branches may be None."""
        check_shape("region", region, (None, self.config.in_channels, None, None), "(B, C, T+2r, T+2r)")
        feats = {"low": low, "mid": mid, "high": high}
        probs = []
        for b, branch in self.branches.items():
            f = feats[FEATURE_OF[b]]
            if f is None:
                raise InputError(f"branch {b!r} needs the {FEATURE_OF[b]!r} features, got None")
            z = branch.dense(region, f) if b == "cnn" else branch.dense(region, f, chunk_pixels)  # (B, Dz, T, T)
            logits = self.heads[b](z.permute(0, 2, 3, 1))                      # (B, T, T, K)
            probs.append(logits.softmax(-1))
        return torch.stack(probs).mean(0).permute(0, 3, 1, 2)                  # (B, K, T, T)


class PredictWrapper(nn.Module):
    """Module whose forward is ``model.predict`` (what torch.export / ONNX export trace)."""

    def __init__(self, model: BDGFClassifier):
        super().__init__()
        self.model = model

    def forward(self, patch, low, mid, high):
        return self.model.predict(patch, low, mid, high)
