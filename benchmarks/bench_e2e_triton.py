"""End-to-end latency of a compiled Llama-shaped model lowered to the Triton kernels vs eager fp16.

Protocol (../shared/BENCHMARKS.md): Llama-shaped random-init model, ``torch.manual_seed(0)``
(default: hidden 768, 12 layers, 12 heads, 12 kv heads, ffn 2048, vocab 32000; 134M
parameters; change with ``--hidden`` etc.). Each variant is timed with CUDA events, median of
``--iters`` runs after ``--warmup`` warm-ups, variants interleaved (A B C A B C ...) so drift
hits all alike:

* ``eager fp16``: the Hugging Face model in fp16 on the GPU (``use_cache=False``);
* ``triton w8a8``: the model traced in fp16, canonicalized, ``fuse_linears``,
  ``insert_qdq(scheme=w8a8_dynamic)``, lowered
  with ``backends.triton.lowering.lower(device="cuda")`` (fused RMSNorm + per-token quantize
  kernel, int8 GEMM with fused scale epilogue);
* ``triton w4a16``: the same with ``insert_qdq(scheme=w4a16, group_size=128)``.

Phases: ``prefill`` = one forward over ``batch x --prefill`` tokens; ``decode step`` = one
forward over ``batch x 1`` token. The compiled graph has no KV cache yet (DESIGN.md: planned),
so the decode step is a *proxy*: every linear runs at M = batch exactly as in a real decode
step, but attention sees one token instead of the cache (the eager baseline is timed the same
way, ``use_cache=False``), so the comparison is fair and attention-over-cache is not included.

Usage::

    python benchmarks/bench_e2e_triton.py            # CUDA table
    python benchmarks/bench_e2e_triton.py --check    # tiny CPU pass through the interpreter

Without CUDA the timing mode exits with a message; ``--check`` sets ``TRITON_INTERPRET=1``
(before triton is imported), compiles a tiny Llama-shaped model, lowers it onto the real kernels
and checks its logits against the Q/DQ graph's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

SCHEMES = {
    "w8a8": "insert_qdq(scheme=w8a8_dynamic)",
    "w4a16": "insert_qdq(scheme=w4a16, group_size=128)",
}
#: --check tolerance on fp32 logits, lowered (kernels) vs Q/DQ graph (see
#: tests/backends/test_triton_lowering.py for why an int8 step may differ)
CHECK_ATOL = 1e-2


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--check", action="store_true", help="tiny CPU correctness pass")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens per sequence")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma list of w8a8,w4a16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    unknown = set(args.schemes) - set(SCHEMES)
    if unknown:
        p.error(f"unknown scheme(s) {sorted(unknown)}; known: {', '.join(SCHEMES)}")
    return args


def llama_model(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A seeded random-init LlamaForCausalLM of the given shape, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def compile_quantized(model: torch.nn.Module, scheme: str):
    """Trace, canonicalize, ``fuse_linears`` and ``insert_qdq(<scheme>)``; returns the Q/DQ
    GraphModule.

    The passes are applied directly rather than through ``compile()``: the pass manager runs the
    graph after each pass, and an fp16 model's Q/DQ graph does not run as is (PT2E dequantize
    ops return fp32, which the fp16 linears downstream reject); the *lowered* graph, whose
    kernels return the activation dtype, does.
    """
    from compiler.frontend import trace
    from passes.canonicalize import canonicalize
    from passes.fuse_linears import FuseLinears
    from passes.insert_qdq import InsertQDQ

    group = 128 if model.config.hidden_size % 128 == 0 else 32
    qdq = (InsertQDQ(scheme="w8a8_dynamic") if scheme == "w8a8"
           else InsertQDQ(scheme="w4a16", group_size=group))
    gm = canonicalize(trace(model))  # default example batch 2 keeps the batch dim dynamic
    FuseLinears().run(gm)
    qdq.run(gm)
    return gm


# ----------------------------------------------------------------------------- --check


def run_check() -> int:
    """Compile a tiny Llama-shaped model per scheme, lower it onto the kernels (interpreter on
    CPU), compare logits with the Q/DQ graph; return 0 if all match."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        import importlib

        import backends.triton.kernels as K

        if not K.INTERPRET:
            importlib.reload(K)  # imported earlier without the interpreter
    from backends.triton.lowering import lower_for_triton

    model = llama_model(64, 2, 4, 2, 128, 256)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    for scheme in SCHEMES:
        compiled = compile_quantized(model, scheme)
        lowered, stats = lower_for_triton(compiled, device=device, use_kernels=True)
        with torch.no_grad():
            ref = compiled(ids)
            out = lowered(ids.to(device)).float().cpu()
        diff = (out - ref).abs().max().item()
        good = diff <= CHECK_ATOL and (stats.w8a8_linears + stats.w4a16_linears) > 0
        ok &= good
        print(f"{scheme:6s} {'ok' if good else 'MISMATCH'}  max|logits diff| {diff:.2e} "
              f"(atol {CHECK_ATOL:g}); {stats.as_dict()}  [{device}]")
    print("lowered models match their Q/DQ graphs" if ok else "some lowered models do NOT match")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- timing


def _timed(fn, ids) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(ids)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run_bench(args: argparse.Namespace) -> int:
    """Time eager fp16 and the lowered variants; print one row per (variant, phase)."""
    from backends.triton.lowering import lower

    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                 "kv_heads": args.kv_heads, "ffn": args.ffn, "vocab": args.vocab}
    g = torch.Generator().manual_seed(1)
    phases = {
        "prefill": torch.randint(0, args.vocab, (args.batch, args.prefill), generator=g),
        "decode step": torch.randint(0, args.vocab, (args.batch, 1), generator=g),
    }
    eager = llama_model(**shape, dtype=torch.float16).cuda()
    variants = {"eager fp16": lambda ids: eager(input_ids=ids, use_cache=False).logits}
    # traced and quantized on the CPU in fp16 (weights as the GPU holds them), lowered onto CUDA
    cpu16 = llama_model(**shape, dtype=torch.float16)
    for scheme in args.schemes:
        variants[f"triton {scheme}"] = lower(compile_quantized(cpu16, scheme),
                                             device="cuda")
    name = torch.cuda.get_device_name()
    params = sum(p.numel() for p in eager.parameters())
    print(f"# {name}; Llama-shaped {params / 1e6:.0f}M params {shape}; batch {args.batch}; "
          f"median of {args.iters} after {args.warmup} warm-ups (CUDA events), interleaved")
    print(f"{'variant':16s} {'phase':12s} {'tokens':>7s} {'ms':>9s} {'tok/s':>10s} "
          f"{'vs eager':>9s}")
    with torch.no_grad():
        for phase, ids_cpu in phases.items():
            ids = ids_cpu.cuda()
            for _ in range(args.warmup):
                for fn in variants.values():
                    fn(ids)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.iters):
                for k, fn in variants.items():
                    times[k].append(_timed(fn, ids))
            base = statistics.median(times["eager fp16"])
            for k, ts in times.items():
                ms = statistics.median(ts)
                print(f"{k:16s} {phase:12s} {ids.numel():7d} {ms:9.3f} "
                      f"{ids.numel() / ms * 1e3:10.0f} {base / ms:8.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--check`` runs the CPU correctness pass, otherwise the CUDA timing."""
    args = _parse_args(argv)
    if args.check:
        return run_check()
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_e2e_triton.py needs a CUDA device to time the lowered model (none found). "
            "Use --check for a CPU correctness pass through the Triton interpreter."
        )
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
