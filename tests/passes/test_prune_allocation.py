"""structured_prune's allocation: a group whose unit is far coarser than the ratio (SmolLM2's
3 kv heads at 20%) stays whole and its share of the ratio moves to the others
(max_unit_overshoot); MLP channels ranked across layers under a cap chosen by calibration loss
(global_ranking="mlp", global_cap="auto", the defaults)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compiler import ir
from compiler.evaluate import next_token_loss
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.structured_prune import CAP_CANDIDATES, OVERSHOOT_CANDIDATES, StructuredPrune
from tests.conftest import tiny_graph

_DOWN = "model.model.layers.{}.mlp.down_proj.weight"
_O = "model.model.layers.{}.self_attn.o_proj.weight"
_HEAD = "model.lm_head.weight"
#: the MLPs' per-layer ratio at 0.2 once the whole kv groups' share moved to them (128 channels)
_PER_LAYER = 38


def _greedy_text(gm: torch.fx.GraphModule, n: int = 4, seq: int = 16) -> list[torch.Tensor]:
    """The model's own greedy continuations of random first tokens, in batches of 2: text the
    unpruned model predicts well, so removing channels that matter raises the loss."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2 * n, 1), generator=g)
    with torch.no_grad():
        for _ in range(seq - 1):
            ids = torch.cat([ids, gm(ids)[:, -1:].argmax(-1)], 1)
    return list(ids.split(2))


def _mlp_removed(decision) -> list[int]:
    return [len(d.removed) for d in sorted(decision.groups.values(), key=lambda d: d.block)
            if d.kind == "mlp"]


def _quiet_second_mlp() -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Tiny llama whose block-1 MLP writes 1e-3 of its output (its channels matter little) and
    whose LM head is 30x sharper (confident predictions), with its own text as calibration."""
    if not _QUIET:
        gm = canonicalize(tiny_graph("llama"))
        ir.set_param(gm, _DOWN.format(1), ir.get_param(gm, _DOWN.format(1)) * 1e-3)
        ir.set_param(gm, _HEAD, ir.get_param(gm, _HEAD) * 30)
        _QUIET.append((gm, _greedy_text(gm)))
    gm, calib = _QUIET[0]
    return copy.deepcopy(gm), calib


_QUIET: list = []  # built once per process


def test_coarse_kv_groups_stay_whole_and_the_ratio_still_holds():
    # tiny llama: 2 kv groups, one is 50% of the attention > 1.5 x 0.3; per layer,
    # round(0.3 x 2) = 1 would remove half the attention of every layer
    gm = canonicalize(tiny_graph("llama"))
    res = StructuredPrune(ratio=0.3, importance="l1").run(gm, PassContext())
    assert res.stats["heads_removed"] == 0
    whole = [n for n in res.notes if "left whole" in n]
    assert len(whole) == 2 and all("attn_heads" in n and "50%" in n for n in whole), whole
    # the attention's share moved to the MLPs: still 30% of all prunable parameters
    assert res.stats["prunable_fraction_removed"] == pytest.approx(0.3, abs=0.01)


def test_the_rule_off_prunes_one_kv_group_per_layer():
    gm = canonicalize(tiny_graph("llama"))
    res = StructuredPrune(ratio=0.3, importance="l1", max_unit_overshoot=math.inf).run(
        gm, PassContext())
    assert res.stats["heads_removed"] == 2 * 2  # one kv group (2 query heads) x 2 layers
    assert not any("left whole" in n for n in res.notes)


def test_fine_enough_units_are_pruned_as_before():
    # ratio 0.5: a 50% unit is within 1.5 x the ratio
    gm = canonicalize(tiny_graph("llama"))
    res = StructuredPrune(ratio=0.5, importance="l1").run(gm, PassContext())
    assert res.stats["heads_removed"] == 4


@pytest.mark.parametrize("bad", [0.5, True, "1.5", -1])
def test_bad_max_unit_overshoot_is_rejected(bad):
    with pytest.raises(ValueError, match="max_unit_overshoot"):
        StructuredPrune(max_unit_overshoot=bad)


def test_default_moves_mlp_pruning_to_the_layer_that_matters_least():
    # per layer (the former default) both MLPs would lose the same 38 channels
    gm, calib = _quiet_second_mlp()
    ctx = PassContext(calibration=calib)
    res = StructuredPrune(ratio=0.2).run(gm, ctx)
    decision = ctx.extra["structured_prune"]
    removed = _mlp_removed(decision)
    assert removed[1] > _PER_LAYER > removed[0], removed
    assert decision.global_cap > 1 and res.stats["global_cap"] == decision.global_cap
    assert sum(removed) == pytest.approx(2 * _PER_LAYER, abs=1)  # moved, not more removed
    assert res.stats["prunable_fraction_removed"] == pytest.approx(0.2, abs=0.01)


def test_auto_cap_is_the_candidate_with_the_lowest_calibration_loss():
    gm, calib = _quiet_second_mlp()
    ctx = PassContext(calibration=calib)
    StructuredPrune(ratio=0.2).run(gm, ctx)
    decision = ctx.extra["structured_prune"]
    assert set(decision.cap_losses) == set(CAP_CANDIDATES)
    assert decision.global_cap == min(decision.cap_losses, key=decision.cap_losses.__getitem__)
    # the loss the choice was made on is the pruned graph's own loss
    with torch.no_grad():
        loss = sum(float(next_token_loss(gm(ids), ids)) for ids in calib) / len(calib)
    assert loss == pytest.approx(decision.cap_losses[decision.global_cap], rel=1e-5)
    assert any("chosen by calibration loss" in n for n in decision.notes)


def test_cap_one_is_the_per_layer_allocation():
    for opts in ({"global_cap": 1}, {"global_ranking": False}):
        gm, calib = _quiet_second_mlp()
        ctx = PassContext(calibration=calib)
        StructuredPrune(ratio=0.2, **opts).run(gm, ctx)
        assert _mlp_removed(ctx.extra["structured_prune"]) == [_PER_LAYER] * 2, opts


def test_a_fixed_cap_bounds_every_layer_and_no_cap_does_not():
    bound = 48  # floor(1.25 x the MLPs' average fraction 0.300 x 128 channels)
    gm, calib = _quiet_second_mlp()
    ctx = PassContext(calibration=calib)
    res = StructuredPrune(ratio=0.2, global_cap=1.25).run(gm, ctx)
    assert max(_mlp_removed(ctx.extra["structured_prune"])) <= bound
    assert any("stopped at the cap of 1.25" in n for n in res.notes)
    gm, calib = _quiet_second_mlp()
    ctx = PassContext(calibration=calib)
    StructuredPrune(ratio=0.2, global_cap=math.inf).run(gm, ctx)
    assert max(_mlp_removed(ctx.extra["structured_prune"])) > bound


def test_auto_cap_without_calibration_is_per_layer_with_a_note():
    gm, _ = _quiet_second_mlp()
    res = StructuredPrune(ratio=0.2, importance="l1").run(gm, PassContext())
    assert res.stats["mlp_channels_removed"] == 2 * _PER_LAYER
    assert any("no calibration data to choose a cap" in n for n in res.notes)


@pytest.mark.parametrize("opt, bad", [("global_ranking", "attention"), ("global_ranking", 1),
                                      ("global_cap", 0.5), ("global_cap", "max"),
                                      ("global_cap", True)])
def test_bad_global_ranking_options_are_rejected(opt, bad):
    with pytest.raises((ValueError, TypeError), match=opt):
        StructuredPrune(**{opt: bad})


def _scaled(o_scale: float, down_scale: float) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Tiny llama whose attention (o_proj) and MLP (down_proj) outputs are scaled, with a 30x
    sharper LM head and its own greedy text as calibration."""
    gm = canonicalize(tiny_graph("llama"))
    for i in range(2):
        ir.set_param(gm, _O.format(i), ir.get_param(gm, _O.format(i)) * o_scale)
        ir.set_param(gm, _DOWN.format(i), ir.get_param(gm, _DOWN.format(i)) * down_scale)
    ir.set_param(gm, _HEAD, ir.get_param(gm, _HEAD) * 30)
    return gm, _greedy_text(gm)


def test_auto_overshoot_tries_pruning_and_keeping_coarse_groups_and_keeps_the_better():
    # ratio 0.4: a kv group (50% of a layer's attention) is within 1.5 x 0.4 but over 1 x 0.4,
    # so the two candidates differ: one kv group per layer removed, or attention left whole
    gm, calib = _scaled(1.0, 1.0)
    ctx = PassContext(calibration=calib)
    res = StructuredPrune(ratio=0.4).run(gm, ctx)
    decision = ctx.extra["structured_prune"]
    assert set(decision.overshoot_losses) == set(OVERSHOOT_CANDIDATES)
    losses = decision.overshoot_losses
    assert decision.unit_overshoot == min(losses, key=losses.__getitem__)
    assert res.stats["max_unit_overshoot"] == decision.unit_overshoot
    with torch.no_grad():
        loss = sum(float(next_token_loss(gm(ids), ids)) for ids in calib) / len(calib)
    assert loss == pytest.approx(losses[decision.unit_overshoot], rel=1e-5)
    assert any("max_unit_overshoot" in n and "chosen by calibration loss" in n
               for n in decision.notes)


@pytest.mark.parametrize("o_scale, down_scale, heads", [(30.0, 1e-2, 0), (1e-2, 30.0, 4)])
def test_auto_overshoot_follows_what_the_model_needs(o_scale, down_scale, heads):
    # attention carries the model: its coarse kv groups stay whole (the MLPs take the ratio);
    # the MLPs carry it: one kv group per layer goes (2 query heads x 2 layers)
    gm, calib = _scaled(o_scale, down_scale)
    ctx = PassContext(calibration=calib)
    res = StructuredPrune(ratio=0.4).run(gm, ctx)
    assert res.stats["heads_removed"] == heads, ctx.extra["structured_prune"].overshoot_losses
    removed = res.stats["prunable_fraction_removed"]
    if heads:  # half of the attention goes (one coarse unit), 40% of the MLPs
        assert 0.4 < removed < 0.5
    else:  # the attention's share moved to the MLPs
        assert removed == pytest.approx(0.4, abs=0.01)


def test_auto_overshoot_searches_only_when_the_candidates_differ():
    # ratio 0.3: a 50% kv group is over both 1.5 x 0.3 and 1 x 0.3: one allocation, no search
    gm, calib = _scaled(1.0, 1.0)
    ctx = PassContext(calibration=calib)
    res = StructuredPrune(ratio=0.3).run(gm, ctx)
    decision = ctx.extra["structured_prune"]
    assert decision.overshoot_losses == {} and res.stats["heads_removed"] == 0
