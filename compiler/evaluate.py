"""Perplexity of any ``input_ids -> logits`` callable over fixed evaluation windows.

Protocol (``shared/BENCHMARKS.md``, as in GPTQ/SparseGPT/SliceGPT): non-overlapping windows, each
``[BOS] + (L - 1)`` text tokens (see :func:`compiler.data.eval_windows`); position ``t`` predicts
token ``t + 1``, so every window scores its ``L - 1`` text tokens and BOS is never a target.

    ppl = exp( sum over windows and scored positions of -log p(token) / scored tokens )

Cross-entropy is computed per token in the logits' precision (float32 at least) and summed in
float64, so the result does not depend on the batch size beyond float64 rounding.

The model is anything callable on a LongTensor ``[batch, L]``: an ``nn.Module`` (HF
``*ForCausalLM`` outputs with ``.logits`` are accepted), a traced ``fx.GraphModule``, a
:class:`compiler.api.CompiledModel`, or an ONNX Runtime wrapper returning a numpy array.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from compiler.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over ``n_windows`` windows of ``window`` tokens (``scored_tokens`` targets)."""

    ppl: float
    nll_mean: float
    n_windows: int
    window: int
    scored_tokens: int
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"ppl {self.ppl:.2f} ({self.n_windows} windows x {self.window} tokens, "
                f"{self.scored_tokens:,} scored tokens)")

    def relative_change(self, baseline: PerplexityResult) -> float:
        """``ppl / baseline.ppl - 1`` (e.g. 0.012 for +1.2%)."""
        return self.ppl / baseline.ppl - 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_vocab_size(model_fn: Any) -> int | None:
    """The vocabulary size a model declares (HF config, CompiledModel, traced graph), or None."""
    config = getattr(model_fn, "config", None)
    v = config.get("vocab_size") if isinstance(config, dict) else getattr(config, "vocab_size", None)
    if v is None:
        meta = getattr(model_fn, "meta", None)
        if isinstance(meta, dict):
            v = (meta.get("fxcompress_config") or {}).get("vocab_size")
    if v is None and hasattr(model_fn, "graph_module"):
        return model_vocab_size(model_fn.graph_module)
    return int(v) if v is not None else None


def _call(model_fn: Any, batch: torch.Tensor) -> Any:
    config = getattr(model_fn, "config", None)
    if isinstance(model_fn, torch.nn.Module) and hasattr(config, "model_type"):
        # An HF model would otherwise build a KV cache it never uses.
        return model_fn(input_ids=batch, use_cache=False)
    return model_fn(batch)


def _logits_of(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return torch.as_tensor(out)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``, differentiable.

    The training-side counterpart of :func:`perplexity` (same targets), for passes that take
    gradients of the language-model loss (``structured_prune``'s Taylor scores, ``lora``).
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))


def perplexity(model_fn: Callable[[torch.Tensor], Any], windows: torch.Tensor, *,
               batch_size: int = 8, progress: bool = True,
               vocab_size: int | None = None) -> PerplexityResult:
    """Perplexity of ``model_fn`` on ``windows`` (``[n, L]``, each window scored on ``L - 1`` tokens).

    Args:
        model_fn: callable ``input_ids [b, L] -> logits [b, L, V]``.
        windows: LongTensor ``[n, L]`` from :func:`compiler.data.eval_windows`.
        batch_size: windows per forward call.
        progress: show a tqdm bar (only on a terminal: tqdm's ``disable=None``).
        vocab_size: the model's vocabulary size for the id check; default: read from the model
            (config or graph metadata), else the logits' last dim.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: ``L < 2``, no windows, or ``batch_size < 1``.
        DataError: windows not integer ``[n, L]``, token ids outside the vocabulary, or logits of
            the wrong shape.
    """
    from tqdm.auto import tqdm

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        desc = f"{windows.dtype} {tuple(windows.shape)}" if isinstance(windows, torch.Tensor) else (
            type(windows).__name__)
        raise DataError(f"windows must be an integer tensor [n_windows, window], got {desc}")
    n, L = windows.shape
    if L < 2:
        raise ValueError(f"window must be >= 2 tokens (one is never scored), got {L}")
    if n == 0:
        raise ValueError("no windows to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = windows.long()
    vocab = vocab_size if vocab_size is not None else model_vocab_size(model_fn)
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise DataError(
            f"token ids in [{lo}, {hi}] fall outside the model's vocabulary [0, {vocab}): "
            "wrong tokenizer for this model?"
        )
    # Exported GraphModules report training=True but hold no dropout: only warn for real modules.
    if (isinstance(model_fn, torch.nn.Module) and not isinstance(model_fn, torch.fx.GraphModule)
            and model_fn.training):
        log.warning("%s is in training mode (dropout active): call .eval() for a stable perplexity",
                    type(model_fn).__name__)

    t0 = time.perf_counter()
    total = 0.0  # python float: float64 accumulation
    bar = tqdm(total=n, desc="perplexity", unit="win", disable=None if progress else True,
               leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size]
                logits = _logits_of(_call(model_fn, batch))
                if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(batch.shape):
                    raise DataError(
                        f"model returned logits of shape {tuple(logits.shape)} for input_ids "
                        f"{tuple(batch.shape)}; expected [batch, seq, vocab]"
                    )
                if hi >= logits.shape[-1]:
                    raise DataError(
                        f"token id {hi} is outside the model's vocabulary of {logits.shape[-1]} "
                        "logits: wrong tokenizer for this model?"
                    )
                if not logits.is_floating_point():
                    raise DataError(f"model returned non-float logits ({logits.dtype})")
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                # Position t predicts token t + 1; BOS (position 0) is never a target.
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    batch[:, 1:].reshape(-1).to(logits.device),
                    reduction="none",
                )
                total += float(nll.double().sum())
                bar.update(batch.shape[0])
    finally:
        bar.close()
    scored = n * (L - 1)
    nll_mean = total / scored
    result = PerplexityResult(
        ppl=math.exp(nll_mean), nll_mean=nll_mean, n_windows=n, window=L, scored_tokens=scored,
        seconds=time.perf_counter() - t0,
    )
    log.info("%s in %.1f s", result, result.seconds)
    return result


def perplexity_on(model_fn: Callable[[torch.Tensor], Any], spec: str, tokenizer: Any, *,
                  batch_size: int = 8, progress: bool = True,
                  data_dir: Any = None) -> PerplexityResult:
    """Perplexity on a dataset spec (``"tinystories:256x256"``; default 256 x 256 windows).

    Args:
        model_fn: callable ``input_ids -> logits``.
        spec: ``name[:NxL]`` (see :func:`compiler.data.parse_dataset_spec`).
        tokenizer: a tokenizer or the model folder holding ``tokenizer.json``.
        batch_size, progress: as :func:`perplexity`.
        data_dir: override of the data directory.
    """
    from compiler.data import eval_windows_from_spec

    windows = eval_windows_from_spec(spec, tokenizer, data_dir=data_dir)
    return perplexity(model_fn, windows, batch_size=batch_size, progress=progress)
