"""Benchmark the Triton kernels against the best library path on a CUDA GPU.

Protocol (../shared/BENCHMARKS.md, GPU section): M in {1, 16, 128, 2048}; (N, K) in
{(4096, 4096), (11008, 4096), (4096, 11008)}; CUDA-event timing, median of 50 runs after 10
warm-ups. Each row reports the kernel's time, TFLOP/s (or TOP/s for int8) and GB/s (bytes of
inputs read and outputs written once), the library baseline's time, and the kernel/baseline
speed ratio:

* ``w8a8``: Triton W8A8 GEMM (int8 x int8, fused per-token x per-channel scale epilogue) vs
  ``torch._int_mm`` followed by the same epilogue in torch, and vs cuBLAS fp16 ``x @ w.T``.
* ``w4a16``: Triton W4A16 (group 128, asymmetric) vs cuBLAS fp16 ``x @ w.T`` with a dense fp16
  weight; at small M the kernel is memory-bound and its GB/s is compared with the GPU's peak.
* ``cluster``: Triton per-cluster-scale GEMM (4 ragged clusters) vs ``torch._int_mm``.
* ``rmsnorm_quant``: fused RMSNorm + per-token int8 quantization (with a channel permutation)
  vs the torch reference on the GPU, in GB/s.

Usage::

    python benchmarks/bench_triton.py                 # full table (needs CUDA)
    python benchmarks/bench_triton.py --kernels w8a8 --m 1,128
    python benchmarks/bench_triton.py --check         # tiny correctness pass; CPU via interpreter
    python benchmarks/bench_triton.py --compile-arch 90   # compile for sm_90, no GPU needed

Without CUDA the timing mode exits with a message; ``--check`` then sets ``TRITON_INTERPRET=1``
(before triton is imported) and runs every kernel on tiny CPU shapes against its reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

# Allow `python benchmarks/bench_triton.py` from a checkout without installing the package.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

M_VALUES = (1, 16, 128, 2048)
NK_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
KERNEL_NAMES = ("w8a8", "w4a16", "cluster", "rmsnorm_quant")

#: Peak HBM bandwidth in GB/s by device-name substring (vendor figures), for the % column.
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
            "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "A10G": 600.0}  # fmt: skip


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--check", action="store_true", help="tiny correctness pass (CPU ok)")
    p.add_argument("--kernels", default=",".join(KERNEL_NAMES), help="comma list of kernels")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of M")
    p.add_argument(
        "--shapes", default=",".join(f"{n}x{k}" for n, k in NK_SHAPES), help="NxK comma list"
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument(
        "--compile-arch",
        type=int,
        default=None,
        help="compile the kernels for this CUDA arch (e.g. 90) without a GPU, then exit",
    )
    p.add_argument("--all-configs", action="store_true", help="with --compile-arch: every config")
    p.add_argument("--peak-gbs", type=float, default=None, help="override the GPU's peak GB/s")
    args = p.parse_args(argv)
    args.kernels = [k for k in args.kernels.split(",") if k]
    bad = sorted(set(args.kernels) - set(KERNEL_NAMES))
    if bad:
        p.error(f"unknown kernels {bad}; choose from {KERNEL_NAMES}")
    args.m = [int(v) for v in args.m.split(",")]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    return args


# ----------------------------------------------------------------------------- --check


def run_check() -> int:
    """Run every kernel on tiny shapes against its reference; return 0 if all match."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import importlib

    from backends.triton import kernels as K
    from backends.triton import reference as R

    if not torch.cuda.is_available() and not K.INTERPRET:
        K = importlib.reload(K)  # imported earlier without the interpreter
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    M, N, Kd, C = 5, 24, 96, 3
    a = torch.randint(-127, 128, (M, Kd), generator=g, dtype=torch.int8).to(dev)
    w = torch.randint(-127, 128, (N, Kd), generator=g, dtype=torch.int8).to(dev)
    a_s = (torch.rand(M, generator=g) * 0.02).to(dev)
    w_s = (torch.rand(N, generator=g) * 0.02).to(dev)
    bias = torch.randn(N, generator=g).to(dev)
    x = torch.randn(M, Kd, generator=g).to(dev)
    offs = torch.tensor([0, 10, 50, Kd], device=dev)
    c_s = (torch.rand(C, generator=g) * 0.02).to(dev)
    qw, s, z = (t.to(dev) for t in R.quantize_weight_int4(torch.randn(N, Kd, generator=g), 32))
    perm = torch.randperm(Kd, generator=g).to(dev)

    def close(out, exp, tol):
        return (out.float() - exp.float()).abs().max().item() <= tol * (
            1 + exp.float().abs().max().item()
        )

    checks = {
        "w8a8_gemm": close(
            K.w8a8_gemm(a, w, a_s, w_s, bias, torch.float16),
            R.w8a8_gemm_ref(a, w, a_s, w_s, bias, torch.float16),
            1e-3,
        ),
        "w4a16_gemm": close(
            K.w4a16_gemm(x.half(), qw, s, z, 32, bias),
            R.w4a16_gemm_ref(x.half(), qw, s, z, 32, bias),
            2e-3,
        ),
        "cluster_gemm": close(
            K.cluster_gemm(a, w, c_s, offs, w_s, bias, torch.float32),
            R.cluster_gemm_ref(a, w, c_s, offs, w_s, bias, torch.float32),
            1e-5,
        ),
    }
    q, sc = K.rmsnorm_quant(x, None, 1e-6, perm)
    q_r, sc_r = R.rmsnorm_quant_ref(x, None, 1e-6, perm)
    checks["rmsnorm_quant"] = (q.int() - q_r.int()).abs().max().item() <= 1 and close(
        sc, sc_r, 1e-6
    )
    mode = "CUDA" if dev == "cuda" else "CPU (TRITON_INTERPRET=1)"
    for name, ok in checks.items():
        print(f"{name:16s} {'ok' if ok else 'MISMATCH'}  [{mode}]")
    if all(checks.values()):
        print("all kernels match their references")
        return 0
    print("some kernels do NOT match their references")
    return 1


# ----------------------------------------------------------------------------- timing


def _time_ms(warmup: int, iters: int, fn, *args, **kwargs) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)`` over ``iters`` CUDA-event timed runs."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_gbs(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, val in PEAK_GBS.items():
        if key in name:
            return val
    return None


def _row(kernel, M, N, K, ms, flops, nbytes, base_name, base_ms, peak):
    tflops = flops / ms / 1e9
    gbs = nbytes / ms / 1e6
    pct = f"{100 * gbs / peak:5.1f}%" if peak else "  n/a"
    base = f"{base_name} {base_ms:8.4f} ms  x{base_ms / ms:5.2f}" if base_ms else f"{base_name} n/a"
    print(
        f"{kernel:14s} M={M:<5d} N={N:<6d} K={K:<6d} {ms:8.4f} ms {tflops:7.1f} T(FL)OP/s "
        f"{gbs:8.1f} GB/s ({pct} of peak)  | {base}"
    )


def _int_mm_or_none(a, w_t):
    try:
        return torch._int_mm(a, w_t)
    except RuntimeError:  # e.g. M <= 16 is not supported by some torch/cuBLAS versions
        return None


def run_bench(args: argparse.Namespace) -> int:
    """Time the requested kernels on CUDA; print one row per (kernel, M, N, K)."""
    from backends.triton import kernels as K
    from backends.triton import reference as R

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = _peak_gbs(name, args.peak_gbs)
    print(f"GPU: {name}; torch {torch.__version__}; peak HBM {peak or 'unknown'} GB/s; "
          f"median of {args.iters} after {args.warmup} warm-ups (CUDA events)")  # fmt: skip

    def t(fn, *fn_args, **fn_kwargs) -> float:
        return _time_ms(args.warmup, args.iters, fn, *fn_args, **fn_kwargs)

    def int_mm_epilogue(a8, w8_t, a_s, w_s):
        acc = torch._int_mm(a8, w8_t)
        return (acc.float() * a_s[:, None] * w_s[None, :]).half()

    def torch_rmsnorm_quant(x, perm):
        xf = x.float()
        return R.per_token_quantize_ref(
            (xf * torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + 1e-6))[:, perm]
        )

    for N, Kd in args.shapes:
        w8 = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, device=dev)
        w8_t = w8.t()
        w_s = torch.rand(N, device=dev) * 0.01
        w16 = torch.randn(N, Kd, dtype=torch.float16, device=dev)
        w16_t = w16.t()
        qw, s4, z4 = R.quantize_weight_int4(w16.float(), 128)
        s4 = s4.half()
        offs = torch.tensor([0, Kd // 5, Kd // 2, Kd // 2 + 7, Kd], device=dev)
        c_s = torch.rand(4, device=dev) * 0.01
        perm = torch.randperm(Kd, device=dev)
        for M in args.m:
            a8 = torch.randint(-127, 128, (M, Kd), dtype=torch.int8, device=dev)
            a_s = torch.rand(M, device=dev) * 0.01
            x16 = torch.randn(M, Kd, dtype=torch.float16, device=dev)
            fl = 2.0 * M * N * Kd
            fp16_ms = t(torch.matmul, x16, w16_t)
            int_mm_ok = _int_mm_or_none(a8, w8_t) is not None
            int_mm_ms = t(int_mm_epilogue, a8, w8_t, a_s, w_s) if int_mm_ok else None
            if "w8a8" in args.kernels:
                ms = t(K.w8a8_gemm, a8, w8, a_s, w_s, None, torch.float16)
                nbytes = M * Kd + N * Kd + 2 * M * N + 4 * (M + N)
                _row("w8a8", M, N, Kd, ms, fl, nbytes, "_int_mm+epi", int_mm_ms, peak)
                fp16_bytes = 2 * (M * Kd + N * Kd + M * N)
                _row("  (fp16 mm)", M, N, Kd, fp16_ms, fl, fp16_bytes, "-", None, peak)
            if "w4a16" in args.kernels:
                ms = t(K.w4a16_gemm, x16, qw, s4, z4, 128)
                nbytes = 2 * M * Kd + N * Kd // 2 + 3 * N * (Kd // 128) + 2 * M * N
                _row("w4a16", M, N, Kd, ms, fl, nbytes, "fp16 mm", fp16_ms, peak)
            if "cluster" in args.kernels:
                ms = t(K.cluster_gemm, a8, w8, c_s, offs, w_s, None, torch.float16)
                nbytes = M * Kd + N * Kd + 2 * M * N + 4 * N
                _row("cluster", M, N, Kd, ms, fl, nbytes, "_int_mm+epi", int_mm_ms, peak)
            if "rmsnorm_quant" in args.kernels and N == args.shapes[0][0]:
                ms = t(K.rmsnorm_quant, x16, None, 1e-6, perm, check_perm=False)
                ref_ms = t(torch_rmsnorm_quant, x16, perm)
                nbytes = 2 * M * Kd + M * Kd + 4 * M + 8 * Kd
                _row("rmsnorm_quant", M, 0, Kd, ms, 0.0, nbytes, "torch eager", ref_ms, peak)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--check`` runs the correctness pass, otherwise the CUDA timing table."""
    args = _parse_args(argv)
    if args.check:
        return run_check()
    if args.compile_arch is not None:
        from backends.triton.kernels import compile_for_arch

        for line in compile_for_arch(args.compile_arch, all_configs=args.all_configs):
            print(line)
        print(f"all kernels compiled for sm_{args.compile_arch}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_triton.py needs a CUDA device to time kernels (none found). "
            "Use --check for a CPU correctness pass through the Triton interpreter."
        )
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
