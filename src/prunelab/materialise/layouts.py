"""Channel layouts of the shrink dependency graph (see :mod:`prunelab.materialise.graph`).

A tensor's channel dim is a :class:`Layout`: runs of channels (:class:`Segment`), each
from one *channel space* (:class:`Space`, the output rows of one producer layer, decided
by its :class:`Owner` weights).  :class:`Op` is one traced op the planner visits,
:class:`Pin` a set of spaces whose channels may not be removed, and
:class:`ChannelGraph` the whole result, with the union-find of coupled spaces.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx

__all__ = ["ChannelGraph", "Layout", "Op", "Owner", "Pin", "Segment", "Space"]


@dataclass(frozen=True)
class Segment:
    """A run of ``size`` channels of one channel space along a tensor's channel dim.

    ``space`` is a channel-space id, or None for channels that can never be removed (the
    model input, outputs of ops the planner does not understand).  Each channel occupies
    ``inner`` consecutive positions (1 for conv/linear outputs, ``H*W`` after a flatten).
    """

    space: int | None
    size: int
    inner: int = 1

    @property
    def length(self) -> int:
        return self.size * self.inner


@dataclass(frozen=True)
class Layout:
    """The channel dim ``dim`` (non-negative) of a tensor and the segments along it."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    def scaled(self, factor: int, dim: int) -> Layout:
        """The layout after merging this dim with trailing dims of total size ``factor``."""
        return Layout(dim, tuple(Segment(s.space, s.size, s.inner * factor) for s in self.segments))

    def moved(self, dim: int) -> Layout:
        return Layout(dim, self.segments)

    def same_structure(self, other: Layout) -> bool:
        return [(s.size, s.inner) for s in self.segments] == [(s.size, s.inner) for s in other.segments]

    def spaces(self) -> list[int]:
        return [s.space for s in self.segments if s.space is not None]


@dataclass(frozen=True)
class Owner:
    """A weight whose row mask decides a channel space: rows ``offset + c*inner ..`` of ``param``.

    ``required``: without a mask the owner keeps every channel (a producer layer); a
    pass-through owner (a depthwise conv) without a mask has no opinion.
    """

    param: str
    offset: int
    inner: int
    required: bool = True


@dataclass
class Space:
    """The output channels of one producer (a Linear/Conv's rows, or the heads of an attention unit)."""

    size: int
    label: str
    owners: list[Owner] = field(default_factory=list)


@dataclass(frozen=True)
class Pin:
    """Channels of ``spaces`` may not be removed: ``kind`` is 'output', 'op' (a barrier) or 'fixed'."""

    spaces: tuple[int, ...]
    kind: str
    what: str


@dataclass(frozen=True)
class Op:
    """One traced op the planner visits in graph order.

    ``kind``: linear, conv, depthwise, grouped, bn, attention, pointwise, identity, pool,
    pool_zero (an average pool that pads with zeros or overrides its divisor: pruned
    constants must be 0), spatial (a per-channel op on the spatial dims -- interpolation,
    reflect / replicate / circular padding, a crop -- that keeps a constant channel that
    constant), pad (constant padding: the border holds the fill value in every channel, so
    a pruned constant must equal it), reshape (view / reshape / flatten, squeeze /
    unsqueeze and basic indexing: the channel dim may move or merge with trailing dims),
    reduce, cat, binary, barrier.  ``inputs``: the tensor
    operands (fx nodes) whose layouts matter.  ``factor``: reshape multiplier.
    ``literal``: a reshape with a fixed size at the channel dim.  ``zero_required``: pruned
    constants must be 0 -- a product with a tensor broadcast over channels, or a ``sum``
    (its value ``c * n`` depends on the summed length ``n`` of the actual input, not the
    example's).  ``site``: where and by which op a sum reduces, for messages.
    """

    node: fx.Node
    kind: str
    target: str | None
    inputs: tuple[fx.Node, ...]
    output: Layout | None
    factor: int = 1
    literal: bool = False
    zero_required: bool = False
    heads: int | None = None  # attention units: the heads' channel space
    site: str = ""


@dataclass
class ChannelGraph:
    """The traced model, its channel spaces, couplings, ops and pins."""

    module: fx.GraphModule
    spaces: list[Space]
    parent: list[int]
    ops: list[Op]
    layouts: dict[str, Layout | None]
    pins: list[Pin]
    opaque: dict[str, str]
    calls: Counter
    producers: dict[str, int]  # module FQN -> the space of its output rows
    scopes: dict[str, str]     # node name -> FQN of the module whose forward created it
    accounted: set[str] = field(default_factory=set)  # weights whose rows the graph can cut

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def layout(self, node: fx.Node) -> Layout | None:
        return self.layouts.get(node.name)
