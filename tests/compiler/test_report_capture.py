"""ReportCapture / PassPerplexity: what compile() records per pass for the HTML report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import compiler
from compiler import ir
from compiler.evaluate import perplexity
from compiler.pass_base import PassContext
from compiler.pass_manager import PassManager
from compiler.registry import make_pass
from compiler.report_capture import (
    PassPerplexity,
    ReportCapture,
    graph_change,
    linear_input_sites,
    snapshot,
)
from compiler.stats import collect_stats
from compiler.testing import make_outlier_model
from passes.canonicalize import canonicalize
from passes.insert_qdq import InsertQDQ
from tests.conftest import tiny_graph, tiny_model

CHANGED = ("added", "removed", "rewritten")


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(4)]


@pytest.fixture(scope="module")
def sq_w8a8(calib):
    return compiler.compile(tiny_model("llama"), ["smoothquant", "insert_qdq(scheme=w8a8)"],
                            calibration=calib)


def _run(passes: list, calib, gm=None, instruments=()):
    """The pass manager over the canonical tiny Llama with the capture (checks off: faster)."""
    gm = canonicalize(tiny_graph("llama")) if gm is None else gm
    ctx = PassContext(calibration=calib, probe_inputs=calib[1], properties={"canonical"})
    return PassManager([make_pass(p) for p in passes], verify=False, check_exact=False,
                       instruments=[ReportCapture(), *instruments]).run(gm, ctx)


def _marks(drawn: dict) -> dict[str, set]:
    out: dict[str, set] = {m: set() for m in (*CHANGED, "same", "external")}
    for n in drawn["nodes"]:
        out[n["mark"]].add((n["label"], n["sub"]))
    return out


@pytest.mark.xdist_group("report_capture_sq_w8a8")  # sq_w8a8 compiled once
def test_smoothquant_marks_the_scaled_linears_and_norms_of_every_block(sq_w8a8):
    g = sq_w8a8.report.records[1].details["graph"]
    assert g["changed"] and g["blocks"] == 2
    assert g["runs"] == [{"first": 0, "last": 1, "summary": "~7 linear, ~2 rms_norm"}]
    marks = _marks(g["drawn"][0])
    assert not marks["added"] and not marks["removed"]
    assert {("linear", "q_proj"), ("linear", "down_proj"), ("rms_norm", "input_layernorm"),
            ("rms_norm", "post_attention_layernorm")} <= marks["rewritten"]
    assert ("silu", "") in marks["same"]
    assert all(e[2] == "same" for e in g["drawn"][0]["edges"])
    why = {n["why"] for n in g["drawn"][0]["nodes"] if n["mark"] == "rewritten"}
    assert why == {"rewritten: parameter values"}


@pytest.mark.xdist_group("report_capture_sq_w8a8")  # sq_w8a8 compiled once
def test_qdq_marks_added_quantize_nodes_and_rewired_linears(sq_w8a8):
    g = sq_w8a8.report.records[2].details["graph"]
    assert [(r["first"], r["last"]) for r in g["runs"]] == [(0, 1)]
    marks = _marks(g["drawn"][0])
    added = {label for label, _ in marks["added"]}
    assert added == {"quantized_decomposed.quantize_per_tensor",
                     "quantized_decomposed.dequantize_per_tensor",
                     "quantized_decomposed.dequantize_per_channel"}
    assert not marks["removed"]
    assert {("linear", s) for s in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj")} <= marks["rewritten"]
    kinds = {e[2] for e in g["drawn"][0]["edges"]}
    assert {"added", "removed", "same"} <= kinds  # x -> linear became x -> Q -> DQ -> linear
    assert g["outside"] == "unchanged"  # embedding and LM head stay float


@pytest.mark.xdist_group("report_capture_sq_w8a8")  # sq_w8a8 compiled once
def test_exact_pass_records_one_calibration_sweep_and_canonicalize_none(sq_w8a8):
    # smoothquant's block-by-block sweep hands insert_qdq the histograms of the smoothed inputs
    sweeps = [r.details["sweeps"] for r in sq_w8a8.report.records]
    assert sweeps == [0, 1, 0]
    assert sweeps == [r.sweeps for r in sq_w8a8.report.records]


def test_activation_maxima_before_are_the_graphs_own_and_smoothquant_flattens_outliers(calib):
    gm = make_outlier_model(canonicalize(tiny_graph("llama")), factor=50.0)
    before_graph = copy.deepcopy(gm)
    sample = calib[0]
    report = _run(["smoothquant(alpha=0.5)"], calib, gm)
    act = report.records[0].details["activations"]
    # the curves of one block's sites are kept; its attention input is among them
    curve = next(c for c in act["curves"] if c["site"].endswith("self_attn.q_proj:in"))
    site = curve["site"]
    # the "before" curve is what the statistics collector measures on the same sample
    ref = collect_stats(before_graph, [sample], sites=[site])[site].absmax
    torch.testing.assert_close(torch.tensor(curve["before"], dtype=torch.float64),
                               ref, rtol=1e-3, atol=0)
    rows = {r["site"]: r for r in act["sites"]}
    for s in ("model.layers.0.self_attn.q_proj:in", "model.layers.1.mlp.gate_proj:in"):
        b, a = rows[s]["before"], rows[s]["after"]
        # the x50 channels dominate before; smoothing divides them back toward the rest
        assert b["max"] / b["median"] > 20
        assert a["max"] / a["median"] < b["max"] / b["median"] / 5
    assert rows["lm_head:in"]["moved"] is False  # the LM head input is not smoothed


def test_weight_error_matches_an_explicit_fake_quant_and_first_layer_errors_agree(calib):
    gm = canonicalize(tiny_graph("llama"))
    w = ir.get_param(gm, "model.model.layers.0.self_attn.q_proj.weight").detach().clone()
    report = _run([InsertQDQ(scheme="w8a8")], calib, gm)
    layers = {x["layer"]: x for x in report.records[0].details["quant_error"]["layers"]}
    assert len(layers) == 14  # every linear of the 2 blocks; LM head and embedding stay float
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    fake = (w / scale).round().clamp(-127, 127) * scale  # per output channel, symmetric int8
    expected = float((fake - w).norm() / w.norm())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q["weight"] == pytest.approx(expected, rel=1e-2)
    # nothing upstream of block 0's first linears is quantized: alone == end to end
    assert q["output"] == pytest.approx(q["end_to_end"], rel=1e-6)
    assert 0 < q["output"] < 0.05
    down1 = layers["model.layers.1.mlp.down_proj"]
    assert down1["end_to_end"] > down1["output"] > 0  # errors accumulate through the blocks


def test_per_cluster_linears_are_joined_back_into_one_layer(calib):
    d = _run(["rptq_reorder", "insert_qdq_clusters"], calib).records[1].details
    layers = d["quant_error"]["layers"]
    assert len(layers) == 14
    assert all(x["weight"] is not None and x["output"] is not None for x in layers)
    assert all(0 < x["weight"] < 0.05 for x in layers)
    added = {n["label"] for n in d["graph"]["drawn"][0]["nodes"] if n["mark"] == "added"}
    assert {"slice", "linear", "add"} <= added  # a linear per cluster, summed
    removed = {n["label"] for n in d["graph"]["drawn"][0]["nodes"] if n["mark"] == "removed"}
    assert removed == {"linear"}


def test_pruning_marks_parameter_shape_changes(calib):
    report = _run(["structured_prune(ratio=0.5, importance=l2)"], calib)
    nodes = report.records[0].details["graph"]["drawn"][0]["nodes"]
    shapes = [n["why"] for n in nodes if n["label"] == "linear" and n["sub"] == "down_proj"]
    assert len(shapes) == 1 and "parameter shape 64x128->64x64" in shapes[0]


def test_slicegpt_records_the_kept_variance_of_its_basis(calib):
    r = _run(["slicegpt(sparsity=0.25, round_to=1)"], calib).records[0]
    # one basis per block (two blocks) and the head's, which keeps its full width
    *blocks, head = r.details["variance"]
    assert len(blocks) == 2 and all(b["width"] == 48 and b["total"] == 64 for b in blocks)
    assert head["width"] == 64 and head["kept"] == pytest.approx(1.0)
    assert min(b["kept"] for b in blocks) == pytest.approx(r.stats["min_variance_kept"], abs=1e-4)
    for basis in r.details["variance"]:
        curve = basis["cumulative"]
        assert curve == sorted(curve) and curve[-1] == pytest.approx(1.0)
    assert r.details["activations"]["curves"]  # the rotation moved the linears' inputs


def test_unchanged_and_skipped_passes_record_no_graph_change(calib):
    gm = canonicalize(tiny_graph("llama"))
    ctx = PassContext(calibration=calib, probe_inputs=calib[1], properties={"canonical"})
    passes = [make_pass(p) for p in ("smoothquant", "smoothquant", "fuse_linears")]
    report = PassManager(passes, verify=False, check_exact=False, skip=["fuse_linears"],
                         instruments=[ReportCapture()]).run(gm, ctx)
    first, again, skipped = report.records
    assert first.details["graph"]["changed"]
    assert again.details["graph"] == {"changed": False} and "activations" not in again.details
    assert skipped.skipped and skipped.details is None


@pytest.mark.xdist_group("report_capture_sq_w8a8")  # sq_w8a8 compiled once
def test_details_are_json_and_survive_save_and_load(sq_w8a8, tmp_path):
    sq_w8a8.save(tmp_path / "art")
    loaded = compiler.load(tmp_path / "art")
    assert [r.details for r in loaded.report.records] == \
        json.loads(json.dumps([r.details for r in sq_w8a8.report.records]))
    assert sq_w8a8.report.extra["report_capture_seconds"] > 0


def test_report_data_false_captures_nothing(calib):
    cm = compiler.compile(tiny_model("llama"), [], report_data=False)
    assert [r.details for r in cm.report.records] == [None]
    assert "report_capture_seconds" not in cm.report.extra


def test_block_runs_split_where_blocks_change_differently():
    gm = canonicalize(tiny_graph("llama"))
    before = snapshot(gm)
    # block 1 only: scale one linear's weight, put a relu after its MLP activation
    w = next(n for n in gm.graph.nodes if ir.site(n) == "model.layers.1.mlp.up_proj"
             and ir.is_op(n, ir.LINEAR)).args[1]
    ir.set_param(gm, w, ir.get_param(gm, w) * 2)
    silu = next(n for n in gm.graph.nodes if ir.op_name(n) == "silu" and ir.block_index(n) == 1)
    with gm.graph.inserting_after(silu):
        relu = gm.graph.call_function(torch.ops.aten.relu.default, (silu,))
    silu.replace_all_uses_with(relu, delete_user_cb=lambda u: u is not relu)
    ir.copy_meta(silu, relu)
    change = graph_change(before, snapshot(gm))
    assert change["runs"] == [{"first": 0, "last": 0, "summary": "unchanged"},
                              {"first": 1, "last": 1, "summary": "+relu, ~linear"}]
    (drawn,) = change["drawn"]
    edges = {(e[0], e[1]): e[2] for e in drawn["edges"]}
    assert edges[(silu.name, relu.name)] == "added"
    mul = next(iter(relu.users))
    assert edges[(silu.name, mul.name)] == "removed" and edges[(relu.name, mul.name)] == "added"


def test_linear_input_sites_merge_linears_reading_one_tensor():
    sites = linear_input_sites(canonicalize(tiny_graph("llama")))
    qkv = sites["model.layers.0.self_attn.q_proj:in"]
    assert qkv["readers"] == ["q_proj", "k_proj", "v_proj"] and qkv["block"] == 0
    assert "model.layers.0.self_attn.k_proj:in" not in sites
    assert sites["lm_head:in"]["block"] is None


def test_perplexity_before_and_after_every_pass(calib):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    ppl = PassPerplexity(windows, "random ids")
    gm = canonicalize(tiny_graph("llama"))
    original = perplexity(tiny_model("llama"), windows).ppl
    report = _run(["smoothquant", "insert_qdq(scheme=w8a8)"], calib, gm, [ppl])
    sq, qdq = (r.perplexity for r in report.records)
    assert sq["before"] == pytest.approx(original, rel=1e-5)
    assert sq["after"] == pytest.approx(sq["before"], rel=1e-4)  # exact pass
    assert qdq["before"] == sq["after"] and qdq["data"] == "random ids"
    assert qdq["after"] == pytest.approx(perplexity(gm, windows).ppl, rel=1e-6)


def test_recorder_runs_only_what_its_nodes_read():
    """The sample run skips the nodes no wanted value depends on (the LM head's logits), and
    the wanted values are the full run's."""
    from compiler.report_capture import _Recorder

    gm = canonicalize(tiny_graph("llama"))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    linears = [n for n in gm.graph.nodes if ir.is_op(n, ir.LINEAR)]
    head, first = linears[-1], linears[0]
    wanted = {head.args[0].name, first.args[0].name}
    full = {}

    class Full(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in wanted:
                full[n.name] = v.detach().reshape(-1, v.shape[-1]).abs().amax(0)
            return v

    with torch.no_grad():
        Full(gm).run(ids)
        rec = _Recorder(gm, wanted, keep={first.name})
        out = rec.run(ids)
    assert out is None and head not in rec.needed  # the logits were not computed
    for name in wanted:
        assert torch.equal(rec.absmax[name], full[name])
    assert rec.values[first.name].shape[-1] == ir.get_param(gm, first.args[1]).shape[0]
