"""ORT's per-node profile of one decode step of a generation folder (ours or the builder's).

Loads ``<folder>/genai_config.json``'s decoder file in plain ONNX Runtime (CPU, ``--threads``
intra-op threads, profiling on), feeds one token with a ``--past``-token cache (zeros: the
values do not change the work done; a shared-buffer model gets a ``--buffer``-long cache
buffer, as ORT GenAI allocates ``max_length``), times ``--steps`` runs after 5 warm-ups, and
prints the kernel time per op type per step from ORT's profile. This is how the README compares
our fp32 decoder with the builder's (same MatMul time, the packed gate|up's Split the only
difference).

Run: ``python benchmarks/profile_decode.py out/bench_generate/llama134m/ours_fp32 [--steps 100]``
(folders from ``bench_generate.py --rounds 0``).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--buffer", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    cfg = json.loads((args.folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    share = cfg.get("search", {}).get("past_present_share_buffer", False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    s = ort.InferenceSession(str(args.folder / dec["filename"]), so,
                             providers=["CPUExecutionProvider"])
    cache = (1, dec["num_key_value_heads"], args.buffer if share else args.past, dec["head_size"])
    feeds = {"input_ids": np.ones((1, 1), np.int64),
             "attention_mask": np.ones((1, args.past + 1), np.int64)}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros(cache, np.float32)
    missing = [i.name for i in s.get_inputs() if i.name not in feeds]
    if missing:
        raise SystemExit(f"{args.folder}: decoder inputs this script does not feed: {missing}")
    warm = 5
    for _ in range(warm):
        s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        s.run(None, feeds)
    step = (time.perf_counter() - t0) / args.steps
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    runs = warm + args.steps
    total = sum(per_op.values())
    print(f"{args.folder}: decode step {step * 1e3:.2f} ms ({1 / step:.1f} tok/s), past "
          f"{args.past}, {args.threads} threads; kernel time per step by op type:")
    for op, us in per_op.most_common():
        print(f"  {op:36s} {us / runs / 1e3:8.3f} ms  {nodes[op] // runs:4d} nodes  "
              f"{100 * us / total:5.1f}%")
    return {op: us / runs / 1e3 for op, us in per_op.items()}


if __name__ == "__main__":
    main()
