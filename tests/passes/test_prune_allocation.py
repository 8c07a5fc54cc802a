"""structured_prune's max_unit_overshoot: a group whose unit is far coarser than the ratio
(SmolLM2's 3 kv heads at 20%) stays whole and its share of the ratio moves to the others."""

from __future__ import annotations

import math

import pytest
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.structured_prune import StructuredPrune
from tests.conftest import tiny_graph


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
