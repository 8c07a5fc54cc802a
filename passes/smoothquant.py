"""SmoothQuant: migrate activation outliers into the weights with exact per-channel scales.

Paper: SmoothQuant (Xiao et al., arXiv:2211.10438).

Identity relied on: ``Y = X W^T = (X diag(s)^-1) (W diag(s))^T`` for any positive ``s``. The
division by ``s`` is folded into whatever *produces* ``X`` (so no runtime scale op is added) and
the multiplication into the columns of every linear that *reads* ``X``:

- ``X`` is a norm's output (``rms_norm`` / ``layer_norm``): ``gain /= s`` and ``bias /= s``.
  A norm without a gain (after SliceGPT or ``rotation_invariant`` folded it into the readers)
  first gets a gain of ones, ``norm(x) = norm(x) * 1``, so smoothing still acts there.
  Only the norm's output is rescaled; the residual stream it reads is untouched.
- ``X`` is reached from a linear's output through ops that are linear (or positively
  homogeneous) in each channel: views/transposes/GQA repeats, the ``v`` operand of
  ``scaled_dot_product_attention`` (the output is a per-(head, head_dim) linear function of v),
  one factor of an elementwise product (``silu(gate) * up``: scale ``up``), ``relu``, a slice
  or split of a fused output's last dim (``qkv_proj``, ``gate_up_proj``, GPT-2's ``c_attn``:
  only the rows of that part): that linear's rows and bias ``/= s``. Which producer row holds which consumer column comes from the
  channel dependency graph (:mod:`compiler.depgraph`): positions agree on every leaf axis
  (``kv_heads x v_head_dim``), and a broadcast axis (GQA's ``q_per_kv``) shares one scale.

Scales (per producer channel, over every consumer column holding it):
``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``, ``max|X_j|`` from
:class:`compiler.stats.ActivationStats` at the consumers' ``:in`` site and ``max|W_:,j|`` over
all consuming linears. Channels whose activation or weight is all zero keep ``s = 1``.

Statistics: when a later pass wants activation histograms (``Pass.wants_histograms``: e.g.
``insert_qdq``'s mse ranges; a pass run on its own assumes one may), one block-by-block sweep
(:mod:`compiler.blockwise`, ``propagate="original"``: smoothing is exact, so the unsmoothed
blocks' outputs feed the next block). Per block: the
extrema of every linear input, then the block's sites decided and folded (later sites first),
then the statistics of the smoothed inputs, log2 histograms included, taken from the block's
stored inputs times ``1/s`` (:class:`compiler.stats.BlockStats`) and handed to the passes after,
so ``insert_qdq``'s mse / percentile ranges need no sweep of their own. The scales are those of
the whole-graph route bit for bit. Right after a pass that runs its own block sweep and can
measure on its output graph (``slicegpt`` with sequential calibration), no sweep at all: this
pass hands that pass a request (:meth:`SmoothQuant.stats_request`, the pass contract's
:meth:`compiler.pass_base.Pass.stats_request`), the sites are decided unit by unit in that
sweep on the output graph's values and weights (same order, same formulas), and this pass only
folds the scales and hands the smoothed statistics on (the pass notes say so). That route (one :class:`compiler.stats.ActivationStats`
sweep, whose extrema follow the scales exactly but whose histograms do not) is taken when the
statistics are already at hand, when no later pass wants histograms, when ``stats_cache_dir``
asks for the disk cache, when the graph has no block split (or a block would hold several
attention layers), or when a site spans two blocks; the pass notes say which.

Sites rewritten: every tensor read only by linears (the LM head excepted: it stays float by
default, so smoothing it buys nothing) whose producer is foldable as above. Skipped, with a note:
tensors also read by a non-linear op, the LM head's input, producers that are not linear in the
channel (``gelu``, ``silu``, a residual ``add``), producers shared with
other readers, consumers whose weight another op also reads (a tied embedding table, e.g.
Gemma2's LM head behind its logit soft-capping). No per-family code: only op kinds and the
channel groups decide.

Preconditions: ``canonical`` and ``calibrated``; the graph must not be quantized yet (checked
in ``run``: a ``quantized_decomposed`` node raises :class:`PreconditionError`). Exact; preserves
the channel groups analysis (shapes and structure are unchanged) unless it gave a norm a gain
(a new group member), not activation statistics.
With a fixed alpha a second run finds ``s = 1`` everywhere
(``max|X/s|^a / max|W s|^(1-a) = s / s``) and reports ``modified=False`` (scales within
``1e-5`` of 1 are treated as 1); with ``alpha="auto"`` the pass records the sites it smoothed
(``gm.meta["smoothquant_searched"]``) and a second run leaves them alone.

Hyper-parameters:
    alpha (float or "auto", default "auto"): migration strength in [0, 1]; 0 leaves activations
        as they are divided by the weight range, 1 moves the whole activation range into the
        weights. ``"auto"``: chosen per site from ``alpha_grid`` on the calibration data (the
        search of SmoothQuant's follow-ups, e.g. OS+ arXiv:2304.09145 and Intel Neural
        Compressor's auto-alpha), see below.
    alpha_grid (list[float], default 0, 0.05, ..., 1): the candidates of the search.

Alpha search (``alpha="auto"``): per site, the alpha whose smoothing gives the consumers'
int8 outputs (per-channel weights, per-tensor activations over the abs-max range) the least
expected squared error, from statistics only -- no extra forward pass:

    err(alpha) = sum_j  E[x_j^2] / s_j^2 * ||dW'_:,j||^2
               + min(step^2 / 12, E[x_j^2] / s_j^2) * ||W'_:,j||^2

over the consumers' columns ``j``, with ``W' = W diag(s)``, ``dW'`` its int8 rounding error,
``step = max_j max|x_j| / s_j / 127``: the weight term is exact when activation channels are
uncorrelated (the diagonal of ``X^T X``), the activation term is the uniform rounding-noise
model (a value under half a step rounds to 0 and costs ``x^2``). ``E[x_j^2]`` comes from the
statistics' per-channel ``sum x^2`` (collected with the histogram, :mod:`compiler.stats`). The
chosen alpha of every site is in the pass notes.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from compiler import ir
from compiler.blockwise import BlockVisitor
from compiler.depgraph import ChannelGroups, ChannelGroupsAnalysis
from compiler.errors import PassError
from compiler.pass_base import HANDED_STATS, Pass, PassContext, PassResult
from compiler.stats import StatsRequest
from compiler.qdq import is_lm_head

log = logging.getLogger(__name__)

#: |s - 1| below this everywhere counts as "already smooth" (a second run is a no-op)
UNIT_TOL = 1e-5
#: floor of activation / weight maxima in the scale formula (as in the reference code)
MIN_RANGE = 1e-5
#: candidates of the per-site alpha search
DEFAULT_ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))

# Ops through which a per-channel scale passes unchanged (pure data movement), by short name.
_MOVE_OPS = {
    "view", "reshape", "_unsafe_view", "flatten", "transpose", "t", "permute", "unsqueeze",
    "squeeze", "expand", "contiguous", "clone", "alias", "to", "_to_copy", "dropout",
}
# Positively homogeneous: f(x / s) = f(x) / s for s > 0.
_HOMOGENEOUS_OPS = {"relu"}
_SPLIT_OPS = {"split", "split_with_sizes", "chunk"}


is_quantized_graph = ir.is_quantized


@dataclass
class SmoothingSite:
    """One activation tensor to smooth and where its scales fold.

    Attributes:
        site: the ActivationStats site of the consumers' input (``<first consumer>:in``).
        x: the activation node the consumers read.
        consumers: the ``aten.linear`` nodes reading ``x`` (their columns are multiplied).
        producer: the norm or linear node whose parameters absorb ``1/s``.
        producer_params: ``(get_attr target, dim)`` of the producer parameters scaled by ``1/s``.
        channel_of: per consumer column, the producer channel holding it (a LongTensor).
        width: number of producer channels along the scaled dim.
        skip: why the site is left alone (None when it is smoothed).
        create_gain: the producer is a gain-free norm; a gain of ones is added at fold time.
    """

    site: str
    x: fx.Node
    consumers: list[fx.Node]
    producer: fx.Node | None = None
    producer_params: list[tuple[str, int]] = field(default_factory=list)
    channel_of: torch.Tensor | None = None
    width: int = 0
    skip: str | None = None
    create_gain: bool = False


# ----------------------------------------------------------------------------- decisions


def find_smoothing_sites(gm: fx.GraphModule, groups: ChannelGroups) -> list[SmoothingSite]:
    """Decide, for every tensor read by linears, where its smoothing scales fold. Pure.

    Args:
        gm: a canonical GraphModule.
        groups: its channel groups (``ChannelGroupsAnalysis``).

    Returns:
        One :class:`SmoothingSite` per tensor read by a linear, in graph order; skipped ones
        carry a reason.
    """
    readers: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if ir.is_op(n, ir.LINEAR):
            readers.setdefault(n.args[0], []).append(n)
    out = []
    for x, lins in readers.items():
        s = SmoothingSite(f"{ir.site(lins[0])}:in", x, lins)
        out.append(s)
        if any(is_lm_head(n) for n in lins):
            s.skip = "read by the LM head, which stays float"
        elif any(ir.param_node(ir.linear_parts(n)[1]) is None for n in lins):
            s.skip = "a reading linear's weight is not a parameter"
        elif any(_read_outside(gm, ir.linear_parts(n)[1], lins) for n in lins):
            s.skip = ("a reading linear's weight is also read elsewhere (a tied embedding "
                      "table); scaling its columns would change that reader")
        elif any(u not in lins for u in x.users):
            others = sorted({ir.op_name(u) for u in x.users if u not in lins})
            s.skip = f"also read by {', '.join(others)}; a scale would change them"
        elif ir.is_op(x, ir.RMS_NORM, ir.LAYER_NORM):
            _decide_norm(gm, s)
        else:
            _decide_linear(gm, groups, s)
    return out


def _decide_norm(gm: fx.GraphModule, s: SmoothingSite) -> None:
    x = s.x
    w = x.args[2] if len(x.args) > 2 else x.kwargs.get("weight")
    b = None
    if ir.is_op(x, ir.LAYER_NORM):
        b = x.args[3] if len(x.args) > 3 else x.kwargs.get("bias")
    if w is None:
        # A gain-free norm (e.g. after SliceGPT folded the gains into the readers) gets a gain
        # of ones when the site is smoothed: norm(x) = norm(x) * 1, exact.
        s.create_gain = True
    elif ir.param_node(w) is None:
        s.skip = f"{ir.site(x)}: norm gain is not a parameter"
        return
    if b is not None and ir.param_node(b) is None:
        s.skip = f"{ir.site(x)}: norm bias is not a parameter"
        return
    if any(ir.is_shared_param(gm, p, x) for p in (w, b) if p is not None):
        s.skip = f"{ir.site(x)}: norm parameters are also read elsewhere"
        return
    width = x.meta["val"].shape[-1] if w is None else ir.get_param(gm, w).shape[0]
    s.producer = x
    s.producer_params = ([] if w is None else [(str(w.target), 0)]) \
        + ([(str(b.target), 0)] if b is not None else [])
    s.channel_of = torch.arange(width)
    s.width = width


def _read_outside(gm: fx.GraphModule, p: fx.Node, users: list[fx.Node]) -> bool:
    """True if the parameter behind ``p`` is read by an op not in ``users``."""
    target = str(p.target)
    return any(u not in users for n in ir.iter_get_attrs(gm) if str(n.target) == target
               for u in n.users)


def trace_linear_producer(x: fx.Node) -> tuple[fx.Node | None, str, tuple[int, int] | None]:
    """Walk back from ``x`` to a linear whose rows can absorb a per-channel scale of ``x``.

    Returns:
        ``(linear node, "", rows)`` or ``(None, reason, None)``. ``rows`` is the ``[start,
        stop)`` range of the linear's rows the walk came through when it crossed a slice or
        split of the output's last dim (a fused ``qkv`` / ``gate_up``), else None (all rows).
        Every tensor on the way must feed only the next op of the way (a split feeding
        disjoint getitems is allowed), so scaling the producer changes nothing else.
    """
    n = x
    rows: tuple[int, int] | None = None
    while True:
        if ir.is_op(n, ir.LINEAR):
            if ir.param_node(ir.linear_parts(n)[1]) is None:
                return None, f"producer {ir.site(n)} has a non-parameter weight", None
            return n, "", rows
        if n.op != "call_function":
            return None, f"{n.op} {n.name} is not a foldable producer", None
        name = ir.op_name(n)
        if name in _MOVE_OPS or name in _HOMOGENEOUS_OPS:
            nxt = n.args[0]
            if rows is not None and name not in ("to", "_to_copy", "clone", "contiguous",
                                                 "alias", "dropout", "relu"):
                return None, f"{name} at {ir.site(n)} reshapes a sliced producer output", None
        elif name in ("mul", "div") and not isinstance(n.args[1], fx.Node):
            nxt = n.args[0]
        elif ir.is_op(n, ir.SDPA):
            nxt = n.args[2]  # attention output is linear in v, per (head, head_dim)
        elif (n.target is operator.getitem and isinstance(n.args[0], fx.Node)
              and ir.op_name(n.args[0]) in _SPLIT_OPS) or name == "slice":
            part = _last_dim_part(n)
            if part is None:
                return None, f"{name} at {ir.site(n)} does not slice the channel dim", None
            rows = part if rows is None else (part[0] + rows[0], part[0] + rows[1])
            if name != "slice":
                n = n.args[0]
            nxt = n.args[0]
        elif name == "mul" and all(isinstance(a, fx.Node) for a in n.args[:2]):
            # x = a * b: scaling one factor scales the product; take the first foldable one.
            reasons = []
            for a in n.args[:2]:
                if len(a.users) != 1:
                    reasons.append(f"{a.name} has other readers")
                    continue
                p, why, r = trace_linear_producer(a)
                if p is not None and rows is None:
                    return p, "", r
                reasons.append(why or "sliced twice")
            return None, (f"neither factor of {ir.site(n)} {name} is foldable "
                          f"({'; '.join(reasons)})"), None
        else:
            return None, f"{name} at {ir.site(n)} is not linear in the channel", None
        if not isinstance(nxt, fx.Node):
            return None, f"{name} at {ir.site(n)} reads a constant", None
        if len(nxt.users) != 1 and ir.op_name(nxt) not in _SPLIT_OPS \
                and not all(ir.op_name(u) == "slice" for u in nxt.users):
            return None, f"{nxt.name} ({ir.site(nxt)}) has other readers", None
        n = nxt


def _last_dim_part(n: fx.Node) -> tuple[int, int] | None:
    """``[start, stop)`` of the last dim that a slice / split getitem selects, else None."""
    src = n.args[0]
    if ir.op_name(n) == "slice":
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
            return None
        size, rank = val.shape[-1], val.dim()
        dim = n.args[1] if len(n.args) > 1 else 0
        start = n.args[2] if len(n.args) > 2 else 0
        stop = n.args[3] if len(n.args) > 3 else size
        step = n.args[4] if len(n.args) > 4 else 1
        if dim % rank != rank - 1 or step != 1 or not isinstance(start, int) \
                or not isinstance(stop, int):
            return None
        start, stop = start % size if start < 0 else start, min(stop if stop >= 0 else stop + size,
                                                                size)
        return start, stop
    split = src
    x = split.args[0]
    xval = x.meta.get("val")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(xval, torch.Tensor) or dim % xval.dim() != xval.dim() - 1 \
            or not isinstance(xval.shape[-1], int):
        return None
    size = xval.shape[-1]
    if ir.op_name(split) == "chunk":
        k = -(-size // split.args[1])
        sizes = [min(k, size - i) for i in range(0, size, k)]
    elif ir.op_name(split) == "split" and isinstance(split.args[1], int):
        sizes = [min(split.args[1], size - i) for i in range(0, size, split.args[1])]
    else:
        sizes = list(split.args[1])
    idx = n.args[1]
    start = sum(sizes[:idx])
    return start, start + sizes[idx]


def _decide_linear(gm: fx.GraphModule, groups: ChannelGroups, s: SmoothingSite) -> None:
    prod, why, rows = trace_linear_producer(s.x)
    if prod is None:
        s.skip = why
        return
    _, pw, pb = ir.linear_parts(prod)
    if any(ir.is_shared_param(gm, p, prod) for p in (pw, pb) if ir.param_node(p) is not None):
        s.skip = f"producer {ir.site(prod)}: parameters are also read elsewhere"
        return
    g = groups.group_of(str(pw.target), 0)
    pm = g and next((m for m in g.members if m.target == str(pw.target) and m.dim == 0
                     and m.role == "out"), None)
    if pm is None:
        s.skip = f"producer {ir.site(prod)}: its rows are not in a channel group"
        return
    maps = []
    for c in s.consumers:
        cw = str(ir.linear_parts(c)[1].target)
        cm = next((m for m in g.members if m.target == cw and m.dim == 1 and m.role == "in"),
                  None)
        if cm is None:
            s.skip = f"{ir.site(c)}: columns are not in {ir.site(prod)}'s channel group"
            return
        m = _channel_map(g, pm, cm, rows)
        if m is None:
            s.skip = (f"{ir.site(c)}: some columns hold no channel of {ir.site(prod)}'s rows "
                      f"({cm.layout} vs {pm.layout})")
            return
        maps.append(m)
    if any(not torch.equal(maps[0], m) for m in maps[1:]):
        s.skip = "consumers disagree on the channel layout"
        return
    s.producer = prod
    s.producer_params = [(str(pw.target), 0)]
    if ir.param_node(pb) is not None:
        s.producer_params.append((str(pb.target), 0))
    s.channel_of = maps[0]
    s.width = pm.size


def _channel_map(g, producer, consumer, rows=None) -> torch.Tensor | None:
    """Per consumer position, the producer position (within ``rows``) holding the same channel.

    None if a consumer position has no producer position, or two producer positions write it.
    """
    pc, cc = g.coords(producer), g.coords(consumer)
    keys = [lf for lf in cc if lf not in g.broadcast_leaves()]
    if not keys:
        return None
    sizes = [int(max(cc[lf].max(), pc[lf].max() if lf in pc else 0)) + 1 for lf in keys]

    def code(coords, n):
        out = torch.zeros(n, dtype=torch.long)
        ok = torch.ones(n, dtype=torch.bool)
        for lf, sz in zip(keys, sizes):
            c = coords.get(lf, torch.full((n,), -1, dtype=torch.long))
            ok &= c >= 0
            out = out * sz + c.clamp(min=0)
        return torch.where(ok, out, torch.full_like(out, -1))

    pcode, ccode = code(pc, producer.size), code(cc, consumer.size)
    lookup: dict[int, int] = {}
    lo, hi = rows if rows is not None else (0, producer.size)
    for i, k in enumerate(pcode.tolist()):
        if k >= 0 and lo <= i < hi:
            if k in lookup:
                return None  # two producer rows write one channel: not a diagonal fold
            lookup[k] = i
    out = [lookup.get(k, -1) for k in ccode.tolist()]
    if min(out) < 0:
        return None
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------- numerics


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, channel_of: torch.Tensor,
                     width: int, alpha: float) -> torch.Tensor:
    """Per producer channel ``s = max|X|^alpha / max|W|^(1-alpha)`` (float64, 1 where unset).

    Args:
        act_absmax: ``[C]`` calibration abs-max per consumer column.
        weight_absmax: ``[C]`` max over consuming linears of ``|W[:, j]|``.
        channel_of: ``[C]`` producer channel of each consumer column.
        width: number of producer channels.
        alpha: migration strength.
    """
    a = torch.zeros(width, dtype=torch.float64).scatter_reduce(
        0, channel_of, act_absmax.to(torch.float64), "amax")
    w = torch.zeros(width, dtype=torch.float64).scatter_reduce(
        0, channel_of, weight_absmax.to(torch.float64), "amax")
    s = a.clamp(min=MIN_RANGE) ** alpha / w.clamp(min=MIN_RANGE) ** (1 - alpha)
    live = torch.zeros(width, dtype=torch.bool)
    live[channel_of] = True
    return torch.where(live & (a > 0) & (w > 0), s, torch.ones_like(s))


def _consumer_weights(gm: fx.GraphModule, site: SmoothingSite) -> list[torch.Tensor]:
    """The distinct consumers' weights ``[out, C]`` as float64."""
    return [ir.get_param(gm, ir.linear_parts(c)[1]).detach().to(torch.float64)
            for c in _distinct_consumers(site)]


def _distinct_consumers(site: SmoothingSite) -> list[fx.Node]:
    """The site's consumers, one per weight parameter (q/k/v may share a fused one)."""
    out, seen = [], set()
    for c in site.consumers:
        target = str(ir.linear_parts(c)[1].target)
        if target not in seen:
            seen.add(target)
            out.append(c)
    return out


def alpha_search_errors(act_absmax: torch.Tensor, act_meansq: torch.Tensor,
                        weights: list[torch.Tensor], channel_of: torch.Tensor, width: int,
                        alphas, qmax: int = 127) -> torch.Tensor:
    """Expected squared output error of the consumers after smoothing with each alpha and
    int8 quantization (per-row weights, per-tensor activations over the abs-max range), per
    token; see the module docstring. Returns ``[len(alphas)]`` float64.

    Args:
        act_absmax: ``[C]`` abs-max per consumer column; act_meansq: ``[C]`` ``E[x^2]``.
        weights: the consumers' weights ``[out, C]``.
        channel_of, width: as :func:`smoothing_scales`.
        alphas: the candidates.
    """
    a = act_absmax.to(torch.float64)
    msq = act_meansq.to(torch.float64)
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    errs = []
    for alpha in alphas:
        col = smoothing_scales(a, wmax, channel_of, width, alpha)[channel_of]
        xm = msq / col ** 2
        step = float((a / col).max()) / qmax
        act_noise = torch.minimum(xm, torch.full_like(xm, step ** 2 / 12))
        err = torch.zeros((), dtype=torch.float64)
        for w in weights:
            ws = w * col[None, :]
            sc = ws.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
            dw = ws - torch.round(ws / sc).clamp(-qmax, qmax) * sc
            err = err + (xm * dw.square().sum(0)).sum() + (act_noise * ws.square().sum(0)).sum()
        errs.append(err)
    return torch.stack(errs)


def fold_smoothing_scales(gm: fx.GraphModule, site: SmoothingSite, s: torch.Tensor) -> None:
    """Divide the producer's parameters by ``s`` and multiply the consumers' columns by it."""
    if site.create_gain:
        add_norm_gain(gm, site)
    for target, dim in site.producer_params:
        p = ir.get_param(gm, target)
        shape = [1] * p.dim()
        shape[dim] = -1
        ir.set_param(gm, target, (p.to(torch.float64) / s.view(shape)).to(p.dtype))
    col = s[site.channel_of]
    done = set()
    for c in site.consumers:
        w = ir.linear_parts(c)[1]
        if str(w.target) in done:
            continue
        done.add(str(w.target))
        p = ir.get_param(gm, w)
        # W: [out, in]; columns read the smoothed channels
        ir.set_param(gm, w, (p.to(torch.float64) * col[None, :]).to(p.dtype))


def add_norm_gain(gm: fx.GraphModule, site: SmoothingSite) -> None:
    """Give the site's gain-free norm a gain of ones (a parameter its scales fold into)."""
    norm = site.producer
    gain = ir.add_param(gm, f"{ir.module_path(norm) or norm.name}.smoothquant_gain",
                        torch.ones(site.width, dtype=norm.meta["val"].dtype), before=norm)
    args = list(norm.args) + [None] * max(0, 3 - len(norm.args))
    args[2] = gain
    norm.args = tuple(args)
    norm.kwargs = {k: v for k, v in norm.kwargs.items() if k != "weight"}
    site.producer_params.insert(0, (str(gain.target), 0))


# ----------------------------------------------------------------------------- the pass


class SmoothQuant(Pass):
    """Fold SmoothQuant scales into producers and consumers; see the module docstring."""

    name = "smoothquant"
    forbids = frozenset({"quantized"})
    exact = True
    requires = frozenset({"canonical", "calibrated"})
    destroys = frozenset({"rotation_invariant"})  # a gain of ones on a gain-free norm

    def __init__(self, *, alpha: float | str = "auto", alpha_grid=DEFAULT_ALPHA_GRID):
        if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                or not 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"smoothquant: alpha must be a number in [0, 1] or 'auto', got "
                             f"{alpha!r}")
        grid = [alpha_grid] if isinstance(alpha_grid, (int, float)) else alpha_grid
        if isinstance(grid, str) or not grid or any(
                isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0
                for a in grid):
            raise ValueError(f"smoothquant: alpha_grid must be a non-empty list of numbers in "
                             f"[0, 1], got {alpha_grid!r}")
        self.alpha = alpha if alpha == "auto" else float(alpha)
        self.alpha_grid = tuple(float(a) for a in grid)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        self.check_not_quantized(gm, ctx, "run smoothquant before insert_qdq")
        ctx.require_calibration("smoothquant")
        from compiler.stats import ActivationStats, linear_input_sites

        # decide
        groups = ctx.analysis(ChannelGroupsAnalysis, gm)
        sites = find_smoothing_sites(gm, groups)
        todo = [s for s in sites if s.skip is None]
        notes = [f"{s.site}: skipped, {s.skip}" for s in sites if s.skip is not None]
        if not todo:
            return PassResult.unchanged(gm, notes, sites_smoothed=0, sites_skipped=len(notes))
        auto = self.alpha == "auto"
        # every linear input in the one sweep: the statistics handed on (smoothed) then cover
        # insert_qdq's sites
        table_key = dict(sites=frozenset(s.site for s in todo)
                         | frozenset(linear_input_sites(gm)), covariance=frozenset(),
                         histogram=frozenset(s.site for s in todo) if auto else frozenset())
        # alpha="auto" remembers the sites it smoothed, so a second run is a no-op as with a
        # fixed alpha (where s = 1 follows from the formula)
        searched = gm.meta.setdefault("smoothquant_searched", {}) if auto else {}
        chosen: list[float] = []
        req = ctx.extra.pop(HANDED_STATS, None)
        if isinstance(req, _SmoothingRequest) and req.accepts(self, gm):
            missing = [s.site for s in todo if s.site not in req.decided]
            if missing:
                notes.append(f"statistics: the earlier pass's sweep did not cover {missing[0]}; "
                             "measured here instead")
                req = None
        else:
            req = None
        blockwise = req or _blockwise_route(gm, ctx, todo, table_key)
        if req is not None:  # decided in the earlier pass's sweep, on this graph's values
            plans = req.fold(gm, todo)
            searched.update(req.searched)
            chosen.extend(req.chosen)
            notes.extend(req.notes)
            handed = req.collector.table().without(_stale_tensors(plans))
            every = frozenset(handed.sites())
            handed_key = dict(sites=every, covariance=frozenset(), histogram=every
                              if req.collector.histogram else frozenset())
            notes.append(f"statistics: taken in the previous pass's block sweep, on its output "
                         f"graph ({len(req.collector.site_to_tensor)} sites; no sweep here)")
        elif isinstance(blockwise, str):  # one whole-graph sweep (or cached statistics)
            notes.append(f"statistics: {blockwise}")
            table = ctx.analysis(ActivationStats, gm, **table_key)
            _check_widths(table, todo)
            # Later sites first: a site's consumers (v_proj, up_proj) may be a later site's
            # producer, and their column maxima must be read after that site's fold, so a
            # second run sees s = 1 everywhere.
            plans = [p for s in reversed(todo)
                     if (p := self._smooth(gm, s, table, searched, chosen, notes)) is not None]
            handed = smoothed_stats(table, plans)
            handed_key = table_key
        else:
            plans, handed = self._smooth_blockwise(gm, ctx, todo, table_key, blockwise,
                                                   searched, chosen, notes)
            every = frozenset(handed.sites())
            handed_key = dict(sites=every, covariance=frozenset(), histogram=every)
        skipped = sum(1 for s in sites if s.skip is not None)
        if not plans:
            return PassResult.unchanged(gm, notes, sites_smoothed=0, sites_skipped=skipped)
        gm.recompile()
        by_norm = sum(1 for s, _ in plans if not ir.is_op(s.producer, ir.LINEAR))
        stats = {"sites_smoothed": len(plans), "folded_into_norms": by_norm,
                 "folded_into_linears": len(plans) - by_norm, "sites_skipped": skipped}
        if auto and chosen:
            c = sorted(chosen)
            stats["alpha"] = f"auto {c[0]:g}..{c[-1]:g} (median {c[len(c) // 2]:g})"
        else:
            stats["alpha"] = self.alpha
        log.info("smoothquant(alpha=%s): %d sites smoothed (%d into norms, %d into linears), "
                 "%d skipped", stats["alpha"], len(plans), by_norm, len(plans) - by_norm, skipped)
        # a new gain is a new member of its channel group: the cached groups are stale then
        created = any(s.create_gain for s, _ in plans)
        result = PassResult(gm, True, frozenset() if created else frozenset({"channel_groups"}),
                            stats, notes)
        # (a created gain is a new argument of the same norm node: the table's tensors stand)
        result.analyses.append((ActivationStats, dict(handed_key), handed))
        return result

    def stats_request(self, gm: fx.GraphModule, ctx: PassContext) -> _SmoothingRequest | None:
        """The block statistics this pass needs, for the pass before it to measure in its own
        sweep (SliceGPT's): every linear input of ``gm`` (histograms too when a later pass
        wants them), with this pass's sites decided on each unit as it completes, as
        :meth:`_smooth_blockwise` does (see :class:`_SmoothingRequest`)."""
        if not ctx.calibration or ctx.extra.get("stats_cache_dir") or is_quantized_graph(gm):
            return None
        from compiler.stats import linear_input_sites

        sites = find_smoothing_sites(gm, ctx.analysis(ChannelGroupsAnalysis, gm))
        todo = [s for s in sites if s.skip is None]
        if not todo:
            return None
        later = (ctx.upcoming or ())[1:]
        searched = dict(gm.meta.get("smoothquant_searched", {})) if self.alpha == "auto" else {}
        return _SmoothingRequest(self, gm, todo, {s.site for s in todo} | set(linear_input_sites(gm)),
                                 any(p.wants_histograms() for p in later), searched)

    def _smooth(self, gm: fx.GraphModule, s: SmoothingSite, table, searched: dict,
                chosen: list[float], notes: list[str]) -> tuple[SmoothingSite, torch.Tensor] | None:
        """Decide ``s``'s scales from ``table`` and fold them; the plan, or None if left alone."""
        scale = self._decide(s, table, _consumer_weights(gm, s), searched, chosen, notes)
        if scale is None:
            return None
        fold_smoothing_scales(gm, s, scale)
        log.debug("smoothquant: %s: %d channels into %s (max s %.3g, min s %.3g)", s.site,
                  s.width, ir.site(s.producer), scale.max(), scale.min())
        return s, scale

    def _decide(self, s: SmoothingSite, table, weights: list[torch.Tensor], searched: dict,
                chosen: list[float], notes: list[str]) -> torch.Tensor | None:
        """``s``'s scales from ``table`` and its consumers' ``weights`` (``[out, C]``), or None
        when the site is left alone (smoothed by an earlier search, or already smooth)."""
        if s.site in searched:
            notes.append(f"{s.site}: already smoothed (alpha {searched[s.site]:g} from a search)")
            return None
        wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        alpha = self.alpha
        if alpha == "auto":
            st = table[s.site]
            errs = alpha_search_errors(st.absmax, st.sqsum / max(st.count, 1), weights,
                                       s.channel_of, s.width, self.alpha_grid)
            alpha = self.alpha_grid[int(torch.argmin(errs))]
            chosen.append(alpha)
            searched[s.site] = alpha
            notes.append(f"{s.site}: alpha {alpha:g} (search over {len(self.alpha_grid)}; "
                         f"error {float(errs.min()):.3g} vs {float(errs[-1]):.3g} at "
                         f"alpha {self.alpha_grid[-1]:g})")
        scale = smoothing_scales(table[s.site].absmax, wmax, s.channel_of, s.width, alpha)
        if (scale - 1).abs().max() <= UNIT_TOL:
            return None  # already smooth (e.g. a second run)
        return scale

    def _smooth_blockwise(self, gm, ctx: PassContext, todo: list[SmoothingSite], table_key,
                          block_of, searched, chosen, notes):
        """One block-engine sweep: per block, the statistics of its linear inputs, its sites
        smoothed (later sites first, as in the whole-graph order: every site lies within one
        block), and the statistics of the smoothed inputs, histograms included, for the passes
        after (``insert_qdq``'s ranges need no sweep of their own then)."""
        from compiler.blockwise import run_blockwise
        from compiler.stats import BlockStats

        collector = BlockStats(gm, table_key["sites"], histogram=True,
                               sqsum=self.alpha == "auto")
        sweep = _SmoothingSweep(collector, block_of, todo,
                                lambda s, table: self._smooth(gm, s, table, searched, chosen,
                                                              notes))
        run_blockwise(gm, ctx.require_calibration("smoothquant"), sweep, propagate="original",
                      progress=ctx.progress, desc="smoothquant",
                      compute_dtype=ctx.calibration_dtype)
        notes.append(f"statistics: one block-by-block sweep; histograms of the smoothed linear "
                     f"inputs handed on ({len(collector.site_to_tensor)} sites)")
        return sweep.plans, collector.table().without(_stale_tensors(sweep.plans))


class _SmoothingSweep(BlockVisitor):
    """SmoothQuant's block visitor: per block, ``smooth`` decides and folds the block's sites
    (later sites first) on the block's measured statistics, then ``collector`` takes the
    statistics of the smoothed inputs (:class:`compiler.stats.BlockStats`)."""

    def __init__(self, collector, block_of: dict[fx.Node, int], todo: list[SmoothingSite],
                 smooth) -> None:
        self.collector = collector
        self.smooth = smooth
        self.by_block: dict[int, list[SmoothingSite]] = {}
        for s in todo:
            self.by_block.setdefault(block_of[s.x], []).append(s)
        self.plans: list[tuple[SmoothingSite, torch.Tensor]] = []

    def observed(self, block):
        return self.collector.observed(block)

    def observe(self, block, node, value, batch):
        self.collector.observe(node, value)

    def transform(self, block, runner):
        table = self.collector.measured(block)
        sites = self.by_block.get(block.index, [])
        _check_widths(table, sites)
        factors = {}
        for s in reversed(sites):
            plan = self.smooth(s, table)
            if plan is not None:
                self.plans.append(plan)
                factors[table.tensor_of(s.site)] = 1.0 / plan[1][s.channel_of]
        self.collector.finish(block, factors)


class _SmoothingRequest(StatsRequest):
    """SmoothQuant's order to the pass before it (:meth:`SmoothQuant.stats_request`): per unit
    taken, the statistics of its linear inputs, its sites decided on them and on the weights
    the output graph will hold (later sites first, each producer's rows divided as its fold
    will), and the statistics of the smoothed inputs, as :class:`_SmoothingSweep` measures
    them. :meth:`SmoothQuant.run` then folds the scales decided here into the output graph.

    A norm site's width is the taken values' (the earlier pass may slice the stream)."""

    def __init__(self, owner: SmoothQuant, gm: fx.GraphModule, todo: list[SmoothingSite],
                 sites: set[str], histogram: bool, searched: dict) -> None:
        from compiler.stats import BlockStats

        super().__init__(owner)
        self.collector = BlockStats(gm, sites, histogram=histogram,
                                    sqsum=owner.alpha == "auto")
        self.by_tensor = {s.x: s for s in todo}
        self.scales: dict[str, torch.Tensor] = {}
        self.decided: set[str] = set()
        self.searched, self.chosen, self.notes = searched, [], []

    def nodes(self) -> list[fx.Node]:
        return self.collector.tensors

    def tensors(self, block) -> list[fx.Node]:
        return self.collector.observed(block)

    def take(self, block, values, weight_of) -> None:
        for n, vs in values.items():
            for v in vs:
                self.collector.observe(n, v)
        table = self.collector.measured(block)
        divided: dict[str, torch.Tensor] = {}  # producer weight -> its rows' divisors so far
        factors = {}
        for s in reversed([self.by_tensor[n] for n in values if n in self.by_tensor]):
            width = table[s.site].absmax.shape[0]
            if s.width != width and ir.is_op(s.producer, ir.RMS_NORM, ir.LAYER_NORM):
                s = replace(s, channel_of=torch.arange(width), width=width)
            weights = []
            for c in _distinct_consumers(s):
                target = str(ir.linear_parts(c)[1].target)
                w = weight_of(c)
                if target in divided:
                    if divided[target].shape[0] != w.shape[0]:
                        raise PassError(f"smoothquant: {s.site}: a consumer's rows are only "
                                        "partly another site's producer; cannot decide it in "
                                        "the earlier pass's sweep")
                    w = w / divided[target][:, None]
                weights.append(w)
            scale = self.owner._decide(s, table, weights, self.searched, self.chosen, self.notes)
            self.decided.add(s.site)
            if scale is None:
                continue
            self.scales[s.site] = scale
            for target, dim in s.producer_params:
                if dim == 0:
                    divided[target] = scale
            factors[table.tensor_of(s.site)] = 1.0 / scale[s.channel_of]
        self.collector.finish(block, factors)

    def fold(self, gm: fx.GraphModule, todo: list[SmoothingSite]
             ) -> list[tuple[SmoothingSite, torch.Tensor]]:
        """Fold the decided scales into ``gm`` (later sites first); the plans."""
        plans = []
        for s in reversed(todo):
            scale = self.scales.get(s.site)
            if scale is None:
                continue
            if scale.shape[0] != s.width:
                raise PassError(f"smoothquant: {s.site}: {scale.shape[0]} scales were decided in "
                                f"the earlier pass's sweep for {s.width} channels")
            fold_smoothing_scales(gm, s, scale)
            plans.append((s, scale))
        return plans


def _check_widths(table, todo: list[SmoothingSite]) -> None:
    bad = next((s for s in todo if table[s.site].absmax.shape[0] != s.channel_of.shape[0]), None)
    if bad is not None:
        raise PassError(f"smoothquant: site {bad.site}: statistics have "
                        f"{table[bad.site].absmax.shape[0]} channels, consumers read "
                        f"{bad.channel_of.shape[0]}")


def _blockwise_route(gm: fx.GraphModule, ctx: PassContext, todo: list[SmoothingSite],
                     table_key: dict) -> dict[fx.Node, int] | str:
    """``node -> block index`` when the statistics are best taken in one block-engine sweep,
    else why not (the whole-graph sweep, or statistics already at hand, is used then)."""
    from compiler.blockwise import partition_blocks
    from compiler.errors import PreconditionError
    from compiler.stats import ActivationStats, BlockStats

    if ctx.analyses.peek(ActivationStats, gm, **table_key) is not None:
        return "already at hand (handed over by an earlier pass)"
    if ctx.upcoming is not None and not any(p.wants_histograms() for p in ctx.upcoming):
        return "one whole-graph sweep (no later pass needs activation histograms)"
    if ctx.extra.get("stats_cache_dir"):
        return "one whole-graph sweep (stats_cache_dir given: cached on disk)"
    try:
        part = partition_blocks(gm)
    except PreconditionError as e:
        return f"one whole-graph sweep (no block split: {e})"
    crowded = next((b for b in part.blocks if sum(ir.is_op(n, ir.SDPA) for n in b.nodes) > 1),
                   None)
    if crowded is not None:  # the split missed a cut: one block would hold several layers
        return (f"one whole-graph sweep (the block split puts several attention layers in "
                f"{crowded.name()})")
    outside = BlockStats(gm, table_key["sites"]).unreachable(part.blocks)
    if outside:
        return f"one whole-graph sweep ({outside[0]} is read outside every block)"
    block_of = {n: b.index for b in part.blocks for n in b.nodes}
    for s in todo:
        members = [s.x, s.producer, *s.consumers]
        if len({block_of.get(n) for n in members}) != 1:
            return f"one whole-graph sweep ({s.site} spans two blocks)"
    return block_of


def smoothed_stats(table, plans: list[tuple[SmoothingSite, torch.Tensor]]):
    """The activation statistics after the folds in ``plans``, derived exactly from ``table``.

    Each smoothed tensor is divided channel-wise by its scales (``x[..., j] / s[channel_of[j]]``):
    extrema and ``X^T X`` follow, its histogram is dropped (not recoverable). Every other tensor
    of the table is unchanged except those strictly between a site's producer and its tensor
    (e.g. ``v_proj``'s output when ``v_proj -> o_proj`` is smoothed), which are dropped.
    """
    factors = {table.tensor_of(s.site): 1.0 / scale.to(torch.float64)[s.channel_of]
               for s, scale in plans}
    kept = table.without(_stale_tensors(plans))
    left = set(kept.site_to_tensor.values())
    return kept.rescaled({t: f for t, f in factors.items() if t in left})


def _stale_tensors(plans: list[tuple[SmoothingSite, torch.Tensor]]) -> set[str]:
    """Names of the tensors strictly between a smoothed site's producer and its tensor (e.g.
    ``v_proj``'s output when ``v_proj -> o_proj`` is smoothed): their statistics are not the
    graph's any more, and no exact transform of them is known."""
    between = {n.name for s, _ in plans for n in _between(s.producer, s.x)}
    return between - {s.x.name for s, _ in plans}


def _between(src: fx.Node, dst: fx.Node) -> set[fx.Node]:
    """Nodes on a path from ``src`` to ``dst`` (both included)."""
    ahead, todo = set(), [src]
    while todo:
        n = todo.pop()
        if n not in ahead:
            ahead.add(n)
            todo.extend(n.users)
    back, todo = set(), [dst]
    while todo:
        n = todo.pop()
        if n in ahead and n not in back:
            back.add(n)
            todo.extend(n.all_input_nodes)
    return back


__all__ = [
    "DEFAULT_ALPHA_GRID",
    "SmoothQuant",
    "alpha_search_errors",
    "SmoothingSite",
    "find_smoothing_sites",
    "fold_smoothing_scales",
    "is_quantized_graph",
    "smoothed_stats",
    "smoothing_scales",
    "trace_linear_producer",
]
