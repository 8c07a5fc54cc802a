"""Compression passes, one per file, registered by name for recipes and the CLI.

``make_pass("smoothquant(alpha=0.5)")`` builds a pass from its registry string.
"""

from compiler.registry import load_recipe, make_pass, make_passes, register, registered
from passes.awq import AWQ
from passes.canonicalize import Canonicalize
from passes.fuse_linears import FuseLinears
from passes.gptq import GPTQ
from passes.insert_qdq import InsertQDQ
from passes.lora import LoRARecover
from passes.rotation_invariant import RotationInvariant
from passes.rptq import InsertQDQClusters, RPTQReorder
from passes.simplify_mask import SimplifyMask
from passes.slicegpt import SliceGPT, SliceGPTRotate
from passes.smoothquant import SmoothQuant
from passes.structured_prune import StructuredPrune

for _cls in (AWQ, Canonicalize, FuseLinears, GPTQ, InsertQDQ, InsertQDQClusters, LoRARecover,
             RotationInvariant, RPTQReorder, SimplifyMask, SliceGPT, SliceGPTRotate, SmoothQuant,
             StructuredPrune):
    register(_cls)

__all__ = [
    "AWQ",
    "Canonicalize",
    "FuseLinears",
    "GPTQ",
    "InsertQDQ",
    "InsertQDQClusters",
    "LoRARecover",
    "RPTQReorder",
    "RotationInvariant",
    "SimplifyMask",
    "SliceGPT",
    "SliceGPTRotate",
    "SmoothQuant",
    "StructuredPrune",
    "load_recipe",
    "make_pass",
    "make_passes",
    "register",
    "registered",
]
