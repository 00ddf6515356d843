"""Deep Compression storage, edge cases: aliases, dtypes, Han's P+Q column, bad inputs, crafted files."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from prunelab.compress import code_lengths, kmeans_1d, quantize_model, quantize_weight, read_compressed, write_compressed
from prunelab.compress import huffman
from prunelab.compress.container import _HEADER, FORMAT_VERSION, MAGIC
from prunelab.errors import PrunelabError


def _round_trip(tmp_path, model, masks=None, bits=2, index_bits=2):
    """(expected state of quantize_model, state read from the file, report)."""
    quantised = copy.deepcopy(model)
    quantize_model(quantised, masks, bits=bits)
    report = write_compressed(tmp_path / "m.plc", model, masks, bits=bits, index_bits=index_bits)
    assert report.total_bytes == (tmp_path / "m.plc").stat().st_size
    return quantised.state_dict(), read_compressed(tmp_path / "m.plc"), report


def _assert_same_state(expected, state):
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


# --- kept positions: none, one, all, first at 0, gaps 2^b - 1 and 2^b, a final gap --------------------
@pytest.mark.parametrize("kept", [[], [0], [3], [15], list(range(16)), [0, 3], [0, 4], [3, 8], [4, 9], [0, 15]])
def test_kept_position_patterns_round_trip(tmp_path, kept):
    layer = nn.Linear(16, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).reshape(1, 16))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, kept] = True
    expected, state, report = _round_trip(tmp_path, layer, {"weight": mask}, bits=1, index_bits=2)
    _assert_same_state(expected, state)
    assert report.layers[0].kept == len(kept)


# --- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_unquantised_low_or_high_precision_model_round_trips_exactly(tmp_path, dtype):
    # write_compressed k-means-quantises here: the file must hold what quantize_model leaves in a
    # weight of this dtype (fp16/bf16 centroids rounded), and read it back in that dtype
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 4)).to(dtype)
    expected, state, _ = _round_trip(tmp_path, model, bits=2, index_bits=3)
    _assert_same_state(expected, state)


def test_quantised_half_model_file_holds_representable_centroids(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(20, 10).to(torch.float16)
    write_compressed(tmp_path / "m.plc", model, bits=2, index_bits=3)
    weight = read_compressed(tmp_path / "m.plc")["weight"]
    assert torch.equal(weight.float(), weight.float().half().float())


# --- aliases of a quantised weight ------------------------------------------------------------------
class _TiedEmbedding(nn.Module):
    def __init__(self, head_first: bool) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(6, 10, bias=False)
            self.emb = nn.Embedding(10, 6)
            self.emb.weight = self.head.weight
        else:
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight


@pytest.mark.parametrize("head_first", [True, False])
def test_embedding_tied_to_a_linear_head_is_stored_quantised(tmp_path, head_first):
    torch.manual_seed(0)
    model = _TiedEmbedding(head_first)
    expected, state, report = _round_trip(tmp_path, model, bits=2, index_bits=2)
    _assert_same_state(expected, state)
    assert torch.equal(state["emb.weight"], state["head.weight"])
    assert len(torch.unique(state["emb.weight"])) <= 4
    assert report.other_bytes < 4 * 60  # the alias is not stored raw in fp32
    assert report.dense_bytes == 4 * 60  # the dense baseline holds the tied tensor once, not once per name


def test_embedding_alias_takes_a_mask_given_under_its_name(tmp_path):
    torch.manual_seed(0)
    model = _TiedEmbedding(head_first=False)
    mask = torch.rand(10, 6) > 0.5
    expected, state, _ = _round_trip(tmp_path, model, {"emb.weight": mask}, bits=2, index_bits=2)
    _assert_same_state(expected, state)
    assert torch.all(state["emb.weight"][~mask] == 0)


class _TiedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight


def test_tied_weight_with_different_bits_is_quantised_once_like_quantize_model(tmp_path):
    torch.manual_seed(0)
    expected, state, report = _round_trip(tmp_path, _TiedLinear(), bits={"a": 1, "b": 3}, index_bits=2)
    _assert_same_state(expected, state)
    assert torch.equal(state["a.weight"], state["b.weight"])
    assert [l.weight_bits for l in report.layers] == [1, 1]   # what the file holds: the first layer's codebook
    assert [l.clusters for l in report.layers] == [2, 2]
    assert report.dense_bytes == 4 * (64 + 8 + 8)  # one shared 8x8 weight, two own biases


# --- Han's "compress rate P+Q": fixed-length codes must be able to hold the filler symbol --------------
def test_fixed_length_weight_code_has_room_for_the_filler(tmp_path):
    # 4 clusters (2 bits) + the filler id 4 = 5 symbols: a fixed-length code needs 3 bits, not 2
    # (1-bit gaps: each distance of 8 takes 3 fillers, 7 x 3 = 21)
    layer = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, ::8] = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])
    report = write_compressed(tmp_path / "m.plc", layer, bits=2, index_bits=1)
    row = report.layers[0]
    assert (row.clusters, row.kept, row.fillers) == (4, 8, 21)
    entries = row.kept + row.fillers
    fixed = row.headers_bytes + row.codebook_bytes + -(-entries * 3 // 8) + -(-entries * 1 // 8) + row.bias_bytes
    assert row.fixed_length_bytes == fixed
    assert report.to_rows()[0]["compress_rate_pq_pct"] == pytest.approx(100.0 * fixed / row.dense_bytes)


def test_fixed_length_weight_code_is_the_nominal_width_when_the_filler_fits(tmp_path):
    layer = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, ::8] = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0])   # 3 clusters + filler = 4
    report = write_compressed(tmp_path / "m.plc", layer, bits=2, index_bits=1)
    row = report.layers[0]
    entries = row.kept + row.fillers
    assert row.fixed_length_bytes == (row.headers_bytes + row.codebook_bytes + -(-entries * 2 // 8)
                                      + -(-entries // 8) + row.bias_bytes)


# --- bad inputs are one-line PrunelabErrors -----------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kmeans_refuses_non_finite_values(bad):
    with pytest.raises(PrunelabError, match="nan/inf"):
        kmeans_1d(torch.tensor([1.0, bad, 2.0, 3.0]), 2)


@pytest.mark.parametrize("shape", [(1, 3), (3,), (2, 3, 1)])
def test_quantize_weight_refuses_a_mask_of_another_shape(shape):
    with pytest.raises(PrunelabError, match="shape"):
        quantize_weight(torch.ones(2, 3), torch.ones(shape, dtype=torch.bool), 1)


def test_kmeans_identical_values_and_more_clusters_than_values():
    centroids, ids = kmeans_1d(torch.tensor([2.0, 2.0, 2.0]), 4)
    assert ids.tolist() == [0, 0, 0] and float(centroids[0]) == 2.0
    book = quantize_weight(torch.tensor([2.0, 2.0, 0.0, 2.0]), None, bits=1)
    assert book.centroids.tolist() == [2.0] and book.assignments.tolist() == [0, 0, -1, 0]


@pytest.mark.parametrize("max_length", [0, 21, 40])
def test_code_lengths_refuses_a_cap_the_decoder_cannot_read(max_length):
    with pytest.raises(PrunelabError, match="max_length"):
        code_lengths([1, 2, 3], max_length=max_length)


def test_huffman_edge_streams_round_trip():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    for freqs in ([5], [0, 0, 7], [1, 1], [10**6, 1], [0, 5, 0, 3], fib[:30], [1] * 1000):
        freqs = np.asarray(freqs)
        symbols = np.repeat(np.arange(freqs.size), freqs)
        np.random.default_rng(0).shuffle(symbols)
        lengths = code_lengths(freqs)
        assert lengths.size == 0 or int(lengths.max()) <= huffman.MAX_CODE_LENGTH
        data = huffman.encode(symbols, lengths)
        assert np.array_equal(huffman.decode(data, lengths, symbols.size), symbols)


def test_writing_over_a_directory_is_a_prunelab_error(tmp_path):
    (tmp_path / "out.plc").mkdir()
    with pytest.raises(PrunelabError, match="directory"):
        write_compressed(tmp_path / "out.plc", nn.Linear(3, 2), bits=1, index_bits=1)
    assert [p.name for p in tmp_path.iterdir()] == ["out.plc"] and not any((tmp_path / "out.plc").iterdir())


# --- crafted files (valid checksum, damaged body) -------------------------------------------------------
def test_every_truncation_and_byte_change_with_a_valid_checksum_is_a_one_line_error(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(torch.float16)
    write_compressed(tmp_path / "a.plc", model, {"0.weight": torch.rand(8, 12) > 0.6}, bits=2, index_bits=2)
    payload = (tmp_path / "a.plc").read_bytes()[_HEADER.size:]
    target = tmp_path / "b.plc"

    def check(body: bytes) -> None:
        target.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body)
        try:
            read_compressed(target)
        except PrunelabError as exc:
            assert "\n" not in str(exc) and "corrupt" in str(exc)

    for cut in range(len(payload)):
        check(payload[:cut])
    for i in range(0, len(payload), 3):
        for value in (0x00, 0xFF, payload[i] ^ 0x80, payload[i] ^ 0x20):
            check(payload[:i] + bytes([value]) + payload[i + 1:])


# --- the report: filler zeros apart from the weights, bytes that add up to the file -----------------------
def test_report_rows_state_fillers_apart_and_bytes_add_up_to_the_file(tmp_path):
    from prunelab.compress import REPORT_COLUMNS
    from prunelab.compress.container import FILE_HEADER_ROW
    from prunelab.measure.tables import markdown_table

    layer = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, ::8] = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])
    expected, state, report = _round_trip(tmp_path, layer, bits=2, index_bits=1)
    _assert_same_state(expected, state)  # fillers decode to the zeros they stand on
    row, header, total = report.to_rows()
    # 8 real weights (12.5 % of 64) and 21 fillers, 29 entries in each stream
    assert (row["kept"], row["kept_pct"], row["fillers"], row["entries"]) == (8, 12.5, 21, 29)
    assert row["weight_bits_huffman"] == 8 * row["weight_codes_bytes"] / 29
    assert row["index_bits_huffman"] == 8 * row["index_codes_bytes"] / 29
    assert (row["weight_bits"], row["weight_bits_fixed"]) == (2, 3)  # 4 clusters + the filler symbol
    assert header == {"layer": FILE_HEADER_ROW, "size_bytes": 56}
    assert row["size_bytes"] + header["size_bytes"] == total["size_bytes"] == (tmp_path / "m.plc").stat().st_size
    assert (total["fillers"], total["entries"]) == (21, 29)
    table = markdown_table(report.to_rows(), REPORT_COLUMNS)
    assert "filler zeros" in table.splitlines()[0] and FILE_HEADER_ROW in table
