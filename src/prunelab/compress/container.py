"""One-file Deep Compression storage: write a pruned model quantised and Huffman-coded, read it back exactly.

Han, Mao & Dally, "Deep Compression", ICLR 2016: pruning (the masks) + trained
quantisation (:mod:`prunelab.compress.quantize`) + Huffman coding
(:mod:`prunelab.compress.huffman`) of both the cluster ids and the relative sparse
indices (:mod:`prunelab.compress.sparse_index`).

File format, version 1 (all integers little-endian)::

    header   magic b"PRLBCMP\\n" (8) | version u16 | reserved u16 | payload length u64 |
             sha256 of the payload (32)                                   = 52 bytes
    payload  entry count u32, then one entry per state_dict tensor, in state_dict order:

    quantised Linear/Conv/ConvTranspose weight (kind 0; transformers' Conv1D is a Linear, its (in, out) weight as stored)
      u8 kind | u16 name length | name utf-8 | u8 ndim | u32 x ndim shape |
      u8 weight bits (low 5 bits) + dtype << 5 | u8 index bits | u32 K |
      u64 entries (kept + fillers)                                            -- headers
      K x f32 centroids                                                       -- codebook
      u32 A_w | A_w x u8 code lengths (cluster ids 0..K-1, filler = K)       -- Huffman tables
      u32 A_i | A_i x u8 code lengths (gaps 0..2^index_bits-1)
      u64 n | n bytes Huffman-coded cluster ids                                -- weight codes
      u64 n | n bytes Huffman-coded relative gaps                              -- index codes
    any other tensor (kind 1): biases, norms, buffers -- stored raw, NOT quantised
      u8 kind | u16 name length | name | u8 dtype | u8 ndim | u32 x ndim | u64 n | n bytes

Decisions.  Biases (and every non-Linear/Conv/ConvTranspose tensor) are stored raw in their own dtype
(fp32 for the usual model): they are <1% of the weights and the paper does not quantise
them.  Kept = ``mask & (weight != 0)``; pruned weights are not stored and decode to
exactly 0.  A filler decodes to an explicit 0.  A quantised weight decodes in the dtype
it had (3 bits beside the weight bits: 0 float32 -- what files without them read as --,
1 float64, 2 float16, 3 bfloat16); an fp16/bf16 layer's centroids are rounded to its
dtype first (as :func:`~prunelab.compress.quantize.quantize_model` does), so the file
holds exactly what the weight holds.  A state_dict entry that is the SAME tensor as a
quantised weight (a tied weight, an embedding tied to a Linear head) is stored with that
weight's codebook, quantised once under the first layer's name and bits.  Any other
dtype of a Linear/Conv/ConvTranspose weight (complex, float8) is refused.  An ``nn.MultiheadAttention``
input projection (a pruning target, but no Linear/Conv module) is stored raw with its mask
applied: its pruned entries are zeros, as :func:`~prunelab.compress.quantize.quantize_model`
leaves them.
Canonical Huffman tables are stored as code lengths only.  The sha256 covers the whole
payload, so a truncated file, a flipped byte or a foreign file is rejected with a
:class:`PrunelabError` before anything is decoded, and nothing is returned half-read.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunelab.compress import huffman
from prunelab.compress.quantize import (
    DEFAULT_BITS, WEIGHT_DTYPES, Codebook, _check_max_iter, _in_dtype, _layer_weights, quantizable_layers,
    quantize_weight, resolve_bits,
)
from prunelab.compress.sparse_index import relative_decode, relative_encode
from prunelab.errors import PrunelabError
from prunelab.io import atomic_path

__all__ = ["FILE_HEADER_ROW", "FORMAT_VERSION", "MAGIC", "OTHER_ROW", "REPORT_COLUMNS", "CompressionReport",
           "LayerReport", "read_compressed", "write_compressed"]

MAGIC = b"PRLBCMP\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHQ32s")
DEFAULT_INDEX_BITS = {"conv": 8, "fc": 5}
_KIND_QUANTISED, _KIND_RAW = 0, 1
_QUANTISED_DTYPES = WEIGHT_DTYPES  # code = index, << 5
_BITS_MASK, _DTYPE_SHIFT = 0x1F, 5
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
PARTS = ("headers", "codebook", "tables", "weight_codes", "index_codes", "bias")

REPORT_COLUMNS = (
    ("layer", "layer"), ("weights", "#weights"), ("kept_pct", "weights kept %"), ("fillers", "filler zeros"),
    ("weight_bits", "weight bits"), ("weight_bits_huffman", "weight bits (Huffman, per entry)"),
    ("index_bits", "index bits"), ("index_bits_huffman", "index bits (Huffman, per entry)"),
    ("compress_rate_pq_pct", "compress rate P+Q %"), ("compress_rate_pct", "compress rate P+Q+H %"),
    ("size_bytes", "bytes"), ("compression_x", "compression x"),
)
# Rows of CompressionReport.to_rows() that are not layers: their bytes make the "bytes" column add up to the file
FILE_HEADER_ROW, OTHER_ROW = "(file header + entry count)", "(other tensors)"


def _pct(part: int, whole: int) -> float:
    """``100 * part / whole``; 0.0 for an empty whole (a layer without weights or bias)."""
    return 100.0 * part / whole if whole else 0.0


@dataclass(frozen=True)
class LayerReport:
    """Bytes of one quantised layer in the file, by part (the bias is the layer's raw bias tensor)."""

    name: str                  # weight FQN, e.g. "fc1.weight"
    shape: tuple[int, ...]
    kept: int                  # stored nonzeros
    fillers: int               # filler zeros inserted by the relative index
    clusters: int              # codebook entries (<= 2^weight_bits)
    weight_bits: int
    index_bits: int
    bias_params: int
    headers_bytes: int
    codebook_bytes: int
    tables_bytes: int
    weight_codes_bytes: int
    index_codes_bytes: int
    bias_bytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def entries(self) -> int:
        return self.kept + self.fillers

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, f"{part}_bytes") for part in PARTS)

    @property
    def dense_bytes(self) -> int:
        """fp32 weight + bias."""
        return 4 * (self.numel + self.bias_params)

    @property
    def fixed_weight_bits(self) -> int:
        """Bits of a fixed-length weight code: ``weight_bits``, or more when the filler symbol does not fit.

        The weight stream's alphabet is the ``clusters`` ids plus the filler (id K) when
        fillers occur; ``2^bits`` clusters and a filler need ``bits + 1`` bits.
        """
        alphabet = self.clusters + (1 if self.fillers else 0)
        return max(self.weight_bits, (alphabet - 1).bit_length())

    @property
    def fixed_length_bytes(self) -> int:
        """This layer's size with fixed-length codes instead of Huffman (Han's "P+Q")."""
        codes = -(-self.entries * self.fixed_weight_bits // 8) + -(-self.entries * self.index_bits // 8)
        return self.headers_bytes + self.codebook_bytes + codes + self.bias_bytes

    def to_row(self) -> dict[str, Any]:
        """One row of Han et al. 2016, Table 2.

        ``kept`` counts real weights only; ``fillers`` the filler zeros the relative index
        inserted; ``entries = kept + fillers`` is what each stream codes (one weight code and
        one gap per entry).  The Huffman bits are file bits per ENTRY (``8 * stream bytes /
        entries``, the comparison with a fixed ``weight_bits``/``index_bits``-bit code);
        ``weight_bits_fixed`` is the fixed-length weight code the P+Q rate uses (room for the
        filler symbol included).
        """
        entries = max(self.entries, 1)
        return {
            "layer": self.name.removesuffix(".weight"), "weights": self.numel, "kept": self.kept,
            "kept_pct": 100.0 * self.kept / self.numel if self.numel else 0.0, "fillers": self.fillers,
            "entries": self.entries, "clusters": self.clusters, "weight_bits": self.weight_bits,
            "weight_bits_fixed": self.fixed_weight_bits, "index_bits": self.index_bits,
            "weight_bits_huffman": 8.0 * self.weight_codes_bytes / entries,
            "index_bits_huffman": 8.0 * self.index_codes_bytes / entries,
            **{f"{part}_bytes": getattr(self, f"{part}_bytes") for part in PARTS},
            "size_bytes": self.total_bytes, "dense_bytes": self.dense_bytes,
            "compress_rate_pq_pct": _pct(self.fixed_length_bytes, self.dense_bytes),
            "compress_rate_pct": _pct(self.total_bytes, self.dense_bytes),
            "compression_x": self.dense_bytes / self.total_bytes,
        }


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`write_compressed` wrote: bytes per part per layer, totals, ratio to dense fp32.

    ``total_bytes == file_header_bytes + sum(layer.total_bytes) + other_bytes`` is the
    file's size; ``other_bytes`` is every entry that is not a quantised layer or its bias
    (raw tensors, and aliases of a quantised weight such as a tied embedding; entry headers
    included).  ``dense_bytes`` is the state_dict in fp32 (4 bytes per floating-point
    element; other dtypes at their own size), a tensor shared by several names (tied
    weights) counted once; the file stores such a tensor under each name.  "P+Q" sizes use fixed-length codes of
    :attr:`LayerReport.fixed_weight_bits` and ``index_bits`` bits.
    """

    path: str
    layers: tuple[LayerReport, ...]
    file_header_bytes: int
    other_bytes: int
    dense_bytes: int
    other_params: int = 0
    sha256: str = ""

    @property
    def total_bytes(self) -> int:
        return self.file_header_bytes + sum(l.total_bytes for l in self.layers) + self.other_bytes

    @property
    def compression_x(self) -> float:
        return self.dense_bytes / self.total_bytes

    def part_totals(self) -> dict[str, int]:
        totals = {f"{part}_bytes": sum(getattr(l, f"{part}_bytes") for l in self.layers) for part in PARTS}
        return {**totals, "file_header_bytes": self.file_header_bytes, "other_bytes": self.other_bytes,
                "total_bytes": self.total_bytes}

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per quantised layer (Han et al. 2016, Table 2), the rest of the file, and a ``total`` row.

        Between the layers and the total: a ``FILE_HEADER_ROW`` (the 52-byte file header and
        the u32 entry count) and, when the file has any, an ``OTHER_ROW`` (raw tensors and
        aliases of a quantised weight), so the ``size_bytes`` of every row above the total
        add up to the file size exactly.
        """
        rows = [l.to_row() for l in self.layers]
        rows.append({"layer": FILE_HEADER_ROW, "size_bytes": self.file_header_bytes})
        if self.other_bytes:
            rows.append({"layer": OTHER_ROW, "size_bytes": self.other_bytes})
        numel = sum(l.numel for l in self.layers)
        kept = sum(l.kept for l in self.layers)
        entries = max(sum(l.entries for l in self.layers), 1)
        fixed = self.file_header_bytes + self.other_bytes + sum(l.fixed_length_bytes for l in self.layers)
        rows.append({
            "layer": "total", "weights": numel, "kept": kept, "kept_pct": 100.0 * kept / numel if numel else 0.0,
            "fillers": sum(l.fillers for l in self.layers), "entries": sum(l.entries for l in self.layers),
            "weight_bits_huffman": 8.0 * sum(l.weight_codes_bytes for l in self.layers) / entries,
            "index_bits_huffman": 8.0 * sum(l.index_codes_bytes for l in self.layers) / entries,
            **self.part_totals(), "size_bytes": self.total_bytes, "dense_bytes": self.dense_bytes,
            "compress_rate_pq_pct": _pct(fixed, self.dense_bytes),
            "compress_rate_pct": _pct(self.total_bytes, self.dense_bytes), "compression_x": self.compression_x,
        })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "dense_bytes": self.dense_bytes,
                **self.part_totals(), "compression_x": self.compression_x, "layers": self.to_rows()}


# --- writing ----------------------------------------------------------------------------
class _Parts:
    """A byte buffer whose pieces are tagged with the report part they belong to."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.sizes: dict[str, int] = {}

    def add(self, part: str, data: bytes) -> None:
        self.chunks.append(data)
        self.sizes[part] = self.sizes.get(part, 0) + len(data)

    def pack(self, part: str, fmt: str, *values: Any) -> None:
        self.add(part, struct.pack("<" + fmt, *values))


def _name_and_shape(parts: _Parts, part: str, kind: int, name: str, shape: tuple[int, ...], dtype: int | None) -> None:
    encoded = name.encode("utf-8")
    if len(encoded) > 0xFFFF or len(shape) > 0xFF or any(d > 0xFFFFFFFF for d in shape):
        raise PrunelabError(f"tensor {name!r} of shape {shape} does not fit the format (name <= 65535 bytes, "
                            "<= 255 dims of < 2^32); rename or reshape it")
    parts.pack(part, "BH", kind, len(encoded))
    parts.add(part, encoded)
    if dtype is not None:
        parts.pack(part, "B", dtype)
    parts.pack(part, f"B{len(shape)}I", len(shape), *shape)


def _encode_quantised(parts: _Parts, name: str, book: Codebook, index_bits: int,
                      dtype: torch.dtype) -> tuple[int, int]:
    flat = book.assignments.reshape(-1).numpy()
    positions = np.flatnonzero(flat >= 0)
    index = relative_encode(positions, index_bits)
    k = book.centroids.numel()
    symbols = np.full(index.gaps.size, k, dtype=np.int64)          # filler = K
    symbols[index.real] = flat[positions]
    weight_lengths = huffman.code_lengths(np.bincount(symbols, minlength=k + 1))
    index_lengths = huffman.code_lengths(np.bincount(index.gaps, minlength=1 << index_bits))
    _name_and_shape(parts, "headers", _KIND_QUANTISED, name, tuple(book.assignments.shape), None)
    code = _QUANTISED_DTYPES.index(dtype)  # _layer_weights refused any other dtype
    parts.pack("headers", "BBIQ", book.bits | code << _DTYPE_SHIFT, index_bits, k, index.gaps.size)
    parts.add("codebook", book.centroids.to(torch.float32).numpy().astype("<f4").tobytes())
    for lengths in (weight_lengths, index_lengths):
        parts.pack("tables", "I", lengths.size)
        parts.add("tables", lengths.tobytes())
    for part, stream, lengths in (("weight_codes", symbols, weight_lengths), ("index_codes", index.gaps, index_lengths)):
        data = huffman.encode(stream, lengths)
        parts.pack("headers", "Q", len(data))
        parts.add(part, data)
    return positions.size, index.fillers


def _encode_raw(parts: _Parts, part: str, name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise PrunelabError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor (module extra "
                            "state?); the compressed format stores tensors only -- drop it from the model")
    if tensor.dtype not in _DTYPES:
        raise PrunelabError(f"tensor {name!r} has dtype {tensor.dtype}, which the format does not store; "
                            f"supported: {', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}")
    t = tensor.detach().cpu().contiguous().reshape(-1)
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    _name_and_shape(parts, "headers", _KIND_RAW, name, tuple(tensor.shape), _DTYPES.index(tensor.dtype))
    parts.pack("headers", "Q", len(data))
    parts.add(part, data)


def _dense_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())


def _state_dense_bytes(model: nn.Module, state: Mapping[str, Any]) -> int:
    """fp32 bytes of ``state`` with each parameter/buffer counted ONCE (a tied weight is one tensor, as
    ``torch.save`` and :func:`~prunelab.measure.counting.measure_model` count it), not once per name."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    seen: set[int] = set()
    total = 0
    for name, tensor in state.items():
        owner = tensors.get(name)
        if owner is not None:
            if id(owner) in seen:
                continue
            seen.add(id(owner))
        total += _dense_bytes(tensor)
    return total


def write_compressed(
    path: str | os.PathLike,
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    bits: int | Mapping[str, int] | None = None,
    index_bits: int | Mapping[str, int] | None = None,
    max_iter: int = 100,
) -> CompressionReport:
    """Write ``model`` Deep-Compressed into ONE file at ``path`` (atomically); returns its byte report.

    Every Linear/Conv/ConvTranspose weight is weight-shared (``bits``: int or mapping by weight FQN /
    module / ``"conv"`` / ``"fc"``; default 8 conv / 5 fc), its kept entries located by
    relative indices of ``index_bits`` (default 8 conv / 5 fc), and both streams
    Huffman-coded.  A layer that already holds at most ``2^bits`` distinct kept values
    (e.g. after :func:`~prunelab.compress.quantize.quantize_model` and
    :func:`~prunelab.compress.quantize.finetune_centroids`) is stored exactly; any other
    layer is k-means quantised here.  :func:`read_compressed` returns the quantised weights.
    ``masks`` may also name ``nn.MultiheadAttention`` input projections (prunelab prunes
    them): those are stored raw with the mask applied.
    """
    _check_max_iter(max_iter)
    layers = quantizable_layers(model)
    weights, keeps, raw_keeps = _layer_weights(model, masks, layers)
    weight_bits = resolve_bits(bits, layers, DEFAULT_BITS, "bits")
    idx_bits = resolve_bits(index_bits, layers, DEFAULT_INDEX_BITS, "index_bits")
    state = model.state_dict()
    path = Path(path)
    if path.is_dir():
        raise PrunelabError(f"{str(path)!r} is a directory; pass a file path to write, e.g. {str(path / 'model.plc')!r}")
    # one codebook per TENSOR, made under the first layer's name and bits (as quantize_model does);
    # every state_dict entry that is that tensor (tied layers, a tied embedding) is stored with it
    named = dict(model.named_parameters(remove_duplicate=False))
    books: dict[int, Codebook] = {}
    first: dict[int, str] = {}
    for name in layers:
        weight = weights[name]
        if id(weight) not in books:
            book = quantize_weight(weight, keeps[name], weight_bits[name], max_iter, name=name)
            books[id(weight)], first[id(weight)] = _in_dtype(book, weight.dtype), name
    owner = {}  # bias FQN -> weight FQN of its quantised layer
    for weight_name in layers:
        bias_name = weight_name.removesuffix("weight") + "bias"
        if bias_name in state and isinstance(state[bias_name], torch.Tensor):
            owner[bias_name] = weight_name
    body = _Parts()
    body.pack("file", "I", len(state))
    per_layer: dict[str, dict[str, Any]] = {}
    other_bytes = 0
    for name, tensor in state.items():
        parts = _Parts()
        param = named.get(name)
        if name in layers:
            book = books[id(param)]
            kept, fillers = _encode_quantised(parts, name, book, idx_bits[name], param.dtype)
            info = per_layer.setdefault(name, {"bias_params": 0, "sizes": {}})
            info.update(shape=tuple(tensor.shape), kept=kept, fillers=fillers, clusters=book.centroids.numel(),
                        bits=book.bits)
        elif param is not None and id(param) in books:  # e.g. an embedding tied to a Linear head
            _encode_quantised(parts, name, books[id(param)], idx_bits[first[id(param)]], param.dtype)
            other_bytes += sum(parts.sizes.values())
            info = None
        elif name in owner:
            _encode_raw(parts, "bias", name, tensor)
            info = per_layer.setdefault(owner[name], {"bias_params": 0, "sizes": {}})
            info["bias_params"] = tensor.numel()
        else:
            if param is not None and id(param) in raw_keeps:  # a masked attention in-projection
                tensor = tensor.masked_fill(~raw_keeps[id(param)].to(tensor.device), 0)
            _encode_raw(parts, "other", name, tensor)
            other_bytes += sum(parts.sizes.values())
            info = None
        if info is not None:
            for part, size in parts.sizes.items():
                info["sizes"][part] = info["sizes"].get(part, 0) + size
        for chunk in parts.chunks:
            body.add("file", chunk)
    payload = b"".join(body.chunks)
    digest = hashlib.sha256(payload).digest()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), digest)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(header)
                handle.write(payload)
    except OSError as exc:  # disk full, a directory appearing at path meanwhile, ...
        raise PrunelabError(f"cannot write compressed model {str(path)!r} ({exc.strerror or exc}); "
                            "check the disk space and permissions of its folder") from None
    reports = tuple(
        LayerReport(name=name, shape=per_layer[name]["shape"], kept=per_layer[name]["kept"],
                    fillers=per_layer[name]["fillers"], clusters=per_layer[name]["clusters"],
                    weight_bits=per_layer[name]["bits"], index_bits=idx_bits[name],
                    bias_params=per_layer[name]["bias_params"],
                    **{f"{part}_bytes": per_layer[name]["sizes"].get(part, 0) for part in PARTS})
        for name in layers if name in per_layer
    )
    quantised_or_bias = set(layers) | set(owner)
    return CompressionReport(
        path=str(path), layers=reports, file_header_bytes=_HEADER.size + 4, other_bytes=other_bytes,
        dense_bytes=_state_dense_bytes(model, state),
        other_params=sum(t.numel() for n, t in state.items() if n not in quantised_or_bias),
        sha256=digest.hex(),
    )


# --- reading ----------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PrunelabError(f"entry needs {n} bytes at offset {self.pos}, only {len(self.data) - self.pos} left")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def name_and_shape(self, with_dtype: bool) -> tuple[str, int | None, tuple[int, ...]]:
        (length,) = self.unpack("H")
        name = self.take(length).decode("utf-8")
        dtype = self.unpack("B")[0] if with_dtype else None
        (ndim,) = self.unpack("B")
        return name, dtype, tuple(self.unpack(f"{ndim}I"))


def _decode_quantised(reader: _Reader) -> tuple[str, torch.Tensor]:
    name, _, shape = reader.name_and_shape(with_dtype=False)
    bits_and_dtype, index_bits, k, entries = reader.unpack("BBIQ")
    if bits_and_dtype >> _DTYPE_SHIFT >= len(_QUANTISED_DTYPES) or not 1 <= bits_and_dtype & _BITS_MASK <= 16:
        raise PrunelabError(f"layer {name!r} has an invalid weight-bits/dtype byte {bits_and_dtype}")
    dtype = _QUANTISED_DTYPES[bits_and_dtype >> _DTYPE_SHIFT]
    centroids = np.frombuffer(reader.take(4 * k), dtype="<f4").astype(np.float32)
    tables = [np.frombuffer(reader.take(reader.unpack("I")[0]), dtype=np.uint8) for _ in range(2)]
    streams = [reader.take(reader.unpack("Q")[0]) for _ in range(2)]
    numel = int(np.prod(shape)) if shape else 1
    if entries > numel or not 1 <= index_bits <= 16:
        raise PrunelabError(f"layer {name!r} claims {entries} entries for {numel} weights")
    symbols = huffman.decode(streams[0], tables[0], entries)
    gaps = huffman.decode(streams[1], tables[1], entries)
    if entries and (symbols.max() > k or gaps.max() >= 1 << index_bits):
        raise PrunelabError(f"layer {name!r} holds a cluster id or gap outside its codebook or index width")
    positions = relative_decode(gaps, numel)
    values = np.concatenate([centroids, np.zeros(1, dtype=np.float32)])  # id K = filler zero
    weight = np.zeros(numel, dtype=np.float32)
    weight[positions] = values[symbols]
    return name, torch.from_numpy(weight).reshape(shape).to(dtype)


def _decode_raw(reader: _Reader) -> tuple[str, torch.Tensor]:
    name, dtype_code, shape = reader.name_and_shape(with_dtype=True)
    if dtype_code >= len(_DTYPES):
        raise PrunelabError(f"tensor {name!r} has unknown dtype code {dtype_code}")
    dtype = _DTYPES[dtype_code]
    data = reader.take(reader.unpack("Q")[0])
    numel = int(np.prod(shape)) if shape else 1
    if len(data) != numel * torch.empty(0, dtype=dtype).element_size():
        raise PrunelabError(f"tensor {name!r} has {len(data)} bytes for {numel} elements of {dtype}")
    if numel == 0:
        return name, torch.empty(shape, dtype=dtype)
    return name, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def read_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict stored by :func:`write_compressed`: quantised weights (in their dtype) and raw tensors.

    Raises PrunelabError, and returns nothing, for a missing, foreign, truncated or
    corrupt file (bad magic, length or sha256 mismatch, undecodable stream).
    """
    path = Path(path)
    if path.is_dir():
        raise PrunelabError(f"compressed model {str(path)!r} is a directory; pass the file write_compressed wrote "
                            "inside it")
    if not path.is_file():
        raise PrunelabError(f"compressed model {str(path)!r} does not exist; pass the file write_compressed wrote")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PrunelabError(f"cannot read compressed model {str(path)!r} ({exc.strerror or exc}); check its "
                            "permissions") from None

    def corrupt(reason: str) -> PrunelabError:
        return PrunelabError(f"{str(path)!r} is corrupt or truncated ({reason}); re-create it with prunelab compress")

    if len(data) < _HEADER.size:
        raise corrupt(f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, _reserved, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise corrupt(f"bad magic {magic!r}, expected {MAGIC!r}: not a prunelab compressed model")
    if version != FORMAT_VERSION:
        raise PrunelabError(f"{str(path)!r} uses compressed format version {version}; this prunelab reads "
                            f"version {FORMAT_VERSION} -- install the prunelab version that wrote it")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise corrupt(f"payload is {len(payload)} bytes, the header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise corrupt("sha256 checksum mismatch")
    try:
        reader = _Reader(payload)
        (count,) = reader.unpack("I")
        state: dict[str, torch.Tensor] = {}
        for _ in range(count):
            (kind,) = reader.unpack("B")
            if kind == _KIND_QUANTISED:
                name, tensor = _decode_quantised(reader)
            elif kind == _KIND_RAW:
                name, tensor = _decode_raw(reader)
            else:
                raise PrunelabError(f"unknown entry kind {kind} at offset {reader.pos - 1}")
            state[name] = tensor
        if reader.pos != len(payload):
            raise PrunelabError(f"{len(payload) - reader.pos} unread bytes after the last entry")
    except (PrunelabError, struct.error, UnicodeDecodeError, ValueError, IndexError, RuntimeError) as exc:
        raise corrupt(str(exc).split(";")[0]) from None
    except MemoryError as exc:  # a shape field claiming a tensor larger than this machine's memory
        raise PrunelabError(f"{str(path)!r} holds a tensor too large to decode here ({exc}); the file is corrupt "
                            "or needs a machine with more memory") from None
    return state
