"""Generation on the compiled graph: greedy parity with Hugging Face, sampling rules, streaming,
end of sequence, and clear errors for bad options and prompts."""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.generation import SamplingOptions, TextPrinter, next_tokens
from tests.conftest import needs_stories, stories_model, tiny_model


def _ids(vocab: int, shape, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_cm():
    return compiler.compile(tiny_model("llama"), [])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_greedy_tokens_equal_hugging_face_generate(family):
    model = tiny_model(family)
    cm = compiler.compile(model, [])
    ids = _ids(256, (1, 6))
    ours = cm.generate(ids, max_new_tokens=16, eos_token_id=None)
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(ours, theirs)


@needs_stories
def test_stories260k_64_greedy_tokens_equal_hugging_face_generate():
    model = stories_model()
    cm = compiler.compile(model, [])
    prompt = torch.tensor([[1, 403, 407, 261, 378]])  # "Once upon a time"
    ours = cm.generate(prompt, max_new_tokens=64)
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=64, do_sample=False)
    assert ours.shape[1] == prompt.shape[1] + 64
    assert torch.equal(ours, theirs)


def test_batch_with_left_padding_generates_what_each_row_generates_alone(llama_cm):
    a, b = _ids(256, (1, 7), seed=1), _ids(256, (1, 4), seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    out = llama_cm.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    alone_a = llama_cm.generate(a, max_new_tokens=8, eos_token_id=None)
    alone_b = llama_cm.generate(b, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out[0, 7:], alone_a[0, 7:])
    assert torch.equal(out[1, 7:], alone_b[0, 4:])


def test_sampling_is_seeded_and_differs_from_greedy(llama_cm):
    ids = _ids(256, (1, 5))
    opts = dict(max_new_tokens=12, do_sample=True, temperature=1.5, seed=0, eos_token_id=None)
    first = llama_cm.generate(ids, **opts)
    assert torch.equal(first, llama_cm.generate(ids, **opts))
    assert not torch.equal(first, llama_cm.generate(ids, **{**opts, "seed": 1}))
    assert not torch.equal(first, llama_cm.generate(ids, max_new_tokens=12, eos_token_id=None))


def test_top_k_keeps_only_the_k_best_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    opts = SamplingOptions(do_sample=True, top_k=2)
    g = torch.Generator().manual_seed(0)
    drawn = {int(next_tokens(logits, opts, g)) for _ in range(200)}
    assert drawn == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    drawn = {int(next_tokens(logits, SamplingOptions(do_sample=True, top_p=0.7), g))
             for _ in range(300)}
    assert drawn == {0, 1}
    # a top_p below the best token's probability keeps that token alone
    drawn = {int(next_tokens(logits, SamplingOptions(do_sample=True, top_p=0.2), g))
             for _ in range(50)}
    assert drawn == {0}


def test_generation_stops_at_end_of_sequence_and_pads_finished_rows(llama_cm):
    ids = _ids(256, (2, 5))
    free = llama_cm.generate(ids, max_new_tokens=10, eos_token_id=None)[:, 5:].tolist()
    eos = free[0][2]  # row 0's third new token becomes the end-of-sequence token
    out = llama_cm.generate(ids, max_new_tokens=10, eos_token_id=eos)[:, 5:].tolist()
    for row, alone in zip(out, free):
        stop = (alone + [eos]).index(eos)  # where this row emits eos on its own
        assert row[: stop + 1] == alone[: stop + 1][: len(row)]
        assert all(t == eos for t in row[stop:])
    assert len(out[0]) <= 10


def test_streamer_receives_each_new_token_in_order(llama_cm):
    seen: list[int] = []
    ids = _ids(256, (1, 4))
    out = llama_cm.generate(ids, max_new_tokens=6, eos_token_id=None,
                            streamer=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 4:].tolist()


def test_hugging_face_style_streamer_gets_prompt_then_tokens_then_end(llama_cm):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    ids = _ids(256, (1, 4))
    out = llama_cm.generate(ids, max_new_tokens=3, eos_token_id=None, streamer=rec)
    assert rec.calls[0] == ids.tolist()
    assert rec.calls[1:4] == [[t] for t in out[0, 4:].tolist()]
    assert rec.calls[-1] == "end"


def test_text_printer_prints_the_decoded_continuation():
    import io

    class Tok:  # decodes ids as letters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    buf = io.StringIO()
    p = TextPrinter(Tok(), file=buf, skip_prompt=False)
    p.put(torch.tensor([[0, 1]]))
    p.put(torch.tensor([2]))
    p.put(torch.tensor([3]))
    p.end()
    assert buf.getvalue() == "abcd\n"


def test_unknown_or_invalid_option_is_a_clear_error(llama_cm):
    ids = _ids(256, (1, 4))
    with pytest.raises(ValueError, match="unknown generation option.*top_z"):
        llama_cm.generate(ids, top_z=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        llama_cm.generate(ids, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        llama_cm.generate(ids, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        llama_cm.generate(ids, max_new_tokens=-1)


def test_prompt_longer_than_the_context_is_a_clear_error(llama_cm):
    ctx = llama_cm.context_length  # 512 in the tiny config
    with pytest.raises(ValueError, match=f"prompt has {ctx} tokens .* context length is {ctx}"):
        llama_cm.generate(torch.zeros(1, ctx, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="non-empty integer tensor"):
        llama_cm.generate(torch.zeros(1, 0, dtype=torch.long))


def test_generation_reports_prefill_time_and_decode_speed(llama_cm):
    llama_cm.generate(_ids(256, (1, 8)), max_new_tokens=5, eos_token_id=None)
    st = llama_cm.generation_stats
    assert st.prompt_tokens == 8 and st.new_tokens == 5
    assert st.prefill_seconds > 0 and st.decode_tokens_per_second > 0
