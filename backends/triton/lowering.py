"""Lowering of Q/DQ graphs (the :mod:`compiler.qdq` forms) to the Triton kernels via custom ops.

Each quantized pattern of the GraphModule is replaced, on a copy, by one op of the ``fxcompress``
torch library; the op runs the Triton kernel on CUDA tensors (or on CPU tensors under
``TRITON_INTERPRET=1`` when lowered with ``use_kernels=True``) and the torch reference of
:mod:`backends.triton.reference` otherwise, so the lowered graph runs anywhere and, on a GPU, end
to end on the kernels.

===========================================================  ====================================
fx pattern (from InsertQDQ)                                  replaced by
===========================================================  ====================================
``rms_norm(x, [H], g, eps)`` read only by a per-token Q/DQ    ``fxcompress.rmsnorm_quant``
whose readers are all int8 linears (kernel-level fusion of    (one kernel: norm, abs-max, quantize)
norm -> quantize)
per-token Q/DQ of any other ``x``                             ``fxcompress.per_token_quant``
``linear(DQ_tok(...) | DQ_t(...), DQ_ch(W_q), b)``             ``fxcompress.w8a8_linear`` (int8 GEMM,
                                                             per-token x per-channel scale
                                                             epilogue, bias fused)
static per-tensor ``Q_t(x)``                                  ``fxcompress.quantize_per_tensor``
                                                             (torch; per-row scale = the constant)
``linear(x, DQ_group(W_q4), b)``                              ``fxcompress.w4a16_linear``
===========================================================  ====================================

Identities relied on (exact up to float rounding order):

- ``DQ_tok(Q_tok(x)) @ (W_q s_W)^T = ((q_x @ W_q^T)_int32 * s_x[:, None]) * s_W[None, :]``;
- quantizing ``rms_norm(x)`` per token equals the fused kernel's quantization of the norm it
  computes in fp32 (same formula; only the order of the mean-square summation differs, which may
  move a value across a rounding boundary by chance: one int8 step);
- int4 held in int8 ``q`` in [-8, 7] with zero point ``zp`` is uint4 ``q + 8`` with zero point
  ``zp + 8`` (symmetric: the kernel's implied zero point 8), packed two per byte along K.

Left as they are: weight-only int8 linears, embeddings (the dequantize op stays; it is correct,
just not a kernel), anything else float.

Numerics vs the Q/DQ graph: identical integer products; differences come from the epilogue's
float order and the per-token quantization computing ``x * (1/s)`` with the clamp at +-127
(PT2E clamps at -128; unreachable for per-token scales) -- see ``tests/backends/
test_triton_lowering.py`` for the stated tolerance.
"""

from __future__ import annotations

import copy
import logging
import operator
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from backends.qdq_patterns import (
    is_dequantized_weight,
    is_int4_group_weight,
    is_int8_channel_weight,
    match_activation,
)
from backends.triton.reference import (
    SUPPORTED_GROUP_SIZES,
    TritonLaunchError,
    pack_int4,
    per_token_quant_ref,
    rmsnorm_quant_ref,
    w4a16_gemm_ref,
    w8a8_gemm_ref,
)
from compiler import ir

log = logging.getLogger(__name__)

_LIB = "fxcompress"


def _kernels():
    from backends.triton import kernels

    return kernels


def _on_kernels(x: torch.Tensor, use_kernels: bool) -> bool:
    return x.is_cuda or use_kernels


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op(f"{_LIB}::per_token_quant", mutates_args=())
def per_token_quant(x: torch.Tensor, use_kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: ``(q int8 [..., K], scale fp32 [...])``."""
    x2 = x.reshape(-1, x.shape[-1])
    if _on_kernels(x, use_kernels):
        q, s = _kernels().per_token_quant(x2)
    else:
        q, s = per_token_quant_ref(x2)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@per_token_quant.register_fake
def _(x, use_kernels):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::rmsnorm_quant", mutates_args=())
def rmsnorm_quant(
    x: torch.Tensor, gain: torch.Tensor | None, eps: float, use_kernels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RMSNorm + per-token int8: ``(q int8 [..., K], scale fp32 [...])``."""
    x2 = x.reshape(-1, x.shape[-1])
    if _on_kernels(x, use_kernels):
        q, s = _kernels().rmsnorm_quant(x2, gain, eps)
    else:
        q, s = rmsnorm_quant_ref(x2, gain, eps)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@rmsnorm_quant.register_fake
def _(x, gain, eps, use_kernels):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Static symmetric int8 with one scale (PT2E ``quantize_per_tensor``, zero point 0), and the
    scale repeated per token so the W8A8 GEMM's per-row epilogue applies it."""
    q = torch.round(x * (1.0 / scale)).clamp(-128, 127).to(torch.int8)
    return q, torch.full(x.shape[:-1], scale, dtype=torch.float32, device=x.device)


@quantize_per_tensor.register_fake
def _(x, scale):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::w8a8_linear", mutates_args=())
def w8a8_linear(
    q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, use_kernels: bool,
) -> torch.Tensor:
    """``(q @ w_q^T)_int32 * a_scale[..., None] * w_scale (+ bias)`` in ``out_dtype``."""
    q2 = q.reshape(-1, q.shape[-1])
    s2 = a_scale.reshape(-1)
    if _on_kernels(q, use_kernels):
        y = _kernels().w8a8_gemm(q2, w_q, s2, w_scale, bias, out_dtype=out_dtype)
    else:
        y = w8a8_gemm_ref(q2, w_q, s2, w_scale, bias, out_dtype=out_dtype)
    return y.reshape(*q.shape[:-1], w_q.shape[0])


@w8a8_linear.register_fake
def _(q, a_scale, w_q, w_scale, bias, out_dtype, use_kernels):
    return q.new_empty((*q.shape[:-1], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    group_size: int, bias: torch.Tensor | None, use_kernels: bool,
) -> torch.Tensor:
    """``x @ dequant(W)^T (+ bias)`` from packed uint4 group-wise weights, in ``x.dtype``."""
    x2 = x.reshape(-1, x.shape[-1])
    if _on_kernels(x, use_kernels):
        y = _kernels().w4a16_gemm(x2, qweight, scales, zeros, group_size, bias)
    else:
        y = w4a16_gemm_ref(x2, qweight, scales, zeros, group_size, bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias, use_kernels):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


#: short names of the ops the lowering emits (as ``compiler.ir.op_name`` prints them)
OP_NAMES = tuple(f"{_LIB}.{n}" for n in (
    "per_token_quant", "rmsnorm_quant", "quantize_per_tensor", "w8a8_linear", "w4a16_linear"))


# ----------------------------------------------------------------------------- lowering


@dataclass
class TritonLoweringStats:
    """What :func:`lower_for_triton` rewrote."""

    w8a8_linears: int = 0
    w4a16_linears: int = 0
    fused_norm_quant: int = 0
    per_token_quantizers: int = 0
    static_quantizers: int = 0
    left_as_is: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _float_dtype(node: fx.Node) -> torch.dtype:
    v = node.meta.get("val")
    return v.dtype if isinstance(v, torch.Tensor) and v.is_floating_point() else torch.float32


def check_device(device: str | torch.device, use_kernels: bool) -> torch.device:
    """Validate the target; raise :class:`TritonLaunchError` with the fix when it cannot run."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TritonLaunchError(
                f"triton lowering: device={str(device)!r} was requested but CUDA is not available "
                "here (torch.cuda.is_available() is False); lower with device='cpu' to run the "
                "torch references, or device='cpu', use_kernels=True with TRITON_INTERPRET=1 to "
                "run the Triton kernels in the interpreter"
            )
    elif dev.type == "cpu":
        if use_kernels:
            from backends.triton import triton_available

            if not triton_available():
                raise TritonLaunchError(
                    "triton lowering: use_kernels=True needs the 'triton' package "
                    "(pip install 'fxcompress[triton]')")
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise TritonLaunchError(
                    "triton lowering: use_kernels=True on CPU runs the kernels in Triton's "
                    "interpreter; set TRITON_INTERPRET=1 before importing backends.triton.kernels")
    else:
        raise TritonLaunchError(f"triton lowering: unsupported device {str(device)!r} "
                                "(use 'cuda', or 'cpu')")
    return dev


def lower_for_triton(
    model: Any, *, device: str | torch.device = "cpu", use_kernels: bool = False,
    fuse_norms: bool = True,
) -> tuple[fx.GraphModule, TritonLoweringStats]:
    """A copy of a Q/DQ graph with its quantized patterns replaced by ``fxcompress`` ops.

    Args:
        model: a GraphModule after ``insert_qdq`` or a ``CompiledModel`` (its ``graph_module``);
            not modified.
        device: ``"cuda"`` (kernels) or ``"cpu"``; parameters and device constants move there.
        use_kernels: on CPU, run the Triton kernels through the interpreter instead of the
            torch references (needs ``TRITON_INTERPRET=1``; slow, for tests).
        fuse_norms: fuse ``rms_norm -> per-token quantize`` into one kernel where the norm's
            only readers are int8 linears.

    Returns:
        ``(lowered GraphModule, stats)``.

    Raises:
        TritonLaunchError: CUDA requested and absent; kernels on CPU without the interpreter.
    """
    dev = check_device(device, use_kernels)
    gm = model.graph_module if hasattr(model, "graph_module") else model
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"lower: expected a GraphModule or CompiledModel, got {type(model).__name__}")
    out = copy.deepcopy(gm)
    g = out.graph
    stats = TritonLoweringStats()

    # decide
    int8_plans: list[tuple[fx.Node, Any, fx.Node, Any]] = []
    int4_plans: list[tuple[fx.Node, fx.Node, Any]] = []
    for n in g.nodes:
        if not ir.is_op(n, ir.LINEAR):
            continue
        x, w, b = ir.linear_parts(n)
        if is_int8_channel_weight(w):
            act = match_activation(x)
            if act is not None:
                int8_plans.append((n, act, w, b))
                continue
        if is_int4_group_weight(w) and _int4_ok(out, w):
            int4_plans.append((n, w, b))
            continue
        if is_dequantized_weight(w):
            stats.left_as_is += 1
    planned = {n for n, *_ in int8_plans}
    acts: dict[fx.Node, Any] = {}  # quantize node -> activation match
    for _, act, _, _ in int8_plans:
        acts.setdefault(act.q, act)
    fused: set[fx.Node] = set()
    if fuse_norms:
        for q, act in acts.items():
            if act.mode == "per_token" and _fusable_norm(act, planned):
                fused.add(q)

    # mutate
    quantized: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for q, act in acts.items():
        x = act.x
        anchor = x
        if q in fused:
            norm = x
            src, _, gain, eps = norm.args[:4]
            with g.inserting_after(norm):
                pair = g.call_function(rmsnorm_quant._opoverload,
                                       (src, gain, float(eps), use_kernels))
            stats.fused_norm_quant += 1
        elif act.mode == "per_token":
            with g.inserting_after(x):
                pair = g.call_function(per_token_quant._opoverload, (x, use_kernels))
            stats.per_token_quantizers += 1
        else:
            with g.inserting_after(x):
                pair = g.call_function(quantize_per_tensor._opoverload, (x, act.scale))
            stats.static_quantizers += 1
        with g.inserting_after(pair):
            a_q = g.call_function(operator.getitem, (pair, 0))
        with g.inserting_after(a_q):
            a_s = g.call_function(operator.getitem, (pair, 1))
        for node in (pair, a_q, a_s):
            ir.copy_meta(anchor, node, created_by="triton_lowering")
            node.meta.pop("val", None)
            node.meta.pop("tensor_meta", None)
        quantized[q] = (a_q, a_s)
    for n, act, w, b in int8_plans:
        a_q, a_s = quantized[act.q]
        with g.inserting_before(n):
            new = g.call_function(w8a8_linear._opoverload,
                                  (a_q, a_s, w.args[0], w.args[1], b, _float_dtype(act.x),
                                   use_kernels))
        _replace(n, new)
        stats.w8a8_linears += 1
    for n, w, b in int4_plans:
        packed, scales, zeros, gs = _int4_params(out, w)
        base = str(w.args[0].target)
        pn = ir.add_param(out, f"{base}_packed", packed, before=n)
        sn = ir.add_param(out, f"{base}_kscale", scales, before=n)
        zn = ir.add_param(out, f"{base}_kzero", zeros, before=n) if zeros is not None else None
        with g.inserting_before(n):
            new = g.call_function(w4a16_linear._opoverload,
                                  (n.args[0], pn, sn, zn, gs, b, use_kernels))
        _replace(n, new)
        stats.w4a16_linears += 1
    g.eliminate_dead_code()
    ir.remove_unused_attrs(out)
    if dev.type != "cpu":
        _move_to(out, dev)
    g.lint()
    out.recompile()
    out.meta["fxcompress_triton_lowering"] = stats.as_dict()
    log.info("triton lowering (%s%s): %s", dev, ", kernels" if use_kernels else "", stats)
    return out, stats


def lower(model: Any, *, device: str | torch.device = "cpu", use_kernels: bool = False,
          fuse_norms: bool = True) -> fx.GraphModule:
    """:func:`lower_for_triton` returning only the lowered GraphModule (stats in its
    ``meta['fxcompress_triton_lowering']``). This is what ``CompiledModel.lower("triton")``
    calls."""
    return lower_for_triton(model, device=device, use_kernels=use_kernels,
                            fuse_norms=fuse_norms)[0]


def _replace(old: fx.Node, new: fx.Node) -> None:
    ir.copy_meta(old, new, created_by="triton_lowering")
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def _fusable_norm(act, planned: set[fx.Node]) -> bool:
    """The per-token Q/DQ reads an ``rms_norm`` whose only readers are that Q/DQ, and every
    reader of the dequantized value is a planned int8 linear (so norm and Q/DQ can go)."""
    norm = act.x
    if not ir.is_op(norm, ir.RMS_NORM) or len(norm.args) < 4 or norm.args[3] is None:
        return False
    gain = norm.args[2]
    if gain is not None and not (isinstance(gain, fx.Node) and gain.op == "get_attr"):
        return False
    shape = norm.args[1]
    if len(shape) != 1:
        return False
    q = act.q
    qp = q.args[1].args[0]  # choose_qparams_per_token (checked by match_activation)
    if set(norm.users) - {q, qp}:
        return False
    for dq in q.users:
        if any(u not in planned for u in dq.users):
            return False
    return True


def _int4_ok(gm: fx.GraphModule, w: fx.Node) -> bool:
    q = w.args[0]
    gs = int(w.args[6])
    if not (isinstance(q, fx.Node) and q.op == "get_attr") or gs not in SUPPORTED_GROUP_SIZES:
        return False
    if (w.args[3], w.args[4], w.args[5]) != (-8, 7, torch.int8):
        return False
    t = ir.get_param(gm, q)
    return t.dim() == 2 and t.shape[1] % gs == 0 and t.shape[1] % 2 == 0


def _int4_params(gm: fx.GraphModule, w: fx.Node):
    """PT2E int4-in-int8 (q in [-8, 7], zp in [-8, 7] or None) -> packed uint4 kernel inputs."""
    q = ir.get_param(gm, w.args[0])
    scale = ir.get_param(gm, w.args[1])
    zp = ir.get_param(gm, w.args[2]) if w.args[2] is not None else None
    packed = pack_int4((q.to(torch.int16) + 8).to(torch.uint8))  # W: [N, K/2]
    zeros = (zp.to(torch.int16) + 8).to(torch.uint8).contiguous() if zp is not None else None
    return packed.contiguous(), scale.to(torch.float32).contiguous(), zeros, int(w.args[6])


def _move_to(gm: fx.GraphModule, dev: torch.device) -> None:
    """Move parameters to ``dev`` and retarget the device constants torch.export baked into
    factory and copy calls (``arange(..., device=cpu)``, ``to.device(x, cpu, ...)``)."""
    gm.to(dev)

    def retarget(a):
        return dev if isinstance(a, torch.device) else a

    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.args = fx.node.map_aggregate(n.args, retarget)
            n.kwargs = fx.node.map_aggregate(n.kwargs, retarget)


__all__ = ["OP_NAMES", "TritonLoweringStats", "check_device", "lower", "lower_for_triton",
           "per_token_quant", "quantize_per_tensor", "rmsnorm_quant", "w4a16_linear",
           "w8a8_linear"]
