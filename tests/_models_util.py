"""Tiny classifier configs and random inputs shared by the model tests (kept small: 2 CPU cores)."""
import torch

from bdgf.models import BRANCHES, ClassifierConfig, CNNConfig, MambaConfig, TransformerConfig

C, FL, FM, FH, K = 4, 6, 5, 7, 3


def tiny_config(patch_size=7, branches=BRANCHES, num_classes=K):
    return ClassifierConfig(
        in_channels=C, feature_channels={"low": FL, "mid": FM, "high": FH}, num_classes=num_classes,
        patch_size=patch_size, branches=branches,
        cnn=CNNConfig(width=16, low_width=8, num_blocks=1),
        mamba=MambaConfig(d_model=16, n_layers=1, d_state=4, expand=2, d_conv=3, groups=4, gate_hidden=16),
        transformer=TransformerConfig(dim=16, depth=1, heads=2, mlp_ratio=2),
    )


def tiny_inputs(batch=4, patch_size=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = patch_size
    return tuple(torch.randn(batch, c, P, P, generator=g) for c in (C, FL, FM, FH))
