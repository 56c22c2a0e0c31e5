"""A trained run as a self-contained model package: graph files plus a ``model.json`` manifest.

    bdgf export RUN --format onnx|aoti|tensorrt|all --out DIR [--seed K] [--int8]

    DIR/model.json       the manifest (below); everything a caller needs besides the graph: classes
                         and colours, each modality's bands (count, names, centre wavelengths in nm
                         as the run's scene store had them, null where it had none, e.g. LiDAR),
                         normalisation statistics, geometry, noise settings, files and checks
    DIR/program.pt2      the torch.export program (always): eager PyTorch without the run directory
    DIR/model.onnx       ONNX (dynamo exporter), dynamic batch axis; checked with onnx.checker and
                         against PyTorch (the max abs difference is in the manifest's "checks")
    DIR/model_int8.onnx  only with --int8 (format onnx-int8): model.onnx dynamically quantised to int8
                         for the CPU (:data:`INT8`); its outputs differ from PyTorch's (the manifest's
                         "checks" give the max abs difference and the class agreement)
    DIR/model_aoti.pt2   an AOTInductor package (torch._inductor.aoti_compile_and_package) for one
                         device: ``aoti_device`` (default cpu; cuda on a GPU host), in the manifest
    DIR/model.engine     a TensorRT engine built from the ONNX (fp16, one optimisation profile for
                         batch 1..max_batch); only where ``tensorrt`` imports and a GPU is present

The graph is :class:`bdgf.inference.TileClassifier` of :meth:`bdgf.pipeline.Pipeline.from_run`:
inputs window (B, C, S, S) normalised with NaN = nodata, noise (B, n, C, S, S) position-keyed
(:func:`bdgf.noise.tile_noise`), present (B, M); output probs (B, K, T, T), zeros at
nodata. Normalisation and the noise run beside the graph (:mod:`bdgf.backends`), from the
manifest alone. ``--format all`` builds every format this machine can build (onnx, aoti,
tensorrt; int8 only with ``--int8``) and records the others under "skipped" with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

import bdgf
from bdgf.errors import BDGFError

MANIFEST = "model.json"
PACKAGE_FORMAT = 1
INPUTS = ("window", "noise", "present")
OUTPUTS = ("probs",)
FILES = {"torch": "program.pt2", "onnx": "model.onnx", "onnx-int8": "model_int8.onnx", "aoti": "model_aoti.pt2",
         "tensorrt": "model.engine"}
FORMATS = ("onnx", "onnx-int8", "aoti", "tensorrt")  # build order
ALL = ("onnx", "aoti", "tensorrt")  # what "all" builds: int8 changes the outputs, so only when asked
ONNX_OPSET = 18
# Dynamic int8 quantisation of model.onnx for the CPU (onnxruntime.quantization.quantize_dynamic):
# weights int8 once, activations quantised per tensor at run time (DynamicQuantizeLinear).
# - op types: Conv -> ConvInteger and MatMul/Gemm -> MatMulInteger, the ops that hold the weights
#   (the UNet and CNN convolutions, the Mamba/transformer projections). Dynamic quantisation does
#   support Conv (IntegerOpsRegistry maps it to ConvInteger, which ONNX Runtime's CPU provider runs),
#   but only with a per-tensor activation scale computed on the fly for every call.
# - weights QUInt8: with int8 (QInt8) weights the graph ran about 2x slower than fp32 here (ORT
#   1.32, AVX-512 VNNI CPU, 1 thread: random CNN run 54 vs 24 ms, demo run 8.1 vs 3.8 s a batch
#   of 2), with uint8 weights at or below fp32; the max abs difference from fp32 was alike (~0.01).
# - per tensor, not per channel: per-channel weights were no closer to fp32 (max abs difference
#   0.0113 vs 0.0115 on the demo run, 0.0097 vs 0.0100 on the random one) and no faster beyond
#   this shared machine's noise. reduce_range (7-bit weights) is for u8s8 kernels without VNNI;
#   uint8 weights do not need it. benchmarks/bench_backends.py measures the accuracy cost.
INT8 = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QUInt8", "per_channel": False,
        "reduce_range": False, "op_types": ["Conv", "MatMul", "Gemm"]}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_formats(value: str, int8: bool = False) -> list[str]:
    """"onnx", "onnx-int8", "aoti", "tensorrt", a comma list of them, or "all" (onnx, aoti,
    tensorrt) -> the formats, in build order; ``int8`` adds onnx-int8 (and the onnx it is made from)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        names = list(ALL)
    bad = [n for n in names if n not in FORMATS]
    if not names or bad:
        raise BDGFError(f"unknown export format {value!r}; use onnx, onnx-int8, aoti, tensorrt or all")
    if int8 or "onnx-int8" in names:
        names += ["onnx", "onnx-int8"]  # the int8 graph is quantised from model.onnx, which the package keeps
    return [f for f in FORMATS if f in names]


def tensorrt_missing() -> str | None:
    """Why a TensorRT engine cannot be built or run here (None: it can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt is not importable ({exc}); install the `cuda` extra on a GPU host"
    import torch

    if not torch.cuda.is_available():
        return "tensorrt imports but no CUDA device is visible"
    return None


def class_colours(num_classes: int) -> list[list[int]]:
    """RGB (0..255) of classes 1..K as `bdgf preview` draws them (matplotlib's tab20 over 1..K)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"].resampled(max(num_classes, 2))
    return [[int(round(255 * v)) for v in cmap(i / max(num_classes - 1, 1))[:3]] for i in range(num_classes)]


def build_manifest(pipe, max_batch: int, aoti_device: str = "cpu") -> dict:
    """The manifest of a pipeline's graph (files and checks are added by :func:`export_run`)."""
    run = pipe.run
    info = run.info()
    bands = {m: int(b) for m, b in info["scene"]["modalities"]}
    described = run.bands() or {}  # wavelengths and band names (None: an old run whose store is gone)
    return {
        "package_format": PACKAGE_FORMAT,
        "bdgf_version": bdgf.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "run": str(run.path.resolve()),
            "seed": int(pipe.seed),
            "scene": info["scene"].get("name"),
            "code_version": info.get("code_version"),
            "checkpoints": {
                "denoiser": {"file": "pretrain/denoiser.pt", "sha256": sha256_file(run.denoiser_path)},
                "classifier": {"file": f"train/seed{pipe.seed}/classifier.pt",
                               "sha256": sha256_file(run.classifier_path(pipe.seed))},
            },
        },
        "classes": {"nodata": 0, "names": list(pipe.class_names),
                    "colours": class_colours(len(pipe.class_names)),
                    "colours_from": "bdgf preview (matplotlib tab20 over classes 1..K)"},
        "modalities": [
            {"name": m, "bands": bands[m], "wavelengths_nm": described.get(m, {}).get("wavelengths_nm"),
             "band_names": described.get(m, {}).get("band_names"),
             "mean": [float(v) for v in pipe.normalisation[m][0]],
             "std": [float(v) for v in pipe.normalisation[m][1]]}
            for m in pipe.modalities
        ],
        "geometry": {"tile_size": int(pipe.spec.tile_size), "halo": int(pipe.spec.halo),
                     "window_size": int(pipe.spec.tile_size + 2 * pipe.spec.halo),
                     "patch_size": int(pipe.graph.P), "tile_multiple": int(pipe.graph.denoiser.config.tile_multiple)},
        "noise": {"timesteps": [int(t) for t in pipe.spec.timesteps], "draws": int(pipe.spec.draws),
                  "noise_seed": int(pipe.spec.noise_seed), "num_noise": int(pipe.graph.num_noise),
                  "keyed_by": "window top-left (row, col) in the scene's pixel grid = tile origin - halo"},
        "graph": {"inputs": {"window": ["B", "C", "S", "S"], "noise": ["B", "n", "C", "S", "S"], "present": ["B", "M"]},
                  "outputs": {"probs": ["B", "K", "T", "T"]}, "dtype": "float32",
                  "nodata": "NaN in any band of window; probs all 0 there"},
        "export": {"max_batch": int(max_batch), "onnx_opset": ONNX_OPSET, "torch": _torch_version(),
                   "aoti_device": str(aoti_device),
                   "tensorrt": {"precision": "fp16", "profile_batch": [1, min(8, max_batch), max_batch]}},
        "files": {},
        "checks": {},
        "skipped": {},
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _check_inputs(pipe, count: int = 2, seed: int = 0):
    """Real inputs to check an export on: ``count`` tiles of the run's scene store when it is
    still where the run says (NaN at its nodata), else seeded standard-normal windows. Returns
    (window, noise, present) tensors and what they are."""
    import torch

    from bdgf.noise import tile_noise
    from bdgf.tiler import read_windows

    S = pipe.spec.tile_size + 2 * pipe.spec.halo
    C = int(pipe.graph.channel_modality.numel())
    store = pipe.run.info().get("store")
    if store and Path(store).exists():
        from bdgf.data.scene import Scene

        scene = Scene.open(store)
        grid = pipe.grid(*scene.shape)
        origins = list(grid.origins())[:count]
        windows = read_windows(scene, grid, origins, nodata=np.nan)
        corners = [tuple(map(int, grid.window(o)[:2])) for o in origins]
        what = f"{len(origins)} tiles of {store}"
        if len(corners) < count:  # a scene of fewer tiles: a batch of 1 would fix the dynamic batch axis at 1
            extra = count - len(corners)
            windows = np.concatenate([windows, np.repeat(windows[:1], extra, axis=0)])
            r0, c0 = corners[0]  # the first tile again, further along its row (noise keyed there)
            corners += [(r0, c0 + k * pipe.spec.tile_size * (grid.shape[1] + 1)) for k in range(1, extra + 1)]
            what += f" (the first repeated at other origins: a batch of {count})"
    else:
        rng = np.random.default_rng(seed)
        windows = rng.standard_normal((count, C, S, S)).astype(np.float32)
        windows[0, :, S // 2, S // 2] = np.nan
        corners = [(-pipe.spec.halo, i * pipe.spec.tile_size - pipe.spec.halo) for i in range(count)]
        what = f"{count} seeded random windows (the run's scene store is not at hand)"
    noise = tile_noise(pipe.spec, C, [tuple(map(int, c)) for c in corners], S)
    present = np.ones((len(corners), len(pipe.modalities)), np.float32)
    return torch.from_numpy(np.asarray(windows, np.float32)), torch.from_numpy(noise), torch.from_numpy(present), what


def export_program(pipe, example, max_batch: int):
    """torch.export of the pipeline's graph with a dynamic batch axis (1..max_batch)."""
    import torch

    dynamic = None
    if max_batch > 1:  # (a dynamic axis of at most 1 is not one: export for batch 1 as it is)
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic = {name: {0: batch} for name in INPUTS}
    try:
        return torch.export.export(pipe.graph, tuple(example), dynamic_shapes=dynamic)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
        raise BDGFError(f"torch.export of the inference graph failed ({type(exc).__name__}: {exc})") from exc


def write_onnx(program, path: Path) -> None:
    """The ONNX file of an exported program (dynamo exporter), checked with onnx.checker."""
    import onnx
    import torch

    torch.onnx.export(program, f=str(path), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                      input_names=list(INPUTS), output_names=list(OUTPUTS), external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise BDGFError(f"{path}: the exported ONNX fails onnx.checker ({exc})") from exc


def write_onnx_int8(onnx_path: Path, path: Path, settings: dict = INT8) -> None:
    """The dynamically quantised (int8) copy of an ONNX file (:data:`INT8` says how and why)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_log = logging.getLogger()  # quantize_dynamic advises pre-processing on the root logger
    level = quant_log.level
    quant_log.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(onnx_path, path, op_types_to_quantize=list(settings["op_types"]),
                         per_channel=bool(settings["per_channel"]), reduce_range=bool(settings["reduce_range"]),
                         weight_type=QuantType[settings["weight_type"]])
    except Exception as exc:  # noqa: BLE001 - the quantiser raises many kinds
        raise BDGFError(f"{onnx_path}: int8 quantisation failed ({type(exc).__name__}: {exc})") from exc
    finally:
        quant_log.setLevel(level)


def write_aoti(program, path: Path) -> None:
    import torch

    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def build_tensorrt_engine(onnx_path: Path, engine_path: Path, input_shapes: dict[str, tuple[int, ...]],
                          max_batch: int, workspace_bytes: int = 2 << 30) -> None:
    """A TensorRT engine (fp16) from the ONNX file, one optimisation profile with batch 1..max_batch
    (optimum min(8, max_batch)); ``input_shapes`` gives each input's shape without the batch axis."""
    reason = tensorrt_missing()
    if reason:
        raise BDGFError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10; implied after
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BDGFError(f"{onnx_path}: TensorRT cannot parse the ONNX ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in input_shapes.items():
        profile.set_shape(name, (1, *shape), (min(8, max_batch), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BDGFError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))


def export_run(run_dir: str | Path, out: str | Path, formats: Sequence[str] = ("onnx", "aoti"),
               seed: int | None = None, max_batch: int = 16, overwrite: bool = False,
               strict: bool = True, aoti_device: str = "cpu") -> dict:
    """Write the package of ``run_dir``'s classifier ``seed`` to ``out``; returns the manifest.
    ``strict``: a format that cannot be built here (TensorRT without tensorrt or a GPU) is an
    error; otherwise it is recorded under "skipped". ``aoti_device``: the device the AOTInductor
    package is compiled for and runs on (the other graphs are exported on the CPU). Written under a
    temporary name, then renamed."""
    import torch

    from bdgf.backends import onnx_session
    from bdgf.pipeline import Pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BDGFError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    if max_batch < 1:
        raise BDGFError(f"max batch must be >= 1, got {max_batch}")
    if strict and "tensorrt" in formats and tensorrt_missing():
        raise BDGFError(f"cannot build a TensorRT engine: {tensorrt_missing()}")
    aoti_device = str(torch.device(aoti_device))
    if "aoti" in formats and aoti_device.startswith("cuda") and not torch.cuda.is_available():
        raise BDGFError(f"cannot compile the AOTInductor package for {aoti_device}: no CUDA device is visible")
    pipe = Pipeline.from_run(run_dir, seed=seed)
    manifest = build_manifest(pipe, max_batch, aoti_device)
    manifest["export"]["formats"] = ["torch", *formats]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        window, noise, present, what = _check_inputs(pipe, count=min(2, max_batch))
        with torch.no_grad():
            want = pipe.graph(window, noise, present).numpy()
        program = export_program(pipe, (window, noise, present), max_batch)
        torch.export.save(program, str(tmp / FILES["torch"]))
        with torch.no_grad():
            got = program.module()(window, noise, present).numpy()
        manifest["checks"]["torch"] = {"max_abs_diff": float(np.abs(got - want).max()), "inputs": what}
        for fmt in formats:
            path = tmp / FILES[fmt]
            if fmt == "onnx":
                write_onnx(program, path)
                sess = onnx_session(path, threads=1)
                (got,) = sess.run(None, {"window": window.numpy(), "noise": noise.numpy(), "present": present.numpy()})
                manifest["checks"]["onnx"] = {"max_abs_diff": float(np.abs(got - want).max()), "inputs": what,
                                              "checker": "onnx.checker.check_model(full_check=True)"}
            elif fmt == "onnx-int8":
                write_onnx_int8(tmp / FILES["onnx"], path)
                sess = onnx_session(path, threads=1)
                (got,) = sess.run(None, {"window": window.numpy(), "noise": noise.numpy(), "present": present.numpy()})
                valid = want.max(axis=1) > 0
                agree = float((got.argmax(1) == want.argmax(1))[valid].mean()) if valid.any() else float("nan")
                manifest["export"]["int8"] = dict(INT8)
                manifest["checks"]["onnx-int8"] = {"max_abs_diff": float(np.abs(got - want).max()), "inputs": what,
                                                   "class_agreement": agree}
            elif fmt == "aoti":
                dev = torch.device(aoti_device)
                example = tuple(t.to(dev) for t in (window, noise, present))
                if dev.type == "cpu":
                    write_aoti(program, path)
                else:  # the graph and its example inputs on the target device, exported again
                    import copy

                    graph = copy.deepcopy(pipe.graph).to(dev)
                    write_aoti(export_program(replace(pipe, graph=graph), example, max_batch), path)
                runner = torch._inductor.aoti_load_package(str(path))
                with torch.no_grad():
                    got = runner(*example).float().cpu().numpy()
                manifest["checks"]["aoti"] = {"max_abs_diff": float(np.abs(got - want).max()), "inputs": what,
                                              "device": aoti_device}
            elif fmt == "tensorrt":
                reason = tensorrt_missing()
                if reason and not strict:
                    manifest["skipped"]["tensorrt"] = reason
                    continue
                onnx_path = tmp / FILES["onnx"]
                if not onnx_path.exists():
                    write_onnx(program, onnx_path)
                shapes = {"window": tuple(window.shape[1:]), "noise": tuple(noise.shape[1:]),
                          "present": tuple(present.shape[1:])}
                build_tensorrt_engine(onnx_path, path, shapes, max_batch)
        for p in sorted(tmp.iterdir()):
            kind = next((k for k, v in FILES.items() if v == p.name), "data")
            manifest["files"][p.name] = {"format": kind, "sha256": sha256_file(p), "bytes": p.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
