"""Static activation ranges (max / percentile / mse from a log2 histogram), the sensitivity
report and keep_sensitive of insert_qdq; the histogram statistics behind them."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler.pass_base import PassContext
from compiler.stats import HIST_BINS, _Accumulator, collect_stats, square_sums
from passes.canonicalize import canonicalize
from passes.insert_qdq import (
    SENSITIVITY_NOTES,
    InsertQDQ,
    activation_range,
    quantization_noise,
    relative_noise,
)
from tests.conftest import tiny_graph

qd = torch.ops.quantized_decomposed


def _heavy_tailed(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Laplace bulk plus a few large outliers (an LLM activation's shape), [n // 64, 64]."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.log(torch.rand(n, generator=g)) * torch.sign(torch.rand(n, generator=g) - 0.5)
    idx = torch.randint(0, n, (20,), generator=g)
    x[idx] = 60.0 * torch.sign(torch.randn(20, generator=g))
    return x.reshape(-1, 64)


def _hist_of(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    acc = _Accumulator("t", covariance=False, histogram=True)
    for chunk in x.split(1000):  # several batches: histograms add up
        acc.update(chunk)
    st = acc.result()
    return st.hist, float(st.absmax.max())


def _fq_mse(x: torch.Tensor, clip: float) -> float:
    s = clip / 127
    return float(((torch.round(x / s).clamp(-128, 127) * s - x) ** 2).sum())


def test_histogram_counts_every_element_and_sqsum_is_the_sum_of_squares():
    x = _heavy_tailed()
    acc = _Accumulator("t", covariance=False, histogram=True)
    for chunk in x.split(700):
        acc.update(chunk)
    st = acc.result()
    assert st.hist.shape == (HIST_BINS,) and float(st.hist.sum()) == x.numel()
    # float32 squares summed over runs of 64 rows (square_sums; bound 64 * 2**-24): 6.6e-8
    torch.testing.assert_close(st.sqsum, x.double().square().sum(0), rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("rows", [1, 63, 64, 700, 2048 + 5])
def test_square_sums_is_within_its_bound_of_float64(rows):
    x = _heavy_tailed()[:rows] if rows <= 700 else torch.randn(rows, 48) * 1e3
    got = square_sums(x)
    assert got.dtype == torch.float64 and got.shape == (x.shape[1],)
    # bound 64 * 2**-24 relative; measured <= 1.2e-7 over these cases
    torch.testing.assert_close(got, x.double().square().sum(0), rtol=2.5e-7, atol=0)
    # small integers square and add exactly in float32: no rounding at all
    ints = torch.arange(rows * 3, dtype=torch.float32).remainder(7).view(rows, 3)
    assert torch.equal(square_sums(ints), ints.double().square().sum(0))


def test_percentile_matches_the_exact_quantile_within_one_bin():
    x = _heavy_tailed()
    hist, absmax = _hist_of(x)
    for p in (99.0, 99.9, 99.99):
        exact = float(torch.quantile(x.abs().flatten(), p / 100))
        est = activation_range(hist, absmax, "percentile", percentile=p)
        # the estimate is the upper edge of the bin holding the quantile: 1/64 octave = 1.09%
        assert exact <= est * (1 + 1e-9), (p, exact, est)
        assert est <= exact * 2 ** (1 / 64) * (1 + 1e-9), (p, exact, est)
    assert activation_range(hist, absmax, "percentile", percentile=100) == pytest.approx(absmax)


def test_mse_range_matches_a_brute_force_search_over_the_real_values():
    x = _heavy_tailed()
    hist, absmax = _hist_of(x)
    est = activation_range(hist, absmax, "mse")
    grid = absmax * torch.exp2(-torch.arange(0, 12 * 256 + 1, dtype=torch.float64) / 256)
    errs = torch.tensor([_fq_mse(x, float(c)) for c in grid[::4]])
    best = float(errs.min())
    # the histogram search is within 1% of the brute-force optimum (measured 0.1-0.3%)
    assert _fq_mse(x, est) <= best * 1.01
    assert est <= absmax
    # the noise model tracks the real rounding error (measured within 0.5%)
    assert float(quantization_noise(hist, absmax, est)[0]) == pytest.approx(_fq_mse(x, est),
                                                                            rel=0.015)


def test_max_range_is_the_abs_max_and_needs_no_histogram():
    assert activation_range(None, 3.5, "max") == 3.5
    with pytest.raises(Exception, match="histogram"):
        activation_range(None, 3.5, "mse")


def test_relative_noise_of_a_uniform_tensor_is_the_textbook_value():
    x = (torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1).reshape(-1, 50)
    hist, absmax = _hist_of(x)
    # uniform on [-1, 1]: noise step^2/12 with step 1/127, energy 1/3
    expected = (absmax / 127) ** 2 / 12 / (1 / 3)
    assert relative_noise(hist, absmax, absmax) == pytest.approx(expected, rel=0.015)


def test_collect_stats_histogram_sites_and_cache(tmp_path):
    gm = canonicalize(tiny_graph("llama"))
    calib = [torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    site = "model.layers.0.mlp.down_proj:in"
    t = collect_stats(gm, calib, sites=[site], histogram=[site], cache_dir=tmp_path)
    assert t[site].hist is not None and float(t[site].hist.sum()) == 2 * 2 * 16 * t[site].channels
    again = collect_stats(gm, calib, sites=[site], histogram=[site], cache_dir=tmp_path)
    assert again.from_cache and torch.equal(again[site].hist, t[site].hist)
    assert torch.equal(again[site].sqsum, t[site].sqsum)
    plain = collect_stats(gm, calib, sites=[site], cache_dir=tmp_path)
    assert not plain.from_cache and plain[site].hist is None


# ----------------------------------------------------------------------------- the pass


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 100, (2, 16), generator=g) for _ in range(2)]


def _static_scales(gm) -> list[float]:
    return [n.args[1] for n in gm.graph.nodes if n.target == qd.quantize_per_tensor.default]


def test_act_range_max_is_the_abs_max_and_mse_is_never_wider():
    gm = canonicalize(tiny_graph("llama"))
    r_max = InsertQDQ(scheme="w8a8", act_range="max").run(copy.deepcopy(gm),
                                                          PassContext(calibration=_calib()))
    r_mse = InsertQDQ(scheme="w8a8").run(copy.deepcopy(gm), PassContext(calibration=_calib()))
    smax, smse = _static_scales(r_max.gm), _static_scales(r_mse.gm)
    assert len(smax) == len(smse) > 0
    assert all(b <= a * (1 + 1e-9) for a, b in zip(smax, smse))
    assert r_mse.stats["act_range"] == "mse" and r_max.stats["act_range"] == "max"
    # the report: a ranking with one row per activation tensor (range, noise, rank); the notes
    # name the first few and say where the rest is
    rows = r_mse.tables["sensitivity"]
    assert len(rows) == len(smse) > SENSITIVITY_NOTES
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["noise_db"] for r in rows] == sorted((r["noise_db"] for r in rows), reverse=True)
    assert sorted(r["range"] / 127 for r in rows) == pytest.approx(sorted(smse), rel=1e-12)
    lines = [n for n in r_mse.notes if "sensitivity #" in n]
    assert len(lines) == SENSITIVITY_NOTES and "sensitivity #1" in lines[0]
    assert any(f"{len(rows)} activation tensors ranked" in n for n in r_mse.notes)


def test_act_range_max_scales_equal_the_calibration_abs_max():
    gm = canonicalize(tiny_graph("llama"))
    res = InsertQDQ(scheme="w8a8", act_range="max").run(copy.deepcopy(gm),
                                                        PassContext(calibration=_calib()))
    stats = collect_stats(gm, _calib())
    want = {stats.tensor_of(s): float(stats[s].absmax.max()) / 127 for s in stats
            if not s.startswith("lm_head")}
    got = {n.args[0].name: n.args[1] for n in res.gm.graph.nodes
           if n.target == qd.quantize_per_tensor.default}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12)


@pytest.mark.parametrize("mode", ["dynamic", "float"])
def test_keep_sensitive_switches_the_noisiest_tensors(mode):
    gm = canonicalize(tiny_graph("llama"))
    base = InsertQDQ(scheme="w8a8").run(copy.deepcopy(gm), PassContext(calibration=_calib()))
    res = InsertQDQ(scheme="w8a8", keep_sensitive=2, sensitive_mode=mode).run(
        copy.deepcopy(gm), PassContext(calibration=_calib()))
    ranked = [r["site"] for r in base.tables["sensitivity"]]
    kept = [n for n in res.notes if f"kept {mode}" in n]
    assert [n.split(": ")[0] for n in kept] == ranked[:2]
    assert [r["site"] for r in res.tables["sensitivity"] if r["kept"] == mode] == ranked[:2]
    assert res.stats["kept_sensitive"] == 2
    assert res.stats["act_qdq_static"] == base.stats["act_qdq_static"] - 2
    if mode == "dynamic":
        assert res.stats["act_qdq_dynamic"] == 2
        assert res.stats["param_bytes_after"] == base.stats["param_bytes_after"]
    else:
        assert res.stats["linears_quantized"] < base.stats["linears_quantized"]
        assert res.stats["param_bytes_after"] > base.stats["param_bytes_after"]


@pytest.mark.parametrize("kwargs, match", [
    ({"act_range": "minmax"}, "act_range"),
    ({"percentile": 0}, "percentile"),
    ({"percentile": 100.5}, "percentile"),
    ({"percentile": True}, "percentile"),
    ({"keep_sensitive": -1}, "keep_sensitive"),
    ({"keep_sensitive": 1.5}, "keep_sensitive"),
    ({"keep_sensitive": True}, "keep_sensitive"),
    ({"sensitive_mode": "fp16"}, "sensitive_mode"),
])
def test_bad_range_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InsertQDQ(scheme="w8a8", **kwargs)
