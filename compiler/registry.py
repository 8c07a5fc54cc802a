"""The pass registry: names and option strings (``"smoothquant(alpha=0.5)"``) to pass objects.

Recipes and the CLI speak in these strings; ``compile()`` accepts them next to pass objects.

Where the passes come from. The registry belongs to the core, which imports neither ``passes``
nor ``backends``. A package of passes registers its classes with :func:`register` when it is
imported (``passes/__init__.py`` does), and is named to the registry by its module name with
:func:`add_pass_modules`; the registry imports every named module on the first lookup
(:func:`registered`, :func:`make_pass`, :func:`load_recipe`). The facade names the built-ins:
:mod:`compiler.api` (imported by ``import compiler``) calls ``add_pass_modules("passes")``, so
``compile()``, the CLI and recipes resolve ``"smoothquant(alpha=0.5)"``, while code that uses
only the core (the IR, the channel graph, statistics, the pass manager with pass objects)
loads no pass. Passes of another package join the same way: ``register(MyPass)`` at its
import, or ``add_pass_modules("mypkg.passes")``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compiler.errors import PipelineError
from compiler.pass_base import Pass

_REGISTRY: dict[str, type[Pass]] = {}
#: modules that register passes when imported, in the order given; imported on the first lookup
_PASS_MODULES: list[str] = []
_IMPORTED: set[str] = set()

_SPEC = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise PipelineError(f"pass class {cls.__name__} has no registry name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise PipelineError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def add_pass_modules(*names: str) -> None:
    """Name modules that register passes when imported; they are imported on the first lookup.

    Args:
        names: importable module names (``"passes"``, ``"mypkg.passes"``).
    """
    for name in names:
        if not isinstance(name, str) or not name:
            raise PipelineError(f"a pass module is named by its import name, got {name!r}")
        if name not in _PASS_MODULES:
            _PASS_MODULES.append(name)


def pass_modules() -> tuple[str, ...]:
    """The module names given to :func:`add_pass_modules`, in order."""
    return tuple(_PASS_MODULES)


def _import_pass_modules() -> None:
    for name in _PASS_MODULES:
        if name in _IMPORTED:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PipelineError(f"pass module {name!r} could not be imported: {e}") from e
        _IMPORTED.add(name)


def registered() -> dict[str, type[Pass]]:
    """Name -> pass class, for every registered pass (importing the named pass modules first)."""
    _import_pass_modules()
    return dict(sorted(_REGISTRY.items()))


def _parse_value(text: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[\w.\-*/]+", text):
            return {"true": True, "false": False, "none": None}.get(text.lower(), text)
        raise PipelineError(f"cannot parse option value {text!r}") from None


def split_top_level(body: str) -> list[str]:
    """Split ``a=1, b=[1, 2], c='x,y'`` at top-level commas."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in body:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def parse_pass_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name(key=value, ...)"`` -> (name, options)."""
    m = _SPEC.match(spec)
    if not m:
        raise PipelineError(f"invalid pass spec {spec!r}; expected name or name(key=value, ...)")
    name, body = m.group(1), m.group(2)
    opts: dict[str, Any] = {}
    for part in split_top_level(body or ""):
        if "=" not in part:
            raise PipelineError(f"invalid option {part.strip()!r} in {spec!r}; expected key=value")
        key, value = part.split("=", 1)
        opts[key.strip()] = _parse_value(value)
    return name, opts


def make_pass(spec: str | Pass, **extra: Any) -> Pass:
    """Build a pass from a registry string, or return a pass object unchanged.

    Raises:
        PipelineError: unknown pass name (with close matches) or an invalid option.
    """
    if isinstance(spec, Pass):
        return spec
    if not isinstance(spec, str):
        raise PipelineError(f"a pass must be a Pass object or a registry string, got {spec!r}")
    name, opts = parse_pass_spec(spec)
    opts.update(extra)
    table = registered()
    if name not in table:
        near = difflib.get_close_matches(name, list(table), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise PipelineError(f"unknown pass {name!r}{hint} (known: {', '.join(table)})")
    try:
        return table[name](**opts)
    except TypeError as e:
        raise PipelineError(f"invalid option for pass {name!r}: {e}") from e
    except ValueError as e:
        raise PipelineError(f"invalid option for pass {name!r}: {e}") from e


def make_passes(specs: Iterable[str | Pass]) -> list[Pass]:
    return [make_pass(s) for s in specs]


def load_recipe(path: str | Path) -> list[Pass]:
    """Passes from a YAML recipe: a list of strings or ``{name: {options}}`` under ``passes:``.

    Example::

        passes:
          - canonicalize
          - smoothquant(alpha=0.5)
          - insert_qdq: {scheme: w8a8}
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"recipe {str(path)!r} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PipelineError(f"recipe {path}: invalid YAML: {e}") from e
    items = doc.get("passes") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise PipelineError(f"recipe {path}: expected a list of passes (or a 'passes:' list)")
    out: list[Pass] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(make_pass(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            if opts is not None and not isinstance(opts, dict):
                raise PipelineError(f"recipe {path}: entry {i} ({name}): options must be a mapping")
            out.append(make_pass(str(name), **(opts or {})))
        else:
            raise PipelineError(f"recipe {path}: entry {i} is neither 'name(opts)' nor {{name: opts}}")
    return out
