"""ir.block_index: the decoder block of a node comes from the residual stream's structure, not
from module names; skip_layers and the per-block report follow it on a family that names its
blocks unusually."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import compiler
from compiler import inspection, ir
from compiler.frontend import trace
from compiler.pass_base import PassContext
from passes.canonicalize import canonicalize
from passes.structured_prune import StructuredPrune
from tests.conftest import FAMILIES, tiny_graph

D, HEADS, FF, VOCAB = 32, 4, 64, 96


class _Block(nn.Module):
    """Pre-norm attention + SwiGLU-free MLP; ``parallel``: one residual add for both branches."""

    def __init__(self, parallel: bool):
        super().__init__()
        self.parallel = parallel
        self.pre = nn.RMSNorm(D)
        self.mid = nn.RMSNorm(D)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.fc_in = nn.Linear(D, FF)
        self.fc_out = nn.Linear(FF, D)

    def attend(self, h):
        b, t, _ = h.shape
        q, k, v = (w(h).view(b, t, HEADS, D // HEADS).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(a.transpose(1, 2).reshape(b, t, D))

    def forward(self, x):
        if self.parallel:
            h = self.pre(x)
            return x + self.attend(h) + self.fc_out(F.gelu(self.fc_in(h)))
        x = x + self.attend(self.pre(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.mid(x))))


class UnusualNames(nn.Module):
    """A causal LM whose blocks are ``stack.0..2`` (or ``trunk.alpha/beta``): no name the old
    ``layers``/``h``/``blocks`` lookup knew."""

    def __init__(self, parallel: bool = False, named: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(VOCAB, D)
        if named:
            self.trunk = nn.ModuleDict({k: _Block(parallel) for k in ("alpha", "beta")})
        else:
            self.stack = nn.ModuleList(_Block(parallel) for _ in range(3))
        self.out_norm = nn.RMSNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.tok(input_ids) * 2.0  # a scalar multiply on the stream (Gemma's embedding scale)
        for blk in (self.trunk.values() if hasattr(self, "trunk") else self.stack):
            x = blk(x)
        return self.lm_head(self.out_norm(x))


def _by_site(gm, op) -> dict[str, int | None]:
    return {ir.module_path(n): ir.block_index(n) for n in ir.nodes_of(gm, op)}


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel_attention"])
def test_block_index_from_structure_on_unusual_names(parallel):
    gm = canonicalize(trace(UnusualNames(parallel=parallel), torch.randint(0, VOCAB, (2, 16))))
    linears = _by_site(gm, ir.LINEAR)
    for i in range(3):
        for name in ("wq", "wk", "wv", "wo", "fc_in", "fc_out"):
            assert linears[f"stack.{i}.{name}"] == i, (name, i, linears)
    assert linears["lm_head"] is None
    assert all(b is None for b in _by_site(gm, ir.EMBEDDING).values())
    sdpa = [ir.block_index(n) for n in ir.nodes_of(gm, ir.SDPA)]
    assert sdpa == [0, 1, 2]
    norms = _by_site(gm, ir.RMS_NORM)
    assert norms["out_norm"] is None and norms["stack.2.pre"] == 2
    # a parameter belongs to the block of its readers
    w = next(n for n in ir.iter_get_attrs(gm) if "stack.1.fc_in.weight" in str(n.target))
    assert ir.block_index(w) == 1


def test_block_index_on_named_blocks_without_numbers():
    gm = canonicalize(trace(UnusualNames(named=True), torch.randint(0, VOCAB, (2, 16))))
    linears = _by_site(gm, ir.LINEAR)
    assert linears["trunk.alpha.wq"] == 0 and linears["trunk.beta.fc_out"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_block_index_matches_the_decoder_layers_of_every_tiny_family(family):
    """On HF families, the structure gives the layer number of every op that has one."""
    gm = canonicalize(tiny_graph(family))
    seen = set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        parts = ir.module_path(n).split(".")
        want = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1])
                     if p in ("layers", "h") and parts[i + 1].isdigit()), None)
        if want is None or ir.op_name(n) in ("view", "sym_size"):
            continue  # OPT's last reshape back after the residual add is a stream step
        assert ir.block_index(n) == want, (family, n.name, ir.module_path(n))
        seen.add(want)
    assert seen == {0, 1}


def test_block_index_is_none_without_a_residual_stream():
    class NoResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lm_head = nn.Embedding(VOCAB, D), nn.Linear(D, VOCAB)

        def forward(self, input_ids):
            return self.lm_head(torch.tanh(self.emb(input_ids)))

    gm = trace(NoResidual(), torch.randint(0, VOCAB, (2, 16)))
    assert all(b is None for b in ir.block_indices(gm).values())


def test_skip_layers_and_block_report_work_on_unusual_block_names():
    model = UnusualNames()
    gm = canonicalize(trace(model, torch.randint(0, VOCAB, (2, 16))))
    res = StructuredPrune(ratio=0.5, importance="l1", skip_layers=[1]).run(gm, PassContext())
    assert any("block 1 is in skip_layers" in n for n in res.notes)
    shapes = {str(n.target): tuple(ir.get_param(gm, n).shape) for n in ir.iter_get_attrs(gm)}
    fc_in = {i: next(s for t, s in shapes.items() if f"stack.{i}.fc_in.weight" in t)
             for i in range(3)}
    assert fc_in[1] == (FF, D)            # skipped block: untouched
    assert fc_in[0][0] < FF and fc_in[2][0] < FF

    cm = compiler.compile(copy.deepcopy(model), ["structured_prune(ratio=0.5, importance=l1, "
                                                 "skip_layers=[1])"],
                          example_inputs=torch.randint(0, VOCAB, (2, 16)), report_data=False)
    rows = inspection.block_params(cm.graph_module)
    assert list(rows) == ["0", "1", "2", "other"]
    assert any(k.endswith("fc_in.weight") for k in rows["1"]["shapes"])
    table = cm.report.blocks_table()
    assert "block 0" in table and "block 2" in table and "block 1" not in table, table
