"""KV-cache rewrite: one graph for prefill and decode, built from any compiled graph.

A compiled graph maps ``input_ids -> logits`` over the whole sequence, so generating token
``t`` recomputes tokens ``0..t-1``. :func:`with_kv_cache` rewrites a copy of it into

    (input_ids [B, T], attention_mask [B, P+T], past_key_0, past_value_0, ...)
        -> (logits [B, T, V], present_key_0, present_value_0, ...)

with cache tensors ``[B, kv_heads, P, head_dim]``: prefill is ``P = 0``, a decode step
``T = 1``. The rewrite is decided from the attention ops in the graph, not from module names
or the model family, so it applies after every pass (pruning and slicing change the widths;
SmoothQuant, RPTQ, fusion and Q/DQ change the producers; none of that matters here).

What is rewritten, per ``scaled_dot_product_attention`` (one layer each, in graph order):

- **Keys and values.** Walking back from the SDPA's key (value) through layout-only ops
  (``unsqueeze``/``expand``/``reshape``: grouped-query attention's ``repeat_kv``) reaches the
  tensor ``[B, kv_heads, T, head_dim]`` the layer computed for the new tokens (after rotary).
  ``present = cat([past, new], dim=2)`` is inserted there and read instead; the layout ops'
  size arguments that named the sequence length now name the cache length.
- **Mask.** The graph's own mask must be checked to be the plain causal mask
  (:func:`compiler.masks.is_plain_causal_mask`, or ``is_causal=True``); sliding windows,
  ALiBi biases and other masks are refused with the reason. It is replaced by one mask built
  from ``attention_mask``: query ``i`` (absolute position ``P + i``) sees key ``j`` iff
  ``j <= P + i`` and ``attention_mask[b, j] != 0``, and always sees itself (so a left-padding
  row never softmaxes over nothing: its output is unused, but a NaN there would reach real
  tokens through ``0 * NaN`` in later layers).
- **Positions.** Positions in a traced graph come from shape-only integer subgraphs
  (``arange(T)`` for rotary and GPT-2's learned table, OPT's ``cumsum`` of an all-ones mask).
  Every live integer node that depends on the input's shape alone and evaluates to
  ``arange(T) + c`` at probe sizes is a position tensor; the outermost ones (read by
  something that is not a position tensor) are replaced by ``pos + c`` where
  ``pos = max(cumsum(attention_mask) - 1, 0)[:, P:]``, the positions Hugging Face's
  ``generate`` gives a left-padded batch. A 1-D position tensor ``[T]`` cannot vary per row;
  it becomes ``P + arange(T) + c``, exact for unpadded rows (and for rotary models with left
  padding too, since rotary attention depends only on position differences).

The rewrite is verified numerically before it is returned (:func:`check_kv_cache`): a prefill
then single-token steps must reproduce the full forward's logits at every position.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from compiler import ir
from compiler.errors import PreconditionError, UnsupportedModelError, VerificationError
from compiler.masks import evaluate_subgraph, is_plain_causal_mask, shape_only_subgraph

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: Ops that only move data between the attention's kv tensor and the SDPA (``repeat_kv``).
_LAYOUT_OPS = (aten.unsqueeze.default, aten.expand.default, aten.reshape.default,
               aten.view.default, aten._unsafe_view.default, aten.clone.default,
               aten.alias.default)
#: (batch, length) sizes at which position candidates are evaluated.
_POSITION_PROBES = ((3, 7), (1, 5))
_MAXINT = 9223372036854775807


@dataclass
class CacheLayer:
    """One attention layer's cache: where it is and its shape ``[B, kv_heads, S, head_dim]``."""

    index: int
    site: str
    kv_heads: int
    head_dim: int
    value_head_dim: int
    #: heads the layer computes (fewer than ``kv_heads`` when the cache is padded to a
    #: uniform head count; the extra heads hold zeros and are never read)
    used_heads: int = 0
    #: fx node names in the rewritten graph (stable under deepcopy), for lowerings that fuse
    #: the attention: the SDPA, the new key/value ``[B, heads, T, D]`` before the cache, the
    #: past placeholders and the present outputs
    nodes: dict[str, str] = field(default_factory=dict)


@dataclass
class KVCacheGraph:
    """A graph with a KV cache (see the module doc) and what the rewrite found.

    Attributes:
        graph_module: ``forward(input_ids, attention_mask, *past) -> (logits, *present)``;
            ``past``/``present`` alternate key and value per layer.
        layers: one :class:`CacheLayer` per attention op, in graph order.
        per_row_positions: positions follow ``attention_mask`` per row (left padding is
            exact for every family); False when the graph's positions are a 1-D ``[T]``
            tensor (exact for unpadded rows; with left padding, for rotary models only).
        notes: one line per decision worth reporting.
    """

    graph_module: fx.GraphModule
    layers: list[CacheLayer]
    per_row_positions: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def input_names(self) -> list[str]:
        """ONNX Runtime GenAI / Optimum input names, in the graph's argument order."""
        names = ["input_ids", "attention_mask"]
        for i in range(self.num_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Past tensors of length 0 (prefill)."""
        out = []
        for layer in self.layers:
            out.append(torch.zeros(batch, layer.kv_heads, 0, layer.head_dim, dtype=dtype))
            out.append(torch.zeros(batch, layer.kv_heads, 0, layer.value_head_dim, dtype=dtype))
        return out

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step: ``(logits, present)``; checks the cache count and shapes first."""
        check_cache(self, input_ids, attention_mask, past)
        with torch.no_grad():
            out = self.graph_module(input_ids, attention_mask, *past)
        return out[0], list(out[1:])


def check_cache(kv: KVCacheGraph, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: list[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the problem when inputs do not fit the cache layout."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if len(past) != 2 * kv.num_layers:
        raise ValueError(f"the graph has {kv.num_layers} attention layers and takes "
                         f"{2 * kv.num_layers} past tensors (key and value per layer); got "
                         f"{len(past)}")
    b, t = input_ids.shape
    p = past[0].shape[2] if past else 0
    if tuple(attention_mask.shape) != (b, p + t):
        raise ValueError(f"attention_mask must be [batch, past + seq] = [{b}, {p + t}], got "
                         f"{tuple(attention_mask.shape)}")
    for i, (x, layer) in enumerate(zip(past, [lay for lay in kv.layers for _ in (0, 1)])):
        d = layer.head_dim if i % 2 == 0 else layer.value_head_dim
        want = (b, layer.kv_heads, p, d)
        if tuple(x.shape) != want:
            kind = "key" if i % 2 == 0 else "value"
            raise ValueError(f"past {kind} of layer {layer.index} ({layer.site}) must be "
                             f"{list(want)}, got {list(x.shape)}")


def _mask_arg(n: fx.Node):
    return n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")


def _arg(n: fx.Node, index: int, name: str, default):
    return n.args[index] if len(n.args) > index else n.kwargs.get(name, default)


def _same(a, b) -> bool:
    return str(a) == str(b)


def _cache_root(x: fx.Node, seq) -> tuple[fx.Node, list[fx.Node]]:
    """(tensor ``[B, kv_heads, T, D]`` the layer computed, layout ops from it to the SDPA)."""
    chain: list[fx.Node] = []
    cur = x
    while ir.is_op(cur, *_LAYOUT_OPS):
        inp = cur.args[0]
        val = inp.meta.get("val") if isinstance(inp, fx.Node) else None
        if not (isinstance(val, torch.Tensor) and val.dim() >= 4 and _same(val.shape[-2], seq)):
            break
        chain.append(cur)
        cur = inp
    return cur, chain


def _decide_layers(gm: fx.GraphModule, seq, batch) -> list[tuple]:
    plans = []
    for i, n in enumerate(ir.nodes_of(gm, ir.SDPA)):
        where = f"attention {i} ({ir.site(n)})"
        if _arg(n, 4, "dropout_p", 0.0) != 0.0:
            raise UnsupportedModelError(f"{where}: dropout_p is not 0 (put the model in eval mode)")
        mask = _mask_arg(n)
        if isinstance(mask, fx.Node):
            reason = is_plain_causal_mask(n, mask)
            if reason is not None:
                raise UnsupportedModelError(
                    f"{where}: the KV-cache rewrite needs the plain causal mask, and this one "
                    f"is not: {reason} (sliding-window, ALiBi and prefix masks are not supported)")
        elif not _arg(n, 5, "is_causal", False):
            raise UnsupportedModelError(f"{where}: attention is not causal (no mask, is_causal "
                                        "unset); a KV cache needs a causal decoder")
        roots = []
        for which, x in (("key", n.args[1]), ("value", n.args[2])):
            root, chain = _cache_root(x, seq)
            val = root.meta.get("val")
            if not (isinstance(val, torch.Tensor) and val.dim() == 4 and _same(val.shape[2], seq)
                    and _same(val.shape[0], batch) and isinstance(val.shape[1], int)
                    and isinstance(val.shape[3], int)):
                shape = list(val.shape) if isinstance(val, torch.Tensor) else "unknown"
                raise UnsupportedModelError(
                    f"{where}: the {which} reaching the attention is not a [batch, heads, seq, "
                    f"head_dim] tensor behind layout ops (found {root.name} with shape {shape})")
            roots.append((root, chain))
        plans.append((n, roots))
    if not plans:
        raise UnsupportedModelError(
            "the graph has no scaled_dot_product_attention op: the KV-cache rewrite finds layers "
            "by their attention ops (load Hugging Face models with attn_implementation='sdpa', "
            "the default)")
    return plans


def _live_without_masks(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes the output needs, not counting the SDPAs' masks (they are replaced)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    live: set[fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        inputs = n.args[:3] if ir.is_op(n, ir.SDPA) else n.all_input_nodes
        stack.extend(a for a in inputs if isinstance(a, fx.Node))
    return live


def _position_frontier(gm: fx.GraphModule, ids: fx.Node, seq, batch) -> list[tuple[fx.Node, int]]:
    """(node, offset c) for the outermost live position tensors ``arange(T) + c``."""
    live = _live_without_masks(gm)
    cands: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n not in live or n.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        if val.dtype.is_floating_point or val.dtype == torch.bool or val.dim() == 0:
            continue
        if not _same(val.shape[-1], seq) or any(
                not (_same(s, 1) or (k == 0 and _same(s, batch))) for k, s in
                enumerate(val.shape[:-1])):
            continue
        sub = shape_only_subgraph(n)
        if sub is None or sub[1] != [ids]:
            continue
        offset = _arange_offset(n, *sub)
        if offset is not None:
            cands[n] = offset
    frontier = []
    for n, c in cands.items():
        if any(u in live and u not in cands for u in n.users):
            frontier.append((n, c))
    return frontier


def _arange_offset(n: fx.Node, nodes: list[fx.Node], sources: list[fx.Node]) -> int | None:
    """``c`` if ``n`` evaluates to ``arange(T) + c`` along its last dim at every probe size."""
    offset = None
    for b, s in _POSITION_PROBES:
        try:
            v = evaluate_subgraph(nodes, sources, n, [(b, s)])
        except Exception:  # a subgraph that cannot run alone is not a position tensor
            return None
        if not isinstance(v, torch.Tensor) or v.shape[-1] != s:
            return None
        c = v[..., :1]
        if not bool((c == c.flatten()[0]).all()):
            return None
        if not bool((v - c == torch.arange(s, dtype=v.dtype)).all()):
            return None
        c0 = int(c.flatten()[0])
        if offset is not None and c0 != offset:
            return None
        offset = c0
    return offset


def with_kv_cache(gm: fx.GraphModule, *, cache_heads: int | None = None,
                  check: bool = True) -> KVCacheGraph:
    """Rewrite a copy of a compiled ``input_ids -> logits`` graph to carry a KV cache.

    Args:
        gm: a traced or compiled GraphModule (any passes applied); not modified.
        cache_heads: give every layer's cache this many kv heads (zero-padded), for runtimes
            that allocate one cache shape for all layers (ONNX Runtime GenAI) when pruning
            left layers with different head counts. Default: each layer's own count.
        check: verify prefill + decode steps against the full forward (:func:`check_kv_cache`).

    Returns:
        A :class:`KVCacheGraph`.

    Raises:
        PreconditionError: the graph does not take exactly one ``input_ids`` input.
        UnsupportedModelError: an attention op the rewrite cannot handle (names it and why).
        VerificationError: the rewritten graph does not reproduce the full forward.
    """
    original = gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PreconditionError(f"the KV-cache rewrite takes a graph input_ids -> logits; this "
                                f"one has {len(placeholders)} inputs")
    gm = ir.copy_sharing_weights(gm)
    g = gm.graph
    ids = next(n for n in g.nodes if n.op == "placeholder")
    ids_val = ids.meta.get("val")
    if not isinstance(ids_val, torch.Tensor) or ids_val.dim() != 2:
        raise PreconditionError("the graph's input has no recorded [batch, seq] shape")
    batch, seq = ids_val.shape
    device = ids_val.device
    # decide
    plans = _decide_layers(gm, seq, batch)
    heads = [int(r.meta["val"].shape[1]) for _, roots in plans for r, _ in roots]
    if cache_heads is not None and cache_heads < max(heads):
        raise ValueError(f"cache_heads={cache_heads} is fewer than a layer's kv heads "
                         f"({max(heads)})")
    frontier = _position_frontier(gm, ids, seq, batch)
    notes: list[str] = []
    if not frontier:
        notes.append("no position tensor found: the graph uses no positions (checked by the "
                      "numerical test of the rewrite)")
    # mutate: inputs
    new_inputs: list[fx.Node] = []
    last = ids
    for name in ["attention_mask"] + [f"past_{kind}_{i}" for i in range(len(plans))
                                      for kind in ("key", "value")]:
        with g.inserting_after(last):
            last = g.placeholder(name)
        new_inputs.append(last)
    attention_mask, past = new_inputs[0], new_inputs[1:]
    with g.inserting_before(last.next):
        t_len = g.call_function(aten.sym_size.int, (ids, 1))
        p_len = g.call_function(aten.sym_size.int, (past[0], 2))
        total = g.call_function(aten.sym_size.int, (attention_mask, 1))
        mask_bool = _build_mask(g, attention_mask, t_len, p_len, total, device)
        pos = _build_positions(g, attention_mask, p_len)
        sdpa_masks = {dt: _additive_mask(g, mask_bool, dt, device) for dt in _query_dtypes(plans)}
    # mutate: cache per layer
    presents: list[fx.Node] = []
    layers: list[CacheLayer] = []
    for i, (sdpa, roots) in enumerate(plans):
        dims = []
        for j, (root, chain) in enumerate(roots):
            heads, width = int(root.meta["val"].shape[1]), int(root.meta["val"].shape[3])
            pad = (cache_heads or heads) - heads
            with g.inserting_before(root.next):
                past_in = past[2 * i + j]
                if pad:  # the runtime's cache has cache_heads heads; this layer uses the first
                    past_in = g.call_function(aten.slice.Tensor, (past_in, 1, 0, heads))
                cat = g.call_function(aten.cat.default, ([past_in, root], 2))
                length = g.call_function(aten.sym_size.int, (cat, 2))
                present = cat if not pad else g.call_function(
                    aten.constant_pad_nd.default, (cat, [0, 0, 0, 0, 0, pad], 0.0))
            consumer = chain[-1] if chain else sdpa
            consumer.replace_input_with(root, cat)
            for op in chain:
                op.args = tuple(_renamed_sizes(a, seq, length) for a in op.args)
            presents.append(present)
            dims.append((heads + pad, width))
            used_heads = heads
        q_val = sdpa.args[0].meta.get("val")
        dtype = q_val.dtype if isinstance(q_val, torch.Tensor) else torch.float32
        kwargs = {k: v for k, v in sdpa.kwargs.items()
                  if k not in ("attn_mask", "dropout_p", "is_causal")}
        sdpa.args = (*sdpa.args[:3], sdpa_masks[dtype])
        sdpa.kwargs = kwargs
        names = {"sdpa": sdpa.name, "key": roots[0][0].name, "value": roots[1][0].name,
                 "past_key": past[2 * i].name, "past_value": past[2 * i + 1].name, "present_key": presents[2 * i].name,
                 "present_value": presents[2 * i + 1].name}
        layers.append(CacheLayer(i, ir.site(sdpa), dims[0][0], dims[0][1], dims[1][1],
                                 used_heads, names))
    # mutate: positions
    per_row = True
    for node, offset in frontier:
        val = node.meta["val"]
        with g.inserting_before(node.next):
            if val.dim() == 1:
                per_row = False
                ar = g.call_function(aten.arange.default, (t_len,),
                                     {"dtype": val.dtype, "device": device})
                new = g.call_function(aten.add.Tensor,
                                      (ar, g.call_function(operator.add, (p_len, offset))))
            else:
                new = g.call_function(aten.add.Tensor, (pos, offset))
                for _ in range(val.dim() - 2):
                    new = g.call_function(aten.unsqueeze.default, (new, 1))
                if val.dtype != torch.int64:
                    new = g.call_function(aten.to.dtype, (new, val.dtype))
        node.replace_all_uses_with(new)
        notes.append(f"positions: {node.name} ({'[T]' if val.dim() == 1 else list(val.shape)}"
                     f" = arange + {offset}) now follow the cache")
    # outputs
    out = next(n for n in g.nodes if n.op == "output")
    flat = out.args[0]
    logits = flat[0] if isinstance(flat, (tuple, list)) else flat
    out.args = ((logits, *presents),)
    g._codegen = fx.graph.CodeGen()
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    kv = KVCacheGraph(gm, layers, per_row, notes)
    if check:
        check_kv_cache(kv, original)
    log.info("kv cache: %d layers, kv heads %s, positions per row: %s", len(layers),
             sorted({lay.kv_heads for lay in layers}), per_row)
    return kv


def _renamed_sizes(arg, seq, length: fx.Node):
    """A layout op's size list with the sequence length replaced by the cache length."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_renamed_sizes(a, seq, length) for a in arg)
    if isinstance(arg, fx.Node) and not isinstance(arg.meta.get("val"), torch.Tensor) \
            and _same(arg.meta.get("val"), seq):
        return length
    return arg


def _build_mask(g: fx.Graph, attention_mask, t_len, p_len, total, device) -> fx.Node:
    """Boolean ``[B, 1, T, P+T]``: causal at offset P, padding from ``attention_mask``, diagonal."""
    c = g.call_function
    kpos = c(aten.arange.default, (total,), {"dtype": torch.int64, "device": device})
    qpos = c(aten.add.Tensor, (c(aten.arange.default, (t_len,),
                                 {"dtype": torch.int64, "device": device}), p_len))
    q2 = c(aten.unsqueeze.default, (qpos, 1))  # [T, 1]
    k2 = c(aten.unsqueeze.default, (kpos, 0))  # [1, S]
    causal = c(aten.le.Tensor, (k2, q2))
    diag = c(aten.eq.Tensor, (k2, q2))
    keep = c(aten.ne.Scalar, (attention_mask, 0))  # [B, S]
    keep = c(aten.unsqueeze.default, (c(aten.unsqueeze.default, (keep, 1)), 1))  # [B, 1, 1, S]
    return c(aten.logical_or.default, (c(aten.logical_and.default, (causal, keep)), diag))


def _query_dtypes(plans) -> list[torch.dtype]:
    dtypes = []
    for sdpa, _ in plans:
        val = sdpa.args[0].meta.get("val")
        dt = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        if dt not in dtypes:
            dtypes.append(dt)
    return dtypes


def _additive_mask(g: fx.Graph, mask_bool: fx.Node, dtype: torch.dtype, device) -> fx.Node:
    """``0`` where attended, the dtype's lowest value elsewhere (no -inf, no NaN fix-ups)."""
    c = g.call_function
    zero = c(aten.scalar_tensor.default, (0.0,), {"dtype": dtype, "device": device})
    lowest = c(aten.scalar_tensor.default, (torch.finfo(dtype).min,),
               {"dtype": dtype, "device": device})
    return c(aten.where.self, (mask_bool, zero, lowest))


def _build_positions(g: fx.Graph, attention_mask, p_len) -> fx.Node:
    """``max(cumsum(attention_mask) - 1, 0)[:, P:]``: int64 ``[B, T]``."""
    c = g.call_function
    cum = c(aten.cumsum.default, (attention_mask, 1), {"dtype": torch.int64})
    pos = c(aten.clamp_min.default, (c(aten.sub.Tensor, (cum, 1)), 0))
    return c(aten.slice.Tensor, (pos, 1, p_len, _MAXINT))


def check_kv_cache(kv: KVCacheGraph, reference: fx.GraphModule, *, prompt: int = 6,
                   steps: int = 3, atol: float = 1e-4, seed: int = 0) -> float:
    """Prefill ``prompt`` tokens then ``steps`` single tokens; compare with the full forward.

    Returns:
        The max abs logits difference over every position.

    Raises:
        VerificationError: a difference above ``atol`` scaled by the logits' magnitude
            (``atol * max(1, max |logits|)``), or non-finite logits.
    """
    vocab = (reference.meta.get("fxcompress_config") or {}).get("vocab_size") or 2
    ids = torch.randint(0, int(vocab), (1, prompt + steps),
                        generator=torch.Generator().manual_seed(seed))
    if ir.is_quantized(reference):
        # Activation rounding turns float noise between a 1-token and a T-token matmul into a
        # whole quantization step wherever a value sits at a rounding boundary (seen on the
        # 134M model: 0.05 on the logits). The rewrite does not touch Q/DQ nodes, so it is
        # checked on both graphs with activation quantize -> dequantize pairs removed.
        reference = without_activation_qdq(reference)
        kv = KVCacheGraph(without_activation_qdq(kv.graph_module), kv.layers)
    with torch.no_grad():
        full = reference(ids)
        full = full[0] if isinstance(full, (tuple, list)) else full
    got = decode_logits(kv, ids, prompt)
    diff = float((got - full).abs().max())
    tol = atol * max(1.0, float(full.abs().max()))
    if not (torch.isfinite(got).all() and diff <= tol):
        raise VerificationError(
            f"KV-cache rewrite: prefill {prompt} + {steps} decode steps differ from the full "
            f"forward by {diff:.3g} (tolerance {tol:.3g})")
    log.debug("kv cache check: max diff %.3g over %d positions", diff, prompt + steps)
    return diff


def without_activation_qdq(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` where every ``dequantize(quantize(x))`` of an activation reads ``x``.

    Weights (``dequantize`` of a parameter) stay as they are; what remains is the float
    function the quantized graph rounds.
    """
    gm = ir.copy_sharing_weights(gm)
    for n in list(gm.graph.nodes):
        if not (_is_qd(n, "dequantize") and isinstance(n.args[0], fx.Node)
                and _is_qd(n.args[0], "quantize")):
            continue
        x = n.args[0].args[0]
        if isinstance(x, fx.Node) and x.op != "get_attr":
            n.replace_all_uses_with(x)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _is_qd(n: fx.Node, prefix: str) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
        n.target.namespace == "quantized_decomposed" and \
        n.target._schema.name.split("::")[-1].startswith(prefix)


def decode_logits(kv: KVCacheGraph, ids: torch.Tensor, prompt: int,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, S, V]`` of ``ids`` computed as a prefill of ``prompt`` tokens plus steps."""
    b, s = ids.shape
    mask = torch.ones(b, s, dtype=torch.long) if attention_mask is None else attention_mask
    logits, past = kv(ids[:, :prompt], mask[:, :prompt], kv.empty_cache(b))
    outs = [logits]
    for t in range(prompt, s):
        logits, past = kv(ids[:, t:t + 1], mask[:, :t + 1], past)
        outs.append(logits)
    return torch.cat(outs, dim=1)


#: ops between the stream and the LM head that act on each position alone, so slicing the
#: head's input to the last position equals slicing its output: static per-tensor and
#: per-token activation quantization (a scale computed over the whole tensor is not)
_POSITIONWISE_QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_token",
                     "dequantize_per_token", "choose_qparams_per_token")


def last_position_logits(kv: KVCacheGraph, *, check: bool = True) -> tuple[KVCacheGraph, str]:
    """A copy of ``kv`` whose ``logits`` are the last position's only: ``[B, 1, V]``.

    Generation reads nothing else (ORT GenAI takes the last position of a prompt's logits),
    and the LM head of a 128-token prompt is one of its largest GEMMs. The head's input is
    sliced to the last position where only position-wise ops lie between the stream and the
    head (see ``_POSITIONWISE_QDQ``); otherwise the logits themselves are sliced (same
    result, no saving) and the note says why. With ``check`` the result is compared with the
    full graph's last position on a prefill and one decode step (the head's GEMM has fewer
    rows: float rounding only).

    Returns:
        ``(kv, note)``: the rewritten graph and one line for the report.

    Raises:
        VerificationError: the sliced graph's logits differ from the full graph's last ones.
    """
    new, why = _slice_last(kv, head_input=True)
    if why is None and check:
        try:
            _check_last_position(kv, new)
        except (VerificationError, RuntimeError) as e:  # e.g. an op after the head needs S
            why = f"slicing the head's input failed its check: {e}"
    if why is None:
        return new, new.notes[-1]
    new, _ = _slice_last(kv, head_input=False)
    new.notes[-1] = f"logits of the last position: the logits are sliced, no saving ({why})"
    if check:
        _check_last_position(kv, new)
    return new, new.notes[-1]


def _slice_last(kv: KVCacheGraph, *, head_input: bool) -> tuple[KVCacheGraph, str | None]:
    """``(graph, reason)``: the head's input sliced (reason None) or, where that is not
    position-wise (the reason), the logits."""
    gm = ir.copy_sharing_weights(kv.graph_module)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out.args[0][0]
    head, why = _lm_head_of(logits) if head_input else (None, "not asked")
    if head is not None:
        root, chain, why = _head_input_chain(head)
    target = root if head is not None and why is None else logits
    with gm.graph.inserting_after(target):
        last = gm.graph.call_function(torch.ops.aten.slice.Tensor, (target, 1, -1, 2 ** 62))
    if target is logits:
        out.args = ((last, *out.args[0][1:]),)
        note = "logits of the last position: the logits are sliced"
    else:
        for u in list(root.users):
            if u in chain:
                u.replace_input_with(root, last)
        note = (f"logits of the last position: the LM head ({head.name}) reads the last "
                f"position only")
    gm.graph.lint()
    gm.recompile()
    new = KVCacheGraph(gm, kv.layers, kv.per_row_positions, list(kv.notes) + [note])
    return new, None if target is not logits else why


def _lm_head_of(logits: fx.Node) -> tuple[fx.Node | None, str | None]:
    """The linear producing ``logits`` through position-wise ops, or a reason."""
    n = logits
    while n.op == "call_function" and ir.op_name(n) != "linear":
        if ir.op_name(n) not in ("mul", "div", "tanh", "add", "_to_copy", "to", "clone",
                                 "alias", "contiguous"):
            return None, f"the logits come from {ir.op_name(n)} ({n.name}), not an LM-head linear"
        n = n.args[0]
        if not isinstance(n, fx.Node):
            return None, "the logits do not come from a linear"
    if n.op != "call_function":
        return None, f"the logits come from {n.op} {n.name}"
    return n, None


def _head_input_chain(head: fx.Node) -> tuple[fx.Node, set[fx.Node], str | None]:
    """``(root, chain, reason)``: the stream node read by the head's input, the nodes between
    them (all position-wise, else ``reason``) and the head."""
    chain, n = {head}, head.args[0]
    while isinstance(n, fx.Node) and _is_qd(n, "") and \
            n.target._schema.name.split("::")[-1] in _POSITIONWISE_QDQ:
        chain.add(n)
        n = n.args[0]
    if not isinstance(n, fx.Node):
        return head, chain, "the LM head's input is not a tensor"
    root = n
    # every reader of root on the way to the head must be in the chain (or a getitem of a
    # per-token scale in it): a whole-tensor scale would change with the slice
    for u in root.users:
        if u in chain:
            continue
        if _is_qd(u, "choose_qparams_per_token"):
            chain.add(u)
            continue
        if _reaches(u, head):
            return root, chain, f"{u.name} ({ir.op_name(u)}) reads the head's input as a whole"
    return root, chain, None


def _reaches(src: fx.Node, dst: fx.Node) -> bool:
    seen, frontier = set(), [src]
    while frontier:
        n = frontier.pop()
        if n is dst:
            return True
        for u in n.users:
            if u not in seen:
                seen.add(u)
                frontier.append(u)
    return False


def _check_last_position(full: KVCacheGraph, last: KVCacheGraph, prompt: int = 5) -> None:
    vocab = (full.graph_module.meta.get("fxcompress_config") or {}).get("vocab_size") or 2
    ids = torch.randint(0, int(vocab), (2, prompt + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    got, want = [], []
    for kv, outs in ((full, want), (last, got)):
        logits, past = kv(ids[:, :prompt], mask[:, :prompt], kv.empty_cache(2))
        step, _ = kv(ids[:, prompt:], mask, past)
        outs += [logits[:, -1:], step]
    for g, w in zip(got, want):
        # the head's GEMM runs with fewer rows: float rounding only (measured up to 1e-6
        # relative); a wrong position or a scale taken over the whole prompt is far above
        tol = 1e-5 * max(1.0, float(w.abs().max()))
        diff = float((g - w).abs().max()) if g.shape == w.shape else float("inf")
        if not diff <= tol:
            raise VerificationError(
                f"last-position logits: the sliced graph differs from the full graph's last "
                f"position (shapes {tuple(g.shape)} vs {tuple(w.shape)}, max diff {diff:.3g}, "
                f"tolerance {tol:.3g})")


__all__ = ["CacheLayer", "KVCacheGraph", "check_cache", "check_kv_cache", "decode_logits",
           "last_position_logits", "with_kv_cache"]
