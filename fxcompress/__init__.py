"""fxcompress: compile and compress causal LMs over one torch.fx graph.

The import name of the project. It re-exports the public API that lives in the ``compiler``,
``passes`` and ``backends`` packages (those stay importable as they are)::

    import fxcompress

    cm = fxcompress.compile("../shared/data/stories260K/hf",
                            passes=[fxcompress.SmoothQuant(alpha=0.5), "insert_qdq(scheme=w8a8)"],
                            calibration="tinystories:32x256")
    cm.save("out/w8a8")
    cm2 = fxcompress.load("out/w8a8")

Exported: ``compile``, ``load``, ``load_model``, ``trace``, ``CompiledModel``; the pass base
classes (``Pass``, ``PassResult``, ``PassContext``, ``Analysis``); every registered pass class
(``passes.__all__``, so a pass added to the registry is exported here too) with
``make_pass``/``make_passes``/``load_recipe``/``register``/``registered``; and every error
class of :mod:`compiler.errors`. ``python -m fxcompress`` runs the command line.
"""

from __future__ import annotations

import inspect as _inspect

import compiler as _compiler
import passes as _passes
from compiler import errors as _errors
from compiler.api import CompiledModel, compile, load
from compiler.frontend import load_model, trace
from compiler.pass_base import Analysis, Pass, PassContext, PassResult

__version__ = "0.1.0"

#: Every error class fxcompress raises on purpose (subclasses of ``FxCompressError``).
_ERRORS = {name: obj for name, obj in vars(_errors).items()
           if _inspect.isclass(obj) and issubclass(obj, Exception)
           and obj.__module__ == _errors.__name__}
globals().update(_ERRORS)
globals().update({name: getattr(_passes, name) for name in _passes.__all__})

__all__ = [
    "Analysis",
    "CompiledModel",
    "Pass",
    "PassContext",
    "PassResult",
    "compile",
    "load",
    "load_model",
    "trace",
]
__all__ += sorted(_ERRORS) + [n for n in _passes.__all__ if n not in __all__]

del _compiler
