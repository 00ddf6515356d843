"""Review of the vectorised Huffman decoder and encoder (prunelab.compress.huffman).

The decoder is checked against an independent one-code-at-a-time reference written here
(textbook canonical codes, bit strings, a dict lookup), with the exact same symbols and
the exact same error message on corrupt or truncated input; bytes written by the
previous (table + Python loop) implementation are kept as fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest

from prunelab.compress import huffman
from prunelab.compress.huffman import canonical_codes, code_lengths
from prunelab.errors import PrunelabError


# --- independent references ---------------------------------------------------------------------
def _textbook_codes(lengths: list[int]) -> dict[int, str]:
    """RFC 1951 Sec. 3.2.2: symbols by (length, symbol), code += 1, code <<= length step."""
    codes, code, previous = {}, 0, 0
    for symbol in sorted((s for s, n in enumerate(lengths) if n > 0), key=lambda s: (lengths[s], s)):
        code <<= lengths[symbol] - previous
        codes[symbol] = format(code, f"0{lengths[symbol]}b")
        previous = lengths[symbol]
        code += 1
    return codes


def _reference_encode(symbols, lengths) -> bytes:
    codes = _textbook_codes([int(n) for n in lengths])
    bits = "".join(codes[int(s)] for s in symbols)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def _reference_decode(data: bytes, lengths, count: int) -> list[int]:
    """One code after the other; the error messages a one-by-one decoder gives."""
    lengths = [int(n) for n in lengths]
    by_code = {code: symbol for symbol, code in _textbook_codes(lengths).items()}
    bits = "".join(format(b, "08b") for b in data)
    total, padded = len(bits), bits + "0" * 20
    out, pos = [], 0
    while len(out) < count:
        if pos >= total:
            raise PrunelabError(f"Huffman stream ended after {len(out)} of {count} symbols; the stream is truncated")
        for n in range(1, max(lengths) + 1):
            if padded[pos:pos + n] in by_code:
                out.append(by_code[padded[pos:pos + n]])
                pos += n
                break
        else:
            raise PrunelabError(f"Huffman stream holds no valid code at bit {pos}; the stream is corrupt")
        if pos > total:
            raise PrunelabError(f"Huffman stream ended inside symbol {len(out)}; the stream is truncated")
    return out


def _outcome(decoder, data, lengths, count):
    try:
        return "ok", [int(s) for s in decoder(data, lengths, count)]
    except PrunelabError as exc:
        return "error", str(exc)


# --- fixtures from the previous implementation --------------------------------------------------
def test_hand_computed_stream_decodes():
    lengths = [3, 3, 2, 1]          # code_lengths([1, 1, 2, 4]); canonical 3 -> 0, 2 -> 10, 0 -> 110, 1 -> 111
    # 3 3 2 0 1 3 2 -> 0 0 10 110 111 0 10 -> 00101101 11010(000) -> 0x2D 0xD0
    assert huffman.encode([3, 3, 2, 0, 1, 3, 2], lengths) == bytes([0x2D, 0xD0])
    assert huffman.decode(bytes([0x2D, 0xD0]), lengths, 7).tolist() == [3, 3, 2, 0, 1, 3, 2]
    # the 3 padding bits are zeros, i.e. code 0 (symbol 3): a count past the real symbols reads them
    assert huffman.decode(bytes([0x2D, 0xD0]), lengths, 9).tolist() == [3, 3, 2, 0, 1, 3, 2, 3, 3]


def test_bytes_written_by_the_previous_encoder_decode_identically():
    # written by the table + Python-loop implementation (a geometric stream, symbol 6 unused)
    lengths = [1, 3, 3, 4, 5, 4, 0, 5, 5, 5]
    symbols = [2, 0, 0, 3, 9, 0, 0, 0, 1, 0, 2, 2, 0, 1, 0, 1, 8, 3, 2, 0, 0, 1, 0, 4, 0, 0, 3, 0, 0, 0, 1, 0,
               5, 0, 3, 1, 1, 7, 5, 0, 0, 0, 5, 1, 1, 4, 0, 2]
    data = bytes.fromhex("a67c45a89eca470c11ac93ba364e28")
    assert code_lengths(np.bincount(symbols, minlength=10)).tolist() == lengths
    assert canonical_codes(lengths).tolist() == [0, 4, 5, 12, 28, 13, 0, 29, 30, 31]
    assert huffman.decode(data, np.array(lengths, dtype=np.uint8), len(symbols)).tolist() == symbols
    assert huffman.encode(symbols, lengths) == data == _reference_encode(symbols, lengths)


# --- round trips on degenerate and skewed streams -----------------------------------------------
def _streams():
    rng = np.random.default_rng(7)
    geo = np.minimum(rng.geometric(0.25, size=200_000) - 1, 31)
    yield "geometric 32", geo, code_lengths(np.bincount(geo))
    yield "single symbol", np.full(1000, 4), code_lengths(np.bincount([4]))
    two = (rng.random(50_000) < 0.1).astype(np.int64)
    yield "two symbols", two, code_lengths(np.bincount(two))
    yield "256 equal", rng.integers(0, 256, size=50_000), code_lengths(np.ones(256, dtype=np.int64))
    longest = np.array(list(range(1, 21)) + [20])                      # complete, codes up to 20 bits
    yield "20-bit codes", rng.integers(0, 21, size=20_000), longest
    yield "lengths with gcd 2", rng.integers(0, 7, size=20_000), np.array([2, 2, 2, 4, 4, 4, 4])
    yield "one 1-bit code used", np.zeros(5000, dtype=np.int64), np.array([1, 1])


@pytest.mark.parametrize("name,symbols,lengths", list(_streams()), ids=lambda v: v if isinstance(v, str) else "")
def test_round_trip_is_exact(name, symbols, lengths):
    data = huffman.encode(symbols, lengths)
    assert len(data) == -(-huffman.encoded_bits(symbols, lengths) // 8)
    assert np.array_equal(huffman.decode(data, lengths, symbols.size), symbols)
    if not np.any(lengths):                                            # one symbol: no bits at all
        assert data == b""
        return
    head = symbols[:300]                                               # small enough for the references
    assert huffman.encode(head, lengths) == _reference_encode(head, lengths)
    assert huffman.decode(huffman.encode(head, lengths), lengths, head.size).tolist() == head.tolist()


def test_decoding_uses_numpy_steps_not_one_python_step_per_symbol(monkeypatch):
    # structural check of the vectorisation (speed itself is for benchmarks, not tests):
    # the table is read once per lock step, and there are about sqrt(bits) steps
    rng = np.random.default_rng(3)
    symbols = np.minimum(rng.geometric(0.25, size=100_000) - 1, 31)
    lengths = code_lengths(np.bincount(symbols))
    data = huffman.encode(symbols, lengths)
    calls = []
    peek = huffman._peek
    monkeypatch.setattr(huffman, "_peek", lambda *args: calls.append(1) or peek(*args))
    assert np.array_equal(huffman.decode(data, lengths, symbols.size), symbols)
    assert len(calls) < 2000                                           # the one-by-one loop would be 100000


# --- against the one-by-one reference, corrupt input included -----------------------------------
def _random_case(rng):
    kind = int(rng.integers(4))
    if kind == 0:                                       # a Huffman table, possibly capped
        freqs = rng.integers(0, 30, size=int(rng.integers(2, 30))) ** int(rng.integers(1, 4))
        freqs[int(rng.integers(freqs.size))] += 1
        lengths = code_lengths(freqs, max_length=int(rng.integers(5, 21)))
    elif kind == 1:                                     # equal lengths times a factor: gcd > 1
        lengths = code_lengths(np.ones(1 << int(rng.integers(1, 4)), dtype=np.int64)) * int(rng.integers(1, 4))
    elif kind == 2:                                     # an incomplete table: some bit patterns start no code
        size = int(rng.integers(2, 20))
        lengths = rng.integers(1, 8, size=size) * (rng.random(size) < 0.8)   # some unused symbols
        lengths[0] = max(int(lengths[0]), 1)
        while np.sum(np.ldexp(1.0, -lengths[lengths > 0])) >= 1.0:      # Kraft sum strictly below 1
            used = np.flatnonzero(lengths)
            lengths[used[int(rng.integers(used.size))]] += 1
    else:                                               # the longest codes
        top = int(rng.integers(2, 21))
        lengths = np.array(list(range(1, top)) + [top - 1])
    lengths = np.asarray(lengths, dtype=np.int64)
    count = int(rng.integers(0, 1500))
    if rng.random() < 0.5:                              # a real stream, then damaged
        data = huffman.encode(rng.choice(np.flatnonzero(lengths), size=count), lengths) if count else b""
        damage = rng.random()
        if damage < 0.25 and data:
            data = data[: int(rng.integers(len(data)))]                    # truncated
        elif damage < 0.4 and data:
            flipped = bytearray(data)
            flipped[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            data = bytes(flipped)                                          # a flipped bit
        elif damage < 0.5:
            data += bytes(rng.integers(0, 256, size=3).astype(np.uint8))   # trailing bytes
        count = max(count + int(rng.integers(-2, 3)) * (damage > 0.8), 0)
    else:                                               # random bytes
        data = bytes(rng.integers(0, 256, size=int(rng.integers(0, 300))).astype(np.uint8))
    return data, lengths, count


@pytest.mark.parametrize("block_scale", [None, 0.0])  # default blocks, and the smallest (one code long)
def test_matches_the_one_by_one_reference_including_errors(monkeypatch, block_scale):
    if block_scale is not None:
        monkeypatch.setattr(huffman, "_BLOCK_SCALE", block_scale)
    rng = np.random.default_rng(11 if block_scale is None else 12)
    seen = set()
    for _ in range(150):
        data, lengths, count = _random_case(rng)
        expected = _outcome(_reference_decode, data, lengths, count)
        assert _outcome(huffman.decode, data, lengths, count) == expected, (lengths.tolist(), count, data.hex())
        kind, detail = expected
        seen.add(kind if kind == "ok" else next(k for k in ("no valid code", "ended after", "ended inside")
                                                if k in detail))
    assert seen == {"ok", "no valid code", "ended after", "ended inside"}   # every outcome was exercised


@pytest.mark.parametrize("data,lengths,count,message", [
    (bytes([0b00000011]), [3, 3, 2, 1], 8, "ended inside symbol 7"),            # 6 x '0', then '11' + padding
    (bytes([0b11000000]), [1, 2], 1, "no valid code at bit 0"),                 # codes 0, 10: '11' is none
    (bytes([0b01100000]), [1, 2], 3, "no valid code at bit 1"),
    (bytes([0x2D, 0xD0]), [3, 3, 2, 1], 17, "ended after 10 of 17 symbols"),    # 7 codes + 3 zero pads
    (b"", [3, 3, 2, 1], 1, "ended after 0 of 1 symbols"),
])
def test_corrupt_and_truncated_streams_give_the_one_line_error(data, lengths, count, message):
    with pytest.raises(PrunelabError, match=message) as info:
        huffman.decode(data, lengths, count)
    assert "\n" not in str(info.value)
    assert str(info.value) == _outcome(_reference_decode, data, lengths, count)[1]


def test_a_bad_code_after_the_last_symbol_is_not_read():
    assert huffman.decode(bytes([0b01100000]), [1, 2], 1).tolist() == [0]   # '11' at bit 1 is past symbol 1
    assert huffman.decode(bytearray([0x2D, 0xD0]), [3, 3, 2, 1], 2).tolist() == [3, 3]  # any bytes-like


# --- the fixes ------------------------------------------------------------------------------------
def test_negative_code_lengths_are_a_prunelab_error():
    # used to escape as a bare ValueError("negative shift count") from the canonical-code loop
    for call in (lambda: canonical_codes([-1, 1, 1]), lambda: huffman.decode(b"\x00", [-1, 1, 1], 1),
                 lambda: huffman.encode([1], [-1, 1, 1])):
        with pytest.raises(PrunelabError, match="must be >= 0"):
            call()


@pytest.mark.parametrize("count", [-1, 2.0, True])
def test_a_bad_count_is_a_prunelab_error(count):
    # -1 used to escape as numpy's "negative dimensions are not allowed", 2.0 as a TypeError
    with pytest.raises(PrunelabError, match="count must be an integer >= 0"):
        huffman.decode(b"\x40", [1, 1], count)


def test_vectorised_canonical_codes_match_the_textbook_loop():
    rng = np.random.default_rng(5)
    for _ in range(200):
        lengths = rng.integers(0, 12, size=int(rng.integers(1, 40)))
        while np.sum(np.ldexp(1.0, -lengths[lengths > 0])) > 1.0:
            lengths[int(rng.integers(lengths.size))] += 1
        expected = _textbook_codes(lengths.tolist())
        codes = canonical_codes(lengths)
        assert {s: format(int(codes[s]), f"0{lengths[s]}b") for s in expected} == expected


def test_encoder_and_decoder_match_the_reference_across_their_chunks(monkeypatch):
    monkeypatch.setattr(huffman, "_CHUNK", 7)                          # chunk edges inside bytes
    rng = np.random.default_rng(9)
    for top in (2, 9, 20):
        lengths = np.array(list(range(1, top)) + [top - 1])
        symbols = rng.integers(0, lengths.size, size=int(rng.integers(1, 400)))
        data = huffman.encode(symbols, lengths)
        assert data == _reference_encode(symbols, lengths)
        assert huffman.decode(data, lengths, symbols.size).tolist() == symbols.tolist()
