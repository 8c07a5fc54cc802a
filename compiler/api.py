"""``compile()``: trace, canonicalize, run the checked pass pipeline; the compiled model.

The compiled model is callable like the original (``input_ids -> logits``), exposes the
GraphModule and the per-pass report, exports ONNX, and saves/loads itself. A saved artifact is a
folder with the re-exported program (``program.pt2``), the report and a manifest of SHA-256
hashes; loading checks every hash first and never unpickles arbitrary objects (``torch.load`` is
forced to ``weights_only=True`` while the program loads).

This module is the facade over the core (``compiler``'s IR, channel graph, statistics, pass
contract, pass manager and registry, which import neither ``passes`` nor ``backends``). It
wires the two in: the built-in passes by their module name (``add_pass_modules("passes")``,
see :mod:`compiler.registry`), and the backends through :data:`LOWERINGS`, a table from target
name to the lowering that imports its backend on first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compiler import ir
from compiler.errors import ArtifactError, DataError, FxCompressError, PreconditionError
from compiler.fileio import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    file_entry,
    read_manifest,
    sha256_of,
    staged_dir,
)
from compiler.frontend import export_program, load_model, normalize, trace
from compiler.generation import GenerationStats
from compiler.pass_base import Pass, PassContext
from compiler.pass_manager import SHAPE_PROPAGATION, DumpIR, Instrument, LogitsDrift, PassManager
from compiler.precision import parse_calibration_dtype
from compiler.registry import add_pass_modules, make_pass
from compiler.report import Report

log = logging.getLogger(__name__)

# The built-in passes, imported by the registry on the first name lookup.
add_pass_modules("passes")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CompiledModel:
    """A compiled causal LM: ``input_ids -> logits``, with its graph and report."""

    def __init__(self, graph_module: fx.GraphModule, report: Report, *, config: dict | None = None,
                 model_class: str = "", tokenizer_dir: str | os.PathLike | None = None):
        self.graph_module = graph_module
        self.report = report
        self.config = config or {}
        self.model_class = model_class
        #: folder with tokenizer.json (the source HF folder, or the loaded artifact), if known
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        # dtypes of a low-precision Q/DQ graph (see _check_low_precision_qdq), per graph module
        self._low_precision_checked: fx.GraphModule | None = None
        self._low_precision: list[str] = []
        self._kv: tuple | None = None  # ((graph module, cache_heads), KVCacheGraph)
        #: timing of the last :meth:`generate` (prefill seconds, decode tokens/s)
        self.generation_stats = GenerationStats()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_low_precision_qdq("calling the compiled model")
        with torch.no_grad():
            return self.graph_module(input_ids)

    def _check_low_precision_qdq(self, what: str) -> None:
        """A Q/DQ graph of a float16/bfloat16 model runs only once lowered: say so clearly.

        Scanning the graph is done once per graph module, not on every call.
        """
        gm = self.graph_module
        if self._low_precision_checked is not gm:
            self._low_precision = sorted(
                {str(t.dtype).replace("torch.", "") for t in [*gm.parameters(), *gm.buffers()]
                 if t.dtype in (torch.float16, torch.bfloat16)}
            ) if ir.is_quantized(gm) else []
            self._low_precision_checked = gm
        if self._low_precision:
            raise PreconditionError(
                f"{what}: the graph holds {'/'.join(self._low_precision)} weights and PT2E Q/DQ ops, whose "
                "dequantize returns float32; it runs only after cm.lower('triton') (the lowered "
                "ops return the model's dtype). For a direct call or ONNX Runtime, quantize a "
                "float32 model (model.float() before compile)")

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    def num_parameters(self) -> int:
        return ir.count_params(self.graph_module)

    def example_inputs(self) -> torch.Tensor:
        vocab = self.vocab_size or 2
        return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))

    def export_onnx(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Export to ONNX (dynamic batch and sequence); written atomically.

        A graph with Q/DQ nodes is first lowered to the integer kernels ONNX Runtime runs
        (``backends.ort_quant``: MatMulIntegerToFloat for int8, MatMulNBits for int4); a float
        graph goes straight through ``backends.onnxruntime.export_onnx``.
        """
        return self.lower("onnx", path, **kwargs)

    def kv_cache(self, *, cache_heads: int | None = None):
        """The graph rewritten to carry a KV cache (``compiler.kv_cache``), built once per graph.

        ``cache_heads`` pads every layer's cache to that many kv heads (see
        :func:`compiler.kv_cache.with_kv_cache`).
        """
        from compiler.kv_cache import with_kv_cache

        key = (self.graph_module, cache_heads)
        if self._kv is None or self._kv[0] != key:
            self._kv = (key, with_kv_cache(self.graph_module, cache_heads=cache_heads))
        return self._kv[1]

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model was built for (``max_position_embeddings``), if known."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if self.config.get(key):
                return int(self.config[key])
        return None

    def generate(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 streamer: Any = None, **options: Any) -> torch.Tensor:
        """Generate on the compiled graph with its KV cache; returns prompt + new ids.

        Args:
            input_ids: ``[batch, seq]`` prompt ids (left-pad rows of different lengths).
            attention_mask: ``[batch, seq]``, 0 at left padding (default all ones).
            streamer: a Hugging Face style streamer (``put``/``end``) or a callable receiving
                each new ``[batch]`` token tensor.
            **options: ``max_new_tokens=64``, ``do_sample=False``, ``temperature``,
                ``top_k``, ``top_p``, ``eos_token_id`` (default: the config's), ``seed``.

        Raises:
            ValueError: unknown or invalid option, bad prompt shape, prompt longer than the
                context length.
        """
        from compiler.generation import SamplingOptions
        from compiler.generation import generate as run_generation

        self._check_low_precision_qdq("generate")
        options.setdefault("eos_token_id", self.config.get("eos_token_id"))
        opts = SamplingOptions.from_kwargs(**options)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids[None]
        kv = self.kv_cache()
        batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else 0
        self.generation_stats = GenerationStats()
        return run_generation(kv, input_ids, kv.empty_cache(batch), attention_mask=attention_mask,
                              options=opts, streamer=streamer, max_length=self.context_length,
                              stats=self.generation_stats)

    def export_genai(self, folder: str | os.PathLike, *, overwrite: bool = False,
                     accuracy_level: int | str = "auto", context_length: int | None = None,
                     threads: int | None = None, fused: bool = True, logits: str = "last"
                     ) -> Path:
        """Write an ONNX Runtime GenAI folder (``backends.genai``): KV-cache ONNX, config, tokenizer.

        ``onnxruntime_genai.Model(folder)`` loads it; ``fxcompress generate FOLDER`` runs it.
        Quantized graphs lower to ORT's integer kernels as in :meth:`export_onnx`; norms and
        attention to ORT's fused kernels unless ``fused=False`` (``backends.ort_fused``: exact
        for batches without padding; the unfused graph also masks left padding). Int4 weights
        run ``MatMulNBits`` at ``accuracy_level`` (default ``"auto"``: int8 compute where the
        CPU has int8 dot products, as ORT GenAI's builder does; 0 keeps float compute). The
        ``logits`` output holds the last position only (``logits="last"``, default: the LM head
        then reads one row per sequence in the prefill; generation reads nothing else) or every
        position (``"all"``, for scoring a prompt). Written atomically; an existing non-empty
        folder needs ``overwrite=True``.
        """
        return self.lower("genai", folder, overwrite=overwrite, accuracy_level=accuracy_level,
                          context_length=context_length, threads=threads, fused=fused,
                          logits=logits)

    def lower(self, backend: str = "triton", *args: Any, **kwargs: Any) -> Any:
        """Lower to a backend through the :data:`LOWERINGS` table; returns what it produces.

        ``backend="triton"``: a lowered copy callable as ``input_ids -> logits``: Q/DQ patterns
        become ``fxcompress::*`` custom ops (W8A8 GEMM with fused scales, W4A16 group-wise GEMM,
        fused RMSNorm + quantize) that run the Triton kernels on CUDA and the torch references
        on CPU (``use_kernels=True`` runs the kernels under ``TRITON_INTERPRET=1``). Options:
        ``device``, ``use_kernels``, ``fuse_norms``. ``"onnx"`` (a path: :meth:`export_onnx`)
        and ``"genai"`` (a folder: :meth:`export_genai`) write files and return their path.

        Raises:
            ValueError: unknown backend (the message lists the known ones).
            TritonLaunchError: CUDA asked for and absent.
        """
        lowering = LOWERINGS.get(backend)
        if lowering is None:
            raise ValueError(f"unknown backend {backend!r} (known: {', '.join(sorted(LOWERINGS))})")
        return lowering(self, *args, **kwargs)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the compiled artifact to ``directory`` atomically (program, report, manifest)."""
        directory = Path(directory)
        with staged_dir(directory, "the artifact", overwrite=overwrite) as tmp:
            ep = export_program(self.graph_module, self.example_inputs())
            torch.export.save(ep, tmp / "program.pt2")
            (tmp / "report.json").write_text(self.report.to_json())
            names = ["program.pt2", "report.json"]
            if self.tokenizer_dir is not None:
                for f in _TOKENIZER_FILES:
                    if (self.tokenizer_dir / f).is_file():
                        shutil.copyfile(self.tokenizer_dir / f, tmp / f)
                        names.append(f)
            manifest = {
                "format": ARTIFACT_FORMAT,
                "version": ARTIFACT_VERSION,
                "model_class": self.model_class,
                "config": self.config,
                "files": {f: file_entry(tmp / f) for f in names},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        log.info("saved compiled model to %s", directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CompiledModel:
        """Load an artifact written by :meth:`save`, checking sizes and hashes first.

        Raises:
            ArtifactError: missing, truncated or tampered files, or unsafe pickled content.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        mpath = directory / "manifest.json"
        files = manifest.get("files")
        if not isinstance(files, dict) or not {"program.pt2", "report.json"} <= set(files):
            raise ArtifactError(f"{mpath}: manifest does not list program.pt2 and report.json")
        if not set(files) <= {"program.pt2", "report.json", *_TOKENIZER_FILES}:
            raise ArtifactError(f"{mpath}: manifest lists unexpected files {sorted(files)}")
        for name, entry in files.items():
            f = directory / name
            if not f.is_file():
                raise ArtifactError(f"{f}: missing")
            size = f.stat().st_size
            if size != entry.get("bytes"):
                raise ArtifactError(f"{f}: {size} bytes, manifest says {entry.get('bytes')} (truncated?)")
            if sha256_of(f) != entry.get("sha256"):
                raise ArtifactError(f"{f}: SHA-256 does not match the manifest (file was modified)")
        # registers the PT2E quantized_decomposed ops, which a quantized program refers to
        import torch.ao.quantization.fx._decomposed

        try:
            with _weights_only_loads():
                ep = torch.export.load(directory / "program.pt2")
        except Exception as e:
            raise ArtifactError(f"{directory / 'program.pt2'}: cannot load program: {e}") from e
        gm = ep.module()
        normalize(gm)
        try:
            report = Report.from_dict(json.loads((directory / "report.json").read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ArtifactError(f"{directory / 'report.json'}: corrupt report: {e}") from e
        config = manifest.get("config") or {}
        gm.meta["fxcompress_config"] = config
        gm.meta["fxcompress_model_class"] = manifest.get("model_class", "")
        tok = directory if "tokenizer.json" in files else None
        return cls(gm, report, config=config, model_class=manifest.get("model_class", ""),
                   tokenizer_dir=tok)


# ----------------------------------------------------------------------------- backends
# Each lowering imports its backend on first use: ONNX Runtime, onnxruntime-genai and Triton
# are heavy, and the last two optional.


def _lower_onnx(cm: CompiledModel, path: str | os.PathLike, **kwargs: Any) -> Path:
    """ONNX for ONNX Runtime: a Q/DQ graph through ``backends.ort_quant`` (its integer
    kernels), a float graph straight through ``backends.onnxruntime``."""
    cm._check_low_precision_qdq("export_onnx")
    kwargs.setdefault("example_inputs", cm.example_inputs())
    if ir.is_quantized(cm.graph_module):
        from backends.ort_quant import export_quantized_onnx

        return export_quantized_onnx(cm.graph_module, path, **kwargs)
    from backends.onnxruntime import export_onnx

    return export_onnx(cm.graph_module, path, **kwargs)


def _lower_genai(cm: CompiledModel, folder: str | os.PathLike, *, overwrite: bool = False,
                 accuracy_level: int | str = "auto", context_length: int | None = None,
                 threads: int | None = None, fused: bool = True, logits: str = "last") -> Path:
    """An ONNX Runtime GenAI folder of the KV-cache graph (``backends.genai``)."""
    from backends.genai import export_genai

    cm._check_low_precision_qdq("export_genai")
    kv = cm.kv_cache()
    heads = {layer.kv_heads for layer in kv.layers}
    if len(heads) > 1:  # pruning left layers with different kv-head counts
        kv = cm.kv_cache(cache_heads=max(heads))
    return export_genai(kv, folder, config=cm.config, tokenizer_dir=cm.tokenizer_dir,
                        overwrite=overwrite, accuracy_level=accuracy_level,
                        context_length=context_length or cm.context_length,
                        threads=threads, fused=fused, logits=logits)


def _lower_triton(cm: CompiledModel, **kwargs: Any) -> fx.GraphModule:
    """The graph with its Q/DQ patterns as Triton kernel calls (``backends.triton.lowering``)."""
    from backends.triton.lowering import lower as triton_lower

    return triton_lower(cm, **kwargs)


#: backend (target) name -> lowering ``(compiled model, *args, **options) -> result``; what
#: :meth:`CompiledModel.lower` dispatches on. A new backend is one entry here.
LOWERINGS: dict[str, Callable[..., Any]] = {
    "genai": _lower_genai,
    "onnx": _lower_onnx,
    "triton": _lower_triton,
}


@contextlib.contextmanager
def _weights_only_loads():
    """Force every ``torch.load`` inside to ``weights_only=True`` (no arbitrary unpickling)."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _check_calibration(calibration: Iterable[torch.Tensor] | None, vocab: int | None) -> list[torch.Tensor] | None:
    if calibration is None:
        return None
    batches = list(calibration)
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point():
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise DataError(f"calibration batch {i} must be integer input_ids [batch, seq], got {shape}")
        if vocab is not None and b.numel() and (int(b.max()) >= vocab or int(b.min()) < 0):
            raise DataError(
                f"calibration batch {i} has token ids outside the vocabulary [0, {vocab}): "
                f"min {int(b.min())}, max {int(b.max())}"
            )
    return batches


def _calibration_from_spec(spec: str, model_spec: Any) -> list[torch.Tensor]:
    from compiler import data

    if not isinstance(model_spec, (str, os.PathLike)) or not Path(model_spec).is_dir():
        raise DataError(
            f"calibration spec {spec!r} needs a tokenizer: give the model as a local folder with "
            "tokenizer.json, or pass calibration=[input_ids, ...]"
        )
    return data.calibration_from_spec(spec, Path(model_spec))


def compile(
    model: torch.nn.Module | str | os.PathLike,
    passes: Sequence[Pass | str] = (),
    *,
    calibration: Iterable[torch.Tensor] | str | None = None,
    example_inputs: torch.Tensor | None = None,
    probe_inputs: torch.Tensor | None = None,
    verify: bool = True,
    canonicalize: bool = True,
    skip: Iterable[str | int] = (),
    dump_dir: str | os.PathLike | None = None,
    instruments: Iterable[Instrument] = (),
    atol: float | None = None,
    progress: bool = False,
    seed: int = 0,
    report_data: bool = True,
    calibration_dtype: str | torch.dtype = "float32",
) -> CompiledModel:
    """Trace ``model``, run ``passes`` through the checked pass manager, return the compiled model.

    Args:
        model: an ``nn.Module`` (HF ``*ForCausalLM`` or ``input_ids -> logits``), a local HF
            folder, a config.json, or ``"tiny-<family>"``.
        passes: pass objects or registry strings (``"smoothquant(alpha=0.5)"``), in order.
            ``canonicalize`` runs first unless it is listed or ``canonicalize=False``.
        calibration: iterable of ``input_ids`` tensors ``[batch, seq]``, or a dataset spec
            (``"tinystories:128x256"``) when ``model`` is a local folder with a tokenizer.
        example_inputs: ``input_ids`` for tracing (default random ``[2, 16]``).
        probe_inputs: ``input_ids`` for numerical checks and drift (default random ``[2, 32]``).
        verify: verify the graph after every pass and check exact passes numerically.
        canonicalize: prepend the canonicalize pass.
        skip: pass names or 1-based indices to skip (bisecting an accuracy drop).
        dump_dir: write numbered graph dumps (``001_canonicalize.py``) here.
        instruments: extra pass-manager instrumentation callbacks.
        atol: ``None`` (default): each exact pass is checked in float64, against a tolerance
            measured from the float32 rounding of the graph before it (so it scales with the
            logits' magnitude and the model's depth; see :mod:`compiler.pass_manager`). A
            number: an absolute tolerance on the max difference of the float32 logits.
        progress: show progress bars on long work (calibration, evaluation).
        seed: seed for passes that use randomness.
        report_data: capture, per pass, the block graph diff, activation ranges and
            quantization error that ``cm.report.to_html`` draws
            (:mod:`compiler.report_capture`; a few forwards on a 256-token sample).
        calibration_dtype: ``"float32"`` (default) or ``"bfloat16"``: the precision the
            calibration runs (the block engine's sweeps and the activation statistics) compute
            their matrix products in, under ``torch.autocast``; the model, its rewrites and the
            exact checks stay float32 / float64 (:mod:`compiler.precision`). bfloat16 is the
            fast choice on CPUs with AMX; results then depend on that rounding.

    Returns:
        A :class:`CompiledModel`.

    Raises:
        UnsupportedModelError, PipelineError, PreconditionError, VerificationError, DataError.
    """
    t0 = time.perf_counter()
    compute_dtype = parse_calibration_dtype(calibration_dtype)
    model_spec = model
    if not isinstance(model, torch.nn.Module):
        model = load_model(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    pass_list = [make_pass(p) for p in passes]
    if canonicalize and not any(p.name == "canonicalize" for p in pass_list):
        pass_list.insert(0, make_pass("canonicalize"))
    if isinstance(calibration, str):
        calibration = _calibration_from_spec(calibration, model_spec)
    batches = _check_calibration(calibration, vocab)

    gm = trace(model, example_inputs)
    if probe_inputs is None:
        g = torch.Generator().manual_seed(seed + 99)
        probe_inputs = torch.randint(0, vocab or 2, (2, 32), generator=g)
    with torch.no_grad():
        reference = gm(probe_inputs)
    ctx = PassContext(calibration=batches, probe_inputs=probe_inputs, seed=seed, progress=progress,
                      calibration_dtype=compute_dtype)
    inst: list[Instrument] = [LogitsDrift(reference, probe_inputs), *instruments]
    capture = None
    if report_data:
        from compiler.report_capture import ReportCapture

        capture = ReportCapture()
        inst.insert(1, capture)
    if dump_dir is not None:
        inst.append(DumpIR(dump_dir))
    report = Report(
        model=type(model).__name__,
        calibration=_describe_calibration(batches, compute_dtype),
    )
    trace_seconds = time.perf_counter() - t0
    shapes0 = dict(SHAPE_PROPAGATION)
    PassManager(pass_list, verify=verify, check_exact=verify, atol=atol, skip=skip,
                instruments=inst).run(gm, ctx, report)
    report.total_seconds = time.perf_counter() - t0
    report.extra["trace_seconds"] = round(trace_seconds, 3)
    # shape propagations after passes and inside them; skipped: the graph was already propagated
    report.extra["shape_propagation"] = {
        k: round(SHAPE_PROPAGATION[k] - shapes0.get(k, 0), 3)
        for k in ("calls", "skipped", "recomputed", "reused", "seconds")}
    report.extra["analysis_cache"] = {"hits": ctx.analyses.hits, "misses": ctx.analyses.misses}
    if capture is not None:
        report.extra["report_capture_seconds"] = round(capture.seconds, 3)
    tok = None
    if isinstance(model_spec, (str, os.PathLike)):
        from compiler.frontend import tokenizer_dir_of

        tok = tokenizer_dir_of(model_spec)
    return CompiledModel(gm, report, config=gm.meta.get("fxcompress_config", {}),
                         model_class=gm.meta.get("fxcompress_model_class", type(model).__name__),
                         tokenizer_dir=tok)


def _describe_calibration(batches: list[torch.Tensor] | None,
                          compute_dtype: torch.dtype | None = None) -> str:
    if not batches:
        return "none"
    tokens = sum(b.numel() for b in batches)
    run_in = "" if compute_dtype is None else f", run in {str(compute_dtype).split('.')[-1]}"
    return f"{len(batches)} batches, {tokens:,} tokens{run_in}"


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load a compiled artifact saved with :meth:`CompiledModel.save`."""
    return CompiledModel.load(directory)


__all__ = ["LOWERINGS", "CompiledModel", "FxCompressError", "compile", "load"]
