"""Token generation over any step function with a KV cache: greedy, temperature, top-k, top-p.

One loop serves every runtime: the compiled graph with its cache (``CompiledModel.generate``)
and ONNX Runtime on an exported folder (``backends.genai.ORTCausalLM``). A *step* maps
``(input_ids [B, T], attention_mask [B, P+T], past) -> (logits [B, T, V], present)``; the loop
runs the prompt once (prefill), then one token per step, feeding ``present`` back as ``past``.

Sampling follows Hugging Face's order: temperature, then top-k, then top-p (nucleus: the
smallest set of tokens whose probability reaches ``top_p``, always at least one), then a draw
from a seeded ``torch.Generator``. Greedy decoding takes the argmax (first index on ties, as
``torch.argmax`` and Hugging Face do). Rows that emitted an end-of-sequence token keep
emitting it (Hugging Face pads finished rows with ``pad_token_id``; we use the EOS id, which
is what its ``generate`` does when the two are the same) and the loop stops once every row
has finished.

Streaming: ``streamer`` is either a Hugging Face style object (``put(ids)`` called with the
prompt first and then each new ``[B]`` token tensor, ``end()`` at the end, as
``transformers.TextStreamer`` expects) or a plain callable receiving each new ``[B]`` token
tensor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

log = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class SamplingOptions:
    """Validated generation options (the names Hugging Face's ``generate`` uses).

    Raises:
        ValueError: an option out of range, naming it.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingOptions:
        """Build from keyword options; an unknown option is a ``ValueError`` listing the known."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, Sequence) and not isinstance(eos, str):
            kwargs["eos_token_id"] = tuple(int(e) for e in eos)
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "eos_token_id"})

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


@dataclass
class GenerationStats:
    """Timing of the last generation: prefill seconds and decode tokens per second."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    per_step: list[float] = field(default_factory=list, repr=False)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first new token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (f"{self.new_tokens} new tokens; prefill {self.prompt_tokens} tokens "
                f"{self.prefill_seconds * 1e3:.1f} ms; decode "
                f"{self.decode_tokens_per_second:.1f} tokens/s")


def next_tokens(logits: torch.Tensor, opts: SamplingOptions,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from ``logits [B, V]`` (greedy or sampled)."""
    if not opts.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / opts.temperature
    if opts.top_k:
        k = min(opts.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (keeps at least one)
        drop = probs.cumsum(dim=-1) - probs >= opts.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(step: Step, input_ids: torch.Tensor, empty_past: Any, *,
             attention_mask: torch.Tensor | None = None, options: SamplingOptions,
             streamer: Any = None, max_length: int | None = None,
             stats: GenerationStats | None = None) -> torch.Tensor:
    """Generate with a KV-cache step function; returns prompt + new ids ``[B, S + n]``.

    Args:
        step: ``(input_ids, attention_mask, past) -> (logits, present)``.
        input_ids: the prompt ``[B, S]`` (left-padded when rows differ; see ``attention_mask``).
        empty_past: the cache for a prefill (length 0).
        attention_mask: ``[B, S]``, 0 at padding; default all ones.
        options: :class:`SamplingOptions`.
        streamer: see the module doc.
        max_length: the model's context length: a prompt that does not fit is an error, and
            generation stops when the context is full.
        stats: filled with the prefill time and decode speed.

    Raises:
        ValueError: empty or wrongly shaped prompt, a prompt longer than the context.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0 \
            or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a non-empty integer tensor [batch, seq], got {shape}")
    b, s = input_ids.shape
    if max_length is not None and s >= max_length:
        raise ValueError(f"the prompt has {s} tokens and the model's context length is "
                         f"{max_length}: no room to generate (shorten the prompt)")
    budget = options.max_new_tokens
    if max_length is not None and s + budget > max_length:
        log.warning("generating %d tokens, not %d: the context length is %d", max_length - s,
                    budget, max_length)
        budget = max_length - s
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"attention_mask must have the prompt's shape {(b, s)}, got "
                         f"{tuple(mask.shape)}")
    gen = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens, stats.per_step = s, 0, []
    eos = torch.tensor(options.eos_ids, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    out = [input_ids.long()]
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids)
    past, feed = empty_past, input_ids.long()
    t_start = time.perf_counter()
    for i in range(budget):
        t0 = time.perf_counter()
        logits, past = step(feed, mask, past)
        tok = next_tokens(logits[:, -1, :], options, gen)
        if eos.numel():
            tok = torch.where(done, eos[0], tok)
            done |= torch.isin(tok, eos)
        dt = time.perf_counter() - t0
        if i == 0:
            stats.prefill_seconds = dt
        else:
            stats.per_step.append(dt)
        out.append(tok[:, None])
        stats.new_tokens += 1
        if streamer is not None:
            (streamer.put if hasattr(streamer, "put") else streamer)(tok)
        if bool(done.all()):
            break
        feed = tok[:, None]
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
    stats.decode_seconds = sum(stats.per_step)
    log.debug("generated %d tokens in %.3fs", stats.new_tokens, time.perf_counter() - t_start)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return torch.cat(out, dim=1)


class TextPrinter:
    """A streamer that prints the decoded text of row 0 as tokens arrive.

    Decodes the whole generated sequence each time and prints what was added, so tokens that
    only form a character together (byte-level pieces) print correctly.
    """

    def __init__(self, tokenizer, *, file=None, skip_prompt: bool = True):
        import sys

        self.tokenizer = tokenizer
        self.file = file or sys.stdout
        self.skip_prompt = skip_prompt
        self.ids: list[int] = []
        self.printed = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
            self.ids.extend(int(t) for t in value[0].tolist())
        else:
            self.ids.append(int(value.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return
        if text.startswith(self.printed):
            self.file.write(text[len(self.printed):])
            self.file.flush()
        self.printed = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.file.write(text[len(self.printed):])
        self.file.write("\n")
        self.file.flush()


__all__ = ["GenerationStats", "SamplingOptions", "TextPrinter", "generate", "next_tokens"]
