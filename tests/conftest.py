"""Shared fixtures: tiny random-init models per family, their traced graphs, the real stories260K."""

from __future__ import annotations

import os

# Spinning OpenMP threads stall a loaded 2-core machine (30x slower forwards); set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Without a GPU, Triton kernels run under its interpreter on CPU tensors; decided before any
# module imports triton (a lowering module imported early would otherwise keep compiled kernels).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest
import torch

from compiler.frontend import TINY_CONFIGS, load_model, trace

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("FXCOMPRESS_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


DATA = shared_data_dir()
STORIES = DATA / "stories260K" / "hf" if DATA else None
needs_data = pytest.mark.skipif(
    DATA is None, reason="shared data not found (set FXCOMPRESS_DATA or place ../shared/data)"
)
needs_stories = pytest.mark.skipif(
    STORIES is None or not (STORIES / "config.json").exists(),
    reason="stories260K not found in the shared data dir (../shared/data/stories260K/hf)",
)

FAMILIES = sorted(TINY_CONFIGS)
CORE_FAMILIES = ["llama", "opt", "gpt2"]

_models: dict[str, torch.nn.Module] = {}
_graphs: dict[str, torch.fx.GraphModule] = {}


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as module ``name`` (registered in ``sys.modules`` so
    dataclasses and pickling inside it resolve)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


def tiny_model(family: str) -> torch.nn.Module:
    """Seeded tiny random-init model (cached across tests; do not mutate it)."""
    if family not in _models:
        _models[family] = load_model(f"tiny-{family}", seed=0)
    return _models[family]


def tiny_graph(family: str) -> torch.fx.GraphModule:
    """A fresh traced graph of the tiny model (a deep copy each call, safe to mutate)."""
    import copy

    if family not in _graphs:
        _graphs[family] = trace(tiny_model(family))
    return copy.deepcopy(_graphs[family])


_compiled: dict[str, object] = {}


def tiny_compiled(family: str):
    """``compiler.compile(tiny_model(family), [])``, compiled once per process: a deep copy each
    call (safe to mutate). For tests where the compiled model is the input, not the subject."""
    import copy

    import compiler

    if family not in _compiled:
        _compiled[family] = compiler.compile(tiny_model(family), [])
    return copy.deepcopy(_compiled[family])


def stories_model() -> torch.nn.Module:
    if "stories260K" not in _models:
        _models["stories260K"] = load_model(STORIES)
    return _models["stories260K"]


def stories_graph() -> torch.fx.GraphModule:
    import copy

    if "stories260K" not in _graphs:
        _graphs["stories260K"] = trace(stories_model())
    return copy.deepcopy(_graphs["stories260K"])


def pytest_collection_modifyitems(config, items):
    """Run the ``slow`` tests first (stable order otherwise).

    Under ``pytest -n 2`` (``--dist loadgroup``, set in pyproject.toml) the workers take tests in
    this order: the slow end-to-end tests, collected last, would otherwise start when the other
    worker has only short tests left, and the run would wait for them on one core.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def probe_ids() -> torch.Tensor:
    """Probe batch [2, 24] of token ids valid for every tiny model (vocab 256)."""
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(4)]


def scale_bug(path, out, pattern: str, factor: float = 1.01):
    """Copy the ONNX file at ``path`` to ``out`` with every float initializer whose name
    matches ``pattern`` and holds a scale multiplied by ``factor`` (an injected lowering bug)."""
    import re

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    hit = []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if re.search(pattern, init.name) and "scale" in init.name and a.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array((a * factor).astype(a.dtype), init.name))
            hit.append(init.name)
    assert hit, f"no scale initializer matches {pattern!r}"
    onnx.save(model, str(out))
    return out
