"""Passes compose: for every ordered pair (A, B) of passes, the pass manager either rejects the
order with a reason, or B still acts on the sites it acts on when run alone (its own counters),
with every exact pass verified numerically by the pass manager.

Run on a tiny random-init Llama and on the real stories260K. The one exception is spelled out in
``ALREADY_DONE``: B's whole job was done by A (rotating an already rotated stream).
"""

from __future__ import annotations

import copy

import pytest
import torch

from compiler import ir
from compiler.errors import FxCompressError, PipelineError, PreconditionError
from compiler.frontend import _from_config, load_model, tiny_config, trace
from compiler.pass_base import PassContext
from compiler.pass_manager import PassManager, validate_order
from compiler.report import Report
from passes import make_pass
from tests.conftest import STORIES, needs_stories


def _linears(gm) -> int:
    return len(ir.nodes_of(gm, ir.LINEAR))


def _quantized(stats, gm) -> float:
    """The fraction of the graph's linears a pass quantized, the LM head aside and the linears
    their creator marked to stay float (``ir.KEEP_FLOAT``: SliceGPT's shortcuts and tie maps)."""
    kept = sum(bool(n.meta.get(ir.KEEP_FLOAT)) for n in ir.nodes_of(gm, ir.LINEAR))
    return round(stats.get("linears_quantized", 0) / max(_linears(gm) - kept - 1, 1), 3)


# name -> (registry spec, how much it acted: f(stats, graph it ran on)). The measures do not
# depend on whether q/k/v were fused first (a fused qkv is one linear): writers, not readers;
# the fraction of linears quantized; channels removed.
PASSES = {
    "simplify_mask": ("simplify_mask", lambda s, gm: s.get("masks_simplified", 0)),
    "fuse_linears": ("fuse_linears", lambda s, gm: s.get("linears_fused", 0)),
    "smoothquant": ("smoothquant(alpha=0.5)", lambda s, gm: s.get("sites_smoothed", 0)),
    "rptq_reorder": ("rptq_reorder", lambda s, gm: s.get("groups_reordered", 0)),
    "rotation_invariant": ("rotation_invariant", lambda s, gm: sum(
        s.get(k, 0) for k in ("norms_rewritten", "post_norm_writers",
                              "embedding_norms_folded"))),
    "slicegpt_rotate": ("slicegpt_rotate", lambda s, gm: s.get("tables", 0) + s.get("writers", 0)),
    "slicegpt": ("slicegpt(sparsity=0.25)",
                 lambda s, gm: s.get("tables", 0) + s.get("writers", 0)),
    "structured_prune": ("structured_prune(ratio=0.25)", lambda s, gm: sum(
        v for k, v in s.items() if k.endswith("_removed") and k.split("_")[0] in
        ("mlp", "heads", "kv", "hidden", "attention"))),
    "insert_qdq": ("insert_qdq(scheme='w8a8')", lambda s, gm: _quantized(s, gm)),
    # group_size=-1: the tiny models' widths (64, stories260K's MLP 172) are not multiples of
    # the default 128, and pruning changes them; AWQ without the clip search (its scales are
    # what composes with the channel passes): the sites it searched a scale for (how many of
    # them end up scaled depends on the data: fewer after smoothquant) + the fraction quantized
    "gptq": ("gptq(group_size=-1)", lambda s, gm: _quantized(s, gm)),
    "awq": ("awq(group_size=-1, clip=False)",
            lambda s, gm: s.get("sites_searched", 0) + _quantized(s, gm)),
}

#: the passes that quantize: every weight-rewriting pass after them is refused
QUANTIZERS = ("insert_qdq", "gptq", "awq")

#: (A, B): accepted by the pass manager, yet B does nothing after A. Each entry is a known gap
#: in a pass this test does not own; the test fails once it is fixed (remove the entry then).
KNOWN_GAPS: dict[tuple[str, str], str] = {}

#: (A, B): B finds nothing to do after A because A already did B's job (or, for the
#: quantizers, quantized every site B would); B must say so.
ALREADY_DONE = {
    ("gptq", "insert_qdq"): "already quantized",
    ("awq", "insert_qdq"): "already quantized",
    ("slicegpt", "slicegpt_rotate"): "already rotated",
    ("slicegpt_rotate", "slicegpt_rotate"): "already rotated",
    ("slicegpt", "rotation_invariant"): "",
    ("slicegpt_rotate", "rotation_invariant"): "",
}

_STATE: dict[str, dict] = {}


def _model(key: str):
    if key == "llama":  # one block: every pair runs, so keep each run cheap
        return _from_config(tiny_config("llama", num_hidden_layers=1), 0, torch.float32), 256
    return load_model(STORIES), 512


def _state(key: str) -> dict:
    """Canonical graph, data, and each pass alone (its counter and its record, whose graph is
    the first pass of that pass's pair case), once per model."""
    if key in _STATE:
        return _STATE[key]
    model, vocab = _model(key)
    g = torch.Generator().manual_seed(11)
    calib = [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(2)]
    probe = torch.randint(0, vocab, (1, 16), generator=g)
    base = trace(model)
    ctx = PassContext(calibration=calib, probe_inputs=probe)
    PassManager([make_pass("canonicalize")]).run(base, ctx, Report(model=key))
    st = {"base": base, "calib": calib, "probe": probe, "props": set(ctx.properties),
          "alone": {}, "first": {}}
    _STATE[key] = st
    for name in PASSES:
        rec, gm_in = _run(st, base, st["props"], name)
        st["first"][name] = rec  # never mutated: every second pass runs on a copy of its graph
        st["alone"][name] = PASSES[name][1](rec.stats, gm_in)
        assert st["alone"][name], f"{name} alone does nothing on {key}: {rec.stats}"
    return st


def _run(st: dict, gm, props: set, name: str):
    """Run one pass through the pass manager on a copy of ``gm``; (its record, its input)."""
    gm = copy.deepcopy(gm)
    gm_in = copy.deepcopy(gm)
    ctx = PassContext(calibration=st["calib"], probe_inputs=st["probe"])
    ctx.properties |= props
    report = Report(model="pair")
    # the numerical check of exact passes stays on; graph verification (fake-tensor shape
    # propagation, most of the cost) is covered by each pass's own tests
    PassManager([make_pass(PASSES[name][0])], verify=False, check_exact=True).run(gm, ctx,
                                                                                 report)
    rec = report.records[-1]
    rec.graph_after, rec.props_after = gm, set(ctx.properties)
    return rec, gm_in


# Every ordered pair on both models (stories260K: about 6 s per first pass on 2 cores). The
# cases of one model share its state (_state: each pass alone); under -n they run on one worker
# so that it is computed once.
CASES = [pytest.param(f, "llama", marks=pytest.mark.xdist_group("composition_llama"))
         for f in PASSES] + [
    pytest.param(f, "stories260K", marks=[needs_stories,
                                          pytest.mark.xdist_group("composition_stories260K")])
    for f in PASSES]


@pytest.mark.slow
@pytest.mark.parametrize(("first", "model"), CASES)
def test_second_pass_acts_as_alone_or_the_order_is_rejected(first, model):
    st = _state(model)
    rec_a = st["first"][first]  # the pass alone on the canonical graph: the pair's first pass
    failures, rejected = [], []
    for second in PASSES:
        if second == first and (first, second) not in ALREADY_DONE:
            continue  # a pass after itself: idempotence, tested beside each pass
        ctx = PassContext(calibration=st["calib"], probe_inputs=st["probe"])
        ctx.properties |= st["props"]
        pair = [make_pass(PASSES[first][0]), make_pass(PASSES[second][0])]
        try:
            validate_order(pair, ctx)
        except (PipelineError, PreconditionError) as e:
            assert "quantized" in str(e), f"{first} -> {second} rejected without a reason: {e}"
            rejected.append(second)
            continue
        try:
            rec_b, gm_in = _run(st, rec_a.graph_after, rec_a.props_after, second)
        except FxCompressError as e:
            failures.append(f"{first} -> {second}: accepted by the pass manager, then failed: "
                            f"{str(e).splitlines()[0][:300]}")
            continue
        acted = PASSES[second][1](rec_b.stats, gm_in)
        alone = st["alone"][second]
        if (first, second) in KNOWN_GAPS:
            if acted:
                failures.append(f"{first} -> {second}: acts now; remove it from KNOWN_GAPS")
            continue
        if (first, second) in ALREADY_DONE:
            why = ALREADY_DONE[(first, second)]
            if rec_b.modified or (why and not any(why in n for n in rec_b.notes)):
                failures.append(f"{first} -> {second}: expected a no-op ({why or 'no-op'}), "
                                f"got modified={rec_b.modified}, notes={rec_b.notes}")
        elif acted < alone:
            failures.append(f"{first} -> {second}: acts on {acted}, alone on {alone} "
                            f"({rec_b.stats}; skipped: {[n for n in rec_b.notes][:4]})")
    assert not failures, "\n".join(failures)
    # after quantization every pass that rewrites weights is refused, with the reason
    # (insert_qdq after gptq/awq is accepted and says its sites are already quantized)
    if first in QUANTIZERS:
        assert set(rejected) == set(PASSES) - {first, "simplify_mask", "insert_qdq"}, rejected


def _pipeline(gm, specs: list[str], calib, probe, props=frozenset({"canonical"})):
    """Run ``specs`` on ``gm`` in place, on a graph with properties ``props``; (report, the
    properties after), so that a pipeline can continue on a copy of the graph."""
    ctx = PassContext(calibration=calib, probe_inputs=probe)
    ctx.properties |= set(props)
    report = Report(model="outliers")
    PassManager([make_pass(s) for s in specs]).run(gm, ctx, report)
    return report, frozenset(ctx.properties)


@pytest.mark.slow
@needs_stories
def test_slicegpt_then_smoothquant_w8a8_on_outlier_stories260k_within_two_percent():
    # The order of the model card: SliceGPT folds the norm gains (and their outlier channels)
    # into the readers; SmoothQuant must still act on every norm site (a gain of ones) and
    # bring W8A8 within 2% of SliceGPT alone. Measured (64 windows of 256 tokens): fp32 4.691,
    # SliceGPT 10% (sequential calibration, head whole, the tied table kept whole) 7.616,
    # + SmoothQuant + W8A8 7.688 (+0.94%), + W8A8 without SmoothQuant 7.732 (head untied, as
    # before tied_head: 7.694, 7.718; former single-basis SliceGPT: 8.044, 8.094, 8.105). The
    # final norm feeds the tied head's adapter (a linear that is not the LM head), so it is a
    # site too: 21 sites, 11 into norms (20 and 10 with the head untied).
    from compiler.data import calibration_batches, evaluation_windows
    from compiler.evaluate import perplexity
    from compiler.testing import make_outlier_model
    from passes.canonicalize import canonicalize
    from tests.conftest import stories_graph

    windows = evaluation_windows("tinystories", STORIES, 64)
    calib = calibration_batches("tinystories", STORIES, n=128)
    probe = windows[:2, :32]
    sliced = make_outlier_model(canonicalize(stories_graph()))
    _, props = _pipeline(sliced, ["slicegpt(sparsity=0.1)"], calib, probe)
    # both quantized pipelines continue from (a copy of) the one sliced graph
    full = copy.deepcopy(sliced)
    report, _ = _pipeline(full, ["smoothquant(alpha=0.5)", "insert_qdq(scheme='w8a8')"], calib,
                          probe, props)
    sq = report.records[0].stats
    assert sq["sites_smoothed"] == 21 and sq["folded_into_norms"] == 11, sq
    p_sliced = perplexity(sliced, windows, progress=False).ppl
    p_full = perplexity(full, windows, progress=False).ppl
    assert p_full <= p_sliced * 1.02, (p_sliced, p_full)
    # without SmoothQuant the same W8A8 loses more (the test can fail for the bug it guards)
    plain = copy.deepcopy(sliced)
    _pipeline(plain, ["insert_qdq(scheme='w8a8')"], calib, probe, props)
    p_plain = perplexity(plain, windows, progress=False).ppl
    assert p_plain > p_full, (p_sliced, p_full, p_plain)
