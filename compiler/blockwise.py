"""Block-sequential calibration: run a graph one decoder block at a time over the calibration set.

Paper: none for the engine itself; it is the procedure of GPTQ (arXiv:2210.17323), AWQ
(arXiv:2306.00978) and SliceGPT (arXiv:2401.15024), which all calibrate block ``i`` on the
inputs that the already-compressed blocks ``0..i-1`` produce.

How the graph is split (structure only, no module names):

- The **stream** is everything that depends on the residual stream's sources (the embedding
  lookups whose tables write the ``residual`` channel group of :mod:`compiler.depgraph`).
  Every other computed node (attention masks, rotary ``cos``/``sin``, positions, symbolic
  sizes) is a **side** value: it depends only on the graph inputs, so it is evaluated once per
  calibration batch and handed to every block that reads it.
- A **cut** is a point of the graph order where exactly one stream value is live (computed
  before, read after) and that value is on the residual group: the residual stream between
  two sub-blocks. The stretches between cuts are **segments**.
- Segments are grouped into **blocks**: a block starts at each segment holding an attention
  op (``scaled_dot_product_attention``), so one decoder block is its attention segment plus the
  MLP segment(s) after it (a parallel-attention block is one segment). Segments before the
  first attention segment belong to the **prologue** (embeddings); the last segment, which
  reaches the graph output, is the **epilogue** (final norm, LM head). A graph without an
  attention op gets one block per segment. With ``unit="segment"`` every segment is a unit of
  its own (SliceGPT decides a basis at every residual point between sub-blocks); each unit
  then records the decoder block it belongs to (:attr:`Block.layer`).

What the engine does (:func:`run_blockwise`), for a :class:`BlockVisitor` supplied by a pass:

1. evaluate the side values and the prologue for every calibration batch, keeping only the
   block-0 input (one residual tensor per batch) and the side values;
2. for each block (and the epilogue): run the block on every batch's input, calling
   ``visitor.observe`` with the values of the nodes the visitor asked for (e.g. every linear
   input, for ``X^T X``); then ``visitor.transform(block)`` (the pass decides and records how the
   block's weights change: parameter overrides held by the engine, or exact in-place folds);
   then the block's outputs for the next block: the transformed block re-run
   (``propagate="transformed"``, GPTQ) or the outputs of the observation run
   (``propagate="original"``, AWQ). A visitor that observes only the block's input (or
   nothing) with ``propagate="transformed"`` gets the stored inputs without an observation run,
   so the block runs once. The epilogue runs only up to its last observed node (its output
   goes nowhere: an LM head nobody observes is not computed). ``transform`` may also replace
   the stored inputs
   (:meth:`BlockRunner.replace_inputs`, e.g. SliceGPT's projection at a block boundary).

Memory: the block inputs and outputs of the calibration set for one block (optionally stored in
a compact dtype), plus the side values; never the whole model's activations. A block run drops
each intermediate after its last reader, and the allocator's free memory goes back to the OS
every :data:`TRIM_EVERY` units (:func:`compiler.memory.release_free_memory`): on the 134M
pipeline of ``benchmarks/bench_compile_time.py`` the compile phase's peak went from 2.57-2.67
to 2.41-2.42 GB at no time cost the VM's noise shows (trimming after every unit cost about
1.5 s of 72: pages faulted in again). Progress: one tqdm
bar over blocks when ``progress`` is set (as :mod:`compiler.stats` does over batches).

Precision: with ``compute_dtype=torch.bfloat16`` (``compile(calibration_dtype="bfloat16")``,
:mod:`compiler.precision`) each block run executes the graph's ops under autocast, each linear's
weight and bias cast once per block rather than once per run (the values are autocast's, bit
for bit); observers receive float32 tensors and run outside autocast.

The caller's graph is not modified by the engine; parameter overrides are kept in
:attr:`BlockRunner.overrides` for the pass to apply (or discard) afterwards.

Preconditions: a canonical GraphModule with a ``residual`` channel group; calibration batches of
``input_ids``. Errors name what is missing (no residual stream, no cut).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from compiler import ir
from compiler.depgraph import build_channel_groups
from compiler.errors import DataError, PassError, PreconditionError
from compiler.memory import release_free_memory
from compiler.precision import calibration_autocast

log = logging.getLogger(__name__)

#: calibration sweeps run by the engine in this process (the pass manager reports them per pass)
SWEEPS: Counter[str] = Counter()

PROPAGATE = ("transformed", "original")
#: the allocator's free memory goes back to the OS after every this many units: often enough
#: that fragmentation cannot pile up over a sweep, rarely enough that the pages faulted in
#: again after a trim stay a small cost
TRIM_EVERY = 4


# ----------------------------------------------------------------------------- partition


@dataclass
class Block:
    """One stretch of the stream between two cuts (or the epilogue).

    Attributes:
        index: position in :attr:`BlockPartition.blocks` (the epilogue is last).
        nodes: the stream nodes of the block, in graph order.
        input: the residual value entering the block (the previous cut's value).
        output: the residual value leaving it (None for the epilogue: its output is the graph's).
        side_inputs: side values (and graph inputs) the block reads.
        epilogue: True for the final norm / LM head part.
        layer: the decoder block this unit is part of (its own index with ``unit="block"``;
            with ``unit="segment"``, the block of the attention segment that opened it; None for
            the epilogue and for segments before the first attention segment).
    """

    index: int
    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node | None
    side_inputs: list[fx.Node] = field(default_factory=list)
    epilogue: bool = False
    layer: int | None = None

    def linears(self) -> list[fx.Node]:
        """The ``aten.linear`` nodes of the block, in graph order."""
        return [n for n in self.nodes if ir.is_op(n, ir.LINEAR)]

    def name(self) -> str:
        """``block 3`` or ``epilogue`` (for messages)."""
        return "epilogue" if self.epilogue else f"block {self.index}"


UNITS = ("block", "segment")


@dataclass
class BlockPartition:
    """The graph split into side values, prologue, blocks and epilogue.

    Attributes:
        side: side nodes (independent of the stream), graph order.
        prologue: stream nodes before the first block (embeddings), graph order.
        blocks: decoder blocks then the epilogue (``blocks[-1].epilogue``).
        output_arg: the graph output's argument (a node or a pytree of nodes).
    """

    side: list[fx.Node]
    prologue: list[fx.Node]
    blocks: list[Block]
    output_arg: Any

    @property
    def decoder_blocks(self) -> list[Block]:
        return [b for b in self.blocks if not b.epilogue]


def _residual_sources(gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """(names of the embedding nodes writing the residual stream, names of residual ops)."""
    groups = build_channel_groups(gm)
    if "residual" not in groups:
        raise PreconditionError("blockwise: no residual stream found (no embedding table writes a "
                                "channel dim); is this a decoder-only LM graph?")
    g = groups["residual"]
    sources = {m.op for m in g.members if m.role == "table"}
    on_stream = {o.node for o in g.ops} | sources | {m.op for m in g.members if m.role == "out"}
    return sources, on_stream


def _adds_two_streams(n: fx.Node, stream: set[fx.Node]) -> bool:
    """``n`` is a residual add: the sum of two stream values. After SliceGPT a block's residual
    reaches the next block through a shortcut linear (a change of basis), which splits the
    embedding's channel group; its adds still are the residual stream."""
    return (ir.is_op(n, torch.ops.aten.add.Tensor) and len(n.args) >= 2
            and all(isinstance(a, fx.Node) and a in stream for a in n.args[:2]))


def partition_blocks(gm: fx.GraphModule, unit: str = "block") -> BlockPartition:
    """Split ``gm`` at the residual stream between blocks (see the module docstring). Pure.

    Args:
        gm: a canonical GraphModule.
        unit: ``"block"`` (a decoder block per unit) or ``"segment"`` (every stretch between two
            residual cuts a unit: attention and MLP halves apart).

    Raises:
        ValueError: unknown ``unit``.
        PreconditionError: no residual stream, or no cut between the embedding and the output.
    """
    if unit not in UNITS:
        raise ValueError(f"blockwise: unit must be one of {UNITS}, got {unit!r}")
    sources, on_stream = _residual_sources(gm)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    stream: set[fx.Node] = set()
    for n in nodes:
        if n.name in sources or (n.op == "call_function" and any(a in stream for a in n.all_input_nodes)):
            stream.add(n)
    side = [n for n in nodes if n.op == "call_function" and n not in stream]
    # last position at which each stream value is read (the output node counts)
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in stream}
    # a norm's output (and views of it) is not the residual stream itself: never a cut
    normed: set[fx.Node] = set()
    cuts: list[fx.Node] = []
    live: set[fx.Node] = set()
    for n in nodes:
        if n not in stream:
            continue
        ins = [a for a in n.all_input_nodes if a in stream]
        if ir.is_op(n, ir.RMS_NORM, ir.LAYER_NORM) or (
                ins and all(a in normed for a in ins) and not ir.is_op(n, ir.LINEAR)):
            normed.add(n)
        live.add(n)
        live = {v for v in live if last_use[v] > pos[n]}
        if len(live) == 1 and n in live and n not in normed and (
                n.name in on_stream or _adds_two_streams(n, stream)):
            cuts.append(n)
    if not cuts:
        raise PreconditionError("blockwise: the residual stream has no point where it is the only "
                                "live value; cannot split the graph into blocks")
    # segments: stream nodes after cut k up to and including cut k+1; the last one to the output
    segs: list[tuple[fx.Node, list[fx.Node], fx.Node | None]] = []
    bounds = [pos[c] for c in cuts]
    prologue = [n for n in nodes if n in stream and pos[n] <= bounds[0]]
    for k, c in enumerate(cuts):
        hi = bounds[k + 1] if k + 1 < len(cuts) else len(nodes)
        body = [n for n in nodes if n in stream and bounds[k] < pos[n] <= hi]
        segs.append((c, body, cuts[k + 1] if k + 1 < len(cuts) else None))
    *middle, last = segs
    has_attn = any(ir.is_op(n, ir.SDPA) for _, body, _ in middle for n in body)
    blocks: list[Block] = []
    layer = -1
    for inp, body, out in middle:
        starts = any(ir.is_op(n, ir.SDPA) for n in body) if has_attn else True
        layer += starts
        if unit == "segment":
            blocks.append(Block(len(blocks), list(body), inp, out,
                                layer=layer if layer >= 0 else None))
        elif starts:
            blocks.append(Block(len(blocks), list(body), inp, out, layer=layer))
        elif blocks:
            blocks[-1].nodes += body
            blocks[-1].output = out
        else:
            prologue += body
    blocks.append(Block(len(blocks), list(last[1]), last[0], None, epilogue=True))
    side_set = set(side) | {n for n in nodes if n.op == "placeholder"}
    for b in blocks:
        inside = set(b.nodes)
        b.side_inputs = list(dict.fromkeys(
            a for n in b.nodes for a in n.all_input_nodes if a in side_set and a not in inside))
    out_node = next(n for n in reversed(nodes) if n.op == "output")
    log.debug("blockwise: %d blocks + epilogue, %d side nodes, %d prologue nodes",
              len(blocks) - 1, len(side), len(prologue))
    return BlockPartition(side, prologue, blocks, out_node.args[0])


# ----------------------------------------------------------------------------- evaluation


class BlockVisitor:
    """What a pass plugs into :func:`run_blockwise`. Every method has a no-op default.

    Subclasses override :meth:`observed` (nodes whose values they need), :meth:`observe`
    (called per batch per observed node) and :meth:`transform` (called once per block after
    every batch was observed).
    """

    def observed(self, block: Block) -> Sequence[fx.Node]:
        """Nodes of ``block`` (or its input) whose values :meth:`observe` should receive."""
        return ()

    def observe(self, block: Block, node: fx.Node, value: torch.Tensor, batch: int) -> None:
        """One batch's value of an observed node."""

    def transform(self, block: Block, runner: BlockRunner) -> None:
        """Decide how ``block`` changes (``runner.overrides`` or exact folds) after observation."""

    def propagated(self, block: Block) -> Sequence[fx.Node]:
        """Nodes of ``block`` whose values in the propagation run (the transformed block's run
        that makes the next block's inputs, ``propagate="transformed"``) go to
        :meth:`observe_propagated`."""
        return ()

    def observe_propagated(self, block: Block, node: fx.Node, value: torch.Tensor,
                           batch: int) -> None:
        """One batch's value of a node of :meth:`propagated`."""


def _as_computed(x: torch.Tensor) -> torch.Tensor:
    """A stored (possibly compact) activation back in float32, as the blocks compute."""
    return x.to(torch.float32) if x.dtype != torch.float32 and x.is_floating_point() else x


class BlockRunner:
    """Evaluates the partition's pieces on stored inputs; holds parameter overrides.

    Attributes:
        gm: the graph (read only).
        partition: its :class:`BlockPartition`.
        overrides: ``get_attr`` target -> tensor used instead of the graph's parameter.
        inputs: the current block's input per batch.
        sides: per batch, side node -> value.
    """

    def __init__(self, gm: fx.GraphModule, partition: BlockPartition,
                 store_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        self.gm = gm
        self.partition = partition
        self.overrides: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []
        self.sides: list[dict[fx.Node, Any]] = []
        self.store_dtype = store_dtype
        self.compute_dtype = compute_dtype
        self._casts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def param(self, target: str) -> torch.Tensor:
        """The tensor a ``get_attr`` of ``target`` reads (an override if one is set)."""
        if target in self.overrides:
            return self.overrides[target]
        return ir.get_param(self.gm, target)

    def _eval(self, nodes: Iterable[fx.Node], env: dict[fx.Node, Any],
              overrides: dict[str, torch.Tensor] | None = None,
              observe: dict[fx.Node, Any] | None = None,
              keep: Iterable[fx.Node] | None = None) -> None:
        """Evaluate ``nodes`` in order into ``env``. With ``keep``, a value computed here is
        dropped from ``env`` after its last reader in ``nodes`` (as an fx Interpreter does), so
        a block run holds its live values only, not every intermediate (attention weights, MLP
        activations) at once; ``keep`` names the values the caller reads afterwards."""
        nodes = list(nodes)
        last: dict[fx.Node, int] = {}
        if keep is not None:
            computed = set(nodes) - set(keep)
            for i, n in enumerate(nodes):
                last[n] = i  # a value nobody reads goes right away
                for a in n.all_input_nodes:
                    if a in computed:
                        last[a] = i
            dead: dict[int, list[fx.Node]] = {}
            for n, i in last.items():
                if n in computed:
                    dead.setdefault(i, []).append(n)

        def load(a):
            if isinstance(a, fx.Node):
                if a in env:
                    return env[a]
                if a.op == "get_attr":
                    t = str(a.target)
                    if overrides and t in overrides:
                        return overrides[t]
                    return self._cast(t) if a in cast else self.param(t)
                raise PassError(f"blockwise: value of {a.name} ({ir.site(a) or '<top>'}) is not "
                                "available to this block")
            return a

        # a linear's weight and bias: cast to the calibration dtype once, not once per run
        cast = set() if self.compute_dtype is None else {
            a for n in nodes if ir.is_op(n, ir.LINEAR)
            for a in n.args[1:3] if isinstance(a, fx.Node) and a.op == "get_attr"}

        for i, n in enumerate(nodes):
            args = fx.node.map_aggregate(n.args, load)
            kwargs = fx.node.map_aggregate(n.kwargs, load)
            # only the graph's own ops run in the calibration precision, not the observers
            with calibration_autocast(self.compute_dtype):
                env[n] = n.target(*args, **kwargs)
            if observe is not None and n in observe:  # observers see float32 either way
                observe[n](env[n] if self.compute_dtype is None else _as_computed(env[n]))
            if keep is not None:
                del args, kwargs
                for d in dead.get(i, ()):
                    del env[d]

    def _cast(self, target: str) -> torch.Tensor:
        """The parameter ``target`` in the calibration dtype (what autocast would make of it
        in every run), cached while the parameter is the same tensor object; the cache is
        emptied by :meth:`clear_casts`."""
        p = self.param(target)
        if not p.is_floating_point() or p.dtype == self.compute_dtype:
            return p
        hit = self._casts.get(target)
        if hit is None or hit[0] is not p:
            hit = self._casts[target] = (p, p.detach().to(self.compute_dtype))
        return hit[1]

    def clear_casts(self) -> None:
        """Forget the cast parameters (after a transform: a pass may change one in place)."""
        self._casts.clear()

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.store_dtype is None else x.to(self.store_dtype)

    def input_value(self, batch: int) -> torch.Tensor:
        """The current block's input for batch ``batch`` as a block run sees it (float32)."""
        return _as_computed(self.inputs[batch])

    def replace_inputs(self, values: Sequence[torch.Tensor]) -> None:
        """Replace the current block's stored inputs (one per batch), e.g. from ``transform``.

        Raises:
            PassError: not one value per calibration batch, or a value of another shape.
        """
        values = list(values)
        if len(values) != len(self.inputs) or any(
                v.shape != x.shape for v, x in zip(values, self.inputs)):
            raise PassError("blockwise: replace_inputs needs one value per batch with the shape "
                            "of the stored input")
        self.inputs = [self._store(v) for v in values]

    def start(self, batches: Sequence[torch.Tensor]) -> None:
        """Evaluate side values and the prologue; keep the block-0 input of every batch."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise PreconditionError(f"blockwise: the graph takes {len(placeholders)} inputs; "
                                    "expected one (input_ids)")
        first = self.partition.blocks[0].input
        needed = {a for b in self.partition.blocks for a in b.side_inputs}
        self.inputs, self.sides = [], []
        with torch.no_grad():
            for ids in batches:
                env: dict[fx.Node, Any] = {placeholders[0]: ids}
                self._eval(self.partition.side, env)
                self._eval(self.partition.prologue, env)
                self.inputs.append(self._store(env[first]))
                self.sides.append({n: env[n] for n in needed})

    def run(self, block: Block, batch: int, x: torch.Tensor | None = None, *,
            overrides: dict[str, torch.Tensor] | None = None,
            observe: dict[fx.Node, Any] | None = None,
            until: fx.Node | None = None) -> Any:
        """Run ``block`` on batch ``batch``'s stored input (or ``x``); return its output.

        Args:
            block: the block.
            batch: which calibration batch (selects the side values).
            x: input override (default: the stored input).
            overrides: extra parameter overrides for this run only (e.g. a candidate scale).
            observe: node -> callback of its value.
            until: stop after this node and return its value.
        """
        env: dict[fx.Node, Any] = dict(self.sides[batch])
        env[block.input] = self.input_value(batch) if x is None else _as_computed(x)
        if observe is not None and block.input in observe:
            observe[block.input](env[block.input])
        nodes = block.nodes
        if until is not None:
            nodes = nodes[: nodes.index(until) + 1] if until in nodes else []
            keep = [until]
        elif block.epilogue:
            keep = _output_nodes(self.partition.output_arg)
        else:
            keep = [block.output]
        with torch.no_grad():
            self._eval(nodes, env, overrides, observe, keep=keep)
        if until is not None:
            return env[until]
        if block.epilogue:  # what the GraphModule returns (its output pytree)
            out = fx.node.map_aggregate(self.partition.output_arg,
                                        lambda a: env[a] if isinstance(a, fx.Node) else a)
            return self.gm.graph._codegen.process_outputs(out)
        return env[block.output]

    def run_from(self, block: Block, batch: int, given: dict[fx.Node, torch.Tensor],
                 until: fx.Node, *, overrides: dict[str, torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """The value of ``until`` computed from known values of nodes inside ``block``.

        Only the nodes between ``given`` and ``until`` run (what a reference implementation
        gets by calling a sub-module on its cached input); anything else they read comes from
        the block's stored input and the side values, so the result equals :meth:`run`'s
        whenever ``given`` holds the values :meth:`run` would compute.

        Args:
            block: the block.
            batch: which calibration batch (selects the side values and the block input).
            given: node -> its value for this batch (e.g. a stored linear input).
            until: the node whose value is returned.
            overrides: parameter overrides for this run only.

        Raises:
            PassError: ``until`` is not a node of ``block``.
        """
        if until not in block.nodes:
            raise PassError(f"blockwise: {until.name} is not a node of {block.name()}")
        env: dict[fx.Node, Any] = dict(self.sides[batch])
        env[block.input] = self.input_value(batch)
        env.update(given)
        inside = set(block.nodes)
        needed: set[fx.Node] = set()
        stack = [until]
        while stack:  # the ancestors of ``until`` that are not known yet
            n = stack.pop()
            if n in needed or n in env or n not in inside:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        with torch.no_grad():
            self._eval([n for n in block.nodes if n in needed], env, overrides, keep=[until])
        return env[until]


def _output_nodes(arg: Any) -> list[fx.Node]:
    """The fx nodes in a graph output argument (a node or a pytree of nodes)."""
    out: list[fx.Node] = []
    fx.node.map_arg(arg, out.append)
    return out


def _last_observed(block: Block, want: Sequence[fx.Node]) -> fx.Node:
    """The last node of ``block`` in ``want`` (its input when none is inside)."""
    wanted = set(want)
    inside = [n for n in block.nodes if n in wanted]
    return inside[-1] if inside else block.input


def run_blockwise(
    gm: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    visitor: BlockVisitor,
    *,
    propagate: str = "transformed",
    progress: bool = False,
    store_dtype: torch.dtype | None = None,
    desc: str = "blocks",
    unit: str = "block",
    compute_dtype: torch.dtype | None = None,
) -> BlockRunner:
    """Calibrate ``gm`` block by block (see the module docstring).

    Args:
        gm: a canonical GraphModule (not modified by the engine).
        batches: calibration ``input_ids`` ``[batch, seq]`` tensors.
        visitor: the pass's :class:`BlockVisitor`.
        propagate: ``"transformed"`` (next inputs from the transformed block) or ``"original"``
            (from the observation run, before the transform).
        progress: tqdm bar over blocks.
        store_dtype: dtype of the stored block inputs (None: as computed, exact).
        desc: label of the progress bar.
        unit: ``"block"`` or ``"segment"`` (see :func:`partition_blocks`).
        compute_dtype: None (float32, as the graph computes) or ``torch.bfloat16``: every block
            run executes under autocast to it (:mod:`compiler.precision`); the visitor's own
            work (``observe``, ``transform``) does not.

    Returns:
        The :class:`BlockRunner` (its ``overrides`` hold the visitor's parameter changes).

    Raises:
        ValueError: unknown ``propagate`` or ``unit``. DataError: no batches.
        PreconditionError: the graph cannot be split (see :func:`partition_blocks`).
    """
    if propagate not in PROPAGATE:
        raise ValueError(f"blockwise: propagate must be one of {PROPAGATE}, got {propagate!r}")
    batches = list(batches) if batches is not None else []
    if not batches:
        raise DataError("blockwise calibration needs at least one calibration batch of input_ids")
    part = partition_blocks(gm, unit)
    SWEEPS["run_blockwise"] += 1  # one pass over the calibration set, block by block
    runner = BlockRunner(gm, part, store_dtype, compute_dtype)
    release_free_memory()
    runner.start(batches)
    blocks: Iterable[Block] = part.blocks
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(part.blocks, desc=desc, unit="block")
    for block in blocks:
        want = list(visitor.observed(block))
        outs: list[Any] = []
        if propagate == "transformed" and all(n is block.input for n in want):
            # nothing inside the block is observed: no observation run, the block runs once
            for i in range(len(batches) if want else 0):
                visitor.observe(block, block.input, runner.input_value(i), i)
        else:
            # the epilogue's output is never propagated: it runs up to its last observed node
            # (an LM head nobody observes is a fifth of a Llama's forward)
            until = _last_observed(block, want) if block.epilogue else None
            for i in range(len(batches)):
                cbs = {n: (lambda v, n=n, i=i: visitor.observe(block, n, v, i)) for n in want}
                out = runner.run(block, i, observe=cbs, until=until)
                if not block.epilogue and propagate == "original":
                    outs.append(runner._store(out))
        visitor.transform(block, runner)
        runner.clear_casts()  # the transform may have changed parameters in place
        if block.epilogue:
            break
        if propagate == "transformed":
            late = list(visitor.propagated(block))
            outs = []
            for i in range(len(batches)):
                cbs = {n: (lambda v, n=n, i=i: visitor.observe_propagated(block, n, v, i))
                       for n in late} or None
                outs.append(runner._store(runner.run(block, i, observe=cbs)))
        runner.inputs = outs
        runner.clear_casts()  # holds one block's weights at most
        if block.index % TRIM_EVERY == TRIM_EVERY - 1:
            release_free_memory()  # the blocks' freed intermediates go back to the OS
        log.debug("blockwise: %s done", block.name())
    return runner


__all__ = ["PROPAGATE", "UNITS", "Block", "BlockPartition", "BlockRunner", "BlockVisitor",
           "partition_blocks", "run_blockwise"]
