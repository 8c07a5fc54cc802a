"""The pass manager: validated order, verification after every pass, instrumentation.

Runs passes in the order given. Before anything runs it checks the order against each pass's
declared requirements and raises :class:`PipelineError` rather than reordering. After each pass:
``graph.lint()``, recompile, graph verification (every ``get_attr`` exists, Q/DQ pairs
well-typed, fake-tensor shape propagation) and, for exact passes, a numerical check of the
outputs against those before the pass on the probe inputs. A failure names the pass and the
passes before it. Timing, op-count diffs, numbered IR dumps and drift against the original model
are instrumentation outside the passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import fx

from compiler import ir
from compiler.errors import FxCompressError, PipelineError, PreconditionError, VerificationError
from compiler.inspection import block_params
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.report import PassRecord, Report

log = logging.getLogger(__name__)

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
    import passes as registry_pkg  # registered built-ins

    names = {p.name for p in passes if prop in p.establishes}
    names |= {n for n, cls in registry_pkg.registered().items() if prop in cls.establishes}
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
        atol: tolerance of that check (max abs diff of fp32 logits).
        skip: pass names, 1-based indices or reprs to skip (to bisect an accuracy drop).
        instruments: extra :class:`Instrument` callbacks.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        check_exact: bool = True,
        atol: float = 1e-4,
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
            if p.exact and self.check_exact and probe is not None and before_out is None:
                before_out = _run(gm, probe)
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx, record)
            t0 = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except FxCompressError as e:
                raise type(e)(f"{e} [in pass {i} {p!r}; passes before it: {_hist(ctx.history)}]") from e
            except Exception as e:
                raise PipelineError(
                    f"pass {i} {p!r} crashed: {type(e).__name__}: {e}; passes before it: "
                    f"{_hist(ctx.history)}"
                ) from e
            record.seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise PipelineError(f"pass {i} {p!r} returned {type(result).__name__}, not PassResult")
            gm = result.gm
            record.modified = result.modified
            record.stats = dict(result.stats)
            record.notes = list(result.notes)
            ctx.analyses.invalidate(result.preserved)
            if result.modified:
                if self.verify:
                    verify_graph(gm, probe, where=f"after pass {i} {p!r}", history=ctx.history)
                after_out = _run(gm, probe) if probe is not None else None
                if p.exact and self.check_exact and probe is not None:
                    diff = float((after_out.double() - before_out.double()).abs().max())
                    record.exact_check = diff
                    if not diff <= self.atol:
                        raise VerificationError(
                            f"pass {i} {p!r} is declared exact but changed the logits by {diff:.3e} "
                            f"(> {self.atol:g}) on the probe batch; passes before it: "
                            f"{_hist(ctx.history)}"
                        )
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
            log.info(
                "pass %d %r: %.2fs, modified=%s, %s", i, p, record.seconds, result.modified,
                ", ".join(f"{k}={v}" for k, v in result.stats.items()),
            )
        return report


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


def propagate_shapes(gm: fx.GraphModule, probe: torch.Tensor, ctxmsg: str = "") -> None:
    """Fake-tensor shape propagation with symbolic batch/seq dims; refreshes ``meta['val']``.

    The probe only supplies rank and dtype: batch and sequence stay symbolic, so channel dims are
    the only concrete sizes in the metadata afterwards (as after tracing).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    try:
        fake = mode.from_tensor(
            probe,
            symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * probe.dim()),
        )
        FakeTensorProp(gm, mode).propagate(fake)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise VerificationError(f"shape propagation failed{ctxmsg}: {type(e).__name__}: {first}") from e
