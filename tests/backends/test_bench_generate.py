"""benchmarks/bench_generate.py --smoke: builder and our genai folders timed in ORT GenAI's loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.api import CompiledModel

REPO = Path(__file__).resolve().parents[2]
BUILDER_ROWS = {"builder_fp32", "builder_int8", "builder_int4"}

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")


def _table_rows(text: str) -> dict[str, list[str]]:
    """Cells of the first markdown table (variant -> cells after the name)."""
    rows, seen = {}, False
    for line in text.splitlines():
        if line.startswith("| variant"):
            seen = True
        elif seen and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif seen and rows and not line.startswith("|"):
            break
    return rows


def _lead_number(cell: str) -> float:
    return float(cell.split()[0])


@pytest.mark.slow  # ~30 s: three builder runs on a tiny model, one of ours, six timing processes
def test_smoke_run_times_every_variant(tmp_path):
    ours = ["ours_w8a8"] if hasattr(CompiledModel, "export_genai") else []
    variants = sorted(BUILDER_ROWS) + ours
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--smoke",
         "--workdir", str(tmp_path), "--out", str(tmp_path / "table.md"),
         "--variants", *variants],
        check=True, capture_output=True, text=True, timeout=600).stdout
    rows = _table_rows(out)
    assert set(rows) == set(variants)
    for name, cells in rows.items():
        # prefill ms, decode tok/s, two speed-ups vs the baseline, size MB, size ratio
        values = [_lead_number(c) for c in cells[:6]]
        assert all(math.isfinite(v) and v > 0 for v in values), (name, cells)
    assert "MatMulNBits 4b" in rows["builder_int4"][6]
    assert "MatMulNBits 8b" in rows["builder_int8"][6]
    assert (tmp_path / "table.md").read_text().strip() == out.strip()

    data = json.loads((tmp_path / "table.json").read_text())
    for name in variants:
        r = data["results"][name]
        assert r["threads"] == 2  # read back from genai_config.json by the timing process
        assert len(r["prefill_ms"]["rounds"]) == 1 and r["decode_tok_s"]["median"] > 0
    if ours:
        assert "ours_w8a8/builder_int8" in data["pairs"]

    # benchmarks/profile_decode.py profiles one decode step of a built folder
    prof = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_decode.py"),
         str(next(tmp_path.glob("*/builder_fp32"))), "--steps", "3", "--past", "4",
         "--buffer", "16"],
        check=True, capture_output=True, text=True, timeout=300).stdout
    assert "decode step" in prof and "MatMul" in prof and "GroupQueryAttention" in prof
