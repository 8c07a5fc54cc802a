"""Matchers for the PT2E Q/DQ patterns of :mod:`compiler.qdq`, shared by the lowerings.

Both backends (``backends.ort_quant`` for ONNX Runtime, ``backends.triton.lowering`` for the
Triton kernels) replace the same graph patterns; they read them through these functions so a
change in how Q/DQ is inserted is followed in one place.

Patterns (``qd = torch.ops.quantized_decomposed``):

- activation, static per tensor: ``DQ_t(Q_t(x, s, 0, qmin >= -128, qmax <= 127, int8), ...)``;
- activation, dynamic per token: ``DQ_tok(Q_tok(x, s, zp, ...), s, zp, ...)`` with
  ``(s, zp) = choose_qparams_per_token(x)``;
- weight, int8 per output channel, symmetric: ``dequantize_per_channel(W_q, s, None, 0, ...)``;
- weight, int4 group-wise: ``dequantize_per_channel_group(W_q, s, zp | None, qmin, qmax, int8,
  group_size, out_dtype)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import fx

qd = torch.ops.quantized_decomposed


def is_node(node, target) -> bool:
    """True if ``node`` is an fx call of exactly ``target``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def is_dequantized_weight(node) -> bool:
    """True if ``node`` dequantizes a weight (per channel or per group)."""
    return is_node(node, qd.dequantize_per_channel.default) or is_node(
        node, qd.dequantize_per_channel_group.default)


def is_int8_channel_weight(node) -> bool:
    """True for ``dequantize_per_channel(W_q, s, None, axis=0, ...)`` (symmetric int8 rows)."""
    return (is_node(node, qd.dequantize_per_channel.default) and node.args[3] == 0
            and node.args[2] is None)


def is_int4_group_weight(node) -> bool:
    """True for ``dequantize_per_channel_group(W_q, s, zp, ...)`` (int4 held in int8)."""
    return is_node(node, qd.dequantize_per_channel_group.default)


@dataclass
class ActivationMatch:
    """A matched activation Q/DQ: the float input, the quantize node, the mode and, for the
    static mode, the scale."""

    x: fx.Node
    q: fx.Node
    mode: str  # "static" | "per_token"
    scale: float | None

    def __iter__(self):  # (x, q, mode, scale) unpacking, as the ORT lowering uses it
        return iter((self.x, self.q, self.mode, self.scale))


def match_activation(x) -> ActivationMatch | None:
    """The activation Q/DQ pattern ending at ``x`` (a dequantize node), or None."""
    if is_node(x, qd.dequantize_per_tensor.default):
        q = x.args[0]
        if (is_node(q, qd.quantize_per_tensor.default) and q.args[2] == 0
                and q.args[5] == torch.int8 and q.args[3] >= -128 and q.args[4] <= 127):
            return ActivationMatch(q.args[0], q, "static", float(q.args[1]))
    if is_node(x, qd.dequantize_per_token.default):
        q = x.args[0]
        if is_node(q, qd.quantize_per_token.default) and q.args[5] == torch.int8:
            s = q.args[1]
            qp = s.args[0] if isinstance(s, fx.Node) and s.op == "call_function" and s.args else None
            if is_node(qp, qd.choose_qparams_per_token.default) and qp.args[0] is q.args[0]:
                return ActivationMatch(q.args[0], q, "per_token", None)
    return None


__all__ = ["ActivationMatch", "is_dequantized_weight", "is_int4_group_weight",
           "is_int8_channel_weight", "is_node", "match_activation"]
