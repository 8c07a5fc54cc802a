"""SimplifyMask: checked causal masks become is_causal (exact), other masks are left with a
note, idempotent, and the ONNX export loses its per-layer IsNaN/Where NaN fix-up."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from compiler import ir
from compiler.frontend import trace
from passes import make_pass, register
from passes.canonicalize import canonicalize
from passes.simplify_mask import SimplifyMask
from tests.conftest import tiny_graph

ATOL = 1e-4


class _Attn(torch.nn.Module):
    """One attention head pair over embeddings, with a mask built from shapes (and ids)."""

    def __init__(self, window: int | None = None, pad: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(32, 8)
        self.window, self.pad = window, pad

    def forward(self, input_ids):
        b, s = input_ids.shape
        x = self.emb(input_ids).view(b, s, 2, 4).transpose(1, 2)
        i = torch.arange(s, device=input_ids.device)
        mask = i[None, :] <= i[:, None]
        if self.window is not None:
            mask = mask & (i[:, None] - i[None, :] < self.window)
        mask = mask[None, None].expand(b, 1, s, s)
        if self.pad:
            mask = mask & (input_ids != 0)[:, None, None, :]
        y = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
        return y.transpose(1, 2).reshape(b, s, 8)


def _sdpa_masks(gm) -> list:
    return [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            for n in ir.nodes_of(gm, ir.SDPA)]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_hf_causal_masks_become_is_causal_exactly(family, probe_ids):
    gm = canonicalize(tiny_graph(family))
    with torch.no_grad():
        ref = gm(probe_ids)
    res = SimplifyMask().run(gm)
    assert res.stats["masks_simplified"] == 2  # one per layer
    assert res.stats["mask_nodes_removed"] > 0
    assert _sdpa_masks(gm) == [None, None]
    assert all(n.kwargs.get("is_causal") is True for n in ir.nodes_of(gm, ir.SDPA))
    with torch.no_grad():
        for ids in (probe_ids, probe_ids[:1, :5]):
            out = gm(ids)
            exp = ref if ids is probe_ids else canonicalize(tiny_graph(family))(ids)
            assert (out - exp).abs().max().item() <= ATOL


def test_llama_mask_construction_ops_are_gone():
    gm = canonicalize(tiny_graph("llama"))
    before = ir.op_counts(gm)
    SimplifyMask().run(gm)
    after = ir.op_counts(gm)
    assert before["cumsum"] == 1 and after["cumsum"] == 0
    assert before["diff"] == 1 and after["diff"] == 0
    assert after["scaled_dot_product_attention"] == 2


def test_second_run_is_a_no_op():
    gm = canonicalize(tiny_graph("llama"))
    SimplifyMask().run(gm)
    res = SimplifyMask().run(gm)
    assert res.modified is False and res.notes == []


def test_plain_causal_mask_of_a_custom_module_is_simplified():
    gm = trace(_Attn())
    ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(0))
    ref = gm(ids)
    res = SimplifyMask().run(gm)
    assert res.stats["masks_simplified"] == 1
    assert (gm(ids) - ref).abs().max().item() <= ATOL


def test_sliding_window_mask_is_kept_with_a_note():
    gm = trace(_Attn(window=4))
    code = gm.code
    res = SimplifyMask().run(gm)
    assert res.modified is False and gm.code == code
    assert len(res.notes) == 1 and "differs from the causal mask" in res.notes[0]


def test_mask_reading_token_values_is_kept_with_a_note():
    gm = trace(_Attn(pad=True))
    res = SimplifyMask().run(gm)
    assert res.modified is False
    assert len(res.notes) == 1 and "depends on input values" in res.notes[0]


def test_registry_name():
    register(SimplifyMask)  # idempotent; passes/__init__.py registers it too once wired
    assert isinstance(make_pass("simplify_mask"), SimplifyMask)


@pytest.mark.slow
def test_onnx_export_loses_the_nan_fixup_and_keeps_parity(tmp_path, probe_ids):
    import onnx

    from backends.onnxruntime import ORTModel, check_parity, export_onnx

    counts = {}
    for name, simplify in (("bool_mask", False), ("causal", True)):
        gm = canonicalize(tiny_graph("llama"))
        if simplify:
            SimplifyMask().run(gm)
        path = export_onnx(gm, tmp_path / f"{name}.onnx")
        counts[name] = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        assert check_parity(gm, ORTModel(path, threads=1), [probe_ids], atol=ATOL).ok
    assert counts["bool_mask"]["IsNaN"] == 2  # one NaN fix-up per layer
    assert counts["causal"]["IsNaN"] == 0
    assert counts["causal"]["Where"] < counts["bool_mask"]["Where"]
