"""InsertQDQ: equals an explicit fake-quant reference, op counts, idempotence, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.errors import PreconditionError
from compiler.pass_base import PassContext
from compiler.pass_manager import validate_order, verify_graph
from compiler.qdq import annotate, annotate_linears, is_lm_head
from passes.canonicalize import Canonicalize, canonicalize
from passes.insert_qdq import InsertQDQ
from tests.conftest import tiny_graph, tiny_model

qd = torch.ops.quantized_decomposed

# Tolerance of graph vs. explicit fake-quant reference (fp32 logits of magnitude ~1). Both sides
# round the same values the same way; what is left is float op order (HF eager vs ATen graph),
# which can move a value across a rounding boundary only by chance.
ATOL = 1e-4


def _graph(family: str = "llama"):
    return canonicalize(tiny_graph(family))


# ----------------------------------------------------------------------------- reference


def _fq_weight_int8(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / s[:, None]).clamp(-127, 127) * s[:, None]


def _fq_weight_int4(w: torch.Tensor, g: int, symmetric: bool) -> torch.Tensor:
    o, i = w.shape
    wg = w.reshape(o, i // g, g)
    if symmetric:
        s = wg.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
        return (torch.round(wg / s).clamp(-8, 7) * s).reshape(o, i)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-8)
    zp = (-8 - torch.round(lo / s)).clamp(-8, 7)
    q = (torch.round(wg / s) + zp).clamp(-8, 7)
    return ((q - zp) * s).reshape(o, i)


def _fq_act_static(x: torch.Tensor, absmax: float) -> torch.Tensor:
    s = max(absmax, 1e-8) / 127
    return torch.round(x * (1.0 / s)).clamp(-128, 127) * s


def _fq_act_per_token(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
    return torch.round(x * (1.0 / s)).clamp(-128, 127) * s


def _quant_linears(model, lm_head: bool):
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (lm_head or name != "lm_head"):
            out[name] = mod
    return out


def _reference_logits(family, scheme, probe, calib, *, lm_head=False, group_size=32,
                      symmetric=False):
    """The tiny HF model in eager mode, weights fake-quantized by hand, inputs fake-quantized
    by forward pre-hooks (static scales from abs-max hooks over the calibration batches)."""
    model = copy.deepcopy(tiny_model(family))
    linears = _quant_linears(model, lm_head)
    absmax: dict[str, float] = {}
    if scheme == "w8a8":
        hooks = [
            mod.register_forward_pre_hook(
                lambda m, args, name=name: absmax.__setitem__(
                    name, max(absmax.get(name, 0.0), float(args[0].abs().max()))))
            for name, mod in linears.items()
        ]
        with torch.no_grad():
            for b in calib:
                model(input_ids=b, use_cache=False)
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name, mod in linears.items():
            w = mod.weight.data
            mod.weight.data = (_fq_weight_int4(w, group_size, symmetric) if scheme == "w4a16"
                               else _fq_weight_int8(w))
            if scheme == "w8a8":
                mod.register_forward_pre_hook(
                    lambda m, args, name=name: (_fq_act_static(args[0], absmax[name]),))
            elif scheme == "w8a8_dynamic":
                mod.register_forward_pre_hook(lambda m, args: (_fq_act_per_token(args[0]),))
        return model(input_ids=probe, use_cache=False).logits


def _run(gm, calib=None, **opts):
    return InsertQDQ(**opts).run(gm, PassContext(calibration=calib))


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic"])
def test_w8a8_equals_explicit_fake_quant_reference(family, scheme, probe_ids, calib_batches):
    gm = _graph(family)
    fp32 = gm(probe_ids)
    # the reference's static scales are the abs-max (act_range="max"); the other range
    # estimators have their reference tests in test_act_range.py
    _run(gm, calib_batches, scheme=scheme, **({"act_range": "max"} if scheme == "w8a8" else {}))
    got = gm(probe_ids)
    ref = _reference_logits(family, scheme, probe_ids, calib_batches)
    assert (got - ref).abs().max() <= ATOL
    # the reference is far from fp32: the comparison is not vacuous
    assert (fp32 - ref).abs().max() > 20 * ATOL


@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a16_equals_groupwise_fake_quant_reference(symmetric, probe_ids):
    gm = _graph("llama")
    fp32 = gm(probe_ids)
    _run(gm, scheme="w4a16", group_size=32, symmetric=symmetric)
    got = gm(probe_ids)
    ref = _reference_logits("llama", "w4a16", probe_ids, None, symmetric=symmetric)
    assert (got - ref).abs().max() <= ATOL
    assert (fp32 - ref).abs().max() > 20 * ATOL


def test_quantized_lm_head_equals_reference(probe_ids, calib_batches):
    gm = _graph("llama")
    _run(gm, calib_batches, scheme="w8a8_dynamic", quantize_lm_head=True)
    ref = _reference_logits("llama", "w8a8_dynamic", probe_ids, None, lm_head=True)
    assert (gm(probe_ids) - ref).abs().max() <= ATOL


# ----------------------------------------------------------------------------- structure


def test_w8a8_static_op_counts_and_integer_weights(calib_batches, probe_ids):
    gm = _graph("llama")
    n_linear = ir.op_counts(gm)["linear"]
    res = _run(gm, calib_batches, scheme="w8a8")
    counts = ir.op_counts(gm)
    assert counts["linear"] == n_linear  # linears stay; only their inputs change
    assert counts["quantized_decomposed.dequantize_per_channel"] == n_linear - 1  # not lm_head
    # one activation Q/DQ per distinct input tensor: q/k/v share one, gate/up share one
    layers = 2
    assert counts["quantized_decomposed.quantize_per_tensor"] == 4 * layers
    assert counts["quantized_decomposed.dequantize_per_tensor"] == 4 * layers
    assert res.stats["linears_quantized"] == n_linear - 1
    for n in ir.nodes_of(gm, qd.dequantize_per_channel.default):
        assert ir.get_param(gm, n.args[0]).dtype == torch.int8
    # the float weights of quantized linears are gone
    float_weights = [k for k, v in gm.named_parameters() if v.dim() == 2 and v.is_floating_point()]
    assert sorted(float_weights) == ["model.lm_head.weight", "model.model.embed_tokens.weight"]
    assert res.stats["param_bytes_after"] < 0.55 * res.stats["param_bytes_before"]
    verify_graph(gm, probe_ids, where="insert_qdq")


def test_w8a8_dynamic_inserts_per_token_qdq(calib_batches):
    gm = _graph("llama")
    _run(gm, scheme="w8a8_dynamic")
    counts = ir.op_counts(gm)
    assert counts["quantized_decomposed.choose_qparams_per_token"] == 8
    assert counts["quantized_decomposed.quantize_per_token"] == 8
    assert counts["quantized_decomposed.dequantize_per_token"] == 8
    assert "quantized_decomposed.quantize_per_tensor" not in counts


def test_w4a16_stores_int4_range_in_int8_with_group_scales():
    gm = _graph("llama")
    _run(gm, scheme="w4a16", group_size=32)
    dqs = ir.nodes_of(gm, qd.dequantize_per_channel_group.default)
    assert len(dqs) == 14
    for n in dqs:
        q, s, zp = (ir.get_param(gm, a) for a in n.args[:3])
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
        assert s.shape == (q.shape[0], q.shape[1] // 32)
        assert zp.dtype == torch.int8 and zp.shape == s.shape
        assert n.args[6] == 32
    assert "quantized_decomposed.quantize_per_tensor" not in ir.op_counts(gm)  # A16


def test_lm_head_skipped_with_note_by_default_and_quantized_on_request(calib_batches):
    gm = _graph("llama")
    res = _run(gm, scheme="w8a8_dynamic")
    assert any(n.startswith("lm_head: skipped") for n in res.notes)
    head = [n for n in ir.nodes_of(gm, ir.LINEAR) if is_lm_head(n)]
    assert len(head) == 1 and head[0].args[1].op == "get_attr"
    gm = _graph("llama")
    _run(gm, scheme="w8a8_dynamic", quantize_lm_head=True)
    head = [n for n in ir.nodes_of(gm, ir.LINEAR) if is_lm_head(n)]
    assert head[0].args[1].target is qd.dequantize_per_channel.default


def test_include_and_exclude_patterns_select_sites():
    gm = _graph("llama")
    res = _run(gm, scheme="w4a16", group_size=32, exclude=["*.mlp.*"])
    assert res.stats["linears_quantized"] == 8  # 4 attention projections x 2 layers
    assert sum("matched by an exclude pattern" in n for n in res.notes) == 6
    gm = _graph("llama")
    res = _run(gm, scheme="w4a16", group_size=32, include=["model.layers.0.*"])
    assert res.stats["linears_quantized"] == 7
    anns = annotate_linears(_graph("llama"), "w8a8", include=["*.down_proj:in"])
    assert [a.site for a in anns if a.quantized] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_annotation_is_pure_and_decides_every_linear():
    gm = _graph("llama")
    code = gm.code
    anns = annotate(gm, "w8a8")
    assert gm.code == code
    assert len([a for a in anns if a.kind == "linear"]) == 15
    assert all(a.activation is not None for a in anns if a.quantized)
    emb = [a for a in anns if a.kind == "embedding"]
    assert len(emb) == 1 and not emb[0].quantized


def test_tied_embedding_and_lm_head_share_one_int8_table(probe_ids):
    gm = _graph("gpt2")  # GPT-2 ties wte and lm_head
    res = _run(gm, scheme="w8a8_dynamic", quantize_lm_head=True, quantize_embeddings=True)
    assert res.stats["embeddings_quantized"] == 2  # wte and wpe
    emb = ir.nodes_of(gm, ir.EMBEDDING)[0]
    head = next(n for n in ir.nodes_of(gm, ir.LINEAR) if is_lm_head(n))
    assert emb.args[0] is head.args[1]  # one dequantize of one int8 table
    assert torch.isfinite(gm(probe_ids)).all()


# ----------------------------------------------------------------------------- idempotence


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic", "w4a16"])
def test_second_run_modifies_nothing(scheme, calib_batches, probe_ids):
    gm = _graph("llama")
    _run(gm, calib_batches, scheme=scheme, group_size=32, quantize_lm_head=True,
         quantize_embeddings=True)
    code, out = gm.code, gm(probe_ids)
    res = _run(gm, calib_batches, scheme=scheme, group_size=32, quantize_lm_head=True,
               quantize_embeddings=True)
    assert res.modified is False and res.stats["sites_quantized"] == 0
    assert gm.code == code
    assert torch.equal(gm(probe_ids), out)
    # the sites it found quantized are named, not silently passed over
    assert any("already quantized" in n and f"no {scheme} quantization added" in n
               for n in res.notes), res.notes


# ----------------------------------------------------------------------------- bad input


def test_static_scheme_without_calibration_is_a_precondition_error():
    with pytest.raises(PreconditionError, match="calibration"):
        _run(_graph("llama"), None, scheme="w8a8")
    with pytest.raises(PreconditionError, match="calibrated"):
        validate_order([Canonicalize(), InsertQDQ(scheme="w8a8")], PassContext())
    # the dynamic and weight-only schemes need no data
    validate_order([Canonicalize(), InsertQDQ(scheme="w8a8_dynamic")], PassContext())


def test_group_size_not_dividing_in_features_names_the_site():
    gm = _graph("llama")  # hidden 64
    code = gm.code
    with pytest.raises(PreconditionError, match=r"model\.layers\.0\.self_attn\.q_proj.*128"):
        _run(gm, scheme="w4a16", group_size=128)
    assert gm.code == code  # decided before mutating: nothing changed


@pytest.mark.parametrize("opts, match", [
    ({"scheme": "w3a8"}, "unknown scheme"),
    ({"scheme": "w4a16", "group_size": 48}, "group_size"),
    ({"scheme": "w4a16", "group_size": 256}, "group_size"),
    ({"scheme": "w8a8", "symmetric": False}, "symmetric"),
])
def test_invalid_options_are_rejected(opts, match):
    with pytest.raises(ValueError, match=match):
        InsertQDQ(**opts)


def test_pass_declares_its_contract():
    p = InsertQDQ(scheme="w4a16")
    assert p.name == "insert_qdq" and p.exact is False
    assert p.requires == {"canonical"} and "quantized" in p.establishes
    assert InsertQDQ(scheme="w8a8").requires == {"canonical", "calibrated"}
    assert p.options()["scheme"] == "w4a16" and p.options()["symmetric"] is False
