"""The direct ONNX route (no second trace, no whole-graph decomposition) gives the standard
route's ONNX graph, and falls back to it where it does not apply."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from backends import onnx_direct  # noqa: E402
from backends.onnxruntime import export_onnx  # noqa: E402
from backends.ort_quant import export_quantized_onnx  # noqa: E402
from tests.conftest import tiny_compiled  # noqa: E402

ROUTE_LOG = "backends.onnx_direct"


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _io(path: Path) -> list:
    m = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return [(v.name, dims(v)) for v in [*m.graph.input, *m.graph.output]]


def _ort_logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids.numpy()})[0]


def _routes(gm, tmp_path, caplog, export=export_onnx) -> tuple[Path, Path]:
    direct, standard = tmp_path / "direct.onnx", tmp_path / "standard.onnx"
    with caplog.at_level(logging.DEBUG, logger=ROUTE_LOG):
        export(gm, direct)
    assert any("direct route" in r.getMessage() for r in caplog.records), caplog.text
    export(gm, standard, direct=False)
    return direct, standard


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma"])
def test_direct_route_gives_the_standard_graph(family, tmp_path, caplog):
    """Same op types, inputs, outputs and dynamic axes; ORT's logits those of the graph. phi3
    has a ``chunk`` (several outputs) to decompose, gemma an embedding scale, gpt2 LayerNorm
    and a tied head."""
    cm = tiny_compiled(family)
    gm = cm.graph_module
    nodes = len(gm.graph.nodes)
    direct, standard = _routes(gm, tmp_path, caplog)
    assert len(gm.graph.nodes) == nodes  # the compiled graph is not modified
    assert _ops(direct) == _ops(standard)
    assert _io(direct) == _io(standard)
    assert _io(direct)[0] == ("input_ids", ["batch", "seq"])
    ids = torch.randint(0, 200, (3, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gm(ids)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    np.testing.assert_allclose(_ort_logits(direct, ids), ref, atol=1e-4, rtol=1e-4)


def test_direct_route_of_an_integer_graph(tmp_path, caplog):
    """The W8A8 graph lowered to ORT's integer ops (custom translations): same graph both ways."""
    import compiler

    calib = [torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    cm = compiler.compile("tiny-llama", passes=["smoothquant(alpha=0.5)",
                                                "insert_qdq(scheme='w8a8')"],
                          calibration=calib, report_data=False)
    direct, standard = _routes(cm.graph_module, tmp_path, caplog, export_quantized_onnx)
    ops = _ops(direct)
    assert ops == _ops(standard)
    assert ops["MatMulIntegerToFloat"] > 0
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(_ort_logits(direct, ids), _ort_logits(standard, ids),
                               atol=1e-4, rtol=1e-4)


def test_decompose_untranslated_leaves_only_translatable_ops():
    from compiler.pass_manager import propagate_shapes

    gm = tiny_compiled("llama").graph_module
    reference = tiny_compiled("llama").graph_module
    propagate_shapes(gm, torch.zeros(2, 16, dtype=torch.long))
    implemented = onnx_direct._torchlib_ops(None)
    table = onnx_direct._decomposition_table(implemented)
    before = onnx_direct._untranslated(gm.graph, implemented, table)
    assert {str(n.target) for n in before} >= {"aten.rms_norm.default"}
    replaced = onnx_direct.decompose_untranslated(gm, implemented, table)
    assert replaced == len(before)
    assert onnx_direct._untranslated(gm.graph, implemented, table) == []
    propagate_shapes(gm, torch.zeros(2, 16, dtype=torch.long))
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), reference(ids))


def test_a_graph_with_two_inputs_is_not_for_the_direct_route(caplog):
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a * 2, b + 1

    gm = torch.export.export(Two(), (torch.ones(2, 3), torch.ones(2, 3))).module()

    def export(*args, **kwargs):
        raise AssertionError("the direct route must not export this graph")

    with caplog.at_level(logging.DEBUG, logger=ROUTE_LOG):
        program = onnx_direct.onnx_program(gm, opset=None, table=None, input_names=None,
                                           output_names=None, export=export)
    assert program is None
    assert "standard route (2 graph inputs)" in caplog.text


def test_a_failure_of_the_direct_route_falls_back_to_the_standard_one(tmp_path, caplog,
                                                                      monkeypatch):
    def broken(gm):
        raise RuntimeError("simulated")

    monkeypatch.setattr(onnx_direct, "exported_program", broken)
    gm = tiny_compiled("llama").graph_module
    with caplog.at_level(logging.WARNING, logger="backends.onnxruntime"):
        path = export_onnx(gm, tmp_path / "m.onnx")
    assert "direct translation failed (RuntimeError: simulated)" in caplog.text
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        np.testing.assert_allclose(_ort_logits(path, ids), gm(ids).numpy(), atol=1e-4, rtol=1e-4)


def test_a_tensor_under_two_names_is_one_input():
    """Tied weights (one tensor read through two attribute names) are lifted once."""
    from compiler.pass_manager import propagate_shapes

    gm = tiny_compiled("llama").graph_module
    lin = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    w = lin[1].args[1]
    gm.register_parameter("tied_copy_name", getattr(gm, w.target) if "." not in w.target
                          else gm.get_parameter(w.target))
    with gm.graph.inserting_before(lin[1]):
        alias = gm.graph.get_attr("tied_copy_name")
    lin[1].replace_input_with(w, alias)
    gm.recompile()
    propagate_shapes(gm, torch.zeros(2, 16, dtype=torch.long))
    program = onnx_direct.exported_program(gm)
    lifted = [s for s in program.graph_signature.input_specs if s.target is not None]
    assert len(lifted) == len({id(t) for t in program.state_dict.values()})


def test_export_routes_benchmark_on_a_tiny_model():
    """``benchmarks/bench_export_routes.py``: both routes, same ops, the same ORT logits."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_export_routes import main

    rows = main(["--model", "tiny-llama", "--threads", "1"])
    assert [r["recipe"] for r in rows] == ["fp32", "w8a8"]
    for r in rows:
        assert r["same_ops"]
        assert r["ort_direct_vs_standard"] < 1e-4
    assert rows[0]["ort_direct_vs_graph"] < 1e-4


def test_the_torchlib_registry_is_built_once_and_custom_ops_stay_in_their_export(tmp_path):
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    torch_built = ONNXRegistry.__dict__["from_torchlib"]
    onnx_direct._REGISTRIES.clear()
    op = torch.ops.aten.add.Tensor
    with onnx_direct.reusing_torchlib_registry():
        first = ONNXRegistry.from_torchlib(opset_version=18)
        first.register_op(op, lambda a, b: a)  # as a custom translation table does
        second = ONNXRegistry.from_torchlib(opset_version=18)
        assert list(onnx_direct._REGISTRIES) == [18]  # built once
        assert first.get_decomps(op)[0].is_custom and not second.get_decomps(op)[0].is_custom
        assert second.opset_version == 18 and second.functions.keys() == first.functions.keys()
    assert ONNXRegistry.__dict__["from_torchlib"] is torch_built
    # two exports through the reused registry write the same model
    gm = tiny_compiled("llama").graph_module
    paths = [export_onnx(gm, tmp_path / f"{i}.onnx") for i in range(2)]
    a, b = (onnx.load(str(p)) for p in paths)
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
