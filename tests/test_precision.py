"""Mixed precision that runs: with the forward under bf16 autocast (DeepSpeed's ``torch_autocast``
on a GPU, torch's CPU autocast here as the proxy), the stage-1 and stage-2 steps train with finite
float32 losses, the losses and the masking's statistics are computed in float32 from the bf16
outputs, prediction and the inference graph return float32, and ``bf16: auto`` means bf16 only on
a device that has it (fp32 on CPU unless asked for). The same steps through a DeepSpeed engine with
bf16 on the CPU accelerator run in a subprocess (DeepSpeed needs a process group)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bdgf.diffusion.features import FeatureSpec, tile_noise
from bdgf.diffusion.loss import balanced_loss, concat_mse, per_modality_mse
from bdgf.diffusion.masking import AdaptiveModalityMasking
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.step import diffusion_training_step, paired_log_ratios
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
from bdgf.distributed.steppers import (autocast_dtype, bf16_supported, load_ds_template, resolve_ds_config,
                                       resolve_precision)
from bdgf.engine.classify import ModalityView, predict
from bdgf.inference import TileClassifier
from bdgf.losses import MutualLearningLoss
from bdgf.models.classifier import BDGFClassifier, ClassifierConfig

REPO = Path(__file__).resolve().parents[1]
CM = torch.tensor([0, 0, 0, 1])  # 3 HSI bands + 1 LiDAR band
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_denoiser(seed: int = 0) -> DenoiserUNet:
    torch.manual_seed(seed)
    return DenoiserUNet(UNetConfig(in_channels=4, num_modalities=2, base_channels=8, channel_mults=(1, 2),
                                   feature_levels=(0, 1, 1)))


def tiny_classifier(in_channels: int = 6, feats=(3, 4, 5), classes: int = 3, seed: int = 0) -> BDGFClassifier:
    torch.manual_seed(seed)
    return BDGFClassifier(ClassifierConfig.tiny(in_channels, dict(zip(("low", "mid", "high"), feats)), classes, 7))


def output_dtype(module: torch.nn.Module) -> dict:
    """A forward hook recording the dtype the module returns (returns None: the output is kept)."""
    seen: dict = {}

    def hook(mod, inp, out):
        seen["dtype"] = (out if isinstance(out, torch.Tensor) else out["logits"]["cnn"]).dtype

    module.register_forward_hook(hook)
    return seen


# --------------------------------------------------------------------------- stage 1


def test_stage1_losses_are_float32_from_bf16_outputs():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 8, 8, generator=g).bfloat16()  # what the UNet's last conv returns under autocast
    target = torch.randn(3, 4, 8, 8, generator=g)
    valid = torch.rand(3, 8, 8, generator=g) > 0.2
    for v in (None, valid):
        with torch.autocast(**BF16):
            per_mod = per_modality_mse(pred, target, CM, 2, v)
            concat = concat_mse(pred, target, v)
        want = per_modality_mse(pred.float(), target, CM, 2, v)  # the fp32 computation, no autocast
        assert per_mod.dtype == torch.float32 and concat.dtype == torch.float32
        torch.testing.assert_close(per_mod, want, rtol=0, atol=0)
        torch.testing.assert_close(concat, concat_mse(pred.float(), target, v), rtol=0, atol=0)
    with torch.autocast(**BF16):
        loss = balanced_loss(per_mod.bfloat16(), torch.tensor([0.3, 0.7]))
    assert loss.dtype == torch.float32


def _stage1_steps(loss_kind: str, steps: int = 3):
    model = tiny_denoiser()
    before = [p.detach().clone() for p in model.parameters()]
    seen = output_dtype(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masking = AdaptiveModalityMasking(2, warmup_steps=0)
    sched = NoiseSchedule(kind="cosine", num_timesteps=100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 4, 16, 16, generator=g)
    losses, logs = [], {}
    for _ in range(steps):
        with torch.autocast(**BF16):
            loss, logs = diffusion_training_step(model, sched, masking, x0, CM, g, loss_kind=loss_kind,
                                                 modality_names=["hsi", "lidar"])
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, before, seen, masking, losses, logs


@pytest.mark.parametrize("loss_kind", ["balanced", "concat"])
def test_stage1_step_trains_under_cpu_bf16_autocast(loss_kind):
    model, before, seen, masking, losses, logs = _stage1_steps(loss_kind)
    assert seen["dtype"] == torch.bfloat16  # the forward did run in bf16
    assert all(np.isfinite(v) for v in logs.values())
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
    assert sum(changed) >= 0.9 * len(changed)  # it trains: (nearly) every parameter moved
    assert masking.step == 3 and bool(torch.isfinite(masking.probabilities).all())


def test_masking_statistics_are_float32_under_autocast():
    model = tiny_denoiser().eval()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([10, 30, 50, 70])
    sa, s1 = NoiseSchedule(kind="cosine", num_timesteps=100).coefficients(t)
    rows, pair_mod = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1])
    with torch.autocast(**BF16):
        log_ratio, masked = paired_log_ratios(model, x0, eps, t, sa, s1, rows, pair_mod, CM, 2)
    assert log_ratio.dtype == torch.float32 and masked.dtype == torch.float32
    assert bool(torch.isfinite(log_ratio).all()) and bool((log_ratio[masked > 0] != 0).all())


# --------------------------------------------------------------------------- stage 2


def _classifier_batch(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = tuple(torch.randn(b, c, 7, 7, generator=g) for c in (6, 3, 4, 5))
    return x, torch.randint(0, 3, (b,), generator=g)


def test_mutual_learning_loss_is_float32_under_autocast():
    clf = tiny_classifier()
    crit = MutualLearningLoss(clf.z_dims)
    x, y = _classifier_batch()
    with torch.autocast(**BF16):
        out = clf(*x)
        loss, terms = crit(out["logits"], out["z"], y)
    assert out["logits"]["cnn"].dtype == torch.bfloat16  # the forward ran in bf16
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    # exactly the fp32 computation on the upcast outputs (projectors included: not in bf16)
    want, want_terms = crit({b: v.float() for b, v in out["logits"].items()}, {b: v.float() for b, v in out["z"].items()}, y)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["sim"], want_terms["sim"], rtol=1e-6, atol=1e-6)


def test_stage2_step_trains_under_cpu_bf16_autocast():
    clf = tiny_classifier()
    crit = MutualLearningLoss(clf.z_dims)
    params = list(clf.parameters()) + list(crit.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = _classifier_batch()
    for _ in range(3):
        with torch.autocast(**BF16):
            out = clf(*x)
            loss, terms = crit(out["logits"], out["z"], y)
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
        assert all(bool(torch.isfinite(v)) for v in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert sum(changed) >= 0.9 * len(changed)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before[-len(list(crit.parameters())):],
                                                                crit.parameters()))  # projectors train too


def test_predict_under_autocast_returns_float32():
    clf = tiny_classifier(in_channels=4 + 2)
    view = ModalityView(["hsi", "lidar"], CM)
    g = torch.Generator().manual_seed(3)
    batches = [{"patch": torch.randn(5, 4, 7, 7, generator=g), "valid": torch.ones(5, 7, 7, dtype=torch.bool),
                "low": torch.randn(5, 3, 7, 7, generator=g), "mid": torch.randn(5, 4, 7, 7, generator=g),
                "high": torch.randn(5, 5, 7, 7, generator=g), "label": torch.randint(0, 3, (5,), generator=g),
                "coords": torch.zeros(5, 2, dtype=torch.int64)} for _ in range(2)]
    with torch.autocast(**BF16):
        labels, probs, per_branch, coords = predict(clf, batches, view)
    assert probs.dtype == np.float32 and probs.shape == (10, 3)
    assert all(p.dtype == np.float32 for p in per_branch.values())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=2e-2)


def test_inference_graph_under_autocast_returns_float32():
    C, T, halo = 4, 4, 32
    spec = FeatureSpec("test", (5, 60), 1, 9, T, halo, "concat")
    den = DenoiserUNet(UNetConfig(C, 2, base_channels=8, channel_mults=(1, 2, 2)))
    fc = {k: v * len(spec.timesteps) for k, v in den.feature_channels.items()}
    clf = BDGFClassifier(ClassifierConfig.tiny(C + 2, fc, 3, 5))
    graph = TileClassifier(den, NoiseSchedule(), clf, spec, CM).eval()
    S = T + 2 * halo
    window = torch.randn(2, C, S, S, generator=torch.Generator().manual_seed(4))
    window[0, :, halo, halo] = float("nan")  # a nodata pixel of the tile
    noise = torch.from_numpy(tile_noise(spec, C, [(0, 0), (0, 4)], S))
    with torch.no_grad(), torch.autocast(**BF16):
        probs = graph(window, noise)
        feats = graph.features(torch.nan_to_num(window), noise)
    assert probs.dtype == torch.float32 and all(f.dtype == torch.float32 for f in feats.values())
    arr = probs.numpy()  # bf16 would raise TypeError here
    assert arr.dtype == np.float32 and float(arr[0, :, 0, 0].sum()) == 0.0
    np.testing.assert_allclose(arr[1].sum(0), 1.0, atol=2e-2)
    # the pipeline's bulk entry point (the graph's output as a numpy array), under autocast too
    from bdgf.pipeline import Pipeline

    pipe = Pipeline(run=None, config=None, seed=0, spec=spec, graph=graph, modalities=["hsi", "lidar"],
                    class_names=["a", "b", "c"], normalisation={}, device=torch.device("cpu"))
    with torch.autocast(**BF16):
        out = pipe.classify_windows(window.numpy(), [(0, 0), (0, 4)])
        without = pipe.classify_windows(window.numpy(), [(0, 0), (0, 4)], absent=["lidar"])
    assert out.dtype == np.float32 and without.dtype == np.float32 and out.shape == (2, 3, T, T)
    np.testing.assert_allclose(out, arr, atol=1e-6)


# --------------------------------------------------------------------------- DeepSpeed config


def _resolved(enabled, world_size: int = 1):
    t = load_ds_template("pretrain")
    t["bf16"] = {"enabled": enabled}
    return resolve_ds_config(t, micro_batch=4, world_size=world_size, grad_clip=1.0)


def test_bf16_auto_is_fp32_on_cpu_and_bf16_only_where_the_device_has_it():
    cfg = _resolved("auto", world_size=2)
    assert cfg["bf16"]["enabled"] == "auto"  # left for the worker's device, not the driver's
    cpu = resolve_precision(cfg, torch.device("cpu"))
    assert cpu["bf16"]["enabled"] is False and autocast_dtype(cpu) is None
    assert not bf16_supported("cpu")
    if not torch.cuda.is_available():
        assert not bf16_supported("cuda:0")
        assert autocast_dtype(resolve_precision(cfg, torch.device("cuda:0"))) is None
    on = resolve_precision(_resolved(True), "cpu")  # explicit: bf16 autocast on the CPU too
    assert on["bf16"]["enabled"] is False and on["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert autocast_dtype(on) == torch.bfloat16
    off = resolve_precision(_resolved(False), "cpu")
    assert autocast_dtype(off) is None and "torch_autocast" not in off


def test_bf16_enabled_must_be_true_false_or_auto():
    from bdgf.distributed.steppers import DistributedConfigError

    with pytest.raises(DistributedConfigError, match="bf16.enabled"):
        _resolved("yes")


_DS_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    sys.path.insert(0, sys.argv[1])
    from test_precision import tiny_denoiser, tiny_classifier, output_dtype, _classifier_batch, CM, _resolved
    from bdgf.diffusion.masking import AdaptiveModalityMasking
    from bdgf.diffusion.schedules import NoiseSchedule
    from bdgf.diffusion.step import diffusion_training_step
    from bdgf.distributed.steppers import make_engine
    from bdgf.engine.classify import JointModule
    from bdgf.losses import MutualLearningLoss

    out = {}
    for name, enabled in (("auto", "auto"), ("bf16", True)):  # autocast off first (DeepSpeed's globals)
        model = tiny_denoiser()
        seen = output_dtype(model)
        before = [p.detach().clone() for p in model.parameters()]
        engine, stepper = make_engine("deepspeed", model, torch.optim.AdamW(model.parameters(), 1e-2),
                                      _resolved(enabled), torch.device("cpu"))
        masking, g = AdaptiveModalityMasking(2, warmup_steps=0), torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            loss, logs = diffusion_training_step(engine, NoiseSchedule(kind="cosine", num_timesteps=100), masking,
                                                 torch.randn(4, 4, 16, 16, generator=g), CM, g)
            stepper.step(loss)
            losses.append([str(loss.dtype), float(loss.detach())])
        moved = sum(not torch.equal(b, p.detach().float()) for b, p in zip(before, model.parameters()))
        out["stage1_" + name] = dict(dtype=str(seen["dtype"]), losses=losses, moved=moved, params=len(before),
                                     param_dtype=str(next(model.parameters()).dtype))
    clf = tiny_classifier()
    crit = MutualLearningLoss(clf.z_dims)
    joint = JointModule(clf, crit)
    seen = output_dtype(clf)
    before = [p.detach().clone() for p in joint.parameters()]
    engine, stepper = make_engine("deepspeed", joint, torch.optim.AdamW(joint.parameters(), 1e-2), _resolved(True),
                                  torch.device("cpu"))
    x, y = _classifier_batch()
    losses = []
    for _ in range(3):
        o = engine(*x)
        loss, terms = crit(o["logits"], o["z"], y)
        stepper.step(loss)
        losses.append([str(loss.dtype), float(loss.detach())])
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, joint.parameters()))
    out["stage2_bf16"] = dict(dtype=str(seen["dtype"]), losses=losses, moved=moved, params=len(before))
    print("RESULT " + json.dumps(out))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_bf16_on_the_cpu_accelerator_trains_both_stages(tmp_path):
    """DeepSpeed (as installed) runs bf16 on its CPU accelerator as ``torch_autocast`` (DeepSpeed's
    own bf16 weights would need bf16 inputs: F.conv2d refuses fp32 input with bf16 weights)."""
    script = tmp_path / "ds_bf16.py"
    script.write_text(_DS_SCRIPT)
    env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(REPO / "tests")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["stage1_auto"]["dtype"] == "torch.float32"  # auto on CPU: fp32
    assert res["stage1_bf16"]["dtype"] == "torch.bfloat16"  # explicit bf16: the engine's forward in bf16
    assert res["stage2_bf16"]["dtype"] == "torch.bfloat16"
    for key in ("stage1_auto", "stage1_bf16", "stage2_bf16"):
        r = res[key]
        assert all(d == "torch.float32" and np.isfinite(v) for d, v in r["losses"]), r
        assert r["moved"] >= 0.9 * r["params"], r  # it trains
    assert res["stage1_bf16"]["param_dtype"] == "torch.float32"  # fp32 master weights, autocast only


def test_metrics_take_bf16_tensors():
    from bdgf.metrics import confusion_matrix, overall_accuracy

    y_true = torch.tensor([0, 1, 2, 2])
    y_pred = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.bfloat16)  # e.g. an argmax kept in the autocast dtype
    assert overall_accuracy(y_true, y_pred) == pytest.approx(0.75)
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
