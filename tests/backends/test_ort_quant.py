"""Lowering of Q/DQ graphs to ORT integer kernels: parity, kernels ORT runs, file size."""

from __future__ import annotations

import pytest
import torch

from backends.onnxruntime import ORTModel, export_onnx, file_size
from backends.ort_quant import (
    export_quantized_onnx,
    integer_kernel_counts,
    lower_for_ort,
    pack_nbits,
    strip_debug_metadata,
    unpack_nbits,
)
from compiler import ir
from compiler.frontend import load_model, tiny_config, trace
from compiler.pass_base import PassContext
from compiler.qdq import WeightQuantSpec, quantize_weight_per_group
from passes.canonicalize import canonicalize
from passes.insert_qdq import InsertQDQ
from tests.conftest import (
    STORIES,
    needs_stories,
    scale_bug,
    stories_graph,
    stories_model,
    tiny_graph,
)

# ORT vs the fx graph on logits of magnitude ~1: both compute the same integer products; what
# differs is float rounding order (and ORT's x / s vs PT2E's x * (1 / s) before rounding).
ORT_ATOL = 1e-4
# The lowered fx graph (integer products in float64) vs the Q/DQ graph (float32 products of
# dequantized values).
LOWER_ATOL = 1e-5

SCHEMES = {
    "w8a8": {"scheme": "w8a8"},
    "w8a8_dynamic": {"scheme": "w8a8_dynamic"},
    "w4a16": {"scheme": "w4a16", "group_size": 32},
    "w4a16_sym": {"scheme": "w4a16", "group_size": 32, "symmetric": True},
}
LAYERS = 2  # tiny llama


def _quantized(name, calib, **extra):
    gm = canonicalize(tiny_graph("llama"))
    InsertQDQ(quantize_lm_head=True, **SCHEMES[name], **extra).run(
        gm, PassContext(calibration=calib))
    return gm


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(4)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, calib):
    """Each scheme's Q/DQ graph and its ORT model (exported once per module)."""
    d = tmp_path_factory.mktemp("ort_quant")
    out = {}
    for name in SCHEMES:
        gm = _quantized(name, calib, quantize_embeddings=True)
        path = export_quantized_onnx(gm, d / f"{name}.onnx")
        out[name] = (gm, ORTModel(path))
    return out


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_features, group", [(64, 32), (96, 32), (256, 128)])
def test_nbits_packing_round_trips_to_the_dequantized_weight(symmetric, in_features, group):
    w = torch.randn(24, in_features, generator=torch.Generator().manual_seed(0))
    q, s, zp = quantize_weight_per_group(w, WeightQuantSpec(4, group, symmetric))
    packed, sc, zpp = pack_nbits(q, s, zp, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, in_features // group, group // 2)
    assert (zpp is None) == symmetric
    expected = ((q.float() - (0 if zp is None else zp.float().repeat_interleave(group, 1)))
                * s.repeat_interleave(group, 1))
    got = unpack_nbits(packed, sc, zpp, in_features, 24, group)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_lowered_graph_equals_qdq_graph(name, calib, probe_ids):
    gm = _quantized(name, calib, quantize_embeddings=True)
    lowered, stats = lower_for_ort(gm)
    assert (lowered(probe_ids) - gm(probe_ids)).abs().max() <= LOWER_ATOL
    n = 7 * LAYERS + 1
    if name == "w8a8":
        assert stats.int8_linears_static == n and stats.activation_quantizers == 4 * LAYERS + 1
    elif name == "w8a8_dynamic":
        assert stats.int8_linears_per_token == n
    else:
        assert stats.int4_linears == n
    assert stats.int8_embeddings == 1 and stats.left_as_is == 0
    counts = ir.op_counts(lowered)
    assert not any(k.startswith("quantized_decomposed") for k in counts)
    assert counts["linear"] == 0


def test_lowering_leaves_the_input_graph_untouched(calib):
    gm = _quantized("w8a8", calib)
    code = gm.code
    lower_for_ort(gm)
    assert gm.code == code


def test_auto_accuracy_level_follows_the_cpus_int8_dot_products(monkeypatch):
    import backends.ort_quant as oq

    monkeypatch.setattr(oq, "cpu_has_int8_dot", lambda: True)
    assert oq.resolve_accuracy_level("auto") == 4
    monkeypatch.setattr(oq, "cpu_has_int8_dot", lambda: False)
    assert oq.resolve_accuracy_level("auto") == 0
    assert oq.resolve_accuracy_level(2) == 2
    for bad in ("fast", 5, True):
        with pytest.raises(ValueError, match="accuracy_level must be 0..4 or 'auto'"):
            oq.resolve_accuracy_level(bad)


def test_lowering_rejects_bad_accuracy_level(calib):
    with pytest.raises(ValueError, match="accuracy_level"):
        lower_for_ort(_quantized("w4a16", calib), accuracy_level=7)


# ----------------------------------------------------------------------------- ORT (slow)


# the tests reading ``exported`` run on one worker under -n (--dist loadgroup): exported once
@pytest.mark.slow
@pytest.mark.xdist_group("ort_quant_exported")
@pytest.mark.parametrize("name", list(SCHEMES))
def test_ort_logits_match_the_graph(name, exported, probe_ids):
    gm, ort_model = exported[name]
    for ids in (probe_ids, probe_ids[:1, :5]):
        assert (ort_model(ids) - gm(ids)).abs().max() <= ORT_ATOL


@pytest.mark.slow
@pytest.mark.xdist_group("ort_quant_exported")
@pytest.mark.parametrize("name, kernel", [
    ("w8a8", "MatMulIntegerToFloat"), ("w8a8_dynamic", "MatMulIntegerToFloat"),
    ("w4a16", "MatMulNBits"), ("w4a16_sym", "MatMulNBits"),
])
def test_ort_runs_integer_kernels_for_every_quantized_linear(name, kernel, exported):
    _, ort_model = exported[name]
    ops = ort_model.optimized_op_types()
    kinds = integer_kernel_counts(ops)
    assert ops[kernel] == 7 * LAYERS + 1  # every projection and the LM head
    # the only float matmuls left are attention's two activation x activation products
    assert kinds["float_matmul"] == 2 * LAYERS
    assert kinds["dequantize"] == 0  # no weight is dequantized at run time


@pytest.mark.slow
def test_w8a8_file_is_under_0_3x_of_fp32(tmp_path, calib):
    model = load_model(tiny_config("llama", hidden_size=256, intermediate_size=512,
                                   vocab_size=1024))
    gm = canonicalize(trace(model))
    fp32 = export_onnx(gm, tmp_path / "fp32.onnx")
    strip_debug_metadata(fp32)
    InsertQDQ(scheme="w8a8", quantize_lm_head=True, quantize_embeddings=True).run(
        gm, PassContext(calibration=[c % 1024 for c in calib]))
    q = export_quantized_onnx(gm, tmp_path / "w8a8.onnx", strip_metadata=True)
    assert file_size(q) < 0.3 * file_size(fp32)
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(3))
    assert (ORTModel(q)(ids) - gm(ids)).abs().max() <= ORT_ATOL


# |ORT / graph - 1| on 64 windows, measured: 5.7e-5 static W8A8 (mse ranges), 1.7e-5 per-token,
# 3.5e-5 W4A16 g32 at accuracy level 4. A 1% error in one linear's weight scales moves it by
# 2.4e-4 .. 5.9e-4 (measured on every linear of layer 0 and on layer 2's up_proj): the tolerance
# sits between the two, and the test shows it catches such a bug in the exported file.
ORT_PPL_RTOL = 2e-4


@pytest.fixture(scope="module")
def stories_fp32():
    """The 64 evaluation windows, 32 calibration batches and the canonical graph's perplexity,
    the same for every scheme."""
    from compiler.data import calibration_batches, evaluation_windows
    from compiler.evaluate import perplexity

    windows = evaluation_windows("tinystories", STORIES, n_windows=64)
    fp32 = perplexity(canonicalize(stories_graph()), windows, progress=False).ppl
    return windows, calibration_batches("tinystories", STORIES, n=32), fp32


@pytest.mark.slow
@needs_stories
@pytest.mark.xdist_group("ort_quant_stories260k")  # stories_fp32 computed once under -n
@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic", "w4a16"])
def test_stories260k_ort_perplexity_equals_the_graphs(scheme, stories_fp32, tmp_path):
    from compiler.evaluate import perplexity

    model = stories_model()
    windows, calib, fp32 = stories_fp32
    gm = canonicalize(stories_graph())
    # W4A16: down_proj (in-features 172) is not a multiple of the group size: left float
    spec = {"group_size": 32, "exclude": ["*down_proj"]} if scheme == "w4a16" else {}
    InsertQDQ(scheme=scheme, **spec).run(gm, PassContext(calibration=calib))
    graph = perplexity(gm, windows, progress=False).ppl
    # W4A16 at the deployment default: MatMulNBits with int8 compute where the CPU has it
    level = "auto" if scheme == "w4a16" else 0
    path = export_quantized_onnx(gm, tmp_path / "q.onnx", accuracy_level=level)

    def ort_ppl(p):
        return perplexity(ORTModel(p), windows, progress=False,
                          vocab_size=model.config.vocab_size).ppl

    # budget for each scheme on this model (full protocol measured +1.4% static W8A8, +0.02%
    # dynamic, +6.7% W4A16 g32)
    assert graph <= (1.08 if scheme == "w4a16" else 1.03) * fp32
    ort = ort_ppl(path)
    assert abs(ort / graph - 1) <= ORT_PPL_RTOL, (graph, ort)
    # the same file with layer 0's v_proj weight scales 1% off fails the check
    bug = ort_ppl(scale_bug(path, tmp_path / "bug.onnx", r"layers\.0\.self_attn\.v_proj"))
    assert abs(bug / graph - 1) > ORT_PPL_RTOL, (graph, bug)
