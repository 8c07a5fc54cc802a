"""SmoothQuant's per-site alpha search: its error model against simulated int8 on real values,
the chosen alpha in the report, exactness, bad options."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.smoothquant import (
    DEFAULT_ALPHA_GRID,
    SmoothQuant,
    alpha_search_errors,
    smoothing_scales,
)
from tests.conftest import tiny_graph


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 32, generator=g, dtype=torch.float64)
    x[:, [3, 17, 30]] *= 30.0  # outlier channels, as LLM activations have
    w = torch.randn(48, 32, generator=g, dtype=torch.float64) * 0.05
    return x, w


def _fq(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(t / scale).clamp(-127, 127) * scale


def _simulated_error(x, w, alpha) -> float:
    """Real int8 round trip: per-tensor activations (abs-max), per-row weights; per token."""
    c = x.shape[1]
    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), torch.arange(c), c, alpha)
    xs, ws = x / s, w * s
    xq = _fq(xs, xs.abs().max() / 127)
    wq = _fq(ws, ws.abs().amax(1, keepdim=True) / 127)
    return float((xq @ wq.T - x @ w.T).square().sum()) / x.shape[0]


def test_alpha_search_error_model_matches_simulated_int8():
    x, w = _data()
    grid = DEFAULT_ALPHA_GRID
    pred = alpha_search_errors(x.abs().amax(0), x.square().mean(0), [w], torch.arange(32), 32,
                               grid)
    real = torch.tensor([_simulated_error(x, w, a) for a in grid])
    # the chosen alpha is (near) the best one on the real values (measured: the same alpha)
    assert float(real[int(pred.argmin())]) <= 1.05 * float(real.min())
    # and the model tracks the real error over the whole grid (measured within 1.4%)
    assert torch.allclose(pred, real.double(), rtol=0.03)
    # not a flat curve: alpha matters by orders of magnitude here
    assert float(real.max()) > 10 * float(real.min())


def test_alpha_search_on_a_tiny_llama_is_exact_and_reported():
    gm = canonicalize(tiny_graph("llama"))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 100, (2, 16), generator=g) for _ in range(2)]
    probe = torch.randint(0, 100, (2, 16), generator=g)
    before = gm(probe)
    res = SmoothQuant().run(copy.deepcopy(gm), PassContext(calibration=calib))
    assert res.modified and str(res.stats["alpha"]).startswith("auto ")
    chosen = [n for n in res.notes if ": alpha " in n]
    assert len(chosen) == res.stats["sites_smoothed"]
    torch.testing.assert_close(res.gm(probe), before, rtol=0, atol=1e-4)
    fixed = SmoothQuant(alpha=0.5).run(copy.deepcopy(gm), PassContext(calibration=calib))
    assert fixed.stats["alpha"] == 0.5 and not any(": alpha " in n for n in fixed.notes)


def test_a_second_auto_run_is_a_no_op_even_on_a_copy():
    gm = canonicalize(tiny_graph("llama"))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 100, (2, 16), generator=g) for _ in range(2)]
    first = SmoothQuant().run(gm, PassContext(calibration=calib))
    assert first.modified
    again = SmoothQuant().run(copy.deepcopy(first.gm), PassContext(calibration=calib))
    assert not again.modified
    assert sum("already smoothed" in n for n in again.notes) == first.stats["sites_smoothed"]


def test_a_one_point_grid_is_that_fixed_alpha():
    gm = canonicalize(tiny_graph("llama"))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 100, (2, 16), generator=g) for _ in range(2)]
    a = SmoothQuant(alpha="auto", alpha_grid=[0.5]).run(copy.deepcopy(gm),
                                                        PassContext(calibration=calib))
    b = SmoothQuant(alpha=0.5).run(copy.deepcopy(gm), PassContext(calibration=calib))
    for (k, v), (k2, v2) in zip(a.gm.named_parameters(), b.gm.named_parameters()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("kwargs", [
    {"alpha": "autox"}, {"alpha_grid": []}, {"alpha_grid": [1.5]}, {"alpha_grid": "0.5"},
    {"alpha_grid": [True]},
])
def test_bad_alpha_options_are_rejected(kwargs):
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(**kwargs)
