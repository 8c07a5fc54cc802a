"""Statistics that survive exact passes: SmoothQuant's rescale and RPTQ's permutation hand the
next pass transformed activation statistics, equal to freshly measured ones, and the next pass
runs no calibration sweep of its own (the report counts sweeps per pass)."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler.blockwise import SWEEPS
from compiler.pass_base import PassContext
from compiler.pass_manager import Instrument, PassManager
from compiler.report import Report
from compiler.stats import ActivationStats, collect_stats, linear_input_sites
from passes import make_pass
from passes.canonicalize import canonicalize
from passes.smoothquant import SmoothQuant
from tests.conftest import tiny_graph

RTOL = 1e-5  # the bound; measured differences are float64 rounding (~1e-15)


def _calib():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(3)]


def _assert_equal_stats(derived, fresh, *, hist: bool, sites=None):
    assert set(derived.sites()) <= set(fresh.sites())
    assert derived.sites(), "nothing derived"
    for s in sites or derived.sites():
        a, b = derived[s], fresh[s]
        for f in ("absmax", "min", "max"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=RTOL, atol=1e-12,
                                       msg=lambda m, s=s, f=f: f"{s} {f}: {m}")
        assert a.count == b.count
        if a.xtx is not None:  # relative to the matrix's scale: small off-diagonal sums cancel
            torch.testing.assert_close(a.xtx, b.xtx, rtol=0,
                                       atol=RTOL * float(b.xtx.abs().max()))
        if hist and b.hist is not None:
            assert a.hist is not None
            torch.testing.assert_close(a.hist, b.hist, rtol=0, atol=0)


def _static_scales(g) -> list[float]:
    """The per-tensor activation scales of a Q/DQ graph, in graph order."""
    return [n.args[1] for n in g.graph.nodes
            if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default]


def _run(gm, specs, calib):
    ctx = PassContext(calibration=calib, probe_inputs=calib[0])
    ctx.properties.add("canonical")
    report = Report(model="t")
    PassManager([make_pass(s) for s in specs]).run(gm, ctx, report)
    return ctx, report


def test_rescaled_table_equals_fresh_statistics():
    # scale one norm output channel-wise by editing its gain: the derived table must equal a
    # new calibration run of the edited graph, X^T X included
    gm = canonicalize(tiny_graph("llama"))
    calib = _calib()
    site = "model.layers.0.self_attn.q_proj:in"
    before = collect_stats(gm, calib, covariance=[site], histogram=[site])
    t = before.tensor_of(site)
    gain = dict(gm.named_parameters())["model.model.layers.0.input_layernorm.weight"]
    old = gain.detach().double().clone()
    with torch.no_grad():
        gain.mul_(torch.linspace(0.5, 2.0, gain.numel()))
    f = gain.detach().double() / old  # the factor the float32 gain really applies
    derived = before.rescaled({t: f})
    # the other tensors are downstream of the edited gain: only the edited one is derived
    _assert_equal_stats(derived, collect_stats(gm, calib, covariance=[site]), hist=False,
                        sites=before.sharing(site))
    assert derived[site].hist is None  # a whole-tensor histogram is lost under a rescale


def test_permuted_table_round_trips_and_keeps_the_histogram():
    gm = canonicalize(tiny_graph("llama"))
    site = "model.layers.0.self_attn.q_proj:in"
    table = collect_stats(gm, _calib(), covariance=[site], histogram=[site])
    t = table.tensor_of(site)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    p = table.permuted({t: perm})
    assert torch.equal(p[site].absmax, table[site].absmax[perm])
    assert torch.equal(p[site].xtx, table[site].xtx[perm][:, perm])
    assert torch.equal(p[site].hist, table[site].hist)
    back = p.permuted({t: torch.argsort(perm)})
    _assert_equal_stats(back, table, hist=True)
    with pytest.raises(ValueError, match="permutation"):
        table.permuted({t: torch.zeros(64, dtype=torch.long)})


@pytest.mark.parametrize("bad", [torch.zeros(64), -torch.ones(64), torch.ones(3)])
def test_rescale_rejects_non_positive_or_misshaped_factors(bad):
    gm = canonicalize(tiny_graph("llama"))
    table = collect_stats(gm, _calib())
    t = table.tensor_of("model.layers.0.self_attn.q_proj:in")
    with pytest.raises(ValueError, match="positive"):
        table.rescaled({t: bad.double()})


#: handed-over vs freshly measured activation scales: x / s in float32 against x computed
#: through the folded weights (measured at most 8.3e-7 relative on these models)
SCALE_RTOL = 2e-6
#: histogram L1 distance over the element count (measured at most 0.12%: 0.06% of the
#: elements moved to a neighbouring bin)
HIST_MOVED = 2e-3


def _assert_close_histograms(derived, fresh):
    # the smoothed values are the measured ones times 1/s in float32; a fresh sweep computes
    # them through the folded weights, so a value within rounding of a bin edge may land in the
    # neighbouring bin (each moved element counts twice in the L1 distance)
    for s in derived.sites():
        a, b = derived[s], fresh[s]
        assert a.hist is not None and a.hist.sum() == b.hist.sum()
        assert float((a.hist - b.hist).abs().sum()) <= HIST_MOVED * float(b.hist.sum()), s
        torch.testing.assert_close(a.sqsum, b.sqsum, rtol=RTOL, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_smoothquant_hands_insert_qdq_the_smoothed_statistics_and_no_sweep_is_repeated(family):
    calib = _calib()
    gm = canonicalize(tiny_graph(family))
    # run on its own (no pass manager: a later pass may want histograms): one block-by-block
    # sweep, extrema and histograms of the smoothed inputs handed on, no statistics sweep
    ctx = PassContext(calibration=calib)
    sweeps0 = sum(SWEEPS.values())
    result = make_pass("smoothquant(alpha=0.5)").run(gm, ctx)
    assert sum(SWEEPS.values()) == sweeps0 + 1 and ctx.analyses.computed["activation_stats"] == 0
    (analysis, key, table), = result.analyses
    assert analysis is ActivationStats and key["histogram"] == key["sites"]
    sites = frozenset(linear_input_sites(gm)) - {"lm_head:in"}
    derived = ActivationStats.reuse(table, gm, sites=sites, histogram=sites)
    fresh = collect_stats(gm, calib, histogram=sorted(sites))
    _assert_equal_stats(derived, fresh, hist=False)
    _assert_close_histograms(derived, fresh)
    # the whole pipeline: one sweep for the two passes; the ranges as with fresh statistics
    for act_range, rel in (("max", RTOL), ("mse", SCALE_RTOL)):
        gm2 = canonicalize(tiny_graph(family))
        _, rep = _run(gm2, ["smoothquant(alpha=0.5)",
                            f"insert_qdq(scheme='w8a8', act_range='{act_range}')"], calib)
        assert [r.sweeps for r in rep.records] == [1, 0]
        # only the mse ranges need histograms: for abs-max the extrema of the whole-graph sweep
        # follow the scales exactly (SmoothQuant measures no histograms nobody reads)
        route = "block-by-block" if act_range == "mse" else "no later pass needs"
        assert any(route in n for n in rep.records[0].notes), rep.records[0].notes
        gm3 = canonicalize(tiny_graph(family))
        _run(gm3, ["smoothquant(alpha=0.5)"], calib)
        _run(gm3, [f"insert_qdq(scheme='w8a8', act_range='{act_range}')"], calib)  # measures
        assert _static_scales(gm2) == pytest.approx(_static_scales(gm3), rel=rel) \
            and _static_scales(gm2)
    assert "sweeps" in rep.table().splitlines()[0]


def test_smoothquant_block_sweep_decides_as_the_whole_graph_sweep(tmp_path):
    # the same scales (bit for bit: the engine computes the same float32 ops) and the same
    # alpha search, with or without the block engine (a stats cache folder forces the
    # whole-graph sweep, whose histograms a rescale cannot carry: insert_qdq measures again)
    calib = _calib()
    for spec in ("smoothquant(alpha=0.5)", "smoothquant"):
        a, b = canonicalize(tiny_graph("llama")), canonicalize(tiny_graph("llama"))
        _, rep_a = _run(a, [spec, "insert_qdq(scheme='w8a8')"], calib)
        ctx = PassContext(calibration=calib, probe_inputs=calib[0])
        ctx.properties.add("canonical")
        ctx.extra["stats_cache_dir"] = str(tmp_path / spec)
        rep_b = Report(model="t")
        PassManager([make_pass(spec), make_pass("insert_qdq(scheme='w8a8')")]).run(b, ctx, rep_b)
        assert [r.sweeps for r in rep_a.records] == [1, 0]
        assert [r.sweeps for r in rep_b.records] == [1, 1]
        assert any("block-by-block" in n for n in rep_a.records[0].notes)
        assert any("whole-graph" in n for n in rep_b.records[0].notes)
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
        assert rep_a.records[0].stats == rep_b.records[0].stats
        assert _static_scales(a) == pytest.approx(_static_scales(b), rel=SCALE_RTOL)


def test_after_slicegpt_the_created_gains_keep_the_handed_over_statistics_valid():
    # SliceGPT folds the norm gains away; SmoothQuant gives each norm a gain of ones to fold into
    # (a new argument of the same norm node): its statistics still carry over
    calib = _calib()
    gm = canonicalize(tiny_graph("llama"))
    _, rep = _run(gm, ["slicegpt_rotate", "smoothquant(alpha=0.5)",
                       "insert_qdq(scheme='w8a8', act_range='max')"], calib)
    assert rep.records[1].stats["folded_into_norms"] > 0
    assert [r.sweeps for r in rep.records] == [1, 1, 0]
    ref = canonicalize(tiny_graph("llama"))
    _run(ref, ["slicegpt_rotate", "smoothquant(alpha=0.5)"], calib)
    _run(ref, ["insert_qdq(scheme='w8a8', act_range='max')"], calib)

    assert _static_scales(gm) == pytest.approx(_static_scales(ref), rel=RTOL) \
        and _static_scales(gm)


def test_rptq_hands_the_cluster_pass_permuted_statistics():
    calib = _calib()
    gm = canonicalize(tiny_graph("llama"))
    ref = copy.deepcopy(gm)
    _, rep = _run(gm, ["rptq_reorder(clusters=4)", "insert_qdq_clusters"], calib)
    assert rep.records[0].stats["groups_reordered"] > 0
    assert [r.sweeps for r in rep.records] == [1, 0]
    # against the statistics measured on the reordered graph
    ctx, _ = _run(ref, ["rptq_reorder(clusters=4)"], calib)
    sites = frozenset(s for s in linear_input_sites(ref) if s != "lm_head:in")
    derived = ctx.analyses.get(ActivationStats, ref, ctx, sites=sites)
    assert ctx.analyses.computed["activation_stats"] == 1
    _assert_equal_stats(derived, collect_stats(ref, calib, sites=sorted(derived.sites())),
                        hist=False)


def test_block_engine_passes_count_one_sweep_each():
    calib = _calib()
    gm = canonicalize(tiny_graph("llama"))
    _, rep = _run(gm, ["slicegpt(sparsity=0.25)", "gptq(bits=4, group_size=-1)"], calib)
    assert [r.sweeps for r in rep.records] == [1, 1]
    assert rep.table().splitlines()[2].split()[4] == "1"  # the sweeps column


#: folded weights, the hand-over's route against SmoothQuant's own sweep, as a fraction of each
#: parameter's largest entry (measured at most 5.3e-7: the scales decided on weights formed in
#: float32 instead of the rewrite's float64)
PARAM_TOL = 1e-6


class _TableBeforeLast(Instrument):
    """Keeps a copy of the graph the last pass reads and the activation statistics handed to
    it (what the pass before it put in the analysis cache)."""

    def __init__(self, last: str) -> None:
        self.last, self.gm, self.table = last, None, None

    def before_pass(self, p, gm, ctx, record):
        if p.name == self.last:
            self.gm = copy.deepcopy(gm)
            entries = ctx.analyses._cache.get(gm.graph, {})
            self.table = next(v for (name, _), (_, v) in entries.items()
                              if name == "activation_stats")


def _run_with(gm, specs, calib, *instruments):
    ctx = PassContext(calibration=calib, probe_inputs=calib[0])
    ctx.properties.add("canonical")
    report = Report(model="t")
    PassManager([make_pass(s) for s in specs], instruments=list(instruments)).run(gm, ctx, report)
    return report


@pytest.mark.parametrize("slicegpt", ["slicegpt(sparsity=0.25)",
                                      "slicegpt(sparsity=0.25, basis='per_norm')"])
@pytest.mark.parametrize("smoothquant", ["smoothquant(alpha=0.5)", "smoothquant"])
def test_slicegpt_measures_for_smoothquant_in_its_own_sweep(slicegpt, smoothquant, monkeypatch):
    # slicegpt -> smoothquant -> insert_qdq(mse), the compile-time benchmark's pipeline: SliceGPT
    # hands SmoothQuant the statistics of its output graph from its final block runs, SmoothQuant
    # decides there, and insert_qdq takes the smoothed histograms: one sweep for the three
    calib = _calib()
    specs = [slicegpt, smoothquant, "insert_qdq(scheme='w8a8')"]
    seen = _TableBeforeLast("insert_qdq")
    gm = canonicalize(tiny_graph("llama"))
    rep = _run_with(gm, specs, calib, seen)
    assert [r.sweeps for r in rep.records] == [1, 0, 0]
    assert rep.records[1].stats["folded_into_norms"] > 0
    assert any("taken in the previous pass's block sweep" in n for n in rep.records[1].notes)
    # the handed table against a fresh sweep of the smoothed graph
    sites = sorted(seen.table.sites())
    assert len(sites) >= 8
    fresh = collect_stats(seen.gm, calib, histogram=sites)
    _assert_equal_stats(seen.table, fresh, hist=False)
    _assert_close_histograms(seen.table, fresh)
    # the same decisions as SmoothQuant's own sweep of the sliced graph
    monkeypatch.setattr(SmoothQuant, "stats_request", lambda self, gm, ctx: None)
    ref = canonicalize(tiny_graph("llama"))
    rep_ref = _run_with(ref, specs, calib)
    assert [r.sweeps for r in rep_ref.records] == [1, 1, 0]
    assert rep.records[1].stats == rep_ref.records[1].stats
    pa, pb = dict(gm.named_parameters()), dict(ref.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:  # the folded scales from weights computed apart: float rounding only
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=PARAM_TOL * float(pb[k].abs().max()))
    assert _static_scales(gm) == pytest.approx(_static_scales(ref), rel=SCALE_RTOL) \
        and _static_scales(gm)


@pytest.mark.parametrize("specs", [
    # the attention halves keep the first estimate's input: their last run is not the graph's
    ["slicegpt(sparsity=0.25, rerun_attention=False)", "smoothquant(alpha=0.5)"],
    # only the pass right after it is measured for
    ["slicegpt(sparsity=0.25)", "canonicalize", "smoothquant(alpha=0.5)"]])
def test_smoothquant_measures_for_itself_where_slicegpt_cannot_hand_over(specs):
    calib = _calib()
    gm = canonicalize(tiny_graph("llama"))
    rep = _run_with(gm, [*specs, "insert_qdq(scheme='w8a8')"], calib)
    assert [r.sweeps for r in rep.records][-2:] == [1, 0]
    assert any("block-by-block" in n for n in rep.records[-2].notes), rep.records[-2].notes
