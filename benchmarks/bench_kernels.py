"""Kernel benchmarks: ``python benchmarks/bench_kernels.py [--quick]``.

On CUDA: each Triton kernel against its eager reference (and cross-attention against
torch.nn.functional.scaled_dot_product_attention) at BDGF shapes, timed with
triton.testing.do_bench; prints ms, speed-up, achieved GB/s or TFLOP/s as a fraction of the
H100's peak (3.35 TB/s, 990 TFLOP/s dense bf16) and peak memory. On CPU: the chunked selective
scan against the step-by-step loop (forward, forward+backward; wall-clock minimum of a few
interleaved runs) and the extra peak memory of one forward+backward (fresh process each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.cross_attention import cross_attention_ref, cross_attention_triton  # noqa: E402
from kernels.masked_denoise import (balanced_mse_ref, balanced_mse_triton, noise_and_mask_ref,  # noqa: E402
                                    noise_and_mask_triton)
from kernels.selective_scan import auto_chunk_size, selective_scan_chunked, selective_scan_ref  # noqa: E402

PEAK_BW = 3.35e12  # H100 SXM HBM3, bytes/s
PEAK_FLOPS = 990e12  # H100 SXM dense bf16/fp16


# ----------------------------------------------------------------------------- CUDA

def _cuda_time(fn):
    """(ms, peak MiB) of fn() on CUDA."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(fn), peak


def _row(name, ms, peak, base_ms=None, work=None, kind="GB/s"):
    extra = ""
    if work is not None:
        rate = work / (ms * 1e-3)
        peak_rate = PEAK_BW if kind == "GB/s" else PEAK_FLOPS
        scale = 1e9 if kind == "GB/s" else 1e12
        extra = f"  {rate / scale:8.1f} {kind} ({rate / peak_rate:5.1%} of peak)"
    ratio = f"  x{base_ms / ms:5.2f} vs ref" if base_ms else ""
    print(f"  {name:<34s} {ms:9.3f} ms  peak {peak:8.1f} MiB{ratio}{extra}")


def bench_masked_denoise(dtype, M):
    dev = "cuda"
    B, H, W = 32, 64, 64
    cm = torch.tensor([0] * 144 + ([1] if M == 2 else [1, 2, 2]), device=dev)
    C = len(cm)
    x0 = torch.randn(B, C, H, W, device=dev, dtype=dtype)
    eps = torch.randn_like(x0)
    sab = torch.rand(B, device=dev)
    s1 = (1 - sab**2).sqrt()
    present = torch.rand(B, M, device=dev) > 0.3
    emb = torch.zeros(C, device=dev, requires_grad=True)
    el = x0.element_size()
    print(f"masked denoise  B={B} C={C} {H}x{W} M={M} {dtype}")
    nbytes = 3 * x0.numel() * el  # upper bound: read x0, eps, write x_t
    r_ms, r_pk = _cuda_time(lambda: noise_and_mask_ref(x0, eps, sab, s1, present, emb, cm))
    t_ms, t_pk = _cuda_time(lambda: noise_and_mask_triton(x0, eps, sab, s1, present, emb, cm))
    _row("noise_and_mask ref fwd", r_ms, r_pk, work=nbytes)
    _row("noise_and_mask triton fwd", t_ms, t_pk, r_ms, nbytes)
    pred = torch.randn_like(x0, requires_grad=True)

    def step(fn):
        return lambda: fn(pred, x0, cm, M).sum().backward()

    nbytes = 5 * x0.numel() * el  # fwd reads 2, bwd reads 2 and writes 1
    r_ms, r_pk = _cuda_time(step(balanced_mse_ref))
    t_ms, t_pk = _cuda_time(step(balanced_mse_triton))
    _row("balanced_mse ref fwd+bwd", r_ms, r_pk, work=nbytes)
    _row("balanced_mse triton fwd+bwd", t_ms, t_pk, r_ms, nbytes)


def bench_cross_attention(dtype, Bp, Nk):
    import torch.nn.functional as F

    dev = "cuda"
    H, Nq, D = 4, 122, 32
    q = torch.randn(Bp, H, Nq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(Bp, H, Nk, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(Bp, H, Nk, D, device=dev, dtype=dtype, requires_grad=True)
    flops = 4 * Bp * H * Nq * Nk * D
    print(f"cross attention  B={Bp} Hh={H} Nq={Nq} Nk={Nk} D={D} {dtype}")
    fns = {"ref": cross_attention_ref, "sdpa": F.scaled_dot_product_attention, "triton": cross_attention_triton}
    with torch.no_grad():
        res = {n: _cuda_time(lambda f=f: f(q, k, v)) for n, f in fns.items()}
    for n, (ms, pk) in res.items():
        _row(f"{n} fwd", ms, pk, None if n == "ref" else res["ref"][0], flops, "TFLOP/s")
    print(f"  triton fwd vs sdpa: x{res['sdpa'][0] / res['triton'][0]:.2f}")
    res = {n: _cuda_time(lambda f=f: f(q, k, v).sum().backward()) for n, f in fns.items()}
    for n, (ms, pk) in res.items():
        _row(f"{n} fwd+bwd", ms, pk, None if n == "ref" else res["ref"][0], 3.5 * flops, "TFLOP/s")
    print(f"  triton fwd+bwd vs sdpa: x{res['sdpa'][0] / res['triton'][0]:.2f}")


def bench_cuda(quick):
    print(f"device: {torch.cuda.get_device_name()}")
    for dtype in (torch.float32, torch.bfloat16):
        for M in (2, 3):
            bench_masked_denoise(dtype, M)
    for dtype in (torch.bfloat16, torch.float16):
        for Bp in ((256,) if quick else (256, 1024, 2048)):
            for Nk in (121, 484):
                bench_cross_attention(dtype, Bp, Nk)
    for shape in _scan_shapes(quick):
        args = _scan_inputs(*shape, device="cuda")
        print(f"selective scan (Bt, L, Dm, N) = {shape}")
        r_ms, r_pk = _cuda_time(lambda: selective_scan_ref(*args).sum().backward())
        c_ms, c_pk = _cuda_time(lambda: selective_scan_chunked(*args).sum().backward())
        _row("loop fwd+bwd", r_ms, r_pk)
        _row("chunked fwd+bwd", c_ms, c_pk, r_ms)


# ----------------------------------------------------------------------------- CPU

def _scan_shapes(quick):
    # BDGF Mamba branch: L = 11*11 tokens, d_model 64 -> Dm = 128, N = 16; Bt patches per batch
    return [(16, 121, 32, 16)] if quick else [(4, 121, 16, 8), (16, 121, 32, 16), (64, 121, 128, 16)]


def _scan_inputs(Bt, L, Dm, N, device="cpu"):
    g = torch.Generator().manual_seed(0)
    u, B, C = torch.randn(Bt, L, Dm, generator=g), torch.randn(Bt, L, N, generator=g), torch.randn(Bt, L, N, generator=g)
    delta = torch.rand(Bt, L, Dm, generator=g) * 0.1
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(Dm, 1)
    D = torch.ones(Dm)
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]


def _cpu_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _scan_variant(name):
    return selective_scan_ref if name == "loop" else selective_scan_chunked


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _mem_child(name, shape):
    """In a fresh process: extra peak RSS (MiB) of one forward+backward of a scan variant (Linux:
    the high-water mark is reset through /proc/self/clear_refs)."""
    args = _scan_inputs(*shape)
    small = _scan_inputs(2, 5, shape[2], shape[3])
    _scan_variant(name)(*small).sum().backward()  # warm up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS:")
    _scan_variant(name)(*args).sum().backward()
    print((_rss_kib("VmHWM:") - before) / 1024)


def _peak_mib(name, shape):
    import subprocess

    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_kernels as b; b._mem_child({name!r}, {tuple(shape)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_cpu(quick, reps=3):
    print(f"CPU ({torch.get_num_threads()} threads): selective scan, chunked (auto T) vs step-by-step loop "
          f"(autograd); min of {reps} interleaved runs; load average {os.getloadavg()[0]:.1f}")
    for shape in _scan_shapes(quick):
        args = _scan_inputs(*shape)
        plain = [t.detach() for t in args]
        fns = {"loop fwd": lambda: selective_scan_ref(*plain), "chunked fwd": lambda: selective_scan_chunked(*plain),
               "loop fwd+bwd": lambda: selective_scan_ref(*args).sum().backward(),
               "chunked fwd+bwd": lambda: selective_scan_chunked(*args).sum().backward()}
        best = {n: float("inf") for n in fns}
        for _ in range(reps):  # interleaved, so that load from other processes hits all alike
            for n, f in fns.items():
                best[n] = min(best[n], _cpu_time(f, 1))
        try:
            mem = {n: _peak_mib(n, shape) for n in ("loop", "chunked")}
        except Exception:  # not Linux, or /proc unavailable
            mem = {"loop": float("nan"), "chunked": float("nan")}
        print(f"  (Bt, L, Dm, N) = {shape}, T = {auto_chunk_size(shape[0], shape[2], shape[3])}:")
        print(f"    fwd      loop {best['loop fwd']:8.1f} ms  chunked {best['chunked fwd']:8.1f} ms  "
              f"x{best['loop fwd'] / best['chunked fwd']:4.2f}")
        print(f"    fwd+bwd  loop {best['loop fwd+bwd']:8.1f} ms  chunked {best['chunked fwd+bwd']:8.1f} ms  "
              f"x{best['loop fwd+bwd'] / best['chunked fwd+bwd']:4.2f}   extra peak RSS loop "
              f"{mem['loop']:7.1f} MiB  chunked {mem['chunked']:7.1f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even where CUDA is present")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=3, help="CPU: interleaved runs per variant (the minimum counts)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if torch.cuda.is_available() and not a.cpu:
        bench_cuda(a.quick)
    else:
        bench_cpu(a.quick, a.reps)


if __name__ == "__main__":
    main()
