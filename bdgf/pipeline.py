"""A trained run as one inference pipeline: raw rasters in, class probabilities out.

    pipe = Pipeline.from_run("runs/a", seed=0)
    grid = pipe.grid(H, W)                                   # the tiles the features were cut with
    x = pipe.normalise({"hsi": hsi, "lidar": lidar})         # raw (C_m, H, W) -> model input (C, H, W)
    probs = pipe.classify_windows(windows, window_origins)   # (B, C, S, S) -> (B, K, T, T)

``from_run`` rebuilds everything from the run directory alone (denoiser, schedule, feature
settings, classifier, the normalisation statistics of the scene it was trained on) and holds the
inference graph (:class:`bdgf.inference.TileClassifier`) that export, serving and bulk
classification run. Tiles are cut by :mod:`bdgf.tiler`; the noise is the position-keyed noise
of feature extraction, so a window at the same place sees the same noise as the cached features.

Glossary (letters as in docs/glossary.md): B windows in a batch, C bands, C_m bands of modality m,
T tile side, h halo, S = T + 2h, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from bdgf.config import RunConfig
from bdgf.diffusion.features import FeatureSpec, aligned_halo, tile_noise
from bdgf.engine.features import feature_spec
from bdgf.errors import BDGFError, InputError
from bdgf.inference import TileClassifier
from bdgf.presence import presence_flags
from bdgf.run import Run, state_hash
from bdgf.tiler import TileGrid, read_windows


@dataclass
class Pipeline:
    run: Run
    config: RunConfig
    seed: int
    spec: FeatureSpec
    graph: TileClassifier
    modalities: list[str]  # in the model's channel order
    class_names: list[str]
    normalisation: dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (mean (C_m,), std (C_m,))
    device: torch.device

    @classmethod
    def from_run(cls, run_dir: str | Path, seed: int | None = None, device: str | torch.device = "cpu") -> "Pipeline":
        """The pipeline of ``run_dir``'s denoiser and the classifier of ``seed`` (default: the
        config's train seed if it was trained, else the lowest trained seed)."""
        run = Run(run_dir)
        info = run.info()
        config = run.config()
        trained = run.trained_seeds()
        if not trained:
            raise BDGFError(f"{run.path}: no trained classifier; run `bdgf train` first")
        if seed is None:
            seed = config.train.seed if config.train.seed in trained else trained[0]
        elif seed not in trained:
            raise BDGFError(f"{run.path}: no classifier for seed {seed}; trained seeds: {trained}")
        device = torch.device(device)
        denoiser, schedule, ckpt = run.load_denoiser(device)
        cached = feature_spec(config.features, denoiser, state_hash(ckpt["model"]))
        # The graph's windows reach the receptive radius past every pixel a patch reads.
        need = denoiser.receptive_radius + config.train.patch_size // 2
        spec = replace(cached, halo=max(cached.halo, aligned_halo(need, denoiser.config.tile_multiple)))
        classifier = run.load_classifier(seed, device)
        bands = [int(b) for _, b in info["scene"]["modalities"]]
        channel_modality = np.repeat(np.arange(len(bands)), bands)
        graph = TileClassifier(denoiser, schedule, classifier, spec, channel_modality).to(device).eval()
        return cls(run=run, config=config, seed=seed, spec=spec, graph=graph,
                   modalities=[m for m, _ in info["scene"]["modalities"]],
                   class_names=list(info["scene"]["class_names"]), normalisation=run.normalisation(),
                   device=device)

    # --- geometry -----------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return self.spec.tile_size

    @property
    def halo(self) -> int:
        return self.spec.halo

    def grid(self, height: int, width: int) -> TileGrid:
        return self.spec.grid(height, width)

    # --- input ------------------------------------------------------------------------------
    def presence(self, absent: Sequence[str] = ()) -> np.ndarray:
        """(M,) float32 presence flags: 0 for the modalities named in ``absent``."""
        return presence_flags(self.modalities, absent)

    def normalise(self, raw: Mapping[str, np.ndarray], absent: Sequence[str] = ()) -> np.ndarray:
        """{modality: raw (C_m, h, w)} -> (C, h, w) float32 normalised with the run's statistics,
        modalities in the model's order. Non-finite values become NaN (nodata: classified as 0,
        the nodata class, and never used as context); modalities in ``absent`` need not be given
        and their channels are 0."""
        self.presence(absent)
        missing = [m for m in self.modalities if m not in raw and m not in absent]
        if missing:
            raise InputError(f"missing modalities {missing}; the model needs {self.modalities} "
                             "(name a modality in absent to classify without it)")
        shape = next((np.shape(raw[m])[1:] for m in self.modalities if m in raw and m not in absent), None)
        parts = []
        for m in self.modalities:
            mean, std = self.normalisation[m]
            if m in absent:
                parts.append(np.zeros((len(mean), *shape), np.float32))
                continue
            x = np.asarray(raw[m], np.float32)
            if x.ndim != 3 or x.shape[0] != len(mean) or x.shape[1:] != tuple(shape):
                raise InputError(f"{m}: expected ({len(mean)}, {shape[0]}, {shape[1]}) raw values, got shape {x.shape}")
            z = (x - mean[:, None, None]) / std[:, None, None]
            parts.append(np.where(np.isfinite(z), z, np.nan).astype(np.float32))
        return np.concatenate(parts, axis=0)

    # --- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def classify_windows(self, windows: np.ndarray | torch.Tensor, origins: Sequence[Sequence[int]],
                         absent: Sequence[str] = ()) -> np.ndarray:
        """windows (B, C, S, S) normalised (NaN = nodata), ``origins`` their top-left corners in
        the scene's pixel grid (on the tile grid) -> probabilities (B, K, T, T) of the windows'
        centre tiles (all 0 at nodata pixels), float32 whatever autocast it runs under. ``absent``:
        modalities to classify without."""
        w = torch.as_tensor(np.asarray(windows, np.float32)).to(self.device)
        S = self.spec.tile_size + 2 * self.spec.halo
        if w.dim() != 4 or w.shape[-2:] != (S, S):
            raise InputError(f"windows must be (B, C, {S}, {S}), got {tuple(w.shape)}")
        present = torch.from_numpy(self.presence(absent)).to(self.device)[None].expand(w.shape[0], -1)
        if absent:  # an absent modality's channels carry no data, and must not mark pixels nodata
            keep = present[0].index_select(0, self.graph.channel_modality) > 0
            w = torch.where(keep[None, :, None, None], w, torch.zeros_like(w))
        noise = torch.from_numpy(tile_noise(self.spec, w.shape[1], [tuple(map(int, o)) for o in origins], S))
        return self.graph(w, noise.to(self.device), present).float().cpu().numpy()  # float32 under autocast too

    def classify_tiles(self, scene, origins: Sequence[Sequence[int]], absent: Sequence[str] = ()) -> np.ndarray:
        """Probabilities (B, K, T, T) of the given tiles of a scene store (read and normalised by
        it; its nodata pixels get all-zero probabilities)."""
        grid = self.grid(*scene.shape)
        windows = read_windows(scene, grid, origins, nodata=np.nan)
        return self.classify_windows(windows, [grid.window(o)[:2] for o in origins], absent)
