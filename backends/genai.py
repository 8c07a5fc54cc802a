"""Deployable generation: ONNX with a KV cache in the ONNX Runtime GenAI layout, and runners.

:func:`export_genai` writes a folder that ``onnxruntime_genai.Model(folder)`` loads and
generates with, and that Optimum's ``ORTModelForCausalLM`` IO convention matches:

    folder/
      model.onnx, model.onnx.data   the KV-cache graph (``compiler.kv_cache``), lowered to ORT's
                                    integer kernels when quantized (``backends.ort_quant``)
      genai_config.json             model/decoder/search sections, as ORT GenAI's builder writes
      tokenizer.json, tokenizer_config.json

IO names: inputs ``input_ids [batch_size, sequence_length]``, ``attention_mask [batch_size,
total_sequence_length]`` (int64, 0 at left padding), ``past_key_values.{i}.key`` /
``.value [batch_size, kv_heads, past_sequence_length, head_dim]``; outputs ``logits``,
``present.{i}.key`` / ``.value`` with ``total_sequence_length``. With the generic ops the cache
is concatenated in the graph (``past_present_share_buffer: false``: the runtime feeds each
step's ``present`` back as the next ``past``); when every layer's attention, rotary included,
is lowered to ``GroupQueryAttention`` nothing else reads the cache, and the config says
``past_present_share_buffer: true``: ORT GenAI then keeps one cache buffer of the context
length and the kernel appends to it in place, as with the builder's models.

ORT GenAI allocates one cache shape for all layers, so when pruning left layers with
different kv-head counts the cache is zero-padded to the largest (``cache_heads`` in
:func:`compiler.kv_cache.with_kv_cache`); the padded heads are never read.

Runners: :class:`ORTCausalLM` runs an exported folder with plain ONNX Runtime and
``compiler.generation`` (the same sampling loop as the torch path);
:func:`genai_generate` runs it with onnxruntime-genai's own generator loop (the optional
``genai`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from compiler import ir
from compiler.errors import ArtifactError, PreconditionError
from compiler.fileio import staged_dir
from compiler.generation import GenerationStats, SamplingOptions, generate
from compiler.kv_cache import last_position_logits

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: ORT GenAI's model type for a decoder-only LM whose graph does everything itself (it only
#: has to feed input_ids, attention_mask and the cache).
GENAI_MODEL_TYPE = "llama"
DEFAULT_CONTEXT = 2048
#: ``logits`` output of an export: the last position only (generation) or every position
LOGITS_MODES = ("last", "all")


# ----------------------------------------------------------------------------- export


def export_kv_onnx(kv, path: str | os.PathLike, *, accuracy_level: int | str = "auto",
                   external_data: bool | None = True, fused: bool = True,
                   max_positions: int = DEFAULT_CONTEXT, logits: str = "all"
                   ) -> tuple[Path, bool]:
    """Export a :class:`compiler.kv_cache.KVCacheGraph` to ONNX with the GenAI IO names.

    With ``fused`` (default) norms and cached attention lower to ORT's fused kernels
    (``backends.ort_fused``: exact for batches without padding; see its contract). A
    quantized graph is lowered to ORT's integer kernels (``MatMulIntegerToFloat``,
    ``MatMulNBits`` with ``accuracy_level``). Written atomically.

    Returns:
        ``(path, shares_buffer)``: ``shares_buffer`` when every past input is read only by
        fused attention ops, so the runtime may keep past and present in one buffer of the
        context length (ORT GenAI's ``past_present_share_buffer``, no cache copy per step).

    Raises:
        ExportError: re-export or translation failed (names the path and the cause).
    """
    from backends.onnxruntime import export_onnx

    if logits not in LOGITS_MODES:
        raise ValueError(f"logits must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
    if logits == "last":
        kv, note = last_position_logits(kv)
        log.info("%s", note)
    gm, table, shares_buffer = kv.graph_module, {}, False
    if fused:
        from backends import ort_fused

        gm, stats = ort_fused.lower_fused(kv, max_positions=max_positions)
        table.update(ort_fused.translation_table())
        shares_buffer = stats.cache_only_in_attention
        for note in stats.notes:
            log.info("fused lowering: %s", note)
    if ir.is_quantized(gm):
        from backends.ort_quant import lower_for_ort, translation_table

        gm, _ = lower_for_ort(gm, accuracy_level=accuracy_level)
        table.update(translation_table())
    dim = torch.export.Dim
    batch, seq = dim("batch_size", max=4096), dim("sequence_length", max=65536)
    past_len = dim("past_sequence_length", max=65536)
    examples: list[torch.Tensor] = [torch.zeros(2, 3, dtype=torch.long),
                                    torch.ones(2, 5, dtype=torch.long)]
    shapes: list[dict] = [{0: batch, 1: seq}, {0: batch, 1: dim.AUTO}]
    for layer in kv.layers:
        for width in (layer.head_dim, layer.value_head_dim):
            examples.append(torch.zeros(2, layer.kv_heads, 2, width))
            shapes.append({0: batch, 2: past_len})
    names_in, names_out = kv.input_names(), kv.output_names()
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"} if logits == "all" else {0: "batch_size"},
    }
    for name in names_in[2:]:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in names_out[1:]:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    path = export_onnx(gm, path, example_inputs=examples, custom_translation_table=table or None,
                       input_names=names_in, output_names=names_out, dynamic_shapes=shapes,
                       axis_names=axes, external_data=external_data)
    return path, shares_buffer


def genai_config(kv, config: dict, *, context_length: int | None = None,
                 threads: int | None = None) -> dict:
    """The ``genai_config.json`` content for a KV-cache export of a model with ``config``."""
    heads = {layer.kv_heads for layer in kv.layers}
    dims = {layer.head_dim for layer in kv.layers} | {layer.value_head_dim for layer in kv.layers}
    if len(heads) != 1 or len(dims) != 1:
        raise PreconditionError(
            f"ONNX Runtime GenAI needs one cache shape for every layer; this graph has kv heads "
            f"{sorted(heads)} and head dims {sorted(dims)} (export with cache_heads=max)")
    ctx = int(context_length or config.get("max_position_embeddings") or config.get("n_positions")
              or DEFAULT_CONTEXT)
    eos = config.get("eos_token_id")
    pad = config.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads is not None:
        session["intra_op_num_threads"] = int(threads)
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id", 0 if eos is None else eos),
            "context_length": ctx,
            "decoder": {
                "session_options": session,
                "filename": MODEL_FILE,
                "head_size": dims.pop(),
                "hidden_size": int(config.get("hidden_size") or config.get("n_embd") or 0),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(config.get("num_attention_heads")
                                           or config.get("n_head") or heads.copy().pop()),
                "num_hidden_layers": kv.num_layers,
                "num_key_value_heads": heads.pop(),
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else 0,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": int(config.get("vocab_size") or 0),
        },
        "search": {
            "do_sample": False,
            "max_length": ctx,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def export_genai(kv, folder: str | os.PathLike, *, config: dict,
                 tokenizer_dir: str | os.PathLike | None, overwrite: bool = False,
                 accuracy_level: int | str = "auto", context_length: int | None = None,
                 threads: int | None = None, fused: bool = True, logits: str = "last") -> Path:
    """Write the GenAI folder (see the module doc) atomically: all of it or nothing.

    Args:
        kv: the KV-cache graph (uniform cache shape across layers).
        folder: the target folder; an existing non-empty one needs ``overwrite``.
        config: the model's config dict (token ids, context length, sizes).
        tokenizer_dir: folder with ``tokenizer.json`` (copied); None writes no tokenizer
            (ORT GenAI then cannot tokenize text, only take token ids).
        accuracy_level: ``MatMulNBits`` accuracy level for int4 weights; ``"auto"`` (default)
            is 4 (int8 compute) on CPUs with int8 dot products, else 0
            (``backends.ort_quant.resolve_accuracy_level``); 0 is the graph's float arithmetic.
        context_length: default: the config's ``max_position_embeddings``.
        threads: ``intra_op_num_threads`` in the session options (default: ORT's).
        fused: lower norms and attention to ORT's fused kernels (``backends.ort_fused``).
        logits: ``"last"`` (default): the last position's logits only, all that generation
            reads (ORT GenAI picks the prompt's last position either way), so the LM head
            runs one row per sequence in the prefill; ``"all"``: every position's (scoring).

    Raises:
        ArtifactError: the target exists and is not empty, or cannot be written.
        ExportError, PreconditionError: as :func:`export_kv_onnx`, :func:`genai_config`.
    """
    folder = Path(folder)
    cfg = genai_config(kv, config, context_length=context_length, threads=threads)
    with staged_dir(folder, "the GenAI folder", overwrite=overwrite) as tmp:
        _, shares_buffer = export_kv_onnx(kv, tmp / MODEL_FILE, accuracy_level=accuracy_level,
                                          fused=fused, max_positions=cfg["model"]["context_length"],
                                          logits=logits)
        cfg["search"]["past_present_share_buffer"] = shares_buffer
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=4))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
    log.info("wrote ONNX Runtime GenAI folder %s", folder)
    return folder


# ----------------------------------------------------------------------------- runners


def read_genai_config(folder: str | os.PathLike) -> dict:
    """The folder's ``genai_config.json``, checked to name a model file that exists."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {CONFIG_FILE} (not an exported GenAI folder; write "
                            "one with cm.export_genai or fxcompress compile --genai)")
    try:
        cfg = json.loads(path.read_text())
        decoder = cfg["model"]["decoder"]
        model_file = folder / decoder["filename"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: corrupt GenAI config ({type(e).__name__}: {e})") from e
    if not model_file.is_file():
        raise ArtifactError(f"{path} names {model_file.name}, which is missing")
    return cfg


class ORTCausalLM:
    """An exported GenAI folder run with ONNX Runtime and the project's generation loop.

    Args:
        folder: a folder written by :func:`export_genai` (or any with the same IO names).
        threads: ``intra_op_num_threads`` (default ORT's).
    """

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None):
        from backends.onnxruntime import ORTModel

        self.folder = Path(folder)
        self.config = read_genai_config(self.folder)
        decoder = self.config["model"]["decoder"]
        self.model = ORTModel(self.folder / decoder["filename"], threads=threads)
        self.num_layers = int(decoder["num_hidden_layers"])
        names = self.model.input_names
        pasts = [n for n in names if n.startswith("past_key_values.")]
        if "input_ids" not in names or "attention_mask" not in names or \
                len(pasts) != 2 * self.num_layers:
            raise ArtifactError(
                f"{self.model.path}: inputs {names} do not match the GenAI layout of "
                f"{self.num_layers} layers (input_ids, attention_mask, 2 x {self.num_layers} past)")
        self._past_shapes = {i.name: i.shape for i in self.model.session.get_inputs()}
        self.stats = GenerationStats()

    @property
    def context_length(self) -> int:
        return int(self.config["model"].get("context_length") or DEFAULT_CONTEXT)

    def empty_cache(self, batch: int) -> dict[str, Any]:
        import numpy as np

        past = {}
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                name = f"past_key_values.{i}.{kind}"
                _, heads, _, width = self._past_shapes[name]
                past[name] = np.zeros((batch, int(heads), 0, int(width)), dtype=np.float32)
        return past

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             past: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One forward with the cache: ``(logits, present as the next past)``; ``logits`` is
        ``[B, 1, V]`` for a ``logits="last"`` export (the default), ``[B, S, V]`` otherwise."""
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"{self.num_layers} layers take {2 * self.num_layers} past tensors, "
                             f"got {len(past)}")
        feeds = {"input_ids": input_ids.numpy().astype("int64"),
                 "attention_mask": attention_mask.numpy().astype("int64"), **past}
        outs = self.model.session.run(None, feeds)
        present = {}
        for name, value in zip(self.model.output_names[1:], outs[1:]):
            present[name.replace("present.", "past_key_values.")] = value
        return torch.from_numpy(outs[0]), present

    def generate(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 streamer: Any = None, **options: Any) -> torch.Tensor:
        """Prompt + new ids, as :meth:`compiler.api.CompiledModel.generate`."""
        opts = _options(options, self.config["model"].get("eos_token_id"))
        return generate(self.step, input_ids, self.empty_cache(input_ids.shape[0]),
                        attention_mask=attention_mask, options=opts, streamer=streamer,
                        max_length=self.context_length, stats=self.stats)


def _options(options: dict, default_eos) -> SamplingOptions:
    options = dict(options)
    options.setdefault("eos_token_id", default_eos)
    return SamplingOptions.from_kwargs(**options)


def genai_generate(folder: str | os.PathLike, input_ids: torch.Tensor | Sequence[int], *,
                   streamer: Callable[[int], None] | None = None,
                   stats: GenerationStats | None = None, **options: Any) -> list[int]:
    """Generate with onnxruntime-genai's own loop (batch 1); returns prompt + new ids.

    Options as :class:`compiler.generation.SamplingOptions` (``seed`` sets GenAI's
    ``random_seed``). ``streamer`` receives each new token id.

    Raises:
        PreconditionError: onnxruntime-genai is not installed.
        ArtifactError: the folder is not a GenAI folder or ORT GenAI cannot load it.
        ValueError: bad options, or a prompt that does not fit the context.
    """
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise PreconditionError("onnxruntime-genai is not installed (pip install "
                                "'fxcompress[genai]' or onnxruntime-genai)") from e
    cfg = read_genai_config(folder)
    ids = [int(t) for t in (input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor)
                            else input_ids)]
    opts = _options(options, cfg["model"].get("eos_token_id"))
    ctx = int(cfg["model"].get("context_length") or DEFAULT_CONTEXT)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens and the model's context length is "
                         f"{ctx}: no room to generate (shorten the prompt)")
    try:
        model = og.Model(str(folder))
    except Exception as e:  # ORT GenAI raises RuntimeError with its own message
        raise ArtifactError(f"onnxruntime-genai could not load {folder}: {e}") from e
    params = og.GeneratorParams(model)
    search: dict[str, Any] = {"max_length": min(len(ids) + opts.max_new_tokens, ctx),
                              "do_sample": opts.do_sample}
    if opts.do_sample:
        search.update(temperature=opts.temperature, top_p=opts.top_p,
                      top_k=opts.top_k or int(cfg["model"].get("vocab_size") or 0) or 50)
        if opts.seed is not None:
            search["random_seed"] = int(opts.seed)
    params.set_search_options(**search)
    gen = og.Generator(model, params)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens, stats.per_step = len(ids), 0, []
    # append_tokens runs the prompt; the first generate_next_token only picks from its logits,
    # every later one runs the model on the previous token first
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    first = True
    while not gen.is_done():
        gen.generate_next_token()
        tok = int(gen.get_next_tokens()[0])
        now = time.perf_counter()
        if first:
            stats.prefill_seconds, first = now - t0, False
        else:
            stats.per_step.append(now - t0)
        t0 = now
        stats.new_tokens += 1
        if streamer is not None:
            streamer(tok)
    stats.decode_seconds = sum(stats.per_step)
    return [int(t) for t in gen.get_sequence(0)]


__all__ = ["ORTCausalLM", "export_genai", "export_kv_onnx", "genai_config", "genai_generate",
           "read_genai_config"]
