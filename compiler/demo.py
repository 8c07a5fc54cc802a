"""The main job on a built-in default: ``fxcompress demo``.

Compiles the real ``stories260K`` model from the shared data (or, when that is absent, a
random-init tiny Llama, with a message saying so), prints the per-pass report, exports ONNX, runs
it in ONNX Runtime, checks parity, and reports TinyStories perplexity for the original model, the
compiled graph and the ORT session. No download, no GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

#: The demo's pipeline: every pass is verified; exact ones are checked numerically.
DEMO_PASSES: list[str] = ["canonicalize(untie_embeddings=True)"]


def run_demo(data_dir: str | None = None, out: str | Path = "out/demo", quiet: bool = False,
             passes: list[str] | None = None) -> int:
    import compiler
    from backends.onnxruntime import ORTModel, check_parity, file_size
    from compiler import data, evaluate

    out = Path(out)
    passes = list(DEMO_PASSES if passes is None else passes)
    root = data.data_dir(data_dir)
    stories = root / "stories260K" / "hf" if root else None
    if stories is not None and (stories / "config.json").is_file():
        model_spec: str | Path = stories
        print(f"model: stories260K from {stories}")
    else:
        model_spec = "tiny-llama"
        print("shared data not found (set FXCOMPRESS_DATA or place it at ../shared/data): "
              "using a random-init tiny Llama instead; perplexity is skipped")
    model = compiler.load_model(model_spec)
    needs_calib = any(compiler.registry.make_pass(p).requires & {"calibrated"} for p in passes)
    calibration = "tinystories:32x256" if (needs_calib and isinstance(model_spec, Path)) else None

    t0 = time.perf_counter()
    cm = compiler.compile(model_spec, passes, calibration=calibration, progress=not quiet)
    print(f"\ncompiled in {time.perf_counter() - t0:.1f}s with passes: {', '.join(passes)}\n")
    print(cm.report.table())

    onnx_path = cm.export_onnx(out / "model.onnx")
    ort = ORTModel(onnx_path, threads=2)
    vocab = cm.vocab_size or 256
    g = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, vocab, shape, generator=g) for shape in [(1, 7), (2, 33)]]
    parity = check_parity(cm, ort, probes, atol=1e-4)
    print(f"\nONNX: {onnx_path} ({file_size(onnx_path) / 1e6:.2f} MB); "
          f"ORT vs graph max |diff| {max(parity.max_abs_diff):.2e} -> {'ok' if parity.ok else 'MISMATCH'}")
    artifact = cm.save(out / "artifact", overwrite=True)
    print(f"compiled artifact: {artifact}/ (reload with compiler.load)")

    if not isinstance(model_spec, Path):
        return 0 if parity.ok else 1
    windows = data.evaluation_windows("tinystories", model_spec, n_windows=256, window=256)
    rows = []
    for name, fn in [("torch (original)", model), ("compiled graph", cm), ("onnxruntime", ort)]:
        rows.append((name, evaluate.perplexity(fn, windows, batch_size=16, progress=not quiet)))
    base = rows[0][1]
    print(f"\nperplexity, TinyStories eval half, {base.n_windows} windows x {base.window} tokens "
          f"({base.scored_tokens:,} scored tokens):")
    for name, r in rows:
        print(f"  {name:<17} {r.ppl:8.4f}  ({r.relative_change(base):+.4%} vs torch)")
    worst = max(abs(r.relative_change(base)) for _, r in rows)
    ok = parity.ok and worst <= 1e-3
    print(f"\n{'ok' if ok else 'FAILED'}: torch, compiled graph and ORT agree within {worst:.4%}")
    return 0 if ok else 1
