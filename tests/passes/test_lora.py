"""LoRARecover: exact merge, loss goes down on calibration data, no extra nodes, seeded."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.errors import PreconditionError
from compiler.evaluate import next_token_loss
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.lora import (
    LoRARecover,
    adapted_forward,
    init_adapters,
    lora_sites,
    merge_adapters,
    train_adapters,
)
from passes.structured_prune import StructuredPrune
from tests.conftest import tiny_graph


def _calib(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(n)]


def _mean_loss(fn, batches) -> float:
    with torch.no_grad():
        return sum(float(next_token_loss(fn(b), b)) for b in batches) / len(batches)


def test_merge_is_exact_against_the_adapter_graph(probe_ids):
    gm = canonicalize(tiny_graph("llama"))
    sites, _ = lora_sites(gm)
    adapters = init_adapters(gm, sites, rank=4, alpha=8.0,
                             generator=torch.Generator().manual_seed(0))
    train_adapters(gm, adapters, _calib(), steps=3, lr=1e-2)
    assert any(a.B.abs().sum() > 0 for a in adapters)
    with torch.no_grad():
        adapted = adapted_forward(gm, adapters, probe_ids)
    merge_adapters(gm, adapters)
    with torch.no_grad():
        merged = gm(probe_ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_adapters_cover_block_linears_but_not_the_lm_head():
    gm = canonicalize(tiny_graph("llama"))
    sites, _ = lora_sites(gm)
    names = [s for s, _ in sites]
    assert len(names) == 2 * 7  # q k v o gate up down per block
    assert not any("lm_head" in s for s in names)
    assert len(lora_sites(gm, include_lm_head=True)[0]) == 15
    assert [s for s, _ in lora_sites(gm, include=["*.mlp.*"])[0]] == [
        s for s in names if ".mlp." in s]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_lowers_calibration_loss_and_adds_no_nodes(family):
    gm = canonicalize(tiny_graph(family))
    ops_before = ir.op_counts(gm)
    nodes_before = len(gm.graph.nodes)
    params_before = ir.count_params(gm)
    calib = _calib()
    loss_before = _mean_loss(gm, calib)
    res = LoRARecover(rank=4, steps=20, lr=1e-2).run(gm, PassContext(calibration=calib))
    assert res.modified and res.stats["adapters"] > 0
    assert _mean_loss(gm, calib) < loss_before - 0.05
    assert res.stats["loss_last"] < res.stats["loss_first"]
    assert ir.op_counts(gm) == ops_before and len(gm.graph.nodes) == nodes_before
    assert ir.count_params(gm) == params_before
    assert not any("lora" in name for name, _ in gm.named_parameters())


def test_lora_recovers_a_pruned_graph_and_keeps_its_shapes(probe_ids):
    gm = canonicalize(tiny_graph("llama"))
    calib = _calib()
    StructuredPrune(ratio=0.5, importance="l1").run(gm, PassContext())
    shapes = {n: p.shape for n, p in gm.named_parameters()}
    loss_before = _mean_loss(gm, calib)
    LoRARecover(rank=4, steps=20, lr=1e-2).run(gm, PassContext(calibration=calib))
    assert {n: p.shape for n, p in gm.named_parameters()} == shapes
    assert _mean_loss(gm, calib) < loss_before


def test_lora_is_seeded():
    outs = []
    for _ in range(2):
        gm = canonicalize(tiny_graph("opt"))
        LoRARecover(rank=2, steps=3, lr=1e-2, seed=3).run(gm, PassContext(calibration=_calib()))
        outs.append(copy.deepcopy(dict(gm.named_parameters())))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_zero_steps_is_a_no_op():
    gm = canonicalize(tiny_graph("llama"))
    res = LoRARecover(steps=0).run(gm, PassContext(calibration=_calib()))
    assert not res.modified


def test_lora_needs_calibration():
    with pytest.raises(PreconditionError, match="calibration"):
        LoRARecover().run(canonicalize(tiny_graph("llama")), PassContext())


@pytest.mark.parametrize("kw", [{"rank": 0}, {"steps": -1}, {"lr": 0}, {"alpha": -1.0}])
def test_bad_options_are_rejected(kw):
    with pytest.raises(ValueError, match="lora_recover"):
        LoRARecover(**kw)
