"""Canonicalize: exact on every family and stories260K, raises norms, converts Conv1D, idempotent."""

import copy

import pytest
import torch

from compiler.ir import get_param, nodes_of, op_counts
from passes.canonicalize import Canonicalize
from tests.conftest import FAMILIES, needs_stories, stories_graph, tiny_graph

RMS_FAMILIES = {"llama", "qwen2", "mistral", "phi3", "gemma"}


def _max_diff(a, b, ids):
    with torch.no_grad():
        return float((a(ids) - b(ids)).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_canonicalize_is_exact_on_every_family(family, probe_ids):
    gm = tiny_graph(family)
    before = copy.deepcopy(gm)
    result = Canonicalize(untie_embeddings=True).run(gm, None)
    assert result.modified
    assert _max_diff(gm, before, probe_ids) <= 1e-5
    assert _max_diff(gm, before, probe_ids[:1, :5]) <= 1e-5


@pytest.mark.parametrize("family", sorted(RMS_FAMILIES))
def test_canonicalize_raises_written_out_rms_norm_to_one_op(family):
    gm = tiny_graph(family)
    Canonicalize().run(gm, None)
    counts = op_counts(gm)
    # 2 layers x 2 norms + final norm
    assert counts["rms_norm"] == 5
    assert counts["rsqrt"] == 0 and counts["pow"] == 0
    assert all(n.args[2] is not None for n in nodes_of(gm, torch.ops.aten.rms_norm.default))


def test_gemma_gain_offset_is_folded_into_the_norm_weight():
    gm = tiny_graph("gemma")
    raw = {n.target: get_param(gm, n).clone() for n in gm.graph.nodes if n.op == "get_attr"}
    Canonicalize().run(gm, None)
    norm = nodes_of(gm, torch.ops.aten.rms_norm.default)[0]
    w = norm.args[2]
    assert "plus1" in w.target
    original = raw[w.target.replace("_plus1", "")]
    torch.testing.assert_close(get_param(gm, w), original + 1.0, rtol=0, atol=0)


def test_gpt2_conv1d_becomes_linear_with_transposed_weight():
    gm = tiny_graph("gpt2")
    assert op_counts(gm)["addmm"] == 8
    Canonicalize().run(gm, None)
    counts = op_counts(gm)
    assert counts["addmm"] == 0
    assert counts["linear"] == 9  # 4 per block + lm_head
    c_attn = next(n for n in nodes_of(gm, torch.ops.aten.linear.default)
                  if "h.0.attn.c_attn" in n.args[1].target)
    assert tuple(get_param(gm, c_attn.args[1]).shape) == (192, 64)  # W: [out, in]


def test_untie_embeddings_gives_the_embedding_its_own_table():
    gm = tiny_graph("gpt2")  # GPT-2 ties wte and lm_head
    Canonicalize(untie_embeddings=True).run(gm, None)
    emb = nodes_of(gm, torch.ops.aten.embedding.default)
    wte = next(n for n in emb if n.args[0].target.endswith("weight_untied"))
    lm_head = nodes_of(gm, torch.ops.aten.linear.default)[-1]
    assert wte.args[0] is not lm_head.args[1]
    assert get_param(gm, wte.args[0]).data_ptr() != get_param(gm, lm_head.args[1]).data_ptr()


def test_canonicalize_twice_reports_unmodified():
    gm = tiny_graph("llama")
    Canonicalize().run(gm, None)
    again = Canonicalize().run(gm, None)
    assert again.modified is False
    assert again.preserved == frozenset({"*"})


def test_canonicalize_rejects_non_bool_option():
    with pytest.raises(ValueError, match="untie_embeddings"):
        Canonicalize(untie_embeddings="yes")


@needs_stories
def test_canonicalize_is_exact_on_stories260k():
    gm = stories_graph()
    before = copy.deepcopy(gm)
    Canonicalize(untie_embeddings=True).run(gm, None)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    assert _max_diff(gm, before, ids) <= 1e-5
    assert op_counts(gm)["rms_norm"] == 11
