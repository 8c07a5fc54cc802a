"""Structured compression end to end: prune (LLM-Pruner groups) or slice (SliceGPT), look at what
changed per block, export ONNX and check ORT against the graph.

    python examples/compress_structure.py                 # tiny random-init Llama, seconds
    python examples/compress_structure.py ../shared/data/stories260K/hf --calib tinystories:32x256

The random-init default calibrates on random token ids; a real model folder with a tokenizer can
use a dataset spec instead (``--calib``).
"""

import argparse

import torch

import compiler
from backends.onnxruntime import ORTModel, check_parity

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("model", nargs="?", default="tiny-llama")
ap.add_argument("--passes", nargs="+",
                default=["structured_prune(ratio=0.25, importance=taylor)", "slicegpt(sparsity=0.25)"])
ap.add_argument("--calib", default=None, help="dataset spec, e.g. tinystories:32x256")
ap.add_argument("--out", default="out/compress_structure/model.onnx")
args = ap.parse_args()

calib = args.calib or [torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(i))
                       for i in range(4)]
cm = compiler.compile(args.model, passes=args.passes, calibration=calib)
print(cm.report)  # per pass: time, params, drift; then params and shapes per block before/after
path = cm.export_onnx(args.out)
ids = torch.randint(0, cm.vocab_size or 256, (2, 16), generator=torch.Generator().manual_seed(9))
print(check_parity(cm, ORTModel(path), [ids]))
print(f"parameters: {cm.report.records[0].params_before:,} -> {cm.num_parameters():,}")
