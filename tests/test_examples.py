"""The runnable examples run end to end on their built-in defaults (no download, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # ~10 s each: compile a tiny model, export ONNX, run ORT
@pytest.mark.parametrize("script, expect", [
    ("quickstart.py", ["canonicalize()", "parity ok"]),
    ("compress_structure.py", ["parameters and shapes per block", "mlp.up_proj.weight 128x64->",
                               "parity ok", "parameters: 106,824 -> "]),
])
def test_example_runs(script, expect, tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    for e in expect:
        assert e in out, f"{script}: {e!r} not in its output"
    assert list((tmp_path / "out").rglob("*.onnx"))
