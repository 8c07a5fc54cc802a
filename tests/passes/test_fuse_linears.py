"""FuseLinears: exact on llama/OPT/GPT-2, linears per block reduced, idempotent, preconditions,
quantizes and analyses on the fused graph, ONNX export parity."""

from __future__ import annotations

import pytest
import torch

from compiler import ir
from compiler.depgraph import build_channel_groups
from compiler.errors import PipelineError, PreconditionError
from compiler.pass_base import PassContext
from compiler.pass_manager import validate_order, verify_graph
from passes import make_pass, register
from passes.canonicalize import Canonicalize, canonicalize
from passes.fuse_linears import FuseLinears, candidate_groups
from passes.insert_qdq import InsertQDQ
from tests.conftest import tiny_graph

ATOL = 1e-4

# linears per decoder block before -> after, and LM head (1) outside the blocks; 2 blocks each.
# llama: q, k, v, o, gate, up, down (7) -> qkv, o, gate_up, down (4)
# opt:   q, k, v, out, fc1, fc2 (6)     -> qkv, out, fc1, fc2 (4)
# gpt2:  c_attn (already fused), c_proj, c_fc, mlp.c_proj (4) -> unchanged
EXPECTED = {"llama": (7, 4, 4), "opt": (6, 4, 2), "gpt2": (4, 4, 0)}


def _graph(family: str):
    return canonicalize(tiny_graph(family))


def _linears_per_block(gm) -> dict[int, int]:
    per: dict[int, int] = {}
    for n in ir.nodes_of(gm, ir.LINEAR):
        b = ir.block_index(n)
        if b is not None:
            per[b] = per.get(b, 0) + 1
    return per


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_fusion_is_exact_and_reduces_linears_per_block(family, probe_ids):
    gm = _graph(family)
    before, after, groups = EXPECTED[family]
    assert _linears_per_block(gm) == {0: before, 1: before}
    with torch.no_grad():
        ref = gm(probe_ids)
    res = FuseLinears().run(gm, PassContext())
    verify_graph(gm, probe_ids)
    with torch.no_grad():
        out = gm(probe_ids)
    assert (out - ref).abs().max().item() <= ATOL
    assert _linears_per_block(gm) == {0: after, 1: after}
    assert res.stats["groups_fused"] == groups
    assert res.modified is (groups > 0)
    assert res.notes == []
    # fusion moves weights, it does not add or drop any
    if groups:
        assert res.stats["params_before"] == res.stats["params_after"]


def test_llama_fused_sites_and_split_sizes():
    gm = _graph("llama")
    FuseLinears().run(gm)
    sites = [ir.site(n) for n in ir.nodes_of(gm, ir.LINEAR) if ir.block_index(n) == 0]
    assert sites == [
        "model.layers.0.self_attn.q_proj+k_proj+v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj+up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    qkv = ir.nodes_of(gm, ir.LINEAR)[0]
    w = ir.get_param(gm, ir.linear_parts(qkv)[1])
    # q: 4 heads x 16, k and v: 2 kv heads x 16 each (GQA)
    assert tuple(w.shape) == (64 + 32 + 32, 64)
    slices = sorted((u.args[2], u.args[3]) for u in qkv.users)
    assert slices[:2] == [(0, 64), (64, 96)] and slices[2][0] == 96
    assert ir.op_counts(gm)["slice"] >= 2 * (3 + 2)


def test_opt_biases_are_stacked_in_member_order():
    gm = _graph("opt")
    q_b = {str(n.target): ir.get_param(gm, n).clone() for n in gm.graph.nodes
           if n.op == "get_attr" and "layers.0.self_attn" in str(n.target) and "_proj.bias" in str(n.target)}
    FuseLinears().run(gm)
    fused = next(n for n in ir.nodes_of(gm, ir.LINEAR) if "+" in ir.site(n))
    b = ir.linear_parts(fused)[2]
    assert b is not None
    order = ir.site(fused).rsplit(".", 1)[1].split("+")
    expected = torch.cat([q_b[f"model.model.decoder.layers.0.self_attn.{m}.bias"] for m in order])
    assert torch.equal(ir.get_param(gm, b), expected)


def test_missing_bias_joins_a_biased_group_through_zeros():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Linear(8, 4, bias=True)
            self.b = torch.nn.Linear(8, 3, bias=False)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=-1)

    gm = torch.export.export(TwoHeads(), (torch.randn(2, 8),)).module()
    x = torch.randn(2, 8)
    ref = gm(x)
    res = FuseLinears().run(gm)
    assert res.stats["groups_fused"] == 1
    assert len(ir.nodes_of(gm, ir.LINEAR)) == 1
    assert torch.allclose(gm(x), ref, atol=1e-6, rtol=0)
    b = ir.linear_parts(ir.nodes_of(gm, ir.LINEAR)[0])[2]
    assert torch.equal(ir.get_param(gm, b)[4:], torch.zeros(3))


def test_group_with_different_in_features_is_skipped_with_a_note():
    gm = _graph("llama")
    (g, *_) = candidate_groups(gm)
    # make k_proj read a different width by swapping in a weight of another in-feature size
    k = g.linears[1]
    w = ir.linear_parts(k)[1]
    ir.set_param(gm, w, torch.zeros(32, 48))
    from passes.fuse_linears import RULES

    assert "in-features differ" in RULES[0].check(gm, g)


def test_second_run_is_a_no_op():
    gm = _graph("llama")
    FuseLinears().run(gm)
    code = gm.code
    res = FuseLinears().run(gm)
    assert res.modified is False
    assert res.stats["groups_fused"] == 0
    assert gm.code == code


def test_quantized_graph_is_refused():
    gm = _graph("llama")
    InsertQDQ(scheme="w8a8_dynamic").run(gm)
    with pytest.raises(PreconditionError, match="before insert_qdq"):
        FuseLinears().run(gm)


def test_requires_canonical_in_pipeline_order():
    ctx = PassContext()
    with pytest.raises(PipelineError):
        validate_order([FuseLinears()], ctx)
    validate_order([Canonicalize(), FuseLinears()], PassContext())


def test_registry_name_and_option_validation():
    register(FuseLinears)  # idempotent; passes/__init__.py registers it too once wired
    assert isinstance(make_pass("fuse_linears"), FuseLinears)
    assert make_pass("fuse_linears(min_group=3)").min_group == 3
    with pytest.raises(ValueError, match="min_group"):
        FuseLinears(min_group=1)


def test_min_group_three_fuses_qkv_only():
    gm = _graph("llama")
    res = FuseLinears(min_group=3).run(gm)
    assert res.stats["groups_fused"] == 2  # q/k/v of each block; gate/up (2) left alone
    assert _linears_per_block(gm) == {0: 5, 1: 5}


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w4a16"])
def test_insert_qdq_quantizes_the_fused_linear(scheme, probe_ids):
    gm = _graph("llama")
    FuseLinears().run(gm)
    res = InsertQDQ(scheme=scheme, group_size=32).run(gm)
    # 4 linears per block x 2 blocks; the LM head stays float
    assert res.stats["linears_quantized"] == 8
    fused = next(n for n in ir.nodes_of(gm, ir.LINEAR) if "q_proj+k_proj+v_proj" in ir.site(n))
    w = ir.linear_parts(fused)[1]
    assert w.op == "call_function" and "dequantize" in ir.op_name(w)
    if scheme == "w8a8_dynamic":
        # one activation quantizer per fused linear: 4 per block
        assert ir.op_counts(gm)["quantized_decomposed.quantize_per_token"] == 8
    verify_graph(gm, probe_ids)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_channel_groups_build_on_the_fused_graph(family):
    gm = _graph(family)
    FuseLinears().run(gm)
    cg = build_channel_groups(gm)
    assert not any(g.opaque for g in cg)
    assert sum(1 for g in cg if g.name.startswith("attn_heads:")) == 2


@pytest.mark.slow
def test_fused_graph_exports_to_onnx_with_parity(tmp_path, probe_ids):
    from backends.onnxruntime import ORTModel, check_parity, export_onnx

    gm = _graph("opt")
    FuseLinears().run(gm)
    path = export_onnx(gm, tmp_path / "fused.onnx")
    rep = check_parity(gm, ORTModel(path, threads=1), [probe_ids, probe_ids[:1, :7]], atol=ATOL)
    assert rep.ok
