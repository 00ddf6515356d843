"""Review of the core pipeline objects: MaskSet, Sparsifier, granularities, targets.

Regression tests for bad input that used to escape as a traceback (AttributeError,
TypeError, RuntimeError, NotImplementedError) or give a silent wrong answer, and for a
mask check under torch.distributed that stopped only the ranks that differed.

Run as a script under torchrun (``test_verify_across_ranks...``), this file is also the
worker of its two-rank test.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.schedules import Cubic
from prunelab.sparsifier import Sparsifier
from prunelab.structure import NM, get_granularity
from prunelab.targets import LayerRules, prunable_parameters


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


# --- MaskSet --------------------------------------------------------------------------
@pytest.mark.parametrize("given", [[ones(2)], None, (("w", ones(2)),), ones(2)])
def test_maskset_of_something_not_a_mapping_is_a_one_line_error(given):
    with pytest.raises(PrunelabError, match=r"MaskSet needs a mapping parameter FQN -> bool tensor, got a "):
        MaskSet(given)


def test_maskset_names_must_be_strings(tmp_path):
    # an int key used to be accepted and then fail in save() with safetensors' TypeError
    with pytest.raises(PrunelabError, match=r"mask name 1 is a int, not a str"):
        MaskSet({1: ones(2)})


def test_equal_reads_masks_like_a_maskset_and_refuses_what_is_no_mask():
    masks = MaskSet({"w": ones(2, 2)})
    assert masks.equal({"w": torch.ones(2, 2)}) and not masks.equal({"w": torch.tensor([[1.0, 0.0], [1.0, 1.0]])})
    assert not masks.equal({"v": ones(2, 2)})
    with pytest.raises(PrunelabError, match=r"holds values other than 0 and 1 such as 0.3"):
        masks.equal({"w": torch.full((2, 2), 0.3)})  # used to be read as all-kept: True
    with pytest.raises(PrunelabError, match=r"equal got a list for mask 'w'"):
        masks.equal({"w": [[1, 1], [1, 1]]})
    with pytest.raises(PrunelabError, match=r"equal needs a mapping"):
        masks.equal([ones(2, 2)])


def test_intersect_refuses_a_sequence_instead_of_returning_itself():
    masks = MaskSet({"w": ones(2)})
    with pytest.raises(PrunelabError, match=r"intersect needs a mapping FQN -> bool tensor \(a MaskSet\), got a list"):
        masks.intersect([torch.zeros(2, dtype=torch.bool)])  # used to give back all-kept masks silently


def test_bad_device_names_are_one_line_errors(tmp_path):
    path = MaskSet({"a.b.weight": ones(2, 3)}).save(tmp_path / "m.safetensors")
    with pytest.raises(PrunelabError, match=r"unknown device 'gpu'; pass e.g. 'cpu'"):
        MaskSet.load(path, device="gpu")
    assert MaskSet.load(path, device="cpu")["a.b.weight"].shape == (2, 3)


def test_meta_masks_refuse_to_be_saved_or_hashed_with_one_line_errors(tmp_path):
    meta = MaskSet({"w": torch.ones(3, dtype=torch.bool, device="meta")})
    with pytest.raises(PrunelabError, match=r"'w' is on the meta device and holds no bits to save"):
        meta.save(tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(PrunelabError, match=r"holds no bits to hash"):
        meta.fingerprint()


def test_from_model_with_one_name_as_a_string():
    model = tiny()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    masks = MaskSet.from_model(model, "0.weight")  # used to be iterated letter by letter: "names no parameter '0'"
    assert list(masks) == ["0.weight"] and masks.stats().kept == 11


def test_save_load_round_trip_of_empty_zero_size_and_scalar_masks(tmp_path):
    masks = MaskSet({"z.weight": torch.zeros(0, 3, dtype=torch.bool), "blocks.0.fc.weight": torch.tensor([[1, 0]]),
                     "a": torch.tensor(False)})
    read = MaskSet.load(masks.save(tmp_path / "m.safetensors"))
    assert list(read) == ["z.weight", "blocks.0.fc.weight", "a"]  # saved order, not safetensors' sorted one
    assert all(m.dtype == torch.bool for m in read.values()) and read.equal(masks)
    assert read["z.weight"].shape == (0, 3) and read["a"].shape == ()
    assert len(MaskSet.load(MaskSet({}).save(tmp_path / "empty.safetensors"))) == 0


# --- distributed mask check -------------------------------------------------------------
def test_verify_across_ranks_stops_every_rank_not_only_the_one_that_differs(torchrun):
    ranks = torchrun(Path(__file__).name)
    for r in ranks:  # rank 0 holds the reference copy: it used to carry on alone and hang in its next collective
        assert r["same_ok"]
        assert r["error"] is not None and r["error"].startswith("rank 1 holds different masks than rank 0")


def _worker(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from torchrun_exit import finish

    from prunelab import distributed

    assert distributed.init_from_env(), "run me under torchrun"
    rank = distributed.rank()
    same = MaskSet({"w": torch.tensor([True, False, True])})
    same.verify_across_ranks()  # identical masks: no error anywhere
    differ = MaskSet({"w": torch.tensor([True, rank == 1, True])})
    error = None
    try:
        differ.verify_across_ranks()
    except RuntimeError as exc:
        error = str(exc)
    record = {"world_size": distributed.world_size(), "same_ok": True, "error": error}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()


# --- granularities ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unstructured", "vector", "kernel", "channel"])
@pytest.mark.parametrize("shape", [(4, 3, 1, 1), (4, 3, 5, 3), (5, 7), (3, 2, 4), (2, 3, 2, 3, 2)])
def test_group_decisions_expand_to_whole_groups_on_odd_shapes(name, shape):
    granularity = get_granularity(name)
    groups = granularity.to_groups(torch.arange(torch.Size(shape).numel()).reshape(shape))
    keep = torch.arange(groups.shape[0]) % 3 == 1
    mask = granularity.from_groups(keep, shape)
    assert mask.shape == shape and mask.dtype == torch.bool
    rows = granularity.to_groups(mask)
    assert torch.equal(rows.all(dim=1), keep) and torch.equal(rows.any(dim=1), keep)  # whole groups, same order
    expected_size = {"unstructured": 1, "vector": shape[-1] if len(shape) >= 3 else 1,
                     "kernel": torch.Size(shape[2:]).numel() if len(shape) >= 3 else 1,
                     "channel": torch.Size(shape[1:]).numel()}[name]
    assert groups.shape[1] == expected_size


def test_kernel_5x3_groups_are_exact_kernels():
    mask = get_granularity("kernel").from_groups(torch.tensor([True, False, False, True]), (2, 2, 5, 3))
    assert mask[0, 0].all() and not mask[0, 1].any() and not mask[1, 0].any() and mask[1, 1].all()


def test_from_groups_with_the_wrong_number_of_decisions_is_a_one_line_error():
    with pytest.raises(PrunelabError, match=r"channel from_groups got 3 group decisions for shape \(4, 2\), which has 4"):
        get_granularity("channel").from_groups(torch.ones(3, dtype=torch.bool), (4, 2))


def test_nm_refuses_booleans_for_n_and_m():
    with pytest.raises(PrunelabError, match=r"N:M needs integers"):
        NM(True, 4)


# --- targets and rules ---------------------------------------------------------------------
@pytest.mark.parametrize("rules, match", [
    (LayerRules(max_sparsity=[("0", 0.5)]), r"max_sparsity must be a mapping glob -> sparsity"),
    (LayerRules(fixed_sparsity=["0"]), r"fixed_sparsity must be a mapping glob -> sparsity"),
    (LayerRules(max_sparsity={1: 0.5}), r"max_sparsity pattern 1 is a int, not a str"),
])
def test_rules_of_the_wrong_type_are_one_line_errors(rules, match):
    with pytest.raises(PrunelabError, match=match):
        rules.bounds(["0.weight", "2.weight"])


def test_exclude_given_as_a_generator_none_or_non_strings():
    model = tiny()
    # a generator used to be consumed by the first pass, so nothing was excluded and the glob was reported unused
    assert list(prunable_parameters(model, (p for p in ["0"]))) == ["2.weight"]
    assert list(prunable_parameters(model, None)) == ["0.weight", "2.weight"]
    with pytest.raises(PrunelabError, match=r"exclude pattern 0 is a int, not a str"):
        prunable_parameters(model, [0])
    with pytest.raises(PrunelabError, match=r"expected an nn.Module to prune, got a str"):
        prunable_parameters("model")


# --- sparsifier -----------------------------------------------------------------------------
def test_sparsifier_refuses_rules_schedule_and_optimizer_of_the_wrong_type():
    model = tiny()
    with pytest.raises(PrunelabError, match=r"rules must be a LayerRules, got a dict"):
        Sparsifier(model, rules={"keep_first": "dense"})
    with pytest.raises(PrunelabError, match=r"schedule must be a Schedule .* got 0.9"):
        Sparsifier(model, schedule=0.9)
    sparsifier = Sparsifier(model)
    with pytest.raises(PrunelabError, match=r"prepare needs a torch.optim.Optimizer \(or None\), got a list"):
        sparsifier.prepare([torch.optim.SGD(model.parameters(), lr=0.1)])
    assert sparsifier.optimizer is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    lambda p: torch.optim.Adafactor(p, lr=0.01),  # factored second moments: no state shaped like the weight
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5, amsgrad=True),
])
def test_zeros_hold_through_clipping_and_other_optimizers_with_a_tied_weight(dtype, make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    model[2].weight = model[0].weight  # tied
    opt = make(model.parameters())
    sparsifier = Sparsifier(model, schedule=Cubic(0.75, num_updates=3, frequency=2, start_step=1)).prepare(opt)
    assert list(sparsifier.params) == ["0.weight", "4.weight"]
    for _ in range(8):
        model(torch.randn(8, 6, dtype=dtype)).float().pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad()
        sparsifier.step()
        for name, param in sparsifier.params.items():
            assert not param[~sparsifier.masks[name]].any()
    masks = sparsifier.finalize()
    assert masks.sparsity == pytest.approx(0.75, abs=1 / 54)  # 54 weights: the nearest count
    assert MaskSet.from_model(model, list(masks)).equal(masks)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)  # plain keys, no weight_orig / weight_mask
    assert torch.equal(fresh[2].weight, model[0].weight)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
