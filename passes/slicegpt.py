"""SliceGPT: rotate the residual stream onto its principal components (exact), then slice it.

Paper: SliceGPT (Ashkboos et al., arXiv:2401.15024).

Identity relied on: for orthogonal ``Q`` (``Q Q^T = I``) and a gain-free RMSNorm,
``rms_norm(x Q) = rms_norm(x) Q``, so the residual stream can be stored rotated, ``x Q``, with
the rotation folded into its writers and readers: an embedding table ``E <- E Q``, a writer
``W: [d, in] <- Q^T W`` (and its bias ``Q^T b``), a reader ``W: [out, d] <- W Q``. Each residual
tensor read by a norm gets its own basis ``Q_i`` (the PCA of that norm's output on calibration
data: attention input and MLP input of every block, and the final norm), as in the paper; where
a residual add combines a skip path stored in basis ``Q_a`` with a block output written in
basis ``Q_c``, a *shortcut* linear ``x (Q_a^T Q_c)`` is inserted on the skip path.

Slicing keeps the first ``k`` principal directions: the same algebra with the rectangular
``Q[:, :k]``. The normalisation of a sliced RMSNorm still divides by the original width ``d``
(as the paper's implementation does): ``x / sqrt(sum(x^2)/d + eps) =
sqrt(d/k) * rms_norm_k(x, eps * d / k)``, so the norm becomes ``rms_norm(x, [k], None,
eps*d/k)`` and ``sqrt(d/k)`` is folded into its readers. With ``k = d`` slicing is the rotation.

Sites rewritten: the residual stream found by the channel dependency graph (see
:func:`passes.rotation_invariant.residual_stream`): embedding tables, writers, readers, residual
adds (shortcuts), norms and shape-only ops on the stream (their literal ``d`` becomes ``k``).
Nothing is skipped: an op on the stream that is not understood raises ``PassError`` before any
mutation. The graph is first brought to the rotation-invariant form
(:mod:`passes.rotation_invariant`, exact) if it is not in it.

Preconditions: ``canonical``; ``calibrated`` (covariance of every norm output); not yet
quantized (the pass manager rejects it after ``insert_qdq``). ``SliceGPTRotate``
is exact; ``SliceGPT`` is lossy. Both establish ``rotation_invariant``. A second
``SliceGPTRotate`` reports ``modified=False``.

Hyper-parameters:
    basis ("global" | "per_norm", default "global"): one basis, the PCA of the norm inputs'
        summed covariances, and no shortcut matrices; or one PCA basis per norm input with a
        shortcut matrix on every residual skip path (the paper). Why ``global`` is the default
        (measured, ``benchmarks/bench_slicegpt.py``): on stories260K it is at most 1% worse on
        TinyStories from 10% to 50% (and up to 11% better), better on WikiText-2 at every
        sparsity (25%: 226 vs 252), and the shortcuts cost ``2 k^2`` per block: on the 134M
        model (ffn only 2.7x hidden) they make 25% slicing compute 87% of the dense model's
        FLOPs instead of 80%, which puts the paper's variant below a 1.2x speed-up.
    sparsity (SliceGPT, default 0.25): fraction of the hidden dimension removed, in [0, 1).
    round_to (SliceGPT, default 8): the kept width ``(1 - sparsity) d`` is rounded down to a
        multiple of this (at least ``round_to``).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import fx

from compiler import ir
from compiler.errors import PassError, PreconditionError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.pass_manager import propagate_shapes
from compiler.stats import ActivationStats, site_map
from passes.rotation_invariant import (
    ResidualStream,
    is_rotation_invariant,
    make_rotation_invariant,
    residual_stream,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten

BASES = ("per_norm", "global")
_MARK = "fxcompress_slicegpt_rotated"
#: ``gm.meta`` key: per basis, the variance kept (read by the compile report)
VARIANCE_META = "fxcompress_slicegpt_variance"


def pca_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric covariance.

    Args:
        cov: ``[d, d]`` symmetric matrix (``X^T X / n``).

    Returns:
        ``(eigenvalues [d], Q [d, d])`` in float64, principal direction ``i`` in ``Q[:, i]``.
    """
    cov = cov.double()
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def sliced_width(width: int, sparsity: float, round_to: int) -> int:
    """The kept hidden width: ``(1 - sparsity) * width`` rounded down to a multiple of ``round_to``.

    Raises:
        PreconditionError: ``round_to`` is larger than ``width``.
    """
    if round_to > width:
        raise PreconditionError(f"slicegpt: round_to={round_to} is larger than the hidden size "
                                f"{width}")
    k = math.floor((1.0 - sparsity) * width + 1e-9)
    return max(round_to, (k // round_to) * round_to)


# ----------------------------------------------------------------------------- decide


def basis_keys(rs: ResidualStream) -> dict[int, str]:
    """Stream id -> the name of the norm whose PCA basis the stream is stored in.

    A stream read by a norm uses that norm's basis; a norm's output uses its input's; a stream
    read by no norm (a writer's output, an embedding) uses the basis of the add it flows into.

    Raises:
        PassError: a residual tensor reaches neither a norm nor an add.
    """
    keys: dict[int, str] = {}
    nodes_of: dict[int, list[fx.Node]] = {}
    for n, s in rs.stream.items():
        nodes_of.setdefault(s, []).append(n)
    norm_streams = set(rs.norm_of_stream)
    norms = set(rs.norms)
    adds = set(rs.adds)

    def key(s: int) -> str:
        if s in keys:
            return keys[s]
        if s in norm_streams:
            norm = rs.norm_of_stream[s]
            keys[s] = key(rs.stream[norm.args[0]])
            return keys[s]
        users = [u for n in nodes_of[s] for u in n.users]
        readers = [u for u in users if u in norms]
        if readers:
            keys[s] = readers[0].name
            return keys[s]
        into = [u for u in users if u in adds]
        if into:
            keys[s] = key(rs.stream[into[0]])
            return keys[s]
        where = nodes_of[s][0]
        raise PassError(f"residual tensor {where.name} at {ir.site(where) or '<top>'} reaches no "
                        "norm and no residual add; no PCA basis to store it in")

    for s in nodes_of:
        key(s)
    return keys


def _norm_sites(gm: fx.GraphModule, rs: ResidualStream) -> dict[str, str]:
    """Norm name -> the stats site observing its output (the input of its first reader)."""
    node_site: dict[fx.Node, str] = {}
    for s, n in site_map(gm).items():
        node_site.setdefault(n, s)
    out = {}
    for norm in rs.norms:
        readers = rs.readers_of(norm)
        if not readers:
            raise PassError(f"norm {norm.name} at {ir.site(norm)} has no linear reader to observe")
        out[norm.name] = node_site[readers[0].args[0]]
    return out


def residual_bases(gm: fx.GraphModule, ctx: PassContext, rs: ResidualStream, basis: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PCA bases (float64, ``[d, d]``) and eigenvalues per norm name, from calibration data."""
    sites = _norm_sites(gm, rs)
    table = ctx.analysis(ActivationStats, gm, sites=frozenset(sites.values()),
                         covariance=frozenset(sites.values()))
    covs = {name: table.covariance(site).double() for name, site in sites.items()}
    if basis == "global":
        total = sum(covs.values()) / len(covs)
        vals, q = pca_basis(total)
        return {k: q for k in covs}, {k: vals for k in covs}
    bases, eig = {}, {}
    for name, c in covs.items():
        eig[name], bases[name] = pca_basis(c)
    return bases, eig


# ----------------------------------------------------------------------------- mutate


def _set(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    ir.set_param(gm, node, value.to(ir.get_param(gm, node).dtype))


def rotate_residual(gm: fx.GraphModule, rs: ResidualStream, keys: dict[int, str],
                    bases: dict[str, torch.Tensor], width: int) -> dict[str, int]:
    """Store the residual stream of ``gm`` in the given bases, keeping ``width`` directions.

    Args:
        gm: a rotation-invariant GraphModule, mutated in place.
        rs: its residual stream; keys: stream id -> basis name (:func:`basis_keys`).
        bases: basis name -> orthogonal ``[d, d]`` (float64), directions in columns.
        width: kept directions ``k <= d`` (``k == d`` is an exact rotation).

    Returns:
        Counters: ``tables``, ``writers``, ``readers``, ``shortcuts``, ``norms``, ``shape_ops``.
    """
    d = rs.width
    q = {name: b[:, :width] for name, b in bases.items()}
    stats = dict.fromkeys(("tables", "writers", "readers", "shortcuts", "norms", "shape_ops"), 0)
    # A parameter may be both a writer and a reader (a shortcut from an earlier rotation):
    # each side is transformed once.
    done: set[tuple[str, str]] = set()

    def once(node: fx.Node, side: str) -> bool:
        t = (str(node.target), side)
        if t in done:
            return False
        done.add(t)
        return True

    for src in rs.sources:
        w = src.args[0]
        if ir.param_node(w) is None:
            raise PassError(f"embedding {src.name} at {ir.site(src)}: table is not a parameter")
        if once(w, "table"):
            _set(gm, w, ir.get_param(gm, w).double() @ q[keys[rs.stream[src]]])
            stats["tables"] += 1
    for wr in rs.writers:
        _, wn, bn = ir.linear_parts(wr)
        qk = q[keys[rs.stream[wr]]]
        if once(wn, "out"):
            _set(gm, wn, qk.T @ ir.get_param(gm, wn).double())  # W: [d, in] -> [k, in]
            stats["writers"] += 1
        if ir.param_node(bn) is not None and once(bn, "out"):
            _set(gm, bn, qk.T @ ir.get_param(gm, bn).double())
    scale = math.sqrt(d / width)
    for r in rs.readers:
        _, wn, _ = ir.linear_parts(r)
        s_in = rs.stream[r.args[0]]
        factor = scale if s_in in rs.norm_of_stream else 1.0
        if once(wn, "in"):
            _set(gm, wn, ir.get_param(gm, wn).double() @ q[keys[s_in]] * factor)  # W: [out, k]
            stats["readers"] += 1
    for add in rs.adds:
        kc = keys[rs.stream[add]]
        for i, x in enumerate(add.args[:2]):
            kx = keys[rs.stream[x]]
            if kx == kc:
                continue
            m = bases[kc][:, :width].T @ bases[kx][:, :width]  # linear(x, M) = x Q_x^T Q_c
            path = ir.module_path(add) or "residual"
            wnode = ir.add_param(gm, f"{path}.slicegpt_shortcut", m.float(), before=add)
            with gm.graph.inserting_before(add):
                sc = gm.graph.call_function(ir.LINEAR, (x, wnode))
            ir.copy_meta(add, sc, created_by="slicegpt")
            args = list(add.args)
            args[i] = sc
            add.args = tuple(args)
            stats["shortcuts"] += 1
    if width != d:
        for n in rs.norms:
            eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
            if eps is None:
                eps = torch.finfo(torch.float32).eps
            n.args = (n.args[0], [width], None, eps * d / width)
            stats["norms"] += 1
        for n in rs.passes:
            new = [_resize(a, d, width) for a in n.args]
            if new != list(n.args):
                n.args = tuple(new)
                stats["shape_ops"] += 1
    return stats


def _resize(arg, d: int, k: int):
    if isinstance(arg, (list, tuple)):
        return type(arg)(k if (isinstance(a, int) and not isinstance(a, bool) and a == d) else a
                         for a in arg)
    return arg


def slice_residual(gm: fx.GraphModule, ctx: PassContext | None, *, basis: str,
                   sparsity: float | None, round_to: int, who: str) -> PassResult:
    """Shared body of :class:`SliceGPTRotate` (``sparsity=None``) and :class:`SliceGPT`."""
    if ctx is None:
        raise PreconditionError(f"{who} needs calibration data; run it through compile() with "
                                "calibration=[input_ids, ...]")
    ctx.require_calibration(who)
    if sparsity is None and gm.meta.get(_MARK):
        return PassResult.unchanged(gm, notes=["residual stream already rotated by slicegpt"])
    params_before = ir.count_params(gm)
    probe = ctx.probe_inputs
    if probe is None:
        probe = torch.zeros(2, 8, dtype=torch.long)
    pre = {}
    if not is_rotation_invariant(gm):
        pre = make_rotation_invariant(gm, probe=probe)
        ctx.analyses.invalidate(frozenset())
    # decide
    rs = residual_stream(gm)
    d = rs.width
    width = d if sparsity is None else sliced_width(d, sparsity, round_to)
    keys = basis_keys(rs)
    bases, eig = residual_bases(gm, ctx, rs, basis)
    if basis == "global":
        # one basis everywhere: every add's operands agree, so no shortcut is needed
        first = next(iter(bases))
        keys = dict.fromkeys(keys, first)
        bases, eig = {first: bases[first]}, {first: eig[first]}
    kept = {n: float(v[:width].clamp(min=0).sum() / v.clamp(min=0).sum()) for n, v in eig.items()}
    # mutate
    stats = rotate_residual(gm, rs, keys, bases, width)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, probe, f"after {who}")
    gm.meta[_MARK] = True
    stats.update({f"rotation_invariant_{k}": v for k, v in pre.items() if v})
    stats.update(hidden_before=d, hidden_after=width, bases=len(set(keys.values())),
                 params_before=params_before, params_after=ir.count_params(gm),
                 min_variance_kept=round(min(kept.values()), 4))
    where = {n.name: ir.site(n) or n.name for n in rs.norms}
    # for the compile report (compiler.report_capture): the kept variance of every basis
    gm.meta[VARIANCE_META] = [
        {"basis": "global (all norm inputs)" if basis == "global" else where.get(name, name),
         "kept": frac, "width": width, "total": d, "cumulative": _cumulative(eig[name])}
        for name, frac in kept.items()]
    notes = [f"stream read by {where.get(name, name)}: {width}/{d} directions keep "
             f"{frac:.2%} of the variance" for name, frac in kept.items()] if width != d else []
    log.info("%s: hidden %d -> %d, %d bases, %d shortcuts, params %d -> %d", who, d, width,
             stats["bases"], stats["shortcuts"], params_before, stats["params_after"])
    return PassResult(gm, True, frozenset(), stats, notes)


def _cumulative(eigenvalues: torch.Tensor, points: int = 256) -> list[float]:
    """Fraction of the variance kept by the first ``k`` directions, at <= ``points`` values of
    ``k`` (``k = 1 .. d``, evenly spaced; the curve is monotone so nothing is hidden)."""
    v = eigenvalues.clamp(min=0).double()
    frac = v.cumsum(0) / v.sum().clamp(min=1e-300)
    idx = torch.linspace(0, len(frac) - 1, min(points, len(frac))).round().long()
    return [round(float(f), 5) for f in frac[idx]]


def _check_basis(who: str, basis: str) -> None:
    if basis not in BASES:
        raise ValueError(f"{who}: basis must be one of {BASES}, got {basis!r}")


class SliceGPTRotate(Pass):
    """Rotate the residual stream onto its PCA basis (or per-norm bases + shortcuts); exact."""

    name = "slicegpt_rotate"
    exact = True
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"rotation_invariant"})
    forbids = frozenset({"quantized"})  # rotating Q/DQ'd weights would mix their grids

    def __init__(self, *, basis: str = "global"):
        _check_basis(self.name, basis)
        self.basis = basis

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        self.check_not_quantized(gm, ctx, "rotate before quantizing")
        return slice_residual(gm, ctx, basis=self.basis, sparsity=None, round_to=1, who=self.name)


class SliceGPT(Pass):
    """Rotate the residual stream onto its principal components and keep the first ``k``; lossy."""

    name = "slicegpt"
    exact = False
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"rotation_invariant"})
    forbids = frozenset({"quantized"})

    def __init__(self, *, sparsity: float = 0.25, round_to: int = 8, basis: str = "global"):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
                or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"slicegpt: sparsity must be a number in [0, 1), got {sparsity!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"slicegpt: round_to must be a positive int, got {round_to!r}")
        _check_basis(self.name, basis)
        self.sparsity = float(sparsity)
        self.round_to = round_to
        self.basis = basis

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        self.check_not_quantized(gm, ctx, "slice before quantizing")
        return slice_residual(gm, ctx, basis=self.basis, sparsity=self.sparsity,
                              round_to=self.round_to, who=self.name)


__all__ = [
    "BASES",
    "VARIANCE_META",
    "SliceGPT",
    "SliceGPTRotate",
    "basis_keys",
    "pca_basis",
    "residual_bases",
    "rotate_residual",
    "slice_residual",
    "sliced_width",
]
