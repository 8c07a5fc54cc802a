"""Lowering of Q/DQ graphs (the :mod:`compiler.qdq` forms) to ONNX Runtime integer kernels.

Why a lowering step: exporting the PT2E Q/DQ graph as it is gives ONNX
``DequantizeLinear(W_q) -> Transpose -> MatMul``; ORT's QDQ fusion does not see through the
transpose that ``aten.linear`` needs, per-token and per-group Q/DQ have no ONNX translation,
and an unfused weight ``DequantizeLinear`` runs on every call (a float model with extra work).
So, on a copy of the GraphModule, each quantized pattern is replaced by one op of a small
``fxcompress_ort`` torch library whose ONNX translation is exactly the kernel ORT runs:

===============================================  =============================================
fx pattern (from InsertQDQ)                       ONNX emitted (what ORT executes)
===============================================  =============================================
``linear(DQ_t(Q_t(x)), DQ_ch(W_q), b)``           ``QuantizeLinear`` (uint8, zero point 128)
(static per-tensor int8 activations)              + ``com.microsoft.MatMulIntegerToFloat``
``linear(DQ_tok(Q_tok(x)), DQ_ch(W_q), b)``       per-row abs-max scale, ``Round``/``Clip``/
(dynamic per-token int8 activations)              ``Cast`` to uint8, ``MatMulIntegerToFloat``
                                                  (weight scales fused), ``Mul`` by the row scale
``linear(x, DQ_group(W_q4), b)`` (int4 groups)     ``com.microsoft.MatMulNBits`` (bits=4)
``embedding(DQ_ch(T_q), ids)`` (int8 rows)         ``Gather`` of int8 rows + ``Gather`` of the
                                                  row scales + ``Cast``/``Mul``
===============================================  =============================================

Identities relied on (each exact up to float rounding order):

- symmetric int8 activations shifted by 128 are uint8 with zero point 128:
  ``clamp(round(x/s), -128, 127) + 128 == clamp(round(x/s) + 128, 0, 255)``, so ORT can use
  its fast u8s8 GEMM while the graph keeps PT2E's int8;
- ``linear(x, W) = x @ W^T``: the int8 weight is stored transposed, ``[in, out]``, as
  ``MatMulIntegerToFloat`` and ``MatMul`` expect;
- per-token dequantization ``(q_x s_x[t]) @ (q_W s_W)^T = s_x[t] * ((q_x @ q_W^T) * s_W)``;
- int4 held in int8 ``q`` in [-8, 7] is ``MatMulNBits``' uint4 ``q + 8`` with zero point
  ``zp + 8`` (or its default 8 when symmetric), two values a byte, low nibble first.

What ORT runs (checked by :func:`integer_kernel_counts` on ORT's *optimised* graph):
``MatMulIntegerToFloat`` (int8 x int8 -> float, MLAS QGEMM) for W8A8 static and dynamic, and
``MatMulNBits`` for W4A16. Honest deviations: the dynamic scheme's per-token quantization is
written out in ONNX ops (ORT's own ``DynamicQuantizeLinear`` / ``DynamicQuantizeMatMul`` are
per *tensor*, which would not match the graph); ``MatMulNBits`` with ``accuracy_level=0``
(the default here) computes in float32 from 4-bit weights, i.e. real W4A16; level 4 quantizes
activations to int8 inside the kernel (faster, but no longer A16 numerics).

Patterns not listed (e.g. weight-only int8 linears made by another pass) are left to the
exporter's default translations; :func:`integer_kernel_counts` then reports float ``MatMul``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import fx

from backends.qdq_patterns import is_dequantized_weight
from backends.qdq_patterns import is_node as _is
from backends.qdq_patterns import match_activation as _match_activation
from compiler import ir

log = logging.getLogger(__name__)

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

#: zero point of the uint8 activations that carry symmetric int8 values
ACT_ZERO_POINT = 128
#: floor of the per-token abs-max (PT2E ``choose_qparams_per_token``)
PER_TOKEN_EPS = 1e-5

#: op types of ORT's optimised graph that are integer / low-bit matmul kernels
INTEGER_KERNELS = frozenset({
    "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul",
    "MatMulNBits", "QGemm", "DynamicQuantizeLSTM",
})
FLOAT_MATMULS = frozenset({"MatMul", "Gemm", "FusedMatMul"})

# ----------------------------------------------------------------------------- torch ops
# Reference implementations: used when the lowered graph runs in torch (tests, re-export);
# each matches its ONNX translation below.

_LIB = "fxcompress_ort"


@torch.library.custom_op(f"{_LIB}::quantize_per_tensor_u8", mutates_args=())
def quantize_per_tensor_u8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantization carried as uint8 with zero point 128."""
    q = torch.round(x * (1.0 / scale)).clamp(-128, 127) + ACT_ZERO_POINT
    return q.to(torch.uint8)


@quantize_per_tensor_u8.register_fake
def _(x, scale):
    return torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op(f"{_LIB}::quantize_per_token_u8", mutates_args=())
def quantize_per_token_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (as uint8, zero point 128) and the row scales ``[..., 1]``."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=PER_TOKEN_EPS) / 127
    q = torch.round(x * (1.0 / scale)).clamp(-128, 127) + ACT_ZERO_POINT
    return q.to(torch.uint8), scale


@quantize_per_token_u8.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty((*x.shape[:-1], 1))


def _int8_matmul(a_q: torch.Tensor, w_kn: torch.Tensor) -> torch.Tensor:
    # exact in float32 while K * 255 * 127 < 2^24 per partial sum is not guaranteed, so use
    # float64 and round back: the integer product is exact, as in ORT's int32 accumulation
    a = a_q.to(torch.float64) - ACT_ZERO_POINT
    return (a @ w_kn.to(torch.float64)).to(torch.float32)


@torch.library.custom_op(f"{_LIB}::int8_linear", mutates_args=())
def int8_linear(
    a_q: torch.Tensor, a_scale: torch.Tensor, w_kn: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``((a_q - 128) @ w_kn) * a_scale * w_scale + bias``; ``a_scale`` scalar (per tensor)."""
    y = _int8_matmul(a_q, w_kn) * (a_scale * w_scale)
    return y + bias if bias is not None else y


@int8_linear.register_fake
def _(a_q, a_scale, w_kn, w_scale, bias):
    return a_q.new_empty((*a_q.shape[:-1], w_kn.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::int8_linear_per_token", mutates_args=())
def int8_linear_per_token(
    a_q: torch.Tensor, a_scale: torch.Tensor, w_kn: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(((a_q - 128) @ w_kn) * w_scale) * a_scale[..., 1] + bias`` (per-token scales)."""
    y = (_int8_matmul(a_q, w_kn) * w_scale) * a_scale
    return y + bias if bias is not None else y


@int8_linear_per_token.register_fake
def _(a_q, a_scale, w_kn, w_scale, bias):
    return a_q.new_empty((*a_q.shape[:-1], w_kn.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor, b_packed: torch.Tensor, scales: torch.Tensor,
    zero_points: torch.Tensor | None, bias: torch.Tensor | None,
    k: int, n: int, block_size: int, accuracy_level: int,
) -> torch.Tensor:
    """ORT ``MatMulNBits`` (bits=4) semantics: ``x @ dequant(B)^T + bias``."""
    w = unpack_nbits(b_packed, scales, zero_points, k, n, block_size)
    y = x @ w.T
    return y + bias if bias is not None else y


@matmul_nbits.register_fake
def _(x, b_packed, scales, zero_points, bias, k, n, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op(f"{_LIB}::gather_int8_rows", mutates_args=())
def gather_int8_rows(table_q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``embedding(table_q * scales[:, None], ids)`` without dequantizing the whole table."""
    return table_q[ids].to(torch.float32) * scales[ids].unsqueeze(-1)


@gather_int8_rows.register_fake
def _(table_q, scales, ids):
    return scales.new_empty((*ids.shape, table_q.shape[1]))


# ----------------------------------------------------------------------------- int4 packing


def pack_nbits(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PT2E int4-in-int8 weights to ``MatMulNBits`` inputs.

    Args:
        q: ``[N, K]`` int8 in [-8, 7].
        scale: ``[N, K / block_size]`` float.
        zero_point: ``[N, K / block_size]`` int8 in [-8, 7], or None (symmetric).
        block_size: the group size.

    Returns:
        ``(B [N, K/bs, bs/2] uint8, scales [N * K/bs] float32, zero_points
        [N * ceil(K/bs / 2)] uint8 or None)``.
    """
    n, k = q.shape
    nb = k // block_size
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, nb, block_size)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    zp_packed = None
    if zero_point is not None:
        z = (zero_point.to(torch.int16) + 8).to(torch.uint8).reshape(n, nb)
        if nb % 2:
            z = torch.cat([z, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)
        zp_packed = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1).contiguous()
    return packed.contiguous(), scale.to(torch.float32).reshape(-1).contiguous(), zp_packed


def unpack_nbits(
    b_packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
    k: int, n: int, block_size: int,
) -> torch.Tensor:
    """Dequantized float32 ``[N, K]`` weight from ``MatMulNBits`` inputs (inverse of packing)."""
    nb = k // block_size
    lo = (b_packed & 0x0F).to(torch.float32)
    hi = (b_packed >> 4).to(torch.float32)
    u = torch.stack([lo, hi], dim=-1).reshape(n, nb, block_size)
    if zero_points is None:
        z = torch.full((n, nb), 8.0)
    else:
        zp = zero_points.reshape(n, -1)
        z = torch.stack([(zp & 0x0F), (zp >> 4)], dim=-1).reshape(n, -1)[:, :nb].to(torch.float32)
    w = (u - z[..., None]) * scales.reshape(n, nb, 1)
    return w.reshape(n, k)


# ----------------------------------------------------------------------------- lowering


@dataclass
class LoweringStats:
    """What :func:`lower_for_ort` rewrote."""

    int8_linears_static: int = 0
    int8_linears_per_token: int = 0
    int4_linears: int = 0
    int8_embeddings: int = 0
    activation_quantizers: int = 0
    left_as_is: int = 0


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has the int8 dot-product instructions MLAS's int8-compute 4-bit GEMM
    uses (x86: AVX2, AVX-VNNI or AVX512-VNNI; Arm: the ``asimddp`` dot-product extension).

    Read from ``/proc/cpuinfo`` (Linux); elsewhere the answer is no.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx2", "avx_vnni", "avx512_vnni", "asimddp"})


def resolve_accuracy_level(level: int | str) -> int:
    """``MatMulNBits``' ``accuracy_level`` from an int 0..4 or ``"auto"``.

    ``"auto"`` is 4 (activations quantized to int8 per block inside the kernel, the
    ORT GenAI builder's CPU default) where :func:`cpu_has_int8_dot`, else 0 (float32 compute).
    Level 4 is not the graph's arithmetic (the graph keeps float activations); the perplexity
    it costs is measured by the tests (stories260K W4A16: within 0.5% of the graph's).
    """
    if level == "auto":
        return 4 if cpu_has_int8_dot() else 0
    if isinstance(level, bool) or level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 or 'auto', got {level!r}")
    return int(level)


def lower_for_ort(
    gm: fx.GraphModule, *, accuracy_level: int | str = 0
) -> tuple[fx.GraphModule, LoweringStats]:
    """A copy of ``gm`` with every quantized pattern replaced by an ``fxcompress_ort`` op.

    Args:
        gm: a graph after ``insert_qdq`` (not modified).
        accuracy_level: ``MatMulNBits`` accuracy level (0: float32 compute from 4-bit weights;
            4: int8 activations inside the kernel; ``"auto"``: see
            :func:`resolve_accuracy_level`).

    Returns:
        ``(lowered copy, stats)``. The copy computes the same function as ``gm`` up to float
        rounding order (see the module docstring for the identities).
    """
    accuracy_level = resolve_accuracy_level(accuracy_level)
    out = ir.copy_sharing_weights(gm)  # parameters replaced, never written into
    g = out.graph
    stats = LoweringStats()
    act_cache: dict[fx.Node, tuple[fx.Node, fx.Node, bool]] = {}
    # decide
    plans = []
    for n in g.nodes:
        if ir.is_op(n, ir.LINEAR):
            x, w, b = ir.linear_parts(n)
            if _is(w, qd.dequantize_per_channel.default) and w.args[3] == 0 and w.args[2] is None:
                act = _match_activation(x)
                if act is not None:
                    plans.append(("int8", n, act, w, b))
                    continue
            if _is(w, qd.dequantize_per_channel_group.default):
                plans.append(("int4", n, None, w, b))
                continue
            if is_dequantized_weight(w):
                stats.left_as_is += 1
        elif ir.is_op(n, ir.EMBEDDING):
            t = n.args[0]
            if _is(t, qd.dequantize_per_channel.default) and t.args[3] == 0 and t.args[2] is None:
                plans.append(("gather", n, None, t, None))
    # mutate
    for kind, n, act, w, b in plans:
        if kind == "int8":
            x, q, mode, scale = act
            if q not in act_cache:
                act_cache[q] = _lower_activation(out, x, q, mode, scale)
                stats.activation_quantizers += 1
            a_q, a_scale, per_token = act_cache[q]
            w_kn = ir.add_param(out, f"{w.args[0].target}_kn",
                                ir.get_param(out, w.args[0]).T.contiguous(), before=n)
            target = int8_linear_per_token if per_token else int8_linear
            with g.inserting_before(n):
                new = g.call_function(target._opoverload, (a_q, a_scale, w_kn, w.args[1], b))
            if per_token:
                stats.int8_linears_per_token += 1
            else:
                stats.int8_linears_static += 1
        elif kind == "int4":
            x = n.args[0]
            w_q, scale, zp = (ir.get_param(out, a) if a is not None else None for a in w.args[:3])
            gs = int(w.args[6])
            n_out, k = w_q.shape
            packed, sc, zpp = pack_nbits(w_q, scale, zp, gs)
            base = str(w.args[0].target)
            bn = ir.add_param(out, f"{base}_nbits", packed, before=n)
            sn = ir.add_param(out, f"{base}_nbits_scale", sc, before=n)
            zn = ir.add_param(out, f"{base}_nbits_zp", zpp, before=n) if zpp is not None else None
            with g.inserting_before(n):
                new = g.call_function(matmul_nbits._opoverload,
                                      (x, bn, sn, zn, b, k, n_out, gs, accuracy_level))
            stats.int4_linears += 1
        else:
            with g.inserting_before(n):
                new = g.call_function(gather_int8_rows._opoverload, (w.args[0], w.args[1], n.args[1]))
            stats.int8_embeddings += 1
        ir.copy_meta(n, new, created_by="ort_quant")
        n.replace_all_uses_with(new)
        g.erase_node(n)
    g.eliminate_dead_code()
    ir.remove_unused_attrs(out)
    g.lint()
    out.recompile()
    log.info("ort lowering: %s", stats)
    return out, stats


def _lower_activation(gm, x, q, mode, scale):
    g = gm.graph
    if mode == "static":
        sn = ir.add_param(gm, "act_scale", torch.tensor(scale, dtype=torch.float32), before=q)
        with g.inserting_after(q):
            a_q = g.call_function(quantize_per_tensor_u8._opoverload, (x, sn))
        ir.copy_meta(q, a_q, created_by="ort_quant")
        return a_q, sn, False
    with g.inserting_after(q):
        pair = g.call_function(quantize_per_token_u8._opoverload, (x,))
    import operator

    with g.inserting_after(pair):
        a_q = g.call_function(operator.getitem, (pair, 0))
    with g.inserting_after(a_q):
        a_s = g.call_function(operator.getitem, (pair, 1))
    for node in (pair, a_q, a_s):
        ir.copy_meta(q, node, created_by="ort_quant")
        node.meta.pop("val", None)
    return a_q, a_s, True


# ----------------------------------------------------------------------------- ONNX


def _contrib_schemas() -> dict[str, object]:
    """ONNX OpSchemas of the ORT contrib ops we emit (ORT's schemas are not in ``onnx.defs``;
    the exporter's tracer needs one to bind inputs and attributes). Not registered globally."""
    from onnx.defs import OpSchema

    fp, opt, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption, OpSchema.Attribute
    ints = OpSchema.AttrType.INT
    q_types = ["tensor(uint8)", "tensor(int8)"]
    mitf = OpSchema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("a_scale", "T3"), fp("b_scale", "T3"),
                fp("a_zero_point", "T1", param_option=opt.Optional),
                fp("b_zero_point", "T2", param_option=opt.Optional),
                fp("bias", "T3", param_option=opt.Optional)],
        outputs=[fp("Y", "T3")],
        type_constraints=[("T1", q_types, ""), ("T2", q_types, ""),
                          ("T3", ["tensor(float)"], "")],
    )
    nbits = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"),
                fp("zero_points", "T3", param_option=opt.Optional),
                fp("g_idx", "T4", param_option=opt.Optional),
                fp("bias", "T1", param_option=opt.Optional)],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[attr(name, ints, "") for name in
                    ("K", "N", "bits", "block_size", "accuracy_level")],
    )
    return {"MatMulIntegerToFloat": mitf, "MatMulNBits": nbits}


class _ContribOps:
    """``ms.MatMulNBits(...)``: onnxscript ops of the ``com.microsoft`` domain."""

    def __init__(self) -> None:
        import onnxscript

        self._opset = onnxscript.values.Opset("com.microsoft", 1)
        self._schemas = _contrib_schemas()

    def __getattr__(self, name: str):
        import onnxscript

        return onnxscript.values.Op(self._opset, name, self._schemas[name])


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: fxcompress_ort op -> ONNX."""
    import onnxscript
    from onnxscript import opset18 as op

    ms = _ContribOps()
    u8 = onnxscript.ir.DataType.UINT8
    f32 = onnxscript.ir.DataType.FLOAT

    def zp_u8():
        return op.Constant(value=onnxscript.ir.tensor(ACT_ZERO_POINT, dtype=u8))

    def t_quantize_per_tensor_u8(x, scale):
        return op.QuantizeLinear(x, scale, zp_u8())

    def t_quantize_per_token_u8(x):
        amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        scale = op.Div(op.Max(amax, op.CastLike(op.Constant(value_float=PER_TOKEN_EPS), x)),
                       op.CastLike(op.Constant(value_float=127.0), x))
        r = op.Round(op.Mul(x, op.Reciprocal(scale)))
        r = op.Clip(r, op.CastLike(op.Constant(value_float=-128.0), x),
                    op.CastLike(op.Constant(value_float=127.0), x))
        q = op.Cast(op.Add(r, op.CastLike(op.Constant(value_float=128.0), x)), to=u8)
        return q, scale

    def t_int8_linear(a_q, a_scale, w_kn, w_scale, bias=None):
        if bias is None:
            return ms.MatMulIntegerToFloat(a_q, w_kn, a_scale, w_scale, zp_u8())
        return ms.MatMulIntegerToFloat(a_q, w_kn, a_scale, w_scale, zp_u8(), None, bias)

    def t_int8_linear_per_token(a_q, a_scale, w_kn, w_scale, bias=None):
        one = op.Constant(value=onnxscript.ir.tensor(1.0, dtype=f32))
        y = op.Mul(ms.MatMulIntegerToFloat(a_q, w_kn, one, w_scale, zp_u8()), a_scale)
        return y if bias is None else op.Add(y, bias)

    def t_matmul_nbits(x, b_packed, scales, zero_points=None, bias=None, k=0, n=0,
                       block_size=128, accuracy_level=0):
        return ms.MatMulNBits(x, b_packed, scales, zero_points, None, bias, K=k, N=n, bits=4,
                              block_size=block_size, accuracy_level=accuracy_level)

    def t_gather_int8_rows(table_q, scales, ids):
        rows = op.Cast(op.Gather(table_q, ids, axis=0), to=f32)
        s = op.Unsqueeze(op.Gather(scales, ids, axis=0), op.Constant(value_ints=[-1]))
        return op.Mul(rows, s)

    ops = torch.ops.fxcompress_ort
    return {
        ops.quantize_per_tensor_u8.default: t_quantize_per_tensor_u8,
        ops.quantize_per_token_u8.default: t_quantize_per_token_u8,
        ops.int8_linear.default: t_int8_linear,
        ops.int8_linear_per_token.default: t_int8_linear_per_token,
        ops.matmul_nbits.default: t_matmul_nbits,
        ops.gather_int8_rows.default: t_gather_int8_rows,
    }


def export_quantized_onnx(
    gm: fx.GraphModule,
    path: str | os.PathLike,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    accuracy_level: int | str = 0,
    strip_metadata: bool = False,
    **kwargs,
) -> Path:
    """Lower a Q/DQ graph to ORT integer kernels and export it to ONNX (atomically).

    Args:
        gm: the graph after ``insert_qdq`` (not modified).
        path: target ``.onnx`` file.
        example_inputs: as in :func:`backends.onnxruntime.export_onnx`.
        accuracy_level: ``MatMulNBits`` accuracy level (see :func:`lower_for_ort`).
        strip_metadata: drop the exporter's per-node debug metadata afterwards
            (:func:`strip_debug_metadata`).
        **kwargs: passed on to :func:`backends.onnxruntime.export_onnx`.

    Returns:
        The written path.

    Raises:
        ExportError: as :func:`backends.onnxruntime.export_onnx`.
    """
    from backends.onnxruntime import export_onnx

    lowered, _ = lower_for_ort(gm, accuracy_level=accuracy_level)
    table = dict(translation_table())
    table.update(kwargs.pop("custom_translation_table", None) or {})
    out = export_onnx(lowered, path, example_inputs=example_inputs,
                      custom_translation_table=table, **kwargs)
    if strip_metadata:
        strip_debug_metadata(out)
    return out


def strip_debug_metadata(path: str | os.PathLike) -> int:
    """Remove the exporter's per-node debug metadata (stack traces, fx names) from an ONNX file.

    The torch exporter stores a stack trace and module path on every node; on a small model
    that is a large share of the file (about 0.6 MB for a 2-layer model), which says nothing
    about the weights' storage. External data files are not touched; the graph file is
    replaced atomically.

    Returns:
        Bytes saved.
    """
    import onnx

    path = Path(path)
    before = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)

    def visit(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for a in node.attribute:
                if a.HasField("g"):
                    visit(a.g)
                for sub in a.graphs:
                    visit(sub)

    visit(model.graph)
    tmp = path.with_name(f".{path.name}.strip-{os.getpid()}")
    try:
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return before - path.stat().st_size


def integer_kernel_counts(op_types: Counter) -> dict[str, int]:
    """Split an op-type Counter (e.g. ``ORTModel.optimized_op_types()``) into integer matmul
    kernels, float matmuls and weight ``DequantizeLinear`` nodes."""
    return {
        "integer": sum(v for k, v in op_types.items() if k in INTEGER_KERNELS),
        "float_matmul": sum(v for k, v in op_types.items() if k in FLOAT_MATMULS),
        "dequantize": op_types.get("DequantizeLinear", 0),
    }


__all__ = [
    "INTEGER_KERNELS", "LoweringStats", "export_quantized_onnx", "gather_int8_rows",
    "int8_linear", "int8_linear_per_token", "integer_kernel_counts", "lower_for_ort",
    "matmul_nbits", "pack_nbits", "quantize_per_tensor_u8", "quantize_per_token_u8",
    "strip_debug_metadata", "translation_table", "unpack_nbits",
]
