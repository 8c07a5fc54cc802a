"""The runnable examples run end to end on their built-in defaults (no download, CPU)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # a few seconds each: compile a tiny model, export ONNX, run ORT
@pytest.mark.parametrize("script, expect", [
    ("quickstart.py", ["canonicalize()", "parity ok"]),
    ("compress_structure.py", ["parameters and shapes per block", "mlp.up_proj.weight 128x64->",
                               "parity ok", "parameters: 106,824 -> "]),
])
def test_example_runs(script, expect, tmp_path, monkeypatch, capsys):
    # as `python examples/<script>` from tmp_path, run in this interpreter (a fresh one only adds
    # the imports; `python -m fxcompress` in a fresh one is test_package's); the global RNG the
    # script draws from is restored afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script)])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    with torch.random.fork_rng():
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    for e in expect:
        assert e in out, f"{script}: {e!r} not in its output"
    assert list((tmp_path / "out").rglob("*.onnx"))
