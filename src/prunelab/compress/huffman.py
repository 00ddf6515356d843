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

Encoding places each code inside the 32-bit word at its first byte and ORs the words
(:func:`encode`).  Decoding is exact speculative block-parallel decoding in numpy lock
step (:func:`decode`): one table lookup on the next ``L_max`` bits per code, for every
block of the stream at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from prunelab.errors import PrunelabError

__all__ = ["MAX_CODE_LENGTH", "canonical_codes", "code_lengths", "decode", "encode", "encoded_bits"]

MAX_CODE_LENGTH = 20
_WORD_BYTES = 4            # a code (<= 20 bits) at any bit offset (<= 7) lies in the 32 bits from its byte
_CHUNK = 1 << 16           # elements per cache-sized pass (bounds temporaries)
_BLOCK_SCALE = 1           # decode blocks of about sqrt(units) units: lock steps vs speculative walkers
_PAST_END, _NO_CODE_HERE = -2, -3   # how a walk ended other than by meeting a walker
_NEVER = np.iinfo(np.int64).max


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
    """Canonical code value per symbol (int64; meaningless where the length is 0).

    Symbols sorted by ``(length, symbol)`` take consecutive codes, shifted left when the
    length grows (RFC 1951 Sec. 3.2.2).  Equivalently, with ``W`` the longest length, the
    k-th symbol in that order owns the ``W``-bit interval that starts at
    ``start_k = sum_{j<k} 2^(W - l_j)`` and its code is ``start_k >> (W - l_k)``: the
    intervals tile ``[0, 2^W)`` from 0 in order, which is what the decoding table uses.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    codes = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise PrunelabError(f"Huffman code lengths must be >= 0, got {lengths.min()}; the table is corrupt")
    if lengths.size and lengths.max() > MAX_CODE_LENGTH:
        raise PrunelabError(f"Huffman code length {lengths.max()} exceeds {MAX_CODE_LENGTH}; the table is corrupt")
    if lengths.size and np.sum(np.ldexp(1.0, -lengths[lengths > 0])) > 1.0:
        raise PrunelabError("Huffman code lengths violate the Kraft inequality; the table is corrupt")
    order, spans = _canonical_order(lengths)
    if order.size:
        width = int(lengths[order[-1]])
        codes[order] = (np.cumsum(spans) - spans) >> (width - lengths[order])
    return codes


def _canonical_order(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Used symbols in ``(length, symbol)`` order, and the ``2^(W - l)`` patterns of ``W = max l`` bits each owns."""
    used = np.flatnonzero(lengths)
    order = used[np.argsort(lengths[used], kind="stable")]  # flatnonzero is ascending: ties stay by symbol
    width = int(lengths.max()) if used.size else 0
    return order, np.left_shift(1, width - lengths[order])


def encoded_bits(symbols: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the stream takes under ``lengths`` (without padding)."""
    return int(np.asarray(lengths, dtype=np.int64)[np.asarray(symbols, dtype=np.int64)].sum()) if len(symbols) else 0


def encode(symbols: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> bytes:
    """Pack ``symbols`` with the canonical code of ``lengths`` (MSB first, zero-padded to a byte).

    Vectorised per symbol: a code of ``l <= 20`` bits starting at bit ``s`` lies inside the
    32 bits from byte ``s >> 3``, as ``code << (32 - l - (s & 7))``.  Codes never share a
    bit, so adding these words per byte (``np.bincount``) is OR-ing them; each byte of the
    result is then the sum of the matching bytes of the words from up to 4 bytes before it.
    """
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
    total = 0                                                    # bits of all codes
    for first in range(0, symbols.size, _CHUNK):                 # cache-sized passes
        sym_len = lengths[symbols[first:first + _CHUNK]]
        if not sym_len.all():
            raise PrunelabError("a symbol to encode has no code (length 0); build lengths from these symbols' counts")
        total += int(sym_len.sum())
    return _word_bytes(_code_words(symbols, lengths, codes, total), (total + 7) // 8).tobytes()


def _code_words(symbols: np.ndarray, lengths: np.ndarray, codes: np.ndarray, total: int) -> np.ndarray:
    """Per byte ``j``, at ``words[3 + j]``: the OR of the codes that start in it, as one 32-bit word."""
    words = np.zeros(_WORD_BYTES - 1 + (total + 7) // 8 + _WORD_BYTES, dtype=np.int64)  # (3 + bytes + 4,)
    end = 0                                                      # bit after the codes so far
    for first in range(0, symbols.size, _CHUNK):
        part = symbols[first:first + _CHUNK]
        sym_len = lengths[part]                                  # (chunk,)
        start = np.cumsum(sym_len) - sym_len + end               # (chunk,) first bit of each code
        end = int(start[-1] + sym_len[-1])
        byte = start >> 3
        value = codes[part] << (8 * _WORD_BYTES - sym_len - (start & 7))
        summed = np.bincount(byte - byte[0], weights=value)      # exact: each sum < 2^32
        words[_WORD_BYTES - 1 + byte[0]:][:summed.size] += summed.astype(np.int64)
    return words


def _word_bytes(words: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` bytes of the OR of big-endian 32-bit words, ``words[3 + j]`` placed at byte ``j``.

    Their bits are disjoint, so byte ``m`` is the sum of byte ``k`` of the word at ``m - k``.
    """
    lead = _WORD_BYTES - 1
    out = np.empty(size, dtype=np.uint8)                          # (size,)
    for first in range(0, size, _CHUNK):
        last = min(first + _CHUNK, size)
        piece = words[first + lead:last + lead] >> 24             # (chunk,) word at m: its byte 0
        for k in range(1, _WORD_BYTES):
            piece += (words[first + lead - k:last + lead - k] >> (24 - 8 * k)) & 0xFF
        out[first:last] = piece
    return out


def _bit_windows(data: bytes) -> np.ndarray:
    """The 32 bits starting at every byte of ``data`` (zero past its end), int64, MSB first."""
    padded = data + bytes(2 * _WORD_BYTES)
    words = np.empty(len(data), dtype=np.int64)                  # (bytes,)
    for k in range(_WORD_BYTES):                                 # bytes k, k + 4, ..: aligned big-endian reads
        words[k::_WORD_BYTES] = np.frombuffer(padded, dtype=">u4", offset=k, count=len(range(k, len(data), 4)))
    return words


def _peek(words: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """The next ``width`` (<= 20) bits at each bit position, as integers (bit 7 + 20 < 32 of the word)."""
    return (words[pos >> 3] >> (8 * _WORD_BYTES - width - (pos & 7))) & ((1 << width) - 1)


def _decode_table(lengths: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Symbol and code length in units of ``unit`` bits, for each of the ``2^W`` patterns of ``W = max length`` bits.

    The canonical intervals tile ``[0, 2^W)`` from 0 (see :func:`canonical_codes`).  A
    pattern past them starts no code (only when the Kraft sum is < 1): symbol -1, length 0.
    """
    order, spans = _canonical_order(lengths)
    width = int(lengths[order[-1]])
    covered = int(spans.sum())                                   # <= 2^W by Kraft
    table_sym = np.full(1 << width, -1, dtype=np.int32 if lengths.size < 2**31 else np.int64)  # (2^W,)
    table_len = np.zeros(1 << width, dtype=np.uint8)
    table_sym[:covered] = np.repeat(order, spans)
    table_len[:covered] = np.repeat(lengths[order] // unit, spans)
    return table_sym, table_len, width


def _walker_starts(units: int, width: int) -> np.ndarray:
    """First unit of every walker: 0, then each possible entry ``b * block + r`` (``0 <= r < W``) of blocks 1.. .

    The real decoding enters a block less than one code (``W`` units) after its first
    unit.  Blocks are about ``sqrt(_BLOCK_SCALE * units)`` long: fewer lock steps against
    more speculative walkers (which mostly stop after a step or two).
    """
    block = max(width, int(np.sqrt(_BLOCK_SCALE * units)))
    firsts = np.arange(block, units - width + 1, block, dtype=np.int64)    # (blocks - 1,)
    offsets = np.arange(width, dtype=np.int64)                              # (W,)
    return np.concatenate([[0], (firsts[:, None] + offsets[None, :]).reshape(-1)])


def _walk(words: np.ndarray, table_len: np.ndarray, width: int, unit: int, starts: np.ndarray,
          owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode from every start at once, one code per numpy lock step, each walker until it meets another.

    Positions are in units of ``unit`` bits; ``starts`` come ``width // unit`` per block
    after walker 0.  ``owner[q]`` is the walker that decoded a code starting at unit ``q``
    (-1: none yet); past the data it is a phantom walker ``starts.size``.  A walker that
    lands where another walker already was, or lands there in the same step and is not
    the one ``owner`` names, stops: both decode the same codes from there on.  A walker
    reaching the next block lands on one of its walkers' starts; one that reads no code
    (length 0) lands on itself.  So every unit is decoded at most once.  Returns per
    walker ``stop`` (the unit it landed on) and ``met`` (the walker met, ``_PAST_END`` or
    ``_NO_CODE_HERE``).
    """
    stop = np.empty(starts.size, dtype=np.int64)                 # (walkers,)
    met = np.empty(starts.size, dtype=np.int64)
    wid = np.arange(starts.size, dtype=np.int32)                 # (active,) ascending: by block
    block_of = (wid + (width // unit - 1)) // (width // unit)    # (walkers,) 0, then 1, 1, .., 2, 2, ..
    pos = starts
    owner[pos] = wid
    shared = True                                                # may two active walkers share a block?
    while wid.size:
        bits = pos if unit == 1 else pos * unit
        new = pos + table_len[_peek(words, bits, width)]         # (active,) next code's first unit
        held = owner[new]
        if held.max() >= 0:                                      # someone stops this step
            done = held >= 0
            stop[wid[done]], met[wid[done]] = new[done], held[done]
            wid, new = wid[~done], new[~done]
            shared = shared and bool(np.any(np.diff(block_of[wid]) == 0))
        owner[new] = wid
        if shared:                                               # only walkers of one block can land together
            named = owner[new] == wid
            if not named.all():
                stop[wid[~named]], met[wid[~named]] = new[~named], owner[new[~named]]
                wid, new = wid[named], new[named]
        pos = new
    met[met == np.arange(starts.size)] = _NO_CODE_HERE           # landed on itself
    met[met == starts.size] = _PAST_END
    return stop, met


def _real_chain(stop: np.ndarray, met: np.ndarray) -> tuple[list[int], list[int]]:
    """The walkers the real decoding runs through from unit 0, and the unit it joins each one at."""
    stop_list, met_list = stop.tolist(), met.tolist()
    walkers, since = [0], [0]
    while met_list[walkers[-1]] >= 0:
        since.append(stop_list[walkers[-1]])
        walkers.append(met_list[walkers[-1]])
    return walkers, since


def _real_positions(owner: np.ndarray, walkers: list[int], since: list[int], units: int,
                    n_walkers: int) -> np.ndarray:
    """Sorted first units of the real codes: each chain walker's units from the one it was joined at."""
    joined_at = np.full(n_walkers, _NEVER, dtype=np.int64)       # (walkers,)
    joined_at[walkers] = since
    real = []
    for first in range(0, units, _CHUNK):                        # cache-sized passes
        part = owner[first:min(first + _CHUNK, units)]
        held = np.flatnonzero(part >= 0)                         # (visited units,)
        real.append(held[held + first >= joined_at[part[held]]] + first)
    return np.concatenate(real)


def decode(data: bytes, lengths: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols (int64) from ``data`` packed by :func:`encode` with the same ``lengths``.

    Raises PrunelabError when the bits run out or hit no code (a corrupt stream).

    Speculative block-parallel decoding (in the spirit of Klein & Wiseman, "Parallel
    Huffman decoding with applications to JPEG files", Comput. J. 46(5), 2003), made
    exact: the bits are cut into blocks and a walker starts at every bit where the real
    decoding may enter each block (:func:`_walker_starts`); all walkers decode together,
    one code per numpy step, and stop where they meet (:func:`_walk`).  Following the
    meetings from bit 0 gives the real codes.  Positions are counted in units of
    ``g = gcd(code lengths)`` bits, where every code starts.

    Why it is exact: decoding from a given bit is deterministic, so two walkers that
    stand on the same unit decode the same codes from there on; the real decoding starts
    as walker 0 and enters every later block at one of that block's starts.  So the
    real codes are walker 0's, then, from each meeting on, those of the walker met --
    the same symbols and the same errors as decoding one code after the other, for any
    table (incomplete ones included).  Work: about one table lookup per code plus a few
    per block; ``O(sqrt(bits))`` numpy steps.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise PrunelabError(f"count must be an integer >= 0 (the number of symbols to decode), got {count!r}")
    count = int(count)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if lengths.size == 0:
        raise PrunelabError(f"an empty Huffman table cannot decode {count} symbols; the stream is corrupt")
    if not np.any(lengths):  # single-symbol stream
        return np.full(count, lengths.size - 1, dtype=np.int64)
    canonical_codes(lengths)  # validates the table (length cap, Kraft inequality)
    unit = int(np.gcd.reduce(lengths[lengths > 0]))
    table_sym, table_len, width = _decode_table(lengths, unit)
    data = bytes(memoryview(data).cast("B")[: -(-count * width // 8)])  # count codes fit in count * W bits
    total = 8 * len(data)
    if total == 0:
        raise PrunelabError(f"Huffman stream ended after 0 of {count} symbols; the stream is truncated")
    words = _bit_windows(data)
    units = -(-total // unit)                                    # units that start inside the data
    starts = _walker_starts(units, width // unit)
    owner = np.full(units + width // unit, -1, dtype=np.int32)   # (units + W / g,)
    owner[units:] = starts.size
    stop, met = _walk(words, table_len, width, unit, starts, owner)
    walkers, since = _real_chain(stop, met)
    positions = _real_positions(owner, walkers, since, units, starts.size)  # (found,) in units
    _check_end(positions.size, int(met[walkers[-1]]), int(stop[walkers[-1]]) * unit, count, total)
    out = np.empty(count, dtype=np.int64)
    for first in range(0, count, _CHUNK):
        part = positions[first:min(first + _CHUNK, count)]
        out[first:first + part.size] = table_sym[_peek(words, part * unit, width)]
    return out


def _check_end(found: int, how: int, bit: int, count: int, total: int) -> None:
    """The errors of a one-by-one decoder, from how the real decoding ended after ``found`` codes: no code at
    ``bit``, or past the data at ``bit`` (inside the last code where ``bit > total``)."""
    if how == _NO_CODE_HERE:
        if found <= count:                                       # the no-code bit is counted in found
            raise PrunelabError(f"Huffman stream holds no valid code at bit {bit}; the stream is corrupt")
        return
    if bit > total and found <= count:
        raise PrunelabError(f"Huffman stream ended inside symbol {found}; the stream is truncated")
    if found < count:
        raise PrunelabError(f"Huffman stream ended after {found} of {count} symbols; the stream is truncated")
