"""Layering: the compiler core imports neither ``passes`` nor ``backends``; passes share helpers
through the core, not through each other's private functions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: the facade: compile(), the CLI and the demo sit on top of the core and may import both
FACADE = {"api", "cli", "demo"}
#: every other module of ``compiler/`` is core
CORE = sorted(p.stem for p in (REPO / "compiler").glob("*.py")
              if p.stem not in FACADE and p.stem != "__init__")
#: pass -> passes it builds on as an algorithm (not for a shared helper): SliceGPT rotates the
#: graph made rotation-invariant; AWQ folds its scales through SmoothQuant's smoothing sites
ALGORITHM_DEPENDENCIES = {
    "slicegpt": {"rotation_invariant"},
    "awq": {"smoothquant"},
}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_the_core_lists_the_modules_the_issue_names():
    assert {"ir", "depgraph", "stats", "pass_base", "pass_manager", "registry", "errors",
            "blockwise", "data", "qdq", "evaluate"} <= set(CORE)


def test_no_core_module_has_an_import_of_passes_or_backends():
    """Static: nested imports count too (a lazy ``import passes`` inside a function)."""
    bad = [f"compiler/{m}.py imports {mod}" for m in CORE
           for mod, _ in _imports(REPO / "compiler" / f"{m}.py")
           if mod.split(".")[0] in ("passes", "backends")]
    assert bad == []


def test_no_core_module_imports_the_facade():
    """The facade sits on top: the core needs nothing from compile(), the CLI or the demo
    (nor ``import compiler``, which re-exports ``compile``)."""
    facade = {f"compiler.{m}" for m in FACADE}
    bad = [f"compiler/{m}.py imports {mod}{'.' + ', '.join(names) if names else ''}"
           for m in CORE for mod, names in _imports(REPO / "compiler" / f"{m}.py")
           if mod in facade or (mod == "compiler" and (not names or set(names) & FACADE))]
    assert bad == []


def _fresh_python(code: str) -> str:
    """stdout of ``code`` run in a new interpreter at the repository root (it must succeed)."""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_importing_the_core_loads_no_pass_and_no_backend():
    """Dynamic, in a fresh interpreter: importing every core module (and ``compiler`` itself,
    which re-exports the facade) pulls in no module of ``passes`` or ``backends``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {CORE!r}: importlib.import_module('compiler.' + m)\n"
        "import compiler\n"
        "from compiler import registry\n"
        "print(json.dumps({'loaded': sorted(m for m in sys.modules if m.split('.')[0] in "
        "('passes', 'backends')), 'pass_modules': list(registry.pass_modules())}))\n"
    )
    out = json.loads(_fresh_python(code).strip().splitlines()[-1])
    assert out["loaded"] == []
    # the facade names the built-in passes; they are imported on the first lookup only
    assert out["pass_modules"] == ["passes"]


def test_a_name_lookup_imports_the_builtin_passes_named_by_the_facade():
    code = (
        "import sys\n"
        "from compiler.registry import make_pass\n"
        "assert 'passes' not in sys.modules\n"
        "p = make_pass('smoothquant(alpha=0.5)')\n"
        "print(type(p).__module__, p.alpha)\n"
    )
    assert _fresh_python(code).split() == ["passes.smoothquant", "0.5"]


def test_passes_import_no_private_name_of_another_pass_and_only_algorithm_dependencies():
    private, edges = [], {}
    for path in sorted((REPO / "passes").glob("*.py")):
        if path.stem == "__init__":
            continue
        for mod, names in _imports(path):
            if mod.split(".")[0] != "passes" or mod == "passes":
                continue
            other = mod.split(".")[1]
            edges.setdefault(path.stem, set()).add(other)
            private += [f"{path.stem} imports {mod}.{n}" for n in names if n.startswith("_")]
    assert private == []
    assert edges == ALGORITHM_DEPENDENCIES


def test_backends_import_no_pass():
    """A lowering reads the Q/DQ forms of the core (compiler.qdq), not a pass's module."""
    bad = [f"{path.relative_to(REPO)} imports {mod}"
           for path in sorted((REPO / "backends").rglob("*.py"))
           for mod, _ in _imports(path) if mod.split(".")[0] == "passes"]
    assert bad == []
