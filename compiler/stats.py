"""ActivationStats: per-channel activation statistics at named sites, from one calibration run.

Paper: none (the data analysis behind SmoothQuant arXiv:2211.10438, SliceGPT arXiv:2401.15024,
RPTQ arXiv:2304.01089 and GPTQ arXiv:2210.17323, which all need per-channel abs-max, ranges or
``X^T X`` of the activations a linear reads).

What is collected, per observed tensor, over every token of every calibration batch (the channel
dim is always the tensor's *last* dim; every leading dim is flattened into "tokens"):

- ``absmax``, ``min``, ``max``: ``[C]`` float64;
- ``count``: number of rows (tokens) seen;
- ``xtx``: ``[C, C]`` float64, ``sum_t x_t x_t^T`` -- only for tensors named in ``covariance``;
- ``hist``: ``[HIST_BINS]`` float64 counts of ``log2 |x|`` over every element of the tensor, in
  fixed bins of ``1 / HIST_BINS_PER_OCTAVE`` octave from ``2**HIST_LOG2_MIN`` (smaller values and
  zeros land in the first bin) to ``2**HIST_LOG2_MAX`` -- only for tensors named in
  ``histogram``. Fixed bins make histograms of different batches add up exactly; a bin is 1.1%
  wide in value, the resolution of the range estimators built on it
  (:func:`passes.insert_qdq.activation_range`); with it, ``sqsum``: ``[C]`` float64
  ``sum_t x_t^2`` per channel (the diagonal of ``X^T X`` at O(C) cost; float32 squares summed
  as :func:`square_sums` does, within ``4e-6`` relative of float64).

Results are float64: abs-max/min/max are exact (a min or max needs no rounding, so it is reduced
in the activation dtype and then upcast); ``X^T X`` is formed and summed in float64 (activations
upcast first), so it depends on the batch split only through float64 rounding.

Sites (stable names, see :func:`compiler.ir.site`; a site maps to exactly one fx tensor):

- ``aten.linear``: ``"<module path>:in"`` is its input activation (last dim = in_features) and
  ``"<module path>:out"`` its output;
- ``aten.addmm`` (GPT-2 ``Conv1D`` before canonicalization): ``:in`` is ``mat1`` (the input
  flattened to ``[tokens, in_features]``) and ``:out`` the result, so statistics are the same
  before and after canonicalization;
- embeddings, ``rms_norm``/``layer_norm``, ``scaled_dot_product_attention``: ``":out"``
  (for SDPA the last dim is ``head_dim`` and tokens are ``batch * heads * seq``).

If two different tensors would get the same name (a module that calls its op twice), the later
ones are named ``<site>@1``, ``<site>@2``... in graph order.

Several sites may read one tensor (q/k/v projections read the same norm output): statistics are
computed once per fx tensor and every site reading it maps to it; :meth:`StatsTable.tensor_of`
and :meth:`StatsTable.sharing` expose that mapping.

How: the graph is copied (nodes only; parameters are shared, not copied), an observer submodule
is called after every observed tensor in the copy, nodes that no observed tensor depends on are
dropped from the copy (an unobserved LM head does not run), and the copy runs every batch under
``torch.no_grad()``. The caller's GraphModule is never touched.

Block by block (:class:`BlockStats`): the same statistics gathered inside a
:mod:`compiler.blockwise` sweep, one block's tensors held at a time, so that a pass rescaling a
block's channels (SmoothQuant) can have them, histograms included, taken on the rescaled values.

Disk cache (optional, ``cache_dir``): a safetensors file keyed by a hash of the graph code,
the parameters (names, shapes, dtypes and a strided sample of their values -- a cheap hash, not
a full one), the calibration tensors and the requested sites, so recompiling with the same
calibration reuses statistics without running the model.

Preconditions: a GraphModule from :func:`compiler.frontend.trace` (canonicalized or not) and
calibration batches of ``input_ids`` ``[batch, seq]``. Through the pass manager the analysis
is :class:`ActivationStats` (``ctx.analysis(ActivationStats, gm, sites=..., covariance=...)``);
it reads ``ctx.calibration``, ``ctx.progress`` and ``ctx.extra["stats_cache_dir"]``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from compiler import ir
from compiler.errors import DataError, FxCompressError
from compiler.memory import release_free_memory
from compiler.precision import calibration_autocast
from compiler.pass_base import Analysis, PassContext

log = logging.getLogger(__name__)

aten = torch.ops.aten
ADDMM = aten.addmm.default

#: ops whose output is an observable ``:out`` site (besides linear/addmm, which also have ``:in``)
_OUT_OPS = (ir.EMBEDDING, ir.RMS_NORM, ir.LAYER_NORM, ir.SDPA)

#: bump when the cache file layout or the statistics' meaning changes
_CACHE_VERSION = 1
#: elements sampled per parameter for the cheap cache hash
_PARAM_SAMPLE = 4096
#: log2 |x| histogram: fixed bins of 1/64 octave over [2**-32, 2**32)
HIST_LOG2_MIN, HIST_LOG2_MAX, HIST_BINS_PER_OCTAVE = -32, 32, 64
HIST_BINS = (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE


def hist_bin_edges() -> torch.Tensor:
    """``[HIST_BINS + 1]`` float64 value edges (not log2) of the ``hist`` bins."""
    return torch.exp2(torch.linspace(HIST_LOG2_MIN, HIST_LOG2_MAX, HIST_BINS + 1,
                                     dtype=torch.float64))


#: rows summed in float32 before the float64 sum in :func:`square_sums`
_SQ_CHUNK = 64


def square_sums(x: torch.Tensor) -> torch.Tensor:
    """``[C]`` float64 ``sum_t x_t^2`` over the rows of ``x`` ``[T, C]``.

    Squares in float32, summed in float32 over runs of 64 rows, the runs summed in float64:
    a relative error of at most ``64 * 2**-24`` (4e-8 measured on 2048 x 2048 Gaussian rows)
    against float64 throughout, which converts the whole tensor first and is 10x slower on CPU.
    """
    x = x.float()
    t, c = x.shape
    full = t - t % _SQ_CHUNK
    sq = x[:full].square().view(-1, _SQ_CHUNK, c).sum(1).sum(0, dtype=torch.float64)
    if full < t:
        sq += x[full:].square().sum(0, dtype=torch.float64)
    return sq


def log2_histogram(x: torch.Tensor) -> torch.Tensor:
    """``[HIST_BINS]`` float64 counts of ``log2 |x|`` over every element of ``x``, in the fixed
    bins of :func:`hist_bin_edges` (zeros and values below ``2**HIST_LOG2_MIN`` fall in the
    first bin), so histograms of different batches add up exactly."""
    lg = x.detach().abs().float()  # a new tensor: the clamp and the log2 run in place
    lg.clamp_(min=2.0 ** HIST_LOG2_MIN).log2_()
    return torch.histc(lg, HIST_BINS, HIST_LOG2_MIN, HIST_LOG2_MAX).to(torch.float64)


class UnknownSiteError(FxCompressError, KeyError):
    """A site name that the graph does not have (names the site and the nearest existing ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- results


@dataclass
class ChannelStats:
    """Per-channel statistics of one tensor (channel = last dim), accumulated in float64.

    Attributes:
        absmax: ``[C]`` max over tokens of ``|x|``.
        min: ``[C]`` min over tokens.
        max: ``[C]`` max over tokens.
        count: number of tokens (rows after flattening every leading dim) seen.
        xtx: ``[C, C]`` ``sum_t x_t x_t^T`` when covariance was requested, else None.
        hist: ``[HIST_BINS]`` counts of ``log2 |x|`` over all elements (see
            :func:`hist_bin_edges`) when a histogram was requested, else None.
        sqsum: ``[C]`` ``sum_t x_t^2`` per channel, with the histogram.
    """

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    count: int
    xtx: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    sqsum: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.absmax.numel())

    def covariance(self) -> torch.Tensor:
        """Uncentered second moment ``X^T X / count`` ``[C, C]`` (float64).

        Raises:
            ValueError: covariance was not collected for this tensor.
        """
        if self.xtx is None:
            raise ValueError(
                "X^T X was not collected for this tensor; request it with covariance={site}"
            )
        return self.xtx / max(self.count, 1)


class StatsTable(Mapping):
    """Mapping ``site -> ChannelStats``; sites reading one tensor share one ChannelStats object.

    Attributes:
        site_to_tensor: site -> name of the fx tensor (node) it reads, in the collected graph.
        from_cache: True if the statistics were loaded from the disk cache.
    """

    def __init__(
        self,
        tensors: dict[str, ChannelStats],
        site_to_tensor: dict[str, str],
        *,
        from_cache: bool = False,
    ) -> None:
        self._tensors = dict(tensors)
        self.site_to_tensor = dict(site_to_tensor)
        self.from_cache = from_cache

    def __getitem__(self, site: str) -> ChannelStats:
        if site not in self.site_to_tensor:
            raise UnknownSiteError(_unknown_site_message(site, self.site_to_tensor, "statistics"))
        return self._tensors[self.site_to_tensor[site]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.site_to_tensor)

    def __len__(self) -> int:
        return len(self.site_to_tensor)

    def __contains__(self, site: object) -> bool:
        return site in self.site_to_tensor

    def __repr__(self) -> str:
        return f"StatsTable({len(self)} sites over {len(self._tensors)} tensors)"

    def sites(self) -> list[str]:
        """Every site with statistics, in graph order."""
        return list(self.site_to_tensor)

    def tensor_of(self, site: str) -> str:
        """Name of the fx node whose output ``site`` reads (sites sharing a tensor share it)."""
        self[site]  # raises UnknownSiteError with near matches
        return self.site_to_tensor[site]

    def sharing(self, site: str) -> list[str]:
        """Every site that reads the same tensor as ``site`` (itself included), in graph order."""
        t = self.tensor_of(site)
        return [s for s, u in self.site_to_tensor.items() if u == t]

    def groups(self) -> dict[str, list[str]]:
        """Tensor name -> the sites reading it."""
        out: dict[str, list[str]] = {}
        for s, t in self.site_to_tensor.items():
            out.setdefault(t, []).append(s)
        return out

    # ------------------------------------------------------------ exact transforms
    #
    # An exact pass that rescales or permutes channels knows how the statistics of the tensors
    # it changed move; it hands the next pass a transformed table instead of a new calibration
    # run (the pass manager caches it for the rewritten graph). Per-channel extrema and X^T X
    # follow a positive per-channel scale and a permutation exactly; the log2 histogram of a
    # whole tensor is unchanged by a permutation but not recoverable under per-channel scales,
    # so a rescale drops it (with the per-channel square sums that come with it).

    def answer(self, site_to_tensor: Mapping[str, str], covariance: Iterable[str] = (),
               histogram: Iterable[str] = ()) -> StatsTable | None:
        """This table's statistics for the requested sites (``site -> tensor`` in the graph
        they were measured on: sites sharing a tensor share statistics), or None if a tensor or
        a requested ``X^T X`` / histogram is missing."""
        ts = self._tensors
        if any(t not in ts for t in site_to_tensor.values()):
            return None
        if any(s not in site_to_tensor or ts[site_to_tensor[s]].xtx is None for s in covariance):
            return None
        if any(s not in site_to_tensor or ts[site_to_tensor[s]].hist is None for s in histogram):
            return None
        return StatsTable({t: ts[t] for t in set(site_to_tensor.values())}, site_to_tensor)

    def rescaled(self, factors: Mapping[str, torch.Tensor]) -> StatsTable:
        """The table after ``x[..., c] *= factors[tensor][c]`` (every factor > 0) on the named
        tensors; the other tensors are unchanged (the caller guarantees it)."""
        out = dict(self._tensors)
        for name, f in factors.items():
            st = self._tensors[name]
            f = f.to(torch.float64)
            if f.shape != st.absmax.shape or not bool((f > 0).all()):
                raise ValueError(f"rescaled: tensor {name}: factors must be {st.channels} "
                                 f"positive numbers, got shape {tuple(f.shape)}")
            xtx = None if st.xtx is None else st.xtx * f[:, None] * f[None, :]
            out[name] = ChannelStats(st.absmax * f, st.min * f, st.max * f, st.count, xtx)
        return StatsTable(out, self.site_to_tensor)

    def permuted(self, perms: Mapping[str, torch.Tensor]) -> StatsTable:
        """The table after ``x = x[..., perms[tensor]]`` on the named tensors."""
        out = dict(self._tensors)
        for name, p in perms.items():
            st = self._tensors[name]
            p = torch.as_tensor(p, dtype=torch.long)
            if sorted(p.tolist()) != list(range(st.channels)):
                raise ValueError(f"permuted: tensor {name}: not a permutation of "
                                 f"{st.channels} channels")
            xtx = None if st.xtx is None else st.xtx[p][:, p]
            sqsum = None if st.sqsum is None else st.sqsum[p]
            out[name] = ChannelStats(st.absmax[p], st.min[p], st.max[p], st.count, xtx,
                                     st.hist, sqsum)
        return StatsTable(out, self.site_to_tensor)

    def without(self, tensors: Iterable[str]) -> StatsTable:
        """The table without the named tensors (and every site reading them)."""
        drop = set(tensors)
        return StatsTable({k: v for k, v in self._tensors.items() if k not in drop},
                          {s: t for s, t in self.site_to_tensor.items() if t not in drop})

    def covariance(self, site: str) -> torch.Tensor:
        """``X^T X / count`` at ``site``.

        Raises:
            UnknownSiteError: no statistics for ``site``.
            ValueError: covariance was not requested for ``site`` (or a site sharing its tensor).
        """
        st = self[site]
        if st.xtx is None:
            raise ValueError(
                f"no X^T X collected at site {site!r}; request it with covariance={{{site!r}}}"
            )
        return st.covariance()


# ----------------------------------------------------------------------------- sites


def site_map(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Every observable site of ``gm`` and the fx node whose output it reads, in graph order.

    Args:
        gm: a traced GraphModule.

    Returns:
        ``{site: node}``; several sites may map to the same node (q/k/v ``:in``).
    """
    out: dict[str, fx.Node] = {}

    def add(name: str, node: object) -> None:
        if not isinstance(node, fx.Node):
            return
        k, unique = 0, name
        while unique in out and out[unique] is not node:
            k += 1
            unique = f"{name}@{k}"
        out[unique] = node

    for n in gm.graph.nodes:
        if ir.is_op(n, ir.LINEAR):
            add(ir.site(n, "in"), n.args[0])
            add(ir.site(n, "out"), n)
        elif ir.is_op(n, ADDMM):
            # addmm(bias, mat1 [tokens, in], mat2 [in, out]): mat1 is the activation
            add(ir.site(n, "in"), n.args[1])
            add(ir.site(n, "out"), n)
        elif ir.is_op(n, *_OUT_OPS):
            add(ir.site(n, "out"), n)
    return out


def linear_input_sites(gm: fx.GraphModule) -> list[str]:
    """The ``:in`` site of every linear (and un-canonicalized ``addmm``) in graph order."""
    return [s for s, _ in site_map(gm).items() if s.split("@")[0].endswith(":in")]


def _unknown_site_message(site: str, known: Iterable[str], what: str) -> str:
    known = list(known)
    near = difflib.get_close_matches(site, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
    return f"no {what} for site {site!r} ({len(known)} sites known){hint}"


# ----------------------------------------------------------------------------- collection


class _Accumulator:
    """Running float64 reductions over the rows of one tensor."""

    def __init__(self, name: str, covariance: bool, histogram: bool = False,
                 sqsum: bool | None = None) -> None:
        self.name = name
        self.want_xtx = covariance
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64) if histogram else None
        self.want_sqsum = histogram if sqsum is None else sqsum
        self.sqsum: torch.Tensor | None = None
        self.absmax: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        # X: [..., C] -> [tokens, C]. min/max are exact in the input dtype, so only the upcast
        # result is float64; X^T X is summed in float64 to keep precision over many tokens.
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        # amin + amax: torch.aminmax over dim 0 is ~10x slower on CPU
        lo, hi = x.amin(0).to(torch.float64), x.amax(0).to(torch.float64)
        x64 = x.to(torch.float64) if self.want_xtx else None
        if self.absmax is None:
            self.min, self.max = lo, hi
            self.absmax = torch.maximum(hi.abs(), lo.abs())
            self.xtx = x64.T @ x64 if x64 is not None else None
        else:
            if x.shape[1] != self.absmax.numel():
                raise DataError(
                    f"tensor {self.name}: channel count changed between batches "
                    f"({self.absmax.numel()} -> {x.shape[1]})"
                )
            torch.minimum(self.min, lo, out=self.min)
            torch.maximum(self.max, hi, out=self.max)
            torch.maximum(self.absmax, torch.maximum(hi.abs(), lo.abs()), out=self.absmax)
            if x64 is not None:
                self.xtx.addmm_(x64.T, x64)
        if self.hist is not None:
            self.hist += log2_histogram(x)
        if self.want_sqsum:
            sq = square_sums(x.detach())
            self.sqsum = sq if self.sqsum is None else self.sqsum.add_(sq)
        self.count += x.shape[0]

    def result(self) -> ChannelStats:
        if self.absmax is None:
            raise DataError(f"tensor {self.name} saw no tokens (empty calibration batches?)")
        return ChannelStats(self.absmax, self.min, self.max, self.count, self.xtx, self.hist,
                            self.sqsum)


class _Observer(torch.nn.Module):
    """Probe called on an observed tensor: feeds it to an accumulator (returns nothing)."""

    def __init__(self, acc: _Accumulator) -> None:
        super().__init__()
        self.acc = acc

    def forward(self, x: torch.Tensor) -> None:
        with torch.autocast("cpu", enabled=False):  # statistics stay float32 / float64
            self.acc.update(x)


def _instrumented_copy(
    gm: fx.GraphModule, nodes: dict[fx.Node, _Accumulator]
) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph, sharing its parameters, with observers.

    The copy computes only what the observers read: its output is the observers' (``None``)
    results and every node that no observer depends on is dropped (an unobserved LM head's
    ``[batch, seq, vocab]`` logits: a fifth of a 134M Llama's forward time and its largest
    activation). It takes the graph's input tensors positionally.
    """
    g = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    val_map: dict[fx.Node, fx.Node] = {}
    g.graph_copy(gm.graph, val_map, return_output_node=True)
    root = torch.nn.Module()
    # share (not copy) every submodule/parameter the graph reads
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b)
    for n in gm.graph.nodes:  # plain tensor constants (get_attr to a non-parameter attribute)
        if n.op == "get_attr" and "." not in str(n.target) and not hasattr(root, str(n.target)):
            setattr(root, str(n.target), getattr(gm, str(n.target)))
    observers = []
    for i, (node, acc) in enumerate(nodes.items()):
        name = f"_fxcompress_observer_{i}"
        root.add_module(name, _Observer(acc))
        with g.inserting_after(val_map[node]):
            observers.append(g.call_module(name, (val_map[node],)))
    g.output(tuple(observers))
    inst = fx.GraphModule(root, g, class_name="InstrumentedGraphModule")
    inst.graph.eliminate_dead_code()  # keeps impure nodes (asserts), observers and their inputs
    inst.recompile()
    return inst


def _check_batches(batches) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    batches = list(batches) if batches is not None else []
    if not batches:
        raise DataError("collect_stats needs at least one calibration batch of input_ids")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point():
            desc = f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise DataError(
                f"calibration batch {i} must be an integer input_ids tensor [batch, seq]; got {desc}"
            )
    return batches


def _run_batches(module: torch.nn.Module, batches: list[torch.Tensor], progress: bool) -> None:
    """Run ``module`` on every batch (statistics are gathered by its observers)."""
    it: Iterable[torch.Tensor] = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="activation stats", unit="batch")
    with torch.no_grad():
        for b in it:
            module(b)


def collect_stats(
    gm: fx.GraphModule,
    batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    sites: Iterable[str] | None = None,
    covariance: Iterable[str] = (),
    histogram: Iterable[str] = (),
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    compute_dtype: torch.dtype | None = None,
) -> StatsTable:
    """Per-channel statistics at ``sites`` from one run of ``gm`` over ``batches``.

    Args:
        gm: a traced GraphModule; it is not modified.
        batches: calibration ``input_ids`` tensors ``[batch, seq]`` (or one such tensor).
        sites: sites to observe; None means every linear input (``:in``) site.
        covariance: sites that also need ``X^T X`` (observed even when not in ``sites``).
        histogram: sites that also need the ``log2 |x|`` histogram and per-channel ``sum x^2``
            (observed even when not in ``sites``).
        progress: show a tqdm bar over batches.
        cache_dir: folder for the statistics cache (None: no cache).
        compute_dtype: None (float32) or ``torch.bfloat16``: the run's ops execute under
            autocast to it (:mod:`compiler.precision`); the statistics are reduced in float32 /
            float64 either way.

    Returns:
        A :class:`StatsTable` with one entry per requested site (plus covariance sites).

    Raises:
        UnknownSiteError: a requested site does not exist in ``gm``.
        DataError: no batches, a batch that is not integer ``[batch, seq]``, or a tensor that
            saw no tokens.
    """
    smap = site_map(gm)
    requested = linear_input_sites(gm) if sites is None else _as_list(sites, "sites")
    cov_sites = _as_list(covariance, "covariance")
    hist_sites = _as_list(histogram, "histogram")
    for s in requested + cov_sites + hist_sites:
        if s not in smap:
            raise UnknownSiteError(_unknown_site_message(s, smap, "observable tensor"))
    order = {s: i for i, s in enumerate(smap)}
    wanted = sorted(set(requested) | set(cov_sites) | set(hist_sites), key=order.__getitem__)
    batches = _check_batches(batches)

    cov_nodes = {smap[s] for s in cov_sites}
    hist_nodes = {smap[s] for s in hist_sites}
    accs: dict[fx.Node, _Accumulator] = {}
    for s in wanted:
        node = smap[s]
        if node not in accs:
            accs[node] = _Accumulator(node.name, covariance=node in cov_nodes,
                                      histogram=node in hist_nodes)
    site_to_tensor = {s: smap[s].name for s in wanted}

    cache_file = None
    if cache_dir is not None:
        key = _cache_key(gm, batches, wanted, sorted(set(cov_sites), key=order.__getitem__),
                         sorted(set(hist_sites), key=order.__getitem__), compute_dtype)
        cache_file = Path(cache_dir) / f"stats-{key}.safetensors"
        table = _load_cache(cache_file, site_to_tensor)
        if table is not None:
            log.info("activation stats: %d sites loaded from %s", len(table), cache_file)
            return table

    inst = _instrumented_copy(gm, accs)
    release_free_memory()
    with calibration_autocast(compute_dtype):  # the graph's ops; observers opt out
        _run_batches(inst, batches, progress)
    tensors = {node.name: acc.result() for node, acc in accs.items()}
    table = StatsTable(tensors, site_to_tensor)
    log.info(
        "activation stats: %d sites over %d tensors (%d with X^T X), %d batches",
        len(wanted), len(accs), len(cov_nodes), len(batches),
    )
    if cache_file is not None:
        _save_cache(cache_file, table)
    return table


class BlockStats:
    """Statistics of named sites gathered inside a block-engine sweep, for a pass that rescales
    channels block by block (:mod:`compiler.blockwise`).

    The pass's :class:`~compiler.blockwise.BlockVisitor` hands :meth:`observed` and
    :meth:`observe` over to this object. After a block's batches, :meth:`measured` gives that
    block's extrema (and per-channel square sums with ``sqsum=True``), on which the pass decides;
    the pass rescales the block (e.g. SmoothQuant's folds) and calls :meth:`finish` with the
    per-channel factors of the tensors it changed. The block's final statistics, histograms
    included, are then taken from its stored values times those factors: what a sweep of the
    transformed graph measures, up to float32 rounding (a value within rounding of a bin edge
    may land in the neighbouring bin). The stored values are freed block by block, so memory
    holds one block's observed tensors (e.g. 4 linear inputs x calibration tokens).

    Sites whose tensor is in no block (a linear reading the prologue, other than block 0's
    input) are listed by :meth:`unreachable`; the caller takes another route for those.
    """

    def __init__(self, gm: fx.GraphModule, sites: Iterable[str], *, histogram: bool = True,
                 sqsum: bool = False) -> None:
        smap = site_map(gm)
        wanted = set(_as_list(sites, "sites"))
        for s in wanted:
            if s not in smap:
                raise UnknownSiteError(_unknown_site_message(s, smap, "observable tensor"))
        self._site_node = {s: smap[s] for s in smap if s in wanted}  # graph order
        self.site_to_tensor = {s: n.name for s, n in self._site_node.items()}
        self._tensors = list(dict.fromkeys(self._site_node.values()))
        self.histogram = histogram
        self._sqsum = sqsum
        self._assigned: set[fx.Node] = set()
        self._first: dict[fx.Node, _Accumulator] = {}
        self._values: dict[fx.Node, list[torch.Tensor]] = {}
        self._final: dict[str, ChannelStats] = {}

    @property
    def tensors(self) -> list[fx.Node]:
        """The observed tensors, in graph order."""
        return list(self._tensors)

    def unreachable(self, blocks) -> list[str]:
        """Sites whose tensor no block of ``blocks`` computes or takes as its input."""
        seen = {n for b in blocks for n in b.nodes} | {b.input for b in blocks}
        return [s for s, n in self._site_node.items() if n not in seen]

    def observed(self, block) -> list[fx.Node]:
        """The tensors of ``block`` to observe (each tensor in exactly one block)."""
        inside = set(block.nodes) | {block.input}
        out = [n for n in self._tensors if n in inside and n not in self._assigned]
        self._assigned.update(out)
        for n in out:
            self._first[n] = _Accumulator(n.name, covariance=False, sqsum=self._sqsum)
            if self.histogram:
                self._values[n] = []
        return out

    def observe(self, node: fx.Node, value: torch.Tensor) -> None:
        """One batch's value of an observed tensor."""
        self._first[node].update(value)
        if self.histogram:
            self._values[node].append(value.detach())

    def measured(self, block) -> StatsTable:
        """The extrema (and square sums) of the tensors observed in ``block``, as computed."""
        nodes = self._of(block)
        return StatsTable({n.name: self._first[n].result() for n in nodes},
                          {s: n.name for s, n in self._site_node.items() if n in nodes})

    def _of(self, block) -> list[fx.Node]:
        inside = set(block.nodes) | {block.input}
        return [n for n in self._first if n in inside]

    def finish(self, block, factors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Final statistics of ``block``'s tensors, each multiplied channel-wise by
        ``factors[tensor name]`` (``[C]``, positive) where given; frees the stored values.

        Extrema follow the factors exactly (float32 rounding is monotone, so the extremum of
        the float32 products is the float32 product of the extremum); histograms and square
        sums are taken on the scaled values (:func:`square_sums`)."""
        factors = dict(factors or {})
        for n in self._of(block):
            first = self._first.pop(n).result()
            f = factors.pop(n.name, None)
            lo, hi = first.min, first.max
            if f is not None:
                f = f.to(torch.float32)
                if f.shape != (first.channels,) or not bool((f > 0).all()):
                    raise ValueError(f"BlockStats.finish: tensor {n.name}: factors must be "
                                     f"{first.channels} positive numbers")
                lo, hi = (lo.float() * f).double(), (hi.float() * f).double()
            hist = sq = None
            if self.histogram:
                hist = torch.zeros(HIST_BINS, dtype=torch.float64)
                sq = torch.zeros(first.channels, dtype=torch.float64)
                for v in self._values.pop(n):
                    x = v.reshape(-1, first.channels)
                    x = x if f is None else x * f
                    hist += log2_histogram(x)
                    sq += square_sums(x)
            elif first.sqsum is not None:
                sq = first.sqsum if f is None else first.sqsum * f.double().square()
            self._final[n.name] = ChannelStats(torch.maximum(lo.abs(), hi.abs()), lo, hi,
                                               first.count, None, hist, sq)
        if factors:
            raise ValueError(f"BlockStats.finish: factors for tensors not in {block.name()}: "
                             f"{sorted(factors)}")

    def table(self) -> StatsTable:
        """Every finished tensor's statistics (sites of unfinished tensors are left out)."""
        return StatsTable(dict(self._final), {s: t for s, t in self.site_to_tensor.items()
                                              if t in self._final})


class StatsRequest:
    """A later pass's order for statistics of an earlier pass's output graph, filled in the
    earlier pass's own block sweep, so the later pass needs no sweep of its own.

    Made by :meth:`compiler.pass_base.Pass.stats_request` on the earlier pass's working graph
    (the output graph keeps its nodes). The earlier pass asks :meth:`tensors` which nodes of a
    unit to hand over, runs the unit to its final values, and calls :meth:`take` once per unit
    with every batch's value of each, in the output graph's coordinates, and a function giving
    each linear's weight as the output graph will hold it (float64). When its output graph is
    final it calls :meth:`close`; the later pass then :meth:`accepts` it only for that graph.
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._graph: fx.Graph | None = None
        self._nodes = -1

    def nodes(self) -> list[fx.Node]:
        """Every node whose values the request wants, in graph order."""
        raise NotImplementedError

    def tensors(self, block) -> list[fx.Node]:
        """The nodes of ``block`` whose values :meth:`take` should get (asked once per unit)."""
        raise NotImplementedError

    def take(self, block, values: Mapping[fx.Node, list[torch.Tensor]],
             weight_of: Callable[[fx.Node], torch.Tensor]) -> None:
        """One unit's final values (per node, one tensor per batch) and its linears' weights."""
        raise NotImplementedError

    def close(self, gm: fx.GraphModule) -> None:
        """Every unit was taken and ``gm`` is the output graph: the request is filled."""
        self._graph, self._nodes = gm.graph, len(gm.graph.nodes)

    def accepts(self, owner: Any, gm: fx.GraphModule) -> bool:
        """True if ``owner`` made this request and ``gm`` is the graph it was closed on."""
        return owner is self.owner and gm.graph is self._graph and len(gm.graph.nodes) == self._nodes


def _as_list(sites: Iterable[str], what: str) -> list[str]:
    if isinstance(sites, str):
        raise TypeError(f"{what} must be a collection of site names, not the string {sites!r}")
    return list(dict.fromkeys(sites))


# ----------------------------------------------------------------------------- disk cache


def _cache_key(
    gm: fx.GraphModule, batches: list[torch.Tensor], sites: list[str], cov: list[str],
    hist: list[str] = (), compute_dtype: torch.dtype | None = None,
) -> str:
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}\n".encode())
    h.update(gm.code.encode())
    for n in ir.iter_get_attrs(gm):
        t = ir.get_param(gm, n)
        h.update(f"{n.target}".encode())
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _PARAM_SAMPLE)
        sample = flat[::step].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.dtype != torch.bool
                 else sample.numpy().tobytes())
    for b in batches:
        b = b.detach().contiguous().cpu()
        h.update(f"{tuple(b.shape)} {b.dtype}".encode())
        h.update(b.numpy().tobytes())
    h.update(json.dumps([sites, cov, list(hist)] if hist else [sites, cov]).encode())
    if compute_dtype is not None:  # float32 keys stay those of earlier versions
        h.update(f"computed in {compute_dtype}".encode())
    return h.hexdigest()[:32]


def _save_cache(path: Path, table: StatsTable) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, st in table._tensors.items():
        tensors[f"{name}.absmax"] = st.absmax.contiguous()
        tensors[f"{name}.min"] = st.min.contiguous()
        tensors[f"{name}.max"] = st.max.contiguous()
        if st.xtx is not None:
            tensors[f"{name}.xtx"] = st.xtx.contiguous()
        if st.hist is not None:
            tensors[f"{name}.hist"] = st.hist.contiguous()
            tensors[f"{name}.sqsum"] = st.sqsum.contiguous()
        counts[name] = st.count
    meta = {"version": str(_CACHE_VERSION), "counts": json.dumps(counts),
            "site_to_tensor": json.dumps(table.site_to_tensor)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:  # a cache that cannot be written must not fail the compile
        log.warning("activation stats: could not write cache %s: %s", path, e)


def _load_cache(path: Path, site_to_tensor: dict[str, str]) -> StatsTable | None:
    if not path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != str(_CACHE_VERSION):
                return None
            if json.loads(meta["site_to_tensor"]) != site_to_tensor:
                return None
            counts = json.loads(meta["counts"])
            keys = set(f.keys())
            tensors = {}
            for name, count in counts.items():
                xtx = f.get_tensor(f"{name}.xtx") if f"{name}.xtx" in keys else None
                hist = f.get_tensor(f"{name}.hist") if f"{name}.hist" in keys else None
                sqsum = f.get_tensor(f"{name}.sqsum") if hist is not None else None
                tensors[name] = ChannelStats(
                    f.get_tensor(f"{name}.absmax"), f.get_tensor(f"{name}.min"),
                    f.get_tensor(f"{name}.max"), int(count), xtx, hist, sqsum,
                )
    # a corrupt or foreign cache file is recomputed, not fatal
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        log.warning("activation stats: ignoring unreadable cache %s: %s", path, e)
        return None
    return StatsTable(tensors, site_to_tensor, from_cache=True)


# ----------------------------------------------------------------------------- analysis


class ActivationStats(Analysis):
    """The data analysis: :func:`collect_stats` over ``ctx.calibration``, cached by the manager.

    Keys: ``sites`` (frozenset or None = every linear input), ``covariance`` and ``histogram``
    (frozensets).
    """

    name = "activation_stats"

    @classmethod
    def reuse(cls, table: StatsTable, gm: fx.GraphModule, *,
              sites: frozenset[str] | None = None, covariance: frozenset[str] = frozenset(),
              histogram: frozenset[str] = frozenset()) -> StatsTable | None:
        """A cached table (e.g. one an exact pass transformed) restricted to this request,
        or None when it lacks something the request needs."""
        wanted = set(linear_input_sites(gm) if sites is None else sites)
        wanted |= set(covariance) | set(histogram)
        smap = site_map(gm)
        if any(s not in smap for s in wanted):
            return None  # an unknown site: computing raises the error naming it
        order = [s for s in smap if s in wanted]
        return table.answer({s: smap[s].name for s in order}, covariance, histogram)

    @classmethod
    def compute(
        cls,
        gm: fx.GraphModule,
        ctx: PassContext,
        *,
        sites: frozenset[str] | None = None,
        covariance: frozenset[str] = frozenset(),
        histogram: frozenset[str] = frozenset(),
    ) -> StatsTable:
        batches = ctx.require_calibration("activation statistics (ActivationStats)")
        return collect_stats(
            gm,
            batches,
            sites=None if sites is None else sorted(sites),
            covariance=sorted(covariance),
            histogram=sorted(histogram),
            progress=ctx.progress,
            cache_dir=ctx.extra.get("stats_cache_dir"),
            compute_dtype=ctx.calibration_dtype,
        )
