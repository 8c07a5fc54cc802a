"""Channel dependency graph: which parameter dims must change together, and how.

Paper: DepGraph (Fang et al., arXiv:2301.12900) and LLM-Pruner (Ma et al., arXiv:2305.11627),
rebuilt here on the exported ATen graph instead of on ``nn.Module`` hooks.

Identity relied on: a linear map ``T`` on a channel dimension that several tensors share
(permutation, diagonal scale, rotation, selection) can be pushed through every op that is
*transparent* to it and absorbed by the parameters that write (producers) and read (consumers)
that dimension: ``(X T)(T^-1 W) = X W``. A **group** is the set of parameter dims reachable from
each other through coupling rules; every transform must be applied to all of its members at once.

How it is built (one pass over the graph, in topological order):

- Every channel dim (a concrete size > 1 on a tensor that depends on a parameter) gets an
  *index space*. Spaces live in a union-find; two dims that hold the same channels in the same
  order are unified. A space may be refined into a **product** (``view`` splitting ``hidden`` into
  ``(heads, head_dim)``, or GQA's ``(kv_heads, q_per_kv)``) or a **concatenation** (slices of a
  fused ``qkv`` output, rotary ``rotate_half`` halves). The unrefined spaces are the **leaves**:
  the independent axes a transform may act on (e.g. ``kv_heads``, ``head_dim``).
- Coupling comes from ONE table, :data:`RULES`, keyed by ATen op. Each rule unifies spaces and
  records an :class:`OpUse` stating which transform kinds the op passes on that space.
  A tensor op with no rule makes every channel dim it touches **opaque** (a note, never a guess).
- Groups are connected components of spaces (a space, its refinements and everything unified
  with them). Members are ``(parameter, dim)`` pairs with a role (``out`` rows of a linear,
  ``in`` columns, ``bias``, norm ``gain``, embedding ``table`` columns).

Transform kinds: ``permute`` (RPTQ), ``scale`` (SmoothQuant, diagonal), ``rotate`` (SliceGPT,
orthogonal), ``select`` (pruning, lossy). ``ChannelGroup.indices`` turns a per-leaf choice
(a permutation, or the kept indices) into the gather index of every member, and
``ChannelGroup.vectors`` turns per-leaf vectors (diagonal scales) into per-member vectors, so a
pass applies one decision to all members consistently.

Skips / limits: embedding rows (vocabulary, gathered by token id) are not channel dims; a
weight that is not a parameter (``get_attr`` of a buffer) is treated as a constant; a space
refined in two incompatible ways makes the group opaque with a note.

Preconditions: a graph from ``compiler.frontend.trace``, best after ``canonicalize`` (one
``rms_norm``/``layer_norm`` node per norm, ``linear`` for GPT-2's Conv1D). Read-only.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import sympy
import torch
from torch import fx

from compiler import ir
from compiler.errors import PassError
from compiler.pass_base import Analysis, PassContext

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: The four channel transforms.
KINDS = ("permute", "scale", "rotate", "select")
ALL_KINDS = frozenset(KINDS)
INDEX_KINDS = frozenset({"permute", "select"})


# ============================================================================ index spaces


@dataclass
class _Struct:
    kind: str  # "prod" (row-major product) or "cat" (concatenation)
    children: list[int]


class _Spaces:
    """Union-find of index spaces with product/concatenation refinement.

    ``parent`` says two spaces are *the same* index space; ``links`` (edges of a networkx graph
    whose connected components are the groups) say they are in the same *group*: a space, its
    refinements and every space unified with it.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.links: list[tuple[int, int, str]] = []
        self.size: list[int] = []
        self.struct: dict[int, _Struct] = {}
        self.broadcast: set[int] = set()  # created by expand (a repeat, no producer)
        self.conflicts: list[tuple[int, str]] = []

    def new(self, size: int, broadcast: bool = False) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        if broadcast:
            self.broadcast.add(i)
        return i

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def gunion(self, a: int, b: int, why: str = "") -> None:
        if a != b:
            self.links.append((a, b, why))

    def children(self, i: int) -> _Struct | None:
        return self.struct.get(self.find(i))

    def make(self, kind: str, parts: Sequence[int]) -> int:
        """A fresh space structured as ``kind`` of ``parts`` (a single part is returned as is)."""
        parts = [p for p in parts if self.size[self.find(p)] != 0]
        if len(parts) == 1:
            return parts[0]
        sizes = [self.size[self.find(p)] for p in parts]
        total = 1
        if kind == "prod":
            for s in sizes:
                total *= s
        else:
            total = sum(sizes)
        s = self.new(total)
        self.struct[s] = _Struct(kind, list(parts))
        for p in parts:
            self.gunion(s, p, kind)
        return s

    def unify(self, a: int, b: int, why: str = "") -> None:
        """Declare spaces ``a`` and ``b`` the same index space (refining structures to match)."""
        self.gunion(a, b, why)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.conflicts.append((ra, f"size mismatch {self.size[ra]} vs {self.size[rb]} ({why})"))
            return
        sa, sb = self.struct.get(ra), self.struct.get(rb)
        self.parent[rb] = ra
        if sb is not None:
            del self.struct[rb]
        if sa is None:
            if sb is not None:
                self.struct[ra] = sb
            return
        if sb is None:
            return
        self._unify_structs(ra, sa, sb, why)

    def _unify_structs(self, root: int, sa: _Struct, sb: _Struct, why: str) -> None:
        if sa.kind != sb.kind:
            self.conflicts.append((root, f"space is both a {sa.kind} and a {sb.kind} ({why})"))
            return
        la, lb = list(sa.children), list(sb.children)
        if len(la) == len(lb) and all(
            self.size[self.find(x)] == self.size[self.find(y)] for x, y in zip(la, lb)
        ):
            for x, y in zip(la, lb):
                self.unify(x, y, why)
            return
        # Common refinement: walk both part lists, splitting the larger part.
        while la and lb:
            x, y = la.pop(0), lb.pop(0)
            sx, sy = self.size[self.find(x)], self.size[self.find(y)]
            if sx == sy:
                self.unify(x, y, why)
                continue
            big, small, rest_list = (x, y, la) if sx > sy else (y, x, lb)
            sbig, ssmall = max(sx, sy), min(sx, sy)
            if sa.kind == "prod":
                if sbig % ssmall:
                    self.conflicts.append((root, f"factorizations do not nest ({why})"))
                    return
                rest = self.new(sbig // ssmall)
            else:
                rest = self.new(sbig - ssmall)
            piece = self.new(ssmall)
            self.unify(big, self.make(sa.kind, [piece, rest]), why)
            self.unify(piece, small, why)
            rest_list.insert(0, rest)
        if la or lb:
            self.conflicts.append((root, f"structures do not align ({why})"))

    def split_at(self, i: int, offset: int) -> bool:
        """Make ``offset`` a boundary of space ``i`` (refine into a concatenation); False if not."""
        r = self.find(i)
        n = self.size[r]
        if offset <= 0 or offset >= n:
            return True
        st = self.struct.get(r)
        if st is None:
            a, b = self.new(offset), self.new(n - offset)
            self.unify(r, self.make("cat", [a, b]), "slice")
            return True
        if st.kind == "cat":
            start = 0
            for c in st.children:
                sc = self.size[self.find(c)]
                if start == offset or start + sc == offset:
                    return True
                if start < offset < start + sc:
                    return self.split_at(c, offset - start)
                start += sc
            return True
        # prod[A, B...]: slicing at a multiple of the inner block slices the outer factor
        # (prod[cat[A1, A2], B] == cat[prod[A1, B], prod[A2, B]]).
        outer, inner = st.children[0], st.children[1:]
        inner_size = n // self.size[self.find(outer)]
        if offset % inner_size:
            self.conflicts.append((r, f"slice at {offset} cuts inside a block of {inner_size}"))
            return False
        if not self.split_at(outer, offset // inner_size):
            return False
        ost = self.children(outer)
        assert ost is not None and ost.kind == "cat"
        parts = [self.make("prod", [c, *inner]) for c in ost.children]
        # Re-express this space as a concatenation (distributivity); same leaves, same order.
        self.struct[r] = _Struct("cat", parts)
        for p in parts:
            self.gunion(r, p)
        return True

    def part(self, i: int, start: int, stop: int) -> int | None:
        """The sub-space ``[start, stop)`` of ``i`` (refining it), or None if not expressible."""
        n = self.size[self.find(i)]
        stop = min(stop, n)
        if start == 0 and stop == n:
            return i
        if not (self.split_at(i, start) and self.split_at(i, stop)):
            return None
        pos = 0
        picked = []
        for c in self._cat_parts(i):
            sc = self.size[self.find(c)]
            if pos >= start and pos + sc <= stop:
                picked.append(c)
            pos += sc
        if sum(self.size[self.find(c)] for c in picked) != stop - start:
            return None
        return self.make("cat", picked) if len(picked) > 1 else picked[0]

    def _cat_parts(self, i: int) -> list[int]:
        return self._flat_parts(i, "cat")

    def _flat_parts(self, i: int, kind: str) -> list[int]:
        """Parts of ``i`` with nested structures of the same ``kind`` flattened (associativity)."""
        st = self.children(i)
        if st is None or st.kind != kind:
            return [i]
        out: list[int] = []
        for c in st.children:
            out.extend(self._flat_parts(c, kind))
        return out

    def leaves(self, i: int) -> list[int]:
        """Leaf spaces (roots) of ``i`` in layout order (a leaf may repeat, e.g. rotary halves)."""
        r = self.find(i)
        st = self.struct.get(r)
        if st is None:
            return [r]
        out: list[int] = []
        for c in st.children:
            out.extend(self.leaves(c))
        return out

    def index(self, i: int, choice: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Gather index along space ``i`` for a per-leaf choice (a permutation or kept indices)."""
        r = self.find(i)
        st = self.struct.get(r)
        if st is None:
            c = choice.get(r)
            return torch.arange(self.size[r]) if c is None else c
        idx = [self.index(c, choice) for c in st.children]
        sizes = [self.size[self.find(c)] for c in st.children]
        if st.kind == "cat":
            out, off = [], 0
            for ix, sz in zip(idx, sizes):
                out.append(ix + off)
                off += sz
            return torch.cat(out)
        out = idx[0]
        for ix, sz in zip(idx[1:], sizes[1:]):
            out = (out[:, None] * sz + ix[None, :]).reshape(-1)
        return out

    def coords(self, i: int) -> dict[int, torch.Tensor]:
        """Per leaf, the coordinate of every position of space ``i`` along it (-1 if absent)."""
        r = self.find(i)
        n = self.size[r]
        st = self.struct.get(r)
        if st is None:
            return {r: torch.arange(n)}
        kids = [(self.coords(c), self.size[self.find(c)]) for c in st.children]
        out: dict[int, torch.Tensor] = {}
        if st.kind == "prod":
            outer = 1
            for cc, sz in kids:
                inner = n // (outer * sz)
                for lf, c in cc.items():
                    out[lf] = c.repeat_interleave(inner).repeat(outer)
                outer *= sz
            return out
        off = 0
        for cc, sz in kids:
            for lf, c in cc.items():
                t = out.setdefault(lf, torch.full((n,), -1, dtype=torch.long))
                t[off:off + sz] = c
            off += sz
        return out

    def render(self, i: int, labels: Mapping[int, str]) -> str:
        r = self.find(i)
        st = self.struct.get(r)
        if st is None:
            return f"{labels.get(r, 'ch')}({self.size[r]})"
        kids = self._flat_parts(r, st.kind)
        parts = [self.render(c, labels) for c in kids]
        return ("(" + " x ".join(parts) + ")") if st.kind == "prod" else ("[" + " | ".join(parts) + "]")


# ============================================================================ public records


@dataclass(frozen=True)
class Member:
    """One dim of one parameter in a group.

    Attributes:
        target: the ``get_attr`` target (``ir.get_param(gm, target)``).
        name: ``target`` without the tracing wrapper's ``model.`` prefix.
        dim: which dim of the parameter holds the group's channels.
        role: ``out`` (linear rows), ``in`` (linear columns), ``bias``, ``gain``/``norm_bias``
            (norm parameters), ``table`` (embedding columns), ``scale``/``shift`` (elementwise).
        site: module path of the op using it (``model.layers.0.self_attn.q_proj``).
        op: fx name of the op using it.
        size: the dim's length.
        layout: how the dim is laid out over the group's leaves, e.g.
            ``(kv_heads(2) x q_per_kv(2) x [rotary_half(8) | rotary_half(8)])``.
    """

    target: str
    name: str
    dim: int
    role: str
    site: str
    op: str
    size: int
    layout: str = field(compare=False)
    space: int = field(compare=False, repr=False)

    @property
    def is_producer(self) -> bool:
        return self.role in PRODUCER_ROLES


PRODUCER_ROLES = frozenset({"out", "bias", "gain", "norm_bias", "table", "scale", "shift"})


@dataclass(frozen=True)
class OpUse:
    """An op acting on a group's channels and what it lets through.

    Attributes:
        node: fx node name.
        op: short op name (``rms_norm``, ``view``...).
        site: module path of the op.
        passes: transform kinds that commute with the op on this space (or are absorbed by it).
        note: why a kind does not pass ('' if all pass).
        space: the space (in the group) this record is about.
        opaque: True if no rule covers the op (the group is opaque).
        sizes_in_args: the op's arguments spell out sizes of this space (``view``/``expand``
            shapes): a pass that changes the width (pruning) must rewrite them.
    """

    node: str
    op: str
    site: str
    passes: frozenset[str]
    note: str
    space: int = field(repr=False)
    opaque: bool = False
    sizes_in_args: bool = False


@dataclass(frozen=True)
class Leaf:
    """An independent axis of a group (an unrefined index space)."""

    id: int
    size: int
    label: str


@dataclass(frozen=True)
class HeadStructure:
    """Attention head layout of an ``attn_heads`` group.

    Query head ``h`` reads kv head ``kv_of_head[h]``. ``kv_leaves`` / ``rep_leaves`` are the leaf
    ids of the kv-head axis and of the GQA repeat axis (empty without GQA).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    kv_of_head: tuple[int, ...]
    kv_leaves: tuple[int, ...]
    rep_leaves: tuple[int, ...]


class ChannelGroup:
    """A connected set of channel dims: what must change together.

    Attributes:
        name: stable name, ``residual``, ``attn_heads:<module>``, ``mlp:<module>``, ``logits``,
            or ``channels:<module>``.
        kind: the part before ``:``.
        width: channels seen by the consumers (or producers when nothing consumes them).
        members: parameter dims (see :class:`Member`), in graph order.
        ops: ops acting on the channels (see :class:`OpUse`), in graph order.
        heads: head structure for ``attn_heads`` groups, else None.
        notes: why the group (or part of it) is opaque or restricted.
    """

    def __init__(self, name: str, kind: str, width: int, members: list[Member], ops: list[OpUse],
                 leaves: list[Leaf], heads: HeadStructure | None, notes: list[str],
                 spaces: _Spaces):
        self.name = name
        self.kind = kind
        self.width = width
        self.members = members
        self.ops = ops
        self.leaves = leaves
        self.heads = heads
        self.notes = notes
        self._spaces = spaces

    def __repr__(self) -> str:
        return f"ChannelGroup({self.name!r}, width={self.width}, members={len(self.members)})"

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.is_producer]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if not m.is_producer]

    @property
    def opaque(self) -> bool:
        """True if some op touching the group has no coupling rule (or the structure conflicts)."""
        return any(o.opaque for o in self.ops) or any("conflict" in n for n in self.notes)

    def param_dims(self) -> set[tuple[str, int]]:
        """``{(parameter name, dim)}`` of all members."""
        return {(m.name, m.dim) for m in self.members}

    def _leaf_ids(self, space: int) -> set[int]:
        return set(self._spaces.leaves(space))

    def blockers(self, kind: str, leaves: Iterable[int] | None = None) -> list[OpUse]:
        """Ops that do not pass ``kind`` (restricted to ops on ``leaves`` if given)."""
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
        want = None if leaves is None else set(leaves)
        out = []
        for o in self.ops:
            if kind in o.passes:
                continue
            if want is not None and not (self._leaf_ids(o.space) & want):
                continue
            out.append(o)
        return out

    def transparent(self, kind: str, leaves: Iterable[int] | None = None) -> bool:
        """True if every op in the group (on ``leaves``, if given) passes ``kind``."""
        return not self.blockers(kind, leaves)

    def leaf(self, label: str) -> Leaf:
        """The first leaf with ``label`` (``kv_heads``, ``head_dim``, ``channels``...)."""
        for lf in self.leaves:
            if lf.label == label:
                return lf
        raise KeyError(f"group {self.name} has no leaf labelled {label!r}: {self.leaves}")

    def indices(self, choice: Mapping[int, Sequence[int] | torch.Tensor]) -> dict[Member, torch.Tensor]:
        """Gather indices per member for a per-leaf choice.

        Args:
            choice: ``{leaf id: indices}``; a permutation of ``range(leaf.size)`` reorders the
                channels (new index ``k`` holds old index ``perm[k]``), a sorted subset keeps
                those channels. Leaves not named keep all channels in order.

        Returns:
            ``{member: LongTensor}`` to apply as ``W.index_select(member.dim, idx)``.
        """
        ch = {}
        for k, v in choice.items():
            r = self._spaces.find(k)
            ch[r] = torch.as_tensor(v, dtype=torch.long)
        return {m: self._spaces.index(m.space, ch) for m in self.members}

    def vectors(self, values: Mapping[int, Sequence[float] | torch.Tensor]
                ) -> dict[Member, torch.Tensor]:
        """Per member, a per-channel vector built from per-leaf vectors (e.g. diagonal scales).

        Args:
            values: ``{leaf id: vector of leaf.size}``; a member position gets the product of the
                values at its coordinates (1 along leaves not named).

        Returns:
            ``{member: Tensor[member.size]}``. A pass scales producers by it and divides the
            consumers by it: ``(X diag(s)^-1)(diag(s) W)``.
        """
        vals = {self._spaces.find(k): torch.as_tensor(v) for k, v in values.items()}
        out = {}
        for m in self.members:
            vec = torch.ones(m.size, dtype=torch.float64)
            for lf, c in self._spaces.coords(m.space).items():
                if lf in vals:
                    v = vals[lf].to(torch.float64)
                    vec = vec * torch.where(c >= 0, v[c.clamp(min=0)], torch.ones_like(vec))
            out[m] = vec
        return out

    def param_indices(self, choice: Mapping[int, Sequence[int] | torch.Tensor]
                      ) -> dict[tuple[str, int], torch.Tensor]:
        """Like :meth:`indices`, keyed by ``(parameter target, dim)``, one entry per parameter dim.

        A parameter read twice (a tied embedding: table columns and lm_head columns) appears
        once; its uses share one index space, so they get the same index.
        """
        out: dict[tuple[str, int], torch.Tensor] = {}
        for m, idx in self.indices(choice).items():
            key = (m.target, m.dim)
            if key in out and not torch.equal(out[key], idx):
                raise PassError(f"{m.name} dim {m.dim}: two uses disagree on the channel order "
                                f"in group {self.name}")
            out[key] = idx
        return out

    def layout(self, space: int) -> str:
        return self._spaces.render(space, {lf.id: lf.label for lf in self.leaves})

    def leaf_coords(self, member: Member, leaf: int) -> torch.Tensor:
        """Per position of ``member``'s dim, its coordinate along ``leaf`` (-1 where absent)."""
        coords = self._spaces.coords(member.space)
        c = coords.get(self._spaces.find(leaf))
        return torch.full((member.size,), -1, dtype=torch.long) if c is None else c

    def coords(self, member: Member) -> dict[int, torch.Tensor]:
        """Per leaf id, the coordinate of every position of ``member``'s dim (-1 if absent).

        Two members' positions hold the same channel when their coordinates agree on every
        leaf; a leaf one member lacks (GQA's ``q_per_kv`` on ``v_proj`` rows) is broadcast.
        """
        return self._spaces.coords(member.space)

    def broadcast_leaves(self) -> set[int]:
        """Leaf ids created by a broadcast (GQA's repeat axis): no producer writes them."""
        bc = {self._spaces.find(s) for s in self._spaces.broadcast}
        return {lf.id for lf in self.leaves if self._spaces.find(lf.id) in bc}


class ChannelGroups:
    """All channel groups of a graph (the result of the ``channel_groups`` analysis).

    Attributes:
        groups: the groups, residual first, then in graph order.
        notes: one line per opaque op or structure conflict.
        graph: a networkx graph over ``("param", name, dim)`` and ``("op", node)`` vertices,
            one edge per member use; connected components match ``groups``.
    """

    def __init__(self, groups: list[ChannelGroup], notes: list[str], graph: nx.Graph,
                 dim_spaces: Mapping[tuple[str, int], int] | None = None,
                 spaces: _Spaces | None = None):
        self.groups = groups
        self.notes = notes
        self.graph = graph
        self._by_name = {g.name: g for g in groups}
        # (fx node name, dim) -> index space, for passes that rewrite shape arguments
        self._dim_spaces = dict(dim_spaces or {})
        self._spaces = spaces

    def dim_index(self, node: str | fx.Node, dim: int,
                  choice: Mapping[int, Sequence[int] | torch.Tensor]) -> torch.Tensor | None:
        """Kept positions along ``dim`` of ``node``'s output for a per-leaf choice.

        Args:
            node: an fx node (or its name) of the analysed graph.
            dim: a dim of its output (negative counts from the end).
            choice: ``{leaf id: indices}`` as for :meth:`ChannelGroup.indices` (leaf ids are
                global across groups, so choices for several groups may be merged).

        Returns:
            The gather index along that dim, or None if the dim is not a channel dim.
        """
        if self._spaces is None:
            return None
        name = node.name if isinstance(node, fx.Node) else node
        if dim < 0:
            if not isinstance(node, fx.Node):
                raise ValueError("a negative dim needs the fx node, not its name")
            dim = dim % node.meta["val"].dim()
        s = self._dim_spaces.get((name, dim))
        if s is None:
            return None
        ch = {self._spaces.find(k): torch.as_tensor(v, dtype=torch.long) for k, v in choice.items()}
        return self._spaces.index(s, ch)

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no channel group {name!r}; have {sorted(self._by_name)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def of_kind(self, kind: str) -> list[ChannelGroup]:
        return [g for g in self.groups if g.kind == kind]

    def group_of(self, param: str, dim: int) -> ChannelGroup | None:
        """The group holding ``dim`` of parameter ``param`` (target or wrapper-less name)."""
        for g in self.groups:
            for m in g.members:
                if m.dim == dim and param in (m.target, m.name):
                    return g
        return None

    def summary(self) -> str:
        lines = []
        for g in self.groups:
            flags = "".join(k[0].upper() if g.transparent(k) else "-" for k in KINDS)
            lines.append(f"{g.name:<48} width={g.width:<6} members={len(g.members):<4} [{flags}]"
                         + (" OPAQUE" if g.opaque else ""))
        return "\n".join(lines)


# ============================================================================ builder


def _sym(s: Any) -> Any:
    """A size as int or sympy expression (SymInt)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else expr
    return s


def _val(n: Any) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _flat_nodes(args: Any) -> Iterator[fx.Node]:
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _flat_nodes(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _flat_nodes(a)


def _align(a: Sequence[Any], b: Sequence[Any]) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of two shapes with equal element counts into blocks of equal products."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = _sym(a[ia[i]]), _sym(b[ib[j]])
        i += 1
        j += 1
        for _ in range(len(a) + len(b)):
            if sympy.simplify(sympy.sympify(pa) - sympy.sympify(pb)) == 0:
                break
            num, den = sympy.fraction(sympy.together(sympy.sympify(pb) / sympy.sympify(pa)))
            if den == 1 and i < len(ia):
                ga.append(ia[i])
                pa = pa * _sym(a[ia[i]])
                i += 1
            elif num == 1 and j < len(ib):
                gb.append(ib[j])
                pb = pb * _sym(b[ib[j]])
                j += 1
            elif i < len(ia):
                ga.append(ia[i])
                pa = pa * _sym(a[ia[i]])
                i += 1
            elif j < len(ib):
                gb.append(ib[j])
                pb = pb * _sym(b[ib[j]])
                j += 1
            else:
                return None
        else:
            return None
        out.append((ga, gb))
    if i < len(ia) or j < len(ib):
        return None
    return out


class _Builder:
    """State of one analysis run: spaces per (tensor, dim), members, op records."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.sp = _Spaces()
        self.dims: dict[tuple, int] = {}
        self.members: list[tuple[fx.Node, Member]] = []  # (using op, member without layout)
        self.ops: list[tuple[int, OpUse]] = []  # (graph position, record)
        self.notes: list[str] = []
        self.params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        self.act: set[fx.Node] = set()
        self.pos: dict[fx.Node, int] = {}
        self.sdpa: list[fx.Node] = []
        self.tied_tables: set[str] = set()

    # ------------------------------------------------------------------ dims and members

    def is_param(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and n.op == "get_attr" and str(n.target) in self.params

    def is_act(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and n in self.act

    def shape(self, n: fx.Node) -> tuple | None:
        v = _val(n)
        return None if v is None else tuple(v.shape)

    def is_channel(self, n: Any, d: int) -> bool:
        """A channel dim: concrete size > 1 on a tensor that depends on a parameter."""
        if not self.is_act(n):
            return False
        sh = self.shape(n)
        if sh is None or not -len(sh) <= d < len(sh):
            return False
        s = sh[d]
        return isinstance(s, int) and s > 1

    def space(self, n: fx.Node, d: int) -> int:
        sh = self.shape(n)
        d = d % len(sh)
        key = ("param", str(n.target), d) if n.op == "get_attr" else ("node", n, d)
        s = self.dims.get(key)
        if s is None:
            s = self.sp.new(int(sh[d]))
            self.dims[key] = s
        return s

    def member(self, user: fx.Node, p: Any, d: int, role: str) -> int | None:
        """Register dim ``d`` of parameter ``p`` (used by op ``user``) and return its space."""
        if not self.is_param(p) or not self.is_channel(p, d):
            return None
        sh = self.shape(p)
        d = d % len(sh)
        s = self.space(p, d)
        target = str(p.target)
        name = target.removeprefix(ir.WRAPPER_PREFIX)
        self.members.append((user, Member(target, name, d, role, ir.module_path(user), user.name,
                                          int(sh[d]), "", s)))
        return s

    def record(self, n: fx.Node, space: int, passes: Iterable[str] = ALL_KINDS, note: str = "",
               opaque: bool = False, sizes_in_args: bool = False) -> None:
        self.ops.append((self.pos[n], OpUse(n.name, ir.op_name(n), ir.module_path(n),
                                            frozenset(passes), note, space, opaque, sizes_in_args)))

    def unify(self, a: fx.Node, da: int, b: fx.Node, db: int, why: str = "") -> int | None:
        """Unify two channel dims (no-op unless both are channel dims); returns the space."""
        if not (self.is_channel(a, da) and self.is_channel(b, db)):
            return None
        sa, sb = self.space(a, da), self.space(b, db)
        self.sp.unify(sa, sb, why)
        return sa

    def channel_dims(self, n: fx.Node) -> list[int]:
        sh = self.shape(n)
        return [] if sh is None else [d for d in range(len(sh)) if self.is_channel(n, d)]

    def opaque(self, n: fx.Node, reason: str) -> None:
        """No rule: tie every channel dim it touches into one opaque group, with a note."""
        dims = [(x, d) for x in [*_flat_nodes(n.args), *_flat_nodes(n.kwargs), n]
                for d in self.channel_dims(x)]
        if not dims:
            return
        first = self.space(*dims[0])
        for x, d in dims:
            s = self.space(x, d)
            self.sp.gunion(first, s)
            self.record(n, s, (), reason, opaque=True)
        if self.is_param_user(n):
            for x in _flat_nodes(n.args):
                if self.is_param(x):
                    for d in self.channel_dims(x):
                        self.member(n, x, d, "opaque")
        self.notes.append(f"{ir.site(n)}: {n.name}: {reason}")

    def is_param_user(self, n: fx.Node) -> bool:
        return any(self.is_param(x) for x in _flat_nodes(n.args))

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        for i, n in enumerate(self.gm.graph.nodes):
            self.pos[n] = i
            if n.op == "get_attr":
                if str(n.target) in self.params:
                    self.act.add(n)
                continue
            if n.op == "call_function":
                ins = list(_flat_nodes((n.args, n.kwargs)))
                if not any(x in self.act for x in ins):
                    continue
                self.act.add(n)
                rule = RULES.get(n.target)
                if rule is None and isinstance(n.target, torch._ops.OpOverload):
                    rule = RULES.get(n.target.overloadpacket)
                if rule is None:
                    if any(self.channel_dims(x) for x in ins) or self.channel_dims(n):
                        self.opaque(n, f"no coupling rule for {_target_name(n)}")
                    continue
                rule(self, n)
            elif n.op == "output":
                for x in _flat_nodes(n.args):
                    for d in self.channel_dims(x):
                        self.record(n, self.space(x, d), (), "graph output (a fixed interface)")
            elif n.op in ("call_module", "call_method"):
                ins = list(_flat_nodes((n.args, n.kwargs)))
                if any(x in self.act for x in ins):
                    self.act.add(n)
                    self.opaque(n, f"{n.op} {n.target} is not analysed")


def _target_name(n: fx.Node) -> str:
    t = n.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


# ============================================================================ rules


def _rule_linear(b: _Builder, n: fx.Node) -> None:
    # y = x W^T + b: W rows write y's last dim, W columns read x's last dim.
    x, w, bias = ir.linear_parts(n)
    if not isinstance(w, fx.Node) or not b.is_param(w):
        b.opaque(n, "linear whose weight is not a parameter")
        return
    _lead(b, n, x, keep_last=1)
    s_in = b.member(n, w, 1, "in")
    if s_in is not None and b.is_channel(x, -1):
        b.sp.unify(b.space(x, -1), s_in, "linear in")
    s_out = b.member(n, w, 0, "out")
    if s_out is not None and b.is_channel(n, -1):
        b.sp.unify(b.space(n, -1), s_out, "linear out")
    sb = b.member(n, bias, 0, "bias")
    if sb is not None and s_out is not None:
        b.sp.unify(sb, s_out, "linear bias")


def _lead(b: _Builder, n: fx.Node, x: Any, keep_last: int) -> None:
    """Couple the leading (batch-like) dims of ``x`` and ``n`` (concrete ones only)."""
    sx, sn = b.shape(x) if isinstance(x, fx.Node) else None, b.shape(n)
    if sx is None or sn is None or len(sx) != len(sn):
        return
    for d in range(len(sn) - keep_last):
        b.unify(x, d, n, d, ir.op_name(n))


def _rule_embedding(b: _Builder, n: fx.Node) -> None:
    # out[..., :] = table[idx, :]: the table's columns write the output's last dim. Its rows are
    # gathered by token id: a vocabulary axis, not a channel dim.
    table = n.args[0]
    s = b.member(n, table, 1, "table")
    if s is not None and b.is_channel(n, -1):
        b.sp.unify(b.space(n, -1), s, "embedding")
        b.tied_tables.add(str(table.target))


def _norm_rule(has_bias: bool):
    def rule(b: _Builder, n: fx.Node) -> None:
        x, shape = n.args[0], n.args[1]
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        bias = (n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")) if has_bias else None
        if len(shape) != 1:
            b.opaque(n, f"{ir.op_name(n)} over {len(shape)} dims is not modelled")
            return
        _lead(b, n, x, keep_last=1)
        s = b.unify(x, -1, n, -1, "norm")
        if s is None:
            return
        for p, role in ((w, "gain"), (bias, "norm_bias")):
            sp = b.member(n, p, 0, role)
            if sp is not None:
                b.sp.unify(s, sp, "norm param")
        passes = set(INDEX_KINDS)
        if ir.op_name(n) == "rms_norm" and w is None:
            passes.add("rotate")  # ||Qx|| = ||x||
            note = "per-channel scales cannot cross a norm"
        elif ir.op_name(n) == "rms_norm":
            note = ("scale folds into the gain on the output side only; rotation needs the gain "
                    "folded into the consumers first")
        else:
            note = ("scale folds into the gain on the output side only; layer_norm subtracts the "
                    "mean, so rotation needs it rewritten as rms_norm first")
        b.record(n, s, passes, note)

    return rule


def _unary(passes: frozenset[str], note: str = ""):
    # An elementwise function of one tensor: output channel i depends on input channel i only.
    def rule(b: _Builder, n: fx.Node) -> None:
        x = n.args[0]
        for d in b.channel_dims(n):
            s = b.unify(x, d, n, d, ir.op_name(n))
            if s is not None:
                b.record(n, s, passes, note)

    return rule


def _binary(act_act: frozenset[str], act_const: frozenset[str], note: str = ""):
    """Elementwise op of two tensors with broadcasting.

    Two activation (parameter-dependent) operands share channels: unified. A parameter operand
    indexed by the channel is a member (``scale``/``shift``). A constant (non-parameter) operand
    varying along a channel dim blocks index transforms there: it would have to change too.
    """

    def rule(b: _Builder, n: fx.Node) -> None:
        out = b.shape(n)
        operands = [a for a in n.args[:2] if isinstance(a, fx.Node) and b.shape(a) is not None]
        if len(operands) < 2:
            return _unary(act_const, note)(b, n) if operands else None
        for d in b.channel_dims(n):
            dn = d - len(out)
            s = b.space(n, d)
            acts = []
            for a in operands:
                sa = b.shape(a)
                if -dn > len(sa) or sa[dn] == 1:
                    continue  # broadcast along this dim
                if b.is_param(a):
                    role = "scale" if ir.op_name(n) in ("mul", "div") else "shift"
                    sp = b.member(n, a, dn, role)
                    if sp is not None:
                        b.sp.unify(s, sp, ir.op_name(n))
                elif b.is_act(a):
                    acts.append(a)
                    b.unify(a, dn, n, d, ir.op_name(n))
                else:
                    b.record(n, s, act_const - INDEX_KINDS - {"rotate"},
                             f"{ir.op_name(n)} with a constant varying along this dim "
                             f"({a.name}); it would have to be transformed too")
                    continue
            b.record(n, s, act_act if len(acts) > 1 else ALL_KINDS, note if len(acts) > 1 else "")

    return rule


def _rule_view(b: _Builder, n: fx.Node) -> None:
    # view/reshape: dims with equal products are the same channels, split or merged row-major.
    x = n.args[0]
    sx, sn = b.shape(x), b.shape(n)
    if sx is None or sn is None:
        return
    blocks = _align(sx, sn)
    if blocks is None:
        b.opaque(n, f"cannot align {ir.op_name(n)} {tuple(sx)} -> {tuple(sn)}")
        return
    for ga, gb in blocks:
        ca = [d for d in ga if b.is_channel(x, d)]
        cb = [d for d in gb if b.is_channel(n, d)]
        if len(ca) != len(ga) or len(cb) != len(gb):
            continue  # involves a symbolic (batch/seq) dim
        pa = b.sp.make("prod", [b.space(x, d) for d in ga])
        pb = b.sp.make("prod", [b.space(n, d) for d in gb])
        b.sp.unify(pa, pb, ir.op_name(n))
        b.record(n, pa, ALL_KINDS, "", sizes_in_args=(len(ga) != len(gb)))


def _rule_transpose(b: _Builder, n: fx.Node) -> None:
    x = n.args[0]
    rank = len(b.shape(n))
    if ir.op_name(n) == "transpose" or ir.op_name(n) == "t":
        d0, d1 = (n.args[1], n.args[2]) if len(n.args) > 2 else (0, 1)
        perm = list(range(rank))
        perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    else:
        perm = [p % rank for p in n.args[1]]
    for d_out, d_in in enumerate(perm):
        s = b.unify(x, d_in, n, d_out, "transpose")
        if s is not None:
            b.record(n, s)


def _rule_unsqueeze(b: _Builder, n: fx.Node) -> None:
    x = n.args[0]
    sx, sn = b.shape(x), b.shape(n)
    kept = [d for d in range(len(sn)) if not (len(sn) > len(sx) and d == n.args[1] % len(sn))] \
        if ir.op_name(n) == "unsqueeze" else None
    if kept is None:  # squeeze: drop size-1 dims; channel dims keep their order
        blocks = _align(sx, sn)
        if blocks is None:
            b.opaque(n, "cannot align squeeze")
            return
        for ga, gb in blocks:
            s = b.unify(x, ga[0], n, gb[0], "squeeze") if len(ga) == len(gb) == 1 else None
            if s is not None:
                b.record(n, s)
        return
    for d_in, d_out in enumerate(kept):
        if (s := b.unify(x, d_in, n, d_out, "unsqueeze")) is not None:
            b.record(n, s)


def _rule_expand(b: _Builder, n: fx.Node) -> None:
    # Size-1 dims broadcast to n: a new axis that repeats the tensor (GQA's repeat_kv); it has no
    # producer, so selecting along it changes the expand's size argument, not a parameter.
    x = n.args[0]
    sx, sn = b.shape(x), b.shape(n)
    off = len(sn) - len(sx)
    for d in range(len(sn)):
        if not b.is_channel(n, d):
            continue
        di = d - off
        if di >= 0 and sx[di] != 1:
            if (s := b.unify(x, di, n, d, "expand")) is not None:
                b.record(n, s)
        else:
            s = b.space(n, d)
            b.sp.broadcast.add(s)
            b.record(n, s, ALL_KINDS, "", sizes_in_args=True)


def _rule_slice(b: _Builder, n: fx.Node) -> None:
    # x[..., a:b] along a channel dim is a sub-range of that dim's space.
    x, dim = n.args[0], n.args[1] if len(n.args) > 1 else 0
    start = n.args[2] if len(n.args) > 2 else 0
    stop = n.args[3] if len(n.args) > 3 else None
    step = n.args[4] if len(n.args) > 4 else 1
    _slice_to(b, n, n, x, dim, start, stop, step)


def _slice_to(b: _Builder, n: fx.Node, out: fx.Node, x: fx.Node, dim: int, start: Any,
              stop: Any, step: Any) -> None:
    sx = b.shape(x)
    rank = len(sx)
    dim %= rank
    for d in range(rank):
        if d != dim and (s := b.unify(x, d, out, d, "slice")) is not None:
            b.record(n, s)
    if not b.is_channel(x, dim):
        return
    size = sx[dim]
    start = 0 if start is None else start
    stop = size if stop is None else stop
    if not (isinstance(start, int) and isinstance(stop, int) and step == 1):
        b.opaque(n, f"slice with non-constant bounds or step {step} on a channel dim")
        return
    start, stop = max(0, min(start + size if start < 0 else start, size)), \
        max(0, min(stop + size if stop < 0 else stop, size))
    if stop <= start:
        return  # an empty slice carries no channels
    part = b.sp.part(b.space(x, dim), start, stop)
    if part is None:
        b.opaque(n, f"slice [{start}:{stop}] does not match the layout of its input")
        return
    if b.is_channel(out, dim):
        b.sp.unify(b.space(out, dim), part, "slice")
    else:
        b.sp.gunion(b.space(x, dim), part)
    b.record(n, part, ALL_KINDS, "", sizes_in_args=True)


def _rule_cat(b: _Builder, n: fx.Node) -> None:
    # cat along a channel dim: the output space is the concatenation of the inputs' spaces.
    tensors = [t for t in n.args[0] if isinstance(t, fx.Node)]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    rank = len(b.shape(n))
    dim %= rank
    for d in range(rank):
        if d == dim or not b.is_channel(n, d):
            continue
        for t in tensors:
            if b.is_act(t) and (s := b.unify(t, d, n, d, "cat")) is not None:
                b.record(n, s)
    if not b.is_channel(n, dim):
        return
    parts = []
    for t in tensors:
        st = b.shape(t)
        if st is None or (isinstance(st[dim], int) and st[dim] == 0):
            continue
        if not b.is_act(t):
            b.opaque(n, f"cat of a constant ({t.name}) into a channel dim")
            return
        if not isinstance(st[dim], int):
            b.opaque(n, "cat along a symbolic dim")
            return
        parts.append(b.space(t, dim) if st[dim] > 1 else b.sp.new(1))
    s = b.sp.make("cat", parts)
    b.sp.unify(b.space(n, dim), s, "cat")
    b.record(n, s, ALL_KINDS, "", sizes_in_args=False)


def _rule_getitem(b: _Builder, n: fx.Node) -> None:
    # getitem of split / split_with_sizes / chunk: a slice of the source's split dim.
    src, idx = n.args
    if not (isinstance(src, fx.Node) and src.op == "call_function"):
        b.opaque(n, "getitem of an unknown value")
        return
    x = src.args[0]
    name = ir.op_name(src)
    sx = b.shape(x)
    if name not in ("split", "split_with_sizes", "chunk") or sx is None:
        b.opaque(n, f"getitem of {name} is not modelled")
        return
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    size = sx[dim % len(sx)]
    if not isinstance(size, int):
        return  # split along a symbolic dim: not a channel dim
    if name == "chunk":
        k = -(-size // src.args[1])
        sizes = [min(k, size - i) for i in range(0, size, k)]
    elif name == "split" and isinstance(src.args[1], int):
        sizes = [min(src.args[1], size - i) for i in range(0, size, src.args[1])]
    else:
        sizes = list(src.args[1])
    start = sum(sizes[:idx])
    _slice_to(b, n, n, x, dim, start, start + sizes[idx], 1)


def _rule_split(b: _Builder, n: fx.Node) -> None:
    # The split itself produces a tuple; its getitems carry the coupling.
    return


def _rule_sdpa(b: _Builder, n: fx.Node) -> None:
    # softmax(q k^T / sqrt(d) + mask) v per head: q, k, v and the output share heads;
    # q and k share head_dim (contracted), v and the output share v's head_dim.
    # With enable_gqa, query head h reads kv head h // (Hq / Hkv).
    q, k, v = n.args[:3]
    sq, sk, sv = b.shape(q), b.shape(k), b.shape(v)
    if any(s is None or len(s) != 4 for s in (sq, sk, sv)):
        b.opaque(n, "scaled_dot_product_attention on non-4D inputs")
        return
    b.sdpa.append(n)
    hq = b.space(q, 1) if b.is_channel(q, 1) else None
    for t in (k, v):
        if hq is None or not b.is_channel(t, 1):
            continue
        if sq[1] == b.shape(t)[1]:
            b.sp.unify(hq, b.space(t, 1), "sdpa heads")
        else:
            rep = b.sp.new(sq[1] // b.shape(t)[1], broadcast=True)
            b.sp.unify(hq, b.sp.make("prod", [b.space(t, 1), rep]), "sdpa gqa")
    if hq is not None and b.is_channel(n, 1):
        b.sp.unify(hq, b.space(n, 1), "sdpa heads")
    if hq is not None:
        b.record(n, hq, INDEX_KINDS, "heads are independent, but the softmax is not scale- or "
                 "rotation-equivariant across them")
    if (s := b.unify(q, 3, k, 3, "sdpa qk")) is not None:
        b.record(n, s, INDEX_KINDS | {"rotate"},
                 "q.k contraction: a scale on q needs its inverse on k")
    if (s := b.unify(v, 3, n, 3, "sdpa v")) is not None:
        b.record(n, s)
    for d in (0,):
        b.unify(q, d, n, d, "sdpa batch")


_LINEAR_UNARY = ALL_KINDS
_POS_HOMOGENEOUS = frozenset({"permute", "select", "scale"})
_NONLINEAR = INDEX_KINDS


def _elementwise(with_tensor: Callable, with_scalar: Callable):
    # aten.add.Tensor etc. also take python scalars: the rule depends on the second operand.
    def rule(b: _Builder, n: fx.Node) -> None:
        other = n.args[1] if len(n.args) > 1 else None
        return (with_tensor if isinstance(other, fx.Node) else with_scalar)(b, n)

    return rule


_ADD_CONST_NOTE = "adding a constant does not commute with scale or rotation"
_NL_NOTE = "nonlinear elementwise: only index transforms commute with it"

#: The coupling rules: ATen op (overload or packet) -> rule(builder, node).
RULES: dict[Any, Callable[[_Builder, fx.Node], None]] = {
    aten.linear.default: _rule_linear,
    aten.embedding.default: _rule_embedding,
    aten.layer_norm.default: _norm_rule(has_bias=True),
    aten.rms_norm.default: _norm_rule(has_bias=False),
    aten.scaled_dot_product_attention.default: _rule_sdpa,
    # shape ops
    aten.view.default: _rule_view,
    aten.reshape.default: _rule_view,
    aten._unsafe_view.default: _rule_view,
    aten.flatten.using_ints: _rule_view,
    aten.transpose.int: _rule_transpose,
    aten.t.default: _rule_transpose,
    aten.permute.default: _rule_transpose,
    aten.unsqueeze.default: _rule_unsqueeze,
    aten.squeeze.dim: _rule_unsqueeze,
    aten.squeeze.dims: _rule_unsqueeze,
    aten.squeeze.default: _rule_unsqueeze,
    aten.expand.default: _rule_expand,
    aten.slice.Tensor: _rule_slice,
    aten.cat.default: _rule_cat,
    aten.split.Tensor: _rule_split,
    aten.split_with_sizes.default: _rule_split,
    aten.chunk.default: _rule_split,
    operator.getitem: _rule_getitem,
    # linear elementwise (commute with every linear map on the channel dim)
    aten.neg.default: _unary(_LINEAR_UNARY),
    aten.clone.default: _unary(_LINEAR_UNARY),
    aten.alias.default: _unary(_LINEAR_UNARY),
    aten.contiguous.default: _unary(_LINEAR_UNARY),
    aten.detach.default: _unary(_LINEAR_UNARY),
    aten.to.dtype: _unary(_LINEAR_UNARY),
    aten.to.dtype_layout: _unary(_LINEAR_UNARY),
    aten._to_copy.default: _unary(_LINEAR_UNARY),
    aten.type_as.default: _unary(_LINEAR_UNARY),
    aten.dropout.default: _unary(_LINEAR_UNARY),
    # positively homogeneous: relu(s x) = s relu(x) for s > 0
    aten.relu.default: _unary(_POS_HOMOGENEOUS, "rotation does not commute with relu; scales "
                              "must be positive"),
    # nonlinear elementwise
    aten.silu.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.gelu.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.tanh.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.sigmoid.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.exp.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.rsqrt.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.sqrt.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.abs.default: _unary(_NONLINEAR, _NL_NOTE),
    aten.pow.Tensor_Scalar: _unary(_NONLINEAR, _NL_NOTE),
    aten.erf.default: _unary(_NONLINEAR, _NL_NOTE),
    # binary elementwise with broadcasting; with a python scalar they are unary:
    # x * c and x / c are linear, x + c is not.
    aten.add.Tensor: _elementwise(_binary(ALL_KINDS, frozenset()),
                                  _unary(INDEX_KINDS, _ADD_CONST_NOTE)),
    aten.sub.Tensor: _elementwise(_binary(ALL_KINDS, frozenset()),
                                  _unary(INDEX_KINDS, _ADD_CONST_NOTE)),
    aten.mul.Tensor: _elementwise(
        _binary(_POS_HOMOGENEOUS, _POS_HOMOGENEOUS,
                "product of two activations: a scale folds into one factor; a rotation does not "
                "commute"),
        _unary(_LINEAR_UNARY)),
    aten.div.Tensor: _elementwise(
        _binary(_NONLINEAR, _POS_HOMOGENEOUS,
                "quotient of two activations: only index transforms commute"),
        _unary(_LINEAR_UNARY)),
    aten.add.Scalar: _unary(INDEX_KINDS, _ADD_CONST_NOTE),
    aten.sub.Scalar: _unary(INDEX_KINDS, _ADD_CONST_NOTE),
    aten.mul.Scalar: _unary(_LINEAR_UNARY),
    aten.div.Scalar: _unary(_LINEAR_UNARY),
}


# ============================================================================ assembly


def build_channel_groups(gm: fx.GraphModule) -> ChannelGroups:
    """Analyse ``gm`` and return its channel groups.

    Args:
        gm: a traced (preferably canonicalized) GraphModule. It is not modified.

    Returns:
        The :class:`ChannelGroups`; opaque ops are listed in ``.notes`` and on their groups.
    """
    b = _Builder(gm)
    b.run()
    sp = b.sp
    for _root, why in sp.conflicts:
        b.notes.append(f"structure conflict: {why}")

    graph = nx.Graph()
    graph.add_nodes_from(range(len(sp.parent)))
    graph.add_edges_from((a, c, {"why": why}) for a, c, why in sp.links)
    for key, s in b.dims.items():
        graph.nodes[s].setdefault("dims", []).append(
            f"{key[1]}:{key[2]}" if key[0] == "param" else f"{key[1].name}:{key[2]}")
    comp_of: dict[int, int] = {}
    for ci, comp in enumerate(nx.connected_components(graph)):
        for s in comp:
            comp_of[s] = ci
    conflict_comps = {comp_of[r] for r, _ in sp.conflicts}

    members: dict[int, list[tuple[int, Member]]] = {}
    seen: set[tuple] = set()
    for user, m in b.members:
        key = (m.target, m.dim, m.role, m.op)
        if key in seen:
            continue
        seen.add(key)
        members.setdefault(comp_of[m.space], []).append((b.pos[user], m))
    ops: dict[int, list[tuple[int, OpUse]]] = {}
    for pos, o in b.ops:
        ops.setdefault(comp_of[o.space], []).append((pos, o))

    groups: list[tuple[tuple, ChannelGroup]] = []
    used_names: set[str] = set()
    for ci, mem in members.items():
        mem.sort(key=lambda t: t[0])
        gops = [o for _, o in sorted(ops.get(ci, []), key=lambda t: t[0])]
        notes = sorted({f"{o.site or '<top>'}: {o.node}: {o.note}" for o in gops if o.opaque})
        if ci in conflict_comps:
            notes += [f"structure conflict: {why}" for r, why in sp.conflicts if comp_of[r] == ci]
        heads, labels = _heads_and_labels(b, gops, [m for _, m in mem])
        kind, scope = _kind_and_scope(b, gops, [m for _, m in mem])
        if kind == "logits":
            tied = sorted({m.name for _, m in mem if m.target in b.tied_tables})
            notes += [f"{t}: rows are also the embedding table (tied), gathered by token id"
                      for t in tied]
        name = f"{kind}:{scope}" if scope else kind
        base, k = name, 1
        while name in used_names:
            name = f"{base}#{k}"
            k += 1
        used_names.add(name)
        leaves_ids: list[int] = []
        for s in [m.space for _, m in mem] + [o.space for o in gops]:
            for lf in sp.leaves(s):
                if lf not in leaves_ids:
                    leaves_ids.append(lf)
        leaves = [Leaf(lf, sp.size[lf], labels.get(lf, "channels")) for lf in leaves_ids]
        mlist = [_with_layout(m, sp, labels) for _, m in mem]
        cons = [m.size for m in mlist if not m.is_producer]
        width = max(cons) if cons else max(m.size for m in mlist)
        g = ChannelGroup(name, kind, width, mlist, gops, leaves, heads, notes, sp)
        order = (0 if kind == "residual" else 1, mem[0][0])
        groups.append((order, g))
    groups.sort(key=lambda t: t[0])
    log.debug("channel_groups: %d groups, %d notes", len(groups), len(b.notes))
    dim_spaces = {(key[1].name, key[2]): s for key, s in b.dims.items() if key[0] == "node"}
    return ChannelGroups([g for _, g in groups], sorted(set(b.notes)), graph, dim_spaces, sp)


def _with_layout(m: Member, sp: _Spaces, labels: Mapping[int, str]) -> Member:
    return Member(m.target, m.name, m.dim, m.role, m.site, m.op, m.size,
                  sp.render(m.space, labels), m.space)


def _common_prefix(sites: Iterable[str]) -> str:
    parts = [s.split(".") for s in sites if s]
    if not parts:
        return ""
    out = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        out.append(xs[0])
    return ".".join(out)


def _kind_and_scope(b: _Builder, gops: list[OpUse], mem: list[Member]) -> tuple[str, str]:
    sdpa = [o for o in gops if o.op == "scaled_dot_product_attention"]
    if sdpa:
        return "attn_heads", sdpa[0].site
    if any(m.role == "table" for m in mem):
        return "residual", ""
    if any(o.op == "output" for o in gops):
        return "logits", ""
    scope = _common_prefix(m.site for m in mem)
    roles = {m.role for m in mem}
    if roles <= {"out", "in", "bias"} and "out" in roles and "in" in roles:
        return "mlp", scope
    return "channels", scope


def _heads_and_labels(b: _Builder, gops: list[OpUse], mem: list[Member]
                      ) -> tuple[HeadStructure | None, dict[int, str]]:
    sp = b.sp
    labels: dict[int, str] = {}
    names = {o.node for o in gops if o.op == "scaled_dot_product_attention"}
    nodes = [n for n in b.sdpa if n.name in names]
    heads = None
    if nodes:
        n = nodes[0]
        q, _k, v = n.args[:3]
        if b.is_channel(q, 1) and b.is_channel(q, 3) and b.is_channel(v, 3):
            hq = b.space(q, 1)
            bcast = {sp.find(x) for x in sp.broadcast}
            st = sp.children(hq)
            flat = sp.leaves(hq)
            if st is None or (st.kind == "prod" and all(sp.children(c) is None for c in st.children)):
                kv_leaves = [lf for lf in flat if lf not in bcast]
                rep_leaves = [lf for lf in flat if lf in bcast]
                sizes = [sp.size[lf] for lf in flat]
                kv_of_head = []
                for h in range(sp.size[sp.find(hq)]):
                    coords, rem = [], h
                    for sz in reversed(sizes):
                        coords.append(rem % sz)
                        rem //= sz
                    coords.reverse()
                    kv = 0
                    for lf, c in zip(flat, coords):
                        if lf not in bcast:
                            kv = kv * sp.size[lf] + c
                    kv_of_head.append(kv)
                num_kv = 1
                for lf in kv_leaves:
                    num_kv *= sp.size[lf]
                heads = HeadStructure(
                    num_heads=sp.size[sp.find(hq)], num_kv_heads=num_kv,
                    head_dim=sp.size[sp.find(b.space(q, 3))],
                    v_head_dim=sp.size[sp.find(b.space(v, 3))],
                    kv_of_head=tuple(kv_of_head), kv_leaves=tuple(kv_leaves),
                    rep_leaves=tuple(rep_leaves))
                for lf in kv_leaves:
                    labels[lf] = "kv_heads" if rep_leaves else "heads"
                for lf in rep_leaves:
                    labels[lf] = "q_per_kv"
            qd, vd = sp.leaves(b.space(q, 3)), sp.leaves(b.space(v, 3))
            for lf in qd:
                labels.setdefault(lf, "rotary_half" if qd.count(lf) > 1 else "qk_head_dim")
            for lf in vd:
                labels.setdefault(lf, "v_head_dim")
    # Remaining leaves: "channels", numbered when a group has several.
    other: list[int] = []
    for s in [m.space for m in mem] + [o.space for o in gops]:
        for lf in sp.leaves(s):
            if lf not in labels and lf not in other:
                other.append(lf)
    for i, lf in enumerate(other):
        labels[lf] = "channels" if i == 0 else f"channels_{i}"
    return heads, labels


class ChannelGroupsAnalysis(Analysis):
    """The ``channel_groups`` analysis: ``ctx.analysis(ChannelGroupsAnalysis, gm)``."""

    name = "channel_groups"

    @classmethod
    def compute(cls, gm: fx.GraphModule, ctx: PassContext | None = None, **key) -> ChannelGroups:
        return build_channel_groups(gm)


__all__ = [
    "KINDS",
    "RULES",
    "ChannelGroup",
    "ChannelGroups",
    "ChannelGroupsAnalysis",
    "HeadStructure",
    "Leaf",
    "Member",
    "OpUse",
    "build_channel_groups",
]
