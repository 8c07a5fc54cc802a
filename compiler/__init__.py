"""fxcompress compiler: the core and, re-exported here, the facade on top of it.

The core (tracing, IR helpers, the channel graph, statistics, the Q/DQ vocabulary, the pass
contract, pass manager and registry) imports neither ``passes`` nor ``backends``; the facade
(:mod:`compiler.api`: ``compile()``, ``load``; the CLI; the demo) wires them in.
"""

from compiler.api import CompiledModel, compile, load
from compiler.errors import (
    ArtifactError,
    DataError,
    FxCompressError,
    PassError,
    PipelineError,
    PreconditionError,
    UnsupportedModelError,
    VerificationError,
)
from compiler.frontend import load_model, trace
from compiler.pass_base import Analysis, Pass, PassContext, PassResult

__all__ = [
    "Analysis",
    "ArtifactError",
    "CompiledModel",
    "DataError",
    "FxCompressError",
    "Pass",
    "PassContext",
    "PassError",
    "PassResult",
    "PipelineError",
    "PreconditionError",
    "UnsupportedModelError",
    "VerificationError",
    "compile",
    "load",
    "load_model",
    "trace",
]
