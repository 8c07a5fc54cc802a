"""ONNX Runtime backend: export, atomic writes, Q/DQ lowering, ORT session wrapper, parity."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

import backends.onnxruntime as ortb
from backends.onnxruntime import ORTModel, check_parity, export_onnx, file_size
from compiler.errors import ArtifactError, ExportError, FxCompressError, VerificationError
from tests.conftest import (
    CORE_FAMILIES,
    FAMILIES,
    needs_stories,
    stories_graph,
    stories_model,
    tiny_compiled,
    tiny_model,
)

# Probe shapes: batch 1 and 3, two sequence lengths, none equal to the export example (2, 16).
PROBE_SHAPES = [(1, 5), (3, 17)]
ATOL = 1e-4


def _probes(vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, s, generator=g) for s in PROBE_SHAPES]


class _TinyLM(torch.nn.Module):
    """Embedding + linear head: the cheapest ``input_ids -> logits`` module to export."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)

    def forward(self, input_ids):
        return self.head(torch.relu(self.emb(input_ids)))


_EXPORTS: dict[str, tuple[torch.fx.GraphModule, Path]] = {}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ort_exports")


def _exported(family: str, export_dir: Path) -> tuple[torch.fx.GraphModule, Path]:
    """``compile(model, passes=[])`` of ``family`` and its ``export_onnx`` (once per family per run)."""
    if family not in _EXPORTS or not _EXPORTS[family][1].exists():
        cm = tiny_compiled(family)
        _EXPORTS[family] = (cm.graph_module, export_dir / f"{family}.onnx")
        cm.export_onnx(_EXPORTS[family][1])
    return _EXPORTS[family]


def _op_types(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


# ----------------------------------------------------------------------------- parity per family


# Trace + export costs about 4 s per family on 2 cores (mostly the exporter's decompositions);
# the core families run always, the others are marked slow.
@pytest.mark.parametrize(
    "family",
    [f if f in CORE_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def test_ort_logits_match_graph_and_hf_model(family, export_dir):
    gm, path = _exported(family, export_dir)
    ort_model = ORTModel(path, threads=2)
    probes = _probes()
    vs_graph = check_parity(gm, ort_model, probes, atol=ATOL)
    vs_hf = check_parity(tiny_model(family), ort_model, probes, atol=ATOL)
    assert vs_graph.ok, str(vs_graph)
    assert vs_hf.ok, str(vs_hf)
    assert len(vs_graph.max_abs_diff) == len(PROBE_SHAPES)


@needs_stories
@pytest.mark.slow
def test_stories260k_ort_logits_match_graph_and_hf_model(tmp_path):
    gm = stories_graph()
    path = export_onnx(gm, tmp_path / "stories.onnx")
    ort_model = ORTModel(path, threads=2)
    probes = _probes(vocab=512)
    assert check_parity(gm, ort_model, probes, atol=ATOL).ok
    assert check_parity(stories_model(), ort_model, probes, atol=ATOL).ok


def test_exported_graph_names_input_output_and_dynamic_axes(export_dir):
    _, path = _exported("llama", export_dir)
    sess = ORTModel(path).session
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("input_ids", ["batch", "seq"], "tensor(int64)")
    assert (out.name, out.shape) == ("logits", ["batch", "seq", 256])


# ----------------------------------------------------------------------------- files


def test_small_model_is_one_file_and_file_size_is_its_size(tmp_path):
    path = export_onnx(_TinyLM(), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert file_size(path) == path.stat().st_size


def test_external_data_is_beside_graph_and_counted_in_file_size(tmp_path):
    model = _TinyLM()
    path = export_onnx(model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert file_size(path) == path.stat().st_size + data.stat().st_size
    assert check_parity(model, ORTModel(path), _probes(vocab=32), atol=ATOL).ok


def test_reexport_as_single_file_removes_stale_external_data(tmp_path):
    model = _TinyLM()
    export_onnx(model, tmp_path / "m.onnx", external_data=True)
    path = export_onnx(model, tmp_path / "m.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert check_parity(model, ORTModel(path), _probes(vocab=32), atol=ATOL).ok


def test_file_size_of_missing_model_raises_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="nope.onnx"):
        file_size(tmp_path / "nope.onnx")


# ----------------------------------------------------------------------------- atomic writes


def test_failure_while_saving_leaves_no_file_and_keeps_existing_one(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous model")

    def save_half_then_fail(self, destination, **kwargs):
        Path(destination).write_bytes(b"half")
        Path(f"{destination}.data").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save_half_then_fail)
    with pytest.raises(ExportError, match="disk full"):
        export_onnx(_TinyLM(), target)
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp folder left

    fresh = tmp_path / "fresh.onnx"
    with pytest.raises(ExportError):
        export_onnx(_TinyLM(), fresh)
    assert not fresh.exists()


def test_failure_while_moving_restores_previous_graph_and_data(tmp_path, monkeypatch):
    old = _TinyLM()
    path = export_onnx(old, tmp_path / "m.onnx", external_data=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_move = ortb._move

    def fail_on_graph(src, dst):  # the data file moves first, then the graph fails
        if Path(dst).name == "m.onnx":
            raise OSError("simulated rename failure")
        real_move(src, dst)

    monkeypatch.setattr(ortb, "_move", fail_on_graph)
    new = _TinyLM()
    with torch.no_grad():
        new.head.weight.mul_(2.0)
    with pytest.raises(ExportError, match="restored"):
        export_onnx(new, path, external_data=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert check_parity(old, ORTModel(path), _probes(vocab=32), atol=ATOL).ok


def test_unwritable_output_folder_raises_export_error_naming_path(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder should be")
    target = blocker / "m.onnx"
    with pytest.raises(ExportError, match="not_a_dir") as info:
        export_onnx(_TinyLM(), target)
    assert isinstance(info.value, FxCompressError)
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores modes")
def test_read_only_output_folder_raises_export_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_onnx(_TinyLM(), ro / "m.onnx")
    finally:
        ro.chmod(0o700)


def test_example_input_with_batch_one_is_rejected(tmp_path):
    with pytest.raises(ExportError, match=">= 2"):
        export_onnx(_TinyLM(), tmp_path / "m.onnx", example_inputs=torch.zeros(1, 8).long())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Q/DQ and ORT fusion


class _QDQLinear(torch.nn.Module):
    """x -> Q/DQ per tensor (int8) -> linear with a per-channel int8 weight -> y."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w_int", torch.randint(-127, 128, (32, 16), generator=g,
                                                    dtype=torch.int8))
        self.register_buffer("w_scale", torch.rand(32, generator=g) * 0.01 + 0.001)
        self.register_buffer("w_zp", torch.zeros(32, dtype=torch.int64))
        self.bias = torch.nn.Parameter(torch.randn(32, generator=g))

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        xq = qd.quantize_per_tensor.default(x, 0.05, 0, -128, 127, torch.int8)
        xd = qd.dequantize_per_tensor.default(xq, 0.05, 0, -128, 127, torch.int8)
        wd = qd.dequantize_per_channel.default(self.w_int, self.w_scale, self.w_zp, 0, -127,
                                               127, torch.int8)
        return torch.nn.functional.linear(xd, wd, self.bias)


def _qdq_graph() -> torch.fx.GraphModule:
    import torch.ao.quantization.fx._decomposed  # registers the Q/DQ ops

    x = torch.randn(2, 4, 16)
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}
    return torch.export.export(_QDQLinear(), (x,), dynamic_shapes=(dims,)).module()


@pytest.fixture(scope="module")
def qdq_export(tmp_path_factory) -> tuple[torch.fx.GraphModule, Path]:
    gm = _qdq_graph()
    return gm, export_onnx(gm, tmp_path_factory.mktemp("qdq") / "q.onnx")


def test_pt2e_qdq_ops_export_to_quantize_and_dequantize_linear(qdq_export):
    gm, path = qdq_export
    ops = _op_types(path)
    assert ops["QuantizeLinear"] == 1
    assert ops["DequantizeLinear"] == 2  # activation (per tensor) and weight (per channel)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weight_dq) == 1 and list(inits[weight_dq[0].input[0]].dims) == [32, 16]
    g = torch.Generator().manual_seed(5)
    probes = [torch.randn(1, 3, 16, generator=g), torch.randn(3, 7, 16, generator=g)]
    assert check_parity(gm, ORTModel(path), probes, atol=ATOL).ok


def test_ort_fuses_qdq_linear_into_integer_matmul(qdq_export):
    _, path = qdq_export
    ops = ORTModel(path).optimized_op_types()
    assert ops["MatMulIntegerToFloat"] == 1
    assert ops["DequantizeLinear"] == 0 and ops["MatMul"] == 0


def test_optimized_op_types_reports_ort_fusions_of_float_model(export_dir):
    _, path = _exported("gpt2", export_dir)
    ort_model = ORTModel(path)
    optimized = ort_model.optimized_op_types()
    exported = _op_types(path)
    # ORT's own contrib fusions appear only in its optimised graph, not in the export.
    assert optimized["SkipLayerNormalization"] >= 1 and exported["SkipLayerNormalization"] == 0
    assert optimized["Softmax"] == 2  # one attention per layer
    assert optimized is not ort_model.optimized_op_types()  # callers get their own copy


def test_session_config_reaches_ort_int4_matmul_fusion(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    k, n, block = 64, 32, 32
    rng = np.random.default_rng(0)
    w_int = rng.integers(-8, 8, (k, n)).astype(np.int8)
    scale = (rng.random((k // block, n)) * 0.01 + 0.001).astype(np.float32)
    # Blocked int4 DQ + MatMul (opset 21) is the pattern ORT fuses into MatMulNBits.
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=block),
         helper.make_node("MatMul", ["x", "wd"], ["y"])],
        "int4_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])],
        [helper.make_tensor("w", TensorProto.INT4, [k, n], w_int.flatten().tolist()),
         numpy_helper.from_array(scale, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, tmp_path / "int4.onnx")
    exact = ORTModel(tmp_path / "int4.onnx",
                     session_config={"session.qdq_matmulnbits_accuracy_level": "0"})
    assert exact.optimized_op_types() == Counter({"MatMulNBits": 1})
    x = torch.from_numpy(rng.standard_normal((2, 3, k)).astype(np.float32))
    w = torch.from_numpy(w_int).float() * torch.from_numpy(scale).repeat_interleave(block, 0)
    assert check_parity(lambda t: t @ w, exact, [x], atol=1e-5).ok


def test_custom_translation_table_lowers_an_unknown_op(tmp_path):
    from onnxscript import opset18 as op

    @torch.library.custom_op("fxcompress_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    def double_onnx(x):
        return op.Add(x, x)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.fxcompress_test.double(x) + 1

    x = torch.randn(2, 3, 4)
    with pytest.raises(ExportError, match="translating"):
        export_onnx(M(), tmp_path / "a.onnx", example_inputs=x)
    assert not (tmp_path / "a.onnx").exists()
    path = export_onnx(M(), tmp_path / "b.onnx", example_inputs=x,
                       custom_translation_table={torch.ops.fxcompress_test.double.default:
                                                 double_onnx})
    assert _op_types(path)["Add"] == 2
    assert check_parity(M(), ORTModel(path), [torch.randn(1, 5, 4)], atol=ATOL).ok


# ----------------------------------------------------------------------------- parity reports


def test_check_parity_reports_and_raises_on_mismatch(tmp_path):
    model = _TinyLM()
    ort_model = ORTModel(export_onnx(model, tmp_path / "m.onnx"))
    probes = _probes(vocab=32)

    def off_by_one(ids):
        return model(ids) + 1.0

    report = check_parity(off_by_one, ort_model, probes, atol=ATOL)
    assert not report.ok
    assert report.max_abs_diff == pytest.approx([1.0, 1.0], abs=1e-5)
    with pytest.raises(VerificationError, match=r"\(3, 17\)"):
        check_parity(off_by_one, ort_model, probes, atol=ATOL, raise_on_fail=True)


def test_check_parity_fails_on_shape_mismatch_and_nan(tmp_path):
    model = _TinyLM()
    ort_model = ORTModel(export_onnx(model, tmp_path / "m.onnx"))
    probes = _probes(vocab=32)
    report = check_parity(lambda ids: model(ids)[:, :-1], ort_model, probes)
    assert not report.ok and report.max_abs_diff == [float("inf")] * 2
    report = check_parity(lambda ids: model(ids) * float("nan"), ort_model, probes)
    assert not report.ok and "non-finite" in str(report)


def test_ort_model_on_missing_file_raises_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="missing.onnx"):
        ORTModel(tmp_path / "missing.onnx")


def test_untranslatable_complex_op_names_the_node_and_its_module(tmp_path):
    # DeepSeek-V2's rotary embedding multiplies complex tensors; ONNX has no complex dtype
    class Rotary(torch.nn.Module):
        def forward(self, x):
            z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(z.unsqueeze(1) * z.unsqueeze(1)).flatten(-2).squeeze(1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rot = Rotary()

        def forward(self, x):
            return self.rot(x)

    with pytest.raises(ExportError, match=r"failed at node \w+ \(\w+\.default\) in rot, on a "
                                          r"complex tensor \(ONNX has no complex dtype\)"):
        export_onnx(M(), tmp_path / "c.onnx", example_inputs=torch.randn(2, 3, 4))
