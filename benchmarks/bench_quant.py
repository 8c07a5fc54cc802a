"""ORT CPU latency and file size of quantized exports vs ORT's own quantizers (BENCHMARKS.md).

Model: Llama-shaped, random init (``torch.manual_seed(0)``): hidden 768, 12 layers, 12 heads
(12 kv heads), ffn 2048, vocab 32000, untied embeddings (134M parameters). Calibration: 32 x 512
random token ids, seed 1 (speed does not depend on the weights' values).

Variants (all exported from the same traced, canonicalized graph, with the exact
``simplify_mask`` pass applied unless ``--no-simplify-mask``; the ORT baselines quantize that
same fp32 export, so the mask change helps every row alike):

- ``fp32``: ``backends.onnxruntime.export_onnx``;
- ``ort_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the fp32 file (its
  defaults: int8 weights per tensor, every MatMul and Gather);
- ``ort_static_qdq``: ``quantize_static`` (QDQ, per-channel, MatMul only, MinMax calibration
  on the first 4 of the 32 x 512 calibration batches: ORT's calibrator keeps every
  calibrated tensor of every batch in memory);
- ``w8a8`` / ``w8a8_dynamic`` / ``w4a16``: ``InsertQDQ`` then ``backends.ort_quant`` lowering,
  LM head and embeddings quantized too (as ``quantize_dynamic`` does); ``w4a16_acc4`` is the
  same W4A16 graph lowered with ``MatMulNBits`` accuracy_level 4 (int8 compute inside the
  kernel: faster, but activations are then quantized, so not A16 numerics);
- ``smoothquant+w8a8``: ``SmoothQuant(alpha=0.5)`` (exact, folded into weights) then ``w8a8``:
  the same kernels as ``w8a8``, so the same speed is expected;
- ``rptq+cluster_w8a8``: ``RPTQReorder(clusters=4)`` then ``InsertQDQClusters`` (one
  ``MatMulIntegerToFloat`` per cluster, summed) and ``InsertQDQ`` for the embedding table;
- ``smoothquant+w8a8_genai``: the ``smoothquant+w8a8`` graph as ``export_genai`` deploys it
  (``compiler.kv_cache.with_kv_cache`` then ``backends.genai.export_kv_onnx``: norms, rotary and
  attention on ORT's fused kernels), timed on the prompt with an empty cache (an all-ones
  ``attention_mask`` and ``[1, heads, 0, D]`` past inputs), so it computes the same logits
  as the other rows.

ORT: CPU EP, ``intra_op_num_threads=2``, batch 1 x seq tokens; each variant alone in a fresh
process (3 warm-ups, 15 timed runs), processes interleaved over 10 rounds, median of the 150 runs
(deviation from BENCHMARKS.md's one-process interleaving, which lets the sessions' spinning
thread pools fight over the two cores: see ``benchmarks/ort_timing.py``). Size: graph + external data;
the exporter's per-node debug metadata is stripped from every file we export (fp32 included)
so sizes compare weights, not stack traces.

Run: ``python benchmarks/bench_quant.py [--seq 128 512] [--out results.md] [--workdir DIR]
[--ours w8a8 smoothquant+w8a8 ...] [--no-ort-static]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backends.onnxruntime import ORTModel, export_onnx, file_size
from backends.ort_quant import (
    INTEGER_KERNELS,
    export_quantized_onnx,
    integer_kernel_counts,
    strip_debug_metadata,
)
from compiler.frontend import trace
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.insert_qdq import InsertQDQ

log = logging.getLogger("bench_quant")

CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
          "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
          "max_position_embeddings": 2048, "tie_word_embeddings": False}
OURS = {
    "w8a8": {"scheme": "w8a8"},
    "w8a8_dynamic": {"scheme": "w8a8_dynamic"},
    "w4a16": {"scheme": "w4a16", "group_size": 128},
    # MatMulNBits' int8-compute path: activations quantized inside the kernel (not A16 numerics)
    "w4a16_acc4": {"scheme": "w4a16", "group_size": 128, "accuracy_level": 4},
    "smoothquant+w8a8": {"scheme": "w8a8", "smoothquant": 0.5},
    "rptq+cluster_w8a8": {"scheme": "w8a8", "rptq": 4},
    # the same SmoothQuant W8A8 graph as deployed for generation: the KV-cache export of
    # ``export_genai`` (norms, rotary and attention on ORT's fused kernels), timed on the prompt
    # with an empty cache
    "smoothquant+w8a8_genai": {"scheme": "w8a8", "smoothquant": 0.5, "genai": "all"},
    "smoothquant+w8a8_genai_last": {"scheme": "w8a8", "smoothquant": 0.5, "genai": "last"},
    "fuse+smoothquant+w8a8_genai_last": {"scheme": "w8a8", "smoothquant": 0.5, "genai": "last",
                                         "fuse": True},
}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def calibration(n: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=g) for _ in range(n)]


def export_ours(gm, calib, work: Path, timings: dict, names=None) -> dict[str, Path]:
    from passes.rptq import InsertQDQClusters, RPTQReorder
    from passes.smoothquant import SmoothQuant

    paths = {}
    for name, opts in OURS.items():
        if names is not None and name not in names:
            continue
        opts = dict(opts)
        level = opts.pop("accuracy_level", 0)
        genai = opts.pop("genai", None)
        fuse = opts.pop("fuse", False)
        alpha = opts.pop("smoothquant", None)
        clusters = opts.pop("rptq", None)
        g = copy.deepcopy(gm)
        t = time.perf_counter()
        ctx = PassContext(calibration=calib)
        if fuse:
            from passes.fuse_linears import FuseLinears

            g = FuseLinears().run(g, ctx).gm
        if alpha is not None:
            res = SmoothQuant(alpha=alpha).run(g, ctx)
            log.info("%s: smoothquant %s", name, res.stats)
        if clusters is not None:
            res = RPTQReorder(clusters=clusters).run(g, ctx)
            log.info("%s: rptq_reorder %s", name, res.stats)
            res = InsertQDQClusters(quantize_lm_head=True).run(g, PassContext(calibration=calib))
            log.info("%s: insert_qdq_clusters %s", name, res.stats)
        # with rptq the linears are already quantized: this quantizes the embedding table
        res = InsertQDQ(quantize_lm_head=True, quantize_embeddings=True, **opts).run(
            g, PassContext(calibration=calib))
        timings[f"{name}: passes (s)"] = round(time.perf_counter() - t, 1)
        log.info("%s: %s", name, res.stats)
        t = time.perf_counter()
        if genai:
            from backends.genai import export_kv_onnx
            from compiler.kv_cache import with_kv_cache

            paths[name], _ = export_kv_onnx(with_kv_cache(g), work / f"{name}.onnx",
                                            accuracy_level=level, logits=genai,
                                            max_positions=CONFIG["max_position_embeddings"])
            strip_debug_metadata(paths[name])
        else:
            paths[name] = export_quantized_onnx(g, work / f"{name}.onnx", strip_metadata=True,
                                                accuracy_level=level)
        timings[f"{name}: export (s)"] = round(time.perf_counter() - t, 1)
        del g
        gc.collect()
    return paths


def export_ort_baselines(fp32: Path, calib, work: Path, timings: dict,
                         static_batches: int, with_static: bool = True) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = {}
    t = time.perf_counter()
    out["ort_dynamic"] = work / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(out["ort_dynamic"]), weight_type=QuantType.QInt8)
    timings["ort_dynamic: quantize (s)"] = round(time.perf_counter() - t, 1)
    if not with_static:
        return out

    class Reader(CalibrationDataReader):
        def __init__(self):
            # ORT's MinMax calibrator keeps every calibrated tensor of every batch in memory
            # (its CalibMaxIntermediateOutputs option discards data), so it gets fewer batches
            self._it = iter([{"input_ids": c.numpy()} for c in calib[:static_batches]])

        def get_next(self):
            return next(self._it, None)

    t = time.perf_counter()
    out["ort_static_qdq"] = work / "ort_static_qdq.onnx"
    quantize_static(
        str(fp32), str(out["ort_static_qdq"]), Reader(), quant_format=QuantFormat.QDQ,
        per_channel=True, op_types_to_quantize=["MatMul"],
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )
    timings["ort_static_qdq: quantize (s)"] = round(time.perf_counter() - t, 1)
    return out


def bench(paths: dict[str, Path], seqs: list[int], warmup: int, runs: int,
          rounds: int) -> dict:
    """Latency (each file alone in a fresh process, see ``ort_timing``), logit diffs, op types."""
    from ort_timing import paired_ratio, prompt_feed, time_onnx_files

    lat = time_onnx_files(paths, seqs, warmup=warmup, runs=runs, rounds=rounds,
                          vocab=CONFIG["vocab_size"])
    result = {seq: {k: dict(lat[k][seq]) for k in paths} for seq in seqs}
    if "ort_dynamic" in paths:
        for seq in seqs:
            for k in paths:
                result[seq][k]["paired_vs_ort_dynamic"] = paired_ratio(lat, k, "ort_dynamic", seq)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, seqs[0]),
                        generator=torch.Generator().manual_seed(2)).numpy()
    ops, ref = {}, None
    for k, p in paths.items():  # one session at a time: 134M fp32 + 7 variants is a lot of RAM
        s = ORTModel(p, threads=2)
        y = s.session.run(None, prompt_feed(s.session, ids))[0]
        ref = y if k == "fp32" else ref
        for seq in seqs:
            # last-position exports: compared on the last position
            result[seq][k]["max_abs_logit_diff_vs_fp32"] = float(
                np.abs(y - ref[:, -y.shape[1]:]).max())
        c = s.optimized_op_types()
        ops[k] = {"counts": integer_kernel_counts(c),
                  "integer_ops": {o: n for o, n in c.items() if o in INTEGER_KERNELS}}
        del s
        gc.collect()
    return {"latency": result, "ops": ops}


def render(paths, res, timings, seqs, n_params) -> str:
    fp_size = file_size(paths["fp32"])
    lines = [
        (f"Model: Llama-shaped random init, {n_params / 1e6:.1f}M params (hidden "
         f"{CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, ffn "
         f"{CONFIG['intermediate_size']}, vocab {CONFIG['vocab_size']}); ORT CPU EP, "
         "intra_op_num_threads=2, batch 1; each variant alone in a fresh process, 3 warm-ups + "
         "15 runs, processes interleaved over rounds; median of all runs."),
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
         f"onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}."),
        "",
    ]
    head = "| variant | " + " | ".join(
        f"ms @{s} (round medians) | x fp32 @{s} | x ort_dynamic @{s}, per round: median (min-max)"
        for s in seqs)
    lines += [head + " | size MB | x fp32 size | integer kernels (ORT optimised graph) | "
              "float MatMul | max abs logit diff vs fp32 |",
              "|" + "---|" * (3 + 3 * len(seqs) + 3)]
    for k in paths:
        row = [k]
        for s in seqs:
            ms = res["latency"][s][k]["median_ms"]
            rm = res["latency"][s][k]["round_medians_ms"]
            pr = res["latency"][s][k].get("paired_vs_ort_dynamic")
            row += [f"{ms:.1f} ({min(rm):.1f}-{max(rm):.1f})",
                    f"{ms / res['latency'][s]['fp32']['median_ms']:.2f}",
                    f"{pr[0]:.2f} ({pr[1]:.2f}-{pr[2]:.2f})" if pr else "-"]
        size = file_size(paths[k])
        kern = ", ".join(f"{o} x{n}" for o, n in sorted(res["ops"][k]["integer_ops"].items()))
        row += [f"{size / 1e6:.1f}", f"{size / fp_size:.3f}", kern or "-",
                str(res["ops"][k]["counts"]["float_matmul"]),
                f"{res['latency'][seqs[0]][k]['max_abs_logit_diff_vs_fp32']:.3g}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", ("Sizes exclude the exporter's per-node debug metadata (stripped from every "
                   "file we export; ORT's quantizers copy the stripped fp32 graph).")]
    lines += ["", "Compile/quantize times: " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=10,
                    help="timing rounds; each runs every variant once in its own process")
    ap.add_argument("--calib", type=int, default=32, help="calibration batches of 1 x 512")
    ap.add_argument("--ort-static-calib", type=int, default=4,
                    help="calibration batches (1 x 512) given to ORT quantize_static")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--ours", nargs="+", default=None, choices=list(OURS),
                    help="only these of our variants (default: all)")
    ap.add_argument("--no-ort-static", action="store_true",
                    help="skip ORT's quantize_static baseline (slow calibration)")
    ap.add_argument("--smoke", action="store_true",
                    help="a 2-layer hidden-256 model, to check the script end to end quickly")
    ap.add_argument("--no-simplify-mask", action="store_true",
                    help="keep the exported boolean attention mask (default: the exact "
                         "simplify_mask pass runs on the base graph, so every variant, ORT's "
                         "own quantizers included, starts from the same simplified fp32 export)")
    ap.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.smoke:
        CONFIG.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=512, vocab_size=1024)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_quant-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict = {}

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    gm = canonicalize(trace(model))
    if not args.no_simplify_mask:
        from passes.simplify_mask import SimplifyMask

        SimplifyMask().run(gm, PassContext())
    timings["trace+canonicalize (s)"] = round(time.perf_counter() - t, 1)
    del model
    calib = calibration(args.calib, 512)

    paths = {"fp32": work / "fp32.onnx"}
    t = time.perf_counter()
    export_onnx(gm, paths["fp32"])
    strip_debug_metadata(paths["fp32"])
    timings["fp32: export (s)"] = round(time.perf_counter() - t, 1)
    paths.update(export_ort_baselines(paths["fp32"], calib, work, timings,
                                      args.ort_static_calib, not args.no_ort_static))
    paths.update(export_ours(gm, calib, work, timings, args.ours))
    del gm
    gc.collect()

    res = bench(paths, args.seq, args.warmup, args.runs, args.rounds)
    table = render(paths, res, timings, args.seq, n_params)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"latency": res["latency"], "ops": res["ops"], "timings": timings,
             "sizes": {k: file_size(p) for k, p in paths.items()}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
