"""ORT CPU latency of several ONNX files, each timed alone in a fresh process.

Why not one process with every session interleaved (A B C A B C ...), as BENCHMARKS.md asks:
each ONNX Runtime session owns an intra-op thread pool whose threads spin after every run, so
on a 2-core machine the session that runs next shares the cores with the spinning threads of
the one before. Measured on the 134M model at 128 tokens: fp32 125 ms interleaved with five
other sessions vs 82 ms alone, and the gaps between variants shrink (the integer exports' own
work is 20-30% less than ``quantize_dynamic``'s in ORT's profiler, equal in interleaved wall
time). A deployed model runs alone with ORT's defaults, so that is what is timed here; machine
drift is handled by interleaving at the process level instead: ``rounds`` rounds, each running
every variant once in its own process (in a rotated order), ``warmup`` warm-ups then ``runs``
timed runs per process. The reported number is the median over all timed runs of all rounds;
the spread of the per-round medians is reported next to it. On this 2-vCPU VM one file's
per-process median varies by +-15% from process to process (neighbours on the shared L3, memory
placement), far more than within a process, hence the default of 10 rounds.

Use: ``time_onnx_files({"fp32": path, ...}, seqs=[128])`` from a benchmark, or
``python benchmarks/ort_timing.py fp32=a.onnx w8a8=b.onnx --seq 128 --rounds 5``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 32000


def time_onnx_files(paths: dict[str, Path | str], seqs: list[int] | tuple[int, ...] = (128,),
                    *, warmup: int = 3, runs: int = 15, rounds: int = 10, threads: int = 2,
                    vocab: int = VOCAB, progress: bool = True) -> dict[str, dict[int, dict]]:
    """Latency of each file, alone in a fresh process, over ``rounds`` rotated rounds.

    Returns:
        ``{name: {seq: {"median_ms", "round_medians_ms", "runs"}}}``.
    """
    names = list(paths)
    samples: dict[str, dict[int, list[float]]] = {n: {s: [] for s in seqs} for n in names}
    rounds_med: dict[str, dict[int, list[float]]] = {n: {s: [] for s in seqs} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(paths[name]),
                   "--seq", *map(str, seqs), "--warmup", str(warmup), "--runs", str(runs),
                   "--threads", str(threads), "--vocab", str(vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
                raise RuntimeError(f"ort_timing: timing {name!r} ({paths[name]}) failed: "
                                   f"{tail[0]}")
            out = proc.stdout
            times = json.loads(out.strip().splitlines()[-1])
            for s in seqs:
                samples[name][s] += times[str(s)]
                rounds_med[name][s].append(1e3 * statistics.median(times[str(s)]))
            if progress:
                print(f"[ort_timing] round {r + 1}/{rounds} {name}: "
                      + ", ".join(f"{rounds_med[name][s][-1]:.1f} ms @{s}" for s in seqs),
                      file=sys.stderr, flush=True)
    return {n: {s: {"median_ms": 1e3 * statistics.median(samples[n][s]),
                    "round_medians_ms": [round(v, 2) for v in rounds_med[n][s]],
                    "runs": len(samples[n][s])} for s in seqs} for n in names}


def paired_ratio(res: dict, ref: str, name: str, seq: int) -> tuple[float, float, float]:
    """Speed-up of ``name`` over ``ref`` per round (``ref``'s round median / ``name``'s).

    Returns ``(median, min, max)`` over the rounds: pairing by round cancels the slow drift of a
    shared machine that the all-runs medians only average out.
    """
    a = res[ref][seq]["round_medians_ms"]
    b = res[name][seq]["round_medians_ms"]
    r = [x / y for x, y in zip(a, b)]
    return statistics.median(r), min(r), max(r)


def prompt_feed(sess, ids) -> dict:
    """Inputs for one prompt ``ids`` ``[B, T]``: the ids, and for a KV-cache model (the GenAI
    layout) an all-ones ``attention_mask`` and empty past caches (``[B, heads, 0, D]``)."""
    import numpy as np

    first, *rest = sess.get_inputs()
    feed = {first.name: ids}
    for inp in rest:
        if inp.name == "attention_mask":
            feed[inp.name] = np.ones(ids.shape, dtype=np.int64)
        elif inp.name.startswith("past_key_values."):
            shape = [ids.shape[0], *(d if isinstance(d, int) else 0 for d in inp.shape[1:])]
            feed[inp.name] = np.zeros(shape, dtype=np.float32)
        else:
            raise ValueError(f"ort_timing: no feed for the model input {inp.name!r}")
    return feed


def _child(path: str, seqs: list[int], warmup: int, runs: int, threads: int, vocab: int) -> None:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    out = {}
    for s in seqs:
        feed = prompt_feed(sess, rng.integers(0, vocab, (1, s), dtype=np.int64))
        for _ in range(warmup):
            sess.run(None, feed)
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            t.append(time.perf_counter() - t0)
        out[str(s)] = t
    print(json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="name=path.onnx")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.seq, args.warmup, args.runs, args.threads, args.vocab)
        return 0
    if not args.files:
        ap.error("give name=path.onnx files to time")
    paths = dict(f.split("=", 1) if "=" in f else (Path(f).stem, f) for f in args.files)
    res = time_onnx_files(paths, args.seq, warmup=args.warmup, runs=args.runs,
                          rounds=args.rounds, threads=args.threads, vocab=args.vocab)
    first = next(iter(res))
    for s in args.seq:
        print(f"\n| variant | ms @{s} | speed-up vs {first} (per-round median, min-max) "
              "| per-round medians |\n|---|---|---|---|")
        for n, r in res.items():
            med, lo, hi = paired_ratio(res, first, n, s)
            print(f"| {n} | {r[s]['median_ms']:.1f} | {med:.2f}x ({lo:.2f}-{hi:.2f}) | "
                  f"{', '.join(f'{v:.1f}' for v in r[s]['round_medians_ms'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
