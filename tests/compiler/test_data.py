"""Tests of compiler.data: data dir resolution, tokenizer, text loaders, windows, specs, caching."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from compiler import data
from compiler.errors import DataError
from tests.conftest import STORIES, needs_data, needs_stories


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path_factory, monkeypatch):
    # Tests must not write into the user's ~/.cache.
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path_factory.mktemp("fxc-cache")))


class CharTokenizer:
    """A stand-in tokenizer: one id per character (no backend_tokenizer attribute)."""

    bos_token_id = 1

    def __init__(self, tag: str = "char-v1", fail: bool = False):
        self._fxcompress_hash = tag
        self.fail = fail
        self.calls = 0

    def __call__(self, text, add_special_tokens=True):
        if self.fail:
            raise AssertionError("tokenizer called although the cache should have answered")
        self.calls += 1
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 256 for c in text]}


@pytest.fixture
def fake_data(tmp_path):
    """A data dir with small synthetic files in the shared layout."""
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    (tmp_path / "wikitext-2-raw-v1" / "wiki.test.raw").write_text(" \n = Title = \n \n Body .\n")
    (tmp_path / "c4").mkdir()
    rows = [{"text": "first doc", "url": "u1"}, {"text": "second\ndoc", "url": "u2"}]
    (tmp_path / data.DATASETS["c4"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tinystories").mkdir()
    stories = "".join(f"Story {i} line.\nMore of story {i}.\n\n" for i in range(10))
    (tmp_path / data.DATASETS["tinystories"]).write_text(stories)
    return tmp_path


# --- data dir -------------------------------------------------------------------------------


def test_data_dir_prefers_override_then_env(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv(data.ENV_DATA, str(b))
    assert data.data_dir(a) == a
    assert data.data_dir() == b


def test_data_dir_absent_is_none_and_require_raises_naming_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(data.ENV_DATA, str(missing))
    assert data.data_dir() is None
    assert data.data_dir(missing) is None
    with pytest.raises(DataError, match="nowhere.*FXCOMPRESS_DATA"):
        data.require_data_dir(missing)
    with pytest.raises(DataError, match="nowhere"):
        data.load_text("wikitext2")


def test_missing_data_file_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"wiki\.test\.raw"):
        data.load_text("wikitext2", data_dir=tmp_path)


def test_unknown_dataset_and_split_are_rejected(fake_data):
    with pytest.raises(DataError, match="unknown dataset 'ptb'"):
        data.load_text("ptb", data_dir=fake_data)
    with pytest.raises(DataError, match="unknown split"):
        data.load_text("c4", "train", data_dir=fake_data)


# --- text loaders ---------------------------------------------------------------------------


def test_wikitext_is_loaded_as_is(fake_data):
    raw = (fake_data / data.DATASETS["wikitext2"]).read_text()
    assert data.load_text("WikiText-2", data_dir=fake_data) == raw


def test_c4_texts_are_joined_with_blank_lines(fake_data):
    assert data.load_text("c4", "calib", data_dir=fake_data) == "first doc\n\nsecond\ndoc"


def test_malformed_c4_line_names_the_file_and_line(fake_data):
    (fake_data / data.DATASETS["c4"]).write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match=r"jsonl:2"):
        data.load_text("c4", data_dir=fake_data)


def test_tinystories_split_cuts_after_first_blank_line_past_midpoint(fake_data):
    text = (fake_data / data.DATASETS["tinystories"]).read_text()
    ev = data.load_text("tinystories", "eval", data_dir=fake_data)
    cal = data.load_text("tinystories", "calib", data_dir=fake_data)
    assert ev + cal == text
    assert len(ev) >= len(text) // 2
    assert ev.endswith("\n\n") and cal.startswith("Story 6 line.")  # midpoint = start of story 5
    # the cut is the *first* blank line at or after the midpoint
    assert "\n\n" not in text[len(text) // 2 : len(ev) - 1]


def test_tinystories_without_blank_line_after_midpoint_raises():
    with pytest.raises(DataError, match="blank line"):
        data.split_tinystories("a\n\nb" + "c" * 100)


@needs_data
def test_real_tinystories_halves_are_disjoint_and_calib_starts_a_story():
    text = data.dataset_path("tinystories").read_text(encoding="utf-8")
    ev, cal = data.load_text("tinystories", "eval"), data.load_text("tinystories", "calib")
    assert ev + cal == text
    assert abs(len(ev) - len(text) / 2) < 5000
    assert ev.endswith("\n\n") and cal[0].isalnum()


# --- tokenizer ------------------------------------------------------------------------------


@needs_stories
def test_stories_tokenizer_is_fast_with_bos_from_config():
    from transformers import PreTrainedTokenizerFast

    tok = data.load_tokenizer(STORIES)
    assert type(tok) is PreTrainedTokenizerFast
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = data.tokenize("Once upon a time", tok, cache=False).tolist()
    assert 1 not in ids and ids == tok("Once upon a time", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Once upon a time"


@needs_stories
def test_bos_comes_from_config_json_when_tokenizer_config_lacks_it(tmp_path):
    shutil.copy(STORIES / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1}))
    assert data.load_tokenizer(tmp_path).bos_token_id == 1


@needs_stories
def test_conflicting_bos_ids_raise(tmp_path):
    shutil.copy(STORIES / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2}))
    with pytest.raises(DataError, match="bos_token_id=2"):
        data.load_tokenizer(tmp_path)


def test_missing_tokenizer_json_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        data.load_tokenizer(tmp_path)


# --- tokenization and caches ----------------------------------------------------------------


def test_tokenize_uses_the_disk_cache_keyed_by_text_and_tokenizer():
    ids = data.tokenize("hello world", CharTokenizer())
    assert ids.dtype == torch.long and ids.tolist() == [ord(c) for c in "hello world"]
    again = data.tokenize("hello world", CharTokenizer(fail=True))
    assert torch.equal(again, ids)
    other = CharTokenizer(tag="char-v2")
    data.tokenize("hello world", other)
    assert other.calls == 1  # a different tokenizer hash misses the cache


def test_corrupt_disk_cache_entry_is_ignored(monkeypatch):
    data.tokenize("abc", CharTokenizer())
    for f in data.cache_dir().glob("*.npy"):
        f.write_bytes(b"garbage")
    tok = CharTokenizer()
    assert data.tokenize("abc", tok).tolist() == [97, 98, 99] and tok.calls == 1


def test_disk_cache_can_be_disabled(monkeypatch):
    monkeypatch.setenv(data.ENV_CACHE, "off")
    assert data.cache_dir() is None
    tok = CharTokenizer()
    data.tokenize("abc", tok)
    data.tokenize("abc", tok)
    assert tok.calls == 2


def test_load_tokens_caches_in_memory_and_returns_copies(fake_data):
    tok = CharTokenizer(tag="mem-test")
    a = data.load_tokens("wikitext2", tok, data_dir=fake_data, cache=True)
    a[:] = 0
    b = data.load_tokens("wikitext2", tok, data_dir=fake_data)
    assert tok.calls == 1
    assert b.tolist() == [ord(c) for c in (fake_data / data.DATASETS["wikitext2"]).read_text()]


# --- windows --------------------------------------------------------------------------------


def test_eval_windows_are_bos_plus_consecutive_non_overlapping_text():
    ids = torch.arange(10, 110)
    w = data.eval_windows(ids, window=8, n_windows=5, bos_id=1)
    assert w.shape == (5, 8) and w.dtype == torch.long
    assert (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[:35])


def test_eval_windows_defaults_to_every_full_window_and_can_skip_bos():
    ids = list(range(100))
    assert data.eval_windows(ids, window=8, bos_id=0).shape == (14, 8)  # 100 // 7
    w = data.eval_windows(ids, window=8, bos_id=None)
    assert w.shape == (12, 8) and torch.equal(w.reshape(-1), torch.arange(96))


def test_eval_windows_reject_short_windows_and_too_little_text():
    with pytest.raises(ValueError, match=">= 2"):
        data.eval_windows(torch.arange(10), window=1, bos_id=1)
    with pytest.raises(DataError, match="only 1 windows"):
        data.eval_windows(torch.arange(10), window=8, n_windows=2, bos_id=1)
    with pytest.raises(DataError, match="1-D integer"):
        data.eval_windows(torch.zeros(10), window=4, bos_id=1)


def test_sample_windows_are_distinct_reproducible_chunks():
    ids = torch.arange(1000) + 5
    a = data.sample_windows(ids, 20, window=10, bos_id=1, seed=0)
    b = data.sample_windows(ids, 20, window=10, bos_id=1, seed=0)
    c = data.sample_windows(ids, 20, window=10, bos_id=1, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    starts = (a[:, 1] - 5).tolist()
    assert len(set(starts)) == 20 and all(s % 9 == 0 for s in starts)  # chunk boundaries
    assert torch.equal(a[:, 1:] - a[:, 1:2], torch.arange(9).expand(20, 9))
    with pytest.raises(DataError, match="only 111 windows"):
        data.sample_windows(ids, 112, window=10, bos_id=1)


def test_batched_splits_into_fixed_size_batches():
    out = data.batched(torch.zeros(10, 4, dtype=torch.long), 4)
    assert [tuple(b.shape) for b in out] == [(4, 4), (4, 4), (2, 4)]


def test_calibration_batches_come_from_the_calib_split(fake_data):
    tok = CharTokenizer(tag="calib-test")
    batches = data.calibration_batches("tinystories", tok, n=6, window=5, batch_size=4,
                                       data_dir=fake_data)
    assert [tuple(b.shape) for b in batches] == [(4, 5), (2, 5)]
    calib = data.load_text("tinystories", "calib", data_dir=fake_data)
    for row in torch.cat(batches):
        assert row[0] == 1
        assert "".join(chr(i) for i in row[1:].tolist()) in calib


# --- specs ----------------------------------------------------------------------------------


def test_parse_dataset_spec():
    assert data.parse_dataset_spec("tinystories:128x256") == data.DatasetSpec("tinystories", 128, 256)
    assert data.parse_dataset_spec("WikiText-2") == data.DatasetSpec("wikitext2")
    assert str(data.parse_dataset_spec("c4:4X64")) == "c4:4x64"


@pytest.mark.parametrize("bad", ["", "tinystories:128", "tinystories:x256", "a b", "c4:1x2x3"])
def test_malformed_dataset_spec_raises(bad):
    with pytest.raises(DataError, match="bad dataset spec"):
        data.parse_dataset_spec(bad)


def test_dataset_spec_sizes_are_validated():
    with pytest.raises(ValueError, match="window length"):
        data.parse_dataset_spec("c4:4x1")
    with pytest.raises(ValueError, match="N must be"):
        data.parse_dataset_spec("c4:0x16")
    with pytest.raises(DataError, match="unknown dataset"):
        data.parse_dataset_spec("ptb:1x16")


@needs_stories
def test_calibration_from_spec_with_model_folder_gives_protocol_batches():
    batches = data.calibration_from_spec("tinystories:16x64", STORIES, batch_size=8)
    assert [tuple(b.shape) for b in batches] == [(8, 64), (8, 64)]
    assert all((b[:, 0] == 1).all() and b.max() < 512 for b in batches)
    again = data.calibration_from_spec("tinystories:16x64", STORIES, batch_size=8)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))


@needs_stories
def test_stories_eval_windows_follow_the_protocol():
    w = data.eval_windows_from_spec("tinystories", STORIES)
    assert w.shape == (256, 256) and (w[:, 0] == 1).all()
    ids = data.load_tokens("tinystories", STORIES)
    assert torch.equal(w[:, 1:].reshape(-1), ids[: 256 * 255])

