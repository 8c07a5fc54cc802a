"""Pass registry: spec strings, recipes, and clear errors for unknown names and bad options."""

import pytest

from compiler.errors import PipelineError
from compiler.registry import load_recipe, make_pass, parse_pass_spec
from passes.canonicalize import Canonicalize


def test_parse_pass_spec_reads_literals_and_bare_words():
    name, opts = parse_pass_spec("insert_qdq(scheme=w4a16, group_size=128, skip=['lm_head', 'x,y'], on=true)")
    assert name == "insert_qdq"
    assert opts == {"scheme": "w4a16", "group_size": 128, "skip": ["lm_head", "x,y"], "on": True}


def test_make_pass_builds_a_registered_pass_with_options():
    p = make_pass("canonicalize(untie_embeddings=True)")
    assert isinstance(p, Canonicalize) and p.untie_embeddings is True
    assert repr(p) == "canonicalize(untie_embeddings=True)"


def test_unknown_pass_name_suggests_close_matches():
    with pytest.raises(PipelineError, match="unknown pass 'canonicalise'.*did you mean canonicalize"):
        make_pass("canonicalise")


def test_unknown_option_is_an_error_naming_the_pass():
    with pytest.raises(PipelineError, match="invalid option for pass 'canonicalize'"):
        make_pass("canonicalize(alpha=0.5)")


def test_invalid_option_value_is_an_error_naming_the_pass():
    with pytest.raises(PipelineError, match="canonicalize.*untie_embeddings"):
        make_pass("canonicalize(untie_embeddings=3)")


def test_malformed_spec_is_an_error():
    with pytest.raises(PipelineError, match="invalid pass spec"):
        make_pass("canonicalize(untie_embeddings=True")
    with pytest.raises(PipelineError, match="expected key=value"):
        make_pass("canonicalize(True)")


def test_recipe_yaml_accepts_strings_and_mappings(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("passes:\n  - canonicalize\n  - canonicalize: {untie_embeddings: true}\n")
    passes = load_recipe(f)
    assert [p.name for p in passes] == ["canonicalize", "canonicalize"]
    assert passes[1].untie_embeddings is True


def test_recipe_errors_name_the_file_and_entry(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("passes:\n  - canonicalize\n  - 42\n")
    with pytest.raises(PipelineError, match="entry 1"):
        load_recipe(f)
    f.write_text("passes: [unclosed\n")
    with pytest.raises(PipelineError, match="invalid YAML"):
        load_recipe(f)


@pytest.mark.parametrize("spec", [
    "smoothquant(alpha=0.5)", "rptq_reorder(clusters=4)", "insert_qdq(scheme=w8a8)",
    "insert_qdq(scheme=w8a8_dynamic)", "insert_qdq(scheme=w4a16, group_size=128)",
    "structured_prune(ratio=0.2, importance=taylor)", "lora_recover(rank=8, steps=100)",
    "slicegpt(sparsity=0.25)", "slicegpt_rotate", "fuse_linears", "simplify_mask",
    "rotation_invariant", "insert_qdq_clusters",
])
def test_every_documented_registry_string_builds_its_pass(spec):
    p = make_pass(spec)
    assert p.name == spec.split("(")[0]


def test_passes_of_a_module_named_to_the_registry_resolve_by_name(tmp_path, monkeypatch):
    from compiler import registry

    (tmp_path / "extra_passes_probe.py").write_text(
        "from compiler.pass_base import Pass, PassResult\n"
        "from compiler.registry import register\n\n"
        "@register\n"
        "class Probe(Pass):\n"
        "    name = 'extra_probe'\n\n"
        "    def __init__(self, *, k: int = 1):\n"
        "        self.k = k\n\n"
        "    def run(self, gm, ctx):\n"
        "        return PassResult.unchanged(gm)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PASS_MODULES", list(registry._PASS_MODULES))
    registry.add_pass_modules("extra_passes_probe")
    assert registry.pass_modules()[-1] == "extra_passes_probe"
    p = make_pass("extra_probe(k=3)")
    assert type(p).__module__ == "extra_passes_probe" and p.k == 3
    assert "canonicalize" in registry.registered()  # the built-ins are still there


def test_a_pass_module_that_cannot_be_imported_is_an_error_naming_it(monkeypatch):
    from compiler import registry

    monkeypatch.setattr(registry, "_PASS_MODULES", [*registry._PASS_MODULES, "no_such_passes_mod"])
    with pytest.raises(PipelineError, match="pass module 'no_such_passes_mod' could not be imported"):
        make_pass("canonicalize")
    with pytest.raises(PipelineError, match="import name"):
        registry.add_pass_modules("")
