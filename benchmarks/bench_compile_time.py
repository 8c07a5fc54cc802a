"""Compile time and peak memory of a calibrated pipeline, against one plain forward pass.

Issue 13's measurement: on the 134M Llama-shaped model of ``bench_quant.py`` (random init, seed
0) with 32 x 512 calibration tokens in batches of 4 x 512 (random ids, seed 1), the pipeline
``slicegpt(sparsity=0.25)``, ``smoothquant(alpha=0.5)``, ``insert_qdq(scheme=w8a8)`` through
``compiler.compile`` (tracing, canonicalization and every pass's check included) plus
``export_onnx``, against one plain torch forward pass of the Hugging Face model over the same
calibration batches, measured in the same process (the forward first). Per pass: seconds and
calibration sweeps (activation-statistics runs over the calibration set; SliceGPT's
block-sequential engine is one sweep of its own, not counted there). Peak memory: the process's
maximum resident set (the original model is held alongside the compiled one, as a user's
process would), and per phase (forward, compile, export) where Linux lets the peak mark be reset
(``/proc/self/clear_refs``).

Run: ``python benchmarks/bench_compile_time.py [--layers 12] [--samples 32] [--seq 512]
[--batch 4] [--out results.json]``; ``--passes`` replaces the pipeline (registry specs).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import CONFIG  # noqa: E402  (the 134M model of the quantization benchmark)

PIPELINE = ["slicegpt(sparsity=0.25)", "smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``/proc/self/clear_refs``), so
    :func:`phase_peak_mb` reads the peak of the phase that follows; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def phase_peak_mb() -> float | None:
    """Peak RSS since the last :func:`reset_peak` (``VmHWM``), or None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", nargs="*", default=PIPELINE)
    ap.add_argument("--calibration-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compile(calibration_dtype=...); with bfloat16 the HF forward is also "
                         "timed under bfloat16 autocast, for a second ratio")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import compiler
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": args.layers})).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.samples, args.seq), generator=g)
    batches = list(ids.split(args.batch))

    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    forward = time.perf_counter() - t0
    print(f"plain forward over {args.samples} x {args.seq}: {forward:.1f} s", flush=True)
    forward_bf16 = None
    if args.calibration_dtype == "bfloat16":  # the same forward in the calibration's precision
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for b in batches:
                model(input_ids=b, use_cache=False)
        forward_bf16 = time.perf_counter() - t0
        print(f"plain forward under bfloat16 autocast: {forward_bf16:.1f} s", flush=True)

    phase_peaks = {"forward": phase_peak_mb()}
    resettable = reset_peak()
    t0 = time.perf_counter()
    cm = compiler.compile(model, passes=args.passes, calibration=batches,
                          calibration_dtype=args.calibration_dtype)
    compiled = time.perf_counter() - t0
    phase_peaks["compile"] = phase_peak_mb() if resettable else None
    reset_peak()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cm.export_onnx(Path(d) / "model.onnx")
        export = time.perf_counter() - t0
    phase_peaks["export"] = phase_peak_mb() if resettable else None
    total = compiled + export
    rows = [{"pass": r.spec, "seconds": round(r.seconds, 1), "sweeps": r.sweeps}
            for r in cm.report.records]
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "model": f"Llama-shaped, {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M",
        "calibration": f"{args.samples} x {args.seq} in batches of {args.batch}",
        "forward_s": round(forward, 1), "compile_s": round(compiled, 1),
        "export_s": round(export, 1), "total_s": round(total, 1),
        "ratio": round(total / forward, 2), "passes": rows,
        "calibration_dtype": args.calibration_dtype,
        "forward_bf16_s": forward_bf16 and round(forward_bf16, 1),
        "ratio_to_bf16_forward": forward_bf16 and round(total / forward_bf16, 2),
        "traced_and_checked_s": round(compiled - sum(r.seconds for r in cm.report.records), 1),
        "peak_rss_mb": round(max(peak_mb(), *(v for v in phase_peaks.values() if v))),
        "phase_peak_rss_mb": {k: v and round(v) for k, v in phase_peaks.items()},
        # where the time outside the passes goes: tracing, shape propagations, report data
        "extra": {k: cm.report.extra.get(k) for k in (
            "trace_seconds", "shape_propagation", "report_capture_seconds", "analysis_cache")},
    }
    print(cm.report.table())
    print(f"| step | seconds | calibration sweeps |\n|---|---:|---:|")
    print(f"| plain forward (reference) | {forward:.1f} | - |")
    for r in rows:
        print(f"| {r['pass']} | {r['seconds']} | {r['sweeps']} |")
    print(f"| trace, canonicalize, checks | {result['traced_and_checked_s']} | - |")
    print(f"| export_onnx | {export:.1f} | - |")
    print(f"| **total / forward** | {total:.1f} | **{result['ratio']}x** |")
    if forward_bf16:
        print(f"| total / forward under bfloat16 autocast ({forward_bf16:.1f} s) | {total:.1f} | "
              f"{result['ratio_to_bf16_forward']}x |")
    print("outside the passes:", json.dumps(result["extra"]))
    print(f"peak RSS {result['peak_rss_mb']} MB; per phase (MB): "
          + ", ".join(f"{k} {v}" for k, v in result["phase_peak_rss_mb"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
