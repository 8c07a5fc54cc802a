"""Triton lowering: Q/DQ graphs lowered to the fxcompress kernel ops match the Q/DQ logits, on
the torch references and on the real Triton kernels (interpreter on CPU); op counts; errors."""

from __future__ import annotations

import os

import pytest
import torch

from backends.triton.lowering import check_device, lower, lower_for_triton
from backends.triton.reference import TritonLaunchError
from compiler import ir
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.fuse_linears import FuseLinears
from passes.insert_qdq import InsertQDQ
from tests.conftest import tiny_graph, tiny_model

# Lowered vs Q/DQ graph on fp32 logits (|logits| 0.5-0.9 on the tiny models, float32 ulp 6e-8):
# the same integer products, only the float order of the epilogue and of the fused norm differs.
# Measured on every test here (w8a8 static and dynamic, w4a16, llama and opt, references and
# interpreted kernels): <= 1.8e-7. A weight or activation scale off by 1% moves the logits by
# >= 8e-3 (test_lowering_checks_fail_on_a_scale_off_by_one_percent). Should float order ever
# put an activation on the other side of an int8 rounding boundary, that is a whole quantization
# step (~1e-3 on the logits) and this check reports it.
ATOL_LOWERED = 1e-6
# kernels (interpreter) vs torch references of the same lowered graph: float order only
# (measured <= 1.2e-7)
ATOL_KERNEL_VS_REF = 1e-6

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU) or CUDA",
)


def _qdq(family: str = "llama", scheme: str = "w8a8_dynamic", *, fuse: bool = True):
    gm = canonicalize(tiny_graph(family))
    if fuse:
        FuseLinears().run(gm)
    calib = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))]
    InsertQDQ(scheme=scheme, group_size=32).run(gm, PassContext(calibration=calib))
    return gm


def _ids(shape=(1, 8)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(3))


def _fx_ops(gm) -> dict[str, int]:
    return {k: v for k, v in ir.op_counts(gm).items() if k.startswith("fxcompress.")}


@pytest.mark.slow  # ~8 s: the interpreter runs every kernel program in Python
@needs_interpreter
def test_w8a8_dynamic_llama_on_the_kernels_matches_the_qdq_graph():
    gm = _qdq("llama", "w8a8_dynamic")
    ids = _ids()
    with torch.no_grad():
        ref = gm(ids)
        on_kernels = lower(gm, use_kernels=True)(ids)
        on_refs = lower(gm)(ids)
    assert (on_kernels - ref).abs().max().item() <= ATOL_LOWERED
    assert (on_kernels - on_refs).abs().max().item() <= ATOL_KERNEL_VS_REF


@needs_interpreter
def test_w4a16_llama_on_the_kernels_matches_the_qdq_graph():
    gm = _qdq("llama", "w4a16")
    ids = _ids()
    with torch.no_grad():
        ref = gm(ids)
        on_kernels = lower(gm, use_kernels=True)(ids)
    # weight-only: the kernel dequantizes the same int4 codes in fp32; float order only
    assert (on_kernels - ref).abs().max().item() <= ATOL_LOWERED


def test_w8a8_dynamic_patterns_are_replaced_by_the_custom_ops():
    gm = _qdq("llama", "w8a8_dynamic", fuse=False)
    low, stats = lower_for_triton(gm)
    # per block: input norm -> q/k/v and post-attention norm -> gate/up fuse with their
    # quantizer; o_proj and down_proj inputs get a per-token quantizer; 7 int8 linears
    assert _fx_ops(low) == {
        "fxcompress.rmsnorm_quant": 4,
        "fxcompress.per_token_quant": 4,
        "fxcompress.w8a8_linear": 14,
    }
    counts = ir.op_counts(low)
    assert not any(k.startswith("quantized_decomposed.") for k in counts)
    assert counts["rms_norm"] == 1  # the final norm feeds the float LM head
    assert counts["linear"] == 1
    assert stats.fused_norm_quant == 4 and stats.w8a8_linears == 14 and stats.left_as_is == 0
    assert low.meta["fxcompress_triton_lowering"]["w8a8_linears"] == 14


def test_fused_linears_need_one_quantizer_and_one_gemm_each():
    gm = _qdq("llama", "w8a8_dynamic", fuse=True)
    low = lower(gm)
    assert _fx_ops(low) == {
        "fxcompress.rmsnorm_quant": 4,
        "fxcompress.per_token_quant": 4,
        "fxcompress.w8a8_linear": 8,
    }


def test_w4a16_patterns_are_replaced_and_logits_match_on_the_reference():
    gm = _qdq("llama", "w4a16", fuse=False)
    low, stats = lower_for_triton(gm)
    assert _fx_ops(low) == {"fxcompress.w4a16_linear": 14}
    assert stats.w4a16_linears == 14
    ids = _ids((2, 12))
    with torch.no_grad():
        assert (low(ids) - gm(ids)).abs().max().item() <= ATOL_LOWERED


def test_static_w8a8_lowers_with_per_tensor_quantizers():
    gm = _qdq("llama", "w8a8", fuse=False)
    low, stats = lower_for_triton(gm)
    assert stats.static_quantizers == 8 and stats.w8a8_linears == 14
    assert stats.fused_norm_quant == 0  # static scales: no fused per-token norm kernel
    ids = _ids((2, 12))
    with torch.no_grad():
        assert (low(ids) - gm(ids)).abs().max().item() <= ATOL_LOWERED


def test_opt_with_biases_and_layer_norm_matches_on_the_reference():
    gm = _qdq("opt", "w8a8_dynamic")
    low, stats = lower_for_triton(gm)
    # LayerNorm is not an RMSNorm: its outputs get a plain per-token quantizer
    assert stats.fused_norm_quant == 0 and stats.per_token_quantizers == 8
    assert stats.w8a8_linears == 8
    ids = _ids((2, 12))
    with torch.no_grad():
        assert (low(ids) - gm(ids)).abs().max().item() <= ATOL_LOWERED


def test_fuse_norms_false_keeps_norm_and_quantizer_apart():
    gm = _qdq("llama", "w8a8_dynamic")
    low = lower(gm, fuse_norms=False)
    assert "fxcompress.rmsnorm_quant" not in _fx_ops(low)
    assert _fx_ops(low)["fxcompress.per_token_quant"] == 8
    assert ir.op_counts(low)["rms_norm"] == 5


def test_lowering_leaves_the_input_graph_untouched():
    gm = _qdq("llama", "w8a8_dynamic")
    code = gm.code
    lower(gm)
    assert gm.code == code


def test_lower_accepts_a_compiled_model():
    from compiler.api import compile as fx_compile

    compiled = fx_compile(tiny_model("llama"),
                          [FuseLinears(), InsertQDQ(scheme="w8a8_dynamic")], verify=False)
    low = lower(compiled)
    ids = _ids((1, 6))
    with torch.no_grad():
        assert (low(ids) - compiled(ids)).abs().max().item() <= ATOL_LOWERED


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    gm = _qdq("llama", "w8a8_dynamic")
    with pytest.raises(TritonLaunchError, match="CUDA is not available"):
        lower(gm, device="cuda")


def test_kernels_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TritonLaunchError, match="TRITON_INTERPRET=1"):
        check_device("cpu", use_kernels=True)
    with pytest.raises(TritonLaunchError, match="unsupported device"):
        check_device("meta", use_kernels=False)


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w4a16"])
def test_moving_the_lowered_graph_retargets_baked_device_constants(scheme):
    # The CUDA path moves parameters and the devices torch.export baked into arange/to calls;
    # checked here with the meta device (every op, custom ones included, has a meta kernel).
    from backends.triton.lowering import _move_to

    low = lower(_qdq("llama", scheme))
    _move_to(low, torch.device("meta"))
    low.recompile()
    out = low(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (1, 8, 256)
    devices = {a.type for n in low.graph.nodes for a in (*n.args, *n.kwargs.values())
               if isinstance(a, torch.device)}
    assert devices == {"meta"}


def test_compiled_model_lower_triton_runs_and_rejects_unknown_backends(calib_batches, probe_ids):
    import compiler

    cm = compiler.compile(tiny_model("llama"), ["insert_qdq(scheme=w8a8_dynamic)"])
    lowered = cm.lower("triton")
    with torch.no_grad():
        assert float((lowered(probe_ids) - cm(probe_ids)).abs().max()) <= ATOL_LOWERED
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        cm.lower("tvm")


@pytest.mark.parametrize("family, scheme, bug", [
    ("llama", "w8a8_dynamic", "weight"), ("llama", "w8a8_dynamic", "activation"),
    ("opt", "w8a8_dynamic", "activation"), ("llama", "w8a8", "weight"),
    ("llama", "w4a16", "weight")])
def test_lowering_checks_fail_on_a_scale_off_by_one_percent(family, scheme, bug, monkeypatch):
    """The tolerance above sees a 1% error in a weight scale (the GEMM's output) or in the
    per-token activation scales (the norm-quant and quant ops)."""
    from backends.triton import lowering

    def off(name, pick):
        fn = getattr(lowering, name)
        monkeypatch.setattr(lowering, name, lambda *a, **k: pick(fn(*a, **k)))

    if bug == "weight":
        off("w4a16_gemm_ref" if scheme == "w4a16" else "w8a8_gemm_ref", lambda y: y * 1.01)
    else:
        for name in ("per_token_quant_ref", "rmsnorm_quant_ref"):
            off(name, lambda qs: (qs[0], qs[1] * 1.01))
    gm = _qdq(family, scheme, fuse=family == "llama")
    ids = _ids((2, 12))
    with torch.no_grad():
        err = (lower(gm)(ids) - gm(ids)).abs().max().item()
    assert err > 1000 * ATOL_LOWERED, err
