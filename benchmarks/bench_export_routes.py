"""ONNX export: the direct route against the standard one, on one model.

``export_onnx`` translates a compiled graph from its own shape metadata
(:mod:`backends.onnx_direct`); ``direct=False`` re-exports it with ``torch.export`` and lets
``torch.onnx.export`` decompose the whole graph. For each recipe this exports the same compiled
graph both ways and reports the seconds, whether the ONNX op types are the same, the largest
difference between the two files' ONNX Runtime logits, and that of the direct file against the
graph.

Run: ``python benchmarks/bench_export_routes.py [--model smollm2|stories260K|tiny-llama|<path>]
[--recipes fp32 w8a8]``. The real models come from ``$FXCOMPRESS_DATA`` (default
``../shared/data``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"smollm2": "smollm2-135m-instruct-q4_1", "stories260K": "stories260K"}
RECIPES = {"fp32": [], "w8a8": ["smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"]}


def _model(spec: str):
    from compiler.frontend import load_model

    if spec in MODELS:
        data = Path(os.environ.get("FXCOMPRESS_DATA",
                                   Path(__file__).resolve().parents[2] / "shared" / "data"))
        path = data / MODELS[spec]
        if not path.exists():
            raise SystemExit(f"{spec}: {path} not found (set FXCOMPRESS_DATA)")
        return load_model(path)
    return load_model(spec)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import onnx
    import onnxruntime as ort

    import compiler
    from backends.onnxruntime import export_onnx
    from backends.ort_quant import export_quantized_onnx

    model = _model(args.model)
    vocab = model.config.vocab_size if hasattr(model, "config") else 256
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, vocab, (2, 128), generator=g) for _ in range(2)]
    ids = torch.randint(0, vocab, (2, 23), generator=g)
    rows = []
    print("| recipe | direct s | standard s | same op types | ORT direct vs standard | ORT direct vs graph |")
    print("|---|---:|---:|---|---:|---:|")
    for name in args.recipes:
        cm = compiler.compile(model, passes=RECIPES[name], calibration=calibration,
                              report_data=False)
        export = export_quantized_onnx if RECIPES[name] else export_onnx
        out = {}
        with tempfile.TemporaryDirectory() as d:
            for direct in (True, False):
                path = Path(d) / f"{direct}.onnx"
                t0 = time.perf_counter()
                export(cm.graph_module, path, direct=direct)
                seconds = time.perf_counter() - t0
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                logits = session.run(None, {"input_ids": ids.numpy()})[0]
                ops = Counter(n.op_type for n in onnx.load(str(path),
                                                           load_external_data=False).graph.node)
                out[direct] = (seconds, ops, logits)
        with torch.no_grad():
            ref = cm.graph_module(ids).numpy()
        row = {"recipe": name, "direct_s": round(out[True][0], 1),
               "standard_s": round(out[False][0], 1), "same_ops": out[True][1] == out[False][1],
               "ort_direct_vs_standard": float(np.abs(out[True][2] - out[False][2]).max()),
               "ort_direct_vs_graph": float(np.abs(out[True][2] - ref).max())}
        rows.append(row)
        print(f"| {name} | {row['direct_s']} | {row['standard_s']} | {row['same_ops']} | "
              f"{row['ort_direct_vs_standard']:.2e} | {row['ort_direct_vs_graph']:.2e} |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
