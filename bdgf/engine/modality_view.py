"""What the stage-2 classifier sees of a batch of patches: bands where they are there, and the
diffusion features computed without a modality when that modality is absent (modality dropout
in training, ``evaluate --absent`` in scoring).

Shapes: B patches, C bands, M modalities, P patch side, F feature channels (docs/glossary.md).
"""

from __future__ import annotations

import torch

from bdgf.diffusion.features import LEVELS, feature_name
from bdgf.models.inputs import classifier_input


class ModalityView:
    """What the classifier sees of a batch when some modalities are absent.

    ``inputs(batch, absent)`` -> (x (B, C + M, P, P), low, mid, high): ``absent`` (B,) int64 is
    the modality index missing from each sample (-1: none); its bands are zeroed and marked
    unavailable (:func:`bdgf.models.inputs.classifier_input`, with the patch's nodata) and its
    features are the cached ones computed without it. ``draw`` samples ``absent`` for modality
    dropout."""

    def __init__(self, modalities: list[str], channel_modality, dropout: float = 0.0, seed: int = 0):
        self.modalities = list(modalities)
        self.channel_modality = torch.as_tensor(channel_modality, dtype=torch.int64)
        self.dropout = float(dropout) if len(self.modalities) > 1 else 0.0
        self.generator = torch.Generator().manual_seed(int(seed) + 7_777)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The cached arrays a loader must read: the levels, and their variants when dropping."""
        absent = self.modalities if self.dropout > 0 else []
        return tuple(feature_name(level, m) for m in (None, *absent) for level in LEVELS)

    def draw(self, batch_size: int) -> torch.Tensor:
        drop = torch.rand(batch_size, generator=self.generator) < self.dropout
        which = torch.randint(0, len(self.modalities), (batch_size,), generator=self.generator)
        return torch.where(drop, which, torch.full_like(which, -1))

    def inputs(self, batch: dict, device, absent: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        B, M = batch["patch"].shape[0], len(self.modalities)
        absent = torch.full((B,), -1, dtype=torch.int64) if absent is None else absent
        present = torch.ones(B, M)
        rows = torch.nonzero(absent >= 0).flatten()
        present[rows, absent[rows]] = 0.0
        x = classifier_input(batch["patch"], batch["valid"], present, self.channel_modality)
        feats = []
        for level in LEVELS:
            f = batch[level]
            for m, name in enumerate(self.modalities):
                sel = absent == m
                if bool(sel.any()):
                    f = torch.where(sel[:, None, None, None], batch[feature_name(level, name)], f)
            feats.append(f.to(device))
        return (x.to(device), *feats)
