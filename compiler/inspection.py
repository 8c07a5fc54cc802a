"""Inspection: what the graph holds per block (op counts, parameters by site, shapes)."""

from __future__ import annotations

from collections import Counter, defaultdict

from torch import fx

from compiler import ir

_SKIP_OPS = {"sym_size", "getitem", "alias"}


def _distinct_params(gm: fx.GraphModule):
    """(get_attr node, tensor) for each distinct tensor, first reader's node first."""
    seen: set[int] = set()
    for n in ir.iter_get_attrs(gm):
        t = ir.get_param(gm, n)
        if id(t) not in seen:
            seen.add(id(t))
            yield n, t


def block_summary(gm: fx.GraphModule) -> list[dict]:
    """One row per decoder block (and 'embed/other' outside blocks): op counts and parameter count."""
    ops: dict[object, Counter] = defaultdict(Counter)
    params: dict[object, int] = defaultdict(int)
    for n in gm.graph.nodes:
        b = ir.block_index(n)
        key = b if b is not None else "other"
        if n.op == "call_function" and ir.op_name(n) not in _SKIP_OPS:
            ops[key][ir.op_name(n)] += 1
    for n, t in _distinct_params(gm):
        users = list(n.users)
        b = ir.block_index(users[0]) if users else None
        params[b if b is not None else "other"] += t.numel()
    keys = sorted((k for k in set(ops) | set(params) if k != "other"), key=int)
    if "other" in ops or "other" in params:
        keys.append("other")
    return [{"block": k, "ops": dict(ops[k]), "params": params[k]} for k in keys]


def param_table(gm: fx.GraphModule) -> list[dict]:
    """One row per parameter: site of its first reader, target name, shape, dtype, elements."""
    rows = []
    for n, t in _distinct_params(gm):
        users = list(n.users)
        rows.append({
            "site": ir.site(users[0]) if users else "<unused>",
            "target": str(n.target),
            "shape": tuple(t.shape),
            "dtype": str(t.dtype).replace("torch.", ""),
            "numel": t.numel(),
        })
    return rows


def render_blocks(gm: fx.GraphModule, top_ops: int = 8) -> str:
    """Text table: block, params, most frequent ops."""
    rows = block_summary(gm)
    lines = [f"{'block':<7} {'params':>10}  ops", f"{'-' * 7} {'-' * 10}  ---"]
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in Counter(r["ops"]).most_common(top_ops))
        lines.append(f"{r['block']!s:<7} {r['params']:>10,}  {ops}")
    total = ir.count_params(gm)
    lines.append(f"total params {total:,}; nodes {len(gm.graph.nodes)}")
    return "\n".join(lines)


def render_params(gm: fx.GraphModule, limit: int | None = None) -> str:
    rows = param_table(gm)
    if limit is not None:
        rows = rows[:limit]
    w_site = max([len(r["site"]) for r in rows] + [4])
    lines = [f"{'site':<{w_site}}  {'shape':<16} {'dtype':<8} {'numel':>10}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        lines.append(f"{r['site']:<{w_site}}  {shape:<16} {r['dtype']:<8} {r['numel']:>10,}")
    return "\n".join(lines)
