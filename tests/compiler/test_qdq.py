"""compiler.qdq, the Q/DQ vocabulary the quantizing passes share, and the other helpers passes
share through the core (ir.is_shared_param, ir.untie_embeddings, evaluate.next_token_loss)."""

from __future__ import annotations

import pytest
import torch

from compiler import ir, qdq
from compiler.evaluate import next_token_loss
from passes.canonicalize import canonicalize
from tests.conftest import tiny_graph

qd = torch.ops.quantized_decomposed


def _graph(family: str = "llama") -> torch.fx.GraphModule:
    return canonicalize(tiny_graph(family))


def _created_by(gm) -> set[str]:
    return {n.meta["fxcompress_created_by"] for n in gm.graph.nodes
            if qdq.is_dequantized(n) or ir.op_name(n).startswith("quantize")}


def test_rewrite_sites_records_the_pass_that_created_each_qdq_node(probe_ids):
    gm = _graph()
    anns = qdq.annotate_linears(gm, "w8a8_dynamic")
    stats = qdq.rewrite_sites(gm, anns, {})
    assert stats["linears_quantized"] == 14 and stats["act_qdq_dynamic"] > 0
    assert _created_by(gm) == {"insert_qdq"}
    gm = _graph()
    spec = qdq.resolve_weight_spec("gptq", 4, 32, False)
    todo, notes = qdq.select_sites("gptq", gm, spec, include=None, exclude=(),
                                   quantize_lm_head=False)
    assert [n for n in notes if "LM head" in n] == ["lm_head: skipped, LM head left float "
                                                   "(quantize_lm_head=False)"]
    qdq.rewrite_sites(gm, todo, {}, created_by="gptq")
    assert _created_by(gm) == {"gptq"}
    assert torch.isfinite(gm(probe_ids)).all()


def test_dequantize_weight_is_what_the_graph_computes_bitwise():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    spec = qdq.WeightQuantSpec(4, 32, False)
    q, s, zp = qdq.quantize_weight_per_group(w, spec)
    ref = (q.float().reshape(8, 2, 32) - zp.float()[..., None]) * s[..., None]
    torch.testing.assert_close(qdq.dequantize_weight(q, s, zp, spec), ref.reshape(8, 64),
                               atol=0, rtol=0)
    spec8 = qdq.WeightQuantSpec(8, None, True)
    q8, s8 = qdq.quantize_weight_per_channel(w, spec8)
    torch.testing.assert_close(qdq.dequantize_weight(q8, s8, None, spec8), q8.float() * s8[:, None],
                               atol=0, rtol=0)


def test_site_patterns_validate_and_match_paths_and_in_sites():
    assert qdq.site_patterns("*.mlp.*", "include") == ("*.mlp.*",)
    with pytest.raises(TypeError, match="awq: exclude must be a list of site patterns"):
        qdq.site_patterns(["ok", ""], "exclude", "awq")
    assert qdq.matches_site("model.layers.0.mlp.down_proj", ["*.down_proj:in"])
    assert not qdq.matches_site("model.layers.0.mlp.up_proj", ["*.down_proj"])


def test_set_qdq_meta_copies_the_module_stack_and_sets_or_clears_the_value():
    gm = _graph()
    lin = ir.nodes_of(gm, ir.LINEAR)[0]
    with gm.graph.inserting_after(lin):
        a = gm.graph.call_function(torch.ops.aten.neg.default, (lin,))
        b = gm.graph.call_function(torch.ops.aten.neg.default, (a,))
    qdq.set_qdq_meta(a, lin, None, created_by="probe")
    qdq.set_qdq_meta(b, lin, lin.meta["val"].to(torch.int8), created_by="probe")
    assert a.meta["nn_module_stack"] == lin.meta["nn_module_stack"]
    assert "val" not in a.meta and "tensor_meta" not in a.meta
    assert b.meta["val"].dtype == torch.int8 and b.meta["fxcompress_created_by"] == "probe"


def test_untie_embeddings_and_is_shared_param_on_a_tied_model(probe_ids):
    gm = _graph("gpt2")  # wte is read by the embedding and the LM head
    emb = ir.nodes_of(gm, ir.EMBEDDING)[0]
    head = next(n for n in ir.nodes_of(gm, ir.LINEAR) if qdq.is_lm_head(n))
    assert ir.is_shared_param(gm, emb.args[0], emb)
    before = gm(probe_ids)
    assert ir.untie_embeddings(gm) == 1 and ir.untie_embeddings(gm) == 0
    gm.recompile()
    assert not ir.is_shared_param(gm, emb.args[0], emb)
    assert not ir.is_shared_param(gm, head.args[1], head)
    torch.testing.assert_close(gm(probe_ids), before, atol=0, rtol=0)


def test_next_token_loss_scores_each_position_on_the_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    logp = torch.log_softmax(logits.double(), -1)
    ref = -sum(float(logp[b, t, ids[b, t + 1]]) for b in range(2) for t in range(4)) / 8
    assert float(next_token_loss(logits, ids)) == pytest.approx(ref, rel=1e-6)
    assert float(next_token_loss((logits,), ids)) == float(next_token_loss(logits, ids))
