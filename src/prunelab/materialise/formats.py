"""Sparse storage formats: CSR, BSR and NVIDIA's 2:4 compressed layout.

Each format is a pure, frozen data structure over plain tensors with

* ``from_dense(weight, name=...)`` -- build it from a dense weight (any zero is dropped),
* ``to_dense()``                    -- the exact dense weight back (``torch.equal`` holds;
  ``-0.0`` comes back as ``+0.0``, which compares equal),
* ``nbytes``                        -- bytes of the stored tensors,
* ``tensors()`` / ``from_tensors()`` -- the named tensors a module keeps in its state_dict.

A weight of any rank is viewed as the matrix ``(shape[0], prod(shape[1:]))`` -- a conv
weight ``(O, I, kh, kw)`` becomes ``(O, I*kh*kw)``, the matrix im2col multiplies -- and
``to_dense`` restores the original shape.

CSR (compressed sparse row; Saad, "Iterative Methods for Sparse Linear Systems", 2003,
sec. 3.4): ``crow_indices (rows+1,) int32``, ``col_indices (nnz,) int32``,
``values (nnz,)``; row ``r`` holds ``values[crow[r]:crow[r+1]]`` at columns
``col_indices[crow[r]:crow[r+1]]``, columns ascending.  int32 indices are what MKL's
sparse BLAS takes without a per-call conversion (measured 2.5x faster than int64 here).

BSR (block sparse row, the same over ``bh x bw`` blocks): ``crow_indices (rows/bh+1,)``,
``col_indices (nblocks,)`` (block-column), ``values (nblocks, bh, bw)``.  A block is
stored when any of its elements is nonzero (stored zeros inside a block are kept).

2:4 semi-structured (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks";
NVIDIA Ampere sparse tensor cores): every group of 4 consecutive inputs of a row keeps at
most 2 values.  Stored as ``values (rows, cols/2)`` -- the two kept values of each group,
in column order -- and ``metadata (rows, ceil(cols/16)) int16``.  Packing: each group has
two 2-bit positions ``i0 < i1`` in ``0..3``; its 4-bit nibble is ``i0 | i1 << 2`` (the
per-group encoding of the ``mma.sp`` metadata in the PTX ISA, "Sparse matrix
multiply-accumulate", for 16-bit types); four consecutive groups share one int16, group
``g`` in bits ``4*(g%4) .. 4*(g%4)+3`` (little-endian nibbles); a trailing partial int16
is padded with zero nibbles.  This is the *logical* row-major layout; the tile
interleaving that cuSPARSELt/CUTLASS apply on the GPU is done by
``torch.sparse.to_sparse_semi_structured`` at run time, not stored.  A group with fewer
than 2 nonzeros stores explicit zeros at the lowest free positions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from prunelab.errors import PrunelabError

__all__ = ["BSR", "CSR", "FORMAT_CLASSES", "SemiStructured24", "block_shape"]


def _matrix(weight: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """View ``weight`` as the 2-D matrix ``(shape[0], prod(shape[1:]))``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise PrunelabError(
            f"{what} needs a weight with at least 2 dimensions, but {name!r} is {got}; "
            "pass a Linear or Conv weight"
        )
    if not weight.dtype.is_floating_point:
        raise PrunelabError(f"{what} stores floating-point weights, but {name!r} has dtype {weight.dtype}; cast it first")
    return weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))  # not -1: rows may be 0


def _crow(counts: torch.Tensor) -> torch.Tensor:
    """Row pointers from per-row counts: ``(rows,) -> (rows+1,) int32``."""
    zero = torch.zeros(1, dtype=torch.int64, device=counts.device)
    return torch.cat((zero, counts.to(torch.int64).cumsum(0))).to(torch.int32)


def _row_ids(crow: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry: ``(rows+1,) -> (nnz,)`` int64."""
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def _check_int32(count: int, columns: int, what: str, name: str) -> None:
    """The int32 index VALUES must fit: ``crow_indices`` count up to ``count`` stored entries (CSR nonzeros,
    BSR blocks), ``col_indices`` up to ``columns - 1`` (CSR columns, BSR block columns).

    Nothing else is an index: a BSR's elements (``blocks * bh * bw``) or a matrix's ``rows * cols``
    may exceed 2**31-1.
    """
    if count >= 2**31:
        raise PrunelabError(
            f"{what} of {name!r} has {count} stored entries; int32 row pointers hold at most 2**31-1 -- "
            "split the layer or keep it dense"
        )
    if columns > 2**31:
        raise PrunelabError(
            f"{what} of {name!r} has {columns} (block) columns; int32 column indices hold at most 2**31-1 -- "
            "split the layer or keep it dense"
        )


@dataclass(frozen=True, eq=False)
class CSR:
    """Compressed sparse row: int32 ``crow_indices``/``col_indices`` + ``values``."""

    shape: tuple[int, ...]
    crow_indices: torch.Tensor  # (rows+1,) int32
    col_indices: torch.Tensor   # (nnz,) int32
    values: torch.Tensor        # (nnz,)
    kind = "csr"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, *, name: str = "weight") -> CSR:
        matrix = _matrix(weight, "CSR", name)       # (R, C)
        keep = matrix != 0                           # (R, C) bool
        _check_int32(int(keep.sum()), keep.shape[1], "CSR", name)
        cols = keep.nonzero()[:, 1]                  # (nnz,) row-major order
        return cls(
            tuple(weight.shape), _crow(keep.sum(1)), cols.to(torch.int32).contiguous(),
            matrix[keep].contiguous(),
        )

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values))

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.matrix_shape
        dense = torch.zeros(rows, cols, dtype=self.values.dtype, device=self.values.device)
        dense[_row_ids(self.crow_indices), self.col_indices.to(torch.int64)] = self.values
        return dense.reshape(self.shape)

    def to_torch(self) -> torch.Tensor:
        """A ``torch.sparse_csr`` matrix sharing this format's memory (no copy).

        The invariants (``rows+1`` monotone row pointers ending at nnz, columns in range, one
        index dtype) are checked here, once per build: the kernels read the indices unchecked,
        so a damaged state_dict would otherwise read past its tensors (a segfault).
        """
        return torch.sparse_csr_tensor(
            self.crow_indices, self.col_indices, self.values, self.matrix_shape, check_invariants=True
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    @classmethod
    def from_tensors(cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor], **_: object) -> CSR:
        return cls(tuple(shape), tensors["crow_indices"], tensors["col_indices"], tensors["values"])


@dataclass(frozen=True, eq=False)
class BSR:
    """Block sparse row over ``block_size = (bh, bw)`` blocks."""

    shape: tuple[int, ...]
    block_size: tuple[int, int]
    crow_indices: torch.Tensor  # (rows/bh + 1,) int32
    col_indices: torch.Tensor   # (nblocks,) int32, block columns
    values: torch.Tensor        # (nblocks, bh, bw)
    kind = "bsr"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, *, block_size: tuple[int, int] = (4, 4), name: str = "weight") -> BSR:
        matrix = _matrix(weight, "BSR", name)        # (R, C)
        bh, bw = _check_block(block_size, tuple(matrix.shape), name)
        rows, cols = matrix.shape
        blocks = matrix.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2)  # (R/bh, C/bw, bh, bw)
        keep = (blocks != 0).any(dim=3).any(dim=2)   # (R/bh, C/bw)
        _check_int32(int(keep.sum()), keep.shape[1], "BSR", name)
        return cls(
            tuple(weight.shape), (bh, bw), _crow(keep.sum(1)),
            keep.nonzero()[:, 1].to(torch.int32).contiguous(), blocks[keep].contiguous(),
        )

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        """Stored elements (blocks x block area), zeros inside stored blocks included."""
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values))

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.matrix_shape
        bh, bw = self.block_size
        blocks = torch.zeros(rows // bh, cols // bw, bh, bw, dtype=self.values.dtype, device=self.values.device)
        blocks[_row_ids(self.crow_indices), self.col_indices.to(torch.int64)] = self.values
        return blocks.transpose(1, 2).reshape(self.shape).contiguous()  # a view for one block row of 1-wide blocks

    def to_torch(self) -> torch.Tensor:
        """A ``torch.sparse_bsr`` matrix sharing this format's memory (no copy); invariants checked as in CSR."""
        return torch.sparse_bsr_tensor(
            self.crow_indices, self.col_indices, self.values, self.matrix_shape, check_invariants=True
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor], *, block_size: tuple[int, int] = (4, 4), **_: object
    ) -> BSR:
        return cls(tuple(shape), tuple(block_size), tensors["crow_indices"], tensors["col_indices"], tensors["values"])


def block_shape(block_size: tuple[int, int]) -> tuple[int, int]:
    """``block_size`` as two positive ints ``(bh, bw)``; a one-line error for anything else (``"4x4"``, ``(4,)``, ``(0, 4)``, ``(4.5, 4)``)."""
    try:
        bh, bw = (operator.index(b) for b in block_size)
    except (TypeError, ValueError):
        raise PrunelabError(f"BSR block size must be two integers such as (4, 4), got {block_size!r}") from None
    if bh < 1 or bw < 1:
        raise PrunelabError(f"BSR block size must be positive, got {bh}x{bw}; use e.g. 4x4 or 8x1")
    return bh, bw


def _check_block(block_size: tuple[int, int], matrix_shape: tuple[int, int], name: str) -> tuple[int, int]:
    bh, bw = block_shape(block_size)
    rows, cols = matrix_shape
    if rows % bh or cols % bw:
        raise PrunelabError(
            f"BSR block {bh}x{bw} does not tile {name!r} (matrix {rows}x{cols}); choose a block size that "
            f"divides both dimensions (e.g. 1x1 always does) or keep that layer dense"
        )
    return bh, bw


@dataclass(frozen=True, eq=False)
class SemiStructured24:
    """NVIDIA 2:4: kept values ``(rows, cols/2)`` + packed 2-bit positions ``(rows, ceil(cols/16))`` int16."""

    shape: tuple[int, ...]
    values: torch.Tensor    # (rows, cols/2)
    metadata: torch.Tensor  # (rows, ceil(cols/16)) int16, 4 groups x 4 bits each
    kind = "2:4"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, *, name: str = "weight") -> SemiStructured24:
        matrix = _matrix(weight, "2:4", name)        # (R, C)
        rows, cols = matrix.shape
        if cols % 4:
            raise PrunelabError(
                f"2:4 needs the input dimension of {name!r} to be a multiple of 4, got {cols}; "
                "keep that layer dense or use csr"
            )
        groups = matrix.reshape(rows, cols // 4, 4)  # (R, G, 4)
        nonzero = groups != 0
        counts = nonzero.sum(-1)                     # (R, G)
        if bool((counts > 2).any()):
            row, group = (int(v) for v in (counts > 2).nonzero()[0])
            raise PrunelabError(
                f"layer {name!r} is not 2:4 sparse: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) "
                f"has {int(counts[row, group])} nonzeros, at most 2 of every 4 are allowed; prune it with "
                "granularity='2:4' first (CLI: --granularity 2:4), or use materialise(model, 'csr', ...) (CLI: --form csr)"
            )
        # Rank positions: nonzeros first, then zeros, each by position; keep the first two, ascending.
        position = torch.arange(4, device=matrix.device)
        rank = (~nonzero).to(torch.int64) * 4 + position          # (R, G, 4)
        kept = torch.sort(torch.sort(rank, dim=-1).values[..., :2] % 4, dim=-1).values  # (R, G, 2) i0 < i1
        values = torch.gather(groups, -1, kept).reshape(rows, cols // 2).contiguous()
        nibbles = kept[..., 0] | (kept[..., 1] << 2)              # (R, G) in 0..15
        pad = (-nibbles.shape[1]) % 4
        nibbles = torch.nn.functional.pad(nibbles, (0, pad)).reshape(rows, (cols // 4 + pad) // 4, 4)  # (R, ceil(G/4), 4)
        shifts = torch.arange(4, device=matrix.device) * 4
        packed = (nibbles << shifts).sum(-1)                       # (R, ceil(G/4)) in 0..65535
        metadata = torch.where(packed >= 2**15, packed - 2**16, packed).to(torch.int16)
        return cls(tuple(weight.shape), values, metadata.contiguous())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.metadata.numel() * self.metadata.element_size()

    def positions(self) -> torch.Tensor:
        """The unpacked 2-bit positions: ``(rows, cols/4, 2)`` int64 in ``0..3``."""
        rows, cols = self.matrix_shape
        meta = self.metadata.to(torch.int64) & 0xFFFF                       # (R, M) unsigned
        shifts = torch.arange(4, device=meta.device) * 4
        nibbles = ((meta.unsqueeze(-1) >> shifts) & 0xF).reshape(rows, 4 * meta.shape[1])[:, : cols // 4]  # (R, G)
        return torch.stack((nibbles & 0x3, (nibbles >> 2) & 0x3), dim=-1)  # (R, G, 2)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.matrix_shape
        groups = torch.zeros(rows, cols // 4, 4, dtype=self.values.dtype, device=self.values.device)
        groups.scatter_(-1, self.positions(), self.values.reshape(rows, cols // 4, 2))
        return groups.reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "metadata": self.metadata}

    @classmethod
    def from_tensors(cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor], **_: object) -> SemiStructured24:
        return cls(tuple(shape), tensors["values"], tensors["metadata"])


FORMAT_CLASSES: dict[str, type] = {"csr": CSR, "bsr": BSR, "2:4": SemiStructured24}
