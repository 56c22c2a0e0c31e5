"""Shared fixtures. Real benchmark pieces are read from ../shared/data/real (never copied)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.exists():
        pytest.fail(f"real benchmark pieces not found at {REAL_DATA} (shared/ must sit beside the repo)")
    return REAL_DATA


def small_scene_data(h: int = 40, w: int = 52, hsi_bands: int = 12, seed: int = 0):
    """A small two-modality SceneData with two classes (numpy only; for store-level tests)."""
    from bdgf.data.scene import ModalityData, SceneData

    rng = np.random.default_rng(seed)
    hsi = rng.normal(100.0, 10.0, size=(hsi_bands, h, w)).astype(np.float32)
    lidar = rng.normal(5.0, 2.0, size=(1, h, w)).astype(np.float32)
    train = np.zeros((h, w), np.uint8)
    train[2:6, 2:6] = 1
    train[20:24, 30:34] = 2
    test = np.zeros((h, w), np.uint8)
    test[10:15, 10:15] = 1
    test[30:35, 40:45] = 2
    return SceneData(
        name="small",
        modalities={
            "hsi": ModalityData(hsi, kind="hsi", wavelengths_nm=list(np.linspace(400, 1000, hsi_bands))),
            "lidar": ModalityData(lidar, kind="lidar"),
        },
        labels={"train": train, "test": test},
        class_names=["grass", "roof"],
    )


@pytest.fixture
def small_scene():
    return small_scene_data()
