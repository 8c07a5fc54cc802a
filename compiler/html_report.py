"""The compile report as one self-contained HTML file: per pass, its row of the report table,
the block graph before and after it, activation ranges, quantization error, kept variance.

Self-contained: inline CSS, graphs as inline SVG, plots as PNG ``data:`` URIs, no script and
no external resource, so it opens offline and reads with JavaScript disabled (the graph's
diff / before / after views are CSS radio buttons).

The data comes from ``PassRecord.details`` (captured during :func:`compiler.compile` by
:class:`compiler.report_capture.ReportCapture`) and ``PassRecord.perplexity``; a report without
it (an artifact saved before the HTML report existed) is a :class:`ReportError`, not a partial
page. Graphs are laid out in layers (Sugiyama style, with :mod:`networkx` for the structure:
longest-path layers, dummy nodes on long edges, barycenter ordering); plots use matplotlib
(the ``report`` extra: ``pip install -e ".[report]"``).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import itertools
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from compiler.errors import ArtifactError, ReportError
from compiler.fileio import read_manifest, sha256_of
from compiler.report import PassRecord, Report

log = logging.getLogger(__name__)

#: node box height and the vertical / horizontal gaps of the block graph (px)
NODE_H, LAYER_GAP, NODE_GAP = 22, 16, 12
_CHAR_W = 7.0  # px per character of the 11px monospace labels (DejaVu Sans Mono: 6.6)
_MARKS = ("added", "removed", "rewritten", "same", "external")


# ----------------------------------------------------------------------------- reading


def read_artifact_report(directory: str | os.PathLike) -> Report:
    """The report saved in a compiled artifact, checked against its manifest (the program
    itself is not loaded).

    Raises:
        ArtifactError: not an artifact, a newer format, or report.json missing or modified.
        ReportError: an artifact written before per-pass report data was recorded.
    """

    directory = Path(directory)
    manifest = read_manifest(directory)
    version = manifest["version"]
    entry = (manifest.get("files") or {}).get("report.json")
    rpath = directory / "report.json"
    if not isinstance(entry, dict) or not rpath.is_file():
        raise ArtifactError(f"{directory}: report.json missing")
    if rpath.stat().st_size != entry.get("bytes") or sha256_of(rpath) != entry.get("sha256"):
        raise ArtifactError(f"{rpath}: does not match the manifest (file was modified)")
    try:
        report = Report.from_dict(json.loads(rpath.read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{rpath}: corrupt report: {e}") from e
    if version < 2:
        raise ReportError(
            f"{directory}: artifact format version {version} was written before fxcompress "
            "recorded the per-pass graphs and activations an HTML report needs; compile the "
            "model again (fxcompress compile MODEL ... -o FOLDER) to get a report")
    return report


def check_report(report: Report) -> None:
    """Raise :class:`ReportError` unless every pass that ran has its captured details."""
    from compiler.report_capture import DETAILS_VERSION

    ran = [r for r in report.records if not r.skipped]
    missing = [r.spec for r in ran if r.details is None]
    if missing:
        raise ReportError(
            f"the report has no captured graphs or activations for pass(es) "
            f"{', '.join(missing)} (compiled with report_data=False, or by an older "
            "fxcompress); compile again to get an HTML report")
    bad = sorted({r.details.get("version") for r in ran} - {DETAILS_VERSION}, key=str)
    if bad:
        raise ReportError(f"report details version {bad[0]!r} is not the one this fxcompress "
                          f"renders ({DETAILS_VERSION}); compile again")


# ----------------------------------------------------------------------------- writing


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Render ``report`` and write it to ``path`` atomically (nothing is written on error).

    Raises:
        ReportError: the report lacks the captured data, or matplotlib is missing.
        OSError: the file cannot be written.
    """
    text = render_html(report)
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote HTML report %s (%.1f KB)", path, len(text.encode()) / 1e3)
    return path


def render_html(report: Report) -> str:
    """The whole page (see the module docstring)."""
    check_report(report)
    plots = _Plots()
    records = report.records
    has_ppl = any(r.perplexity for r in records)
    parts = [_head(report), "<main>", _summary(report, has_ppl)]
    if has_ppl:
        parts.append(_perplexity_section(records, plots))
    parts += [_pass_section(r, plots, has_ppl) for r in records]
    parts += ["</main>", _footer(), "</body></html>"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- page parts


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232b;
background:#f6f7f9}
header{background:#1f2b3a;color:#fff;padding:14px 28px}
header h1{margin:0 0 4px;font-size:22px}header p{margin:0;color:#cfd8e3}
main{padding:8px 28px 28px;max-width:1400px}
h2{font-size:19px;margin:0 0 8px}h3{font-size:15px;margin:18px 0 6px;color:#2d4159}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:14px 18px;
margin:14px 0}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #e4e8ee;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kind{font-size:12px;padding:1px 7px;border-radius:9px;margin-left:8px;vertical-align:middle}
.kind.exact{background:#dff3e4;color:#1e6b34}.kind.lossy{background:#fde8d7;color:#8a4310}
.kind.skipped{background:#e7e9ee;color:#555}
.stats{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#374151}
.muted{color:#6b7280}code{font-size:12px}
details{margin:6px 0}summary{cursor:pointer;color:#2d4159}
ul.notes{font-size:12px;margin:4px 0;padding-left:20px}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots figure{margin:0}
figure figcaption{font-size:12px;color:#4b5563;max-width:640px}
img{max-width:100%;height:auto}
.graph{overflow-x:auto;border:1px solid #e4e8ee;border-radius:4px;padding:6px;background:#fcfcfd}
.graph svg{display:block}
.views{font-size:12px;margin:4px 0}.views label{margin-right:12px;cursor:pointer}
.legend span{display:inline-block;padding:0 6px;margin-right:6px;border:1px solid;
border-radius:3px;font-size:12px}
.legend .added{background:#d8f3dc;border-color:#2b9348}
.legend .removed{background:#fde2e2;border-color:#d62828;border-style:dashed}
.legend .rewritten{background:#ffe8c2;border-color:#e07a00}
.legend .same{background:#fff;border-color:#9aa5b1}
.legend .external{background:#eceff3;border-color:#c3cad3}
svg .n rect{stroke-width:1.2}svg .n text{font:11px ui-monospace,Menlo,Consolas,monospace}
svg .n text.sub{font-size:9.5px;fill:#52606d}
svg .added rect{fill:#d8f3dc;stroke:#2b9348}svg .removed rect{fill:#fde2e2;stroke:#d62828;
stroke-dasharray:4 2}svg .rewritten rect{fill:#ffe8c2;stroke:#e07a00}
svg .same rect{fill:#fff;stroke:#9aa5b1}svg .external rect{fill:#eceff3;stroke:#c3cad3}
svg path.e{fill:none;stroke-width:1.1}svg path.e.same{stroke:#9aa5b1}
svg path.e.added{stroke:#2b9348;stroke-width:1.6}
svg path.e.removed{stroke:#d62828;stroke-dasharray:4 3}svg path.e.external{stroke:#c3cad3}
input.view{position:absolute;opacity:0}
input.v-before:checked~.graph .added,input.v-after:checked~.graph .removed{display:none}
input.v-diff:focus-visible+label,input.v-before:focus-visible+label,
input.v-after:focus-visible+label{outline:2px solid #4c8bf5}
input.view:checked+label{font-weight:600;text-decoration:underline}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _head(report: Report) -> str:
    ran = [r for r in report.records if not r.skipped]
    title = f"fxcompress compile report: {report.model or 'model'}"
    facts = (f"{_esc(report.model or 'model')} &middot; {len(ran)} passes &middot; "
             f"{report.total_seconds:.1f} s &middot; calibration {_esc(report.calibration)}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>Compile report</h1><p>{facts}</p></header>")


def _footer() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<footer class=\"muted\" style=\"padding:0 28px 20px\">Written by fxcompress "
            f"(<code>fxcompress report</code>) {now}. Marks: added / removed / rewritten "
            "nodes compare the graph after a pass with the graph before it (same fx node, "
            "changed op, constant arguments or parameters = rewritten).</footer>")


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _stats_text(r: PassRecord) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in r.stats.items() if v not in (0, None, "", []))


def _row_cells(r: PassRecord, has_ppl: bool) -> list[str]:
    """The cells of the report table's row (the text table's columns, plus sweeps and ppl)."""
    link = f"<a href=\"#pass-{r.index}\">{_esc(r.spec)}</a>"
    if r.skipped:
        return [str(r.index), link, "<span class=\"kind skipped\">skipped</span>"] + \
            ["-"] * (5 + has_ppl) + [""]
    kind = "exact" if r.exact else "lossy"
    sweeps = (r.details or {}).get("sweeps")
    cells = [str(r.index), link, f"<span class=\"kind {kind}\">{kind}</span>",
             f"{r.seconds:.2f}", f"{r.nodes_before}&rarr;{r.nodes_after}",
             f"{_human(r.params_before)}&rarr;{_human(r.params_after)}",
             "-" if r.drift is None else f"{r.drift:.2e}",
             "-" if sweeps is None else str(sweeps)]
    if has_ppl:
        p = r.perplexity
        cells.append("-" if not p else f"{p['before']:.3f}&rarr;{p['after']:.3f}")
    cells.append(f"<span class=\"stats\">{_esc(_stats_text(r))}</span>")
    return cells


_HEAD = ["#", "pass", "kind", "sec", "nodes", "params", "drift", "calibration sweeps"]


def _table_head(has_ppl: bool) -> str:
    cols = _HEAD + (["perplexity"] if has_ppl else []) + ["stats"]
    return "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"


def _row_html(r: PassRecord, has_ppl: bool) -> str:
    cells = _row_cells(r, has_ppl)
    num = {0, 3, 4, 5, 6, 7}
    return "<tr>" + "".join(f"<td class=\"num\">{c}</td>" if i in num else f"<td>{c}</td>"
                            for i, c in enumerate(cells)) + "</tr>"


def _summary(report: Report, has_ppl: bool) -> str:
    rows = "".join(_row_html(r, has_ppl) for r in report.records)
    trace = report.extra.get("trace_seconds")
    extra = f"; tracing {trace:.2f} s" if isinstance(trace, (int, float)) else ""
    return (f"<section id=\"passes\"><h2>Passes</h2><table>{_table_head(has_ppl)}{rows}"
            f"</table><p class=\"muted\">total {report.total_seconds:.2f} s{extra}; drift: max "
            "|logits - original logits| on the probe batch after the pass; calibration sweeps: "
            "activation-statistics runs over the calibration set during the pass.</p></section>")


def _pass_section(r: PassRecord, plots: _Plots, has_ppl: bool) -> str:
    kind = "skipped" if r.skipped else ("exact" if r.exact else "lossy")
    out = [f"<section class=\"pass\" id=\"pass-{r.index}\"><h2>{r.index}. {_esc(r.spec)}"
           f"<span class=\"kind {kind}\">{kind}</span></h2>",
           f"<table>{_table_head(has_ppl)}{_row_html(r, has_ppl)}</table>"]
    if r.skipped:
        out.append("<p class=\"muted\">Skipped (bisection): the graph went on unchanged.</p>"
                   "</section>")
        return "\n".join(out)
    if r.notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in r.notes[:200])
        more = f"<li>... {len(r.notes) - 200} more</li>" if len(r.notes) > 200 else ""
        out.append(f"<details><summary>notes ({len(r.notes)})</summary>"
                   f"<ul class=\"notes\">{items}{more}</ul></details>")
    d = r.details or {}
    out.append(_graph_part(r, d.get("graph") or {}))
    if d.get("activations"):
        out.append(_activation_part(r, d["activations"], plots))
    if d.get("quant_error"):
        out.append(_quant_part(r, d["quant_error"], plots))
    if d.get("variance"):
        out.append(_variance_part(r, d["variance"], plots))
    out.append("</section>")
    return "\n".join(out)


def _blocks_label(first: int | None, last: int | None) -> str:
    if first is None:
        return "the graph (no repeated decoder blocks found)"
    return f"block {first}" if first == last else f"blocks {first}-{last} (each)"


def _graph_part(r: PassRecord, g: dict[str, Any]) -> str:
    out = ["<h3>Block graph</h3>"]
    if not g.get("changed"):
        why = ("the pass left the graph as it was" if not r.modified else
               "only parameter values outside the decoder blocks changed")
        out.append(f"<p class=\"muted\">No node of the graph changed ({why}).</p>")
        return "\n".join(out)
    runs = g.get("runs") or []
    items = "".join(f"<li>{_esc(_blocks_label(x['first'], x['last']))}: "
                    f"<code>{_esc(x['summary'])}</code></li>" for x in runs)
    items += f"<li>outside the blocks: <code>{_esc(g.get('outside', '?'))}</code></li>"
    out.append(f"<ul class=\"notes\">{items}</ul>")
    for k, dg in enumerate(g.get("drawn") or []):
        gid = f"g{r.index}-{k}"
        label = _blocks_label(dg["first"], dg["last"])
        views = "".join(
            f"<input type=\"radio\" class=\"view v-{v}\" name=\"{gid}\" id=\"{gid}-{v}\""
            f"{' checked' if v == 'diff' else ''}><label for=\"{gid}-{v}\">{t}</label>"
            for v, t in (("diff", "before + after"), ("before", "before"), ("after", "after")))
        legend = "".join(f"<span class=\"{m}\">{m}</span>" for m in _MARKS)
        out.append(f"<figure class=\"block-graph\"><figcaption>{_esc(label)}: the decoder "
                   f"block before and after the pass (hover a node for its fx name, module and "
                   f"parameters)</figcaption><div class=\"views\">{views}"
                   f"<div class=\"graph\">{graph_svg(dg, gid)}</div></div>"
                   f"<div class=\"legend\">{legend}</div></figure>")
    if not g.get("drawn"):
        out.append("<p class=\"muted\">No decoder block changed.</p>")
    return "\n".join(out)


def _activation_part(r: PassRecord, a: dict[str, Any], plots: _Plots) -> str:
    out = ["<h3>Activation ranges</h3>",
           f"<p class=\"muted\">Per-channel max |x| of each linear's input before and after "
           f"the pass, on {_esc(a.get('sample', 'a sample'))}; the pass moved "
           f"{a.get('moved', 0)} of {len(a.get('sites', []))} sites.</p><div class=\"plots\">"]
    for c in a.get("curves", []):
        out.append(plots.figure(_plot_channels, c, caption=_pooled(c)))
    out.append(plots.figure(_plot_sites, a["sites"],
                            caption="every site: max / median of the per-channel maxima"))
    out.append("</div>")
    rows = "".join(
        f"<tr><td>{_esc(s['label'])}</td><td><code>{_esc(s['site'])}</code></td>"
        + "".join(f"<td class=\"num\">{_fmt(s[w][k]) if s[w] else '-'}</td>"
                  for w in ("before", "after") for k in ("max", "median"))
        + f"<td>{'yes' if s['moved'] else ''}</td></tr>" for s in a["sites"])
    out.append("<details><summary>every site</summary><table><tr><th>site</th><th>name</th>"
               "<th>max before</th><th>median before</th><th>max after</th><th>median after"
               f"</th><th>moved</th></tr>{rows}</table></details>")
    return "\n".join(out)


def _pooled(c: dict[str, Any]) -> str:
    n = max(c["channels"])
    shown = max(len(c["before"] or []), len(c["after"] or []))
    return f"{n} channels; each point is the max over {math.ceil(n / shown)}" \
        if shown and shown < n else f"{n} channels"


def _quant_part(r: PassRecord, q: dict[str, Any], plots: _Plots) -> str:
    layers = q.get("layers") or []
    out = ["<h3>Quantization error</h3>",
           f"<p class=\"muted\">Per quantized layer, relative Frobenius error on "
           f"{_esc(q.get('sample', 'a sample'))}: weight <code>||DQ(W_q) - W|| / ||W||</code>; "
           "output <code>||Y' - Y|| / ||Y||</code> of the layer alone (fed its input from "
           "before the pass) and end to end (in the whole quantized graph).</p>"]
    if layers:
        out.append(f"<div class=\"plots\">{plots.figure(_plot_quant, layers, wide=True)}</div>")
        worst = max(layers, key=lambda x: x["output"] or 0)
        out.append(f"<p>Largest output error: <code>{_esc(worst['layer'])}</code> "
                   f"({_fmt(worst['output'])} alone, {_fmt(worst['end_to_end'])} end to end).</p>")
        rows = "".join(f"<tr><td><code>{_esc(x['layer'])}</code></td><td>{_esc(x['op'])}</td>"
                       + "".join(f"<td class=\"num\">{_fmt(x[k])}</td>"
                                 for k in ("weight", "output", "end_to_end")) + "</tr>"
                       for x in layers)
        out.append("<details><summary>every layer</summary><table><tr><th>layer</th><th>op</th>"
                   "<th>weight</th><th>output (alone)</th><th>output (end to end)</th></tr>"
                   f"{rows}</table></details>")
    return "\n".join(out)


def _variance_part(r: PassRecord, v: list[dict[str, Any]], plots: _Plots) -> str:
    rows = "".join(f"<tr><td>{_esc(b['basis'])}</td><td class=\"num\">{b['width']} / "
                   f"{b['total']}</td><td class=\"num\">{100 * b['kept']:.2f}%</td></tr>"
                   for b in v)
    return ("<h3>Kept variance</h3><p class=\"muted\">Fraction of the calibration variance of "
            "the residual stream kept by the first k principal directions, per PCA basis.</p>"
            f"<div class=\"plots\">{plots.figure(_plot_variance, v)}</div>"
            f"<table><tr><th>basis</th><th>kept directions</th><th>variance kept</th></tr>"
            f"{rows}</table>")


def _perplexity_section(records: list[PassRecord], plots: _Plots) -> str:
    measured = [r for r in records if r.perplexity]
    data = measured[0].perplexity.get("data", "")
    return ("<section id=\"perplexity\"><h2>Perplexity per pass</h2>"
            f"<p class=\"muted\">{_esc(data)}; the first point is the model before any pass."
            f"</p><div class=\"plots\">{plots.figure(_plot_perplexity, measured)}</div>"
            "</section>")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


# ----------------------------------------------------------------------------- graph layout


def layout(nodes: list[dict[str, Any]], edges: list[list[str]]
           ) -> tuple[dict[str, tuple[float, float, float]], list[tuple[list, str]], float, float]:
    """Layered layout: node id -> (x center, y top, width); edge polylines; canvas size.

    Layers are longest paths from the sources (so every edge points down), each edge longer
    than one layer gets a dummy node per layer it crosses, and the order within layers comes
    from barycenter sweeps (down, up, down, ...), then x positions pulled toward the mean of
    the neighbours and pushed apart to the minimum gap.
    """
    import networkx as nx

    g = nx.DiGraph()
    order = {n["id"]: i for i, n in enumerate(nodes)}
    width = {n["id"]: _box_width(n) for n in nodes}
    g.add_nodes_from(order)
    g.add_edges_from((s, d) for s, d, _ in edges if s in order and d in order and s != d)
    if not nx.is_directed_acyclic_graph(g):  # never from an fx graph; keep the page readable
        g.remove_edges_from(list(nx.find_cycle(g)))
    layer: dict[Any, int] = {}
    topo = list(nx.topological_sort(g))
    for n in topo:
        layer[n] = max((layer[p] + 1 for p in g.predecessors(n)), default=0)
    for n in reversed(topo):  # sources (the block's inputs) sit right above their first reader
        if g.in_degree(n) == 0 and g.out_degree(n):
            layer[n] = min(layer[s] for s in g.successors(n)) - 1
    # dummy nodes on long edges
    chains: dict[tuple[str, str], list[Any]] = {}
    h = nx.DiGraph()
    h.add_nodes_from(g.nodes)
    for s, d in g.edges:
        chain, prev = [s], s
        for k in range(layer[s] + 1, layer[d]):
            dummy = ("dummy", s, d, k)
            layer[dummy], width[dummy] = k, 4.0
            h.add_edge(prev, dummy)
            chain.append(dummy)
            prev = dummy
        h.add_edge(prev, d)
        chains[(s, d)] = [*chain, d]
    depth = max(layer.values(), default=-1) + 1
    layers: list[list[Any]] = [[] for _ in range(depth)]
    for n in sorted(h.nodes, key=lambda n: (layer[n], order.get(n, order.get(n[1], 0)
                                                                 if isinstance(n, tuple) else 0))):
        layers[layer[n]].append(n)
    pos = {n: float(i) for lay in layers for i, n in enumerate(lay)}
    for sweep in range(8):  # barycenter ordering
        down = sweep % 2 == 0
        seq = layers[1:] if down else layers[-2::-1]
        for lay in seq:
            def bary(n, down=down):
                nb = list(h.predecessors(n) if down else h.successors(n))
                return sum(pos[m] for m in nb) / len(nb) if nb else pos[n]
            lay.sort(key=bary)
            for i, n in enumerate(lay):
                pos[n] = float(i)
    x: dict[Any, float] = {}
    for lay in layers:  # first placement: packed, centred on 0
        total = sum(width[n] for n in lay) + NODE_GAP * (len(lay) - 1)
        cur = -total / 2
        for n in lay:
            x[n] = cur + width[n] / 2
            cur += width[n] + NODE_GAP
    for sweep in range(6):  # pull toward neighbours' mean x, keep order and gaps
        down = sweep % 2 == 0
        for lay in (layers[1:] if down else layers[-2::-1]):
            want = {}
            for n in lay:
                nb = list(h.predecessors(n) if down else h.successors(n))
                want[n] = sum(x[m] for m in nb) / len(nb) if nb else x[n]
            _place(lay, want, width, x)
    lo = min((x[n] - width[n] / 2 for n in x), default=0.0)
    hi = max((x[n] + width[n] / 2 for n in x), default=0.0)
    margin = 8.0
    step = NODE_H + LAYER_GAP
    placed = {n: (x[n] - lo + margin, margin + layer[n] * step, width[n]) for n in order}
    paths = []
    mark = {(s, d): m for s, d, m in edges}
    for (s, d), chain in chains.items():
        pts = [(x[n] - lo + margin, margin + layer[n] * step) for n in chain]
        paths.append((pts, mark.get((s, d), "same")))
    return placed, paths, hi - lo + 2 * margin, depth * step - LAYER_GAP + 2 * margin


def _place(lay: list[Any], want: dict[Any, float], width: dict[Any, float],
           x: dict[Any, float]) -> None:
    """x positions as close to ``want`` as the order and the minimum gaps allow (a forward
    sweep pushes right, then the layer shifts back by the mean displacement)."""
    pos = []
    for i, n in enumerate(lay):
        p = want[n]
        if i:
            prev = lay[i - 1]
            p = max(p, pos[-1] + (width[prev] + width[n]) / 2 + NODE_GAP)
        pos.append(p)
    shift = sum(want[n] - p for n, p in zip(lay, pos)) / max(1, len(lay))
    for n, p in zip(lay, pos):
        x[n] = p + shift


def _box_width(n: dict[str, Any]) -> float:
    text = n["label"] if not n.get("sub") else f"{n['label']} {n['sub']}"
    return max(40.0, len(_short(text)) * _CHAR_W + 14)


def _short(label: str) -> str:
    """The label drawn in a box: the op name without the ``quantized_decomposed.`` namespace
    (the tooltip keeps it)."""
    return label.replace("quantized_decomposed.", "")


def graph_svg(diff: dict[str, Any], gid: str) -> str:
    """The block diff as an SVG: boxes per node (class = mark), edges with arrowheads."""
    nodes, edges = diff["nodes"], diff["edges"]
    placed, paths, w, h = layout(nodes, edges)
    by_id = {n["id"]: n for n in nodes}
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0f}\" height=\"{h:.0f}\" "
           f"viewBox=\"0 0 {w:.0f} {h:.0f}\" role=\"img\" aria-label=\"block graph\">"
           f"<defs><marker id=\"{gid}-a\" viewBox=\"0 0 8 8\" refX=\"8\" refY=\"4\" "
           "markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">"
           "<path d=\"M0,0L8,4L0,8z\" fill=\"#7b8794\"/></marker></defs>"]
    for pts, mark in paths:
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        pts = [(x0, y0 + NODE_H), *pts[1:-1], (x1, y1)]
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
        for (ax, ay), (bx, by) in itertools.pairwise(pts):
            my = (ay + by) / 2
            d += f"C{ax:.1f},{my:.1f} {bx:.1f},{my:.1f} {bx:.1f},{by:.1f}"
        out.append(f"<path class=\"e {mark}\" d=\"{d}\" marker-end=\"url(#{gid}-a)\"/>")
    for nid, (cx, y, bw) in placed.items():
        n = by_id[nid]
        tip = [f"{nid}: {n['label']}", n.get("module") or "<top>"]
        if n.get("params"):
            tip.append("params " + ", ".join(n["params"]))
        if n.get("why"):
            tip.append(n["why"])
        rx = 10 if n["mark"] == "external" else 3
        text = _short(n["label"])
        sub = n.get("sub") or ""
        tx = cx - bw / 2 + 7
        label = (f"<text x=\"{tx:.1f}\" y=\"{y + 15:.1f}\">{_esc(text)}"
                 + (f"<tspan class=\"sub\" dx=\"5\">{_esc(sub)}</tspan>" if sub else "")
                 + "</text>")
        out.append(f"<g class=\"n {n['mark']}\"><title>{_esc(chr(10).join(tip))}</title>"
                   f"<rect x=\"{cx - bw / 2:.1f}\" y=\"{y:.1f}\" width=\"{bw:.1f}\" "
                   f"height=\"{NODE_H}\" rx=\"{rx}\"/>{label}</g>")
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------- plots


class _Plots:
    """Renders matplotlib figures to inline PNGs (imported once, on first use)."""

    def __init__(self) -> None:
        self._figure = None

    def _load(self):
        if self._figure is None:
            try:
                import matplotlib
                from matplotlib.figure import Figure
            except ImportError as e:
                raise ReportError("the HTML report's plots need matplotlib: pip install -e "
                                  "\".[report]\" (or pip install matplotlib)") from e
            matplotlib.rcParams.update({"font.size": 8, "axes.titlesize": 9,
                                        "legend.fontsize": 7, "axes.spines.top": False,
                                        "axes.spines.right": False})
            self._figure = Figure
        return self._figure

    def figure(self, draw, data, *, caption: str = "", wide: bool = False) -> str:
        figure = self._load()
        fig = figure(figsize=(9.6, 2.6) if wide else (6.2, 2.2), dpi=90, layout="constrained")
        draw(fig, data)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        alt = caption or "plot"
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        return f"<figure><img src=\"{uri}\" alt=\"{_esc(alt)}\">{cap}</figure>"


def _plot_channels(fig, c: dict[str, Any]) -> None:
    ax = fig.subplots()
    for key, color, lw in (("before", "#9aa5b1", 1.0), ("after", "#1f77b4", 0.9)):
        ys = c.get(key)
        if ys:
            step = max(c["channels"][0 if key == "before" else 1], 1) / len(ys)
            ax.plot([i * step for i in range(len(ys))], ys, color=color, lw=lw, label=key)
    _log_y(ax)
    ax.set_xlabel("channel")
    ax.set_ylabel("max |x|")
    ax.set_title(c["label"], loc="left")
    ax.legend(loc="upper right", frameon=False, ncols=2)


def _log_y(ax) -> None:
    """Log y axis with plain tick labels (0.3, 2, 40 rather than 3x10^-1); minor ticks are
    labelled only on axes spanning about a decade or less (else they crowd)."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos) -> str:
        lo, hi = ax.get_ylim()
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 99.0
        digit = round(v / 10 ** math.floor(math.log10(v) + 1e-9)) if v > 0 else 0
        if decades > 1.3 or (decades > 0.6 and digit not in (2, 5)):
            return ""
        return f"{v:g}"

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _plot_sites(fig, sites: list[dict[str, Any]]) -> None:
    ax = fig.subplots()
    for key, color, marker in (("before", "#9aa5b1", "o"), ("after", "#1f77b4", ".")):
        pts = [(i, s[key]["max"] / max(s[key]["median"], 1e-30)) for i, s in enumerate(sites)
               if s[key] and s[key]["median"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker=marker, ms=3, lw=0.8, color=color, label=key)
    _log_y(ax)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("site (graph order)")
    ax.set_ylabel("max / median")
    ax.set_title("outlier ratio per site", loc="left")
    ax.legend(loc="upper right", frameon=False, ncols=2)


def _plot_quant(fig, layers: list[dict[str, Any]]) -> None:
    ax = fig.subplots()
    xs = range(len(layers))
    for key, color, marker, label in (("weight", "#e07a00", "o", "weight"),
                                      ("output", "#1f77b4", "s", "output (layer alone)"),
                                      ("end_to_end", "#9467bd", "^", "output (end to end)")):
        pts = [(i, x[key]) for i, x in zip(xs, layers) if x[key] is not None and x[key] > 0]
        if pts:
            ax.plot(*zip(*pts), marker=marker, ms=3, lw=0.7, color=color, label=label)
    _log_y(ax)
    ax.set_ylabel("relative error")
    ticks = [i for i, x in enumerate(layers) if i == 0 or _block_of(x) != _block_of(layers[i - 1])]
    ax.set_xticks(ticks, [_block_of(layers[i]) for i in ticks], rotation=0)
    ax.set_xlabel("layer (graph order; ticks at block starts)")
    ax.legend(loc="upper left", frameon=False, ncols=3)


def _block_of(layer: dict[str, Any]) -> str:
    """The tick label of a quantized layer: its block (from the graph's structure, recorded by
    report_capture), else the last part of its module path (LM head, embedding)."""
    if layer.get("block") is not None:
        return str(layer["block"])
    return str(layer["layer"]).rsplit(".", 1)[-1]


def _plot_variance(fig, bases: list[dict[str, Any]]) -> None:
    ax = fig.subplots()
    for k, b in enumerate(bases):
        ys = b["cumulative"]
        n = len(ys)
        xs = [1 + round(i * (b["total"] - 1) / max(1, n - 1)) for i in range(n)]
        ax.plot(xs, ys, lw=0.9, label=_short_basis(b["basis"]) if k < 8 else None)
    ax.axvline(bases[0]["width"], color="#d62828", lw=0.8, ls="--")
    ax.text(bases[0]["width"], 0.02, f" k = {bases[0]['width']}", color="#d62828")
    ax.set_xlabel("principal directions kept")
    ax.set_ylabel("variance kept")
    ax.set_ylim(0, 1.02)
    if len(bases) > 1:
        ax.legend(loc="lower right", frameon=False, ncols=2)


def _short_basis(name: str) -> str:
    return name.replace("model.layers.", "L").replace("model.", "")


def _plot_perplexity(fig, records: list[PassRecord]) -> None:
    ax = fig.subplots()
    ys = [records[0].perplexity["before"]] + [r.perplexity["after"] for r in records]
    labels = ["original"] + [f"{r.index}. {r.name}" for r in records]
    ax.plot(range(len(ys)), ys, marker="o", ms=4, color="#1f77b4")
    for i, y in enumerate(ys):
        ax.annotate(f"{y:.3f}", (i, y), textcoords="offset points", xytext=(0, 5),
                    ha="center")
    ax.set_xticks(range(len(ys)), labels)
    ax.set_ylabel("perplexity")
    ax.margins(y=0.25)


__all__ = ["check_report", "graph_svg", "layout", "read_artifact_report", "render_html",
           "write_html"]
