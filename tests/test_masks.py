"""MaskSet: apply, stats, save/load, plain state_dicts, shape checks."""

import copy

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def hand_masks():
    return MaskSet({
        "0.weight": torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
        "2.weight": torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool),
    })


def test_stats_exact():
    stats = hand_masks().stats()
    assert [(l.name, l.total, l.kept) for l in stats.layers] == [("0.weight", 12, 6), ("2.weight", 6, 3)]
    assert stats.total == 18 and stats.kept == 9 and stats.sparsity == 0.5
    assert stats.layers[0].sparsity == 0.5


def test_apply_zeroes_exactly_the_pruned_weights():
    model, masks = tiny(), hand_masks()
    before = copy.deepcopy(model.state_dict())
    masks.apply_(model)
    for name, mask in masks.items():
        weight = dict(model.named_parameters())[name]
        assert torch.all(weight[~mask] == 0)
        assert torch.equal(weight[mask], before[name][mask])
    assert torch.equal(model[0].bias, before["0.bias"])  # biases untouched


def test_state_dict_stays_plain_and_loads_into_unpruned_model(tmp_path):
    model, masks = tiny(), hand_masks()
    masks.apply_(model)
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    fresh = tiny()
    fresh.load_state_dict(state, strict=True)
    torch.save(state, tmp_path / "m.pt")
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"), strict=True)
    assert torch.equal(fresh[0].weight, model[0].weight)
    copy.deepcopy(model)  # nothing unpicklable attached


def test_save_load_roundtrip(tmp_path):
    masks = hand_masks()
    path = masks.save(tmp_path / "masks.safetensors")
    loaded = MaskSet.load(path)
    assert loaded.equal(masks) and loaded.fingerprint() == masks.fingerprint()
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors(tmp_path):
    with pytest.raises(PrunelabError, match="does not exist"):
        MaskSet.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(PrunelabError, match="corrupt"):
        MaskSet.load(bad)


def test_shape_mismatch_is_refused():
    masks = MaskSet({"0.weight": torch.ones(3, 5, dtype=torch.bool)})
    with pytest.raises(PrunelabError, match=r"shape \(3, 5\) but the parameter has \(3, 4\)"):
        masks.apply_(tiny())
    with pytest.raises(PrunelabError, match="names no parameter"):
        MaskSet({"fc9.weight": torch.ones(1, dtype=torch.bool)}).check_model(tiny())


def test_from_model_reads_zeros_and_fingerprint_changes():
    model, masks = tiny(), hand_masks()
    masks.apply_(model)
    read = MaskSet.from_model(model)
    assert read.equal(masks)
    flipped = MaskSet({**dict(masks), "2.weight": ~masks["2.weight"]})
    assert flipped.fingerprint() != masks.fingerprint()


def test_rank_check_tensor_follows_the_mask_device(monkeypatch):
    masks = hand_masks()
    digits = [int(c, 16) for c in masks.fingerprint()[:16]]
    assert masks.collective_device("gloo") == torch.device("cpu")
    assert masks.fingerprint_tensor(masks.collective_device("gloo")).tolist() == digits
    assert masks.fingerprint_tensor().dtype == torch.int64
    meta = MaskSet({"w": torch.ones(3, 4, dtype=torch.bool, device="meta")})
    assert meta.collective_device("gloo") == torch.device("meta")  # a CUDA mask set gives its CUDA device
    assert masks.fingerprint_tensor("meta").device == torch.device("meta")
    assert MaskSet({}).collective_device(None) == torch.device("cpu")
    # NCCL moves CUDA tensors only: the current CUDA device, even for CPU masks
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert masks.collective_device("nccl") == torch.device("cuda", 3)


def test_save_load_keeps_names_order_and_equal_ignores_order(tmp_path):
    # module order is not alphabetical (layer10 before layer2); names carry dots
    masks = MaskSet({
        "layer10.block.weight": torch.tensor([[True, False]]),
        "layer2.weight": torch.tensor([False, True, True]),
        "a.b.c.weight": torch.zeros(2, 1, 3, dtype=torch.bool),
    })
    loaded = MaskSet.load(masks.save(tmp_path / "masks.safetensors"))
    assert list(loaded) == list(masks)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n]) for n in masks)
    assert loaded.equal(masks) and loaded.fingerprint() == masks.fingerprint()
    reordered = MaskSet({n: masks[n] for n in reversed(list(masks))})
    assert reordered.equal(masks)  # same names and bits: order does not matter (as for fingerprint)
    assert not MaskSet({n: masks[n] for n in list(masks)[:2]}).equal(masks)


def test_save_masks_sharing_memory(tmp_path):
    shared = torch.tensor([[True, False], [False, True]])
    masks = MaskSet({"enc.weight": shared, "dec.weight": shared})  # one tied weight under two names
    loaded = MaskSet.load(masks.save(tmp_path / "masks.safetensors"))
    assert loaded.equal(masks)


def test_load_onto_a_device_and_refuse_other_prunelab_files(tmp_path):
    from safetensors.torch import save_file

    path = hand_masks().save(tmp_path / "masks.safetensors")
    meta = MaskSet.load(path, device="meta")
    assert all(m.device == torch.device("meta") and m.dtype == torch.bool for m in meta.values())
    other = tmp_path / "model.safetensors"
    save_file({"0.weight": torch.ones(3, 4)}, str(other), metadata={"format": "prunelab.checkpoint.v1"})
    with pytest.raises(PrunelabError, match="is a prunelab.checkpoint.v1 file, not a mask file"):
        MaskSet.load(other)


def tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return model


def test_masks_may_name_a_tied_weight_by_any_of_its_names():
    model = tied()
    mask = torch.tensor([[True, False, True, False]] * 4)
    MaskSet({"2.weight": mask}).apply_(model)  # "2.weight" is not in the deduplicated named_parameters()
    assert torch.equal(model[0].weight != 0, mask)
    assert MaskSet.from_model(model, ["2.weight"]).equal({"2.weight": mask})
    with pytest.raises(PrunelabError, match="names no parameter"):
        MaskSet.from_model(model, ["9.weight"])


def test_integer_and_float_masks_of_0_and_1_become_bool_and_other_values_are_refused():
    masks = MaskSet({"a.weight": torch.tensor([0.0, 1.0, 1.0]), "b.weight": torch.tensor([[1, 0]], dtype=torch.int8)})
    assert masks["a.weight"].dtype == torch.bool and masks["a.weight"].tolist() == [False, True, True]
    assert masks["b.weight"].tolist() == [[True, False]]
    for bad, shown in ((torch.tensor([0.0, 0.3]), "0.3"), (torch.tensor([1, 2]), "2"),
                       (torch.tensor([float("nan")]), "nan")):
        with pytest.raises(PrunelabError, match=rf"mask 'fc.weight' \(torch\.\w+\) holds values other than 0 and 1 "
                                                rf"such as {shown}; a mask is bool") as info:
            MaskSet({"fc.weight": bad})
        assert "\n" not in str(info.value)


def test_a_mask_that_is_no_tensor_is_a_one_line_error_naming_it():
    import numpy as np

    for bad, kind in (([True, False], "list"), (np.array([True, False]), "ndarray"), (None, "NoneType")):
        with pytest.raises(PrunelabError, match=rf"mask 'fc.weight' is a {kind}, not a torch.Tensor; pass a bool "
                                                r"tensor \(True = kept\), e.g. torch.as_tensor") as info:
            MaskSet({"ok.weight": torch.ones(2, dtype=torch.bool), "fc.weight": bad})
        assert "\n" not in str(info.value)


def test_load_refuses_files_without_mask_metadata_and_non_boolean_values(tmp_path):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"0.weight": torch.ones(3, 4, dtype=torch.bool)}, str(bare))  # not written by MaskSet.save
    with pytest.raises(PrunelabError, match=r"has no prunelab format metadata, so MaskSet.save did not write it"):
        MaskSet.load(bare)
    soft = tmp_path / "soft.safetensors"
    save_file({"0.weight": torch.full((2,), 0.5)}, str(soft), metadata={"format": "prunelab.maskset.v1"})
    with pytest.raises(PrunelabError, match=rf"^'{soft}': mask '0\.weight' \(torch\.float32\) holds values other "
                                            r"than 0 and 1 such as 0\.5"):
        MaskSet.load(soft)
    assert MaskSet.load(hand_masks().save(tmp_path / "masks.safetensors")).equal(hand_masks())  # save's files load


def test_apply_zeroes_pruned_weights_that_are_inf_or_nan():
    # inf * 0 and nan * 0 are nan: a multiply left these "pruned" weights non-zero (nan) for ever
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[float("inf"), float("nan"), -2.0]]))
    MaskSet({"weight": torch.tensor([[False, False, True]])}).apply_(model)
    assert model.weight.tolist() == [[0.0, 0.0, -2.0]]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 5.0, -2.0]]))
    MaskSet({"weight": torch.tensor([[False, True, False]])}).apply_(model)
    assert not bool(torch.signbit(model.weight[0, 0]))  # a pruned weight is +0.0, not -0.0


def test_sparsity_is_pruned_over_total_without_a_second_rounding():
    # 32 of 320 pruned: 1 - 288/320 gave 0.09999999999999998; 1 of 3 kept: 1 - 1/3 gave 0.6666666666666667,
    # one ulp away from the layer's own 2/3
    mask = torch.ones(320, dtype=torch.bool)
    mask[:32] = False
    assert MaskSet({"w": mask}).stats().sparsity == 0.1
    stats = MaskSet({"w": torch.tensor([True, False, False])}).stats()
    assert stats.sparsity == stats.layers[0].sparsity == 2 / 3
    assert stats.to_dict()["sparsity"] == 2 / 3


def test_intersect_refuses_masks_that_would_broadcast_or_are_not_0_1():
    masks = MaskSet({"w": torch.tensor([True, True, False, True])})
    assert masks.intersect({"w": torch.tensor([1, 0, 1, 1])})["w"].tolist() == [True, False, False, True]
    assert masks.intersect({})["w"].tolist() == [True, True, False, True]
    with pytest.raises(PrunelabError, match=r"shape \(4, 4\) for mask 'w', which has shape \(4,\)"):
        masks.intersect({"w": torch.ones(4, 4, dtype=torch.bool)})  # used to broadcast to a (4, 4) mask
    with pytest.raises(PrunelabError, match="other than 0 and 1 such as 0.3"):
        masks.intersect({"w": torch.tensor([0.3, 1.0, 1.0, 1.0])})  # 0.3 used to count as kept
    with pytest.raises(PrunelabError, match="got a list"):
        masks.intersect({"w": [1, 1, 1, 1]})


def test_masks_on_the_meta_device_have_a_repr_and_a_one_line_stats_error():
    masks = MaskSet({"w": torch.ones(2, 2, dtype=torch.bool, device="meta")})
    assert repr(masks) == "MaskSet(1 tensors, on the meta device)"
    with pytest.raises(PrunelabError, match="'w' is on the meta device"):
        masks.stats()
