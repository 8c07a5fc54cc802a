"""propagate_shapes skips a graph it already propagated, and only such a graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import compiler
from compiler import ir
from compiler.errors import VerificationError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.pass_manager import SHAPE_PROPAGATION, PassManager, propagate_shapes, verify_graph
from passes.canonicalize import Canonicalize
from tests.conftest import tiny_graph

LINEAR = torch.ops.aten.linear.default


@pytest.fixture
def runs(monkeypatch):
    """Counts the fake-tensor propagations that really run."""
    calls = []
    original = FakeTensorProp.propagate_dont_convert_inputs

    def counted(self, *args):
        calls.append(self.module)
        return original(self, *args)

    monkeypatch.setattr(FakeTensorProp, "propagate_dont_convert_inputs", counted)
    return calls


@pytest.fixture
def probe():
    return torch.randint(0, 50, (2, 16))


def _output_val(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.meta["val"][0]


def _lm_head_weight(gm):
    return ir.nodes_of(gm, LINEAR)[-1].args[1]  # W: [vocab, hidden]


def test_a_second_verify_of_an_unchanged_graph_skips_propagation(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    assert len(runs) == 1
    before = dict(SHAPE_PROPAGATION)
    verify_graph(gm, probe, where="again")
    propagate_shapes(gm, probe)
    assert len(runs) == 1
    assert SHAPE_PROPAGATION["calls"] - before.get("calls", 0) == 2
    assert SHAPE_PROPAGATION["skipped"] - before.get("skipped", 0) == 2


def test_rewriting_weight_values_only_keeps_the_shapes(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    for lin in ir.nodes_of(gm, LINEAR):
        w = lin.args[1]
        ir.set_param(gm, w, ir.get_param(gm, w) * 1.5)
    verify_graph(gm, probe)
    assert len(runs) == 1


def _propagated_then_cut(probe):
    """A propagated tiny Llama whose logits then go through a new ``slice`` to 5 columns."""
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    logits = ir.nodes_of(gm, LINEAR)[-1]
    with gm.graph.inserting_after(logits):
        cut = gm.graph.call_function(torch.ops.aten.slice.Tensor, (logits, -1, 0, 5))
    logits.replace_all_uses_with(cut, delete_user_cb=lambda u: u is not cut)
    return gm, logits, cut


def test_an_inserted_node_is_propagated(runs, probe):
    gm, logits, cut = _propagated_then_cut(probe)
    verify_graph(gm, probe)
    assert len(runs) == 2
    assert cut.meta["val"].shape[-1] == 5
    assert _output_val(gm).shape[-1] == 5
    cut.args = (logits, -1, 0, 3)  # same nodes, same vals: only an argument tells
    verify_graph(gm, probe)
    assert len(runs) == 3
    assert _output_val(gm).shape[-1] == 3


def test_a_parameter_of_a_new_shape_is_propagated(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    vocab = _output_val(gm).shape[-1]
    w = _lm_head_weight(gm)
    ir.set_param(gm, w, ir.get_param(gm, w)[: vocab - 3])
    verify_graph(gm, probe)
    assert len(runs) == 2
    assert w.meta["val"].shape[0] == vocab - 3
    assert _output_val(gm).shape[-1] == vocab - 3


def test_a_parameter_of_a_new_dtype_is_propagated(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    w = _lm_head_weight(gm)
    ir.set_param(gm, w, ir.get_param(gm, w).double())
    verify_graph(gm, probe)
    assert len(runs) == 2
    assert w.meta["val"].dtype == torch.float64


def test_a_probe_of_another_dtype_or_rank_is_propagated(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    verify_graph(gm, probe.to(torch.int32))
    assert len(runs) == 2
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert ids.meta["val"].dtype == torch.int32
    with pytest.raises(VerificationError, match="shape propagation failed"):
        verify_graph(gm, probe[0])  # rank 1: the model needs [batch, seq]
    assert len(runs) == 3


def test_an_error_in_a_changed_graph_is_raised_every_time(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    w = ir.nodes_of(gm, LINEAR)[0].args[1]
    good = ir.get_param(gm, w)
    ir.set_param(gm, w, good[:, :-1])  # W: [out, in - 1] no longer fits the activations
    for _ in range(2):  # a failed propagation leaves nothing to skip on
        with pytest.raises(VerificationError, match=r"shape propagation failed \(after pass 3"):
            verify_graph(gm, probe, where="after pass 3 'x'")
    assert len(runs) == 3
    ir.set_param(gm, w, good)
    verify_graph(gm, probe)
    verify_graph(gm, probe)
    assert len(runs) == 4


def test_a_node_without_its_val_is_propagated_again(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    lin = ir.nodes_of(gm, LINEAR)[2]
    del lin.meta["val"]
    verify_graph(gm, probe)
    assert len(runs) == 2
    assert lin.meta["val"].shape[-1] == ir.get_param(gm, lin.args[1]).shape[0]


def test_a_deep_copy_shares_the_propagation_until_one_of_them_changes(runs, probe):
    gm = tiny_graph("llama")
    verify_graph(gm, probe)
    twin = copy.deepcopy(gm)
    verify_graph(twin, probe)
    assert len(runs) == 1  # fx copies node metas: the twin holds the propagated vals
    w = _lm_head_weight(twin)
    ir.set_param(twin, w, ir.get_param(twin, w)[:7])
    verify_graph(twin, probe)
    verify_graph(gm, probe)
    assert [m is twin for m in runs] == [False, True]
    assert _output_val(twin).shape[-1] == 7
    assert _output_val(gm).shape[-1] != 7


class _ScaleWeights(Pass):
    """Test pass: rewrites every linear weight's values (same shapes), exact for factor 1."""

    name = "scale_weights"
    exact = True
    requires = frozenset({"canonical"})

    def run(self, gm, ctx):
        for lin in ir.nodes_of(gm, LINEAR):
            ir.set_param(gm, lin.args[1], ir.get_param(gm, lin.args[1]).clone())
        return PassResult(gm, True, frozenset(), {})


def test_the_pass_manager_skips_propagation_after_a_weight_only_pass(runs, probe):
    gm = tiny_graph("llama")
    PassManager([Canonicalize(), _ScaleWeights()]).run(gm, PassContext(probe_inputs=probe))
    assert len(runs) == 1  # after canonicalize; the weights-only pass changed no shape


def test_compile_reports_its_shape_propagations(runs):
    cm = compiler.compile("tiny-llama", passes=[_ScaleWeights()], report_data=False)
    counts = cm.report.extra["shape_propagation"]
    assert (counts["calls"], counts["skipped"]) == (2, 1)
    assert len(runs) == 1


def _val_keys(gm):
    from compiler.pass_manager import value_key

    return [(n.name, value_key(n.meta.get("val"))) for n in gm.graph.nodes]


@pytest.mark.parametrize("model,passes", [
    ("tiny-llama", ["slicegpt(sparsity=0.25)", "smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"]),
    ("tiny-opt", ["structured_prune(ratio=0.25)", "smoothquant(alpha=0.5)",
                  "insert_qdq(scheme='w8a8')"]),
    ("tiny-qwen2", ["structured_prune(ratio=0.25)", "rptq_reorder(clusters=2)", "fuse_linears()",
                    "insert_qdq(scheme='w8a8')"]),
])
def test_incremental_propagation_equals_a_full_one(model, passes):
    """After passes that resize the stream, prune channels, insert nodes and fuse linears, the
    values kept from earlier propagations plus the recomputed ones are what one full propagation
    of the final graph gives."""
    from compiler.pass_manager import _STAMP_META

    calib = [torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    cm = compiler.compile(model, passes=passes, calibration=calib, report_data=False)
    counts = cm.report.extra["shape_propagation"]
    assert counts["reused"] > counts["recomputed"] / 2  # incremental, not full, after pass 1
    fresh = copy.deepcopy(cm.graph_module)
    fresh.meta.pop(_STAMP_META)
    propagate_shapes(fresh, torch.zeros(2, 16, dtype=torch.long))
    assert _val_keys(fresh) == _val_keys(cm.graph_module)


def test_only_the_changed_part_is_recomputed(probe):
    gm, _, _ = _propagated_then_cut(probe)
    before = dict(SHAPE_PROPAGATION)
    verify_graph(gm, probe)
    assert SHAPE_PROPAGATION["recomputed"] - before.get("recomputed", 0) == 1  # the slice
    assert SHAPE_PROPAGATION["reused"] - before.get("reused", 0) > 50
    # a narrower first linear: its output and what reads it change, nothing before it
    first = ir.nodes_of(gm, LINEAR)[0]
    w = ir.get_param(gm, first.args[1])
    ir.set_param(gm, first.args[1], w[: w.shape[0] // 2])
    before = dict(SHAPE_PROPAGATION)
    with pytest.raises(VerificationError):  # q no longer splits into its heads
        verify_graph(gm, probe)
    assert SHAPE_PROPAGATION["reused"] - before.get("reused", 0) > 0
