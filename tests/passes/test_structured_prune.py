"""StructuredPrune: pruned graph == original with the same channels zeroed; surgery; errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compiler import ir
from compiler.depgraph import build_channel_groups
from compiler.errors import PassError, PreconditionError
from compiler.evaluate import next_token_loss
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.structured_prune import StructuredPrune
from tests.conftest import CORE_FAMILIES, needs_stories, stories_graph, tiny_graph


def _graph(family: str) -> torch.fx.GraphModule:
    return canonicalize(tiny_graph(family))


def _zeroed_reference(ref: torch.fx.GraphModule, decision) -> torch.fx.GraphModule:
    """The original graph with the removed units' consumer channels (o_proj / down columns) zeroed.

    Zeroing the readers (not the q/k rows) is what removes a head: softmax of zero scores is
    uniform attention, not a silent head.
    """
    cg = build_channel_groups(ref)
    for d in decision.groups.values():
        if not d.removed:
            continue
        g = cg[d.group]
        leaf = g.leaf(d.unit).id
        removed = torch.tensor(d.removed)
        for m in g.consumers:
            c = g.leaf_coords(m, leaf)
            pos = torch.nonzero(torch.isin(c, removed)).flatten()
            w = ir.get_param(ref, m.target).clone()
            w.index_fill_(m.dim, pos, 0.0)
            ir.set_param(ref, m.target, w)
    return ref


def _calib(n: int = 2, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (2, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("what", ["heads", "mlp", "both"])
def test_pruned_graph_equals_original_with_channels_zeroed(family, what, probe_ids):
    gm = _graph(family)
    ref = copy.deepcopy(gm)
    ctx = PassContext(calibration=_calib())
    p = StructuredPrune(ratio=0.5, importance="taylor", prune_attention=what != "mlp",
                        prune_mlp=what != "heads")
    res = p.run(gm, ctx)
    decision = ctx.extra["structured_prune"]
    assert res.modified
    assert any(d.removed for d in decision.groups.values())
    expected = _zeroed_reference(ref, decision)(probe_ids)
    torch.testing.assert_close(gm(probe_ids), expected, atol=1e-5, rtol=0)


def test_llama_gqa_removes_kv_heads_with_their_query_heads(probe_ids):
    gm = _graph("llama")  # 4 query heads, 2 kv heads, head_dim 16
    ref = copy.deepcopy(gm)
    ctx = PassContext()
    StructuredPrune(ratio=0.5, importance="l2", prune_mlp=False).run(gm, ctx)
    d = ctx.extra["structured_prune"].groups["attn_heads:model.layers.0.self_attn"]
    assert d.unit == "kv_heads" and len(d.removed) == 1
    pre = "model.model.layers.0.self_attn."
    assert ir.get_param(gm, pre + "q_proj.weight").shape == (32, 64)  # 2 query heads left
    assert ir.get_param(gm, pre + "k_proj.weight").shape == (16, 64)
    assert ir.get_param(gm, pre + "v_proj.weight").shape == (16, 64)
    assert ir.get_param(gm, pre + "o_proj.weight").shape == (64, 32)
    # the kept q rows are exactly those of the kept kv group's query heads
    kv = d.kept[0]
    q_ref = ir.get_param(ref, pre + "q_proj.weight")[kv * 32:(kv + 1) * 32]
    assert torch.equal(ir.get_param(gm, pre + "q_proj.weight"), q_ref)
    expected = _zeroed_reference(ref, ctx.extra["structured_prune"])(probe_ids)
    torch.testing.assert_close(gm(probe_ids), expected, atol=1e-5, rtol=0)


def test_llama_query_heads_within_kv_groups(probe_ids):
    gm = _graph("llama")
    ref = copy.deepcopy(gm)
    ctx = PassContext()
    StructuredPrune(ratio=0.5, importance="l1", prune_mlp=False,
                    attention_unit="q_per_kv").run(gm, ctx)
    decision = ctx.extra["structured_prune"]
    d = decision.groups["attn_heads:model.layers.1.self_attn"]
    assert d.unit == "q_per_kv" and len(d.removed) == 1
    pre = "model.model.layers.1.self_attn."
    assert ir.get_param(gm, pre + "q_proj.weight").shape == (32, 64)
    assert ir.get_param(gm, pre + "k_proj.weight").shape == (32, 64)  # kv heads all kept
    torch.testing.assert_close(gm(probe_ids), _zeroed_reference(ref, decision)(probe_ids),
                               atol=1e-5, rtol=0)


def test_param_counts_match_the_ratio_and_stats():
    gm = _graph("llama")
    before = ir.count_params(gm)
    res = StructuredPrune(ratio=0.5, importance="l1").run(gm, PassContext())
    after = ir.count_params(gm)
    assert res.stats["params_before"] == before and res.stats["params_after"] == after
    assert before - after == res.stats["prunable_params"] // 2
    assert res.stats["prunable_fraction_removed"] == 0.5
    assert res.stats["heads_removed"] == 4 and res.stats["mlp_channels_removed"] == 128
    assert ir.get_param(gm, "model.model.layers.0.mlp.down_proj.weight").shape == (64, 64)


def test_ratio_zero_is_a_no_op():
    gm = _graph("opt")
    ref = copy.deepcopy(gm)
    res = StructuredPrune(ratio=0.0, importance="l2").run(gm, PassContext())
    assert not res.modified
    assert ir.count_params(gm) == ir.count_params(ref)


def test_skip_layers_leaves_blocks_alone_with_a_note():
    gm = _graph("llama")
    res = StructuredPrune(ratio=0.5, importance="l1", skip_layers=[0]).run(gm, PassContext())
    assert ir.get_param(gm, "model.model.layers.0.self_attn.q_proj.weight").shape == (64, 64)
    assert ir.get_param(gm, "model.model.layers.1.self_attn.q_proj.weight").shape == (32, 64)
    assert any("block 0 is in skip_layers" in n for n in res.notes)


def test_global_ranking_removes_about_ratio_of_prunable_params(probe_ids):
    gm = _graph("opt")
    ref = copy.deepcopy(gm)
    ctx = PassContext()
    res = StructuredPrune(ratio=0.3, importance="l2", global_ranking=True,
                          global_cap=math.inf).run(gm, ctx)
    frac = res.stats["prunable_fraction_removed"]
    assert 0.3 <= frac < 0.3 + 0.07  # overshoot below one head's worth of parameters
    torch.testing.assert_close(gm(probe_ids),
                               _zeroed_reference(ref, ctx.extra["structured_prune"])(probe_ids),
                               atol=1e-5, rtol=0)


def test_round_to_keeps_widths_multiples():
    gm = _graph("llama")
    ctx = PassContext()
    StructuredPrune(ratio=0.3, importance="l1", round_to=16, prune_attention=False).run(gm, ctx)
    for d in ctx.extra["structured_prune"].groups.values():
        assert len(d.kept) % 16 == 0
    assert ir.get_param(gm, "model.model.layers.0.mlp.up_proj.weight").shape[0] % 16 == 0


def test_importance_estimators_differ_and_random_is_seeded():
    kept = {}
    for imp in ("l1", "l2", "taylor", "taylor2", "random"):
        kept[imp] = StructuredPrune(ratio=0.5, importance=imp, prune_attention=False).decide(
            _graph("llama"), PassContext(calibration=_calib(), seed=5)
        ).groups["mlp:model.layers.0.mlp"].kept
    assert kept["taylor"] != kept["l1"] and kept["taylor"] != kept["random"]
    again = StructuredPrune(ratio=0.5, importance="random", prune_attention=False).decide(
        _graph("llama"), PassContext(seed=5)).groups["mlp:model.layers.0.mlp"].kept
    assert again == kept["random"]


def _mlp_wg(gm, ids):
    """Per gate/up/down weight of block 0's MLP, ``w * dL/dw`` on ``ids`` (by hand)."""
    params = dict(gm.named_parameters())
    names = [f"model.model.layers.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")]
    for n in names:
        params[n].requires_grad_(True)
    loss = next_token_loss(gm(ids), ids)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for n in names:
        params[n].requires_grad_(False)
    return {n: (params[n].detach().double(), g.double()) for n, g in zip(names, grads)}


def _channel(t: torch.Tensor, name: str, c: int) -> torch.Tensor:
    return t.select(1 if "down" in name else 0, c)


@pytest.mark.parametrize("per_sequence", [True, False])
def test_taylor_scores_are_first_order_loss_change(per_sequence):
    # Check one MLP channel by hand: per sequence, mean_s sum |w * dL_s/dw| over the channel's
    # weights; else sum |w * dL/dw| of the mean loss over all calibration batches (LLM-Pruner).
    gm = _graph("llama")
    calib = _calib(2)  # 2 batches x 2 sequences
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    d = StructuredPrune(ratio=0.5, importance="taylor", prune_attention=False,
                        per_sequence=per_sequence).decide(
        gm, PassContext(calibration=calib)).groups["mlp:model.layers.0.mlp"]
    assert flags == {n: p.requires_grad for n, p in gm.named_parameters()}  # restored
    c = 7
    if per_sequence:
        rows = [b[i:i + 1] for b in calib for i in range(b.shape[0])]
        expected = sum(float(_channel((w * g).abs(), n, c).sum())
                       for r in rows for n, (w, g) in _mlp_wg(gm, r).items()) / len(rows)
    else:
        per_batch = [_mlp_wg(gm, b) for b in calib]
        expected = sum(float(_channel((w * sum(pb[n][1] for pb in per_batch) / 2).abs(), n,
                                      c).sum()) for n, (w, _) in per_batch[0].items())
    assert d.scores[c].item() == pytest.approx(expected, rel=1e-6)


def test_taylor2_adds_half_the_per_sequence_fisher_term():
    gm = _graph("llama")
    calib = _calib(1)
    ctx = PassContext(calibration=calib)
    s1 = StructuredPrune(ratio=0.5, importance="taylor", prune_attention=False).decide(
        gm, ctx).groups["mlp:model.layers.0.mlp"].scores
    s2 = StructuredPrune(ratio=0.5, importance="taylor2", prune_attention=False).decide(
        gm, ctx).groups["mlp:model.layers.0.mlp"].scores
    c = 3
    rows = [calib[0][i:i + 1] for i in range(calib[0].shape[0])]
    fisher = sum(float(_channel((w * g) ** 2, n, c).sum())
                 for r in rows for n, (w, g) in _mlp_wg(gm, r).items()) / len(rows)
    assert (s2[c] - s1[c]).item() == pytest.approx(0.5 * fisher, rel=1e-6)


def test_hidden_dim_pruning_matches_a_model_built_at_the_smaller_width(probe_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import tiny_model

    gm = _graph("llama")
    ctx = PassContext()
    StructuredPrune(ratio=0.25, importance="l2", prune_attention=False, prune_mlp=False,
                    prune_hidden=True).run(gm, ctx)
    d = ctx.extra["structured_prune"].groups["residual"]
    keep = torch.tensor(d.kept)
    assert len(keep) == 48
    # Reference by hand: the same architecture at hidden 48 (head_dim stays 16), weights
    # gathered on the kept hidden channels; its RMSNorms average over 48 channels.
    orig = tiny_model("llama")
    cfg = LlamaConfig(**{**orig.config.to_dict(), "hidden_size": 48, "head_dim": 16})
    small = LlamaForCausalLM(cfg).eval()
    sd = {}
    for name, w in orig.state_dict().items():
        if "rotary" in name:
            sd[name] = w
            continue
        w = w.clone()
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                          "up_proj.weight", "lm_head.weight")):
            w = w[:, keep]
        elif name.endswith(("o_proj.weight", "down_proj.weight", "norm.weight",
                            "layernorm.weight")):
            w = w[keep]
        elif name.endswith("embed_tokens.weight"):
            w = w[:, keep]
        sd[name] = w
    small.load_state_dict(sd, strict=False)
    with torch.no_grad():
        expected = small(input_ids=probe_ids, use_cache=False).logits
    torch.testing.assert_close(gm(probe_ids), expected, atol=1e-5, rtol=0)
    assert ir.get_param(gm, "model.model.norm.weight").shape == (48,)


@pytest.mark.slow
def test_pruned_graph_exports_to_onnx_with_parity(tmp_path, probe_ids):
    from backends.onnxruntime import ORTModel, export_onnx

    gm = _graph("llama")
    StructuredPrune(ratio=0.5, importance="l1").run(gm, PassContext())
    path = export_onnx(gm, tmp_path / "pruned.onnx")
    ort = ORTModel(path, threads=1)
    with torch.no_grad():
        expected = gm(probe_ids)
    torch.testing.assert_close(ort(probe_ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        StructuredPrune(ratio=ratio)


def test_ratio_removing_all_heads_of_a_layer_is_an_error():
    gm = _graph("llama")  # 2 kv heads per layer: 0.8 rounds to removing both
    with pytest.raises(PassError, match="would remove all 2 kv_heads of attn_heads:model.layers.0"):
        StructuredPrune(ratio=0.8, importance="l1").run(gm, PassContext())


def test_round_to_incompatible_with_head_size_is_an_error():
    gm = _graph("llama")  # a kv unit is 2 query heads x 16 = 32 channels wide
    with pytest.raises(PassError, match="round_to=12 is incompatible with the head structure"):
        StructuredPrune(ratio=0.5, importance="l1", round_to=12).run(gm, PassContext())


def test_taylor_without_calibration_is_a_precondition_error():
    with pytest.raises(PreconditionError, match="calibration"):
        StructuredPrune(ratio=0.2, importance="taylor").run(_graph("llama"), PassContext())


@needs_stories
def test_stories260k_prunes_and_stays_consistent(probe_ids):
    gm = canonicalize(stories_graph())
    ref = copy.deepcopy(gm)
    ctx = PassContext(calibration=_calib(2, 32))
    res = StructuredPrune(ratio=0.25, importance="taylor").run(gm, ctx)
    assert res.stats["heads_removed"] == 10  # 1 of 4 kv groups (2 query heads) x 5 layers
    torch.testing.assert_close(gm(probe_ids),
                               _zeroed_reference(ref, ctx.extra["structured_prune"])(probe_ids),
                               atol=1e-5, rtol=0)
