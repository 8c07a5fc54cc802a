"""ActivationStats: per-channel statistics at sites, checked against forward hooks on the HF model."""

from __future__ import annotations

import pytest
import torch

from compiler import stats as stats_mod
from compiler.errors import DataError, PreconditionError
from compiler.frontend import load_model, trace
from compiler.pass_base import PassContext
from compiler.stats import (
    ActivationStats,
    ChannelStats,
    StatsTable,
    UnknownSiteError,
    collect_stats,
    linear_input_sites,
    site_map,
)
from passes.canonicalize import canonicalize
from tests.conftest import needs_stories, stories_graph, tiny_graph

_F64: dict[str, tuple[torch.nn.Module, torch.fx.GraphModule]] = {}


def f64_model_and_graph(family: str) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """Tiny model in float64 and its graph, so graph and eager model agree to float64 rounding."""
    if family not in _F64:
        model = load_model(f"tiny-{family}", seed=0, dtype=torch.float64)
        _F64[family] = (model, trace(model))
    return _F64[family]


def hook_reference(model, batches, paths, *, output=False) -> dict[str, torch.Tensor]:
    """Every row ``[tokens, C]`` (float64) that each module in ``paths`` read (or wrote)."""
    rows: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for p in paths:
        def hook(mod, args, out, p=p):
            x = out if output else args[0]
            rows[p].append(x.detach().reshape(-1, x.shape[-1]).double())
        handles.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(r) for p, r in rows.items()}


def assert_matches(st: ChannelStats, x: torch.Tensor, *, xtx: bool) -> None:
    exact = {"atol": 1e-10, "rtol": 0}
    torch.testing.assert_close(st.absmax, x.abs().amax(0), **exact)
    torch.testing.assert_close(st.min, x.amin(0), **exact)
    torch.testing.assert_close(st.max, x.amax(0), **exact)
    assert st.count == x.shape[0]
    if xtx:
        torch.testing.assert_close(st.xtx, x.T @ x, **exact)
    else:
        assert st.xtx is None


def path_of(site: str) -> str:
    return site.rsplit(":", 1)[0]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_linear_input_stats_equal_forward_hook_reference(family, calib_batches):
    model, gm = f64_model_and_graph(family)
    sites = linear_input_sites(gm)
    cov = {sites[0], sites[-1]}
    table = collect_stats(gm, calib_batches, covariance=cov)
    ref = hook_reference(model, calib_batches, [path_of(s) for s in sites])
    assert table.sites() == sites
    cov_tensors = {table.tensor_of(c) for c in cov}  # sites sharing a tensor share X^T X
    for s in sites:
        assert_matches(table[s], ref[path_of(s)], xtx=table.tensor_of(s) in cov_tensors)


def test_gpt2_stats_are_the_same_before_and_after_canonicalization(calib_batches):
    model, gm = f64_model_and_graph("gpt2")
    import copy

    canon = canonicalize(copy.deepcopy(gm))
    assert linear_input_sites(canon) == linear_input_sites(gm)
    site = "transformer.h.0.mlp.c_proj:in"
    raw = collect_stats(gm, calib_batches, covariance={site})
    can = collect_stats(canon, calib_batches, covariance={site})
    ref = hook_reference(model, calib_batches, [path_of(site)])
    for s in linear_input_sites(gm):
        torch.testing.assert_close(can[s].absmax, raw[s].absmax, atol=1e-10, rtol=0)
    assert_matches(can[site], ref[path_of(site)], xtx=True)


def test_norm_output_site_equals_hook_on_the_norm_module(calib_batches):
    model, gm = f64_model_and_graph("opt")
    site = "model.decoder.layers.1.final_layer_norm:out"
    table = collect_stats(gm, calib_batches, sites=[site], covariance=[site])
    ref = hook_reference(model, calib_batches, [path_of(site)], output=True)
    assert_matches(table[site], ref[path_of(site)], xtx=True)


def test_rms_norm_output_is_a_site_after_canonicalization(calib_batches):
    gm = canonicalize(tiny_graph("llama"))
    site = "model.layers.0.input_layernorm:out"
    table = collect_stats(gm, calib_batches, sites=[site])
    # the norm output is exactly what q_proj reads
    q = collect_stats(gm, calib_batches, sites=["model.layers.0.self_attn.q_proj:in"])
    assert torch.equal(table[site].absmax, q["model.layers.0.self_attn.q_proj:in"].absmax)


def test_q_k_v_inputs_share_one_tensor_and_one_stats_object(calib_batches):
    gm = tiny_graph("llama")
    qkv = [f"model.layers.0.self_attn.{p}_proj:in" for p in "qkv"]
    table = collect_stats(gm, calib_batches, covariance={qkv[1]})
    assert table.sharing(qkv[0]) == qkv
    assert len({table.tensor_of(s) for s in qkv}) == 1
    assert table[qkv[0]] is table[qkv[2]]
    # covariance asked on k is available through q as well: it is the same tensor
    assert table[qkv[0]].xtx is not None
    groups = table.groups()
    assert groups[table.tensor_of(qkv[0])] == qkv
    assert len(groups) < len(table)


def test_stats_have_channel_shapes_and_float64(calib_batches):
    gm = tiny_graph("llama")
    down = "model.layers.0.mlp.down_proj:in"
    sdpa = "model.layers.0.self_attn:out"
    table = collect_stats(gm, calib_batches, sites=[down, sdpa], covariance=[down])
    st = table[down]
    assert st.absmax.shape == st.min.shape == st.max.shape == (128,)  # ffn in_features
    assert st.xtx.shape == (128, 128)
    assert {t.dtype for t in (st.absmax, st.min, st.max, st.xtx)} == {torch.float64}
    assert st.count == sum(b.numel() for b in calib_batches)
    torch.testing.assert_close(st.covariance(), st.xtx / st.count)
    assert torch.all(st.min <= st.max) and torch.all(st.absmax >= st.max.abs())
    # SDPA output [batch, heads, seq, head_dim]: channels = head_dim, tokens = batch*heads*seq
    assert table[sdpa].channels == 16
    assert table[sdpa].count == 4 * st.count
    assert table[sdpa].xtx is None


def test_default_sites_are_every_linear_input(calib_batches):
    gm = tiny_graph("opt")
    table = collect_stats(gm, calib_batches)
    n_linear = sum(1 for n in gm.graph.nodes if n.op == "call_function"
                   and n.target is torch.ops.aten.linear.default)
    assert len(table) == n_linear
    assert all(s.endswith(":in") for s in table.sites())
    assert isinstance(table, StatsTable)


def test_covariance_site_outside_sites_is_still_collected(calib_batches):
    gm = tiny_graph("llama")
    a, b = "model.layers.0.mlp.up_proj:in", "lm_head:in"
    table = collect_stats(gm, calib_batches, sites=[a], covariance=[b])
    assert set(table.sites()) == {a, b}
    assert table[b].xtx is not None and table[a].xtx is None
    with pytest.raises(ValueError, match="up_proj"):
        table.covariance(a)


def test_graph_is_left_exactly_as_before(calib_batches, probe_ids):
    gm = tiny_graph("llama")
    code, n_nodes = gm.code, len(gm.graph.nodes)
    params = {k: v for k, v in gm.state_dict().items()}
    before = gm(probe_ids)
    collect_stats(gm, calib_batches, sites=list(site_map(gm)), covariance=linear_input_sites(gm))
    assert gm.code == code
    assert len(gm.graph.nodes) == n_nodes
    assert not any("observer" in n.name for n in gm.graph.nodes)
    assert not any("observer" in name for name, _ in gm.named_modules())
    assert all(v is params[k] or torch.equal(v, params[k]) for k, v in gm.state_dict().items())
    assert torch.equal(gm(probe_ids), before)


def test_unknown_site_is_an_error_naming_it_and_near_matches(calib_batches):
    gm = tiny_graph("llama")
    with pytest.raises(UnknownSiteError, match=r"q_prj:in.*q_proj:in") as e:
        collect_stats(gm, calib_batches, sites=["model.layers.0.self_attn.q_prj:in"])
    assert isinstance(e.value, KeyError)
    table = collect_stats(gm, calib_batches, sites=["model.layers.0.self_attn.q_proj:in"])
    with pytest.raises(KeyError, match=r"'model.layers.0.self_attn.k_proj:in'.*q_proj:in"):
        table["model.layers.0.self_attn.k_proj:in"]
    assert "model.layers.0.self_attn.k_proj:in" not in table


def test_sites_given_as_a_bare_string_are_rejected(calib_batches):
    with pytest.raises(TypeError, match="collection of site names"):
        collect_stats(tiny_graph("llama"), calib_batches, sites="lm_head:in")


def test_bad_calibration_batches_are_data_errors():
    gm = tiny_graph("llama")
    with pytest.raises(DataError, match="at least one"):
        collect_stats(gm, [])
    with pytest.raises(DataError, match=r"batch 0 .*\[batch, seq\]"):
        collect_stats(gm, [torch.randn(2, 8)])


def test_analysis_without_calibration_raises_precondition_error():
    with pytest.raises(PreconditionError, match="calibration"):
        PassContext().analysis(ActivationStats, tiny_graph("llama"), sites=None)


def test_analysis_is_computed_once_and_cached_by_key(calib_batches):
    gm = tiny_graph("llama")
    ctx = PassContext(calibration=calib_batches)
    cov = frozenset({"lm_head:in"})
    t1 = ctx.analysis(ActivationStats, gm, sites=None, covariance=cov)
    t2 = ctx.analysis(ActivationStats, gm, sites=None, covariance=cov)
    assert t1 is t2 and ctx.analyses.hits == 1
    assert t1["lm_head:in"].xtx is not None
    assert ActivationStats.name == "activation_stats"


def test_disk_cache_reuses_stats_without_running_the_model(calib_batches, tmp_path, monkeypatch):
    gm = tiny_graph("llama")
    runs = []
    real = stats_mod._run_batches

    def counting(module, batches, progress):
        runs.append(len(batches))
        real(module, batches, progress)

    monkeypatch.setattr(stats_mod, "_run_batches", counting)
    cov = ["model.layers.1.mlp.down_proj:in"]
    first = collect_stats(gm, calib_batches, covariance=cov, cache_dir=tmp_path)
    second = collect_stats(gm, calib_batches, covariance=cov, cache_dir=tmp_path)
    assert runs == [len(calib_batches)]
    assert not first.from_cache and second.from_cache
    assert second.site_to_tensor == first.site_to_tensor
    for s in first.sites():
        a, b = first[s], second[s]
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.min, b.min)
        assert torch.equal(a.max, b.max) and a.count == b.count
        assert (a.xtx is None) == (b.xtx is None)
    assert torch.equal(first[cov[0]].xtx, second[cov[0]].xtx)
    assert second.sharing("model.layers.0.self_attn.q_proj:in") == first.sharing(
        "model.layers.0.self_attn.q_proj:in"
    )


def test_disk_cache_misses_when_batches_sites_or_weights_change(calib_batches, tmp_path,
                                                                monkeypatch):
    gm = tiny_graph("llama")
    runs = []
    real = stats_mod._run_batches
    monkeypatch.setattr(stats_mod, "_run_batches",
                        lambda m, b, p: (runs.append(1), real(m, b, p)))
    collect_stats(gm, calib_batches, cache_dir=tmp_path)
    collect_stats(gm, calib_batches[:2], cache_dir=tmp_path)  # other batches
    collect_stats(gm, calib_batches, sites=["lm_head:in"], cache_dir=tmp_path)  # other sites
    with torch.no_grad():
        gm.get_submodule("model.model.layers.0.mlp.up_proj").weight.mul_(2.0)
    collect_stats(gm, calib_batches, cache_dir=tmp_path)  # other weights
    assert len(runs) == 4


def test_corrupt_cache_file_is_recomputed(calib_batches, tmp_path):
    gm = tiny_graph("opt")
    collect_stats(gm, calib_batches, cache_dir=tmp_path)
    (path,) = tmp_path.glob("stats-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    table = collect_stats(gm, calib_batches, cache_dir=tmp_path)
    assert not table.from_cache and len(table) > 0


@needs_stories
def test_stories260k_linear_inputs_have_hidden_and_ffn_channels():
    gm = canonicalize(stories_graph())
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 512, (2, 64), generator=g) for _ in range(2)]
    table = collect_stats(gm, batches, covariance={"model.layers.4.mlp.down_proj:in"})
    assert len(table) == 5 * 7 + 1
    assert table["model.layers.0.self_attn.q_proj:in"].channels == 64
    assert table["model.layers.4.mlp.down_proj:in"].xtx.shape == (172, 172)
    assert all(torch.isfinite(table[s].absmax).all() for s in table)


def test_analysis_uses_the_cache_dir_from_the_context(calib_batches, tmp_path):
    gm = tiny_graph("opt")
    ctx = PassContext(calibration=calib_batches, extra={"stats_cache_dir": tmp_path})
    ctx.analysis(ActivationStats, gm, sites=None)
    assert len(list(tmp_path.glob("stats-*.safetensors"))) == 1
    again = PassContext(calibration=calib_batches, extra={"stats_cache_dir": tmp_path})
    assert again.analysis(ActivationStats, gm, sites=None).from_cache


def test_progress_bar_does_not_change_the_statistics(calib_batches):
    gm = tiny_graph("opt")
    quiet = collect_stats(gm, calib_batches)
    shown = collect_stats(gm, calib_batches, progress=True)
    assert all(torch.equal(quiet[s].absmax, shown[s].absmax) for s in quiet)


def test_instrumented_copy_runs_only_what_the_observers_read():
    """An unobserved LM head (and anything else after the last observed tensor) is not run."""
    model, gm = f64_model_and_graph("llama")
    sites = site_map(gm)
    first = next(s for s in sites if s.endswith(":in"))
    node = sites[first]
    acc = stats_mod._Accumulator(node.name, covariance=False)
    inst = stats_mod._instrumented_copy(gm, {node: acc})
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    kept = [n for n in inst.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert linears and len(kept) < len(linears)
    assert not any(n.name == linears[-1].name for n in inst.graph.nodes)  # the LM head
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    inst(ids)
    ref = hook_reference(model, [ids], [first.split(":")[0]])
    assert_matches(acc.result(), ref[first.split(":")[0]], xtx=False)
    # the full table still observes the LM head's input and output when asked
    table = collect_stats(gm, [ids], sites=[s for s in sites if s.startswith("lm_head")])
    out = hook_reference(model, [ids], ["lm_head"], output=True)["lm_head"]
    assert_matches(table["lm_head:out"], out, xtx=False)


def test_block_stats_equal_a_whole_graph_sweep_and_apply_factors():
    # BlockStats inside the block engine measures what collect_stats measures (histograms
    # bit for bit without factors); with factors, the statistics of the scaled values
    from compiler.blockwise import BlockVisitor, run_blockwise
    from compiler.stats import BlockStats

    gm = canonicalize(tiny_graph("llama"))
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]
    sites = linear_input_sites(gm)
    site = "model.layers.1.mlp.down_proj:in"
    f = torch.linspace(0.5, 2.0, 128, dtype=torch.float64)
    bs = BlockStats(gm, sites, histogram=True)

    class V(BlockVisitor):
        def __init__(self, bs, f):
            self.bs, self.f = bs, f

        def observed(self, block):
            return self.bs.observed(block)

        def observe(self, block, node, value, batch):
            self.bs.observe(node, value)

        def transform(self, block, runner):
            t = self.bs.measured(block)
            self.bs.finish(block, {t.tensor_of(site): self.f} if site in t else {})

    runner = run_blockwise(gm, calib, V(bs, f), propagate="original")
    assert bs.unreachable(runner.partition.blocks) == []
    table = bs.table()
    fresh = collect_stats(gm, calib, histogram=sites)
    assert table.sites() == fresh.sites() == sites
    for s in sites:
        a, b = table[s], fresh[s]
        if table.tensor_of(s) == table.tensor_of(site):
            torch.testing.assert_close(a.absmax, b.absmax * f, rtol=1e-6, atol=0)
            assert a.hist.sum() == b.hist.sum() and not torch.equal(a.hist, b.hist)
        else:
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.hist, b.hist), s
            # squares in float32 (collect_stats squares in float64), sums in float64:
            # measured 3.2e-8 relative
            torch.testing.assert_close(a.sqsum, b.sqsum, rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="positive"):
        run_blockwise(gm, calib, V(BlockStats(gm, sites), -torch.ones(128)), propagate="original")
