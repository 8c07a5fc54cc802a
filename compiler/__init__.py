"""fxcompress compiler core: tracing, IR helpers, analyses, the pass manager and compile()."""

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
