"""StructuredPrune (+ LoRARecover): perplexity on stories260K, ORT latency on the 134M model.

Protocol (``shared/BENCHMARKS.md``):

- Quality: ``stories260K``; TinyStories evaluation half and WikiText-2 test, 256 windows of
  ``[BOS] + 255`` tokens each (65,280 scored tokens per dataset); calibration 128 x 256 windows
  from the TinyStories calibration half, seed 0, batches of 8 (the Taylor terms use all 128
  sequences: one backward pass per sequence for ``taylor``/``taylor2``, the mean loss over all
  of them for ``taylor_mean``, LLM-Pruner's form). Every variant starts from the same traced, canonicalized graph and is evaluated as
  an fx graph in fp32. Pruning: per-layer ratio (LLM-Pruner's default), attention kv groups and
  MLP channels, no layer skipped. ``ratio`` is the fraction of prunable parameters (block
  q/k/v/o and MLP weights) asked for; stories260K has 4 kv groups per layer, so heads move in
  steps of 25% and the measured fraction (reported) differs from the ratio asked.
  LoRA recovery: ``lora_recover(rank=8, steps=--lora-steps, lr=--lora-lr)`` on the same
  calibration batches (deviation from LLM-Pruner, which trains 2 epochs on 50k Alpaca samples:
  a short run, stated in the table).
- Speed: Llama-shaped random-init model (hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000,
  ``torch.manual_seed(0)``, 134M parameters); pruned with ``importance=l2`` (speed does not depend
  on which channels go); the exact ``simplify_mask`` pass on dense and pruned graphs alike;
  ONNX Runtime CPU EP, ``intra_op_num_threads=2``, batch 1 x 128 tokens; each variant alone in
  a fresh process (3 warm-ups, 15 runs), processes interleaved over ``--rounds`` rounds, median
  of all runs (``benchmarks/ort_timing.py`` says why not one process).

Run: ``python benchmarks/bench_prune.py [--part quality|speed|all] [--out results.md]``
(``--part speed --workdir DIR --reuse-onnx`` re-times the exports of an earlier run: latency is
sensitive to other load on a 2-core machine, so re-time on a quiet one).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Spinning OpenMP threads stall a loaded 2-core machine (~15x slower LoRA steps); before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compiler import ir
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.lora import LoRARecover
from passes.simplify_mask import SimplifyMask
from passes.structured_prune import StructuredPrune

log = logging.getLogger("bench_prune")

RATIOS = (0.1, 0.2, 0.25, 0.3, 0.5)
IMPORTANCES = ("l1", "l2", "random", "taylor", "taylor2", "taylor_mean")
#: bench labels -> StructuredPrune options (``taylor_mean``: LLM-Pruner's mean-loss gradient)
ESTIMATORS = {"taylor_mean": {"importance": "taylor", "per_sequence": False},
              # allocation ablation: one ranking by importance per parameter over all layers
              "taylor_global": {"importance": "taylor", "global_ranking": True,
                                "global_cap": math.inf},
              # MLP channels ranked across layers without a cap (attention per layer)
              "taylor_global_mlp": {"importance": "taylor", "global_ranking": "mlp",
                                    "global_cap": math.inf},
              # every group per layer (LLM-Pruner's allocation, the former default)
              "taylor_layer": {"importance": "taylor", "global_ranking": False}}
SPEED_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
                "max_position_embeddings": 2048, "tie_word_embeddings": False}


# ============================================================================ quality


def quality(args) -> dict:
    from compiler.data import calibration_batches, evaluation_windows, stories260k_dir
    from compiler.evaluate import perplexity
    from compiler.frontend import load_model, trace

    model_dir = stories260k_dir()
    base = canonicalize(trace(load_model(model_dir)))
    evals = {name: evaluation_windows(name, model_dir, args.windows)
             for name in ("tinystories", "wikitext2")}
    calib = calibration_batches("tinystories", model_dir, n=args.calib, batch_size=8, seed=0)

    def ppl(gm) -> dict[str, float]:
        return {k: perplexity(gm, w, batch_size=32, progress=False).ppl for k, w in evals.items()}

    rows = [{"variant": "fp32", "ratio": 0.0, "importance": "-", "lora": False,
             "removed_total": 0.0, "removed_prunable": 0.0, **ppl(base)}]
    total = ir.count_params(base)
    for ratio in args.ratios:
        for imp in args.importances:
            gm = copy.deepcopy(base)
            t = time.perf_counter()
            opts = ESTIMATORS.get(imp, {"importance": imp})
            res = StructuredPrune(ratio=ratio, **opts).run(
                gm, PassContext(calibration=calib, seed=0))
            secs = time.perf_counter() - t
            common = {"ratio": ratio, "importance": imp,
                      "removed_total": 1 - ir.count_params(gm) / total,
                      "removed_prunable": res.stats.get("prunable_fraction_removed", 0.0)}
            rows.append({"variant": f"prune {ratio:.0%} {imp}", "lora": False,
                         "seconds": round(secs, 1), **common, **ppl(gm)})
            log.info("%s", rows[-1])
            if args.lora_steps:
                t = time.perf_counter()
                LoRARecover(rank=8, steps=args.lora_steps, lr=args.lora_lr).run(
                    gm, PassContext(calibration=calib, seed=0))
                rows.append({"variant": f"prune {ratio:.0%} {imp} + lora", "lora": True,
                             "seconds": round(time.perf_counter() - t, 1), **common, **ppl(gm)})
                log.info("%s", rows[-1])
            del gm
    return {"rows": rows, "windows": args.windows, "calib": args.calib,
            "lora_steps": args.lora_steps, "lora_lr": args.lora_lr, "params": total}


def render_quality(q: dict) -> str:
    base = q["rows"][0]
    lines = [
        (f"stories260K ({q['params']:,} params), {q['windows']} windows x 256 per dataset; "
        f"calibration {q['calib']} x 256 TinyStories windows; LoRA rank 8, "
        f"{q['lora_steps']} steps, lr {q['lora_lr']}."),
        "",
        "| variant | removed (prunable / total) | TinyStories ppl | Δ | WikiText-2 ppl | Δ |",
        "|---|---|---|---|---|---|",
    ]
    for r in q["rows"]:
        dt = r["tinystories"] / base["tinystories"] - 1
        dw = r["wikitext2"] / base["wikitext2"] - 1
        lines.append(f"| {r['variant']} | {r['removed_prunable']:.1%} / {r['removed_total']:.1%} "
                     f"| {r['tinystories']:.3f} | {dt:+.1%} | {r['wikitext2']:.2f} | {dw:+.1%} |")
    return "\n".join(lines)


# ============================================================================ speed


def speed(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.onnxruntime import export_onnx
    from compiler.frontend import trace

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SPEED_CONFIG)).eval()
    base = canonicalize(trace(model))
    SimplifyMask().run(base, PassContext())
    del model
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prune_"))
    work.mkdir(parents=True, exist_ok=True)
    paths, params, shapes = {}, {}, {}
    def export(gm, path: Path) -> Path:
        # --reuse-onnx: re-time existing files of an earlier run (same seed, same variants)
        return path if args.reuse_onnx and path.is_file() else export_onnx(gm, path)

    paths["dense"] = export(base, work / "dense.onnx")
    params["dense"] = ir.count_params(base)
    shapes["dense"] = _block_shapes(base)
    for ratio in args.ratios:
        gm = copy.deepcopy(base)
        StructuredPrune(ratio=ratio, importance="l2").run(gm, PassContext())
        name = f"pruned {ratio:.0%}"
        params[name] = ir.count_params(gm)
        shapes[name] = _block_shapes(gm)
        paths[name] = export(gm, work / f"pruned_{int(ratio * 100)}.onnx")
        del gm
        gc.collect()
    del base
    gc.collect()
    from ort_timing import paired_ratio, time_onnx_files

    lat = time_onnx_files(paths, [args.seq], warmup=args.warmup, runs=args.runs,
                          rounds=args.rounds, vocab=SPEED_CONFIG["vocab_size"])
    med = {k: v[args.seq]["median_ms"] for k, v in lat.items()}
    return {"median_ms": med, "params": params, "shapes": shapes, "seq": args.seq,
            "warmup": args.warmup, "runs": args.runs, "rounds": args.rounds,
            "round_medians_ms": {k: v[args.seq]["round_medians_ms"] for k, v in lat.items()},
            "speedup": {k: med["dense"] / v for k, v in med.items()},
            "paired_speedup": {k: paired_ratio(lat, "dense", k, args.seq) for k in lat}}


def _block_shapes(gm) -> str:
    """Block 0's q/k/v/o/gate/up/down weight shapes (all blocks prune alike per layer)."""
    out = []
    for n, p in gm.named_parameters():
        if ".layers.0." in n and n.endswith("proj.weight"):
            out.append(f"{n.split('.')[-2]}{list(p.shape)}")
    return " ".join(out)


def render_speed(s: dict) -> str:
    lines = [
        (f"Llama-shaped, random init ({s['params']['dense'] / 1e6:.0f}M params), ORT CPU, "
         f"2 threads, batch 1 x {s['seq']} tokens; each variant alone in a fresh process, "
         f"{s['warmup']} warm-ups + {s['runs']} runs, {s['rounds']} interleaved rounds, "
         "median of all runs."),
        "",
        ("| variant | params | latency (ms) | round medians | speed-up vs dense | per-round "
         "speed-up: median (min-max) | block 0 shapes |"),
        "|---|---|---|---|---|---|---|",
    ]
    for k, ms in s["median_ms"].items():
        rm = ", ".join(f"{v:.1f}" for v in s["round_medians_ms"][k])
        pm, lo, hi = s["paired_speedup"][k]
        lines.append(f"| {k} | {s['params'][k] / 1e6:.1f}M | {ms:.1f} | {rm} "
                     f"| {s['speedup'][k]:.2f}x | {pm:.2f}x ({lo:.2f}-{hi:.2f}) "
                     f"| {s['shapes'][k]} |")
    return "\n".join(lines)


# ============================================================================ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("quality", "speed", "all"), default="all")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--importances", nargs="+", default=list(IMPORTANCES))
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--lora-steps", type=int, default=100)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse-onnx", action="store_true",
                    help="time the ONNX files already in --workdir instead of re-exporting")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    results, md = {}, []
    if args.part in ("quality", "all"):
        results["quality"] = quality(args)
        md.append(render_quality(results["quality"]))
    if args.part in ("speed", "all"):
        results["speed"] = speed(args)
        md.append(render_speed(results["speed"]))
    text = "\n\n".join(md)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
