"""Ray Train + DeepSpeed stages on a real local Ray (2 CPUs), a tiny synthetic scene, a tiny UNet.

One Ray session for the module; three TorchTrainer runs (pretrain, classifier, killed worker);
the bad-input tests fail on the driver before anything is launched.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import ray  # noqa: E402 - the distributed extra is part of `make install`
import deepspeed  # noqa: E402,F401

from bdgf.config import RunConfig  # noqa: E402
from bdgf.errors import BDGFError, StoreError  # noqa: E402
from bdgf.run import read_jsonl  # noqa: E402
from helpers import TINY_UNET, tiny_distributed_config, tiny_store  # noqa: E402

def tiny_config(**pretrain) -> RunConfig:
    return tiny_distributed_config(24, 12, 2, **pretrain)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("scene"))


def distributed_pretrain(store, run, cfg=None, **kw):
    from bdgf.engine.pretrain import pretrain

    return pretrain(store, run, cfg, progress=False, **kw)


@pytest.fixture(scope="module")
def pretrained(ray_session, store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pre"
    summary = distributed_pretrain(store, run, tiny_config(), workers=2)
    return run, summary


def load_denoiser(path):
    from bdgf.run import Run

    return Run(Path(path).parents[1]).load_denoiser()


def test_pretrain_two_workers_deepspeed(pretrained):
    run, summary = pretrained
    assert summary.engine == "deepspeed" and summary.workers == 2 and summary.steps == 24
    assert (summary.device, summary.device_reason) == ("cpu", "cluster has no GPU")  # the cluster's, not the driver's
    recs = [r for r in read_jsonl(run / "pretrain" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert all(r["workers"] == 2 and r["global_tiles_per_s"] > 0 for r in recs)
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first, (first, last)
    # The plain checkpoint in the run dir (what single-process code reads) equals the model state
    # DeepSpeed saved in the final Ray checkpoint.
    model, schedule, ckpt = load_denoiser(run / "pretrain" / "denoiser.pt")
    assert ckpt["step"] == 24 and ckpt["masking"]["step"] == 24  # one update per step, over the global batch
    ray_ckpt = Path(summary.checkpoint)
    ds_state = torch.load(next(ray_ckpt.glob("engine/ds/*model_states.pt")), map_location="cpu", weights_only=False)
    from bdgf.diffusion.unet import DenoiserUNet, UNetConfig

    ref = DenoiserUNet(UNetConfig(**ckpt["unet_config"]))
    ref.load_state_dict(ds_state["module"])
    ref.eval()
    x = torch.randn(2, model.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 40])
    present = torch.ones(2, model.config.num_modalities)
    with torch.no_grad():
        assert torch.equal(model(x, t, present), ref(x, t, present))
    info = json.loads((run / "run.json").read_text())
    assert info["pretrain"]["steps"] == 24 and len(info["stores"]) == 1
    # denoiser.pt holds the whole optimiser state as a plain AdamW's: the moments ZeRO partitioned
    # over the two ranks, gathered; they are DeepSpeed's own shards put back together.
    opt = ckpt["stepper"]["optimizer"]
    params = list(model.parameters())
    assert sorted(opt["state"]) == list(range(len(params)))
    assert all(opt["state"][i]["exp_avg"].shape == p.shape and float(opt["state"][i]["step"]) == 24
               for i, p in enumerate(params))
    shards = [torch.load(ray_ckpt / "engine" / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                         map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
              for r in range(2)]
    for key in ("exp_avg", "exp_avg_sq"):
        flat = torch.cat([s[key].flatten() for s in shards])
        ours = torch.cat([opt["state"][i][key].flatten() for i in range(len(params))])
        assert torch.equal(flat[: ours.numel()], ours), key


def test_single_process_resume_of_a_distributed_run_keeps_the_optimiser(pretrained, store, tmp_path, caplog):
    from bdgf.run import Run

    run, _ = pretrained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("ray"))
    cfg = Run(copy).config()
    cfg.with_overrides({"pretrain.steps": 26}).save(Run(copy).config_path)
    before = Run(copy).denoiser_checkpoint()["stepper"]["optimizer"]
    summary = distributed_pretrain(store, copy, None, resume=True)
    assert summary.steps == 26 and "optimiser starts afresh" not in caplog.text
    after = Run(copy).denoiser_checkpoint()["stepper"]["optimizer"]
    assert float(after["state"][0]["step"]) == 26  # 24 restored + 2, not 2 from a fresh optimiser
    assert not torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


def test_classifier_two_workers(pretrained, store):
    from bdgf.engine.classify import train
    from bdgf.engine.features import compute_features
    from bdgf.run import Run

    run, _ = pretrained
    compute_features(store, run, progress=False)
    r = train(store, run, seed=0, workers=2, progress=False)
    assert r.engine == "deepspeed" and r.epoch >= 1 and 0.0 <= r.val_oa <= 1.0
    model = Run(run).load_classifier(0)
    assert model.config.branches == ("cnn",)
    recs = read_jsonl(run / "train" / "seed0" / "log.jsonl")
    assert any("val_oa" in x for x in recs) and any("loss" in x for x in recs)
    # One driver: a single-process seed of the same config leaves the same files and fields.
    single = train(store, run, seed=1, progress=False)
    assert single.engine == "torch" and single.workers == 1
    assert list(vars(single)) == list(vars(r))
    assert layout(run / "train" / "seed1") == layout(run / "train" / "seed0")
    assert json.loads((run / "train" / "seed1" / "summary.json").read_text()).keys() == \
        json.loads((run / "train" / "seed0" / "summary.json").read_text()).keys()


def test_distributed_resume_from_denoiser_pt_is_exact(pretrained, store, tmp_path):
    """--resume of a finished 2-worker run in another run directory (so no Ray experiment to
    continue: denoiser.pt is all there is) loads the gathered optimiser state into every rank's
    ZeRO partition and every rank's RNG streams, and ends where an uninterrupted run ends."""
    from bdgf.run import Run

    run, _ = pretrained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("ray"))
    cfg = Run(copy).config()
    cfg.with_overrides({"pretrain.steps": 26}).save(Run(copy).config_path)
    resumed = distributed_pretrain(store, copy, None, resume=True, workers=2)
    straight = distributed_pretrain(store, tmp_path / "straight", tiny_config(steps=26), workers=2)
    assert resumed.steps == straight.steps == 26
    a, b = Run(copy).denoiser_checkpoint(), Run(tmp_path / "straight").denoiser_checkpoint()
    worst = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])
    assert worst <= 1e-6, f"weights differ by {worst}"
    oa, ob = a["stepper"]["optimizer"]["state"], b["stepper"]["optimizer"]["state"]
    assert float(oa[0]["step"]) == float(ob[0]["step"]) == 26  # 24 restored + 2, not a fresh optimiser's 2
    assert max(float((oa[i]["exp_avg"] - ob[i]["exp_avg"]).abs().max()) for i in oa) <= 1e-6


def layout(root: Path) -> set[str]:
    """Relative paths of the files under ``root``, without Ray Train's own experiment folder."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "ray"}


def test_cli_pretrain_workers_overwrite_replaces_a_single_process_run(ray_session, store, tmp_path):
    """`bdgf pretrain --workers 2 --overwrite` over an existing (single-process) run replaces it,
    and the two leave the same run-directory layout and summary fields."""
    import yaml
    from typer.testing import CliRunner

    from bdgf.cli import app
    from bdgf.run import Run, state_hash

    cfg = tiny_config(steps=12, checkpoint_every=6)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    run = tmp_path / "run"
    single = distributed_pretrain(store, run, cfg)  # workers=0: here, one process
    assert single.workers == 1 and single.engine == "torch"
    files_single = layout(run)
    summary_single = json.loads((run / "run.json").read_text())["pretrain"]
    old_hash = state_hash(Run(run).denoiser_checkpoint()["model"])
    (run / "train" / "seed0").mkdir(parents=True)
    (run / "train" / "seed0" / "stale.txt").write_text("a classifier of the old denoiser")

    runner = CliRunner()
    args = ["pretrain", str(store), "--out", str(run), "--config", str(tmp_path / "c.yaml"), "--workers", "2"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "already holds a pretrained run" in refused.output
    done = runner.invoke(app, [*args, "--overwrite"])
    assert done.exit_code == 0, done.output
    assert "on 2 worker(s) (deepspeed)" in done.output

    ckpt = Run(run).denoiser_checkpoint()
    assert ckpt["step"] == 12 and state_hash(ckpt["model"]) != old_hash
    assert not (run / "train").exists()  # every old stage output went with --overwrite
    recs = [r for r in read_jsonl(run / "pretrain" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 13)) and all(r["workers"] == 2 for r in recs)
    assert layout(run) == files_single
    summary_dist = json.loads((run / "run.json").read_text())["pretrain"]
    assert summary_dist.keys() == summary_single.keys() and summary_dist["workers"] == 2


def test_killed_worker_resumes_exactly(pretrained, store, tmp_path, monkeypatch):
    """A worker SIGKILLed mid-run: the group restarts from the last checkpoint and, with the RNG
    streams and the sampler position restored, ends with the weights of the uninterrupted run of
    the same seed and world size (the ``pretrained`` fixture)."""
    from bdgf.distributed.faults import FAULT_ENV

    straight_run, straight = pretrained
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"14:{marker}:1")  # SIGKILL rank 1 before step 14, once
    run = tmp_path / "run"
    cfg = tiny_config()  # the fixture's: 24 steps, a checkpoint every 12
    t0 = time.perf_counter()
    summary = distributed_pretrain(store, run, cfg, workers=2, max_failures=2)
    assert marker.exists(), "the worker was not killed"
    assert summary.steps == 24
    restarts = read_jsonl(run / "pretrain" / "restarts.jsonl")
    assert restarts and restarts[0]["resumed_from_step"] == 12
    lost = 14 - 1 - restarts[0]["resumed_from_step"]
    assert lost <= cfg.pretrain.checkpoint_every
    recs = [r for r in read_jsonl(run / "pretrain" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 25))  # the lost steps' lines were dropped and rerun once
    a = torch.load(straight_run / "pretrain" / "denoiser.pt", weights_only=False)
    b = torch.load(run / "pretrain" / "denoiser.pt", weights_only=False)
    assert b["step"] == 24
    worst = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert worst <= 1e-6, f"the resumed run's weights differ from the uninterrupted run's by {worst}"
    assert json.dumps(a["masking"], default=str) == json.dumps(b["masking"], default=str)
    ref = [r["loss"] for r in read_jsonl(straight_run / "pretrain" / "log.jsonl") if "loss" in r]
    assert max(abs(x - r["loss"]) for x, r in zip(ref, recs)) <= 1e-5
    assert time.perf_counter() - t0 < 240


# ----------------------------------------------------------------------------------------
# Bad input: clear errors before anything is launched
# ----------------------------------------------------------------------------------------


def test_unreadable_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        distributed_pretrain(tmp_path / "nope.zarr", tmp_path / "run", tiny_config(), workers=2)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(BDGFError, match="empty.zarr"):
        distributed_pretrain(tmp_path / "empty.zarr", tmp_path / "run", tiny_config(), workers=2)
    assert not (tmp_path / "run").exists()


def test_stores_with_different_layouts(store, tmp_path):
    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene

    other = tmp_path / "sar.zarr"
    write_scene(make_scene("sar", 0), other)
    with pytest.raises(StoreError, match="different band layouts"):
        distributed_pretrain([store, other], tmp_path / "run", tiny_config(), workers=2)


def test_deepspeed_batch_config_must_fit_world_size(store, tmp_path):
    from bdgf.distributed.steppers import DistributedConfigError

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                               "gradient_accumulation_steps": 1}))
    with pytest.raises(DistributedConfigError, match=r"train_batch_size 10 != micro batch 4 × world_size 2"):
        distributed_pretrain(store, tmp_path / "run", tiny_config(), workers=2, ds_config=str(bad))
    bad.write_text(json.dumps({"train_batch_size": 9, "gradient_accumulation_steps": 1}))
    with pytest.raises(DistributedConfigError, match="not divisible"):
        distributed_pretrain(store, tmp_path / "run", tiny_config(), workers=2, ds_config=str(bad))
    assert not (tmp_path / "run").exists()


def test_resume_from_checkpoint_of_another_model(pretrained, store, tmp_path):
    from bdgf.run import CheckpointMismatch

    from bdgf.distributed.launch import experiment_name, run_identity

    run, summary = pretrained
    other = tmp_path / "run"
    # an interrupted job of this run (same run dir, store and world size) left this checkpoint
    identity = run_identity(other, [store], 2, "pretrain")
    ckpt = other / "ray" / experiment_name("pretrain", identity) / Path(summary.checkpoint).name
    shutil.copytree(summary.checkpoint, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["signature"]["identity"] = identity
    (ckpt / "meta.json").write_text(json.dumps(meta))
    cfg = tiny_config(unet={**TINY_UNET, "base_channels": 16})
    with pytest.raises(CheckpointMismatch, match=r"unet_config.*checkpoint .*base_channels.: 8.*this run .*base_channels.: 16"):
        distributed_pretrain(store, other, cfg, workers=2)


def test_unreachable_address_fails_fast(store, tmp_path):
    from bdgf.distributed.launch import ClusterUnreachable

    t0 = time.perf_counter()
    with pytest.raises(ClusterUnreachable, match=r"127\.0\.0\.1:9"):
        distributed_pretrain(store, tmp_path / "run", tiny_config(), workers=2, address="127.0.0.1:9")
    with pytest.raises(ClusterUnreachable, match="ray://127.0.0.1:1"):
        distributed_pretrain(store, tmp_path / "run", tiny_config(), workers=2, address="ray://127.0.0.1:1")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "run").exists()


def test_features_over_ray_tasks_match_single_process(pretrained, store, tmp_path):
    import numpy as np
    import zarr

    from bdgf.data.feature_cache import cached_spec
    from bdgf.diffusion.features import LEVELS
    from bdgf.engine.features import compute_features

    run, _ = pretrained
    compute_features(store, run, progress=False)  # reused if the classifier test made them
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    del zarr.open_group(str(copy), mode="r+")["features"]
    s = compute_features(copy, run, workers=2, progress=False)
    assert s.state == "new" and s.workers == 2 and cached_spec(copy)[1]
    assert (s.device, s.device_reason) == ("cpu", "cluster has no GPU")
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(copy), mode="r")
    for name in LEVELS:
        # other tile batches: fp16 rounding of slightly different float sums, nothing more
        np.testing.assert_allclose(a["features"][name][...].astype(np.float32),
                                   b["features"][name][...].astype(np.float32), rtol=1e-2, atol=1e-3)
    assert compute_features(copy, run, workers=2, progress=False).state == "reuse"
