"""benchmarks/bench_quant.py --smoke: export, ORT's own quantizer, ours, and the timing table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~20 s: a 2-layer model exported three ways and timed in fresh processes
def test_smoke_run_prints_the_table(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_quant.py"), "--smoke", "--no-ort-static",
         "--ours", "w8a8", "w4a16", "--rounds", "1", "--runs", "2", "--warmup", "1",
         "--workdir", str(tmp_path), "--out", str(tmp_path / "table.md")],
        check=True, capture_output=True, text=True, timeout=600).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert set(rows) == {"fp32", "ort_dynamic", "w8a8", "w4a16"}
    assert "MatMulIntegerToFloat" in rows["w8a8"] and "MatMulNBits" in rows["w4a16"]
    assert (tmp_path / "table.md").read_text().strip() == out.strip()
    assert (tmp_path / "table.json").is_file()
