"""Canonicalize: give every model family one ATen vocabulary before any compression pass.

Paper: none (compiler hygiene, as in LLVM's instcombine / canonicalization).

Identities relied on (each rule is exact):
- ``to(x, dtype)`` with ``x.dtype == dtype``, ``alias(x)``, ``dropout(x, p, train=False)``,
  ``type_as(x, y)`` with equal dtypes, ``clone(x)``: all equal ``x``.
- RMSNorm written out, ``x * rsqrt(mean(x^2, -1, keepdim) + eps) * g``, equals
  ``aten.rms_norm(x, [H], g, eps)``; a gain written ``(c + w)`` (Gemma) is the parameter ``w + c``.
- GPT-2 ``Conv1D``: ``view(addmm(b, view(x, [-1, K]), W), [..., N])`` equals
  ``linear(x, W^T, b)`` with ``W: [K, N]`` stored transposed as ``[N, K]``.
- ``matmul(x, W.T)`` (``numpy_T``/``t``/``transpose(W, 0, 1)``/``permute(W, [1, 0])`` of a
  ``[N, K]`` parameter, Falcon's ``FalconLinear``), plus an optional ``add`` of a ``[N]``
  parameter, equals ``linear(x, W, b)``.
- ``add_(a, b)`` (in place) equals ``add(a, b)`` when nothing else reads ``a``.
- ``x[..., c]`` (``index`` with one constant integer index tensor ``c`` holding consecutive
  values ``i, i+1, ..., j-1``, Falcon's fused-qkv key/value pick) equals ``slice(x, dim, i, j)``;
  ``broadcast_to(x, size)`` equals ``expand(x, size)``.
- Optionally, tied embeddings are untied: the embedding gets its own copy of the shared table,
  so passes may change the lm_head's columns and the embedding table independently.

Rewrites every site that matches; everything else is left as is (no notes: nothing is skipped
for a reason worth reporting, a non-matching op simply is not one of these patterns).

Preconditions: a graph from ``compiler.frontend.trace``. Establishes ``canonical``. Exact.

Hyper-parameters:
    untie_embeddings (bool, default False): give a tied embedding its own weight.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from compiler import ir
from compiler.ir import untie_embeddings  # public here since canonicalize first offered it
from compiler.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops that are the identity at inference time, and how to tell.
_IDENTITY_TARGETS = {
    aten.alias.default: lambda n: True,
    aten.clone.default: lambda n: True,
    aten.dropout.default: lambda n: n.args[2] is False if len(n.args) > 2 else not n.kwargs.get("train", True),
    aten.to.dtype: lambda n: _same_dtype(n, n.args[0]),
    aten.type_as.default: lambda n: _same_dtype(n, n.args[0]),
    aten._to_copy.default: lambda n: _same_dtype(n, n.args[0]) and set(n.kwargs) <= {"dtype"},
}


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_dtype(node: fx.Node, src) -> bool:
    a, b = _val(node), _val(src)
    return a is not None and b is not None and a.dtype == b.dtype


def _last_dim(node: fx.Node):
    v = _val(node)
    return None if v is None else v.shape[-1]


class Canonicalize(Pass):
    """Raise RMSNorm, turn Conv1D into linear, drop identity ops, optionally untie embeddings."""

    name = "canonicalize"
    exact = True
    establishes = frozenset({"canonical"})

    def __init__(self, *, untie_embeddings: bool = False):
        if not isinstance(untie_embeddings, bool):
            raise ValueError(f"canonicalize: untie_embeddings must be a bool, got {untie_embeddings!r}")
        self.untie_embeddings = untie_embeddings

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        stats = {
            "identity_ops_removed": remove_identity_ops(gm),
            "rms_norms_raised": raise_rms_norms(gm),
            "conv1d_to_linear": convert_conv1d(gm),
            "matmul_to_linear": convert_matmul_transposed(gm),
            "inplace_to_functional": functionalize_inplace(gm),
            "index_to_slice": index_to_slice(gm),
            "embeddings_untied": untie_embeddings(gm) if self.untie_embeddings else 0,
        }
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        stats["dead_nodes_removed"] = before - len(gm.graph.nodes)
        stats["unused_params_removed"] = ir.remove_unused_attrs(gm)
        modified = any(stats.values())
        if modified:
            gm.graph.lint()
            gm.recompile()
        log.info("canonicalize: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if v))
        preserved = frozenset() if modified else frozenset({"*"})
        return PassResult(gm, modified, preserved, stats, [])


def canonicalize(gm: fx.GraphModule, *, untie_embeddings: bool = False) -> fx.GraphModule:
    """Run :class:`Canonicalize` on ``gm`` in place and return it."""
    Canonicalize(untie_embeddings=untie_embeddings).run(gm, None)
    return gm


# ------------------------------------------------------------------------------- rules


def remove_identity_ops(gm: fx.GraphModule) -> int:
    """Replace identity ops (same-dtype casts, alias, eval dropout, clone) by their input."""
    # decide
    doomed = [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _IDENTITY_TARGETS and _IDENTITY_TARGETS[n.target](n)
    ]
    # mutate
    for n in doomed:
        n.replace_all_uses_with(n.args[0])
        gm.graph.erase_node(n)
    return len(doomed)


def _match_rms_norm(mul: fx.Node):
    """Match ``mul(x, rsqrt(add(mean(pow(x, 2), [-1], True), eps)))``; return (x, eps) or None."""
    if not ir.is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        return None
    for x, r in (mul.args, mul.args[::-1]):
        if not (isinstance(r, fx.Node) and ir.is_op(r, aten.rsqrt.default)):
            continue
        add = r.args[0]
        if not (isinstance(add, fx.Node) and ir.is_op(add, aten.add.Tensor, aten.add.Scalar)):
            continue
        mean, eps = add.args[0], add.args[1]
        if not isinstance(eps, (int, float)):
            mean, eps = add.args[1], add.args[0]
        if not (isinstance(mean, fx.Node) and ir.is_op(mean, aten.mean.dim) and isinstance(eps, (int, float))):
            continue
        pw = mean.args[0]
        dims = mean.args[1]
        keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        xv = _val(x)
        if xv is None or not keep or list(dims) not in ([-1], [xv.dim() - 1]):
            continue
        if not (isinstance(pw, fx.Node) and ir.is_op(pw, aten.pow.Tensor_Scalar) and pw.args[0] is x
                and pw.args[1] == 2):
            continue
        return x, float(eps)
    return None


def _match_gain(norm_out: fx.Node, hidden):
    """If the only user of ``norm_out`` multiplies it by a [H] parameter gain (or ``c + w``),
    return (mul node, get_attr node, constant offset)."""
    if len(norm_out.users) != 1:
        return None
    (mul,) = norm_out.users
    if not ir.is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        return None
    other = mul.args[1] if mul.args[0] is norm_out else mul.args[0]
    if not isinstance(other, fx.Node):
        return None
    offset = 0.0
    if ir.is_op(other, aten.add.Tensor) and len(other.users) == 1:
        a, b = other.args
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            a, b = b, a
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            other, offset = a, float(b)
    if other.op != "get_attr":
        return None
    v = _val(other)
    if v is None or v.dim() != 1 or v.shape[0] != hidden:
        return None
    return mul, other, offset


def raise_rms_norms(gm: fx.GraphModule) -> int:
    """Replace written-out RMSNorm (and its gain multiply) with ``aten.rms_norm``."""
    # decide
    matches = []
    for n in gm.graph.nodes:
        m = _match_rms_norm(n)
        if m is None:
            continue
        x, eps = m
        hidden = _last_dim(x)
        if not isinstance(hidden, int):
            continue
        matches.append((n, x, eps, hidden, _match_gain(n, hidden)))
    # mutate
    for n, x, eps, hidden, gain in matches:
        weight = None
        last = n
        if gain is not None:
            mul, w, offset = gain
            if offset:
                value = ir.get_param(gm, w) + offset
                weight = ir.add_param(gm, f"{w.target}_plus{offset:g}", value, before=mul)
            else:
                weight = w
            last = mul
        with gm.graph.inserting_before(last):
            new = gm.graph.call_function(aten.rms_norm.default, (x, [hidden], weight, eps))
        ir.copy_meta(last, new, created_by="canonicalize")
        last.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    return len(matches)


def convert_conv1d(gm: fx.GraphModule) -> int:
    """Turn GPT-2 ``view -> addmm(b, x2d, W[K, N]) -> view`` chains into ``linear(x, W^T, b)``."""
    # decide
    matches = []
    for n in gm.graph.nodes:
        if not ir.is_op(n, aten.addmm.default) or len(n.args) != 3 or n.kwargs:
            continue
        b, x2d, w = n.args
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
            continue
        if not (isinstance(x2d, fx.Node) and ir.is_op(x2d, aten.view.default, aten.reshape.default)):
            continue
        if len(n.users) != 1:
            continue
        (out_view,) = n.users
        if not ir.is_op(out_view, aten.view.default, aten.reshape.default):
            continue
        x = x2d.args[0]
        xv, ov = _val(x), _val(out_view)
        if xv is None or ov is None or xv.dim() != ov.dim() or xv.dim() < 2:
            continue
        matches.append((n, x, w, b, out_view))
    # mutate
    for n, x, w, b, out_view in matches:
        ir.set_param(gm, w, ir.get_param(gm, w).t().contiguous())  # W: [K, N] -> [N, K]
        w.meta["val"] = ir.get_param(gm, w)
        with gm.graph.inserting_before(out_view):
            lin = gm.graph.call_function(aten.linear.default, (x, w, b))
        ir.copy_meta(out_view, lin, created_by="canonicalize")
        lin.meta["nn_module_stack"] = n.meta.get("nn_module_stack", out_view.meta.get("nn_module_stack"))
        out_view.replace_all_uses_with(lin)
    gm.graph.eliminate_dead_code()
    return len(matches)


_TRANSPOSES = {aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default}


def _transposed_param(gm: fx.GraphModule, t: fx.Node) -> fx.Node | None:
    """The ``[N, K]`` parameter ``W`` if ``t`` is ``W.T`` (and read only there), else None."""
    if not (isinstance(t, fx.Node) and t.op == "call_function" and t.target in _TRANSPOSES):
        return None
    w = t.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(t.users) == 1):
        return None
    v = _val(w)
    if v is None or v.dim() != 2:
        return None
    if t.target is aten.transpose.int and sorted(a % 2 for a in t.args[1:3]) != [0, 1]:
        return None
    if t.target is aten.permute.default and [a % 2 for a in t.args[1]] != [1, 0]:
        return None
    return w


def convert_matmul_transposed(gm: fx.GraphModule) -> int:
    """Turn ``matmul(x, W.T)`` (+ a ``[N]`` parameter bias) into ``linear(x, W, b)``."""
    # decide
    matches = []
    for n in gm.graph.nodes:
        if not ir.is_op(n, aten.matmul.default) or len(n.args) != 2:
            continue
        x, t = n.args
        w = _transposed_param(gm, t)
        xv = _val(x)
        if w is None or xv is None or xv.dim() < 2:
            continue
        bias, last = None, n
        if len(n.users) == 1:
            (u,) = n.users
            if ir.is_op(u, aten.add.Tensor) and len(u.args) == 2:
                other = u.args[1] if u.args[0] is n else u.args[0]
                ov = _val(other)
                if (isinstance(other, fx.Node) and other.op == "get_attr" and ov is not None
                        and ov.dim() == 1 and ov.shape[0] == _val(w).shape[0]):
                    bias, last = other, u
        matches.append((n, x, w, bias, last))
    # mutate
    for n, x, w, bias, last in matches:
        with gm.graph.inserting_before(last):
            lin = gm.graph.call_function(aten.linear.default, (x, w, bias))
        ir.copy_meta(last, lin, created_by="canonicalize")
        lin.meta["nn_module_stack"] = n.meta.get("nn_module_stack",
                                                 last.meta.get("nn_module_stack"))
        last.replace_all_uses_with(lin)
    gm.graph.eliminate_dead_code()
    return len(matches)


# In-place op -> its functional form (exact when nothing else reads the mutated operand).
_INPLACE = {aten.add_.Tensor: aten.add.Tensor, aten.mul_.Tensor: aten.mul.Tensor,
            aten.sub_.Tensor: aten.sub.Tensor, aten.div_.Tensor: aten.div.Tensor}


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Replace ``add_(a, b)`` and friends by ``add(a, b)`` where ``a`` has no other reader."""
    # decide
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _INPLACE
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "call_function"
            and len(n.args[0].users) == 1]
    # mutate
    for n in todo:
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(_INPLACE[n.target], n.args, n.kwargs)
        ir.copy_meta(n, new, created_by="canonicalize")
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    return len(todo)


def _constant_value(gm: fx.GraphModule, n) -> torch.Tensor | None:
    """The value of a constant tensor node (``get_attr``, possibly through ``lift_fresh_copy``)."""
    if isinstance(n, fx.Node) and ir.is_op(n, aten.lift_fresh_copy.default):
        n = n.args[0]
    if not (isinstance(n, fx.Node) and n.op == "get_attr"):
        return None
    try:
        v = ir.get_param(gm, n)
    except Exception:
        return None
    return v if isinstance(v, torch.Tensor) else None


def index_to_slice(gm: fx.GraphModule) -> int:
    """``x[..., c]`` with a constant range ``c`` -> ``slice``; ``broadcast_to`` -> ``expand``."""
    # decide
    slices, expands = [], []
    for n in gm.graph.nodes:
        if ir.is_op(n, aten.broadcast_to.default):
            expands.append(n)
            continue
        if not ir.is_op(n, aten.index.Tensor) or len(n.args) != 2:
            continue
        x, idx = n.args
        xv = _val(x)
        if xv is None or not isinstance(idx, (list, tuple)) or not idx or idx[-1] is None \
                or any(i is not None for i in idx[:-1]):
            continue
        dim = len(idx) - 1
        size = xv.shape[dim]
        c = _constant_value(gm, idx[-1])
        if not isinstance(size, int) or c is None or c.dim() != 1 or c.numel() == 0 \
                or c.dtype not in (torch.int64, torch.int32):
            continue
        c = torch.where(c < 0, c + size, c).tolist()
        if c != list(range(c[0], c[0] + len(c))) or not 0 <= c[0] < c[-1] + 1 <= size:
            continue
        slices.append((n, x, dim, c[0], c[-1] + 1))
    # mutate
    for n, x, dim, start, stop in slices:
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(aten.slice.Tensor, (x, dim, start, stop))
        ir.copy_meta(n, new, created_by="canonicalize")
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    for n in expands:
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(aten.expand.default, (n.args[0], list(n.args[1])))
        ir.copy_meta(n, new, created_by="canonicalize")
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    return len(slices) + len(expands)


__all__ = [
    "Canonicalize",
    "canonicalize",
    "convert_conv1d",
    "convert_matmul_transposed",
    "functionalize_inplace",
    "index_to_slice",
    "raise_rms_norms",
    "remove_identity_ops",
    "untie_embeddings",
]
