"""Perplexity of every compression pass on SmolLM2-135M-Instruct with its defaults (issue 14).

Protocol (``shared/BENCHMARKS.md``, TinyStories, shortened for a 2-core machine as issue 14
states): SmolLM2-135M-Instruct from ``../shared/data/smollm2-135m-instruct-q4_1`` (Q4_1 GGUF
dequantized to float32, :func:`compiler.frontend.load_model`), TinyStories evaluation half,
**64** windows of ``[BOS] + 255`` tokens (16,320 scored tokens); calibration **32** x 256
windows from the calibration half, seed 0. Every variant starts from the same traced,
canonicalized graph and is evaluated as an fx graph in fp32 (Q/DQ simulated by the
``quantized_decomposed`` ops).

Activation statistics are cached on disk (``--stats-cache``, default
``~/.cache/fxcompress/stats``) so rerunning a variant reuses its calibration run.

Pipelines (pass objects, each with its defaults unless the name says otherwise):

- ``fp32``;
- W8A8 static: ``w8a8_max`` (``insert_qdq(scheme=w8a8, act_range=max)``: the scheme as first
  published), ``w8a8`` (default range: mse), ``sq0.5+w8a8_max`` (the recipe before issue 14),
  ``sq0.5+w8a8`` (mse ranges), ``sqauto+w8a8_max`` (alpha search, abs-max ranges),
  ``sq+w8a8`` (both defaults: ``smoothquant`` then ``insert_qdq(scheme=w8a8)``: the headline
  recipe), ``sq+w8a8_keepN`` (plus ``keep_sensitive=N``: the N noisiest activation tensors
  quantized per token);
- ``w8a8_dynamic``; ``w4a16`` (group 64: 576 is not a multiple of 128);
- ``prune{10,20,30}`` (``structured_prune(ratio=r)``), ``+lora`` (then ``lora_recover()``);
- ``slicegpt{10,20,25,30}`` (``slicegpt(sparsity=s)``); ``slicegpt20_untie``,
  ``slicegpt20_head``, ``slicegpt20_once`` (the tied head untied, as before ``tied_head``),
  ``slicegpt20_shared`` (``tied_head="shared_basis"``), ``slicegpt20_once_tied``.

Run: ``python benchmarks/quality_smollm2.py [--only NAME ...] [--out results.jsonl]``; every
finished variant is appended to ``--out`` as one JSON line (name, perplexity, change vs fp32,
seconds, each pass's stats), and ``--table`` prints the markdown table of a results file.
``--pass-manager`` runs each pipeline through one pass manager, as ``compile()`` does (statistics
handed from pass to pass), instead of each pass on its own with disk-cached statistics.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compiler.data import calibration_batches, data_dir, evaluation_windows
from compiler.evaluate import perplexity
from compiler.frontend import load_model, trace
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize

log = logging.getLogger("quality_smollm2")

SMOLLM2 = "smollm2-135m-instruct-q4_1"
FP32_REFERENCE = 8.748  # issue 14, same protocol


def pipelines() -> dict[str, list]:
    """Name -> list of pass objects (fresh each call)."""
    from passes.insert_qdq import InsertQDQ
    from passes.lora import LoRARecover
    from passes.slicegpt import SliceGPT
    from passes.smoothquant import SmoothQuant
    from passes.structured_prune import StructuredPrune

    out = {
        "fp32": [],
        "w8a8_max": [InsertQDQ(scheme="w8a8", act_range="max")],
        "w8a8": [InsertQDQ(scheme="w8a8")],
        "sq0.5+w8a8_max": [SmoothQuant(alpha=0.5), InsertQDQ(scheme="w8a8", act_range="max")],
        "sq0.5+w8a8": [SmoothQuant(alpha=0.5), InsertQDQ(scheme="w8a8")],
        "sqauto+w8a8_max": [SmoothQuant(), InsertQDQ(scheme="w8a8", act_range="max")],
        "sq+w8a8_pct": [SmoothQuant(), InsertQDQ(scheme="w8a8", act_range="percentile")],
        "sq+w8a8": [SmoothQuant(), InsertQDQ(scheme="w8a8")],
        "w8a8_dynamic": [InsertQDQ(scheme="w8a8_dynamic")],
        "w4a16": [InsertQDQ(scheme="w4a16", group_size=64)],
    }
    for k in (2, 4, 8):
        out[f"sq+w8a8_keep{k}"] = [SmoothQuant(), InsertQDQ(scheme="w8a8", keep_sensitive=k)]
        out[f"sq+w8a8_keep{k}_float"] = [SmoothQuant(), InsertQDQ(
            scheme="w8a8", keep_sensitive=k, sensitive_mode="float")]
    for r in (10, 20, 25, 30):
        out[f"slicegpt{r}"] = [SliceGPT(sparsity=r / 100)]
    for r in (10, 20, 30):
        out[f"prune{r}"] = [StructuredPrune(ratio=r / 100)]
        out[f"prune{r}+lora"] = [StructuredPrune(ratio=r / 100), LoRARecover()]
    out["prune20_attn_off"] = [StructuredPrune(ratio=0.2, prune_attention=False)]
    # allocation ablations: one ranking by importance per parameter over every layer; or the
    # first two and the last block left whole, the rest pruned harder so that 20% of all
    # prunable parameters still go (0.2 x 30 / 27)
    # SliceGPT with the tied head untied (the former behaviour): head whole, or its input sliced
    # too; the former one-basis procedure (untied, or the tie kept); the table sliced and shared
    # by the head (tied_head="shared_basis"; the default keeps the shared table whole)
    out["slicegpt20_untie"] = [SliceGPT(sparsity=0.2, tied_head="untie")]
    out["slicegpt20_head"] = [SliceGPT(sparsity=0.2, slice_head=True, tied_head="untie")]
    out["slicegpt20_once"] = [SliceGPT(sparsity=0.2, calibration="once", slice_head=True,
                                       tied_head="untie")]
    out["slicegpt20_once_tied"] = [SliceGPT(sparsity=0.2, calibration="once")]
    out["slicegpt20_shared"] = [SliceGPT(sparsity=0.2, tied_head="shared_basis")]
    out["prune20_global"] = [StructuredPrune(ratio=0.2, global_ranking=True, global_cap=math.inf)]
    out["prune20_global+lora"] = [StructuredPrune(ratio=0.2, global_ranking=True,
                                                  global_cap=math.inf), LoRARecover()]
    # the default's allocation candidates one by one: per layer (the former default), MLP
    # channels ranked across layers under a cap of c x their average fraction
    out["prune20_layer"] = [StructuredPrune(ratio=0.2, global_ranking=False)]
    for c in (1.25, 1.5, 2):
        out[f"prune20_cap{c:g}"] = [StructuredPrune(ratio=0.2, global_cap=c)]
    out["prune20_protect_ends"] = [StructuredPrune(ratio=0.2 * 30 / 27, skip_layers=[0, 1, 29])]
    # compositions (run them with --pass-manager, as compile() does): a structural pass, then
    # the quantization recipes with their defaults
    from passes.awq import AWQ
    from passes.gptq import GPTQ

    # (SliceGPT's default width at 20%, 456, is no multiple of a W4 group: gptq / awq refuse
    # it naming the site; the W4 rows slice to a multiple of 64, 448)
    for first, make, make_w4 in (
            ("slicegpt20", lambda: SliceGPT(sparsity=0.2),
             lambda: SliceGPT(sparsity=0.2, round_to=64)),
            ("prune20", lambda: StructuredPrune(ratio=0.2), lambda: StructuredPrune(ratio=0.2))):
        out[f"{first}+sq+w8a8"] = [make(), SmoothQuant(), InsertQDQ(scheme="w8a8")]
        out[f"{first}+w8a8_dynamic"] = [make(), InsertQDQ(scheme="w8a8_dynamic")]
        out[f"{first}+gptq"] = [make_w4(), GPTQ(group_size=64)]
        out[f"{first}+awq"] = [make_w4(), AWQ(group_size=64)]
    return out


def run_pipeline(gm, passes, calib, cache: Path | None, pass_manager: bool = False):
    """Run ``passes`` on a copy of ``gm``; returns the graph and each pass's stats. Each pass
    gets a context of its own (statistics from the disk cache ``cache``), or, with
    ``pass_manager``, all run through one :class:`PassManager` and context as ``compile()``
    runs them (statistics handed from pass to pass, no disk cache)."""
    gm = copy.deepcopy(gm)
    stats = []
    if pass_manager:
        from quality_quant import run_with_pass_manager

        report = run_with_pass_manager(gm, passes, calib)
        return gm, [{"pass": r.name, "seconds": round(r.seconds, 1), "sweeps": r.sweeps,
                     "stats": {k: v for k, v in r.stats.items() if isinstance(v, (int, float, str))},
                     "notes": r.notes[:12]} for r in report.records]
    for p in passes:
        ctx = PassContext(calibration=calib,
                          extra={"stats_cache_dir": str(cache)} if cache else {})
        t0 = time.perf_counter()
        res = p.run(gm, ctx)
        gm = res.gm
        stats.append({"pass": p.name, "seconds": round(time.perf_counter() - t0, 1),
                      "stats": {k: v for k, v in res.stats.items()
                                if isinstance(v, (int, float, str))},
                      "notes": res.notes[:12]})
    return gm, stats


def table(rows: list[dict]) -> str:
    lines = ["| pipeline | perplexity | vs fp32 |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {r['rel']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="pipeline names to run")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--table", type=Path, default=None, help="print the table of a results file")
    ap.add_argument("--stats-cache", type=Path,
                    default=Path.home() / ".cache" / "fxcompress" / "stats")
    ap.add_argument("--pass-manager", action="store_true",
                    help="run each pipeline through one PassManager, as compile() does")
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print(table(rows))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    names = list(pipelines()) if args.only is None else args.only
    unknown = [n for n in names if n not in pipelines()]
    if unknown:
        ap.error(f"unknown pipelines {unknown}; known: {', '.join(pipelines())}")

    model_dir = data_dir() / SMOLLM2
    base = canonicalize(trace(load_model(model_dir)))
    windows = evaluation_windows("tinystories", model_dir / "hf", args.windows)
    calib = calibration_batches("tinystories", model_dir / "hf", n=args.calib)
    ref = FP32_REFERENCE if args.windows == 64 else None
    for name in names:
        t0 = time.perf_counter()
        gm, stats = run_pipeline(base, pipelines()[name], calib, args.stats_cache,
                                 args.pass_manager)
        ppl = perplexity(gm, windows, progress=False).ppl
        if name == "fp32":
            ref = ppl
        rel = "-" if ref is None or name == "fp32" else f"{100 * (ppl / ref - 1):+.1f}%"
        row = {"name": name, "ppl": ppl, "rel": rel, "seconds": round(time.perf_counter() - t0),
               "passes": stats}
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        del gm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
