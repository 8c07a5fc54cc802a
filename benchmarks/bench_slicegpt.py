"""SliceGPT quality on stories260K and ORT CPU speed/size on the 134M Llama-shaped model.

Quality (BENCHMARKS.md protocol): ``stories260K``; TinyStories eval half and WikiText-2 test,
256 windows of ``[BOS] + 255`` tokens (65,280 scored tokens each); calibration 128 windows of
256 tokens from the TinyStories calibration half (seed 0). Variants: the fp32 graph, the exact
rotation (``slicegpt_rotate``), ``slicegpt`` at each sparsity with its defaults (sequential
calibration, one basis per block, head whole, the tied head kept tied), with the paper's
per-norm bases (``--per-norm-sparsities``) and with the former procedure (``calibration="once"``,
one basis, head sliced and untied; ``--once-sparsities``), the ablation of calibration x head x
basis x tie at
``--ablation-sparsity`` (hidden width ``(1-s)*64``; with ``--quality-round-to 1`` by default,
since rounding 64 to multiples of 8 would make 20% and 25% the same width), and a random-init
model of the same config (the "knows nothing" reference).

Speed and size: Llama-shaped, random init (``torch.manual_seed(0)``): hidden 768, 12 layers,
12 heads, ffn 2048, vocab 32000, untied (134M parameters); calibration 32 x 512 random ids
(seed 1); ``slicegpt(sparsity=s, round_to=8)``; ONNX export (debug metadata stripped); ORT CPU
EP, ``intra_op_num_threads=2``, batch 1 x seq tokens; the exact ``simplify_mask`` pass runs
on the dense and the sliced graphs alike; each variant alone in a fresh process (3 warm-ups,
15 runs), processes interleaved over ``--rounds`` rounds, median of all runs (see
``benchmarks/ort_timing.py`` for why not one process).

Both use one PassContext per model so the calibration covariance is collected once (the graph
is brought to the rotation-invariant form before the copies are taken, so every copy is the
same graph the statistics were collected on).

Run: ``python benchmarks/bench_slicegpt.py [--sparsities 0.1 0.2 0.25 0.3 0.5] [--seq 128]
[--skip-quality] [--skip-speed] [--out results.md]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backends.onnxruntime import export_onnx, file_size
from compiler import ir
from compiler.data import calibration_batches, evaluation_windows, load_tokenizer, stories260k_dir
from compiler.evaluate import perplexity
from compiler.frontend import load_model, trace
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.rotation_invariant import make_rotation_invariant
from passes.simplify_mask import SimplifyMask
from passes.slicegpt import SliceGPT, SliceGPTRotate

log = logging.getLogger("bench_slicegpt")

CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
          "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
          "max_position_embeddings": 2048, "tie_word_embeddings": False}


def _prepared(model, simplify: bool = False) -> torch.fx.GraphModule:
    gm = canonicalize(trace(model), untie_embeddings=True)
    if simplify:
        SimplifyMask().run(gm, PassContext())
    make_rotation_invariant(gm, torch.zeros(2, 8, dtype=torch.long))
    return gm


FORMER = {"calibration": "once", "slice_head": True, "tied_head": "untie"}


def _label(s: float, kw: dict) -> str:
    opts = "".join(f", {k}={v!r}" if isinstance(v, str) else f", {k}={v}" for k, v in kw.items())
    return f"slicegpt(sparsity={s}{opts})"


def quality_variants(sparsities: list[float], per_norm: list[float], once: list[float],
                     ablation: float | None) -> list[tuple[float, dict]]:
    """(sparsity, SliceGPT options) per row, without repeats."""
    out = [(s, {}) for s in sparsities] + [(s, {"basis": "per_norm"}) for s in per_norm]
    out += [(s, dict(FORMER)) for s in once]
    if ablation is not None:
        for basis in ({}, {"basis": "per_norm"}):
            for extra in ({"tied_head": "untie"}, {"slice_head": True, "tied_head": "untie"},
                          {"calibration": "once", "tied_head": "untie"}, {"calibration": "once"},
                          {"tied_head": "shared_basis"}):
                out.append((ablation, {**basis, **extra}))
    seen, rows = set(), []
    for s, kw in out:
        key = (s, tuple(sorted(kw.items())))
        if key not in seen:
            seen.add(key)
            rows.append((s, kw))
    return rows


def quality(variants: list[tuple[float, dict]], round_to: int) -> tuple[list[dict], dict]:
    from transformers import AutoConfig, LlamaForCausalLM

    sdir = stories260k_dir()
    tok = load_tokenizer(sdir)
    evals = {"TinyStories": evaluation_windows("tinystories", tok),
             "WikiText-2": evaluation_windows("wikitext2", tok)}
    calib = calibration_batches("tinystories", tok, n=128, window=256, batch_size=8, seed=0)
    model = load_model(str(sdir))
    dense = trace(model)
    base = _prepared(model)
    ctx = PassContext(calibration=calib)
    rows = []

    def row(name, fn, width, params, secs=None):
        ppl = {k: perplexity(fn, w, progress=False).ppl for k, w in evals.items()}
        rows.append({"variant": name, "width": width, "params": params, "seconds": secs, **ppl})
        log.info("%s: %s", name, rows[-1])

    row("fp32 (dense graph)", dense, 64, ir.count_params(dense))
    g = copy.deepcopy(base)
    t = time.perf_counter()
    SliceGPTRotate().run(g, ctx)
    row("slicegpt_rotate (exact)", g, 64, ir.count_params(g), time.perf_counter() - t)
    for s, kw in variants:
        g = copy.deepcopy(base)
        t = time.perf_counter()
        res = SliceGPT(sparsity=s, round_to=round_to, **kw).run(g, ctx)
        row(_label(s, kw), g, res.stats["hidden_after"], res.stats["params_after"],
            time.perf_counter() - t)
    torch.manual_seed(0)
    rnd = LlamaForCausalLM(AutoConfig.from_pretrained(sdir)).eval()
    rnd_g = trace(rnd)
    row("random init (same config)", rnd_g, 64, ir.count_params(rnd_g))
    meta = {"calibration": "128 x 256 TinyStories calib half, seed 0",
            "eval": "256 windows x 256 ([BOS]+255), 65,280 scored tokens per dataset",
            "round_to": round_to}
    return rows, meta


def speed(sparsities: list[float], per_norm_sparsities: list[float], seqs: list[int], warmup: int,
          runs: int, rounds: int, work: Path) -> tuple[list[dict], dict]:
    from ort_timing import paired_ratio, time_onnx_files
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.ort_quant import strip_debug_metadata

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, CONFIG["vocab_size"], (1, 512), generator=g) for _ in range(32)]
    dense = canonicalize(trace(model))
    SimplifyMask().run(dense, PassContext())
    info = {"fp32": {"params": ir.count_params(dense), "width": 768, "pass_s": 0.0}}
    paths = {"fp32": export_onnx(dense, work / "fp32.onnx")}
    del dense
    base = _prepared(model, simplify=True)
    del model
    ctx = PassContext(calibration=calib)
    variants = [(s, "global") for s in sparsities] + [(s, "per_norm") for s in per_norm_sparsities]
    for s, basis in variants:
        name = f"slicegpt {round(s * 100)}%" + (" (per-norm bases + shortcuts)"
                                                 if basis == "per_norm" else "")
        gm = copy.deepcopy(base)
        t = time.perf_counter()
        res = SliceGPT(sparsity=s, round_to=8, basis=basis).run(gm, ctx)
        info[name] = {"params": res.stats["params_after"], "width": res.stats["hidden_after"],
                      "pass_s": time.perf_counter() - t}
        paths[name] = export_onnx(gm, work / f"slicegpt_{round(s * 100)}_{basis}.onnx")
        del gm
        gc.collect()
    for p in paths.values():
        strip_debug_metadata(p)
    for k, p in paths.items():
        info[k]["bytes"] = file_size(p)
    lat = time_onnx_files(paths, seqs, warmup=warmup, runs=runs, rounds=rounds,
                          vocab=CONFIG["vocab_size"])
    for k in paths:
        for seq in seqs:
            info[k][f"ms@{seq}"] = lat[k][seq]["median_ms"]
            info[k][f"rounds@{seq}"] = lat[k][seq]["round_medians_ms"]
            info[k][f"paired@{seq}"] = paired_ratio(lat, "fp32", k, seq)
    rows = [{"variant": k, **v} for k, v in info.items()]
    return rows, {"seqs": seqs, "rounds": rounds}


def render(qrows, qmeta, srows, smeta) -> str:
    out = [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}", ""]
    if qrows:
        out += [(f"### SliceGPT perplexity on stories260K ({qmeta['eval']}; calibration "
                f"{qmeta['calibration']}; round_to={qmeta['round_to']})"), "",
                ("| variant | hidden | params | TinyStories ppl | WikiText-2 ppl | change vs fp32 "
                "(TS / WT2) | pass s |"),
                "|---|---|---|---|---|---|---|"]
        base = qrows[0]
        for r in qrows:
            rel = " / ".join(f"{r[k] / base[k] - 1:+.1%}" for k in ("TinyStories", "WikiText-2"))
            secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
            out.append(f"| {r['variant']} | {r['width']} | {r['params']:,} | "
                       f"{r['TinyStories']:.3f} | {r['WikiText-2']:.1f} | {rel} | {secs} |")
        out.append("")
    if srows:
        seqs = smeta["seqs"]
        out += [("### ORT CPU latency, 134M Llama-shaped (2 threads, batch 1; each variant alone "
                f"in a fresh process, 3 warm-ups + 15 runs, {smeta['rounds']} interleaved rounds, "
                "median of all runs)"), "",
                "| variant | hidden | params | size MB | " + " | ".join(
                    f"ms @{s} (round medians min-max) | speed-up @{s} | per-round speed-up @{s}: "
                    "median (min-max)" for s in seqs) + " |",
                "|---|---|---|---|" + "---|---|---|" * len(seqs)]
        base = srows[0]
        for r in srows:
            cells = " | ".join(
                f"{r[f'ms@{s}']:.1f} ({min(r[f'rounds@{s}']):.1f}-{max(r[f'rounds@{s}']):.1f}) | "
                f"{base[f'ms@{s}'] / r[f'ms@{s}']:.2f}x | "
                f"{r[f'paired@{s}'][0]:.2f}x ({r[f'paired@{s}'][1]:.2f}-{r[f'paired@{s}'][2]:.2f})"
                for s in seqs)
            out.append(f"| {r['variant']} | {r['width']} | {r['params']:,} | "
                       f"{r['bytes'] / 1e6:.1f} | {cells} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.25, 0.3, 0.5])
    ap.add_argument("--per-norm-sparsities", type=float, nargs="*",
                    default=[0.1, 0.2, 0.25, 0.3, 0.5],
                    help="also run these with the paper's per-norm bases (shortcut matrices)")
    ap.add_argument("--once-sparsities", type=float, nargs="*", default=[0.1, 0.2, 0.25, 0.3, 0.5],
                    help="quality: also run these with the former procedure (calibration='once', "
                         "one basis, head sliced)")
    ap.add_argument("--speed-per-norm-sparsities", type=float, nargs="*", default=[0.25],
                    help="speed: also time these with the per-norm bases")
    ap.add_argument("--ablation-sparsity", type=float, default=0.25,
                    help="quality: calibration x slice_head x basis at this sparsity")
    ap.add_argument("--quality-round-to", type=int, default=1)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    qrows, qmeta, srows, smeta = [], {}, [], {}
    if not args.skip_quality:
        qrows, qmeta = quality(quality_variants(args.sparsities, args.per_norm_sparsities,
                                                args.once_sparsities, args.ablation_sparsity),
                               args.quality_round_to)
    if not args.skip_speed:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            srows, smeta = speed(args.sparsities, args.speed_per_norm_sparsities, args.seq,
                                 args.warmup,
                                 args.runs, args.rounds, Path(tmp))
    text = render(qrows, qmeta, srows, smeta)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
