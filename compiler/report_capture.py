"""What the HTML compile report shows, captured while the passes run (two instruments).

:class:`ReportCapture` (on by default in :func:`compiler.compile`) fills ``PassRecord.details``
of every pass that ran, with JSON-friendly data small enough for ``report.json``:

- ``graph``: the change the pass made to the decoder blocks. Every block is snapshotted (its
  call_function nodes: op name as in the text dumps, tensor inputs, constant arguments, and a
  fingerprint of every parameter read: target, shape, dtype and the sum of a strided sample of
  64 values). Comparing the snapshots before and after the pass (fx node names are stable while
  a pass mutates the graph in place) marks each node *added*, *removed* or *rewritten* (same
  node, but its op, its constant arguments or a parameter it reads changed); edges that appear
  or disappear are marked too. Consecutive blocks with the same change are merged
  (``blocks 0-4 (each)``, as the text report merges them) and the first block of each run is
  kept as a drawable graph (up to :data:`MAX_DRAWN` runs per pass). ``getitem``/``alias`` are
  drawn through and ``sym_size`` is left out, as in the op counts of ``fxcompress inspect``.
- ``activations``: per-channel abs-max of the input of every linear (site ``<linear>:in``; the
  linears of one module path that read split inputs, as RPTQ's per-cluster linears do, are
  joined back into one row) on one small sample, before and after the pass, for passes that
  moved them (a channel's max changed by more than :data:`MOVED` of the tensor's max): a
  summary row per site (max and median over channels) and the full curves of the sites of one
  block (the block of the site with the largest max/median ratio before the pass).
  Sample: the first calibration batch cut to :data:`SAMPLE_TOKENS` tokens (else the probe
  batch). One forward per modified pass: the run after a pass is the run before the next.
- ``quant_error``: for passes that establish ``quantized``, per quantized layer (module path):
  the weight error ``||DQ(W_q) - W|| / ||W||`` and the output error ``||Y' - Y|| / ||Y||``,
  *local* (the layer's new computation fed the float input the layer had before the pass) and
  *end to end* (the layer's output in the whole quantized graph), on the same sample. Costs a
  forward before the pass (keeping linear inputs and outputs) and one evaluation per layer.
- ``variance``: for SliceGPT, the variance kept per PCA basis and the cumulative curve
  (``gm.meta["fxcompress_slicegpt_variance"]``, written by :mod:`passes.slicegpt`).
- ``sweeps``: calibration sweeps during the pass (activation-statistics runs and block-engine
  runs, :func:`compiler.pass_manager.calibration_sweeps`).

:class:`PassPerplexity` (opt-in: ``fxcompress compile --ppl tinystories:16``) sets
``PassRecord.perplexity`` to the perplexity before and after every pass that changed the graph.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from compiler import ir
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext
from compiler.pass_manager import Instrument, calibration_sweeps
from compiler.report import PassRecord

log = logging.getLogger(__name__)

#: version of the ``details`` layout (the HTML report refuses others)
DETAILS_VERSION = 1
#: tokens of the activation sample
SAMPLE_TOKENS = 256
#: a site "moved" when some channel's abs-max changed by more than this fraction of the max
MOVED = 1e-3
#: block graphs kept per pass (one per run of blocks with a different change)
MAX_DRAWN = 3
#: channels kept per activation curve (wider curves are max-pooled: outliers stay visible)
MAX_CHANNELS = 1024
#: values summed into a parameter's fingerprint
_FINGERPRINT = 64
#: ops drawn through (their input stands for them) and ops left out (shape bookkeeping)
_THROUGH = {"getitem", "alias"}
_DROPPED = {"sym_size", "sym_numel", "sym_stride"}
_VARIANCE_META = "fxcompress_slicegpt_variance"


# ----------------------------------------------------------------------------- block graphs


@dataclass(frozen=True)
class NodeSnap:
    """One call_function node as the report compares it."""

    label: str  # op name as in the text dumps
    module: str  # module path ('' at top level)
    block: int | None
    inputs: tuple[str, ...]  # tensor inputs (node names, through getitem/alias)
    consts: str  # the non-node arguments
    params: tuple  # fingerprint of every parameter read directly


def _fingerprint(gm: fx.GraphModule, target: str, cache: dict) -> tuple:
    if target not in cache:
        try:
            t = ir.get_param(gm, target)
        except PassError:  # a dangling get_attr: verification reports it
            cache[target] = (target, None)
            return cache[target]
        if not isinstance(t, torch.Tensor):
            cache[target] = (target, repr(t)[:40])
            return cache[target]
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT)
        total = float(flat[::step][:_FINGERPRINT].double().sum()) if flat.numel() else 0.0
        cache[target] = (target, tuple(t.shape), str(t.dtype).replace("torch.", ""), total)
    return cache[target]


def _source(n: fx.Node) -> fx.Node:
    """The node a drawn edge starts from: through getitem/alias to what they read."""
    while n.op == "call_function" and ir.op_name(n) in _THROUGH and n.args \
            and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def snapshot(gm: fx.GraphModule) -> dict[str, NodeSnap]:
    """Every call_function node of ``gm`` (but getitem/alias/sym_size), by fx name."""
    cache: dict[str, tuple] = {}
    out: dict[str, NodeSnap] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        label = ir.op_name(n)
        if label in _THROUGH or label in _DROPPED:
            continue
        inputs: list[str] = []
        params: list[tuple] = []

        def const(a, inputs=inputs, params=params):
            if not isinstance(a, fx.Node):
                return a
            if a.op == "get_attr":
                params.append(_fingerprint(gm, str(a.target), cache))
                return "<param>"
            src = _source(a)
            if src.op == "call_function" and ir.op_name(src) in _DROPPED:
                return "<sym>"
            if src.name not in inputs:
                inputs.append(src.name)
            return "<in>"

        consts = fx.node.map_aggregate((n.args, n.kwargs), const)
        out[n.name] = NodeSnap(label, ir.module_path(n), ir.block_index(n), tuple(inputs),
                               _short_repr(consts), tuple(params))
    return out


def _short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 400 else text[:400] + "..."


def _relative_module(module: str, block: int | None) -> str:
    if block is None:
        return module
    for sep in (".layers.", ".h.", ".layer.", ".blocks.", ".block."):
        key = f"{sep}{block}"
        if key in f".{module}":
            rest = f".{module}".split(key, 1)[1]
            return rest.lstrip(".")
    return module


def _change(b: NodeSnap | None, a: NodeSnap | None) -> tuple[str, str]:
    """(mark, why) of one node between two snapshots."""
    if b is None:
        return "added", "added by the pass"
    if a is None:
        return "removed", "removed by the pass"
    why = []
    if b.label != a.label:
        why.append(f"op {b.label} -> {a.label}")
    if b.params != a.params:
        shapes_b = [p[1] for p in b.params if len(p) > 2]
        shapes_a = [p[1] for p in a.params if len(p) > 2]
        if len(b.params) != len(a.params) or [p[0] for p in b.params] != [p[0] for p in a.params]:
            why.append("reads other parameters")
        elif shapes_b != shapes_a:
            why.append("parameter shape " + ", ".join(
                f"{'x'.join(map(str, s0))}->{'x'.join(map(str, s1))}"
                for s0, s1 in zip(shapes_b, shapes_a) if s0 != s1))
        else:
            why.append("parameter values")
    if b.consts != a.consts:
        why.append("arguments")
    return ("rewritten", "rewritten: " + "; ".join(why)) if why else ("same", "")


def block_diff(before: dict[str, NodeSnap], after: dict[str, NodeSnap], block: int | None
               ) -> dict[str, Any]:
    """The drawable diff of one block: nodes (with marks) and edges (with marks)."""
    names = [k for k, v in before.items() if v.block == block]
    names += [k for k, v in after.items() if v.block == block and k not in before]
    # modules holding parameters (a linear's, a norm's): their nodes are labelled with them
    weighted = {s.module for snap in (before, after) for s in snap.values()
                if s.block == block and s.params}
    # order: the graph before the pass, then the nodes it added (the layout starts from it)
    nodes, inside = [], set(names)
    edges: dict[tuple[str, str], set[str]] = {}
    external: dict[str, NodeSnap] = {}
    for name in names:
        b, a = before.get(name), after.get(name)
        if b is not None and b.block != block:
            b = None
        if a is not None and a.block != block:
            a = None
        mark, why = _change(b, a)
        s = a or b
        shapes = ["x".join(map(str, p[1])) for p in s.params if len(p) > 2]
        sub = _relative_module(s.module, block).rsplit(".", 1)[-1] if s.module in weighted else ""
        nodes.append({"id": name, "label": s.label, "sub": sub, "mark": mark,
                      "why": why, "module": s.module, "params": shapes})
        for side, snap in (("b", b), ("a", a)):
            if snap is None:
                continue
            for src in snap.inputs:
                edges.setdefault((src, name), set()).add(side)
                if src not in inside:
                    external[src] = (after.get(src) or before.get(src)
                                     or NodeSnap("input", "", None, (), "", ()))
    ext_nodes = [{"id": src, "label": s.label, "sub": "from " + _short_module(s.module),
                  "mark": "external", "why": "outside the block", "module": s.module,
                  "params": []}
                 for src, s in external.items()]
    edge_list = [[s, d, "same" if sides == {"a", "b"} else ("added" if sides == {"a"}
                                                             else "removed")]
                 for (s, d), sides in edges.items()]
    return {"nodes": ext_nodes + nodes, "edges": edge_list}


def _short_module(module: str) -> str:
    parts = [p for p in module.split(".") if p != "model"]
    return ".".join(parts[-2:]) if parts else "top level"


def _signature(diff: dict[str, Any]) -> tuple:
    """What a block's change looks like regardless of fx names (to merge equal blocks)."""
    # a block's inputs differ by where they come from (embedding, previous block): not a change
    label = {n["id"]: ("external", "") if n["mark"] == "external" else (n["label"], n["sub"])
             for n in diff["nodes"]}
    changed = sorted((n["mark"], n["label"], n["sub"], n["why"], tuple(n["params"]))
                     for n in diff["nodes"] if n["mark"] in ("added", "removed", "rewritten"))
    moved = sorted((m, label[s], label[d]) for s, d, m in diff["edges"] if m != "same")
    return tuple(changed), tuple(moved)


def _summary(diff: dict[str, Any]) -> str:
    count = Counter((n["mark"], n["label"]) for n in diff["nodes"]
                    if n["mark"] in ("added", "removed", "rewritten"))
    parts = []
    for mark, sign in (("added", "+"), ("removed", "-"), ("rewritten", "~")):
        items = [f"{sign}{k} {lab}" if k > 1 else f"{sign}{lab}"
                 for (m, lab), k in sorted(count.items()) if m == mark]
        parts += items
    rewired = sum(1 for e in diff["edges"] if e[2] != "same")
    if rewired and not parts:
        parts.append(f"{rewired} edges rewired")
    return ", ".join(parts) if parts else "unchanged"


def graph_change(before: dict[str, NodeSnap], after: dict[str, NodeSnap]) -> dict[str, Any]:
    """Per pass: runs of blocks with their change, drawable diffs, and the change outside blocks."""
    blocks = sorted({s.block for s in [*before.values(), *after.values()] if s.block is not None})
    runs: list[dict[str, Any]] = []
    for b in blocks:
        diff = block_diff(before, after, b)
        sig = _signature(diff)
        if runs and runs[-1]["sig"] == sig and runs[-1]["last"] == b - 1:
            runs[-1]["last"] = b
        else:
            runs.append({"first": b, "last": b, "sig": sig, "diff": diff,
                         "summary": _summary(diff)})
    drawn = []
    for r in runs:
        if r["summary"] != "unchanged" and len(drawn) < MAX_DRAWN:
            drawn.append({"first": r["first"], "last": r["last"], **r["diff"]})
    outside = block_diff(before, after, None)
    if not blocks and _summary(outside) != "unchanged":  # no repeated blocks: draw the graph
        drawn.append({"first": None, "last": None, **outside})
    return {
        "blocks": len(blocks),
        "runs": [{"first": r["first"], "last": r["last"], "summary": r["summary"]} for r in runs],
        "drawn": drawn,
        "outside": _summary(outside),
        "changed": any(r["summary"] != "unchanged" for r in runs) or
        _summary(outside) != "unchanged",
    }


# ----------------------------------------------------------------------------- activations


class _Recorder(fx.Interpreter):
    """Runs a graph node by node, keeping per-channel abs-max of some nodes and values of others."""

    def __init__(self, gm: fx.GraphModule, absmax: Iterable[str], keep: Iterable[str] = ()):
        super().__init__(gm)
        self.want_absmax, self.want_keep = set(absmax), set(keep)
        self.absmax: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        # only what the wanted nodes read is run (not an LM head whose logits nobody reads)
        wanted = self.want_absmax | self.want_keep
        todo = [n for n in gm.graph.nodes if n.name in wanted]
        self.needed: set[fx.Node] = set()
        while todo:
            n = todo.pop()
            if n not in self.needed:
                self.needed.add(n)
                todo.extend(n.all_input_nodes)

    def run_node(self, n: fx.Node) -> Any:
        if n not in self.needed and n.op not in ("placeholder", "output"):
            return None
        out = super().run_node(n)
        if not isinstance(out, torch.Tensor):
            return out
        if n.name in self.want_absmax and out.is_floating_point() and out.dim() >= 1:
            x = out.detach().reshape(-1, out.shape[-1])
            self.absmax[n.name] = x.abs().amax(0).float() if x.shape[0] else x.new_zeros(0)
        if n.name in self.want_keep:
            self.values[n.name] = out.detach()
        return out


def linear_input_sites(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Site -> {"label", "block", "nodes"}: the input tensors of the linears of each module path
    (several when a pass split the linear by input channels), linears reading the same tensors
    merged into one site named after the first."""
    per_module: dict[str, list[fx.Node]] = {}
    first: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if ir.is_op(n, ir.LINEAR) and isinstance(n.args[0], fx.Node):
            m = ir.module_path(n)
            xs = per_module.setdefault(m, [])
            if n.args[0] not in xs:
                xs.append(n.args[0])
            first.setdefault(m, n)
    out: dict[str, dict[str, Any]] = {}
    by_inputs: dict[tuple, str] = {}
    for m, xs in per_module.items():
        key = tuple(x.name for x in xs)
        if key in by_inputs:
            out[by_inputs[key]]["readers"].append(m.rsplit(".", 1)[-1])
            continue
        site = f"{m or '<top>'}:in"
        by_inputs[key] = site
        out[site] = {"readers": [m.rsplit(".", 1)[-1]], "block": ir.block_index(first[m]),
                     "nodes": list(key)}
    for v in out.values():
        v["label"] = (f"block {v['block']}: " if v["block"] is not None else "") + \
            "/".join(v["readers"]) + " input"
    return out


def _site_maxima(sites: dict[str, dict], absmax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for s, v in sites.items():
        parts = [absmax[n] for n in v["nodes"] if n in absmax]
        if len(parts) == len(v["nodes"]) and parts:
            out[s] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


def _pool(x: torch.Tensor, n: int = MAX_CHANNELS) -> list[float]:
    """At most ``n`` values: max over equal bins of channels (an outlier stays visible)."""
    if x.numel() > n:
        k = math.ceil(x.numel() / n)
        pad = k * math.ceil(x.numel() / k) - x.numel()
        x = torch.cat([x, x.new_zeros(pad)]).view(-1, k).amax(1)
    return [_round(v) for v in x.tolist()]


def _round(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}") if math.isfinite(v) else 0.0


def _stat(x: torch.Tensor) -> dict[str, float]:
    return {"max": _round(float(x.max())) if x.numel() else 0.0,
            "median": _round(float(x.median())) if x.numel() else 0.0, "channels": x.numel()}


def activation_change(sites_b: dict[str, dict], before: dict[str, torch.Tensor],
                      sites_a: dict[str, dict], after: dict[str, torch.Tensor]
                      ) -> dict[str, Any] | None:
    """Summary of every site and curves of one block's sites, or None if nothing moved."""
    rows, moved = [], []
    for s in dict.fromkeys([*before, *after]):
        b, a = before.get(s), after.get(s)
        meta = sites_a.get(s) or sites_b.get(s)
        changed = (b is None or a is None or b.numel() != a.numel()
                   or float((a - b).abs().max()) > MOVED * max(float(b.max()), 1e-30))
        ratio = float(b.max() / b.median().clamp(min=1e-30)) if b is not None and b.numel() else 0
        rows.append({"site": s, "label": meta["label"], "block": meta["block"],
                     "moved": changed, "before": _stat(b) if b is not None else None,
                     "after": _stat(a) if a is not None else None})
        if changed:
            moved.append((ratio, s, meta["block"]))
    if not moved:
        return None
    # the sites of one block (the one holding the largest outlier ratio among block sites),
    # and the site with the largest ratio overall if it lies outside the blocks (LM head input)
    _, worst, _ = max(moved)
    in_blocks = [m for m in moved if m[2] is not None]
    block = max(in_blocks)[2] if in_blocks else None
    plotted = [r["site"] for r in rows if r["moved"] and
               (r["site"] == worst or (block is not None and r["block"] == block))]
    curves = [{"site": s, "label": next(r["label"] for r in rows if r["site"] == s),
               "before": _pool(before[s]) if s in before else None,
               "after": _pool(after[s]) if s in after else None,
               "channels": [int(before[s].numel()) if s in before else 0,
                            int(after[s].numel()) if s in after else 0]}
              for s in plotted]
    return {"sites": rows, "moved": len(moved), "curves": curves}


# ----------------------------------------------------------------------------- quantization


def _is_weight_dq(n: Any) -> bool:
    """A dequantize op of constants only (a quantized weight)."""
    if not (isinstance(n, fx.Node) and n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "quantized_decomposed"
            and ir.op_name(n).split(".")[-1].startswith("dequantize")):
        return False
    return all(a.op == "get_attr" for a in n.all_input_nodes)


class _Missing(Exception):
    """A value the local evaluation needs was not kept from the run before the pass."""


def _evaluate(gm: fx.GraphModule, root: fx.Node, known: dict[str, torch.Tensor],
              old: set[str], memo: dict[fx.Node, Any] | None = None) -> Any:
    """Evaluate ``root`` from parameters and the values ``known`` of nodes that existed before
    the pass (``old``): the nodes the pass added, and ``root`` itself, are computed.

    ``memo`` (values of added nodes) may be shared between roots of one graph.
    """
    memo = {} if memo is None else memo

    def value(n: fx.Node) -> Any:
        if n in memo:
            return memo[n]
        if n.op == "get_attr":
            return ir.get_param(gm, str(n.target))
        if n is not root and n.name in old:
            if n.name not in known:
                raise _Missing(n.name)
            return known[n.name]
        if n.op != "call_function":
            raise _Missing(n.name)
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), value)
        v = n.target(*args, **kwargs)
        if n.name not in old:  # an old root's value here is not its value before the pass
            memo[n] = v
        return v

    with torch.no_grad():
        return value(root)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape != b.shape:
        return None
    a, b = a.detach().float(), b.detach().float()
    den = float(torch.linalg.vector_norm(b))
    return _round(float(torch.linalg.vector_norm(a - b)) / den, 3) if den > 0 else None


@dataclass
class _QuantBefore:
    """What the pass's quantization error is measured against (kept during the pass only)."""

    values: dict[str, torch.Tensor]  # linear inputs and outputs, embedding outputs, inputs
    weights: dict[str, torch.Tensor]  # node name -> the weight tensor it read
    snap: dict[str, NodeSnap]
    names: set[str]  # every node of the graph before the pass


_WEIGHTED = {"linear": 1, "embedding": 0}  # op -> position of its weight


def _weighted_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and ir.op_name(n) in _WEIGHTED]


def quant_plan(gm: fx.GraphModule, q: _QuantBefore) -> list[dict[str, Any]]:
    """Per quantized layer: the node before, the nodes reading dequantized weights after, and
    the node now standing for its output."""
    by_module: dict[tuple[str, str], list[fx.Node]] = {}
    for n in _weighted_nodes(gm):
        pos = _WEIGHTED[ir.op_name(n)]
        if len(n.args) > pos and _is_weight_dq(n.args[pos]):
            by_module.setdefault((ir.module_path(n), ir.op_name(n)), []).append(n)
    names = {n.name: n for n in gm.graph.nodes}
    plan = []
    for (module, op), nodes in by_module.items():
        olds = [k for k, s in q.snap.items() if s.module == module and s.label == op]
        if len(olds) != 1 or olds[0] not in q.weights:
            continue
        old = olds[0]
        out = names.get(old)
        if out is None or ir.op_name(out) != op:
            out = _replacement(old, q.snap, names)
        plan.append({"module": module, "op": op, "old": old, "nodes": nodes, "out": out})
    return plan


def _replacement(old: str, snap: dict[str, NodeSnap], names: dict[str, fx.Node]) -> fx.Node | None:
    """The node that took over the readers of the removed node ``old``."""
    for user, s in snap.items():
        if old not in s.inputs or user not in names:
            continue
        i = s.inputs.index(old)
        now = [_source(a).name for a in names[user].all_input_nodes
               if not (a.op == "call_function" and ir.op_name(_source(a)) in _DROPPED)
               and a.op != "get_attr"]
        now = list(dict.fromkeys(now))
        if len(now) == len(s.inputs) and now[i] not in snap:
            return names[now[i]]
    return None


def quant_error(gm: fx.GraphModule, q: _QuantBefore, plan: list[dict[str, Any]],
                after_values: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Weight, local and end-to-end output error per quantized layer."""
    old = q.names
    memo: dict[fx.Node, Any] = {}
    rows = []
    for p in plan:
        w = q.weights[p["old"]]
        pos = _WEIGHTED[p["op"]]
        row: dict[str, Any] = {"layer": p["module"], "op": p["op"], "weight": None,
                               "output": None, "end_to_end": None,
                               "block": ir.block_index(p["nodes"][0]) if p["nodes"] else None}
        try:
            parts = [_evaluate(gm, n.args[pos], {}, old, memo) for n in p["nodes"]]
            wq = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
            row["weight"] = _rel(wq.to(w.dtype), w)
        except _Missing:
            pass
        ref = q.values.get(p["old"])
        out = p["out"]
        if ref is not None and out is not None:
            try:
                row["output"] = _rel(_evaluate(gm, out, q.values, old, memo), ref)
            except _Missing as e:
                log.debug("report: no local error for %s (%s not kept)", p["module"], e)
            if out.name in after_values:
                row["end_to_end"] = _rel(after_values[out.name], ref)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the instrument


class ReportCapture(Instrument):
    """Fills ``PassRecord.details`` for the HTML report (module docstring).

    Args:
        sample: ``input_ids`` for the activation and error measurements (default: the first
            calibration batch cut to :data:`SAMPLE_TOKENS` tokens, else the probe batch).
    """

    def __init__(self, sample: torch.Tensor | None = None):
        self.sample = sample
        self._snap: dict[str, NodeSnap] | None = None
        self._acts: tuple[dict, dict] | None = None  # (sites, per-site maxima) of the graph now
        self._quant: _QuantBefore | None = None
        self._sweeps = 0
        self._variance: Any = None
        self._t = 0.0
        self.seconds = 0.0  # total time spent capturing (measured overhead)

    def _sample(self, ctx: PassContext) -> tuple[torch.Tensor | None, str]:
        if self.sample is not None:
            return self.sample, f"{self.sample.numel()} given tokens"
        if ctx.calibration:
            b = ctx.calibration[0]
            rows = max(1, min(b.shape[0], SAMPLE_TOKENS // max(1, b.shape[1])))
            s = b[:rows, :SAMPLE_TOKENS]
            return s, f"{s.numel()} tokens of the first calibration batch"
        if ctx.probe_inputs is not None:
            return ctx.probe_inputs, f"{ctx.probe_inputs.numel()} tokens of the probe batch"
        return None, "no input"

    def _run(self, gm: fx.GraphModule, ctx: PassContext, keep: Iterable[str] = ()
             ) -> tuple[dict, dict, _Recorder | None]:
        sample, _ = self._sample(ctx)
        sites = linear_input_sites(gm)
        if sample is None:
            return sites, {}, None
        rec = _Recorder(gm, {n for v in sites.values() for n in v["nodes"]}, keep)
        with torch.no_grad():
            rec.run(sample)
        return sites, _site_maxima(sites, rec.absmax), rec

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord):
        t0 = time.perf_counter()
        if self._snap is None:
            self._snap = snapshot(gm)
        self._sweeps = calibration_sweeps(ctx)
        self._variance = gm.meta.get(_VARIANCE_META)
        self._quant = None
        if "quantized" in p.establishes:
            weighted = _weighted_nodes(gm)
            keep = {n.name for n in weighted} | {
                n.name for n in gm.graph.nodes if n.op == "placeholder"}
            keep |= {n.args[0].name for n in weighted
                     if ir.op_name(n) == "linear" and isinstance(n.args[0], fx.Node)}
            sites, maxima, rec = self._run(gm, ctx, keep)
            self._acts = (sites, maxima)
            weights = {}
            for n in weighted:
                pos = _WEIGHTED[ir.op_name(n)]
                w = n.args[pos] if len(n.args) > pos else None
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    weights[n.name] = ir.get_param(gm, str(w.target))
            self._quant = _QuantBefore(rec.values if rec else {}, weights, self._snap,
                                       {n.name for n in gm.graph.nodes})
        elif self._acts is None:
            sites, maxima, _ = self._run(gm, ctx)
            self._acts = (sites, maxima)
        self.seconds += time.perf_counter() - t0

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord):
        if record.skipped:
            return
        t0 = time.perf_counter()
        _, how = self._sample(ctx)
        details: dict[str, Any] = {"version": DETAILS_VERSION,
                                   "sweeps": calibration_sweeps(ctx) - self._sweeps}
        if record.modified:
            after = snapshot(gm)
            details["graph"] = graph_change(self._snap, after)
            plan = quant_plan(gm, self._quant) if self._quant is not None else []
            keep = {n.name for pl in plan if pl["out"] is not None for n in [pl["out"]]}
            sites, maxima, _rec = self._run(gm, ctx, keep)
            change = activation_change(*self._acts, sites, maxima) if self._acts else None
            if change is not None:
                details["activations"] = {"sample": how, **change}
            if plan:
                details["quant_error"] = {
                    "sample": how,
                    "layers": quant_error(gm, self._quant, plan, _rec.values if _rec else {})}
            self._snap, self._acts = after, (sites, maxima)
            variance = gm.meta.get(_VARIANCE_META)
            if variance is not None and variance is not self._variance:
                details["variance"] = variance
        else:
            details["graph"] = {"changed": False}
        self._quant = None
        record.details = details
        self.seconds += time.perf_counter() - t0


# ----------------------------------------------------------------------------- perplexity


class PassPerplexity(Instrument):
    """Perplexity before and after every pass that changed the graph (``record.perplexity``).

    Args:
        windows: ``[n, L]`` evaluation windows (:func:`compiler.data.evaluation_windows`).
        data: what the windows are, for the report (``"tinystories, 16 x 256"``).
        batch_size: windows per forward.
    """

    def __init__(self, windows: torch.Tensor, data: str = "", batch_size: int = 8):
        self.windows = windows
        self.data = data or f"{windows.shape[0]} x {windows.shape[1]} tokens"
        self.batch_size = batch_size
        self._now: float | None = None

    def _ppl(self, gm: fx.GraphModule) -> float:
        from compiler.evaluate import perplexity

        return perplexity(gm, self.windows, batch_size=self.batch_size).ppl

    def before_pass(self, p, gm, ctx, record):
        if self._now is None:
            self._now = self._ppl(gm)

    def after_pass(self, p, gm, ctx, record):
        if record.skipped or self._now is None:
            return
        before = self._now
        if record.modified:
            self._now = self._ppl(gm)
        record.perplexity = {"before": before, "after": self._now, "data": self.data}


__all__ = [
    "DETAILS_VERSION",
    "PassPerplexity",
    "ReportCapture",
    "activation_change",
    "block_diff",
    "graph_change",
    "linear_input_sites",
    "quant_error",
    "snapshot",
]
