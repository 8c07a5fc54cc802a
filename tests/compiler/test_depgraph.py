"""Channel dependency graph: expected groups per family, transparency, opaque ops, and proof of
completeness (a permutation applied through a group's members leaves the logits unchanged)."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.depgraph import ChannelGroups, ChannelGroupsAnalysis, build_channel_groups
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from tests.conftest import needs_stories, stories_graph, tiny_graph

aten = torch.ops.aten
_canon: dict[str, torch.fx.GraphModule] = {}


def canonical(family: str) -> torch.fx.GraphModule:
    """A fresh canonicalized graph of the tiny model (deep copy, safe to mutate)."""
    if family not in _canon:
        _canon[family] = canonicalize(tiny_graph(family))
    return copy.deepcopy(_canon[family])


def members(group, producers: bool) -> list[tuple[str, int, str]]:
    return [(m.name, m.dim, m.role) for m in group.members if m.is_producer == producers]


def apply_choice(gm, group, choice) -> None:
    """Gather every member of ``group`` along its dim with the per-leaf ``choice``."""
    for (target, dim), idx in group.param_indices(choice).items():
        ir.set_param(gm, target, ir.get_param(gm, target).index_select(dim, idx))


def random_perms(group, seed: int = 0, skip: tuple[str, ...] = ("rotary_half",)):
    g = torch.Generator().manual_seed(seed)
    return {lf.id: torch.randperm(lf.size, generator=g) for lf in group.leaves
            if lf.label not in skip}


# ------------------------------------------------------------------------------- llama (GQA)


def test_llama_groups_are_residual_then_heads_and_mlp_per_layer_then_logits():
    cg = build_channel_groups(canonical("llama"))
    assert [(g.name, g.width) for g in cg] == [
        ("residual", 64),
        ("attn_heads:model.layers.0.self_attn", 64),
        ("mlp:model.layers.0.mlp", 128),
        ("attn_heads:model.layers.1.self_attn", 64),
        ("mlp:model.layers.1.mlp", 128),
        ("logits", 256),
    ]
    assert cg.notes == []
    assert not any(g.opaque for g in cg)


def test_llama_residual_couples_embedding_all_blocks_norms_and_lm_head():
    g = build_channel_groups(canonical("llama"))["residual"]
    assert members(g, producers=True) == [
        ("model.embed_tokens.weight", 1, "table"),
        ("model.layers.0.input_layernorm.weight", 0, "gain"),
        ("model.layers.0.self_attn.o_proj.weight", 0, "out"),
        ("model.layers.0.post_attention_layernorm.weight", 0, "gain"),
        ("model.layers.0.mlp.down_proj.weight", 0, "out"),
        ("model.layers.1.input_layernorm.weight", 0, "gain"),
        ("model.layers.1.self_attn.o_proj.weight", 0, "out"),
        ("model.layers.1.post_attention_layernorm.weight", 0, "gain"),
        ("model.layers.1.mlp.down_proj.weight", 0, "out"),
        ("model.norm.weight", 0, "gain"),
    ]
    assert members(g, producers=False) == [
        ("model.layers.0.self_attn.q_proj.weight", 1, "in"),
        ("model.layers.0.self_attn.k_proj.weight", 1, "in"),
        ("model.layers.0.self_attn.v_proj.weight", 1, "in"),
        ("model.layers.0.mlp.gate_proj.weight", 1, "in"),
        ("model.layers.0.mlp.up_proj.weight", 1, "in"),
        ("model.layers.1.self_attn.q_proj.weight", 1, "in"),
        ("model.layers.1.self_attn.k_proj.weight", 1, "in"),
        ("model.layers.1.self_attn.v_proj.weight", 1, "in"),
        ("model.layers.1.mlp.gate_proj.weight", 1, "in"),
        ("model.layers.1.mlp.up_proj.weight", 1, "in"),
        ("lm_head.weight", 1, "in"),
    ]
    assert {m.layout for m in g.members} == {"channels(64)"}


def test_llama_heads_group_ties_each_kv_head_to_its_query_heads():
    g = build_channel_groups(canonical("llama"))["attn_heads:model.layers.0.self_attn"]
    rot = "[rotary_half(8) | rotary_half(8)]"
    assert [(m.name, m.dim, m.role, m.layout) for m in g.members] == [
        ("model.layers.0.self_attn.q_proj.weight", 0, "out",
         f"(kv_heads(2) x q_per_kv(2) x {rot})"),
        ("model.layers.0.self_attn.k_proj.weight", 0, "out", f"(kv_heads(2) x {rot})"),
        ("model.layers.0.self_attn.v_proj.weight", 0, "out", "(kv_heads(2) x v_head_dim(16))"),
        ("model.layers.0.self_attn.o_proj.weight", 1, "in",
         "(kv_heads(2) x q_per_kv(2) x v_head_dim(16))"),
    ]
    h = g.heads
    assert (h.num_heads, h.num_kv_heads, h.head_dim, h.v_head_dim) == (4, 2, 16, 16)
    assert h.kv_of_head == (0, 0, 1, 1)  # HF repeat_kv: query head h reads kv head h // 2
    assert [(lf.label, lf.size) for lf in g.leaves] == [
        ("kv_heads", 2), ("q_per_kv", 2), ("rotary_half", 8), ("v_head_dim", 16)]


def test_dropping_a_kv_head_selects_its_query_heads_rows_and_o_proj_columns():
    g = build_channel_groups(canonical("llama"))["attn_heads:model.layers.0.self_attn"]
    idx = {m.name.split(".")[-2]: v for m, v in g.indices({g.leaf("kv_heads").id: [1]}).items()}
    assert torch.equal(idx["q_proj"], torch.arange(32, 64))  # query heads 2 and 3
    assert torch.equal(idx["k_proj"], torch.arange(16, 32))
    assert torch.equal(idx["v_proj"], torch.arange(16, 32))
    assert torch.equal(idx["o_proj"], torch.arange(32, 64))


def test_llama_mlp_group_is_gate_and_up_rows_with_down_columns():
    g = build_channel_groups(canonical("llama"))["mlp:model.layers.1.mlp"]
    assert members(g, producers=True) == [
        ("model.layers.1.mlp.gate_proj.weight", 0, "out"),
        ("model.layers.1.mlp.up_proj.weight", 0, "out"),
    ]
    assert members(g, producers=False) == [("model.layers.1.mlp.down_proj.weight", 1, "in")]
    assert g.heads is None


def test_logits_group_is_lm_head_rows_and_blocked_by_the_graph_output():
    g = build_channel_groups(canonical("llama"))["logits"]
    assert members(g, producers=True) == [("lm_head.weight", 0, "out")]
    assert all(not g.transparent(k) for k in ("permute", "scale", "rotate", "select"))


# ------------------------------------------------------------------------------ transparency


def test_llama_transparency_norms_block_scale_and_rotation_of_the_residual():
    cg = build_channel_groups(canonical("llama"))
    res = cg["residual"]
    assert res.transparent("permute") and res.transparent("select")
    assert {o.op for o in res.blockers("scale")} == {"rms_norm"}
    assert len(res.blockers("rotate")) == 5  # 2 per block + final norm, all with gains
    mlp = cg["mlp:model.layers.0.mlp"]
    assert [o.op for o in mlp.blockers("scale")] == ["silu"]
    assert [o.op for o in mlp.blockers("rotate")] == ["silu", "mul"]
    assert mlp.transparent("permute") and mlp.transparent("select")


def test_rms_norm_without_gain_passes_rotation():
    gm = canonical("llama")
    for n in ir.nodes_of(gm, aten.rms_norm.default):
        n.args = (n.args[0], n.args[1], None, n.args[3])
    res = build_channel_groups(gm)["residual"]
    assert res.transparent("rotate")
    assert not res.transparent("scale")


def test_heads_select_is_free_but_rotary_blocks_transforms_within_head_dim():
    g = build_channel_groups(canonical("llama"))["attn_heads:model.layers.0.self_attn"]
    head_leaves = [g.leaf("kv_heads").id, g.leaf("q_per_kv").id]
    assert g.transparent("select", head_leaves) and g.transparent("permute", head_leaves)
    assert g.transparent("permute", [g.leaf("v_head_dim").id])
    rotary = g.blockers("permute", [g.leaf("rotary_half").id])
    assert len(rotary) == 4 and {o.op for o in rotary} == {"mul"}  # q, k times cos and sin
    assert not g.transparent("scale", head_leaves)  # softmax is not scale-equivariant


def test_op_without_rule_makes_its_group_opaque_with_a_note():
    gm = canonical("llama")
    silu = ir.nodes_of(gm, aten.silu.default)[0]
    with gm.graph.inserting_after(silu):
        cum = gm.graph.call_function(aten.cumsum.default, (silu.args[0], -1))
    ir.copy_meta(silu, cum)
    silu.replace_all_uses_with(cum)
    gm.graph.erase_node(silu)
    cg = build_channel_groups(gm)
    g = cg["mlp:model.layers.0.mlp"]
    assert g.opaque and not cg["mlp:model.layers.1.mlp"].opaque
    assert any("no coupling rule for aten.cumsum.default" in n for n in g.notes)
    assert not g.transparent("permute")
    assert any("aten.cumsum" in n and "model.layers.0.mlp" in n for n in cg.notes)


# ------------------------------------------------------------------------------- OPT, GPT-2


def test_opt_groups_include_tied_embedding_positions_and_biases():
    cg = build_channel_groups(canonical("opt"))
    assert [(g.name, g.width) for g in cg] == [
        ("residual", 64),
        ("attn_heads:model.decoder.layers.0.self_attn", 64),
        ("mlp:model.decoder.layers.0", 128),
        ("attn_heads:model.decoder.layers.1.self_attn", 64),
        ("mlp:model.decoder.layers.1", 128),
        ("logits", 256),
    ]
    res = cg["residual"]
    layer0 = [m for m in members(res, True) + members(res, False) if "layers.0" in m[0]]
    assert members(res, True)[:2] == [
        ("lm_head.weight", 1, "table"),  # tied: the embedding reads lm_head's weight
        ("model.decoder.embed_positions.weight", 1, "table"),
    ]
    p = "model.decoder.layers.0."
    assert sorted(layer0) == sorted([
        (p + "self_attn_layer_norm.weight", 0, "gain"),
        (p + "self_attn_layer_norm.bias", 0, "norm_bias"),
        (p + "self_attn.out_proj.weight", 0, "out"),
        (p + "self_attn.out_proj.bias", 0, "bias"),
        (p + "final_layer_norm.weight", 0, "gain"),
        (p + "final_layer_norm.bias", 0, "norm_bias"),
        (p + "fc2.weight", 0, "out"),
        (p + "fc2.bias", 0, "bias"),
        (p + "self_attn.q_proj.weight", 1, "in"),
        (p + "self_attn.k_proj.weight", 1, "in"),
        (p + "self_attn.v_proj.weight", 1, "in"),
        (p + "fc1.weight", 1, "in"),
    ])
    assert members(res, False)[-1] == ("lm_head.weight", 1, "in")
    keys = list(res.param_indices({}))  # keyed by get_attr target, one entry for both uses
    assert keys.count(("model.lm_head.weight", 1)) == 1 and len(keys) == len(res.members) - 1
    heads = cg["attn_heads:model.decoder.layers.0.self_attn"]
    assert [(m.name.rsplit(".", 2)[-2] + "." + m.name.rsplit(".", 1)[-1], m.dim, m.layout)
            for m in heads.members] == [
        ("q_proj.weight", 0, "(heads(4) x qk_head_dim(16))"),
        ("q_proj.bias", 0, "(heads(4) x qk_head_dim(16))"),
        ("k_proj.weight", 0, "(heads(4) x qk_head_dim(16))"),
        ("k_proj.bias", 0, "(heads(4) x qk_head_dim(16))"),
        ("v_proj.weight", 0, "(heads(4) x v_head_dim(16))"),
        ("v_proj.bias", 0, "(heads(4) x v_head_dim(16))"),
        ("out_proj.weight", 1, "(heads(4) x v_head_dim(16))"),
    ]
    assert heads.heads.kv_of_head == (0, 1, 2, 3)
    assert heads.transparent("permute")  # no rotary: head_dim may be permuted too
    mlp = cg["mlp:model.decoder.layers.1"]
    assert members(mlp, True) == [("model.decoder.layers.1.fc1.weight", 0, "out"),
                                  ("model.decoder.layers.1.fc1.bias", 0, "bias")]
    assert members(mlp, False) == [("model.decoder.layers.1.fc2.weight", 1, "in")]
    assert mlp.transparent("scale") and not mlp.transparent("rotate")  # relu
    assert any("tied" in n for n in cg["logits"].notes)


def test_gpt2_fused_c_attn_rows_are_a_concatenation_of_q_k_v_heads():
    cg = build_channel_groups(canonical("gpt2"))
    assert [(g.name, g.width) for g in cg] == [
        ("residual", 64),
        ("attn_heads:transformer.h.0.attn", 64),
        ("mlp:transformer.h.0.mlp", 128),
        ("attn_heads:transformer.h.1.attn", 64),
        ("mlp:transformer.h.1.mlp", 128),
        ("logits", 256),
    ]
    res = cg["residual"]
    assert members(res, True)[:4] == [
        ("lm_head.weight", 1, "table"),
        ("transformer.wpe.weight", 1, "table"),
        ("transformer.h.0.ln_1.weight", 0, "gain"),
        ("transformer.h.0.ln_1.bias", 0, "norm_bias"),
    ]
    assert [m for m in members(res, False) if ".h.0." in m[0]] == [
        ("transformer.h.0.attn.c_attn.weight", 1, "in"),
        ("transformer.h.0.mlp.c_fc.weight", 1, "in"),
    ]
    heads = cg["attn_heads:transformer.h.1.attn"]
    qk = "(heads(4) x qk_head_dim(16))"
    assert [(m.name, m.dim, m.role, m.layout) for m in heads.members] == [
        ("transformer.h.1.attn.c_attn.weight", 0, "out",
         f"[{qk} | {qk} | (heads(4) x v_head_dim(16))]"),
        ("transformer.h.1.attn.c_attn.bias", 0, "bias",
         f"[{qk} | {qk} | (heads(4) x v_head_dim(16))]"),
        ("transformer.h.1.attn.c_proj.weight", 1, "in", "(heads(4) x v_head_dim(16))"),
    ]
    mlp = cg["mlp:transformer.h.0.mlp"]
    assert [(m.name, m.dim, m.role) for m in mlp.members] == [
        ("transformer.h.0.mlp.c_fc.weight", 0, "out"),
        ("transformer.h.0.mlp.c_fc.bias", 0, "bias"),
        ("transformer.h.0.mlp.c_proj.weight", 1, "in"),
    ]


def test_phi3_fused_qkv_and_gate_up_are_handled_by_slicing():
    cg = build_channel_groups(canonical("phi3"))
    assert not any(g.opaque for g in cg)
    heads = cg["attn_heads:model.layers.0.self_attn"]
    qk = "(heads(4) x [rotary_half(8) | rotary_half(8)])"
    assert [(m.name, m.layout) for m in heads.members] == [
        ("model.layers.0.self_attn.qkv_proj.weight",
         f"[{qk} | {qk} | (heads(4) x v_head_dim(16))]"),
        ("model.layers.0.self_attn.o_proj.weight", "(heads(4) x v_head_dim(16))"),
    ]
    mlp = cg["mlp:model.layers.0.mlp"]
    assert [(m.name, m.dim, m.layout) for m in mlp.members] == [
        ("model.layers.0.mlp.gate_up_proj.weight", 0, "[channels(128) | channels(128)]"),
        ("model.layers.0.mlp.down_proj.weight", 1, "channels(128)"),
    ]


# ------------------------------------------------------------- completeness (exact transforms)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3", "gpt_neox"])
def test_permuting_every_group_through_its_members_keeps_logits(family, probe_ids):
    gm = canonical(family)
    ref = gm(probe_ids)
    cg = build_channel_groups(gm)
    for g in cg:
        if g.kind == "logits":
            continue
        gm2 = copy.deepcopy(gm)
        apply_choice(gm2, g, random_perms(g))
        torch.testing.assert_close(gm2(probe_ids), ref, atol=1e-5, rtol=0, msg=g.name)


def test_permuting_mlp_channels_of_one_layer_keeps_logits(probe_ids):
    gm = canonical("llama")
    ref = gm(probe_ids)
    g = build_channel_groups(gm)["mlp:model.layers.0.mlp"]
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    apply_choice(gm, g, {g.leaf("channels").id: perm})
    w = ir.get_param(gm, "model.model.layers.0.mlp.down_proj.weight")
    assert not torch.equal(w, ir.get_param(_canon["llama"], "model.model.layers.0.mlp.down_proj.weight"))
    torch.testing.assert_close(gm(probe_ids), ref, atol=1e-5, rtol=0)


def test_incomplete_or_blocked_permutations_change_logits(probe_ids):
    # Controls: the equivalence tests above would catch a missing member or a wrong blocker.
    gm = canonical("llama")
    ref = gm(probe_ids)
    g = build_channel_groups(gm)["attn_heads:model.layers.0.self_attn"]
    partial = copy.deepcopy(gm)
    idx = g.param_indices({g.leaf("kv_heads").id: torch.tensor([1, 0])})
    for (target, dim), ix in idx.items():
        if "k_proj" not in target:  # forget one member
            ir.set_param(partial, target, ir.get_param(partial, target).index_select(dim, ix))
    assert (partial(probe_ids) - ref).abs().max() > 1e-3
    rotary = copy.deepcopy(gm)  # the rotary cos/sin tables block permuting within head_dim
    apply_choice(rotary, g, {g.leaf("rotary_half").id: torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])})
    assert (rotary(probe_ids) - ref).abs().max() > 1e-3


# --------------------------------------------------------------------- analysis, stories, speed


def test_analysis_is_cached_under_channel_groups():
    gm = canonical("gpt2")
    ctx = PassContext()
    a = ctx.analysis(ChannelGroupsAnalysis, gm)
    assert ChannelGroupsAnalysis.name == "channel_groups"
    assert isinstance(a, ChannelGroups) and ctx.analysis(ChannelGroupsAnalysis, gm) is a
    assert a.group_of("transformer.h.0.mlp.c_proj.weight", 1).name == "mlp:transformer.h.0.mlp"
    assert a.group_of("transformer.h.0.mlp.c_proj.weight", 0).name == "residual"


@needs_stories
def test_stories260k_groups_and_residual_permutation(probe_ids):
    gm = canonicalize(stories_graph())
    cg = build_channel_groups(gm)
    assert cg.names() == ["residual"] + [
        f"{k}:model.layers.{i}.{m}" for i in range(5)
        for k, m in (("attn_heads", "self_attn"), ("mlp", "mlp"))] + ["logits"]
    h = cg["attn_heads:model.layers.4.self_attn"].heads
    assert (h.num_heads, h.num_kv_heads, h.head_dim) == (8, 4, 8)
    assert h.kv_of_head == (0, 0, 1, 1, 2, 2, 3, 3)
    assert cg["mlp:model.layers.0.mlp"].width == 172
    ref = gm(probe_ids)
    for name in ("residual", "attn_heads:model.layers.2.self_attn", "mlp:model.layers.4.mlp"):
        gm2 = copy.deepcopy(gm)
        apply_choice(gm2, cg[name], random_perms(cg[name], seed=5))
        torch.testing.assert_close(gm2(probe_ids), ref, atol=1e-5, rtol=0, msg=name)


def test_twelve_layer_model_has_one_head_group_and_one_mlp_group_per_layer():
    # (no wall-clock assertion: a time limit in a test measures the machine's load, not the code)
    from compiler.frontend import load_model, tiny_config, trace

    gm = canonicalize(trace(load_model(tiny_config("llama", num_hidden_layers=12))))
    cg = build_channel_groups(gm)
    assert len(cg.of_kind("attn_heads")) == 12 and len(cg.of_kind("mlp")) == 12
    assert len(cg.of_kind("residual")) == 1


def test_positive_scales_through_the_opt_mlp_group_keep_logits(probe_ids):
    # relu(s x) = s relu(x) for s > 0: scale fc1 rows and bias by s, divide fc2 columns by s.
    gm = canonical("opt")
    ref = gm(probe_ids)
    g = build_channel_groups(gm)["mlp:model.decoder.layers.0"]
    assert g.transparent("scale")
    s = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5
    for m, vec in g.vectors({g.leaf("channels").id: s}).items():
        w = ir.get_param(gm, m.target)
        shape = [-1 if d == m.dim else 1 for d in range(w.dim())]
        vec = vec.to(w.dtype).reshape(shape)
        ir.set_param(gm, m.target, w * vec if m.is_producer else w / vec)
    torch.testing.assert_close(gm(probe_ids), ref, atol=1e-5, rtol=0)


def test_vectors_follow_the_head_layout():
    g = build_channel_groups(canonical("llama"))["attn_heads:model.layers.0.self_attn"]
    vec = {m.name.split(".")[-2]: v for m, v in
           g.vectors({g.leaf("kv_heads").id: [2.0, 3.0]}).items()}
    assert torch.equal(vec["k_proj"], torch.tensor([2.0] * 16 + [3.0] * 16, dtype=torch.float64))
    assert torch.equal(vec["o_proj"], torch.tensor([2.0] * 32 + [3.0] * 32, dtype=torch.float64))
