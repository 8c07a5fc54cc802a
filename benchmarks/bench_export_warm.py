"""Seconds of a first and a second ONNX export in one process (the second reuses the torchlib
registry, ``backends.onnx_direct.reusing_torchlib_registry``), on a tiny random-init Llama.

Run: ``python benchmarks/bench_export_warm.py [--exports 3] [--no-reuse]`` (``--no-reuse``: every
export builds the registry, as ``torch.onnx.export`` does by itself)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", type=int, default=3)
    ap.add_argument("--no-reuse", action="store_true")
    args = ap.parse_args(argv)
    import contextlib

    import compiler
    from backends import onnx_direct
    from backends.onnxruntime import export_onnx
    from compiler.frontend import load_model, tiny_config

    if args.no_reuse:  # both routes look the context manager up at call time
        onnx_direct.reusing_torchlib_registry = contextlib.nullcontext
    cm = compiler.compile(load_model(tiny_config("llama"), seed=0), [])
    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.exports):
            t = time.perf_counter()
            export_onnx(cm.graph_module, Path(d) / f"{i}.onnx")
            times.append(time.perf_counter() - t)
    print("| export | seconds |\n|---:|---:|")
    for i, t in enumerate(times, 1):
        print(f"| {i} | {t:.2f} |")
    return times


if __name__ == "__main__":
    main()
