"""Lowering of norms and cached attention to ONNX Runtime's fused CPU kernels.

Every export keeps the graph's generic ops otherwise: RMSNorm becomes Pow/ReduceMean/Sqrt/
Reciprocal/Mul, attention with the KV cache Concat/MatMul/Softmax/MatMul plus the mask. ORT
ships fused kernels for each (the ones its GenAI model builder emits). As in
``backends.ort_quant``, each pattern below is replaced on a copy of the graph by one op of the
``fxcompress_ort`` torch library, whose torch implementation is the reference and whose ONNX
translation is the fused kernel:

==========================================  ==================================================
fx pattern                                   ONNX emitted (what ORT executes)
==========================================  ==================================================
``rms_norm(add(a, b), w)`` (the residual    ``com.microsoft.SkipSimplifiedLayerNormalization``
stream; the sum may be read later or not)    (outputs the norm and ``a + b``)
``rms_norm(x, w)`` (any other)               ``SimplifiedLayerNormalization``
``layer_norm(add(a, b), w, b)`` (residual)   ``com.microsoft.SkipLayerNormalization``
``sdpa(q, cat(past_k, k), cat(past_v, v))``  ``com.microsoft.GroupQueryAttention`` (GQA and
from ``compiler.kv_cache`` (+ repeat_kv)     MHA; cache concatenated inside the kernel)
... with ``q = a*cos + rotate_half(a)*sin``  the same with ``do_rotary=1``: the kernel rotates the
(and ``k`` alike, same cos/sin)              pre-rotary ``a`` with cos/sin tables evaluated from
                                             the graph's own position subgraph
... with q, k, v the three last-dim slices   the same with the packed ``[B, T, q|k|v]`` tensor as
of one projection (``fuse_linears``)         the only input (no slices)
==========================================  ==================================================

Layout ops around the kernel are not emitted where the graph already has the kernel's
``[B, T, H*D]`` layout: ``transpose(view(proj, [B, T, H, D]), 1, 2)`` feeds ``proj`` itself, and
the ``reshape(transpose(out, 1, 2), [B, T, H*D])`` that reads the attention output reads the
kernel's output directly.

Identities relied on: ``SkipSimplifiedLayerNormalization(a, b, w) = (rms_norm(a + b) * w,
a + b)``; ``GroupQueryAttention`` computes causal attention of the new tokens over
``cat(past, new)`` with the query at position ``past + i`` and repeats each kv head for its
group of query heads, exactly what the KV-cache graph's SDPA computes with its mask, for rows
without padding. Where each rule does not fire, the report says why:

- norms: the normalized width is not the last dim alone, the gain is missing or not a
  parameter, the two summands differ in shape (broadcast), or a dtype other than float32;
- attention: the cache is zero-padded to a uniform head count (pruned layers), key and value
  head sizes differ, the head size is not a multiple of 8 (ORT's CPU kernel), or the SDPA's
  inputs are not the KV-cache rewrite's (e.g. a graph without a cache).

Contract difference (stated, not hidden): ``GroupQueryAttention`` takes the valid length of each
row from ``attention_mask`` (``seqlens_k = sum(mask) - 1``) and assumes the padding of a batched
prompt is on the *right*, as ORT GenAI's builder models do. The unfused export masks
left padding exactly; the fused one is exact for batches without padding (batch 1, the
generation benchmarks, ORT GenAI's generator with one prompt). ``fused=False`` in
``export_genai`` keeps the generic ops.

Rotary: the cos/sin tables (``[context, D/2]``) are the graph's own cos/sin subgraph evaluated
on a prompt of ``context`` tokens, so any frequency scaling the model applies (``rope_scaling``,
attention scaling) is in them; they must repeat their two halves (the half-split layout).
Partial rotary (NeoX-style ``rotary_pct``), interleaved layouts and per-layer different tables
keep the rotary as generic ops before the fused attention, with a note. SiLU/GELU-gated MLPs
are left to ORT's own fusions, which fire on them (``QuickGelu``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from compiler import ir

log = logging.getLogger(__name__)
aten = torch.ops.aten
_LIB = "fxcompress_ort"

# ----------------------------------------------------------------------------- torch ops


@torch.library.custom_op(f"{_LIB}::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (``SimplifiedLayerNorm``)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + skip) * weight, x + skip)``."""
    s = x + skip
    return torch.nn.functional.rms_norm(s, (s.shape[-1],), weight, eps), s


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::skip_layer_norm", mutates_args=())
def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + skip) * weight + bias, x + skip)``."""
    s = x + skip
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


@skip_layer_norm.register_fake
def _(x, skip, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::group_query_attention", mutates_args=())
def group_query_attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, past_k: torch.Tensor,
    past_v: torch.Tensor, seqlens_k: torch.Tensor, total_len: torch.Tensor,
    cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None, num_heads: int,
    kv_num_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORT's ``GroupQueryAttention`` (no shared buffer) in torch.

    ``q: [B, S, Hq*D]``, ``k, v: [B, S, Hkv*D]`` (or ``k = v = None`` and ``q`` the packed
    ``[B, S, (Hq + 2 Hkv)*D]`` q|k|v), ``past_*: [B, Hkv, P, D]``; row ``b`` holds
    ``seqlens_k[b] + 1`` valid tokens, its query ``i`` sits at ``seqlens_k[b] + 1 - S + i``.
    With ``cos_cache``/``sin_cache`` (``[max_positions, D/2]``) the new queries and keys are
    first rotated at those positions (``do_rotary``, half-split layout:
    ``x * cos + rotate_half(x) * sin``). Returns ``(out [B, S, Hq*D], present_k, present_v
    [B, Hkv, P+S, D])``.
    """
    b, s, _ = q.shape
    d = past_k.shape[-1]
    if k is None or v is None:
        q, k, v = q.split([num_heads * d, kv_num_heads * d, kv_num_heads * d], dim=-1)
    qpos = (seqlens_k.long() + 1 - s)[:, None] + torch.arange(s)[None, :]  # [B, S]
    qh = q.reshape(b, s, num_heads, d).transpose(1, 2)
    kh = k.reshape(b, s, kv_num_heads, d).transpose(1, 2)
    if cos_cache is not None and sin_cache is not None:
        cos = torch.cat([cos_cache[qpos], cos_cache[qpos]], dim=-1)[:, None]  # [B, 1, S, D]
        sin = torch.cat([sin_cache[qpos], sin_cache[qpos]], dim=-1)[:, None]
        qh, kh = _rotate(qh, cos, sin), _rotate(kh, cos, sin)
    pk = torch.cat([past_k, kh], dim=2)
    pv = torch.cat([past_v, v.reshape(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    allowed = torch.arange(pk.shape[2])[None, None, :] <= qpos[:, :, None]  # [B, S, L]
    bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed,
                                                                 torch.finfo(q.dtype).min)
    rep = num_heads // kv_num_heads
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, pk.repeat_interleave(rep, dim=1), pv.repeat_interleave(rep, dim=1),
        attn_mask=bias[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), pk, pv


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale):
    b, s, _ = q.shape
    shape = (b, past_k.shape[1], past_k.shape[2] + s, past_k.shape[3])
    out = q.new_empty(b, s, num_heads * past_k.shape[3])
    return out, past_k.new_empty(shape), past_v.new_empty(shape)


# ----------------------------------------------------------------------------- ONNX


def _schemas() -> dict[str, object]:
    """OpSchemas of the ORT ops we emit (not in ``onnx.defs``; the exporter needs them)."""
    from onnx.defs import OpSchema

    fp, opt, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption, OpSchema.Attribute
    f32 = [("T", ["tensor(float)"], "")]
    floats, ints = OpSchema.AttrType.FLOAT, OpSchema.AttrType.INT
    o = opt.Optional
    sln = OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[fp("X", "T"), fp("scale", "T")],
        outputs=[fp("Y", "T")],
        type_constraints=f32,
        attributes=[attr("axis", ints, ""), attr("epsilon", floats, ""),
                    attr("stash_type", ints, "")],
    )
    skip_sln = OpSchema(
        "SkipSimplifiedLayerNormalization", "com.microsoft", 1,
        inputs=[fp("input", "T"), fp("skip", "T"), fp("gamma", "T"),
                fp("bias", "T", param_option=o)],
        outputs=[fp("output", "T"), fp("mean", "T", param_option=o),
                 fp("inv_std_var", "T", param_option=o),
                 fp("input_skip_bias_sum", "T", param_option=o)],
        type_constraints=f32, attributes=[attr("epsilon", floats, "")],
    )
    skip_ln = OpSchema(
        "SkipLayerNormalization", "com.microsoft", 1,
        inputs=[fp("input", "T"), fp("skip", "T"), fp("gamma", "T"),
                fp("beta", "T", param_option=o), fp("bias", "T", param_option=o)],
        outputs=[fp("output", "T"), fp("mean", "T", param_option=o),
                 fp("inv_std_var", "T", param_option=o),
                 fp("input_skip_bias_sum", "T", param_option=o)],
        type_constraints=f32, attributes=[attr("epsilon", floats, "")],
    )
    gqa = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[fp("query", "T"), fp("key", "T", param_option=o), fp("value", "T", param_option=o),
                fp("past_key", "T", param_option=o), fp("past_value", "T", param_option=o),
                fp("seqlens_k", "M"), fp("total_sequence_length", "M"),
                fp("cos_cache", "T", param_option=o), fp("sin_cache", "T", param_option=o)],
        outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
        type_constraints=[*f32, ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", ints, ""), attr("kv_num_heads", ints, ""),
                    attr("scale", floats, ""), attr("do_rotary", ints, ""),
                    attr("rotary_interleaved", ints, "")],
    )
    return {s.name: s for s in (sln, skip_sln, skip_ln, gqa)}


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` entries: fused ``fxcompress_ort`` op -> ORT kernel."""
    import onnxscript

    schemas = _schemas()
    ms = onnxscript.values.Opset("com.microsoft", 1)
    ai = onnxscript.values.Opset("", 1)

    def op(opset, name):
        return onnxscript.values.Op(opset, name, schemas[name])

    sln, skip_sln = op(ai, "SimplifiedLayerNormalization"), op(ms, "SkipSimplifiedLayerNormalization")
    skip_ln, gqa = op(ms, "SkipLayerNormalization"), op(ms, "GroupQueryAttention")

    def t_rms_norm(x, weight, eps):
        return sln(x, weight, axis=-1, epsilon=eps, stash_type=1)

    def t_skip_rms_norm(x, skip, weight, eps):
        y, _, _, s = skip_sln(x, skip, weight, None, epsilon=eps, _num_outputs=4)
        return y, s

    def t_skip_layer_norm(x, skip, weight, bias=None, eps=1e-5):
        y, _, _, s = skip_ln(x, skip, weight, bias, None, epsilon=eps, _num_outputs=4)
        return y, s

    def t_gqa(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache=None, sin_cache=None,
              num_heads=1, kv_num_heads=1, scale=1.0):
        rotary = cos_cache is not None
        return gqa(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                   num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
                   do_rotary=int(rotary), rotary_interleaved=0, _num_outputs=3)

    ops = torch.ops.fxcompress_ort
    return {
        ops.rms_norm.default: t_rms_norm,
        ops.skip_rms_norm.default: t_skip_rms_norm,
        ops.skip_layer_norm.default: t_skip_layer_norm,
        ops.group_query_attention.default: t_gqa,
    }


# ----------------------------------------------------------------------------- lowering


@dataclass
class FusionStats:
    """What :func:`lower_fused` rewrote, and why the rest was not."""

    skip_rms_norms: int = 0
    rms_norms: int = 0
    skip_layer_norms: int = 0
    attentions: int = 0
    rotaries: int = 0
    #: attentions reading one packed q|k|v projection (``fuse_linears``) without slicing it
    packed_qkv: int = 0
    #: every past input is read by a fused attention op and nothing else (no position or mask
    #: arithmetic on the cache length): the runtime may share past and present buffers
    cache_only_in_attention: bool = False
    notes: list[str] = field(default_factory=list)


def _is_f32_param(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and \
        ir.get_param(gm, node).dtype == torch.float32


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and \
        [str(s) for s in va.shape] == [str(s) for s in vb.shape] and va.dtype == vb.dtype \
        == torch.float32


def _norm_decision(gm: fx.GraphModule, n: fx.Node) -> tuple[str | None, str]:
    """(kind of fused norm or None, reason when None)."""
    x, shape = n.args[0], n.args[1]
    weight = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return None, "input is not float32"
    if len(shape) != 1 or str(shape[0]) != str(val.shape[-1]):
        return None, "normalized shape is not the last dim alone"
    if not _is_f32_param(gm, weight):
        return None, "gain is not a float32 parameter"
    if ir.is_op(n, ir.LAYER_NORM):
        bias = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        if bias is not None and not _is_f32_param(gm, bias):
            return None, "bias is not a float32 parameter"
    is_skip = ir.is_op(x, aten.add.Tensor) and len(x.args) == 2 \
        and all(isinstance(a, fx.Node) for a in x.args) and _same_shape(*x.args) \
        and _same_shape(x, x.args[0])
    if ir.is_op(n, ir.RMS_NORM):
        return ("skip_rms_norm" if is_skip else "rms_norm"), ""
    if is_skip:
        return "skip_layer_norm", ""
    return None, "LayerNorm without a residual add before it stays ONNX LayerNormalization"


def _eps(n: fx.Node) -> float:
    """The norm's epsilon (``rms_norm`` without one uses float32's machine epsilon)."""
    index, default = (3, None) if ir.is_op(n, ir.RMS_NORM) else (4, 1e-5)
    eps = n.args[index] if len(n.args) > index else n.kwargs.get("eps", default)
    return float(torch.finfo(torch.float32).eps if eps is None else eps)


def _fuse_norms(gm: fx.GraphModule, stats: FusionStats) -> None:
    g = gm.graph
    ops = torch.ops.fxcompress_ort
    plans = []
    for n in g.nodes:
        if ir.is_op(n, ir.RMS_NORM, ir.LAYER_NORM):
            kind, why = _norm_decision(gm, n)
            if kind is None:
                stats.notes.append(f"{ir.site(n)}: {ir.op_name(n)} kept ({why})")
            else:
                plans.append((kind, n, n.args[0]))
    done_adds: set[fx.Node] = set()
    for kind, n, summed in plans:
        eps = _eps(n)
        weight = n.args[2]
        if kind.startswith("skip") and summed in done_adds:
            # two norms read one residual sum (parallel attention + MLP): the first took it
            kind = "rms_norm" if kind == "skip_rms_norm" else None
        x = n.args[0]
        if kind is None:
            stats.notes.append(f"{ir.site(n)}: layer_norm kept (its residual sum is fused "
                               "into another norm)")
            continue
        with g.inserting_before(n):
            if kind == "rms_norm":
                new = g.call_function(ops.rms_norm.default, (x, weight, eps))
                stats.rms_norms += 1
            else:
                a, b = x.args
                if kind == "skip_rms_norm":
                    fused = g.call_function(ops.skip_rms_norm.default, (a, b, weight, eps))
                    stats.skip_rms_norms += 1
                else:
                    bias = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
                    fused = g.call_function(ops.skip_layer_norm.default,
                                            (a, b, weight, bias, eps))
                    stats.skip_layer_norms += 1
                new = g.call_function(operator.getitem, (fused, 0))
                total = g.call_function(operator.getitem, (fused, 1))
                ir.copy_meta(x, total, created_by="ort_fused")
                x.replace_all_uses_with(total, delete_user_cb=lambda u, norm=n: u is not norm)
                done_adds.add(x)
        ir.copy_meta(n, new, created_by="ort_fused")
        n.replace_all_uses_with(new)
        g.erase_node(n)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _dims(n) -> list[str] | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else None


def _bsh(g: fx.Graph, x: fx.Node, width: int) -> fx.Node:
    """``[B, H, T, D] -> [B, T, H*D]`` (the layout ORT's attention kernels take).

    When ``x`` is itself ``transpose(view(y, [B, T, H, D]), 1, 2)`` of a ``[B, T, H*D]`` tensor
    ``y`` (a projection's output), ``y`` is that layout already and is returned: no
    Transpose/Reshape pair is emitted for the kernel to undo.
    """
    if ir.is_op(x, aten.transpose.int) and tuple(x.args[1:]) in ((1, 2), (2, 1)):
        view = x.args[0]
        if ir.is_op(view, *_VIEWS):
            y, vd, yd = view.args[0], _dims(view), _dims(view.args[0])
            if vd is not None and yd is not None and len(vd) == 4 and len(yd) == 3 \
                    and vd[:2] == yd[:2] and yd[2] == str(width):
                return y
    t = g.call_function(aten.transpose.int, (x, 1, 2))
    return g.call_function(aten.reshape.default, (t, [
        g.call_function(aten.sym_size.int, (x, 0)), g.call_function(aten.sym_size.int, (x, 2)),
        width]))


def _packed_source(q: fx.Node, k: fx.Node, v: fx.Node, widths: tuple[int, int, int]):
    """The ``[B, T, q|k|v]`` tensor when q, k, v are its three consecutive last-dim slices.

    That is the form ``fuse_linears`` leaves (one projection, sliced); ``GroupQueryAttention``
    then reads it whole as its packed query and needs no slices.
    """
    parts = (q, k, v)
    if not all(ir.is_op(n, aten.slice.Tensor) for n in parts):
        return None
    src = q.args[0]
    sd = _dims(src)
    if sd is None or len(sd) != 3 or any(n.args[0] is not src for n in parts):
        return None
    start = 0
    for n, w in zip(parts, widths):
        dim = n.args[1] if len(n.args) > 1 else 0
        lo = n.args[2] if len(n.args) > 2 else 0
        hi = n.args[3] if len(n.args) > 3 else None
        step = n.args[4] if len(n.args) > 4 else 1
        if dim not in (-1, 2) or lo != start or step != 1:
            return None
        start += w
        if hi is not None and not (hi == start or (hi >= start and start == sum(widths))):
            return None
    return src if sd[2] == str(sum(widths)) else None


def _attention_output_users(sdpa: fx.Node, width: int) -> list[fx.Node]:
    """The SDPA's ``reshape(transpose(out, 1, 2), [B, T, H*D])`` readers (o_proj's input).

    The fused kernel writes that ``[B, T, H*D]`` layout directly, so these readers can take its
    output as is.
    """
    found, frontier = [], list(sdpa.users)
    while frontier:
        t = frontier.pop()
        if ir.is_op(t, *_VIEWS) and _dims(t) is not None and _dims(t) == _dims(t.args[0]):
            frontier.extend(t.users)  # a reshape to the same shape (e.g. repeat_kv's undo)
            continue
        if not (ir.is_op(t, aten.transpose.int) and tuple(t.args[1:]) in ((1, 2), (2, 1))):
            continue
        for r in t.users:
            rd = _dims(r)
            if ir.is_op(r, *_VIEWS) and rd is not None and len(rd) == 3 and rd[2] == str(width):
                found.append(r)
    return found


def match_rotary(x: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(pre-rotary tensor, cos, sin)`` if ``x = a * cos + cat(-a[..., h:], a[..., :h]) * sin``.

    The half-split ("rotate_half") layout of Llama, Qwen2, Mistral, Gemma, Phi-3...; the
    multiplications may take their operands in either order.
    """
    if not ir.is_op(x, aten.add.Tensor) or len(x.args) != 2:
        return None
    for plain, rotated in (x.args, x.args[::-1]):
        if not (isinstance(plain, fx.Node) and isinstance(rotated, fx.Node)
                and ir.is_op(plain, aten.mul.Tensor) and ir.is_op(rotated, aten.mul.Tensor)):
            continue
        for a, cos in (plain.args, plain.args[::-1]):
            for cat, sin in (rotated.args, rotated.args[::-1]):
                if isinstance(a, fx.Node) and _is_rotate_half(cat, a):
                    return a, cos, sin
    return None


def _is_rotate_half(cat, a: fx.Node) -> bool:
    """``cat == cat([-a[..., h:], a[..., :h]], -1)`` with ``h`` half of ``a``'s last dim."""
    if not (isinstance(cat, fx.Node) and ir.is_op(cat, aten.cat.default)):
        return False
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    val = a.meta.get("val")
    if len(parts) != 2 or not isinstance(val, torch.Tensor) or dim not in (-1, val.dim() - 1):
        return False
    neg, first = parts
    if not ir.is_op(neg, aten.neg.default):
        return False
    second = neg.args[0]
    h = val.shape[-1] // 2

    def is_slice(n, start, end):
        return ir.is_op(n, aten.slice.Tensor) and n.args[0] is a and \
            n.args[1] in (-1, val.dim() - 1) and n.args[2] == start and \
            (n.args[3] if len(n.args) > 3 else _MAXINT) in ((end,) if end != _MAXINT else
                                                             (_MAXINT, val.shape[-1]))

    return is_slice(first, 0, h) and is_slice(second, h, _MAXINT)


_MAXINT = 9223372036854775807


def rotary_tables_reason(rq, rk, d: int) -> str | None:
    """Why the query/key rotary cannot move into the attention kernel (None: it can)."""
    if rq is None and rk is None:
        return "no rotary"
    if rq is None or rk is None:
        return "only one of query and key is rotated"
    if rq[1] is not rk[1] or rq[2] is not rk[2]:
        return "query and key use different cos/sin tensors"
    if d % 16:
        return f"head size {d} is not a multiple of 16 (ORT's rotary inside the kernel)"
    return None


def _rotary_caches(gm: fx.GraphModule, cos: fx.Node, sin: fx.Node, n: int,
                   before: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Parameters ``[n, D/2]`` holding cos/sin at positions ``0..n-1``, or None.

    ``cos``/``sin`` are evaluated by running their ancestors on a prompt of ``n`` tokens
    (all ones ``attention_mask``, empty cache); they must be ``[.., n, D]`` with every
    leading dim 1 and equal halves (the half-split layout repeats the frequencies).
    """
    tables = []
    for node in (cos, sin):
        v = _evaluate_prompt(gm, node, n)
        if v is None or v.shape[-2] != n or any(s != 1 for s in v.shape[:-2]):
            return None
        v = v.reshape(n, v.shape[-1])
        h = v.shape[-1] // 2
        if not torch.equal(v[:, :h], v[:, h:]):
            return None
        tables.append(v[:, :h].contiguous())
    return tuple(ir.add_param(gm, f"ort_fused.{name}_cache", t, before=before.next)
                 for name, t in zip(("cos", "sin"), tables))


def _evaluate_prompt(gm: fx.GraphModule, node: fx.Node, n: int) -> torch.Tensor | None:
    """Value of ``node`` for an unpadded prompt of ``n`` tokens and an empty cache."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        stack.extend(x.all_input_nodes)
    order = [x for x in gm.graph.nodes if x in seen]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = []
    for x in order:
        if x.op == "placeholder":
            env[x] = g.placeholder(x.name)
            val = x.meta.get("val")
            if x.name == "attention_mask":
                inputs.append(torch.ones(1, n, dtype=torch.long))
            elif x.name == "input_ids" or (isinstance(val, torch.Tensor) and val.dim() == 2):
                inputs.append(torch.zeros(1, n, dtype=torch.long))
            else:  # a past cache: empty
                inputs.append(torch.zeros(1, 1, 0, 1))
        else:
            env[x] = g.node_copy(x, lambda a: env[a])
    g.output(env[node])
    try:
        with torch.no_grad():
            out = fx.GraphModule(gm, g)(*inputs)
    except Exception:  # a subgraph that needs real data is not a position table
        return None
    return out if isinstance(out, torch.Tensor) else None


def _fuse_attention(gm: fx.GraphModule, layers, stats: FusionStats,
                    max_positions: int) -> None:
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    mask_node = next((n for n in g.nodes if n.op == "placeholder" and
                      n.name == "attention_mask"), None)
    ops = torch.ops.fxcompress_ort
    plans = []
    for layer in layers:
        names = layer.nodes
        nodes = {k: by_name.get(v) for k, v in names.items()}
        why = None
        if layer.used_heads and layer.used_heads != layer.kv_heads:
            why = "cache zero-padded to a uniform head count"
        elif layer.head_dim != layer.value_head_dim:
            why = "key and value head sizes differ"
        elif layer.head_dim % 8:
            why = f"head size {layer.head_dim} is not a multiple of 8"
        elif mask_node is None or any(v is None for v in nodes.values()):
            why = "not a KV-cache rewrite's attention"
        if why is None:
            q = nodes["sdpa"].args[0]
            qv = q.meta.get("val")
            if not (isinstance(qv, torch.Tensor) and qv.dim() == 4 and qv.dtype == torch.float32
                    and isinstance(qv.shape[1], int)):
                why = "query is not a float32 [B, heads, T, D] tensor"
            elif qv.shape[1] % layer.kv_heads:
                why = "query heads are not a multiple of the kv heads"
        if why:
            stats.notes.append(f"{layer.site}: attention kept as generic ops ({why})")
            continue
        plans.append((layer, nodes))
    if not plans:
        return
    last_input = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_before(last_input.next):
        total = g.call_function(aten.sym_size.int, (mask_node, 1))
        seqlens = g.call_function(aten.sub.Tensor, (
            g.call_function(aten.sum.dim_IntList, (mask_node, [1])), 1))
        seqlens = g.call_function(aten._to_copy.default, (seqlens,), {"dtype": torch.int32})
        total_t = g.call_function(aten.scalar_tensor.default, (total,), {"dtype": torch.int32})
    caches: dict[tuple[fx.Node, fx.Node], tuple[fx.Node, fx.Node] | None] = {}
    for layer, nodes in plans:
        sdpa = nodes["sdpa"]
        q = sdpa.args[0]
        heads = int(q.meta["val"].shape[1])
        d = layer.head_dim
        scale = sdpa.kwargs.get("scale")
        if scale is None:
            scale = d ** -0.5
        q_in, k_in, cos_sin = q, nodes["key"], (None, None)
        rq, rk = match_rotary(q), match_rotary(nodes["key"])
        why = rotary_tables_reason(rq, rk, d)
        if why is None:
            key = (rq[1], rq[2])
            if key not in caches:
                caches[key] = _rotary_caches(gm, rq[1], rq[2], max_positions, before=last_input)
            if caches[key] is None:
                why = "cos/sin are not functions of the position alone at this size"
            else:
                q_in, k_in, cos_sin = rq[0], rk[0], caches[key]
        if why is not None and why != "no rotary":
            stats.notes.append(f"{layer.site}: rotary kept as generic ops ({why})")
        widths = (heads * d, layer.kv_heads * d, layer.kv_heads * d)
        with g.inserting_before(sdpa):
            qkv = [_bsh(g, x, w) for x, w in zip((q_in, k_in, nodes["value"]), widths)]
            packed = _packed_source(*qkv, widths)
            if packed is not None:
                qkv = [packed, None, None]
                stats.packed_qkv += 1
            fused = g.call_function(ops.group_query_attention.default, (
                *qkv, nodes["past_key"], nodes["past_value"],
                seqlens, total_t, *cos_sin, heads, layer.kv_heads, float(scale)))
            flat = g.call_function(operator.getitem, (fused, 0))
            out = g.call_function(aten.reshape.default, (flat, [  # sizes of q_in: q may be dead
                g.call_function(aten.sym_size.int, (q_in, 0)),
                g.call_function(aten.sym_size.int, (q_in, 2)), heads, d]))
            out = g.call_function(aten.transpose.int, (out, 1, 2))
            present_k = g.call_function(operator.getitem, (fused, 1))
            present_v = g.call_function(operator.getitem, (fused, 2))
        stats.rotaries += cos_sin[0] is not None
        for reader in _attention_output_users(sdpa, heads * d):
            ir.copy_meta(reader, flat, created_by="ort_fused")
            reader.replace_all_uses_with(flat)
        ir.copy_meta(sdpa, out, created_by="ort_fused")
        sdpa.replace_all_uses_with(out)
        g.erase_node(sdpa)  # dead code elimination keeps it (tagged nondeterministic: dropout)
        for key, new in (("present_key", present_k), ("present_value", present_v)):
            nodes[key].replace_all_uses_with(new, delete_user_cb=lambda u: u.op == "output")
        stats.attentions += 1


def lower_fused(kv, *, norms: bool = True, attention: bool = True,
                max_positions: int = 4096) -> tuple[fx.GraphModule, FusionStats]:
    """A copy of the KV-cache graph with norms and attention replaced by fused ORT ops.

    Args:
        kv: a :class:`compiler.kv_cache.KVCacheGraph` (not modified).
        norms, attention: which rule families to apply.
        max_positions: length of the cos/sin tables when the rotary moves into the attention
            kernel (the model's context length).

    Returns:
        ``(lowered GraphModule, stats with one note per site left generic)``.
    """
    gm = ir.copy_sharing_weights(kv.graph_module)
    stats = FusionStats()
    if attention:
        _fuse_attention(gm, kv.layers, stats, max_positions)
    if norms:
        _fuse_norms(gm, stats)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gqa = torch.ops.fxcompress_ort.group_query_attention.default
    pasts = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("past_")]
    stats.cache_only_in_attention = bool(pasts) and all(
        u.op == "call_function" and u.target is gqa for n in pasts for u in n.users)
    log.info("ort fused lowering: %d skip+rms, %d rms, %d skip+layer norms, %d attentions "
             "(%d reading one packed q|k|v projection; fuse_linears before quantization packs "
             "them); %d sites kept", stats.skip_rms_norms, stats.rms_norms,
             stats.skip_layer_norms, stats.attentions, stats.packed_qkv, len(stats.notes))
    return gm, stats


__all__ = ["FusionStats", "group_query_attention", "lower_fused", "rms_norm", "skip_layer_norm",
           "skip_rms_norm", "translation_table"]
