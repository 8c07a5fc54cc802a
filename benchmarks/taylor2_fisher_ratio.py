"""How large taylor2's Fisher term is next to the first-order Taylor term on stories260K.

``structured_prune(importance=taylor2)`` scores each weight by ``|w * g|`` averaged over the
calibration sequences plus the diagonal Fisher term ``0.5 * mean_s (w * g_s)^2``
(:func:`passes.structured_prune.taylor_terms`). This prints, for every prunable linear weight
(every linear but the LM head), ``sum(0.5 * fisher) / sum(first order)``, and the spread over
the weights: the README's "the Fisher term is ~1e-4 of the first-order term here".

Protocol as ``benchmarks/bench_prune.py``: stories260K, calibration 128 x 256 windows from the
TinyStories calibration half, seed 0, one backward pass per sequence.

Run: ``python benchmarks/taylor2_fisher_ratio.py [--calib 128]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from compiler import ir
from compiler.data import calibration_batches, stories260k_dir
from compiler.frontend import load_model, trace
from passes.canonicalize import canonicalize
from passes.structured_prune import taylor_terms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration windows of 256 tokens")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = stories260k_dir()
    gm = canonicalize(trace(load_model(model_dir)))
    calib = calibration_batches("tinystories", model_dir, n=args.calib, batch_size=8, seed=0)
    targets = [str(ir.linear_parts(n)[1].target) for n in ir.nodes_of(gm, ir.LINEAR)
               if not any(u.op == "output" for u in n.users)]
    targets = list(dict.fromkeys(targets))
    first, second = taylor_terms(gm, calib, targets, per_sequence=True, second_order=True)
    ratios = {}
    for t in targets:
        ratios[t] = float((0.5 * second[t]).sum() / first[t].sum())
    for t, r in ratios.items():
        print(f"{t:<60} {r:.2e}")
    total = float(sum((0.5 * second[t]).sum() for t in targets)
                  / sum(first[t].sum() for t in targets))
    vals = sorted(ratios.values())
    print(f"\n{len(targets)} weights, {args.calib} sequences x 256 tokens: "
          f"0.5 * Fisher / first order = {total:.2e} over all of them; per weight median "
          f"{statistics.median(vals):.2e} (min {vals[0]:.2e}, max {vals[-1]:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
