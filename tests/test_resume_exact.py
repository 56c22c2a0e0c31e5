"""Exact resume: a resumed run ends where an uninterrupted one of the same seed and world size ends.

Single process: ``pretrain --resume`` from ``denoiser.pt`` (optimiser, masking, RNG streams and
the tile sampler's position come back). Ray Train (real local Ray, 2 CPUs): a worker SIGKILLed
mid-run (``BDGF_FAULT_INJECT``) and the restarted group reach the same weights as a run never
killed; a Stage-2 run resumed after its early stop trains no further.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bdgf.config import RunConfig
from bdgf.run import Run, read_jsonl
from helpers import separable_patch_batch, tiny_distributed_config, tiny_store

TOL = 1e-6


def tiny_config(**pretrain) -> RunConfig:
    return tiny_distributed_config(16, 6, 6, **pretrain)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("scene"))


def assert_same_weights(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    assert worst <= tol, f"weights differ by up to {worst}"


def extend(run: Path, steps: int) -> None:
    """What continuing a finished run takes: its config.yaml with more steps (--resume reads it)."""
    cfg = Run(run).config()
    cfg.with_overrides({"pretrain.steps": steps}).save(Run(run).config_path)


def test_single_process_resume_continues_exactly(store, tmp_path):
    """12 steps, then --resume to 16, ends with the weights, optimiser moments, masking state and
    log of one uninterrupted 16-step run."""
    from bdgf.engine.pretrain import pretrain

    straight = tmp_path / "straight"
    pretrain(store, straight, tiny_config(steps=16), progress=False)
    split = tmp_path / "split"
    pretrain(store, split, tiny_config(steps=12), progress=False)
    first = Run(split).denoiser_checkpoint()
    assert first["step"] == 12 and first["rng"]["world"] == 1 and len(first["rng_ranks"]) == 1
    assert first["stepper"]["optimizer"]["state"]
    extend(split, 16)
    s = pretrain(store, split, None, resume=True, progress=False)
    assert s.steps == 16
    a, b = Run(straight).denoiser_checkpoint(), Run(split).denoiser_checkpoint()
    assert_same_weights(a["model"], b["model"])
    for k, sa in a["stepper"]["optimizer"]["state"].items():
        sb = b["stepper"]["optimizer"]["state"][k]
        assert_same_weights({n: v for n, v in sa.items() if torch.is_tensor(v)},
                            {n: v for n, v in sb.items() if torch.is_tensor(v)})
    assert json.dumps(a["masking"], sort_keys=True, default=str) == json.dumps(b["masking"], sort_keys=True, default=str)
    la = [r["loss"] for r in read_jsonl(straight / "pretrain" / "log.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(split / "pretrain" / "log.jsonl") if "loss" in r]
    assert len(lb) == 16 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5


def test_resume_without_saved_streams_is_not_exact(store, tmp_path):
    """The check above can fail: dropping the saved RNG state (the old behaviour: reseeded from the
    step) changes the weights of the resumed run."""
    from bdgf.engine.pretrain import pretrain
    from bdgf.run import write_checkpoint

    straight = tmp_path / "straight"
    pretrain(store, straight, tiny_config(steps=16), progress=False)
    split = tmp_path / "split"
    pretrain(store, split, tiny_config(steps=12), progress=False)
    ckpt = Run(split).denoiser_checkpoint()
    write_checkpoint({**ckpt, "rng": None, "rng_ranks": None}, Run(split).denoiser_path)
    extend(split, 16)
    pretrain(store, split, None, resume=True, progress=False)
    a, b = Run(straight).denoiser_checkpoint(), Run(split).denoiser_checkpoint()
    with pytest.raises(AssertionError, match="weights differ"):
        assert_same_weights(a["model"], b["model"])


def test_stage2_patience_counter_carries_over_a_resume():
    """train_epochs stopped inside its patience window and continued with its saved counters stops
    at the epoch of an uninterrupted run (a forgotten counter would train patience epochs more)."""
    from bdgf.config import TrainConfig
    from bdgf.engine.classify import ModalityView, build_classifier, train_epochs
    from bdgf.engine.loop import TorchStepper
    from bdgf.models.inputs import input_channels

    feats = {"low": 2, "mid": 2, "high": 2}
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return separable_patch_batch(n, g, feats)

    train_loader, val_loader = [batch(16) for _ in range(4)], [batch(32)]

    def setup():
        torch.manual_seed(0)
        model, criterion = build_classifier(TrainConfig(patch_size=7, branches=("cnn",)), input_channels(4, 2), feats, 2)
        joint = torch.nn.ModuleDict({"m": model, "c": criterion})
        return model, criterion, TorchStepper(joint, torch.optim.AdamW(joint.parameters(), lr=1e-3)), \
            ModalityView(["hsi", "lidar"], [0, 0, 0, 1])

    model, criterion, stepper, view = setup()
    epochs_a: list[int] = []
    straight = train_epochs(model, criterion, train_loader, val_loader, stepper, view, epochs=300, patience=5,
                            on_epoch_end=lambda e, b: epochs_a.append(e))
    assert straight["stopped_early"]
    cut = straight["epoch"] + 2  # inside the patience window: two epochs without a better one

    model, criterion, stepper, view = setup()
    counters: dict = {}
    part = train_epochs(model, criterion, train_loader, val_loader, stepper, view, epochs=cut, patience=5,
                        counters=counters)
    assert counters["since_best"] == 2 and not part.get("stopped_early")
    epochs_b: list[int] = []
    resumed = train_epochs(model, criterion, train_loader, val_loader, stepper, view, epochs=300, patience=5,
                           start_epoch=cut, best=part, counters=counters, on_epoch_end=lambda e, b: epochs_b.append(e))
    assert resumed == straight and epochs_b[-1] == epochs_a[-1]


# ----------------------------------------------------------------------------------------
# Stage 2 on Ray Train: the early stop is part of the checkpoint
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def featured(store, tmp_path_factory):
    """A run with a (briefly) pretrained denoiser whose features are cached in ``store``."""
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain

    run = tmp_path_factory.mktemp("runs") / "run"
    pretrain(store, run, tiny_config(steps=4, checkpoint_every=4), progress=False)
    compute_features(store, run, progress=False)
    return run


def test_stage2_resumed_after_its_early_stop_trains_no_further(ray_session, featured, store):
    """lr 1e-12: val never improves after epoch 1, so patience 1 stops the run after epoch 2 of 6.
    Resubmitting the same job continues its Ray experiment: it must stop there again, not train
    epochs 3.. with a patience counter and early-stop flag it forgot."""
    from bdgf.engine.classify import train

    run = featured
    over = {"train.lr": 1e-12, "train.patience": 1, "train.epochs": 6}
    first = train(store, run, seed=0, overrides=over, workers=2, progress=False)
    assert first.stopped_early and first.epochs_run == 2 and first.epoch == 1
    log_path = run / "train" / "seed0" / "log.jsonl"
    lines = log_path.read_text()
    again = train(store, run, seed=0, overrides=over, workers=2, progress=False)
    assert again.stopped_early and again.epochs_run == 2 and again.epoch == 1
    assert log_path.read_text() == lines  # not one more step
    restarts = read_jsonl(run / "train" / "seed0" / "restarts.jsonl")
    assert [r["resumed_after_epoch"] for r in restarts] == [2]  # it did restore the stopped run's checkpoint


def test_stage2_killed_worker_resumes_exactly(ray_session, featured, store, tmp_path, monkeypatch):
    """A Stage-2 worker SIGKILLed in epoch 2: the group restarts after epoch 1 and ends with the
    classifier, the val figures and the log of the uninterrupted run of the same seed."""
    from bdgf.distributed.faults import FAULT_ENV
    from bdgf.engine.classify import train

    run = featured
    over = {"train.epochs": 3, "train.selection": "last"}
    straight = train(store, run, seed=3, overrides=over, workers=2, progress=False, out_dir=tmp_path / "straight")
    recs = read_jsonl(tmp_path / "straight" / "log.jsonl")
    per_epoch = max(r["step"] for r in recs if r.get("epoch") == 1 and "step" in r)
    marker = tmp_path / "killed.marker"
    monkeypatch.setenv(FAULT_ENV, f"{per_epoch + 1}:{marker}:1")  # rank 1, first step of epoch 2
    killed = train(store, run, seed=3, overrides=over, workers=2, progress=False, out_dir=tmp_path / "killed")
    assert marker.exists(), "the worker was not killed"
    assert [r["resumed_after_epoch"] for r in read_jsonl(tmp_path / "killed" / "restarts.jsonl")] == [1]
    a = torch.load(tmp_path / "straight" / "classifier.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "classifier.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    assert_same_weights(a["model"], b["model"])
    assert (killed.val_oa, killed.epochs_run) == (straight.val_oa, straight.epochs_run)
    assert abs(killed.val_nll - straight.val_nll) <= 1e-6
    la = [r for r in recs if "loss" in r]
    lb = [r for r in read_jsonl(tmp_path / "killed" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in lb] == [r["step"] for r in la]  # the lost step's line dropped, rerun once
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) <= 1e-5


def test_single_process_stage2_checkpoint_holds_what_a_resume_needs(featured, store):
    """train_state.pt of a plain single-process run carries the loop counters, the RNG streams and
    the optimiser state beside the epoch and the best so far."""
    from bdgf.engine.classify import train

    summary = train(store, featured, seed=5, overrides={"train.epochs": 2, "train.patience": 1}, progress=False)
    st = torch.load(featured / "train" / "seed5" / "train_state.pt", weights_only=False)
    assert st["epoch"] == summary.epochs_run and st["best"]["epoch"] == summary.epoch
    assert st["counters"]["step"] > 0 and st["counters"]["since_best"] == (summary.epochs_run - summary.epoch)
    assert st["rng"]["world"] == 1 and {"view", "shuffle"} <= set(st["rng"]["generators"])
    assert st["stepper"]["optimizer"]["state"]
    assert (summary.device, summary.device_reason) == ("cpu", "this machine has no GPU") or torch.cuda.is_available()
