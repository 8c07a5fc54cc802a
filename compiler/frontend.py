"""Frontend: load a causal LM and trace it to one ATen-level torch.fx GraphModule.

torch.export is the only frontend (transformers 5 has no fx tracer and
``torch.fx.symbolic_trace`` fails on HF models). The model is wrapped as
``forward(input_ids) -> logits`` with ``use_cache=False`` and exported with dynamic batch and
sequence dims; ``.module()`` gives the GraphModule every pass works on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compiler.errors import UnsupportedModelError

log = logging.getLogger(__name__)

# Tiny random-init configs per family (seeded init); used by tests, the CLI default and examples.
# Families that transformers ships; the architecture knowledge lives in the channel-graph rules,
# not here: these are only sizes.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=512, tie_word_embeddings=False),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=256, max_position_embeddings=512,
                word_embed_proj_dim=64, enable_bias=True),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=256,
                 n_positions=512, bos_token_id=0, eos_token_id=0),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=512, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=256, max_position_embeddings=512, sliding_window=None),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                 max_position_embeddings=512, pad_token_id=0, bos_token_id=0,
                 eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                     max_position_embeddings=512),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  max_position_embeddings=512),
}

# More decoder-only families for the family matrix (tests/compiler/test_families.py), one layer
# each so the matrix stays cheap; kept out of TINY_CONFIGS, which every backend test iterates.
# The four below the first line each stress one mechanism: ALiBi bias shapes (bloom), an
# embedding scale on the stream, post-norms and a soft-capped tied LM head (gemma2), parallel
# attention with a fused multi-query qkv (falcon), post-norms and q/k norms (olmo2).
MATRIX_CONFIGS: dict[str, dict[str, Any]] = {
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=1, n_head=4, vocab_size=256),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128,
                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=256, max_position_embeddings=512),
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                   parallel_attn=True, bias=False, vocab_size=256),
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=512, eos_token_id=0, pad_token_id=0),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  max_position_embeddings=512),
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                max_position_embeddings=512),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, vocab_size=256, max_position_embeddings=512),
    "gpt_bigcode": dict(model_type="gpt_bigcode", hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=4, vocab_size=256, max_position_embeddings=512),
    "granite": dict(model_type="granite", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=256, max_position_embeddings=512),
    "stablelm": dict(model_type="stablelm", hidden_size=64, intermediate_size=128,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=256, max_position_embeddings=512),
    "starcoder2": dict(model_type="starcoder2", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=256, max_position_embeddings=512),
    # mixture of experts (traced with batched expert matmuls, see exportable_experts)
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=256, max_position_embeddings=512, num_local_experts=4,
                    num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=512, num_experts=4, num_experts_per_tok=2),
    # from the family survey (benchmarks/family_survey.py): multi-head latent attention
    # (DeepSeek-V3; one layer is its dense first layer), MLA with a sparse-attention indexer,
    # gated RMSNorms and shape guards torch.export cannot prove (AXK2: checked per length, see
    # trace), and partial rotary with parallel attention (CodeGen)
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=8, q_lora_rank=32, kv_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        n_group=1, topk_group=1, vocab_size=256, max_position_embeddings=512),
    "axk2": dict(model_type="axk2", hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=8, q_lora_rank=32, kv_lora_rank=32,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                 num_experts_per_tok=2, n_shared_experts=1, vocab_size=256,
                 max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                 mlp_layer_types=["dense"], layer_types=["indexed_attention"]),
    "codegen": dict(model_type="codegen", n_embd=64, n_layer=1, n_head=4, rotary_dim=8,
                    vocab_size=256, n_positions=512, n_ctx=512, bos_token_id=0,
                    eos_token_id=0),
    # refused by rotation_invariant / slicegpt (a written-out LayerNorm, see the README table)
    "cohere": dict(model_type="cohere", hidden_size=64, intermediate_size=128,
                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=256, max_position_embeddings=512),
}


class CausalLMWrapper(torch.nn.Module):
    """``forward(input_ids) -> logits`` around an HF ``*ForCausalLM`` or a plain module."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._is_hf = hasattr(model, "config") and hasattr(model.config, "model_type")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._is_hf:
            return self.model(input_ids=input_ids, use_cache=False).logits
        out = self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out


def tiny_config(family: str, **overrides: Any):
    """A transformers config for a tiny random-init model of ``family`` (see TINY_CONFIGS)."""
    from transformers import AutoConfig

    known = {**MATRIX_CONFIGS, **TINY_CONFIGS}
    if family not in known:
        raise UnsupportedModelError(
            f"no tiny config for family {family!r}; known: {', '.join(sorted(known))}"
        )
    kw = dict(known[family])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def load_model(spec: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a causal LM from a local HF folder, a config (random init), a tiny family name or a module.

    Args:
        spec: an ``nn.Module`` (returned as is, in eval mode); a path to a local Hugging Face
            folder (``config.json`` + weights); a GGUF checkpoint (see :func:`find_gguf`: a
            folder with ``gguf/<one file>.gguf`` and ``hf/config.json``, a folder with one
            ``.gguf`` file and optionally ``config.json``, or the ``.gguf`` file itself),
            dequantized to ``dtype``; a transformers ``PretrainedConfig`` or a path to a
            ``config.json`` (random init with ``seed``); or ``"tiny-<family>"`` (``tiny-llama``...).
        seed: seed for random init.
        dtype: parameter dtype.

    Returns:
        The model in eval mode.

    Raises:
        UnsupportedModelError: missing path, unknown family, a model that is not a decoder-only
            causal LM (encoder-only, seq2seq), or a GGUF checkpoint that is missing, ambiguous
            (several ``.gguf`` files), unreadable, or needs a package that is not installed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(spec, torch.nn.Module):
        check_causal_lm(spec)
        return spec.eval()
    if isinstance(spec, PretrainedConfig):
        return _from_config(spec, seed, dtype)
    if isinstance(spec, str) and spec.startswith("tiny-"):
        return _from_config(tiny_config(spec[len("tiny-") :]), seed, dtype)
    path = Path(os.fspath(spec))
    if not path.exists():
        raise UnsupportedModelError(
            f"model path {str(path)!r} does not exist (expected a local Hugging Face folder, a "
            f"config.json, or 'tiny-<family>' with family in {sorted(TINY_CONFIGS)})"
        )
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype)
    if path.is_file():
        if path.suffix != ".json":
            raise UnsupportedModelError(f"{path}: expected a folder, a config.json or a .gguf file")
        config = AutoConfig.from_pretrained(str(path.parent)) if path.name == "config.json" else (
            PretrainedConfig.from_dict(json.loads(path.read_text()))
        )
        return _from_config(config, seed, dtype)
    if is_gguf_folder(path):
        return load_gguf(find_gguf(path), dtype=dtype)
    if not (path / "config.json").exists():
        raise UnsupportedModelError(
            f"{path}: no config.json in this folder (expected a Hugging Face folder, or a GGUF "
            "folder: gguf/<model>.gguf + hf/config.json)"
        )
    config = AutoConfig.from_pretrained(str(path))
    _check_config(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path}: could not load weights: {e}") from e
    return model.eval()


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def is_gguf_folder(path: Path) -> bool:
    """True if ``path`` is a folder whose weights are a GGUF checkpoint (see :func:`find_gguf`).

    A folder with Hugging Face weights (``model.safetensors``...) is a Hugging Face folder even
    if it also holds a ``.gguf`` file.
    """
    if not path.is_dir() or any((path / f).exists() for f in _HF_WEIGHTS):
        return False
    return (path / "gguf").is_dir() or any(path.glob("*.gguf"))


def find_gguf(path: str | os.PathLike) -> Path:
    """The one ``.gguf`` file of a GGUF model folder.

    Layouts: ``<path>/gguf/<one file>.gguf`` (with ``<path>/hf/`` holding config.json and the
    tokenizer, as ``shared/data/smollm2-135m-instruct-q4_1``), or ``<path>/<one file>.gguf``.

    Raises:
        UnsupportedModelError: no ``.gguf`` file, or more than one (ambiguous).
    """
    path = Path(path)
    where = path / "gguf" if (path / "gguf").is_dir() else path
    files = sorted(f for f in where.glob("*.gguf") if f.is_file())
    if not files:
        raise UnsupportedModelError(
            f"{where}: no .gguf file in this folder (a GGUF model folder holds exactly one)"
        )
    if len(files) > 1:
        raise UnsupportedModelError(
            f"{where}: {len(files)} .gguf files ({', '.join(f.name for f in files)}); ambiguous, "
            "give the path of the one to load"
        )
    return files[0]


def _gguf_config_dir(gguf_file: Path) -> Path | None:
    """The folder whose config.json describes ``gguf_file``: beside it, or the layout's ``hf/``."""
    for d in (gguf_file.parent, gguf_file.parent.parent / "hf"):
        if (d / "config.json").is_file():
            return d
    return None


def _require_package(name: str, what: str) -> None:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as e:
        raise UnsupportedModelError(
            f"{what} needs the {name!r} package, which is not installed: pip install {name} "
            "(or pip install 'fxcompress[gguf]')"
        ) from e


@contextlib.contextmanager
def _memoized_gguf_name_map():
    """Memoize ``gguf.get_tensor_name_map`` while transformers maps tensor names.

    transformers rebuilds the same name table once per submodule (about 400 times, 6 s of a
    135M model's load on 2 cores); the table is a pure function of (architecture, layers).
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def load_gguf(gguf_file: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a GGUF checkpoint as a dense transformers causal LM in ``dtype``.

    Every weight is dequantized at load (a Q4_1 file gives float32 weights that sit exactly on
    its 4-bit grid). The config is the ``config.json`` beside the file or in the layout's
    ``hf/`` folder when there is one, else the file's own metadata. Loads through
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which needs the ``gguf`` and
    ``accelerate`` packages (``pip install 'fxcompress[gguf]'``).

    Raises:
        UnsupportedModelError: a package is missing, or the file is unreadable or not a
            supported decoder-only architecture; the message names the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_file = Path(gguf_file)
    try:
        with open(gguf_file, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UnsupportedModelError(f"{gguf_file}: cannot read: {e}") from e
    if magic != b"GGUF":
        raise UnsupportedModelError(
            f"{gguf_file}: not a GGUF file (it does not start with the GGUF magic bytes; corrupt "
            "or misnamed?)"
        )
    _require_package("gguf", f"loading {gguf_file.name}")
    _require_package("accelerate", f"loading {gguf_file.name}")
    kwargs: dict[str, Any] = {}
    try:
        from transformers.utils.quantization_config import GgufConfig

        # Dense float weights even where transformers could keep GGUF blocks packed: passes
        # rewrite plain linears.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    config_dir = _gguf_config_dir(gguf_file)
    try:
        if config_dir is not None:
            kwargs["config"] = AutoConfig.from_pretrained(str(config_dir))
            _check_config(kwargs["config"])
        with _memoized_gguf_name_map():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_file.parent), gguf_file=gguf_file.name, dtype=dtype,
                local_files_only=True, **kwargs,
            )
    except UnsupportedModelError:
        raise
    except Exception as e:  # gguf and transformers raise many kinds on a bad file; name it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsupportedModelError(
            f"{gguf_file}: cannot load this GGUF checkpoint (corrupt or truncated file, or an "
            f"architecture transformers cannot read): {type(e).__name__}: {first}"
        ) from e
    _check_config(model.config)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise UnsupportedModelError(
            f"{gguf_file}: transformers kept a GGUF quantizer on the model; expected dense weights"
        )
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != dtype})
    if bad:
        raise UnsupportedModelError(
            f"{gguf_file}: loaded with {', '.join(bad)} parameters, expected {dtype} (weights left "
            "packed?)"
        )
    log.info("loaded %s (%s, %d layers)", gguf_file, type(model).__name__,
             getattr(model.config, "num_hidden_layers", -1))
    return model.eval()


def tokenizer_dir_of(path: str | os.PathLike) -> Path | None:
    """The folder holding the ``tokenizer.json`` of a model path, or None.

    ``path`` itself for a Hugging Face folder; ``path/hf`` for the GGUF layout
    (``gguf/<model>.gguf`` + ``hf/``); for a file (config.json, a ``.gguf``), the same lookup
    from its folder; for the layout's ``gguf/`` folder (or a file in it), the sibling ``hf/``.
    """
    path = Path(os.fspath(path))
    base = path.parent if path.is_file() else path
    candidates = [base, base / "hf"]
    if any(base.glob("*.gguf")):  # the layout's gguf/ folder itself
        candidates.append(base.parent / "hf")
    for d in candidates:
        if (d / "tokenizer.json").is_file():
            return d
    return None


def _from_config(config, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    _check_config(config)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # the family's own code rejects this config; name where
        site = _innermost_model_frame(e)
        raise UnsupportedModelError(
            f"transformers could not build a {config.model_type} causal LM "
            f"({type(config).__name__}) from this config{' at ' + site if site else ''}: "
            f"{type(e).__name__}: {str(e).strip()[:300]}"
        ) from e
    return model.eval()


def _check_config(config) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type} ({name}) is an encoder-decoder (seq2seq) model; fxcompress "
            "compiles decoder-only causal LMs"
        )
    if _is_encoder_family(config):
        raise UnsupportedModelError(
            f"{config.model_type} ({name}) is an encoder-only model (is_decoder=False), not a "
            "causal LM; fxcompress compiles decoder-only causal LMs"
        )
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(
            f"{config.model_type} ({name}) has no causal-LM head in transformers (encoder-only?); "
            "fxcompress compiles decoder-only causal LMs"
        )


def _is_encoder_family(config) -> bool:
    """BERT-like: a masked-LM family whose config is not set up as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_decoder", False))


def check_causal_lm(model: torch.nn.Module) -> None:
    """Raise if an HF model is encoder-only or seq2seq; plain modules are taken on trust."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder (seq2seq) model; fxcompress compiles "
            "decoder-only causal LMs"
        )
    if _is_encoder_family(config):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-only model (is_decoder=False), not a causal LM; "
            "fxcompress compiles decoder-only causal LMs"
        )
    if not type(model).__name__.endswith("ForCausalLM") and not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal LM (no *ForCausalLM head); fxcompress "
            "compiles decoder-only causal LMs"
        )


def vocab_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def default_example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16) -> torch.Tensor:
    """Random token ids ``[batch, seq]`` within the model's vocabulary (seeded)."""
    g = torch.Generator().manual_seed(1234)
    v = vocab_size(model) or 256
    return torch.randint(0, v, (batch, seq), generator=g)


#: How mixture-of-experts layers are traced (transformers' ``experts_implementation``).
EXPORT_EXPERTS = "batched_mm"


@contextlib.contextmanager
def exportable_experts(model: torch.nn.Module):
    """Trace mixture-of-experts layers (Mixtral, OLMoE, Qwen2-MoE...) in a form ONNX can express.

    transformers runs experts with ``torch._grouped_mm`` by default, which torch.export keeps as
    one op that has no ONNX lowering; its ``eager`` loop has data-dependent shapes. While tracing,
    the model is switched to ``batched_mm``: each token gathers the weights of its top-k experts
    and multiplies them (ONNX ``Gather`` + ``MatMul``), the same function with static shapes. The
    cost is memory: the gathered weights are ``tokens x top_k`` copies of one expert's. The
    model's own setting is restored afterwards.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if current in (None, EXPORT_EXPERTS) or not hasattr(model, "set_experts_implementation"):
        yield
        return
    model.set_experts_implementation(EXPORT_EXPERTS)
    try:
        yield
    finally:
        model.set_experts_implementation(current)


def trace(model: torch.nn.Module, example_inputs: torch.Tensor | None = None) -> fx.GraphModule:
    """Export ``model`` with dynamic batch and sequence dims and return a normalised GraphModule.

    Args:
        model: a causal LM (``input_ids -> logits`` or an HF ``*ForCausalLM``).
        example_inputs: ``input_ids`` ``[batch, seq]`` (batch, seq >= 2 so export does not
            specialise them); default: random ids of shape ``[2, 16]``.

    When torch.export cannot prove the model's shape guards for the dynamic dims, the guards
    are checked on every sequence length instead (see :func:`_export_checking_guards`).

    Raises:
        UnsupportedModelError: naming the model class, the submodule and line of model code
            where export failed (or the first sequence length a shape guard fails on), and the
            underlying export failure.
    """
    check_causal_lm(model)
    model = model.eval()
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if example_inputs.dim() != 2 or example_inputs.dtype not in (torch.int64, torch.int32):
        raise UnsupportedModelError(
            f"example input_ids must be an integer tensor [batch, seq]; got {example_inputs.dtype} "
            f"{tuple(example_inputs.shape)}"
        )
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096
    wrapper = CausalLMWrapper(model)
    batch = torch.export.Dim("batch", max=4096)
    seq = torch.export.Dim("seq", max=max(int(max_pos), 2))
    guard_note = None
    try:
        with torch.no_grad(), exportable_experts(model):
            ep = torch.export.export(
                wrapper, (example_inputs,), dynamic_shapes={"input_ids": {0: batch, 1: seq}}
            )
    except Exception as e:  # torch.export raises many kinds; name the model, site and cause
        if not is_constraint_violation(e):
            raise UnsupportedModelError(
                f"torch.export failed on {type(model).__name__}{export_failure_site(e, model)}: "
                f"{export_failure_cause(e)}"
            ) from e
        ep, guard_note = _export_checking_guards(wrapper, model, example_inputs, int(max_pos), e)
    gm = ep.module()
    if guard_note is not None:
        gm.meta["fxcompress_trace_note"] = guard_note
    normalize(gm)
    gm.meta["fxcompress_model_class"] = type(model).__name__
    gm.meta["fxcompress_config"] = _config_dict(model)
    return gm


def is_constraint_violation(e: BaseException) -> bool:
    """True for torch.export's "Constraints violated" error on the requested dynamic dims."""
    return "Constraints violated" in str(e).strip().split("\n", 1)[0]


#: Sequence lengths at which a trace's shape guards are checked when torch.export cannot prove
#: them: every length up to this one, then evenly spaced lengths up to the model's maximum.
GUARD_CHECK_DENSE = 4096
GUARD_CHECK_SPARSE = 256


def _export_checking_guards(wrapper, model, example_inputs, max_pos: int, first_error):
    """Export with automatic dynamic dims when torch.export cannot prove its guards symbolically.

    torch.export refuses named dynamic dims when a shape guard of the model's code is not
    implied by the dims' ranges; its solver also fails on guards that hold for every length
    (``min(2048, seq) <= seq``, ``seq * min(64, 64 * seq) == 64 * seq``, written by MoE routing
    and sliding-window code). Here the model is exported with ``Dim.AUTO`` (the guards are kept,
    not proven), and the guards are evaluated on every batch in (2, 3) x sequence length from 2
    to ``GUARD_CHECK_DENSE`` plus ``GUARD_CHECK_SPARSE`` evenly spaced lengths up to
    ``max_position_embeddings``. A guard that fails on some length (a model that splits the
    sequence into fixed chunks, say) is refused, naming the first failing length and the guard.

    Returns:
        ``(ExportedProgram, note)``; the note says which lengths were checked.

    Raises:
        UnsupportedModelError: the automatic export failed too, a dim was specialised to one
            size, or a guard fails on some checked length.
    """
    name = type(model).__name__
    auto = torch.export.Dim.AUTO
    try:
        with torch.no_grad(), exportable_experts(model):
            ep = torch.export.export(wrapper, (example_inputs,),
                                     dynamic_shapes={"input_ids": {0: auto, 1: auto}})
    except Exception as e:
        raise UnsupportedModelError(
            f"torch.export failed on {name}{export_failure_site(e, model)}: "
            f"{export_failure_cause(e)}"
        ) from e
    gm = ep.module()
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    shape = placeholder.meta["val"].shape
    for dim, what in ((0, "batch"), (1, "sequence")):
        if isinstance(shape[dim], int):
            raise UnsupportedModelError(
                f"torch.export failed on {name}: the model's code fixes the {what} length to "
                f"{shape[dim]} (the traced graph would hold for that length only); "
                f"{export_failure_cause(first_error)}"
            ) from first_error
    guards = getattr(gm, "_guards_fn", None)
    top = max(max_pos, 2)
    lengths = list(range(2, min(top, GUARD_CHECK_DENSE) + 1))
    if top > GUARD_CHECK_DENSE:
        step = (top - GUARD_CHECK_DENSE) / GUARD_CHECK_SPARSE
        lengths += sorted({GUARD_CHECK_DENSE + round(step * (i + 1))
                           for i in range(GUARD_CHECK_SPARSE)})
    if guards is not None:
        for b in (2, 3):
            for n in lengths:
                try:
                    guards(torch.empty((b, n), dtype=example_inputs.dtype))
                except Exception as e:  # the guard function raises AssertionError-likes
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise UnsupportedModelError(
                        f"torch.export failed on {name}: the traced graph does not hold for "
                        f"every sequence length: batch {b} x {n} tokens breaks a shape guard of "
                        f"the model's code ({first[:200]}); a model that splits the sequence "
                        "into fixed chunks, or branches on its length, cannot be traced for "
                        "every length"
                    ) from first_error
    note = (f"torch.export could not prove the shape guards of {name} symbolically; they hold "
            f"for batch 2 and 3 at every sequence length 2..{min(top, GUARD_CHECK_DENSE)}"
            + (f" and {GUARD_CHECK_SPARSE} lengths up to {top}" if top > GUARD_CHECK_DENSE
               else ""))
    log.info(note)
    return ep, note


def export_failure_site(e: BaseException, model: torch.nn.Module) -> str:
    """Where in the model's code ``torch.export`` failed, as `` at <module> (<file:line> ...)``.

    The innermost frame of the model's own code (outside torch and fxcompress) names the
    construct; the innermost ``nn.Module`` among the traceback's frames names the submodule
    (``model.layers.0.self_attn``). Empty when the failure has no such frame (a guard violated
    after tracing: see :func:`export_failure_cause`).
    """
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    names = {id(m): n for n, m in model.named_modules()}
    module = None
    code = _innermost_model_frame(e)
    for tb in reversed(frames):
        f = tb.tb_frame
        if module is None:
            self_ = f.f_locals.get("self")
            if isinstance(self_, torch.nn.Module) and id(self_) in names:
                module = names[id(self_)] or "(the model)"
        if module is not None:
            break
    parts = [p for p in (module and f"module {module}", code) if p]
    return f" at {', '.join(parts)}" if parts else ""


def _innermost_model_frame(e: BaseException) -> str:
    """``file:line in function: `code``` of the innermost traceback frame of the model's code."""
    tb, last = e.__traceback__, None
    while tb is not None:
        if not _is_library_frame(tb.tb_frame.f_code.co_filename):
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    fname, lineno = last.tb_frame.f_code.co_filename, last.tb_lineno
    line = _source_line(fname, lineno)
    return f"{_short_path(fname)}:{lineno} in {last.tb_frame.f_code.co_name}" + (
        f": `{line}`" if line else "")


def export_failure_cause(e: BaseException) -> str:
    """A one-line cause of an export failure; a violated dynamic-shape guard says what it means."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if type(e).__name__ == "UserError" and "Constraints violated" in first:
        guards = [ln.strip(" -") for ln in text.splitlines()[1:] if "generated guard" in ln]
        guard = guards[0].split("generated guard", 1)[1].strip(" .") if guards else ""
        dims = first.split("(", 1)[1].split(")", 1)[0] if "(" in first else "a dim"
        return (f"the model's code constrains the dynamic {dims} dim (guard: {guard[:160]}), so "
                "torch.export cannot keep it dynamic; a model that pads or splits the sequence "
                "into fixed chunks, or branches on its length, cannot be traced for any length")
    return f"{type(e).__name__}: {first[:500]}"


def _is_library_frame(filename: str) -> bool:
    """torch, the standard library and fxcompress itself: not the model's code."""
    f = filename.replace(os.sep, "/")
    return ("/torch/" in f or "/torch_" in f or f.startswith("<") or "/contextlib.py" in f
            or os.path.dirname(os.path.abspath(f)) == os.path.dirname(os.path.abspath(__file__))
            or ("/lib/python3" in f and "-packages/" not in f)
            or "/transformers/utils/" in f)


def _short_path(filename: str) -> str:
    f = filename.replace(os.sep, "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in f:
            return f.split(marker, 1)[1]
    return f


def _source_line(filename: str, lineno: int) -> str:
    import linecache

    return linecache.getline(filename, lineno).strip()[:120]


def _config_dict(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    try:
        return json.loads(config.to_json_string(use_diff=False))
    except Exception:  # a config that cannot serialise should not stop tracing
        return {}


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's guard call and tensor-metadata asserts; dead-code-eliminate; recompile."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            g.erase_node(n)
            if hasattr(gm, str(n.target)):
                delattr(gm, str(n.target))
        elif n.op == "call_function" and n.target in (
            torch.ops.aten._assert_tensor_metadata.default,
            torch.ops.aten._assert_scalar.default,
            torch.ops.aten.sym_constrain_range_for_size.default,
        ):
            g.erase_node(n)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


def export_program(gm: torch.nn.Module, example_inputs: torch.Tensor | None = None):
    """Re-export a (compiled) GraphModule to an ``ExportedProgram`` with dynamic batch/seq dims.

    Used by saving and by the ONNX backend: both need an ExportedProgram, and re-exporting the
    GraphModule keeps one IR from trace to lowering.
    """
    if example_inputs is None:
        vocab = (getattr(gm, "meta", {}).get("fxcompress_config") or {}).get("vocab_size") or 2
        example_inputs = torch.randint(0, int(vocab), (2, 16), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", max=4096)
    seq = torch.export.Dim("seq", max=65536)
    with torch.no_grad():
        try:
            return torch.export.export(
                gm, (example_inputs,), dynamic_shapes={"input_ids": {0: batch, 1: seq}}
            )
        except Exception:
            # positional name differs for some GraphModules; fall back to a positional spec
            return torch.export.export(gm, (example_inputs,), dynamic_shapes=({0: batch, 1: seq},))
