"""Granularities: how element scores become group scores, and group decisions masks.

Every granularity views a weight tensor as a ``(groups, group_size)`` matrix whose rows
are the units that are kept or pruned together (Mao et al. 2017, "Exploring the
Granularity of Sparsity in Convolutional Neural Networks"):

==============  ================================  =====================================
name            Conv weight ``(O, I, kh, kw)``     Linear weight ``(O, I)``
==============  ================================  =====================================
unstructured    one weight                         one weight
vector          one kernel row ``w[o, i, r, :]``   one weight (a 1x1 kernel has 1 row)
kernel          one ``kh x kw`` kernel ``w[o, i]`` one weight (a 1x1 kernel)
channel         one output filter ``w[o]``         one output neuron (row) ``w[o]``
neuron          alias of channel
N:M             at most N kept in every M          at most N kept in every M
                consecutive input channels         consecutive inputs of a row
==============  ================================  =====================================

Channel/neuron masks prune whole output rows, the layout a later physical shrink needs
(remove row ``o`` of this layer and input column ``o`` of the next).

``vector``, ``kernel`` and ``channel`` are *structured* (``Granularity.structured``): a
``global`` allocation keeps at least one of their groups in every layer, because one
threshold over group scores of different sizes (raw L1 sums of 9 vs 63 weights) can
otherwise remove every channel of a layer and disconnect the network (see
:class:`prunelab.allocation.GlobalAllocation`).  Unstructured weights have no such floor:
layer collapse there is the documented phenomenon of Tanaka et al. 2020.

N:M (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"; NVIDIA 2:4) is a
*pattern* rather than a group selection: its sparsity is fixed at ``1 - N/M`` and it is
decided inside each block of M, so allocation does not apply to it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from prunelab.errors import PrunelabError
from prunelab.registry import Registry


def _conv_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 3


@dataclass(frozen=True)
class Granularity:
    """Base class: element-wise groups (``unstructured``)."""

    name = "unstructured"
    is_pattern = False  # True for N:M: the mask is decided inside fixed blocks
    structured = False  # True for groups of weights (vector, kernel, channel): global keeps one per layer

    def group_size(self, shape: tuple[int, ...]) -> int:
        return 1

    def to_groups(self, tensor: torch.Tensor) -> torch.Tensor:
        """View ``tensor`` as ``(num_groups, group_size)``.

        Both sizes are explicit (no ``-1``), so a zero-size weight such as a
        ``Linear(0, n)``'s ``(n, 0)`` gives ``(n, 0)`` groups instead of a reshape error.
        """
        shape = tuple(tensor.shape)
        return tensor.reshape(self.num_groups(shape), self.group_size(shape))

    def from_groups(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Expand a ``(num_groups,)`` bool decision back to an element mask of ``shape``."""
        shape = tuple(shape)
        if keep.numel() != self.num_groups(shape):  # else a bare reshape RuntimeError
            raise PrunelabError(
                f"{self.describe()} from_groups got {keep.numel()} group decisions for shape {shape}, which has "
                f"{self.num_groups(shape)} groups; pass one decision per row of to_groups(weight)"
            )
        size = self.group_size(shape)
        return keep.reshape(-1, 1).expand(-1, size).reshape(shape)

    def num_groups(self, shape: tuple[int, ...]) -> int:
        size = self.group_size(shape)
        return math.prod(shape) // size if size else self._groups_of_empty(shape)

    def _groups_of_empty(self, shape: tuple[int, ...]) -> int:
        """Groups of a weight whose groups hold no element (a zero-size fan-in)."""
        return 0

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise PrunelabError if this granularity cannot apply to ``name``'s shape."""

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unstructured(Granularity):
    name = "unstructured"


@dataclass(frozen=True)
class Vector(Granularity):
    """One row of a convolution kernel, ``w[o, i, r, :]`` (1-D, Mao et al. 2017)."""

    name = "vector"
    structured = True

    def group_size(self, shape: tuple[int, ...]) -> int:
        return shape[-1] if _conv_shape(shape) else 1

    def _groups_of_empty(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[:-1])


@dataclass(frozen=True)
class Kernel(Granularity):
    """A whole ``kh x kw`` kernel, ``w[o, i]`` (2-D, Mao et al. 2017)."""

    name = "kernel"
    structured = True

    def group_size(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[2:]) if _conv_shape(shape) else 1

    def _groups_of_empty(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[:2])


@dataclass(frozen=True)
class Channel(Granularity):
    """A whole output filter (Conv) or output neuron (Linear row): ``w[o]``."""

    name = "channel"
    structured = True

    def group_size(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[1:])

    def _groups_of_empty(self, shape: tuple[int, ...]) -> int:
        return shape[0]


@dataclass(frozen=True)
class NM(Granularity):
    """N:M fine-grained structured sparsity: at most ``n`` of every ``m`` kept.

    Blocks run along the input dimension: consecutive inputs of a Linear row
    ``w[o, j*m:(j+1)*m]``, and consecutive input channels of a conv at a fixed kernel
    position ``w[o, j*m:(j+1)*m, r, c]`` (the layout of NVIDIA's sparse tensor cores,
    where the GEMM reduction runs over input channels).  Sparsity is exactly ``1 - n/m``.
    """

    n: int = 2
    m: int = 4
    name = "nm"
    is_pattern = True

    def __post_init__(self) -> None:
        if (not (isinstance(self.n, int) and isinstance(self.m, int)) or isinstance(self.n, bool)
                or isinstance(self.m, bool) or self.m < 1 or self.n < 1):
            raise PrunelabError(
                f"N:M needs integers 1 <= N < M, got {self.n}:{self.m}; N is how many of every M weights are kept "
                "(N = 0 would prune every weight), e.g. 2:4"
            )
        if self.n >= self.m:
            raise PrunelabError(
                f"N:M needs N < M, got {self.n}:{self.m}; N is how many of every M weights are kept (e.g. 2:4)"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def describe(self) -> str:
        return f"{self.n}:{self.m}"

    def group_size(self, shape: tuple[int, ...]) -> int:
        return self.m

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise PrunelabError(f"N:M needs a 2-D or conv weight, but {name!r} has shape {shape}; exclude it")
        if shape[1] % self.m:
            module = name.removesuffix(".weight")
            raise PrunelabError(
                f"N:M block size M={self.m} does not divide the input dimension {shape[1]} of "
                f"{name!r} (shape {tuple(shape)}); exclude that layer (Python: Sparsifier(..., exclude=[{module!r}]); "
                f"CLI: --exclude {module}), or keep it dense with keep_first='dense' (--keep-first dense) if it is the "
                "first layer"
            )

    def _blocked(self, tensor: torch.Tensor) -> torch.Tensor:
        # (O, I, *k) -> (O, *k, I) -> (O * prod(k) * I/m, m)
        # a block must never straddle two rows / kernel positions: the input dimension must be a multiple of m
        self.check("a tensor", tuple(tensor.shape))
        if tensor.dim() > 2:
            tensor = tensor.movedim(1, -1)
        return tensor.reshape(tensor.numel() // self.m, self.m)  # explicit: a zero-size weight gives (0, m)

    def to_groups(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._blocked(tensor)

    def from_groups(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        raise TypeError("N:M is a pattern; use pattern_mask(scores) instead of from_groups")

    def pattern_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the ``n`` highest-scoring entries of every block of ``m`` (ties: lower index)."""
        shape = tuple(scores.shape)
        blocks = self._blocked(scores if scores.dtype == torch.float64 else scores.float())  # (B, m)
        if bool(torch.isnan(blocks).any()):  # a descending sort ranks NaN first: it would be kept, not refused
            raise PrunelabError("N:M scores contain NaN; check the criterion's inputs (NaN or inf weights, gradients or data)")
        # stable descending sort inside each block of m: ties keep the lower index
        order = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, : self.n]
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, order, True)
        if len(shape) > 2:
            moved = (shape[0], *shape[2:], shape[1])
            return keep.reshape(moved).movedim(-1, 1).contiguous()
        return keep.reshape(shape)


GRANULARITIES: Registry[type[Granularity]] = Registry("granularity")
GRANULARITIES.add("unstructured", Unstructured, "individual weights (Han et al. 2015)")
GRANULARITIES.add("vector", Vector, "one row of a conv kernel, w[o,i,r,:] (Mao et al. 2017); weights of a Linear")
GRANULARITIES.add("kernel", Kernel, "a whole kh x kw conv kernel, w[o,i] (Mao et al. 2017); weights of a Linear")
GRANULARITIES.add("channel", Channel, "a conv output filter / Linear output neuron, w[o] (Li et al. 2017)")
GRANULARITIES.add("neuron", Channel, "alias of channel: a Linear output row w[o]")
GRANULARITIES.add("nm", NM, "N:M fine-grained pattern along inputs, write it as 2:4, 4:8, ... (Mishra et al. 2021)")

_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def get_granularity(spec: str | Granularity) -> Granularity:
    """Parse a granularity name (``unstructured``, ``channel``, ``2:4``, ``nm``...)."""
    if isinstance(spec, Granularity):
        return spec
    match = _NM_PATTERN.match(str(spec))
    if match:
        return NM(int(match.group(1)), int(match.group(2)))
    return GRANULARITIES.get(str(spec))()
