"""Evaluation and calibration text: where it lives, how it is tokenized, how it is cut into windows.

Follows the project's benchmark protocol (``shared/BENCHMARKS.md``):

- Tokenizer: ``PreTrainedTokenizerFast`` built from the model folder's ``tokenizer.json`` (never
  ``LlamaTokenizer``, whose transformers-5 loader replaces the normaliser and changes the ids),
  with the BOS/EOS/UNK tokens taken from ``tokenizer_config.json`` / ``config.json``.
- Text: each file is tokenized whole, without special tokens.

  ============  ==================================================  =========================
  name          ``split="eval"``                                    ``split="calib"``
  ============  ==================================================  =========================
  wikitext2     ``wiki.test.raw`` as is                             the same text (warning)
  c4            the 1,000-document train sample, texts joined by    the same text
                ``"\\n\\n"`` (train data: a warning is logged)
  tinystories   the file up to and including the first blank line   the rest of the file
                at or after the midpoint (by characters)
  ============  ==================================================  =========================

- Evaluation windows: non-overlapping, each ``[BOS] + (window - 1)`` text tokens, taken from the
  start of the token stream (so 256 windows of 256 tokens score 65,280 tokens).
- Calibration windows: ``n`` distinct non-overlapping ``[BOS] + (window - 1)`` chunks of the
  calibration split, drawn with a fixed seed, grouped into batches.

Tokenizing a corpus takes seconds, so token ids are cached in memory (per file, split and
tokenizer) and on disk under ``~/.cache/fxcompress/tokens`` (``FXCOMPRESS_CACHE_DIR`` overrides
the location; ``FXCOMPRESS_CACHE_DIR=off`` disables it). Disk entries are keyed by the SHA-256 of
the exact text and of the serialised tokenizer, stored as plain ``.npy`` (no pickle), and written
atomically; an unreadable entry is ignored and rewritten.

The data directory is never part of the repository: see :func:`data_dir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compiler.errors import DataError
from compiler.frontend import tokenizer_dir_of

log = logging.getLogger(__name__)

ENV_DATA = "FXCOMPRESS_DATA"
ENV_CACHE = "FXCOMPRESS_CACHE_DIR"
_REPO = Path(__file__).resolve().parents[1]

# Relative paths inside the data dir (see shared/data/SOURCES.md for provenance and licences).
DATASETS: dict[str, str] = {
    "wikitext2": "wikitext-2-raw-v1/wiki.test.raw",
    "c4": "c4/c4-en-train.00000-of-01024.first1000.jsonl",
    "tinystories": "tinystories/TinyStories-validation.head.txt",
}
_ALIASES = {
    "wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2", "wiki": "wikitext2",
    "c4": "c4",
    "tinystories": "tinystories", "tiny-stories": "tinystories", "stories": "tinystories",
}
SPLITS = ("eval", "calib")
STORIES260K = "stories260K/hf"

DEFAULT_EVAL_WINDOWS = 256
DEFAULT_CALIB_WINDOWS = 128
DEFAULT_WINDOW = 256


# ---------------------------------------------------------------------------------------------
# Where the data is


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    """The shared data directory, or None when it cannot be found.

    Resolution order: ``override``; the ``FXCOMPRESS_DATA`` environment variable;
    ``<repo>/../shared/data`` (repo = the folder holding the ``compiler`` package);
    ``./../shared/data`` relative to the working directory. An explicit ``override`` or
    environment value is taken at its word: if it is not a directory the answer is None rather
    than a silent fall-back to some other data.

    Args:
        override: an explicit directory.

    Returns:
        The directory, or None.
    """
    if override is not None:
        p = Path(override).expanduser()
        return p if p.is_dir() else None
    env = os.environ.get(ENV_DATA)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            log.warning("%s=%s is not a directory", ENV_DATA, env)
            return None
        return p
    for p in _default_candidates():
        if p.is_dir():
            return p
    return None


def _default_candidates() -> list[Path]:
    return [_REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def require_data_dir(override: str | os.PathLike | None = None) -> Path:
    """Like :func:`data_dir` but raise when the directory is absent.

    Raises:
        DataError: naming every place looked at and how to point fxcompress at the data.
    """
    d = data_dir(override)
    if d is not None:
        return d
    if override is not None:
        looked = [f"{Path(override).expanduser()} (given explicitly)"]
    elif os.environ.get(ENV_DATA):
        looked = [f"{os.environ[ENV_DATA]} (from ${ENV_DATA})"]
    else:
        looked = [str(p) for p in _default_candidates()]
    raise DataError(
        "shared data directory not found; looked in: " + ", ".join(looked)
        + f". Set {ENV_DATA}=/path/to/shared/data (or pass data_dir=...); it should hold "
        + ", ".join(DATASETS.values())
    )


def dataset_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of dataset ``name``'s file (see :data:`DATASETS`).

    Raises:
        DataError: unknown name, data dir absent, or the file missing (naming the path).
    """
    key = canonical_name(name)
    path = require_data_dir(data_dir) / DATASETS[key]
    if not path.is_file():
        raise DataError(f"{key}: data file {path} not found (see shared/data/SOURCES.md)")
    return path


def stories260k_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The stories260K Hugging Face folder inside the data dir.

    Raises:
        DataError: when it is absent.
    """
    path = require_data_dir(data_dir) / STORIES260K
    if not (path / "config.json").is_file():
        raise DataError(f"stories260K not found at {path} (expected config.json there)")
    return path


def canonical_name(name: str) -> str:
    """``"WikiText-2"`` -> ``"wikitext2"``; raise DataError for an unknown dataset name."""
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_dir: str | os.PathLike):
    """Load a model folder's tokenizer as ``PreTrainedTokenizerFast`` from its ``tokenizer.json``.

    The special tokens come from ``tokenizer_config.json``; when it names no BOS token, the
    ``bos_token_id`` of ``config.json`` / ``generation_config.json`` is used.

    Args:
        model_dir: a Hugging Face model folder holding ``tokenizer.json``, or a folder whose
            tokenizer :func:`compiler.frontend.tokenizer_dir_of` finds (the GGUF layout's
            ``hf/``).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``bos_token_id`` set when the folder
        declares one).

    Raises:
        DataError: no ``tokenizer.json``, an unreadable one, or config files that disagree on
            the BOS id.
    """
    from transformers import PreTrainedTokenizerFast

    model_dir = tokenizer_dir_of(model_dir) or Path(model_dir)
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise DataError(
            f"no tokenizer.json in {model_dir}: a fast tokenizer file is needed to tokenize "
            "evaluation/calibration text (or pass token ids yourself)"
        )
    tcfg = _read_json(model_dir / "tokenizer_config.json")
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = tcfg.get(key)
        if isinstance(v, dict):  # older configs store AddedToken dicts
            v = v.get("content")
        if isinstance(v, str):
            special[key] = v
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **special)
    except Exception as e:  # tokenizers raises plain Exception subclasses on malformed files
        raise DataError(f"{tok_file}: cannot load tokenizer: {type(e).__name__}: {e}") from e

    cfg_bos = None
    for name in ("config.json", "generation_config.json"):
        v = _read_json(model_dir / name).get("bos_token_id")
        if isinstance(v, int):
            cfg_bos = v
            break
    if tok.bos_token_id is None and cfg_bos is not None:
        tok.bos_token = tok.convert_ids_to_tokens(cfg_bos)
    elif cfg_bos is not None and tok.bos_token_id != cfg_bos:
        raise DataError(
            f"{model_dir}: tokenizer_config.json's bos_token {tok.bos_token!r} has id "
            f"{tok.bos_token_id}, but config.json says bos_token_id={cfg_bos}"
        )
    tok._fxcompress_hash = _sha256_file(tok_file)
    return tok


def as_tokenizer(tokenizer: Any):
    """A tokenizer object, or a model folder path turned into one with :func:`load_tokenizer`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    return d if isinstance(d, dict) else {}


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 identifying a tokenizer's behaviour (its serialised ``tokenizers`` JSON)."""
    h = getattr(tokenizer, "_fxcompress_hash", None)
    if h:
        return h
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(tokenizer)
    h = hashlib.sha256(blob.encode()).hexdigest()
    try:
        tokenizer._fxcompress_hash = h
    except AttributeError:  # objects with __slots__; just recompute next time
        pass
    return h


# ---------------------------------------------------------------------------------------------
# Text


def load_text(name: str, split: str = "eval", data_dir: str | os.PathLike | None = None) -> str:
    """The text of dataset ``name`` for ``split`` (see the module docstring's table).

    Args:
        name: ``"wikitext2"``, ``"c4"`` or ``"tinystories"`` (aliases accepted).
        split: ``"eval"`` or ``"calib"``.
        data_dir: override of the data directory (see :func:`data_dir`).

    Raises:
        DataError: unknown name or split, missing data, malformed file.
    """
    key = canonical_name(name)
    _check_split(split)
    path = dataset_path(key, data_dir)
    return _split_text(key, split, _read_text(key, path))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")


def _read_text(key: str, path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e
    if key != "c4":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{i}: not a JSON object with a 'text' field: {e}") from e
    return "\n\n".join(texts)


def split_tinystories(text: str) -> tuple[str, str]:
    """Cut TinyStories text into (eval, calib) halves at the first blank line after the midpoint.

    The eval half keeps the blank line that ends it, so ``eval + calib == text`` and the calib
    half starts with a story, never inside one.

    Raises:
        DataError: when there is no blank line after the midpoint.
    """
    mid = len(text) // 2
    # A blank line is a line holding only whitespace; the cut goes after its newline.
    m = re.compile(r"\n[ \t]*\n").search(text, mid)
    if m is None:
        raise DataError("TinyStories text has no blank line after its midpoint; cannot split it")
    cut = m.end()
    return text[:cut], text[cut:]


def _split_text(key: str, split: str, text: str) -> str:
    if key == "tinystories":
        return split_tinystories(text)[0 if split == "eval" else 1]
    if key == "wikitext2" and split == "calib":
        log.warning("wikitext2 has only its test text here: calibrating on the evaluation text")
    if key == "c4" and split == "eval":
        log.warning("the c4 sample is train data (no validation shard here): not a clean benchmark")
    return text


# ---------------------------------------------------------------------------------------------
# Tokens


_MEM_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MEM_CACHE_SIZE = 8


def cache_dir() -> Path | None:
    """Directory of the on-disk token cache, or None when disabled (``FXCOMPRESS_CACHE_DIR=off``)."""
    env = os.environ.get(ENV_CACHE)
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if env:
        return Path(env).expanduser() / "tokens"
    return Path.home() / ".cache" / "fxcompress" / "tokens"


def tokenize(text: str, tokenizer: Any, *, cache: bool = True) -> torch.Tensor:
    """Tokenize ``text`` whole, without special tokens, as a 1-D LongTensor.

    Args:
        text: the text.
        tokenizer: a ``PreTrainedTokenizerFast`` (or anything with ``backend_tokenizer`` or a
            ``__call__`` returning ``input_ids``), or a model folder path.
        cache: read/write the on-disk cache (see :func:`cache_dir`).
    """
    tokenizer = as_tokenizer(tokenizer)
    path = None
    d = cache_dir() if cache else None
    if d is not None:
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
        path = d / f"{key}-{tokenizer_hash(tokenizer)[:24]}.npy"
        ids = _cache_read(path)
        if ids is not None:
            return ids
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: no max-length warning, about twice as fast.
        raw = backend.encode(text, add_special_tokens=False).ids
    else:
        raw = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(raw, dtype=torch.long)
    if path is not None:
        _cache_write(path, ids)
    return ids


def _cache_read(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.debug("ignoring unreadable token cache %s: %s", path, e)
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        return None
    return torch.from_numpy(arr.astype(np.int64))


def _cache_write(path: Path, ids: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids.numpy().astype(np.int32), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop an evaluation
        log.debug("cannot write token cache %s: %s", path, e)


def load_tokens(name: str, tokenizer: Any, split: str = "eval", *,
                data_dir: str | os.PathLike | None = None, cache: bool = True) -> torch.Tensor:
    """Token ids (1-D LongTensor) of dataset ``name``'s ``split``, tokenized whole.

    Cached in memory per (file, its size and mtime, split, tokenizer) and on disk (see
    :func:`tokenize`). The returned tensor is a fresh copy.

    Raises:
        DataError: as :func:`load_text`.
    """
    tokenizer = as_tokenizer(tokenizer)
    key = canonical_name(name)
    _check_split(split)
    path = dataset_path(key, data_dir)
    st = path.stat()
    mkey = (str(path.resolve()), st.st_size, st.st_mtime_ns, split, tokenizer_hash(tokenizer))
    hit = _MEM_CACHE.get(mkey) if cache else None
    if hit is None:
        hit = tokenize(_split_text(key, split, _read_text(key, path)), tokenizer, cache=cache)
        if cache:
            _MEM_CACHE[mkey] = hit
            while len(_MEM_CACHE) > _MEM_CACHE_SIZE:
                _MEM_CACHE.popitem(last=False)
    else:
        _MEM_CACHE.move_to_end(mkey)
    log.debug("%s/%s: %d tokens", key, split, hit.numel())
    return hit.clone()


# ---------------------------------------------------------------------------------------------
# Windows


def _as_ids(token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise DataError(f"token ids must be a 1-D integer sequence, got {ids.dtype} {tuple(ids.shape)}")
    return ids.long()


def _text_per_window(window: int, bos_id: int | None) -> int:
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (one is never scored), got {window}")
    return window - 1 if bos_id is not None else window


def _with_bos(chunks: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return chunks
    bos = torch.full((chunks.shape[0], 1), int(bos_id), dtype=torch.long)
    return torch.cat([bos, chunks], dim=1)


def eval_windows(token_ids: torch.Tensor | Sequence[int], window: int = DEFAULT_WINDOW,
                 n_windows: int | None = None, *, bos_id: int | None) -> torch.Tensor:
    """Non-overlapping evaluation windows ``[n, window]``, each ``[BOS] + (window - 1)`` tokens.

    Windows are consecutive from the start of ``token_ids``; a tail too short for a full window
    is dropped.

    Args:
        token_ids: 1-D token ids of the whole text.
        window: tokens per window including BOS (>= 2).
        n_windows: how many windows; None takes every full window.
        bos_id: the BOS id to put first in every window; None for models without one (then each
            window is ``window`` text tokens).

    Returns:
        LongTensor ``[n, window]``.

    Raises:
        ValueError: ``window < 2`` or ``n_windows < 1``.
        DataError: the text holds fewer than ``n_windows`` windows.
    """
    step = _text_per_window(window, bos_id)
    ids = _as_ids(token_ids)
    available = ids.numel() // step
    if n_windows is None:
        n_windows = available
        if n_windows == 0:
            raise DataError(f"{ids.numel()} tokens are too few for one window of {window}")
    elif n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    elif n_windows > available:
        raise DataError(
            f"{ids.numel()} tokens hold only {available} windows of {window} "
            f"({step} text tokens each); {n_windows} were asked for"
        )
    chunks = ids[: n_windows * step].view(n_windows, step)
    return _with_bos(chunks, bos_id)


def sample_windows(token_ids: torch.Tensor | Sequence[int], n: int, window: int = DEFAULT_WINDOW,
                   *, bos_id: int | None, seed: int = 0) -> torch.Tensor:
    """``n`` distinct non-overlapping windows ``[n, window]`` drawn at random (fixed ``seed``).

    The text is cut into consecutive chunks as in :func:`eval_windows`; ``n`` of them are chosen
    by a seeded permutation (so no window repeats and the draw is reproducible).

    Raises:
        ValueError: ``window < 2`` or ``n < 1``.
        DataError: fewer than ``n`` chunks are available.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    every = eval_windows(token_ids, window, None, bos_id=bos_id)
    if n > every.shape[0]:
        raise DataError(f"only {every.shape[0]} windows of {window} tokens available; {n} asked")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(every.shape[0], generator=g)[:n]
    return every[pick]


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``[n, L]`` windows into batches ``[batch_size, L]`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [b.contiguous() for b in windows.split(batch_size)]


def calibration_batches(name: str, tokenizer: Any, n: int = DEFAULT_CALIB_WINDOWS,
                        window: int = DEFAULT_WINDOW, batch_size: int = 8, seed: int = 0, *,
                        data_dir: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """Calibration batches from dataset ``name``'s calibration split.

    Args:
        name: dataset name (``"tinystories"``, ``"c4"``, ``"wikitext2"``).
        tokenizer: a tokenizer or a model folder (see :func:`load_tokenizer`).
        n: number of windows.
        window: tokens per window, BOS included.
        batch_size: windows per batch.
        seed: seed of the draw.
        data_dir: override of the data directory.

    Returns:
        List of LongTensor ``[batch_size, window]`` (the last may hold fewer windows).

    Raises:
        DataError: missing data or too little text; ValueError: bad sizes.
    """
    tokenizer = as_tokenizer(tokenizer)
    ids = load_tokens(name, tokenizer, "calib", data_dir=data_dir)
    windows = sample_windows(ids, n, window, bos_id=tokenizer.bos_token_id, seed=seed)
    log.info("calibration: %d windows x %d tokens from %s (seed %d)", n, window,
             canonical_name(name), seed)
    return batched(windows, batch_size)


def evaluation_windows(name: str, tokenizer: Any, n_windows: int | None = DEFAULT_EVAL_WINDOWS,
                       window: int = DEFAULT_WINDOW, *,
                       data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The protocol's evaluation windows ``[n, window]`` of dataset ``name``'s eval split.

    Raises:
        DataError: missing data or too little text; ValueError: bad sizes.
    """
    tokenizer = as_tokenizer(tokenizer)
    ids = load_tokens(name, tokenizer, "eval", data_dir=data_dir)
    return eval_windows(ids, window, n_windows, bos_id=tokenizer.bos_token_id)


# ---------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``name[:NxL]`` dataset spec; ``n``/``window`` are None when not given."""

    name: str
    n: int | None = None
    window: int | None = None

    def __str__(self) -> str:
        if self.n is None:
            return self.name
        return f"{self.name}:{self.n}x{self.window}"


_SPEC = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?::\s*(\d+)\s*[xX*]\s*(\d+)\s*)?$")


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse ``"tinystories:128x256"`` (``name[:N x L]``, N windows of L tokens).

    Raises:
        DataError: malformed spec or unknown dataset name.
        ValueError: ``N < 1`` or ``L < 2``.
    """
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise DataError(
            f"bad dataset spec {spec!r}; expected name[:NxL], e.g. 'tinystories:128x256' "
            f"(names: {', '.join(DATASETS)})"
        )
    name = canonical_name(m.group(1))
    if m.group(2) is None:
        return DatasetSpec(name)
    n, window = int(m.group(2)), int(m.group(3))
    if n < 1:
        raise ValueError(f"dataset spec {spec!r}: N must be >= 1")
    if window < 2:
        raise ValueError(f"dataset spec {spec!r}: window length must be >= 2")
    return DatasetSpec(name, n, window)


def calibration_from_spec(spec: str | DatasetSpec, tokenizer: Any, *, batch_size: int = 8,
                          seed: int = 0,
                          data_dir: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """Calibration batches for a spec such as ``"tinystories:128x256"`` (defaults 128 x 256).

    Args:
        spec: ``name[:NxL]`` or a :class:`DatasetSpec`.
        tokenizer: a tokenizer or a model folder holding ``tokenizer.json``.
    """
    s = parse_dataset_spec(spec) if isinstance(spec, str) else spec
    return calibration_batches(s.name, tokenizer, s.n or DEFAULT_CALIB_WINDOWS,
                               s.window or DEFAULT_WINDOW, batch_size, seed, data_dir=data_dir)


def eval_windows_from_spec(spec: str | DatasetSpec, tokenizer: Any, *,
                           data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Evaluation windows for a spec such as ``"wikitext2:256x256"`` (defaults 256 x 256)."""
    s = parse_dataset_spec(spec) if isinstance(spec, str) else spec
    return evaluation_windows(s.name, tokenizer, s.n or DEFAULT_EVAL_WINDOWS,
                              s.window or DEFAULT_WINDOW, data_dir=data_dir)
