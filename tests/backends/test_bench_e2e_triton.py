"""benchmarks/bench_e2e_triton.py: the CPU --check pass (real kernels through the interpreter),
the no-CUDA message, and the fp16 graph the GPU timing lowers (run here on the references)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark


def _load_bench():
    return load_benchmark("bench_e2e_triton")


@pytest.mark.slow  # ~15 s: two tiny models through the interpreted kernels
def test_check_mode_lowers_onto_the_kernels_and_matches(capsys):
    bench = _load_bench()
    assert bench.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "lowered models match their Q/DQ graphs" in out
    assert out.count(" ok ") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_timing_without_cuda_exits_with_a_clear_message():
    bench = _load_bench()
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main([])


def test_unknown_scheme_is_rejected():
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--schemes", "w3a3"])


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_fp16_quantized_graph_lowers_and_runs_in_fp16(scheme):
    # The GPU timing traces the model in fp16 and lowers it; here the same graph runs on the
    # torch references: fp16 logits, every linear but the LM head replaced.
    from backends.triton.lowering import lower_for_triton

    bench = _load_bench()
    model = bench.llama_model(128, 1, 4, 4, 256, 256, dtype=torch.float16)
    lowered, stats = lower_for_triton(bench.compile_quantized(model, scheme))
    assert stats.w8a8_linears + stats.w4a16_linears == 4  # qkv, o, gate_up, down
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lowered(ids)
        eager = model(input_ids=ids, use_cache=False).logits
    assert out.dtype == torch.float16
    # quantization error budget vs the fp16 model (random init, |logits| < 1)
    assert (out.float() - eager.float()).abs().max().item() < (0.05 if scheme == "w8a8" else 0.3)
