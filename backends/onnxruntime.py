"""ONNX Runtime backend: export a compiled GraphModule to ONNX and run it with ONNX Runtime.

Lowering path: the fx GraphModule becomes an ``ExportedProgram`` with dynamic batch and
sequence dims and is handed to ``torch.onnx.export(exported_program, dynamo=True)``. For a
compiled ``input_ids -> logits`` graph the program is built from the graph's own shape
metadata, with only the ops ONNX cannot translate decomposed (:mod:`backends.onnx_direct`: the
same ONNX graph; 12.9 -> 7.0 s on the 134M pipeline of ``benchmarks/bench_compile_time.py``); otherwise (several inputs, explicit
dynamic shapes, ``direct=False``) the graph is re-exported with ``torch.export`` and the
exporter decomposes the whole of it. The graph
input is named ``input_ids`` and the output ``logits``; their dynamic axes are named ``batch``
and ``seq``. PT2E Q/DQ ops (``torch.ops.quantized_decomposed.*``) lower through the exporter's
own translations to ONNX ``QuantizeLinear``/``DequantizeLinear``, which ONNX Runtime fuses into
integer kernels (e.g. ``MatMulIntegerToFloat``); ops the exporter does not know are given by
``custom_translation_table`` (the quantization lowering supplies its own).

Writes are atomic: the model (graph plus any external-data file) is saved into a temporary
folder beside the target and moved into place only once complete; on any failure nothing
half-written remains and a file already at the target is untouched. Models whose weights
exceed the protobuf limit are saved with external data (``<name>.data``); small ones as a
single file.

``ORTModel`` is a drop-in callable ``input_ids -> logits`` around an ``InferenceSession``;
``ORTModel.optimized_op_types`` reports the op types of ORT's *optimised* graph, which is how
the project proves that a quantized export really runs integer kernels. ``check_parity``
compares ORT's logits with the graph's (or any callable's).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compiler.errors import ExportError, VerificationError

log = logging.getLogger(__name__)

#: Names of the model's single input and output in the exported graph.
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
#: Names of the dynamic axes (dim 0 and dim 1 of the input and output).
AXIS_NAMES = ("batch", "seq")
#: Example shape used to re-export when none is given; both >= 2 so export cannot specialise
#: a dim to 0/1.
DEFAULT_EXAMPLE_SHAPE = (2, 16)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>")

# Loggers of the exporter that warn about optional extras (torchvision ops, ...) on every call.
_NOISY_LOGGERS = ("torch.onnx", "torch._export", "torch.export", "onnxscript")


# ----------------------------------------------------------------------------- export


def export_onnx(
    gm: fx.GraphModule | torch.nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    opset: int | None = None,
    external_data: bool | None = None,
    custom_translation_table: dict[Callable, Callable] | None = None,
    optimize: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Sequence[Mapping[int, Any]] | None = None,
    axis_names: Mapping[str, Mapping[int, str]] | None = None,
    direct: bool = True,
) -> Path:
    """Export a GraphModule (``input_ids -> logits``) to an ONNX file, atomically.

    Args:
        gm: the graph to export (a traced/compiled GraphModule, or any module taking the same
            inputs). Q/DQ ops from ``torch.ops.quantized_decomposed`` are supported.
        path: target ``.onnx`` file. Missing parent folders are created. An external-data file,
            when used, is written beside it as ``<name>.data``.
        example_inputs: inputs used to re-export with ``torch.export`` (batch and seq >= 2 so
            the dynamic dims are not specialised). Default: zeros shaped ``[2, 16]`` with the
            dtype of the graph's input placeholder (int64 token ids for a traced LM).
        opset: ONNX opset version; default: the exporter's (20 with torch 2.13).
        external_data: True to store weights in ``<name>.data``, False for a single file,
            None (default) to decide by size (external above the exporter's threshold, well
            below the 2 GB protobuf limit).
        custom_translation_table: ``{torch op overload: onnxscript function}`` passed to
            ``torch.onnx.export`` for ops the exporter cannot translate itself.
        optimize: clean the translated ONNX graph (:func:`clean_onnx_graph`: constant folding,
            dead code, shared initializers, common subexpressions). onnxscript's pattern
            rewriter, which ``torch.onnx.export(optimize=True)`` would also run, is left out:
            it took a quarter of the export time on a 134M model and changed nothing that ORT's
            own graph optimiser does not (the same optimised op counts and logits); it is also
            what fuses ``RotaryEmbedding`` at opset 23, which ORT 1.32 rejects for batch > 1.
        input_names, output_names: ONNX names of the graph's inputs and outputs (default:
            ``input_ids`` and ``logits`` for a single-input, single-output graph).
        dynamic_shapes: ``torch.export`` dynamic shapes, one mapping per input (default:
            dims 0 and 1 of every input dynamic).
        axis_names: ``{input or output name: {dim: axis name}}`` for the ONNX graph's
            symbolic dims (default: ``batch`` and ``seq`` for dims 0 and 1 of the inputs).
        direct: translate a shape-propagated graph without tracing it again where that applies
            (:mod:`backends.onnx_direct`: one ``input_ids`` input, default dynamic shapes); the
            same ONNX graph, several seconds sooner on a 134M model. False: always re-export
            with ``torch.export`` and let ``torch.onnx.export`` decompose the whole graph.

    Returns:
        The path of the written ONNX graph file.

    Raises:
        ExportError: the target folder cannot be written, or re-export / ONNX translation /
            saving failed; the message names the path and the cause.
    """
    path = Path(os.fspath(path)).absolute()
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write ONNX model to {path}: output folder {parent} is not "
                          f"writable ({type(e).__name__}: {e.strerror or e})") from e
    try:
        # explicit dynamic shapes come with explicit examples (any dim may be small then)
        examples = (list(example_inputs) if dynamic_shapes is not None and example_inputs
                    is not None else _example_inputs(gm, example_inputs))
        names = (input_names, output_names, dynamic_shapes, axis_names)
        program = _to_onnx_program(gm, examples, opset, custom_translation_table, optimize, path,
                                   names, direct)
        staged = tmp / path.name
        try:
            with _quiet():
                program.save(staged, external_data=external_data)
        except Exception as e:
            raise ExportError(
                f"saving ONNX model for {path} failed: {type(e).__name__}: {_first_line(e)}"
            ) from e
        _commit(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported ONNX model to %s (%d bytes)", path, file_size(path))
    return path


def _to_onnx_program(gm, examples, opset, table, optimize, path, names=(None,) * 4,
                     direct: bool = False) -> Any:
    """Translate ``gm`` to an ``ONNXProgram``: directly where :mod:`backends.onnx_direct`
    applies, else re-exported with dynamic batch/seq dims."""
    # Registers the quantized_decomposed ops so graphs carrying PT2E Q/DQ nodes re-export.
    import torch.ao.quantization.fx._decomposed

    in_names, out_names, dynamic_shapes, axis_names = names
    program = None
    if direct and dynamic_shapes is None and isinstance(gm, fx.GraphModule) and len(examples) == 1:
        program = _direct_program(gm, opset, table, path, in_names, out_names)
    if program is not None:
        if optimize:
            clean_onnx_graph(program.model)
        _name_dynamic_axes(program, axis_names)
        return program
    dyn = torch.export.Dim.DYNAMIC
    if dynamic_shapes is None:
        dynamic_shapes = tuple({d: dyn for d in range(min(x.dim(), 2))} for x in examples)
    else:
        dynamic_shapes = tuple(dynamic_shapes)
    try:
        with _quiet(), torch.no_grad():
            ep = torch.export.export(gm, tuple(examples), dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise ExportError(
            f"re-exporting the graph for {path} with torch.export failed: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    n_out = _num_outputs(ep)
    input_names = list(in_names) if in_names else [INPUT_NAME] if len(examples) == 1 else None
    output_names = list(out_names) if out_names else [OUTPUT_NAME] if n_out == 1 else None
    from backends.onnx_direct import reusing_torchlib_registry

    try:
        with _quiet(), reusing_torchlib_registry():
            program = torch.onnx.export(
                ep,
                tuple(examples),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                custom_translation_table=table,
                optimize=False,  # clean_onnx_graph below: the same without the rewriter
                verbose=False,
                report=False,
            )
    except Exception as e:
        raise ExportError(
            f"translating the graph to ONNX for {path} failed{_failing_node_site(ep, e)}: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    if optimize:
        clean_onnx_graph(program.model)
    _name_dynamic_axes(program, axis_names)
    return program


def _direct_program(gm, opset, table, path, in_names, out_names) -> Any:
    """:func:`backends.onnx_direct.onnx_program`, or None (the standard route follows: the
    direct one does not apply, or failed, which is logged as a warning)."""
    from backends import onnx_direct

    out = next(n for n in gm.graph.nodes if n.op == "output")
    n_out = len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1
    input_names = list(in_names) if in_names else [INPUT_NAME]
    output_names = list(out_names) if out_names else [OUTPUT_NAME] if n_out == 1 else None
    try:
        # grad mode as the compile's shape propagations had it: they are reused
        with _quiet():
            return onnx_direct.onnx_program(gm, opset=opset, table=table, input_names=input_names,
                                            output_names=output_names, export=torch.onnx.export)
    except Exception as e:
        log.warning("ONNX export of %s: the direct translation failed (%s: %s); re-exporting "
                    "with torch.export", path, type(e).__name__, _first_line(e))
        return None


def clean_onnx_graph(model: Any, steps: int = 2) -> None:
    """Constant folding and clean-up of a translated ONNX model (an ``onnx_ir.Model``), in place.

    What ``torch.onnx.export(optimize=True)`` runs (onnxscript's ``optimize_ir``) minus its
    pattern-rewrite rules: inline functions; ``steps`` rounds of constant folding (with node
    shape inference) and dead-node removal; then constants lifted to initializers, duplicate
    initializers shared, common subexpressions merged, output and name fix-ups.
    """
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import optimizer

    common.InlinePass()(model)
    for _ in range(steps):
        folded = optimizer.fold_constants_ir(model, onnx_shape_inference=True).modified
        removed = common.RemoveUnusedNodesPass()(model).modified
        if not (folded or removed):
            break
    ir.passes.Sequential(
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _example_inputs(gm, example_inputs) -> list[torch.Tensor]:
    if example_inputs is not None:
        xs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
        for x in xs:
            if x.dim() >= 2 and min(x.shape[:2]) < 2:
                raise ExportError(
                    f"example input of shape {tuple(x.shape)}: batch and seq must be >= 2 so "
                    "torch.export keeps them dynamic"
                )
        return xs
    placeholders = [n for n in getattr(gm, "graph", fx.Graph()).nodes if n.op == "placeholder"]
    xs = []
    for n in placeholders or [None]:
        val = n.meta.get("val") if n is not None else None
        if not isinstance(val, torch.Tensor):
            xs.append(torch.zeros(DEFAULT_EXAMPLE_SHAPE, dtype=torch.long))
            continue
        shape = [
            DEFAULT_EXAMPLE_SHAPE[i] if i < 2 and not isinstance(s, int) else int(s)
            for i, s in enumerate(val.shape)
        ]
        if val.dtype.is_floating_point:
            xs.append(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(val.dtype))
        else:
            xs.append(torch.zeros(shape, dtype=val.dtype))
    return xs


def _num_outputs(ep) -> int:
    out = next(n for n in ep.graph.nodes if n.op == "output")
    return len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1


def _name_dynamic_axes(program, axis_names: Mapping[str, Mapping[int, str]] | None = None) -> None:
    """Rename the exporter's symbolic dims (``s72``...): by default dims 0/1 of the inputs to
    ``batch``/``seq``; with ``axis_names``, the given dims of the named inputs and outputs."""
    mapping = {}
    graph = program.model.graph
    for value in [*graph.inputs, *graph.outputs]:
        shape = value.shape
        if shape is None:
            continue
        if axis_names is None:
            if value not in graph.inputs:
                continue
            wanted = dict(enumerate(AXIS_NAMES[: len(shape)]))
        else:
            wanted = dict(axis_names.get(value.name, {}))
        for i, name in wanted.items():
            dim = shape[i] if i < len(shape) else None
            if dim is not None and not isinstance(dim, int) \
                    and getattr(dim, "value", None) is not None:
                mapping.setdefault(dim.value, name)
    if mapping:
        program.rename_axes(mapping)


def _commit(tmp: Path, path: Path) -> None:
    """Move every staged file from ``tmp`` beside ``path``; graph last; roll back on failure.

    Existing files that will be replaced are hard-linked (or copied) into ``tmp/old`` first, so
    a failure half-way restores them; old external-data files the new model no longer uses are
    deleted only after every new file is in place.
    """
    parent = path.parent
    staged = sorted(p.name for p in tmp.iterdir() if p.is_file())
    staged.sort(key=lambda n: n == path.name)  # graph file last: readers never see it early
    old = set(_external_files(path)) | ({path.name} if path.exists() else set())
    backup = tmp / "old"
    backup.mkdir()
    for name in old | set(staged):
        target = parent / name
        if target.exists():
            try:
                os.link(target, backup / name)
            except OSError:
                shutil.copy2(target, backup / name)
    moved: list[str] = []
    try:
        for name in staged:
            _move(tmp / name, parent / name)
            moved.append(name)
    except OSError as e:
        for name in moved:
            with contextlib.suppress(OSError):
                if (backup / name).exists():
                    os.replace(backup / name, parent / name)
                else:
                    os.remove(parent / name)
        raise ExportError(
            f"moving the exported ONNX model into place at {path} failed ({e}); the previous "
            "file, if any, was restored"
        ) from e
    for name in old - set(staged):
        with contextlib.suppress(OSError):
            os.remove(parent / name)


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)  # atomic within one filesystem; the staging folder sits beside dst


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Route the exporter's prints and warnings to this module's debug log."""
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.ERROR)
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stdout(out):
                yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
            for w in caught:
                log.debug("exporter warning: %s: %s", w.category.__name__, w.message)
            if out.getvalue().strip():
                log.debug("exporter output:\n%s", out.getvalue().rstrip())


def _failing_node_site(ep, e: BaseException) -> str:
    """`` at node N (op) in <module>`` for the node the ONNX translator names, plus what ONNX
    cannot hold about it (a complex dtype); empty if the message names no node of ``ep``."""
    import re

    m = re.search(r"translating node %(\w+)", _ANSI.sub("", str(e)))
    node = next((n for n in ep.graph.nodes if m and n.name == m.group(1)), None)
    if node is None:
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    module = module.removeprefix("L['self'].").removeprefix("model.") if module else ""
    op = getattr(node.target, "__name__", str(node.target))
    site = f" at node {node.name} ({op})" + (f" in {module}" if module else "")
    vals = [a.meta.get("val") for a in node.all_input_nodes] + [node.meta.get("val")]
    if any(isinstance(v, torch.Tensor) and v.is_complex() for v in vals):
        site += ", on a complex tensor (ONNX has no complex dtype)"
    return site


def _first_line(e: BaseException) -> str:
    """The informative part of an exception: the exporter's "Exception summary", else line 1."""
    s = _ANSI.sub("", str(e)).strip()
    if "## Exception summary" in s:
        # torch.onnx puts generic advice first and the failing node and root cause in a summary
        summary = s.split("## Exception summary", 1)[1].split("(Refer to the full", 1)[0]
        lines = [ln.strip() for ln in summary.splitlines() if ln.strip() and ln.strip() != "⬆️"]
        lines = [_CLASS.sub(r"\1", ln) for ln in reversed(lines)]
        return " <- ".join(lines)[:2000]
    return s.splitlines()[0] if s else type(e).__name__


# ----------------------------------------------------------------------------- files


def _external_files(path: str | os.PathLike) -> list[str]:
    """Relative locations of the external-data files an ONNX model refers to ([] if none)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as e:  # a foreign or corrupt file refers to no data we own
        log.debug("cannot read %s as ONNX (%s); assuming no external data", path, e)
        return []
    locations: set[str] = set()

    def visit_tensor(t) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    locations.add(entry.value)

    def visit_graph(g) -> None:
        for t in g.initializer:
            visit_tensor(t)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    visit_tensor(a.t)
                for t in a.tensors:
                    visit_tensor(t)
                if a.HasField("g"):
                    visit_graph(a.g)
                for sub in a.graphs:
                    visit_graph(sub)

    visit_graph(model.graph)
    return sorted(locations)


def file_size(path: str | os.PathLike) -> int:
    """Total bytes of an ONNX model on disk: the graph file plus its external-data files.

    Raises:
        ArtifactError: the graph file or one of its external-data files is missing.
    """
    from compiler.errors import ArtifactError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX model {path} does not exist")
    total = path.stat().st_size
    for loc in _external_files(path):
        data = path.parent / loc
        if not data.is_file():
            raise ArtifactError(f"ONNX model {path} refers to missing external data {data}")
        total += data.stat().st_size
    return total


# ----------------------------------------------------------------------------- runtime


class ORTModel:
    """A callable ``input_ids -> logits`` backed by an ONNX Runtime ``InferenceSession``.

    Args:
        path: the ONNX model file (external data is found beside it).
        threads: ``intra_op_num_threads`` (None: ORT's default, all cores).
        providers: execution providers, in order of preference.
        optimized_model_path: if given, ORT also writes its optimised graph there.
        session_config: ``SessionOptions.add_session_config_entry`` pairs, e.g.
            ``{"session.qdq_matmulnbits_accuracy_level": "0"}`` (ORT's fusion of int4
            DequantizeLinear + MatMul into ``MatMulNBits`` defaults to accuracy level 4, int8
            activations, which is not exact).

    Attributes:
        session: the underlying ``onnxruntime.InferenceSession``.
        path: the model file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        optimized_model_path: str | os.PathLike | None = None,
        session_config: Mapping[str, str] | None = None,
    ):
        from compiler.errors import ArtifactError

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"ONNX model {self.path} does not exist")
        self.threads = threads
        self.providers = tuple(providers)
        self.session_config = dict(session_config or {})
        self.session = self._new_session(optimized_model_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._optimized_op_types: Counter | None = None

    def _new_session(self, optimized_model_path=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads is not None:
            so.intra_op_num_threads = int(self.threads)
        # ORT warns on every save of an optimised model that it is hardware specific; we know.
        so.log_severity_level = 3
        for key, value in self.session_config.items():
            so.add_session_config_entry(key, str(value))
        if optimized_model_path is not None:
            so.optimized_model_filepath = str(optimized_model_path)
        try:
            return ort.InferenceSession(str(self.path), so, providers=list(self.providers))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph classes
            from compiler.errors import ArtifactError

            raise ArtifactError(
                f"ONNX Runtime could not load {self.path}: {type(e).__name__}: {_first_line(e)}"
            ) from e

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the model. Tensors are converted to numpy (int64 ids stay int64) and back."""
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"{self.path.name} takes {len(self.input_names)} input(s) "
                f"{self.input_names}, got {len(inputs)}"
            )
        feeds = {name: _to_numpy(x) for name, x in zip(self.input_names, inputs)}
        outs = self.session.run(None, feeds)
        tensors = tuple(torch.from_numpy(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def optimized_op_types(self) -> Counter:
        """Counter of op types in ORT's optimised graph (what ORT actually executes).

        Builds a second session with ``SessionOptions.optimized_model_filepath`` pointing into a
        temporary folder and reads the graph it writes (cached after the first call). Fused
        contrib ops appear under their own names (``MatMulIntegerToFloat``, ``MatMulNBits``,
        ``SkipSimplifiedLayerNormalization``...).
        """
        import onnx

        if self._optimized_op_types is None:
            with tempfile.TemporaryDirectory(prefix="fxcompress-ort-opt-") as d:
                out = Path(d) / "optimized.onnx"
                self._new_session(out)
                model = onnx.load(str(out), load_external_data=False)
                self._optimized_op_types = Counter(n.op_type for n in model.graph.node)
        return Counter(self._optimized_op_types)

    def __repr__(self) -> str:
        return f"ORTModel({str(self.path)!r}, providers={list(self.providers)})"


def _to_numpy(x: Any):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return x


# ----------------------------------------------------------------------------- parity


@dataclass
class ParityReport:
    """Max abs difference of the logits per probe input, and whether all are within ``atol``."""

    max_abs_diff: list[float]
    ok: bool
    atol: float
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        diffs = ", ".join(f"{s}: {d:.3g}" for s, d in zip(self.shapes, self.max_abs_diff))
        status = "ok" if self.ok else "FAIL"
        extra = ("; " + "; ".join(self.problems)) if self.problems else ""
        return f"parity {status} (atol {self.atol:g}): {diffs}{extra}"


def check_parity(
    reference: Callable[..., Any],
    ort_model: ORTModel | Callable[..., Any],
    inputs_list: Sequence[torch.Tensor],
    atol: float = 1e-4,
    *,
    raise_on_fail: bool = False,
) -> ParityReport:
    """Compare ORT's logits with a reference (a GraphModule, an HF model or any callable).

    Args:
        reference: callable ``input_ids -> logits`` (outputs with ``.logits`` or tuples are
            unwrapped to the first tensor).
        ort_model: an ``ORTModel`` (or any callable of the same kind).
        inputs_list: probe inputs, e.g. token-id tensors of several shapes.
        atol: largest allowed max abs difference per input.
        raise_on_fail: raise instead of returning a failing report.

    Returns:
        A ParityReport with one max abs diff per input (inf on a shape mismatch, nan if either
        side produced nan).

    Raises:
        VerificationError: ``raise_on_fail`` and some input differs by more than ``atol``;
            the message lists each input's shape and difference.
    """
    diffs: list[float] = []
    shapes: list[tuple[int, ...]] = []
    problems: list[str] = []
    with torch.no_grad():
        for i, x in enumerate(inputs_list):
            shapes.append(tuple(x.shape))
            ref = _logits(reference(x)).detach().float()
            got = _logits(ort_model(x)).detach().float()
            if ref.shape != got.shape:
                diffs.append(float("inf"))
                problems.append(
                    f"input {i}: shape {tuple(got.shape)} from ORT, {tuple(ref.shape)} expected"
                )
                continue
            d = float((ref - got).abs().max()) if ref.numel() else 0.0
            if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
                d = float("nan")
                problems.append(f"input {i}: non-finite logits")
            diffs.append(d)
    ok = all(d <= atol for d in diffs)  # nan compares False: fails
    report = ParityReport(diffs, ok, atol, shapes, problems)
    if not ok:
        log.warning("%s", report)
        if raise_on_fail:
            name = getattr(ort_model, "path", type(ort_model).__name__)
            raise VerificationError(f"ONNX Runtime output of {name} differs from the graph: "
                                    f"{report}")
    return report


def _logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return _logits(out[0])
    return out
