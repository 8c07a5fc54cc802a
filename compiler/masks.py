"""Attention masks in traced graphs: shape-only subgraphs, and the plain-causal-mask check.

Hugging Face models (transformers 5.x) build the causal mask at run time from the input's
shape (``arange`` -> comparisons -> ``and``) and pass it to ``scaled_dot_product_attention``.
Both the ``simplify_mask`` pass and the KV-cache rewrite (``compiler.kv_cache``) need to know
that such a mask is the plain causal mask: a mask that is a function of the input *shapes* alone
and equals ``tril(ones(L, L))`` at several probe sizes is the same expression at every size.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

#: (batch, length) sizes at which a shape-only mask is evaluated against ``tril``
PROBE_SIZES = ((1, 1), (3, 2), (1, 3), (3, 7), (1, 16), (3, 33))


def shape_only_subgraph(mask: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(ancestor nodes in graph order, the input placeholders they read through ``sym_size``)
    if ``mask`` depends on the graph inputs' shapes only; None otherwise."""
    seen: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            return None  # reads data or parameters, not only shapes
        if n.op != "call_function":
            return None
        if n.target is aten.sym_size.int:
            src = n.args[0]
            if not (isinstance(src, fx.Node) and src.op == "placeholder"):
                return None
            sources.add(src)
            continue
        stack.extend(a for a in n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__), sorted(sources, key=order.__getitem__)


def evaluate_subgraph(nodes: list[fx.Node], sources: list[fx.Node], mask: fx.Node | list[fx.Node],
                      shapes) -> torch.Tensor | list[torch.Tensor]:
    """Run the shape-only subgraph with zero inputs of the given shapes.

    ``mask`` is the node to return (or a list of nodes: their values are returned as a list);
    ``nodes`` must hold every ancestor of it in graph order.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for s in sources:
        env[s] = g.placeholder(s.name)
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output([env[m] for m in mask] if isinstance(mask, list) else env[mask])
    sub = fx.GraphModule(torch.nn.Module(), g)
    inputs = []
    for s, shape in zip(sources, shapes):
        v = s.meta.get("val")
        dtype = v.dtype if isinstance(v, torch.Tensor) else torch.long
        inputs.append(torch.zeros(shape, dtype=dtype))
    with torch.no_grad():
        return sub(*inputs)


def is_plain_causal_mask(sdpa: fx.Node, mask: fx.Node) -> str | None:
    """None if ``mask`` is checked to be the plain causal mask of ``sdpa``; else the reason."""
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
        return "mask is not boolean"
    q, k = sdpa.args[0].meta.get("val"), sdpa.args[1].meta.get("val")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() != 4:
        return "query/key shapes unknown"
    lq, lk = q.shape[-2], k.shape[-2]
    if str(lq) != str(lk) or val.dim() != 4 or str(val.shape[-1]) != str(lk) \
            or str(val.shape[-2]) != str(lq) or val.shape[1] != 1:
        return "mask is not [B, 1, L, L] with equal query and key lengths"
    sub = shape_only_subgraph(mask)
    if sub is None:
        return "mask depends on input values or parameters (padding, learned bias)"
    nodes, sources = sub
    if len(sources) != 1:
        return "mask depends on the shapes of several inputs"
    src_val = sources[0].meta.get("val")
    if not isinstance(src_val, torch.Tensor) or src_val.dim() != 2:
        return "mask source is not a [batch, seq] input"
    for b, s in PROBE_SIZES:
        try:
            m = evaluate_subgraph(nodes, sources, mask, [(b, s)])
        except Exception as e:  # a subgraph that cannot run alone is skipped, not judged
            return f"mask subgraph does not evaluate on its own ({type(e).__name__})"
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        if m.dim() != 4 or m.shape[-2:] != (s, s) or not bool((m == causal).all()):
            return f"mask differs from the causal mask at batch {b}, length {s}"
    return None


__all__ = ["PROBE_SIZES", "evaluate_subgraph", "is_plain_causal_mask", "shape_only_subgraph"]
