"""The ``fxcompress`` command line: demo, compile, eval, inspect, passes.

    fxcompress demo                                   # the main job on a built-in default
    fxcompress compile MODEL --passes "smoothquant(alpha=0.5), insert_qdq(scheme=w8a8)" \\
        --calib tinystories:128x256 -o out/model [--onnx]
    fxcompress compile MODEL --recipe recipe.yaml -o out/model
    fxcompress eval MODEL_OR_ARTIFACT_OR_ONNX --data tinystories --windows 256
    fxcompress inspect MODEL_OR_ARTIFACT [--params] [--diff]
    fxcompress passes

MODEL is a local Hugging Face folder, a config.json, ``tiny-<family>`` (random init), a saved
compiled artifact (a folder with manifest.json) or, for ``eval``, an ``.onnx`` file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from compiler.errors import FxCompressError

log = logging.getLogger("fxcompress")


def _is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _load_any(spec: str):
    """(callable input_ids -> logits, CompiledModel or None, tokenizer dir or None)."""
    import compiler

    if spec.endswith(".onnx"):
        from backends.onnxruntime import ORTModel

        if not Path(spec).is_file():
            raise FxCompressError(f"ONNX file {spec!r} does not exist")
        tok = Path(spec).parent if (Path(spec).parent / "tokenizer.json").is_file() else None
        return ORTModel(spec), None, tok
    if _is_artifact(spec):
        cm = compiler.load(spec)
        return cm, cm, cm.tokenizer_dir
    model = compiler.load_model(spec)
    tok = Path(spec) if (Path(spec) / "tokenizer.json").is_file() else None
    return model, None, tok


def _parse_passes(args) -> list:
    from compiler.registry import load_recipe, make_pass, split_top_level

    if args.recipe and args.passes:
        raise FxCompressError("give either --passes or --recipe, not both")
    if args.recipe:
        return load_recipe(args.recipe)
    if not args.passes:
        return []
    return [make_pass(s.strip()) for s in split_top_level(args.passes) if s.strip()]


def cmd_compile(args) -> int:
    import compiler

    passes = _parse_passes(args)
    calibration = args.calib
    t0 = time.perf_counter()
    cm = compiler.compile(
        args.model, passes, calibration=calibration, skip=_parse_skip(args.skip),
        dump_dir=args.dump_ir, progress=not args.quiet,
    )
    print(cm.report)
    out = Path(args.output)
    cm.save(out, overwrite=args.overwrite)
    print(f"\nsaved compiled model to {out}/ ({time.perf_counter() - t0:.1f}s)")
    if args.onnx:
        from backends.onnxruntime import file_size

        path = cm.export_onnx(out / "model.onnx")
        print(f"exported ONNX to {path} ({file_size(path) / 1e6:.2f} MB)")
    return 0


def _parse_skip(values) -> set:
    out: set = set()
    for v in values or []:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.add(int(part) if part.isdigit() else part)
    return out


def cmd_eval(args) -> int:
    from compiler import data, evaluate

    fn, _, tok_dir = _load_any(args.model)
    tok_dir = Path(args.tokenizer) if args.tokenizer else tok_dir
    if tok_dir is None:
        raise FxCompressError(
            f"no tokenizer found for {args.model!r}: give --tokenizer DIR (a folder with tokenizer.json)"
        )
    windows = data.evaluation_windows(
        args.data, tok_dir, n_windows=args.windows, window=args.window_len, data_dir=args.data_dir
    )
    result = evaluate.perplexity(fn, windows, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{args.model}: {args.data} {result}")
    return 0


def cmd_inspect(args) -> int:
    from compiler import inspection
    from compiler.frontend import trace
    from passes.canonicalize import canonicalize

    model, cm, _ = _load_any(args.model)
    if cm is not None:
        gm = cm.graph_module
        print(f"compiled artifact {args.model} ({cm.model_class})\n")
    else:
        gm = canonicalize(trace(model))
        print(f"{type(model).__name__} traced and canonicalized\n")
    print(inspection.render_blocks(gm))
    if args.params:
        print()
        print(inspection.render_params(gm))
    if cm is not None:
        print("\nper-pass report:")
        print(cm.report.table())
        print("\nper-pass op-count diff:")
        print(cm.report.diff_table())
        print("\nparameters and shapes per block, before -> after:")
        print(cm.report.blocks_table() or "(no pass changed parameter shapes)")
    return 0


def cmd_passes(args) -> int:
    from compiler.registry import registered

    for name, cls in registered().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        kind = "exact" if cls.exact else "lossy"
        print(f"{name:<20} {kind:<6} {doc}")
    return 0


def cmd_demo(args) -> int:
    from compiler.demo import run_demo

    return run_demo(data_dir=args.data_dir, out=args.output, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description="Compile and compress causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass and site")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="trace MODEL, run passes, save the compiled artifact")
    c.add_argument("model")
    c.add_argument("--passes", help='comma-separated pass specs, e.g. "smoothquant(alpha=0.5)"')
    c.add_argument("--recipe", help="YAML recipe file with a passes: list")
    c.add_argument("--calib", help="calibration data spec, e.g. tinystories:128x256")
    c.add_argument("-o", "--output", required=True, help="output folder for the artifact")
    c.add_argument("--onnx", action="store_true", help="also export model.onnx into the folder")
    c.add_argument("--dump-ir", help="write numbered graph dumps into this folder")
    c.add_argument("--skip", action="append", help="pass name or 1-based index to skip")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_compile)

    e = sub.add_parser("eval", help="perplexity of a model, compiled artifact or ONNX file")
    e.add_argument("model")
    e.add_argument("--data", default="tinystories", help="tinystories | wikitext2 | c4")
    e.add_argument("--windows", type=int, default=256, help="number of windows (default 256)")
    e.add_argument("--window-len", type=int, default=256, help="tokens per window incl. BOS")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--tokenizer", help="folder with tokenizer.json")
    e.add_argument("--data-dir", help="data folder (default: $FXCOMPRESS_DATA or ../shared/data)")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="per-block op counts, parameters, per-pass diff")
    i.add_argument("model")
    i.add_argument("--params", action="store_true", help="list every parameter with its site")
    i.set_defaults(func=cmd_inspect)

    ps = sub.add_parser("passes", help="list the registered passes")
    ps.set_defaults(func=cmd_passes)

    d = sub.add_parser("demo", help="the main job: compile stories260K, export ONNX, run ORT, eval")
    d.add_argument("--data-dir", help="data folder (default: $FXCOMPRESS_DATA or ../shared/data)")
    d.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _quiet_third_party()
    try:
        return args.func(args)
    except FxCompressError as e:
        print(f"fxcompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxcompress: interrupted", file=sys.stderr)
        return 130


def _quiet_third_party() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
