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
``rms_norm(add(a, b), w)`` where the sum     ``com.microsoft.SkipSimplifiedLayerNormalization``
is also read later (the residual stream)     (outputs the norm and ``a + b``)
``rms_norm(x, w)`` (any other)               ``SimplifiedLayerNormalization``
``layer_norm(add(a, b), w, b)`` (residual)   ``com.microsoft.SkipLayerNormalization``
``sdpa(q, cat(past_k, k), cat(past_v, v))``  ``com.microsoft.GroupQueryAttention`` (GQA and
from ``compiler.kv_cache`` (+ repeat_kv)     MHA; cache concatenated inside the kernel)
==========================================  ==================================================

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

Rotary embedding is left as generic ops (the graph computes it from the positions);
SiLU/GELU-gated MLPs are left to ORT's own fusions, which fire on them (``QuickGelu``).
"""

from __future__ import annotations

import copy
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
    past_v: torch.Tensor, seqlens_k: torch.Tensor, total_len: torch.Tensor, num_heads: int,
    kv_num_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORT's ``GroupQueryAttention`` (no rotary, no shared buffer) in torch.

    ``q: [B, S, Hq*D]``, ``k, v: [B, S, Hkv*D]``, ``past_*: [B, Hkv, P, D]``; row ``b`` holds
    ``seqlens_k[b] + 1`` valid tokens, its query ``i`` sits at ``seqlens_k[b] + 1 - S + i``.
    Returns ``(out [B, S, Hq*D], present_k, present_v [B, Hkv, P+S, D])``.
    """
    b, s, _ = q.shape
    d = q.shape[-1] // num_heads
    qh = q.reshape(b, s, num_heads, d).transpose(1, 2)
    pk = torch.cat([past_k, k.reshape(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    pv = torch.cat([past_v, v.reshape(b, s, kv_num_heads, d).transpose(1, 2)], dim=2)
    qpos = (seqlens_k.long() + 1 - s)[:, None] + torch.arange(s)[None, :]  # [B, S]
    allowed = torch.arange(pk.shape[2])[None, None, :] <= qpos[:, :, None]  # [B, S, L]
    bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed,
                                                                 torch.finfo(q.dtype).min)
    rep = num_heads // kv_num_heads
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, pk.repeat_interleave(rep, dim=1), pv.repeat_interleave(rep, dim=1),
        attn_mask=bias[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), pk, pv


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_len, num_heads, kv_num_heads, scale):
    b, s, _ = q.shape
    shape = (b, past_k.shape[1], past_k.shape[2] + s, past_k.shape[3])
    return torch.empty_like(q), past_k.new_empty(shape), past_v.new_empty(shape)


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
                fp("seqlens_k", "M"), fp("total_sequence_length", "M")],
        outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
        type_constraints=[*f32, ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", ints, ""), attr("kv_num_heads", ints, ""),
                    attr("scale", floats, "")],
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

    def t_gqa(q, k, v, past_k, past_v, seqlens_k, total_len, num_heads, kv_num_heads, scale):
        return gqa(q, k, v, past_k, past_v, seqlens_k, total_len, num_heads=num_heads,
                   kv_num_heads=kv_num_heads, scale=scale, _num_outputs=3)

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
    is_skip = ir.is_op(x, aten.add.Tensor) and len(x.users) > 1 and len(x.args) == 2 \
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
                plans.append((kind, n))
    done_adds: set[fx.Node] = set()
    for kind, n in plans:
        x = n.args[0]
        eps = _eps(n)
        weight = n.args[2]
        if kind.startswith("skip") and x in done_adds:
            kind = "rms_norm" if kind == "skip_rms_norm" else None
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


def _bsh(g: fx.Graph, x: fx.Node, width: int) -> fx.Node:
    """``[B, H, T, D] -> [B, T, H*D]`` (the layout ORT's attention kernels take)."""
    t = g.call_function(aten.transpose.int, (x, 1, 2))
    return g.call_function(aten.reshape.default, (t, [
        g.call_function(aten.sym_size.int, (x, 0)), g.call_function(aten.sym_size.int, (x, 2)),
        width]))


def _fuse_attention(gm: fx.GraphModule, layers, stats: FusionStats) -> None:
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
    for layer, nodes in plans:
        sdpa = nodes["sdpa"]
        q = sdpa.args[0]
        heads = int(q.meta["val"].shape[1])
        d = layer.head_dim
        scale = sdpa.kwargs.get("scale")
        if scale is None:
            scale = d ** -0.5
        with g.inserting_before(sdpa):
            fused = g.call_function(ops.group_query_attention.default, (
                _bsh(g, q, heads * d), _bsh(g, nodes["key"], layer.kv_heads * d),
                _bsh(g, nodes["value"], layer.kv_heads * d), nodes["past_key"], nodes["past_value"],
                seqlens, total_t, heads, layer.kv_heads, float(scale)))
            out = g.call_function(operator.getitem, (fused, 0))
            out = g.call_function(aten.reshape.default, (out, [
                g.call_function(aten.sym_size.int, (q, 0)),
                g.call_function(aten.sym_size.int, (q, 2)), heads, d]))
            out = g.call_function(aten.transpose.int, (out, 1, 2))
            present_k = g.call_function(operator.getitem, (fused, 1))
            present_v = g.call_function(operator.getitem, (fused, 2))
        ir.copy_meta(sdpa, out, created_by="ort_fused")
        sdpa.replace_all_uses_with(out)
        for key, new in (("present_key", present_k), ("present_value", present_v)):
            nodes[key].replace_all_uses_with(new, delete_user_cb=lambda u: u.op == "output")
        stats.attentions += 1


def lower_fused(kv, *, norms: bool = True, attention: bool = True) -> tuple[fx.GraphModule, FusionStats]:
    """A copy of the KV-cache graph with norms and attention replaced by fused ORT ops.

    Args:
        kv: a :class:`compiler.kv_cache.KVCacheGraph` (not modified).
        norms, attention: which rule families to apply.

    Returns:
        ``(lowered GraphModule, stats with one note per site left generic)``.
    """
    gm = copy.deepcopy(kv.graph_module)
    stats = FusionStats()
    if attention:
        _fuse_attention(gm, kv.layers, stats)
    if norms:
        _fuse_norms(gm, stats)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    log.info("ort fused lowering: %d skip+rms, %d rms, %d skip+layer norms, %d attentions; "
             "%d sites kept", stats.skip_rms_norms, stats.rms_norms, stats.skip_layer_norms,
             stats.attentions, len(stats.notes))
    return gm, stats


__all__ = ["FusionStats", "group_query_attention", "lower_fused", "rms_norm", "skip_layer_norm",
           "skip_rms_norm", "translation_table"]
