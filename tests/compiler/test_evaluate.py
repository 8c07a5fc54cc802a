"""Tests of compiler.evaluate.perplexity: hand computation, model kinds, errors, stories260K."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compiler import data
from compiler.errors import DataError
from compiler.evaluate import PerplexityResult, perplexity
from tests.conftest import (
    STORIES,
    needs_stories,
    stories_graph,
    stories_model,
    tiny_graph,
    tiny_model,
)

VOCAB = 5


class Bigram(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: a model whose perplexity is easy to compute by hand."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g))

    def forward(self, ids):
        return self.table[ids]


def hand_nll(table: torch.Tensor, windows: torch.Tensor) -> float:
    t = table.double().tolist()
    total, count = 0.0, 0
    for row in windows.tolist():
        for a, b in itertools.pairwise(row):
            logz = math.log(sum(math.exp(v) for v in t[a]))
            total += logz - t[a][b]
            count += 1
    return total / count


@pytest.fixture
def windows():
    return torch.randint(0, VOCAB, (7, 6), generator=torch.Generator().manual_seed(3))


def test_perplexity_equals_hand_computation(windows):
    model = Bigram()
    r = perplexity(model, windows, batch_size=3, progress=False)
    expected = hand_nll(model.table.detach(), windows)
    assert r.nll_mean == pytest.approx(expected, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(expected), rel=1e-6)
    assert (r.n_windows, r.window, r.scored_tokens) == (7, 6, 35)


def test_perplexity_does_not_depend_on_batch_size(windows):
    model = Bigram()
    a = perplexity(model, windows, batch_size=1, progress=False)
    b = perplexity(model, windows, batch_size=7, progress=False)
    assert a.nll_mean == pytest.approx(b.nll_mean, rel=1e-12)


def test_uniform_model_has_perplexity_equal_to_vocab(windows):
    r = perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), windows, progress=False)
    assert r.ppl == pytest.approx(VOCAB, rel=1e-6)


def test_accepts_hf_outputs_tuples_and_numpy_logits(windows):
    model = Bigram()
    ref = perplexity(model, windows, progress=False).ppl

    class Out:
        def __init__(self, logits):
            self.logits = logits

    variants = [
        lambda ids: Out(model(ids)),
        lambda ids: (model(ids), None),
        lambda ids: model(ids).detach().numpy(),  # like an ONNX Runtime session wrapper
        lambda ids: model(ids).half(),
    ]
    for fn in variants[:3]:
        assert perplexity(fn, windows, progress=False).ppl == pytest.approx(ref, rel=1e-6)
    assert perplexity(variants[3], windows, progress=False).ppl == pytest.approx(ref, rel=1e-2)


def test_hf_model_and_traced_graph_agree_on_tiny_llama():
    model = tiny_model("llama")
    w = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    a = perplexity(model, w, progress=False)
    b = perplexity(tiny_graph("llama"), w, progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    assert 100 < a.ppl < 1000  # random init over 256 tokens: about uniform


def test_token_ids_outside_vocab_raise_clear_error(windows):
    bad = windows.clone()
    bad[0, 1] = VOCAB
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        perplexity(Bigram(), bad, progress=False, vocab_size=VOCAB)
    # without a declared vocabulary, the logits' width is the check
    with pytest.raises(DataError, match="outside the model's vocabulary of 5 logits"):
        perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), bad, progress=False)
    with pytest.raises(DataError, match=r"\[0, 256\)"):
        perplexity(tiny_model("llama"), torch.full((1, 4), 300), progress=False)
    with pytest.raises(DataError, match="outside"):
        perplexity(Bigram(), windows - 1, progress=False)


def test_bad_windows_and_logits_raise():
    with pytest.raises(ValueError, match=">= 2"):
        perplexity(Bigram(), torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="no windows"):
        perplexity(Bigram(), torch.zeros(0, 4, dtype=torch.long), progress=False)
    with pytest.raises(DataError, match="integer tensor"):
        perplexity(Bigram(), torch.zeros(3, 4), progress=False)
    with pytest.raises(DataError, match="expected \\[batch, seq, vocab\\]"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], VOCAB), torch.zeros(2, 4, dtype=torch.long),
                   progress=False)


def test_result_str_and_relative_change():
    r = PerplexityResult(ppl=4.2149, nll_mean=math.log(4.2149), n_windows=256, window=256,
                         scored_tokens=65280)
    assert str(r) == "ppl 4.21 (256 windows x 256 tokens, 65,280 scored tokens)"
    base = PerplexityResult(ppl=4.0, nll_mean=math.log(4.0), n_windows=256, window=256,
                            scored_tokens=65280)
    assert r.relative_change(base) == pytest.approx(0.053725)
    assert r.to_dict()["scored_tokens"] == 65280


def test_perplexity_prints_nothing(windows, capsys):
    perplexity(Bigram(), windows, progress=False)
    perplexity(Bigram(), windows, progress=True)  # not a terminal under pytest: no bar
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


@needs_stories
def test_stories260k_perplexity_on_first_windows_is_low_and_graph_agrees():
    w = data.eval_windows_from_spec("tinystories:16x256", STORIES)
    hf = perplexity(stories_model(), w, progress=False)
    gm = perplexity(stories_graph(), w, progress=False)
    assert 2 < hf.ppl < 8
    assert abs(gm.ppl / hf.ppl - 1) < 1e-3
