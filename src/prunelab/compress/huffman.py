"""Canonical Huffman coding of small-alphabet symbol streams (Deep Compression, stage 3).

Huffman, "A Method for the Construction of Minimum-Redundancy Codes", Proc. IRE 1952;
applied to the quantised weight indices and the relative sparse indices by Han, Mao &
Dally, ICLR 2016, Sec. 4 (they report 20-30% further savings).

* Code lengths: the classic greedy merge of the two least frequent nodes; a symbol's
  length is its depth in the tree, so ``sum_s f_s * l_s`` is minimal among prefix codes.
  Lengths are capped at ``MAX_CODE_LENGTH`` (20) by halving the counts and rebuilding
  until the cap holds (a standard heuristic; it never triggers on realistic streams).
* Canonical codes (Schwartz & Kallick 1964; DEFLATE, RFC 1951 Sec. 3.2.2): symbols
  sorted by ``(length, symbol)`` get consecutive codes, ``code <<= (len - prev_len)``
  between lengths, so the table is the code LENGTHS alone (one byte per symbol).
* The table has one entry per symbol up to the highest USED symbol (trailing unused
  symbols are dropped).  A stream with one distinct symbol ``s`` gets the all-zero table
  of ``s + 1`` entries: it costs no bits at all, and decodes as ``s`` repeated.
* Bits are packed most-significant first; the last byte is zero-padded.

Decoding uses a lookup table indexed by the next ``L_max`` bits (``L_max`` = the longest
code), giving ``(symbol, length)`` per position in ``O(1)``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from prunelab.errors import PrunelabError

__all__ = ["MAX_CODE_LENGTH", "canonical_codes", "code_lengths", "decode", "encode", "encoded_bits"]

MAX_CODE_LENGTH = 20
_DECODE_CHUNK = 1 << 20  # bit positions decoded per table pass (bounds memory)


def _huffman_lengths(freqs: np.ndarray) -> np.ndarray:
    lengths = np.zeros(freqs.size, dtype=np.int64)
    used = np.flatnonzero(freqs)
    if used.size == 1:
        return lengths  # one symbol: length 0, no bits
    # heap of (count, node id); leaves are 0..n-1 in symbol order, merged nodes n, n+1, ...
    # (ids are unique and increasing, so ties are broken deterministically by creation order)
    heap = [(int(freqs[s]), i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    parent = [-1] * (2 * used.size - 1)
    node = used.size
    while len(heap) > 1:
        f1, a = heapq.heappop(heap)
        f2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (f1 + f2, node))
        node += 1
    depth = [0] * len(parent)
    for n in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[n] = depth[parent[n]] + 1
    lengths[used] = depth[: used.size]
    return lengths


def code_lengths(freqs: Sequence[int] | np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length per symbol up to the highest used one (0 = unused, or the only used one), uint8."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_CODE_LENGTH:
        raise PrunelabError(f"max_length must be an integer in [1, {MAX_CODE_LENGTH}] (what decode reads), "
                            f"got {max_length!r}")
    freqs = np.asarray(freqs, dtype=np.int64).reshape(-1)
    if freqs.size and freqs.min() < 0:
        raise PrunelabError(f"symbol frequencies must be >= 0, got a minimum of {freqs.min()}; pass counts")
    if np.count_nonzero(freqs) > 2**max_length:
        raise PrunelabError(f"{np.count_nonzero(freqs)} symbols do not fit codes of at most {max_length} bits")
    used = np.flatnonzero(freqs)
    work = freqs[: int(used[-1]) + 1].copy() if used.size else freqs[:0].copy()
    lengths = _huffman_lengths(work)
    while lengths.size and lengths.max() > max_length:
        work = np.where(work > 0, np.maximum(work // 2, 1), 0)
        lengths = _huffman_lengths(work)
    return lengths.astype(np.uint8)


def canonical_codes(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Canonical code value per symbol (int64; meaningless where the length is 0)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    codes = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size and lengths.max() > MAX_CODE_LENGTH:
        raise PrunelabError(f"Huffman code length {lengths.max()} exceeds {MAX_CODE_LENGTH}; the table is corrupt")
    if lengths.size and np.sum(np.ldexp(1.0, -lengths[lengths > 0])) > 1.0:
        raise PrunelabError("Huffman code lengths violate the Kraft inequality; the table is corrupt")
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        previous = int(lengths[symbol])
        code += 1
    return codes


def encoded_bits(symbols: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the stream takes under ``lengths`` (without padding)."""
    return int(np.asarray(lengths, dtype=np.int64)[np.asarray(symbols, dtype=np.int64)].sum()) if len(symbols) else 0


def encode(symbols: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> bytes:
    """Pack ``symbols`` with the canonical code of ``lengths`` (MSB first, zero-padded to a byte)."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if symbols.size == 0:
        return b""
    if symbols.min() < 0 or symbols.max() >= lengths.size:
        raise PrunelabError(f"symbols must lie in [0, {lengths.size}), got [{symbols.min()}, {symbols.max()}]")
    if not np.any(lengths):  # single-symbol stream: no bits
        if np.any(symbols != lengths.size - 1):
            raise PrunelabError("an all-zero code table encodes only its last symbol; build lengths from these symbols")
        return b""
    codes = canonical_codes(lengths)
    sym_len = lengths[symbols]
    if np.any(sym_len == 0):
        raise PrunelabError("a symbol to encode has no code (length 0); build lengths from these symbols' counts")
    pieces = []
    for start in range(0, symbols.size, 1 << 18):  # bounded temporaries
        s = symbols[start:start + (1 << 18)]
        lens, vals = lengths[s], codes[s]
        total = int(lens.sum())
        starts = np.cumsum(lens) - lens
        offset = np.arange(total, dtype=np.int64) - np.repeat(starts, lens)  # bit index inside its code
        shift = np.repeat(lens, lens) - 1 - offset
        pieces.append(((np.repeat(vals, lens) >> shift) & 1).astype(np.uint8))
    return np.packbits(np.concatenate(pieces)).tobytes()


def decode(data: bytes, lengths: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols (int64) from ``data`` packed by :func:`encode` with the same ``lengths``.

    Raises PrunelabError when the bits run out or hit no code (a corrupt stream).
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if lengths.size == 0:
        raise PrunelabError(f"an empty Huffman table cannot decode {count} symbols; the stream is corrupt")
    if not np.any(lengths):  # single-symbol stream
        return np.full(count, lengths.size - 1, dtype=np.int64)
    codes = canonical_codes(lengths)
    width = int(lengths.max())
    table_sym = np.full(1 << width, -1, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        lo = int(codes[symbol]) << (width - int(lengths[symbol]))
        hi = (int(codes[symbol]) + 1) << (width - int(lengths[symbol]))
        table_sym[lo:hi], table_len[lo:hi] = symbol, lengths[symbol]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.int64)
    total = bits.size
    bits = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    weights = np.left_shift(1, np.arange(width - 1, -1, -1, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    i, pos = 0, 0
    while i < count:
        if pos >= total:
            raise PrunelabError(f"Huffman stream ended after {i} of {count} symbols; the stream is truncated")
        base = pos
        end = min(base + _DECODE_CHUNK, total)
        window = np.zeros(end - base, dtype=np.int64)
        for j in range(width):  # the next `width` bits at every position, as an integer
            window += bits[base + j:end + j] * weights[j]
        syms, lens = table_sym[window].tolist(), table_len[window].tolist()
        while i < count and pos < end:
            length = lens[pos - base]
            if length == 0:
                raise PrunelabError(f"Huffman stream holds no valid code at bit {pos}; the stream is corrupt")
            out[i] = syms[pos - base]
            pos += length
            i += 1
        if pos > total:
            raise PrunelabError(f"Huffman stream ended inside symbol {i}; the stream is truncated")
    return out
