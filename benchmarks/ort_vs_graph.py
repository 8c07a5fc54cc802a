"""How far an int8 graph's ONNX Runtime perplexity may move from the graph's own, on one model.

The W8A8 graph (static per-tensor int8 activations, PT2E Q/DQ ops) is evaluated three ways on
the same windows: in torch float32 (how every quality table here is measured), in float64
(the same Q/DQ graph with every float op widened: ``compiler.pass_manager.evaluate_float64``),
and as its integer ONNX export in ONNX Runtime (``MatMulIntegerToFloat``). A float op's rounding
decides which side of an int8 rounding boundary an activation lands on; where activations are
massive (SmolLM2's reach a few hundred) one step of a coarse per-tensor scale is large, so two
float evaluations of the same integer model differ, and the ORT export is one more such
evaluation. Two measures of that sensitivity: the float64 evaluation, and ``--jitter`` float32
evaluations in which every activation is multiplied by ``1 + u 2**-23`` (``u`` uniform in
[-1, 1], one seed each) just before it is quantized, a perturbation of the size of one float32
rounding, as a different order of the float ops would make. The ORT row should fall among them.

Protocol: TinyStories (``shared/BENCHMARKS.md``), calibration 32 x 256 windows, evaluation
``--windows`` windows of ``[BOS] + 255`` tokens, seed 0. Models: ``smollm2`` (the Q4_1 GGUF
dequantized to float32) or ``stories260K``.

Run: ``python benchmarks/ort_vs_graph.py [--model smollm2] [--windows 16]
[--recipes w8a8 sq_w8a8] [--jitter 3]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compiler  # noqa: E402
from compiler.data import calibration_batches, data_dir, evaluation_windows  # noqa: E402
from compiler.evaluate import perplexity  # noqa: E402
from compiler.frontend import load_model  # noqa: E402
from compiler.pass_manager import evaluate_float64  # noqa: E402

MODELS = {"smollm2": "smollm2-135m-instruct-q4_1", "stories260K": "stories260K"}
RECIPES = {"w8a8": ["insert_qdq(scheme='w8a8')"],
           "sq_w8a8": ["smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"]}


class _Jittered(torch.fx.Interpreter):
    """``gm`` with every quantized activation perturbed by one float32 rounding (seeded)."""

    def __init__(self, gm: torch.fx.GraphModule, seed: int):
        super().__init__(gm)
        self.gen = torch.Generator().manual_seed(seed)

    def call_function(self, target, args, kwargs):
        if "quantize_per_tensor" in str(target) and "dequantize" not in str(target):
            x = args[0]
            u = torch.rand(x.shape, generator=self.gen) * 2 - 1
            args = (x * (1 + u * 2.0 ** -23), *args[1:])
        return super().call_function(target, args, kwargs)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=list(RECIPES))
    ap.add_argument("--jitter", type=int, default=3, help="jittered float32 evaluations")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from backends.onnxruntime import ORTModel
    from backends.ort_quant import export_quantized_onnx

    root = data_dir()
    if root is None:
        raise SystemExit("no shared data folder (set FXCOMPRESS_DATA)")
    folder = root / MODELS[args.model]
    tok = folder / "hf"
    model = load_model(folder if args.model == "smollm2" else tok)
    windows = evaluation_windows("tinystories", tok, args.windows)
    calib = calibration_batches("tinystories", tok, n=32)
    rows = []
    print("| recipe | graph, float32 | graph, float64 | graph, float32 jittered | "
          "ONNX Runtime (integer kernels) |")
    print("|---|---:|---:|---|---:|")
    for name in args.recipes:
        gm = compiler.compile(model, passes=RECIPES[name], calibration=calib,
                              report_data=False).graph_module
        p32 = perplexity(gm, windows, progress=False).ppl
        p64 = perplexity(lambda ids: evaluate_float64(gm, ids).float(), windows,
                         batch_size=2, progress=False).ppl
        jit = []
        for seed in range(args.jitter):
            run = _Jittered(gm, seed)
            with torch.no_grad():
                jit.append(perplexity(lambda ids: run.run(ids), windows, progress=False).ppl)
        with tempfile.TemporaryDirectory(prefix="ort_vs_graph-") as tmp:
            path = export_quantized_onnx(gm, Path(tmp) / "model.onnx")
            pong = perplexity(ORTModel(path, threads=args.threads), windows, progress=False).ppl
        row = {"recipe": name, "float32": p32, "float64": p64, "jittered": jit, "ort": pong}
        rows.append(row)
        jitter = ", ".join(f"{(p / p32 - 1):+.2%}" for p in jit)
        print(f"| {' + '.join(RECIPES[name])} | {p32:.4f} | {p64:.4f} ({(p64 / p32 - 1):+.2%}) | "
              f"{jitter} | {pong:.4f} ({(pong / p32 - 1):+.2%}) |", flush=True)
    return rows


if __name__ == "__main__":
    main()
