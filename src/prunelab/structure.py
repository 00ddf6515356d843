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
                ``w[o, j*M:(j+1)*M, r, c]``        ``w[o, j*M:(j+1)*M]``
==============  ================================  =====================================

Channel/neuron masks prune whole output rows, the layout a later physical shrink needs
(remove row ``o`` of this layer and input column ``o`` of the next).

A transposed convolution (``nn.ConvTranspose1d/2d/3d``, Dumoulin & Visin 2016, "A guide to
convolution arithmetic for deep learning") stores its weight the other way round,
``(I, O / groups, *k)``: its output channel ``o = g * (O / groups) + j`` of group ``g`` is
``w[g*I/groups:(g+1)*I/groups, j]``, not the row ``w[o]``.  A granularity sees only shapes,
so the layer tells it: :meth:`Granularity.for_layer` (and :func:`layer_granularities` for a
whole model) gives the granularity as it applies to one layer's weight --
:class:`TransposedChannel` for the ``channel`` granularity of a transposed conv,
:class:`TransposedNM` for N:M (its blocks run along the transposed conv's INPUT channels,
weight dim 0, within each group's input slice: the reduction dimension of its GEMM, as for
every other layer), and the granularity itself everywhere else (unstructured, vector rows
and kernels are the same groups either way).

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
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

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

    def for_layer(self, module: nn.Module | None) -> Granularity:
        """This granularity as it applies to the ``weight`` of ``module`` (the layer that owns it).

        Itself, unless the layer lays its weight out in a way the shape cannot tell (see
        :meth:`Channel.for_layer`).  ``None`` (no owning module known) gives itself too.
        """
        return self

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

    def for_layer(self, module: nn.Module | None) -> Granularity:
        """:class:`TransposedChannel` for a transposed conv (its output channels are weight dim 1), else itself."""
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return TransposedChannel(int(module.groups))
        return self


@dataclass(frozen=True)
class TransposedChannel(Channel):
    """A whole output channel of a transposed conv, whose weight is ``(I, O / groups, *k)``.

    Output channel ``o = g * (O / groups) + j`` of group ``g`` reads the input channels of
    its group only: it is ``w[g*I/groups:(g+1)*I/groups, j]`` (``I / groups * prod(k)``
    weights), as ``torch.nn.ConvTranspose*`` computes it (Dumoulin & Visin 2016).  Groups
    are numbered ``o`` (``to_groups`` row ``o`` is output channel ``o``), so per-channel
    values such as a following BatchNorm's ``|gamma|`` map onto them one to one.  Obtained
    from ``Channel().for_layer(conv_transpose)``; ``groups`` is the layer's ``groups``.
    """

    groups: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise PrunelabError(f"TransposedChannel needs the layer's groups as an int >= 1, got {self.groups!r}")

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``(groups, I / groups, O / groups, prod(k))`` of a transposed conv weight ``(I, O / groups, *k)``."""
        self.check("a tensor", shape)
        return self.groups, shape[0] // self.groups, shape[1], math.prod(shape[2:])

    def group_size(self, shape: tuple[int, ...]) -> int:
        _, in_g, _, k = self._dims(tuple(shape))
        return in_g * k

    def num_groups(self, shape: tuple[int, ...]) -> int:
        groups, _, out_g, _ = self._dims(tuple(shape))
        return groups * out_g

    def to_groups(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(I, O/g, *k)`` -> ``(O, I/g * prod(k))``; row ``o = g*(O/g) + j`` is ``w[g*I/g:(g+1)*I/g, j]``."""
        groups, in_g, out_g, k = self._dims(tuple(tensor.shape))
        blocks = tensor.reshape(groups, in_g, out_g, k).transpose(1, 2)  # (g, O/g, I/g, k)
        return blocks.reshape(groups * out_g, in_g * k)

    def from_groups(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Expand ``(O,)`` per-output-channel values (bool decisions, or any values) onto ``(I, O/g, *k)``."""
        shape = tuple(shape)
        groups, in_g, out_g, k = self._dims(shape)
        if keep.numel() != groups * out_g:
            raise PrunelabError(
                f"channel from_groups got {keep.numel()} group decisions for the transposed conv weight {shape} "
                f"(groups={groups}), which has {groups * out_g} output channels; pass one decision per output channel"
            )
        expanded = keep.reshape(groups, 1, out_g, 1).expand(groups, in_g, out_g, k)  # (g, I/g, O/g, k)
        return expanded.reshape(shape)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 3 or shape[0] % self.groups:
            raise PrunelabError(
                f"{name!r} (shape {tuple(shape)}) is not the weight (in_channels, out_channels/groups, *kernel) of a "
                f"transposed conv with groups={self.groups}; use Channel().for_layer(module) with the module that owns it"
            )


def layer_granularities(granularity: Granularity, model: nn.Module, names: Iterable[str]) -> dict[str, Granularity]:
    """``FQN -> granularity.for_layer(the module that owns it)`` for the weights ``names`` of ``model``.

    The one place a caller learns each layer's view: e.g. ``channel`` becomes
    :class:`TransposedChannel` for a ``ConvTranspose2d``'s weight.  ``names`` are FQNs as
    ``model.named_parameters()`` gives them (:func:`prunelab.targets.prunable_parameters`).
    """
    found: dict[str, Granularity] = {}
    for name in names:
        module_name = name.rpartition(".")[0]
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise PrunelabError(f"parameter {name!r} is not in the model; pass FQNs from model.named_parameters()") from None
        found[name] = granularity.for_layer(module)
    return found


@dataclass(frozen=True)
class NM(Granularity):
    """N:M fine-grained structured sparsity: at most ``n`` of every ``m`` kept.

    Blocks run along the input dimension: consecutive inputs of a Linear row
    ``w[o, j*m:(j+1)*m]``, and consecutive input channels of a conv at a fixed kernel
    position ``w[o, j*m:(j+1)*m, r, c]`` (the layout of NVIDIA's sparse tensor cores,
    where the GEMM reduction runs over input channels).  Sparsity is exactly ``1 - n/m``.
    For a Linear/Conv weight ``(O, I, *k)`` the input dimension is weight dim 1; a
    transposed conv stores its input channels in dim 0, so ``NM.for_layer(conv_transpose)``
    gives :class:`TransposedNM`, whose blocks run along dim 0.
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

    def for_layer(self, module: nn.Module | None) -> Granularity:
        """:class:`TransposedNM` for a transposed conv (its input channels are weight dim 0), else itself."""
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return TransposedNM(self.n, self.m, int(module.groups))
        return self

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise PrunelabError(f"N:M needs a 2-D or conv weight, but {name!r} has shape {shape}; exclude it")
        if shape[1] % self.m:
            raise PrunelabError(
                f"N:M block size M={self.m} does not divide the input dimension {shape[1]} of "
                f"{name!r} (shape {tuple(shape)}); {_nm_fix(name)}"
            )

    _input_dim = 1  # the weight dim blocks run along: a Linear/Conv weight is (O, I, *k)

    def _blocked(self, tensor: torch.Tensor) -> torch.Tensor:
        # (O, I, *k) -> (O, *k, I) -> (O * prod(k) * I/m, m)
        # a block must never straddle two rows / kernel positions: the input dimension must be a multiple of m
        self.check("a tensor", tuple(tensor.shape))
        if tensor.dim() > 2:
            tensor = tensor.movedim(self._input_dim, -1)
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
            dim = self._input_dim
            moved = (*shape[:dim], *shape[dim + 1:], shape[dim])
            return keep.reshape(moved).movedim(-1, dim).contiguous()
        return keep.reshape(shape)


def _nm_fix(name: str) -> str:
    """How to get past an N:M block size that does not fit ``name``'s layer (the end of a check message)."""
    module = name.removesuffix(".weight")
    return (f"exclude that layer (Python: Sparsifier(..., exclude=[{module!r}]); CLI: --exclude {module}), or keep "
            "it dense with keep_first='dense' (--keep-first dense) if it is the first layer")


@dataclass(frozen=True)
class TransposedNM(NM):
    """N:M on a transposed conv's weight ``(I, O / groups, *k)``: blocks along its INPUT channels, dim 0.

    The reduction of a transposed conv's GEMM runs over its input channels (Dumoulin &
    Visin 2016; ``torch.nn.ConvTranspose*`` is the gradient of a conv with respect to its
    input), so, as :class:`NM` does for every other layer (Mishra et al. 2021), at most
    ``n`` of every ``m`` consecutive input channels are kept at a fixed output slice and
    kernel position: ``w[j*m:(j+1)*m, o, r, c]``.  With ``groups > 1`` each group reads its
    own ``I / groups`` inputs; ``m`` must divide ``I / groups`` so that no block straddles
    two groups.  Obtained from ``NM(n, m).for_layer(conv_transpose)``; ``groups`` is the
    layer's ``groups``.
    """

    groups: int = 1
    _input_dim = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise PrunelabError(f"TransposedNM needs the layer's groups as an int >= 1, got {self.groups!r}")

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 3 or shape[0] % self.groups:
            raise PrunelabError(
                f"{name!r} (shape {tuple(shape)}) is not the weight (in_channels, out_channels/groups, *kernel) of a "
                f"transposed conv with groups={self.groups}; use NM(n, m).for_layer(module) with the module that owns it"
            )
        per_group = shape[0] // self.groups
        if per_group % self.m:
            what = f"{per_group} input channels per group (weight dim 0 / groups={self.groups})" if self.groups > 1 \
                else f"{per_group} (its input channels, weight dim 0)"
            raise PrunelabError(
                f"N:M block size M={self.m} does not divide the input dimension {what} of the transposed conv "
                f"weight {name!r} (shape {tuple(shape)}); {_nm_fix(name)}"
            )


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
