"""Granularities: exact group layouts and N:M masks on hand-made tensors."""

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.structure import GRANULARITIES, NM, get_granularity


def conv_weight():
    return torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)


@pytest.mark.parametrize("name,linear_groups,conv_groups,conv_size", [
    ("unstructured", 6, 72, 1),
    ("vector", 6, 24, 3),
    ("kernel", 6, 8, 9),
    ("channel", 2, 2, 36),
    ("neuron", 2, 2, 36),
])
def test_group_layout(name, linear_groups, conv_groups, conv_size):
    g = get_granularity(name)
    assert g.to_groups(torch.zeros(2, 3)).shape[0] == linear_groups
    assert g.to_groups(conv_weight()).shape == (conv_groups, conv_size)
    assert g.num_groups((2, 4, 3, 3)) == conv_groups


def test_kernel_groups_are_whole_kernels():
    w = conv_weight()
    groups = get_granularity("kernel").to_groups(w)
    assert torch.equal(groups[5], w[1, 1].reshape(-1))  # group 5 = filter 1, input channel 1


def test_vector_groups_are_kernel_rows():
    w = conv_weight()
    groups = get_granularity("vector").to_groups(w)
    assert torch.equal(groups[4], w[0, 1, 1])  # o=0, i=1, row 1


def test_from_groups_expands_channel_decision():
    g = get_granularity("channel")
    mask = g.from_groups(torch.tensor([False, True]), (2, 4, 3, 3))
    assert mask.shape == (2, 4, 3, 3)
    assert not mask[0].any() and mask[1].all()


def test_from_groups_roundtrip_every_registered_granularity():
    for name in GRANULARITIES.names():
        g = get_granularity(name)
        if g.is_pattern:
            continue
        shape = (2, 4, 3, 3)
        keep = torch.arange(g.num_groups(shape)) % 2 == 0
        mask = g.from_groups(keep, shape)
        assert torch.equal(g.to_groups(mask).all(dim=1), keep), name
        assert torch.equal(g.to_groups(mask).any(dim=1), keep), name


def test_nm_mask_exact_linear():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 5.0, 5.0, 0.0, 1.0]])
    mask = NM(2, 4).pattern_mask(scores)
    # block 1 keeps 4 and 3; block 2 keeps the two 5s
    assert mask.tolist() == [[False, True, False, True, True, True, False, False]]


def test_nm_ties_keep_lower_index():
    mask = NM(1, 4).pattern_mask(torch.ones(1, 8))
    assert mask.tolist() == [[True, False, False, False, True, False, False, False]]


def test_nm_conv_blocks_run_along_input_channels():
    w = conv_weight()  # value grows with input channel index at every kernel position
    mask = NM(2, 4).pattern_mask(w)
    assert mask.sum() == 36
    for o in range(2):
        for r in range(3):
            for c in range(3):
                assert mask[o, :, r, c].tolist() == [False, False, True, True]


def test_nm_every_block_keeps_exactly_n():
    torch.manual_seed(0)
    for n, m in [(1, 2), (2, 4), (4, 8), (3, 8)]:
        mask = NM(n, m).pattern_mask(torch.randn(16, 32))
        assert torch.equal(mask.reshape(-1, m).sum(1), torch.full((16 * 32 // m,), n))


def test_nm_parsing_and_errors():
    assert get_granularity("4:8") == NM(4, 8)
    assert get_granularity("2:4").sparsity == 0.5
    with pytest.raises(PrunelabError, match="N < M"):
        get_granularity("4:4")
    with pytest.raises(PrunelabError, match="N < M"):
        NM(5, 4)
    for zero in (lambda: get_granularity("0:4"), lambda: NM(0, 4)):  # 0:4 would prune every weight
        with pytest.raises(PrunelabError, match=r"N:M needs integers 1 <= N < M, got 0:4"):
            zero()
    assert NM(1, 4).sparsity == 0.75
    with pytest.raises(PrunelabError, match="does not divide"):
        NM(2, 4).check("conv1.weight", (20, 1, 5, 5))
    with pytest.raises(PrunelabError, match="does not divide"):
        NM(2, 4).check("fc.weight", (10, 30))
    NM(2, 4).check("fc.weight", (10, 32))


def test_unknown_granularity_lists_valid_names():
    with pytest.raises(PrunelabError, match="valid names: channel, kernel"):
        get_granularity("filters")


@pytest.mark.parametrize("name", ["unstructured", "vector", "kernel", "channel", "neuron"])
@pytest.mark.parametrize("shape", [(4, 0), (0, 4), (3, 0, 3, 3), (0, 2, 3, 3)])
def test_zero_size_weights_have_empty_groups(name, shape):
    g = get_granularity(name)
    groups = g.to_groups(torch.zeros(shape))
    assert groups.numel() == 0 and groups.shape == (g.num_groups(shape), g.group_size(shape))
    mask = g.from_groups(torch.ones(g.num_groups(shape), dtype=torch.bool), shape)
    assert mask.shape == shape


def test_nm_refuses_blocks_that_would_straddle_rows():
    # 2 x 6: 12 entries split into blocks of 4 would mix rows; the pattern needs 4 | inputs
    with pytest.raises(PrunelabError, match="does not divide the input dimension 6"):
        NM(2, 4).pattern_mask(torch.randn(2, 6))
    with pytest.raises(PrunelabError, match="does not divide the input dimension 2"):
        NM(2, 4).pattern_mask(torch.randn(4, 2, 3, 3))  # 72 entries, but only 2 input channels
    assert NM(2, 4).pattern_mask(torch.zeros(0, 8)).shape == (0, 8)


def test_nm_float64_scores_keep_their_precision():
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 + 2e-12, 1.0]], dtype=torch.float64)
    assert NM(2, 4).pattern_mask(scores).tolist() == [[False, True, True, False]]


def test_registry_membership_of_unhashable_names():
    assert "channel" in GRANULARITIES and "filters" not in GRANULARITIES
    assert ["channel"] not in GRANULARITIES  # was a TypeError traceback
    with pytest.raises(PrunelabError, match="unknown granularity"):
        GRANULARITIES.get(["channel"])


def test_nm_refuses_nan_scores_instead_of_keeping_them():
    # a descending sort ranks NaN first, so [nan, 1, 2, 3] kept the NaN and 3 without a word
    with pytest.raises(PrunelabError, match="N:M scores contain NaN"):
        NM(2, 4).pattern_mask(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]]))
    keep = NM(2, 4).pattern_mask(torch.tensor([[float("-inf"), 1.0, 2.0, 3.0]]))  # -inf (already pruned) is fine
    assert keep.tolist() == [[False, False, True, True]]


def test_nm_refusal_names_the_exclude_argument_for_a_layer_that_is_not_first():
    from torch import nn

    from prunelab.schedules import OneShot
    from prunelab.sparsifier import Sparsifier

    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with pytest.raises(PrunelabError, match=r"input dimension 1 of '1\.weight' .*exclude=\['1'\].*--exclude 1\)") as info:
        Sparsifier(model, granularity="2:4", schedule=OneShot(0.5))
    assert "\n" not in str(info.value)
    masks = Sparsifier(model, granularity="2:4", schedule=OneShot(0.5), exclude=["1"]).prepare().finalize()
    assert "1.weight" not in masks and float(masks["0.weight"].float().mean()) == 0.5  # the advice works
