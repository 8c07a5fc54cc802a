"""Perplexity with float32 against bfloat16 calibration runs (``compile(calibration_dtype=...)``).

Protocol (``shared/BENCHMARKS.md``, TinyStories): the evaluation half in windows of
``[BOS] + 255`` tokens, the calibration half in 256-token windows, seed 0.

- ``stories260K``: 256 evaluation windows, 128 calibration windows (the protocol's full size);
- SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to float32): 64 evaluation windows, 32
  calibration windows (issue 14's shortened protocol for a 2-core machine).

Each pipeline is compiled twice through ``compiler.compile`` from the same model, once per
calibration dtype, and the compiled graph is evaluated in float32 (Q/DQ simulated by the
``quantized_decomposed`` ops). Pipelines: ``slicegpt(sparsity=0.25)``, also with
``rerun_attention=False`` (the cheaper sequential calibration); issue 13's
``slicegpt(sparsity=0.25), smoothquant(alpha=0.5), insert_qdq(scheme=w8a8)``; GPTQ and AWQ at
4 bits (group 32 with ``down_proj`` left float on stories260K, as in issue 13's table; group 64
on SmolLM2, whose width 576 is not a multiple of 128).

Run: ``python benchmarks/quality_calibration_dtype.py [--models stories260K smollm2]
[--only NAME ...]``. Prints one JSON line per (model, pipeline, dtype) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compiler  # noqa: E402
from compiler.data import calibration_batches, data_dir, evaluation_windows  # noqa: E402
from compiler.evaluate import perplexity  # noqa: E402
from compiler.frontend import load_model  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct-q4_1"
DTYPES = ("float32", "bfloat16")
SLICE = "slicegpt(sparsity=0.25)"


def pipelines(model: str) -> dict[str, list[str]]:
    w4 = "group_size=32, exclude=['*down_proj']" if model == "stories260K" else "group_size=64"
    return {
        "slicegpt25": [SLICE],
        "slicegpt25-norerun": ["slicegpt(sparsity=0.25, rerun_attention=False)"],
        "slicegpt25-norerun+sq0.5+w8a8": ["slicegpt(sparsity=0.25, rerun_attention=False)",
                                          "smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"],
        "slicegpt25+sq0.5+w8a8": [SLICE, "smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"],
        "gptq_w4": [f"gptq(bits=4, {w4})"],
        "awq_w4": [f"awq(bits=4, {w4})"],
    }


def setup(model: str) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    root = data_dir()
    if root is None:
        raise SystemExit("no shared data folder (set FXCOMPRESS_DATA)")
    if model == "stories260K":
        folder = root / "stories260K" / "hf"
        tok, n_eval, n_calib = folder, 256, 128
    else:
        folder = root / SMOLLM2
        tok, n_eval, n_calib = folder / "hf", 64, 32
    windows = evaluation_windows("tinystories", tok, n_eval)
    calib = calibration_batches("tinystories", tok, n=n_calib)
    return load_model(folder), windows, calib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["stories260K", "smollm2"],
                    choices=["stories260K", "smollm2"])
    ap.add_argument("--only", nargs="*", default=None, help="pipeline names")
    ap.add_argument("--out", type=Path, help="append JSON lines here")
    ap.add_argument("--dtypes", nargs="*", default=None, help="calibration dtypes (default both)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    for model in args.models:
        net, windows, calib = setup(model)
        fp32 = perplexity(compiler.compile(net, report_data=False).graph_module, windows,
                          progress=False).ppl
        for name, passes in pipelines(model).items():
            if args.only and name not in args.only:
                continue
            for dtype in (args.dtypes or DTYPES):
                t0 = time.perf_counter()
                cm = compiler.compile(net, passes, calibration=calib, calibration_dtype=dtype,
                                      report_data=False)
                seconds = time.perf_counter() - t0
                ppl = perplexity(cm.graph_module, windows, progress=False).ppl
                row = {"model": model, "pipeline": name, "calibration_dtype": dtype,
                       "ppl": round(ppl, 4), "fp32_ppl": round(fp32, 4),
                       "compile_s": round(seconds, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print("\n| model | pipeline | float32 calibration | bfloat16 calibration | difference |")
    print("|---|---|---:|---:|---:|")
    by = {(r["model"], r["pipeline"], r["calibration_dtype"]): r for r in rows}
    for (model, name, dtype), r in by.items():
        if dtype != "float32" or (model, name, "bfloat16") not in by:
            continue
        b = by[(model, name, "bfloat16")]
        print(f"| {model} | {name} | {r['ppl']:.3f} | {b['ppl']:.3f} | "
              f"{100 * (b['ppl'] / r['ppl'] - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
