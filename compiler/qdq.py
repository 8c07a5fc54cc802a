"""Quantization in the IR: the PT2E Q/DQ forms, site annotation, weight rounding, Q/DQ insertion.

Every pass that ends in Q/DQ nodes (``insert_qdq``, ``gptq``, ``awq``, ``insert_qdq_clusters``)
and every lowering that reads them speaks the vocabulary defined here, so no pass imports
another's helpers. The forms (``torch.ops.quantized_decomposed``, as PT2E writes them):

- int8 weights: symmetric per output channel, ``scale = max|W[o, :]| / 127``, range
  [-127, 127] -> ``dequantize_per_channel(W_q, scale, None, axis=0, -127, 127, int8)``;
- int4 weights: values held in int8 in [-8, 7], one scale (and zero point when asymmetric) per
  ``group_size`` consecutive input channels of each row -> ``dequantize_per_channel_group``;
- static activations: one symmetric int8 scale per tensor -> ``quantize_per_tensor`` /
  ``dequantize_per_tensor``;
- dynamic activations: one scale per token at run time -> ``choose_qparams_per_token`` /
  ``quantize_per_token`` / ``dequantize_per_token``.

Deciding *what* to quantize is separate from inserting the nodes (as in PT2E):
:func:`annotate` / :func:`select_sites` return one :class:`QuantAnnotation` per site, with a
reason for every skipped one (the LM head, :func:`is_lm_head`, unless asked; weights that are
not parameters; sites already dequantized; ``include``/``exclude`` patterns), and
:func:`rewrite_sites` then carries the decisions out. New nodes copy the metadata of the node
they stand for and record the pass that created them (:func:`set_qdq_meta`).
"""

from __future__ import annotations

import fnmatch
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import fx

from compiler import ir
from compiler.errors import PassError, PreconditionError

log = logging.getLogger(__name__)

qd = torch.ops.quantized_decomposed

#: the schemes of ``insert_qdq`` (:func:`resolve_scheme`)
SCHEMES = ("w8a8", "w8a8_dynamic", "w4a16")
#: int4 group sizes the kernels run (ORT ``MatMulNBits``, the Triton W4A16 GEMM)
GROUP_SIZES = (32, 64, 128)

# Ops that only move or relabel the logits; a linear reaching the output through them is the
# LM head.
_PASS_THROUGH = {
    "view", "reshape", "_unsafe_view", "slice", "select", "contiguous", "to", "_to_copy",
    "alias", "clone", "getitem", "squeeze", "unsqueeze", "expand",
}

#: every quantized_decomposed dequantize op a weight is written with
WEIGHT_DQ_OPS = (qd.dequantize_per_channel.default, qd.dequantize_per_channel_group.default)
#: floor of a scale, so an all-zero row or tensor quantizes to zeros instead of dividing by 0
SCALE_EPS = 1e-8


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class WeightQuantSpec:
    """How one weight is quantized.

    Attributes:
        bits: 8 or 4.
        group_size: None for per-output-channel, else the input-channel group length.
        symmetric: zero point fixed at 0 (not stored) when True.
        qmin, qmax: integer range; values are held in int8 in both cases.
    """

    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -127 if self.bits == 8 else -8

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7


@dataclass(frozen=True)
class ActQuantSpec:
    """How the input activation of a linear is quantized: ``static`` per tensor or ``dynamic``
    per token, symmetric int8 in [-128, 127]."""

    mode: str  # "static" | "dynamic"
    qmin: int = -128
    qmax: int = 127


@dataclass
class QuantAnnotation:
    """The decision for one site.

    Attributes:
        site: the linear's module path (``model.layers.0.mlp.up_proj``) or the embedding's.
        node: the ``aten.linear`` / ``aten.embedding`` node.
        kind: ``"linear"`` or ``"embedding"``.
        weight: the weight's spec (None when skipped).
        activation: the input's spec (None for weight-only or skipped sites).
        skip: the reason the site is left alone (None when it is quantized).
    """

    site: str
    node: fx.Node
    kind: str
    weight: WeightQuantSpec | None = None
    activation: ActQuantSpec | None = None
    skip: str | None = None

    @property
    def quantized(self) -> bool:
        return self.skip is None

    @property
    def input_site(self) -> str:
        """The ActivationStats site of the linear's input."""
        return f"{self.site}:in"


@dataclass(frozen=True)
class SchemeSpec:
    """Resolved scheme: weight spec plus activation mode (None: weight-only)."""

    name: str
    weight: WeightQuantSpec
    activation: ActQuantSpec | None = None


def resolve_scheme(
    scheme: str, *, group_size: int = 128, symmetric: bool | None = None
) -> SchemeSpec:
    """Validate a scheme name and its options and return the resolved spec.

    Raises:
        ValueError: unknown scheme, group size not in {32, 64, 128}, or asymmetric int8 weights.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"insert_qdq: unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise ValueError(f"insert_qdq: symmetric must be a bool, got {symmetric!r}")
    if scheme == "w4a16":
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            raise ValueError(
                f"insert_qdq: group_size must be one of {GROUP_SIZES} for w4a16, got {group_size!r}"
            )
        sym = False if symmetric is None else symmetric
        return SchemeSpec(scheme, WeightQuantSpec(4, group_size, sym))
    if symmetric is False:
        raise ValueError(
            f"insert_qdq: scheme {scheme} uses symmetric int8 weights (per output channel); "
            "symmetric=False is only supported for w4a16"
        )
    mode = "static" if scheme == "w8a8" else "dynamic"
    return SchemeSpec(scheme, WeightQuantSpec(8, None, True), ActQuantSpec(mode))


def site_patterns(value: Sequence[str] | str, what: str, who: str = "insert_qdq"
                  ) -> tuple[str, ...]:
    """Validate an ``include``/``exclude`` option: one pattern or a list of them, as a tuple.

    Raises:
        TypeError: not a list of non-empty strings (the message names ``who`` and ``what``).
    """
    if isinstance(value, str):
        value = [value]
    value = tuple(value)
    if not all(isinstance(p, str) and p for p in value):
        raise TypeError(f"{who}: {what} must be a list of site patterns, got {value!r}")
    return value


def matches_site(name: str, patterns: Sequence[str]) -> bool:
    """True if a module path (or its ``<path>:in`` site) matches one of the fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{name}:in", p)
               for p in patterns)


def is_lm_head(node: fx.Node) -> bool:
    """True if the output of ``node`` reaches the graph output only through view-like ops."""
    frontier = [node]
    seen: set[fx.Node] = set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u in seen or u.op != "call_function" or ir.op_name(u) not in _PASS_THROUGH:
                continue
            seen.add(u)
            frontier.append(u)
    return False


def is_dequantized(node: Any) -> bool:
    """True if ``node`` is the output of a ``quantized_decomposed`` dequantize op."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "quantized_decomposed"
        and node.target._schema.name.split("::")[-1].startswith("dequantize")
    )


def annotate(
    gm: fx.GraphModule,
    scheme: SchemeSpec | str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    quantize_lm_head: bool = False,
    quantize_embeddings: bool = False,
) -> list[QuantAnnotation]:
    """Decide, for every linear (and embedding), whether and how it is quantized. Pure.

    Args:
        gm: a canonical GraphModule.
        scheme: a :class:`SchemeSpec` or a scheme name (default options).
        include: fnmatch patterns over module paths (or ``<path>:in`` sites); None = all.
        exclude: patterns of sites to leave float (wins over ``include``).
        quantize_lm_head: quantize the linear producing the logits too.
        quantize_embeddings: quantize embedding tables (int8 per row).

    Returns:
        One annotation per linear / embedding in graph order; skipped ones carry a reason.
    """
    spec = resolve_scheme(scheme) if isinstance(scheme, str) else scheme
    out: list[QuantAnnotation] = []
    for n in gm.graph.nodes:
        if ir.is_op(n, ir.LINEAR):
            out.append(_annotate_linear(n, spec, include, exclude, quantize_lm_head))
        elif ir.is_op(n, ir.EMBEDDING):
            name = ir.site(n)
            a = QuantAnnotation(name, n, "embedding")
            w = n.args[0]
            if is_dequantized(w):
                a.skip = "already quantized"
            elif not quantize_embeddings:
                a.skip = "embedding left float (quantize_embeddings=False)"
            elif not isinstance(w, fx.Node) or w.op != "get_attr":
                a.skip = "table is not a parameter"
            else:
                a.weight = WeightQuantSpec(8, None, True)
            out.append(a)
    return out


def annotate_linears(
    gm: fx.GraphModule,
    scheme: SchemeSpec | str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    quantize_lm_head: bool = False,
) -> list[QuantAnnotation]:
    """:func:`annotate` restricted to linears."""
    return [a for a in annotate(gm, scheme, include=include, exclude=exclude,
                                quantize_lm_head=quantize_lm_head) if a.kind == "linear"]


def _annotate_linear(n, spec: SchemeSpec, include, exclude, quantize_lm_head) -> QuantAnnotation:
    name = ir.site(n)
    a = QuantAnnotation(name, n, "linear")
    _, w, _ = ir.linear_parts(n)
    if is_dequantized(w) or is_dequantized(n.args[0]):
        a.skip = "already quantized"
    elif not isinstance(w, fx.Node) or w.op != "get_attr":
        a.skip = "weight is not a parameter"
    elif include is not None and not matches_site(name, include):
        a.skip = "not matched by include patterns"
    elif exclude and matches_site(name, exclude):
        a.skip = "matched by an exclude pattern"
    elif n.meta.get(ir.KEEP_FLOAT) and not (include is not None and matches_site(name, include)):
        a.skip = f"left float: {n.meta[ir.KEEP_FLOAT]} (an include pattern naming it overrides)"
    elif not quantize_lm_head and is_lm_head(n):
        a.skip = "LM head left float (quantize_lm_head=False)"
    else:
        a.weight, a.activation = spec.weight, spec.activation
    return a


def check_annotations(gm: fx.GraphModule, annotations: Iterable[QuantAnnotation]) -> None:
    """Raise before any mutation if a decision cannot be carried out on its site.

    Raises:
        PreconditionError: a group size that does not divide a linear's in_features, or a
            weight that is not 2-D floating point; the message names the site.
    """
    for a in annotations:
        if not a.quantized:
            continue
        w = ir.get_param(gm, a.node.args[0] if a.kind == "embedding" else a.node.args[1])
        if w.dim() != 2 or not w.is_floating_point():
            raise PreconditionError(
                f"insert_qdq: site {a.site}: weight must be a 2-D float tensor, got "
                f"{w.dtype} {tuple(w.shape)}"
            )
        g = a.weight.group_size
        if g is not None and w.shape[1] % g:
            raise PreconditionError(
                f"insert_qdq: site {a.site}: group_size {g} does not divide in_features "
                f"{w.shape[1]}; choose a group size dividing it or exclude the site"
            )


# ----------------------------------------------------------------------------- numerics


def quantize_weight_per_channel(
    w: torch.Tensor, spec: WeightQuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(W_q int8 [out, in], scale float32 [out])``."""
    # W: [out, in]
    amax = w.detach().abs().amax(dim=1).to(torch.float32)
    scale = amax.clamp(min=SCALE_EPS) / spec.qmax
    q = torch.round(w / scale[:, None]).clamp(spec.qmin, spec.qmax).to(torch.int8)
    return q, scale


def quantize_weight_per_group(
    w: torch.Tensor, spec: WeightQuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4 held in int8: ``(W_q [out, in], scale [out, in/g], zero_point | None)``.

    Asymmetric: the group's range is widened to include 0 so the zero point is an integer in
    [qmin, qmax]; symmetric: ``scale = max|W| / 7`` and no zero point.
    """
    out_f, in_f = w.shape
    g = spec.group_size
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    if spec.symmetric:
        scale = wg.abs().amax(dim=-1).clamp(min=SCALE_EPS) / 7
        q = torch.round(wg / scale[..., None]).clamp(spec.qmin, spec.qmax)
        return q.reshape(out_f, in_f).to(torch.int8), scale, None
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=SCALE_EPS)
    zp = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    q = (torch.round(wg / scale[..., None]) + zp[..., None]).clamp(spec.qmin, spec.qmax)
    return q.reshape(out_f, in_f).to(torch.int8), scale, zp.to(torch.int8)


def activation_scale(absmax: float, spec: ActQuantSpec) -> float:
    """Static symmetric per-tensor scale from a calibration abs-max."""
    return max(float(absmax), SCALE_EPS) / spec.qmax


# ----------------------------------------------------------------------------- site selection

#: group_size value meaning one group per output row
PER_CHANNEL = -1


def resolve_weight_spec(who: str, bits, group_size, sym) -> WeightQuantSpec:
    """Validate ``bits`` / ``group_size`` / ``sym`` and return the spec (``group_size`` None for
    int8 per channel, -1 kept for "one group per row", resolved per site).

    Raises:
        ValueError: a bit width or group size the int4/int8 kernels cannot run.
    """
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{who}: bits must be 4 or 8 (the int4 MatMulNBits / W4A16 kernels and "
                         f"int8 weights), got {bits!r}")
    if sym is not None and not isinstance(sym, bool):
        raise ValueError(f"{who}: sym must be a bool, got {sym!r}")
    if isinstance(group_size, bool) or group_size not in (*GROUP_SIZES, PER_CHANNEL):
        raise ValueError(f"{who}: group_size must be one of {GROUP_SIZES} or -1 (one group per "
                         f"row), got {group_size!r}")
    if bits == 8:
        if group_size != PER_CHANNEL:
            raise ValueError(f"{who}: 8-bit weights are quantized per output channel (the int8 form "
                             f"the kernels run); use group_size=-1, got {group_size!r}")
        if sym is False:
            raise ValueError(f"{who}: 8-bit weights are symmetric per output channel; "
                             "sym=False is only supported for 4 bits")
        return WeightQuantSpec(8, None, True)
    return WeightQuantSpec(4, group_size, bool(sym))


def site_spec(spec: WeightQuantSpec, in_features: int) -> WeightQuantSpec:
    """The spec for one linear: ``group_size=-1`` becomes the row length."""
    if spec.group_size == PER_CHANNEL:
        return WeightQuantSpec(spec.bits, in_features, spec.symmetric)
    return spec


def select_sites(who: str, gm: fx.GraphModule, spec: WeightQuantSpec, *, include, exclude,
                 quantize_lm_head: bool) -> tuple[list[QuantAnnotation], list[str]]:
    """Annotate linears as ``insert_qdq`` would, for passes that choose the weight spec
    themselves (``gptq``, ``awq``), and resolve per-site specs. Pure.

    Returns:
        ``(annotations to quantize, notes for skipped sites)``.

    Raises:
        PreconditionError: a group size that does not divide a site's in_features, or a weight
            that is not a 2-D float tensor (the message names the site).
    """
    anns = annotate_linears(gm, SchemeSpec("w4a16", spec), include=include, exclude=exclude,
                            quantize_lm_head=quantize_lm_head)
    todo = [a for a in anns if a.quantized]
    notes = [f"{a.site}: skipped, {a.skip}" for a in anns if not a.quantized]
    for a in todo:
        w = ir.get_param(gm, a.node.args[1])
        if w.dim() != 2 or not w.is_floating_point():
            raise PreconditionError(f"{who}: site {a.site}: weight must be a 2-D float tensor, got "
                                    f"{w.dtype} {tuple(w.shape)}")
        a.weight = site_spec(spec, w.shape[1])
        g = a.weight.group_size
        if g is not None and w.shape[1] % g:
            raise PreconditionError(
                f"{who}: site {a.site}: group_size {g} does not divide in_features {w.shape[1]}; "
                "choose a group size dividing it, group_size=-1, or exclude the site")
    return todo, notes


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                      spec: WeightQuantSpec) -> torch.Tensor:
    """The float weight the graph's dequantize op computes from ``(q, scale, zp)`` (bitwise)."""
    if spec.group_size is None:
        return qd.dequantize_per_channel.default(q, scale, None, 0, spec.qmin, spec.qmax,
                                                 torch.int8)
    return qd.dequantize_per_channel_group.default(q, scale, zp, spec.qmin, spec.qmax, torch.int8,
                                                   spec.group_size, torch.float32)


# ----------------------------------------------------------------------------- rewriting


def rewrite_sites(
    gm: fx.GraphModule, annotations: Sequence[QuantAnnotation], act_scales: dict[str, float],
    weight_qparams: dict[str, tuple] | None = None, *, created_by: str = "insert_qdq",
) -> dict[str, int]:
    """:func:`insert_qdq`, then drop the dead float weights and recompile; the stats gain
    ``params_removed`` and ``param_bytes_before`` / ``param_bytes_after`` (what every pass that
    ends in Q/DQ, ``insert_qdq``, ``gptq`` and ``awq``, reports)."""
    before = ir.param_bytes(gm)
    stats = insert_qdq(gm, annotations, act_scales, weight_qparams, created_by=created_by)
    gm.graph.eliminate_dead_code()
    stats["params_removed"] = ir.remove_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    stats["param_bytes_before"] = before
    stats["param_bytes_after"] = ir.param_bytes(gm)
    return stats


def insert_qdq(
    gm: fx.GraphModule, annotations: Sequence[QuantAnnotation], act_scales: dict[str, float],
    weight_qparams: dict[str, tuple] | None = None, *, created_by: str = "insert_qdq",
) -> dict[str, int]:
    """Rewrite the annotated sites in place (no validation: call :func:`check_annotations`).

    Args:
        gm: the graph.
        annotations: quantized annotations (skipped ones are ignored).
        act_scales: ``<site>:in`` -> static activation scale, for static activation specs.
        weight_qparams: site -> precomputed ``(W_q, scale[, zero_point])`` in the form the
            quantize functions return (GPTQ's rounding), instead of rounding the weight here.
        created_by: the pass recorded on every new node (``fxcompress_created_by``).

    Returns:
        Counters: linears/embeddings quantized, int8/int4 weights, activation Q/DQ inserted.
    """
    stats = {k: 0 for k in ("linears_quantized", "embeddings_quantized", "weights_int8",
                            "weights_int4", "act_qdq_static", "act_qdq_dynamic")}
    weight_dq: dict[tuple, fx.Node] = {}  # (param target, spec) -> dequantized weight node
    act_dq: dict[tuple, fx.Node] = {}  # (input node, mode, scale) -> dequantized activation
    for a in annotations:
        if not a.quantized:
            continue
        n = a.node
        w_arg = 1 if a.kind == "linear" else 0
        w_node = n.args[w_arg]
        key = (str(w_node.target), a.weight)
        if key not in weight_dq:
            weight_dq[key] = _dequantized_weight(gm, w_node, a.weight, before=n, site=a.site,
                                                 qparams=(weight_qparams or {}).get(a.site),
                                                 created_by=created_by)
            stats["weights_int4" if a.weight.bits == 4 else "weights_int8"] += 1
        n.replace_input_with(w_node, weight_dq[key])
        if a.kind == "embedding":
            stats["embeddings_quantized"] += 1
            continue
        stats["linears_quantized"] += 1
        if a.activation is None:
            continue
        x = n.args[0]
        scale = act_scales.get(a.input_site) if a.activation.mode == "static" else None
        if a.activation.mode == "static" and scale is None:
            raise PassError(f"insert_qdq: no activation scale for site {a.input_site}")
        akey = (x, a.activation, scale)
        if akey not in act_dq:
            act_dq[akey] = _qdq_activation(gm, x, a.activation, scale, site=a.site,
                                           created_by=created_by)
            stats[f"act_qdq_{a.activation.mode}"] += 1
        n.replace_input_with(x, act_dq[akey])
    return stats


def _dequantized_weight(gm, w_node: fx.Node, spec: WeightQuantSpec, *, before: fx.Node,
                        site: str, qparams: tuple | None = None, created_by: str) -> fx.Node:
    """Add the integer weight and its qparams (``qparams``, or rounded here) as parameters;
    return the dequantize node."""
    w = ir.get_param(gm, w_node)
    base = str(w_node.target)
    g = gm.graph
    if spec.group_size is None:
        q, scale = quantize_weight_per_channel(w, spec) if qparams is None else qparams[:2]
        qn = ir.add_param(gm, f"{base}_int8", q, before=before)
        sn = ir.add_param(gm, f"{base}_scale", scale, before=before)
        args = (qn, sn, None, 0, spec.qmin, spec.qmax, torch.int8)
        target = qd.dequantize_per_channel.default
    else:
        q, scale, zp = quantize_weight_per_group(w, spec) if qparams is None else qparams
        qn = ir.add_param(gm, f"{base}_int4", q, before=before)
        sn = ir.add_param(gm, f"{base}_scale", scale, before=before)
        zn = ir.add_param(gm, f"{base}_zero_point", zp, before=before) if zp is not None else None
        args = (qn, sn, zn, spec.qmin, spec.qmax, torch.int8, spec.group_size, torch.float32)
        target = qd.dequantize_per_channel_group.default
    with g.inserting_before(before):
        dq = g.call_function(target, args)
    set_qdq_meta(dq, before, w.detach(), created_by=created_by)
    log.debug("insert_qdq: %s weight -> int%d %s", site, spec.bits,
              "per channel" if spec.group_size is None else f"group {spec.group_size}")
    return dq


def _qdq_activation(gm, x: fx.Node, spec: ActQuantSpec, scale: float | None, *,
                    site: str, created_by: str) -> fx.Node:
    """Insert Q/DQ of activation ``x`` right after it (so it dominates every reader)."""
    g = gm.graph
    xval = x.meta.get("val")
    if spec.mode == "static":
        with g.inserting_after(x):
            q = g.call_function(qd.quantize_per_tensor.default,
                                (x, scale, 0, spec.qmin, spec.qmax, torch.int8))
        with g.inserting_after(q):
            dq = g.call_function(qd.dequantize_per_tensor.default,
                                 (q, scale, 0, spec.qmin, spec.qmax, torch.int8))
        set_qdq_meta(q, x, _like(xval, torch.int8), created_by=created_by)
        set_qdq_meta(dq, x, xval, created_by=created_by)
        return dq
    with g.inserting_after(x):
        qp = g.call_function(qd.choose_qparams_per_token.default, (x, torch.int8))
    with g.inserting_after(qp):
        s = g.call_function(operator.getitem, (qp, 0))
    with g.inserting_after(s):
        zp = g.call_function(operator.getitem, (qp, 1))
    with g.inserting_after(zp):
        q = g.call_function(qd.quantize_per_token.default,
                            (x, s, zp, spec.qmin, spec.qmax, torch.int8))
    with g.inserting_after(q):
        # output_dtype as a keyword: the Q/DQ verifier reads the quantized dtype from args[-1]
        dq = g.call_function(qd.dequantize_per_token.default,
                             (q, s, zp, spec.qmin, spec.qmax, torch.int8),
                             {"output_dtype": torch.float32})
    for node, val in ((qp, None), (s, None), (zp, None), (q, _like(xval, torch.int8)), (dq, xval)):
        set_qdq_meta(node, x, val, created_by=created_by)
    log.debug("insert_qdq: %s input -> int8 per token (dynamic)", site)
    return dq


def _like(val, dtype):
    if isinstance(val, torch.Tensor):
        return val.to(dtype)  # a FakeTensor carries its own mode
    return None


def set_qdq_meta(node: fx.Node, src: fx.Node, val: torch.Tensor | None, *, created_by: str) -> None:
    """Metadata of a new Q/DQ node: ``src``'s module stack, ``val`` as its value (None: none),
    and the pass that created it."""
    ir.copy_meta(src, node, created_by=created_by)
    if val is None:
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
    else:
        node.meta["val"] = val
        node.meta.pop("tensor_meta", None)


__all__ = [
    "GROUP_SIZES",
    "PER_CHANNEL",
    "SCALE_EPS",
    "SCHEMES",
    "WEIGHT_DQ_OPS",
    "ActQuantSpec",
    "QuantAnnotation",
    "SchemeSpec",
    "WeightQuantSpec",
    "activation_scale",
    "annotate",
    "annotate_linears",
    "check_annotations",
    "dequantize_weight",
    "insert_qdq",
    "is_dequantized",
    "is_lm_head",
    "matches_site",
    "quantize_weight_per_channel",
    "quantize_weight_per_group",
    "resolve_scheme",
    "resolve_weight_spec",
    "rewrite_sites",
    "select_sites",
    "set_qdq_meta",
    "site_patterns",
    "site_spec",
]
