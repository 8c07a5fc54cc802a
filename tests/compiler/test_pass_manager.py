"""PassManager: order validation, verification, exact-pass numerical check, skip, instrumentation."""

from __future__ import annotations

import pytest
import torch

from compiler import ir
from compiler.errors import PipelineError, PreconditionError, VerificationError
from compiler.pass_base import Analysis, Pass, PassContext, PassResult
from compiler.pass_manager import (
    FALLBACK_ATOL,
    DumpIR,
    PassManager,
    evaluate_float64,
    exact_tolerance,
    validate_order,
)
from passes.canonicalize import Canonicalize
from tests.conftest import CORE_FAMILIES, DATA, needs_stories, stories_graph, tiny_graph


class ScaleFirstLinear(Pass):
    """Test pass: multiplies the first linear's weight; 'exact' is a lie unless factor == 1."""

    name = "scale_first_linear"
    exact = True
    requires = frozenset({"canonical"})

    def __init__(self, *, factor: float = 1.01):
        self.factor = factor

    def run(self, gm, ctx):
        lin = ir.nodes_of(gm, torch.ops.aten.linear.default)[0]
        w = lin.args[1]
        ir.set_param(gm, w, ir.get_param(gm, w) * self.factor)
        return PassResult(gm, True, frozenset(), {"scaled": 1})


class ScaleOneChannel(Pass):
    """Test pass: one channel scaled by ``factor`` without compensation, claimed exact.

    What a wrong smoothing scale on one channel does: ``target="linear"`` scales one output
    channel (a row) of the first linear, ``target="norm"`` one entry of the first norm gain.
    """

    name = "scale_one_channel"
    exact = True
    requires = frozenset({"canonical"})

    def __init__(self, *, factor: float = 1.01, channel: int = 0, target: str = "linear"):
        self.factor, self.channel, self.target = factor, channel, target

    def run(self, gm, ctx):
        if self.target == "linear":
            w = ir.nodes_of(gm, torch.ops.aten.linear.default)[0].args[1]
        else:
            w = next(n for n in gm.graph.nodes if n.target in (ir.RMS_NORM, ir.LAYER_NORM)).args[2]
        value = ir.get_param(gm, w).clone()
        value[self.channel] *= self.factor
        ir.set_param(gm, w, value)
        return PassResult(gm, True, frozenset(), {"scaled": 1})


class NeedsCalibration(Pass):
    name = "needs_calibration"
    exact = True
    requires = frozenset({"calibrated"})

    def run(self, gm, ctx):
        return PassResult.unchanged(gm)


class Quantizes(Pass):
    name = "quantizes"
    exact = False
    establishes = frozenset({"quantized"})
    destroys = frozenset({"canonical"})

    def run(self, gm, ctx):
        return PassResult.unchanged(gm)


class DanglingAttr(Pass):
    name = "dangling_attr"
    exact = False

    def run(self, gm, ctx):
        lin = ir.nodes_of(gm, torch.ops.aten.linear.default)[0]
        with gm.graph.inserting_before(lin):
            ghost = gm.graph.get_attr("does_not_exist")
        lin.replace_input_with(lin.args[1], ghost)
        return PassResult(gm, True)


def _ctx(probe=None, calibration=None):
    return PassContext(probe_inputs=probe, calibration=calibration)


def test_order_violation_is_an_error_naming_the_missing_property(probe_ids):
    gm = tiny_graph("llama")
    with pytest.raises(PipelineError, match="requires the graph to be 'canonical'.*canonicalize"):
        PassManager([ScaleFirstLinear(factor=1.0)]).run(gm, _ctx(probe_ids))


def test_order_violation_after_a_destroying_pass_names_the_history(probe_ids):
    passes = [Canonicalize(), Quantizes(), ScaleFirstLinear(factor=1.0)]
    with pytest.raises(PipelineError, match=r"canonicalize -> quantizes"):
        validate_order(passes, _ctx(probe_ids))


def test_order_is_never_silently_fixed(probe_ids):
    gm = tiny_graph("llama")
    code = gm.code
    with pytest.raises(PipelineError):
        PassManager([ScaleFirstLinear(factor=1.0), Canonicalize()]).run(gm, _ctx(probe_ids))
    assert gm.code == code  # validation happens before anything runs


def test_wrong_exact_pass_is_caught_by_the_numerical_check(probe_ids):
    gm = tiny_graph("llama")
    with pytest.raises(VerificationError, match=r"scale_first_linear.*declared exact.*canonicalize"):
        PassManager([Canonicalize(), ScaleFirstLinear(factor=1.5)]).run(gm, _ctx(probe_ids))


def test_exact_pass_within_tolerance_passes_and_records_its_check(probe_ids):
    gm = tiny_graph("llama")
    report = PassManager([Canonicalize(), ScaleFirstLinear(factor=1.0)]).run(gm, _ctx(probe_ids))
    assert report.records[1].exact_check == 0.0


def test_calibration_requirement_without_data_is_a_precondition_error(probe_ids):
    gm = tiny_graph("llama")
    with pytest.raises(PreconditionError, match="needs_calibration.*calibration"):
        PassManager([NeedsCalibration()]).run(gm, _ctx(probe_ids))
    PassManager([NeedsCalibration()]).run(gm, _ctx(probe_ids, calibration=[probe_ids]))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verification_catches_a_get_attr_without_parameter(probe_ids):
    gm = tiny_graph("llama")
    with pytest.raises(VerificationError, match=r"dangling_attr.*canonicalize.*does_not_exist"):
        PassManager([Canonicalize(), DanglingAttr()]).run(gm, _ctx(probe_ids))


def test_second_run_of_a_pass_is_unmodified_and_keeps_the_graph(probe_ids):
    gm = tiny_graph("opt")
    report = PassManager([Canonicalize(), Canonicalize()]).run(gm, _ctx(probe_ids))
    assert report.records[0].modified and not report.records[1].modified
    assert report.records[1].nodes_before == report.records[1].nodes_after


def test_skip_by_name_leaves_the_pass_out_and_marks_it(probe_ids):
    gm = tiny_graph("llama")
    report = PassManager([Canonicalize(), ScaleFirstLinear(factor=1.5)],
                         skip={"scale_first_linear"}).run(gm, _ctx(probe_ids))
    assert report.records[1].skipped
    assert "skipped" in report.table()


def test_skip_by_index_skips_only_that_pass(probe_ids):
    gm = tiny_graph("llama")
    report = PassManager([Canonicalize(), ScaleFirstLinear(factor=1.0)], skip={2}).run(
        gm, _ctx(probe_ids))
    assert not report.records[0].skipped and report.records[1].skipped


def test_crash_inside_a_pass_names_the_pass_and_history(probe_ids):
    class Crash(Pass):
        name = "crash"
        exact = False

        def run(self, gm, ctx):
            raise RuntimeError("boom")

    gm = tiny_graph("llama")
    with pytest.raises(PipelineError, match=r"pass 2 crash\(\) crashed: RuntimeError: boom; passes before it: canonicalize"):
        PassManager([Canonicalize(), Crash()]).run(gm, _ctx(probe_ids))


def test_dump_ir_writes_numbered_graph_files(tmp_path, probe_ids):
    gm = tiny_graph("llama")
    PassManager([Canonicalize()], instruments=[DumpIR(tmp_path)]).run(gm, _ctx(probe_ids))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_input.py", "001_canonicalize.py"]
    assert "rms_norm" in (tmp_path / "001_canonicalize.py").read_text()


def test_report_records_op_count_diff_and_params(probe_ids):
    gm = tiny_graph("gpt2")
    report = PassManager([Canonicalize()]).run(gm, _ctx(probe_ids))
    rec = report.records[0]
    assert rec.ops_delta["addmm"] == -8 and rec.ops_delta["linear"] == 8
    assert rec.params_before == rec.params_after > 0
    assert "addmm -8" in report.diff_table()


def test_report_shows_params_and_shapes_per_block_for_passes_that_reshape(probe_ids):
    from compiler.report import Report
    from passes.structured_prune import StructuredPrune

    gm = tiny_graph("llama")
    report = PassManager([Canonicalize(), StructuredPrune(ratio=0.5, importance="l2",
                                                          prune_attention=False)]
                         ).run(gm, _ctx(probe_ids))
    canon, prune = report.records
    assert canon.blocks_before is None  # no parameter changed shape
    up = "mlp.up_proj.weight"
    assert prune.blocks_before["0"]["shapes"][up] == [128, 64]
    assert prune.blocks_after["0"]["shapes"][up] == [64, 64]
    assert prune.blocks_before["1"]["params"] - prune.blocks_after["1"]["params"] == 3 * 64 * 64
    assert sum(r["params"] for r in prune.blocks_after.values()) == prune.params_after
    table = report.blocks_table()
    assert "blocks 0-1 (each): 36,992 -> 24,704 params" in table
    assert "mlp.down_proj.weight 64x128->64x64" in table
    assert "parameters and shapes per block" in str(report)
    again = Report.from_dict(__import__("json").loads(report.to_json()))
    assert again.blocks_table() == table


class CountingAnalysis(Analysis):
    name = "counting"
    calls = 0

    @classmethod
    def compute(cls, gm, ctx, **key):
        cls.calls += 1
        return len(gm.graph.nodes)


def test_analyses_are_cached_and_invalidated_by_what_a_pass_does_not_preserve(probe_ids):
    class Uses(Pass):
        name = "uses"
        exact = True

        def __init__(self, *, preserve: bool):
            self.preserve = preserve

        def run(self, gm, ctx):
            ctx.analysis(CountingAnalysis, gm)
            ir.set_param(gm, ir.nodes_of(gm, torch.ops.aten.linear.default)[0].args[1],
                         ir.get_param(gm, ir.nodes_of(gm, torch.ops.aten.linear.default)[0].args[1]))
            return PassResult(gm, True, frozenset({"counting"}) if self.preserve else frozenset())

    CountingAnalysis.calls = 0
    gm = tiny_graph("llama")
    PassManager([Uses(preserve=True), Uses(preserve=True)]).run(gm, _ctx(probe_ids))
    assert CountingAnalysis.calls == 1
    CountingAnalysis.calls = 0
    PassManager([Uses(preserve=False), Uses(preserve=False)]).run(gm, _ctx(probe_ids))
    assert CountingAnalysis.calls == 2


class GraphOf(Analysis):
    """Returns the graph it was computed on, so a test sees which graph a cached result is of."""

    name = "graph_of"

    @classmethod
    def compute(cls, gm, ctx, **key):
        return gm.graph


def test_an_analysis_is_cached_per_graph_never_returned_for_another():
    import copy

    gm = tiny_graph("llama")
    twin = copy.deepcopy(gm)  # same structure, same node count, another graph
    ctx = PassContext()
    assert ctx.analysis(GraphOf, gm) is gm.graph
    assert ctx.analysis(GraphOf, twin) is twin.graph
    assert ctx.analysis(GraphOf, gm) is gm.graph and ctx.analysis(GraphOf, twin) is twin.graph
    assert (ctx.analyses.hits, ctx.analyses.misses) == (2, 2)
    # a GraphModule whose graph is replaced is another graph
    gm.graph = copy.deepcopy(gm.graph)
    assert ctx.analysis(GraphOf, gm) is gm.graph and ctx.analyses.misses == 3
    # invalidating one graph's results leaves the other's
    ctx.analyses.invalidate(frozenset(), gm)
    assert ctx.analyses.cached(gm) == [] and ctx.analyses.cached(twin) == ["graph_of"]


def test_a_cached_analysis_is_recomputed_after_its_graph_changed_structure_unannounced():
    gm = tiny_graph("llama")
    ctx = PassContext()
    CountingAnalysis.calls = 0
    n = ctx.analysis(CountingAnalysis, gm)
    lin = ir.nodes_of(gm, torch.ops.aten.linear.default)[0]
    with gm.graph.inserting_after(lin):
        neg = gm.graph.call_function(torch.ops.aten.neg.default, (lin,))
    assert ctx.analysis(CountingAnalysis, gm) == n + 1 and CountingAnalysis.calls == 2
    gm.graph.erase_node(neg)
    assert ctx.analysis(CountingAnalysis, gm) == n and CountingAnalysis.calls == 3


def test_the_analysis_cache_does_not_keep_a_dead_graph_alive():
    import gc
    import weakref

    ctx = PassContext()
    gm = tiny_graph("llama")
    ctx.analysis(CountingAnalysis, gm)
    ref = weakref.ref(gm.graph)
    del gm
    gc.collect()
    assert ref() is None and len(ctx.analyses._cache) == 0


def test_a_pass_that_forbids_a_property_is_rejected_after_the_pass_that_establishes_it(probe_ids):
    class Exactish(Pass):
        name = "exactish"
        exact = True
        forbids = frozenset({"quantized"})

        def run(self, gm, ctx):
            return PassResult.unchanged(gm)

    with pytest.raises(PipelineError, match=r"exactish\(\).*must run before.*'quantized'.*quantizes"):
        validate_order([Canonicalize(), Quantizes(), Exactish()], _ctx(probe_ids))
    validate_order([Canonicalize(), Exactish(), Quantizes()], _ctx(probe_ids))


def test_smoothquant_after_insert_qdq_is_an_order_error():
    from passes import make_passes

    with pytest.raises(PipelineError, match="smoothquant.*must run before.*insert_qdq"):
        validate_order(make_passes(["canonicalize", "insert_qdq(scheme=w8a8_dynamic)",
                                    "smoothquant(alpha=0.5)"]), _ctx(calibration=[torch.zeros(1, 2)]))


# --- the exact-pass check: float64 comparison, tolerance from the measured float32 rounding ---

_CHECK_NOTE = (r"exact check: float64 logits moved (\S+) <= tolerance (\S+) \(2 x the float32 "
               r"rounding (\S+) of the graph before the pass\); float32 logits moved (\S+)")


def _check_note(record) -> tuple[float, float, float, float]:
    """(d64, tolerance, float32 rounding, d32) from a record's exact-check note."""
    import re

    found = [re.fullmatch(_CHECK_NOTE, n) for n in record.notes]
    found = [m for m in found if m]
    assert len(found) == 1, record.notes
    return tuple(float(v) for v in found[0].groups())


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_one_channel_scaled_by_1_01_is_rejected_on_tiny_models(family, probe_ids):
    gm = tiny_graph(family)
    with pytest.raises(VerificationError, match=r"scale_one_channel.*declared exact.*in float64 "
                                                r"\(> tolerance .* float32 rounding"):
        PassManager([Canonicalize(), ScaleOneChannel()]).run(gm, _ctx(probe_ids))


def test_one_norm_gain_channel_scaled_by_1_01_is_rejected(probe_ids):
    gm = tiny_graph("llama")
    with pytest.raises(VerificationError, match="scale_one_channel.*declared exact"):
        PassManager([Canonicalize(), ScaleOneChannel(target="norm", channel=5)]).run(
            gm, _ctx(probe_ids))


def test_exact_check_note_gives_the_tolerance_measured_from_float32_rounding(probe_ids):
    gm = tiny_graph("llama")
    report = PassManager([Canonicalize(), ScaleFirstLinear(factor=1.0)]).run(gm, _ctx(probe_ids))
    d64, tol, r32, d32 = _check_note(report.records[1])
    assert d64 == d32 == 0.0
    # a 2-layer model with logits < 1 rounds at ~1e-7: far tighter than the former 1e-4
    assert 0 < r32 < 1e-6 and tol == pytest.approx(2 * r32, rel=0.01)
    _check_note(report.records[0])  # canonicalize is exact and checked too


def test_exact_tolerance_is_twice_the_rounding_with_a_one_ulp_floor():
    logits32 = 30 * torch.randn(2, 8, 50, generator=torch.Generator().manual_seed(0))
    logits64 = logits32.double()
    logits64[1, 2, 3] += 1e-3
    tol, r32 = exact_tolerance(logits32, logits64)
    assert r32 == pytest.approx(1e-3, rel=1e-3) and tol == 2 * r32
    exactly = torch.ones(2, 3, dtype=torch.float64)
    tol, r32 = exact_tolerance(exactly.float(), exactly)
    assert r32 == 0 and tol == torch.finfo(torch.float32).eps


def test_float64_evaluation_removes_float32_rounding_from_an_exact_permutation(probe_ids,
                                                                              calib_batches):
    from passes.rptq import RPTQReorder

    gm = tiny_graph("llama")
    report = PassManager([Canonicalize(), RPTQReorder()]).run(
        gm, _ctx(probe_ids, calibration=calib_batches))
    d64, tol, _, d32 = _check_note(report.records[1])
    assert report.records[1].modified and d32 > 0  # float32 sums in another order...
    assert d64 < 1e-12 < tol  # ...but the same function
    out64 = evaluate_float64(gm, probe_ids)
    assert out64.dtype == torch.float64
    assert 0 < float((out64 - gm(probe_ids).double()).abs().max()) < 1e-5


def test_explicit_atol_is_an_absolute_tolerance_on_float32_logits(probe_ids):
    report = PassManager([Canonicalize(), ScaleOneChannel()], atol=1e-3).run(
        tiny_graph("llama"), _ctx(probe_ids))
    assert 0 < report.records[1].exact_check <= 1e-3
    assert "atol 1.00e-03 (absolute, as given)" in report.records[1].notes[-1]
    with pytest.raises(VerificationError, match=r"scale_one_channel.*> atol 1e-07, absolute"):
        PassManager([Canonicalize(), ScaleOneChannel()], atol=1e-7).run(
            tiny_graph("llama"), _ctx(probe_ids))


def test_exact_check_falls_back_to_an_absolute_tolerance_without_float64(probe_ids, monkeypatch):
    import compiler.pass_manager as pm

    def no_float64(gm, inputs):
        raise RuntimeError("no float64 kernel for this op")

    monkeypatch.setattr(pm, "evaluate_float64", no_float64)
    report = PassManager([Canonicalize(), ScaleFirstLinear(factor=1.0)]).run(
        tiny_graph("llama"), _ctx(probe_ids))
    assert (f"atol {FALLBACK_ATOL:.2e} (absolute fallback: no float64 evaluation, RuntimeError: "
            "no float64 kernel for this op)") in report.records[1].notes[-1]
    with pytest.raises(VerificationError, match="scale_first_linear.*absolute fallback"):
        PassManager([Canonicalize(), ScaleFirstLinear(factor=1.5)]).run(
            tiny_graph("llama"), _ctx(probe_ids))


def test_float64_evaluation_runs_a_quantized_graph(probe_ids, calib_batches):
    from passes.insert_qdq import InsertQDQ

    gm = tiny_graph("llama")
    PassManager([Canonicalize(), InsertQDQ(scheme="w8a8_dynamic")]).run(
        gm, _ctx(probe_ids, calibration=calib_batches))
    assert ir.is_quantized(gm)
    out64 = evaluate_float64(gm, probe_ids)
    assert out64.dtype == torch.float64
    # same int8 codes in both precisions: measured 1.8e-7 (float32 rounding of |logits| ~0.7);
    # an activation landing on another int8 code would be a whole step (~1e-3)
    torch.testing.assert_close(out64.float(), gm(probe_ids), atol=1e-6, rtol=0)


@needs_stories
def test_one_channel_scaled_by_1_01_is_rejected_on_stories260K():
    probe = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    with pytest.raises(VerificationError, match="scale_one_channel.*declared exact.*in float64"):
        PassManager([Canonicalize(), ScaleOneChannel()]).run(stories_graph(), _ctx(probe))


SMOL = DATA / "smollm2-135m-instruct-q4_1" if DATA else None
needs_smol = pytest.mark.skipif(
    SMOL is None or not (SMOL / "gguf").is_dir(),
    reason="SmolLM2 GGUF folder not found in the shared data dir "
           "(../shared/data/smollm2-135m-instruct-q4_1)",
)


@pytest.fixture(scope="module")
def smol():
    from compiler.frontend import load_model

    return load_model(SMOL)


@needs_smol
@pytest.mark.slow
def test_smollm2_every_exact_pass_verifies_by_default_and_a_one_channel_error_is_rejected(smol):
    """30 layers, logits up to ~30: float32 rounding alone moves the logits past the former
    absolute 1e-4, yet a 1% error on one channel is still caught."""
    import copy

    import compiler

    g = torch.Generator().manual_seed(5)
    calibration = [torch.randint(0, 49152, (2, 32), generator=g) for _ in range(2)]
    exact = ["smoothquant(alpha=0.5)", "rptq_reorder", "rotation_invariant", "slicegpt_rotate",
             "fuse_linears", "simplify_mask"]
    cm = compiler.compile(smol, exact, calibration=calibration)
    records = cm.report.records
    assert [r.name for r in records] == ["canonicalize", *(e.split("(")[0] for e in exact)]
    for r in records:
        assert r.exact and r.modified, r.name
        d64, tol, _, d32 = _check_note(r)
        assert d64 <= tol and d32 == pytest.approx(r.exact_check, rel=0.01)
    assert max(r.exact_check for r in records) > 1e-4  # the former default would have failed

    probe = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(99))
    ctx = _ctx(probe)
    ctx.properties.add("canonical")
    with pytest.raises(VerificationError, match="scale_one_channel.*declared exact.*in float64"):
        PassManager([ScaleOneChannel()], verify=False).run(copy.deepcopy(cm.graph_module), ctx)


def test_a_pass_sees_the_passes_after_it_and_none_once_the_run_is_over(probe_ids):
    # ctx.upcoming lets a pass measure in its own sweep what the later passes will ask for
    seen = []

    class Look(Pass):
        name = "look"
        requires = frozenset({"canonical"})

        def run(self, gm, ctx):
            seen.append(tuple(p.name for p in ctx.upcoming))
            return PassResult.unchanged(gm)

    gm = tiny_graph("llama")
    ctx = _ctx(probe_ids)
    passes = [Canonicalize(), Look(), ScaleFirstLinear(factor=1.0), Look()]
    PassManager(passes, skip={3}).run(gm, ctx)
    assert seen == [("look",), ()]  # the skipped pass 3 is not coming
    assert ctx.upcoming is None
