"""The one place that runs an exported model package (:mod:`bdgf.export`), for serving and bulk
classification alike: raw sensor values (or normalised windows) and tile origins in, classes and
confidence out.

    pkg = ModelPackage.open("pkg")                 # model.json: classes, bands, statistics, geometry
    backend = open_backend("pkg")                  # BDGF_BACKEND=auto|tensorrt|onnx|aoti|torch|onnx-int8
    out = backend.classify(raw, origins, absent=("lidar",), probabilities=False)
    out.classes (B, T, T) uint8/uint16, 0 = nodata; out.confidence (B, T, T) uint8 0..255

``raw`` is (B, C, S, S) raw sensor values (every modality's bands in the manifest's order) or
{modality: (B, C_m, S, S)}; ``normalised=True`` takes windows already normalised (NaN = nodata).
``origins`` are the top-left corners (row, col) of the windows' centre *tiles* in the scene's pixel
grid (on the tile grid); the window starts ``halo`` pixels before. Normalisation and the
position-keyed noise run here, from the manifest alone: no run directory is needed.

Back ends, in the order ``auto`` tries them: TensorRT (``model.engine``, tensorrt importable, a CUDA
device), ONNX Runtime with the CUDA provider, then with the CPU provider (``model.onnx``),
AOTInductor (``model_aoti.pt2``), eager PyTorch (``program.pt2``, the torch.export program: the
traced graph run op by op, so with the traced code paths, e.g. the parallel selective scan, not
the run's eager ones; ``benchmarks/bench_backends.py`` compares all of them with the run). The
choice and its reason are logged once per package (logger ``bdgf.backends``, INFO) and kept in
``backend.name`` / ``backend.reason``. ``BDGF_BACKEND`` forces one; a forced back end that cannot
run is a one-line error, never a silent fallback. ``onnx-int8`` (``model_int8.onnx``, written by
``bdgf export --int8``: dynamic int8 quantisation, CPU provider) runs only when named this way;
auto never picks it, since its outputs differ from the model's (the manifest's "checks").

ONNX Runtime session options (:func:`onnx_session`): intra-op threads = the CPUs this process may
use (``BDGF_ORT_THREADS`` overrides; a serving replica sets it to its share), inter-op threads 1
with sequential execution (the graph is one chain of convolutions: parallel branches gain nothing
and oversubscribe), every graph optimisation (ORT_ENABLE_ALL: constant folding, fusions, layout
changes; the optimised graph is rebuilt at load, not written back into the package).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bdgf.errors import BDGFError, InputError
from bdgf.noise import NoiseSpec, tile_noise
from bdgf.presence import presence_flags

log = logging.getLogger(__name__)

MANIFEST = "model.json"
BACKENDS = ("tensorrt", "onnx", "aoti", "torch")  # the order auto tries them in
OPT_IN = ("onnx-int8",)  # run only when asked for by name: their outputs differ from the model's
ENV = "BDGF_BACKEND"
_LOGGED: set[tuple[str, str]] = set()


# ----------------------------------------------------------------------------------------
# The package: manifest, normalisation, noise
# ----------------------------------------------------------------------------------------


@dataclass
class Classified:
    classes: np.ndarray  # (B, T, T) uint8 (K < 255) or uint16; 0 = nodata, 1..K the classes
    confidence: np.ndarray  # (B, T, T) uint8, round(255 * top probability); 0 at nodata
    probabilities: np.ndarray | None = None  # (B, K, T, T) float32 when asked for


class ModelPackage:
    """An exported package directory and its manifest."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.modalities = [m["name"] for m in manifest["modalities"]]
        self.bands = [int(m["bands"]) for m in manifest["modalities"]]
        self.mean = np.concatenate([np.asarray(m["mean"], np.float32) for m in manifest["modalities"]])
        self.std = np.concatenate([np.asarray(m["std"], np.float32) for m in manifest["modalities"]])
        geo = manifest["geometry"]
        self.tile_size, self.halo, self.window_size = int(geo["tile_size"]), int(geo["halo"]), int(geo["window_size"])
        self.class_names = list(manifest["classes"]["names"])
        self.channel_modality = np.repeat(np.arange(len(self.bands)), self.bands)

    @classmethod
    def open(cls, path: str | Path) -> "ModelPackage":
        path = Path(path)
        if not path.is_dir():
            raise BDGFError(f"{path}: no model package there (a directory written by `bdgf export`)")
        mf = path / MANIFEST
        if not mf.exists():
            raise BDGFError(f"{path}: not a BDGF model package (no {MANIFEST}); write one with `bdgf export`")
        try:
            manifest = json.loads(mf.read_text())
            pkg = cls(path, manifest)
        except (ValueError, KeyError, TypeError) as exc:
            raise BDGFError(f"{mf}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
        if len(pkg.mean) != sum(pkg.bands) or len(pkg.std) != sum(pkg.bands):
            raise BDGFError(f"{mf}: normalisation statistics do not match the band counts {pkg.bands}")
        return pkg

    @property
    def channels(self) -> int:
        return int(sum(self.bands))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def file(self, fmt: str) -> Path | None:
        """The package's file of format ``fmt`` (torch, onnx, aoti, tensorrt), None when absent."""
        for name, entry in self.manifest.get("files", {}).items():
            if entry.get("format") == fmt and (self.path / name).exists():
                return self.path / name
        return None

    def presence(self, absent: Sequence[str] = ()) -> np.ndarray:
        """(M,) float32 presence flags: 0 for the modalities named in ``absent``."""
        return presence_flags(self.modalities, absent)

    def stack(self, raw: np.ndarray | Mapping[str, np.ndarray], absent: Sequence[str] = (),
              size: tuple[int, int] | None = None) -> np.ndarray:
        """Raw values as (B, C, S, S) float32 in the model's channel order (``size``: (H, W)
        instead of windows of S×S); a dict may leave out the modalities in ``absent`` (their
        channels are filled with 0)."""
        S = self.window_size
        hw = tuple(size) if size is not None else (S, S)
        what = f"{hw[0]}x{hw[1]} px" if size is not None else f"windows of {S} px"
        if isinstance(raw, Mapping):
            missing = [m for m in self.modalities if m not in raw and m not in absent]
            if missing:
                raise InputError(f"missing modalities {missing}; the model needs {self.modalities} "
                                 "(name a modality in absent to classify without it)")
            given = [np.asarray(raw[m]) for m in self.modalities if m in raw and m not in absent]
            B = given[0].shape[0] if given and given[0].ndim == 4 else None
            parts = []
            for m, C_m in zip(self.modalities, self.bands):
                if m in absent and m not in raw:
                    parts.append(np.zeros((B or 0, C_m, *hw), np.float32))
                    continue
                x = np.asarray(raw[m], np.float32)
                if x.ndim != 4 or x.shape[1:] != (C_m, *hw) or x.shape[0] != B:
                    raise InputError(f"{m}: expected ({B or 'B'}, {C_m}, {hw[0]}, {hw[1]}) raw values "
                                     f"({C_m} bands, {what}), got shape {x.shape}")
                parts.append(x)
            return np.concatenate(parts, axis=1)
        x = np.asarray(raw, np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.channels, *hw):
            bands = " + ".join(f"{b} {m}" for m, b in zip(self.modalities, self.bands))
            raise InputError(f"expected (B, {self.channels}, {hw[0]}, {hw[1]}) ({bands} bands, {what}), "
                             f"got shape {x.shape}")
        return x

    def normalise(self, raw: np.ndarray | Mapping[str, np.ndarray], absent: Sequence[str] = ()) -> np.ndarray:
        """Raw (B, C, S, S) or {modality: (B, C_m, S, S)} -> normalised (B, C, S, S) float32,
        NaN where a value is not finite (nodata)."""
        x = self.stack(raw, absent)
        with np.errstate(invalid="ignore", over="ignore"):
            z = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return np.where(np.isfinite(z), z, np.nan).astype(np.float32)

    def corners(self, origins: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """Tile origins -> the windows' top-left corners (origin - halo), checked on the tile grid."""
        out = []
        m = int(self.manifest["geometry"].get("tile_multiple", 1))
        for o in origins:
            if len(o) != 2:
                raise InputError(f"an origin is (row, col), got {tuple(o)}")
            r, c = int(o[0]), int(o[1])
            if r % m or c % m:
                raise InputError(f"tile origin {(r, c)} is not on the model's stride phase (multiples of {m})")
            out.append((r - self.halo, c - self.halo))
        return out

    def noise(self, origins: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, n, C, S, S) position-keyed noise for the tiles at ``origins``."""
        nz = self.manifest["noise"]
        spec = NoiseSpec(tuple(int(t) for t in nz["timesteps"]), int(nz["draws"]), int(nz["noise_seed"]))
        return tile_noise(spec, self.channels, self.corners(origins), self.window_size)


def class_dtype(num_classes: int) -> np.dtype:
    """The class map's dtype for K classes plus the nodata class 0: uint8 while K < 255, else uint16."""
    return np.dtype(np.uint8 if num_classes < 255 else np.uint16)


def class_map(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs (B, K, T, T) -> classes (B, T, T) uint8/uint16 (0 = nodata), confidence uint8 0..255."""
    conf = probs.max(axis=1)
    idx = probs.argmax(axis=1)
    classes = np.where(conf > 0, idx + 1, 0).astype(class_dtype(probs.shape[1]))
    return classes, np.clip(np.rint(conf * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Back ends
# ----------------------------------------------------------------------------------------


class Backend:
    """One way of running a package's graph. Subclasses implement :meth:`run`."""

    name = "?"

    def __init__(self, package: ModelPackage, reason: str = ""):
        self.package = package
        self.reason = reason

    def run(self, window: np.ndarray, noise: np.ndarray, present: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def classify(self, windows: np.ndarray | Mapping[str, np.ndarray], origins: Sequence[Sequence[int]],
                 absent: Sequence[str] = (), normalised: bool = False, probabilities: bool = False) -> Classified:
        """Windows (raw by default, or ``normalised``) of the tiles at ``origins`` -> classes and
        confidence of each tile (B, T, T); with ``probabilities`` also (B, K, T, T). Any B: the
        graph runs on slices of at most the package's ``max_batch``."""
        pkg = self.package
        present = pkg.presence(absent)
        x = pkg.stack(windows, absent) if normalised else pkg.normalise(windows, absent)
        if len(origins) != x.shape[0]:
            raise InputError(f"{x.shape[0]} windows but {len(origins)} origins")
        if absent:  # an absent modality's channels carry no data and must not mark pixels nodata
            x = np.where((present[pkg.channel_modality] > 0)[None, :, None, None], x, 0.0).astype(np.float32)
        step = int(pkg.manifest["export"]["max_batch"])  # the graphs take batches of 1..max_batch
        flags = np.repeat(present[None], x.shape[0], axis=0)
        parts = [np.zeros((0, pkg.num_classes, pkg.tile_size, pkg.tile_size), np.float32)]
        for i in range(0, x.shape[0], step):
            out = self.run(np.ascontiguousarray(x[i : i + step]), pkg.noise(origins[i : i + step]), flags[i : i + step])
            parts.append(np.asarray(out, np.float32))
        probs = np.concatenate(parts)
        classes, conf = class_map(probs)
        return Classified(classes, conf, probs if probabilities else None)


def onnx_session(path: str | Path, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session with the options this module documents."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is None:
        env = os.environ.get("BDGF_ORT_THREADS")
        if env:
            if not env.strip().isdigit():
                raise BDGFError(f"BDGF_ORT_THREADS must be a whole number of threads, got {env!r}")
            threads = int(env)
        else:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BDGFError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from exc


class OnnxBackend(Backend):
    """ONNX Runtime on ``model.onnx`` (kind ``onnx``) or on its int8 copy ``model_int8.onnx``
    (kind ``onnx-int8``, CPU provider)."""

    name = "onnx"

    def __init__(self, package: ModelPackage, reason: str = "", providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, kind: str = "onnx"):
        super().__init__(package, reason)
        self.name = kind
        self.session = onnx_session(package.file(kind), threads, providers)
        self.providers = self.session.get_providers()

    def run(self, window, noise, present):
        (probs,) = self.session.run(None, {"window": window, "noise": noise, "present": present})
        return probs


class TorchBackend(Backend):
    """AOTInductor (``aoti``) or eager PyTorch (``torch``: the torch.export program's module)."""

    def __init__(self, package: ModelPackage, kind: str, reason: str = ""):
        super().__init__(package, reason)
        import torch

        self.name = kind
        self.device = torch.device(package.manifest["export"].get("aoti_device", "cpu") if kind == "aoti" else "cpu")
        path = package.file(kind)
        try:
            if kind == "aoti":
                self.module = torch._inductor.aoti_load_package(str(path))
            else:
                self.module = torch.export.load(str(path)).module()
        except Exception as exc:  # noqa: BLE001
            raise BDGFError(f"{path}: cannot load the {kind} graph ({type(exc).__name__}: {exc})") from exc

    def run(self, window, noise, present):
        import torch

        with torch.no_grad():
            out = self.module(*(torch.from_numpy(a).to(self.device) for a in (window, noise, present)))
        return out.float().cpu().numpy()


class TensorRTBackend(Backend):
    """A TensorRT engine on the first CUDA device; buffers are torch CUDA tensors."""

    name = "tensorrt"

    def __init__(self, package: ModelPackage, reason: str = ""):
        super().__init__(package, reason)
        import tensorrt as trt
        import torch

        self.torch, self.device = torch, torch.device("cuda")
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(package.file("tensorrt").read_bytes())
        if self.engine is None:
            raise BDGFError(f"{package.file('tensorrt')}: TensorRT cannot deserialise the engine "
                            "(built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()

    def run(self, window, noise, present):
        torch = self.torch
        feeds = {"window": window, "noise": noise, "present": present}
        keep = {}
        for name, value in feeds.items():
            t = torch.from_numpy(value).to(self.device).contiguous()
            keep[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape("probs"))
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address("probs", out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BDGFError("TensorRT failed to run the engine")
        stream.synchronize()
        return out.cpu().numpy()


def _why_not(package: ModelPackage, kind: str) -> str | None:
    """Why back end ``kind`` cannot run this package here (None: it can)."""
    if kind not in ("torch",) and package.file(kind) is None:
        return f"the package has no {kind} graph" + (" (export it with --int8)" if kind == "onnx-int8" else "")
    if kind == "tensorrt":
        from bdgf.export import tensorrt_missing

        return tensorrt_missing()
    if kind in ("onnx", "onnx-int8"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not importable ({exc})"
        return None
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    if kind == "torch" and package.file("torch") is None:
        return "the package has no torch.export program"
    device = package.manifest["export"].get("aoti_device", "cpu")
    if kind == "aoti" and device.startswith("cuda") and not torch.cuda.is_available():
        return f"its AOTInductor package was compiled for {device} and no CUDA device is visible"
    return None


def _build(package: ModelPackage, kind: str, reason: str) -> Backend:
    if kind == "tensorrt":
        return TensorRTBackend(package, reason)
    if kind == "onnx-int8":  # ConvInteger / MatMulInteger: CPU kernels
        return OnnxBackend(package, f"{reason}; providers ['CPUExecutionProvider']", kind=kind)
    if kind == "onnx":
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
        backend = OnnxBackend(package, reason, providers)
        backend.reason = f"{reason}; providers {backend.providers}"
        return backend
    return TorchBackend(package, kind, reason)


def open_backend(package: str | Path | ModelPackage, backend: str | None = None) -> Backend:
    """The back end for a package: ``backend`` or ``$BDGF_BACKEND`` (auto when unset) — the first
    of TensorRT, ONNX Runtime (CUDA, then CPU), AOTInductor, eager PyTorch that can run here.
    ``onnx-int8`` (the package's int8 ONNX, CPU) runs only when named; auto never picks it."""
    pkg = package if isinstance(package, ModelPackage) else ModelPackage.open(package)
    choice = (backend or os.environ.get(ENV) or "auto").strip().lower()
    if choice not in (*BACKENDS, *OPT_IN, "auto"):
        raise BDGFError(f"unknown back end {choice!r} ({ENV}); use {', '.join((*BACKENDS, *OPT_IN))} or auto")
    if choice != "auto":
        why = _why_not(pkg, choice)
        if why:
            raise BDGFError(f"back end {choice} cannot run {pkg.path}: {why}")
        chosen = _build(pkg, choice, f"forced ({'argument' if backend else ENV}={choice})")
    else:
        skipped = []
        chosen = None
        for kind in BACKENDS:
            why = _why_not(pkg, kind)
            if why is None:
                passed = f" ({'; '.join(skipped)})" if skipped else ""
                chosen = _build(pkg, kind, f"auto: first that runs here{passed}")
                break
            skipped.append(f"{kind}: {why}")
        if chosen is None:
            raise BDGFError(f"no back end can run {pkg.path}: {'; '.join(skipped)}")
    key = (str(pkg.path.resolve()), f"{chosen.name} {chosen.reason}")
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("bdgf back end for %s: %s — %s", pkg.path, chosen.name, chosen.reason)
    return chosen
