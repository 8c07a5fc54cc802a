"""Test fixtures that transform models: an outlier variant that keeps the function exactly.

Paper: none (the activation outliers it imitates are described in LLM.int8(), arXiv:2208.07339,
and SmoothQuant, arXiv:2211.10438: a few channels of each norm output are 10-100x larger than
the rest in real large LLMs, which ruins per-tensor int8 activation scales).

Identity relied on: ``norm(x) * g`` feeding ``X W^T`` equals ``norm(x) * (g * f)`` feeding
``X (W / f)^T`` column-wise: multiplying channel ``c`` of a norm's gain (and bias) by ``f`` and
dividing column ``c`` of every linear reading the norm output by ``f`` changes nothing but the
magnitude of that channel in the norm output.

Sites rewritten: every ``rms_norm`` / ``layer_norm`` with a gain parameter whose output is read
only by linears with parameter weights. Skipped (left as is): norms without a gain, norm outputs
read by other ops, consumers whose weight is also read elsewhere (a tied LM head / embedding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import fx

from compiler import ir

log = logging.getLogger(__name__)

#: default outlier channels (taken modulo the hidden size)
OUTLIER_CHANNELS = (3, 17, 42)


def make_outlier_model(gm: fx.GraphModule, *, channels: Sequence[int] = OUTLIER_CHANNELS,
                       factor: float = 50.0) -> fx.GraphModule:
    """Give a few channels of every norm output huge magnitudes, keeping the function.

    Args:
        gm: a canonical GraphModule (mutated in place and returned).
        channels: channel indices (modulo each norm's width) to blow up.
        factor: gain multiplier on those channels (the consumers' columns are divided by it).

    Returns:
        ``gm``. Each rewritten norm gets ``node.meta["fxcompress_outliers"] = [channels]``.
    """
    if factor <= 0:
        raise ValueError(f"make_outlier_model: factor must be positive, got {factor!r}")
    done = 0
    for n in list(gm.graph.nodes):
        if not ir.is_op(n, ir.RMS_NORM, ir.LAYER_NORM):
            continue
        w = ir.param_node(n.args[2] if len(n.args) > 2 else n.kwargs.get("weight"))
        b = None
        if ir.is_op(n, ir.LAYER_NORM):
            b = ir.param_node(n.args[3] if len(n.args) > 3 else n.kwargs.get("bias"))
        users = list(n.users)
        if w is None or not users or not all(
                ir.is_op(u, ir.LINEAR) and u.args[0] is n
                and ir.param_node(ir.linear_parts(u)[1]) is not None for u in users):
            continue
        if any(_read_elsewhere(gm, ir.linear_parts(u)[1], users) for u in users):
            continue  # a tied table: dividing its columns would change the embedding
        width = ir.get_param(gm, w).shape[0]
        ch = sorted({c % width for c in channels})
        f = torch.ones(width, dtype=torch.float64)
        f[ch] = factor
        for p in (w, b):
            if p is not None:
                t = ir.get_param(gm, p)
                ir.set_param(gm, p, (t.to(torch.float64) * f).to(t.dtype))
        seen = set()
        for u in users:
            wn = ir.linear_parts(u)[1]
            if str(wn.target) in seen:
                continue
            seen.add(str(wn.target))
            t = ir.get_param(gm, wn)
            # W: [out, in]; column c reads the blown-up channel
            ir.set_param(gm, wn, (t.to(torch.float64) / f[None, :]).to(t.dtype))
        n.meta["fxcompress_outliers"] = ch
        done += 1
    gm.recompile()
    log.info("make_outlier_model: %d norms, channels %s x%g", done, list(channels), factor)
    return gm


def _read_elsewhere(gm: fx.GraphModule, p: fx.Node, users: list[fx.Node]) -> bool:
    target = str(p.target)
    return any(str(n.target) == target and any(u not in users for u in n.users)
               for n in ir.iter_get_attrs(gm))


__all__ = ["OUTLIER_CHANNELS", "make_outlier_model"]
