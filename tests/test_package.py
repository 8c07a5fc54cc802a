"""``import fxcompress``: the import name re-exports the public API; ``python -m fxcompress`` is the
CLI; the distribution's package list includes it (so a fresh ``pip install -e .`` has it)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import compiler
import fxcompress
import passes
from compiler import errors

REPO = Path(__file__).resolve().parents[1]


def test_fxcompress_reexports_compile_load_passes_and_errors():
    assert fxcompress.compile is compiler.compile
    assert fxcompress.load is compiler.load
    assert fxcompress.CompiledModel is compiler.CompiledModel
    for name in passes.__all__:
        assert getattr(fxcompress, name) is getattr(passes, name), name
        assert name in fxcompress.__all__
    error_classes = [n for n, o in vars(errors).items()
                     if inspect.isclass(o) and issubclass(o, errors.FxCompressError)]
    assert {"PassError", "ExportError", "ReportError", "FxCompressError"} <= set(error_classes)
    for name in error_classes:
        assert getattr(fxcompress, name) is getattr(errors, name), name
        assert name in fxcompress.__all__
    assert fxcompress.make_pass("smoothquant(alpha=0.3)").alpha == 0.3
    assert len(fxcompress.__all__) == len(set(fxcompress.__all__))
    for name in fxcompress.__all__:
        assert hasattr(fxcompress, name), name


def test_python_dash_m_fxcompress_runs_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fxcompress", "passes"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "smoothquant" in r.stdout and "insert_qdq" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fxcompress", "nonsense"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_distribution_packages_include_fxcompress():
    """What setuptools puts into a wheel or an editable install, found with pyproject's own
    ``[tool.setuptools] packages`` rule."""
    from setuptools import find_packages

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    rule = cfg["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(REPO), include=rule["include"]))
    assert {"fxcompress", "compiler", "passes", "backends", "backends.triton"} <= found
    assert not any(p.startswith("tests") for p in found)
    assert cfg["project"]["scripts"]["fxcompress"] == "compiler.cli:main"
