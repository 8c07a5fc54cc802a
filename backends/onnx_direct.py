"""ONNX translation of a compiled graph without tracing it again.

The standard route (:func:`backends.onnxruntime.export_onnx`) hands the GraphModule to
``torch.export`` (a second fake-tensor trace of the whole model) and then to
``torch.onnx.export``, whose first step, ``run_decompositions``, traces it a third time to
decompose the few ops ONNX has no translation for. On the 134M Llama-shaped pipeline of
``benchmarks/bench_compile_time.py`` those two traces were 3.4 s and 5.5 s of a 12.9 s export.
Neither is needed for a graph that already carries what they produce:

- **Shapes.** Every node of a compiled graph holds a fake value with symbolic batch and
  sequence dims (:func:`compiler.pass_manager.propagate_shapes`, incremental: after lowering
  only the new nodes are propagated).
- **The exported program.** Parameters and buffers read by ``get_attr`` become lifted inputs
  (placeholders with a graph signature), the same form ``torch.export`` gives; the weights are
  shared, not copied (:func:`exported_program`).
- **Decompositions.** Only the nodes whose op the ONNX registry does not implement (on a Llama:
  ``rms_norm``, ``diff``, ``__and__``, ``to``) are decomposed, each by ``run_decompositions`` on
  a one-node program built from its fake inputs, with the exporter's own decomposition table:
  the same ops the whole-graph decomposition would give them, at a fraction of the cost
  (one decomposition per distinct op and input signature). The exporter is then told to skip
  its decomposition step, and translates.

The result is the standard route's ONNX graph (the same op types; logits within float
rounding, ``tests/backends/test_onnx_direct.py``). What this route does not take: graphs with
several inputs or an input of another rank than 2 (the KV-cache export), explicit dynamic
shapes, an op left without a translation after its decomposition, a node with several outputs
to decompose, or a torch whose exporter lacks the internals used here
(``torch.onnx._internal.exporter``, torch 2.9+). :func:`onnx_program` returns None for those and
the caller takes the standard route.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

from compiler.pass_manager import propagate_shapes, propagation_of, value_key

log = logging.getLogger(__name__)

#: probe shape used to propagate a graph that was never propagated (batch and seq >= 2)
PROBE_SHAPE = (2, 16)
#: assertion ops the exporter removes after its decomposition step (they need no translation)
_ASSERTIONS = ("_assert_async", "_assert_scalar", "_assert_tensor_metadata",
               "sym_constrain_range_for_size")


class Unsupported(Exception):
    """This graph (or this torch) is not for the direct route; the message says why."""


def _internals():
    try:
        from torch.onnx._internal.exporter import _core, _decomp, _fx_passes, _registration
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise Unsupported(f"torch.onnx exporter internals not found ({e})") from e
    for mod, name in ((_core, "_prepare_exported_program_for_export"),
                      (_decomp, "get_onnx_implemented_overloads"),
                      (_decomp, "create_onnx_friendly_decomposition_table"),
                      (_fx_passes, "insert_type_promotion_nodes"),
                      (_fx_passes, "remove_assertion_nodes")):
        if not hasattr(mod, name):  # pragma: no cover - depends on the installed torch
            raise Unsupported(f"torch.onnx exporter has no {mod.__name__}.{name}")
    return _core, _decomp, _fx_passes, _registration


@functools.lru_cache(maxsize=4)
def _torchlib_ops(opset: int | None) -> frozenset:
    """The torch ops the exporter's own registry translates at ``opset`` (built once: about
    0.4 s)."""
    from torch.onnx._internal.exporter import _constants

    _, _decomp, _, _registration = _internals()
    version = max(opset or _constants.TORCHLIB_OPSET, _constants.TORCHLIB_OPSET)
    registry = _registration.ONNXRegistry().from_torchlib(opset_version=version)
    return frozenset(_decomp.get_onnx_implemented_overloads(registry))


@functools.lru_cache(maxsize=4)
def _decomposition_table(implemented: frozenset) -> dict:
    """The exporter's decomposition table for ops outside ``implemented``."""
    _, _decomp, _, _ = _internals()
    return _decomp.create_onnx_friendly_decomposition_table(set(implemented))


def _is_assertion(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target._schema.name.split("::")[-1] in _ASSERTIONS


def _untranslated(graph: fx.Graph, implemented: set, table: dict | None = None) -> list[fx.Node]:
    """Op nodes the registry has no translation for (assertions apart); with ``table``, also
    those the exporter's whole-graph decomposition would rewrite anyway: ops in its
    decomposition table, and composite ops torch.export cannot keep (aliasing ones such as
    ``reshape``, which become ``view``)."""
    from torch._export.utils import _check_valid_to_preserve

    def rewritten(op) -> bool:
        if op not in implemented:
            return not _is_assertion(op)
        if table is None:
            return False
        if op in table:
            return True
        return (torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
                and not _check_valid_to_preserve(op))

    return [n for n in graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and rewritten(n.target)]


def _program(root: torch.nn.Module, graph: fx.Graph, state: dict[str, torch.Tensor],
             kinds: dict[str, Any], range_constraints: dict):
    """An ``ExportedProgram`` of ``graph`` whose leading placeholders are the lifted ``state``."""
    from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (
        ExportGraphSignature,
        InputKind,
        InputSpec,
        OutputKind,
        OutputSpec,
        TensorArgument,
    )
    from torch.utils import _pytree as pytree

    inputs, user = [], []
    for ph in (n for n in graph.nodes if n.op == "placeholder"):
        target = ph.meta.get("fxcompress_lifted")
        if target is None:
            user.append(ph)
            inputs.append(InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=ph.name),
                                    target=None))
        else:
            kind = kinds[target]
            inputs.append(InputSpec(kind=kind, arg=TensorArgument(name=ph.name), target=target,
                                    persistent=True if kind == InputKind.BUFFER else None))
    out = next(n for n in graph.nodes if n.op == "output")
    outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    if not all(isinstance(o, fx.Node) for o in outs):
        raise Unsupported("an output that is not a tensor node")
    outputs = [OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=o.name), target=None)
               for o in outs]
    in_spec = pytree.tree_flatten((tuple(range(len(user))), {}))[1]
    out_spec = pytree.tree_flatten(out.args[0])[1]
    call = ModuleCallEntry("", ModuleCallSignature(inputs=[], outputs=[], in_spec=in_spec,
                                                   out_spec=out_spec))
    return ExportedProgram(root=root, graph=graph,
                           graph_signature=ExportGraphSignature(input_specs=inputs,
                                                                output_specs=outputs),
                           state_dict=state, range_constraints=range_constraints,
                           module_call_graph=[call], constants={})


def exported_program(gm: fx.GraphModule):
    """``gm`` as an ``ExportedProgram``, without tracing: every ``get_attr`` of a tensor becomes a
    lifted input (parameter, or buffer for a non-parameter tensor), weights shared.

    Every node must hold its fake value (``meta['val']``) from one fake tensor mode, as after
    :func:`compiler.pass_manager.propagate_shapes`; ``gm`` is not modified.

    Raises:
        Unsupported: a node without a value, a ``get_attr`` of a non-tensor (a submodule).
    """
    from torch.export.graph_signature import InputKind

    propagated = propagation_of(gm)
    if propagated is None:
        raise Unsupported("the graph was not shape-propagated")
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    user = [n for n in graph.nodes if n.op == "placeholder"]
    state: dict[str, torch.Tensor] = {}
    kinds: dict[str, Any] = {}
    lifted: dict[str | int, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op == "output":
            continue
        if "val" not in n.meta:
            raise Unsupported(f"node {n.name} has no fake value")
        if n.op != "get_attr":
            continue
        obj: Any = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            raise Unsupported(f"get_attr {n.target} is a {type(obj).__name__}, not a tensor")
        target = str(n.target)
        # one input per tensor, as torch.export lifts them: a tensor under two names (tied
        # weights) is stored once
        ph = lifted.get(target) or lifted.get(id(obj))
        if ph is None:
            with graph.inserting_before(user[0]):
                ph = graph.placeholder("p_" + target.replace(".", "_"))
            ph.meta.update(n.meta)
            ph.meta["fxcompress_lifted"] = target
            lifted[target] = lifted[id(obj)] = ph
            state[target] = obj
            kinds[target] = (InputKind.PARAMETER if isinstance(obj, torch.nn.Parameter)
                             else InputKind.BUFFER)
        n.replace_all_uses_with(ph)
        graph.erase_node(n)
    graph.lint()
    ranges = dict(propagated[0].shape_env.var_to_range)
    return _program(fx.GraphModule(gm, graph), graph, state, kinds, ranges)


def _signature(n: fx.Node) -> Any:
    """What a node's decomposition depends on: its op, constant arguments and the metadata
    of the values it reads (hashable; None where an argument is not)."""
    def freeze(a):
        if isinstance(a, fx.Node):
            return ("node", value_key(a.meta["val"]))
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        return a

    key = (n.target, freeze(n.args), freeze(n.kwargs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _outputs(n: fx.Node) -> int | None:
    """How many values ``n`` yields: None for one tensor, else the length of its list (read
    only through ``getitem`` users); raises Unsupported otherwise."""
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return None
    if (isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val)
            and all(u.op == "call_function" and u.target is operator.getitem
                    and isinstance(u.args[1], int) for u in n.users)):
        return len(val)
    raise Unsupported(f"node {n.name} ({n.target}) yields {type(val).__name__}")


def _decompose_all(reps: list[fx.Node], table: dict, ranges: dict) -> list[fx.Graph]:
    """The decompositions of the op nodes ``reps``, by one ``run_decompositions`` of a program
    holding each of them on inputs of its own: per node a graph whose placeholders are its
    ``all_input_nodes`` (in order) and whose output is its value (a tuple of them for a node
    with several)."""
    graph = fx.Graph()
    spans = []
    results: list[fx.Node] = []
    for j, n in enumerate(reps):
        env: dict[fx.Node, fx.Node] = {}
        for i, m in enumerate(n.all_input_nodes):
            env[m] = graph.placeholder(f"s{j}_x{i}")
            env[m].meta["val"] = _fresh(m.meta["val"])
        call = graph.call_function(n.target, fx.map_arg(n.args, env.__getitem__),
                                   fx.map_arg(n.kwargs, env.__getitem__))
        call.meta["val"] = n.meta["val"]
        count = _outputs(n)
        outs = [call]
        if count is not None:
            outs = [graph.call_function(operator.getitem, (call, i)) for i in range(count)]
            for i, o in enumerate(outs):
                o.meta["val"] = n.meta["val"][i]
        spans.append((len(env), len(outs)))
        results += outs
    graph.output(tuple(results))
    ep = _program(fx.GraphModule(torch.nn.Module(), graph), graph, {}, {}, ranges)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        done = ep.run_decompositions(table)
    from torch.export.graph_signature import InputKind

    if any(spec.kind != InputKind.USER_INPUT for spec in done.graph_signature.input_specs):
        raise Unsupported("a decomposition lifted a constant")
    dgraph = done.graph_module.graph
    placeholders = [p for p in dgraph.nodes if p.op == "placeholder"]
    out = next(n for n in dgraph.nodes if n.op == "output").args[0]
    graphs, p, k = [], 0, 0
    for n_in, n_out in spans:
        graphs.append(_extract(dgraph, placeholders[p:p + n_in], list(out[k:k + n_out])))
        p, k = p + n_in, k + n_out
    return graphs


def _fresh(val):
    """A new fake tensor like ``val`` (placeholders holding one fake tensor object are traced as
    one input); other values as they are."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(val, FakeTensor):
        return val
    with val.fake_mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)


def _extract(graph: fx.Graph, inputs: list[fx.Node], outputs: list) -> fx.Graph:
    """The part of ``graph`` computing ``outputs`` from ``inputs``, as a graph of its own.

    The joint trace binds each size symbol to the first node that produced it, which may
    belong to another node's inputs: such a size is read again from this node's own inputs
    (``sym_size`` of an input tensor holding it, or an input that is that size), and size
    arithmetic over such sizes is copied with them.

    Raises:
        Unsupported: it reads another node's tensor, or a size none of its inputs holds.
    """
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {ph: new.placeholder(ph.name) for ph in inputs}
    sizes: dict[str, Any] = {}
    for ph in inputs:
        val = ph.meta.get("val")
        if isinstance(val, torch.SymInt):
            sizes.setdefault(str(val), env[ph])
        elif isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    sizes.setdefault(str(size), (env[ph], d))

    def get(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "placeholder":  # another node's input
            val = n.meta.get("val")
            src = sizes.get(str(val)) if isinstance(val, torch.SymInt) else None
            if src is None:
                raise Unsupported(f"a decomposition reads another node's input {n.name} ({val})")
            if isinstance(src, tuple):
                src = new.call_function(torch.ops.aten.sym_size.int, src)
                src.meta["val"] = val
            env[n] = src
            return src
        env[n] = new.node_copy(n, get)
        return env[n]

    new.output(tuple(fx.map_arg(o, get) for o in outputs))
    return new


def decompose_untranslated(gm: fx.GraphModule, implemented: set, table: dict) -> int:
    """Replace, in place, every node of ``gm`` that the ONNX registry cannot translate, or that
    the exporter's whole-graph decomposition would rewrite, by its decomposition (one
    ``run_decompositions`` for all of them, one representative per distinct
    :func:`_signature`). Returns the number of nodes replaced; the new nodes' values are left
    for the caller to propagate.

    Raises:
        Unsupported: a node whose value is not a tensor or a list of tensors read by index, or a
            decomposition that is still untranslatable or lifts a constant.
    """
    ranges = dict(propagation_of(gm)[0].shape_env.var_to_range)
    todo = _untranslated(gm.graph, implemented, table)
    if not todo:
        return 0
    keys, counts, reps = {}, {}, {}
    for n in todo:
        counts[n] = _outputs(n)
        key = _signature(n)
        keys[n] = key if key is not None else ("node", n.name)
        reps.setdefault(keys[n], n)
    graphs = dict(zip(reps, _decompose_all(list(reps.values()), table, ranges)))
    for sub in graphs.values():
        left = _untranslated(sub, implemented)
        if left:
            raise Unsupported(f"{left[0].target} has no translation after decomposition")
    for n in todo:
        sub = graphs[keys[n]]
        placeholders = [p for p in sub.nodes if p.op == "placeholder"]
        with gm.graph.inserting_before(n):
            values = gm.graph.graph_copy(sub, dict(zip(placeholders, n.all_input_nodes)))
        if counts[n] is None:
            n.replace_all_uses_with(values[0])
        else:
            for u in list(n.users):
                u.replace_all_uses_with(values[u.args[1]])
                gm.graph.erase_node(u)
        gm.graph.erase_node(n)
    gm.recompile()
    return len(todo)


def share_symbolic_sizes(gm: fx.GraphModule) -> int:
    """Make every node computing a symbolic size (``sym_size``, size arithmetic) that an earlier
    node already computes read that node instead, and drop it; returns how many were dropped.

    A whole-graph trace does this by itself (it maps each symbol to the first node that
    produced it); a decomposition spliced in from its own program computes its sizes again
    (``diff`` re-reads the sequence length from its input).
    """
    first: dict[str, fx.Node] = {}
    dropped = 0
    for n in list(gm.graph.nodes):
        val = n.meta.get("val")
        if n.op != "call_function" or not isinstance(val, torch.SymInt):
            continue
        expr = str(val)
        if expr in first:
            n.replace_all_uses_with(first[expr])
            gm.graph.erase_node(n)
            dropped += 1
        else:
            first[expr] = n
    if dropped:
        gm.recompile()
    return dropped


@contextlib.contextmanager
def _no_decomposition() -> Iterator[None]:
    """Within: ``torch.onnx.export`` skips its whole-graph decomposition (keeping the type
    promotion and assertion removal of that step). Process-wide while it lasts: an export
    running in another thread meanwhile would skip it too."""
    _core, _, _fx_passes, _ = _internals()
    original = _core._prepare_exported_program_for_export

    def prepare(program, *, registry):
        gm = program.graph_module
        _fx_passes.insert_type_promotion_nodes(gm)
        program._graph_module = _fx_passes.remove_assertion_nodes(gm)
        return program

    _core._prepare_exported_program_for_export = prepare
    try:
        yield
    finally:
        _core._prepare_exported_program_for_export = original


#: opset -> the torchlib registry ``torch.onnx.export`` builds on every call (about 1 s of a
#: 2.6 s export of a tiny Llama: every torchlib function's ONNX Script IR), built once here
_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def reusing_torchlib_registry() -> Iterator[None]:
    """Within: ``torch.onnx.export`` gets a copy of a torchlib registry built once per opset
    instead of building it again (the custom translation table is registered into the copy,
    so it never reaches the cached one). Process-wide while it lasts, as
    :func:`_no_decomposition`. Where the exporter's internals differ, nothing is changed."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # pragma: no cover - depends on the installed torch
        yield
        return
    cls = getattr(_registration, "ONNXRegistry", None)
    original = cls.__dict__.get("from_torchlib") if cls is not None else None
    if not isinstance(original, classmethod) or not hasattr(cls(), "functions"):
        yield  # pragma: no cover - depends on the installed torch
        return
    build = original.__func__

    def from_torchlib(klass, *args, **kwargs):
        if klass is not cls:  # a subclass: built as torch builds it
            return build(klass, *args, **kwargs)
        key = kwargs.get("opset_version", args[0] if args else None)
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(klass, *args, **kwargs)
        cached = _REGISTRIES[key]
        fresh = klass()
        fresh.__dict__.update(cached.__dict__)
        fresh.functions = {k: list(v) for k, v in cached.functions.items()}
        return fresh

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def onnx_program(gm: fx.GraphModule, *, opset: int | None, table: dict | None,
                 input_names: list[str] | None, output_names: list[str] | None,
                 export: Callable[..., Any]):
    """Translate ``gm`` to an ``ONNXProgram`` by the direct route, or None where it does not apply
    (see the module docstring; the reason is logged at debug level).

    Args:
        gm: the graph (not modified; its weights are shared with the program).
        opset, table, input_names, output_names: as for ``torch.onnx.export``.
        export: ``torch.onnx.export`` (passed in, so the caller's error handling wraps it).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        if len(placeholders) != 1:
            raise Unsupported(f"{len(placeholders)} graph inputs")
        _internals()
        propagated = propagation_of(gm)
        probe_shape, probe_dtype = PROBE_SHAPE, torch.long
        if propagated is not None and len(propagated[1]) == 2:
            probe_shape, probe_dtype = propagated[1], propagated[2]
        val = placeholders[0].meta.get("val")
        if isinstance(val, torch.Tensor):
            if val.dim() != 2:
                raise Unsupported(f"an input of rank {val.dim()}")
            probe_dtype = val.dtype
        probe = torch.zeros(probe_shape, dtype=probe_dtype)
        # a copy sharing weights and node values: the compile's propagation is reused
        work = fx.GraphModule(gm, _copy(gm.graph))
        work.meta.update(gm.meta)
        propagate_shapes(work, probe, " (ONNX export)")
        implemented = _torchlib_ops(opset) | frozenset(table or {})
        replaced = decompose_untranslated(work, implemented, _decomposition_table(implemented))
        propagate_shapes(work, probe, " (ONNX export)")
        if share_symbolic_sizes(work):
            propagate_shapes(work, probe, " (ONNX export)")
        program = exported_program(work)
    except Unsupported as e:
        log.debug("ONNX export: standard route (%s)", e)
        return None
    log.debug("ONNX export: direct route (%d nodes decomposed)", replaced)
    with _no_decomposition(), reusing_torchlib_registry():
        return export(program, (probe,), dynamo=True,
                      input_names=input_names, output_names=output_names,
                      opset_version=opset, custom_translation_table=table, optimize=False,
                      verbose=False, report=False)


def _copy(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose nodes share the originals' meta values (shallow meta copy)."""
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
