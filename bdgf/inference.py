"""The inference graph: a tile in, class probabilities for every pixel of its centre out.

One module holds the frozen denoiser and the classifier, so it exports as one graph (torch.export,
ONNX). It has no data-dependent Python control flow: shapes are fixed by the tile size, the halo,
the patch size and the number of timesteps.

Glossary (letters as in docs/glossary.md)
    B   tiles in a batch          C   input bands (all modalities)
    T   output tile side          P   patch side (odd), r = P // 2
    h   halo (>= r)               S   T + 2h, the window side the denoiser sees
    n   timesteps × draws         K   classes

Noise comes in as an input (B, n, C, S, S), made by ``bdgf.diffusion.features.tile_noise``
outside the graph, so exported and eager paths see exactly the same noise. The noising is the
schedule's formula (``bdgf.diffusion.schedules.mix``) with the coefficients of the feature
timesteps held as buffers; cropping is the tiler's.

At the scene border the training patches reflect-pad the *features*; here the denoiser sees a
reflect-padded *input*. The two agree away from the border (>= h + r pixels in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdgf.diffusion.features import FeatureSpec, level_maps
from bdgf.diffusion.schedules import NoiseSchedule, mix
from bdgf.diffusion.unet import DenoiserUNet
from bdgf.models.classifier import BDGFClassifier
from bdgf.tiler import crop


class TileClassifier(nn.Module):
    """forward(window (B, C, S, S), noise (B, n, C, S, S)) -> probs (B, K, T, T)."""

    def __init__(self, denoiser: DenoiserUNet, schedule: NoiseSchedule, classifier: BDGFClassifier,
                 spec: FeatureSpec, tile_size: int):
        super().__init__()
        P = classifier.config.patch_size
        self.r = P // 2
        if spec.halo < self.r:
            raise ValueError(f"halo {spec.halo} must be >= patch_size // 2 = {self.r}")
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.classifier = classifier.eval()
        self.T, self.h, self.P = tile_size, spec.halo, P
        self.S = tile_size + 2 * spec.halo
        steps = [int(t) for t in spec.timesteps for _ in range(spec.draws)]
        sa, s1 = schedule.coefficients(torch.tensor(steps, dtype=torch.int64))
        self.register_buffer("steps", torch.tensor(steps, dtype=torch.int64), persistent=False)
        self.register_buffer("sqrt_ab", sa.float(), persistent=False)
        self.register_buffer("sqrt_1mab", s1.float(), persistent=False)
        self.n_t, self.draws, self.reduce = len(spec.timesteps), spec.draws, spec.reduce

    @property
    def num_noise(self) -> int:
        return int(self.steps.numel())

    def features(self, window: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """window (B, C, S, S), noise (B, n, C, S, S) -> {level: (B, F, S, S)} as cached in stores."""
        B, C, S, _ = window.shape
        n = self.num_noise
        x0 = window[:, None].expand(B, n, C, S, S)
        x_t = mix(x0, noise, self.sqrt_ab.view(1, n).expand(B, n), self.sqrt_1mab.view(1, n).expand(B, n))
        t = self.steps.repeat(B)
        present = window.new_ones(B * n, self.denoiser.config.num_modalities)
        _, feats = self.denoiser.forward_with_features(x_t.reshape(B * n, C, S, S), t, present)
        out = {}
        for name, f in level_maps(feats, S).items():
            Fc = f.shape[1]
            f = f.reshape(B, self.n_t, self.draws, Fc, S, S).mean(2)  # average the draws
            out[name] = f.reshape(B, self.n_t * Fc, S, S) if self.reduce == "concat" else f.mean(1)
        return out

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Ch, S, S) -> (B*T*T, Ch, P, P): the P×P patch around every centre pixel."""
        B, Ch = x.shape[:2]
        x = crop(x, self.h - self.r, self.T + 2 * self.r)
        cols = F.unfold(x, kernel_size=self.P)  # (B, Ch*P*P, T*T)
        return cols.transpose(1, 2).reshape(B * self.T * self.T, Ch, self.P, self.P)

    def forward(self, window: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        B = window.shape[0]
        feats = self.features(window, noise)
        probs = self.classifier.predict(
            self._patches(window), self._patches(feats["low"]), self._patches(feats["mid"]),
            self._patches(feats["high"]),
        )  # (B*T*T, K)
        K = probs.shape[-1]
        return probs.reshape(B, self.T, self.T, K).permute(0, 3, 1, 2)

