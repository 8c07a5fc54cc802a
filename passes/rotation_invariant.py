"""RotationInvariant: rewrite every residual-stream norm as a gain-free RMSNorm (exact).

Paper: SliceGPT (Ashkboos et al., arXiv:2401.15024), section 3.2 ("LayerNorm to RMSNorm").

Identities relied on:

- If every writer of the residual stream writes centred vectors, the stream is centred
  (``mean(x) = 0``), and then ``layer_norm(x) = (x - mean) / sqrt(var + eps) * g + b =
  x / sqrt(mean(x^2) + eps) * g + b = rms_norm(x) * g + b`` (``var == mean(x^2)`` when the mean
  is zero, so even the eps handling agrees). A writer is centred by ``W <- (I - 11^T/d) W``
  (subtract each column's mean over the ``d`` output rows), its bias by ``b <- b - mean(b)``,
  an embedding table by subtracting each row's mean.
- A norm's gain and bias fold into the linears that read it:
  ``W (n * g + beta) + c = (W diag(g)) n + (W beta + c)``.

- A norm between a writer and the residual add (OLMo2's and Gemma2's post-norms) keeps its gain
  only if something other than the stream can absorb the rotation: a new linear with weight
  ``I`` is inserted after it, ``post_norm(x) = linear(post_norm(x), I)``, and becomes the
  stream's writer (SliceGPT folds ``Q^T`` into it, as the paper's shortcut matrices carry a
  rotation the stream itself cannot); the norm then sits off the stream. Cost: ``d^2``
  parameters per post-norm.
- A norm reading an embedding directly (Bloom's ``word_embeddings_layernorm``) is a function of
  the token id only: ``norm(E[ids]) = norm(E)[ids]``, so it folds into a private copy of the
  table (computed in float64).
- A multiply of the stream by a scalar (Gemma's ``sqrt(d)`` embedding scale) commutes with any
  ``Q``: it is a shape-only op for this pass.

After the rewrite every residual norm is ``aten.rms_norm(x, [d], None, eps)``: it commutes with
any orthogonal ``Q`` on the channel dim (``rms_norm(x Q) = rms_norm(x) Q``), which is what
:mod:`passes.slicegpt` needs.

Sites rewritten: the residual stream found by the channel dependency graph (group
``residual``): its sources (embedding tables, linear writers such as ``o_proj``/``down_proj``/
``fc2``/``c_proj`` and their biases) and every ``rms_norm``/``layer_norm`` on it, with the
linears reading each norm (through shape-only ops such as ``view``). Tied embeddings are untied
first (the lm_head's columns absorb the final norm's gain; the table must not).

Skips: nothing silently. A residual stream mixing ``layer_norm`` and ``rms_norm``, or an op on
the stream this pass does not understand raises :class:`~compiler.errors.PassError` naming the
node, before anything is mutated.

Preconditions: ``canonical`` (one norm node per norm, GPT-2's Conv1D as linear), not quantized.
Exact.
Establishes ``rotation_invariant``. A second run reports ``modified=False``.

Hyper-parameters: none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import fx

from compiler import ir
from compiler.depgraph import ChannelGroup, build_channel_groups
from compiler.errors import PassError, PreconditionError
from compiler.ir import untie_embeddings
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.pass_manager import propagate_shapes

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: Ops that only move the residual stream around (leading dims / dtype), keeping the last dim.
PASS_THROUGH = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype,
    aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
    aten.to.dtype_layout, aten.to.device,
})
NORMS = frozenset({ir.RMS_NORM, ir.LAYER_NORM})


@dataclass
class ResidualStream:
    """The residual stream of a canonical graph, classified node by node.

    Attributes:
        width: the hidden size ``d``.
        sources: embedding nodes whose table columns write the stream.
        writers: linear nodes whose rows write the stream.
        adds: residual additions (both operands on the stream).
        norms: ``rms_norm``/``layer_norm`` nodes reading the stream, in graph order.
        passes: shape-only ops on the stream (and on norm outputs).
        readers: linear nodes reading the stream (through a norm or not), in graph order.
        stream: node -> stream id; a stream is a tensor and its shape-only views. A norm's
            output starts a stream of its own.
        norm_of_stream: stream id of a norm's output -> the norm node.
    """

    width: int
    sources: list[fx.Node] = field(default_factory=list)
    writers: list[fx.Node] = field(default_factory=list)
    adds: list[fx.Node] = field(default_factory=list)
    norms: list[fx.Node] = field(default_factory=list)
    passes: list[fx.Node] = field(default_factory=list)
    readers: list[fx.Node] = field(default_factory=list)
    stream: dict[fx.Node, int] = field(default_factory=dict)
    norm_of_stream: dict[int, fx.Node] = field(default_factory=dict)

    def norm_feeding(self, reader: fx.Node) -> fx.Node | None:
        """The norm whose output ``reader`` reads (through shape-only ops), or None."""
        return self.norm_of_stream.get(self.stream.get(reader.args[0], -1))

    def readers_of(self, norm: fx.Node) -> list[fx.Node]:
        s = self.stream[norm]
        return [r for r in self.readers if self.stream.get(r.args[0]) == s]


_SCALAR_OPS = frozenset({aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar})


def is_scalar_multiply(n: fx.Node, stream: dict[fx.Node, int]) -> bool:
    """True if ``n`` is ``x * c`` or ``x / c`` with ``x = n.args[0]`` and ``c`` one number
    (a python scalar or a one-element tensor off the stream): it commutes with any linear map
    on the channel dim."""
    if n.op != "call_function" or n.target not in _SCALAR_OPS or len(n.args) != 2 or n.kwargs:
        return False
    c = n.args[1]
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return True
    v = c.meta.get("val") if isinstance(c, fx.Node) else None
    return (isinstance(v, torch.Tensor) and c not in stream and v.numel() == 1
            and all(isinstance(s, int) for s in v.shape))


def residual_group(gm: fx.GraphModule) -> ChannelGroup:
    """The ``residual`` channel group of ``gm`` (PreconditionError if there is none)."""
    groups = build_channel_groups(gm)
    if "residual" not in groups:
        raise PreconditionError("no residual stream found (no embedding table writes a channel "
                                "dim); is this a decoder-only LM graph?")
    return groups["residual"]


def _stream_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The ``residual`` group and the groups joined to it by SliceGPT shortcut linears.

    A shortcut ``linear(x, M)`` on a skip path separates the channel spaces of its input and
    output in the dependency graph, yet both are the residual stream (in different bases).
    """
    groups = build_channel_groups(gm)
    if "residual" not in groups:
        raise PreconditionError("no residual stream found (no embedding table writes a channel "
                                "dim); is this a decoder-only LM graph?")
    out = [groups["residual"]]
    shortcuts = [n for n in ir.nodes_of(gm, ir.LINEAR)
                 if n.meta.get("fxcompress_created_by") == "slicegpt"]
    changed = True
    while changed:
        changed = False
        for n in shortcuts:
            target = str(n.args[1].target)
            src = groups.group_of(target, 1)
            dst = groups.group_of(target, 0)
            if src in out and dst is not None and dst not in out:
                out.append(dst)
                changed = True
    return out


def residual_stream(gm: fx.GraphModule, group: ChannelGroup | None = None) -> ResidualStream:
    """Classify every node on the residual stream of a canonical graph.

    Args:
        gm: a canonical GraphModule (not modified).
        group: its ``residual`` channel group (computed if None).

    Returns:
        The :class:`ResidualStream`.

    Raises:
        PassError: an op on the stream that is none of source, writer, add, norm, shape-only op
            or reader (named with its site).
    """
    groups = [group] if group is not None else _stream_groups(gm)
    op_nodes = {o.node for g in groups for o in g.ops}
    members = [m for g in groups for m in g.members]
    table_ops = {m.op for m in members if m.role == "table"}
    writer_ops = {m.op for m in members if m.role == "out"}
    reader_ops = {m.op for m in members if m.role == "in"}
    group = groups[0]
    on_stream = op_nodes | table_ops | writer_ops
    rs = ResidualStream(width=group.width)
    next_id = 0

    def new_stream(n: fx.Node) -> None:
        nonlocal next_id
        rs.stream[n] = next_id
        next_id += 1

    for n in gm.graph.nodes:
        if n.name in reader_ops and ir.is_op(n, ir.LINEAR):
            rs.readers.append(n)
        if n.name not in on_stream:
            continue
        if n.name in table_ops and ir.is_op(n, ir.EMBEDDING):
            rs.sources.append(n)
            new_stream(n)
        elif n.name in writer_ops and ir.is_op(n, ir.LINEAR):
            rs.writers.append(n)
            new_stream(n)
        elif ir.is_op(n, *NORMS):
            rs.norms.append(n)
            new_stream(n)
            rs.norm_of_stream[rs.stream[n]] = n
        elif ir.is_op(n, aten.add.Tensor) and all(
                isinstance(a, fx.Node) and a in rs.stream for a in n.args[:2]) and not n.kwargs:
            rs.adds.append(n)
            new_stream(n)
        elif (n.op == "call_function" and n.args and n.args[0] in rs.stream
              and (n.target in PASS_THROUGH or is_scalar_multiply(n, rs.stream))):
            rs.passes.append(n)
            rs.stream[n] = rs.stream[n.args[0]]
        else:
            where = ir.site(n) or "<top>"
            raise PassError(f"residual stream: op {n.name} ({ir.op_name(n)}) at {where}"
                            " is not a source, writer, residual add, norm or shape-only op; "
                            "cannot transform the stream through it")
    for r in rs.readers:
        if r.args[0] not in rs.stream:
            raise PassError(f"residual stream: reader {ir.site(r)} does not read the stream "
                            "directly")
    return rs


def _stream_users_ok(rs: ResidualStream, norm: fx.Node) -> str:
    """'' if the norm's output reaches only linears (as input) through shape-only ops."""
    s = rs.stream[norm]
    nodes = [n for n, sid in rs.stream.items() if sid == s]
    readers = set(rs.readers_of(norm))
    for n in nodes:
        for u in n.users:
            if u in readers and u.args[0] is n and u.args[1] is not n:
                continue
            if u in rs.stream and rs.stream[u] == s:
                continue
            return f"{u.name} ({ir.op_name(u)})"
    return ""


def _off_stream_user(rs: ResidualStream, norm: fx.Node) -> str:
    """'' if the norm's output reaches only linears and residual-stream ops (adds, norms)."""
    s = rs.stream[norm]
    readers = set(rs.readers_of(norm))
    for n in [n for n, sid in rs.stream.items() if sid == s]:
        for u in n.users:
            if (u in readers and u.args[0] is n and u.args[1] is not n) or u in rs.stream:
                continue
            return f"{u.name} ({ir.op_name(u)})"
    return ""


class RotationInvariant(Pass):
    """LayerNorm -> RMSNorm (mean folded into the writers), norm gains/biases into the readers."""

    name = "rotation_invariant"
    exact = True
    requires = frozenset({"canonical"})
    establishes = frozenset({"rotation_invariant"})
    forbids = frozenset({"quantized"})  # folding gains into Q/DQ'd weights would leave their grid

    def __init__(self) -> None:
        pass

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        self.check_not_quantized(gm, ctx, "make the stream rotation-invariant before quantizing")
        stats = make_rotation_invariant(gm, probe=ctx.probe_inputs if ctx else None)
        modified = any(stats.values())
        log.info("rotation_invariant: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
        if not modified:
            return PassResult.unchanged(gm, **stats)
        return PassResult(gm, True, frozenset(), stats, [])


def is_rotation_invariant(gm: fx.GraphModule) -> bool:
    """True if every norm on the residual stream is a gain-free ``rms_norm``."""
    rs = residual_stream(gm)
    return all(ir.is_op(n, ir.RMS_NORM) and _norm_params(n)[0] is None
               and not _stream_users_ok(rs, n) for n in rs.norms)


def _norm_params(n: fx.Node) -> tuple[fx.Node | None, fx.Node | None, float | None]:
    """(gain, bias, eps) of an rms_norm/layer_norm node."""
    if ir.is_op(n, ir.RMS_NORM):
        g = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
        return g, None, eps
    g = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
    b = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
    eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
    return g, b, eps


def make_rotation_invariant(gm: fx.GraphModule, probe: torch.Tensor | None = None
                            ) -> dict[str, int]:
    """Rewrite ``gm`` in place so that every residual norm is a gain-free ``rms_norm``.

    Args:
        gm: a canonical GraphModule.
        probe: input ids used only for their rank/dtype when re-propagating shapes.

    Returns:
        Counters: ``embeddings_untied``, ``writers_centred``, ``layer_norms_to_rms``,
        ``norms_rewritten`` (norms made gain-free ``rms_norm``), ``gains_folded`` and
        ``biases_folded`` (per reading linear), ``embedding_norms_folded``,
        ``post_norm_writers``.

    Raises:
        PassError: the stream mixes norm kinds, or a norm feeds something other than linears.
    """
    stats = {"embeddings_untied": 0, "writers_centred": 0, "layer_norms_to_rms": 0,
             "norms_rewritten": 0, "gains_folded": 0, "biases_folded": 0,
             "embedding_norms_folded": 0, "post_norm_writers": 0}
    rs = residual_stream(gm)
    # decide: norms whose output stays on the stream (read by an add or another norm)
    blocked = [n for n in rs.norms if _stream_users_ok(rs, n)]
    emb_norms = [n for n in blocked if _embedding_of(n) is not None]
    post_norms = [n for n in blocked if n not in emb_norms]
    for n in blocked:
        if n.args[0] in rs.adds:
            raise PassError(f"norm {n.name} at {ir.site(n)} normalises the residual stream in "
                            "place (post-LN: it reads the residual add and its output is the "
                            "next stream, as in BERT); a rotation of the stream cannot pass "
                            "through it")
        bad = _off_stream_user(rs, n)
        if bad:
            raise PassError(f"norm {n.name} at {ir.site(n)} feeds {bad}, which is neither a "
                            "linear nor the residual stream; its output cannot be rotated")
        g, b, _ = _norm_params(n)
        if any(p is not None and ir.param_node(p) is None for p in (g, b)):
            raise PassError(f"norm {n.name} at {ir.site(n)}: gain or bias is not a parameter")
    _check_norm_kinds([n for n in rs.norms if n not in blocked])
    # mutate
    for n in emb_norms:
        fold_norm_into_embedding(gm, n)
        stats["embedding_norms_folded"] += 1
    for n in post_norms:
        insert_stream_writer(gm, n)
        stats["post_norm_writers"] += 1
    if blocked:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        rs = residual_stream(gm)
    todo = [n for n in rs.norms if ir.is_op(n, ir.LAYER_NORM) or _norm_params(n)[0] is not None]
    if not todo:
        if blocked:
            _finish(gm, probe)
        return stats
    # decide
    kinds = _check_norm_kinds(rs.norms)
    for n in todo:
        bad = _stream_users_ok(rs, n)
        if bad:
            raise PassError(f"norm {n.name} at {ir.site(n)} feeds {bad}, not only linears; "
                            "its gain cannot be folded")
        g, _, _ = _norm_params(n)
        if g is not None and ir.param_node(g) is None:
            raise PassError(f"norm {n.name} at {ir.site(n)}: gain is not a parameter")
    centre = "layer_norm" in kinds
    # mutate
    stats["embeddings_untied"] = untie_embeddings(gm)
    if stats["embeddings_untied"]:
        rs = residual_stream(gm)
    if centre:
        for src in rs.sources:
            t = ir.get_param(gm, src.args[0])
            t64 = t.double()
            ir.set_param(gm, src.args[0], (t64 - t64.mean(dim=1, keepdim=True)).to(t.dtype))
            stats["writers_centred"] += 1
        for w in rs.writers:
            _, wn, bn = ir.linear_parts(w)
            t = ir.get_param(gm, wn).double()
            ir.set_param(gm, wn, (t - t.mean(dim=0, keepdim=True)).to(ir.get_param(gm, wn).dtype))
            if ir.param_node(bn) is not None:
                b = ir.get_param(gm, bn)
                ir.set_param(gm, bn, (b.double() - b.double().mean()).to(b.dtype))
            stats["writers_centred"] += 1
    for n in todo:
        g, b, eps = _norm_params(n)
        gain = ir.get_param(gm, g).double() if g is not None else None
        beta = ir.get_param(gm, b).double() if ir.param_node(b) is not None else None
        for r in rs.readers_of(n):
            _, wn, bn = ir.linear_parts(r)
            w = ir.get_param(gm, wn)
            w64 = w.double()
            if beta is not None:
                extra = w64 @ beta  # W beta, before the gain is folded
                if ir.param_node(bn) is not None:
                    old = ir.get_param(gm, bn)
                    ir.set_param(gm, bn, (old.double() + extra).to(old.dtype))
                else:
                    path = ir.module_path(r) or r.name
                    bnode = ir.add_param(gm, f"{path}.bias_folded", extra.to(w.dtype), before=r)
                    r.args = (r.args[0], r.args[1], bnode, *r.args[3:])
                stats["biases_folded"] += 1
            if gain is not None:
                ir.set_param(gm, wn, (w64 * gain[None, :]).to(w.dtype))
                stats["gains_folded"] += 1
        x = n.args[0]
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(ir.RMS_NORM, (x, list(n.args[1]), None, eps))
        ir.copy_meta(n, new, created_by="rotation_invariant")
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        stats["norms_rewritten"] += 1
        if ir.is_op(n, ir.LAYER_NORM):
            stats["layer_norms_to_rms"] += 1
    _finish(gm, probe)
    return stats


def _check_norm_kinds(norms: list[fx.Node]) -> set[str]:
    kinds = {ir.op_name(n) for n in norms}
    if len(kinds) > 1:
        raise PassError(f"residual stream mixes {sorted(kinds)}; centring the writers for the "
                        "layer_norms would change the rms_norms")
    return kinds


def _finish(gm: fx.GraphModule, probe: torch.Tensor | None) -> None:
    gm.graph.eliminate_dead_code()
    ir.remove_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, probe if probe is not None else torch.zeros(2, 8, dtype=torch.long))


def _embedding_of(norm: fx.Node) -> fx.Node | None:
    """The embedding node ``norm`` reads directly (and alone), else None."""
    x = norm.args[0]
    if isinstance(x, fx.Node) and ir.is_op(x, ir.EMBEDDING) and len(x.users) == 1 \
            and ir.param_node(x.args[0]) is not None:
        return x
    return None


def fold_norm_into_embedding(gm: fx.GraphModule, norm: fx.Node) -> None:
    """``norm(E[ids]) = norm(E)[ids]``: give the embedding a private, normalised table."""
    emb = _embedding_of(norm)
    table = emb.args[0]
    t = ir.get_param(gm, table)
    g, b, eps = _norm_params(norm)
    gain = None if g is None else ir.get_param(gm, g).double()
    bias = None if b is None else ir.get_param(gm, b).double()
    t64 = t.double()
    if ir.is_op(norm, ir.LAYER_NORM):
        eps = 1e-5 if eps is None else eps
        normed = torch.nn.functional.layer_norm(t64, [t64.shape[-1]], gain, bias, eps)
    else:
        eps = torch.finfo(t.dtype).eps if eps is None else eps
        normed = torch.nn.functional.rms_norm(t64, [t64.shape[-1]], gain, eps)
    path = ir.module_path(emb) or "embedding"
    new_table = ir.add_param(gm, f"{path}.weight_normed", normed.to(t.dtype), before=emb)
    emb.replace_input_with(table, new_table)
    norm.replace_all_uses_with(emb)
    gm.graph.erase_node(norm)


def insert_stream_writer(gm: fx.GraphModule, norm: fx.Node) -> fx.Node:
    """Route every use of ``norm`` through a new ``linear(norm, I)`` (the stream's writer)."""
    d = norm.meta["val"].shape[-1]
    dtype = norm.meta["val"].dtype
    path = ir.module_path(norm) or norm.name
    users = list(norm.users)
    after = norm.next
    w = ir.add_param(gm, f"{path}.stream_writer", torch.eye(d, dtype=dtype), before=after)
    with gm.graph.inserting_after(w):
        lin = gm.graph.call_function(ir.LINEAR, (norm, w))
    ir.copy_meta(norm, lin, created_by="rotation_invariant")
    stack = dict(norm.meta.get("nn_module_stack") or {})
    if stack:
        # its own site (``...post_attention_layernorm.stream_writer``), not the norm's
        key, (mpath, _typ) = list(stack.items())[-1]
        stack[f"{key}.stream_writer"] = (f"{mpath}.stream_writer", "torch.nn.Linear")
        lin.meta["nn_module_stack"] = stack
    for u in users:
        u.replace_input_with(norm, lin)
    return lin


__all__ = [
    "ResidualStream",
    "RotationInvariant",
    "fold_norm_into_embedding",
    "insert_stream_writer",
    "is_scalar_multiply",
    "is_rotation_invariant",
    "make_rotation_invariant",
    "residual_group",
    "residual_stream",
]
