"""The inference graph: a window in, class probabilities for every pixel of its centre tile out.

One module holds the frozen denoiser and the classifier, so it exports as one graph (torch.export,
ONNX). It has no data-dependent Python control flow: shapes are fixed by the tile size, the halo,
the patch size and the number of timesteps.

Glossary (letters as in docs/glossary.md)
    B   tiles in a batch          C   input bands (all modalities)
    T   output tile side          P   patch side (odd), r = P // 2
    h   halo (>= Rf + r)          S   T + 2h, the window side the denoiser sees
    n   timesteps × draws         K   classes
    M   modalities                Rf  the denoiser's receptive radius

Inputs: the normalised window (B, C, S, S) with NaN where a pixel is nodata; the noise
(B, n, C, S, S), made by ``bdgf.diffusion.features.tile_noise`` outside the graph so exported and
eager paths see the same noise; and the presence flags (B, M) (1 = the modality is in the
request; 0 = absent: its channels are replaced by the denoiser's mask embedding, as in masked
pretraining, and the classifier sees it as unavailable, ``bdgf.models.inputs``).

Exactness: the halo covers the denoiser's receptive radius Rf plus the patch radius r, so the
features of every pixel a patch reads (the tile and a ring of r around it) are exactly the
cached ones (``bdgf.diffusion.features``: tile invariance), and the classifier runs densely over
the tile (``BDGFClassifier.predict_dense``), equal to running it on each pixel's patch.

Output: probabilities (B, K, T, T), float32 whatever autocast the graph runs under; a nodata
pixel gets all zeros (zero confidence), which :func:`class_map` turns into class 0 = nodata.
"""

from __future__ import annotations

import torch
from torch import nn

from bdgf.diffusion.features import FeatureSpec, check_window, level_maps
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet
from bdgf.models._shapes import DENSE_CHUNK
from bdgf.models.classifier import BDGFClassifier
from bdgf.models.inputs import classifier_input
from bdgf.tiler import crop
from kernels.dispatch import noise_and_mask


class TileClassifier(nn.Module):
    """forward(window (B, C, S, S), noise (B, n, C, S, S), present (B, M) | None) -> probs (B, K, T, T)
    float32."""

    def __init__(self, denoiser: DenoiserUNet, schedule: NoiseSchedule, classifier: BDGFClassifier,
                 spec: FeatureSpec, channel_modality):
        super().__init__()
        P = classifier.config.patch_size
        self.r = P // 2
        check_window(denoiser, spec.halo, spec.tile_size, need=denoiser.receptive_radius + self.r)
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.classifier = classifier.eval()
        self.T, self.h, self.P = spec.tile_size, spec.halo, P
        self.S = spec.tile_size + 2 * spec.halo
        self.M = denoiser.config.num_modalities
        steps = [int(t) for t in spec.timesteps for _ in range(spec.draws)]
        sa, s1 = schedule.coefficients(torch.tensor(steps, dtype=torch.int64))
        self.register_buffer("steps", torch.tensor(steps, dtype=torch.int64), persistent=False)
        self.register_buffer("sqrt_ab", sa.float(), persistent=False)
        self.register_buffer("sqrt_1mab", s1.float(), persistent=False)
        self.register_buffer("channel_modality", torch.as_tensor(channel_modality, dtype=torch.int64),
                             persistent=False)
        self.n_t, self.draws, self.reduce = len(spec.timesteps), spec.draws, spec.reduce
        # Windows token-mixed at a time by the Mamba and Transformer branches. Each chunk is one copy
        # of those branches in an exported graph (torch.export unrolls the loop), so fewer, larger
        # chunks export faster; but ONNX Runtime then holds far more memory per tile (1024-window
        # chunks at T = 64: 6.2 GB at batch 4, against 1.9 GB with 256), so the default stays.
        self.chunk_pixels = DENSE_CHUNK

    @property
    def num_noise(self) -> int:
        return int(self.steps.numel())

    def features(self, window: torch.Tensor, noise: torch.Tensor, present: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """window (B, C, S, S) with nodata as 0, noise (B, n, C, S, S), present (B, M) ->
        {level: (B, F, S, S)}, equal to the cached features wherever they are exact (>= Rf from the
        window's edge)."""
        B, C, S, _ = window.shape
        n = self.num_noise
        if present is None:
            present = window.new_ones(B, self.M)
        pres = present.repeat_interleave(n, dim=0)  # (B*n, M)
        x_t = noise_and_mask(window.repeat_interleave(n, dim=0), noise.reshape(B * n, C, S, S),
                             self.sqrt_ab.repeat(B), self.sqrt_1mab.repeat(B), pres,
                             self.denoiser.mask_embedding, self.channel_modality)
        _, feats = self.denoiser.forward_with_features(x_t, self.steps.repeat(B), pres)
        out = {}
        for name, f in level_maps(feats, S).items():
            Fc = f.shape[1]
            f = f.reshape(B, self.n_t, self.draws, Fc, S, S).mean(2)  # average the draws
            out[name] = f.reshape(B, self.n_t * Fc, S, S) if self.reduce == "concat" else f.mean(1)
        return {name: f.float() for name, f in out.items()}  # float32 under autocast too

    def forward(self, window: torch.Tensor, noise: torch.Tensor, present: torch.Tensor | None = None
                ) -> torch.Tensor:
        B = window.shape[0]
        if present is None:
            present = window.new_ones(B, self.M)
        valid = torch.isfinite(window).all(dim=1)  # (B, S, S)
        clean = torch.where(valid[:, None], window, torch.zeros_like(window))
        feats = self.features(clean, noise, present)
        size = self.T + 2 * self.r
        region = crop(classifier_input(clean, valid, present, self.channel_modality), self.h - self.r, size)
        probs = self.classifier.predict_dense(
            region, *(crop(feats[name], self.h - self.r, size) for name in ("low", "mid", "high")),
            chunk_pixels=self.chunk_pixels)
        probs = probs.float()  # float32 whatever the autocast (bf16 would not survive .numpy())
        return probs * crop(valid, self.h, self.T)[:, None].to(probs.dtype)  # (B, K, T, T), 0 at nodata


def class_map(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, K, T, T) -> (classes (B, T, T) int64 with 0 = nodata and 1..K the classes as in
    the store's labels, confidence (B, T, T) = the top probability, 0 at nodata)."""
    conf, idx = probs.max(dim=1)
    return torch.where(conf > 0, idx + 1, torch.zeros_like(idx)), conf
