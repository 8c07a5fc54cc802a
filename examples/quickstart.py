"""Compile a model, look at the report, export ONNX and check ORT against the graph.

    python examples/quickstart.py [MODEL]     # default: a random-init tiny Llama (CPU, seconds)
"""

import sys

import torch

import compiler
from backends.onnxruntime import ORTModel, check_parity

model = sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"
cm = compiler.compile(model, passes=["canonicalize"])
print(cm.report)
path = cm.export_onnx("out/quickstart/model.onnx")
ids = torch.randint(0, cm.vocab_size or 256, (2, 16))
print(check_parity(cm, ORTModel(path), [ids]))
