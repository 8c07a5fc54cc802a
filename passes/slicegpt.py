"""SliceGPT: rotate the residual stream onto its principal components (exact), then slice it.

Paper: SliceGPT (Ashkboos et al., arXiv:2401.15024).

Identity relied on: for orthogonal ``Q`` (``Q Q^T = I``) and a gain-free RMSNorm,
``rms_norm(x Q) = rms_norm(x) Q``, so the residual stream can be stored rotated, ``x Q``, with
the rotation folded into its writers and readers: an embedding table ``E <- E Q``, a writer
``W: [d, in] <- Q^T W`` (and its bias ``Q^T b``), a reader ``W: [out, d] <- W Q``. Each residual
tensor read by a norm gets its own basis ``Q_i`` (the PCA of that norm's output on calibration
data: attention input and MLP input of every block, and the final norm), as in the paper; where
a residual add combines a skip path stored in basis ``Q_a`` with a block output written in
basis ``Q_c``, a *shortcut* linear ``x (Q_a^T Q_c)`` is inserted on the skip path.

Slicing keeps the first ``k`` principal directions: the same algebra with the rectangular
``Q[:, :k]``. The normalisation of a sliced RMSNorm still divides by the original width ``d``
(as the paper's implementation does): ``x / sqrt(sum(x^2)/d + eps) =
sqrt(d/k) * rms_norm_k(x, eps * d / k)``, so the norm becomes ``rms_norm(x, [k], None,
eps*d/k)`` and ``sqrt(d/k)`` is folded into its readers. With ``k = d`` slicing is the rotation.

Calibration (``calibration="sequential"``, the default, as the paper and its official code do):
the bases are decided one residual point at a time, in graph order, on the signals of the model
whose earlier residual points are already rotated and sliced, in one sweep of the block engine
(:mod:`compiler.blockwise` with ``unit="segment"``: every stretch between two residual cuts, so
attention and MLP halves apart). Seen in the original coordinates, the sliced model is the
original one with every residual tensor of basis ``Q`` projected by ``P = Q_k Q_k^T`` (writers
``P W``, shortcuts ``x P_a P_c``, and the norm still dividing by ``d``): at each cut the engine
holds the tensor the next norm reads before its projection (the skip path already projected by
its own ``P``, plus the unprojected output of the writer just run), takes the covariance of that
norm's output on it (``rms_norm(x)``, every token weighted alike; the official code uses the norm
input, which weights tokens by their squared norm: measured worse on stories260K, 21.0 vs 19.2 at
25%), decides the basis, projects the stored tensor and runs the next unit on it. Each unit runs
once. ``calibration="once"`` takes every basis from one run of the unsliced model (the former
procedure). With nothing sliced there is nothing to propagate: for the exact rotation the two
differ only in how ``basis="global"`` shares bases (one for the stream, or one per block with
shortcuts that buy nothing there), so ``SliceGPTRotate`` defaults to ``"once"``;
``SliceGPTRotate(calibration="sequential")`` is ``SliceGPT(sparsity=0)``.

Statistics for the next pass: when the pass right after this one asks for statistics of its
input graph (:meth:`compiler.pass_base.Pass.stats_request`: SmoothQuant does), the sequential
sweep measures them from each unit's final run, mapped to the output graph's coordinates
(:class:`_Handoff`), so the next pass runs no sweep of its own: on the 134M model of
``benchmarks/bench_compile_time.py`` slicegpt + smoothquant + insert_qdq calibrate in one sweep
instead of two. Not with ``rerun_attention=False`` (an attention half's last run is then not
what the output graph computes) or where a linear reads the stream through anything but a norm
(GPT-2's views): the next pass measures for itself there.

Sites rewritten: the residual stream found by the channel dependency graph (see
:func:`passes.rotation_invariant.residual_stream`): embedding tables, writers, readers, residual
adds (shortcuts), norms and shape-only ops on the stream (their literal ``d`` becomes ``k``);
for an LM head tied to the embedding, a map after the lookup and an adapter before the head
(``tied_head``).
Nothing is skipped: an op on the stream that is not understood raises ``PassError`` before any
mutation. The graph is first brought to the rotation-invariant form
(:mod:`passes.rotation_invariant`, exact) if it is not in it.

With ``calibration="sequential"`` every norm must read the stream at a residual cut (true of
pre-norm and parallel blocks); otherwise ``PassError`` names the norm (use ``"once"``).

Quantization after it: the linears this pass creates (shortcuts, the tied head's adapter, the
embedding's map) are marked to stay float (``compiler.ir.KEEP_FLOAT``; a shortcut reads the
residual stream, whose outlier channels one int8 scale cannot hold: on SmolLM2 quantizing them
took slicegpt + smoothquant + w8a8 to 1174 perplexity, against 13.85 float), and a later pass
quantizing weights in groups that the sliced width does not divide is warned about before the
sweep (it would refuse the stream's readers afterwards).

Preconditions: ``canonical``; ``calibrated`` (covariance of every norm output); not yet
quantized (the pass manager rejects it after ``insert_qdq``). ``SliceGPTRotate``
is exact; ``SliceGPT`` is lossy. Both establish ``rotation_invariant``. A second
``SliceGPTRotate`` reports ``modified=False``.

Hyper-parameters:
    basis ("global" | "per_norm", default "global"): ``per_norm`` is the paper's: one PCA basis
        per norm input, a shortcut matrix on every residual skip path (``2 k^2`` per block).
        ``global`` shares bases as widely as the calibration allows: with
        ``calibration="once"`` one basis for the whole stream (the PCA of the norm outputs'
        summed covariances) and no shortcut; with ``"sequential"`` one basis per decoder
        block (attention and MLP inputs share it; a shortcut only where a block hands the
        stream to the next, ``k^2`` per block), since a block's basis can only be computed once
        the blocks before it are sliced. Within a block the basis is the PCA of the two norm
        outputs' summed covariances, the MLP's taken with the block input projected by the PCA
        of the first alone; the attention half is then re-run with the block's basis (one extra
        attention half per block). Measured on stories260K at 25% (README): 18.19 global, 17.92
        per_norm, 23.15 the former single basis. ``global`` stays the default for its cost:
        linear-layer multiply-adds per token of the 134M model at 25% (k = 576), as a fraction
        of the dense model's: 84.7% global, 88.3% per_norm (78.6% / 82.0% with
        ``slice_head=True``), 75.0% the former single basis.
    calibration ("sequential" | "once", default "sequential"): see above.
    rerun_attention (bool, default True; SliceGPT with ``basis="global"`` and
        ``calibration="sequential"`` only): re-run each block's attention half once its basis
        is re-estimated with the MLP's covariance. ``False`` moves the attention half's output
        to the new basis on the skip path only (``y + x Q_d Q_d^T``, the directions the first
        estimate dropped; the attention itself keeps the input the first estimate projected):
        every unit then runs once, as with ``per_norm`` (SliceGPT 13-32% faster on the 134M
        model in two paired runs); perplexity at 25% 18.29 against 18.19 on stories260K,
        12.86 against 12.83 on SmolLM2 (README).
    slice_head (bool, default False; SliceGPT only): also slice the stream the final norm and
        the LM head read. The official code leaves it whole (``do_slice_head=False``): the last
        block writes the full width ``d`` (its shortcut maps ``k -> d``), the head keeps its
        ``d`` columns. ``True`` is what this pass did before: at 25% on stories260K 19.34
        (global) / 19.20 (per_norm), with 4.8% fewer parameters than ``False`` (head untied).
    tied_head ("whole_table" | "shared_basis" | "untie"; default "whole_table" for SliceGPT,
        "shared_basis" for SliceGPTRotate): what happens to an LM head tied to the embedding
        table (recognised after the rotation-invariant rewrite, which gives the embedding a
        private copy ``E`` and folds the final norm's gain ``g`` into the head: a head equal to
        ``E diag(g)``, see :func:`tied_head`). ``untie`` is the former behaviour: the head
        becomes a parameter of its own, sliced or not by ``slice_head`` (on SmolLM2 at 20% the
        model grows, 134.5M -> 141.3M with the head whole). ``whole_table`` keeps ``E`` as it
        is (full width, original coordinates) and shared: the embedding writes the stream
        through a ``[k, d]`` map (``Q_0[:, :k]``, the table's rotation and slicing), the head
        reads the final norm through a ``[d, k_h]`` adapter (``g``, the basis of the final
        stream and the slicing factor; ``k_h = d`` with ``slice_head=False``): the function is
        the untied one's (same bases, float rounding apart), with ``V x k`` + ``V x d`` table
        parameters replaced by ``V x d`` + ``k d`` + ``d k_h``. ``shared_basis`` slices the
        shared table (``E Q_0[:, :k]``, block 0's basis) and the head reads it through a
        ``k x k_h`` adapter (``slice_head`` is implied): fewest parameters, but the head then
        sees the final state projected onto the embedding's kept directions: on SmolLM2 at 20%
        14.17 with 112.9M parameters against ``whole_table``'s 11.74 with 119.4M (stories260K
        at 25%: 25.94 against 18.19). A later run of
        this pass folds the map and the adapter back into untied tables first (exact). Models
        whose table is centred (LayerNorm models) are not recognised as tied.
    sparsity (SliceGPT, default 0.25): fraction of the hidden dimension removed, in [0, 1).
    round_to (SliceGPT, default 8): the kept width ``(1 - sparsity) d`` is rounded down to a
        multiple of this (at least ``round_to``).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import fx

from compiler import ir
from compiler.blockwise import Block, BlockRunner, BlockVisitor, run_blockwise
from compiler.errors import PassError, PreconditionError
from compiler.pass_base import HANDED_STATS, Pass, PassContext, PassResult, request_of_next
from compiler.pass_manager import propagate_shapes
from compiler.stats import ActivationStats, StatsRequest, site_map
from passes.rotation_invariant import (
    ResidualStream,
    is_rotation_invariant,
    make_rotation_invariant,
    residual_stream,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten

BASES = ("per_norm", "global")
CALIBRATIONS = ("sequential", "once")
TIED_HEADS = ("whole_table", "shared_basis", "untie")
_MARK = "fxcompress_slicegpt_rotated"
#: ``gm.meta`` key: per basis, the variance kept (read by the compile report)
VARIANCE_META = "fxcompress_slicegpt_variance"


def pca_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric covariance.

    Args:
        cov: ``[d, d]`` symmetric matrix (``X^T X / n``).

    Returns:
        ``(eigenvalues [d], Q [d, d])`` in float64, principal direction ``i`` in ``Q[:, i]``.
    """
    cov = cov.double()
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def sliced_width(width: int, sparsity: float, round_to: int) -> int:
    """The kept hidden width: ``(1 - sparsity) * width`` rounded down to a multiple of ``round_to``.

    Raises:
        PreconditionError: ``round_to`` is larger than ``width``.
    """
    if round_to > width:
        raise PreconditionError(f"slicegpt: round_to={round_to} is larger than the hidden size "
                                f"{width}")
    k = math.floor((1.0 - sparsity) * width + 1e-9)
    return max(round_to, (k // round_to) * round_to)


# ----------------------------------------------------------------------------- decide


def basis_keys(rs: ResidualStream) -> dict[int, str]:
    """Stream id -> the name of the norm whose PCA basis the stream is stored in.

    A stream read by a norm uses that norm's basis; a norm's output uses its input's; a stream
    read by no norm (a writer's output, an embedding) uses the basis of the add it flows into.

    Raises:
        PassError: a residual tensor reaches neither a norm nor an add.
    """
    keys: dict[int, str] = {}
    nodes_of: dict[int, list[fx.Node]] = {}
    for n, s in rs.stream.items():
        nodes_of.setdefault(s, []).append(n)
    norm_streams = set(rs.norm_of_stream)
    norms = set(rs.norms)
    adds = set(rs.adds)

    def key(s: int) -> str:
        if s in keys:
            return keys[s]
        if s in norm_streams:
            norm = rs.norm_of_stream[s]
            keys[s] = key(rs.stream[norm.args[0]])
            return keys[s]
        users = [u for n in nodes_of[s] for u in n.users]
        readers = [u for u in users if u in norms]
        if readers:
            keys[s] = readers[0].name
            return keys[s]
        into = [u for u in users if u in adds]
        if into:
            keys[s] = key(rs.stream[into[0]])
            return keys[s]
        where = nodes_of[s][0]
        raise PassError(f"residual tensor {where.name} at {ir.site(where) or '<top>'} reaches no "
                        "norm and no residual add; no PCA basis to store it in")

    for s in nodes_of:
        key(s)
    return keys


def _norm_sites(gm: fx.GraphModule, rs: ResidualStream) -> dict[str, str]:
    """Norm name -> the stats site observing its output (the input of its first reader)."""
    node_site: dict[fx.Node, str] = {}
    for s, n in site_map(gm).items():
        node_site.setdefault(n, s)
    out = {}
    for norm in rs.norms:
        readers = rs.readers_of(norm)
        if not readers:
            raise PassError(f"norm {norm.name} at {ir.site(norm)} has no linear reader to observe")
        out[norm.name] = node_site[readers[0].args[0]]
    return out


def residual_bases(gm: fx.GraphModule, ctx: PassContext, rs: ResidualStream, basis: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PCA bases (float64, ``[d, d]``) and eigenvalues per norm name, from calibration data."""
    sites = _norm_sites(gm, rs)
    table = ctx.analysis(ActivationStats, gm, sites=frozenset(sites.values()),
                         covariance=frozenset(sites.values()))
    covs = {name: table.covariance(site).double() for name, site in sites.items()}
    if basis == "global":
        total = sum(covs.values()) / len(covs)
        vals, q = pca_basis(total)
        return {k: q for k in covs}, {k: vals for k in covs}
    bases, eig = {}, {}
    for name, c in covs.items():
        eig[name], bases[name] = pca_basis(c)
    return bases, eig


def head_key(rs: ResidualStream, keys: dict[int, str]) -> str:
    """The basis name of the stream the LM head (the last linear reader) reads."""
    return keys[rs.stream[rs.readers[-1].args[0]]]


def normalized_covariance(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``sum_t n_t^T n_t`` (float64, ``[d, d]``) of ``n = rms_norm(x)`` over every token of ``x``.

    Args:
        x: ``[..., d]`` residual tensor; eps: the norm's epsilon.

    The product of one batch is formed in float32 (a relative error of about 2e-7 against
    float64 at 2048 tokens, 1.4x faster on CPU) and the batches are summed in float64.
    """
    x = x.float().reshape(-1, x.shape[-1])
    n = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (n.T @ n).double()


def projector(q: torch.Tensor) -> torch.Tensor:
    """``Q_k Q_k^T`` ``[d, d]`` (float64) of the kept directions ``q`` ``[d, k]``."""
    q = q.double()
    return q @ q.T


def project(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``x Q_k Q_k^T`` (the sliced stream seen in the original coordinates), computed as
    ``x - (x Q_d) Q_d^T`` from the dropped directions ``drop = Q_d`` (``[d, d - k]``; the
    basis is orthogonal, so the two are equal): two thin GEMMs in ``x``'s dtype, ``2 d (d - k)``
    multiply-adds per token against ``d^2`` for ``x P`` (half at 25% sparsity), none when
    nothing is dropped. Relative difference from the float64 ``(x Q_k) Q_k^T`` about 2e-7."""
    if drop.shape[1] == 0:
        return x
    drop = drop.to(x.dtype)
    return x - (x @ drop) @ drop.T


class SequentialBases(BlockVisitor):
    """Decides the residual bases one cut at a time on the sliced model's signals.

    Runs on the unsliced, rotation-invariant graph with ``unit="segment"``: at each cut whose
    stream a norm reads, the covariance of that norm's output is taken on the stored tensor,
    the basis of its group decided, and the stored tensor replaced by its projection, so the
    next unit runs on what the sliced model computes (see the module docstring). A group is one
    cut (``per_norm``) or a decoder block (``global``): for a group's later cuts the basis is
    re-estimated from the group's summed covariances and the group's earlier units are re-run
    from their stored inputs with it (``rerun=False``: a group's one earlier unit is moved to
    the new estimate on its skip path only, :meth:`_correct`).

    Attributes:
        bases: group name -> ``(eigenvalues [d], Q [d, d])`` float64.
        group_of_key: basis key (norm name) -> group name.
    """

    def __init__(self, rs: ResidualStream, keys: dict[int, str], basis: str,
                 widths: dict[str, int], rerun: bool = True, request=None,
                 gm: fx.GraphModule | None = None) -> None:
        self.rs = rs
        self.handoff = None if request is None else _Handoff(self, request, gm)
        self.rerun = rerun
        self.keys = keys
        self.basis = basis
        self.widths = widths  # key -> kept width
        self.norms = {n.name: n for n in rs.norms}
        # key -> (stream the key's norm reads, its eps)
        self.norm_input: dict[str, tuple[int, float]] = {}
        for key in set(keys.values()):
            n = self.norms[key]
            eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
            self.norm_input[key] = (rs.stream[n.args[0]],
                                    torch.finfo(torch.float32).eps if eps is None else eps)
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.group_of_key: dict[str, str] = {}
        self._cov: torch.Tensor | None = None
        self._projectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # the open group: name, summed covariance, first unit, its raw inputs, units so far
        self._group: str | None = None
        self._group_cov: torch.Tensor | None = None
        self._group_units: list[Block] = []
        self._group_inputs: list[torch.Tensor] = []
        self._last_of_group: dict[str, int] | None = None  # group -> its last deciding unit

    def _key(self, block: Block) -> str:
        s = self.rs.stream.get(block.input)
        if s is None:
            raise PassError(f"slicegpt: the value {block.input.name} between blocks (at "
                            f"{ir.site(block.input) or '<top>'}) is not on the residual stream")
        return self.keys[s]

    def _decides(self, block: Block) -> bool:
        key = self._key(block)
        return (key not in self.group_of_key
                and self.rs.stream[block.input] == self.norm_input[key][0])

    def _group_name(self, runner: BlockRunner, key: str) -> str:
        """``key`` itself (per_norm), or the decoder block holding the key's norm (global)."""
        if self.basis != "global":
            return key
        unit = next((b for b in runner.partition.blocks if self.norms[key] in b.nodes), None)
        if unit is None or unit.layer is None or unit.epilogue:
            return key
        return f"block{unit.layer}"

    def _p(self, key: str) -> torch.Tensor:
        """The directions ``key``'s stream drops (``[d, d - k]``, float32, for
        :func:`project`), cached per basis estimate."""
        q = self.bases[self.group_of_key[key]][1]
        cached = self._projectors.get(key)
        if cached is None or cached[0] is not q:
            drop = q[:, self.widths[key]:].float().contiguous()
            cached = self._projectors[key] = (q, drop)
        return cached[1]

    def observed(self, block: Block) -> list[fx.Node]:
        return [block.input] if self._decides(block) else []

    def observe(self, block: Block, node: fx.Node, value: torch.Tensor, batch: int) -> None:
        c = normalized_covariance(value, self.norm_input[self._key(block)][1])
        self._cov = c if self._cov is None else self._cov + c

    def transform(self, block: Block, runner: BlockRunner) -> None:
        key = self._key(block)
        if self._decides(block):
            group = self._group_name(runner, key)
            cov, self._cov = self._cov, None
            if group != self._group:  # a new group starts at this unit
                self._group, self._group_cov = group, cov
                self._group_units, self._group_inputs = [], list(runner.inputs)
                self._estimate()
            else:
                self._group_cov = self._group_cov + cov
                # each re-estimates the group's basis first
                if self.rerun or len(self._group_units) != 1:
                    self._replay(runner)
                else:
                    self._correct(runner)
            self.group_of_key[key] = group
            if self.handoff is not None and self._last_unit(runner, group) == block.index:
                self.handoff.closed(group)  # its basis is final: hand over what waited for it
        self._group_units.append(block)
        if self.handoff is not None:
            self.handoff.pending.append(block)
        if key in self.group_of_key:  # else: a cut before the norm reading it, unprojected
            p = self._p(key)
            runner.replace_inputs([project(x, p) for x in runner.inputs])

    def _last_unit(self, runner: BlockRunner, group: str) -> int:
        """The index of the last unit that re-estimates ``group``'s basis (the units whose
        :meth:`_decides` holds, found in order before the sweep changes that)."""
        if self._last_of_group is None:
            self._last_of_group, seen = {}, set()
            for b in runner.partition.blocks:
                key = self._key(b)
                if key not in seen and self.rs.stream[b.input] == self.norm_input[key][0]:
                    seen.add(key)
                    self._last_of_group[self._group_name(runner, key)] = b.index
        return self._last_of_group.get(group, -1)

    def propagated(self, block: Block) -> list[fx.Node]:
        if self.handoff is None or (self.rerun and self.basis == "global"
                                    and self._group_units == [block]):
            return []  # a global block's first unit is re-run with the block's basis: not final
        return self.handoff.wanted(block)

    def observe_propagated(self, block: Block, node: fx.Node, value: torch.Tensor,
                           batch: int) -> None:
        self.handoff.held[block.index][node][batch] = value

    def final_q(self, key: str) -> torch.Tensor:
        """``key``'s kept directions ``[d, k]`` (float64) as the output graph will hold them:
        a basis keeping every direction of a sliced model is the identity there."""
        q = self.bases[self.group_of_key[key]][1]
        k = self.widths[key]
        if k == q.shape[0] and any(w < k for w in self.widths.values()):
            return torch.eye(k, dtype=torch.float64)
        return q[:, :k]

    def _estimate(self) -> None:
        """The open group's basis from its summed covariances so far."""
        self.bases[self._group] = pca_basis(self._group_cov / self._group_cov.trace())

    def _correct(self, runner: BlockRunner) -> None:
        """Move the open group's one earlier unit to the group's new basis estimate on its skip
        path only: its output ``y = x P_old + f(x P_old)`` becomes ``y + x Q_d Q_d^T`` (``Q_d``
        the directions the old estimate dropped), which the new projection that follows in
        :meth:`transform` takes to ``x P_new + f(x P_old) P_new``; ``f`` keeps its input."""
        drop = self._p(self._key(self._group_units[0]))  # before the estimate changes
        self._estimate()
        if drop.shape[1]:
            runner.replace_inputs([y + (x @ drop.to(x.dtype)) @ drop.T.to(x.dtype)
                                   for x, y in zip(self._group_inputs, runner.inputs)])

    def _replay(self, runner: BlockRunner) -> None:
        """Re-run the open group's earlier units with its current basis estimate."""
        self._estimate()
        xs = []
        for i, x in enumerate(self._group_inputs):
            for unit in self._group_units:
                k = self._key(unit)
                if k in self.group_of_key:
                    x = project(x, self._p(k))
                x = runner.run(unit, i, x, observe=None if self.handoff is None
                               else self.handoff.observers(unit, i))
            xs.append(x)
        runner.replace_inputs(xs)


class _Handoff:
    """Fills the next pass's :class:`compiler.stats.StatsRequest` from the sweep's final runs.

    A unit's values are final after its last run: the propagation run, or for a ``global``
    block's attention half the replay with the block's basis. Values are held per unit (in the
    unsliced coordinates the sweep computes in) until every basis the output graph's values and
    weights need is final (its group closed: its last deciding unit re-estimated it; a
    block's ``down_proj`` writes the next block's basis, so the MLP half waits one block), then
    handed over in the output graph's coordinates: a stream norm's output ``n`` becomes
    ``sqrt(k/d) n Q_k`` (the sliced norm divides by ``k``), a reader's weight ``sqrt(d/k) W Q_k``,
    a writer's ``Q_k^T W``, everything else as computed (see :func:`rotate_residual`)."""

    def __init__(self, sweep: SequentialBases, request, gm: fx.GraphModule) -> None:
        self.sweep, self.request, self.gm = sweep, request, gm
        rs = sweep.rs
        self.readers, self.writers = set(rs.readers), set(rs.writers)
        self.norms = set(rs.norms)
        self.held: dict[int, dict[fx.Node, dict[int, torch.Tensor]]] = {}
        self._wanted: dict[int, list[fx.Node]] = {}
        self.pending: list[Block] = []
        self._closed: set[str] = set()
        self.taken = 0

    def wanted(self, block: Block) -> list[fx.Node]:
        if block.index not in self._wanted:
            # the epilogue never runs in this sweep (nothing after it reads the stream)
            nodes = [] if block.epilogue else list(self.request.tensors(block))
            self._wanted[block.index] = nodes
        nodes = self._wanted[block.index]
        self.held[block.index] = {n: {} for n in nodes}  # a new run replaces the last one's
        return nodes

    def observers(self, block: Block, batch: int) -> dict[fx.Node, Any]:
        nodes = self.wanted(block) if batch == 0 else self._wanted[block.index]
        held = self.held[block.index]
        return {n: (lambda v, n=n: held[n].__setitem__(batch, v)) for n in nodes}

    def _key_of(self, node: fx.Node) -> str:
        return self.sweep.keys[self.sweep.rs.stream[node]]

    def _keys_needed(self, block: Block) -> set[str]:
        keys = set()
        for n in self._wanted.get(block.index, ()):
            if n in self.norms:
                keys.add(self._key_of(n.args[0]))
            for c in n.users:
                if c in self.readers:
                    keys.add(self._key_of(c.args[0]))
                elif c in self.writers:
                    keys.add(self._key_of(c))
        return keys

    def closed(self, group: str) -> None:
        """``group``'s basis is final: hand over every unit that waited only for it."""
        self._closed.add(group)
        waiting = []
        for block in self.pending:
            keys = self._keys_needed(block)
            if all(self.sweep.group_of_key.get(k) in self._closed for k in keys):
                self._take(block)
            else:
                waiting.append(block)
        self.pending = waiting

    def _take(self, block: Block) -> None:
        held = self.held.pop(block.index, {})
        if not held:
            return
        d = self.sweep.rs.width
        values = {}
        for n, per_batch in held.items():
            vs = [per_batch[i] for i in sorted(per_batch)]
            if n in self.norms:
                q = self.sweep.final_q(self._key_of(n.args[0]))
                m = (q * math.sqrt(q.shape[1] / d)).float()
                vs = [v @ m for v in vs]
            values[n] = vs
        del held
        self.request.take(block, values, self.weight_of)
        self.taken += 1

    def weight_of(self, linear: fx.Node) -> torch.Tensor:
        """The weight ``linear`` will hold in the output graph, as float64 from a float32
        product (it decides scales through column maxima: float32 rounding, 1e-7 relative, is
        far below what changes a decision; :func:`rotate_residual` forms it in float64)."""
        w = ir.get_param(self.gm, ir.linear_parts(linear)[1]).detach().float()
        if linear in self.readers:
            s_in = self.sweep.rs.stream[linear.args[0]]
            q = self.sweep.final_q(self.sweep.keys[s_in])
            w = w @ (q * _reader_factor(self.sweep.rs, s_in, q.shape[1])).float()
        elif linear in self.writers:
            w = self.sweep.final_q(self._key_of(linear)).T.float() @ w
        return w.double()

    def finish(self) -> None:
        """After the sweep: close the last group, hand over what waited for it."""
        if self.sweep._group is not None:
            self.closed(self.sweep._group)
        if self.pending:
            raise PassError(f"slicegpt: the statistics of {self.pending[0].name()} could not be "
                            "handed over (a basis they need was never decided)")


def _request_of_next(gm: fx.GraphModule, ctx: PassContext, rs: ResidualStream, final: bool
                     ) -> StatsRequest | None:
    """The next pass's statistics request, when this sweep can fill it: every unit's last run
    is what the output graph computes (``final``; not so for ``rerun_attention=False``, whose
    attention halves keep the first estimate's input), and no requested tensor is the stream
    itself (only a norm's output or a value inside a block maps to the output graph here)."""
    request = request_of_next(gm, ctx) if final else None
    norms = set(rs.norms)
    if request is not None and any(n in rs.stream and n not in norms for n in request.nodes()):
        return None
    return request


def sequential_bases(gm: fx.GraphModule, ctx: PassContext, rs: ResidualStream,
                     keys: dict[int, str], basis: str, widths: dict[str, int], who: str,
                     rerun: bool = True, request: StatsRequest | None = None
                     ) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decide the bases by sequential calibration (one sweep of the block engine).

    Args:
        gm: the rotation-invariant, unsliced graph (not modified).
        ctx: pass context with calibration batches.
        rs, keys: its residual stream and stream id -> basis key (:func:`basis_keys`).
        basis: ``"per_norm"`` or ``"global"`` (one basis per decoder block).
        widths: basis key -> kept width.
        rerun: re-run a ``global`` group's earlier units when its basis is re-estimated
            (else :meth:`SequentialBases._correct`).
        request: the next pass's statistics request, filled from the final unit runs
            (:class:`_Handoff`); closed by the caller once the output graph is built.

    Returns:
        ``(key -> basis name, basis name -> Q [d, d], basis name -> eigenvalues [d])``.

    Raises:
        PassError: a norm does not read the stream at a residual cut.
    """
    visitor = SequentialBases(rs, keys, basis, widths, rerun, request, gm)
    run_blockwise(gm, ctx.require_calibration(who), visitor, propagate="transformed",
                  progress=ctx.progress, desc=who, unit="segment",
                  compute_dtype=ctx.calibration_dtype)
    if visitor.handoff is not None:
        visitor.handoff.finish()
    missing = sorted(set(keys.values()) - set(visitor.group_of_key))
    if missing:
        where = {n.name: ir.site(n) or n.name for n in rs.norms}
        raise PassError(f"{who}: the norm at {where[missing[0]]} reads the residual stream inside "
                        "a block, not at a residual cut; sequential calibration cannot decide its "
                        "basis (use calibration='once')")
    return (dict(visitor.group_of_key), {g: q for g, (_, q) in visitor.bases.items()},
            {g: v for g, (v, _) in visitor.bases.items()})


# ----------------------------------------------------------------------------- mutate


def _set(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    ir.set_param(gm, node, value.to(ir.get_param(gm, node).dtype))


def rotate_residual(gm: fx.GraphModule, rs: ResidualStream, keys: dict[int, str],
                    bases: dict[str, torch.Tensor], width: int | dict[str, int],
                    skip_readers: frozenset = frozenset()) -> dict[str, int]:
    """Store the residual stream of ``gm`` in the given bases, keeping ``width`` directions.

    Args:
        gm: a rotation-invariant GraphModule, mutated in place.
        rs: its residual stream; keys: stream id -> basis name (:func:`basis_keys`).
        bases: basis name -> orthogonal ``[d, d]`` (float64), directions in columns.
        width: kept directions ``k <= d`` (``k == d`` is an exact rotation), for every basis or
            per basis name.
        skip_readers: readers left untouched (a tied head: :func:`tie_head`).

    Returns:
        Counters: ``tables``, ``writers``, ``readers``, ``shortcuts``, ``norms``, ``shape_ops``.
    """
    d = rs.width
    widths = width if isinstance(width, dict) else dict.fromkeys(bases, width)
    q = {name: b[:, :widths[name]] for name, b in bases.items()}
    eye = torch.eye(d, dtype=torch.float64)
    # whole identity bases change no parameter: their products are skipped
    fixed = {name for name, b in q.items() if b.shape == eye.shape and torch.equal(b, eye)}
    stats = dict.fromkeys(("tables", "writers", "readers", "shortcuts", "norms", "shape_ops"), 0)
    # A parameter may be both a writer and a reader (a shortcut from an earlier rotation):
    # each side is transformed once.
    done: set[tuple[str, str]] = set()

    def once(node: fx.Node, side: str) -> bool:
        t = (str(node.target), side)
        if t in done:
            return False
        done.add(t)
        return True

    for src in rs.sources:
        w = src.args[0]
        if ir.param_node(w) is None:
            raise PassError(f"embedding {src.name} at {ir.site(src)}: table is not a parameter")
        if keys[rs.stream[src]] not in fixed and once(w, "table"):
            _set(gm, w, ir.get_param(gm, w).double() @ q[keys[rs.stream[src]]])
            stats["tables"] += 1
    for wr in rs.writers:
        _, wn, bn = ir.linear_parts(wr)
        kw = keys[rs.stream[wr]]
        if kw in fixed:
            continue
        qk = q[kw]
        if once(wn, "out"):
            _set(gm, wn, qk.T @ ir.get_param(gm, wn).double())  # W: [d, in] -> [k, in]
            stats["writers"] += 1
        if ir.param_node(bn) is not None and once(bn, "out"):
            _set(gm, bn, qk.T @ ir.get_param(gm, bn).double())
    for r in rs.readers:
        if r in skip_readers:
            continue
        _, wn, _ = ir.linear_parts(r)
        s_in = rs.stream[r.args[0]]
        if keys[s_in] in fixed:
            continue
        factor = _reader_factor(rs, s_in, widths[keys[s_in]])
        if once(wn, "in"):
            _set(gm, wn, ir.get_param(gm, wn).double() @ q[keys[s_in]] * factor)  # W: [out, k]
            stats["readers"] += 1
    for add in rs.adds:
        kc = keys[rs.stream[add]]
        for i, x in enumerate(add.args[:2]):
            kx = keys[rs.stream[x]]
            if kx == kc:
                continue
            m = q[kc].T @ q[kx]  # linear(x, M) = x Q_x^T Q_c: [k_c, k_x]
            path = ir.module_path(add) or "residual"
            wnode = ir.add_param(gm, f"{path}.slicegpt_shortcut", m.float(), before=add)
            with gm.graph.inserting_before(add):
                sc = gm.graph.call_function(ir.LINEAR, (x, wnode))
            ir.copy_meta(add, sc, created_by="slicegpt")
            sc.meta[ir.KEEP_FLOAT] = SHORTCUT_FLOAT
            args = list(add.args)
            args[i] = sc
            add.args = tuple(args)
            stats["shortcuts"] += 1
    for n in rs.norms:
        k = widths[keys[rs.stream[n]]]
        if k == d:
            continue
        eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
        if eps is None:
            eps = torch.finfo(torch.float32).eps
        n.args = (n.args[0], [k], None, eps * d / k)
        stats["norms"] += 1
    for n in rs.passes:
        new = [_resize(a, d, widths[keys[rs.stream[n]]]) for a in n.args]
        if new != list(n.args):
            n.args = tuple(new)
            stats["shape_ops"] += 1
    return stats


def _reader_factor(rs: ResidualStream, stream: int, k: int) -> float:
    """The factor a reader of ``stream`` sliced to ``k`` directions takes: ``sqrt(d/k)`` behind
    a norm (the sliced norm divides by ``k``, the original by ``d``), else 1."""
    return math.sqrt(rs.width / k) if stream in rs.norm_of_stream else 1.0


#: why insert_qdq / gptq / awq leave a shortcut float (:data:`compiler.ir.KEEP_FLOAT`):
#: measured on SmolLM2-135M, slicegpt(0.25) + smoothquant(0.5) + w8a8 perplexity 1174 with the
#: 30 shortcuts quantized, 13.85 with them float (README)
SHORTCUT_FLOAT = ("SliceGPT shortcut: it reads the residual stream, whose outlier channels one "
                  "per-tensor int8 scale cannot hold")
_HEAD_ADAPTER = "slicegpt_head"
_EMBED_MAP = "slicegpt_embed"


def tied_head(gm: fx.GraphModule, rs: ResidualStream
              ) -> tuple[fx.Node, fx.Node, torch.Tensor] | None:
    """``(embedding, head, g)`` if the LM head is the embedding table up to a per-column gain.

    That is a tied head in the rotation-invariant form: :mod:`passes.rotation_invariant` gives
    the embedding a private copy ``E`` and folds the final norm's gain into the head's columns,
    ``W = E diag(g)`` (each element rounded once to float32). ``g`` is recovered column by
    column (least squares, float64) and accepted only if every element of ``W`` is within
    ``4 * eps_float32`` (relative) of ``E g``; a head that is not such a product (an untied model, or a
    LayerNorm model whose table was centred) returns None.
    """
    if not rs.readers or not rs.sources:
        return None
    head = rs.readers[-1]
    _, wn, _ = ir.linear_parts(head)
    if ir.param_node(wn) is None or rs.norm_feeding(head) is None:
        return None
    w32 = ir.get_param(gm, wn)
    for src in rs.sources:
        t = src.args[0]
        if ir.param_node(t) is None:
            continue
        e32 = ir.get_param(gm, t)
        if e32.shape != w32.shape or e32.shape[1] != rs.width:
            continue
        # a few rows first: an untied head fails there without the whole table in float64
        rows = slice(0, min(_TIE_PROBE_ROWS, e32.shape[0]))
        if _gain_of(w32[rows], e32[rows]) is None:
            continue
        g = _gain_of(w32, e32)
        if g is not None:
            return src, head, g
    return None


#: rows of the table checked before the whole of it (see :func:`tied_head`)
_TIE_PROBE_ROWS = 64


#: rows per float64 block in :func:`_gain_of` (the block's temporaries are held, not the table's)
_GAIN_ROWS = 4096


def _gain_of(w: torch.Tensor, e: torch.Tensor) -> torch.Tensor | None:
    """The per-column ``g`` with ``w == e diag(g)`` within float32 rounding, or None.

    In float64, one block of rows at a time: a float64 copy of SmolLM2's ``[49152, 576]`` table
    and its temporaries held at once came to about 1 GB."""
    def blocks():
        for i in range(0, w.shape[0], _GAIN_ROWS):
            yield w[i:i + _GAIN_ROWS].double(), e[i:i + _GAIN_ROWS].double()

    num = torch.zeros(w.shape[1], dtype=torch.float64)
    den = torch.zeros_like(num)
    for wb, eb in blocks():
        num += (wb * eb).sum(0)
        den += (eb * eb).sum(0)
    g = num / den.clamp(min=1e-300)
    tol = 4 * torch.finfo(torch.float32).eps
    for wb, eb in blocks():
        eg = eb * g
        if not bool(((wb - eg).abs() <= tol * eg.abs() + 1e-30).all()):
            return None
    return g


def tie_head(gm: fx.GraphModule, src: fx.Node, head: fx.Node, g: torch.Tensor,
             q_table: torch.Tensor, q_head: torch.Tensor, factor: float) -> None:
    """Make the head read the (rotated, sliced) embedding table through a ``k x k`` adapter.

    The table is stored as ``E Q_t`` (``q_table = Q_t[:, :k_t]``); the head read the final norm
    output ``n`` of basis ``Q_h`` through ``W = E diag(g)`` (and the slicing factor). With
    ``A = factor * Q_t^T diag(g) Q_h`` (``[k_t, k_h]``), ``linear(linear(n, A), E Q_t) =
    n Q_h^T diag(g) Q_t Q_t^T E^T * factor``: exact at full width, and with the table sliced
    the head sees ``E`` projected onto the table's kept directions, as the embedding does.
    """
    a = factor * (q_table.T @ (g[:, None] * q_head))
    path = ir.module_path(head) or "lm_head"
    anode = ir.add_param(gm, f"{path}.slicegpt_tied_adapter", a.float(), before=head)
    with gm.graph.inserting_before(head):
        adapter = gm.graph.call_function(ir.LINEAR, (head.args[0], anode))
    ir.copy_meta(head, adapter, created_by=_HEAD_ADAPTER)
    adapter.meta[ir.KEEP_FLOAT] = "the tied LM head's input adapter (the head stays float)"
    args = list(head.args)
    args[0], args[1] = adapter, src.args[0]
    head.args = tuple(args)


def map_embedding(gm: fx.GraphModule, src: fx.Node, table: torch.Tensor,
                  q_table: torch.Tensor) -> None:
    """Keep the table ``E`` (``table``, original coordinates, full width) and write the stream
    through ``linear(E[ids], Q_t^T)`` (``[k_t, d]``): the same values as the table ``E Q_t``."""
    _set(gm, src.args[0], table)
    path = ir.module_path(src) or "embedding"
    wnode = ir.add_param(gm, f"{path}.slicegpt_input_map", q_table.T.float(), before=src)
    with gm.graph.inserting_after(src):
        lin = gm.graph.call_function(ir.LINEAR, (src, wnode))
    ir.copy_meta(src, lin, created_by=_EMBED_MAP)
    lin.meta[ir.KEEP_FLOAT] = "the embedding's map into the sliced stream (the table stays float)"
    src.replace_all_uses_with(lin, delete_user_cb=lambda u: u is not lin)


def untie_head_adapters(gm: fx.GraphModule) -> int:
    """Fold every tied-head adapter and embedding map of an earlier run back into untied
    tables (exact): head ``W = T A``, embedding ``E M^T``, so that the stream analysis sees a
    plain head and a plain embedding. Returns how many were folded."""
    maps = [n for n in ir.nodes_of(gm, ir.LINEAR)
            if n.meta.get("fxcompress_created_by") == _EMBED_MAP]
    for lin in maps:
        emb = lin.args[0]
        t = ir.get_param(gm, emb.args[0]).double() @ ir.get_param(gm, lin.args[1]).double().T
        path = ir.module_path(emb) or "embedding"
        tnode = ir.add_param(gm, f"{path}.weight_untied", t.float(), before=emb)
        emb.replace_input_with(emb.args[0], tnode)
        lin.replace_all_uses_with(emb)
        gm.graph.erase_node(lin)
    todo = [n for n in ir.nodes_of(gm, ir.LINEAR)
            if n.meta.get("fxcompress_created_by") == _HEAD_ADAPTER]
    for adapter in todo:
        (head,) = adapter.users
        _, tn, _ = ir.linear_parts(head)
        w = ir.get_param(gm, tn).double() @ ir.get_param(gm, adapter.args[1]).double()
        path = ir.module_path(head) or "lm_head"
        wnode = ir.add_param(gm, f"{path}.weight_untied", w.float(), before=head)
        args = list(head.args)
        args[0], args[1] = adapter.args[0], wnode
        head.args = tuple(args)
        gm.graph.erase_node(adapter)
    if todo or maps:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        ir.remove_unused_attrs(gm)
    return len(todo) + len(maps)


def _resize(arg, d: int, k: int):
    if isinstance(arg, (list, tuple)):
        return type(arg)(k if (isinstance(a, int) and not isinstance(a, bool) and a == d) else a
                         for a in arg)
    return arg


def slice_residual(gm: fx.GraphModule, ctx: PassContext | None, *, basis: str,
                   sparsity: float | None, round_to: int, who: str,
                   calibration: str = "sequential", slice_head: bool = True,
                   tied: str = "untie", rerun_attention: bool = True) -> PassResult:
    """Shared body of :class:`SliceGPTRotate` (``sparsity=None``) and :class:`SliceGPT`."""
    if ctx is None:
        raise PreconditionError(f"{who} needs calibration data; run it through compile() with "
                                "calibration=[input_ids, ...]")
    ctx.require_calibration(who)
    if sparsity is None and gm.meta.get(_MARK):
        return PassResult.unchanged(gm, notes=["residual stream already rotated by slicegpt"])
    params_before = ir.count_params(gm)
    probe = ctx.probe_inputs
    if probe is None:
        probe = torch.zeros(2, 8, dtype=torch.long)
    pre = {}
    refolded = untie_head_adapters(gm)
    if refolded:
        ctx.analyses.invalidate(frozenset())
    if not is_rotation_invariant(gm):
        pre = make_rotation_invariant(gm, probe=probe)
        ctx.analyses.invalidate(frozenset())
    # decide
    rs = residual_stream(gm)
    d = rs.width
    width = d if sparsity is None else sliced_width(d, sparsity, round_to)
    keys = basis_keys(rs)
    head = head_key(rs, keys)
    tie = tied_head(gm, rs) if tied != "untie" else None
    if tie is not None and tied == "shared_basis":
        slice_head = True  # the head reads the sliced table
    table = None if tie is None else ir.get_param(gm, tie[0].args[0]).detach().clone()
    key_width = {k: (d if k == head and not slice_head else width) for k in set(keys.values())}
    _warn_group_sizes(ctx, who, width, d, sparsity, round_to)
    request = None
    if calibration == "sequential":
        request = _request_of_next(gm, ctx, rs, rerun_attention or basis != "global")
        group_of, bases, eig = sequential_bases(gm, ctx, rs, keys, basis, key_width, who,
                                               rerun_attention, request)
        labels = {}
        for k, g in group_of.items():
            labels.setdefault(g, []).append(k)
    else:
        bases, eig = residual_bases(gm, ctx, rs, basis)
        group_of = {k: k for k in bases}
        if basis == "global":
            # one basis everywhere: every add's operands agree, so no shortcut is needed (but
            # where the head's stream keeps its full width: the last add pads with zeros)
            first = next(iter(bases))
            # (a norm that is not its stream's representative key, e.g. the second norm of a
            # parallel-attention block, has the sliced width)
            group_of = {k: (k if key_width.get(k, width) != width else first) for k in bases}
            bases = {g: bases[first] for g in set(group_of.values())}
            eig = {g: eig[first] for g in bases}
        labels = {g: [k for k in group_of if group_of[k] == g] for g in bases}
        if basis == "global":
            labels[first] = ["global (all norm inputs)"]
    keys = {s: group_of[k] for s, k in keys.items()}
    widths = {group_of[k]: w for k, w in key_width.items()}
    if width < d:
        # A basis keeping every direction (the head's stream when it stays whole) may be any
        # orthogonal one: the identity leaves its readers and writers as they are (exact, and
        # no [V, d] x [d, d] product for an LM head); its shortcut maps the last block's basis.
        for g in [g for g, w in widths.items() if w == d]:
            bases[g] = torch.eye(d, dtype=torch.float64)
    kept = {n: float(v[:widths[n]].clamp(min=0).sum() / v.clamp(min=0).sum())
            for n, v in eig.items()}
    # mutate
    stats = rotate_residual(gm, rs, keys, bases, widths,
                            skip_readers=frozenset() if tie is None else frozenset({tie[1]}))
    if tie is not None:
        src, head_node, g = tie
        kt, kh = keys[rs.stream[src]], keys[rs.stream[head_node.args[0]]]
        q_table = bases[kt][:, :widths[kt]]
        if tied == "whole_table":
            map_embedding(gm, src, table, q_table)
            q_table = torch.eye(d, dtype=torch.float64)
        tie_head(gm, src, head_node, g, q_table, bases[kh][:, :widths[kh]],
                 math.sqrt(d / widths[kh]))
    gm.graph.eliminate_dead_code()
    if tie is not None:
        ir.remove_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, probe, f"after {who}")
    gm.meta[_MARK] = True
    if request is not None:
        request.close(gm)
        ctx.extra[HANDED_STATS] = request
    stats.update({f"rotation_invariant_{k}": v for k, v in pre.items() if v})
    stats.update(hidden_before=d, hidden_after=width, bases=len(bases),
                 head_tied=int(tie is not None), head_adapters_refolded=refolded,
                 params_before=params_before, params_after=ir.count_params(gm),
                 min_variance_kept=round(min(kept.values()), 4))
    where = {n.name: ir.site(n) or n.name for n in rs.norms}
    label = {g: " + ".join(where.get(k, k) for k in ks) for g, ks in labels.items()}
    # for the compile report (compiler.report_capture): the kept variance of every basis
    gm.meta[VARIANCE_META] = [
        {"basis": label[name], "kept": frac, "width": widths[name], "total": d,
         "cumulative": _cumulative(eig[name])}
        for name, frac in kept.items()]
    notes = [f"stream read by {label[name]}: {widths[name]}/{d} directions keep "
             f"{frac:.2%} of the variance" for name, frac in kept.items()] if width != d else []
    log.info("%s: hidden %d -> %d, %d bases, %d shortcuts, params %d -> %d", who, d, width,
             stats["bases"], stats["shortcuts"], params_before, stats["params_after"])
    return PassResult(gm, True, frozenset(), stats, notes)


def _warn_group_sizes(ctx: PassContext, who: str, width: int, d: int, sparsity: float | None,
                      round_to: int) -> None:
    """Warn, before the sweep, when a later pass quantizes weights in groups that the sliced
    width will not divide (it would refuse the stream's readers, naming them, after this pass
    has run)."""
    for p in ctx.upcoming or ():
        g = p.weight_group_size()
        if g and width != d and sparsity is not None and width % g:
            fits = math.lcm(round_to, g)
            fix = (f"round_to={fits} slices to {sliced_width(d, sparsity, fits)}, or "
                   if fits <= d else "")
            warnings.warn(f"{who}: the sliced width {width} is no multiple of {p.name}'s "
                          f"group_size {g}: {p.name} will refuse the linears reading the "
                          f"stream; {fix}give "
                          f"{p.name} a group size dividing {width}", stacklevel=2)


def _cumulative(eigenvalues: torch.Tensor, points: int = 256) -> list[float]:
    """Fraction of the variance kept by the first ``k`` directions, at <= ``points`` values of
    ``k`` (``k = 1 .. d``, evenly spaced; the curve is monotone so nothing is hidden)."""
    v = eigenvalues.clamp(min=0).double()
    frac = v.cumsum(0) / v.sum().clamp(min=1e-300)
    idx = torch.linspace(0, len(frac) - 1, min(points, len(frac))).round().long()
    return [round(float(f), 5) for f in frac[idx]]


def _check_basis(who: str, basis: str, calibration: str, tied_head: str = "untie") -> None:
    if tied_head not in TIED_HEADS:
        raise ValueError(f"{who}: tied_head must be one of {TIED_HEADS}, got {tied_head!r}")
    if basis not in BASES:
        raise ValueError(f"{who}: basis must be one of {BASES}, got {basis!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"{who}: calibration must be one of {CALIBRATIONS}, got {calibration!r}")


class SliceGPTRotate(Pass):
    """Rotate the residual stream onto its PCA basis (or per-norm bases + shortcuts); exact."""

    name = "slicegpt_rotate"
    exact = True
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"rotation_invariant"})
    forbids = frozenset({"quantized"})  # rotating Q/DQ'd weights would mix their grids

    def __init__(self, *, basis: str = "global", calibration: str = "once",
                 tied_head: str = "shared_basis"):
        _check_basis(self.name, basis, calibration, tied_head)
        self.basis = basis
        self.calibration = calibration
        self.tied_head = tied_head

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        self.check_not_quantized(gm, ctx, "rotate before quantizing")
        return slice_residual(gm, ctx, basis=self.basis, sparsity=None, round_to=1, who=self.name,
                              calibration=self.calibration, tied=self.tied_head)


class SliceGPT(Pass):
    """Rotate the residual stream onto its principal components and keep the first ``k``; lossy."""

    name = "slicegpt"
    exact = False
    requires = frozenset({"canonical", "calibrated"})
    establishes = frozenset({"rotation_invariant"})
    forbids = frozenset({"quantized"})

    def __init__(self, *, sparsity: float = 0.25, round_to: int = 8, basis: str = "global",
                 calibration: str = "sequential", slice_head: bool = False,
                 tied_head: str = "whole_table", rerun_attention: bool = True):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
                or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"slicegpt: sparsity must be a number in [0, 1), got {sparsity!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"slicegpt: round_to must be a positive int, got {round_to!r}")
        _check_basis(self.name, basis, calibration, tied_head)
        if not isinstance(slice_head, bool):
            raise ValueError(f"slicegpt: slice_head must be a bool, got {slice_head!r}")
        if not isinstance(rerun_attention, bool):
            raise ValueError(f"slicegpt: rerun_attention must be a bool, got {rerun_attention!r}")
        if not rerun_attention and (basis, calibration) != ("global", "sequential"):
            raise ValueError(f"slicegpt: rerun_attention=False applies to basis='global' with "
                             f"calibration='sequential' only (got basis={basis!r}, "
                             f"calibration={calibration!r}): the other modes run each "
                             "attention half once already")
        self.sparsity = float(sparsity)
        self.round_to = round_to
        self.basis = basis
        self.calibration = calibration
        self.slice_head = slice_head
        self.tied_head = tied_head
        self.rerun_attention = rerun_attention

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        self.check_not_quantized(gm, ctx, "slice before quantizing")
        return slice_residual(gm, ctx, basis=self.basis, sparsity=self.sparsity,
                              round_to=self.round_to, who=self.name,
                              calibration=self.calibration, slice_head=self.slice_head,
                              tied=self.tied_head, rerun_attention=self.rerun_attention)


__all__ = [
    "BASES",
    "CALIBRATIONS",
    "SequentialBases",
    "VARIANCE_META",
    "SliceGPT",
    "SliceGPTRotate",
    "TIED_HEADS",
    "basis_keys",
    "head_key",
    "normalized_covariance",
    "project",
    "projector",
    "pca_basis",
    "residual_bases",
    "rotate_residual",
    "sequential_bases",
    "slice_residual",
    "sliced_width",
    "tie_head",
    "tied_head",
    "untie_head_adapters",
]
