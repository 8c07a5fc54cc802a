"""SimplifyMask: attention with the plain causal mask becomes ``sdpa(..., is_causal=True)``.

Paper: none (graph hygiene for export).

Why: Hugging Face models (transformers 5.x) build the causal mask at run time from position ids
(``arange`` -> ``diff`` -> ``cumsum`` packed-sequence ids -> ``index`` -> ``eq``/``le`` -> ``and``)
and pass it to ``scaled_dot_product_attention`` as a *boolean* mask. The ONNX translation of a
boolean-mask SDPA adds, in every layer, ``Where(mask, 0, min)`` and, after the softmax,
``Where(IsNaN(p), 0, p)`` over the whole ``[B, H, L, S]`` probability tensor (to mimic PyTorch on
fully masked rows). On the 134M benchmark model at 512 tokens that is 12 x 12 x 512^2 elements of
IsNaN + Where per run (the 35-47 ms seen in ``benchmarks/bench_quant.py`` profiles). With
``is_causal=True`` the exporter builds one small ``[L, S]`` additive mask per layer and no NaN
fix-up.

Identities relied on:

- PyTorch defines ``is_causal=True`` as the mask ``ones(L, S, dtype=bool).tril(0)``, so for
  that mask ``sdpa(q, k, v, attn_mask=M) == sdpa(q, k, v, is_causal=True)`` (bitwise equal in
  our measurements, on CPU in torch and in ONNX Runtime);
- the mask is that causal mask. This part is *checked*, not proven: the rule only fires when the
  mask is a function of the input *shapes* alone (its producers reach the graph inputs only
  through ``sym_size``: no token values, no padding mask input, no parameters), has shape
  ``[B or 1, 1, L, L]`` with the query and key lengths the same symbol, and evaluating that
  shape-only subgraph at probe sizes (batch 1 and 3; lengths 1, 2, 3, 7, 16, 33) gives exactly
  ``tril(ones(L, L))`` every time. A shape-only subgraph built from ``arange``/comparisons is
  the same expression at every size, so a mask that is causal at all of these is causal for
  the traced model; the pass manager's numerical check confirms the rewrite on the probe batch.

Sites rewritten: every ``aten.scaled_dot_product_attention`` whose ``attn_mask`` passes the
check, with ``dropout_p == 0`` and ``is_causal`` unset. Skipped, with a note: masks that depend on
data or parameters, that are not boolean, or that differ from the causal mask at a probe size
(sliding windows, prefix-LM masks, padding). The mask subgraph is removed when nothing else reads
it.

Preconditions: none (works on traced or canonical graphs). Exact. Preserves nothing (the graph
changes; channel structure is unaffected, but analyses are recomputed to be safe).

Hyper-parameters: none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from compiler import ir
from compiler.masks import PROBE_SIZES, is_plain_causal_mask, shape_only_subgraph
from compiler.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

@dataclass
class MaskDecision:
    """One SDPA site: the mask node and why it is (not) rewritten."""

    sdpa: fx.Node
    mask: fx.Node | None
    skip: str | None = None


def _mask_arg(n: fx.Node):
    return n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")


def _scalar_arg(n: fx.Node, index: int, name: str, default):
    return n.args[index] if len(n.args) > index else n.kwargs.get(name, default)


class SimplifyMask(Pass):
    """Replace a checked plain causal boolean mask by ``is_causal=True``; see the module doc."""

    name = "simplify_mask"
    exact = True

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        # decide
        decisions = []
        for n in ir.nodes_of(gm, ir.SDPA):
            mask = _mask_arg(n)
            if not isinstance(mask, fx.Node):
                continue  # no mask (or already is_causal): nothing to simplify
            d = MaskDecision(n, mask)
            if _scalar_arg(n, 4, "dropout_p", 0.0) != 0.0:
                d.skip = "dropout_p is not 0"
            elif _scalar_arg(n, 5, "is_causal", False):
                d.skip = "is_causal already set next to a mask"
            else:
                d.skip = is_plain_causal_mask(n, mask)
            decisions.append(d)
        todo = [d for d in decisions if d.skip is None]
        notes = [f"{ir.site(d.sdpa)}: skipped, {d.skip}" for d in decisions if d.skip]
        if not todo:
            return PassResult.unchanged(gm, notes, masks_simplified=0)
        # mutate
        for d in todo:
            n = d.sdpa
            kwargs = {k: v for k, v in n.kwargs.items()
                      if k not in ("attn_mask", "dropout_p", "is_causal")}
            n.args = tuple(n.args[:3])
            n.kwargs = {**kwargs, "is_causal": True}
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        stats = {"masks_simplified": len(todo), "mask_nodes_removed": before - len(gm.graph.nodes)}
        log.info("simplify_mask: %d attention masks -> is_causal (%d mask nodes removed)",
                 len(todo), stats["mask_nodes_removed"])
        return PassResult(gm, True, frozenset(), stats, notes)


__all__ = ["PROBE_SIZES", "SimplifyMask", "is_plain_causal_mask", "shape_only_subgraph"]
