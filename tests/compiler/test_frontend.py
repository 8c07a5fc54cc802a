"""Frontend: loading GGUF checkpoints (SmolLM2-135M-Instruct from the shared data), their errors,
and finding a model folder's tokenizer."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from compiler import data
from compiler.errors import UnsupportedModelError
from compiler.frontend import find_gguf, is_gguf_folder, load_model, tokenizer_dir_of
from tests.conftest import DATA

SMOL = DATA / "smollm2-135m-instruct-q4_1" if DATA else None
needs_smol = pytest.mark.skipif(
    SMOL is None or not (SMOL / "gguf").is_dir(),
    reason="SmolLM2 GGUF folder not found in the shared data dir "
           "(../shared/data/smollm2-135m-instruct-q4_1)",
)
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 256}


def _gguf_layout(root, files=("model.gguf",), content=b"GGUF" + b"\0" * 60):
    """``root/gguf/<files>`` + ``root/hf/{config,tokenizer}.json``, the shared data's layout."""
    import json

    (root / "gguf").mkdir()
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (root / "hf" / "tokenizer.json").write_text("{}")
    for f in files:
        (root / "gguf" / f).write_bytes(content)
    return root


@needs_smol
@pytest.mark.slow
def test_smollm2_gguf_folder_loads_as_a_float32_30_layer_llama():
    model = load_model(SMOL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model.config, "quantization_config", None) is None  # dense, not packed
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 8, 49152)
    assert torch.isfinite(logits).all() and logits.abs().max() > 1  # trained, not all-zero


@needs_smol
def test_smollm2_tokenizer_is_found_in_the_hf_subfolder():
    assert tokenizer_dir_of(SMOL) == SMOL / "hf"
    assert tokenizer_dir_of(SMOL / "gguf") == SMOL / "hf"
    tok = data.load_tokenizer(SMOL)
    assert tok.bos_token_id == 1
    assert tok("Hello world", add_special_tokens=False)["input_ids"]


def test_gguf_folder_without_a_gguf_file_is_a_clear_error(tmp_path):
    _gguf_layout(tmp_path, files=())
    with pytest.raises(UnsupportedModelError, match=r"gguf: no \.gguf file in this folder"):
        load_model(tmp_path)


def test_gguf_folder_with_two_gguf_files_is_ambiguous(tmp_path):
    _gguf_layout(tmp_path, files=("a.Q4_0.gguf", "b.Q8_0.gguf"))
    with pytest.raises(UnsupportedModelError, match=r"2 \.gguf files \(a\.Q4_0\.gguf, b\.Q8_0\.gguf\); ambiguous"):
        load_model(tmp_path)


def test_corrupt_gguf_file_is_a_clear_error_naming_it(tmp_path):
    _gguf_layout(tmp_path, content=b"this is not a gguf file")
    with pytest.raises(UnsupportedModelError, match=r"model\.gguf: not a GGUF file"):
        load_model(tmp_path)


@needs_smol
def test_truncated_gguf_file_is_a_clear_error_naming_it(tmp_path):
    _gguf_layout(tmp_path, files=())
    with open(SMOL / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf", "rb") as f:
        (tmp_path / "gguf" / "cut.gguf").write_bytes(f.read(1 << 20))
    shutil.copyfile(SMOL / "hf" / "config.json", tmp_path / "hf" / "config.json")
    with pytest.raises(UnsupportedModelError, match=r"cut\.gguf: cannot load this GGUF checkpoint"):
        load_model(tmp_path)


def test_missing_gguf_package_says_pip_install_gguf(tmp_path, monkeypatch):
    _gguf_layout(tmp_path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(UnsupportedModelError, match=r"needs the 'gguf' package.*pip install gguf"):
        load_model(tmp_path)


def test_flat_gguf_folder_and_layout_detection(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.json").write_text("{}")
    (flat / "tokenizer.json").write_text("{}")
    (flat / "m.gguf").write_bytes(b"GGUF")
    assert is_gguf_folder(flat) and find_gguf(flat) == flat / "m.gguf"
    assert tokenizer_dir_of(flat) == flat and tokenizer_dir_of(flat / "m.gguf") == flat
    (tmp_path / "layout").mkdir()
    layout = _gguf_layout(tmp_path / "layout", files=("x.gguf",))
    assert is_gguf_folder(layout) and find_gguf(layout) == layout / "gguf" / "x.gguf"
    assert tokenizer_dir_of(layout / "gguf" / "x.gguf") == layout / "hf"
    hf = tmp_path / "hf_folder"  # Hugging Face weights win over a stray .gguf
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    (hf / "m.gguf").write_bytes(b"GGUF")
    assert not is_gguf_folder(hf)
    assert tokenizer_dir_of(tmp_path / "nothing_here") is None


# ----------------------------------------------------------------------------- trace failures


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow cannot be exported
            return x
        return -x


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList([_Branchy()])

    def forward(self, input_ids):
        return self.blocks[0](self.emb(input_ids))


class _Cut(torch.nn.Module):
    """Adds the first ``min(cap, seq)`` positions to the sequence: a guard ``min(cap, seq) ==
    seq`` that torch.export cannot prove, true for every length up to ``cap``."""

    def __init__(self, cap: int):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.cap = cap

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return h[:, : min(self.cap, input_ids.shape[1])] + h


def test_export_failure_names_the_submodule_and_the_line_of_model_code():
    from compiler.frontend import trace

    with pytest.raises(UnsupportedModelError,
                       match=r"failed on _Nested at module blocks\.0, .*test_frontend\.py:\d+ in "
                             r"forward: `if x\.sum\(\) > 0:.*`: GuardOnDataDependentSymNode"):
        trace(_Nested(), torch.zeros(2, 4, dtype=torch.long))


def test_guard_torch_cannot_prove_is_checked_on_every_length_and_kept_dynamic():
    from compiler.frontend import trace

    model = _Cut(8192)
    gm = trace(model, torch.zeros(2, 16, dtype=torch.long))  # a plain module: seq <= 4096
    assert "every sequence length 2..4096" in gm.meta["fxcompress_trace_note"]
    for shape in ((3, 37), (1, 5)):  # other lengths than the example's: the graph is dynamic
        x = torch.randint(0, 10, shape)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_guard_that_fails_on_some_length_is_refused_naming_the_length():
    from compiler.frontend import trace

    with pytest.raises(UnsupportedModelError,
                       match=r"does not hold for every sequence length: batch 2 x 2049 tokens "
                             r"breaks a shape guard"):
        trace(_Cut(2048), torch.zeros(2, 16, dtype=torch.long))
