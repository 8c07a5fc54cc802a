"""Error classes. Every message names the site (pass, node, parameter, file) it is about."""

from __future__ import annotations


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class UnsupportedModelError(FxCompressError):
    """The model cannot be traced or is not a decoder-only causal LM."""


class PreconditionError(FxCompressError):
    """A pass was asked to run on a graph that lacks what it requires."""


class PassError(FxCompressError):
    """A pass failed while deciding or rewriting a site."""


class VerificationError(FxCompressError):
    """The graph failed verification after a pass (lint, shapes, numerics)."""


class PipelineError(FxCompressError):
    """The pass list is invalid: unknown pass, bad option, or an order that breaks a requirement."""


class ArtifactError(FxCompressError):
    """A saved artifact is missing, truncated or tampered with."""


class DataError(FxCompressError):
    """Evaluation or calibration data is missing or malformed."""


class ExportError(FxCompressError):
    """Lowering to a backend format (ONNX) failed, or its output could not be written."""


class ReportError(FxCompressError):
    """An HTML report cannot be written: the report lacks the per-pass data, or a library is
    missing."""
