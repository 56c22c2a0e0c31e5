"""GPU smoke check: ``make gpu-check`` (or ``python scripts/gpu_check.py``) on a machine with one
CUDA GPU and the project installed (``make install``, or ``pip install -c constraints.txt -e
'.[distributed,dev]'``).

What it runs, in order (each part reports PASS/FAIL with its time; the exit status is 0 only when
all of them pass):

1. kernels: ``pytest -m gpu`` over tests/test_kernels_*.py: the compiled Triton kernels on CUDA
   tensors against their references, forward and backward, at the block sizes a GPU runs (64-wide
   attention blocks, 1024-px planes); every one must run (a skip is a failure here). Then the
   other kernel tests (dispatch, backward-launch fallback on CUDA); there only the interpreter
   tests may skip.
2. stages: a tiny synthetic scene through stage 1 (``bdgf pretrain --workers 1``), the features
   (``bdgf features --workers 1``) and stage 2 (``bdgf train --workers 1``), each on Ray Train with
   one GPU worker and DeepSpeed, bf16 autocast forced on (a DeepSpeed template with
   ``"bf16": {"enabled": true}``), then ``bdgf evaluate``. Each summary line must say
   ``deepspeed`` and ``gpu``, and the workers must log ``precision: torch.bfloat16 on cuda``.
   ``--device gpu`` is passed where the command has that option (it was being added when this
   script was written; without it the summary's device is still checked), so a run that would
   fall back to the CPU fails instead.
3. bench: ``benchmarks/bench_kernels.py --quick`` (Triton vs references and SDPA; printed, not judged).

Where torch sees no CUDA device it says so and exits with status 2, running nothing.

    python scripts/gpu_check.py [--steps 20] [--epochs 2] [--out DIR] [--skip stages,bench]
    python scripts/gpu_check.py --rehearse-on-cpu     # part 2 only, on CPU: checks the command
                                                      # lines and options, not a GPU check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels_*.py"))
NO_GPU_EXIT = 2
PARTS = ("kernels", "stages", "bench")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled Triton: the interpreter cannot launch on CUDA tensors
    env.pop("BDGF_KERNELS", None)  # auto: Triton on CUDA tensors
    env.setdefault("DS_BUILD_OPS", "0")
    env.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


NEEDS = {"kernels": ("triton", "pytest", "numpy"), "stages": ("ray", "deepspeed", "zarr", "typer"),
         "bench": ("triton",)}


def preflight(parts=PARTS) -> str | None:
    """None when this machine can run ``parts`` of the check, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (make install)"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU build)"
        return (f"no CUDA device visible to torch {torch.__version__} (its CUDA: {built}); this check needs "
                f"one GPU. Nothing was run.")
    need = sorted({m for p in parts for m in NEEDS[p]})
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        return (f"missing packages: {', '.join(missing)}; install the project first: "
                f"pip install -c constraints.txt -e '.[distributed,dev]' (or make install), "
                f"or leave out the parts that need them (--skip stages)")
    return None


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str, str]:
    """(status, stdout, stderr) of cmd; both streams appended to the log."""
    print("  $ " + " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        out, err, rc = text(exc.stdout), text(exc.stderr) + f"\n[timed out after {timeout:.0f} s]", 124
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n[stderr]\n{err}\n[rc {rc}]\n\n")
    return rc, out, err


def _junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return counts


def check_kernels(work: Path, log: Path) -> str:
    py = sys.executable
    gpu_xml, rest_xml = work / "gpu.xml", work / "rest.xml"
    rc, out, _ = _run([py, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                    f"--junitxml={gpu_xml}", *KERNEL_TESTS], log, 1200)
    if not gpu_xml.exists():
        raise RuntimeError(f"pytest -m gpu did not run (rc {rc}):\n{out[-2000:]}")
    g = _junit(gpu_xml)
    if rc or g["failures"] or g["errors"] or g["skipped"] or not g["tests"]:
        raise RuntimeError(f"gpu kernel tests: {g} (rc {rc}); see {log}\n{out[-3000:]}")
    rc, out, _ = _run([py, "-m", "pytest", "-q", "-m", "not gpu and not slow", "-rs", "-p", "no:cacheprovider",
                    f"--junitxml={rest_xml}", *KERNEL_TESTS], log, 1200)
    r = _junit(rest_xml) if rest_xml.exists() else {"failures": "?", "errors": "?"}
    odd = [s for s in r.get("skip_reasons", []) if not s.startswith("CUDA host")]
    if rc or r["failures"] or r["errors"] or odd:
        raise RuntimeError(f"other kernel tests: {r} (rc {rc}); unexpected skips {odd}; see {log}\n{out[-3000:]}")
    return (f"{g['tests']} gpu tests passed on CUDA (none skipped); other kernel tests: "
            f"{r['tests'] - r['skipped']} passed, {r['skipped']} interpreter-only skipped")


def _has_option(command: str, option: str, log: Path) -> bool:
    rc, out, _ = _run([sys.executable, "-m", "bdgf.cli", command, "--help"], log, 120)
    return rc == 0 and option in out


def _bf16_template(name: str, work: Path) -> Path:
    """The bundled DeepSpeed template with bf16 autocast forced on (not "auto")."""
    src = REPO / "bdgf" / "distributed" / "configs" / f"deepspeed_{name}.json"
    cfg = json.loads(src.read_text())
    cfg["bf16"] = {"enabled": True}
    dst = work / f"deepspeed_{name}_bf16.json"
    dst.write_text(json.dumps(cfg, indent=2))
    return dst


def _bdgf(args: list[str], log: Path, timeout: float = 900, precision: str | None = None) -> str:
    """stdout of ``bdgf ARGS`` (the summary lines; Ray's and DeepSpeed's logs go to the log file).
    ``precision``: the device type whose bf16 autocast the workers must report ("precision:
    torch.bfloat16 on cuda", logged by each worker)."""
    rc, out, err = _run([sys.executable, "-m", "bdgf.cli", *args], log, timeout)
    if rc:
        raise RuntimeError(f"bdgf {args[0]} failed (rc {rc}); see {log}\n{(out + err)[-3000:]}")
    if precision and not re.search(rf"precision: torch\.bfloat16 on {precision}", out + err):
        found = sorted(set(re.findall(r"precision: \S+ on \S+", out + err))) or ["nothing"]
        raise RuntimeError(f"bdgf {args[0]}: expected bf16 autocast on {precision}, the workers reported "
                           f"{found}; see {log}")
    return out


def _expect(out: str, pattern: str, what: str) -> str:
    """The summary line of ``out`` that matches ``pattern`` (printed), else a RuntimeError."""
    hits = [ln.strip() for ln in out.splitlines() if re.search(pattern, ln)]
    if not hits:
        tail = [ln for ln in out.splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{what}: no line matching {pattern!r} in its output; it ended with {tail}")
    print(f"    {hits[-1]}", flush=True)
    return hits[-1]


def check_stages(work: Path, log: Path, steps: int, epochs: int, dev: str = "gpu") -> str:
    store, run = work / "tiny.zarr", work / "run"
    torch_dev = "cuda" if dev == "gpu" else "cpu"
    _bdgf(["synth", str(store), "--preset", "tiny", "--seed", "0", "--overwrite"], log, 300)
    device = ["--device", dev] if _has_option("pretrain", "--device", log) else []
    if not device:
        print("    (bdgf pretrain has no --device option: relying on auto, checked from the summary)")
    sets = ["pretrain.tile_size=32", "pretrain.batch_size=8", f"pretrain.steps={steps}", "pretrain.log_every=5",
            f"pretrain.checkpoint_every={max(1, steps // 2)}",
            "pretrain.unet={base_channels: 16, channel_mults: [1, 2], feature_levels: [0, 1, 1]}",
            "pretrain.masking={mode: adaptive, warmup_steps: 5}"]
    out = _bdgf(["pretrain", str(store), "--out", str(run), "--workers", "1", "--overwrite",
                 "--deepspeed-config", str(_bf16_template("pretrain", work)), *device,
                 *[a for s in sets for a in ("--set", s)]], log, precision=torch_dev)
    pre = _expect(out, rf"^pretrained {steps} steps on 1 worker\(s\) \(deepspeed\).*; {dev}\b", "stage 1")
    feat_dev = device if _has_option("features", "--device", log) else []
    out = _bdgf(["features", str(store), "--run", str(run), "--workers", "1", *feat_dev], log)
    _expect(out, rf"features for checkpoint .*1 worker\(s\), {dev if feat_dev else '(cpu|gpu)'}\b", "features")
    out = _bdgf(["train", str(store), "--run", str(run), "--workers", "1", "--seeds", "0",
                 "--deepspeed-config", str(_bf16_template("train", work)), *device,
                 "--set", f"train.epochs={epochs}", "--set", "train.batch_size=32"], log, precision=torch_dev)
    tr = _expect(out, rf"^seed 0: selected epoch .*1 worker\(s\), deepspeed, {dev}\b", "stage 2")
    out = _bdgf(["evaluate", str(store), "--run", str(run), "--split", "test"], log, 300)
    ev = _expect(out, r"^test over seeds .*\bOA\b", "evaluate")
    return f"stage 1: {pre} | stage 2: {tr} | evaluate: {ev}"


def check_bench(log: Path) -> str:
    rc, out, _ = _run([sys.executable, "benchmarks/bench_kernels.py", "--quick"], log, 900)
    print("\n".join("    " + ln for ln in out.strip().splitlines()), flush=True)
    if rc:
        raise RuntimeError(f"bench_kernels.py failed (rc {rc}); see {log}")
    return "benchmark printed above"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="stage 1 steps")
    ap.add_argument("--epochs", type=int, default=2, help="stage 2 epochs")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    ap.add_argument("--rehearse-on-cpu", action="store_true",
                    help="run only the stages, on CPU (--device cpu): checks the command lines, not the GPU")
    a = ap.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"--skip takes {','.join(PARTS)}, got {a.skip!r}")
    if a.rehearse_on_cpu:
        work = a.out or Path(tempfile.mkdtemp(prefix="bdgf-gpu-check-cpu-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"gpu_check: CPU rehearsal of the stages (not a GPU check); work folder {work}", flush=True)
        print(check_stages(work, work / "gpu_check.log", a.steps, a.epochs, dev="cpu"))
        return 0
    why = preflight([p for p in PARTS if p not in skip])
    if why:
        print(f"gpu_check: {why}", file=sys.stderr)
        return NO_GPU_EXIT
    import torch

    work = a.out or Path(tempfile.mkdtemp(prefix="bdgf-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "gpu_check.log"
    print(f"gpu_check: {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__} CUDA {torch.version.cuda}; work folder {work}; full output in {log}", flush=True)
    results = {}
    for part in PARTS:
        if part in skip:
            results[part] = ("SKIP", "left out with --skip", 0.0)
            continue
        print(f"[{part}]", flush=True)
        t0 = time.perf_counter()
        try:
            if part == "kernels":
                msg = check_kernels(work, log)
            elif part == "stages":
                msg = check_stages(work, log, a.steps, a.epochs)
            else:
                msg = check_bench(log)
            results[part] = ("PASS", msg, time.perf_counter() - t0)
        except Exception as exc:  # report every part, then fail
            results[part] = ("FAIL", str(exc), time.perf_counter() - t0)
        status, msg, dt = results[part]
        print(f"[{part}] {status} ({dt:.0f} s): {msg}", flush=True)
    print("\nsummary:")
    for part, (status, msg, dt) in results.items():
        print(f"  {part:<8s} {status}  {dt:6.0f} s  {msg.splitlines()[0] if msg else ''}")
    failed = [p for p, r in results.items() if r[0] == "FAIL"]
    if a.out is None and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
