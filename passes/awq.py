"""AWQ: activation-aware per-channel weight scaling and clipping, then group-wise int4 weights.

Paper: AWQ (Lin et al., arXiv:2306.00978).

Identity relied on: ``Y = X W^T = (X diag(s)^-1) (W diag(s))^T`` for positive ``s`` (the
SmoothQuant identity): scaling up the weight columns of salient input channels (large mean
``|x|``) before rounding protects them, and the division by ``s`` is folded exactly into the
producer of ``X`` (a norm's gain, or the rows of a previous linear) through the same channel-graph
folding as :mod:`passes.smoothquant` (:func:`passes.smoothquant.find_smoothing_sites`,
:func:`passes.smoothquant.fold_smoothing_scales`). Only the rounding is lossy.

Per block (:mod:`compiler.blockwise`, inputs from the float model as in the reference code),
for every tensor read by quantized linears whose producer can absorb a scale:

- scales: ``s = mean|x|^a`` (normalized by ``sqrt(max s * min s)``), ``a`` on the grid
  ``0, 1/20, ..., 19/20``; the chosen ``a`` minimizes the squared error of the output of the
  sub-block holding the readers (the attention or the MLP output, before the residual add; the
  block's output where there is no such add) when the tensor's readers are rounded
  (``Q(W diag(s)) diag(s)^-1``) and everything else stays float; only that sub-block runs, from
  the tensor's stored values (as the reference calls the sub-module on its cached input);
  ``a = 0`` (``s = 1``) is on the grid, so the search never does worse than rounding. Under
  grouped-query attention the value -> output projection tensor is scaled too (one scale per
  value channel, shared by the query heads reading it); the reference skips it there because its
  folding needs equal shapes (stories260K, W4 g64: 4.9247 with it, 4.9249 without);
- then the weight clipping search: per output row and group, the clip range
  ``max|W| * (1 - i/20)``, ``i < 10``, minimizing the group's partial output error on 512
  sampled tokens of the (scaled) input; linears whose outputs are attention queries or keys are
  not clipped (their error is amplified by the softmax; as the reference code).

Then every selected linear is rounded to nearest on the grid of ``insert_qdq(scheme=w4a16)``
(same Q/DQ form, so ``MatMulNBits`` and the Triton W4A16 lowering apply unchanged).

Sites rewritten: as :func:`passes.insert_qdq.annotate` decides for ``w4a16`` (``include`` /
``exclude`` patterns, LM head only with ``quantize_lm_head``). Skipped with a note: tensors whose
producer cannot absorb a scale (residual adds, shared parameters: see SmoothQuant's notes), weights
shared with another op (not clipped), linears outside the decoder blocks.

Preconditions: ``canonical``, ``calibrated``, not quantized yet. Establishes ``quantized``.
Lossy. Preserves no analysis. The graph's parameters are rescaled and clipped block by block
during calibration and restored if anything fails before the Q/DQ insertion.

Hyper-parameters:
    bits (int, default 4): 4 only for now (8-bit AWQ brings nothing over int8 rounding).
    group_size (int, default 128): 32, 64, 128 or -1 (one group per row).
    sym (bool | None, default None): symmetric int4 grid; None = asymmetric (zero points).
    clip (bool, default True): run the weight clipping search.
    include, exclude, quantize_lm_head: site selection as in ``insert_qdq``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import fx

from compiler import ir
from compiler.blockwise import Block, BlockRunner, BlockVisitor, run_blockwise
from compiler.depgraph import ChannelGroupsAnalysis
from compiler.ir import is_shared_param as _shared_param
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.qdq import (
    QuantAnnotation,
    WeightQuantSpec,
    quantize_weight_per_group,
    resolve_weight_spec,
    rewrite_sites,
    select_sites,
)
from compiler.qdq import dequantize_weight as dequantize
from compiler.qdq import site_patterns as _patterns
from passes.smoothquant import SmoothingSite, find_smoothing_sites, fold_smoothing_scales

log = logging.getLogger(__name__)

#: grid points of the scale exponent search
SCALE_GRID = 20
#: grid points of the clip search, and the largest shrink tried
CLIP_GRID = 20
MAX_SHRINK = 0.5
#: tokens sampled for the clip search, and output rows per chunk (memory)
CLIP_TOKENS = 512
CLIP_ROWS = 64


def fake_quantize(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Round ``w`` to nearest on the site's grid and dequantize (what the graph computes)."""
    q, s, zp = quantize_weight_per_group(w, spec)
    return dequantize(q, s, zp, spec).to(w.dtype)


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Per ``(row, group)`` clip bound minimizing the group's partial output error.

    Args:
        w: ``[out, in]`` weight (already scaled).
        x: ``[tokens, in]`` sampled input (already scaled).
        spec: the site's grid.

    Returns:
        ``[out, in / g]`` bounds (``max|W|`` of the group where no shrink helps).
    """
    out_f, in_f = w.shape
    g = spec.group_size
    ng = in_f // g
    xg = x.to(torch.float32).reshape(1, -1, ng, g)  # [1, tokens, ng, g]
    best_all = []
    for r0 in range(0, out_f, CLIP_ROWS):
        wr = w[r0:r0 + CLIP_ROWS].to(torch.float32).reshape(-1, 1, ng, g)  # [rows, 1, ng, g]
        org = (xg * wr).sum(-1)  # [rows, tokens, ng]
        amax = wr.abs().amax(dim=-1, keepdim=True)  # [rows, 1, ng, 1]
        best = amax.clone()
        best_err = torch.full(amax.shape[:1] + amax.shape[2:3], float("inf"))
        for i in range(int(MAX_SHRINK * CLIP_GRID)):
            mx = amax * (1 - i / CLIP_GRID)
            cw = torch.clamp(wr, -mx, mx).reshape(-1, in_f)
            qw = fake_quantize(cw, spec).reshape(-1, 1, ng, g)
            err = ((xg * qw).sum(-1) - org).pow(2).mean(dim=1)  # [rows, ng]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[:, None, :, None], mx, best)
        best_all.append(best[:, 0, :, 0])
    return torch.cat(best_all)


def feeds_attention_scores(node: fx.Node) -> bool:
    """True if a linear's output reaches the query or key of an attention op before any linear."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if ir.is_op(u, ir.SDPA):
                if n in u.args[:2]:
                    return True
                continue
            if ir.is_op(u, ir.LINEAR) or u.op != "call_function":
                continue
            frontier.append(u)
    return False


def _first_tensor(out):
    """The block's output tensor (the epilogue may return a tuple of logits)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _inspected_output(block: Block, s: SmoothingSite) -> fx.Node | None:
    """The output of the sub-block holding the site's readers (the attention or MLP output: the
    operand that the first residual add after them adds to the stream), or None (then the block
    output is compared). Its error equals that of the add, whose other operand is unchanged."""
    stream = {block.input}
    last = max(block.nodes.index(c) for c in s.consumers)
    for i, n in enumerate(block.nodes):
        if ir.is_op(n, torch.ops.aten.add.Tensor) and any(a in stream for a in n.args[:2]):
            if i > last:
                branch = [a for a in n.args[:2] if isinstance(a, fx.Node) and a not in stream]
                return branch[0] if len(branch) == 1 else n
            stream.add(n)
    return None


class _AWQVisitor(BlockVisitor):
    """Stores a block's linear inputs, searches scales and clips, folds them into ``gm``."""

    def __init__(self, pass_: AWQ, gm: fx.GraphModule, todo: list[QuantAnnotation],
                 sites: list[SmoothingSite]) -> None:
        self.p = pass_
        self.gm = gm
        self.by_node = {a.node: a for a in todo}
        self.sites = sites
        self.inputs: dict[fx.Node, list[torch.Tensor]] = {}
        self.done: set[fx.Node] = set()
        self.scaled: list[tuple[str, float]] = []
        self.searched = 0  # sites whose scale was searched (scaled or not)
        self.clipped = 0
        self.notes: list[str] = []

    def _block_sites(self, block: Block) -> list[SmoothingSite]:
        inside = set(block.nodes)
        return [s for s in self.sites if s.consumers[0] in inside]

    def observed(self, block: Block) -> list[fx.Node]:
        xs = [n.args[0] for n in block.linears() if n in self.by_node]
        return list(dict.fromkeys(xs + [s.x for s in self._block_sites(block)]))

    def observe(self, block: Block, node: fx.Node, value: torch.Tensor, batch: int) -> None:
        self.inputs.setdefault(node, []).append(value.detach())

    def transform(self, block: Block, runner: BlockRunner) -> None:
        for s in self._block_sites(block):
            self._scale(block, runner, s)
        if self.p.clip:
            for n in block.linears():
                if n in self.by_node:
                    self._clip(n)
        self.done.update(n for n in block.linears() if n in self.by_node)
        self.inputs.clear()

    def _candidate(self, s: SmoothingSite, col: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for c in s.consumers:
            a = self.by_node.get(c)
            if a is None:
                continue
            t = str(c.args[1].target)
            w = ir.get_param(self.gm, t)
            # round W diag(s), then undo the scale so the candidate reads the unscaled input
            out[t] = (fake_quantize((w.double() * col).float(), a.weight).double() / col).to(w.dtype)
        return out

    def _scale(self, block: Block, runner: BlockRunner, s: SmoothingSite) -> None:
        xs = self.inputs[s.x]
        self.searched += 1
        n_tok = sum(x.numel() // x.shape[-1] for x in xs)
        col_mean = sum(x.reshape(-1, x.shape[-1]).abs().double().sum(0) for x in xs) / n_tok
        # per producer channel: the mean over the consumer columns holding it
        ch = torch.zeros(s.width, dtype=torch.float64).scatter_reduce(
            0, s.channel_of, col_mean, "mean", include_self=False)
        until = _inspected_output(block, s)

        def output(i: int, cand: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            if until is None:
                return _first_tensor(runner.run(block, i, overrides=cand))
            # only the sub-block between the stored input and its output runs
            return runner.run_from(block, i, {s.x: xs[i]}, until, overrides=cand)

        org = [output(i) for i in range(len(xs))]
        best, best_err, best_a = None, float("inf"), 0.0
        for k in range(SCALE_GRID):
            a = k / SCALE_GRID
            sc = ch.pow(a).clamp(min=1e-4)
            sc = sc / (sc.max() * sc.min()).sqrt()
            cand = self._candidate(s, sc[s.channel_of])
            err = 0.0
            for i in range(len(xs)):
                err += float((output(i, cand) - org[i]).double().pow(2).sum())
            if err < best_err:
                best, best_err, best_a = sc, err, a
        if best_a == 0.0:
            return  # s = 1 is on the grid: nothing to fold
        fold_smoothing_scales(self.gm, s, best)
        col = best[s.channel_of].to(torch.float32)
        self.inputs[s.x] = [x / col for x in xs]
        self.scaled.append((s.site, best_a))
        log.debug("awq: %s: alpha %.2f (max s %.3g, min s %.3g)", s.site, best_a, best.max(),
                  best.min())

    def _clip(self, n: fx.Node) -> None:
        a = self.by_node[n]
        w_node = n.args[1]
        if feeds_attention_scores(n):
            return
        if _shared_param(self.gm, w_node, n):
            self.notes.append(f"{a.site}: not clipped, its weight is also read elsewhere")
            return
        xs = self.inputs[n.args[0]]
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in xs])
        step = max(1, x.shape[0] // CLIP_TOKENS)
        x = x[::step][:CLIP_TOKENS]
        w = ir.get_param(self.gm, w_node)
        bound = search_clip(w.detach(), x, a.weight)  # [out, ng]
        g = a.weight.group_size
        b = bound.repeat_interleave(g, dim=1)
        ir.set_param(self.gm, w_node, torch.maximum(torch.minimum(w, b), -b).to(w.dtype))
        self.clipped += 1


class AWQ(Pass):
    """AWQ scales and clipping on the block-sequential engine; see the module docstring."""

    name = "awq"
    exact = False
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"quantized"})
    forbids = frozenset({"quantized"})

    def __init__(
        self,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool | None = None,
        clip: bool = True,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str = (),
        quantize_lm_head: bool = False,
    ):
        if bits != 4 or isinstance(bits, bool):
            raise ValueError(f"awq: bits must be 4 (int4 group-wise weights), got {bits!r}")
        self._spec = resolve_weight_spec("awq", bits, group_size, sym)
        for opt, val in (("clip", clip), ("quantize_lm_head", quantize_lm_head)):
            if not isinstance(val, bool):
                raise TypeError(f"awq: {opt} must be a bool, got {val!r}")
        self.bits = bits
        self.group_size = group_size
        self.sym = self._spec.symmetric
        self.clip = clip
        self.include = _patterns(include, "include") if include is not None else None
        self.exclude = _patterns(exclude, "exclude")
        self.quantize_lm_head = quantize_lm_head

    def calibrate(self, gm: fx.GraphModule, ctx: PassContext
                  ) -> tuple[list[QuantAnnotation], list[str], _AWQVisitor | None]:
        """Search and fold the scales, and clip, block by block; weights stay float.

        Returns:
            ``(sites to round, notes, the visitor with what was scaled)``. The graph's
            parameters are rescaled (exactly) and clipped; restored if anything fails.
        """
        self.check_not_quantized(gm, ctx, "run awq on the float graph (before insert_qdq)")
        batches = ctx.require_calibration("awq")
        todo, notes = select_sites("awq", gm, self._spec, include=self.include,
                                   exclude=self.exclude, quantize_lm_head=self.quantize_lm_head)
        if not todo:
            return todo, notes, None
        quantized = {a.node for a in todo}
        groups = ctx.analysis(ChannelGroupsAnalysis, gm)
        sites = []
        for s in find_smoothing_sites(gm, groups):
            if not any(c in quantized for c in s.consumers):
                continue
            if s.skip is not None:
                notes.append(f"{s.site}: no AWQ scale, {s.skip}")
            else:
                sites.append(s)
        saved = dict(gm.named_parameters())
        visitor = _AWQVisitor(self, gm, todo, sites)
        try:
            run_blockwise(gm, batches, visitor, propagate="original", progress=ctx.progress,
                          desc="awq", compute_dtype=ctx.calibration_dtype)
        except BaseException:
            for name, p in saved.items():
                ir.set_param(gm, name, p)
            raise
        notes += visitor.notes
        notes += [f"{a.site}: skipped, outside the decoder blocks (left float)"
                  for a in todo if a.node not in visitor.done]
        return [a for a in todo if a.node in visitor.done], notes, visitor

    def weight_group_size(self) -> int | None:
        return self._spec.group_size

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        # decide (scales and clips, folded into the float parameters block by block)
        todo, notes, visitor = self.calibrate(gm, ctx)
        if not todo:
            return PassResult.unchanged(gm, notes, linears_quantized=0)
        # mutate: round to nearest in insert_qdq's form
        stats = rewrite_sites(gm, todo, {})
        stats.update(sites_searched=visitor.searched, sites_scaled=len(visitor.scaled),
                     linears_clipped=visitor.clipped)
        notes += [f"{site}: scaled, alpha {a:.2f}" for site, a in visitor.scaled]
        log.info("awq(group_size=%d): %d tensors scaled, %d linears clipped, %d rounded",
                 self.group_size, len(visitor.scaled), visitor.clipped,
                 stats["linears_quantized"])
        return PassResult(gm, True, frozenset(), stats, notes)


__all__ = ["AWQ", "fake_quantize", "feeds_attention_scores", "search_clip"]
