"""RPTQ: reorder activation channels into clusters of similar range, then quantize per cluster.

Paper: RPTQ (Yuan et al., arXiv:2304.01089).

Two passes, the exact half and the lossy half:

``RPTQReorder`` (exact, ``rptq_reorder(clusters=4)``). Identity relied on:
``Y = X W^T = (X P)(W P)^T`` for a permutation ``P`` of the channels, and every op between the
producers and the consumers of a channel group (norms, residual adds, elementwise ops) is
permutation-equivariant if its per-channel parameters (norm gains and biases) are permuted too.
For every channel group of :mod:`compiler.depgraph` that passes ``permute`` and has one leaf
axis (the residual stream: embeddings, every writer and reader, norm gains and biases, the LM
head; an MLP's hidden channels), the channels are clustered by their calibration ``(min, max)``
at the group's linear inputs (k-means, below), and the permutation that sorts them by cluster
is applied to every member parameter (``ChannelGroup.param_indices``). Nothing is added to the
graph: no runtime gather. The cluster boundaries are recorded for the lossy half in
``gm.meta["fxcompress_clusters"][<linear>:in] = [0, o_1, ..., C]`` (contiguous after the
reorder). Skipped with a note: groups with several leaf axes (attention heads: a per-head
permutation of ``head_dim`` would need a per-head choice, and rotary embeddings fix the
``q``/``k`` order), groups some op does not let a permutation through (the logits), opaque groups.

Clustering: each channel is a point of its ``(min, max)`` at every linear input of the group,
each site's values divided by that site's abs-max so all sites weigh alike (one site: the
paper's 2-D points). Lloyd's k-means in torch (vectorised, float64), initialised
deterministically at the quantiles of the channels' total range (so no seed is needed and a
second run on the reordered graph finds the same clusters); clusters are ordered by their
centroid's range, channels within a cluster keep their relative order. A second run therefore
finds the identity permutation and reports ``modified=False``.

``InsertQDQClusters`` (lossy, ``insert_qdq_clusters``). Identity relied on:
``X W^T = sum_k X[:, c_k] W[:, c_k]^T`` over the contiguous clusters ``c_k``. Each linear
whose input has recorded clusters becomes one linear per cluster, reading a slice of the input
quantized with its own static per-tensor int8 scale (``absmax`` of that cluster /127) and the
matching column slice of the int8 weight (per output channel, symmetric, as ``insert_qdq
(scheme=w8a8)``), summed; the bias is added once. So activations get one scale per cluster in
the graph *and* in ONNX: every partial linear is the ``linear(DQ_t(Q_t(x)), DQ_ch(W_q))``
pattern that :mod:`backends.ort_quant` lowers to ``MatMulIntegerToFloat`` (one per cluster, plus
``Slice`` and ``Add``). Linears without recorded clusters get one cluster (plain static W8A8)
and a note. The LM head stays float.

Preconditions: ``canonical`` and ``calibrated`` for both; ``RPTQReorder`` must run before any
Q/DQ insertion (checked: a quantized graph raises :class:`PreconditionError`).

Hyper-parameters:
    clusters (int, default 4): k of k-means per group (capped at the channel count).
    iterations (int, default 50): Lloyd iterations.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import fx

from compiler import ir
from compiler.depgraph import ChannelGroup, ChannelGroupsAnalysis
from compiler.errors import PassError, PreconditionError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.qdq import (
    ActQuantSpec,
    WeightQuantSpec,
    activation_scale,
    is_dequantized,
    is_lm_head,
    quantize_weight_per_channel,
    set_qdq_meta,
)

log = logging.getLogger(__name__)
qd = torch.ops.quantized_decomposed

#: ``gm.meta`` key of the recorded cluster boundaries (site -> offsets)
CLUSTERS_META = "fxcompress_clusters"
#: the pass recorded on the nodes :class:`InsertQDQClusters` creates
_CREATED_BY = "insert_qdq_clusters"


# ----------------------------------------------------------------------------- clustering


def kmeans_clusters(points: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """Cluster id of every row of ``points`` ``[C, D]``, ids ordered by centroid range.

    Deterministic: centroids start at the points at the quantiles of their total range
    (``sum(max - min)`` over sites), so the result depends only on the set of points.

    Returns:
        LongTensor ``[C]`` of cluster ids in ``[0, k')`` (``k' <= k``: empty clusters dropped),
        id 0 the cluster of smallest range.
    """
    pts = points.to(torch.float64)
    c = pts.shape[0]
    k = max(1, min(int(k), c))
    rng = (pts[:, 1::2] - pts[:, 0::2]).sum(dim=1)
    order = torch.argsort(rng, stable=True)
    pick = order[((torch.arange(k, dtype=torch.float64) + 0.5) * c / k).long().clamp(max=c - 1)]
    cent = pts[pick].clone()
    assign = torch.zeros(c, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(pts, cent).argmin(dim=1)
        counts = torch.bincount(new, minlength=k).to(torch.float64)
        sums = torch.zeros_like(cent).index_add_(0, new, pts)
        cent = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], cent)
        if torch.equal(new, assign) and _ > 0:
            break
        assign = new
    used = torch.unique(assign)
    crange = (cent[:, 1::2] - cent[:, 0::2]).sum(dim=1)[used]
    rank = torch.empty(k, dtype=torch.long)
    rank[used[torch.argsort(crange, stable=True)]] = torch.arange(used.numel())
    return rank[assign]


def cluster_permutation(ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The permutation sorting channels by cluster (stable) and the cluster offsets.

    Returns:
        ``(perm, offsets)``: new channel ``i`` is old channel ``perm[i]``; cluster ``j`` holds
        new channels ``offsets[j]:offsets[j + 1]``.
    """
    perm = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids).tolist()
    offsets = [0]
    for n in counts:
        if n:
            offsets.append(offsets[-1] + n)
    return perm, offsets


# ----------------------------------------------------------------------------- reorder pass


def _group_linear_sites(gm: fx.GraphModule, g: ChannelGroup) -> list[tuple[str, fx.Node]]:
    """``(<linear>:in site, linear node)`` of the group's consumers (the LM head excepted)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out = []
    for m in g.members:
        n = by_name.get(m.op)
        if m.role == "in" and n is not None and ir.is_op(n, ir.LINEAR) and not is_lm_head(n):
            out.append((ir.site(n, "in"), n))
    return out


class RPTQReorder(Pass):
    """Reorder channel groups by calibration-range clusters; see the module docstring."""

    name = "rptq_reorder"
    forbids = frozenset({"quantized"})
    exact = True
    requires = frozenset({"canonical", "calibrated"})

    def __init__(self, *, clusters: int = 4, iterations: int = 50):
        for opt, val in (("clusters", clusters), ("iterations", iterations)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"rptq_reorder: {opt} must be a positive integer, got {val!r}")
        self.clusters = clusters
        self.iterations = iterations

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        self.check_not_quantized(gm, ctx, "reorder before quantizing")
        ctx.require_calibration("rptq_reorder")
        from compiler.stats import ActivationStats, linear_input_sites

        # decide
        groups = ctx.analysis(ChannelGroupsAnalysis, gm)
        notes: list[str] = []
        todo: list[tuple[ChannelGroup, list[tuple[str, fx.Node]]]] = []
        for g in groups:
            sites = _group_linear_sites(gm, g)
            if not sites:
                continue
            if g.opaque:
                notes.append(f"{g.name}: skipped, opaque group ({'; '.join(g.notes)[:120]})")
            elif len(g.leaves) != 1:
                notes.append(f"{g.name}: skipped, {len(g.leaves)} leaf axes "
                             f"({', '.join(lf.label for lf in g.leaves)}); only single-axis "
                             "groups are reordered")
            elif not g.transparent("permute"):
                b = g.blockers("permute")[0]
                notes.append(f"{g.name}: skipped, {b.op} at {b.site} blocks a permutation")
            else:
                todo.append((g, sites))
        if not todo:
            return PassResult.unchanged(gm, notes, groups_reordered=0)
        # every linear input, not only the reordered groups': the same one sweep, and the
        # statistics handed on (permuted) then cover the per-cluster Q/DQ pass's sites
        table_key = dict(sites=frozenset(s for _, ss in todo for s, _ in ss)
                         | frozenset(linear_input_sites(gm)), covariance=frozenset())
        table = ctx.analysis(ActivationStats, gm, **table_key)
        plans = []
        for g, sites in todo:
            feats = []
            # one point coordinate pair per distinct tensor (q/k/v read the same one)
            reps = {table.tensor_of(s): s for s, _ in reversed(sites)}
            widths = {s: table[s].min.numel() for s in reps.values()}
            odd = [s for s, w in widths.items() if w != g.leaves[0].size]
            if odd:  # a linear reading more than the group's channels (a concatenation)
                notes.append(f"{g.name}: skipped, {odd[0]} reads {widths[odd[0]]} channels, the "
                             f"group has {g.leaves[0].size}")
                continue
            for s in reps.values():
                st = table[s]
                norm = float(st.absmax.max()) or 1.0
                feats.append(torch.stack([st.min / norm, st.max / norm], dim=1))
            points = torch.cat(feats, dim=1)
            if points.shape[0] != g.leaves[0].size:
                raise PassError(f"rptq_reorder: group {g.name}: statistics have "
                                f"{points.shape[0]} channels, the group {g.leaves[0].size}")
            ids = kmeans_clusters(points, self.clusters, self.iterations)
            perm, offsets = cluster_permutation(ids)
            plans.append((g, sites, perm, offsets))
        if not plans:
            return PassResult.unchanged(gm, notes, groups_reordered=0)

        # mutate
        meta = gm.meta.setdefault(CLUSTERS_META, {})
        reordered = 0
        for g, sites, perm, offsets in plans:
            for s, _ in sites:
                meta[s] = list(offsets)
            if torch.equal(perm, torch.arange(perm.numel())):
                continue
            for (target, dim), idx in g.param_indices({g.leaves[0].id: perm}).items():
                p = ir.get_param(gm, target)
                ir.set_param(gm, target, p.index_select(dim, idx))
            reordered += 1
            log.debug("rptq_reorder: %s: %d channels, clusters %s", g.name, perm.numel(),
                      [b - a for a, b in itertools.pairwise(offsets)])
        if not reordered:
            return PassResult.unchanged(gm, notes, groups_reordered=0)
        gm.recompile()
        log.info("rptq_reorder(clusters=%d): %d groups reordered, %d skipped", self.clusters,
                 reordered, len(notes))
        result = PassResult(gm, True, frozenset({"channel_groups"}),
                            {"groups_reordered": reordered, "groups_skipped": len(notes)}, notes)
        result.analyses.append((ActivationStats, table_key,
                                permuted_stats(gm, groups, table, plans)))
        return result


def permuted_stats(gm: fx.GraphModule, groups, table, plans):
    """The activation statistics after the reorder in ``plans``, derived exactly from ``table``:
    every observed tensor with a channel dim in a reordered group has its per-channel statistics
    gathered by that group's permutation (its histogram is unchanged); the rest are unchanged."""
    choice = {g.leaves[0].id: perm for g, _, perm, _ in plans}
    nodes = {n.name: n for n in gm.graph.nodes}
    perms = {}
    for t in set(table.site_to_tensor.values()):
        idx = groups.dim_index(nodes[t], -1, choice)
        if idx is not None and not torch.equal(idx, torch.arange(idx.numel())):
            perms[t] = idx
    return table.permuted(perms)


# ----------------------------------------------------------------------------- per-cluster Q/DQ


class InsertQDQClusters(Pass):
    """W8A8 with one static activation scale per contiguous channel cluster (RPTQ's lossy half)."""

    name = "insert_qdq_clusters"
    exact = False
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"quantized"})

    def __init__(self, *, quantize_lm_head: bool = False):
        if not isinstance(quantize_lm_head, bool):
            raise TypeError(f"insert_qdq_clusters: quantize_lm_head must be a bool, "
                            f"got {quantize_lm_head!r}")
        self.quantize_lm_head = quantize_lm_head

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        meta = gm.meta.get(CLUSTERS_META, {})
        # decide
        todo, notes = [], []
        for n in gm.graph.nodes:
            if not ir.is_op(n, ir.LINEAR):
                continue
            x, w, _ = ir.linear_parts(n)
            s = ir.site(n, "in")
            if is_dequantized(w) or is_dequantized(x):
                continue
            if ir.param_node(w) is None:
                notes.append(f"{s}: skipped, weight is not a parameter")
            elif not self.quantize_lm_head and is_lm_head(n):
                notes.append(f"{s}: skipped, LM head left float (quantize_lm_head=False)")
            else:
                width = ir.get_param(gm, w).shape[1]
                offsets = meta.get(s)
                if offsets is None:
                    notes.append(f"{s}: no recorded clusters, one scale for the whole tensor")
                    offsets = [0, width]
                if offsets[0] != 0 or offsets[-1] != width or sorted(offsets) != list(offsets):
                    raise PreconditionError(f"insert_qdq_clusters: site {s}: cluster offsets "
                                            f"{offsets} do not partition {width} channels")
                todo.append((n, s, list(offsets)))
        if not todo:
            return PassResult.unchanged(gm, notes, linears_quantized=0)
        ctx.require_calibration("insert_qdq_clusters (static activation scales)")
        from compiler.stats import ActivationStats

        table = ctx.analysis(ActivationStats, gm, sites=frozenset(s for _, s, _ in todo),
                             covariance=frozenset())
        act = ActQuantSpec("static")
        plans = []
        for n, s, offsets in todo:
            amax = table[s].absmax
            scales = [activation_scale(float(amax[a:b].max()), act)
                      for a, b in itertools.pairwise(offsets)]
            plans.append((n, s, offsets, scales))

        # mutate
        spec = WeightQuantSpec(8, None, True)
        act_cache: dict[tuple, fx.Node] = {}
        slices = 0
        for n, _site, offsets, scales in plans:
            slices += _split_linear(gm, n, offsets, scales, spec, act, act_cache)
        gm.graph.eliminate_dead_code()
        removed = ir.remove_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        stats = {"linears_quantized": len(plans), "cluster_linears": slices,
                 "act_qdq_static": len(act_cache), "params_removed": removed}
        log.info("insert_qdq_clusters: %d linears as %d per-cluster int8 linears", len(plans),
                 slices)
        return PassResult(gm, True, frozenset(), stats, notes)


def _split_linear(gm: fx.GraphModule, n: fx.Node, offsets: list[int], scales: list[float],
                  spec: WeightQuantSpec, act: ActQuantSpec, cache: dict) -> int:
    """Replace ``n`` by a sum of per-cluster int8 linears; returns the number of parts."""
    g = gm.graph
    x, w, b = ir.linear_parts(n)
    q, wscale = quantize_weight_per_channel(ir.get_param(gm, w), spec)  # W: [out, in]
    base = str(w.target)
    sn = ir.add_param(gm, f"{base}_scale", wscale, before=n)
    parts = []
    for k, (a, e) in enumerate(itertools.pairwise(offsets)):
        key = (x, a, e, scales[k])
        if key not in cache:
            with g.inserting_after(x):
                sl = g.call_function(torch.ops.aten.slice.Tensor, (x, -1, a, e))
            with g.inserting_after(sl):
                qn = g.call_function(qd.quantize_per_tensor.default,
                                     (sl, scales[k], 0, act.qmin, act.qmax, torch.int8))
            with g.inserting_after(qn):
                dq = g.call_function(qd.dequantize_per_tensor.default,
                                     (qn, scales[k], 0, act.qmin, act.qmax, torch.int8))
            xval = x.meta.get("val")
            sval = xval[..., a:e] if isinstance(xval, torch.Tensor) else None
            set_qdq_meta(sl, x, sval, created_by=_CREATED_BY)
            set_qdq_meta(qn, x, sval.to(torch.int8) if sval is not None else None,
                         created_by=_CREATED_BY)
            set_qdq_meta(dq, x, sval, created_by=_CREATED_BY)
            cache[key] = dq
        qk = ir.add_param(gm, f"{base}_int8_c{k}", q[:, a:e].contiguous(), before=n)
        with g.inserting_before(n):
            wdq = g.call_function(qd.dequantize_per_channel.default,
                                  (qk, sn, None, 0, spec.qmin, spec.qmax, torch.int8))
            lin = g.call_function(ir.LINEAR, (cache[key], wdq, b if k == 0 else None))
        set_qdq_meta(wdq, n, None, created_by=_CREATED_BY)
        set_qdq_meta(lin, n, n.meta.get("val"), created_by=_CREATED_BY)
        parts.append(lin)
    out = parts[0]
    for p in parts[1:]:
        with g.inserting_before(n):
            out = g.call_function(torch.ops.aten.add.Tensor, (out, p))
        set_qdq_meta(out, n, n.meta.get("val"), created_by=_CREATED_BY)
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return len(parts)


__all__ = [
    "CLUSTERS_META",
    "InsertQDQClusters",
    "RPTQReorder",
    "cluster_permutation",
    "kmeans_clusters",
]
