"""The Pass contract, pass results, the pass context and the analysis cache.

A pass is a class with keyword-only, validated hyper-parameters and no graph state.
``run(gm, ctx)`` mutates ``gm`` in place and returns a :class:`PassResult`. Each pass declares
whether it preserves the function (``exact``), which graph *properties* it requires, which it
establishes and which it destroys; the pass manager checks the order against those declarations
before anything runs.

Properties are plain strings. The ones in use:

- ``canonical``: one vocabulary (norm ops raised, Conv1D as linear, asserts removed).
- ``calibrated``: calibration batches are available (satisfied by ``ctx.calibration``).
- ``quantized``: Q/DQ nodes are in the graph (exact channel transforms must run before).
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

log = logging.getLogger(__name__)

#: A PassResult with ``preserved=ALL`` keeps every cached analysis.
ALL = frozenset({"*"})


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        gm: the (same, mutated) GraphModule.
        modified: False only if graph and weights are bitwise unchanged.
        preserved: names of analyses still valid (``ALL`` when nothing changed).
        stats: counters (sites rewritten, params before/after, ...).
        notes: one line per skipped site, with the reason.
        tables: per-site rankings too long for notes (``name -> rows``, each row a dict of
            plain values, e.g. insert_qdq's ``sensitivity``); kept whole in ``report.json``
            while the notes name the first few.
    """

    gm: fx.GraphModule
    modified: bool
    preserved: frozenset[str] = frozenset()
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: analyses the pass re-established for the graph it leaves (``(analysis, key, value)``,
    #: e.g. activation statistics transformed by an exact rescale): cached after invalidation,
    #: so the next pass does not compute them again
    analyses: list[tuple[type, dict[str, Any], Any]] = field(default_factory=list)

    @classmethod
    def unchanged(cls, gm: fx.GraphModule, notes: Iterable[str] = (), **stats) -> PassResult:
        return cls(gm, False, ALL, dict(stats), list(notes))


class Pass:
    """Base class of every pass.

    Subclasses set the class attributes below and implement :meth:`run`. Hyper-parameters are
    keyword-only ``__init__`` arguments, validated there (raise ``ValueError`` naming the option).
    """

    #: registry name (``"smoothquant"``)
    name: ClassVar[str] = ""
    #: True if the pass preserves the model function (checked numerically after it runs)
    exact: ClassVar[bool] = True
    #: properties the graph must have before this pass
    requires: ClassVar[frozenset[str]] = frozenset()
    #: properties the pass establishes
    establishes: ClassVar[frozenset[str]] = frozenset()
    #: properties the pass destroys
    destroys: ClassVar[frozenset[str]] = frozenset()
    #: properties that must NOT hold before this pass (e.g. exact channel transforms forbid
    #: ``quantized``: they must run before Q/DQ insertion)
    forbids: ClassVar[frozenset[str]] = frozenset()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def wants_histograms(self) -> bool:
        """True if the pass will ask for activation histograms (``ActivationStats`` with
        ``histogram=``). A pass before it that measures on the way (SmoothQuant's block sweep)
        then takes them for it; see :attr:`PassContext.upcoming`."""
        return False

    def weight_group_size(self) -> int | None:
        """The input-channel group length this pass quantizes weights with (None: no weights
        group-wise). A pass before it that sets widths (SliceGPT) warns, before its own work,
        when that group length will not divide them; see :attr:`PassContext.upcoming`."""
        return None

    def stats_request(self, gm: fx.GraphModule, ctx: PassContext) -> Any:
        """What this pass would measure on its input graph, as a
        :class:`compiler.stats.StatsRequest` the pass right before it may fill from its own
        final block runs (none: this pass measures for itself). ``gm`` is that earlier pass's
        working graph, whose nodes its output graph keeps. See :func:`request_of_next`."""
        return None

    def check_not_quantized(self, gm: fx.GraphModule, ctx: PassContext | None, advice: str) -> None:
        """Raise PreconditionError if a pass that forbids ``quantized`` meets Q/DQ nodes.

        The pass manager rejects such an order before anything runs; this guards direct
        ``run()`` calls on a graph quantized elsewhere.
        """
        from compiler import ir
        from compiler.errors import PreconditionError

        if "quantized" in self.forbids and ir.is_quantized(gm):
            history = ", ".join(ctx.history) if ctx is not None and ctx.history else "none"
            raise PreconditionError(
                f"{self.name}: the graph already holds Q/DQ nodes; {advice} (passes so far: {history})"
            )

    def options(self) -> dict[str, Any]:
        """The hyper-parameters, for reports and recipes (public attributes set in ``__init__``)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        """``name(opt=value, ...)`` listing only options that differ from their defaults."""
        import inspect

        params = inspect.signature(type(self).__init__).parameters
        shown = {
            k: v for k, v in self.options().items()
            if k not in params or params[k].default is inspect.Parameter.empty or params[k].default != v
        }
        opts = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.name or type(self).__name__}({opts})"


class Analysis:
    """An analysis computed on demand and cached by the :class:`AnalysisManager`.

    Subclasses set ``name`` and implement ``compute(gm, ctx, **key)``; ``key`` values must be
    hashable (use tuples/frozensets).
    """

    name: ClassVar[str] = ""

    @classmethod
    def compute(cls, gm: fx.GraphModule, ctx: PassContext, **key) -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results per graph and (analysis, key); invalidated by what a pass did not
    preserve.

    A result is kept under the ``fx.Graph`` it was computed on, held weakly (a graph that is
    gone takes its results with it), so the analysis of one graph is never returned for another:
    a block's subgraph, a copy of the model, or a GraphModule whose graph was replaced
    (``gm.graph = ...``) each get their own. With each result the graph's node count is
    recorded, and a result whose graph has since gained or lost nodes is dropped instead of
    returned: a guard under a structural rewrite that was not followed by
    :meth:`invalidate` (a pass asking again in the middle of its own rewrite). A rewrite that
    keeps the node count (new weights) is covered by invalidation alone: the pass manager calls
    :meth:`invalidate` with what every pass says it preserved; a pass that changes the graph and
    asks again within its own run invalidates first.
    """

    def __init__(self) -> None:
        # graph -> {(analysis name, key items): (node count when computed, value)}
        self._cache: weakref.WeakKeyDictionary[fx.Graph, dict[tuple, tuple[int, Any]]] = (
            weakref.WeakKeyDictionary())
        self.hits = 0
        self.misses = 0
        #: computations per analysis name (e.g. calibration runs of ``activation_stats``)
        self.computed: Counter[str] = Counter()

    def peek(self, analysis: type[Analysis], gm: fx.GraphModule, **key) -> Any:
        """The cached result :meth:`get` would return for this request, or None (never
        computes; lets a pass choose how to compute what is not at hand)."""
        found, value = self._lookup(analysis, gm, key)
        return value if found else None

    def _lookup(self, analysis: type[Analysis], gm: fx.GraphModule, key: dict) -> tuple[bool, Any]:
        graph = gm.graph
        entries = self._cache.get(graph, {})
        hit = entries.get((analysis.name, tuple(sorted(key.items()))))
        if hit is not None and hit[0] == len(graph.nodes):
            return True, hit[1]
        reuse = getattr(analysis, "reuse", None)
        if reuse is not None:  # a wider cached result answers a narrower request
            for (name, _), (count, value) in list(entries.items()):
                if name == analysis.name and count == len(graph.nodes):
                    answer = reuse(value, gm, **key)
                    if answer is not None:
                        return True, answer
        return False, None

    def get(self, analysis: type[Analysis], gm: fx.GraphModule, ctx: PassContext, **key) -> Any:
        """The cached result of ``analysis`` on ``gm``'s graph with ``key``, computed if absent."""
        graph = gm.graph
        found, value = self._lookup(analysis, gm, key)
        if found:
            self.hits += 1
            return value
        entries = self._cache.setdefault(graph, {})
        k = (analysis.name, tuple(sorted(key.items())))
        hit = entries.get(k)
        if hit is not None:
            log.debug("analysis %s: graph changed from %d to %d nodes since it was computed; "
                      "recomputing", analysis.name, hit[0], len(graph.nodes))
        self.misses += 1
        self.computed[analysis.name] += 1
        value = analysis.compute(gm, ctx, **key)
        entries[k] = (len(graph.nodes), value)
        return value

    def put(self, analysis: type[Analysis], gm: fx.GraphModule, value: Any, **key) -> None:
        """Cache ``value`` as ``analysis`` of ``gm``'s graph with ``key`` (a result a pass
        derived exactly, e.g. statistics it transformed, instead of computing it again)."""
        entries = self._cache.setdefault(gm.graph, {})
        entries[(analysis.name, tuple(sorted(key.items())))] = (len(gm.graph.nodes), value)

    def cached(self, gm: fx.GraphModule) -> list[str]:
        """Names of the analyses cached for ``gm``'s graph (one per key), sorted."""
        return sorted(k[0] for k in self._cache.get(gm.graph, {}))

    def invalidate(self, preserved: frozenset[str], gm: fx.GraphModule | None = None) -> None:
        """Drop every cached result not named in ``preserved`` (``ALL`` keeps everything), of
        ``gm``'s graph only when ``gm`` is given, else of every graph."""
        if "*" in preserved:
            return
        graphs = [gm.graph] if gm is not None else list(self._cache.keys())
        for graph in graphs:
            entries = self._cache.get(graph, {})
            for k in list(entries):
                if k[0] not in preserved:
                    del entries[k]

    def clear(self) -> None:
        self._cache.clear()


@dataclass
class PassContext:
    """Everything a pass may read besides the graph.

    Attributes:
        calibration: list of ``input_ids`` tensors ``[batch, seq]``, or None.
        probe_inputs: ``input_ids`` used for numerical checks.
        analyses: the analysis cache.
        properties: graph properties established so far.
        seed: seed for any randomness a pass needs.
        progress: whether long work shows progress bars.
        history: names of the passes run so far (for error messages).
        upcoming: the passes after the one running, set by the pass manager (None when a pass
            runs on its own), so a pass can measure what they will ask for in its own sweep.
        calibration_dtype: None (float32) or ``torch.bfloat16``: the precision calibration
            runs compute their matrix products in (:mod:`compiler.precision`); the block
            engine and the statistics analysis read it.
    """

    calibration: list[torch.Tensor] | None = None
    probe_inputs: torch.Tensor | None = None
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    properties: set[str] = field(default_factory=set)
    seed: int = 0
    progress: bool = False
    history: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    upcoming: tuple[Pass, ...] | None = None
    calibration_dtype: torch.dtype | None = None

    def analysis(self, analysis: type[Analysis], gm: fx.GraphModule, **key) -> Any:
        return self.analyses.get(analysis, gm, self, **key)

    def require_calibration(self, who: str) -> list[torch.Tensor]:
        from compiler.errors import PreconditionError

        if not self.calibration:
            raise PreconditionError(
                f"{who} needs calibration data; pass calibration=[input_ids, ...] to compile() "
                "(or --calib on the command line)"
            )
        return self.calibration


#: ``PassContext.extra`` key of a filled :class:`compiler.stats.StatsRequest`
HANDED_STATS = "handed_stats"


def request_of_next(gm: fx.GraphModule, ctx: PassContext | None) -> Any:
    """The statistics request of the pass that runs right after the current one (see
    :meth:`Pass.stats_request`), or None. The current pass fills it during its sweep and leaves
    it in ``ctx.extra[HANDED_STATS]``; the next pass takes it only if it made it and the graph
    is the one the request was closed on."""
    if ctx is None or not ctx.upcoming:
        return None
    return ctx.upcoming[0].stats_request(gm, ctx)


ProgressFn = Callable[[Iterable], Iterable]
