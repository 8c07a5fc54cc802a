"""InsertQDQ: quantize linear weights (and activations) by inserting PT2E Q/DQ nodes.

Paper: none for the mechanism (PT2E / ``torch.ao`` quantization's decomposed Q/DQ
representation); the schemes are the standard ones: W8A8 as in LLM.int8()/SmoothQuant
(arXiv:2211.10438, per-channel int8 weights, per-tensor or per-token int8 activations) and
W4A16 group-wise weight-only quantization as in GPTQ/AWQ (arXiv:2210.17323, 2306.00978).

Identity relied on (lossy by design): ``linear(x, W, b) ~= linear(DQ(Q(x)), DQ(W_q), b)`` where
``W_q`` is the rounded integer weight stored in the graph, so the graph carries integer
parameters and every rounding is explicit as a ``torch.ops.quantized_decomposed`` op:

- weights, ``w8a8`` / ``w8a8_dynamic``: int8, per output channel, symmetric
  (``scale = max|W[o, :]| / 127``, range [-127, 127]) ->
  ``dequantize_per_channel(W_q, scale, None, axis=0, -127, 127, int8)``;
- weights, ``w4a16``: int4 values held in int8 (PT2E convention, range [-8, 7]), one
  scale (and zero point when asymmetric) per ``group_size`` consecutive input channels of each
  row -> ``dequantize_per_channel_group``. Asymmetric: ``scale = (max - min) / 15`` over the
  group with ``min <= 0 <= max``; symmetric: ``scale = max|W| / 7``, no zero point;
- activations, ``w8a8`` (static): one scale per activation tensor from the calibration
  abs-max (:class:`compiler.stats.ActivationStats`, site ``<linear>:in``), symmetric int8
  ``scale = absmax / 127`` -> ``quantize_per_tensor`` / ``dequantize_per_tensor``;
- activations, ``w8a8_dynamic``: per token (one scale per row, computed at run time) ->
  ``choose_qparams_per_token`` / ``quantize_per_token`` / ``dequantize_per_token``;
- ``w4a16``: activations stay float.

Linears reading the same tensor (q/k/v, gate/up) share one Q/DQ of it (their calibration
statistics are the same tensor's, so the scale is the same).

Annotation is separate from insertion (as in PT2E): :func:`annotate` decides, for every
``aten.linear`` (and, on request, ``aten.embedding``), whether and how it is quantized, with a
reason for every skipped site; :class:`InsertQDQ` then validates all decisions and only then
mutates the graph.

Sites rewritten: every ``aten.linear`` whose weight is a parameter, selected by
``include``/``exclude`` fnmatch patterns over the linear's module path
(``model.layers.*.mlp.*``) or its ``:in`` site. Skipped, with a note: the LM head unless
``quantize_lm_head`` (its output is the logits, the most sensitive tensor); linears whose
weight is not a parameter or is already dequantized (a second run is a no-op); sites the
patterns leave out. Embeddings are left float unless ``quantize_embeddings`` (then int8 per
row, symmetric, dequantized after the lookup in the ONNX lowering); a table shared by a
quantized LM head with the same int8 per-row scheme shares its integer parameter.

Preconditions: ``canonical`` (linears as ``aten.linear``); the static scheme also requires
``calibrated``. Establishes ``quantized``. Lossy (``exact = False``). Preserves no analysis.

Lowering: ``backends.ort_quant`` turns the Q/DQ patterns into ONNX Runtime integer kernels
(``MatMulIntegerToFloat`` for int8, ``MatMulNBits`` for int4).

Hyper-parameters:
    scheme (str, required): ``w8a8`` | ``w8a8_dynamic`` | ``w4a16``.
    group_size (int, default 128): w4a16 group along the input dim, one of 32, 64, 128.
    symmetric (bool, default: True for w8a8*, False for w4a16): weight zero points.
    include (list[str], default all): fnmatch patterns of sites to quantize.
    exclude (list[str], default none): fnmatch patterns of sites to leave float.
    quantize_lm_head (bool, default False): also quantize the linear producing the logits.
    quantize_embeddings (bool, default False): int8 per-row embedding tables.
    act_range (str, default "mse"): how a static activation scale's range is chosen from the
        calibration data: ``max`` the abs-max (the scheme as first published), ``percentile``
        the ``percentile``-th percentile of ``|x|`` over every element, ``mse`` the clipping
        value that minimizes the expected squared error of the int8 round trip (rounding noise
        ``step^2 / 12`` inside the range, ``x^2`` under half a step, ``(|x| - c)^2`` outside),
        as TensorRT's and ONNX Runtime's calibrators offer. Both read a ``log2 |x|``
        histogram in 1/64-octave bins (:mod:`compiler.stats`): a range is resolved to 1.1%.
    percentile (float, default 99.99): the percentile for ``act_range="percentile"``, in
        (0, 100].
    keep_sensitive (int, default 0): number of activation tensors (all linears reading one
        tensor count once) whose static quantization is the noisiest, relative to the tensor's
        energy (``sum (x - DQ(Q(x)))^2 / sum x^2`` at the chosen range, from the histogram),
        kept at higher precision as ``sensitive_mode`` says. The relative noise of every static
        site is in the pass notes (the sensitivity report), highest first.
    sensitive_mode (str, default "dynamic"): ``dynamic``: those tensors are quantized per
        token at run time (int8 weights kept, so no size cost; the cost is computing a scale
        per token); ``float``: their linears stay float entirely (weights fp32: 4x their int8
        bytes).

Range estimators (reference: a brute-force search over the real values agrees within the bin
width, ``tests/passes/test_insert_qdq.py``). With ``mse``, a massive activation seen on a few
tokens (the BOS token's, in LLMs) is clipped when clipping it costs less squared error than the
coarser rounding of every other value; ``keep_sensitive`` is the answer for tensors where no
single per-tensor range works.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import fx

from compiler import ir
from compiler.errors import PassError, PreconditionError
from compiler.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

qd = torch.ops.quantized_decomposed

SCHEMES = ("w8a8", "w8a8_dynamic", "w4a16")
GROUP_SIZES = (32, 64, 128)

# Ops that only move or relabel the logits; a linear reaching the output through them is the
# LM head.
_PASS_THROUGH = {
    "view", "reshape", "_unsafe_view", "slice", "select", "contiguous", "to", "_to_copy",
    "alias", "clone", "getitem", "squeeze", "unsqueeze", "expand",
}

#: every quantized_decomposed dequantize op this pass may emit for a weight
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


def _matches(name: str, patterns: Sequence[str]) -> bool:
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
    elif include is not None and not _matches(name, include):
        a.skip = "not matched by include patterns"
    elif exclude and _matches(name, exclude):
        a.skip = "matched by an exclude pattern"
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


ACT_RANGES = ("max", "percentile", "mse")
SENSITIVE_MODES = ("dynamic", "float")
#: the mse search tries clipping values down to absmax / 2**_MSE_OCTAVES
_MSE_OCTAVES = 12


def _hist_values(hist: torch.Tensor, absmax: float) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """Non-empty bins of a ``log2 |x|`` histogram: (counts, representative |x|, upper edges).

    A bin's value is its geometric centre, capped at the observed abs-max (the top bin holds it).
    """
    from compiler.stats import hist_bin_edges

    edges = hist_bin_edges()
    nz = torch.nonzero(hist > 0).flatten()
    lo, hi = edges[nz], edges[nz + 1]
    v = torch.sqrt(lo * hi).clamp(max=absmax)
    v[nz == 0] = 0.0  # the first bin holds zeros and values below 2**HIST_LOG2_MIN
    return hist[nz].to(torch.float64), v, hi.clamp(max=absmax)


def quantization_noise(hist: torch.Tensor, absmax: float, clip: torch.Tensor | float,
                       qmax: int = 127) -> torch.Tensor:
    """Expected ``sum (x - DQ(Q(x)))^2`` over a tensor whose ``|x|`` histogram is ``hist``, for
    symmetric int8 with range ``clip`` (a scalar or ``[K]`` candidates -> ``[K]``).

    Inside the range a value under half a step rounds to 0 (error ``x^2``), a larger one has
    the uniform rounding error ``step^2 / 12``; outside it is clipped, error ``(|x| - clip)^2``.
    """
    n, v, _ = _hist_values(hist, absmax)
    c = torch.as_tensor(clip, dtype=torch.float64).reshape(-1, 1)
    step = c / qmax
    inside = torch.where(v[None, :] < step / 2, v[None, :] ** 2, step ** 2 / 12)
    outside = (v[None, :] - c) ** 2
    err = torch.where(v[None, :] <= c, inside, outside)
    return (err * n[None, :]).sum(dim=1)


def activation_range(hist: torch.Tensor | None, absmax: float, method: str, *,
                     percentile: float = 99.99, qmax: int = 127) -> float:
    """The range (clipping value) of a static symmetric activation scale.

    Args:
        hist: ``log2 |x|`` histogram (:mod:`compiler.stats`), needed unless ``method="max"``.
        absmax: the calibration abs-max.
        method: ``max`` | ``percentile`` | ``mse`` (see the module docstring).
        percentile: in (0, 100], for ``percentile``.
        qmax: the largest integer level (127 for int8).

    Returns:
        The range, in ``(0, absmax]``.
    """
    absmax = float(absmax)
    if method == "max" or absmax <= 0:
        return absmax
    if hist is None:
        raise PassError(f"insert_qdq: act_range={method!r} needs a histogram of the activation")
    n, v, upper = _hist_values(hist, absmax)
    if method == "percentile":
        cum = torch.cumsum(n, 0)
        k = int(torch.searchsorted(cum, cum[-1] * (percentile / 100.0)).clamp(max=len(n) - 1))
        return float(upper[k])
    if method != "mse":
        raise ValueError(f"insert_qdq: unknown act_range {method!r}; known: {ACT_RANGES}")
    from compiler.stats import HIST_BINS_PER_OCTAVE

    # candidates: the upper edge of every bin from absmax down _MSE_OCTAVES octaves
    k = torch.arange(_MSE_OCTAVES * HIST_BINS_PER_OCTAVE + 1, dtype=torch.float64)
    cands = absmax * torch.exp2(-k / HIST_BINS_PER_OCTAVE)
    err = quantization_noise(hist, absmax, cands, qmax)
    return float(cands[int(torch.argmin(err))])


def relative_noise(hist: torch.Tensor, absmax: float, clip: float, qmax: int = 127) -> float:
    """``sum (x - DQ(Q(x)))^2 / sum x^2`` of the int8 round trip at range ``clip``."""
    n, v, _ = _hist_values(hist, absmax)
    energy = float((n * v ** 2).sum())
    if energy <= 0:
        return 0.0
    return float(quantization_noise(hist, absmax, clip, qmax)[0]) / energy


# ----------------------------------------------------------------------------- the pass


class InsertQDQ(Pass):
    """Quantize linear weights (and activations) with PT2E Q/DQ nodes; see the module doc."""

    name = "insert_qdq"
    exact = False
    establishes = frozenset({"quantized"})

    def __init__(
        self,
        *,
        scheme: str,
        group_size: int = 128,
        symmetric: bool | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str = (),
        quantize_lm_head: bool = False,
        quantize_embeddings: bool = False,
        act_range: str = "mse",
        percentile: float = 99.99,
        keep_sensitive: int = 0,
        sensitive_mode: str = "dynamic",
    ):
        self._spec = resolve_scheme(scheme, group_size=group_size, symmetric=symmetric)
        if act_range not in ACT_RANGES:
            raise ValueError(f"insert_qdq: unknown act_range {act_range!r}; known: "
                             f"{', '.join(ACT_RANGES)}")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"insert_qdq: percentile must be a number in (0, 100], got "
                             f"{percentile!r}")
        if isinstance(keep_sensitive, bool) or not isinstance(keep_sensitive, int) \
                or keep_sensitive < 0:
            raise ValueError(f"insert_qdq: keep_sensitive must be an int >= 0 (number of "
                             f"activation tensors), got {keep_sensitive!r}")
        if sensitive_mode not in SENSITIVE_MODES:
            raise ValueError(f"insert_qdq: unknown sensitive_mode {sensitive_mode!r}; known: "
                             f"{', '.join(SENSITIVE_MODES)}")
        self.act_range = act_range
        self.percentile = float(percentile)
        self.keep_sensitive = keep_sensitive
        self.sensitive_mode = sensitive_mode
        for opt, val in (("quantize_lm_head", quantize_lm_head),
                         ("quantize_embeddings", quantize_embeddings)):
            if not isinstance(val, bool):
                raise TypeError(f"insert_qdq: {opt} must be a bool, got {val!r}")
        self.scheme = scheme
        self.group_size = group_size
        self.symmetric = self._spec.weight.symmetric
        self.include = _patterns(include, "include") if include is not None else None
        self.exclude = _patterns(exclude, "exclude")
        self.quantize_lm_head = quantize_lm_head
        self.quantize_embeddings = quantize_embeddings

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """``canonical``, plus ``calibrated`` for the static scheme."""
        static = self._spec.activation is not None and self._spec.activation.mode == "static"
        return frozenset({"canonical", "calibrated"} if static else {"canonical"})

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        # decide
        annotations = annotate(
            gm, self._spec, include=self.include, exclude=self.exclude,
            quantize_lm_head=self.quantize_lm_head, quantize_embeddings=self.quantize_embeddings,
        )
        todo = [a for a in annotations if a.quantized]
        notes = [f"{a.site}: skipped, {a.skip}" for a in annotations
                 if not a.quantized and a.skip != "already quantized"]
        if not todo:
            return PassResult.unchanged(gm, notes, sites_quantized=0)
        check_annotations(gm, todo)
        scales, report = self._activation_scales(gm, ctx, todo)
        notes += report
        todo = [a for a in todo if a.quantized]  # sensitive sites kept float are skipped now

        # mutate
        stats = rewrite_sites(gm, todo, scales)
        if self._spec.activation is not None and self._spec.activation.mode == "static":
            stats["act_range"] = self.act_range
            stats["kept_sensitive"] = getattr(self, "_kept", 0)
        log.info(
            "insert_qdq(%s): %d linears, %d embeddings quantized; params %d -> %d bytes",
            self.scheme, stats["linears_quantized"], stats["embeddings_quantized"],
            stats["param_bytes_before"], stats["param_bytes_after"],
        )
        return PassResult(gm, True, frozenset(), stats, notes)

    def _activation_scales(self, gm, ctx: PassContext, todo
                           ) -> tuple[dict[str, float], list[str]]:
        """Static scales per ``:in`` site, and the sensitivity report (one note per tensor).

        Sites in the ``keep_sensitive`` noisiest tensors are switched, in ``todo``, to dynamic
        activations or to float (``skip`` set)."""
        static = [a for a in todo if a.activation is not None and a.activation.mode == "static"]
        self._kept = 0
        if not static:
            return {}, []
        ctx.require_calibration(f"insert_qdq(scheme={self.scheme}) (static activation scales)")
        from compiler.stats import ActivationStats

        sites = frozenset(a.input_site for a in static)
        table = ctx.analysis(ActivationStats, gm, sites=sites, covariance=frozenset(),
                             histogram=sites)
        # one decision per activation tensor (q/k/v read one tensor)
        by_tensor: dict[str, list[QuantAnnotation]] = {}
        for a in static:
            by_tensor.setdefault(table.tensor_of(a.input_site), []).append(a)
        rows = []  # (relative noise, tensor, clip, absmax)
        for t, anns in by_tensor.items():
            st = table[anns[0].input_site]
            absmax = float(st.absmax.max())
            clip = activation_range(st.hist, absmax, self.act_range, percentile=self.percentile,
                                    qmax=anns[0].activation.qmax)
            rel = relative_noise(st.hist, absmax, clip, anns[0].activation.qmax) \
                if st.hist is not None and absmax > 0 else 0.0
            rows.append((rel, t, clip, absmax))
        rows.sort(key=lambda r: -r[0])
        keep = {t for _, t, _, _ in rows[: self.keep_sensitive]}
        self._kept = len(keep)
        scales, report = {}, []
        for rank, (rel, t, clip, absmax) in enumerate(rows, 1):
            anns = by_tensor[t]
            db = 10 * math.log10(rel) if rel > 0 else float("-inf")
            line = (f"{anns[0].input_site}: static int8 range {clip:.4g} ({self.act_range}; "
                    f"abs-max {absmax:.4g}), relative noise {db:.1f} dB, sensitivity #{rank}")
            if len(anns) > 1:
                line += f" (shared by {len(anns)} linears)"
            if t in keep:
                for a in anns:
                    if self.sensitive_mode == "dynamic":
                        a.activation = ActQuantSpec("dynamic")
                    else:
                        a.skip = "kept float: among the keep_sensitive noisiest activations"
                        a.weight = a.activation = None
                line += f"; kept {self.sensitive_mode} (keep_sensitive={self.keep_sensitive})"
            else:
                for a in anns:
                    scales[a.input_site] = activation_scale(clip, a.activation)
            report.append(line)
        return scales, report


def _patterns(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    value = tuple(value)
    if not all(isinstance(p, str) and p for p in value):
        raise TypeError(f"insert_qdq: {what} must be a list of site patterns, got {value!r}")
    return value


def rewrite_sites(
    gm: fx.GraphModule, annotations: Sequence[QuantAnnotation], act_scales: dict[str, float],
    weight_qparams: dict[str, tuple] | None = None,
) -> dict[str, int]:
    """:func:`insert_qdq`, then drop the dead float weights and recompile; the stats gain
    ``params_removed`` and ``param_bytes_before`` / ``param_bytes_after`` (what every pass that
    ends in Q/DQ, ``insert_qdq``, ``gptq`` and ``awq``, reports)."""
    before = ir.param_bytes(gm)
    stats = insert_qdq(gm, annotations, act_scales, weight_qparams)
    gm.graph.eliminate_dead_code()
    stats["params_removed"] = ir.remove_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    stats["param_bytes_before"] = before
    stats["param_bytes_after"] = ir.param_bytes(gm)
    return stats


def insert_qdq(
    gm: fx.GraphModule, annotations: Sequence[QuantAnnotation], act_scales: dict[str, float],
    weight_qparams: dict[str, tuple] | None = None,
) -> dict[str, int]:
    """Rewrite the annotated sites in place (no validation: call :func:`check_annotations`).

    Args:
        gm: the graph.
        annotations: quantized annotations (skipped ones are ignored).
        act_scales: ``<site>:in`` -> static activation scale, for static activation specs.
        weight_qparams: site -> precomputed ``(W_q, scale[, zero_point])`` in the form the
            quantize functions return (GPTQ's rounding), instead of rounding the weight here.

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
                                                 qparams=(weight_qparams or {}).get(a.site))
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
            act_dq[akey] = _qdq_activation(gm, x, a.activation, scale, site=a.site)
            stats[f"act_qdq_{a.activation.mode}"] += 1
        n.replace_input_with(x, act_dq[akey])
    return stats


def _dequantized_weight(gm, w_node: fx.Node, spec: WeightQuantSpec, *, before: fx.Node,
                        site: str, qparams: tuple | None = None) -> fx.Node:
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
    _set_meta(dq, before, w.detach())
    log.debug("insert_qdq: %s weight -> int%d %s", site, spec.bits,
              "per channel" if spec.group_size is None else f"group {spec.group_size}")
    return dq


def _qdq_activation(gm, x: fx.Node, spec: ActQuantSpec, scale: float | None, *,
                    site: str) -> fx.Node:
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
        _set_meta(q, x, _like(xval, torch.int8))
        _set_meta(dq, x, xval)
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
        _set_meta(node, x, val)
    log.debug("insert_qdq: %s input -> int8 per token (dynamic)", site)
    return dq


def _like(val, dtype):
    if isinstance(val, torch.Tensor):
        return val.to(dtype)  # a FakeTensor carries its own mode
    return None


def _set_meta(node: fx.Node, src: fx.Node, val) -> None:
    ir.copy_meta(src, node, created_by="insert_qdq")
    if val is None:
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
    else:
        node.meta["val"] = val
        node.meta.pop("tensor_meta", None)


__all__ = [
    "ACT_RANGES",
    "SCHEMES",
    "SENSITIVE_MODES",
    "ActQuantSpec",
    "InsertQDQ",
    "QuantAnnotation",
    "SchemeSpec",
    "WeightQuantSpec",
    "activation_range",
    "activation_scale",
    "annotate",
    "annotate_linears",
    "check_annotations",
    "insert_qdq",
    "is_dequantized",
    "is_lm_head",
    "quantize_weight_per_channel",
    "quantization_noise",
    "quantize_weight_per_group",
    "relative_noise",
    "resolve_scheme",
]
