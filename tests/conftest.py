"""Shared fixtures: real benchmark pieces (read in place, never copied), one torch thread, a small scene.

Plain helper functions the tests import live in tests/helpers.py; seeded fake dataset files in
tests/data/<dataset>/data.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA_ENV = "BDGF_REAL_DATA"  # where the real pieces are; default <repo>/../shared/data/real
REQUIRE_REAL_DATA_ENV = "BDGF_REQUIRE_REAL_DATA"  # =1 (CI): their absence fails instead of skipping


def real_data_dir() -> Path:
    """$BDGF_REAL_DATA if set, else <repo>/../shared/data/real."""
    env = os.environ.get(REAL_DATA_ENV)
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real benchmark pieces. Absent: the test is skipped, or fails under
    BDGF_REQUIRE_REAL_DATA=1 (set by .ci/run, so CI never passes without them)."""
    path = real_data_dir()
    if not path.is_dir():
        reason = (f"real benchmark pieces not found at {path} (set {REAL_DATA_ENV} to their folder; "
                  f"default <repo>/../shared/data/real)")
        if os.environ.get(REQUIRE_REAL_DATA_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason}; {REQUIRE_REAL_DATA_ENV} is set, so they are required", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for the requesting module (restored after it): small tensors on a
    shared 2-core runner run several times faster on one thread than on two. Module-scoped, so
    module-scoped fixtures may use it; a whole module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# --- Triton kernels: interpreter on CPU, compiled on a GPU (tests/test_kernels_*.py) -----------------


@pytest.fixture
def interp(monkeypatch):
    """Run Triton under its CPU interpreter (TRITON_INTERPRET=1); on a CUDA host where Triton was
    imported compiled, a skip naming why (the `gpu` tests run the kernels there)."""
    import torch

    from kernels._triton_util import interpreter_ready

    if torch.cuda.is_available() and not interpreter_ready():
        pytest.skip("CUDA host: Triton was imported in compiled mode, so the interpreter tests do not run here "
                    "(the `gpu` tests run the kernels on CUDA; TRITON_INTERPRET=1 pytest runs these on CPU)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not interpreter_ready():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; run pytest with TRITON_INTERPRET=1")


@pytest.fixture
def cuda_triton():
    """A CUDA device Triton can launch on (compiled mode), else a skip naming why not."""
    import torch

    from kernels._triton_util import can_launch, interpreter_on

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled Triton kernels need one (these tests run where a GPU is)")
    if interpreter_on():
        pytest.skip("TRITON_INTERPRET=1 is set: Triton cannot launch on CUDA tensors; unset it for the gpu tests")
    if not can_launch(torch.device("cuda")):
        pytest.skip("CUDA is present but Triton has no active driver here")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray (2 CPUs) for the module's distributed tests, shut down after it if it started one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()
