"""Generation speed in onnxruntime-genai's generator loop: ours vs ORT GenAI's model builder.

Protocol (BENCHMARKS.md, "Generation"): batch 1, a 128-token prompt, 128 new greedy tokens, 2
intra-op threads, every variant run by onnxruntime-genai's own generator loop, each alone in a
fresh process, the processes interleaved over ``--rounds`` rounds in a rotated order (as
``ort_timing.py`` does for plain ONNX files, for the same reason: spinning ORT thread pools and
process-to-process variance on a 2-core VM).

Model (``--model``):

- ``llama134m`` (default): the speed model of BENCHMARKS.md, built by ``bench_quant.build_model``
  (Llama-shaped, random init, ``torch.manual_seed(0)``, hidden 768, 12 layers, 12 heads, ffn
  2048, vocab 32000), saved as a Hugging Face folder with a tokenizer made in code (a Llama-style
  byte-fallback BPE with a 32000-token vocabulary and no merges: ORT GenAI and the builder need
  ``tokenizer.json``; the prompt is given as token ids, so its contents do not matter);
- ``smollm2``: SmolLM2-135M-Instruct from the shared data (GGUF Q4_1 weights dequantized to fp32
  by ``compiler.frontend.load_gguf``, config from ``hf/``, saved as a Hugging Face folder with the
  ``hf/`` tokenizer files);
- ``--smoke``: a 2-layer hidden-128 random Llama (head size 32: the builder's CPU
  ``GroupQueryAttention`` needs a head size that is a multiple of 16, which rules out
  stories260K), 1 round, 8-token prompt, 8 new tokens, to check the script end to end.

Variants, all from the same Hugging Face folder:

- ``builder_fp32`` / ``builder_int8`` / ``builder_int4``: ``python -m
  onnxruntime_genai.models.builder -i <hf> -o <out> -p fp32|int8|int4 -e cpu``. Its int8 and int4
  are ``MatMulNBits`` with block 32 and ``accuracy_level=4`` (int8 compute inside the kernel:
  activations are quantized per block), LM head included;
- ``ours_fp32`` / ``ours_w8a8`` (SmoothQuant alpha 0.5, then W8A8 static, ``MatMulIntegerToFloat``)
  / ``ours_w4a16`` (group 32, ``MatMulNBits`` at the export default ``accuracy_level="auto"``:
  4, int8 compute inside the kernel, on this CPU, as the builder's int4), the LM head quantized
  as the builder does, q|k|v and gate|up fused into one projection each (``fuse_linears``: the
  attention kernel reads the packed q|k|v as the builder's does), norms / rotary / attention
  lowered to ORT's fused kernels (``backends.ort_fused``, the ``export_genai`` default):
  ``compiler.compile(<hf>, passes=..., calibration=32 x 512 random ids, seed 1)`` then
  ``CompiledModel.export_genai(<out>)``. ``ours_w4a16_acc0`` is the same W4A16 graph at
  ``accuracy_level=0`` (float compute: the graph's own arithmetic, true A16). Not in the default
  set (``--variants``): ``ours_fp32_unfused`` / ``ours_w4a16_unfused``, the same without
  ``fuse_linears``, to measure what packing buys; ``ours_fp32_qkv``, q|k|v packed and gate|up
  left as two MatMuls (``fuse_linears(min_group=3)``: no ``Split`` on the MLP).
  Our embeddings stay float (a ``Gather`` reads one row per token), as the builder's do.

The thread count lives in each folder's ``genai_config.json``: ``model.decoder.session_options
.intra_op_num_threads`` is set to ``--threads`` after the folder is built (ORT GenAI has no
per-call option for it), and the timing process reads it back into its JSON line.

Timing process (one per variant per round): ``og.Model(folder)``; per run a fresh
``og.Generator`` with ``max_length = min_length = prompt + new`` (``min_length`` keeps the EOS of
a random model from ending the loop early; the process checks that exactly ``new`` tokens came
out) and greedy search; ``--warmup`` untimed runs, then ``--runs`` timed ones:

- prefill ms = the wall time of ``generator.append_tokens(prompt)`` (one decoder run over the
  prompt; it leaves the logits of the last position);
- decode tokens/s = ``(new - 1)`` / the wall time of ``generate_next_token()`` calls 2..new, each
  one decoder step on one token plus the greedy pick. The first call only picks the argmax of the
  prefill's logits (about 10 us, no decoder run) and is in neither number.

Reported: per variant the median over all runs of all rounds (with the spread of the per-round
medians); per round the paired speed-up against ``--baseline`` (default ``builder_fp32``) and for
each ours-vs-builder pair (fp32 vs fp32, W8A8 vs int8, W4A16 and W4A16 acc0 vs int4, and the
packed-vs-unpacked pairs when those run), then the
median, min and max over the rounds. Speed-ups are > 1 when the first of the pair is faster
(prefill: time ratio builder / ours; decode: tokens/s ratio ours / builder). Size: total bytes
of the model files (``*.onnx`` plus external data) in the folder.

Run: ``python benchmarks/bench_generate.py [--model llama134m|smollm2] [--rounds 5] [--reuse]
[--workdir out/bench_generate] [--variants ...] [--out results.md]``; ``--smoke`` for the test;
``--rounds 0`` only builds (build while the machine is busy, then time on a quiet one with
``--reuse``).
Built folders are cached under ``<workdir>/<model>/``; ``--reuse`` keeps any whose recorded
recipe matches (ours: passes, calibration, accuracy level and a hash of the compiler's sources;
builder: precision and onnxruntime-genai version); without it every folder is rebuilt. One of our variants that fails to build
(``compile`` or ``export_genai`` raises) is left out with the error under the table, the others
still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("bench_generate")

SMOLLM2 = "smollm2-135m-instruct-q4_1"
SMOKE_CONFIG = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "intermediate_size": 256, "vocab_size": 1024,
                "max_position_embeddings": 256, "tie_word_embeddings": False}
# name -> ("builder", precision) or ("ours", (passes, MatMulNBits accuracy_level))
VARIANTS: dict[str, tuple[str, object]] = {
    # q|k|v (and gate|up) as one projection: GroupQueryAttention reads it packed, as the
    # builder's models do (``fuse_linears``; ``*_unfused`` measure what it buys)
    "ours_fp32": ("ours", (["fuse_linears"], "auto")),
    # the LM head is quantized too, as the builder does (float it is 98 MB of the 134M model's
    # per-token reads); int4 in groups of 32, the builder's block size
    "ours_w8a8": ("ours", (["fuse_linears", "smoothquant(alpha=0.5)",
                            "insert_qdq(scheme=w8a8, quantize_lm_head=true)"], "auto")),
    # the export default: MatMulNBits' int8-compute path where the CPU has it (as the builder)
    "ours_w4a16": ("ours", (["fuse_linears",
                             "insert_qdq(scheme=w4a16, group_size=32, quantize_lm_head=true)"],
                            "auto")),
    # the same W4A16 graph with float compute (true A16, the graph's arithmetic)
    "ours_w4a16_acc0": ("ours", (["fuse_linears", "insert_qdq(scheme=w4a16, group_size=32, "
                                  "quantize_lm_head=true)"], 0)),
    # q|k|v packed, gate|up left as two MatMuls (``min_group=3``): at fp32 decode the packed
    # gate|up saves no weight bytes and adds a Split
    "ours_fp32_qkv": ("ours", (["fuse_linears(min_group=3)"], "auto")),
    "ours_fp32_unfused": ("ours", ([], "auto")),
    "ours_w4a16_unfused": ("ours", (["insert_qdq(scheme=w4a16, group_size=32, "
                                     "quantize_lm_head=true)"], "auto")),
    "builder_fp32": ("builder", "fp32"),
    "builder_int8": ("builder", "int8"),
    "builder_int4": ("builder", "int4"),
}
DEFAULT_VARIANTS = ["ours_fp32", "ours_w8a8", "ours_w4a16", "ours_w4a16_acc0", "builder_fp32",
                    "builder_int8", "builder_int4"]
PAIRS = [("ours_fp32", "builder_fp32"), ("ours_fp32_qkv", "builder_fp32"), ("ours_w8a8", "builder_int8"),
         ("ours_w4a16", "builder_int4"), ("ours_w4a16_acc0", "builder_int4"),
         ("ours_fp32", "ours_fp32_unfused"), ("ours_w4a16", "ours_w4a16_unfused")]
MARKER = ".bench_generate.json"  # the recipe a folder was built from, written last


# ---------------------------------------------------------------- Hugging Face folder

def make_tokenizer(vocab_size: int, folder: Path) -> None:
    """Write a Llama-style byte-fallback BPE tokenizer with exactly ``vocab_size`` tokens.

    No merges: text encodes to characters and bytes, the filler tokens ``▁w<i>`` only decode.
    ORT GenAI's tokenizer (onnxruntime-extensions) loads it; a WordLevel model it does not.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-":
        vocab.setdefault(ch, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"▁w{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def _random_llama(config: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def _smollm2_model(data: Path):
    from compiler.frontend import find_gguf, load_gguf

    # the project's loader: dense fp32 weights, config from hf/, no GGUF quantizer left attached
    # (a plain from_pretrained(gguf_file=...) model refuses save_pretrained)
    return load_gguf(find_gguf(data)).eval()


def build_hf_folder(model_name: str, folder: Path, reuse: bool) -> dict:
    """Save the benchmark model as a Hugging Face folder (weights, config, tokenizer)."""
    recipe = {"model": model_name}
    if _reusable(folder, recipe, reuse):
        return json.loads((folder / MARKER).read_text())
    _clear(folder)
    if model_name == "llama134m":
        from bench_quant import build_model

        model = build_model()
    elif model_name == "smoke":
        model = _random_llama(SMOKE_CONFIG)
    elif model_name == "smollm2":
        model = _smollm2_model(_shared_data() / SMOLLM2)
    else:
        raise ValueError(f"unknown model {model_name!r}")
    # the builder writes these into genai_config.json; a random model has no tokenizer of its own
    if model.config.bos_token_id is None:
        model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(folder)
    if model_name == "smollm2":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(_shared_data() / SMOLLM2 / "hf" / f, folder / f)
    else:
        make_tokenizer(model.config.vocab_size, folder)
    info = {**recipe, "vocab_size": model.config.vocab_size,
            "params": sum(p.numel() for p in model.parameters()),
            "hidden_size": model.config.hidden_size,
            "num_hidden_layers": model.config.num_hidden_layers}
    (folder / MARKER).write_text(json.dumps(info))
    return info


def _shared_data() -> Path:
    env = os.environ.get("FXCOMPRESS_DATA")
    for c in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if c.is_dir():
            return c
    raise FileNotFoundError("shared data not found (set FXCOMPRESS_DATA or place ../shared/data)")


def _reusable(folder: Path, recipe: dict, reuse: bool) -> bool:
    if not (reuse and (folder / MARKER).is_file()):
        return False
    have = json.loads((folder / MARKER).read_text())
    return all(have.get(k) == v for k, v in recipe.items())


def _source_stamp() -> str:
    """Hash of the compiler's sources: a folder built by other code is not reused."""
    h = hashlib.sha256()
    for sub in ("compiler", "backends", "passes"):
        for f in sorted((REPO / sub).rglob("*.py")):
            h.update(f.relative_to(REPO).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _builder_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")


def _clear(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


# ---------------------------------------------------------------- variants

def has_export_genai() -> bool:
    from compiler.api import CompiledModel

    return hasattr(CompiledModel, "export_genai")


def build_builder_variants(hf: Path, jobs: dict[str, tuple[str, Path]], cache: Path,
                           reuse: bool) -> dict[str, float]:
    """Run ORT GenAI's model builder for ``{name: (precision, folder)}``; wall seconds each.

    All precisions run in one helper process (``--run-builder``) that executes ``python -m
    onnxruntime_genai.models.builder`` once per precision with ``runpy``: the builder's import
    (torch, transformers: ~8 s) is then paid once, not per precision; the output files are the
    same. A reused folder reports 0 s; the import is not in any precision's seconds.
    """
    todo, seconds = {}, {}
    for name, (precision, folder) in jobs.items():
        if _reusable(folder, _builder_recipe(hf, precision), reuse):
            seconds[name] = 0.0
        else:
            _clear(folder)
            todo[name] = (precision, folder)
    if not todo:
        return seconds
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-builder", str(hf), str(cache),
           *(f"{p}={f}" for p, f in todo.values())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log_file = cache.parent / "builder.log"
    log_file.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"model builder failed on {hf} (log: {log_file}): {' / '.join(tail)}")
    took = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (precision, folder) in todo.items():
        seconds[name] = took[precision]
        (folder / MARKER).write_text(json.dumps(
            {**_builder_recipe(hf, precision), "seconds": round(seconds[name], 1)}))
    return seconds


def _builder_recipe(hf: Path, precision: str) -> dict:
    return {"builder": precision, "hf": str(hf.resolve()), "version": _builder_version()}


def _run_builder(hf: str, cache: str, jobs: list[str]) -> None:
    """``python -m onnxruntime_genai.models.builder -i hf -o out -p precision -e cpu -c cache``
    for each ``precision=out``, in this process; prints ``{precision: seconds}``."""
    import runpy

    import onnxruntime_genai.models.builder  # noqa: F401 - the import, once, outside the timings

    took = {}
    for job in jobs:
        precision, out = job.split("=", 1)
        sys.argv = ["builder", "-i", hf, "-o", out, "-p", precision, "-e", "cpu", "-c", cache]
        t = time.perf_counter()
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
        took[precision] = time.perf_counter() - t
    print(json.dumps(took))


_last_compiled: dict = {}  # the last (passes -> CompiledModel): W4A16 exported at two levels


def build_ours_variant(hf: Path, passes: list[str], calib, folder: Path, reuse: bool,
                       accuracy_level: int | str = "auto") -> float:
    """``compiler.compile`` + ``CompiledModel.export_genai``; returns their wall seconds.

    The compiled model of the previous call is kept and reused when the passes are the same
    (its compile seconds are then not counted again).
    """
    import compiler
    from backends.ort_quant import resolve_accuracy_level

    accuracy_level = resolve_accuracy_level(accuracy_level)
    recipe = {"passes": passes, "hf": str(hf.resolve()), "accuracy_level": accuracy_level,
              "calibration": _describe(calib) if passes else "none", "source": _source_stamp()}
    if _reusable(folder, recipe, reuse):
        return 0.0
    _clear(folder)
    t = time.perf_counter()
    key = (str(hf.resolve()), tuple(passes))
    cm = _last_compiled.get(key)
    if cm is None:
        _last_compiled.clear()
        cm = compiler.compile(str(hf), passes=passes, calibration=calib if passes else None)
        _last_compiled[key] = cm
    cm.export_genai(folder, accuracy_level=accuracy_level)
    seconds = time.perf_counter() - t
    (folder / MARKER).write_text(json.dumps({**recipe, "seconds": round(seconds, 1)}))
    return seconds


def calibration(n: int, seq: int, vocab: int) -> list:
    """``n`` batches of 1 x ``seq`` random token ids, seed 1 (BENCHMARKS.md speed protocol)."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(n)]


def _describe(calib) -> str:
    return f"{len(calib)}x{calib[0].shape[-1]} seed 1" if calib else "none"


def set_session_threads(folder: Path, threads: int) -> None:
    """Write ``intra_op_num_threads`` into the decoder's session options in genai_config.json."""
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts["intra_op_num_threads"] = threads
        path.write_text(json.dumps(cfg, indent=4) + "\n")


def model_bytes(folder: Path) -> int:
    """Total bytes of the model files: ONNX graphs and their external data."""
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")))


def kernel_summary(folder: Path) -> str:
    """Counts of the matmul kernels in the decoder graph (the file, not ORT's optimised graph)."""
    import onnx

    cfg = json.loads((folder / "genai_config.json").read_text())
    m = onnx.load(str(folder / cfg["model"]["decoder"]["filename"]), load_external_data=False)
    counts: dict[str, int] = {}
    for node in m.graph.node:
        key = node.op_type
        if key == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            key = (f"MatMulNBits {a.get('bits', 4)}b blk{a.get('block_size')} "
                   f"acc{a.get('accuracy_level', 0)}")
        if "MatMul" in key or key == "Gemm" or "Attention" in key:
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"


# ---------------------------------------------------------------- timing

def prompt_ids(length: int, vocab: int) -> list[int]:
    """The prompt: ``length`` token ids drawn from [3, vocab), fixed seed (no special ids)."""
    import numpy as np

    return np.random.default_rng(2).integers(3, vocab, length).tolist()


def _child(folder: str, prompt: int, new: int, warmup: int, runs: int, vocab: int) -> None:
    import numpy as np
    import onnxruntime_genai as og

    cfg = json.loads((Path(folder) / "genai_config.json").read_text())
    threads = cfg["model"]["decoder"].get("session_options", {}).get("intra_op_num_threads")
    model = og.Model(folder)
    ids = np.asarray(prompt_ids(prompt, vocab), dtype=np.int32)
    prefill, decode = [], []
    for i in range(warmup + runs):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new, min_length=prompt + new,
                                  do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        gen.generate_next_token()  # argmax of the prefill's logits: no decoder run
        t2 = time.perf_counter()
        n = 1
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t3 = time.perf_counter()
        got = len(gen.get_sequence(0)) - prompt
        if n != new or got != new:
            raise RuntimeError(f"{folder}: generated {n} steps / {got} tokens, expected {new}")
        del gen
        if i >= warmup:
            prefill.append(1e3 * (t1 - t0))
            decode.append((new - 1) / (t3 - t2))
    print(json.dumps({"prefill_ms": prefill, "decode_tok_s": decode,
                      "intra_op_num_threads": threads}))


def time_generation(folders: dict[str, Path], *, prompt: int, new: int, warmup: int, runs: int,
                    rounds: int, vocab: int) -> dict[str, dict]:
    """Each folder alone in a fresh process, ``rounds`` rounds in a rotated order.

    Returns:
        ``{name: {"prefill_ms", "decode_tok_s"}}``, each ``{"median", "rounds": [per-round
        medians]}``, plus ``"threads"`` as read back by the timing process.
    """
    names = list(folders)
    res = {n: {"prefill_ms": {"all": [], "rounds": []}, "decode_tok_s": {"all": [], "rounds": []},
               "threads": None} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folders[name]),
                   "--prompt", str(prompt), "--new", str(new), "--warmup", str(warmup),
                   "--runs", str(runs), "--vocab", str(vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
                raise RuntimeError(f"bench_generate: timing {name!r} failed: {tail[0]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            res[name]["threads"] = out["intra_op_num_threads"]
            for key in ("prefill_ms", "decode_tok_s"):
                res[name][key]["all"] += out[key]
                res[name][key]["rounds"].append(statistics.median(out[key]))
            log.info("round %d/%d %s: prefill %.1f ms, decode %.1f tok/s", r + 1, rounds, name,
                     res[name]["prefill_ms"]["rounds"][-1], res[name]["decode_tok_s"]["rounds"][-1])
    for name in names:
        for key in ("prefill_ms", "decode_tok_s"):
            res[name][key]["median"] = statistics.median(res[name][key].pop("all"))
    return res


def paired_speedup(res: dict, name: str, ref: str) -> dict[str, tuple[float, float, float]]:
    """Per-round speed-up of ``name`` over ``ref``: (median, min, max) over the rounds.

    Prefill: ``ref``'s ms / ``name``'s ms; decode: ``name``'s tok/s / ``ref``'s tok/s.
    """
    out = {}
    for key, flip in (("prefill_ms", True), ("decode_tok_s", False)):
        a, b = res[name][key]["rounds"], res[ref][key]["rounds"]
        r = [(y / x if flip else x / y) for x, y in zip(a, b)]
        out[key] = (statistics.median(r), min(r), max(r))
    return out


# ---------------------------------------------------------------- report

def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _fmt_range(med: float, rounds: list[float]) -> str:
    return f"{_num(med)} ({_num(min(rounds))}-{_num(max(rounds))})"


def _fmt_ratio(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"


def render(info: dict, res: dict, sizes: dict, kernels: dict, build_s: dict, args,
           skipped: list[str], failed: dict[str, str]) -> str:
    base = args.baseline
    lines = [
        (f"Model: {info['model']} ({info['params'] / 1e6:.1f}M params, hidden "
         f"{info['hidden_size']}, {info['num_hidden_layers']} layers, vocab "
         f"{info['vocab_size']}); onnxruntime-genai generator loop, CPU, batch 1, "
         f"{args.prompt}-token prompt, {args.new} new greedy tokens (min_length = max_length), "
         f"intra_op_num_threads={args.threads} in genai_config.json; each variant alone in a "
         f"fresh process, {args.warmup} warm-up + {args.runs} timed generations per process, "
         f"{args.rounds} rounds in rotated order; medians of all runs (min-max of the per-round "
         "medians)."),
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
         f"onnxruntime-genai {_version('onnxruntime_genai')}, onnxruntime "
         f"{_version('onnxruntime')}."),
        "",
        (f"| variant | prefill ms @{args.prompt} | decode tok/s | prefill x {base}, per round: "
         f"median (min-max) | decode x {base}, per round | size MB | x {base} size | "
         "matmul / attention kernels (decoder file) | build s |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in res:
        p = paired_speedup(res, name, base) if base in res else None
        lines.append("| " + " | ".join([
            name,
            _fmt_range(res[name]["prefill_ms"]["median"], res[name]["prefill_ms"]["rounds"]),
            _fmt_range(res[name]["decode_tok_s"]["median"], res[name]["decode_tok_s"]["rounds"]),
            _fmt_ratio(p["prefill_ms"]) if p else "-",
            _fmt_ratio(p["decode_tok_s"]) if p else "-",
            f"{sizes[name] / 1e6:.1f}",
            f"{sizes[name] / sizes[base]:.3f}" if base in sizes else "-",
            kernels[name],
            f"{build_s[name]:.1f}" if build_s.get(name) else "cached",
        ]) + " |")
    pairs = [(a, b) for a, b in PAIRS if a in res and b in res]
    if pairs:
        lines += ["", "| ours | builder | prefill speed-up of ours, per round: median (min-max) "
                  "| decode speed-up of ours, per round | size ours / builder |",
                  "|---|---|---|---|---|"]
        for a, b in pairs:
            p = paired_speedup(res, a, b)
            lines.append(f"| {a} | {b} | {_fmt_ratio(p['prefill_ms'])} | "
                         f"{_fmt_ratio(p['decode_tok_s'])} | {sizes[a] / sizes[b]:.3f} |")
    lines += ["", ("Speed-ups > 1: the first is faster (prefill: time ratio; decode: tokens/s "
                   "ratio), computed per round from the round medians. Decode tok/s = (new - 1) "
                   "/ time of generate_next_token calls 2..new; prefill = append_tokens(prompt).")]
    if skipped:
        lines += ["", f"Not run: {', '.join(skipped)} (CompiledModel.export_genai does not "
                      "exist yet in compiler/api.py)."]
    for name, err in failed.items():
        lines += ["", f"Not run: {name}, its folder could not be built: {err}"]
    return "\n".join(lines)


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # only for the report line
        return "?"


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-builder", nargs="+", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=["llama134m", "smollm2"], default="llama134m")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random Llama, 1 round, 8-token prompt, 8 new tokens")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                    help="only these variants (default: all; ours_* need export_genai)")
    ap.add_argument("--baseline", choices=list(VARIANTS), default="builder_fp32")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing rounds (default 5); 0 builds the folders and times nothing")
    ap.add_argument("--warmup", type=int, default=1, help="untimed generations per process")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per process")
    ap.add_argument("--threads", type=int, default=2, help="intra_op_num_threads")
    ap.add_argument("--calib", type=int, default=None,
                    help="calibration batches of 1 x --calib-seq random ids (default 32)")
    ap.add_argument("--calib-seq", type=int, default=None, help="default 512")
    ap.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=REPO / "out" / "bench_generate")
    ap.add_argument("--reuse", action="store_true",
                    help="keep built folders whose recorded recipe matches")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the table here (default <workdir>/<model>/results.md) and the "
                         "numbers beside it (.json)")
    args = ap.parse_args(argv)
    small = args.smoke
    args.prompt = args.prompt or (8 if small else 128)
    args.new = args.new or (8 if small else 128)
    if args.run_builder:
        _run_builder(args.run_builder[0], args.run_builder[1], args.run_builder[2:])
        return 0
    if args.child:
        _child(args.child, args.prompt, args.new, args.warmup, args.runs, args.vocab)
        return 0
    build_only = args.rounds == 0
    args.rounds = args.rounds or (1 if small else 5)
    args.calib = args.calib if args.calib is not None else (2 if small else 32)
    args.calib_seq = args.calib_seq or (32 if small else 512)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model_name = "smoke" if small else args.model
    work = args.workdir / model_name
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    info = build_hf_folder(model_name, hf, args.reuse)

    names = args.variants or DEFAULT_VARIANTS
    skipped = []
    if not has_export_genai():
        skipped = [n for n in names if VARIANTS[n][0] == "ours"]
        if args.variants and skipped:
            ap.error(f"{', '.join(skipped)} need CompiledModel.export_genai, not in compiler/api.py")
        names = [n for n in names if n not in skipped]
        if skipped:
            log.warning("CompiledModel.export_genai not found: skipping %s", ", ".join(skipped))
    if not names:
        ap.error("no variant left to run")
    if args.baseline not in names:
        log.warning("baseline %s is not run: ratios against %s", args.baseline, names[0])
        args.baseline = names[0]

    folders = {name: work / name for name in names}
    build_s = build_builder_variants(
        hf, {n: (VARIANTS[n][1], folders[n]) for n in names if VARIANTS[n][0] == "builder"},
        work / "builder_cache", args.reuse)
    calib, failed = None, {}
    for name in names:
        if VARIANTS[name][0] == "ours":
            passes, level = VARIANTS[name][1]
            if calib is None and passes:
                calib = calibration(args.calib, args.calib_seq, info["vocab_size"])
            try:
                build_s[name] = build_ours_variant(hf, passes, calib, folders[name], args.reuse,
                                                   level)
            except Exception as e:  # one variant that does not build must not lose the others
                first = (str(e).strip().splitlines() or [""])[0]
                failed[name] = f"{type(e).__name__}: {first}"
                log.error("%s: not built: %s", name, failed[name], exc_info=True)
                del folders[name]
                continue
        set_session_threads(folders[name], args.threads)
        log.info("%s: %s (%.0f s)", name, folders[name], build_s[name])
    _last_compiled.clear()
    if not folders:
        log.error("nothing was built")
        return 1
    if args.baseline not in folders:
        args.baseline = next(iter(folders))
    if build_only:  # --rounds 0: build (e.g. while the machine is busy), time later (--reuse)
        log.info("built %s; not timed (--rounds 0)", ", ".join(folders))
        return 1 if failed else 0

    res = time_generation(folders, prompt=args.prompt, new=args.new, warmup=args.warmup,
                          runs=args.runs, rounds=args.rounds, vocab=info["vocab_size"])
    sizes = {n: model_bytes(f) for n, f in folders.items()}
    kernels = {n: kernel_summary(f) for n, f in folders.items()}
    table = render(info, res, sizes, kernels, build_s, args, skipped, failed)
    print(table)
    out = args.out or work / "results.md"
    out.write_text(table + "\n")
    bad = [n for n in res for k in ("prefill_ms", "decode_tok_s")
           if not (math.isfinite(res[n][k]["median"]) and res[n][k]["median"] > 0)]
    out.with_suffix(".json").write_text(json.dumps(
        {"model": info, "results": res, "sizes": sizes, "kernels": kernels, "build_s": build_s,
         "pairs": {f"{a}/{b}": paired_speedup(res, a, b) for a, b in PAIRS
                   if a in res and b in res},
         "baseline": args.baseline, "skipped": skipped, "failed": failed,
         "settings": {k: getattr(args, k) for k in ("prompt", "new", "rounds", "warmup", "runs",
                                                    "threads", "calib", "calib_seq")}},
        indent=1))
    if bad:
        log.error("non-positive or non-finite timings: %s", ", ".join(bad))
    return 1 if bad or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
