"""The main job on a built-in default: ``fxcompress demo``.

Compiles the real ``stories260K`` model from the shared data twice, as fp32 (canonicalized) and
as W8A8 with SmoothQuant (calibrated on the TinyStories calibration half), prints each per-pass
report, exports both to ONNX, runs them in ONNX Runtime, checks parity, and reports TinyStories
perplexity for the original model, the compiled graphs and the ORT sessions. When no data folder
was asked for and the default one (``../shared/data``) is absent it compiles a random-init tiny
Llama instead (fp32 only, no perplexity) and says so; a folder that was asked for
(``--data-dir``, ``$FXCOMPRESS_DATA``) but does not exist or lacks stories260K is an error.
Each compiled model also gets its KV-cache export in the ONNX Runtime GenAI layout, which
generates a short story there (onnxruntime-genai's loop when installed, else ONNX Runtime with
ours) and must give the same greedy tokens as the compiled graph's own ``generate``.
No download, no GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

#: (name, passes, needs calibration) of the pipelines the demo compiles.
DEMO_PIPELINES: list[tuple[str, list[str]]] = [
    ("fp32", ["canonicalize(untie_embeddings=True)"]),
    ("w8a8+smoothquant", ["canonicalize", "smoothquant(alpha=0.5)", "insert_qdq(scheme=w8a8)"]),
]
CALIBRATION = "tinystories:32x256"


def run_demo(data_dir: str | None = None, out: str | Path = "out/demo", quiet: bool = False) -> int:
    import compiler
    from backends.onnxruntime import ORTModel, check_parity, file_size
    from compiler import data, evaluate

    out = Path(out)
    stories = demo_model_dir(data_dir)
    if stories is not None:
        model_spec: str | Path = stories
        pipelines = DEMO_PIPELINES
        print(f"model: stories260K from {stories}")
    else:
        model_spec = "tiny-llama"
        pipelines = DEMO_PIPELINES[:1]
        looked = ", ".join(str(p) for p in data._default_candidates())
        print(f"shared data not found (looked in {looked}; set FXCOMPRESS_DATA or pass "
              "--data-dir to use it): using a random-init tiny Llama instead; calibration, "
              "W8A8 and perplexity are skipped")
    model = compiler.load_model(model_spec)
    windows = None
    if isinstance(model_spec, Path):
        windows = data.evaluation_windows("tinystories", model_spec, n_windows=256, window=256)
        base = evaluate.perplexity(model, windows, batch_size=16, progress=not quiet)
        print(f"torch fp32 perplexity: {base}")

    ok = True
    summary = []
    for name, passes in pipelines:
        print(f"\n=== {name}: {', '.join(passes)}")
        needs_calib = any("calibrated" in compiler.registry.make_pass(p).requires for p in passes)
        t0 = time.perf_counter()
        cm = compiler.compile(model_spec, passes, calibration=CALIBRATION if needs_calib else None,
                              progress=not quiet)
        print(f"compiled in {time.perf_counter() - t0:.1f}s"
              + (f" (calibration {CALIBRATION})" if needs_calib else ""))
        print(cm.report.table())
        onnx_path = cm.export_onnx(out / name / "model.onnx")
        ort = ORTModel(onnx_path, threads=2)
        g = torch.Generator().manual_seed(0)
        probes = [torch.randint(0, cm.vocab_size or 256, s, generator=g) for s in [(1, 7), (2, 33)]]
        parity = check_parity(cm, ort, probes, atol=1e-4)
        ok &= parity.ok
        size = file_size(onnx_path)
        print(f"ONNX: {onnx_path} ({size / 1e6:.2f} MB); ORT vs graph max |diff| "
              f"{max(parity.max_abs_diff):.2e} -> {'ok' if parity.ok else 'MISMATCH'}")
        cm.save(out / name / "artifact", overwrite=True)
        ok &= _generate(cm, out / name / "genai")
        if windows is None:
            continue
        graph_ppl = evaluate.perplexity(cm, windows, batch_size=16, progress=not quiet)
        ort_ppl = evaluate.perplexity(ort, windows, batch_size=16, progress=not quiet)
        # fp32 must reproduce torch, a quantized ORT model its graph. Measured (256 windows):
        # graph == torch exactly, ORT 7.9e-10 relative; SmoothQuant W8A8 in ORT 1.4e-4 from its
        # graph (`python benchmarks/quality_quant.py --ort`). The budgets leave room for other
        # CPUs' kernels, far below what a wrong scale costs.
        budget = 1e-6 if name == "fp32" else 1e-3
        agree = abs(ort_ppl.relative_change(graph_ppl)) <= budget
        if name == "fp32":
            agree &= abs(graph_ppl.relative_change(base)) <= budget
        ok &= agree
        summary.append((name, graph_ppl, ort_ppl, size, agree))

    if summary:
        print(f"\nperplexity, TinyStories eval half, {base.n_windows} windows x {base.window} tokens "
              f"({base.scored_tokens:,} scored tokens); torch fp32 {base.ppl:.4f}")
        print(f"  {'pipeline':<18} {'graph':>8} {'ORT':>8} {'vs fp32':>9} {'ONNX MB':>8}")
        for name, gp, op, size, agree in summary:
            print(f"  {name:<18} {gp.ppl:8.4f} {op.ppl:8.4f} {op.relative_change(base):+9.2%} "
                  f"{size / 1e6:8.2f}  {'ok' if agree else 'DISAGREE'}")
    print(f"\n{'ok' if ok else 'FAILED'}: outputs in {out}/")
    return 0 if ok else 1


def demo_model_dir(data_dir: str | Path | None = None) -> Path | None:
    """The stories260K folder the demo compiles, or None to fall back to a random tiny Llama.

    The fall-back is taken only when no folder was asked for (no ``data_dir``, no
    ``$FXCOMPRESS_DATA``) and the default place (``../shared/data``) does not exist.

    Raises:
        DataError: a folder that was asked for (``data_dir`` or ``$FXCOMPRESS_DATA``) does not
            exist, or the data folder found does not hold ``stories260K/hf/config.json``.
    """
    import os

    from compiler import data
    from compiler.errors import DataError

    if data_dir is not None:
        given = f"--data-dir {data_dir}"
        root = Path(data_dir).expanduser()
    elif os.environ.get(data.ENV_DATA):
        given = f"${data.ENV_DATA}={os.environ[data.ENV_DATA]}"
        root = Path(os.environ[data.ENV_DATA]).expanduser()
    else:
        given, root = "", data.data_dir()
        if root is None:
            return None
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (from {given}); point it at the "
                        "shared data folder, which holds stories260K/hf and tinystories/")
    stories = root / data.STORIES260K
    if not (stories / "config.json").is_file():
        raise DataError(f"data folder {root}{f' (from {given})' if given else ''} has no "
                        f"{data.STORIES260K}/config.json, the model the demo compiles; is it "
                        "the shared data folder?")
    return stories


def _generate(cm, folder: Path, prompt: str = "Once upon a time", new_tokens: int = 32) -> bool:
    """Export the GenAI folder, generate from it and from the graph; True if the tokens agree."""
    import importlib.util

    from backends.genai import ORTCausalLM, genai_generate
    from compiler.generation import GenerationStats

    cm.export_genai(folder, overwrite=True)
    if cm.tokenizer_dir is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(cm.tokenizer_dir / "tokenizer.json"))
        ids, decode = torch.tensor([tok.encode(prompt).ids]), tok.decode
    else:
        ids, decode = torch.tensor([[1, 2, 3]]), lambda t: " ".join(map(str, t))
    graph_ids = cm.generate(ids, max_new_tokens=new_tokens)[0].tolist()
    stats = GenerationStats()
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        runtime = "onnxruntime-genai"
        onnx_ids = genai_generate(folder, ids, max_new_tokens=new_tokens, stats=stats)
    else:
        runtime = "ONNX Runtime"
        model = ORTCausalLM(folder, threads=2)
        onnx_ids = model.generate(ids, max_new_tokens=new_tokens)[0].tolist()
        stats = model.stats
    same = onnx_ids == graph_ids
    print(f"generate ({runtime}, KV cache, {folder}): {decode(onnx_ids)!r}\n  {stats}; "
          f"greedy tokens {'equal' if same else 'DIFFER FROM'} the compiled graph's")
    return same
