"""benchmarks/ort_timing.py: every file timed in its own process, rounds rotated, all runs kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backends.onnxruntime import export_onnx
from tests.conftest import load_benchmark, tiny_graph

REPO = Path(__file__).resolve().parents[2]


def _load():
    return load_benchmark("ort_timing")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return export_onnx(tiny_graph("llama"),
                       tmp_path_factory.mktemp("timing") / "tiny.onnx")


def test_times_each_file_over_rounds(onnx_file):
    res = _load().time_onnx_files({"a": onnx_file, "b": onnx_file}, [5, 9], warmup=1, runs=2,
                                  rounds=2, vocab=256, progress=False)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert set(r) == {5, 9}
        for s in (5, 9):
            assert r[s]["runs"] == 4 and len(r[s]["round_medians_ms"]) == 2
            assert r[s]["median_ms"] > 0


def test_command_line_prints_a_table(onnx_file):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ort_timing.py"), f"tiny={onnx_file}",
         "--seq", "5", "--rounds", "1", "--runs", "1", "--warmup", "0", "--vocab", "256"],
        check=True, capture_output=True, text=True).stdout
    assert "| tiny |" in out and "speed-up vs tiny" in out


def test_a_corrupt_file_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(RuntimeError, match=r"timing 'bad' \(.*bad.onnx\) failed"):
        _load().time_onnx_files({"bad": bad}, [5], runs=1, rounds=1, progress=False)
