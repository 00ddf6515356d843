"""Exact round trips of the sparse formats (CSR, BSR, 2:4) and their hand-checked layouts."""

from __future__ import annotations

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.materialise.formats import BSR, CSR, SemiStructured24
from prunelab.structure import NM

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")


def _sparse(shape, sparsity, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[torch.rand(*shape, generator=g) < sparsity] = 0
    for r in empty_rows:
        w[r] = 0
    return w


MATRICES = {
    "random_with_empty_rows": _sparse((16, 24), 0.7, empty_rows=(0, 5, 15)),
    "all_zero": torch.zeros(8, 16),
    "full": _sparse((8, 16), 0.0, seed=1),
    "single_row": _sparse((1, 16), 0.5, seed=2),
    "very_sparse": _sparse((32, 64), 0.99, seed=3),
    "conv_weight": _sparse((8, 4, 3, 3), 0.6, seed=4),  # viewed as (8, 36)
}

FORMATS = {
    "csr": lambda w: CSR.from_dense(w),
    "bsr4x4": lambda w: BSR.from_dense(w, block_size=(4, 4)),
    "bsr8x1": lambda w: BSR.from_dense(w, block_size=(8, 1)),
    "bsr1x4": lambda w: BSR.from_dense(w, block_size=(1, 4)),
}


def _tiles(kind: str, w: torch.Tensor) -> bool:
    rows, cols = w.shape[0], w[0].numel()
    block = {"bsr4x4": (4, 4), "bsr8x1": (8, 1), "bsr1x4": (1, 4)}.get(kind, (1, 1))
    return rows % block[0] == 0 and cols % block[1] == 0


@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("kind", list(FORMATS))
def test_round_trip_is_exact(kind, matrix):
    w = MATRICES[matrix]
    if not _tiles(kind, w):
        with pytest.raises(PrunelabError, match="does not tile"):
            FORMATS[kind](w)
        return
    fmt = FORMATS[kind](w)
    back = fmt.to_dense()
    assert back.shape == w.shape and back.dtype == w.dtype
    assert torch.equal(back, w)
    assert torch.equal(fmt.to_torch().to_dense(), w.reshape(w.shape[0], -1))
    assert fmt.crow_indices.dtype == torch.int32 and fmt.col_indices.dtype == torch.int32


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_csr_layout_and_nbytes(matrix):
    w = MATRICES[matrix]
    fmt = CSR.from_dense(w)
    flat = w.reshape(w.shape[0], -1)
    nnz = int((flat != 0).sum())
    assert fmt.nnz == nnz
    assert fmt.crow_indices.tolist() == [0] + torch.cumsum((flat != 0).sum(1), 0).tolist()
    assert fmt.nbytes == 4 * nnz + 4 * nnz + 4 * (flat.shape[0] + 1)
    for r in range(flat.shape[0]):
        lo, hi = fmt.crow_indices[r].item(), fmt.crow_indices[r + 1].item()
        cols = fmt.col_indices[lo:hi].tolist()
        assert cols == sorted(cols) == flat[r].nonzero().flatten().tolist()


def test_bsr_stores_blocks_with_any_nonzero():
    w = torch.zeros(8, 8)
    w[0, 0] = 1.0   # block (0, 0)
    w[5, 6] = 2.0   # block (1, 1)
    fmt = BSR.from_dense(w, block_size=(4, 4))
    assert fmt.crow_indices.tolist() == [0, 1, 2]
    assert fmt.col_indices.tolist() == [0, 1]
    assert fmt.values.shape == (2, 4, 4)
    assert fmt.values[1, 1, 2] == 2.0 and fmt.values.count_nonzero() == 2  # stored zeros inside blocks
    assert fmt.nbytes == 4 * 3 + 4 * 2 + 4 * 32


@pytest.mark.parametrize("block", [(0, 4), (4,), "4x4"])
def test_bsr_bad_block_size(block):
    with pytest.raises(PrunelabError, match="block"):
        BSR.from_dense(torch.ones(8, 8), block_size=block)


def test_two_four_hand_made_1x8():
    #          group 0: [0, 1.5, 0, 2] -> positions 1, 3    group 1: [3, 0, 0, 0] -> 0 (+ lowest free zero, 1)
    w = torch.tensor([[0.0, 1.5, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    fmt = SemiStructured24.from_dense(w)
    assert fmt.values.tolist() == [[1.5, 2.0, 3.0, 0.0]]
    assert fmt.positions().tolist() == [[[1, 3], [0, 1]]]
    # nibbles: group 0 = 1 | 3 << 2 = 0b1101 = 13; group 1 = 0 | 1 << 2 = 4; packed 13 | 4 << 4 = 77
    assert fmt.metadata.dtype == torch.int16 and fmt.metadata.tolist() == [[77]]
    assert fmt.nbytes == 4 * 4 + 2 * 1
    assert torch.equal(fmt.to_dense(), w)


def test_two_four_sign_bit_nibble():
    # 4 groups per int16; the 4th group's nibble sits in bits 12..15: positions (2, 3) = 0b1110 -> sign bit set
    w = torch.zeros(1, 16)
    w[0, 14] = 5.0
    w[0, 15] = 6.0
    fmt = SemiStructured24.from_dense(w)
    # groups 0..2 are empty -> (0, 1) = 0b0100 = 4 each; group 3 -> 14
    unsigned = 4 | 4 << 4 | 4 << 8 | 14 << 12
    assert fmt.metadata.tolist() == [[unsigned - 2**16]]
    assert fmt.positions()[0, 3].tolist() == [2, 3]
    assert torch.equal(fmt.to_dense(), w)


@pytest.mark.parametrize("shape", [(4, 8), (3, 20), (16, 64), (5, 4)])
def test_two_four_round_trip(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    w = w * NM(2, 4).pattern_mask(w.abs())
    w[0] = 0                            # an all-zero row
    w[-1, :4] = torch.tensor([0.0, 0.0, 0.0, 7.0])  # a group with one nonzero
    fmt = SemiStructured24.from_dense(w)
    assert fmt.values.shape == (shape[0], shape[1] // 2)
    assert fmt.metadata.shape == (shape[0], -(-shape[1] // 16))
    assert torch.equal(fmt.to_dense(), w)
    pos = fmt.positions()
    assert bool((pos[..., 0] < pos[..., 1]).all())


def test_two_four_violation_names_layer_row_and_group():
    w = torch.zeros(3, 8)
    w[2, 4:7] = 1.0  # row 2, group 1 keeps 3 of 4
    with pytest.raises(PrunelabError) as info:
        SemiStructured24.from_dense(w, name="encoder.fc1.weight")
    message = str(info.value)
    assert "encoder.fc1.weight" in message and "row 2" in message and "group 1" in message
    assert "--granularity 2:4" in message and "\n" not in message


def test_two_four_needs_multiple_of_four():
    with pytest.raises(PrunelabError, match="multiple of 4"):
        SemiStructured24.from_dense(torch.zeros(2, 6))


@pytest.mark.parametrize("fmt", [CSR, BSR, SemiStructured24])
def test_rejects_vectors_and_integers(fmt):
    with pytest.raises(PrunelabError, match="at least 2 dimensions"):
        fmt.from_dense(torch.ones(8))
    with pytest.raises(PrunelabError, match="floating-point"):
        fmt.from_dense(torch.ones(4, 4, dtype=torch.int64))


def test_from_tensors_rebuilds_the_same_format():
    w = MATRICES["conv_weight"]
    fmt = CSR.from_dense(w)
    again = CSR.from_tensors(fmt.shape, fmt.tensors())
    assert torch.equal(again.to_dense(), w)
    bsr = BSR.from_dense(w.reshape(8, 36), block_size=(2, 3))
    assert torch.equal(BSR.from_tensors(bsr.shape, bsr.tensors(), block_size=(2, 3)).to_dense(), w.reshape(8, 36))


def test_double_precision_round_trip():
    w = _sparse((8, 12), 0.5).double()
    for fmt in (CSR.from_dense(w), BSR.from_dense(w, block_size=(2, 2))):
        assert fmt.values.dtype == torch.float64 and torch.equal(fmt.to_dense(), w)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "2:4"])
def test_weight_with_zero_rows_round_trips(fmt):
    # a (0, 8) weight has a well-defined (0, 8) matrix view; reshape(0, -1) is ambiguous and used to raise
    cls = {"csr": CSR, "bsr": BSR, "2:4": SemiStructured24}[fmt]
    w = torch.zeros(0, 8)
    back = cls.from_dense(w).to_dense()
    assert back.shape == (0, 8) and torch.equal(back, w)


# --- int32: only the index VALUES must fit (row pointers count stored entries, column indices columns) ------
def test_int32_limit_applies_to_index_values_not_to_stored_elements(monkeypatch):
    from prunelab.materialise import formats

    formats._check_int32(2**31 - 1, 2**31, "BSR", "w")  # largest row-pointer value and column index: fit
    formats._check_int32(2**27, 2**20, "BSR", "w")      # 2**27 blocks of 16x16 = 2**35 elements: fine
    with pytest.raises(PrunelabError, match="row pointers") as exc:
        formats._check_int32(2**31, 4, "CSR", "fc.weight")
    assert "\n" not in str(exc.value) and "'fc.weight'" in str(exc.value)
    with pytest.raises(PrunelabError, match="column indices"):
        formats._check_int32(4, 2**31 + 1, "CSR", "fc.weight")
    seen = []
    monkeypatch.setattr(formats, "_check_int32", lambda *args: seen.append(args[:3]))
    BSR.from_dense(torch.ones(8, 12), block_size=(4, 2))  # 2 x 6 blocks, all stored: 96 elements
    CSR.from_dense(torch.eye(8, 12))                       # 8 nonzeros in 12 columns
    assert seen == [(12, 6, "BSR"), (8, 12, "CSR")]
