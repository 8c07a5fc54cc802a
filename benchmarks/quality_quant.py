"""Perplexity of quantization pipelines on stories260K and on its outlier variant (BENCHMARKS.md).

Protocol (``shared/BENCHMARKS.md``): stories260K, TinyStories evaluation half, 256 windows of
``[BOS] + 255`` tokens (65,280 scored tokens); calibration 128 x 256 windows from the
calibration half, seed 0. Every variant starts from the same traced, canonicalized graph and is
evaluated as an fx graph in fp32 (Q/DQ simulated by the ``quantized_decomposed`` ops).

Outlier variant: :func:`compiler.testing.make_outlier_model` (channels 3, 17, 42 of every norm
output x50, consumers' columns / 50; function-preserving, so its fp32 perplexity is the same).

Pipelines:

- ``fp32``: nothing;
- ``w8a8``: ``insert_qdq(scheme=w8a8)`` (int8 per-channel weights, static per-tensor int8
  activations);
- ``w8a8_dynamic``: per-token activations;
- ``smoothquant+w8a8``: ``smoothquant(alpha=0.5)`` then ``w8a8``;
- ``rptq+cluster_w8a8``: ``rptq_reorder(clusters=4)`` then ``insert_qdq_clusters`` (one static
  activation scale per contiguous cluster of channels);
- ``w4a16``: int4 group-wise weights (group 32: stories260K's widths, 64 and 172, are not
  divisible by 128; 172 is not divisible by 32 either, so ``down_proj`` is excluded with a
  note), float activations.

- W4 weight-only rounding, LM head float, activations float, ``down_proj`` (in-features 172)
  left float at groups 32 and 64 (per channel it is quantized: one group of 172 per row, which
  the fx graph runs but ``MatMulNBits`` cannot, so per-channel rows are graph-only):
  ``rtn_g32`` / ``rtn_g64`` (= ``w4a16`` at those groups), ``rtn_per_channel``;
  ``gptq_g32`` / ``gptq_g64`` / ``gptq_per_channel`` / ``gptq_act_order_g32``
  (``passes/gptq.py``); ``awq_g32`` / ``awq_g64`` (``passes/awq.py``, scales + clipping).
  With ``--ort`` the grouped ones are also exported (``MatMulNBits``) and run in ORT.

- ``int8_weights_only``: the int8 per-channel weights of ``w8a8`` (insert_qdq's own rounding,
  LM head left float as there), activations float: the floor every W8A8 pipeline starts from.

Reading the outlier rows: the outlier transform divides the consumers' weight columns by 50,
so int8 per-row weights alone already round those columns coarsely (the ``int8_weights_only``
row). RPTQ's per-cluster scales fix the activations only, so that is its floor; SmoothQuant
moves the range back into those weight columns and avoids it.

``--ort``: also export every int8 activation pipeline (Q/DQ lowered to ORT's integer kernels,
``backends/ort_quant.py``) and evaluate it in ONNX Runtime on the same windows; the table gets
the ORT perplexity and its relative difference from the graph's.

Run: ``python benchmarks/quality_quant.py [--windows 256] [--ort] [--pass-manager] [--out results.md]``
(``--pass-manager``: each pipeline through one pass manager, as ``compile()`` runs it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.data import calibration_batches, evaluation_windows, stories260k_dir
from compiler.evaluate import perplexity
from compiler.frontend import load_model, trace
from compiler.pass_base import PassContext
from compiler.testing import make_outlier_model
from passes.canonicalize import canonicalize
from passes.insert_qdq import InsertQDQ
from passes.smoothquant import SmoothQuant

log = logging.getLogger("quality_quant")


def pipelines() -> dict[str, list]:
    """Name -> list of pass objects (fresh each call)."""
    from passes.rptq import InsertQDQClusters, RPTQReorder

    return {
        "fp32": [],
        "w8a8": [InsertQDQ(scheme="w8a8")],
        "w8a8_dynamic": [InsertQDQ(scheme="w8a8_dynamic")],
        "smoothquant+w8a8": [SmoothQuant(alpha=0.5), InsertQDQ(scheme="w8a8")],
        "rptq+cluster_w8a8": [RPTQReorder(clusters=4), InsertQDQClusters()],
        "w4a16": [InsertQDQ(scheme="w4a16", group_size=32, exclude=["*down_proj"])],
        "int8_weights_only": [Int8WeightsOnly()],
        **w4_pipelines(),
    }


def w4_pipelines() -> dict[str, list]:
    """RTN / GPTQ / AWQ at W4 (issue 13's table), ``down_proj`` float at groups 32 and 64."""
    from passes.awq import AWQ
    from passes.gptq import GPTQ

    keep = {"exclude": ["*down_proj"]}
    return {
        "rtn_g32": [InsertQDQ(scheme="w4a16", group_size=32, **keep)],
        "rtn_g64": [InsertQDQ(scheme="w4a16", group_size=64, **keep)],
        "rtn_per_channel": [RTNPerChannel()],
        "gptq_g32": [GPTQ(group_size=32, **keep)],
        "gptq_g64": [GPTQ(group_size=64, **keep)],
        "gptq_per_channel": [GPTQ(group_size=-1)],
        "gptq_act_order_g32": [GPTQ(group_size=32, act_order=True, **keep)],
        "awq_g32": [AWQ(group_size=32, **keep)],
        "awq_g64": [AWQ(group_size=64, **keep)],
    }


class RTNPerChannel:
    """Asymmetric int4 rounding to nearest, one group per row, in the Q/DQ form GPTQ writes for
    ``group_size=-1`` (``insert_qdq`` itself offers groups of 32, 64 and 128 only)."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        from compiler.qdq import insert_qdq, resolve_weight_spec, select_sites

        spec = resolve_weight_spec("rtn", 4, -1, False)
        todo, _ = select_sites("rtn", gm, spec, include=None, exclude=(), quantize_lm_head=False)
        insert_qdq(gm, todo, {})
        gm.recompile()


class Int8WeightsOnly:
    """Round every linear weight but the LM head's to int8 per output channel, exactly as
    ``insert_qdq(scheme=w8a8)`` does (``compiler.qdq.quantize_weight_per_channel``), and
    store it dequantized: activations stay float."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        from compiler import ir
        from compiler.qdq import WeightQuantSpec, quantize_weight_per_channel

        spec = WeightQuantSpec(bits=8, group_size=None, symmetric=True)
        for n in ir.nodes_of(gm, ir.LINEAR):
            if any(u.op == "output" for u in n.users):
                continue  # the LM head (insert_qdq's default quantize_lm_head=False)
            _, w, _ = ir.linear_parts(n)
            q, scale = quantize_weight_per_channel(ir.get_param(gm, w), spec)
            ir.set_param(gm, w, q.float() * scale[:, None])


#: pipelines whose activations are int8 (``--ort`` evaluates these in ONNX Runtime too)
INT8_ACTIVATIONS = ("w8a8", "w8a8_dynamic", "smoothquant+w8a8", "rptq+cluster_w8a8")
#: W4 pipelines ``--ort`` exports (MatMulNBits); per-channel groups of 172 have no ORT kernel
W4_ORT = ("rtn_g32", "rtn_g64", "gptq_g32", "gptq_g64", "gptq_act_order_g32", "awq_g32",
          "awq_g64")


def run_with_pass_manager(gm, passes, calib):
    """Run ``passes`` on the canonical ``gm`` (in place) through one :class:`PassManager` and
    context, as ``compile()`` does; returns the report."""
    from compiler.pass_manager import PassManager
    from compiler.report import Report

    ctx = PassContext(calibration=calib, probe_inputs=calib[0][:1])
    ctx.properties.add("canonical")
    return PassManager(passes).run(gm, ctx, Report())


def run_pipeline(gm, passes, calib, pass_manager: bool = False) -> torch.fx.GraphModule:
    """Run ``passes`` on a copy of ``gm``: each pass with a context of its own (every pass
    measures its statistics), or, with ``pass_manager``, through one :class:`PassManager` and
    context as ``compile()`` does (statistics handed from pass to pass, exact passes checked)."""
    gm = copy.deepcopy(gm)
    if pass_manager:
        run_with_pass_manager(gm, passes, calib)
        return gm
    for p in passes:
        ctx = PassContext(calibration=calib)
        p.run(gm, ctx)
    return gm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--only", nargs="*", default=None, help="pipeline names to run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ort", action="store_true",
                    help="also evaluate the int8-activation pipelines in ONNX Runtime")
    ap.add_argument("--no-outliers", action="store_true", help="skip the outlier variant")
    ap.add_argument("--pass-manager", action="store_true",
                    help="run each pipeline through one PassManager, as compile() does")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    model_dir = stories260k_dir()
    base = canonicalize(trace(load_model(model_dir)))
    outlier = make_outlier_model(copy.deepcopy(base))
    windows = evaluation_windows("tinystories", model_dir, args.windows)
    calib = calibration_batches("tinystories", model_dir, n=args.calib)
    names = [n for n in pipelines() if args.only is None or n in args.only]
    rows = []
    variants = (("stories260K", base), ("stories260K outliers x50", outlier))
    for variant, gm0 in variants[:1] if args.no_outliers else variants:
        ref = None
        for name in names:
            t0 = time.perf_counter()
            gm = run_pipeline(gm0, pipelines()[name], calib, args.pass_manager)
            ppl = perplexity(gm, windows, progress=False).ppl
            ref = ppl if name == "fp32" else ref
            rel = "" if ref is None or name == "fp32" else f"{100 * (ppl / ref - 1):+.2f}%"
            ort = (_ort_perplexity(gm, windows) if args.ort and name in INT8_ACTIVATIONS + W4_ORT
                   else None)
            rows.append((variant, name, ppl, rel, time.perf_counter() - t0, ort))
            log.warning("%s %s: %.4f %s%s", variant, name, ppl, rel,
                        f" (ORT {ort:.4f}, {100 * (ort / ppl - 1):+.4f}%)" if ort else "")
    lines = [
        (f"stories260K perplexity, TinyStories eval half, {args.windows} x 256 windows "
         f"({args.windows * 255} scored tokens); calibration {args.calib} x 256 (seed 0). "
         f"{platform.processor() or platform.machine()}, torch {torch.__version__}."),
        "",
        "| model | pipeline | perplexity | vs fp32 |" + (" ORT | ORT vs graph |" if args.ort else ""),
        "|---|---|---:|---:|" + ("---:|---:|" if args.ort else ""),
    ]
    lines += [f"| {v} | {n} | {p:.4f} | {r or '-'} |"
              + ((f" {o:.4f} | {100 * (o / p - 1):+.4f}% |" if o else " - | - |") if args.ort else "")
              for v, n, p, r, _, o in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _ort_perplexity(gm: torch.fx.GraphModule, windows: torch.Tensor) -> float:
    """Perplexity of ``gm`` exported with ORT integer kernels, run in ONNX Runtime."""
    import tempfile

    from backends.onnxruntime import ORTModel
    from backends.ort_quant import export_quantized_onnx

    with tempfile.TemporaryDirectory(prefix="quality_quant-") as tmp:
        path = export_quantized_onnx(gm, Path(tmp) / "q.onnx")
        return perplexity(ORTModel(path, threads=2), windows, progress=False).ppl


if __name__ == "__main__":
    raise SystemExit(main())
