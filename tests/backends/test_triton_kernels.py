"""Triton kernels vs their torch references, on CPU under the Triton interpreter.

Shape sweeps use ragged M/N/K (not multiples of the interpreter's 16x16x32 / 16x16x64 tiles),
all W4A16 group sizes, and 1/3/4 RPTQ clusters (ragged and empty). Integer accumulations are
compared exactly; float epilogues that run the same IEEE operations in the same order are
compared bitwise; float reductions whose summation order differs are held to a stated bound:
one unit in the last place of the output dtype plus the fp32 accumulation error ``2 K 2^-24
sum|x||w|``. The references themselves are checked against explicit float64 dequantize-then-
multiply computations.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The interpreter is chosen when triton.jit decorates a kernel, i.e. when the kernels module is
# first imported: set it before that import (and reload below if something imported it earlier).
os.environ["TRITON_INTERPRET"] = "1"

if importlib.util.find_spec("triton") is None:
    pytest.skip(
        "triton is not installed (pip install 'fxcompress[triton]'); kernel tests need it",
        allow_module_level=True,
    )

from backends.triton import kernels
from backends.triton import reference as ref
from backends.triton.reference import KernelArgumentError, TritonLaunchError
from tests.conftest import load_benchmark

if not kernels.INTERPRET:
    kernels = importlib.reload(kernels)

REPO = Path(__file__).resolve().parents[2]

# Relative size of one unit in the last place of each output dtype (upper bound).
ULP = {torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, g) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


def _assert_reduction_close(out, expect, x_abs_w_abs, K):
    """|out - expect| <= 1 ulp(out dtype) * |expect| + 2 K 2^-24 sum|x||w| (+ tiny absolute)."""
    bound = ULP[out.dtype] * expect.float().abs() + 2 * K * 2.0**-24 * x_abs_w_abs + 1e-30
    err = (out.float() - expect.float()).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max excess over bound {worst:.3g} (max err {err.max().item():.3g})"


def _assert_fp32_rounding_close(out, naive, magnitude, n_roundings):
    """|out - naive| <= n_roundings * 2^-24 * magnitude, magnitude bounding every partial sum."""
    err = (out.double() - naive).abs()
    bound = n_roundings * 2.0**-24 * magnitude
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


def _cluster_offsets(K: int, C: int, g) -> torch.Tensor:
    # Ragged cut points; with C = 4 one cluster is empty on purpose.
    if C == 1:
        return torch.tensor([0, K])
    cuts = torch.randperm(K - 1, generator=g)[: C - 1 - (C == 4)] + 1
    if C == 4:
        cuts = torch.cat([cuts, cuts[:1]])
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([K])])


# ----------------------------------------------------------------------------- W8A8


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("N", [16, 40])
@pytest.mark.parametrize("K", [32, 80])
def test_w8a8_int32_accumulation_is_exact_on_ragged_shapes(M, N, K):
    g = _gen(M * 1000 + N * 10 + K)
    a, w = _int8((M, K), g), _int8((N, K), g)
    out = kernels.w8a8_gemm(a, w, torch.ones(M), torch.ones(N), out_dtype=torch.float32)
    # |acc| <= 80 * 127^2 < 2^24, so the fp32 output holds the int32 accumulator exactly.
    exact = (a.long() @ w.long().t()).float()
    assert torch.equal(out, exact)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_epilogue_matches_reference_bitwise(out_dtype, with_bias):
    g = _gen(1)
    M, N, K = 5, 40, 80
    a, w = _int8((M, K), g), _int8((N, K), g)
    a_scale = torch.rand(M, generator=g) * 0.05 + 1e-3
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g).to(out_dtype) if with_bias else None
    out = kernels.w8a8_gemm(a, w, a_scale, w_scale, bias, out_dtype)
    expect = ref.w8a8_gemm_ref(a, w, a_scale, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    # Same fp32 ops in the same order (acc * a_scale * w_scale + bias, then one rounding).
    assert torch.equal(out, expect)


def test_w8a8_reads_non_contiguous_operands_through_strides():
    g = _gen(2)
    a = _int8((40, 7), g).t()  # [7, 40] view with strides (1, 7)
    w = _int8((24, 40), g)[::2]  # every other row
    a_s, w_s = torch.rand(7, generator=g), torch.rand(12, generator=g)
    out = kernels.w8a8_gemm(a, w, a_s, w_s, out_dtype=torch.float32)
    expect = ref.w8a8_gemm_ref(a.contiguous(), w.contiguous(), a_s, w_s, out_dtype=torch.float32)
    assert torch.equal(out, expect)


def test_w8a8_reference_matches_float64_dequantize_then_matmul():
    g = _gen(3)
    w_float = torch.randn(24, 64, generator=g)
    x = torch.randn(6, 64, generator=g)
    w_q, w_s = ref.quantize_weight_int8(w_float)
    a_q, a_s = ref.per_token_quant_ref(x)
    bias = torch.randn(24, generator=g)
    out = ref.w8a8_gemm_ref(a_q, w_q, a_s, w_s, bias, torch.float32)
    naive = (a_q.double() * a_s.double()[:, None]) @ (w_q.double() * w_s.double()[:, None]).t()
    naive = naive + bias.double()
    # fp32: acc -> float exact (|acc| < 2^24), then * a_scale, * w_scale, + bias: 3 roundings.
    magnitude = (a_q.double().abs() * a_s.double()[:, None]) @ (
        w_q.double().abs() * w_s.double()[:, None]
    ).t() + bias.double().abs()
    _assert_fp32_rounding_close(out, naive, magnitude, 3)
    # And the int8 result approximates the float product (per-token x per-channel int8 noise):
    # measured 7.6e-3 on these inputs; an activation scale off by 1% gives 1.29e-2.
    rel = (out.double() - (x.double() @ w_float.double().t() + bias)).norm() / naive.norm()
    assert rel < 0.01


def test_w8a8_rejects_bad_arguments_with_named_errors():
    a, w = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8)
    s4, s8 = torch.ones(4), torch.ones(8)
    with pytest.raises(KernelArgumentError, match="w8a8_gemm: a must have dtype"):
        kernels.w8a8_gemm(a.float(), w, s4, s8)
    with pytest.raises(KernelArgumentError, match=r"w8a8_gemm: a is \[M, K\]"):
        kernels.w8a8_gemm(a, w[:, :16], s4, s8)
    with pytest.raises(KernelArgumentError, match=r"w_scale must be \[N=8\]"):
        kernels.w8a8_gemm(a, w, s4, s4)
    with pytest.raises(KernelArgumentError, match="out_dtype"):
        kernels.w8a8_gemm(a, w, s4, s8, out_dtype=torch.int32)
    with pytest.raises(KernelArgumentError, match=r"bias must be \[N=8\]"):
        kernels.w8a8_gemm(a, w, s4, s8, bias=torch.zeros(4))


def test_kernels_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    a, w = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(TritonLaunchError, match="TRITON_INTERPRET=1"):
        kernels.w8a8_gemm(a, w, torch.ones(4), torch.ones(8))


# ----------------------------------------------------------------------------- W4A16


def _w4_inputs(M, N, K, group, symmetric, dtype, seed):
    g = _gen(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    qweight, scales, zeros = ref.quantize_weight_int4(
        torch.randn(N, K, generator=g), group, symmetric=symmetric
    )
    return x, qweight, scales, zeros


def _w4_abs_bound(x, qweight, scales, zeros, group):
    w = ref.dequantize_int4(qweight, scales, zeros, group)
    return x.float().abs() @ w.abs().t()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w4a16_matches_reference_for_every_group_size(group, symmetric, dtype):
    # K = 3 groups: 96 is ragged against the interpreter's 64-wide K tile (and 32 < 64 takes the
    # per-element scale gather), 192 and 384 take the one-group-per-tile path.
    M, N, K = 5, 40, 3 * group
    x, qw, s, z = _w4_inputs(M, N, K, group, symmetric, dtype, seed=group + symmetric)
    out = kernels.w4a16_gemm(x, qw, s, z, group)
    expect = ref.w4a16_gemm_ref(x, qw, s, z, group)
    assert out.dtype == dtype and out.shape == (M, N)
    _assert_reduction_close(out, expect, _w4_abs_bound(x, qw, s, z, group), K)


@pytest.mark.parametrize("M", [1, 33])
@pytest.mark.parametrize("N", [16, 40])
def test_w4a16_handles_ragged_m_and_n(M, N):
    x, qw, s, z = _w4_inputs(M, N, 96, 32, False, torch.float16, seed=M + N)
    out = kernels.w4a16_gemm(x, qw, s, z, 32)
    expect = ref.w4a16_gemm_ref(x, qw, s, z, 32)
    _assert_reduction_close(out, expect, _w4_abs_bound(x, qw, s, z, 32), 96)


@pytest.mark.parametrize("split_k", [2, 3])
def test_w4a16_split_k_with_bias_matches_reference(split_k):
    M, N, K, group = 3, 24, 320, 64  # 5 K tiles: 3 splits leave a short last split
    x, qw, s, z = _w4_inputs(M, N, K, group, False, torch.float16, seed=split_k)
    bias = torch.randn(N, generator=_gen(9)).half()
    out = kernels.w4a16_gemm(x, qw, s, z, group, bias, split_k=split_k)
    expect = ref.w4a16_gemm_ref(x, qw, s, z, group, bias)
    bound = _w4_abs_bound(x, qw, s, z, group) + bias.float().abs()
    _assert_reduction_close(out, expect, bound, K)


def test_w4a16_fp16_scales_are_accepted():
    x, qw, s, z = _w4_inputs(2, 16, 64, 32, True, torch.float16, seed=5)
    out = kernels.w4a16_gemm(x, qw, s.half(), z, 32)
    expect = ref.w4a16_gemm_ref(x, qw, s.half(), z, 32)
    _assert_reduction_close(out, expect, _w4_abs_bound(x, qw, s.half(), z, 32), 64)


def test_w4a16_reference_matches_explicit_nibble_dequantization():
    g = _gen(6)
    M, N, K, group = 3, 8, 64, 32
    x = torch.randn(M, K, generator=g)
    qw = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // group, generator=g) + 0.1
    z = torch.randint(0, 16, (N, K // group), generator=g, dtype=torch.uint8)
    qw_l, s_l, z_l = qw.tolist(), s.double().tolist(), z.tolist()
    w = torch.empty(N, K, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            byte = qw_l[n][k // 2]
            nib = byte & 0xF if k % 2 == 0 else byte >> 4
            w[n, k] = (nib - z_l[n][k // group]) * s_l[n][k // group]
    naive = x.double() @ w.t()
    torch.testing.assert_close(ref.w4a16_gemm_ref(x, qw, s, z, group).double(), naive,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # Symmetric storage is the same with an implied zero point of 8.
    z8 = torch.full_like(z, 8)
    torch.testing.assert_close(ref.w4a16_gemm_ref(x, qw, s, None, group),
                               ref.w4a16_gemm_ref(x, qw, s, z8, group), rtol=0, atol=0)  # fmt: skip


def test_int4_pack_round_trips_and_quantization_error_is_half_a_step():
    g = _gen(7)
    q = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(ref.unpack_int4(ref.pack_int4(q)), q)
    assert ref.pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21
    w = torch.randn(6, 128, generator=g)
    for symmetric in (False, True):
        qw, s, z = ref.quantize_weight_int4(w, 32, symmetric=symmetric)
        err = (ref.dequantize_int4(qw, s, z, 32) - w).abs()
        assert (err <= 0.5 * s.repeat_interleave(32, dim=1) + 1e-6).all()


def test_w4a16_rejects_bad_arguments_with_named_errors():
    x, qw, s, z = _w4_inputs(2, 16, 64, 32, False, torch.float16, seed=8)
    with pytest.raises(KernelArgumentError, match="group_size must be one of"):
        kernels.w4a16_gemm(x, qw, s, z, 16)
    with pytest.raises(KernelArgumentError, match=r"qweight \(two int4 per byte along K\)"):
        kernels.w4a16_gemm(x, torch.cat([qw, qw], dim=1), s, z, 32)
    with pytest.raises(KernelArgumentError, match=r"scales must be \[N, K/group_size\]"):
        kernels.w4a16_gemm(x, qw, s[:, :1], z, 32)
    with pytest.raises(KernelArgumentError, match="zeros must have dtype"):
        kernels.w4a16_gemm(x, qw, s, z.float(), 32)
    with pytest.raises(KernelArgumentError, match="split_k"):
        kernels.w4a16_gemm(x, qw, s, z, 32, split_k=0)


# ----------------------------------------------------------------------------- norm + quantize


@pytest.mark.parametrize("K", [32, 100, 200])
@pytest.mark.parametrize("with_gain", [False, True])
@pytest.mark.parametrize("with_perm", [False, True])
def test_rmsnorm_quant_matches_reference(K, with_gain, with_perm):
    g = _gen(K + 2 * with_gain + with_perm)
    M = 5
    x = torch.randn(M, K, generator=g) * 3
    gain = torch.randn(K, generator=g) if with_gain else None
    perm = torch.randperm(K, generator=g) if with_perm else None
    q, scale = kernels.rmsnorm_quant(x, gain, 1e-6, perm)
    q_ref, scale_ref = ref.rmsnorm_quant_ref(x, gain, 1e-6, perm)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    # rstd differs in the last bits (sum order, 1/sqrt vs rsqrt): scales within 1e-6, and a
    # value sitting on a rounding boundary may land one step away, rarely.
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_quant_accepts_half_inputs(dtype):
    g = _gen(11)
    x = (torch.randn(3, 100, generator=g) * 2).to(dtype)
    gain = torch.randn(100, generator=g).to(dtype)
    perm = torch.randperm(100, generator=g).int()
    q, scale = kernels.rmsnorm_quant(x, gain, 1e-5, perm)
    q_ref, scale_ref = ref.rmsnorm_quant_ref(x, gain, 1e-5, perm)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_perm", [False, True])
def test_per_token_quant_is_bitwise_equal_to_reference(dtype, with_perm):
    g = _gen(12)
    x = (torch.randn(4, 100, generator=g) * 5).to(dtype)
    x[1] = 0  # an all-zero token takes the abs-max floor
    perm = torch.randperm(100, generator=g) if with_perm else None
    q, scale = kernels.per_token_quant(x, perm)
    q_ref, scale_ref = ref.per_token_quant_ref(x, perm)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert (q[1] == 0).all() and scale[1].item() == pytest.approx(1e-5 / 127)


def test_rmsnorm_quant_reference_reconstructs_float64_rmsnorm_within_half_a_step():
    g = _gen(13)
    x, gain = torch.randn(6, 48, generator=g), torch.randn(48, generator=g)
    perm = torch.randperm(48, generator=g)
    q, scale = ref.rmsnorm_quant_ref(x, gain, 1e-6, perm)
    xd = x.double()
    y = xd / torch.sqrt((xd * xd).mean(dim=1, keepdim=True) + 1e-6) * gain.double()
    y = y[:, perm]
    assert torch.allclose(scale.double(), y.abs().amax(dim=1) / 127, rtol=1e-6)
    err = (q.double() * scale.double()[:, None] - y).abs()
    assert (err <= 0.5 * scale.double()[:, None] * (1 + 1e-5)).all()
    assert q.abs().max() == 127  # the abs-max element maps to the end of the range


def test_rmsnorm_quant_rejects_a_non_permutation_and_bad_gain():
    x = torch.randn(2, 8)
    with pytest.raises(KernelArgumentError, match="not a permutation"):
        kernels.rmsnorm_quant(x, None, 1e-6, torch.zeros(8, dtype=torch.long))
    with pytest.raises(KernelArgumentError, match=r"gain must be \[K=8\]"):
        kernels.rmsnorm_quant(x, torch.ones(4))
    with pytest.raises(KernelArgumentError, match="perm must have dtype"):
        kernels.rmsnorm_quant(x, None, 1e-6, torch.arange(8.0))


# ----------------------------------------------------------------------------- cluster GEMM


@pytest.mark.parametrize("C", [1, 3, 4])
@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("N", [16, 40])
def test_cluster_gemm_with_unit_scales_is_exact_on_ragged_clusters(C, M, N):
    K = 96
    g = _gen(C * 100 + M * 3 + N)
    a, w = _int8((M, K), g), _int8((N, K), g)
    offsets = _cluster_offsets(K, C, g)
    out = kernels.cluster_gemm(a, w, torch.ones(C), offsets, torch.ones(N), out_dtype=torch.float32)
    assert torch.equal(out, (a.long() @ w.long().t()).float())


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("C", [3, 4])
def test_cluster_gemm_matches_reference_bitwise_with_scales_and_bias(out_dtype, C):
    g = _gen(20 + C)
    M, N, K = 5, 40, 80
    a, w = _int8((M, K), g), _int8((N, K), g)
    offsets = _cluster_offsets(K, C, g)
    a_scale = torch.rand(C, generator=g) * 0.05 + 1e-3
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    out = kernels.cluster_gemm(a, w, a_scale, offsets.int(), w_scale, bias, out_dtype)
    expect = ref.cluster_gemm_ref(a, w, a_scale, offsets, w_scale, bias, out_dtype)
    # Same fp32 ops in the same order: clusters summed in order, then * w_scale + bias.
    assert torch.equal(out, expect)


def test_cluster_gemm_reference_matches_float64_per_cluster_dequantization():
    g = _gen(30)
    M, N, K = 4, 12, 50
    a, w = _int8((M, K), g), _int8((N, K), g)
    offsets = torch.tensor([0, 7, 7, 31, 50])
    a_scale = torch.rand(4, generator=g) + 0.1
    w_scale = torch.rand(N, generator=g) + 0.1
    per_channel = a_scale.repeat_interleave(offsets.diff())
    naive = (a.double() * per_channel.double()) @ (w.double() * w_scale.double()[:, None]).t()
    out = ref.cluster_gemm_ref(a, w, a_scale, offsets, w_scale, out_dtype=torch.float32)
    # fp32: each cluster's exact int partial * a_scale (1 rounding), C adds, * w_scale: C + 2.
    magnitude = (a.double().abs() * per_channel.double()) @ (
        w.double().abs() * w_scale.double()[:, None]
    ).t()
    _assert_fp32_rounding_close(out, naive, magnitude, 4 + 2)


def test_cluster_gemm_rejects_bad_offsets():
    a, w = torch.zeros(2, 16, dtype=torch.int8), torch.zeros(4, 16, dtype=torch.int8)
    s2, s4 = torch.ones(2), torch.ones(4)
    with pytest.raises(KernelArgumentError, match="start at 0 and end at K=16"):
        kernels.cluster_gemm(a, w, s2, torch.tensor([0, 8, 15]), s4)
    with pytest.raises(KernelArgumentError, match="non-decreasing"):
        kernels.cluster_gemm(a, w, torch.ones(3), torch.tensor([0, 10, 8, 16]), s4)
    with pytest.raises(KernelArgumentError, match=r"\[num_clusters \+ 1\]"):
        kernels.cluster_gemm(a, w, s2, torch.tensor([0, 16]), s4)


# ----------------------------------------------------------------------------- package + bench


def test_package_exposes_kernels_lazily_and_references_without_triton():
    import backends.triton as bt

    assert bt.w8a8_gemm is kernels.w8a8_gemm
    assert bt.w8a8_gemm_ref is ref.w8a8_gemm_ref
    assert bt.triton_available()
    with pytest.raises(AttributeError):
        bt.no_such_kernel  # noqa: B018


def _load_bench():
    return load_benchmark("bench_triton")


def test_benchmark_check_mode_passes_on_cpu_via_the_interpreter(capsys):
    bench = _load_bench()
    assert bench.main(["--check"]) == 0
    assert "all kernels match their references" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_benchmark_without_cuda_exits_with_a_clear_message():
    bench = _load_bench()
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main([])


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter checks semantics only; compiling through ptxas (bundled with triton)
    # catches GPU-only failures: dtype/layout errors, shared-memory overflow, bad constexprs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_triton.py"), "--compile-arch", "90"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all kernels compiled for sm_90" in proc.stdout
