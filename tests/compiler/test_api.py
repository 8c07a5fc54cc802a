"""compile(): the compiled model, its report, save/load of artifacts, and bad-input errors."""

import os

import pytest
import torch

import compiler
from compiler.errors import ArtifactError, DataError, PipelineError, UnsupportedModelError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def compiled():
    return compiler.compile(tiny_model("llama"), [])


def test_compile_without_passes_canonicalizes_and_matches_the_model(compiled, probe_ids):
    with torch.no_grad():
        ref = tiny_model("llama")(input_ids=probe_ids, use_cache=False).logits
    torch.testing.assert_close(compiled(probe_ids), ref, atol=1e-5, rtol=0)
    assert [r.name for r in compiled.report.records] == ["canonicalize"]
    assert compiled.report.records[0].drift <= 1e-5


def test_compiled_model_accepts_other_batch_and_sequence_sizes(compiled):
    for shape in [(1, 1), (3, 40)]:
        assert compiled(torch.zeros(shape, dtype=torch.long)).shape == (*shape, 256)


def test_report_table_lists_each_pass_with_timing_and_sizes(compiled):
    table = compiled.report.table()
    assert "canonicalize" in table and "nodes" in table and "params" in table and "drift" in table


def test_save_and_load_roundtrip_gives_the_same_logits(compiled, tmp_path, probe_ids):
    compiled.save(tmp_path / "art")
    loaded = compiler.load(tmp_path / "art")
    torch.testing.assert_close(loaded(probe_ids), compiled(probe_ids), atol=0, rtol=0)
    assert loaded.report.records[0].name == "canonicalize"
    assert loaded.vocab_size == 256


def test_save_refuses_to_overwrite_without_permission(compiled, tmp_path):
    compiled.save(tmp_path / "art")
    with pytest.raises(ArtifactError, match="not empty"):
        compiled.save(tmp_path / "art")
    compiled.save(tmp_path / "art", overwrite=True)


def test_truncated_artifact_is_rejected(compiled, tmp_path):
    art = compiled.save(tmp_path / "art")
    prog = art / "program.pt2"
    data = prog.read_bytes()
    prog.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        compiler.load(art)


def test_tampered_artifact_is_rejected(compiled, tmp_path):
    art = compiled.save(tmp_path / "art")
    prog = art / "program.pt2"
    data = bytearray(prog.read_bytes())
    data[len(data) // 2] ^= 0xFF
    prog.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        compiler.load(art)


def test_missing_or_corrupt_manifest_is_rejected(compiled, tmp_path):
    with pytest.raises(ArtifactError, match="no manifest"):
        compiler.load(tmp_path)
    art = compiled.save(tmp_path / "art")
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        compiler.load(art)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_output_is_a_clear_error(compiled, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ArtifactError, match="cannot write"):
        compiled.save(ro / "art")


def test_output_under_a_file_is_a_clear_error(compiled, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write"):
        compiled.save(blocker / "art")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        compiler.compile(tmp_path / "nope", [])


def test_encoder_only_model_is_rejected_naming_the_class():
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(UnsupportedModelError, match="bert.*encoder-only"):
        compiler.load_model(cfg)


def test_seq2seq_model_is_rejected_naming_the_class():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        compiler.load_model(cfg)
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration.*encoder-decoder"):
        compiler.compile(T5ForConditionalGeneration(cfg), [])


def test_untraceable_module_names_the_class_and_the_export_failure():
    class DataDependent(torch.nn.Module):
        def forward(self, input_ids):
            if input_ids.sum() > 0:  # data-dependent control flow cannot be exported
                return input_ids.float()
            return -input_ids.float()

    with pytest.raises(UnsupportedModelError, match="torch.export failed on DataDependent"):
        compiler.trace(DataDependent())


def test_invalid_pass_name_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="unknown pass"):
        compiler.compile(tiny_model("llama"), ["no_such_pass"])


def test_calibration_batches_are_validated():
    with pytest.raises(DataError, match="calibration batch 1 must be integer"):
        compiler.compile(tiny_model("llama"), [], calibration=[torch.zeros(1, 4, dtype=torch.long),
                                                               torch.zeros(4)])
    with pytest.raises(DataError, match="outside the vocabulary"):
        compiler.compile(tiny_model("llama"), [], calibration=[torch.full((1, 4), 999)])


def test_encoder_only_module_instance_is_rejected():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM is an encoder-only"):
        compiler.compile(BertForMaskedLM(cfg), [])


def test_fp16_qdq_graph_says_it_runs_only_after_the_triton_lowering(tmp_path):
    import copy

    from compiler.errors import PreconditionError

    m = copy.deepcopy(tiny_model("llama")).half()
    cm = compiler.compile(m, passes=["insert_qdq(scheme=w8a8_dynamic)"])
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PreconditionError, match=r"float16 .*lower\('triton'\)"):
        cm(ids)
    with pytest.raises(PreconditionError, match=r"export_onnx: .*float16"):
        cm.export_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    assert cm.lower("triton")(ids).dtype == torch.float16


def test_backends_are_chosen_through_the_lowering_table(compiled, tmp_path, monkeypatch):
    from compiler import api

    assert set(api.LOWERINGS) == {"genai", "onnx", "triton"}
    with pytest.raises(ValueError, match=r"unknown backend 'tvm' \(known: genai, onnx, triton\)"):
        compiled.lower("tvm")
    calls = []
    monkeypatch.setitem(api.LOWERINGS, "onnx", lambda cm, path, **kw: calls.append((cm, path, kw)) or path)
    monkeypatch.setitem(api.LOWERINGS, "probe", lambda cm, *a, **kw: (cm, a, kw))
    assert compiled.export_onnx(tmp_path / "m.onnx") == tmp_path / "m.onnx"
    assert calls == [(compiled, tmp_path / "m.onnx", {})]
    assert compiled.lower("probe", 1, x=2) == (compiled, (1,), {"x": 2})
