"""RPTQ: exact reordering (no gathers), clustering, per-cluster Q/DQ vs a fake-quant reference,
ORT lowering to one integer kernel per cluster, errors, and quality on stories260K."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from compiler import ir
from compiler.errors import PreconditionError
from compiler.pass_base import PassContext
from compiler.stats import ActivationStats
from compiler.testing import make_outlier_model
from passes.canonicalize import canonicalize
from passes.insert_qdq import InsertQDQ
from passes.rptq import (
    CLUSTERS_META,
    InsertQDQClusters,
    RPTQReorder,
    cluster_permutation,
    kmeans_clusters,
)
from tests.conftest import CORE_FAMILIES, STORIES, needs_stories, stories_graph, tiny_graph

ATOL = 1e-4


def _ctx(calib):
    return PassContext(calibration=calib)


def test_kmeans_separates_outlier_channels_and_orders_clusters_by_range():
    pts = torch.tensor([[-1.0, 1.0]] * 5 + [[-50.0, 50.0]] * 2 + [[-1.1, 0.9]] * 3)
    ids = kmeans_clusters(pts, 2)
    assert ids.tolist() == [0] * 5 + [1] * 2 + [0] * 3
    perm, offsets = cluster_permutation(ids)
    assert perm.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 5, 6] and offsets == [0, 8, 10]


def test_kmeans_result_does_not_depend_on_channel_order():
    pts = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)).cumsum(0)
    ids = kmeans_clusters(pts, 4)
    shuffle = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kmeans_clusters(pts[shuffle], 4), ids[shuffle])


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_rptq_reorder_preserves_logits_without_runtime_gathers(family, probe_ids, calib_batches):
    gm = make_outlier_model(canonicalize(tiny_graph(family)))
    ref = gm(probe_ids)
    counts = ir.op_counts(gm)
    res = RPTQReorder(clusters=4).run(gm, _ctx(calib_batches))
    assert res.modified and res.stats["groups_reordered"] == 3  # residual + two MLPs
    assert (gm(probe_ids) - ref).abs().max().item() <= ATOL
    assert ir.op_counts(gm) == counts  # permutation folded into parameters: no gather/index
    assert any("attn_heads" in n and "leaf axes" in n for n in res.notes)


def test_rptq_reorder_groups_outlier_channels_in_one_contiguous_cluster(calib_batches):
    gm = make_outlier_model(canonicalize(tiny_graph("llama")), channels=(3, 17, 42))
    RPTQReorder(clusters=4).run(gm, _ctx(calib_batches))
    site = "model.layers.0.self_attn.q_proj:in"
    offsets = gm.meta[CLUSTERS_META][site]
    assert offsets[0] == 0 and offsets[-1] == 64
    absmax = ActivationStats.compute(gm, _ctx(calib_batches), sites=frozenset({site}),
                                     covariance=frozenset())[site].absmax
    # the three x50 channels now sit together at the end (largest-range cluster last)
    top3 = set(torch.topk(absmax, 3).indices.tolist())
    assert top3 == {61, 62, 63} and offsets[-2] >= 61


def test_rptq_reorder_second_run_is_a_no_op(calib_batches):
    gm = make_outlier_model(canonicalize(tiny_graph("llama")))
    RPTQReorder().run(gm, _ctx(calib_batches))
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    res = RPTQReorder().run(gm, _ctx(calib_batches))
    assert not res.modified
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_rptq_reorder_rejects_bad_cluster_count(bad):
    with pytest.raises(ValueError, match="clusters"):
        RPTQReorder(clusters=bad)


def test_rptq_reorder_without_calibration_raises():
    with pytest.raises(PreconditionError, match="calibration"):
        RPTQReorder().run(canonicalize(tiny_graph("llama")), PassContext())


def test_rptq_reorder_on_quantized_graph_raises(calib_batches):
    gm = canonicalize(tiny_graph("llama"))
    InsertQDQ(scheme="w8a8_dynamic").run(gm, PassContext())
    with pytest.raises(PreconditionError, match="before quantizing"):
        RPTQReorder().run(gm, _ctx(calib_batches))


@needs_stories
def test_rptq_reorder_exact_on_stories260k(probe_ids, calib_batches):
    gm = make_outlier_model(canonicalize(stories_graph()))
    ref = gm(probe_ids)
    counts = ir.op_counts(gm)
    res = RPTQReorder(clusters=4).run(gm, _ctx(calib_batches))
    assert res.stats["groups_reordered"] == 6  # residual (tied embedding / LM head) + 5 MLPs
    assert (gm(probe_ids) - ref).abs().max().item() <= ATOL
    assert ir.op_counts(gm) == counts


# ----------------------------------------------------------------------------- lossy half


def _fq_cluster_linear(x, w, b, offsets, absmax):
    """Reference: per-row int8 weight, one static int8 activation scale per cluster."""
    sw = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    wq = torch.round(w / sw[:, None]).clamp(-127, 127) * sw[:, None]
    xq = torch.empty_like(x)
    for a, e in itertools.pairwise(offsets):
        s = max(float(absmax[a:e].max()), 1e-8) / 127
        xq[..., a:e] = torch.round(x[..., a:e] * (1.0 / s)).clamp(-128, 127) * s
    return torch.nn.functional.linear(xq, wq, b)


def test_insert_qdq_clusters_equals_fake_quant_reference(calib_batches):
    gm = make_outlier_model(canonicalize(tiny_graph("opt")))
    RPTQReorder(clusters=4).run(gm, _ctx(calib_batches))
    site = "model.decoder.layers.0.fc1:in"
    offsets = gm.meta[CLUSTERS_META][site]
    assert len(offsets) == 5
    absmax = ActivationStats.compute(gm, _ctx(calib_batches), sites=frozenset({site}),
                                     covariance=frozenset())[site].absmax
    fc1 = next(n for n in gm.graph.nodes if ir.is_op(n, ir.LINEAR) and ir.site(n) == site[:-3])
    w = ir.get_param(gm, fc1.args[1]).clone()
    b = ir.get_param(gm, fc1.args[2]).clone()

    res = InsertQDQClusters().run(gm, _ctx(calib_batches))
    assert res.stats["cluster_linears"] > res.stats["linears_quantized"]
    parts = [n for n in gm.graph.nodes if ir.is_op(n, ir.LINEAR) and ir.site(n) == site[:-3]]
    assert len(parts) == 4  # one int8 linear per cluster
    x_node = parts[0].args[0].args[0].args[0].args[0]  # linear <- DQ <- Q <- slice <- x
    out_node = next(iter(n for n in gm.graph.nodes if parts[-1] in n.all_input_nodes
                         and ir.op_name(n) == "add"))
    values = _record(gm, calib_batches[0], {x_node, out_node})
    expected = _fq_cluster_linear(values[x_node], w, b, offsets, absmax)
    assert (values[out_node] - expected).abs().max().item() <= 1e-5
    counts = ir.op_counts(gm)
    assert counts["index_select"] == counts["gather"] == counts["index"] == 0


def _record(gm, ids, nodes):
    """Values of ``nodes`` when ``gm`` runs on ``ids``."""
    seen = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes:
                seen[n] = out
            return out

    with torch.no_grad():
        Rec(gm).run(ids)
    return seen


@pytest.mark.slow
def test_cluster_qdq_lowers_to_one_integer_kernel_per_cluster_in_ort(tmp_path, probe_ids,
                                                                      calib_batches):
    from backends.onnxruntime import ORTModel
    from backends.ort_quant import export_quantized_onnx, integer_kernel_counts, lower_for_ort

    gm = make_outlier_model(canonicalize(tiny_graph("llama")))
    RPTQReorder(clusters=4).run(gm, _ctx(calib_batches))
    res = InsertQDQClusters().run(gm, _ctx(calib_batches))
    _, stats = lower_for_ort(gm)
    assert stats.int8_linears_static == res.stats["cluster_linears"] and stats.left_as_is == 0
    ort = ORTModel(export_quantized_onnx(gm, tmp_path / "rptq.onnx"))
    assert (ort(probe_ids) - gm(probe_ids)).abs().max().item() <= 1e-4
    ops = ort.optimized_op_types()
    assert ops["MatMulIntegerToFloat"] == res.stats["cluster_linears"]
    assert integer_kernel_counts(ops)["dequantize"] == 0


@pytest.mark.slow
@needs_stories
def test_rptq_recovers_most_of_the_w8a8_loss_on_the_outlier_variant():
    from compiler.data import calibration_batches, evaluation_windows
    from compiler.evaluate import perplexity

    windows = evaluation_windows("tinystories", STORIES, 64)
    calib = calibration_batches("tinystories", STORIES, n=128)
    gm0 = make_outlier_model(canonicalize(stories_graph()))
    fp32 = perplexity(gm0, windows, progress=False).ppl
    plain = copy.deepcopy(gm0)
    InsertQDQ(scheme="w8a8").run(plain, _ctx(calib))
    rptq = copy.deepcopy(gm0)
    RPTQReorder(clusters=4).run(rptq, _ctx(calib))
    InsertQDQClusters().run(rptq, _ctx(calib))
    p_plain = perplexity(plain, windows, progress=False).ppl
    p_rptq = perplexity(rptq, windows, progress=False).ppl
    assert p_plain > fp32 * 1.5
    assert (p_rptq - fp32) < 0.2 * (p_plain - fp32)
