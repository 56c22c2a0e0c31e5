"""Plain helpers the test modules import (`from helpers import ...`): pytest puts tests/ on sys.path
because tests/conftest.py lives there (default "prepend" import mode). Fixtures live in conftest.py.

The classifier helpers build the tiny BDGFClassifier used by the model and export tests: an image patch
of C bands and diffusion features of FL/FM/FH channels at the low/mid/high levels, K classes."""

from __future__ import annotations

import torch

from bdgf.models import BRANCHES, ClassifierConfig

C, FL, FM, FH, K = 4, 6, 5, 7, 3  # patch bands, low/mid/high feature channels, classes


def classifier_config(patch_size: int = 7, branches: tuple[str, ...] = BRANCHES, num_classes: int = K) -> ClassifierConfig:
    """`ClassifierConfig.tiny` on the shapes above."""
    return ClassifierConfig.tiny(C, {"low": FL, "mid": FM, "high": FH}, num_classes, patch_size, branches)


def classifier_inputs(batch: int = 4, patch_size: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(patch, low, mid, high), standard normal, each (batch, channels, patch_size, patch_size)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, c, patch_size, patch_size, generator=g) for c in (C, FL, FM, FH))


# --- tiny run configs for the Ray Train + DeepSpeed tests (test_distributed, test_resume_exact,
# test_run_identity): a 2-level UNet, CNN branch only, seconds per stage on 2 cores.
TINY_UNET = {"base_channels": 8, "channel_mults": [1, 2], "feature_levels": [0, 1, 1]}


def tiny_distributed_config(steps: int, checkpoint_every: int, epochs: int = 2, /, **pretrain):
    """A RunConfig for the distributed tests: ``steps`` pretraining steps checkpointed every
    ``checkpoint_every``, ``epochs`` classifier epochs; ``pretrain.<key>`` overrides after them
    (``steps=8`` among them wins)."""
    from bdgf.config import RunConfig

    over = {
        "pretrain.tile_size": 16, "pretrain.batch_size": 4, "pretrain.steps": steps, "pretrain.lr": 3e-3,
        "pretrain.log_every": 1, "pretrain.checkpoint_every": checkpoint_every, "pretrain.unet": TINY_UNET,
        "pretrain.schedule": {"kind": "cosine", "num_timesteps": 100},
        "pretrain.masking": {"mode": "adaptive", "warmup_steps": 5},
        "features.timesteps": [5, 50], "features.tile_size": 16, "features.batch_size": 8,
        "train.patch_size": 7, "train.batch_size": 16, "train.epochs": epochs, "train.branches": ["cnn"],
    }
    over.update({f"pretrain.{k}": v for k, v in pretrain.items()})
    return RunConfig().with_overrides(over)


# --- the tiny single-process run of the engine tests (tiny preset; seconds per stage) ---------------
TINY_RUN = {
    "pretrain.steps": 30,
    "pretrain.batch_size": 4,
    "pretrain.tile_size": 16,
    "pretrain.checkpoint_every": 10,
    "pretrain.unet": {"base_channels": 8, "channel_mults": [1, 2, 2]},
    "pretrain.masking": {"warmup_steps": 5},
    "features.tile_size": 16,
    "features.timesteps": [5, 100],
    "train.epochs": 25,
    "train.batch_size": 16,
    "train.patience": 25,
    "train.model": {"mamba": {"d_model": 16, "d_state": 4, "n_layers": 1}},
}


# --- small data the tests make themselves -----------------------------------------------------------
def tiny_store(folder):
    """The `tiny` synthetic scene (seed 0) written as ``folder/tiny.zarr``; returns its path."""
    from pathlib import Path

    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene

    path = Path(folder) / "tiny.zarr"
    write_scene(make_scene("tiny", 0), path)
    return path


def separable_patch_batch(n: int, generator: torch.Generator, feats: dict[str, int], bands: int = 4,
                          patch_size: int = 7) -> dict[str, torch.Tensor]:
    """A stage-2 batch of ``n`` patches of two classes (alternating) that a classifier can separate:
    patch (n, bands, P, P) of noise around +0.3 (class 0) or -0.3 (class 1), all valid, zero
    features of ``feats[level]`` channels, coords 0."""
    y = torch.arange(n) % 2
    x = 0.3 * (1.0 - 2.0 * y.float())[:, None, None, None] + torch.randn(n, bands, patch_size, patch_size,
                                                                        generator=generator)
    b = {"patch": x, "valid": torch.ones(n, patch_size, patch_size, dtype=torch.bool), "label": y,
         "coords": torch.zeros(n, 2, dtype=torch.int64)}
    b.update({lvl: torch.zeros(n, c, patch_size, patch_size) for lvl, c in feats.items()})
    return b
