"""Calibration precision: the dtype in which calibration sweeps compute their matrix products.

Paper: none. Reference implementations of the methods calibrate in the model's half precision
on a GPU (SliceGPT's, GPTQ's and AWQ's official code load the model in float16), and accumulate
their statistics (``X^T X``, Hessians, ranges) in float32. ``calibration_dtype="bfloat16"``
does that on the CPU: every calibration run (the block engine's block runs,
:mod:`compiler.blockwise`, and the whole-graph statistics run, :mod:`compiler.stats`) executes
under ``torch.autocast("cpu", bfloat16)``, so ``linear``, ``matmul`` and attention run in
bfloat16, on the CPU's AMX tiles where it has them (measured on this project's Xeon with 2
threads: a ``[2048, 768] x [768, 2048]`` linear in 2.7 ms against 21 ms in float32).

What stays float32 or float64: the model (its weights and every rewrite of them), the exact
checks of the pass manager (float64), the statistics themselves (extrema, histograms and ``X^T
X`` are reduced in float32 / float64 from the bfloat16 activations), and every decision taken on
them (eigendecompositions, scales, Hessian inverses). The activations the statistics describe
are those of the model run in bfloat16, so they differ from float32 ones by about the bfloat16
rounding (2^-9 relative per product); the passes' decisions move accordingly, and the quality
of the result is measured, not assumed (README, calibration precision).

Default ``"float32"``: results do not depend on the machine. On a CPU without native bfloat16
matrix products (no AMX and no AVX512-BF16) bfloat16 is slower than float32, and
:func:`parse_calibration_dtype` warns.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

#: accepted names -> the autocast dtype (None: no autocast, float32 as the model computes)
CALIBRATION_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def native_bf16_matmul() -> bool:
    """True when this CPU multiplies bfloat16 matrices natively (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def parse_calibration_dtype(value: str | torch.dtype | None, *, warn: bool = True
                            ) -> torch.dtype | None:
    """The autocast dtype for ``value`` (None for float32).

    Args:
        value: ``"float32"`` / ``"bfloat16"`` (or the torch dtypes, or None for float32).
        warn: warn when bfloat16 is asked for on a CPU without native bfloat16 products.

    Raises:
        ValueError: any other value (the message lists the accepted ones).
    """
    if value is None:
        return None
    names = {v: k for k, v in CALIBRATION_DTYPES.items() if v is not None}
    names[torch.float32] = "float32"
    name = names.get(value, value) if isinstance(value, torch.dtype) else value
    if not isinstance(name, str) or name not in CALIBRATION_DTYPES:
        raise ValueError(f"calibration_dtype must be one of {sorted(CALIBRATION_DTYPES)}, got "
                         f"{value!r}")
    dtype = CALIBRATION_DTYPES[name]
    if dtype is not None and warn and not native_bf16_matmul():
        warnings.warn("calibration_dtype='bfloat16': this CPU has no native bfloat16 matrix "
                      "products (no AMX, no AVX512-BF16); calibration will be slower than in "
                      "float32", stacklevel=2)
    return dtype


def calibration_autocast(dtype: torch.dtype | None):
    """The context a calibration run executes in: autocast to ``dtype`` on the CPU, or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


__all__ = ["CALIBRATION_DTYPES", "calibration_autocast", "native_bf16_matmul",
           "parse_calibration_dtype"]
