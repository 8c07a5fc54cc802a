"""Family survey: every causal-LM family of the installed transformers through fxcompress.

For every ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this derives a
tiny random-init config automatically (``AutoConfig.for_model(model_type)``, then the common size
attributes it has shrunk: hidden 64, 1 layer, 4 heads, 2 kv heads, ffn 128, vocab 256, 512
positions, head_dim 16, 4 experts with top-2 where it has experts; nested sub-configs such as
``text_config`` likewise; per-layer lists cut to the kept layers), loads it with
``compiler.frontend.load_model(config, seed=0)`` and runs, as ``tests/compiler/test_families.py``
does for the hand-picked matrix:

1. ``trace`` + ``canonicalize`` (through the pass manager, numerically checked), ONNX export
   (``backends.onnxruntime.export_onnx``) and ORT parity against the Hugging Face model at 1e-4
   on two probe shapes;
2. each exact pass alone (``simplify_mask``, ``fuse_linears``, ``smoothquant(alpha=0.5)``,
   ``rptq_reorder``, ``rotation_invariant``, ``slicegpt_rotate``) on a copy of the canonical
   graph, through ``PassManager(check_exact=True)``: the logits are compared in float64 after it.

Outcomes per step: ``ok`` (acted), ``-`` (nothing to do; the pass's first note says why),
``refused`` (an fxcompress error, quoted), ``crash`` (any other exception: an unclear error,
a bug to fix in the mechanism), ``NOT EXACT`` (the numerical check failed: a bug), ``timeout``.
Encoder-decoder, encoder-only and multimodal-wrapper types are skipped with the reason.
Each family runs in a forked child (so a hang or a crash is contained), one at a time, one
thread, with ``--timeout`` seconds.

Run: ``python benchmarks/family_survey.py [--families a,b,c] [--timeout 120]
[--out survey.md] [--json survey.json]`` (all families: about 40-60 min on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.errors import FxCompressError, PipelineError, VerificationError  # noqa: E402

ATOL = 1e-4  # ORT vs the Hugging Face model, float32 (as tests/compiler/test_families.py)

#: the exact passes run alone after canonicalize -> the counter saying it acted (None: modified)
EXACT = {
    "simplify_mask": "masks_simplified",
    "fuse_linears": "linears_fused",
    "smoothquant(alpha=0.5)": "sites_smoothed",
    "rptq_reorder": "groups_reordered",
    "rotation_invariant": None,
    "slicegpt_rotate": "writers",
}
STEPS = ["onnx", "canonicalize"] + [s.split("(")[0] for s in EXACT]

# -------------------------------------------------------------------------- tiny configs

HIDDEN = ("hidden_size", "n_embd", "d_model", "n_embed")
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: attribute -> tiny value (applied only where the config has the attribute set to an int)
SIZES: dict[str, int] = {
    **{k: 64 for k in HIDDEN},
    **{k: 4 for k in ("num_attention_heads", "n_head", "num_heads", "n_heads")},
    **{k: 2 for k in ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")},
    **{k: 128 for k in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size",
                        "moe_intermediate_size", "shared_expert_intermediate_size",
                        "expert_intermediate_size", "decoder_ffn_dim")},
    "vocab_size": 256,
    **{k: 512 for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")},
    "head_dim": 16,
    "rotary_dim": 8,  # partial rotary (CodeGen, GPT-J): at most head_dim
    # mixture of experts: a few experts keep the per-token weight gather small
    **{k: 4 for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")},
    **{k: 2 for k in ("num_experts_per_tok", "moe_topk", "num_selected_experts")},
    **{k: 1 for k in ("n_shared_experts", "n_group", "topk_group", "n_groups")},
    # multi-head latent attention (DeepSeek-style)
    **{k: 32 for k in ("kv_lora_rank", "q_lora_rank")},
    **{k: 8 for k in ("qk_rope_head_dim", "qk_nope_head_dim")},
    "v_head_dim": 16,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
             "decoder_start_token_id", "unk_token_id")


def _n_layers(config) -> int | None:
    for k in LAYERS:
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def tiny_overrides(config, layers: int = 1) -> dict[str, Any]:
    """The keyword overrides that shrink ``config``'s common size attributes (recursively)."""
    out: dict[str, Any] = {}
    for k, v in SIZES.items():
        cur = getattr(config, k, None)
        if isinstance(cur, int) and not isinstance(cur, bool):
            out[k] = v
    # a family whose default is multi-head attention (kv heads = heads) stays so: multi-head
    # latent attention (DeepSeek) has no kv groups, whatever num_key_value_heads says
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads",
                                               "n_heads") if isinstance(getattr(config, k, None), int)),
                 None)
    for k in ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"):
        if k in out and heads is not None and getattr(config, k) >= heads:
            out[k] = SIZES["num_attention_heads"]
    # multi-head latent attention ropes head_dim = qk_rope_head_dim channels: keep them equal
    if "head_dim" in out and getattr(config, "head_dim", None) == getattr(
            config, "qk_rope_head_dim", object()):
        out["head_dim"] = out["qk_rope_head_dim"]
    old_layers = _n_layers(config)
    for k in LAYERS:
        cur = getattr(config, k, None)
        if isinstance(cur, int) and not isinstance(cur, bool):
            out[k] = layers
    # experts without a top-k in the default config (DeepSeek-V2: None) route to 2 of them
    if any(k in out for k in ("num_experts", "num_local_experts", "n_routed_experts",
                              "moe_num_experts")) and hasattr(config, "num_experts_per_tok"):
        out["num_experts_per_tok"] = SIZES["num_experts_per_tok"]
    vocab = out.get("vocab_size", getattr(config, "vocab_size", None))
    for k in TOKEN_IDS:
        cur = getattr(config, k, None)
        if isinstance(vocab, int) and isinstance(cur, int) and cur >= vocab:
            out[k] = 0
        elif isinstance(vocab, int) and isinstance(cur, list) and any(
                isinstance(t, int) and t >= vocab for t in cur):
            out[k] = [0]
    # per-layer lists (layer_types, mlp_layer_types...): keep the first `layers` entries
    if old_layers and old_layers > layers:
        for k, cur in vars(config).items():
            if isinstance(cur, (list, tuple)) and len(cur) == old_layers and not k.startswith("_"):
                out[k] = list(cur[:layers])
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            d = sub.to_dict()
            d.update(tiny_overrides(sub, layers))
            out[name] = d
    return out


def tiny_config(model_type: str, layers: int = 1):
    """``AutoConfig.for_model(model_type)`` with its size attributes shrunk (see the module doc)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    full = tiny_overrides(base, layers)
    # a config that validates its shapes against each other (heads x head_dim = expand x hidden,
    # ...) may reject some of the shrunk sizes: retry leaving head_dim, then the head counts,
    # at their defaults
    heads = {k for k in SIZES if "head" in k}
    attempts = [full, {**full, "head_dim": 32}, {k: v for k, v in full.items() if k != "head_dim"},
                {k: v for k, v in full.items() if k not in heads}]
    for i, kw in enumerate(attempts):
        try:
            return AutoConfig.for_model(model_type, **kw)
        except Exception:
            if i == len(attempts) - 1:
                raise
    raise AssertionError("unreachable")


def skip_reason(model_type: str, class_name: str) -> str | None:
    """Why ``model_type`` is not a decoder-only causal LM family fxcompress compiles, or None."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = AutoConfig.for_model(model_type)
    except Exception:  # a config that cannot be built is a survey failure, not a skip
        return None
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder (is_encoder_decoder=True)"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"encoder-only family (masked LM; {class_name} is its is_decoder=True variant)"
    if not (class_name.endswith("ForCausalLM") or class_name.endswith("LMHeadModel")
            or class_name.endswith("WithLMHead") or class_name.endswith("Decoder")):
        return f"multimodal wrapper ({class_name})"
    return None


# -------------------------------------------------------------------------- one family


def _short(e: BaseException, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return f"{type(e).__name__}: {s[:n]}"


def _where(e: BaseException) -> str:
    """file:line of the innermost frame of ``e`` (its cause chain), outside the stdlib."""
    while e.__cause__ is not None:
        e = e.__cause__
    tb = traceback.extract_tb(e.__traceback__)
    for fr in reversed(tb):
        if "/lib/python3" not in fr.filename or "site-packages" in fr.filename:
            path = fr.filename.split("site-packages/")[-1]
            return f"{path}:{fr.lineno} ({fr.name})"
    return ""


def classify(e: BaseException) -> dict[str, str]:
    """An exception as a survey outcome: refused (fxcompress error) / not exact / crash."""
    msg = _short(e)
    if isinstance(e, VerificationError) and "declared exact" in str(e):
        return {"outcome": "NOT EXACT", "detail": msg}
    if isinstance(e, PipelineError) and "crashed:" in str(e):
        return {"outcome": "crash", "detail": msg, "where": _where(e)}
    if isinstance(e, FxCompressError):
        return {"outcome": "refused", "detail": msg}
    return {"outcome": "crash", "detail": msg, "where": _where(e)}


#: what a clear trace refusal says: the model code's site, or which shape guard fails
SITE_MARKERS = (" at module ", ".py:", "constrains the dynamic",
                "does not hold for every sequence length", "fixes the")


def _names_site(message: str) -> bool:
    return any(m in message for m in SITE_MARKERS)


def _calib(seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)], \
        torch.randint(0, 256, (2, 16), generator=g)


def survey_family(model_type: str, layers: int, verify: bool, send) -> dict[str, Any]:
    """Run every step on one family; ``send(stage)`` reports progress to the parent."""
    from backends.onnxruntime import ORTModel, check_parity, export_onnx
    from compiler.frontend import CausalLMWrapper, load_model, trace
    from compiler.pass_base import PassContext
    from compiler.pass_manager import PassManager
    from compiler.report import Report
    from passes import make_pass

    res: dict[str, Any] = {"family": model_type, "steps": {}}
    t0 = time.perf_counter()
    stage = "config"
    try:
        send(stage)
        config = tiny_config(model_type, layers)
        stage = "load"
        send(stage)
        model = load_model(config, seed=0)
        res["class"] = type(model).__name__
        res["params"] = sum(p.numel() for p in model.parameters())
        stage = "eager"  # the tiny model must run in PyTorch before fxcompress is asked to
        send(stage)
        with torch.no_grad():
            model(input_ids=torch.randint(0, 256, (2, 16)), use_cache=False)
        stage = "trace"
        send(stage)
        base = trace(model)
        res["nodes"] = len(base.graph.nodes)
        stage = "canonicalize"
        send(stage)
        calib, probe = _calib()
        ctx = PassContext(calibration=calib, probe_inputs=probe)
        report = Report(model=model_type)
        PassManager([make_pass("canonicalize")], verify=verify, check_exact=True).run(
            base, ctx, report)
        rec = report.records[-1]
        res["steps"]["canonicalize"] = {"outcome": "ok" if rec.modified else "-",
                                       "detail": "; ".join(rec.notes[:1])}
    except Exception as e:
        res["failed_at"] = stage
        # a tiny config the survey could not derive is the survey's failure, not fxcompress's
        if stage in ("config", "eager"):
            res["error"] = {"outcome": "no tiny config" if stage == "config" else
                            "tiny model fails in PyTorch", "detail": _short(e), "where": _where(e)}
        else:
            res["error"] = classify(e)
            if stage == "trace" and res["error"]["outcome"] == "refused" and not _names_site(str(e)):
                res["error"]["outcome"] = "refused without a site"
        res["seconds"] = time.perf_counter() - t0
        return res
    props = set(ctx.properties)

    send("onnx")
    try:
        with tempfile.TemporaryDirectory(prefix="fxc-survey-") as d:
            path = export_onnx(copy.deepcopy(base), Path(d) / f"{model_type}.onnx",
                               example_inputs=torch.randint(0, 256, (2, 16)))
            g = torch.Generator().manual_seed(3)
            probes = [torch.randint(0, 256, s, generator=g) for s in ((1, 5), (3, 11))]
            # the HF model as fxcompress traces it (use_cache=False): some families' caches
            # cannot be built for a plain forward (LFM3's linear-attention-only cache)
            parity = check_parity(CausalLMWrapper(model), ORTModel(path, threads=1), probes,
                                  atol=ATOL)
        res["steps"]["onnx"] = {"outcome": "ok" if parity.ok else "PARITY FAIL",
                                "detail": str(parity)}
    except Exception as e:
        res["steps"]["onnx"] = classify(e)

    for spec, counter in EXACT.items():
        name = spec.split("(")[0]
        send(name)
        gm = copy.deepcopy(base)
        c = PassContext(calibration=calib, probe_inputs=probe)
        c.properties |= props
        report = Report(model=model_type)
        try:
            PassManager([make_pass(spec)], verify=verify, check_exact=True).run(gm, c, report)
        except Exception as e:
            res["steps"][name] = classify(e)
            continue
        rec = report.records[-1]
        acted = rec.stats.get(counter, 0) if counter else rec.modified
        if rec.modified and acted:
            res["steps"][name] = {"outcome": "ok", "detail": ""}
        elif not rec.modified:
            why = next((n for n in rec.notes if not n.startswith("exact check")), "")
            res["steps"][name] = {"outcome": "-", "detail": why}
        else:
            res["steps"][name] = {"outcome": "ok?", "detail": f"modified without {counter}: "
                                                             f"{rec.stats}"}
    res["seconds"] = time.perf_counter() - t0
    return res


def _child(model_type: str, layers: int, verify: bool, conn) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    try:
        res = survey_family(model_type, layers, verify, lambda s: conn.send(("stage", s)))
    except BaseException as e:  # the survey itself must report, whatever happens
        res = {"family": model_type, "failed_at": "survey", "error": classify(e), "steps": {}}
    conn.send(("result", res))
    conn.close()


def run_family(model_type: str, layers: int, verify: bool, timeout: float) -> dict[str, Any]:
    """One family in a forked child, killed after ``timeout`` seconds."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(model_type, layers, verify, child), daemon=True)
    t0 = time.perf_counter()
    p.start()
    child.close()
    stage, res = "start", None
    while res is None:
        left = timeout - (time.perf_counter() - t0)
        if left <= 0 or not parent.poll(min(left, 1.0)):
            if left <= 0:
                break
            if not p.is_alive() and not parent.poll(0):
                break
            continue
        try:
            kind, val = parent.recv()
        except EOFError:
            break
        if kind == "stage":
            stage = val
        else:
            res = val
    if res is None:
        alive = p.is_alive()
        if alive:
            p.kill()
        p.join(5)
        what = (f"timeout after {timeout:.0f} s" if alive else f"child died (exit {p.exitcode})")
        res = {"family": model_type, "failed_at": stage,
               "error": {"outcome": "timeout" if alive else "crash", "detail": what},
               "steps": {}}
    else:
        p.join(10)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# -------------------------------------------------------------------------- report


def _cell(step: dict | None) -> str:
    if step is None:
        return ""
    o = step["outcome"]
    return o


def summary_line(res: dict) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    if "failed_at" in res:
        e = res["error"]
        return f"{e['outcome']} at {res['failed_at']}: {e['detail'][:160]}"
    return "  ".join(f"{k}={_cell(res['steps'].get(k))}" for k in STEPS)


def group(res: dict) -> str:
    """The outcome group of a family (README table)."""
    if "skipped" in res:
        return "skipped"
    if "failed_at" in res:
        return f"{res['error']['outcome']} at {res['failed_at']}"
    steps = res["steps"]
    onnx = steps.get("onnx", {}).get("outcome")
    bad = [k for k in STEPS if steps.get(k, {}).get("outcome") in ("crash", "NOT EXACT", "ok?",
                                                                    "PARITY FAIL", "timeout")]
    if bad:
        return "crash/failure in " + ", ".join(bad)
    if onnx != "ok":
        return "ONNX " + str(onnx)
    refused = [k for k in STEPS if steps.get(k, {}).get("outcome") == "refused"]
    return "compile+ONNX ok, every exact pass verified" + (
        f" (refused: {', '.join(refused)})" if refused else "")


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Family survey ({meta['transformers']}, torch {meta['torch']})", "",
             f"{meta['command']}", "",
             "| family | class | params | " + " | ".join(STEPS) + " | time s | note |",
             "|---|---|---|" + "---|" * len(STEPS) + "---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['family']} | | | " + " | ".join("" for _ in STEPS)
                         + f" | | skipped: {r['skipped']} |")
            continue
        if "failed_at" in r:
            e = r["error"]
            note = f"{e['outcome']} at {r['failed_at']}: {e['detail'][:200]}"
            if e.get("where"):
                note += f" [{e['where']}]"
            lines.append(f"| {r['family']} | {r.get('class', '')} | {r.get('params', '')} | "
                         + " | ".join("" for _ in STEPS) + f" | {r.get('seconds', '')} | "
                         + note.replace("|", "/") + " |")
            continue
        notes = []
        for k in STEPS:
            s = r["steps"].get(k)
            if s and s["outcome"] not in ("ok",) and s.get("detail"):
                notes.append(f"{k}: {s['detail'][:160]}" + (f" [{s['where']}]" if s.get("where")
                                                             else ""))
        lines.append(f"| {r['family']} | {r.get('class', '')} | {r.get('params', '')} | "
                     + " | ".join(_cell(r["steps"].get(k)) for k in STEPS)
                     + f" | {r.get('seconds', '')} | " + "; ".join(notes).replace("|", "/") + " |")
    lines += ["", "## By outcome", ""]
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(group(r), []).append(r["family"])
    for g, fams in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"- **{g}** ({len(fams)}): {', '.join(fams)}")
    return "\n".join(lines) + "\n"


def counts(results: list[dict]) -> dict[str, int]:
    tried = [r for r in results if "skipped" not in r]
    ok_onnx = [r for r in tried if r.get("steps", {}).get("onnx", {}).get("outcome") == "ok"]
    all_ok = [r for r in ok_onnx if all(
        r["steps"].get(k, {}).get("outcome") in ("ok", "-", "refused") for k in STEPS)]
    no_refusal = [r for r in all_ok if all(
        r["steps"].get(k, {}).get("outcome") in ("ok", "-") for k in STEPS)]
    unclear = [r for r in tried if (r.get("error", {}).get("outcome") in (
        "crash", "timeout", "refused without a site")) or any(
        s.get("outcome") in ("crash", "NOT EXACT", "PARITY FAIL", "ok?")
        for s in r.get("steps", {}).values())]
    refused = [r for r in tried if r not in unclear and (
        r.get("error", {}).get("outcome") == "refused"
        or any(s.get("outcome") == "refused" for s in r.get("steps", {}).values()))]
    return {"types": len(results), "skipped": len(results) - len(tried), "tried": len(tried),
            "compile_onnx_ok": len(ok_onnx),
            "every_exact_pass_verified_or_refused": len(all_ok),
            "every_exact_pass_verified": len(no_refusal),
            "refused_clearly": len(refused), "unclear_or_failing": len(unclear)}


# -------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per family")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--verify", action="store_true",
                    help="graph verification (fake-tensor shapes) after every pass too")
    ap.add_argument("--out", default="family_survey.md", help="markdown table")
    ap.add_argument("--json", default=None, help="JSON results (default: --out with .json)")
    ap.add_argument("--render", default="",
                    help="comma-separated JSON files of earlier (partial) runs: merge them, keep "
                         "the families' order, and write --out / --json without running anything")
    args = ap.parse_args(argv)

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    # every child is forked from this process: import the whole compiler here, so that all
    # families run the same code even if the working tree changes during the survey
    import backends.onnxruntime  # noqa: F401
    import compiler.frontend  # noqa: F401
    import passes  # noqa: F401

    wanted = [f.strip() for f in args.families.split(",") if f.strip()] or sorted(M)
    unknown = [f for f in wanted if f not in M]
    if unknown:
        ap.error(f"not causal-LM model types of transformers {transformers.__version__}: {unknown}")
    json_path = Path(args.json or Path(args.out).with_suffix(".json"))
    meta = {"transformers": f"transformers {transformers.__version__}",
            "torch": torch.__version__,
            "command": "`python benchmarks/family_survey.py " + " ".join(argv or sys.argv[1:])
                       + "`",
            "layers": args.layers, "timeout": args.timeout, "verify": args.verify}
    if args.render:
        merged: dict[str, dict] = {}
        for f in args.render.split(","):
            data = json.loads(Path(f).read_text())
            merged.update({r["family"]: r for r in data["results"]})
            meta.update({k: v for k, v in data["meta"].items() if k not in ("counts",)})
        results = [merged[f] for f in wanted if f in merged]
        for r in results:  # outcomes by this version's rules (earlier runs may predate them)
            e = r.get("error", {})
            if r.get("failed_at") == "trace" and e.get("outcome") in (
                    "refused", "refused without a site"):
                e["outcome"] = "refused" if _names_site(e["detail"]) else "refused without a site"
        return _write(results, meta, Path(args.out), json_path)
    results: list[dict] = []
    t0 = time.perf_counter()
    for i, mt in enumerate(wanted, 1):
        why = skip_reason(mt, M[mt])
        res = {"family": mt, "class": M[mt], "skipped": why} if why else run_family(
            mt, args.layers, args.verify, args.timeout)
        results.append(res)
        print(f"[{i}/{len(wanted)} {time.perf_counter() - t0:6.0f}s] {mt:28s} "
              f"{res.get('seconds', 0):6.1f}s  {summary_line(res)}", flush=True)
        json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return _write(results, meta, Path(args.out), json_path)


def _write(results: list[dict], meta: dict, out: Path, json_path: Path) -> int:
    meta["counts"] = counts(results)
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.write_text(to_markdown(results, meta) + "\n" + json.dumps(meta["counts"]) + "\n")
    print(json.dumps(meta["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
