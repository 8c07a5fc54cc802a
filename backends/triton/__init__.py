"""Triton GPU backend: hand-written kernels for the compiled graph's hot ops.

``backends.triton.reference`` holds the pure-torch reference of every kernel (the semantics, and
the CPU execution path); ``backends.triton.kernels`` holds the Triton kernels and their validating
wrappers. Importing this package never imports ``triton``: the kernel functions are resolved on
first attribute access (``backends.triton.w8a8_gemm``), so the references and errors stay usable
where triton is not installed (it is the optional extra ``fxcompress[triton]``).

To run the kernels on CPU tensors (tests, ``benchmarks/bench_triton.py --check``) set
``TRITON_INTERPRET=1`` before the kernels module is first imported.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from backends.triton.reference import (
    KernelArgumentError,
    TritonLaunchError,
    cluster_gemm_ref,
    dequantize_int4,
    pack_int4,
    per_token_quant_ref,
    quantize_weight_int4,
    quantize_weight_int8,
    rmsnorm_quant_ref,
    unpack_int4,
    w4a16_gemm_ref,
    w8a8_gemm_ref,
)

#: Kernel entry points, resolved lazily from ``backends.triton.kernels``.
KERNELS = ("w8a8_gemm", "w4a16_gemm", "rmsnorm_quant", "per_token_quant", "cluster_gemm")

__all__ = [
    "KERNELS",
    "KernelArgumentError",
    "TritonLaunchError",
    "cluster_gemm",
    "cluster_gemm_ref",
    "dequantize_int4",
    "pack_int4",
    "per_token_quant",
    "per_token_quant_ref",
    "quantize_weight_int4",
    "quantize_weight_int8",
    "rmsnorm_quant",
    "rmsnorm_quant_ref",
    "triton_available",
    "unpack_int4",
    "w4a16_gemm",
    "w4a16_gemm_ref",
    "w8a8_gemm",
    "w8a8_gemm_ref",
]


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (kernels usable on CUDA or interpreter)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str) -> Any:
    if name in KERNELS:
        if not triton_available():
            raise TritonLaunchError(
                f"backends.triton.{name} needs the 'triton' package (pip install "
                "'fxcompress[triton]'); the torch reference is backends.triton."
                f"{name}_ref"
            )
        return getattr(importlib.import_module("backends.triton.kernels"), name)
    raise AttributeError(f"module 'backends.triton' has no attribute {name!r}")
