"""make_outlier_model: function-preserving, and the norm outputs really get outlier channels."""

from __future__ import annotations

import pytest

from compiler import ir
from compiler.pass_base import PassContext
from compiler.stats import ActivationStats
from compiler.testing import make_outlier_model
from passes.canonicalize import canonicalize
from tests.conftest import CORE_FAMILIES, needs_stories, stories_graph, tiny_graph


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_outlier_model_preserves_logits(family, probe_ids):
    gm = canonicalize(tiny_graph(family))
    ref = gm(probe_ids)
    make_outlier_model(gm)
    assert (gm(probe_ids) - ref).abs().max().item() <= 1e-4
    # every block norm (the final norm too unless it feeds a tied LM head)
    assert sum("fxcompress_outliers" in n.meta for n in gm.graph.nodes) >= 4


def test_outlier_model_blows_up_chosen_channels_of_norm_outputs(calib_batches):
    gm = make_outlier_model(canonicalize(tiny_graph("llama")), channels=(5,), factor=50)
    site = "model.layers.1.mlp.gate_proj:in"
    absmax = ActivationStats.compute(gm, PassContext(calibration=calib_batches),
                                     sites=frozenset({site}), covariance=frozenset())[site].absmax
    others = absmax.clone()
    others[5] = 0
    assert absmax[5] > 10 * others.max()


def test_outlier_model_rejects_nonpositive_factor():
    with pytest.raises(ValueError, match="factor"):
        make_outlier_model(canonicalize(tiny_graph("llama")), factor=0)


@needs_stories
def test_outlier_model_leaves_tied_lm_head_alone_on_stories260k(probe_ids):
    gm = canonicalize(stories_graph())
    ref = gm(probe_ids)
    params = ir.count_params(gm)
    make_outlier_model(gm)
    assert (gm(probe_ids) - ref).abs().max().item() <= 1e-4
    # 10 block norms; the final norm feeds the tied LM head and is skipped
    assert sum("fxcompress_outliers" in n.meta for n in gm.graph.nodes) == 10
    assert ir.count_params(gm) == params
