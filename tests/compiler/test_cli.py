"""The fxcompress command line: compile, inspect, eval, passes, and error reporting."""


from compiler.cli import main
from tests.conftest import STORIES, needs_stories


def test_compile_then_inspect_an_artifact(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["-q", "compile", "tiny-gpt2", "--passes", "canonicalize(untie_embeddings=true)",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "canonicalize(untie_embeddings=True)" in printed and "saved compiled model" in printed
    assert (out / "manifest.json").is_file()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "block" in printed and "per-pass op-count diff" in printed and "addmm -8" in printed
    assert "mlp.c_proj.weight 128x64->64x128" in printed  # Conv1D weights become linear ones


def test_compile_and_inspect_show_shapes_per_block_of_a_pruned_model(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["-q", "compile", "tiny-llama", "--passes",
                 "structured_prune(ratio=0.5, importance=l2, prune_attention=false)",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameters and shapes per block" in printed
    assert "mlp.up_proj.weight 128x64->64x64" in printed
    assert main(["inspect", str(out)]) == 0
    assert "mlp.up_proj.weight 128x64->64x64" in capsys.readouterr().out


def test_compile_with_recipe_and_onnx_export(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - canonicalize\n")
    out = tmp_path / "art"
    assert main(["-q", "compile", "tiny-llama", "--recipe", str(recipe), "-o", str(out), "--onnx"]) == 0
    assert (out / "model.onnx").is_file()
    assert "exported ONNX" in capsys.readouterr().out


def test_inspect_a_model_lists_blocks_and_params(capsys):
    assert main(["inspect", "tiny-llama", "--params"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "total params" in printed


def test_bad_pass_name_exits_2_with_a_message(tmp_path, capsys):
    code = main(["compile", "tiny-llama", "--passes", "canonicalise", "-o", str(tmp_path / "x")])
    assert code == 2
    assert "unknown pass 'canonicalise'" in capsys.readouterr().err


def test_missing_model_exits_2_naming_the_path(tmp_path, capsys):
    code = main(["compile", str(tmp_path / "missing"), "-o", str(tmp_path / "x")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_passes_lists_the_registry(capsys):
    assert main(["passes"]) == 0
    assert "canonicalize" in capsys.readouterr().out


def test_eval_without_tokenizer_is_a_clear_error(capsys):
    assert main(["eval", "tiny-llama"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


@needs_stories
def test_eval_reports_perplexity_with_the_protocol(capsys):
    assert main(["-q", "eval", str(STORIES), "--windows", "8", "--window-len", "128"]) == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "8 windows x 128 tokens" in printed
