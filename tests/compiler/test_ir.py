"""IR helpers (compiler/ir.py): parameters added under a module path."""

from __future__ import annotations

import torch
from torch import fx

from compiler import ir


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


def test_add_param_under_a_parameter_goes_beside_it_with_a_unique_name():
    # a module path can run into a tensor (lm_head.bias + ".bias_folded": BertGeneration)
    gm = fx.symbolic_trace(_Lin())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    a = ir.add_param(gm, "lin.bias.folded", torch.ones(2), before=out)
    b = ir.add_param(gm, "lin.bias.folded", torch.zeros(2), before=out)
    c = ir.add_param(gm, "lin.extra", torch.ones(2), before=out)
    assert (a.target, b.target, c.target) == ("lin.bias_folded", "lin.bias_folded_1", "lin.extra")
    assert torch.equal(ir.get_param(gm, "lin.bias_folded_1"), torch.zeros(2))
    assert isinstance(gm.lin.bias, torch.nn.Parameter)  # the original is untouched


def test_copy_sharing_weights_shares_tensors_not_structure():
    from compiler.frontend import load_model, trace

    gm = trace(load_model("tiny-llama", seed=0))
    before = {k: v for k, v in gm.named_parameters()}
    cp = ir.copy_sharing_weights(gm)
    assert cp is not gm and cp.graph is not gm.graph
    for k, v in cp.named_parameters():
        assert v is before[k]  # no weight memory copied
    # replacing or adding a parameter on the copy leaves the original alone
    w = next(n for n in cp.graph.nodes if n.op == "get_attr")
    ir.set_param(cp, w, torch.zeros_like(ir.get_param(cp, w)))
    first = next(n for n in cp.graph.nodes if n.op != "placeholder")
    ir.add_param(cp, "extra_weight", torch.ones(3), before=first)
    assert dict(gm.named_parameters()).keys() == before.keys()
    for k, v in gm.named_parameters():
        assert v is before[k]
    assert not torch.equal(ir.get_param(gm, str(w.target)), ir.get_param(cp, str(w.target)))
