"""Cost of the HTML compile report on the 134M model: capture during compile(), rendering, size.

Model and calibration as in ``bench_quant.py`` (BENCHMARKS.md: Llama-shaped random init, 134M
parameters; 32 x 512 random calibration ids, seed 1). Pipeline: ``smoothquant(alpha=0.5)`` +
``insert_qdq(scheme=w8a8)`` (canonicalize first, as ``compile()`` does). For each round it
compiles with the report data captured (``report_data=True``, the default) and, with
``--baseline``, without it, in alternating order, and reports per round:

- compile seconds (``report.total_seconds``), the capture's own seconds
  (``report.extra["report_capture_seconds"]``, timed inside the instrument) and its share;
- rendering seconds of ``report.to_html`` and the file size; report.json size.

Run: ``python benchmarks/bench_report.py [--rounds 2] [--baseline] [--calib 32] [--out FILE]``
(``--smoke``: a 2-layer hidden-256 model, for the test).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quant  # model and calibration of the speed benchmarks

import compiler

PASSES = ["smoothquant(alpha=0.5)", "insert_qdq(scheme=w8a8)"]


def compile_once(report_data: bool, calib: list[torch.Tensor], work: Path) -> dict:
    model = bench_quant.build_model()
    cm = compiler.compile(model, PASSES, calibration=calib, report_data=report_data)
    row = {"report_data": report_data, "compile_s": round(cm.report.total_seconds, 2)}
    if report_data:
        capture = cm.report.extra["report_capture_seconds"]
        t = time.perf_counter()
        path = cm.report.to_html(work / "report.html")
        render = time.perf_counter() - t
        row.update(capture_s=round(capture, 2),
                   capture_share=round(capture / cm.report.total_seconds, 4),
                   render_s=round(render, 2),
                   render_share=round(render / cm.report.total_seconds, 4),
                   html_mb=round(path.stat().st_size / 1e6, 3),
                   report_json_mb=round(len(cm.report.to_json().encode()) / 1e6, 3))
    del cm, model
    gc.collect()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--calib", type=int, default=32, help="calibration batches of 1 x 512")
    ap.add_argument("--baseline", action="store_true",
                    help="also compile without report data (alternating order per round)")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer hidden-256 model")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        bench_quant.CONFIG.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=512, vocab_size=1024)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_report-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = bench_quant.calibration(args.calib, 512 if not args.smoke else 64)
    rows = []
    for r in range(args.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        for flag in order if args.baseline else [True]:
            row = {"round": r, **compile_once(flag, calib, work)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with_data = [x for x in rows if x["report_data"]]
    summary = {
        "capture_share_max": max(x["capture_share"] for x in with_data),
        "render_share_max": max(x["render_share"] for x in with_data),
        "html_mb_max": max(x["html_mb"] for x in with_data),
    }
    if args.baseline:
        base = [x["compile_s"] for x in rows if not x["report_data"]]
        summary["compile_s_with"] = [x["compile_s"] for x in with_data]
        summary["compile_s_without"] = base
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
