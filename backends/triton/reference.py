"""Pure-torch reference implementations of the Triton kernels (also the CPU execution path).

Each function here defines the *semantics* of one kernel in ``backends/triton/kernels.py``:
the same argument contract, the same validation, the same order of floating-point operations in
the epilogues, so that a kernel run under ``TRITON_INTERPRET=1`` can be compared against it
exactly (integer accumulations, quantization of identical inputs) or within a stated tolerance
(float reductions whose summation order differs).

Kernels and the identities they rely on:

* ``w8a8_gemm``: ``Y = (A_q W_q^T) * a_scale[:, None] * w_scale[None, :] + b`` with ``A_q``
  int8 per-token quantized activations ``[M, K]`` and ``W_q`` int8 per-output-channel quantized
  weights ``[N, K]``; the int8 x int8 products are summed exactly in int32 (SmoothQuant,
  arXiv:2211.10438; LLM.int8(), arXiv:2208.07339).
* ``w4a16_gemm``: ``Y = X (dequant(W_q))^T + b`` with ``dequant(W_q)[n, k] =
  (q[n, k] - z[n, k // g]) * s[n, k // g]`` (group-wise asymmetric uint4, as GPTQ arXiv:2210.17323
  and AWQ arXiv:2306.00978 store it); symmetric weights use the implicit zero point 8, as ONNX
  Runtime's MatMulNBits does. The dequantized weight is rounded to the activation dtype before the
  product, which is accumulated in fp32.
* ``rmsnorm_quant`` / ``per_token_quant``: ``y = x * rsqrt(mean(x^2) + eps) * gain`` computed in
  fp32 (no intermediate rounding to the input dtype), optionally reordered along channels
  (``y[:, j] = y[:, perm[j]]``, the RPTQ reorder, arXiv:2304.01089), then per-token symmetric int8
  quantization with the PT2E convention ``scale = max(absmax, 1e-5) / 127``,
  ``q = clamp(round_half_even(y * (1 / scale)), -127, 127)``.
* ``cluster_gemm``: RPTQ's per-cluster static activation scales: ``K`` is cut into contiguous,
  possibly ragged clusters ``[offsets[c], offsets[c + 1])``; ``Y = (sum_c (A_c W_c^T) *
  a_scale[c]) * w_scale[None, :] + b``, each cluster's partial product exact in int32 and the
  clusters summed in fp32 in cluster order.

Int4 packing: two values per ``uint8`` along K, the even ``k`` in the low nibble and the odd ``k``
in the high nibble (``packed[n, j] = q[n, 2j] | q[n, 2j + 1] << 4``).
"""

from __future__ import annotations

import itertools

import torch

from compiler.errors import FxCompressError

#: Floor on a per-token abs-max before dividing by 127 (PT2E ``choose_qparams_per_token``).
ABSMAX_FLOOR = 1e-5
#: Symmetric int8 range used for activations (keeps -128 unused so negation is safe).
QMAX_INT8 = 127
#: Zero point implied for symmetric int4 weights (uint4 storage, as ONNX MatMulNBits).
INT4_SYMMETRIC_ZERO = 8
#: Group sizes the W4A16 kernel is built and tested for.
SUPPORTED_GROUP_SIZES = (32, 64, 128)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(FxCompressError, ValueError):
    """A kernel was called with tensors of the wrong shape, dtype, device or layout."""


class TritonLaunchError(FxCompressError, RuntimeError):
    """A Triton kernel cannot run here: no triton, or CPU tensors without the interpreter."""


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, kernel: str, msg: str) -> None:
    if not cond:
        raise KernelArgumentError(f"{kernel}: {msg}")


def _check_tensor(
    t: torch.Tensor, kernel: str, name: str, ndim: int, dtypes: tuple[torch.dtype, ...]
) -> None:
    _check(isinstance(t, torch.Tensor), kernel, f"{name} must be a tensor, got {type(t).__name__}")
    _check(t.dim() == ndim, kernel, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    _check(
        t.dtype in dtypes,
        kernel,
        f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}",
    )


def _check_same_device(kernel: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise KernelArgumentError(f"{kernel}: tensors on different devices: {devices}")


def validate_w8a8(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    kernel: str = "w8a8_gemm",
) -> tuple[int, int, int]:
    """Validate W8A8 GEMM arguments; return ``(M, N, K)``."""
    _check_tensor(a, kernel, "a", 2, (torch.int8,))
    _check_tensor(w, kernel, "w", 2, (torch.int8,))
    M, K = a.shape
    N, Kw = w.shape
    _check(K == Kw, kernel, f"a is [M, K] = {tuple(a.shape)} but w is [N, K] = {tuple(w.shape)}")
    _check_tensor(a_scale, kernel, "a_scale", 1, (torch.float32,))
    _check_tensor(w_scale, kernel, "w_scale", 1, (torch.float32,))
    _check(a_scale.numel() == M, kernel, f"a_scale must be [M={M}], got {tuple(a_scale.shape)}")
    _check(w_scale.numel() == N, kernel, f"w_scale must be [N={N}], got {tuple(w_scale.shape)}")
    _check_bias_and_out(kernel, bias, N, out_dtype)
    _check_same_device(kernel, a=a, w=w, a_scale=a_scale, w_scale=w_scale, bias=bias)
    return M, N, K


def _check_bias_and_out(kernel: str, bias: torch.Tensor | None, N: int, out_dtype) -> None:
    _check(out_dtype in FLOAT_DTYPES, kernel, f"out_dtype must be one of {FLOAT_DTYPES}")
    if bias is not None:
        _check_tensor(bias, kernel, "bias", 1, FLOAT_DTYPES)
        _check(bias.numel() == N, kernel, f"bias must be [N={N}], got {tuple(bias.shape)}")


def validate_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    kernel: str = "w4a16_gemm",
) -> tuple[int, int, int]:
    """Validate W4A16 GEMM arguments; return ``(M, N, K)``."""
    _check_tensor(x, kernel, "x", 2, FLOAT_DTYPES)
    _check_tensor(qweight, kernel, "qweight", 2, (torch.uint8,))
    _check(
        group_size in SUPPORTED_GROUP_SIZES,
        kernel,
        f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}",
    )
    M, K = x.shape
    N, K_half = qweight.shape
    _check(
        K == 2 * K_half,
        kernel,
        f"x is [M, K] = {tuple(x.shape)} but qweight (two int4 per byte along K) is "
        f"[N, K/2] = {tuple(qweight.shape)}",
    )
    _check(K % group_size == 0, kernel, f"K={K} is not a multiple of group_size={group_size}")
    G = K // group_size
    _check_tensor(scales, kernel, "scales", 2, FLOAT_DTYPES)
    _check(
        tuple(scales.shape) == (N, G),
        kernel,
        f"scales must be [N, K/group_size] = {(N, G)}, got {tuple(scales.shape)}",
    )
    if zeros is not None:
        _check_tensor(zeros, kernel, "zeros", 2, (torch.uint8,))
        _check(
            tuple(zeros.shape) == (N, G),
            kernel,
            f"zeros must be [N, K/group_size] = {(N, G)} (one uint4 per byte), "
            f"got {tuple(zeros.shape)}",
        )
    _check_bias_and_out(kernel, bias, N, x.dtype)
    _check_same_device(kernel, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    return M, N, K


def validate_rmsnorm_quant(
    x: torch.Tensor,
    gain: torch.Tensor | None,
    perm: torch.Tensor | None,
    kernel: str = "rmsnorm_quant",
) -> tuple[int, int]:
    """Validate fused norm + quantize arguments; return ``(M, K)``."""
    _check_tensor(x, kernel, "x", 2, FLOAT_DTYPES)
    M, K = x.shape
    _check(K > 0, kernel, "x must have at least one channel")
    if gain is not None:
        _check_tensor(gain, kernel, "gain", 1, FLOAT_DTYPES)
        _check(gain.numel() == K, kernel, f"gain must be [K={K}], got {tuple(gain.shape)}")
    if perm is not None:
        _check_tensor(perm, kernel, "perm", 1, (torch.int32, torch.int64))
        _check(perm.numel() == K, kernel, f"perm must be [K={K}], got {tuple(perm.shape)}")
        # A bad permutation silently reads the wrong channels, so it is checked on every call;
        # lowering validates once and calls the kernel wrapper with check_perm=False.
    _check_same_device(kernel, x=x, gain=gain, perm=perm)
    return M, K


def check_permutation(perm: torch.Tensor, K: int, kernel: str = "rmsnorm_quant") -> None:
    """Raise if ``perm`` is not a permutation of ``range(K)``."""
    ok = torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(K))
    _check(ok, kernel, f"perm is not a permutation of range({K})")


def validate_cluster_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    cluster_offsets: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    kernel: str = "cluster_gemm",
) -> tuple[int, int, int, int]:
    """Validate per-cluster-scale GEMM arguments; return ``(M, N, K, num_clusters)``."""
    _check_tensor(a, kernel, "a", 2, (torch.int8,))
    _check_tensor(w, kernel, "w", 2, (torch.int8,))
    M, K = a.shape
    N, Kw = w.shape
    _check(K == Kw, kernel, f"a is [M, K] = {tuple(a.shape)} but w is [N, K] = {tuple(w.shape)}")
    _check_tensor(a_scale, kernel, "a_scale", 1, (torch.float32,))
    _check_tensor(cluster_offsets, kernel, "cluster_offsets", 1, (torch.int32, torch.int64))
    C = a_scale.numel()
    _check(C >= 1, kernel, "a_scale must hold at least one cluster scale")
    _check(
        cluster_offsets.numel() == C + 1,
        kernel,
        f"cluster_offsets must be [num_clusters + 1] = [{C + 1}] (boundaries 0..K), "
        f"got {tuple(cluster_offsets.shape)}",
    )
    offs = cluster_offsets.tolist()
    _check(
        offs[0] == 0 and offs[-1] == K,
        kernel,
        f"cluster_offsets must start at 0 and end at K={K}, got {offs}",
    )
    _check(
        all(lo <= hi for lo, hi in itertools.pairwise(offs)),
        kernel,
        f"cluster_offsets must be non-decreasing, got {offs}",
    )
    _check_tensor(w_scale, kernel, "w_scale", 1, (torch.float32,))
    _check(w_scale.numel() == N, kernel, f"w_scale must be [N={N}], got {tuple(w_scale.shape)}")
    _check_bias_and_out(kernel, bias, N, out_dtype)
    _check_same_device(kernel, a=a, w=w, a_scale=a_scale, w_scale=w_scale, bias=bias)
    return M, N, K, C


# ----------------------------------------------------------------------------- helpers


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even (``torch.round`` already does; named for clarity)."""
    return torch.round(x)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack uint4 values ``[N, K]`` (uint8 holding 0..15) into ``[N, K/2]`` bytes.

    Args:
        q: uint8 (or any integer) tensor with values in ``[0, 15]`` and an even last dim.

    Returns:
        uint8 tensor ``[..., K/2]``: even ``k`` in the low nibble, odd ``k`` in the high nibble.

    Raises:
        KernelArgumentError: odd K or values outside ``[0, 15]``.
    """
    _check(q.shape[-1] % 2 == 0, "pack_int4", f"last dim must be even, got {tuple(q.shape)}")
    _check(bool(((q >= 0) & (q <= 15)).all()), "pack_int4", "values must lie in [0, 15] (uint4)")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., K/2]`` bytes -> ``[..., K]`` uint8 in 0..15."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weight quantization.

    Args:
        w: float weight ``[N, K]``.

    Returns:
        ``(w_q int8 [N, K], w_scale fp32 [N])`` with ``w ~= w_q * w_scale[:, None]``.
    """
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=ABSMAX_FLOOR) / QMAX_INT8
    q = torch.round(w * (1.0 / scale)[:, None]).clamp(-QMAX_INT8, QMAX_INT8).to(torch.int8)
    return q, scale


def quantize_weight_int4(
    w: torch.Tensor, group_size: int, *, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise uint4 weight quantization (round to nearest; no GPTQ/AWQ error correction).

    Args:
        w: float weight ``[N, K]``, ``K`` a multiple of ``group_size``.
        group_size: channels per group along K.
        symmetric: if True, zero point 8 is implied and ``zeros`` is None.

    Returns:
        ``(qweight uint8 [N, K/2], scales fp32 [N, K/group_size], zeros uint8 [N, K/g] or None)``.
    """
    N, K = w.shape
    _check(K % group_size == 0, "quantize_weight_int4", f"K={K} not a multiple of {group_size}")
    wg = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        # uint4 q in [0, 15] with zero 8 covers [-8, 7] * scale; scale by the abs-max over 7.
        scale = wg.abs().amax(dim=-1).clamp(min=ABSMAX_FLOOR) / 7.0
        q = torch.round(wg / scale[..., None]) + INT4_SYMMETRIC_ZERO
        zeros = None
    else:
        lo = wg.amin(dim=-1).clamp(max=0.0)
        hi = wg.amax(dim=-1).clamp(min=0.0)
        scale = ((hi - lo) / 15.0).clamp(min=ABSMAX_FLOOR)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = torch.round(wg / scale[..., None]) + zero[..., None]
        zeros = zero.to(torch.uint8)
    q = q.clamp(0, 15).to(torch.uint8).reshape(N, K)
    return pack_int4(q), scale, zeros


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Dequantize packed group-wise uint4 weights to fp32 ``[N, K]``."""
    q = unpack_int4(qweight).float()
    z = (
        torch.full_like(scales, INT4_SYMMETRIC_ZERO, dtype=torch.float32)
        if zeros is None
        else zeros.float()
    )
    z = z.repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


# ----------------------------------------------------------------------------- references


def _epilogue(
    acc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    out = acc * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def _int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # int8 products summed exactly: |sum| <= K * 2^14 fits int32 for K < 2^17.
    return torch.matmul(a.to(torch.int32), w.to(torch.int32).t())


def w8a8_gemm_ref(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Reference W8A8 GEMM: ``(A W^T)_int32 * a_scale[:, None] * w_scale[None, :] (+ bias)``.

    Args:
        a: int8 activations ``[M, K]`` (per-token quantized).
        w: int8 weights ``[N, K]`` (per-output-channel quantized).
        a_scale: fp32 ``[M]`` per-token scales.
        w_scale: fp32 ``[N]`` per-channel scales.
        bias: optional float ``[N]``, added in fp32.
        out_dtype: fp16, bf16 or fp32.

    Returns:
        ``[M, N]`` tensor of ``out_dtype``.

    Raises:
        KernelArgumentError: bad shapes or dtypes.
    """
    validate_w8a8(a, w, a_scale, w_scale, bias, out_dtype, kernel="w8a8_gemm_ref")
    acc = _int_matmul(a, w).float() * a_scale[:, None]
    return _epilogue(acc, w_scale, bias, out_dtype)


def w4a16_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference W4A16 group-wise GEMM: ``X dequant(W)^T (+ bias)`` in ``x.dtype``.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        qweight: packed uint4 weights ``[N, K/2]`` (see :func:`pack_int4`).
        scales: ``[N, K/group_size]`` float scales.
        zeros: ``[N, K/group_size]`` uint8 zero points in 0..15, or None for symmetric (zero 8).
        group_size: 32, 64 or 128.
        bias: optional float ``[N]``.

    Returns:
        ``[M, N]`` in ``x.dtype``; the dequantized weight is rounded to ``x.dtype`` and the
        products accumulated in fp32.

    Raises:
        KernelArgumentError: bad shapes or dtypes.
    """
    validate_w4a16(x, qweight, scales, zeros, group_size, bias, kernel="w4a16_gemm_ref")
    w = dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype).float()
    acc = x.float() @ w.t()
    if bias is not None:
        acc = acc + bias.float()[None, :]
    return acc.to(x.dtype)


def per_token_quantize_ref(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 quantization of fp32 ``y [M, K]`` -> ``(q int8, scale [M])``."""
    scale = y.abs().amax(dim=1).clamp(min=ABSMAX_FLOOR) / QMAX_INT8
    inv = 1.0 / scale
    q = round_half_even((y * inv[:, None]).clamp(-QMAX_INT8, QMAX_INT8)).to(torch.int8)
    return q, scale


def rmsnorm_quant_ref(
    x: torch.Tensor,
    gain: torch.Tensor | None = None,
    eps: float = 1e-6,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fused RMSNorm + per-token int8 quantization with optional channel reorder.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        gain: optional norm gain ``[K]`` indexed by the *original* channel.
        eps: added to the mean square.
        perm: optional ``[K]`` permutation; output channel ``j`` holds input channel ``perm[j]``.

    Returns:
        ``(q int8 [M, K], scale fp32 [M])`` with ``q * scale[:, None] ~= rmsnorm(x)[:, perm]``.

    Raises:
        KernelArgumentError: bad shapes, dtypes, or ``perm`` not a permutation.
    """
    _, K = validate_rmsnorm_quant(x, gain, perm, kernel="rmsnorm_quant_ref")
    if perm is not None:
        check_permutation(perm, K, kernel="rmsnorm_quant_ref")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + eps)
    y = xf * rstd
    if gain is not None:
        y = y * gain.float()[None, :]
    if perm is not None:
        y = y[:, perm.long()]
    return per_token_quantize_ref(y)


def per_token_quant_ref(
    x: torch.Tensor, perm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-token symmetric int8 quantization (no norm), optional channel reorder.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        perm: optional ``[K]`` permutation; output channel ``j`` holds input channel ``perm[j]``.

    Returns:
        ``(q int8 [M, K], scale fp32 [M])``.
    """
    _, K = validate_rmsnorm_quant(x, None, perm, kernel="per_token_quant_ref")
    y = x.float()
    if perm is not None:
        check_permutation(perm, K, kernel="per_token_quant_ref")
        y = y[:, perm.long()]
    return per_token_quantize_ref(y)


def cluster_gemm_ref(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    cluster_offsets: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Reference GEMM with one static activation scale per contiguous channel cluster (RPTQ).

    Args:
        a: int8 activations ``[M, K]``, channels already reordered so clusters are contiguous.
        w: int8 weights ``[N, K]`` (columns in the same reordered channel order).
        a_scale: fp32 ``[C]``, one scale per cluster.
        cluster_offsets: int ``[C + 1]`` boundaries, ``0 = o_0 <= o_1 <= ... <= o_C = K``.
        w_scale: fp32 ``[N]`` per-output-channel weight scales.
        bias: optional float ``[N]``.
        out_dtype: fp16, bf16 or fp32.

    Returns:
        ``[M, N]`` of ``out_dtype``.

    Raises:
        KernelArgumentError: bad shapes, dtypes or offsets.
    """
    M, N, _, C = validate_cluster_gemm(
        a, w, a_scale, cluster_offsets, w_scale, bias, out_dtype, kernel="cluster_gemm_ref"
    )
    offs = cluster_offsets.tolist()
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for c in range(C):
        lo, hi = offs[c], offs[c + 1]
        if hi > lo:
            acc = acc + _int_matmul(a[:, lo:hi], w[:, lo:hi]).float() * a_scale[c]
    return _epilogue(acc, w_scale, bias, out_dtype)
