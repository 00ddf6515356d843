"""Relative sparse index encoding with filler zeros (Deep Compression, Sec. 2, Fig. 2).

Han, Mao & Dally, ICLR 2016: a pruned layer is stored in compressed sparse form, each
nonzero's position given as the DIFFERENCE from the previous one in ``index_bits`` bits
(8 for conv, 5 for fc in the paper); "when the index difference exceeds the largest
bound, we add a filler zero" so that every difference fits.

Convention here.  The weight is flattened row-major (``weight.reshape(-1)``).  For kept
positions ``p_0 < p_1 < ...`` and ``p_{-1} = -1``, the stored gap is the number of
skipped zeros, ``g_i = p_i - p_{i-1} - 1``, in ``[0, 2^b - 1]`` (a distance of
``1 .. 2^b``, as in the paper's Fig. 2 where 3 bits span a distance of 8).  A gap larger
than ``2^b - 1`` is split: each FILLER entry stands at ``prev + 2^b`` with the maximum
gap ``2^b - 1`` and a stored value of zero, until the rest fits::

    fillers_i = g_i // 2^b,   last gap = g_i mod 2^b

Decoding is ``positions = cumsum(gaps + 1) - 1``; fillers decode to explicit zeros.
Example (3 bits, kept positions 1, 4, 15): gaps 1, 2, [7 filler at 12], 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunelab.errors import PrunelabError

__all__ = ["RelativeIndex", "relative_decode", "relative_encode"]


@dataclass(frozen=True)
class RelativeIndex:
    """Encoded entries: ``gaps`` (int64, each in ``[0, 2^bits - 1]``) and ``real`` (False for a filler)."""

    gaps: np.ndarray
    real: np.ndarray
    index_bits: int

    @property
    def fillers(self) -> int:
        return int(self.real.size - np.count_nonzero(self.real))


def relative_encode(positions: np.ndarray, index_bits: int) -> RelativeIndex:
    """Encode strictly increasing flat positions (>= 0) as gaps of ``index_bits`` bits, inserting fillers."""
    if isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= 16:
        raise PrunelabError(f"index_bits must be an integer in [1, 16], got {index_bits!r}; the paper uses 5 (fc) or 8 (conv)")
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    span = 1 << index_bits
    previous = np.concatenate([[-1], positions[:-1]]) if positions.size else positions
    gaps = positions - previous - 1
    if positions.size and (positions[0] < 0 or gaps.min() < 0):
        raise PrunelabError("positions must be >= 0 and strictly increasing; pass np.flatnonzero(mask)")
    fillers = gaps // span                         # entries each nonzero needs before it
    counts = fillers + 1
    total = int(counts.sum())
    out_gaps = np.full(total, span - 1, dtype=np.int64)
    real = np.zeros(total, dtype=bool)
    last = np.cumsum(counts) - 1                   # where each real entry lands
    out_gaps[last] = gaps - fillers * span
    real[last] = True
    return RelativeIndex(out_gaps, real, index_bits)


def relative_decode(gaps: np.ndarray, numel: int) -> np.ndarray:
    """Flat positions of every entry (fillers included); PrunelabError if one lies outside ``[0, numel)``."""
    gaps = np.asarray(gaps, dtype=np.int64).reshape(-1)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and (gaps.min() < 0 or positions[-1] >= numel):
        raise PrunelabError(f"relative indices reach position {positions[-1]} of a tensor with {numel} elements; "
                            "the index stream is corrupt")
    return positions
