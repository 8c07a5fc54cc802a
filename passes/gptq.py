"""GPTQ: round linear weights to 4 (or 8) bits column by column, correcting the error as it goes.

Paper: GPTQ (Frantar et al., arXiv:2210.17323), building on Optimal Brain Quantization.

Identity relied on (lossy by design): for a linear with input ``X`` (``[tokens, in]``) and
``H = X^T X``, the output error of a weight change ``dW`` is ``tr(dW H dW^T)``. Rounding column
``j`` of ``W`` to ``q_j`` and adding ``-(w_j - q_j) / [H^-1]_jj * [H^-1]_{j,j+1:}`` to the
not-yet-rounded columns minimizes that error given the rounding (the OBS update). With the
upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) the updates of one column read row
``j`` of ``U``, so the sweep is: for each column in order, ``err = (w_j - q_j) / U_jj``;
``W[:, j:] -= err U[j, j:]``, applied lazily in batches of 128 columns (the paper's "lazy batch"
update). ``H`` is damped, ``H + damp * mean(diag H) I``; columns no token touches
(``H_jj = 0``) are zeroed and get ``H_jj = 1``.

Quantization grid (the form ``insert_qdq(scheme=w4a16)`` writes, so the ORT ``MatMulNBits``
and Triton W4A16 lowerings apply unchanged): int4 values held in int8 in [-8, 7], one scale (and
zero point unless ``sym``) per ``group_size`` consecutive input channels of each row, computed
with :func:`compiler.qdq.quantize_weight_per_group` on the *current* (already updated)
weights when the sweep reaches the group's first column; ``group_size=-1``: one group per row
(computed once before the sweep). ``act_order``: columns are swept by decreasing ``H_jj``; the
groups stay contiguous in the original column order and their grids are computed from the
original weights before the sweep ("static groups"), since the Q/DQ form has no group index.
``bits=8``: symmetric int8 per output channel (``dequantize_per_channel``, as insert_qdq's int8
weights).

Calibration is block by block (:mod:`compiler.blockwise`): ``H`` of each linear is formed from
its real inputs in the model whose earlier blocks are already quantized; the block is then
rounded and re-run to produce the next block's inputs.

Sites rewritten: as :func:`compiler.qdq.select_sites` decides (``insert_qdq(scheme=w4a16)``'s
annotation: every ``aten.linear`` with a parameter weight, ``include``/``exclude`` patterns,
the LM head only with ``quantize_lm_head``). Linears outside the decoder blocks and the
epilogue (e.g. a projection beside the embedding) are left float with a note.

Preconditions: ``canonical``, ``calibrated``; the graph must not hold Q/DQ nodes yet (a
``PreconditionError`` names the passes run so far). Establishes ``quantized``. Lossy. Preserves
no analysis.

Hyper-parameters:
    bits (int, default 4): 4 (group-wise int4) or 8 (int8 per output channel).
    group_size (int, default 128): 32, 64, 128 (what the int4 kernels run), or -1 for one group
        per row; must be -1 for ``bits=8``.
    act_order (bool, default False): sweep columns by decreasing Hessian diagonal (static groups).
    damp (float, default 0.01): diagonal damping as a fraction of ``mean(diag H)``, in [0, 1).
    sym (bool | None, default None): symmetric int4 grid (no zero point); None means asymmetric
        for 4 bits; 8 bits are always symmetric (the int8 form the kernels run).
    include, exclude, quantize_lm_head: site selection as in ``insert_qdq``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import fx

from compiler.blockwise import Block, BlockRunner, BlockVisitor, run_blockwise
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.qdq import (
    QuantAnnotation,
    WeightQuantSpec,
    dequantize_weight,
    quantize_weight_per_channel,
    quantize_weight_per_group,
    resolve_weight_spec,
    rewrite_sites,
    select_sites,
    site_patterns,
)

log = logging.getLogger(__name__)
qd = torch.ops.quantized_decomposed

#: columns per lazy batch update (the paper's B)
LAZY_BATCH = 128


# ----------------------------------------------------------------------------- numerics


def _grid(w: torch.Tensor, spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale [out], zero point [out])`` float64 of a column slice ``w [out, cols]``."""
    if spec.bits == 8:
        _, s = quantize_weight_per_channel(w, spec)
        return s.double(), torch.zeros_like(s, dtype=torch.float64)
    _, s, zp = quantize_weight_per_group(w, WeightQuantSpec(4, w.shape[1], spec.symmetric))
    zp = torch.zeros_like(s) if zp is None else zp.to(torch.float32)
    return s[:, 0].double(), zp[:, 0].double()


def hessian_inverse_factor(xtx: torch.Tensor, damp: float, *, site: str = "",
                           tokens: int | None = None, who: str = "gptq") -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp mean(diag H) I)^-1`` (float64).

    Raises:
        PassError: ``H`` is singular even after damping (too few calibration tokens).
    """
    h = xtx.to(torch.float64).clone()
    k = h.shape[0]
    d = torch.diagonal(h)
    dead = d == 0
    d[dead] = 1.0
    d += damp * d.mean()
    hint = (f"{tokens} calibration tokens for {k} input channels" if tokens is not None
            else f"{k} input channels")
    if damp == 0 and tokens is not None and tokens < k:
        raise PassError(f"{who}: site {site}: the Hessian X^T X of its input is singular "
                        f"({hint}, damp=0); give at least {k} calibration tokens or damp > 0")
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        hinv = torch.cholesky_inverse(chol)
        u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not torch.isfinite(chol).all():
        raise PassError(f"{who}: site {site}: the Hessian X^T X of its input is singular even "
                        f"after damping (damp={damp}; {hint}); give more calibration tokens or a "
                        "larger damp")
    return u


def gptq_quantize(w: torch.Tensor, xtx: torch.Tensor, spec: WeightQuantSpec, *,
                  damp: float = 0.01, act_order: bool = False, site: str = "",
                  tokens: int | None = None, lazy_batch: int = LAZY_BATCH
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-round one weight matrix.

    Args:
        w: ``[out, in]`` float weight.
        xtx: ``[in, in]`` ``X^T X`` of the linear's input.
        spec: the site's spec (``group_size`` the row length for one group per row; None for
            int8 per channel).
        damp: relative diagonal damping.
        act_order: sweep by decreasing ``diag(H)`` (grids from the original weights).
        site, tokens: for error messages.
        lazy_batch: columns per lazy update.

    Returns:
        ``(W_q int8 [out, in], scale, zero_point | None)`` in the layout of
        :func:`compiler.qdq.quantize_weight_per_group` (``scale [out]`` for int8).
    """
    out_f, in_f = w.shape
    W = w.detach().to(torch.float64).clone()
    g = spec.group_size if spec.group_size is not None else in_f
    n_groups = in_f // g
    scale = torch.zeros(out_f, n_groups, dtype=torch.float64)
    zero = torch.zeros(out_f, n_groups, dtype=torch.float64)
    dead = torch.diagonal(xtx) == 0
    static = act_order or g == in_f
    if static:  # grids from the original weights, before any update
        for j in range(n_groups):
            scale[:, j], zero[:, j] = _grid(w[:, j * g:(j + 1) * g].float(), spec)
    W[:, dead] = 0
    perm = torch.argsort(torch.diagonal(xtx), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, xtx = W[:, perm], xtx[perm][:, perm]
    u = hessian_inverse_factor(xtx, damp, site=site, tokens=tokens)
    cols = perm.tolist() if perm is not None else list(range(in_f))
    Q = torch.zeros(out_f, in_f, dtype=torch.float64)
    for i1 in range(0, in_f, lazy_batch):
        i2 = min(i1 + lazy_batch, in_f)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = cols[i1 + i]
            if not static and c % g == 0:  # the group's grid from its current weights
                scale[:, c // g], zero[:, c // g] = _grid(W1[:, i:i + g].float(), spec)
            s, z = scale[:, c // g], zero[:, c // g]
            q = torch.clamp(torch.round(W1[:, i] / s) + z, spec.qmin, spec.qmax)
            Q[:, c] = q
            e = (W1[:, i] - (q - z) * s) / u1[i, i]
            W1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
    q8 = Q.to(torch.int8)
    if spec.group_size is None:
        return q8, scale[:, 0].to(torch.float32), None
    zp = None if spec.symmetric else zero.to(torch.int8)
    return q8, scale.to(torch.float32), zp


# ----------------------------------------------------------------------------- the pass


class _GPTQVisitor(BlockVisitor):
    """Accumulates ``X^T X`` per linear input of a block, then GPTQ-rounds the block."""

    def __init__(self, pass_: GPTQ, todo: list[QuantAnnotation]) -> None:
        self.p = pass_
        self.by_node = {a.node: a for a in todo}
        self.xtx: dict[fx.Node, torch.Tensor] = {}
        self.count: dict[fx.Node, int] = {}
        self.qparams: dict[str, tuple] = {}
        self.done: set[fx.Node] = set()

    def observed(self, block: Block) -> list[fx.Node]:
        return list(dict.fromkeys(n.args[0] for n in block.linears() if n in self.by_node))

    def observe(self, block: Block, node: fx.Node, value: torch.Tensor, batch: int) -> None:
        x = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
        if node in self.xtx:
            self.xtx[node].addmm_(x.T, x)
        else:
            self.xtx[node] = x.T @ x
        self.count[node] = self.count.get(node, 0) + x.shape[0]

    def transform(self, block: Block, runner: BlockRunner) -> None:
        for n in block.linears():
            a = self.by_node.get(n)
            if a is None:
                continue
            target = str(n.args[1].target)
            w = runner.param(target)
            q, s, zp = gptq_quantize(w, self.xtx[n.args[0]], a.weight, damp=self.p.damp,
                                     act_order=self.p.act_order, site=a.site,
                                     tokens=self.count[n.args[0]])
            self.qparams[a.site] = (q, s, zp)
            runner.overrides[target] = dequantize_weight(q, s, zp, a.weight).to(w.dtype)
            self.done.add(n)
            log.debug("gptq: %s rounded (%d tokens)", a.site, self.count[n.args[0]])
        for x in {n.args[0] for n in block.linears()}:
            self.xtx.pop(x, None)


class GPTQ(Pass):
    """GPTQ weight rounding on the block-sequential engine; see the module docstring."""

    name = "gptq"
    exact = False
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"quantized"})
    forbids = frozenset({"quantized"})

    def __init__(
        self,
        *,
        bits: int = 4,
        group_size: int = 128,
        act_order: bool = False,
        damp: float = 0.01,
        sym: bool | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str = (),
        quantize_lm_head: bool = False,
    ):
        self._spec = resolve_weight_spec("gptq", bits, group_size, sym)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < 1:
            raise ValueError(f"gptq: damp must be a number in [0, 1), got {damp!r}")
        for opt, val in (("act_order", act_order), ("quantize_lm_head", quantize_lm_head)):
            if not isinstance(val, bool):
                raise TypeError(f"gptq: {opt} must be a bool, got {val!r}")
        self.bits = bits
        self.group_size = group_size
        self.act_order = act_order
        self.damp = float(damp)
        self.sym = self._spec.symmetric
        self.include = site_patterns(include, "include") if include is not None else None
        self.exclude = site_patterns(exclude, "exclude")
        self.quantize_lm_head = quantize_lm_head

    def weight_group_size(self) -> int | None:
        return self._spec.group_size

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        self.check_not_quantized(gm, ctx, "run gptq on the float graph (before insert_qdq)")
        batches = ctx.require_calibration("gptq")
        # decide: sites, then the rounding of every block (the graph is untouched until the end)
        todo, notes = select_sites("gptq", gm, self._spec, include=self.include,
                                   exclude=self.exclude, quantize_lm_head=self.quantize_lm_head)
        if not todo:
            return PassResult.unchanged(gm, notes, linears_quantized=0)
        visitor = _GPTQVisitor(self, todo)
        run_blockwise(gm, batches, visitor, propagate="transformed", progress=ctx.progress,
                      desc="gptq", compute_dtype=ctx.calibration_dtype)
        for a in [a for a in todo if a.node not in visitor.done]:
            notes.append(f"{a.site}: skipped, outside the decoder blocks (left float)")
        todo = [a for a in todo if a.node in visitor.done]
        if not todo:
            return PassResult.unchanged(gm, notes, linears_quantized=0)
        # mutate
        stats = rewrite_sites(gm, todo, {}, weight_qparams=visitor.qparams, created_by=self.name)
        log.info("gptq(bits=%d, group_size=%d%s): %d linears rounded; params %d -> %d bytes",
                 self.bits, self.group_size, ", act_order" if self.act_order else "",
                 stats["linears_quantized"], stats["param_bytes_before"],
                 stats["param_bytes_after"])
        return PassResult(gm, True, frozenset(), stats, notes)


__all__ = ["GPTQ", "gptq_quantize", "hessian_inverse_factor"]
