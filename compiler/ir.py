"""Small IR helpers over torch.fx GraphModules produced by torch.export.

Passes read and write parameters only through these helpers, and name things by *site*:
a stable string derived from ``nn_module_stack`` (e.g. ``model.layers.3.mlp.down_proj``),
never by fx node names, which change from trace to trace.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx

from compiler.errors import PassError

aten = torch.ops.aten

#: Prefix the tracing wrapper adds to every module path (``CausalLMWrapper.model``).
WRAPPER_PREFIX = "model."

LINEAR = aten.linear.default
EMBEDDING = aten.embedding.default
RMS_NORM = aten.rms_norm.default
LAYER_NORM = aten.layer_norm.default
SDPA = aten.scaled_dot_product_attention.default


# ----------------------------------------------------------------------------- sites


def module_path(node: fx.Node) -> str:
    """The innermost module path of ``node`` with the wrapper prefix removed ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("L['self']."):  # older torch spelling
        path = path[len("L['self'].") :]
    if path.startswith(WRAPPER_PREFIX):
        path = path[len(WRAPPER_PREFIX) :]
    elif path == WRAPPER_PREFIX.rstrip("."):
        path = ""
    return path


def module_type(node: fx.Node) -> str:
    """The innermost module class name of ``node`` ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    typ = list(stack.values())[-1][1]
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    return name.rsplit(".", 1)[-1]


def site(node: fx.Node, role: str | None = None) -> str:
    """Stable site name of a node: ``<module path>`` or ``<module path>:<role>`` (e.g. ``:in``)."""
    path = module_path(node) or "<top>"
    return f"{path}:{role}" if role else path


def block_index(node: fx.Node) -> int | None:
    """Index of the decoder block ``node`` belongs to, found from the graph's structure, else None.

    See :func:`block_indices`; module names play no part, so a family that calls its blocks
    ``stack.3`` or ``decoder.blk.3`` gets the same answer as one calling them ``layers.3``.
    Cached per graph (recomputed when the graph's node count changes or ``node`` is new).
    """
    graph = node.graph
    cached = _BLOCK_CACHE.get(graph)
    if cached is None or cached[0] != len(graph.nodes) or node not in cached[1]:
        cached = (len(graph.nodes), block_indices(graph))
        _BLOCK_CACHE[graph] = cached
    return cached[1].get(node)


_BLOCK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Ops whose output depends on the *shape* of a tensor input only, not its values: no data edge.
_SHAPE_ONLY = {"sym_size", "sym_numel", "sym_stride", "ones_like", "zeros_like", "empty_like",
               "full_like", "new_ones", "new_zeros", "new_empty", "new_full", "_assert_tensor_metadata"}
#: Ops that mark a stream segment as an attention sub-block.
_ATTENTION = {"scaled_dot_product_attention", "_softmax", "softmax", "_safe_softmax",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_flash_attention"}
#: Ops that can write the residual stream (merge a branch back into it).
_MERGE = {"add", "add_"}


def block_indices(graph: fx.Graph | fx.GraphModule) -> dict[fx.Node, int | None]:
    """The decoder block of every node, from the residual stream's structure (no names).

    The residual stream is the chain of *post-dominators* of the token embedding(s) in the
    tensor data flow: the nodes every path from the embedding to the output goes through
    (embedding, [scale], residual add, residual add, ..., final norm, LM head). Between two
    consecutive ones lies either one op (a transparent step: an embedding scale, a positional
    table added, a post-LN norm) or a *branch*: the sub-graph that reads the stream and is merged
    back by an ``add`` (attention, MLP, a SliceGPT shortcut). Each branch is one segment; a
    segment holding attention (SDPA or softmax) opens a new decoder block and the segments after
    it until the next attention join it (Llama: attention + MLP; parallel attention: one
    segment; a family with no attention: one block per segment). Transparent steps between
    segments belong to the block before them; those before the first and after the last
    segment (embedding, final norm, LM head) to none, except dtype casts right before a segment
    that opens a block (that block's input conversion). A node outside the stream's data flow
    (a parameter, a constant, a position table, a mask) belongs to a block when every reader
    of it does (shared ones, like the causal mask, to none).

    Args:
        graph: the graph (or its GraphModule).

    Returns:
        node -> block index (0-based) or None, for every node of the graph.
    """
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    out: dict[fx.Node, int | None] = dict.fromkeys(nodes)

    def data_users(n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if _carries_data(u)]

    roots = [n for n in nodes if is_op(n, EMBEDDING)]
    if not roots:
        roots = [n for n in nodes if n.op == "placeholder" and _is_float_tensor(n)]
    outputs = [n for n in nodes if n.op == "output"]
    if not roots or not outputs:
        return out
    # the data-flow descendants of the roots that reach the output
    down: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in down:
            continue
        down.add(n)
        stack.extend(u for u in data_users(n) if u not in down)
    live: set[fx.Node] = set()
    stack = [o for o in outputs if o in down]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(a for a in n.all_input_nodes if a in down and a not in live
                     and _carries_data(n))
    if not live:
        return out
    # immediate post-dominators over that sub-graph (a DAG: reverse topological order)
    sink = object()
    ipdom: dict[object, object] = {}

    def intersect(a, b):
        while a is not b:
            if a is sink or b is sink:
                return sink
            if order[a] < order[b]:
                a = ipdom[a]
            else:
                b = ipdom[b]
        return a

    for n in reversed(nodes):
        if n not in live:
            continue
        succ = [u for u in data_users(n) if u in live]
        if not succ:
            ipdom[n] = sink
            continue
        d = succ[0]
        for u in succ[1:]:
            d = intersect(d, u)
        ipdom[n] = d
    start: object = roots[0] if roots[0] in live else sink
    for r in roots[1:]:
        if r in live:
            start = r if start is sink else intersect(start, r)
    chain = []
    n = start
    while n is not sink:
        chain.append(n)
        n = ipdom[n]
    on_chain = {c: i for i, c in enumerate(chain)}
    # region of a live node: the first stream node that post-dominates it
    region: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        if n not in live:
            continue
        if n in on_chain:
            region[n] = on_chain[n]
            continue
        d = ipdom[n]
        region[n] = region[d] if d is not sink else len(chain)
    members: dict[int, list[fx.Node]] = {}
    for n, r in region.items():
        members.setdefault(r, []).append(n)
    # a region is a branch when its end merges two stream-dependent operands with an add
    branch = [i for i in range(1, len(chain))
              if op_name(chain[i]) in _MERGE
              and sum(1 for a in chain[i].all_input_nodes if a in live) >= 2]
    if not branch:
        return out
    block = -1
    block_of_region: dict[int, int] = {}
    any_attention = any(op_name(m) in _ATTENTION for i in branch for m in members.get(i, ()))
    opens = [k == 0 or not any_attention or any(op_name(m) in _ATTENTION
                                                 for m in members.get(i, ()))
             for k, i in enumerate(branch)]
    j = branch[0] - 1  # the first block's input conversion
    while j > 0 and op_name(chain[j]) in _CASTS:
        block_of_region[j] = 0
        j -= 1
    for k, i in enumerate(branch):
        if opens[k]:
            block += 1
        block_of_region[i] = block
        # transparent steps up to the next branch belong to this block, except the dtype casts
        # right before a branch that opens the next block: that block's input conversion
        stop = branch[k + 1] if k + 1 < len(branch) else i + 1
        lead = stop
        if k + 1 < len(branch) and opens[k + 1]:
            while lead - 1 > i and op_name(chain[lead - 1]) in _CASTS:
                lead -= 1
        for j in range(i + 1, stop):
            block_of_region[j] = block + (j >= lead)
    for n, r in region.items():
        out[n] = block_of_region.get(r)
    # nodes off the stream's data flow: the block of their readers, when they all agree
    for n in reversed(nodes):
        if n in live or n.op in ("placeholder", "output"):
            continue
        blocks = {out[u] for u in n.users}
        if len(blocks) == 1:
            out[n] = blocks.pop()
    return out


_CASTS = {"to", "_to_copy", "clone", "alias", "contiguous", "type_as"}


def _carries_data(node: fx.Node) -> bool:
    """False for ops whose result does not depend on their inputs' values (shape queries)."""
    if node.op == "output":
        return True
    return node.op == "call_function" and op_name(node) not in _SHAPE_ONLY


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


# ------------------------------------------------------------------------- node utilities


def is_op(node: fx.Node, *targets) -> bool:
    """True if ``node`` calls one of ``targets`` (ATen overloads or packets)."""
    if node.op != "call_function":
        return False
    for t in targets:
        if node.target is t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is t:
            return True
    return False


def nodes_of(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


def shape_of(node: fx.Node) -> tuple | None:
    """Shape recorded in ``node.meta['val']`` (may contain SymInts), or None."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def op_name(node: fx.Node) -> str:
    """Short op name used in reports: ``linear``, ``rms_norm``, ``getitem``..."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        base = t._schema.name.split("::")[-1]
        return base if ns == "aten" else f"{ns}.{base}"
    return getattr(t, "__name__", str(t))


def op_counts(gm: fx.GraphModule) -> Counter:
    """Counter of call_function op names in the graph."""
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


def is_quantized(gm: fx.GraphModule) -> bool:
    """True if the graph holds PT2E ``quantized_decomposed`` Q/DQ nodes."""
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "quantized_decomposed"
        for n in gm.graph.nodes
    )


#: ``node.meta`` key: why this linear stays float under quantization unless a pass's
#: ``include`` pattern names its site (set by the pass that created it, read by
#: :func:`compiler.qdq.annotate`), e.g. a SliceGPT shortcut reading the residual stream
KEEP_FLOAT = "fxcompress_keep_float"


def copy_meta(src: fx.Node, dst: fx.Node, created_by: str | None = None) -> None:
    """Copy module-stack and shape metadata from ``src`` to a new node ``dst``."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val", "tensor_meta"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if created_by:
        dst.meta["fxcompress_created_by"] = created_by


def users_in_order(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def iter_get_attrs(gm: fx.GraphModule) -> Iterator[fx.Node]:
    return (n for n in gm.graph.nodes if n.op == "get_attr")


# ----------------------------------------------------------------------------- parameters


def copy_sharing_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (graph, modules, metadata) whose parameters and buffers are the
    same tensor objects as ``gm``'s.

    For rewrites that replace tensors (:func:`set_param`, :func:`add_param`, removing attributes)
    but never write into one: the copy costs no weight memory, and ``gm`` is left as it was.
    """
    import copy

    memo: dict[int, Any] = {id(t): t for _, t in gm.named_parameters(remove_duplicate=False)}
    memo.update({id(t): t for _, t in gm.named_buffers(remove_duplicate=False)})
    return copy.deepcopy(gm, memo)


def _resolve(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = target.split(".")
    mod = gm
    for p in path:
        if not hasattr(mod, p):
            raise PassError(f"no submodule {p!r} on the way to parameter {target!r}")
        mod = getattr(mod, p)
    return mod, leaf


def get_param(gm: torch.nn.Module, target: str | fx.Node) -> torch.Tensor:
    """The tensor behind a ``get_attr`` target (a parameter or buffer)."""
    if isinstance(target, fx.Node):
        target = _attr_target(target)
    mod, leaf = _resolve(gm, target)
    if not hasattr(mod, leaf):
        raise PassError(f"parameter {target!r} does not exist in the graph module")
    return getattr(mod, leaf)


def set_param(gm: torch.nn.Module, target: str | fx.Node, value: torch.Tensor) -> None:
    """Replace the tensor behind a ``get_attr`` target, keeping parameter-vs-buffer kind.

    Shape may change (pruning, slicing); callers re-propagate shapes afterwards.
    """
    if isinstance(target, fx.Node):
        target = _attr_target(target)
    mod, leaf = _resolve(gm, target)
    value = value.detach()
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise PassError(f"parameter {target!r} does not exist in the graph module")


def add_param(gm: fx.GraphModule, target: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register a new parameter under a unique dotted name and return a ``get_attr`` node for it.

    The ``get_attr`` is inserted before ``before`` (usually the first user).
    """
    target = _module_owned_name(gm, target)
    name = target
    k = 1
    while _has_attr(gm, name):
        name = f"{target}_{k}"
        k += 1
    *path, leaf = name.split(".")
    mod = gm
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    mod.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value.detach()
    return node


def _module_owned_name(gm: torch.nn.Module, target: str) -> str:
    """``target`` with every dot after a non-module attribute made an underscore.

    A module path can run into a parameter or buffer (``lm_head.bias`` + ``.bias_folded``);
    a new parameter cannot live under a tensor, so it goes beside it (``lm_head.bias_bias_folded``).
    """
    parts = target.split(".")
    mod: Any = gm
    for i, p in enumerate(parts[:-1]):
        sub = getattr(mod, p, None) if mod is not None else None
        if sub is not None and not isinstance(sub, torch.nn.Module):
            return ".".join(parts[:i] + ["_".join(parts[i:])])
        mod = sub
    return target


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    try:
        mod, leaf = _resolve(gm, target)
    except PassError:
        return False
    return hasattr(mod, leaf)


def _attr_target(node: fx.Node) -> str:
    if node.op != "get_attr":
        raise PassError(f"node {node.name} is a {node.op}, not a parameter (get_attr)")
    return str(node.target)


def has_attr(gm: torch.nn.Module, target: str) -> bool:
    return _has_attr(gm, target)


def param_node(node: fx.Node | None) -> fx.Node | None:
    """The ``get_attr`` node if ``node`` is one, else None (convenience for optional biases)."""
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def is_shared_param(gm: fx.GraphModule, p: fx.Node, user: fx.Node) -> bool:
    """True if the parameter behind ``p`` is read by any op other than ``user`` (through any
    ``get_attr`` of the same target), so rewriting it for ``user`` would change the others."""
    target = str(p.target)
    for n in iter_get_attrs(gm):
        if str(n.target) == target and any(u is not user for u in n.users):
            return True
    return False


def untie_embeddings(gm: fx.GraphModule) -> int:
    """Give each embedding that shares its table with another reader (a tied LM head) a private
    copy; returns how many were untied."""
    # decide
    todo = []
    for n in gm.graph.nodes:
        if is_op(n, EMBEDDING):
            w = n.args[0]
            if isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) > 1:
                todo.append((n, w))
    # mutate
    for emb, w in todo:
        path = module_path(emb) or "embedding"
        copy = add_param(gm, f"{path}.weight_untied", get_param(gm, w).clone(), before=emb)
        emb.replace_input_with(w, copy)
    return len(todo)


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(input, weight get_attr, bias get_attr or None) of an ``aten.linear`` node."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, b


def count_params(gm: torch.nn.Module) -> int:
    """Number of distinct parameter elements reachable from the graph's get_attr nodes."""
    seen: set[int] = set()
    total = 0
    if isinstance(gm, fx.GraphModule):
        tensors: Iterable[torch.Tensor] = (get_param(gm, n) for n in iter_get_attrs(gm))
    else:
        tensors = gm.parameters()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        if t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int32):
            total += t.numel()
    return total


def param_bytes(gm: fx.GraphModule) -> int:
    seen: set[int] = set()
    total = 0
    for n in iter_get_attrs(gm):
        t = get_param(gm, n)
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def remove_unused_attrs(gm: fx.GraphModule) -> int:
    """Delete parameters no get_attr reads any more; returns how many were removed."""
    used = {str(n.target) for n in iter_get_attrs(gm)}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if name not in used:
            mod, leaf = _resolve(gm, name)
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)
            removed += 1
    return removed
