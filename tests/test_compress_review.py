"""Deep Compression storage checked against Han, Mao & Dally (ICLR 2016) on hand-computed cases.

k-means weight sharing (Sec. 3.1-3.2), centroid fine-tuning (Sec. 3.3), relative sparse
indices with filler zeros (Sec. 2, Fig. 2), canonical Huffman codes (Sec. 4) and the
one-file container, byte by byte.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import struct

import numpy as np
import pytest
import torch
from torch import nn

from prunelab.compress import (
    CentroidSGD, Codebook, canonical_codes, code_lengths, kmeans_1d, quantize_model, quantize_weight,
    read_compressed, relative_decode, relative_encode, write_compressed,
)
from prunelab.compress import huffman
from prunelab.compress.container import MAGIC, PARTS
from prunelab.errors import PrunelabError


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit pattern (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise(expected: dict, state: dict) -> None:
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape, name
        assert torch.equal(_bits(state[name]), _bits(tensor)), name


def _one_line(exc_info, *words: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


# --- k-means weight sharing ------------------------------------------------------------------------
def test_kmeans_matches_a_hand_run_lloyd_iteration():
    x = torch.tensor([0.0, 4.0, 5.0, 6.0, 10.0, 11.0, 12.0, 20.0])
    # linear init for k=3 on [0, 20]: 0, 10, 20 (midpoints 5, 15; a value ON a midpoint goes to the smaller)
    # round 1: {0, 4, 5} -> 3, {6, 10, 11, 12} -> 9.75, {20} -> 20      (midpoints 6.375, 14.875)
    # round 2: {0, 4, 5, 6} -> 3.75, {10, 11, 12} -> 11, {20} -> 20       (midpoints 7.375, 15.5)
    # round 3: no assignment changes -> stop
    centroids, ids = kmeans_1d(x, 3)
    assert centroids.tolist() == [3.75, 11.0, 20.0]
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    centroids, ids = kmeans_1d(x, 3, max_iter=1)  # one round: the means of round 1, then the last assignment
    assert centroids.tolist() == [3.0, 9.75, 20.0]
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]


def _reference_lloyd(values: list[float], k: int) -> tuple[list[float], list[int]]:
    """Plain-Python Lloyd, linear init, nearest centroid (ties to the smaller), empty clusters kept."""
    lo, hi = min(values), max(values)
    cents = [lo + (hi - lo) * i / (k - 1) for i in range(k)]
    ids = None
    for _ in range(100):
        new = [min(range(k), key=lambda j: (abs(v - cents[j]), j)) for v in values]
        if new == ids:
            break
        ids = new
        for j in range(k):
            members = [v for v, i in zip(values, ids) if i == j]
            if members:
                cents[j] = sum(members) / len(members)
    return cents, ids


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_agrees_with_a_plain_python_lloyd(seed):
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(60) * rng.choice([0.1, 1.0], 60)).tolist()
    centroids, ids = kmeans_1d(torch.tensor(values, dtype=torch.float64), 4)
    ref_cents, ref_ids = _reference_lloyd(values, 4)
    assert ids.tolist() == ref_ids
    torch.testing.assert_close(centroids, torch.tensor(ref_cents, dtype=torch.float32), rtol=0, atol=1e-6)


def test_pruned_zeros_take_no_part_in_the_linear_init_and_get_no_code():
    weight = torch.tensor([[0.0, 4.0, 0.0, 5.0], [6.0, 0.0, 8.0, 0.0]])
    # kept 4, 5, 6, 8: init 4, 8 (NOT 0, 8) -> {4, 5, 6} -> 5, {8} -> 8; zeros are -1 (no cluster)
    book = quantize_weight(weight, None, bits=1)
    assert book.centroids.tolist() == [5.0, 8.0]
    assert book.assignments.tolist() == [[-1, 0, -1, 0], [0, -1, 1, -1]]
    # a mask prunes 8 too: kept 4, 5, 6 -> init 4, 6 -> {4, 5} -> 4.5, {6}
    keep = torch.tensor([[True, True, True, True], [True, True, False, True]])
    book = quantize_weight(weight, keep, bits=1)
    assert book.centroids.tolist() == [4.5, 6.0]
    assert book.assignments.tolist() == [[-1, 0, -1, 0], [1, -1, -1, -1]]
    # 2^bits clusters are all real weights: 4 distinct non-zeros at 2 bits keep 4 centroids, none is 0
    book = quantize_weight(torch.tensor([0.0, -1.0, 2.0, 0.0, 3.0, 7.0]), None, bits=2)
    assert book.centroids.tolist() == [-1.0, 2.0, 3.0, 7.0]


def test_empty_clusters_are_kept_by_kmeans_and_dropped_from_the_codebook():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    centroids, ids = kmeans_1d(x, 4)  # init 0, 100/3, 200/3, 100: the middle two never get a member
    torch.testing.assert_close(centroids, torch.tensor([1.5, 100 / 3, 200 / 3, 100.0]))
    assert ids.tolist() == [0, 0, 0, 0, 3]
    book = quantize_weight(x, None, bits=2)  # x's 0.0 is a pruned weight: kept 1, 2, 3, 100 fit 4 codes exactly
    assert book.centroids.tolist() == [1.0, 2.0, 3.0, 100.0]
    book = quantize_weight(torch.tensor([0.5, 1.0, 2.0, 3.0, 100.0]), None, bits=2)
    assert book.centroids.tolist() == [1.625, 100.0] and book.assignments.tolist() == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("max_iter", [0, -3, 2.5, True, "10"])
def test_max_iter_that_is_not_a_positive_int_is_a_one_line_error(tmp_path, max_iter):
    # was: 0 silently skipped Lloyd (linear init only), 2.5 or "10" a raw TypeError from range()
    with pytest.raises(PrunelabError, match="max_iter") as exc:
        kmeans_1d(torch.arange(10.0), 2, max_iter=max_iter)
    _one_line(exc, "max_iter")
    with pytest.raises(PrunelabError, match="max_iter"):
        quantize_weight(torch.arange(10.0), None, 1, max_iter=max_iter)
    with pytest.raises(PrunelabError, match="max_iter"):
        quantize_model(nn.Linear(4, 3), bits=1, max_iter=max_iter)
    with pytest.raises(PrunelabError, match="max_iter"):
        write_compressed(tmp_path / "m.plc", nn.Linear(4, 3), bits=1, max_iter=max_iter)
    assert not any(tmp_path.iterdir())


# --- centroid fine-tuning (Eq. 3, with the cluster average) -------------------------------------------
def test_centroid_sgd_momentum_two_steps_by_hand_and_pruned_entries_untouched():
    weight = nn.Parameter(torch.tensor([[1.0, 0.0, 1.0], [4.0, 1.0, 0.0]]))
    book = Codebook(torch.tensor([1.0, 4.0]), torch.tensor([[0, -1, 0], [1, 0, -1]]), bits=1)
    opt = CentroidSGD([weight], [book], lr=0.5, momentum=0.5)
    # step 1: g0 = mean(1, 2, 3) = 2 (the paper's sum would be 6), g1 = 4; v = g
    weight.grad = torch.tensor([[1.0, 100.0, 2.0], [4.0, 3.0, -100.0]])
    opt.step()
    assert opt.codebooks()[0].centroids.tolist() == [0.0, 2.0]          # 1 - 0.5*2, 4 - 0.5*4
    # step 2: g0 = mean(2, 2, 2) = 2, g1 = 0; v0 = 0.5*2 + 2 = 3, v1 = 0.5*4 + 0 = 2
    weight.grad = torch.tensor([[2.0, 100.0, 2.0], [0.0, 2.0, 100.0]])
    opt.step()
    assert opt.codebooks()[0].centroids.tolist() == [-1.5, 1.0]         # 0 - 0.5*3, 2 - 0.5*2
    assert weight.detach().tolist() == [[-1.5, 0.0, -1.5], [1.0, -1.5, 0.0]]  # pruned stay exactly 0
    assert torch.equal(opt.codebooks()[0].assignments, book.assignments)  # assignments fixed


@pytest.mark.parametrize("kwargs", [{"lr": -0.1}, {"lr": 0.0}, {"lr": float("nan")}, {"lr": "0.1"},
                                    {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "momentum": -0.5}])
def test_centroid_sgd_refuses_a_bad_lr_or_momentum(kwargs):
    # was accepted: a negative lr silently climbed the loss, momentum 1 never forgets
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    book = Codebook(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), bits=1)
    with pytest.raises(PrunelabError) as exc:
        CentroidSGD([weight], [book], **kwargs)
    _one_line(exc, "CentroidSGD")


# --- relative sparse index (Fig. 2) ----------------------------------------------------------------
def _reference_relative(positions: list[int], bits: int) -> list[tuple[int, bool]]:
    """Walk the positions; emit a filler each time 2^bits zeros would be skipped."""
    span, out, previous = 1 << bits, [], -1
    for p in positions:
        while p - previous - 1 > span - 1:
            previous += span
            out.append((span - 1, False))
        out.append((p - previous - 1, True))
        previous = p
    return out


@pytest.mark.parametrize("bits, positions, gaps, real", [
    (2, [], [], []),                                     # empty layer
    (2, [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [True] * 5),   # all dense
    (2, [0], [0], [True]),                               # first element at 0
    (2, [3], [3], [True]),                               # first gap exactly 2^k - 1
    (2, [4], [3, 0], [False, True]),                     # first gap 2^k: filler at 3
    (2, [1, 5], [1, 3], [True, True]),                   # gap 2^k - 1 between two
    (2, [1, 6], [1, 3, 0], [True, False, True]),         # gap 2^k: filler at 5
    (2, [0, 9], [0, 3, 3, 0], [True, False, False, True]),       # gap 2 * 2^k: fillers at 4, 8
    (2, [0, 12], [0, 3, 3, 3], [True, False, False, True]),      # gap 11 = 2 * 4 + 3
    (2, [0, 13], [0, 3, 3, 3, 0], [True, False, False, False, True]),  # gap 3 * 2^k
    (3, [1, 4, 15], [1, 2, 7, 2], [True, True, False, True]),    # Han et al. Fig. 2 (filler at 12)
])
def test_relative_index_hand_made(bits, positions, gaps, real):
    index = relative_encode(np.array(positions, dtype=np.int64), bits)
    assert index.gaps.tolist() == gaps and index.real.tolist() == real
    assert index.fillers == real.count(False)
    decoded = relative_decode(index.gaps, 16)
    assert decoded[index.real].tolist() == positions
    assert not set(decoded[~index.real].tolist()) & set(positions)  # fillers stand on pruned positions


def test_relative_index_agrees_with_a_reference_on_every_pattern_of_ten():
    for bits in (1, 2, 3):
        for pattern in itertools.product((False, True), repeat=10):
            positions = [i for i, keep in enumerate(pattern) if keep]
            index = relative_encode(np.array(positions, dtype=np.int64), bits)
            assert list(zip(index.gaps.tolist(), index.real.tolist())) == _reference_relative(positions, bits)


# --- Huffman -------------------------------------------------------------------------------------
def test_huffman_hand_made_table_and_canonical_codes():
    # merge 1+1 -> 2, 2+2 -> 4, 4+4 -> 8: depths 3, 3, 2, 1
    lengths = code_lengths([1, 1, 2, 4])
    assert lengths.tolist() == [3, 3, 2, 1]
    # canonical by (length, symbol): 3 -> 0, 2 -> 10, 0 -> 110, 1 -> 111
    assert canonical_codes(lengths).tolist() == [0b110, 0b111, 0b10, 0b0]
    data = huffman.encode([3, 0, 2, 1], lengths)                     # 0 110 10 111 -> 01101011 1
    assert data == bytes([0b01101011, 0b10000000])
    assert huffman.decode(data, lengths, 4).tolist() == [3, 0, 2, 1]
    assert code_lengths([3, 5]).tolist() == [1, 1] and canonical_codes([1, 1]).tolist() == [0, 1]
    assert code_lengths([]).tolist() == [] and huffman.encode([], []) == b""
    assert huffman.decode(b"", [], 0).tolist() == []


def _optimal_cost(freqs: list[int]) -> int:
    """Minimal sum f*l of a prefix code: the sum of every merge in Huffman's algorithm."""
    heap = [f for f in freqs if f > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def _prefix_free(lengths: np.ndarray) -> bool:
    codes = canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths) if n > 0]
    return not any(a != b and b.startswith(a) for a in words for b in words)


@pytest.mark.parametrize("seed", range(6))
def test_huffman_lengths_are_optimal_prefix_free_and_round_trip(seed):
    rng = np.random.default_rng(seed)
    freqs = rng.integers(0, 50, size=int(rng.integers(2, 20)))
    freqs[int(rng.integers(freqs.size))] += 1  # at least one used symbol
    lengths = code_lengths(freqs)
    assert int((lengths.astype(np.int64) * freqs[: lengths.size]).sum()) == _optimal_cost(freqs.tolist())
    assert _prefix_free(lengths)
    symbols = rng.permutation(np.repeat(np.arange(freqs.size), freqs))
    assert np.array_equal(huffman.decode(huffman.encode(symbols, lengths), lengths, symbols.size), symbols)


def test_huffman_length_cap_keeps_a_prefix_code():
    fib = [1, 1]
    while len(fib) < 16:
        fib.append(fib[-1] + fib[-2])
    assert int(code_lengths(fib).max()) == 15      # uncapped: a Fibonacci table makes a 15-deep chain
    lengths = code_lengths(fib, max_length=6)
    assert int(lengths.max()) <= 6 and np.sum(np.ldexp(1.0, -lengths.astype(np.int64))) <= 1.0
    assert _prefix_free(lengths)
    symbols = np.repeat(np.arange(16), fib)
    assert np.array_equal(huffman.decode(huffman.encode(symbols, lengths), lengths, symbols.size), symbols)


# --- the container, byte by byte ---------------------------------------------------------------------
def test_container_bytes_for_a_hand_made_layer(tmp_path):
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]]))
    report = write_compressed(tmp_path / "m.plc", layer, bits=1, index_bits=1)
    # kept 1 and 6; 1-bit gaps (span 2): 1 | filler at 3 (gap 1) | filler at 5 (gap 1) | 6 (gap 0)
    # weight symbols 0, 2, 2, 1 (filler = K = 2): counts 1, 1, 2 -> lengths 2, 2, 1 -> codes 10, 11, 0
    #   stream 10 0 0 11 -> 10001100;  gaps 1, 1, 1, 0: counts 1, 3 -> lengths 1, 1 -> stream 1110 -> 11100000
    entry = (struct.pack("<BH", 0, 6) + b"weight" + struct.pack("<BII", 2, 1, 8)
             + struct.pack("<BBIQ", 1, 1, 2, 4)                        # 1 weight bit | float32, 1 index bit, K, entries
             + struct.pack("<2f", 1.0, 2.0)                            # codebook
             + struct.pack("<I3B", 3, 2, 2, 1) + struct.pack("<I2B", 2, 1, 1)  # code-length tables
             + struct.pack("<Q", 1) + bytes([0b10001100]) + struct.pack("<Q", 1) + bytes([0b11100000]))
    payload = struct.pack("<I", 1) + entry
    header = struct.pack("<8sHHQ32s", MAGIC, 1, 0, len(payload), hashlib.sha256(payload).digest())
    assert (tmp_path / "m.plc").read_bytes() == header + payload
    (row,) = report.layers
    assert (row.kept, row.fillers, row.clusters) == (2, 2, 2)
    assert {p: getattr(row, f"{p}_bytes") for p in PARTS} == {
        "headers": 18 + 14 + 8 + 8, "codebook": 8, "tables": 13, "weight_codes": 1, "index_codes": 1, "bias": 0}
    assert report.total_bytes == 52 + len(payload) == 127
    assert read_compressed(tmp_path / "m.plc")["weight"].tolist() == layer.weight.tolist()


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_file_is_bitwise_the_quantised_model_with_conv_bias_and_batchnorm(tmp_path, dtype):
    torch.manual_seed(0)
    model = _ConvNet()
    model(torch.randn(4, 2, 5, 5))  # BatchNorm statistics move
    model = model.to(dtype)
    masks = {"conv.weight": torch.rand(4, 2, 3, 3) > 0.4, "fc.weight": torch.rand(5, 36) > 0.8}
    with torch.no_grad():
        model.fc.weight.mul_(masks["fc.weight"])       # pruned negatives become -0.0
        model.bn.running_var[0] = float("nan")         # raw buffers keep their exact bits
    quantised = copy.deepcopy(model)
    quantize_model(quantised, masks, bits={"conv": 3, "fc": 2})
    write_compressed(tmp_path / "m.plc", model, masks, bits={"conv": 3, "fc": 2}, index_bits={"conv": 4, "fc": 2})
    state = read_compressed(tmp_path / "m.plc")
    _assert_bitwise(quantised.state_dict(), state)
    # writing the quantised model gives the same file content back, bit for bit
    write_compressed(tmp_path / "q.plc", quantised, masks, bits={"conv": 3, "fc": 2},
                     index_bits={"conv": 4, "fc": 2})
    _assert_bitwise(quantised.state_dict(), read_compressed(tmp_path / "q.plc"))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


def test_masks_of_a_pruned_attention_model_are_accepted_and_in_projections_stored_raw(tmp_path):
    # prunelab prunes nn.MultiheadAttention.in_proj_weight by default (prunelab.targets); compressing such a
    # checkpoint was refused: "mask 'attn.in_proj_weight' is not the weight of a Linear/Conv layer"
    from prunelab.targets import prunable_parameters

    torch.manual_seed(0)
    model = _Attention()
    masks = {name: torch.rand(p.shape) > 0.5 for name, p in prunable_parameters(model).items()}
    assert "attn.in_proj_weight" in masks
    quantised = copy.deepcopy(model)
    books = quantize_model(quantised, masks, bits=2)
    assert set(books) == {"attn.out_proj.weight", "fc.weight"}      # the in-projection is not weight-shared
    in_proj = quantised.attn.in_proj_weight.detach()
    keep = masks["attn.in_proj_weight"]
    assert torch.all(in_proj[~keep] == 0) and torch.equal(in_proj[keep], model.attn.in_proj_weight.detach()[keep])
    report = write_compressed(tmp_path / "m.plc", model, masks, bits=2, index_bits=3)
    _assert_bitwise(quantised.state_dict(), read_compressed(tmp_path / "m.plc"))
    assert [l.name for l in report.layers] == ["attn.out_proj.weight", "fc.weight"]
    assert report.total_bytes == (tmp_path / "m.plc").stat().st_size
    x = torch.randn(3, 2, 8)
    fresh = _Attention()
    fresh.load_state_dict(read_compressed(tmp_path / "m.plc"))
    assert torch.equal(fresh(x), quantised(x))


def test_a_mask_on_a_non_target_parameter_is_still_refused():
    model = _Attention()
    with pytest.raises(PrunelabError) as exc:
        quantize_model(model, {"attn.in_proj_bias": torch.ones(24, dtype=torch.bool)}, bits=2)
    _one_line(exc, "attn.in_proj_bias", "MultiheadAttention")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_weight_dtype_the_file_cannot_give_back_is_refused(tmp_path, dtype):
    # was: complex weights lost their imaginary part (a warning at most) and came back float32;
    # float8 weights came back float32
    layer = nn.Linear(4, 3)
    layer.weight = nn.Parameter(torch.randn(3, 4).to(dtype), requires_grad=False)
    before = layer.weight.detach().clone()
    with pytest.raises(PrunelabError) as exc:
        write_compressed(tmp_path / "m.plc", layer, bits=2)
    _one_line(exc, "weight", str(dtype).removeprefix("torch."), "model.float()")
    assert not any(tmp_path.iterdir())
    with pytest.raises(PrunelabError):
        quantize_model(layer, bits=2)
    assert torch.equal(_bits(layer.weight.detach().view(torch.uint8)), _bits(before.view(torch.uint8)))


def test_quantize_weight_refuses_a_complex_tensor():
    with pytest.raises(PrunelabError, match="complex"):
        quantize_weight(torch.randn(6, dtype=torch.complex64), None, bits=1)


def test_reading_a_directory_says_it_is_a_directory(tmp_path):
    # was: "compressed model '...' does not exist"
    with pytest.raises(PrunelabError) as exc:
        read_compressed(tmp_path)
    _one_line(exc, "is a directory")


def test_a_write_that_fails_at_the_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import prunelab.io

    path = tmp_path / "m.plc"
    write_compressed(path, nn.Linear(4, 3), bits=1, index_bits=1)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prunelab.io.os, "replace", fail)
    with pytest.raises(PrunelabError) as exc:
        write_compressed(path, nn.Linear(6, 5), bits=2, index_bits=2)
    _one_line(exc, "No space left on device")
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.plc"]


@pytest.mark.parametrize("damage", ["magic", "version", "truncated", "flipped", "empty"])
def test_damaged_files_are_one_line_errors(tmp_path, damage):
    path = tmp_path / "m.plc"
    write_compressed(path, nn.Linear(6, 4), bits=2, index_bits=2)
    data = bytearray(path.read_bytes())
    if damage == "magic":
        data[:8] = b"PK\x03\x04\x00\x00\x00\x00"
    elif damage == "version":
        data[8:10] = struct.pack("<H", 2)
    elif damage == "truncated":
        data = data[:-5]
    elif damage == "flipped":
        data[-3] ^= 0x01
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(PrunelabError) as exc:
        read_compressed(path)
    words = {"magic": ("bad magic",), "version": ("version 2", "version 1"), "truncated": ("payload",),
             "flipped": ("sha256",), "empty": ("0 bytes",)}[damage]
    _one_line(exc, *words)
