"""Triton kernels for the compiled graph's hot ops, with validating Python wrappers.

Semantics (shapes, dtypes, rounding, order of epilogue operations) are defined by the pure-torch
references in :mod:`backends.triton.reference`; every wrapper here validates its arguments with
the same function the reference uses and produces the same result (bitwise for integer
accumulations and for quantization of identical values; within float-reduction tolerance where
the summation order differs).

Kernels:

* :func:`w8a8_gemm`: int8 x int8 -> int32 ``tl.dot``, epilogue ``acc * a_scale[m] * w_scale[n]
  (+ bias[n])`` in fp32, stored as fp16/bf16/fp32.
* :func:`w4a16_gemm`: group-wise uint4 weights (two per byte along K) unpacked and dequantized
  in-kernel to the activation dtype, fp32 accumulation; optional split-K for small M (decode),
  whose fp32 partial sums are reduced by the wrapper.
* :func:`rmsnorm_quant` / :func:`per_token_quant`: one program per token row; three passes over
  the row (sum of squares, abs-max, quantize), the last one gathering channels through ``perm``
  (RPTQ reorder). The abs-max is permutation-invariant, so only the store pass is gathered.
* :func:`cluster_gemm`: per-cluster int32 partial products over each cluster's K range, scaled by
  that cluster's activation scale and accumulated in fp32 (RPTQ). K tiles are aligned to
  ``BLOCK_K`` and masked to the cluster, so loads stay aligned whatever the cluster sizes.

Execution: on CUDA tensors the kernels are compiled and autotuned over a few block shapes
(keyed on the power-of-two bucket of M, and N, K, so a new sequence length does not retune).
With ``TRITON_INTERPRET=1`` set *before this module is imported* (triton decides at decoration
time), the kernels run on CPU tensors through Triton's interpreter with a single small block
configuration, which is how the tests exercise them without a GPU.

Every launch passes ``enable_fp_fusion=False``: no mul+add contraction into FMA, so the GPU
epilogues perform the same IEEE operations as the references (and the interpreter); the cost is
a few instructions per output element.

Rounding to nearest-even inside kernels uses ``(v + 1.5 * 2^23) - 1.5 * 2^23`` on values already
clamped to [-127, 127]: exact in IEEE fp32 for ``|v| < 2^22`` and available in the interpreter,
where ``libdevice.rint`` is not.

Limits: int32 accumulation is exact for K < 2^17; pointer offsets are int32 (each operand under
2^31 elements); W4A16 needs K a multiple of the group size (32/64/128). Performance on a GPU has
not been measured yet (no GPU was available when these were written); block configs follow
common Triton GEMM practice and are compiled for sm_80/sm_90 by ``compile_for_arch``.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from backends.triton.reference import (
    ABSMAX_FLOOR,
    INT4_SYMMETRIC_ZERO,
    QMAX_INT8,
    KernelArgumentError,
    TritonLaunchError,
    check_permutation,
    validate_cluster_gemm,
    validate_rmsnorm_quant,
    validate_w4a16,
    validate_w8a8,
)

logger = logging.getLogger(__name__)

#: True when this module was imported with ``TRITON_INTERPRET=1`` (kernels run on CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Quantization constants as compile-time values inside the kernels.
ABSMAX_FLOOR_C = tl.constexpr(ABSMAX_FLOOR)
QMAX_C = tl.constexpr(float(QMAX_INT8))


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, **extra) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=warps, num_stages=stages
    )


# GPU search spaces (small on purpose: autotuning runs once per (M bucket, N, K)). Under the
# interpreter a single small tile keeps the CPU tests fast while still leaving ragged edges.
if INTERPRET:
    _W8A8_CONFIGS = [_cfg(16, 16, 32, 1, 1, GROUP_M=2)]
    _W4A16_CONFIGS = [_cfg(16, 16, 64, 1, 1, GROUP_M=2)]
    _CLUSTER_CONFIGS = [_cfg(16, 16, 32, 1, 1, GROUP_M=2)]
else:
    _W8A8_CONFIGS = [
        _cfg(128, 256, 128, 8, 3, GROUP_M=8),
        _cfg(256, 128, 128, 8, 3, GROUP_M=8),
        _cfg(128, 128, 128, 8, 3, GROUP_M=8),
        _cfg(128, 128, 64, 4, 4, GROUP_M=8),
        _cfg(64, 128, 128, 4, 4, GROUP_M=8),
        _cfg(64, 64, 128, 4, 4, GROUP_M=8),
        _cfg(32, 128, 128, 4, 4, GROUP_M=8),
        _cfg(16, 128, 256, 4, 4, GROUP_M=8),
        _cfg(16, 64, 256, 4, 4, GROUP_M=8),
    ]
    _W4A16_CONFIGS = [
        _cfg(16, 64, 128, 4, 4, GROUP_M=8),
        _cfg(16, 128, 128, 4, 4, GROUP_M=8),
        _cfg(16, 256, 64, 4, 4, GROUP_M=8),
        _cfg(32, 128, 64, 4, 4, GROUP_M=8),
        _cfg(64, 128, 64, 4, 4, GROUP_M=8),
        _cfg(128, 128, 64, 8, 3, GROUP_M=8),
        _cfg(128, 256, 64, 8, 3, GROUP_M=8),
    ]
    _CLUSTER_CONFIGS = [
        _cfg(128, 128, 128, 8, 3, GROUP_M=8),
        _cfg(128, 128, 64, 4, 4, GROUP_M=8),
        _cfg(64, 128, 128, 4, 4, GROUP_M=8),
        _cfg(64, 64, 64, 4, 4, GROUP_M=8),
        _cfg(16, 128, 128, 4, 4, GROUP_M=8),
    ]


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each column-tile of W while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _round_half_even(v):
    # Exact RNE for |v| < 2**22 in fp32 (no fast-math in Triton, so the add/sub is not folded).
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _cast_rne(v, dtype: tl.constexpr):
    # fp32 -> dtype rounding to nearest-even. bf16 is rounded with integer ops first (then the
    # cast is exact): the interpreter's fp32 -> bf16 cast truncates, the GPU's rounds; this makes
    # both round alike. (A NaN whose payload lies only in the low 16 bits would become inf.)
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(dtype)


# ----------------------------------------------------------------------------- W8A8 GEMM


@triton.autotune(configs=_W8A8_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _w8a8_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap out-of-range rows/cols onto valid ones so the loads need no M/N mask; the store masks.
    ram = rm % M
    rwn = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rwn[None, :] * stride_wn + rk[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
        w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    a_s = tl.load(a_scale_ptr + ram)
    w_s = tl.load(w_scale_ptr + rwn)
    out = acc.to(tl.float32) * a_s[:, None]
    out = out * w_s[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rwn).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(o_ptrs, _cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- W4A16 GEMM


@triton.autotune(configs=_W4A16_CONFIGS, key=["M_BUCKET", "N", "K", "SPLIT_K"])
@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    FP32_DOT: tl.constexpr, SYM_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rxm = rm % M
    rwn = rn % N
    n_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * tiles_per_split
    t_hi = min(t_lo + tiles_per_split, n_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(
            x_ptr + rxm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=k_ok[None, :],
            other=0.0,
        )
        # Each byte is loaded for both of its k (the duplicate hits L1); nibble = k % 2.
        packed = tl.load(
            qw_ptr + rwn[None, :] * stride_qn + (rk[:, None] // 2) * stride_qk,
            mask=k_ok[:, None],
            other=0,
        )  # [BLOCK_K, BLOCK_N] uint8
        q = ((packed >> ((rk[:, None] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
        if BLOCK_K <= GROUP:
            # GROUP % BLOCK_K == 0 (both powers of two): the whole tile lies in one group.
            g = (t * BLOCK_K) // GROUP
            s = tl.load(s_ptr + rwn * stride_sn + g * stride_sg).to(tl.float32)[None, :]
            if HAS_ZEROS:
                z = tl.load(z_ptr + rwn * stride_zn + g * stride_zg).to(tl.float32)[None, :]
            else:
                z = SYM_ZERO
        else:
            g2 = rk[:, None] // GROUP
            s = tl.load(
                s_ptr + rwn[None, :] * stride_sn + g2 * stride_sg, mask=k_ok[:, None], other=0.0
            ).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(
                    z_ptr + rwn[None, :] * stride_zn + g2 * stride_zg, mask=k_ok[:, None], other=0
                ).to(tl.float32)
            else:
                z = SYM_ZERO
        w = _cast_rne((q - z) * s, x.dtype)  # dequantized weight, rounded to the activation dtype
        if FP32_DOT:
            # Exact products of fp32 (or bf16-valued) operands, fp32 accumulation: no tf32.
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rwn).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    o_ptrs = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(o_ptrs, _cast_rne(acc, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- norm + quantize


@triton.jit
def _rmsnorm_quant_kernel(
    x_ptr, gain_ptr, perm_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_xk, stride_qm, stride_qk, eps,
    HAS_NORM: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    cols0 = tl.arange(0, BLOCK_K)
    rstd = 1.0
    if HAS_NORM:
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            v = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        y = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            y = y * rstd
        if HAS_GAIN:
            y = y * tl.load(gain_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, axis=0), ABSMAX_FLOOR_C) / QMAX_C
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        ok = cols < K
        if HAS_PERM:
            src = tl.load(perm_ptr + cols, mask=ok, other=0)
        else:
            src = cols
        y = tl.load(x_row + src * stride_xk, mask=ok, other=0.0).to(tl.float32)
        if HAS_NORM:
            y = y * rstd
        if HAS_GAIN:
            y = y * tl.load(gain_ptr + src, mask=ok, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(y * inv, -QMAX_C), QMAX_C)
        q = _round_half_even(v).to(tl.int8)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + cols * stride_qk, q, mask=ok)
    tl.store(scale_ptr + row, scale)


# ----------------------------------------------------------------------------- cluster GEMM


@triton.autotune(configs=_CLUSTER_CONFIGS, key=["M_BUCKET", "N", "K", "C"])
@triton.jit
def _cluster_kernel(
    a_ptr, w_ptr, a_scale_ptr, offs_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, C, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ram = rm % M
    rwn = rn % N
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(C):
        lo = tl.load(offs_ptr + c)
        hi = tl.load(offs_ptr + c + 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        # Start at the aligned tile holding `lo` and mask to [lo, hi): ragged clusters share tiles.
        for k0 in range((lo // BLOCK_K) * BLOCK_K, hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = (rk >= lo) & (rk < hi)
            a = tl.load(
                a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak,
                mask=k_ok[None, :],
                other=0,
            )
            w = tl.load(
                w_ptr + rwn[None, :] * stride_wn + rk[:, None] * stride_wk,
                mask=k_ok[:, None],
                other=0,
            )
            acc = tl.dot(a, w, acc)
        out = out + acc.to(tl.float32) * tl.load(a_scale_ptr + c)
    w_s = tl.load(w_scale_ptr + rwn)
    out = out * w_s[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rwn).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(o_ptrs, _cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- wrappers


def _check_runnable(kernel: str, *tensors: torch.Tensor | None) -> None:
    dev = next(t.device for t in tensors if t is not None)
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and INTERPRET:
        return
    if dev.type == "cpu":
        raise TritonLaunchError(
            f"{kernel}: tensors are on the CPU but Triton kernels need a CUDA device; set "
            "TRITON_INTERPRET=1 before importing backends.triton.kernels to run them in the "
            "interpreter, or use the reference implementation (backends.triton.reference)"
        )
    raise TritonLaunchError(f"{kernel}: unsupported device {dev} (need cuda, or cpu + interpreter)")


def _m_bucket(M: int) -> int:
    # Autotune per power-of-two bucket of M, so every new token count does not retune.
    return min(triton.next_power_of_2(max(M, 1)), 4096)


def w8a8_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """W8A8 GEMM: ``(A W^T)_int32 * a_scale[:, None] * w_scale[None, :] (+ bias)``.

    Args:
        a: int8 per-token quantized activations ``[M, K]``.
        w: int8 per-output-channel quantized weights ``[N, K]``.
        a_scale: fp32 ``[M]``.
        w_scale: fp32 ``[N]``.
        bias: optional ``[N]`` (fp16/bf16/fp32), added in fp32.
        out_dtype: fp16, bf16 or fp32.

    Returns:
        ``[M, N]`` tensor of ``out_dtype`` on the inputs' device.

    Raises:
        KernelArgumentError: bad shapes/dtypes/devices.
        TritonLaunchError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    M, N, K = validate_w8a8(a, w, a_scale, w_scale, bias, out_dtype)
    _check_runnable("w8a8_gemm", a)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    a_scale = a_scale.contiguous()
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _w8a8_kernel[grid](
        a, w, a_scale, w_scale, bias if bias is not None else w_scale, out,
        M, N, K, _m_bucket(M),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _default_split_k(M: int, N: int, K: int, device: torch.device) -> int:
    # Decode (small M) launches too few tiles to fill the GPU: split K until ~2 waves of SMs,
    # keeping at least 512 channels per split so partial sums stay worth their write-back.
    if device.type != "cuda" or M > 16:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(N, 64)
    split = 1
    while split < 16 and tiles * split < 2 * sms and K // (split * 2) >= 512:
        split *= 2
    return split


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """W4A16 group-wise GEMM: ``X dequant(W)^T (+ bias)`` in ``x.dtype``.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        qweight: packed uint4 weights ``[N, K/2]`` (even k low nibble, odd k high nibble).
        scales: ``[N, K/group_size]`` float scales.
        zeros: ``[N, K/group_size]`` uint8 zero points (0..15), or None for symmetric (zero 8).
        group_size: 32, 64 or 128.
        bias: optional ``[N]``.
        split_k: number of K splits (None: 1, or more for small M on CUDA). With more than one,
            fp32 partial sums are written to a workspace and reduced in torch.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        KernelArgumentError: bad shapes/dtypes/devices or ``split_k < 1``.
        TritonLaunchError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    M, N, K = validate_w4a16(x, qweight, scales, zeros, group_size, bias)
    _check_runnable("w4a16_gemm", x)
    if split_k is None:
        split_k = _default_split_k(M, N, K, x.device)
    if not isinstance(split_k, int) or split_k < 1:
        raise KernelArgumentError(f"w4a16_gemm: split_k must be a positive int, got {split_k!r}")
    if M == 0 or N == 0:
        return torch.empty(M, N, dtype=x.dtype, device=x.device)
    if split_k == 1:
        out = torch.empty(1, M, N, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    bias = bias.contiguous() if bias is not None else None
    fused_bias = bias is not None and split_k == 1
    zeros_t = zeros if zeros is not None else scales
    # The interpreter's dot has no bf16 path (it multiplies the raw uint16 storage), so bf16
    # operands go through an fp32 dot there: bf16 products are exact in fp32, same result.
    fp32_dot = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    _w4a16_kernel[grid](
        x, qweight, scales, zeros_t, bias if fused_bias else scales, out,
        M, N, K, _m_bucket(M),
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), zeros_t.stride(0), zeros_t.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=fused_bias, SPLIT_K=split_k,
        FP32_DOT=fp32_dot, SYM_ZERO=float(INT4_SYMMETRIC_ZERO), enable_fp_fusion=False,
    )  # fmt: skip
    if split_k == 1:
        return out[0]
    acc = out.sum(dim=0)
    if bias is not None:
        acc = acc + bias.float()[None, :]
    return acc.to(x.dtype)


def _norm_block_k(K: int) -> tuple[int, int]:
    # Interpreter: a small block so the row loop and its ragged tail are exercised on tiny K.
    if INTERPRET:
        return min(triton.next_power_of_2(K), 64), 1
    block = min(triton.next_power_of_2(K), 4096)
    return block, max(1, min(block // 256, 16))


def _norm_quant(
    kernel: str,
    x: torch.Tensor,
    gain: torch.Tensor | None,
    eps: float,
    perm: torch.Tensor | None,
    has_norm: bool,
    check_perm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = validate_rmsnorm_quant(x, gain, perm, kernel=kernel)
    if perm is not None and check_perm:
        check_permutation(perm, K, kernel=kernel)
    _check_runnable(kernel, x)
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    gain_c = gain.contiguous() if gain is not None else None
    perm_c = perm.contiguous() if perm is not None else None
    block_k, warps = _norm_block_k(K)
    _rmsnorm_quant_kernel[(M,)](
        x, gain_c if gain_c is not None else scale, perm_c if perm_c is not None else scale,
        q, scale, K, x.stride(0), x.stride(1), q.stride(0), q.stride(1), float(eps),
        HAS_NORM=has_norm, HAS_GAIN=gain is not None, HAS_PERM=perm is not None,
        BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return q, scale


def rmsnorm_quant(
    x: torch.Tensor,
    gain: torch.Tensor | None = None,
    eps: float = 1e-6,
    perm: torch.Tensor | None = None,
    *,
    check_perm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RMSNorm + per-token symmetric int8 quantization with optional channel reorder.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        gain: optional norm gain ``[K]`` (indexed by the original channel).
        eps: added to the mean square.
        perm: optional ``[K]`` int permutation: output channel ``j`` holds input channel
            ``perm[j]`` (RPTQ reorder).
        check_perm: verify ``perm`` is a permutation (a host sync; lowering checks once and
            passes False).

    Returns:
        ``(q int8 [M, K], scale fp32 [M])``.

    Raises:
        KernelArgumentError: bad shapes/dtypes/devices or a non-permutation.
        TritonLaunchError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    return _norm_quant("rmsnorm_quant", x, gain, eps, perm, True, check_perm)


def per_token_quant(
    x: torch.Tensor, perm: torch.Tensor | None = None, *, check_perm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization (no norm) with optional channel reorder.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        perm: optional ``[K]`` permutation (output channel ``j`` = input channel ``perm[j]``).
        check_perm: verify ``perm`` is a permutation.

    Returns:
        ``(q int8 [M, K], scale fp32 [M])``.
    """
    return _norm_quant("per_token_quant", x, None, 0.0, perm, False, check_perm)


def cluster_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    cluster_offsets: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """GEMM with one static activation scale per contiguous channel cluster (RPTQ).

    Args:
        a: int8 activations ``[M, K]`` whose channels are ordered so each cluster is contiguous.
        w: int8 weights ``[N, K]`` in the same channel order.
        a_scale: fp32 ``[C]``, one scale per cluster.
        cluster_offsets: int ``[C + 1]`` boundaries from 0 to K (non-decreasing; ragged sizes).
        w_scale: fp32 ``[N]`` per-output-channel weight scales.
        bias: optional ``[N]``.
        out_dtype: fp16, bf16 or fp32.

    Returns:
        ``[M, N]`` of ``out_dtype``: ``(sum_c (A_c W_c^T) * a_scale[c]) * w_scale (+ bias)``.

    Raises:
        KernelArgumentError: bad shapes/dtypes/devices/offsets.
        TritonLaunchError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    M, N, K, C = validate_cluster_gemm(a, w, a_scale, cluster_offsets, w_scale, bias, out_dtype)
    _check_runnable("cluster_gemm", a)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    offs = cluster_offsets.to(device=a.device, dtype=torch.int32).contiguous()
    a_scale = a_scale.contiguous()
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _cluster_kernel[grid](
        a, w, a_scale, offs, w_scale, bias if bias is not None else w_scale, out,
        M, N, K, C, _m_bucket(M),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- ahead-of-time check


def compile_for_arch(arch: int = 90, *, all_configs: bool = False) -> list[str]:
    """Compile the kernels for a CUDA architecture without a GPU (Triton ships ptxas).

    Catches GPU-path compile errors (types, layouts, shared-memory overflows) on a CPU-only
    machine, where the interpreter exercises only the semantics.

    Args:
        arch: compute capability as an int (80 = A100, 90 = H100/H200).
        all_configs: compile every autotune config (minutes) instead of the first of each.

    Returns:
        One line per compiled variant: kernel, dtypes, block config, shared memory bytes.

    Raises:
        TritonLaunchError: when this module was imported under ``TRITON_INTERPRET=1``.
    """
    if INTERPRET:
        raise TritonLaunchError(
            "compile_for_arch needs the kernels imported without the interpreter"
        )
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    lines: list[str] = []

    def build(name, jitfn, types, consts, warps, stages):
        sig, cx = {}, {}
        for i, arg in enumerate(jitfn.arg_names):
            if arg in consts:
                sig[arg], cx[(i,)] = "constexpr", consts[arg]
            else:
                sig[arg] = types.get(arg, "i32")
        opts = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False}
        k = triton.compile(ASTSource(jitfn, sig, cx), target=target, options=opts)
        lines.append(f"sm_{arch} {name} {consts} smem={k.metadata.shared}")

    def pick(configs):
        return configs if all_configs else configs[:1]

    for out_t in ("*fp16", "*bf16", "*fp32"):
        for cfg in pick(_W8A8_CONFIGS):
            types = {"a_ptr": "*i8", "w_ptr": "*i8", "a_scale_ptr": "*fp32",
                     "w_scale_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": out_t}  # fmt: skip
            consts = {"HAS_BIAS": True, **cfg.kwargs}
            build("w8a8", _w8a8_kernel.fn, types, consts, cfg.num_warps, cfg.num_stages)
            build("cluster", _cluster_kernel.fn, {**types, "offs_ptr": "*i32", "bias_ptr": "*fp32"},
                  consts, cfg.num_warps, cfg.num_stages)  # fmt: skip
    for x_t in ("*fp16", "*bf16", "*fp32"):
        for group, has_zeros in ((32, True), (128, False)):
            for cfg in pick(_W4A16_CONFIGS):
                types = {"x_ptr": x_t, "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8",
                         "bias_ptr": x_t, "out_ptr": x_t}  # fmt: skip
                consts = {"GROUP": group, "HAS_ZEROS": has_zeros, "HAS_BIAS": True, "SPLIT_K": 2,
                          "FP32_DOT": x_t == "*fp32", "SYM_ZERO": float(INT4_SYMMETRIC_ZERO),
                          **cfg.kwargs}  # fmt: skip
                build("w4a16", _w4a16_kernel.fn, types, consts, cfg.num_warps, cfg.num_stages)
        types = {"x_ptr": x_t, "gain_ptr": x_t, "perm_ptr": "*i64", "q_ptr": "*i8",
                 "scale_ptr": "*fp32", "eps": "fp32"}  # fmt: skip
        for has_norm in (True, False):
            consts = {"HAS_NORM": has_norm, "HAS_GAIN": has_norm, "HAS_PERM": True, "BLOCK_K": 4096}
            build("rmsnorm_quant", _rmsnorm_quant_kernel, types, consts, 16, 1)
    return lines
