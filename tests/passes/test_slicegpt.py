"""SliceGPTRotate / SliceGPT: rotation exact, slicing equals the rotated model with the dropped
directions zeroed, parameter counts, ONNX/ORT parity, composition, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.errors import PreconditionError
from compiler.pass_base import PassContext
from compiler.pass_manager import verify_graph
from passes.canonicalize import canonicalize
from passes.rotation_invariant import make_rotation_invariant, residual_stream
from passes.slicegpt import BASES, SliceGPT, SliceGPTRotate, pca_basis, sliced_width
from tests.conftest import CORE_FAMILIES, needs_stories, stories_graph, tiny_graph

ATOL = 1e-4  # fp32 logits, exact pass


def _ctx(calib, probe):
    return PassContext(calibration=calib, probe_inputs=probe)


def _shortcuts(gm):
    return [n for n in ir.nodes_of(gm, ir.LINEAR)
            if n.meta.get("fxcompress_created_by") == "slicegpt"]


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_rotation_is_exact_with_one_shortcut_per_residual_add(family, probe_ids, calib_batches):
    gm = canonicalize(tiny_graph(family))
    ref = gm(probe_ids)
    res = SliceGPTRotate(basis="per_norm").run(gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)
    rs = residual_stream(gm)
    # bases: one per norm; the embedding shares the first norm's basis, so each block's two
    # residual adds need a shortcut on the skip path.
    assert res.stats["bases"] == len(rs.norms)
    n_blocks = len(rs.norms) - 1
    assert len(_shortcuts(gm)) == res.stats["shortcuts"] == n_blocks
    assert res.stats["hidden_after"] == res.stats["hidden_before"] == 64


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_global_basis_is_the_default_and_exact_without_shortcuts(family, probe_ids,
                                                                 calib_batches):
    gm = canonicalize(tiny_graph(family))
    ref = gm(probe_ids)
    res = SliceGPTRotate().run(gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)
    assert res.stats["shortcuts"] == 0 and not _shortcuts(gm)


@needs_stories
@pytest.mark.parametrize("basis", BASES)
def test_rotation_is_exact_on_stories260k(basis, probe_ids, calib_batches):
    gm = canonicalize(stories_graph())
    ref = gm(probe_ids)
    SliceGPTRotate(basis=basis).run(gm, _ctx(calib_batches, probe_ids))
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)


def test_second_rotation_reports_unmodified(probe_ids, calib_batches):
    gm = canonicalize(tiny_graph("llama"))
    SliceGPTRotate().run(gm, _ctx(calib_batches, probe_ids))
    assert not SliceGPTRotate().run(gm, _ctx(calib_batches, probe_ids)).modified


def test_pca_basis_is_orthogonal_and_sorted_descending():
    x = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([5.0, 1, 3, 0.1, 2, 4])
    vals, q = pca_basis(x.T @ x / 200)
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=torch.float64))


def test_sliced_width_rounds_down_to_the_multiple():
    assert sliced_width(768, 0.25, 8) == 576
    assert sliced_width(64, 0.3, 8) == 40
    assert sliced_width(64, 0.0, 8) == 64
    assert sliced_width(64, 0.99, 8) == 8


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_slicing_equals_rotation_with_dropped_directions_zeroed(family, basis, probe_ids,
                                                                calib_batches):
    base = canonicalize(tiny_graph(family))
    k = 40
    sliced = copy.deepcopy(base)
    SliceGPT(sparsity=0.375, basis=basis).run(sliced, _ctx(calib_batches, probe_ids))
    # Reference: the exact rotation (same calibration, same bases) with every coordinate >= k of
    # the residual stream forced to zero; the norm still divides by d there, as in the paper.
    ref = copy.deepcopy(base)
    SliceGPTRotate(basis=basis).run(ref, _ctx(calib_batches, probe_ids))
    rs = residual_stream(ref)
    for src in rs.sources:
        t = ir.get_param(ref, src.args[0]).clone()
        t[:, k:] = 0
        ir.set_param(ref, src.args[0], t)
    for w in rs.writers:
        _, wn, bn = ir.linear_parts(w)
        t = ir.get_param(ref, wn).clone()
        t[k:] = 0
        ir.set_param(ref, wn, t)
        if ir.param_node(bn) is not None:
            b = ir.get_param(ref, bn).clone()
            b[k:] = 0
            ir.set_param(ref, bn, b)
    torch.testing.assert_close(sliced(probe_ids), ref(probe_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_slicing_shrinks_every_residual_parameter(family, basis, probe_ids, calib_batches):
    gm = canonicalize(tiny_graph(family))
    make_rotation_invariant(gm, probe_ids)
    rs = residual_stream(gm)
    d, k = 64, 48
    removed = 0
    for src in rs.sources:
        removed += ir.get_param(gm, src.args[0]).shape[0] * (d - k)
    for w in rs.writers:
        _, wn, bn = ir.linear_parts(w)
        removed += ir.get_param(gm, wn).shape[1] * (d - k) + (d - k) * (bn is not None)
    for r in rs.readers:
        removed += ir.get_param(gm, r.args[1]).shape[0] * (d - k)
    n_shortcuts = len(rs.norms) - 1 if basis == "per_norm" else 0
    before = ir.count_params(gm)
    res = SliceGPT(sparsity=0.25, basis=basis).run(gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    assert res.stats["hidden_after"] == k
    expected = before - removed + n_shortcuts * k * k
    assert ir.count_params(gm) == res.stats["params_after"] == expected
    for n in ir.nodes_of(gm, ir.RMS_NORM):
        assert list(n.args[1]) == [k] and n.meta["val"].shape[-1] == k
    vocab = ir.get_param(gm, rs.readers[-1].args[1]).shape[0]
    assert gm(probe_ids).shape == (*probe_ids.shape, vocab)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sparsity_zero_equals_rotation(family, probe_ids, calib_batches):
    base = canonicalize(tiny_graph(family))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    SliceGPTRotate().run(a, _ctx(calib_batches, probe_ids))
    SliceGPT(sparsity=0.0).run(b, _ctx(calib_batches, probe_ids))
    torch.testing.assert_close(b(probe_ids), a(probe_ids), atol=0, rtol=0)


def test_slicing_after_rotation_composes_exactly_at_zero_sparsity(probe_ids, calib_batches):
    gm = canonicalize(tiny_graph("llama"))
    ref = gm(probe_ids)
    SliceGPTRotate().run(gm, _ctx(calib_batches, probe_ids))
    SliceGPT(sparsity=0.0).run(gm, _ctx(calib_batches, probe_ids))
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_sliced_graph_exports_to_onnx_and_matches_in_ort(tmp_path, probe_ids, calib_batches):
    from backends.onnxruntime import ORTModel, export_onnx

    gm = canonicalize(tiny_graph("llama"))
    SliceGPT(sparsity=0.25).run(gm, _ctx(calib_batches, probe_ids))
    path = export_onnx(gm, tmp_path / "sliced.onnx")
    ort_model = ORTModel(path, threads=1)
    torch.testing.assert_close(ort_model(probe_ids), gm(probe_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.2", True])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        SliceGPT(sparsity=bad)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_invalid_round_to_is_rejected(bad):
    with pytest.raises(ValueError, match="round_to"):
        SliceGPT(round_to=bad)


def test_round_to_larger_than_hidden_is_a_precondition_error(probe_ids, calib_batches):
    gm = canonicalize(tiny_graph("llama"))
    with pytest.raises(PreconditionError, match="round_to=128"):
        SliceGPT(round_to=128).run(gm, _ctx(calib_batches, probe_ids))


@pytest.mark.parametrize("cls", [SliceGPT, SliceGPTRotate])
def test_missing_calibration_is_a_precondition_error(cls, probe_ids):
    gm = canonicalize(tiny_graph("llama"))
    with pytest.raises(PreconditionError, match="calibration"):
        cls().run(gm, PassContext(probe_inputs=probe_ids))
    with pytest.raises(PreconditionError, match="calibration"):
        cls().run(gm, None)


def test_unknown_basis_is_rejected():
    with pytest.raises(ValueError, match="basis"):
        SliceGPTRotate(basis="per_block")
