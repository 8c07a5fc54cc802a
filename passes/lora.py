"""LoRARecover: a short low-rank fine-tune that recovers quality after lossy passes, merged back.

Paper: LoRA (Hu et al., arXiv:2106.09685), used for recovery after pruning as in LLM-Pruner
(arXiv:2305.11627, Section 3.3).

Identity relied on: a linear with an adapter, ``x W^T + s (x A^T) B^T``, equals the plain linear
``x (W + s B A)^T``. Training runs on the merged form (every step's effective weight is
``W + s B A``, computed functionally, so the graph is never changed during training), and the
pass ends by writing ``W <- W + s B A`` into the weights: the graph afterwards has exactly the
nodes it had before, only the weights of the adapted linears differ.

Sites rewritten: every ``aten.linear`` whose weight is a parameter, except the one producing the
graph output (the LM head, often tied to the embedding) unless ``include_lm_head``; sites can
be narrowed with fnmatch ``include`` patterns over the linear's module path. Skipped with a
note: linears whose weight is not a float parameter.

Training: ``A: [rank, in]`` Kaiming-uniform, ``B: [out, rank]`` zeros (so step 0 is the
original model), ``s = alpha / rank``; AdamW (``lr``, ``weight_decay``) on the next-token
cross-entropy of the graph on the calibration batches (``ctx.calibration``, cycled), one batch
per step; seeded by ``seed`` (default ``ctx.seed``). Base weights stay frozen.

Preconditions: ``canonical``, ``calibrated``. Lossy (the function changes: that is the point).
Preserves the channel groups (shapes are unchanged) but no data analysis.

Hyper-parameters:
    rank (int, default 8), alpha (float, default 2 * rank), steps (int, default 100),
    lr (float, default 1e-4), weight_decay (float, default 0.0),
    include (list[str], default all block linears), include_lm_head (bool, default False),
    seed (int | None, default None: ``ctx.seed``).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from compiler import ir
from compiler.evaluate import next_token_loss
from compiler.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)


@dataclass
class Adapter:
    """The low-rank pair of one linear: effective weight ``W + scale * B @ A``."""

    site: str
    target: str  # the weight's get_attr target
    A: torch.Tensor  # [rank, in]
    B: torch.Tensor  # [out, rank]
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


def lora_sites(gm: fx.GraphModule, *, include: Sequence[str] | None = None,
               include_lm_head: bool = False) -> tuple[list[tuple[str, str]], list[str]]:
    """``[(site, weight target)]`` of the linears to adapt, and notes for the skipped ones."""
    out_nodes = {x for n in gm.graph.nodes if n.op == "output" for x in n.all_input_nodes}
    sites, notes, seen = [], [], set()
    for n in ir.nodes_of(gm, ir.LINEAR):
        _, w, _ = ir.linear_parts(n)
        s = ir.site(n)
        if ir.param_node(w) is None:
            notes.append(f"{s}: skipped, weight is not a parameter")
            continue
        t = str(w.target)
        if not ir.get_param(gm, t).is_floating_point():
            notes.append(f"{s}: skipped, weight is not floating point")
            continue
        if n in out_nodes and not include_lm_head:
            continue
        if include is not None and not any(fnmatch.fnmatch(s, p) for p in include):
            continue
        if t in seen:
            continue
        seen.add(t)
        sites.append((s, t))
    return sites, notes


def init_adapters(gm: fx.GraphModule, sites: Sequence[tuple[str, str]], rank: int, alpha: float,
                  generator: torch.Generator) -> list[Adapter]:
    """Kaiming-uniform ``A``, zero ``B`` for every site (the adapted model starts exact)."""
    adapters = []
    for s, t in sites:
        w = ir.get_param(gm, t)
        out_f, in_f = w.shape
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
        a = (torch.rand(rank, in_f, generator=generator, dtype=w.dtype) * 2 - 1) * bound
        b = torch.zeros(out_f, rank, dtype=w.dtype)
        adapters.append(Adapter(s, t, a, b, alpha / rank))
    return adapters


def adapted_forward(gm: fx.GraphModule, adapters: Sequence[Adapter], ids: torch.Tensor):
    """Logits of ``gm`` with every adapter applied (``W + s B A``), without changing ``gm``."""
    weights = {a.target: ir.get_param(gm, a.target) + a.delta() for a in adapters}
    return torch.func.functional_call(gm, weights, (ids,), strict=False)


def train_adapters(gm: fx.GraphModule, adapters: Sequence[Adapter], batches: Sequence[torch.Tensor],
                   *, steps: int, lr: float, weight_decay: float = 0.0,
                   progress: bool = False) -> list[float]:
    """AdamW on the adapters' ``A``/``B`` (base weights frozen); returns the loss per step."""
    params = []
    for a in adapters:
        a.A.requires_grad_(True)
        a.B.requires_grad_(True)
        params += [a.A, a.B]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="lora_recover", leave=False)
    losses = []
    try:
        for step in it:
            ids = batches[step % len(batches)]
            loss = next_token_loss(adapted_forward(gm, adapters, ids), ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % max(steps // 10, 1) == 0:
                log.debug("lora_recover: step %d/%d loss %.4f", step, steps, losses[-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for a in adapters:
            a.A = a.A.detach()
            a.B = a.B.detach()
    return losses


def merge_adapters(gm: fx.GraphModule, adapters: Sequence[Adapter]) -> None:
    """Write ``W <- W + s B A`` into every adapted weight (the graph's nodes do not change)."""
    for a in adapters:
        ir.set_param(gm, a.target, ir.get_param(gm, a.target).detach() + a.delta())


class LoRARecover(Pass):
    """Train low-rank adapters on calibration text and merge them; see the module doc."""

    name = "lora_recover"
    exact = False
    requires = frozenset({"canonical", "calibrated"})

    def __init__(self, *, rank: int = 8, steps: int = 100, lr: float = 1e-4,
                 alpha: float | None = None, weight_decay: float = 0.0,
                 include: Sequence[str] | None = None, include_lm_head: bool = False,
                 seed: int | None = None):
        for opt, val in (("rank", rank), ("steps", steps)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0 or (
                    opt == "rank" and val < 1):
                raise ValueError(f"lora_recover: {opt} must be a positive int, got {val!r}")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lora_recover: lr must be > 0, got {lr!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"lora_recover: alpha must be > 0, got {alpha!r}")
        if isinstance(include, str):
            include = [include]
        self.rank = rank
        self.steps = steps
        self.lr = float(lr)
        self.alpha = float(alpha) if alpha is not None else float(2 * rank)
        self.weight_decay = float(weight_decay)
        self.include = list(include) if include is not None else None
        self.include_lm_head = bool(include_lm_head)
        self.seed = seed

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        batches = ctx.require_calibration("lora_recover")
        sites, notes = lora_sites(gm, include=self.include, include_lm_head=self.include_lm_head)
        if not sites or self.steps == 0:
            return PassResult.unchanged(gm, notes + ([] if sites else ["no linear to adapt"]),
                                        adapters=0)
        seed = ctx.seed if self.seed is None else self.seed
        gen = torch.Generator().manual_seed(int(seed))
        adapters = init_adapters(gm, sites, self.rank, self.alpha, gen)
        with torch.random.fork_rng():
            torch.manual_seed(int(seed))
            losses = train_adapters(gm, adapters, batches, steps=self.steps, lr=self.lr,
                                    weight_decay=self.weight_decay, progress=ctx.progress)
        merge_adapters(gm, adapters)
        gm.recompile()
        stats = {
            "adapters": len(adapters),
            "trainable_params": sum(a.A.numel() + a.B.numel() for a in adapters),
            "steps": self.steps,
            "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
        }
        log.info("lora_recover: %d adapters (rank %d), %d steps, loss %.4f -> %.4f",
                 len(adapters), self.rank, self.steps, losses[0], losses[-1])
        ctx.extra["lora_recover"] = {"losses": losses}
        return PassResult(gm, True, frozenset({"channel_groups"}), stats, notes)


__all__ = ["Adapter", "LoRARecover", "adapted_forward", "init_adapters", "lora_sites",
           "merge_adapters", "train_adapters"]
