"""The pass manager: validated order, verification after every pass, instrumentation.

Runs passes in the order given. Before anything runs it checks the order against each pass's
declared requirements and raises :class:`PipelineError` rather than reordering. After each pass:
``graph.lint()``, recompile, graph verification (every ``get_attr`` exists, Q/DQ pairs
well-typed, fake-tensor shape propagation) and, for exact passes, a numerical check of the
outputs against those before the pass on the probe inputs. A failure names the pass and the
passes before it. Timing, op-count diffs, numbered IR dumps and drift against the original model
are instrumentation outside the passes.

The exact-pass check. An exact pass leaves the function unchanged, but it reorders float32
arithmetic and rewrites weights, so its float32 logits move by rounding alone, and by more the
deeper the model and the larger its logits: up to 4.3e-4 on SmolLM2-135M (30 layers, logits up
to ~30), 3e-7 on a 2-layer random tiny model. No absolute tolerance fits both. By default
(``atol=None``) the check separates the function from the rounding:

1. The graph is evaluated before and after the pass in float64 (:func:`evaluate_float64`:
   parameters widened exactly, every float dtype in the graph widened). The difference of those
   logits, ``d64``, is the change of the function plus only the rounding of the weights the pass
   rewrote and stored back in float32 (one rounding per weight, plus the float32 products that
   built them).
2. The float32 rounding of the graph before the pass is measured on the same probe:
   ``r32 = max |float32 logits - float64 logits|``. Backward error analysis says a float32
   matmul over K terms is the exact product of inputs perturbed by up to ~K * 2^-24, at every
   layer; storing each weight once rounded is a smaller perturbation than that, so an exact
   rewrite is expected to give ``d64 <= r32``. Measured: ``d64 / r32 <= 0.42`` for every exact
   pass on the tiny Llama/OPT/GPT-2 models, stories260K and SmolLM2 (0.02-0.29 for smoothquant,
   rotation_invariant and SliceGPT, 0.42 for SliceGPT with per-norm bases, below 1e-8 for
   permutations and fusions).
3. The pass verifies iff ``d64 <= tol = max(2 * r32, eps32 * max |logits|)`` and its float32
   logits are finite. The factor 2 is margin over the measured 0.42; the floor (one float32
   ulp of the largest logit) keeps a graph that float32 happens to evaluate exactly from
   demanding bit equality.

``r32`` grows with the logits' magnitude and the depth by construction (1.8e-7 on tiny-llama,
8.8e-6 on stories260K, 7.6e-5 on SmolLM2) with no fitted constant, and a real error stays
above it: one channel scaled by 1.01 moves the float64 logits of SmolLM2 by 2.2e-4 to 0.12
(median 4.6e-3 over 64 random channels of norm gains and q/v/up/down rows in 8 layers, every
one rejected) against a tolerance of 1.5e-4. The values (``d64``, ``tol``, ``r32`` and the
float32 change) go into the pass's report notes; ``PassRecord.exact_check`` keeps the float32
change.

An explicit ``atol`` is the former check: ``max |float32 logits after - before| <= atol``,
absolute. A graph that cannot run in float64 (an op without a float64 kernel) falls back to it
with ``atol = 1e-4``, and the note says so.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import fx

from compiler import ir
from compiler.errors import FxCompressError, PipelineError, PreconditionError, VerificationError
from compiler.inspection import block_params
from compiler.memory import release_free_memory
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.registry import registered
from compiler.report import PassRecord, Report

log = logging.getLogger(__name__)

#: the analysis whose computations are the report's calibration sweeps (compiler.stats)
CALIBRATION_ANALYSIS = "activation_stats"


def calibration_sweeps(ctx: PassContext) -> int:
    """Calibration sweeps so far: activation-statistics runs plus block-engine runs."""
    from compiler.blockwise import SWEEPS

    return ctx.analyses.computed[CALIBRATION_ANALYSIS] + sum(SWEEPS.values())

#: Properties satisfied by the context rather than by a pass.
_CONTEXT_PROPERTIES = {"calibrated": lambda ctx: bool(ctx.calibration)}


class Instrument:
    """Callbacks around every pass (TVM-style instrumentation). Override what you need."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None:
        pass

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None:
        pass


class DumpIR(Instrument):
    """Write the graph's code before the first pass and after each pass: ``003_smoothquant.py``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def before_pass(self, p, gm, ctx, record):
        if record.index == 1:
            self._write(0, "input", gm)

    def after_pass(self, p, gm, ctx, record):
        if not record.skipped:
            self._write(record.index, p.name or type(p).__name__, gm)

    def _write(self, i: int, name: str, gm: fx.GraphModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{i:03d}_{name}.py").write_text(gm.code)


class LogitsDrift(Instrument):
    """Record max |logits - original logits| on the probe batch after every pass."""

    def __init__(self, reference: torch.Tensor, probe: torch.Tensor):
        self.reference = reference
        self.probe = probe

    def after_pass(self, p, gm, ctx, record):
        if record.skipped:
            return
        with torch.no_grad():
            out = gm(self.probe)
        record.drift = float((out.float() - self.reference.float()).abs().max())


def validate_order(passes: Sequence[Pass], ctx: PassContext, skip: Iterable[str | int] = ()) -> None:
    """Check each pass's requirements hold given the passes before it; raise, never reorder."""
    props = set(ctx.properties)
    history: list[str] = []
    skip = set(skip)
    for i, p in enumerate(passes, 1):
        if _is_skipped(p, i, skip):
            continue
        for req in sorted(p.requires):
            if req in props:
                continue
            check = _CONTEXT_PROPERTIES.get(req)
            if check is not None and check(ctx):
                continue
            if check is not None:
                raise PreconditionError(
                    f"pass {i} ({p!r}) requires {req!r}: give calibration data "
                    f"(calibration=[input_ids, ...] or --calib); passes before it: {_hist(history)}"
                )
            providers = _providers(passes, req)
            hint = f"; run {', '.join(providers)} before it" if providers else ""
            raise PipelineError(
                f"pass {i} ({p!r}) requires the graph to be {req!r}, which no earlier pass "
                f"establishes{hint}; passes before it: {_hist(history)}"
            )
        for bad in sorted(set(p.forbids) & props):
            culprits = [q.name for q in passes[: i - 1] if bad in q.establishes]
            raise PipelineError(
                f"pass {i} ({p!r}) must run before the graph is {bad!r}, but "
                f"{', '.join(culprits) or 'an earlier pass'} made it so; passes before it: "
                f"{_hist(history)}"
            )
        props -= set(p.destroys)
        props |= set(p.establishes)
        history.append(p.name)


def _providers(passes: Sequence[Pass], prop: str) -> list[str]:
    names = {p.name for p in passes if prop in p.establishes}
    names |= {n for n, cls in registered().items() if prop in cls.establishes}
    return sorted(names)


def _hist(history: list[str]) -> str:
    return " -> ".join(history) if history else "(none)"


def _is_skipped(p: Pass, index: int, skip: set) -> bool:
    return index in skip or p.name in skip or repr(p) in skip


class PassManager:
    """Runs an ordered list of passes over a GraphModule with checks after each one.

    Args:
        passes: pass objects, in order.
        verify: run graph verification after every pass.
        check_exact: numerically compare outputs before/after every exact pass.
        atol: ``None`` (default): compare the logits in float64 against a tolerance measured
            from the float32 rounding of the graph before the pass (module docstring). A
            number: max abs difference allowed on the float32 logits (absolute).
        skip: pass names, 1-based indices or reprs to skip (to bisect an accuracy drop).
        instruments: extra :class:`Instrument` callbacks.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        check_exact: bool = True,
        atol: float | None = None,
        skip: Iterable[str | int] = (),
        instruments: Iterable[Instrument] = (),
    ):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"{p!r} is not a Pass")
        self.verify = verify
        self.check_exact = check_exact
        self.atol = atol
        self.skip = set(skip)
        self.instruments = list(instruments)

    def run(self, gm: fx.GraphModule, ctx: PassContext, report: Report | None = None) -> Report:
        """Run every pass in order on ``gm`` (in place); return the report."""
        report = report or Report()
        validate_order(self.passes, ctx, self.skip)
        probe = ctx.probe_inputs
        before_out = None
        before64: _Float64 | None = None  # float64 logits of the current graph, when computed
        blocks = None  # per-block params/shapes of the current graph, kept from pass to pass
        for i, p in enumerate(self.passes, 1):
            record = PassRecord(index=len(report.records) + 1, name=p.name, spec=repr(p), exact=p.exact)
            report.records.append(record)
            if _is_skipped(p, i, self.skip):
                record.skipped = True
                log.info("pass %d %r skipped", i, p)
                for inst in self.instruments:
                    inst.after_pass(p, gm, ctx, record)
                continue
            record.nodes_before = len(gm.graph.nodes)
            record.params_before = ir.count_params(gm)
            counts_before = ir.op_counts(gm)
            blocks_before = blocks if blocks is not None else block_params(gm)
            checked = p.exact and self.check_exact and probe is not None
            if checked and before_out is None:
                before_out = _run(gm, probe)
            if checked and self.atol is None and before64 is None:
                before64 = _Float64.of(gm, probe)
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx, record)
            t0 = time.perf_counter()
            sweeps0 = calibration_sweeps(ctx)
            ctx.upcoming = tuple(q for j, q in enumerate(self.passes[i:], i + 1)
                                 if not _is_skipped(q, j, self.skip))
            try:
                result = p.run(gm, ctx)
            except FxCompressError as e:
                raise type(e)(f"{e} [in pass {i} {p!r}; passes before it: {_hist(ctx.history)}]") from e
            except Exception as e:
                raise PipelineError(
                    f"pass {i} {p!r} crashed: {type(e).__name__}: {e}; passes before it: "
                    f"{_hist(ctx.history)}"
                ) from e
            finally:
                ctx.upcoming = None
            record.seconds = time.perf_counter() - t0
            record.sweeps = calibration_sweeps(ctx) - sweeps0
            if not isinstance(result, PassResult):
                raise PipelineError(f"pass {i} {p!r} returned {type(result).__name__}, not PassResult")
            gm = result.gm
            record.modified = result.modified
            record.stats = dict(result.stats)
            record.notes = list(result.notes)
            record.tables = {k: list(v) for k, v in result.tables.items()}
            ctx.analyses.invalidate(result.preserved)
            for analysis, key, value in result.analyses:  # derived exactly by the pass
                ctx.analyses.put(analysis, gm, value, **key)
            if result.modified:
                if self.verify:
                    verify_graph(gm, probe, where=f"after pass {i} {p!r}", history=ctx.history)
                after_out = _run(gm, probe) if probe is not None else None
                # the float64 logits after an exact pass are those before the next one
                before64 = self._check_exact(i, p, gm, ctx, record, probe, before_out, after_out,
                                             before64) if checked else None
                before_out = after_out
            record.nodes_after = len(gm.graph.nodes)
            record.params_after = ir.count_params(gm)
            delta = ir.op_counts(gm)
            delta.subtract(counts_before)
            record.ops_delta = {k: v for k, v in delta.items() if v}
            blocks = block_params(gm) if result.modified else blocks_before
            if _reshaped(blocks_before, blocks):
                record.blocks_before, record.blocks_after = blocks_before, blocks
            ctx.properties -= set(p.destroys)
            ctx.properties |= set(p.establishes)
            ctx.history.append(p.name)
            for inst in self.instruments:
                inst.after_pass(p, gm, ctx, record)
            release_free_memory()  # what the pass freed, before the next one allocates
            log.info(
                "pass %d %r: %.2fs, modified=%s, %s", i, p, record.seconds, result.modified,
                ", ".join(f"{k}={v}" for k, v in result.stats.items()),
            )
        return report

    def _check_exact(self, i: int, p: Pass, gm: fx.GraphModule, ctx: PassContext,
                     record: PassRecord, probe: torch.Tensor, before_out: torch.Tensor,
                     after_out: torch.Tensor, before64: _Float64 | None) -> _Float64 | None:
        """The exact-pass check (module docstring); returns the float64 logits after the pass."""
        d32 = float((after_out.double() - before_out.double()).abs().max())
        record.exact_check = d32
        after64 = _Float64.of(gm, probe) if self.atol is None else None
        if self.atol is not None or before64.logits is None or after64.logits is None:
            atol = self.atol if self.atol is not None else FALLBACK_ATOL
            why = ("absolute, as given" if self.atol is not None else
                   f"absolute fallback: no float64 evaluation, {before64.error or after64.error}")
            record.notes.append(f"exact check: float32 logits moved {d32:.2e} <= atol {atol:.2e} "
                                f"({why})")
            if not d32 <= atol:
                raise VerificationError(
                    f"pass {i} {p!r} is declared exact but changed the logits by {d32:.3e} "
                    f"(> atol {atol:g}, {why}) on the probe batch; passes before it: "
                    f"{_hist(ctx.history)}"
                )
            return None
        tol, r32 = exact_tolerance(before_out, before64.logits)
        d64 = float((after64.logits - before64.logits).abs().max())
        finite = bool(torch.isfinite(after_out).all()) or not bool(torch.isfinite(before_out).all())
        record.notes.append(
            f"exact check: float64 logits moved {d64:.2e} <= tolerance {tol:.2e} (2 x the float32 "
            f"rounding {r32:.2e} of the graph before the pass); float32 logits moved {d32:.2e}"
        )
        if not (d64 <= tol and finite):
            what = (f"changed the logits by {d64:.3e} in float64 (> tolerance {tol:.3e} = 2 x the "
                    f"float32 rounding {r32:.3e} of the graph before it; float32 logits moved "
                    f"{d32:.3e})" if finite else "made the float32 logits non-finite")
            raise VerificationError(
                f"pass {i} {p!r} is declared exact but {what} on the probe batch; passes before "
                f"it: {_hist(ctx.history)}"
            )
        return after64


#: Absolute float32 tolerance when a graph cannot be evaluated in float64 (the former default).
FALLBACK_ATOL = 1e-4
#: Margin of the exact-pass tolerance over the measured float32 rounding (module docstring).
ROUNDING_MARGIN = 2.0


def exact_tolerance(logits32: torch.Tensor, logits64: torch.Tensor) -> tuple[float, float]:
    """Tolerance of the float64 exact-pass check for a graph, from its float32 rounding.

    Args:
        logits32: the graph's logits on the probe, evaluated in float32.
        logits64: the same graph's logits on the probe, evaluated in float64.

    Returns:
        ``(tol, r32)``: ``r32 = max |logits32 - logits64|`` (the graph's float32 rounding on the
        probe) and ``tol = max(2 * r32, eps32 * max |logits64|)``.
    """
    r32 = float((logits32.double() - logits64).abs().max())
    floor = torch.finfo(torch.float32).eps * float(logits64.abs().max())
    return max(ROUNDING_MARGIN * r32, floor), r32


_WIDEN = (torch.float32, torch.float16, torch.bfloat16)


class _Float64Interpreter(fx.Interpreter):
    """Runs a graph in float64: float tensor and float dtype arguments widened at each op.

    Parameters are widened where an op reads them, not on fetch: traced graphs fetch every
    parameter at the top, so widening there would hold the whole model in float64 at once
    (1 GB for a 134M model); this way one op's weights are widened at a time.

    Ops outside ``aten`` (PT2E Q/DQ, custom kernels) get their float64 tensors narrowed to
    float32 and return widened results: quantization is part of the function, not rounding.
    """

    def call_method(self, target, args, kwargs):
        args, kwargs = fx.node.map_aggregate((args, kwargs), _widen_arg)
        return super().call_method(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        namespace = getattr(target, "namespace", "aten")
        if namespace in ("aten", "prims"):
            args, kwargs = fx.node.map_aggregate((args, kwargs), _widen_arg)
            return super().call_function(target, args, kwargs)
        args, kwargs = fx.node.map_aggregate((args, kwargs), _widen_arg)
        args, kwargs = fx.node.map_aggregate((args, kwargs), _narrow_tensor)
        return fx.node.map_aggregate(super().call_function(target, args, kwargs), _widen_tensor)


def _widen_dtype(a):
    return torch.float64 if isinstance(a, torch.dtype) and a in _WIDEN else a


def _widen_arg(a):
    if isinstance(a, torch.Tensor):
        return a.detach().double() if a.dtype in _WIDEN else a
    return _widen_dtype(a)


def _narrow_tensor(a):
    return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a


def _widen_tensor(a):
    return a.double() if isinstance(a, torch.Tensor) and a.dtype in _WIDEN else a


def evaluate_float64(gm: fx.GraphModule, inputs: torch.Tensor) -> torch.Tensor:
    """The graph's output on ``inputs`` computed in float64 (parameters widened exactly).

    Raises:
        Whatever an op without a float64 kernel raises; the output must be a float64 tensor
        (else ``TypeError``).
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # int tensor * python float promotes to float64
    try:
        with torch.no_grad():
            out = _Float64Interpreter(gm).run(inputs)
    finally:
        torch.set_default_dtype(default)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float64:
        raise TypeError(f"float64 evaluation gave {getattr(out, 'dtype', type(out).__name__)}")
    return out


class _Float64:
    """Float64 logits of a graph on the probe, or why they could not be computed."""

    def __init__(self, logits: torch.Tensor | None, error: str = ""):
        self.logits = logits
        self.error = error

    @classmethod
    def of(cls, gm: fx.GraphModule, probe: torch.Tensor) -> _Float64:
        try:
            return cls(evaluate_float64(gm, probe))
        except Exception as e:  # an op without a float64 kernel: the check falls back
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.info("float64 evaluation failed (%s: %s); exact check falls back to atol",
                     type(e).__name__, first)
            return cls(None, f"{type(e).__name__}: {first}"[:200])


def _reshaped(before: dict[str, dict], after: dict[str, dict]) -> bool:
    """True if a parameter present before and after the pass changed shape."""
    return any(shape != after[k]["shapes"][name]
               for k, row in before.items() if k in after
               for name, shape in row["shapes"].items() if name in after[k]["shapes"])


def _run(gm: fx.GraphModule, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gm(inputs)


def verify_graph(
    gm: fx.GraphModule, probe: torch.Tensor | None = None, *, where: str = "", history: Sequence[str] = ()
) -> None:
    """Lint, recompile, check get_attr targets and Q/DQ typing, and propagate shapes.

    The shape propagation is skipped when ``gm`` was already propagated and nothing that decides
    a shape changed since (see :func:`propagate_shapes`); every other check always runs.

    Raises:
        VerificationError: naming the failing node, ``where`` and the pass history.
    """
    ctxmsg = f" ({where}; passes before it: {_hist(list(history))})" if where else ""
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"graph lint failed{ctxmsg}: {e}") from e
    gm.recompile()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not ir.has_attr(gm, str(n.target)):
            raise VerificationError(f"get_attr {n.target!r} (node {n.name}) has no parameter{ctxmsg}")
    _check_qdq(gm, ctxmsg)
    if probe is not None:
        propagate_shapes(gm, probe, ctxmsg)


_Q_OPS = ("quantize_per_tensor", "quantize_per_channel", "quantize_per_token", "quantize_per_channel_group")


def _check_qdq(gm: fx.GraphModule, ctxmsg: str) -> None:
    """Every quantize node feeds only dequantize nodes with the same integer dtype."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if n.target.namespace != "quantized_decomposed":
            continue
        base = n.target._schema.name.split("::")[-1]
        if base not in _Q_OPS:
            continue
        qdtype = _qdq_dtype(n)
        for u in n.users:
            ok = (
                u.op == "call_function"
                and isinstance(u.target, torch._ops.OpOverload)
                and u.target.namespace == "quantized_decomposed"
                and u.target._schema.name.split("::")[-1].startswith("dequantize")
            )
            if not ok:
                raise VerificationError(
                    f"quantize node {n.name} ({ir.site(n)}) feeds {u.name} ({ir.op_name(u)}), "
                    f"not a dequantize{ctxmsg}"
                )
            udtype = _qdq_dtype(u)
            if isinstance(qdtype, torch.dtype) and isinstance(udtype, torch.dtype) and qdtype != udtype:
                raise VerificationError(
                    f"Q/DQ pair {n.name} -> {u.name} ({ir.site(n)}) disagree on dtype "
                    f"{qdtype} vs {udtype}{ctxmsg}"
                )


def _qdq_dtype(n: fx.Node):
    """The integer dtype argument of a quantized_decomposed Q/DQ node (schema-aware)."""
    schema = n.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "dtype":
            if "dtype" in n.kwargs:
                return n.kwargs["dtype"]
            return n.args[i] if i < len(n.args) else None
    return None


#: Calls of :func:`propagate_shapes`: ``calls``, ``skipped`` (the graph was already propagated)
#: and ``seconds`` spent propagating. Process-wide; ``compile()`` reports its own share.
SHAPE_PROPAGATION: Counter = Counter()

#: ``gm.meta`` key of the :class:`_ShapeStamp` of the last successful propagation
_STAMP_META = "fxcompress_shape_stamp"


class _Ref:
    """A node argument in a shape key: the node's name (unique in its graph)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __eq__(self, other):
        return isinstance(other, _Ref) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


class _ShapeStamp:
    """What the last successful propagation saw (``key``) and the ``meta['val']`` it wrote.

    Also what the next propagation of the same graph needs to redo only what changed: the fake
    tensor mode (its shape environment holds the batch/seq symbols), the fake probe, and per
    node name its row of the graph key and the value written (see :func:`propagate_shapes`).

    A deep copy of the GraphModule shares it: fx copies every node's ``meta`` dict shallowly,
    so the copy's nodes hold the same ``val`` objects, which :func:`_propagated` checks by
    identity. A pickled stamp comes back empty and matches nothing.
    """

    __slots__ = ("key", "vals", "mode", "fake_probe", "rows")

    def __init__(self, key: tuple | None, vals: tuple = (), mode=None, fake_probe=None,
                 rows: dict | None = None):
        self.key, self.vals = key, vals
        self.mode, self.fake_probe = mode, fake_probe
        self.rows = rows or {}  # node name -> row of the graph key, in graph order (as vals)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_ShapeStamp, (None, ()))


def _tensor_key(t) -> tuple:
    # not requires_grad: ir.set_param clears it on every weight a pass rewrites, and nothing
    # reads it from meta['val']
    if isinstance(t, torch.Tensor):
        return ("tensor", tuple(t.shape), t.stride(), t.dtype, t.device)
    if isinstance(t, fx.GraphModule):
        return ("graph", _graph_key(t))
    return ("object", type(t))


def _arg_key(a):
    if isinstance(a, fx.Node):
        return _Ref(a.name)
    if isinstance(a, torch.Tensor):  # a constant argument: only its metadata reaches the shapes
        return _tensor_key(a)
    return a


def _graph_key(gm: fx.GraphModule) -> tuple:
    """Every node's op, target and arguments, and what each ``get_attr`` reads."""
    nodes = []
    for n in gm.graph.nodes:
        row = (n.name, n.op, n.target, fx.node.map_aggregate(n.args, _arg_key),
               fx.node.map_aggregate(n.kwargs, _arg_key))
        if n.op in ("get_attr", "call_module"):
            obj: object = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part, None)
            row += (_tensor_key(obj),)
        nodes.append(row)
    return tuple(nodes)


def _shape_key(gm: fx.GraphModule, probe: torch.Tensor) -> tuple:
    """What decides every node's ``meta['val']``: the graph, every parameter's and buffer's
    shape/stride/dtype, and the probe's rank, sizes (a size of 0 or 1 specialises; sizes are
    the symbols' hints), dtype and device. Weight values are not in it."""
    tensors = tuple((k, _tensor_key(t)) for k, t in gm.named_parameters(remove_duplicate=False))
    tensors += tuple((k, _tensor_key(t)) for k, t in gm.named_buffers(remove_duplicate=False))
    return (_graph_key(gm), tensors, tuple(probe.shape), probe.dtype, probe.device,
            torch.is_grad_enabled())


def _propagated(gm: fx.GraphModule, key: tuple) -> bool:
    """True if the last propagation of ``gm`` saw ``key`` and its ``meta['val']`` are in place."""
    stamp = gm.meta.get(_STAMP_META)
    if not isinstance(stamp, _ShapeStamp) or stamp.key is None or stamp.key != key:
        return False
    nodes = gm.graph.nodes
    return len(nodes) == len(stamp.vals) and all(
        n.meta.get("val") is v for n, v in zip(nodes, stamp.vals))


def value_key(v) -> Any:
    """What a node's ``meta['val']`` says to the nodes reading it: for a tensor its symbolic
    sizes, strides and storage offset (as text), dtype and device; containers element-wise."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(map(str, v.shape)), tuple(map(str, v.stride())),
                str(v.storage_offset()), v.dtype, v.device)
    if isinstance(v, (tuple, list)):
        return tuple(value_key(x) for x in v)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(v))
    return v if isinstance(v, (int, float, bool, str, type(None))) else ("object", type(v))


@functools.lru_cache(maxsize=1)
def _fake_prop_class():
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class ReusingFakeTensorProp(FakeTensorProp):
        """Fake-tensor propagation that keeps a node's previous value when its row of the graph
        key is unchanged and every node it reads is *stable* (its value says the same as
        before: :func:`value_key`); every other node is recomputed."""

        def __init__(self, gm, mode, stamp: _ShapeStamp | None, rows: dict):
            super().__init__(gm, mode)
            self.old_rows = stamp.rows if stamp is not None else {}
            self.old_vals = dict(zip(stamp.rows, stamp.vals)) if stamp is not None else {}
            self.rows = rows
            self.stable: set[str] = set()
            self.recomputed = self.reused = 0

        def run_node(self, n):
            name = n.name
            if (n.op not in ("placeholder", "get_attr", "output") and name in self.old_vals
                    and self.old_rows.get(name) == self.rows[name]
                    and all(m.name in self.stable for m in n.all_input_nodes)):
                val = n.meta["val"] = self.old_vals[name]
                self.stable.add(name)
                self.reused += 1
                return val
            result = super().run_node(n)
            if n.op not in ("placeholder", "get_attr", "output"):
                self.recomputed += 1
            if name in self.old_vals and value_key(n.meta.get("val")) == value_key(self.old_vals[name]):
                self.stable.add(name)
            return result

    return ReusingFakeTensorProp


def propagate_shapes(gm: fx.GraphModule, probe: torch.Tensor, ctxmsg: str = "") -> None:
    """Fake-tensor shape propagation with symbolic batch/seq dims; refreshes ``meta['val']``.

    The probe only supplies rank and dtype: batch and sequence stay symbolic, so channel dims are
    the only concrete sizes in the metadata afterwards (as after tracing).

    Skipped when nothing that decides a shape changed since the last successful propagation of
    ``gm``: the same graph (nodes, targets, arguments), the same shape, stride and dtype of every
    parameter and buffer, the same probe rank, sizes and dtype, and every node still holding the
    ``meta['val']`` that propagation wrote. A pass that rewrites weight values only keeps it
    valid.

    Otherwise incremental when ``gm`` was propagated before with a probe of the same rank, sizes
    and dtype: in the same fake tensor mode (the same batch/seq symbols), a node keeps the value
    the last propagation gave it when its op, target and arguments (by node name; a ``get_attr``
    with the shape, stride and dtype of what it reads) are unchanged and every node it reads
    says the same as before (sizes, strides, dtype, device); every other node is recomputed.
    After SliceGPT that is the residual stream and what reads it; after Q/DQ insertion the new
    nodes. The result equals a full propagation (``tests/compiler/test_shape_cache.py``).
    :data:`SHAPE_PROPAGATION` counts calls, skips, recomputed and reused nodes and seconds.

    Raises:
        VerificationError: the propagation failed (naming the op and ``ctxmsg``).
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    SHAPE_PROPAGATION["calls"] += 1
    key = _shape_key(gm, probe)
    if _propagated(gm, key):
        SHAPE_PROPAGATION["skipped"] += 1
        return
    stamp = gm.meta.pop(_STAMP_META, None)
    if not (isinstance(stamp, _ShapeStamp) and stamp.mode is not None
            and stamp.key is not None and stamp.key[2:] == key[2:]
            and not any("unbacked_bindings" in n.meta for n in gm.graph.nodes)):
        stamp = None  # a full propagation in a new mode
    rows = {row[0]: row for row in key[0]}
    t0 = time.perf_counter()
    if stamp is not None:
        mode, fake = stamp.mode, stamp.fake_probe
    else:
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        fake = mode.from_tensor(
            probe,
            symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * probe.dim()),
        )
    prop = _fake_prop_class()(gm, mode, stamp, rows)
    try:
        # The python dispatcher lets meta kernels that call composite ops with symbolic sizes
        # (baddbmm expanding an ALiBi bias [b*h, 1, s] to [b*h, s, s]) take the SymInt path, as
        # torch.export does when tracing; without it they fail on "concrete integers".
        with enable_python_dispatcher():
            prop.propagate_dont_convert_inputs(fake)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise VerificationError(f"shape propagation failed{ctxmsg}: {type(e).__name__}: {first}") from e
    finally:
        SHAPE_PROPAGATION["seconds"] += time.perf_counter() - t0
        SHAPE_PROPAGATION["recomputed"] += prop.recomputed
        SHAPE_PROPAGATION["reused"] += prop.reused
    vals = tuple(n.meta.get("val") for n in gm.graph.nodes)
    gm.meta[_STAMP_META] = _ShapeStamp(key, vals, mode, fake, rows)


def propagation_of(gm: fx.GraphModule) -> tuple[Any, tuple, torch.dtype] | None:
    """``(fake tensor mode, probe shape, probe dtype)`` of the last successful
    :func:`propagate_shapes` of ``gm`` (shared by its deep copies), or None."""
    stamp = gm.meta.get(_STAMP_META)
    if not isinstance(stamp, _ShapeStamp) or stamp.key is None or stamp.mode is None:
        return None
    return stamp.mode, tuple(stamp.key[2]), stamp.key[3]
