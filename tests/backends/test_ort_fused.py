"""Fused ORT lowering: each rule's parity (fused ONNX vs the unfused export, prefill and decode
steps), which sites it rewrites, and the reasons it gives where it does not fire."""

from __future__ import annotations

import pytest
import torch

import compiler
from backends.genai import ORTCausalLM, export_genai
from backends.onnxruntime import ORTModel
from backends.ort_fused import lower_fused
from compiler.kv_cache import KVCacheGraph, decode_logits
from tests.backends.test_genai import ort_decode_logits
from tests.conftest import needs_stories, stories_model, tiny_compiled, tiny_model


def _ids(vocab: int, shape, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _export_both(cm, tmp_path):
    kv = cm.kv_cache()
    # every position's logits: each rule's parity on the whole prompt, not only its last row
    common = dict(config=cm.config, tokenizer_dir=None, logits="all")
    fused = export_genai(kv, tmp_path / "fused", **common)
    plain = export_genai(kv, tmp_path / "plain", fused=False, **common)
    return fused, plain


@pytest.mark.slow
# every family's fused export is also checked against its original model in test_genai
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_fused_export_equals_the_unfused_export_prefill_and_decode(family, tmp_path):
    cm = tiny_compiled(family)
    fused, plain = _export_both(cm, tmp_path)
    ids = _ids(256, (1, 11))
    got = ort_decode_logits(ORTCausalLM(fused), ids, prompt=7)
    ref = ort_decode_logits(ORTCausalLM(plain), ids, prompt=7)
    assert (got - ref).abs().max() <= 1e-4
    with torch.no_grad():
        orig = tiny_model(family)(input_ids=ids, use_cache=False).logits
    assert (got - orig).abs().max() <= 1e-4


def test_llama_norms_and_attention_lower_to_ort_kernels(tmp_path):
    cm = tiny_compiled("llama")
    _, stats = lower_fused(cm.kv_cache())
    # 2 layers: layer 0's input norm reads the embeddings (no add): a plain norm; the other 4
    # read a residual sum (the final one a sum nothing else reads): skip norms
    assert (stats.skip_rms_norms, stats.rms_norms, stats.attentions) == (4, 1, 2)
    assert stats.rotaries == 2  # rotary moved into the attention kernel (do_rotary)
    assert stats.notes == []
    fused, _ = _export_both(cm, tmp_path)
    ops = ORTModel(fused / "model.onnx").optimized_op_types()
    assert ops["GroupQueryAttention"] == 2
    assert ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["SimplifiedLayerNormalization"] == 1
    assert ops["Softmax"] == 0 and ops["Pow"] == 0 and ops["Neg"] == 0 and ops["Cos"] == 0
    # the kernel reads and writes [B, T, H*D]: no layout ops are left around it
    assert ops["Transpose"] == 0 and ops["Reshape"] == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: GQA and q/k/v biases
def test_fused_qkv_projection_feeds_attention_packed(family, tmp_path):
    cm = compiler.compile(tiny_model(family), ["fuse_linears"])
    kv = cm.kv_cache()
    gm, stats = lower_fused(kv)
    assert stats.packed_qkv == stats.attentions == 2
    ids = _ids(256, (2, 9))
    assert (decode_logits(KVCacheGraph(gm, kv.layers), ids, 5) - decode_logits(kv, ids, 5)) \
        .abs().max() <= 1e-5
    fused, plain = _export_both(cm, tmp_path)
    ops = ORTModel(fused / "model.onnx").optimized_op_types()
    # what is left split is each MLP's fused gate|up, one op per layer; q|k|v is not split
    assert ops["GroupQueryAttention"] == 2 and ops["Slice"] + ops["Split"] == 2
    one = ids[:1]
    got = ort_decode_logits(ORTCausalLM(fused), one, prompt=5)
    ref = ort_decode_logits(ORTCausalLM(plain), one, prompt=5)
    assert (got - ref).abs().max() <= 1e-4


def test_gpt2_layer_norms_with_residual_become_skip_layer_norm(tmp_path):
    cm = tiny_compiled("gpt2")
    _, stats = lower_fused(cm.kv_cache())
    assert stats.skip_layer_norms == 4 and stats.attentions == 2
    # layer 0's ln_1 reads token + position embeddings, a sum that broadcasts (positions are
    # [1, T, C]): it stays LayerNormalization, with a note; ln_f reads the last residual sum
    assert sum("layer_norm kept" in n for n in stats.notes) == 1


def test_fused_torch_graph_equals_the_kv_graph():
    cm = tiny_compiled("qwen2")
    kv = cm.kv_cache()
    gm, _ = lower_fused(kv)
    ids = _ids(256, (2, 9))
    assert (decode_logits(KVCacheGraph(gm, kv.layers), ids, 5) - decode_logits(kv, ids, 5)) \
        .abs().max() <= 1e-5


@needs_stories
@pytest.mark.slow
def test_pruned_padded_cache_keeps_generic_attention_with_the_reason(tmp_path):
    calib = [_ids(512, (4, 64), seed=s) for s in range(2)]
    cm = compiler.compile(stories_model(), ["structured_prune(ratio=0.25)"], calibration=calib)
    heads = {lay.kv_heads for lay in cm.kv_cache().layers}
    kv = cm.kv_cache(cache_heads=max(heads))
    _, stats = lower_fused(kv)
    padded = [lay for lay in kv.layers if lay.used_heads < lay.kv_heads]
    assert stats.attentions == len(kv.layers) - len(padded)
    assert sum("cache zero-padded" in n for n in stats.notes) == len(padded)


@needs_stories
@pytest.mark.slow
def test_fused_w8a8_export_equals_the_unfused_one(tmp_path):
    calib = [_ids(512, (4, 64), seed=s) for s in range(2)]
    cm = compiler.compile(stories_model(), ["smoothquant(alpha=0.5)", "insert_qdq(scheme=w8a8)"],
                          calibration=calib)
    fused, plain = _export_both(cm, tmp_path)
    ids = _ids(512, (1, 14))
    got = ort_decode_logits(ORTCausalLM(fused), ids, prompt=8)
    ref = ort_decode_logits(ORTCausalLM(plain), ids, prompt=8)
    assert (got - ref).abs().max() <= 1e-4
    ops = ORTModel(fused / "model.onnx").optimized_op_types()
    assert ops["GroupQueryAttention"] == 5 and ops["MatMulIntegerToFloat"] >= 35
    # stories260K's head size is 8: ORT's kernel rotates only multiples of 16, so the rotary
    # stays generic ops before the fused attention, and the notes say so
    _, stats = lower_fused(cm.kv_cache())
    assert stats.rotaries == 0
    assert sum("head size 8 is not a multiple of 16" in n for n in stats.notes) == 5
