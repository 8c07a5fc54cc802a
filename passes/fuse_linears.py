"""FuseLinears: horizontal fusion of the linears that read the same tensor (q/k/v, gate/up).

Paper: none (a standard inference-compiler fusion: vLLM's ``QKVParallelLinear`` /
``MergedColumnParallelLinear``, TensorRT-LLM's fused QKV GEMM).

Identity relied on (exact, each output element is the same dot product):
``[x W1^T + b1 | x W2^T + b2 | ...] = x [W1; W2; ...]^T + [b1; b2; ...]``, so
``linear(x, W_i, b_i) = slice(linear(x, W_cat, b_cat), -1, o_i, o_i + n_i)`` where ``W_i: [n_i, K]``
and ``o_i`` is the sum of the rows stacked before it. A linear without bias joins a group with
biases through a zero bias (``y + 0 = y`` exactly).

Why: one GEMM with ``N = sum n_i`` instead of several small ones (better GPU occupancy, one read
of ``x``, one activation quantizer when the graph is later quantized).

Sites rewritten: every set of two or more ``aten.linear`` nodes that read the same input node,
whose weights are 2-D parameters of one dtype with equal in-features (q/k/v of an attention
block, gate/up of a gated MLP). The fused linear is placed at the first member, its output is
sliced along the last dim (``aten.slice.Tensor``, the form phi3's native fused projections
trace to, so the channel dependency analysis reads it the same way), and each member's users read
its slice. The fused weight is a new parameter named after the members
(``...self_attn.q_proj_k_proj_v_proj.weight``); its site is ``<parent>.q_proj+k_proj+v_proj``.

Skipped, with a note: groups whose members disagree in in-features or dtype, or whose weight or
bias is not a parameter. A single linear per input is simply not a candidate (no note): GPT-2's
``c_attn`` and phi3's ``qkv_proj`` are already fused, so there only gated MLPs (phi3: none) fuse.

Rules are a declarative table (:data:`RULES`: name, identity, check, rewrite) rather than
patterns traced with torch.export: the pattern is n-ary (any number of linears sharing one input,
2 for gate/up, 3 for q/k/v, more for other models) and the rewrite makes a new parameter, neither
of which a fixed traced pattern expresses.

Preconditions: ``canonical`` (linears as ``aten.linear``); no Q/DQ nodes yet (fuse *before*
``insert_qdq``: per-channel weight scales then cover the fused rows, and the one activation
quantizer is shared by construction). Raises ``PreconditionError`` on a quantized graph.

Preserves the function (exact). Invalidates every analysis (parameters and nodes change).

Hyper-parameters:
    min_group (int, default 2): fuse only groups with at least this many linears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from compiler import ir
from compiler.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: slice end meaning "to the end" (what torch.export writes for ``x[..., a:]``)
_SLICE_END = 9223372036854775807


@dataclass
class FusionGroup:
    """A decided group: the linears (in graph order) reading ``x``, or the reason to skip."""

    x: fx.Node
    linears: list[fx.Node]
    skip: str | None = None

    @property
    def site(self) -> str:
        paths = [ir.module_path(n) for n in self.linears]
        parent = _common_parent(paths)
        leaves = [p[len(parent) + 1:] if parent else p for p in paths]
        return f"{parent}.{'+'.join(leaves)}" if parent else "+".join(leaves)


@dataclass(frozen=True)
class FusionRule:
    """A declarative rewrite rule: which groups it matches, the identity, the rewrite."""

    name: str
    identity: str
    check: Callable[[fx.GraphModule, FusionGroup], str | None]
    rewrite: Callable[[fx.GraphModule, FusionGroup], fx.Node]


# ----------------------------------------------------------------------------- the rule


def _check_horizontal(gm: fx.GraphModule, g: FusionGroup) -> str | None:
    """None if the group can be fused, else the reason."""
    shapes, dtypes = set(), set()
    for lin in g.linears:
        _, w, b = ir.linear_parts(lin)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return f"{ir.site(lin)}: weight is not a parameter"
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            return f"{ir.site(lin)}: bias is not a parameter"
        wt = ir.get_param(gm, w)
        if wt.dim() != 2 or not wt.is_floating_point():
            return f"{ir.site(lin)}: weight is not a 2-D float tensor"
        shapes.add(wt.shape[1])
        dtypes.add(wt.dtype)
        if b is not None:
            dtypes.add(ir.get_param(gm, b).dtype)
    if len(shapes) > 1:
        return f"in-features differ ({sorted(shapes)})"
    if len(dtypes) > 1:
        return f"dtypes differ ({sorted(str(d) for d in dtypes)})"
    return None


def _rewrite_horizontal(gm: fx.GraphModule, g: FusionGroup) -> fx.Node:
    """Replace the group by one linear on stacked weights and one slice per member."""
    graph = gm.graph
    first = g.linears[0]
    weights, biases = [], []
    for lin in g.linears:
        _, w, b = ir.linear_parts(lin)
        wt = ir.get_param(gm, w)  # W_i: [n_i, K]
        weights.append(wt)
        biases.append(ir.get_param(gm, b) if b is not None else None)
    any_bias = any(b is not None for b in biases)
    w_cat = torch.cat([w.detach() for w in weights], dim=0)  # W: [sum n_i, K]
    base = _fused_param_base(g)
    w_node = ir.add_param(gm, f"{base}.weight", w_cat, before=first)
    b_node = None
    if any_bias:
        b_cat = torch.cat([
            b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            for w, b in zip(weights, biases)
        ])
        b_node = ir.add_param(gm, f"{base}.bias", b_cat, before=first)
    with graph.inserting_before(first):
        fused = graph.call_function(aten.linear.default, (g.x, w_node, b_node))
    ir.copy_meta(first, fused, created_by="fuse_linears")
    _set_fused_site(fused, first, g)
    fval = first.meta.get("val")
    if isinstance(fval, torch.Tensor):
        fused.meta["val"] = fval.new_empty((*fval.shape[:-1], w_cat.shape[0]))
    dim = fval.dim() - 1 if isinstance(fval, torch.Tensor) else -1
    start = 0
    for i, (lin, w) in enumerate(zip(g.linears, weights)):
        end = start + w.shape[0] if i < len(g.linears) - 1 else _SLICE_END
        with graph.inserting_before(first):
            sl = graph.call_function(aten.slice.Tensor, (fused, dim, start, end))
        ir.copy_meta(lin, sl, created_by="fuse_linears")
        lin.replace_all_uses_with(sl)
        start += w.shape[0]
    for lin in g.linears:
        graph.erase_node(lin)
    return fused


#: The rewrite rules of this pass, tried in order on every candidate group.
RULES: tuple[FusionRule, ...] = (
    FusionRule(
        name="horizontal_linear",
        # [x W1^T + b1 | x W2^T + b2] = x [W1; W2]^T + [b1; b2]   (missing b_i = 0)
        identity="[x W1^T + b1 | x W2^T + b2] = x [W1;W2]^T + [b1;b2]",
        check=_check_horizontal,
        rewrite=_rewrite_horizontal,
    ),
)


# ----------------------------------------------------------------------------- helpers


def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for segs in zip(*(p[:-1] for p in parts)):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def _fused_param_base(g: FusionGroup) -> str:
    targets = [str(ir.linear_parts(n)[1].target) for n in g.linears]
    mods = [t.rsplit(".", 1)[0] for t in targets]  # ...q_proj.weight -> ...q_proj
    parent = _common_parent(mods)
    leaves = [m[len(parent) + 1:] if parent else m for m in mods]
    name = "_".join(leaf.replace(".", "_") for leaf in leaves)
    return f"{parent}.{name}" if parent else name


def _set_fused_site(fused: fx.Node, first: fx.Node, g: FusionGroup) -> None:
    # The innermost module entry names the fused site, so stats and decisions keyed by site
    # see one linear ("...self_attn.q_proj+k_proj+v_proj"), not a mislabelled q_proj.
    stack = dict(first.meta.get("nn_module_stack") or {})
    if not stack:
        return
    key, (path, typ) = list(stack.items())[-1]
    prefix = path[: len(path) - len(ir.module_path(first))]
    stack.pop(key)
    stack[f"{key}+fused"] = (prefix + g.site, typ)
    fused.meta["nn_module_stack"] = stack


is_quantized_graph = ir.is_quantized


def candidate_groups(gm: fx.GraphModule, min_group: int = 2) -> list[FusionGroup]:
    """Every input node read by ``min_group`` or more linears, with its linears. Pure."""
    readers: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if ir.is_op(n, ir.LINEAR) and isinstance(n.args[0], fx.Node):
            readers.setdefault(n.args[0], []).append(n)
    return [FusionGroup(x, lins) for x, lins in readers.items() if len(lins) >= min_group]


# ----------------------------------------------------------------------------- the pass


class FuseLinears(Pass):
    """Fuse linears reading the same tensor into one linear plus slices; see the module doc."""

    name = "fuse_linears"
    forbids = frozenset({"quantized"})
    exact = True
    requires = frozenset({"canonical"})

    def __init__(self, *, min_group: int = 2):
        if isinstance(min_group, bool) or not isinstance(min_group, int) or min_group < 2:
            raise ValueError(f"fuse_linears: min_group must be an int >= 2, got {min_group!r}")
        self.min_group = min_group

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        self.check_not_quantized(
            gm, ctx, "run fuse_linears before insert_qdq (fused weights are then quantized as one linear)")
        # decide
        groups = candidate_groups(gm, self.min_group)
        plans: list[tuple[FusionGroup, FusionRule]] = []
        notes = []
        for g in groups:
            reasons = []
            for rule in RULES:
                reason = rule.check(gm, g)
                if reason is None:
                    plans.append((g, rule))
                    break
                reasons.append(f"{rule.name}: {reason}")
            else:
                g.skip = "; ".join(reasons)
                notes.append(f"{g.site}: skipped, {g.skip}")
        linears_before = len(ir.nodes_of(gm, ir.LINEAR))
        if not plans:
            return PassResult.unchanged(gm, notes, groups_fused=0, linears_fused=0,
                                        linears_before=linears_before,
                                        linears_after=linears_before)
        params_before = ir.count_params(gm)
        # mutate
        for g, rule in plans:
            rule.rewrite(gm, g)
            log.debug("fuse_linears: %s (%d linears) by %s", g.site, len(g.linears), rule.name)
        gm.graph.eliminate_dead_code()
        removed = ir.remove_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        stats = {
            "groups_fused": len(plans),
            "linears_fused": sum(len(g.linears) for g, _ in plans),
            "linears_before": linears_before,
            "linears_after": len(ir.nodes_of(gm, ir.LINEAR)),
            "params_before": params_before,
            "params_after": ir.count_params(gm),
            "params_removed": removed,
        }
        log.info("fuse_linears: %d groups (%d linears) fused; linears %d -> %d",
                 stats["groups_fused"], stats["linears_fused"], linears_before,
                 stats["linears_after"])
        return PassResult(gm, True, frozenset(), stats, notes)


def fuse_linears(gm: fx.GraphModule, *, min_group: int = 2) -> fx.GraphModule:
    """Run :class:`FuseLinears` on ``gm`` in place and return it."""
    FuseLinears(min_group=min_group).run(gm, None)
    return gm


__all__ = ["RULES", "FuseLinears", "FusionGroup", "FusionRule", "candidate_groups",
           "fuse_linears", "is_quantized_graph"]
