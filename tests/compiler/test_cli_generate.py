"""``fxcompress generate`` and ``fxcompress compile --genai``: readable text from the graph and
from ONNX (fp32 and W8A8), token rate reported, clear errors that write nothing."""

from __future__ import annotations

import re

import pytest

from compiler.cli import main
from tests.conftest import STORIES, needs_stories

try:
    import onnxruntime_genai  # noqa: F401

    RUNTIME = "genai"
except ImportError:
    RUNTIME = "ort"


def _story(text: str) -> bool:
    """Readable English: starts with the prompt and continues with several real words."""
    words = re.findall(r"[A-Za-z]+", text)
    return text.startswith("Once upon a time") and len(words) >= 12 and \
        sum(w.lower() in {"the", "a", "was", "she", "he", "they", "to", "and"} for w in words) >= 2


@needs_stories
@pytest.mark.slow
def test_compile_genai_then_generate_prints_a_story(tmp_path, capsys):
    # the float32 pipeline's GenAI folder generates in the demo (test_end_to_end); this is the
    # CLI's route, with the integer one
    passes = "smoothquant(alpha=0.5), insert_qdq(scheme=w8a8)"
    out = tmp_path / "art"
    assert main(["-q", "compile", str(STORIES), "--passes", passes, "--calib",
                 "tinystories:8x128", "-o", str(out), "--genai"]) == 0
    assert "wrote ONNX Runtime GenAI folder" in capsys.readouterr().out
    for target, extra, where in [(out, [], "[torch graph]"),
                                 (out / "genai", [], "[ONNX Runtime"),
                                 (out / "genai", ["--runtime", "ort"], "[ONNX Runtime]")]:
        code = main(["generate", str(target), "--prompt", "Once upon a time",
                     "--max-new-tokens", "40", *extra])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        assert _story(cap.out), cap.out
        assert where in cap.err and "tokens/s" in cap.err
    # the same greedy text from the graph and from ONNX Runtime
    main(["generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "24"])
    graph_text = capsys.readouterr().out
    main(["generate", str(out), "--onnx", "--prompt", "Once upon a time", "--max-new-tokens", "24"])
    assert capsys.readouterr().out == graph_text


@needs_stories
def test_generate_samples_reproducibly_with_a_seed(tmp_path, capsys):
    args = ["generate", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "16",
            "--sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("Once upon a time") and len(first.split()) > 6


def test_text_prompt_without_a_tokenizer_is_a_clear_error(capsys):
    assert main(["generate", "tiny-llama", "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "--ids" in err


def test_generate_from_ids_prints_ids(capsys):
    assert main(["generate", "tiny-llama", "--ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    ids = capsys.readouterr().out.strip().split(",")
    assert len(ids) == 4 and all(i.isdigit() for i in ids)


def test_prompt_longer_than_the_context_is_refused(tmp_path, capsys):
    ids = ",".join(["1"] * 600)  # the tiny config's context is 512
    assert main(["generate", "tiny-llama", "--ids", ids, "--onnx"]) == 2
    assert "600 tokens and the model's context length is 512" in capsys.readouterr().err


def test_invalid_sampling_option_is_refused(capsys):
    assert main(["generate", "tiny-llama", "--ids", "1,2", "--sample", "--temperature", "0"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an unknown flag: argparse names it
        main(["generate", "tiny-llama", "--ids", "1,2", "--beams", "4"])
    assert e.value.code == 2
    assert "--beams" in capsys.readouterr().err


def test_a_folder_that_is_neither_artifact_nor_model_is_an_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--ids", "1,2"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
