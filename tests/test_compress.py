"""Deep Compression storage: k-means weight sharing, relative indices, Huffman, the one-file format."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.compress import (
    MAGIC, CentroidSGD, Codebook, canonical_codes, code_lengths, finetune_centroids, kmeans_1d, quantize_model,
    quantize_weight, read_compressed, relative_decode, relative_encode, write_compressed,
)
from prunelab.compress import huffman
from prunelab.compress.container import FILE_HEADER_ROW, OTHER_ROW, PARTS
from prunelab.errors import PrunelabError


# --- k-means ------------------------------------------------------------------------------
def test_kmeans_linear_init_hand_made():
    # linear init for k=3 on [-1, 1]: -1, 0, 1 -> clusters {-1, -0.9}, {0.1, 0.2}, {1.0}
    centroids, ids = kmeans_1d(torch.tensor([-1.0, -0.9, 0.1, 0.2, 1.0]), 3)
    torch.testing.assert_close(centroids, torch.tensor([-0.95, 0.15, 1.0]))
    assert ids.tolist() == [0, 0, 1, 1, 2]


def test_kmeans_empty_cluster_keeps_its_centroid_and_codebook_drops_it():
    # init 0, 10/3, 20/3, 10 -> {0,1}, {2,3}, {}, {10}
    centroids, ids = kmeans_1d(torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]), 4)
    torch.testing.assert_close(centroids, torch.tensor([0.5, 2.5, 20 / 3, 10.0]))
    assert ids.tolist() == [0, 0, 1, 1, 3]
    book = quantize_weight(torch.tensor([0.5, 1.0, 2.0, 3.0, 10.0, 0.25]), None, bits=2)
    assert book.centroids.numel() == 3  # empty cluster dropped


def test_quantize_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    masks = {"0.weight": torch.rand(30, 20) > 0.7, "2.weight": torch.rand(5, 30) > 0.5}
    books = quantize_model(model, masks, bits={"0": 3, "fc": 2})
    for name, mask in masks.items():
        weight = dict(model.named_parameters())[name].detach()
        assert torch.all(weight[~mask] == 0)                   # pruned -> exactly 0 (even if it was not)
        assert torch.all(books[name].assignments[~mask] == -1)
        assert torch.equal(weight, books[name].decode())
    assert books["0.weight"].centroids.numel() <= 8 and books["2.weight"].centroids.numel() <= 4
    assert len(torch.unique(model[0].weight[masks["0.weight"]])) <= 8


def test_already_quantised_layer_is_its_own_codebook():
    weight = torch.tensor([[0.0, 0.5, -0.25], [0.5, 0.0, 1.0]])
    book = quantize_weight(weight, None, bits=2)
    assert book.centroids.tolist() == [-0.25, 0.5, 1.0]
    assert torch.equal(book.decode(), weight)


def test_bits_errors_are_prunelab_errors():
    model = nn.Linear(4, 3)
    with pytest.raises(PrunelabError, match="bits"):
        quantize_model(model, bits=0)
    with pytest.raises(PrunelabError, match="fc9"):
        quantize_model(model, bits={"fc9": 4})


# --- centroid fine-tuning -----------------------------------------------------------------
def test_centroid_sgd_averages_gradients_per_cluster():
    weight = nn.Parameter(torch.tensor([1.0, 1.0, 2.0, 0.0]))
    book = Codebook(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 1, -1]), bits=1)
    opt = CentroidSGD([weight], [book], lr=0.1)
    weight.grad = torch.tensor([1.0, 3.0, 5.0, 7.0])
    opt.step()
    # cluster 0: mean(1, 3) = 2 -> 1 - 0.2; cluster 1: 5 -> 2 - 0.5; pruned stays 0
    torch.testing.assert_close(opt.codebooks()[0].centroids, torch.tensor([0.8, 1.5]))
    assert weight.detach().tolist() == [pytest.approx(0.8), pytest.approx(0.8), 1.5, 0.0]


def test_finetune_centroids_keeps_weights_equal_to_codebooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    masks = {"0.weight": torch.rand(16, 8) > 0.5}
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    books = quantize_model(model, masks, bits=2)
    bias = model[0].bias.detach().clone()
    seen = []
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    new = finetune_centroids(model, books, loader, epochs=2, lr=0.05)
    for name, book in new.items():
        weight = dict(model.named_parameters())[name].detach()
        assert torch.equal(weight, book.decode())                          # exactly centroids[assignments]
        assert torch.equal(book.assignments, books[name].assignments)      # assignments fixed
        seen.append(not torch.equal(book.centroids, books[name].centroids))
    assert any(seen)
    assert torch.equal(model[0].bias.detach(), bias)                       # only centroids learn
    assert all(p.requires_grad for p in model.parameters())


def _bn_dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_finetune_centroids_retrains_in_train_mode_and_restores_every_modules_mode():
    # Han et al. 2016 Sec. 3.3: centroid fine-tuning is retraining, so BatchNorm re-estimates its running
    # statistics for the quantised weights (stored raw in the file); its affine parameters stay frozen
    torch.manual_seed(0)
    model = _bn_dropout_net().eval()
    model[1].train()  # mixed modes, as a user may set them: each comes back as it was
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    books = quantize_model(model, bits=2)
    running, affine = model[1].running_mean.clone(), model[1].weight.detach().clone()
    modes = [m.training for m in model.modules()]
    new = finetune_centroids(model, books, DataLoader(TensorDataset(x, y), batch_size=16), epochs=1, lr=0.05)
    assert [m.training for m in model.modules()] == modes
    assert not torch.equal(model[1].running_mean, running)                 # documented: statistics re-estimated
    assert torch.equal(model[1].weight.detach(), affine)                   # only centroids learn
    assert all(torch.equal(dict(model.named_parameters())[n].detach(), b.decode()) for n, b in new.items())


def test_finetune_centroids_restores_modes_after_an_error():
    torch.manual_seed(0)
    model = _bn_dropout_net().eval()
    books = quantize_model(model, bits=2)
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,))), (torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    with pytest.raises(RuntimeError):  # the second batch does not fit the first layer
        finetune_centroids(model, books, batches, epochs=1, lr=0.05)
    assert not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, flag", [({}, "--lr"), ({"lr_flag": "--finetune-lr"}, "--finetune-lr")])
def test_a_diverging_centroid_fine_tuning_names_the_callers_lr_flag(kwargs, flag):
    model = nn.Sequential(nn.Linear(8, 3))
    books = quantize_model(model, bits=2)
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,)))]
    with pytest.raises(PrunelabError, match=rf"training loss became nan at step 1 \(centroids\); lower the learning rate "
                                            rf"\({flag}, now 0\.05\)"):
        finetune_centroids(model, books, batches, epochs=1, lr=0.05, loss_fn=lambda out, y: out.sum() * float("nan"),
                           **kwargs)


def test_finetune_rejects_unquantised_model():
    model = nn.Linear(4, 3)
    books = quantize_model(copy.deepcopy(model), bits=1)
    with pytest.raises(PrunelabError, match="differs from its codebook"):
        finetune_centroids(model, books, [], epochs=1, lr=0.1)


# --- relative index -----------------------------------------------------------------------
def test_relative_index_with_filler_zero():
    # 3 bits: gaps 0..7 (distance 1..8); position 15 is 11 after 4, so a filler sits at 12
    index = relative_encode(np.array([1, 4, 15]), index_bits=3)
    assert index.gaps.tolist() == [1, 2, 7, 2]
    assert index.real.tolist() == [True, True, False, True]
    assert relative_decode(index.gaps, 16).tolist() == [1, 4, 12, 15]


def test_relative_index_boundaries_and_several_fillers():
    assert relative_encode(np.array([7]), 3).gaps.tolist() == [7]          # fits exactly
    assert relative_encode(np.array([8]), 3).gaps.tolist() == [7, 0]       # one past: filler at 7
    assert relative_encode(np.array([0, 20]), 3).gaps.tolist() == [0, 7, 7, 3]  # fillers at 8, 16
    rng = np.random.default_rng(0)
    positions = np.flatnonzero(rng.random(5000) < 0.03)
    index = relative_encode(positions, 4)
    assert index.gaps.max() <= 15 and index.fillers > 0
    assert relative_decode(index.gaps, 5000)[index.real].tolist() == positions.tolist()
    with pytest.raises(PrunelabError, match="corrupt"):
        relative_decode(index.gaps, int(positions[-1]))


# --- Huffman ------------------------------------------------------------------------------
def test_huffman_code_lengths_hand_made():
    # CLRS 16.3: a:45 b:13 c:12 d:16 e:9 f:5 -> 0, 101, 100, 111, 1101, 1100 (canonical: 0,100,101,110,1110,1111)
    lengths = code_lengths([45, 13, 12, 16, 9, 5])
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    assert canonical_codes(lengths).tolist() == [0b0, 0b100, 0b101, 0b110, 0b1110, 0b1111]
    symbols = [0, 1, 5]  # 0 100 1111 -> 01001111
    assert huffman.encode(symbols, lengths) == bytes([0b01001111])
    assert code_lengths([0, 3, 0, 0]).tolist() == [0, 0]  # one symbol: no bits, table up to it


def test_huffman_round_trip_exact():
    rng = np.random.default_rng(1)
    symbols = np.minimum(rng.geometric(0.2, size=20000), 40)
    lengths = code_lengths(np.bincount(symbols))
    data = huffman.encode(symbols, lengths)
    assert len(data) == -(-huffman.encoded_bits(symbols, lengths) // 8)
    assert np.array_equal(huffman.decode(data, lengths, symbols.size), symbols)
    single = code_lengths(np.bincount([3, 3, 3]))
    assert huffman.encode([3, 3, 3], single) == b""
    assert huffman.decode(b"", single, 3).tolist() == [3, 3, 3]
    with pytest.raises(PrunelabError, match="truncated"):
        huffman.decode(data[: len(data) // 2], lengths, symbols.size)


# --- the file -----------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)
        self.head = nn.Linear(10, 3, bias=False)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _pruned_net():
    torch.manual_seed(0)
    model = _Net()
    model(torch.randn(8, 1, 8, 8))  # move BN statistics
    masks = {"conv.weight": torch.rand(4, 1, 3, 3) > 0.3, "fc.weight": torch.rand(10, 144) > 0.9,
             "head.weight": torch.rand(3, 10) > 0.5}
    with torch.no_grad():
        for name, mask in masks.items():
            dict(model.named_parameters())[name].mul_(mask)
    return model, masks


@pytest.fixture
def written(tmp_path):
    model, masks = _pruned_net()
    path = tmp_path / "net.plc"
    report = write_compressed(path, model, masks, bits={"conv": 3, "fc": 4}, index_bits={"fc": 3, "conv": 8})
    return model, masks, path, report


def test_round_trip_reproduces_quantised_weights_exactly(written, tmp_path):
    model, masks, path, report = written
    quantised = copy.deepcopy(model)
    quantize_model(quantised, masks, bits={"conv": 3, "fc": 4})
    state = read_compressed(path)
    expected = quantised.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert report.layers[1].fillers > 0  # fc at 10% density with 3-bit gaps needs fillers
    # writing the quantised model again is lossless, and the file loads into the architecture
    write_compressed(tmp_path / "again.plc", quantised, masks, bits={"conv": 3, "fc": 4})
    again = read_compressed(tmp_path / "again.plc")
    assert all(torch.equal(again[n], t) for n, t in expected.items())
    fresh = _Net()
    fresh.load_state_dict(again)
    fresh.eval(), quantised.eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x), quantised(x))


def test_report_bytes_add_up(written):
    _, masks, path, report = written
    assert report.total_bytes == os.path.getsize(path)
    for layer in report.layers:
        assert layer.total_bytes == sum(getattr(layer, f"{p}_bytes") for p in PARTS)
        assert layer.kept == int(masks[layer.name].sum())
    assert report.layers[0].bias_bytes == 4 * 4 and report.layers[2].bias_bytes == 0
    assert report.layers[0].codebook_bytes <= 4 * 8
    rows = report.to_rows()
    assert [r["layer"] for r in rows] == ["conv", "fc", "head", FILE_HEADER_ROW, OTHER_ROW, "total"]
    assert rows[-1]["size_bytes"] == report.total_bytes
    # the bytes column adds up to the file: layers + the stated 52 + 4 byte header + the raw BatchNorm tensors
    assert sum(r["size_bytes"] for r in rows[:-1]) == report.total_bytes == os.path.getsize(path)
    assert rows[3]["size_bytes"] == report.file_header_bytes == 52 + 4 and rows[4]["size_bytes"] == report.other_bytes
    dense = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in _Net().state_dict().values())
    assert report.dense_bytes == dense
    assert report.compression_x == pytest.approx(dense / os.path.getsize(path))


@pytest.mark.parametrize("damage", ["truncate", "short", "flip", "magic", "empty"])
def test_damaged_file_is_rejected(written, damage):
    _, _, path, _ = written
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-1]
    elif damage == "short":
        data = data[:20]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "magic":
        data[:8] = b"NOTMAGIC"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert damage != "magic" or not bytes(data).startswith(MAGIC)
    with pytest.raises(PrunelabError, match="corrupt or truncated"):
        read_compressed(path)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(PrunelabError, match="does not exist"):
        read_compressed(tmp_path / "nope.plc")
    model, masks = _pruned_net()
    with pytest.raises(PrunelabError, match="index_bits"):
        write_compressed(tmp_path / "x.plc", model, masks, index_bits=0)
    with pytest.raises(PrunelabError, match="bn.weight"):
        write_compressed(tmp_path / "x.plc", model, {"bn.weight": torch.ones(4, dtype=torch.bool)})
    assert not any(tmp_path.iterdir())  # nothing half-written


# --- regressions: tied weights, half precision, odd tensors, odd layers -----------------------
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 3), nn.Linear(4, 3)
        self.second.weight = self.first.weight  # one tensor, two layers (each keeps its own bias)

    def forward(self, x):
        return self.first(x) + self.second(x)


def _tied_model():
    model = _Tied()
    mask = torch.tensor([[True, False, True, False], [False, True, True, False], [True, True, False, True]])
    with torch.no_grad():
        model.first.weight.copy_(torch.arange(1.0, 13.0).reshape(3, 4))  # pruned entries NOT zeroed
    return model, mask


def test_tied_weight_is_quantised_once_with_its_mask_under_either_name(tmp_path):
    for key in ("first.weight", "second.weight"):
        model, mask = _tied_model()
        books = quantize_model(model, {key: mask}, bits=2)
        assert list(books) == ["first.weight"]                     # one tensor, one codebook
        weight = model.first.weight.detach()
        assert model.second.weight is model.first.weight
        assert torch.equal(weight, books["first.weight"].decode())
        assert torch.all(weight[~mask] == 0) and books["first.weight"].kept == 7
    # fine-tuning finds the tied tensor under either name and trains it once
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    new = finetune_centroids(model, {"second.weight": books["first.weight"]}, loader, epochs=1, lr=0.05)
    assert torch.equal(new["second.weight"].decode(), model.first.weight.detach())
    assert not torch.equal(new["second.weight"].centroids, books["first.weight"].centroids)
    with pytest.raises(PrunelabError, match="more than once"):
        finetune_centroids(model, {"first.weight": new["second.weight"], "second.weight": new["second.weight"]},
                           loader, epochs=1, lr=0.05)
    model, mask = _tied_model()
    report = write_compressed(tmp_path / "tied.plc", model, {"second.weight": mask}, bits=2, index_bits=2)
    state = read_compressed(tmp_path / "tied.plc")
    assert torch.equal(state["first.weight"], state["second.weight"])
    assert torch.all(state["first.weight"][~mask] == 0)
    assert [l.kept for l in report.layers] == [7, 7]
    fresh = _Tied()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.second.weight, state["first.weight"])


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_half_precision_codebook_decodes_to_the_weight_exactly(dtype, ulp):
    # k=2, linear init 1 and 4: cluster {1, 1+ulp} has mean 1+ulp/2, which the dtype cannot hold
    # (it rounds, half to even, to 1.0); the codebook must say 1.0, what the weight holds
    layer = nn.Linear(4, 1, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0 + ulp, 4.0, 4.0]]))
    books = quantize_model(layer, bits=1)
    assert books["weight"].centroids.tolist() == [1.0, 4.0]
    assert books["weight"].assignments.tolist() == [[0, 0, 1, 1]]
    assert torch.equal(books["weight"].decode(), layer.weight.detach().float())
    # fine-tuning: the returned codebook is what the half-precision weight holds
    opt = CentroidSGD([layer.weight], [books["weight"]], lr=0.1)
    layer.weight.grad = torch.tensor([[0.03, 0.03, 0.0, 0.0]], dtype=dtype)
    opt.step()
    new = opt.codebooks()[0]
    assert torch.equal(new.decode(), layer.weight.detach().float())
    assert new.centroids[0].item() == layer.weight[0, 0].item() < 1.0  # it moved, by what the dtype holds


def test_finetune_accepts_a_bfloat16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).to(torch.bfloat16)
    books = quantize_model(model, bits=2)
    x, y = torch.randn(8, 6).to(torch.bfloat16), torch.randint(0, 3, (8,))
    new = finetune_centroids(model, books, DataLoader(TensorDataset(x, y), batch_size=4), epochs=1, lr=0.05)
    assert torch.equal(new["0.weight"].decode(), model[0].weight.detach().float())


def test_centroid_sgd_on_a_non_contiguous_weight():
    weight = nn.Parameter(torch.tensor([[1.0, 1.0], [2.0, 0.0]]).t())  # (2, 2), not contiguous
    assert not weight.is_contiguous()
    book = quantize_weight(weight, None, bits=1)
    assert book.assignments.tolist() == [[0, 1], [0, -1]]
    opt = CentroidSGD([weight], [book], lr=0.5)
    weight.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    opt.step()
    # cluster 0 = entries (0,0), (1,0) with grads 1, 3: mean 2 -> 1 - 1 = 0; cluster 1 = (0,1): 2 -> 2 - 1 = 1
    assert weight.detach().tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert torch.equal(opt.codebooks()[0].decode(), weight.detach())


def test_non_finite_weight_is_a_prunelab_error(tmp_path):
    with pytest.raises(PrunelabError, match="nan/inf"):
        quantize_weight(torch.tensor([1.0, float("nan"), 2.0, 3.0]), None, bits=1)
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(PrunelabError, match="'weight' holds 1 nan/inf"):
        write_compressed(tmp_path / "x.plc", layer, bits=1)
    assert not any(tmp_path.iterdir())


def test_non_tensor_state_entry_is_a_prunelab_error(tmp_path):
    class WithExtraState(nn.Linear):
        def get_extra_state(self):
            return {"note": "not a tensor"}

        def set_extra_state(self, state):
            pass

    with pytest.raises(PrunelabError, match="_extra_state.*not a tensor"):
        write_compressed(tmp_path / "x.plc", WithExtraState(3, 2), bits=1)
    assert not any(tmp_path.iterdir())


def test_empty_and_fully_pruned_layers_round_trip_and_report(tmp_path):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.empty = nn.Linear(3, 0, bias=False)       # no weights at all
            self.pruned = nn.Linear(3, 2)                  # every weight pruned
            self.one = nn.Linear(3, 2, bias=False)         # a single distinct value: one cluster

    with pytest.warns(UserWarning, match="zero-element"):  # torch's init of the empty weight
        model = Odd()
    with torch.no_grad():
        model.one.weight.fill_(0.5)
    masks = {"pruned.weight": torch.zeros(2, 3, dtype=torch.bool)}
    report = write_compressed(tmp_path / "odd.plc", model, masks, bits=1, index_bits=1)
    state = read_compressed(tmp_path / "odd.plc")
    assert state["empty.weight"].shape == (0, 3)
    assert torch.equal(state["pruned.weight"], torch.zeros(2, 3))
    assert torch.equal(state["one.weight"], torch.full((2, 3), 0.5))
    rows = {r["layer"]: r for r in report.to_rows()}
    assert rows["empty"]["compress_rate_pct"] == 0.0 and rows["empty"]["weights"] == 0
    assert (rows["pruned"]["kept"], rows["one"]["kept"], rows["one"]["clusters"]) == (0, 6, 1)
    assert report.layers[2].weight_codes_bytes == 0  # one symbol costs no bits
    assert report.total_bytes == os.path.getsize(tmp_path / "odd.plc")


def test_unreadable_file_is_a_prunelab_error(written, monkeypatch):
    _, _, path, _ = written

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(PrunelabError, match="cannot read.*Permission denied"):
        read_compressed(path)


def test_finetune_with_no_quantised_layer_is_a_no_op():
    model = nn.Sequential(nn.LayerNorm(3))
    books = quantize_model(model, bits=2)
    assert books == {}
    loader = DataLoader(TensorDataset(torch.randn(4, 3), torch.randint(0, 3, (4,))), batch_size=2)
    before = copy.deepcopy(model.state_dict())
    assert finetune_centroids(model, books, loader, epochs=1, lr=0.1) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_too_large_for_memory_is_a_prunelab_error(written, monkeypatch):
    import prunelab.compress.container as container

    _, _, path, _ = written

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 144. GiB")

    monkeypatch.setattr(container.np, "zeros", no_memory)
    with pytest.raises(PrunelabError, match="too large to decode here"):
        read_compressed(path)


def test_parametrized_weight_is_a_prunelab_error(tmp_path):
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))  # weight computed, not a parameter
    with pytest.raises(PrunelabError, match="'weight' is not a parameter"):
        quantize_model(layer, bits=2)
    with pytest.raises(PrunelabError, match="remove_parametrizations"):
        write_compressed(tmp_path / "x.plc", layer, bits=2)
    assert not any(tmp_path.iterdir())
