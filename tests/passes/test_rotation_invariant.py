"""RotationInvariant: exact on every core family, gain-free rms_norm only, idempotent, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.errors import PassError
from compiler.pass_base import PassContext
from compiler.pass_manager import verify_graph
from passes.canonicalize import canonicalize
from passes.rotation_invariant import (
    RotationInvariant,
    is_rotation_invariant,
    residual_stream,
)
from tests.conftest import CORE_FAMILIES, needs_stories, stories_graph, tiny_graph

ATOL = 1e-4  # fp32 logits, exact pass


def _run(gm, probe):
    ref = gm(probe)
    res = RotationInvariant().run(gm, PassContext(probe_inputs=probe))
    verify_graph(gm, probe)
    return ref, gm(probe), res


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_rotation_invariant_is_exact_and_leaves_gain_free_rms_norms(family, probe_ids):
    gm = canonicalize(tiny_graph(family))
    n_norms = len(residual_stream(gm).norms)
    ref, out, res = _run(gm, probe_ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert res.modified
    counts = ir.op_counts(gm)
    assert counts["layer_norm"] == 0
    assert counts["rms_norm"] == n_norms
    assert all(n.args[2] is None for n in ir.nodes_of(gm, ir.RMS_NORM))
    assert is_rotation_invariant(gm)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_layer_norm_models_get_centred_writers_and_folded_biases(family, probe_ids):
    gm = canonicalize(tiny_graph(family))
    _, _, res = _run(gm, probe_ids)
    assert res.stats["layer_norms_to_rms"] == len(residual_stream(gm).norms)
    assert res.stats["writers_centred"] > 0 and res.stats["biases_folded"] > 0
    for src in residual_stream(gm).sources:
        table = ir.get_param(gm, src.args[0])
        assert table.mean(dim=1).abs().max() < 1e-5


def test_second_run_reports_unmodified(probe_ids):
    gm = canonicalize(tiny_graph("opt"))
    _run(gm, probe_ids)
    before = copy.deepcopy(gm.state_dict())
    res = RotationInvariant().run(gm, PassContext(probe_inputs=probe_ids))
    assert not res.modified
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


@needs_stories
def test_rotation_invariant_is_exact_on_stories260k_with_tied_embeddings(probe_ids):
    gm = canonicalize(stories_graph())
    ref, out, res = _run(gm, probe_ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert res.stats["embeddings_untied"] == 1
    assert is_rotation_invariant(gm)


def test_norm_feeding_a_non_linear_raises_before_mutating(probe_ids):
    gm = canonicalize(tiny_graph("llama"))
    norm = residual_stream(gm).norms[0]
    with gm.graph.inserting_after(norm):
        extra = gm.graph.call_function(torch.ops.aten.relu.default, (norm,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0] if isinstance(out.args[0], tuple) else out.args[0], extra),)
    gm.recompile()
    before = copy.deepcopy(gm.state_dict())
    with pytest.raises(PassError, match="feeds relu.*neither a linear nor the residual stream"):
        RotationInvariant().run(gm, PassContext(probe_inputs=probe_ids))
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_post_layer_norm_stream_is_refused_naming_the_norm(probe_ids):
    # BERT-style post-LN: x = LN(x + f(x)); the norm reads the residual add and its output is
    # the next stream, so no rotation of the stream passes through it (was a KeyError)
    from transformers import BertGenerationConfig

    from compiler.frontend import load_model, trace

    cfg = BertGenerationConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=128, vocab_size=256,
                               max_position_embeddings=512, is_decoder=True)
    gm = canonicalize(trace(load_model(cfg, seed=0)))
    before = copy.deepcopy(gm.state_dict())
    with pytest.raises(PassError, match=r"norm layer_norm at bert\.embeddings\.LayerNorm "
                                        r"normalises the residual stream in place \(post-LN"):
        RotationInvariant().run(gm, PassContext(probe_inputs=probe_ids))
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
