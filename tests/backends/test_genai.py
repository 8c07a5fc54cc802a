"""GenAI-layout export: KV-cache ONNX equals the full forward step by step, ONNX Runtime GenAI
loads it and generates the same tokens, quantized exports run integer kernels, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import compiler
from backends.genai import ORTCausalLM, genai_generate, read_genai_config
from compiler.errors import ArtifactError
from tests.conftest import FAMILIES, needs_stories, stories_model, tiny_compiled, tiny_model

try:
    import onnxruntime_genai  # noqa: F401

    HAS_GENAI = True
except ImportError:
    HAS_GENAI = False
needs_genai = pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed")
PROMPT = [1, 403, 407, 261, 378]  # "Once upon a time" in the stories260K tokenizer


def _ids(vocab: int, shape, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def ort_decode_logits(model: ORTCausalLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens then one token per step through ONNX Runtime."""
    b, s = ids.shape
    mask = torch.ones(b, s, dtype=torch.long)
    logits, past = model.step(ids[:, :prompt], mask[:, :prompt], model.empty_cache(b))
    outs = [logits]
    for t in range(prompt, s):
        logits, past = model.step(ids[:, t:t + 1], mask[:, :t + 1], past)
        outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_steps_equal_the_original_models_forward(family, tmp_path):
    model = tiny_model(family)
    cm = tiny_compiled(family)
    folder = cm.export_genai(tmp_path / "g")
    ort_model = ORTCausalLM(folder)
    ids = _ids(256, (2, 10))
    got = ort_decode_logits(ort_model, ids, prompt=6)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    # the default export's prefill gives the prompt's last position only
    assert got.shape[1] == 5
    assert (got - ref[:, 5:]).abs().max() <= 1e-4
    names = ort_model.model.input_names
    assert names[:4] == ["input_ids", "attention_mask", "past_key_values.0.key",
                         "past_key_values.0.value"]
    assert ort_model.model.output_names[:3] == ["logits", "present.0.key", "present.0.value"]


@needs_stories
@pytest.mark.slow
def test_stories260k_pruned_and_sliced_export_steps_equal_its_forward(tmp_path):
    calib = [_ids(512, (4, 64), seed=s) for s in range(4)]
    cm = compiler.compile(stories_model(), ["structured_prune(ratio=0.25)",
                                            "slicegpt(sparsity=0.25)"], calibration=calib)
    folder = cm.export_genai(tmp_path / "g")
    cfg = read_genai_config(folder)["model"]["decoder"]
    # one cache shape for the runtime: the largest layer's kv-head count
    assert cfg["num_key_value_heads"] == max(lay.kv_heads for lay in cm.kv_cache().layers) < 4
    ids = _ids(512, (1, 20))
    got = ort_decode_logits(ORTCausalLM(folder), ids, prompt=12)
    assert (got - cm(ids)[:, 11:]).abs().max() <= 1e-4


@needs_stories
@needs_genai
@pytest.mark.slow
def test_genai_generates_the_same_64_greedy_tokens_as_hugging_face(tmp_path):
    model = stories_model()
    folder = compiler.compile(model, []).export_genai(tmp_path / "fp32")
    ours = genai_generate(folder, PROMPT, max_new_tokens=64)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([PROMPT]), max_new_tokens=64, do_sample=False)
    assert len(ours) == len(PROMPT) + 64
    assert ours == theirs[0].tolist()


@needs_stories
@needs_genai
@pytest.mark.slow
def test_genai_w8a8_export_generates_what_the_compiled_graph_generates(tmp_path):
    from backends.onnxruntime import ORTModel

    calib = [_ids(512, (4, 64), seed=s) for s in range(4)]
    cm = compiler.compile(stories_model(), ["smoothquant(alpha=0.5)", "insert_qdq(scheme=w8a8)"],
                          calibration=calib)
    folder = cm.export_genai(tmp_path / "w8a8")
    ours_onnx = genai_generate(folder, PROMPT, max_new_tokens=64)
    ours_torch = cm.generate(torch.tensor([PROMPT]), max_new_tokens=64)
    assert ours_onnx == ours_torch[0].tolist()
    ops = ORTModel(folder / "model.onnx").optimized_op_types()
    assert ops["MatMulIntegerToFloat"] >= 5 * 7  # every linear of the 5 layers


@needs_stories
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4a16", "w8a8_dynamic"])
def test_quantized_exports_step_like_the_compiled_graph(scheme, tmp_path):
    from backends.onnxruntime import ORTModel
    from passes.insert_qdq import InsertQDQ

    calib = [_ids(512, (4, 64), seed=s) for s in range(2)]
    # down_proj (in_features 172) is not a multiple of the group size: left float
    spec = ({"scheme": "w4a16", "group_size": 32, "exclude": ["*down_proj"]}
            if scheme == "w4a16" else {"scheme": scheme})
    cm = compiler.compile(stories_model(), [InsertQDQ(**spec)], calibration=calib)
    # accuracy level 0: the graph's float arithmetic (the "auto" default's int8 compute is
    # measured by perplexity in test_ort_quant)
    folder = cm.export_genai(tmp_path / scheme, accuracy_level=0)
    ids = _ids(512, (1, 14))
    got = ort_decode_logits(ORTCausalLM(folder), ids, prompt=8)
    ref = cm(ids)[:, 7:]
    # measured: at most 1e-5 on logits up to 15 (both schemes, three prompts)
    assert (got - ref).abs().max() <= 1e-4
    ops = ORTModel(folder / "model.onnx").optimized_op_types()
    kind = "MatMulNBits" if scheme == "w4a16" else "MatMulIntegerToFloat"
    assert ops[kind] >= (5 * 6 if scheme == "w4a16" else 5 * 7)  # every quantized linear
    if HAS_GENAI:
        assert len(genai_generate(folder, PROMPT, max_new_tokens=8)) == len(PROMPT) + 8


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_all_gives_every_position_and_last_equals_its_last_row(family, tmp_path):
    model = tiny_model(family)
    cm = compiler.compile(model, [])
    every = ORTCausalLM(cm.export_genai(tmp_path / "all", logits="all"))
    last = ORTCausalLM(cm.export_genai(tmp_path / "last"))
    ids = _ids(256, (2, 9))
    got_all = ort_decode_logits(every, ids, prompt=6)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    assert got_all.shape == ref.shape and (got_all - ref).abs().max() <= 1e-4
    got_last = ort_decode_logits(last, ids, prompt=6)
    assert got_last.shape[1] == 4
    # measured 0 to 2e-7: the head's GEMM runs with 1 row instead of 6
    assert (got_last - got_all[:, 5:]).abs().max() <= 1e-6
    # the saving is real: the LM head's MatMul reads the Slice of the last position
    assert _lm_head_input_op(tmp_path / "last" / "model.onnx") == "Slice"
    assert _lm_head_input_op(tmp_path / "all" / "model.onnx") != "Slice"


def _lm_head_input_op(path) -> str:
    """The op type feeding the MatMul that the ``logits`` output comes from."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    producer = {o: n for n in nodes for o in n.output}
    n = producer["logits"]
    while "MatMul" not in n.op_type and n.op_type != "Gemm":
        n = producer[n.input[0]]
    return producer[n.input[0]].op_type


def test_bad_logits_option_is_refused(tmp_path):
    cm = compiler.compile(tiny_model("llama"), [])
    with pytest.raises(ValueError, match="logits must be one of last, all"):
        cm.export_genai(tmp_path / "g", logits="first")
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_non_empty_folder_is_refused_and_writes_nothing(tmp_path):
    cm = tiny_compiled("llama")
    target = tmp_path / "g"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        cm.export_genai(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no staging folder left


def test_failed_export_leaves_no_partial_folder(tmp_path, monkeypatch):
    import backends.genai as genai
    from compiler.errors import ExportError

    def broken(*args, **kwargs):
        raise ExportError("simulated failure while translating")

    monkeypatch.setattr(genai, "export_kv_onnx", broken)
    cm = tiny_compiled("llama")
    with pytest.raises(ExportError, match="simulated"):
        cm.export_genai(tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_genai_folder_has_the_config_and_layout_the_runtime_reads(tmp_path):
    cm = tiny_compiled("qwen2")
    folder = cm.export_genai(tmp_path / "g")
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2
    assert dec["head_size"] == 16
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    # every layer's attention and rotary run in GroupQueryAttention: one shared cache buffer
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["context_length"] == 512
    assert (folder / "model.onnx").is_file()


def test_reading_a_folder_that_is_not_a_genai_export_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="no genai_config.json"):
        ORTCausalLM(tmp_path)
    (tmp_path / "genai_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt GenAI config"):
        ORTCausalLM(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"filename": "model.onnx"}}}))
    with pytest.raises(ArtifactError, match="model.onnx, which is missing"):
        ORTCausalLM(tmp_path)


def test_ort_runner_checks_past_count_and_prompt_length(tmp_path):
    cm = tiny_compiled("llama")
    model = ORTCausalLM(cm.export_genai(tmp_path / "g"))
    ids = _ids(256, (1, 4))
    past = model.empty_cache(1)
    past.pop("past_key_values.1.value")
    with pytest.raises(ValueError, match="2 layers take 4 past tensors, got 3"):
        model.step(ids, torch.ones(1, 4, dtype=torch.long), past)
    with pytest.raises(ValueError, match="context length is 512"):
        model.generate(torch.zeros(1, 600, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown generation option"):
        model.generate(ids, beams=2)
    out = model.generate(ids, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(out, cm.generate(ids, max_new_tokens=5, eos_token_id=None))


@needs_genai
@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_genai_generates_what_the_graph_generates_with_and_without_a_shared_buffer(fused,
                                                                                  tmp_path):
    cm = tiny_compiled("llama")
    folder = cm.export_genai(tmp_path / "g", fused=fused)
    cfg = read_genai_config(folder)
    assert cfg["search"]["past_present_share_buffer"] is fused
    prompt = _ids(256, (1, 6))
    ours = genai_generate(folder, prompt, max_new_tokens=24)
    assert ours == cm.generate(prompt, max_new_tokens=24)[0].tolist()
