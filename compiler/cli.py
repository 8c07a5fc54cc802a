"""The ``fxcompress`` command line: demo, compile, eval, inspect, generate, report, passes.

    fxcompress demo                                   # the main job on a built-in default
    fxcompress compile MODEL --passes "smoothquant(alpha=0.5), insert_qdq(scheme=w8a8)" \\
        --calib tinystories:128x256 -o out/model [--onnx] [--genai]
    fxcompress generate ARTIFACT_OR_GENAI_FOLDER --prompt "Once upon a time" [--onnx]
    fxcompress compile MODEL --recipe recipe.yaml -o out/model
    fxcompress eval MODEL_OR_ARTIFACT_OR_ONNX --data tinystories --windows 256
    fxcompress inspect MODEL_OR_ARTIFACT [--params]   # an artifact also shows the per-pass diff
    fxcompress report ARTIFACT [-o report.html]        # self-contained HTML compile report
    fxcompress passes                                  # every pass with its options and defaults

``-q``/``-v`` go before or after the subcommand. ``python -m fxcompress`` is the same program.

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
    from compiler.frontend import tokenizer_dir_of

    model = compiler.load_model(spec)
    return model, None, tokenizer_dir_of(spec) if Path(spec).exists() else None


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
    root = None
    if args.data_dir is not None:
        from compiler import data

        root = data.require_data_dir(args.data_dir)
        if calibration:
            calibration = data.calibration_from_spec(calibration,
                                                     _tokenizer_folder(args.model, "--calib"),
                                                     data_dir=root)
    t0 = time.perf_counter()
    instruments = [_perplexity_instrument(args.ppl, args.model, root)] if args.ppl else []
    cm = compiler.compile(
        args.model, passes, calibration=calibration, skip=_parse_skip(args.skip),
        dump_dir=args.dump_ir, progress=not args.quiet, instruments=instruments,
        calibration_dtype=args.calibration_dtype,
    )
    print(cm.report)
    out = Path(args.output)
    cm.save(out, overwrite=args.overwrite)
    print(f"\nsaved compiled model to {out}/ ({time.perf_counter() - t0:.1f}s)")
    _write_report_html(cm.report, out / "report.html")
    if args.onnx:
        from backends.onnxruntime import file_size

        path = cm.export_onnx(out / "model.onnx")
        print(f"exported ONNX to {path} ({file_size(path) / 1e6:.2f} MB)")
    if args.genai:
        from backends.onnxruntime import file_size

        folder = cm.export_genai(out / "genai", overwrite=True)
        size = file_size(folder / "model.onnx")
        print(f"wrote ONNX Runtime GenAI folder {folder}/ (KV cache; {size / 1e6:.2f} MB); "
              f"run it with: fxcompress generate {folder} --prompt \"...\"")
    return 0


def _tokenizer_folder(model: str, option: str) -> Path:
    from compiler.frontend import tokenizer_dir_of

    tok = tokenizer_dir_of(model) if Path(model).is_dir() else None
    if tok is None:
        raise FxCompressError(f"{option} needs a model folder with a tokenizer; {model!r} has none")
    return tok


def _perplexity_instrument(spec: str, model: str, data_dir: Path | None = None):
    """``--ppl tinystories[:N]``: perplexity before/after every pass on N windows of 256."""
    from compiler import data
    from compiler.report_capture import PassPerplexity

    name, _, n = spec.partition(":")
    try:
        windows = int(n) if n else 16
    except ValueError as e:
        raise FxCompressError(f"--ppl takes DATA[:WINDOWS], e.g. tinystories:16; got {spec!r}") from e
    tok = _tokenizer_folder(model, "--ppl")
    ids = data.evaluation_windows(name, tok, n_windows=windows, window=256, data_dir=data_dir)
    return PassPerplexity(ids, f"{name}, {ids.shape[0]} windows x {ids.shape[1]} tokens")


def _write_report_html(report, path: Path) -> None:
    """The HTML report next to the artifact; a missing plotting library is a note, not a failure."""
    from compiler.errors import ReportError

    try:
        report.to_html(path)
    except ReportError as e:
        print(f"(no HTML report: {e})")
        return
    print(f"wrote HTML report {path} ({path.stat().st_size / 1e3:.0f} KB)")


def cmd_report(args) -> int:
    from compiler.html_report import read_artifact_report, write_html

    report = read_artifact_report(args.artifact)
    out = Path(args.output) if args.output else Path(args.artifact) / "report.html"
    t0 = time.perf_counter()
    write_html(report, out)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB, {time.perf_counter() - t0:.1f}s)")
    return 0


def _encode_prompt(args, tok_dir: Path | None):
    """(prompt ids [1, S], tokenizer or None) from --prompt (needs a tokenizer) or --ids."""
    import torch

    if (args.prompt is None) == (args.ids is None):
        raise FxCompressError("give the prompt as --prompt TEXT or as --ids 1,2,3 (one of them)")
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError as e:
            raise FxCompressError(f"--ids must be comma-separated integers, got {args.ids!r}") from e
        if not ids:
            raise FxCompressError("--ids is empty")
        tokenizer = None
        if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        return torch.tensor([ids]), tokenizer
    if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
        raise FxCompressError(
            f"{args.model} has no tokenizer (tokenizer.json), so a text prompt cannot be encoded; "
            "give token ids with --ids 1,2,3 instead")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise FxCompressError("the prompt encodes to no tokens")
    return torch.tensor([ids]), tokenizer


def cmd_generate(args) -> int:
    import contextlib
    import tempfile

    import compiler
    from compiler.generation import GenerationStats, SamplingOptions, TextPrinter

    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
               "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
               "seed": args.seed}
    try:
        SamplingOptions.from_kwargs(**options)
    except ValueError as e:
        raise FxCompressError(str(e)) from e
    folder = Path(args.model)
    genai_folder = (folder / "genai_config.json").is_file()
    cm = None
    if genai_folder:
        tok_dir, context = folder, _genai_context(folder)
    else:
        cm = compiler.load(args.model) if _is_artifact(args.model) else compiler.compile(args.model)
        tok_dir, context = cm.tokenizer_dir, cm.context_length
    ids, tokenizer = _encode_prompt(args, tok_dir)
    if context is not None and ids.shape[1] >= context:
        raise FxCompressError(f"the prompt has {ids.shape[1]} tokens and the model's context "
                              f"length is {context}: shorten the prompt")
    stats = GenerationStats()
    printer = TextPrinter(tokenizer, skip_prompt=False) if tokenizer is not None else None
    use_onnx = genai_folder or args.onnx
    runtime = args.runtime or ("genai" if _has_genai() else "ort")
    with contextlib.ExitStack() as stack:
        if use_onnx and cm is not None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxcompress-gen-")))
            print(f"exporting the KV-cache ONNX ({runtime}) ...", file=sys.stderr)
            folder = cm.export_genai(tmp / "genai")
        try:
            out = _run_generation(use_onnx, runtime, cm, folder, ids, options, printer, stats,
                                  args.threads)
        except ValueError as e:
            raise FxCompressError(str(e)) from e
    if printer is None:
        print(",".join(str(t) for t in out[ids.shape[1]:]))
    where = f"ONNX Runtime{' GenAI' if runtime == 'genai' else ''}" if use_onnx else "torch graph"
    print(f"[{where}] {stats}", file=sys.stderr)
    return 0


def _run_generation(use_onnx, runtime, cm, folder, ids, options, printer, stats, threads):
    if not use_onnx:
        out = cm.generate(ids, streamer=printer, **options)
        stats.__dict__.update(cm.generation_stats.__dict__)
        return out[0].tolist()
    if runtime == "genai":
        from backends.genai import genai_generate

        if threads is not None:
            raise FxCompressError("--threads applies to --runtime ort; ONNX Runtime GenAI reads "
                                  "session_options in genai_config.json")
        if printer is not None:
            printer.put(ids)
        out = genai_generate(folder, ids, stats=stats,
                             streamer=(lambda t: printer.put(_as_tensor(t))) if printer else None,
                             **options)
        if printer is not None:
            printer.end()
        return out
    from backends.genai import ORTCausalLM

    model = ORTCausalLM(folder, threads=threads)
    out = model.generate(ids, streamer=printer, **options)
    stats.__dict__.update(model.stats.__dict__)
    return out[0].tolist()


def _as_tensor(token: int):
    import torch

    return torch.tensor([token])


def _has_genai() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def _genai_context(folder: Path) -> int | None:
    from backends.genai import read_genai_config

    return read_genai_config(folder)["model"].get("context_length")


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
        req = getattr(cls, "requires", frozenset())  # a property where options decide it
        needs = " (needs calibration)" if isinstance(req, frozenset) and "calibrated" in req else ""
        print(f"{name:<20} {kind:<6} {doc}{needs}")
        options = pass_options(cls)
        if not options:
            print(f"{'':<4}(no options)")
        for opt, default, help_text in options:
            spec = f"{opt}={default}"
            print(f"{'':<4}{spec:<28} {help_text}".rstrip())
    print('\noptions go in parentheses: --passes "smoothquant(alpha=0.6), '
          'insert_qdq(scheme=w8a8)"')
    return 0


def pass_options(cls) -> list[tuple[str, str, str]]:
    """(option, default as written in a pass spec, first sentence of its description) for each
    keyword of the pass class's ``__init__``; the description comes from the option's entry
    ``name (type, default ...): text`` in the pass module's docstring ('' when it has none)."""
    import inspect

    described = _option_docs(sys.modules[cls.__module__].__doc__ or "")
    rows = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = "REQUIRED" if p.default is p.empty else _spec_value(p.default)
        rows.append((p.name, default, described.get(p.name, "")))
    return rows


def _spec_value(value) -> str:
    """A default as a pass spec writes it (``true``, ``none``, ``[1, 2]``)."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _option_docs(doc: str) -> dict[str, str]:
    """``name (type, default x): text`` entries of a docstring -> first sentence of the text."""
    import re

    entry = re.compile(r"^(\s*)((?:[a-z_][a-z0-9_]* \([^)]*\)(?:, )?)+):\s*(.*)$")
    out: dict[str, str] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        m = entry.match(lines[i])
        if not m:
            i += 1
            continue
        indent, names, text = len(m.group(1)), m.group(2), [m.group(3)]
        i += 1
        while i < len(lines) and lines[i].strip() and not entry.match(lines[i]) and \
                len(lines[i]) - len(lines[i].lstrip()) > indent:
            text.append(lines[i].strip())
            i += 1
        joined = " ".join(text).replace("``", "").replace("e.g. ", "e.g.\0").replace("i.e. ", "i.e.\0")
        sentence = re.split(r"(?<=[.;])\s", joined, maxsplit=1)[0]
        head, colon, _ = sentence.partition(": ")
        if colon and len(sentence) > 100 and len(head) >= 25:
            sentence = head  # "how the range is chosen: <the choices>" -> the first clause
        sentence = sentence.replace("\0", " ").rstrip(";:")
        for name in re.findall(r"([a-z_][a-z0-9_]*) \(", names):
            out.setdefault(name, sentence)
    return out


def cmd_demo(args) -> int:
    from compiler.demo import run_demo

    return run_demo(data_dir=args.data_dir, out=args.output, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description="Compile and compress causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass and site")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # the same flags after the subcommand; SUPPRESS keeps a flag given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log each pass and site")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name, **kw):
        return _add_parser(name, parents=[common], **kw)

    sub.add_parser = add_parser

    c = sub.add_parser("compile", help="trace MODEL, run passes, save the compiled artifact")
    c.add_argument("model")
    c.add_argument("--passes", help='comma-separated pass specs, e.g. "smoothquant(alpha=0.5)"')
    c.add_argument("--recipe", help="YAML recipe file with a passes: list")
    c.add_argument("--calib", help="calibration data spec, e.g. tinystories:128x256")
    c.add_argument("--calibration-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the calibration runs' matrix products (bfloat16: fast "
                        "on CPUs with AMX; the model stays float32)")
    c.add_argument("-o", "--output", required=True, help="output folder for the artifact")
    c.add_argument("--onnx", action="store_true", help="also export model.onnx into the folder")
    c.add_argument("--genai", action="store_true",
                   help="also write an ONNX Runtime GenAI folder (KV cache) into OUTPUT/genai")
    c.add_argument("--dump-ir", help="write numbered graph dumps into this folder")
    c.add_argument("--skip", action="append", help="pass name or 1-based index to skip")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--ppl", metavar="DATA[:N]",
                   help="perplexity before/after every pass on N windows of 256 tokens "
                        "(e.g. tinystories:16), shown in the report")
    c.add_argument("--data-dir", help="data folder for --calib and --ppl "
                                      "(default: $FXCOMPRESS_DATA or ../shared/data)")
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

    gn = sub.add_parser("generate", help="generate text with the KV cache, streaming tokens")
    gn.add_argument("model", help="compiled artifact, GenAI folder (genai_config.json) or model")
    gn.add_argument("--prompt", help="prompt text (encoded with the model's tokenizer)")
    gn.add_argument("--ids", help="prompt as comma-separated token ids instead of text")
    gn.add_argument("--max-new-tokens", type=int, default=64)
    gn.add_argument("--onnx", action="store_true",
                    help="run the ONNX export (implied for a GenAI folder); default: the graph")
    gn.add_argument("--runtime", choices=("genai", "ort"),
                    help="ONNX runner: onnxruntime-genai's loop (default when installed) or "
                         "ONNX Runtime with fxcompress's loop")
    gn.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gn.add_argument("--temperature", type=float, default=1.0)
    gn.add_argument("--top-k", type=int, default=0, help="0: off")
    gn.add_argument("--top-p", type=float, default=1.0)
    gn.add_argument("--seed", type=int, help="random seed for --sample")
    gn.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (--runtime ort)")
    gn.set_defaults(func=cmd_generate)

    rp = sub.add_parser("report", help="write the self-contained HTML compile report of an "
                                       "artifact (graphs, activation ranges, errors per pass)")
    rp.add_argument("artifact", help="compiled artifact folder (fxcompress compile -o)")
    rp.add_argument("-o", "--output", help="HTML file (default ARTIFACT/report.html)")
    rp.set_defaults(func=cmd_report)

    ps = sub.add_parser("passes", help="list the registered passes with their options and "
                                       "defaults")
    ps.set_defaults(func=cmd_passes)

    d = sub.add_parser("demo", help="the main job: compile stories260K, export ONNX, run ORT, eval")
    d.add_argument("--data-dir", help="data folder holding stories260K/hf (default: "
                                      "$FXCOMPRESS_DATA or ../shared/data; a folder given here "
                                      "or in $FXCOMPRESS_DATA must exist and hold it)")
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
