"""KV-cache rewrite: prefill + single-token steps equal the full forward, for every family and
after every kind of pass; left padding; refusals with reasons."""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.errors import PreconditionError, UnsupportedModelError, VerificationError
from compiler.kv_cache import check_kv_cache, decode_logits, with_kv_cache
from tests.conftest import FAMILIES, needs_stories, stories_model, tiny_graph, tiny_model

aten = torch.ops.aten


def _ids(vocab: int, shape, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_steps_equal_the_original_models_forward(family):
    model = tiny_model(family)
    kv = with_kv_cache(tiny_graph(family))
    ids = _ids(256, (2, 11))
    got = decode_logits(kv, ids, prompt=7)  # 7-token prefill, then 4 one-token steps
    assert got.shape == (2, 11, model.config.vocab_size)
    assert (got - _hf_logits(model, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_rows_equal_their_unpadded_forward(family):
    model = tiny_model(family)
    kv = with_kv_cache(tiny_graph(family))
    ids = _ids(256, (2, 10), seed=5)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # row 1: 4 padding tokens, then 6 real ones
    got = decode_logits(kv, ids, prompt=6, attention_mask=mask)
    assert torch.isfinite(got).all()
    assert (got[0] - _hf_logits(model, ids[:1])[0]).abs().max() <= 1e-4
    assert (got[1, 4:] - _hf_logits(model, ids[1:, 4:])[0]).abs().max() <= 1e-4


def test_cache_holds_kv_heads_after_rotary_and_grows_by_one_per_step():
    kv = with_kv_cache(tiny_graph("llama"))  # 4 query heads, 2 kv heads, head_dim 16
    assert kv.num_layers == 2
    assert [(lay.kv_heads, lay.head_dim) for lay in kv.layers] == [(2, 16), (2, 16)]
    ids = _ids(256, (1, 5))
    _, past = kv(ids, torch.ones(1, 5, dtype=torch.long), kv.empty_cache(1))
    assert [tuple(p.shape) for p in past] == [(1, 2, 5, 16)] * 4
    _, past = kv(ids[:, :1], torch.ones(1, 6, dtype=torch.long), past)
    assert [tuple(p.shape) for p in past] == [(1, 2, 6, 16)] * 4


def test_positions_are_offset_by_the_past_length():
    # the same token at position 0 and at position 5 must give different logits (rotary)
    kv = with_kv_cache(tiny_graph("llama"))
    ids = _ids(256, (1, 6))
    a, _ = kv(ids[:, :1], torch.ones(1, 1, dtype=torch.long), kv.empty_cache(1))
    _, past = kv(ids[:, :5], torch.ones(1, 5, dtype=torch.long), kv.empty_cache(1))
    b, _ = kv(ids[:, :1], torch.ones(1, 6, dtype=torch.long), past)
    full = _hf_logits(tiny_model("llama"), torch.cat([ids[:, :5], ids[:, :1]], 1))
    assert (b[0, 0] - full[0, 5]).abs().max() <= 1e-4
    assert (a[0, 0] - full[0, 0]).abs().max() <= 1e-4
    assert (a - b).abs().max() > 1e-3


@needs_stories
def test_stories260k_prefill_and_steps_equal_hugging_face():
    model = stories_model()
    cm = compiler.compile(model, [])
    kv = cm.kv_cache()
    ids = _ids(512, (1, 24))
    got = decode_logits(kv, ids, prompt=16)
    assert (got - _hf_logits(model, ids)).abs().max() <= 1e-4


@needs_stories
@pytest.mark.slow
def test_stories260k_after_pruning_and_slicing_steps_equal_the_compressed_forward():
    model = stories_model()
    calib = [_ids(512, (4, 64), seed=s) for s in range(4)]
    cm = compiler.compile(model, ["structured_prune(ratio=0.25)", "slicegpt(sparsity=0.25)"],
                          calibration=calib)
    kv = cm.kv_cache()
    ids = _ids(512, (2, 20))
    got = decode_logits(kv, ids, prompt=12)
    assert (got - cm(ids)).abs().max() <= 1e-4
    # pruning removed kv heads in some layers: the cache has each layer's own count,
    # and padded to the largest for runtimes with one cache shape
    heads = [lay.kv_heads for lay in kv.layers]
    assert min(heads) < 4
    padded = cm.kv_cache(cache_heads=max(heads))
    assert {lay.kv_heads for lay in padded.layers} == {max(heads)}
    assert (decode_logits(padded, ids, prompt=12) - got).abs().max() <= 1e-5


@pytest.mark.parametrize("passes", [
    ["simplify_mask", "fuse_linears"],
    ["smoothquant(alpha=0.5)", "insert_qdq(scheme=w8a8)"],
    ["rptq_reorder(clusters=2)", "insert_qdq_clusters"],
    ["insert_qdq(scheme=w8a8_dynamic)"],
    ["insert_qdq(scheme=w4a16, group_size=32)"],
    ["rotation_invariant", "slicegpt_rotate"],
], ids=lambda p: "+".join(s.split("(")[0] for s in p))
def test_steps_equal_the_compiled_forward_after_passes(passes, calib_batches):
    cm = compiler.compile(tiny_model("llama"), passes, calibration=calib_batches)
    kv = cm.kv_cache()
    ids = _ids(256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    got = decode_logits(kv, ids, prompt=8, attention_mask=mask)
    assert (got[1] - cm(ids[1:])[0]).abs().max() <= 1e-4
    assert (got[0, 3:] - cm(ids[:1, 3:])[0]).abs().max() <= 1e-4


def test_a_wrong_rewrite_is_caught_by_the_check():
    kv = with_kv_cache(tiny_graph("llama"))
    # break the cache: read the past keys of layer 0 scaled by 1.01
    g = kv.graph_module.graph
    cat = next(n for n in g.nodes if n.op == "call_function" and n.target is aten.cat.default
               and n.args[1] == 2)
    with g.inserting_before(cat):
        scaled = g.call_function(aten.mul.Tensor, (cat.args[0][0], 1.01))
    cat.args = ([scaled, cat.args[0][1]], 2)
    kv.graph_module.recompile()
    with pytest.raises(VerificationError, match="decode steps differ"):
        check_kv_cache(kv, tiny_graph("llama"))


def test_rewrite_leaves_the_compiled_graph_untouched():
    gm = tiny_graph("llama")
    before = gm.code
    with_kv_cache(gm)
    assert gm.code == before


def test_sliding_window_mask_is_refused_naming_the_site():
    from compiler.frontend import tiny_config

    model = compiler.load_model(tiny_config("mistral", sliding_window=4))
    gm = compiler.trace(model, _ids(256, (2, 16)))
    with pytest.raises(UnsupportedModelError, match=r"attention 0 .*plain causal mask"):
        with_kv_cache(gm)


def test_graph_without_attention_is_refused():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.head = torch.nn.Linear(8, 16)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids))

    gm = compiler.trace(Bigram(), _ids(16, (2, 8)))
    with pytest.raises(UnsupportedModelError, match="no scaled_dot_product_attention"):
        with_kv_cache(gm)


def test_wrong_number_of_past_tensors_is_a_clear_error():
    kv = with_kv_cache(tiny_graph("llama"))
    ids = _ids(256, (1, 3))
    with pytest.raises(ValueError, match="2 attention layers and takes 4 past tensors"):
        kv(ids, torch.ones(1, 3, dtype=torch.long), kv.empty_cache(1)[:2])
    past = kv.empty_cache(1)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ seq\]"):
        kv(ids, torch.ones(1, 4, dtype=torch.long), past)
    past[1] = torch.zeros(1, 3, 0, 16)
    with pytest.raises(ValueError, match=r"past value of layer 0 .* must be \[1, 2, 0, 16\]"):
        kv(ids, torch.ones(1, 3, dtype=torch.long), past)


def test_a_graph_with_two_inputs_is_a_precondition_error():
    gm = with_kv_cache(tiny_graph("llama")).graph_module
    with pytest.raises(PreconditionError, match="this one has 6 inputs"):
        with_kv_cache(gm)


def test_cache_heads_below_a_layers_count_is_an_error():
    with pytest.raises(ValueError, match="cache_heads=1 is fewer"):
        with_kv_cache(tiny_graph("llama"), cache_heads=1)
