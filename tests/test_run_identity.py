"""Where the work runs decides the device; a run's Ray experiments belong to that run and job.

The device decision and the experiment bookkeeping are tested on plain data (a resources dict,
checkpoint folders on disk); the Ray tests run real jobs on a local Ray (2 CPUs, no GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdgf.distributed.launch import (check_other_jobs, choose_device, clear_run_storage, experiment_name,
                                     run_experiments, run_identity)
from bdgf.errors import BDGFError
from bdgf.run import CheckpointMismatch, read_jsonl
from helpers import tiny_distributed_config

# ----------------------------------------------------------------------------------------
# The device decision, from a cluster's resources
# ----------------------------------------------------------------------------------------


def test_auto_takes_the_clusters_gpus_never_the_drivers():
    cpu_only = {"CPU": 2.0, "memory": 1e9, "node:__internal_head__": 1.0}
    assert choose_device("auto", cpu_only, workers=2) == ("cpu", "cluster has no GPU")
    gpus = {"CPU": 16.0, "GPU": 4.0}
    got = choose_device("auto", gpus, workers=4)
    assert got.device == "gpu" and got.reason == "cluster has 4 GPU(s)"
    few = choose_device("auto", {"CPU": 16.0, "GPU": 1.0}, workers=2)
    assert few.device == "cpu" and "fewer than the 2 workers" in few.reason
    assert choose_device(None, gpus).device == "gpu"  # None is auto


def test_explicit_choices():
    assert choose_device("cpu", {"GPU": 8.0}, workers=2) == ("cpu", "requested with --device cpu")
    got = choose_device("GPU", {"CPU": 4.0, "GPU": 2.0}, workers=2)
    assert got.device == "gpu" and got.reason.startswith("requested with --device gpu")
    with pytest.raises(BDGFError, match=r"--device gpu: the Ray cluster has no GPU \(resources: CPU 2\)"):
        choose_device("gpu", {"CPU": 2.0}, workers=2)
    with pytest.raises(BDGFError, match="has 1 GPU.s. but 3 workers need one each"):
        choose_device("gpu", {"CPU": 8.0, "GPU": 1.0}, workers=3)
    with pytest.raises(BDGFError, match="--device must be one of auto, cpu, gpu, got 'tpu'"):
        choose_device("tpu", {"CPU": 2.0})
    with pytest.raises(BDGFError, match="--device gpu: this machine has no GPU"):
        choose_device("gpu", {"GPU": 0}, where="this machine")


# ----------------------------------------------------------------------------------------
# Run identity and the experiments in a storage
# ----------------------------------------------------------------------------------------


def test_experiment_name_holds_run_dir_stores_and_world_size(tmp_path):
    a = run_identity(tmp_path / "run", [tmp_path / "a.zarr"], 2, "pretrain")
    name = experiment_name("pretrain", a)
    assert name == experiment_name("pretrain", run_identity(tmp_path / "run", [tmp_path / "a.zarr"], 2, "pretrain"))
    others = [run_identity(tmp_path / "run", [tmp_path / "b.zarr"], 2, "pretrain"),
              run_identity(tmp_path / "run", [tmp_path / "a.zarr"], 4, "pretrain"),
              run_identity(tmp_path / "other", [tmp_path / "a.zarr"], 2, "pretrain")]
    assert len({name, *(experiment_name("pretrain", o) for o in others)}) == 4
    # the run dir's hash is the middle part: one run's experiments are found by it
    assert experiment_name("pretrain", others[1]).split("-i")[0] == name.split("-i")[0]
    assert experiment_name("pretrain", others[2]).split("-i")[0] != name.split("-i")[0]


def fake_checkpoint(storage: Path, base: str, identity: dict, step: int, final: bool) -> str:
    """A Ray experiment folder as a job leaves it (only what the driver reads: meta.json)."""
    name = experiment_name(base, identity)
    d = storage / name / f"checkpoint_step{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"stage": base, "step": step, "final": final,
                                             "signature": {"stage": base, "identity": identity}}))
    return name


def test_an_unfinished_checkpoint_of_another_job_is_refused_naming_what_differs(tmp_path):
    storage = tmp_path / "storage"
    old = run_identity(tmp_path / "run", [tmp_path / "x.zarr"], 2, "pretrain")
    old_name = fake_checkpoint(storage, "pretrain", old, 6, final=False)
    new = run_identity(tmp_path / "run", [tmp_path / "y.zarr"], 4, "pretrain")
    with pytest.raises(CheckpointMismatch) as err:
        check_other_jobs(str(storage), "pretrain", new, experiment_name("pretrain", new), "use --overwrite")
    msg = str(err.value)
    assert f"checkpoint in {storage}/{old_name} was made for store {tmp_path}/x.zarr with 2 workers" in msg
    assert f"this job: store {tmp_path}/y.zarr with 4 workers; use --overwrite" in msg
    # the same job continues its own; another run's or another stage's checkpoints are not ours
    check_other_jobs(str(storage), "pretrain", old, old_name, "")
    elsewhere = run_identity(tmp_path / "run2", [tmp_path / "y.zarr"], 4, "pretrain")
    check_other_jobs(str(storage), "pretrain", elsewhere, experiment_name("pretrain", elsewhere), "")
    check_other_jobs(str(storage), "train-seed0", new, experiment_name("train-seed0", new), "")


def test_a_finished_job_is_not_in_the_way(tmp_path):
    storage = tmp_path / "storage"
    fake_checkpoint(storage, "pretrain", run_identity(tmp_path / "run", [tmp_path / "x.zarr"], 2), 16, final=True)
    new = run_identity(tmp_path / "run", [tmp_path / "x.zarr"], 4)
    check_other_jobs(str(storage), "pretrain", new, experiment_name("pretrain", new), "")


def test_overwrite_clears_only_this_runs_experiments(tmp_path):
    storage = tmp_path / "storage"
    mine = [fake_checkpoint(storage, "pretrain", run_identity(tmp_path / "run", [tmp_path / "x.zarr"], 2), 6, False),
            fake_checkpoint(storage, "train-seed0", run_identity(tmp_path / "run", [tmp_path / "x.zarr"], 2, "train/seed0"), 1, False)]
    theirs = fake_checkpoint(storage, "pretrain", run_identity(tmp_path / "other", [tmp_path / "x.zarr"], 2), 6, False)
    (storage / "unrelated").mkdir()
    assert run_experiments(str(storage), tmp_path / "run") == sorted(mine)
    assert run_experiments(str(storage), tmp_path / "run", "pretrain") == [mine[0]]
    assert sorted(clear_run_storage(str(storage), tmp_path / "run")) == sorted(mine)
    assert sorted(p.name for p in storage.iterdir()) == sorted([theirs, "unrelated"])


# ----------------------------------------------------------------------------------------
# Real jobs on a local Ray
# ----------------------------------------------------------------------------------------

def tiny_config():
    return tiny_distributed_config(6, 3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene

    d = tmp_path_factory.mktemp("scenes")
    write_scene(make_scene("tiny", 0), d / "a.zarr")
    write_scene(make_scene("tiny", 1), d / "b.zarr")
    return d / "a.zarr", d / "b.zarr"


def test_gpu_asked_of_a_cluster_without_one_fails_before_launch(ray_session, stores, tmp_path):
    from bdgf.engine.pretrain import pretrain

    with pytest.raises(BDGFError, match=r"--device gpu: the Ray cluster has no GPU \(resources: CPU 2"):
        pretrain(stores[0], tmp_path / "run", tiny_config(), workers=2, device="gpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_two_runs_sharing_a_storage_do_not_share_checkpoints(ray_session, stores, tmp_path):
    """Same config, different stores, one --storage: the second run starts from step 0 in its own
    experiment. A stale unfinished checkpoint of the second run made with another world size is
    refused before launch, and --overwrite clears it (and only it) from the storage."""
    from bdgf.engine.pretrain import pretrain
    from bdgf.run import Run, state_hash

    storage = tmp_path / "shared"
    a = pretrain(stores[0], tmp_path / "a", tiny_config(), workers=2, storage=str(storage), progress=False)
    assert (a.device, a.device_reason) == ("cpu", "cluster has no GPU")
    first = sorted(p.name for p in storage.iterdir())
    assert len(first) == 1

    stale = fake_checkpoint(storage, "pretrain", run_identity(tmp_path / "b", [stores[1]], 1, "pretrain"), 3, False)
    with pytest.raises(CheckpointMismatch, match=r"with 1 worker; this job: store .*b\.zarr with 2 workers; "
                                                 r"use --overwrite or another --storage"):
        pretrain(stores[1], tmp_path / "b", tiny_config(), workers=2, storage=str(storage), progress=False)
    b = pretrain(stores[1], tmp_path / "b", tiny_config(), workers=2, storage=str(storage), overwrite=True,
                 progress=False)
    assert b.steps == 6 and not (tmp_path / "b" / "pretrain" / "restarts.jsonl").exists()
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "pretrain" / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))  # trained from scratch, not continued from a's step 6
    names = sorted(p.name for p in storage.iterdir())
    assert stale not in names and first[0] in names and len(names) == 2
    assert Path(a.checkpoint).parent != Path(b.checkpoint).parent
    assert state_hash(Run(tmp_path / "a").denoiser_checkpoint()["model"]) != \
        state_hash(Run(tmp_path / "b").denoiser_checkpoint()["model"])


def test_cli_device_option_errors_are_one_line_before_anything_is_written(stores, tmp_path):
    import torch
    from typer.testing import CliRunner

    from bdgf.cli import app

    runner = CliRunner()
    for stage in ("pretrain", "features", "train"):
        assert "--device" in runner.invoke(app, [stage, "--help"]).output
    bad = runner.invoke(app, ["pretrain", str(stores[0]), "--out", str(tmp_path / "run"), "--device", "tpu"])
    assert bad.exit_code == 2 and bad.output.strip() == "error: --device must be one of auto, cpu, gpu, got 'tpu'"
    if not torch.cuda.is_available():
        no_gpu = runner.invoke(app, ["pretrain", str(stores[0]), "--out", str(tmp_path / "run"), "--device", "gpu"])
        assert no_gpu.exit_code == 2 and "--device gpu: this machine has no GPU" in no_gpu.output
    assert not (tmp_path / "run").exists()
