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

Annotation is separate from insertion (as in PT2E): :func:`compiler.qdq.annotate` decides, for
every ``aten.linear`` (and, on request, ``aten.embedding``), whether and how it is quantized,
with a reason for every skipped site; :class:`InsertQDQ` then validates all decisions and only
then mutates the graph (:func:`compiler.qdq.rewrite_sites`, shared with ``gptq`` and ``awq``).

Sites rewritten: every ``aten.linear`` whose weight is a parameter, selected by
``include``/``exclude`` fnmatch patterns over the linear's module path
(``model.layers.*.mlp.*``) or its ``:in`` site. Skipped, with a note: the LM head unless
``quantize_lm_head`` (its output is the logits, the most sensitive tensor); linears whose
weight is not a parameter or is already dequantized (a second run is a no-op); sites the
patterns leave out; linears their creating pass marked to stay float
(``compiler.ir.KEEP_FLOAT``: SliceGPT's shortcuts, which read the residual stream and its
outlier channels, and its tied-head / embedding maps) unless an ``include`` pattern names
their site (on SmolLM2-135M, quantizing the 30 shortcuts took ``slicegpt(0.25)`` +
``smoothquant(0.5)`` + w8a8 from 13.85 to 1174 perplexity). Embeddings are left float unless
``quantize_embeddings`` (then int8 per
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

import logging
import math
from collections.abc import Sequence

import torch
from torch import fx

from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult

# The Q/DQ vocabulary lives in the core (compiler.qdq); the names are re-exported here because
# they have been this module's public API.
from compiler.qdq import (
    GROUP_SIZES,
    SCHEMES,
    ActQuantSpec,
    QuantAnnotation,
    SchemeSpec,
    WeightQuantSpec,
    activation_scale,
    annotate,
    annotate_linears,
    check_annotations,
    insert_qdq,
    is_dequantized,
    is_lm_head,
    quantize_weight_per_channel,
    quantize_weight_per_group,
    resolve_scheme,
    rewrite_sites,
    site_patterns,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- range estimators


ACT_RANGES = ("max", "percentile", "mse")
SENSITIVE_MODES = ("dynamic", "float")
#: sensitivity rows named in the notes (the whole ranking is the pass's ``sensitivity`` table)
SENSITIVITY_NOTES = 5
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
        self.include = site_patterns(include, "include") if include is not None else None
        self.exclude = site_patterns(exclude, "exclude")
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
        done = [a.site for a in annotations if a.skip == "already quantized"]
        if done:  # by an earlier run, gptq or awq: their Q/DQ is kept as it is
            notes.append(f"{len(done)} sites already quantized (weights Q/DQ'd by an earlier "
                         f"pass), left as they are: no {self.scheme} quantization added to them "
                         f"({', '.join(done[:3])}{', ...' if len(done) > 3 else ''})")
        if not todo:
            return PassResult.unchanged(gm, notes, sites_quantized=0)
        check_annotations(gm, todo)
        scales, report, ranking = self._activation_scales(gm, ctx, todo)
        notes += report
        todo = [a for a in todo if a.quantized]  # sensitive sites kept float are skipped now

        # mutate
        stats = rewrite_sites(gm, todo, scales)
        if self._spec.activation is not None and self._spec.activation.mode == "static":
            stats["act_range"] = self.act_range
            stats["kept_sensitive"] = sum(r["kept"] is not None for r in ranking)
        log.info(
            "insert_qdq(%s): %d linears, %d embeddings quantized; params %d -> %d bytes",
            self.scheme, stats["linears_quantized"], stats["embeddings_quantized"],
            stats["param_bytes_before"], stats["param_bytes_after"],
        )
        tables = {"sensitivity": ranking} if ranking else {}
        return PassResult(gm, True, frozenset(), stats, notes, tables)

    def weight_group_size(self) -> int | None:
        return self._spec.weight.group_size if self._spec.weight is not None else None

    def wants_histograms(self) -> bool:
        """Static activation scales from mse / percentile ranges or a noise ranking."""
        act = self._spec.activation
        return (act is not None and act.mode == "static"
                and (self.act_range != "max" or self.keep_sensitive > 0))

    def _activation_scales(self, gm, ctx: PassContext, todo
                           ) -> tuple[dict[str, float], list[str], list[dict]]:
        """Static scales per ``:in`` site, the notes, and the sensitivity ranking.

        The ranking has one row per activation tensor (q/k/v read one tensor), noisiest first:
        site, range chosen, abs-max, relative int8 noise in dB, linears reading it, and what
        ``keep_sensitive`` did to it. The notes name the first :data:`SENSITIVITY_NOTES` rows
        and every kept one; the whole ranking is the pass's ``sensitivity`` table (report.json).
        Sites in the ``keep_sensitive`` noisiest tensors are switched, in ``todo``, to dynamic
        activations or to float (``skip`` set)."""
        static = [a for a in todo if a.activation is not None and a.activation.mode == "static"]
        if not static:
            return {}, [], []
        ctx.require_calibration(f"insert_qdq(scheme={self.scheme}) (static activation scales)")
        from compiler.stats import ActivationStats

        sites = frozenset(a.input_site for a in static)
        # histograms for the mse / percentile ranges and the noise ranking; act_range="max"
        # without keep_sensitive needs only the extrema, which an earlier exact pass may have
        # handed over already (no calibration sweep then)
        need_hist = self.act_range != "max" or self.keep_sensitive > 0
        table = ctx.analysis(ActivationStats, gm, sites=sites, covariance=frozenset(),
                             histogram=sites if need_hist else frozenset())
        by_tensor: dict[str, list[QuantAnnotation]] = {}
        for a in static:
            by_tensor.setdefault(table.tensor_of(a.input_site), []).append(a)
        rows = []  # (relative noise, tensor, clip, absmax)
        for t, anns in by_tensor.items():
            st = table[anns[0].input_site]
            absmax = float(st.absmax.max())
            clip = activation_range(st.hist, absmax, self.act_range, percentile=self.percentile,
                                    qmax=anns[0].activation.qmax)
            rel = None if st.hist is None else (
                relative_noise(st.hist, absmax, clip, anns[0].activation.qmax)
                if absmax > 0 else 0.0)
            rows.append((rel, t, clip, absmax))
        if not need_hist:  # act_range=max: nothing to rank by, the table keeps graph order
            return self._max_ranges(rows, by_tensor)
        rows.sort(key=lambda r: -r[0])
        keep = {t for _, t, _, _ in rows[: self.keep_sensitive]}
        scales, notes, ranking = {}, [], []
        for rank, (rel, t, clip, absmax) in enumerate(rows, 1):
            anns = by_tensor[t]
            db = 10 * math.log10(rel) if rel > 0 else float("-inf")
            kept = self.sensitive_mode if t in keep else None
            ranking.append({"rank": rank, "site": anns[0].input_site, "range": clip,
                            "absmax": absmax, "noise_db": round(db, 2),
                            "linears": len(anns), "kept": kept})
            if kept == "dynamic":
                for a in anns:
                    a.activation = ActQuantSpec("dynamic")
            elif kept == "float":
                for a in anns:
                    a.skip = "kept float: among the keep_sensitive noisiest activations"
                    a.weight = a.activation = None
            else:
                for a in anns:
                    scales[a.input_site] = activation_scale(clip, a.activation)
            if rank > SENSITIVITY_NOTES and kept is None:
                continue
            line = (f"{anns[0].input_site}: static int8 range {clip:.4g} ({self.act_range}; "
                    f"abs-max {absmax:.4g}), relative noise {db:.1f} dB, sensitivity #{rank}")
            if len(anns) > 1:
                line += f" (shared by {len(anns)} linears)"
            if kept:
                line += f"; kept {kept} (keep_sensitive={self.keep_sensitive})"
            notes.append(line)
        if len(rows) > SENSITIVITY_NOTES:
            notes.append(f"sensitivity: {len(rows)} activation tensors ranked, the first "
                         f"{SENSITIVITY_NOTES} above; every one in the pass's 'sensitivity' "
                         "table (report.json)")
        return scales, notes, ranking

    def _max_ranges(self, rows, by_tensor) -> tuple[dict[str, float], list[str], list[dict]]:
        """Scales and the (unranked) table when ranges are the abs-max and no histogram was
        taken."""
        scales, ranking = {}, []
        for _, t, clip, absmax in rows:
            anns = by_tensor[t]
            for a in anns:
                scales[a.input_site] = activation_scale(clip, a.activation)
            ranking.append({"rank": None, "site": anns[0].input_site, "range": clip,
                            "absmax": absmax, "noise_db": None, "linears": len(anns),
                            "kept": None})
        notes = [f"sensitivity: not ranked, act_range=max takes no histograms ({len(rows)} "
                 "activation tensors at their abs-max; act_range=mse or keep_sensitive rank "
                 "them by int8 noise)"]
        return scales, notes, ranking


__all__ = [
    "ACT_RANGES",
    "GROUP_SIZES",
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
    "quantization_noise",
    "quantize_weight_per_channel",
    "quantize_weight_per_group",
    "relative_noise",
    "resolve_scheme",
]
