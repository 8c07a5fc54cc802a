"""SliceGPTRotate / SliceGPT: rotation exact, slicing equals the rotated model with the dropped
directions zeroed, sequential calibration against an explicit full-model reference, parameter
counts, ONNX/ORT parity, composition, the stories260K quality gate, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.errors import PassError, PreconditionError
from compiler.pass_base import PassContext
from compiler.pass_manager import verify_graph
from passes.canonicalize import canonicalize
from passes.rotation_invariant import make_rotation_invariant, residual_stream
from passes.slicegpt import (
    BASES,
    SliceGPT,
    SliceGPTRotate,
    basis_keys,
    pca_basis,
    sliced_width,
)
from tests.conftest import CORE_FAMILIES, STORIES, needs_stories, stories_graph, tiny_graph

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


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_sequential_global_rotation_is_exact_with_one_basis_and_shortcut_per_block(
        family, probe_ids, calib_batches):
    gm = canonicalize(tiny_graph(family))
    ref = gm(probe_ids)
    res = SliceGPTRotate(calibration="sequential").run(gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)
    # two decoder blocks and the final norm: a shortcut where each block hands the stream on
    assert res.stats["bases"] == 3 and res.stats["shortcuts"] == len(_shortcuts(gm)) == 2


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
    SliceGPT(sparsity=0.375, basis=basis, calibration="once", slice_head=True).run(
        sliced, _ctx(calib_batches, probe_ids))
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
    res = SliceGPT(sparsity=0.25, basis=basis, calibration="once", slice_head=True).run(
        gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    assert res.stats["hidden_after"] == k
    expected = before - removed + n_shortcuts * k * k
    assert ir.count_params(gm) == res.stats["params_after"] == expected
    for n in ir.nodes_of(gm, ir.RMS_NORM):
        assert list(n.args[1]) == [k] and n.meta["val"].shape[-1] == k
    vocab = ir.get_param(gm, rs.readers[-1].args[1]).shape[0]
    assert gm(probe_ids).shape == (*probe_ids.shape, vocab)


@pytest.mark.parametrize("calibration", ["once", "sequential"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sparsity_zero_equals_rotation(family, calibration, probe_ids, calib_batches):
    base = canonicalize(tiny_graph(family))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    SliceGPTRotate(calibration=calibration).run(a, _ctx(calib_batches, probe_ids))
    SliceGPT(sparsity=0.0, calibration=calibration).run(b, _ctx(calib_batches, probe_ids))
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


def test_unknown_calibration_or_non_bool_slice_head_is_rejected():
    with pytest.raises(ValueError, match="calibration"):
        SliceGPT(calibration="twice")
    with pytest.raises(ValueError, match="calibration"):
        SliceGPTRotate(calibration=None)
    with pytest.raises(ValueError, match="slice_head"):
        SliceGPT(slice_head="no")


def test_rerun_attention_option_is_checked():
    with pytest.raises(ValueError, match="rerun_attention must be a bool"):
        SliceGPT(rerun_attention="no")
    for kw in ({"basis": "per_norm"}, {"calibration": "once"}):
        with pytest.raises(ValueError, match="applies to basis='global' with calibration="):
            SliceGPT(rerun_attention=False, **kw)


def test_skip_path_correction_moves_the_earlier_unit_to_the_new_basis():
    """``_correct``: an earlier unit's output ``y = x P_old + f`` followed by the new
    projection is ``x P_new + f P_new`` (``f`` the unit's own contribution, kept)."""
    from passes.slicegpt import SequentialBases, pca_basis, project

    g = torch.Generator().manual_seed(0)
    d, k = 32, 20
    x = torch.randn(3, 16, d, generator=g) * torch.linspace(0.2, 5.0, d)
    f = torch.randn(3, 16, d, generator=g)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    c_old, c_new = a @ a.T, a @ a.T + b @ b.T
    v = SequentialBases.__new__(SequentialBases)
    v.widths, v.group_of_key, v._projectors = {"n": k}, {"n": "g"}, {}
    v._group, v._group_cov, v._group_units, v._group_inputs = "g", c_new, ["unit"], list(x)
    v.bases = {"g": pca_basis(c_old / c_old.trace())}
    v._key = lambda block: "n"
    old = v._p("n")
    y = [project(xi, old) + fi for xi, fi in zip(x, f)]

    class Runner:
        inputs = y

        def replace_inputs(self, xs):
            self.inputs = xs

    runner = Runner()
    v._correct(runner)
    q_new = v.bases["g"][1]
    assert torch.equal(q_new, pca_basis(c_new / c_new.trace())[1])
    p_new = q_new[:, :k] @ q_new[:, :k].T
    for xi, fi, got in zip(x, f, runner.inputs):
        want = (xi.double() + fi.double()) @ p_new
        # float32 projections of values up to 12: measured <= 1.5e-6
        torch.testing.assert_close(project(got, v._p("n")).double(), want, atol=3e-6, rtol=0)


def test_without_the_attention_rerun_each_unit_runs_once_per_batch(probe_ids, calib_batches,
                                                                    monkeypatch):
    """``rerun_attention=False``: the sweep runs every unit once per batch (the default re-runs
    each block's attention half once more), and the sliced model stays close to the
    default's."""
    from compiler.blockwise import BlockRunner

    calls = []
    run = BlockRunner.run
    monkeypatch.setattr(BlockRunner, "run", lambda self, *a, **k: calls.append(1) or run(
        self, *a, **k))
    base = canonicalize(tiny_graph("llama"))
    make_rotation_invariant(base, probe_ids)
    runs, out = {}, {}
    for rerun in (True, False):
        gm = copy.deepcopy(base)
        calls.clear()
        SliceGPT(sparsity=0.25, rerun_attention=rerun).run(gm, _ctx(calib_batches, probe_ids))
        verify_graph(gm, probe_ids)
        with torch.no_grad():
            runs[rerun], out[rerun] = len(calls), gm(probe_ids)
    layers, batches = 2, len(calib_batches)
    assert runs[True] - runs[False] == layers * batches
    rel = float((out[False] - out[True]).norm() / out[True].norm())
    assert 0 < rel < 0.02, rel  # measured 1.6%


def test_sequential_calibration_needs_every_norm_at_a_residual_cut(probe_ids, calib_batches,
                                                                   monkeypatch):
    # A norm whose stream never reaches a block boundary: modelled by hiding every cut's norm
    # from the engine (the decision table says no cut is any norm's input).
    import passes.slicegpt as sg

    monkeypatch.setattr(sg.SequentialBases, "_decides", lambda self, block: False)
    gm = canonicalize(tiny_graph("llama"))
    with pytest.raises(PassError, match="calibration='once'"):
        SliceGPT().run(gm, _ctx(calib_batches, probe_ids))


# ----------------------------------------------------------------------------- sequential


def _projected_model(gm, projections):
    """The sliced model in the original coordinates: ``gm`` (rotation-invariant, unsliced) run
    with every residual source and residual add of basis ``key`` multiplied by ``P_key``."""
    rs = residual_stream(gm)
    keys = basis_keys(rs)
    where = {n: keys[rs.stream[n]] for n in [*rs.sources, *rs.adds]}

    class Run(torch.fx.Interpreter):
        def __init__(self):
            super().__init__(gm)
            self.covs = {}

        def run_node(self, n):
            v = super().run_node(n)
            if ir.is_op(n, ir.RMS_NORM):  # the norm's output: the paper's PCA input, normalised
                x = v.detach().double().reshape(-1, v.shape[-1])
                self.covs[n.name] = self.covs.get(n.name, 0) + x.T @ x
            if n in where and where[n] in projections:
                v = (v.double() @ projections[where[n]]).float()
            return v

    return Run


def _pca(c):
    vals, vecs = torch.linalg.eigh(c)
    return vecs[:, torch.argsort(vals, descending=True)]


def _reference_projections(gm, calib, k, basis, slice_head):
    """Sequential SliceGPT written out slowly: one full-model run per basis decision, each with
    every earlier decision applied (no block engine, no cuts)."""
    rs = residual_stream(gm)
    order = [n.name for n in rs.norms]
    head = order[-1]
    blocks = {}
    for n in rs.norms:
        b = ir.block_index(n) if basis == "global" else n.name
        blocks.setdefault(n.name if b is None else b, []).append(n.name)
    proj = {}

    def covariance(name):
        run = _projected_model(gm, proj)()
        with torch.no_grad():
            for ids in calib:
                run.run(ids)
        return run.covs[name]

    def p(q, key):
        w = k if (slice_head or key != head) else q.shape[0]
        return q[:, :w] @ q[:, :w].T

    for group in blocks.values():
        total = 0
        for name in group:
            total = total + covariance(name)
            q = _pca(total)
            for done in group[: group.index(name) + 1]:
                proj[done] = p(q, done)
    return proj


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_sequential_slicing_equals_an_explicit_full_model_reference(family, basis, slice_head,
                                                                    probe_ids, calib_batches):
    base = canonicalize(tiny_graph(family))
    make_rotation_invariant(base, probe_ids)
    sliced = copy.deepcopy(base)
    res = SliceGPT(sparsity=0.25, basis=basis, slice_head=slice_head).run(
        sliced, _ctx(calib_batches, probe_ids))
    verify_graph(sliced, probe_ids)
    proj = _reference_projections(base, calib_batches, 48, basis, slice_head)
    ref = _projected_model(base, proj)()
    with torch.no_grad():
        want = ref.run(probe_ids)
    # fp32 logits of the sliced graph vs the float64-projected reference (|logits| < 1):
    # measured <= 4.2e-7 over the 12 cases
    torch.testing.assert_close(sliced(probe_ids), want, atol=1e-6, rtol=0)
    assert res.stats["hidden_after"] == 48
    assert res.stats["bases"] == (5 if basis == "per_norm" else 3)
    head_norm = list(ir.nodes_of(sliced, ir.RMS_NORM))[-1]
    assert list(head_norm.args[1]) == ([48] if slice_head else [64])


def test_sequential_default_parameter_count(probe_ids, calib_batches):
    """Global sequential, head whole: one k x k shortcut per block boundary except the last,
    which maps k -> d; the final norm's stream, the last writer and the head keep d."""
    gm = canonicalize(tiny_graph("llama"))
    make_rotation_invariant(gm, probe_ids)
    rs = residual_stream(gm)
    d, k = 64, 48
    head_stream = rs.stream[rs.readers[-1].args[0]]
    keys = basis_keys(rs)
    head = keys[head_stream]
    removed = 0
    for src in rs.sources:
        removed += ir.get_param(gm, src.args[0]).shape[0] * (d - k)
    for w in rs.writers:
        if keys[rs.stream[w]] != head:
            removed += ir.get_param(gm, ir.linear_parts(w)[1]).shape[1] * (d - k)
    for r in rs.readers:
        if keys[rs.stream[r.args[0]]] != head:
            removed += ir.get_param(gm, r.args[1]).shape[0] * (d - k)
    before = ir.count_params(gm)
    res = SliceGPT(sparsity=0.25).run(gm, _ctx(calib_batches, probe_ids))
    assert res.stats["shortcuts"] == 2
    assert ir.count_params(gm) == res.stats["params_after"] == before - removed + k * k + k * d


@pytest.mark.slow
@needs_stories
def test_stories260k_sequential_slicing_quality_gate():
    """TinyStories protocol (256 windows, 128 x 256 calibration, seed 0), 25%, width 48."""
    from compiler.data import calibration_batches, evaluation_windows
    from compiler.evaluate import perplexity

    windows = evaluation_windows("tinystories", STORIES)
    calib = calibration_batches("tinystories", STORIES, n=128, window=256, seed=0)
    base = canonicalize(stories_graph())
    make_rotation_invariant(base, torch.zeros(2, 8, dtype=torch.long))
    ppl = {}
    former = {"calibration": "once", "slice_head": True, "tied_head": "untie"}
    no_rerun = {"rerun_attention": False}
    for name, kw in {"default": {}, "once": former, "no_rerun": no_rerun}.items():
        gm = copy.deepcopy(base)
        SliceGPT(sparsity=0.25, round_to=1, **kw).run(gm, PassContext(calibration=calib))
        ppl[name] = perplexity(gm, windows, progress=False).ppl
    # measured: default (sequential, global per block, head whole, the tie kept) 18.19; the
    # former procedure (once, one basis, head sliced and untied) 23.15; the bar: 20%
    # below 23.15 = 18.52
    assert ppl["default"] <= 18.35, ppl
    # without the attention re-run (one attention half per block fewer): measured 18.29
    assert ppl["no_rerun"] <= 18.45, ppl
    assert abs(ppl["once"] - 23.15) <= 0.01, ppl


# ----------------------------------------------------------------------------- tied head


def _tied_llama():
    """Tiny Llama with the LM head tied to the embedding and non-trivial norm gains."""
    from compiler.frontend import load_model, tiny_config, trace

    model = load_model(tiny_config("llama", tie_word_embeddings=True), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return canonicalize(trace(model))


def _tables(gm):
    """Distinct parameter targets of the embedding and the LM head (the last linear)."""
    emb = ir.nodes_of(gm, ir.EMBEDDING)[0].args[0]
    head = ir.nodes_of(gm, ir.LINEAR)[-1].args[1]
    return str(emb.target), str(head.target)


@pytest.mark.parametrize(("cls", "kw", "adapters"), [
    (SliceGPTRotate, {}, 1), (SliceGPTRotate, {"calibration": "sequential"}, 1),
    (SliceGPTRotate, {"basis": "per_norm"}, 1), (SliceGPTRotate, {"tied_head": "whole_table"}, 2),
    (SliceGPT, {"sparsity": 0.0}, 2), (SliceGPT, {"sparsity": 0.0, "tied_head": "shared_basis"}, 1)])
def test_tied_rotation_is_exact_and_keeps_the_tie(cls, kw, adapters, probe_ids, calib_batches):
    gm = _tied_llama()
    emb, head = _tables(gm)
    assert emb == head
    before = ir.count_params(gm)
    ref = gm(probe_ids)
    res = cls(**kw).run(gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)
    emb, head = _tables(gm)
    assert emb == head and res.stats["head_tied"] == 1
    # gains folded (5 norms x 64); the head adapter (and the embedding map) d x d; shortcuts
    d = 64
    assert ir.count_params(gm) == before - 5 * d + (adapters + res.stats["shortcuts"]) * d * d


@pytest.mark.parametrize("basis", BASES)
def test_tied_default_slicing_keeps_one_table_and_shrinks_the_model(basis, probe_ids,
                                                                    calib_batches):
    """Default (``tied_head="whole_table"``): the same function as the untied default, with
    one table: the untied head (256 x 64) and the sliced table (256 x 48) become the whole
    table, an embedding map (48 x 64) and a head adapter (64 x 64)."""
    gm = _tied_llama()
    before = ir.count_params(gm)
    untied = copy.deepcopy(gm)
    res = SliceGPT(sparsity=0.25, basis=basis).run(gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    emb, head = _tables(gm)
    assert emb == head and res.stats["head_tied"] == 1
    assert ir.count_params(gm) == res.stats["params_after"]
    if basis == "global":  # per_norm's 4 shortcuts (48 x 48) outweigh the saving at vocab 256
        assert res.stats["params_after"] < before
    ru = SliceGPT(sparsity=0.25, basis=basis, tied_head="untie").run(
        untied, _ctx(calib_batches, probe_ids))
    assert ru.stats["head_tied"] == 0
    assert res.stats["params_after"] == (ru.stats["params_after"] - 256 * 48 + 48 * 64
                                         + 64 * 64)
    # measured: <= 6.0e-7 over both bases (logits up to 1.23)
    torch.testing.assert_close(gm(probe_ids), untied(probe_ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("basis", BASES)
def test_tied_shared_basis_slicing_keeps_one_sliced_table(basis, probe_ids, calib_batches):
    """``tied_head="shared_basis"``: the table sliced in the embedding's basis serves the head
    through a 48 x 48 adapter: one 256 x 48 table less than the untied sliced head."""
    gm = _tied_llama()
    before = ir.count_params(gm)
    untied = copy.deepcopy(gm)
    res = SliceGPT(sparsity=0.25, basis=basis, tied_head="shared_basis").run(
        gm, _ctx(calib_batches, probe_ids))
    verify_graph(gm, probe_ids)
    emb, head = _tables(gm)
    assert emb == head and res.stats["head_tied"] == 1
    assert ir.count_params(gm) == res.stats["params_after"] < before
    ru = SliceGPT(sparsity=0.25, basis=basis, slice_head=True, tied_head="untie").run(
        untied, _ctx(calib_batches, probe_ids))
    assert res.stats["params_after"] == ru.stats["params_after"] - 256 * 48 + 48 * 48


@pytest.mark.parametrize("basis", BASES)
def test_tied_shared_basis_slicing_equals_an_explicit_full_model_reference(basis, probe_ids,
                                                                              calib_batches):
    """The tied head reads the table projected onto the embedding's kept directions:
    ``logits = n diag(g) P_0 E^T``, every other site as in the untied reference."""
    from passes.slicegpt import tied_head

    base = _tied_llama()
    make_rotation_invariant(base, probe_ids)
    sliced = copy.deepcopy(base)
    SliceGPT(sparsity=0.25, basis=basis, tied_head="shared_basis").run(
        sliced, _ctx(calib_batches, probe_ids))
    proj = _reference_projections(base, calib_batches, 48, basis, True)
    rs = residual_stream(base)
    src, head, g = tied_head(base, rs)
    p0 = proj[basis_keys(rs)[rs.stream[src]]]
    e = ir.get_param(base, src.args[0]).double()
    ir.set_param(base, head.args[1], ((e @ p0) * g).float())
    ref = _projected_model(base, proj)()
    with torch.no_grad():
        want = ref.run(probe_ids)
    # measured: <= 4.8e-7 over both bases (logits up to 1.22)
    torch.testing.assert_close(sliced(probe_ids), want, atol=1e-6, rtol=0)


def test_slicing_after_a_tied_rotation_composes_exactly(probe_ids, calib_batches):
    """A second run folds the first run's adapter back into an untied head (exact)."""
    gm = _tied_llama()
    ref = gm(probe_ids)
    SliceGPT(sparsity=0.0, calibration="once").run(gm, _ctx(calib_batches, probe_ids))
    res = SliceGPT(sparsity=0.0).run(gm, _ctx(calib_batches, probe_ids))
    assert res.stats["head_adapters_refolded"] == 2  # the head adapter and the embedding map
    torch.testing.assert_close(gm(probe_ids), ref, atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tied_head", ["whole_table", "shared_basis"])
def test_tied_sliced_graph_exports_to_onnx_and_matches_in_ort(tied_head, tmp_path, probe_ids,
                                                              calib_batches):
    from backends.onnxruntime import ORTModel, export_onnx

    gm = _tied_llama()
    SliceGPT(sparsity=0.25, tied_head=tied_head).run(gm, _ctx(calib_batches, probe_ids))
    path = export_onnx(gm, tmp_path / "sliced.onnx")
    # measured: <= 4.8e-7
    torch.testing.assert_close(ORTModel(path, threads=1)(probe_ids), gm(probe_ids), atol=1e-4,
                               rtol=0)


def test_unknown_tied_head_is_rejected():
    with pytest.raises(ValueError, match="tied_head"):
        SliceGPT(tied_head="tie")
    with pytest.raises(ValueError, match="tied_head"):
        SliceGPTRotate(tied_head=None)


def test_float32_projection_and_covariance_match_float64():
    """The sequential engine's float32 GEMMs agree with the float64 formulas to about 1e-6."""
    from passes.slicegpt import normalized_covariance, project, projector

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 96, generator=g) * torch.linspace(0.1, 30.0, 96)
    full = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))[0]
    q = full[:, :64]
    ref = ((x.double() @ q) @ q.T)
    got = project(x, full[:, 64:])  # from the dropped directions
    assert got.dtype == torch.float32
    assert float((got.double() - ref).norm() / ref.norm()) < 2e-6
    assert project(x, full[:, 96:]) is x  # nothing dropped: no work
    xd = x.double().reshape(-1, 96)
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    cov_ref = n.T @ n
    cov = normalized_covariance(x, 1e-5)
    assert cov.dtype == torch.float64
    assert float((cov - cov_ref).norm() / cov_ref.norm()) < 2e-6
    # the PCA basis it gives spans the same kept subspace
    vals_ref, q_ref = torch.linalg.eigh(cov_ref)
    vals, q_got = torch.linalg.eigh(cov)
    k = 48
    p_ref, p_got = projector(q_ref[:, -k:]), projector(q_got[:, -k:])
    assert float((p_ref - p_got).norm()) < 1e-4


def test_quantization_leaves_shortcuts_and_tie_maps_float_unless_included(probe_ids,
                                                                          calib_batches):
    """SliceGPT's own linears read the residual stream (shortcuts) or belong to the embedding /
    the tied head: ``insert_qdq`` leaves them float, naming why; an include pattern naming a
    shortcut's site quantizes it. (On SmolLM2 quantizing the shortcuts took slicegpt(0.25) +
    smoothquant(0.5) + w8a8 from 13.85 to 1174 perplexity.)"""
    from passes.insert_qdq import InsertQDQ

    gm = canonicalize(_tied_llama())
    SliceGPT(sparsity=0.25, basis="per_norm").run(gm, _ctx(calib_batches, probe_ids))
    mine = [n for n in ir.nodes_of(gm, ir.LINEAR)
            if n.meta.get("fxcompress_created_by", "").startswith("slicegpt")]
    assert len(mine) >= 3  # shortcuts, the embedding map, the head adapter
    q = copy.deepcopy(gm)
    res = InsertQDQ(scheme="w8a8").run(q, _ctx(calib_batches, probe_ids))
    skipped = [n for n in res.notes if "left float:" in n]
    assert len(skipped) == len(mine)
    assert any("SliceGPT shortcut" in n for n in skipped)
    assert any("LM head's input adapter" in n for n in skipped)
    assert any("embedding's map" in n for n in skipped)
    site = ir.site(_shortcuts(gm)[0])
    named = sum(ir.site(n) == site for n in _shortcuts(gm))
    q2 = copy.deepcopy(gm)
    res2 = InsertQDQ(scheme="w8a8", include=[site, "*_proj"]).run(
        q2, _ctx(calib_batches, probe_ids))
    assert res2.stats["linears_quantized"] == res.stats["linears_quantized"] + named


def test_a_later_group_quantizer_that_will_not_divide_the_width_is_warned_before_the_sweep(
        calib_batches):
    """tiny-llama: hidden 64, 25% -> 48, which W4 groups of 32 do not divide."""
    import compiler
    from compiler.errors import FxCompressError

    with pytest.warns(UserWarning, match=r"sliced width 48 is no multiple of insert_qdq's "
                                         r"group_size 32.*round_to=32 slices to 32"):
        with pytest.raises(FxCompressError, match="group_size"):
            compiler.compile("tiny-llama", ["slicegpt(sparsity=0.25)",
                                            "insert_qdq(scheme='w4a16', group_size=32)"],
                             calibration=calib_batches, report_data=False, verify=False)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sliced width")  # the groups divide it
        compiler.compile("tiny-llama", ["slicegpt(sparsity=0.25, round_to=32)",
                                        "insert_qdq(scheme='w4a16', group_size=32)"],
                         calibration=calib_batches, report_data=False, verify=False)


def test_tie_gain_is_recovered_block_by_block_and_one_wrong_element_refuses_it():
    from passes.slicegpt import _GAIN_ROWS, _gain_of

    g0 = torch.Generator().manual_seed(0)
    e = torch.randn(2 * _GAIN_ROWS + 77, 24, generator=g0)  # three blocks, the last one short
    gain = torch.rand(24, dtype=torch.float64, generator=g0) + 0.5
    w = (e.double() * gain).float()
    # measured 9.5e-10 relative (the float32 rounding of w, averaged over the rows by the
    # least squares); the check itself allows 4 float32 roundings per element
    torch.testing.assert_close(_gain_of(w, e), gain, atol=0, rtol=1.5e-9)
    w[-1, 5] *= 1 + 1e-5  # the last row of the last block, 1e-5 off: not E diag(g)
    assert _gain_of(w, e) is None
