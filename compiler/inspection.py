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


def block_params(gm: fx.GraphModule) -> dict[str, dict]:
    """Per decoder block (``"0"``, ``"1"``, ... and ``"other"``): parameter count and the shape
    of every parameter, keyed by its name inside the block (``self_attn.q_proj.weight``).

    The block of a parameter is the block of its first reader; JSON-friendly (string keys).
    """
    rows: dict[str, dict] = {}
    for n, t in _distinct_params(gm):
        users = list(n.users)
        b = ir.block_index(users[0]) if users else None
        key = "other" if b is None else str(b)
        row = rows.setdefault(key, {"params": 0, "shapes": {}})
        row["params"] += t.numel()
        name = str(n.target)
        if b is not None and f".{b}." in name:
            name = name.split(f".{b}.", 1)[1]
        row["shapes"][name] = list(t.shape)
    order = sorted((k for k in rows if k != "other"), key=int) + (["other"] if "other" in rows
                                                                  else [])
    return {k: rows[k] for k in order}


def block_changes(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """Lines saying how each block's parameters and shapes changed (runs of equal blocks merged).

    Args:
        before, after: :func:`block_params` of the graph before and after a pass.
    """
    def _shape(s):
        return "x".join(map(str, s)) if s is not None else "-"

    empty = {"params": 0, "shapes": {}}
    per_block = []
    for k in dict.fromkeys([*before, *after]):
        b, a = before.get(k, empty), after.get(k, empty)
        names = list(dict.fromkeys([*b["shapes"], *a["shapes"]]))
        changed = [f"{nm} {_shape(b['shapes'].get(nm))}->{_shape(a['shapes'].get(nm))}"
                   for nm in names if b["shapes"].get(nm) != a["shapes"].get(nm)]
        if b["params"] == a["params"] and not changed:
            continue
        per_block.append((k, f"{b['params']:,} -> {a['params']:,} params"
                             + (f"; {', '.join(changed)}" if changed else "")))
    runs: list[list[str]] = []  # [first block, last block, change]: consecutive equal blocks
    for k, text in per_block:
        last = runs[-1] if runs else None
        if (last and text == last[2] and k.isdigit() and last[1].isdigit()
                and int(k) == int(last[1]) + 1):
            last[1] = k
        else:
            runs.append([k, k, text])

    def label(k0: str, k1: str) -> str:
        if k0 == "other":
            return "outside blocks"
        return f"block {k0}" if k0 == k1 else f"blocks {k0}-{k1} (each)"

    return [f"{label(k0, k1)}: {text}" for k0, k1, text in runs]


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
