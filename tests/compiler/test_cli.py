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


def _advertised_command_lines() -> list[str]:
    """Every ``fxcompress ...`` line of the README's bash blocks and the CLI's docstring, with
    continuation lines joined, comments dropped and optional ``[...]`` parts kept."""
    import re
    from pathlib import Path

    import compiler.cli

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S) + [compiler.cli.__doc__]
    lines = []
    for block in blocks:
        for line in block.replace("\\\\\n", " ").replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("fxcompress "):
                    lines.append(part.replace("[", "").replace("]", ""))
    return lines


def test_every_advertised_command_line_parses():
    import shlex

    import pytest

    from compiler.cli import build_parser

    lines = _advertised_command_lines()
    assert len(lines) >= 15 and any(" inspect " in s for s in lines)
    parser = build_parser()
    for line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"advertised command line does not parse: {line}")


def test_inspect_has_no_diff_option(capsys):
    import pytest

    from compiler.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["inspect", "x", "--diff"])
    assert "unrecognized arguments: --diff" in capsys.readouterr().err


def test_quiet_and_verbose_are_accepted_after_the_subcommand():
    from compiler.cli import build_parser

    p = build_parser()
    for argv, quiet, verbose in [(["passes"], False, False), (["-q", "passes"], True, False),
                                 (["passes", "-q"], True, False), (["-v", "passes", "-q"], True, True),
                                 (["eval", "m", "--verbose"], False, True),
                                 (["compile", "m", "-o", "x", "-q"], True, False)]:
        args = p.parse_args(argv)
        assert (args.quiet, args.verbose) == (quiet, verbose), argv


def test_passes_shows_each_pass_options_and_defaults(capsys):
    from compiler.registry import registered

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "    alpha=" in out and "smoothquant" in out
    assert "    scheme=REQUIRED" in out and "    group_size=128" in out
    assert "    skip_layers=[]" in out and "block indices left alone" in out
    assert "    ratio=0.2 " in out and "fraction of prunable parameters removed" in out
    for name, cls in registered().items():
        assert f"\n{name} " in "\n" + out, name


def test_compile_data_dir_reads_calibration_there(tmp_path, capsys, monkeypatch):
    """--data-dir: a folder that does not exist is an error naming it; one that exists is where
    --calib reads (here a copy of the shared data's TinyStories file, shortened)."""
    from compiler import data

    monkeypatch.delenv("FXCOMPRESS_DATA", raising=False)
    missing = tmp_path / "nowhere"
    assert main(["compile", "tiny-llama", "-o", str(tmp_path / "a"), "--data-dir", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    if STORIES is None:
        return
    mine = tmp_path / "mydata"
    src = STORIES.parents[1] / data.DATASETS["tinystories"]
    dst = mine / data.DATASETS["tinystories"]
    dst.parent.mkdir(parents=True)
    dst.write_text(src.read_text()[:200_000])
    monkeypatch.setattr(data, "_default_candidates", lambda: [tmp_path / "not-here"])
    assert main(["-q", "compile", str(STORIES), "--passes", "smoothquant", "--calib",
                 "tinystories:4x64", "--data-dir", str(mine), "-o", str(tmp_path / "b")]) == 0
    assert "calibration 1 batches, 256 tokens" in capsys.readouterr().out
    # without --data-dir the same command finds no data (the default place is patched away)
    assert main(["-q", "compile", str(STORIES), "--passes", "smoothquant", "--calib",
                 "tinystories:4x64", "-o", str(tmp_path / "c")]) == 2


@needs_stories
def test_compile_calibration_dtype_reaches_the_report(tmp_path, capsys):
    assert main(["-q", "compile", str(STORIES), "--passes", "smoothquant", "--calib",
                 "tinystories:4x64", "--calibration-dtype", "bfloat16",
                 "-o", str(tmp_path / "a")]) == 0
    assert "calibration 1 batches, 256 tokens, run in bfloat16" in capsys.readouterr().out
