"""Allocation: exact keep counts and selections on hand-made scores, no sparsity drift."""

import math

import pytest
import torch

from prunelab.allocation import (
    ALLOCATIONS, GlobalAllocation, LayerBudget, allocate, erk_raw_density, get_allocation, keep_budget, lamp_scores,
    select_top_k,
)
from prunelab.errors import PrunelabError


def layer(name, scores, group_size=1, shape=None, min_keep=0, max_keep=None):
    scores = torch.tensor(scores, dtype=torch.float32)
    n = scores.numel()
    return LayerBudget(name, scores, group_size, shape or (n * group_size,), min_keep, n if max_keep is None else max_keep)


def test_select_top_k_exact_and_ties_to_lower_index():
    s = torch.tensor([0.5, 2.0, 1.0, 1.0, 1.0, 3.0])
    assert select_top_k(s, 3).tolist() == [False, True, True, False, False, True]
    assert select_top_k(s, 0).sum() == 0 and select_top_k(s, 6).all()
    assert select_top_k(torch.ones(5), 2).tolist() == [True, True, False, False, False]


def test_global_threshold_exact():
    layers = [layer("a", [1, 2, 3, 4]), layer("b", [0.5, 5, 6])]
    keep = allocate(get_allocation("global"), layers, sparsity=3 / 7)
    assert keep["a"].tolist() == [False, False, True, True]
    assert keep["b"].tolist() == [False, True, True]


def test_global_ties_do_not_drift():
    layers = [layer("a", [1.0] * 10), layer("b", [1.0] * 7)]
    for s in (0.1, 0.5, 0.9):
        counts = get_allocation("global").keep_counts(layers, s)
        assert sum(counts) == keep_budget(layers, s)
    # boundary budget goes to the first layer first, in index order
    keep = allocate(get_allocation("global"), layers, 0.5)
    assert keep["a"].sum() + keep["b"].sum() == round(0.5 * 17)


def test_global_with_groups_weighs_group_size():
    # a: 2 groups of 4 weights, b: 4 groups of 1 weight; 12 weights, keep 6
    layers = [layer("a", [10, 1], group_size=4), layer("b", [5, 4, 3, 2])]
    counts = get_allocation("global").keep_counts(layers, 0.5)
    assert counts == [1, 2]


def test_uniform_exact():
    layers = [layer("a", list(range(10))), layer("b", list(range(20)))]
    assert get_allocation("uniform").keep_counts(layers, 0.7) == [3, 6]
    keep = allocate(get_allocation("uniform"), layers, 0.7)
    assert keep["a"].tolist() == [False] * 7 + [True] * 3


def test_uniform_with_dense_layer_rescales_the_rest():
    layers = [layer("first", [1.0] * 10, min_keep=10), layer("rest", list(range(30)))]
    counts = get_allocation("uniform").keep_counts(layers, 0.5)
    assert counts == [10, 10]  # 20 of 40 kept; the dense layer's 10 come out of the others


def test_floor_caps_layer_sparsity():
    layers = [layer("a", [0.0] * 10, min_keep=2), layer("b", list(range(1, 11)))]
    counts = get_allocation("global").keep_counts(layers, 0.8)
    assert counts == [2, 2]


def test_erk_densities_follow_rigl_formula():
    # shapes (out, in): ER factor (in + out) / (in * out)
    assert erk_raw_density((100, 50)) == pytest.approx(150 / 5000)
    assert erk_raw_density((20, 1, 5, 5)) == pytest.approx(31 / 500)
    big, small = (300, 784), (10, 100)
    layers = [
        LayerBudget("big", torch.rand(300 * 784), 1, big, 0, 300 * 784),
        LayerBudget("small", torch.rand(10 * 100), 1, small, 0, 1000),
    ]
    counts = get_allocation("erk").keep_counts(layers, 0.98)  # no layer hits density 1 here
    budget = keep_budget(layers, 0.98)
    assert sum(counts) == budget
    d_big, d_small = counts[0] / (300 * 784), counts[1] / 1000
    assert d_small / d_big == pytest.approx(erk_raw_density(small) / erk_raw_density(big), rel=0.01)


def test_erk_redistributes_when_density_would_exceed_one():
    layers = [
        LayerBudget("tiny", torch.rand(4), 1, (2, 2), 0, 4),
        LayerBudget("huge", torch.rand(10000), 1, (100, 100), 0, 10000),
    ]
    counts = get_allocation("erk").keep_counts(layers, 0.5)
    assert counts[0] == 4  # its ER density would exceed 1: kept dense
    assert sum(counts) == keep_budget(layers, 0.5)


def test_lamp_scores_exact():
    # sorted ascending |w|: 1, 2, 3 -> squares 1, 4, 9; suffix sums 14, 13, 9
    scores = lamp_scores(torch.tensor([3.0, 1.0, 2.0]))
    assert scores.tolist() == pytest.approx([9 / 9, 1 / 14, 4 / 13])


def test_lamp_keeps_the_largest_of_every_layer():
    layers = [layer("a", [100, 200, 300]), layer("b", [0.1, 0.2])]
    keep = allocate(get_allocation("lamp"), layers, 0.6)
    assert keep["a"].tolist() == [False, False, True] and keep["b"].tolist() == [False, True]


def test_already_pruned_groups_are_never_selected():
    layers = [layer("a", [-math.inf, 5.0, 1.0, 2.0], max_keep=3)]
    for name in ALLOCATIONS.names():
        keep = allocate(get_allocation(name), layers, 0.5)
        assert keep["a"].tolist() == [False, True, False, True], name


@pytest.mark.parametrize("name", ALLOCATIONS.names())
@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.9, 0.99])
def test_achieved_equals_target_up_to_one_group_per_layer(name, sparsity):
    gen = torch.Generator().manual_seed(1)
    layers = [
        LayerBudget("conv", torch.randint(0, 5, (40,), generator=gen).float(), 9, (8, 5, 3, 3), 0, 40),
        LayerBudget("fc1", torch.randint(0, 5, (300,), generator=gen).float(), 1, (30, 10), 0, 300),
        LayerBudget("fc2", torch.randint(0, 5, (50,), generator=gen).float(), 1, (5, 10), 0, 50),
    ]
    counts = get_allocation(name).keep_counts(layers, sparsity)
    kept = sum(c * l.group_size for c, l in zip(counts, layers))
    assert abs(kept - keep_budget(layers, sparsity)) <= max(l.group_size for l in layers)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), False, True])
def test_bad_sparsity(bad):
    with pytest.raises(PrunelabError, match=r"\[0, 1\)"):
        keep_budget([layer("a", [1.0])], bad)


def test_check_sparsity_refuses_booleans_but_not_the_numbers_they_equal():
    from prunelab.allocation import check_sparsity

    for bad in (False, True):
        with pytest.raises(PrunelabError, match=rf"sparsity must be in \[0, 1\) \(the fraction of weights removed\), "
                                                rf"got {bad}; e.g. 0.9"):
            check_sparsity(bad)  # False was taken as sparsity 0
    check_sparsity(0)
    check_sparsity(0.0)
    assert keep_budget([layer("a", [1.0, 2.0])], 0) == 2


def test_unreachable_target_is_explained():
    layers = [layer("a", [1.0] * 10, min_keep=10), layer("b", [1.0] * 10)]
    with pytest.raises(PrunelabError, match="lower the sparsity"):
        get_allocation("global").keep_counts(layers, 0.9)


def test_unknown_allocation_lists_names():
    with pytest.raises(PrunelabError, match="erk, global, lamp, uniform"):
        get_allocation("per-layer")


def test_select_top_k_keeps_exactly_k_of_close_float64_scores():
    # distinct in float64, equal once rounded to float32: still exactly the k largest
    s = torch.tensor([1.0, 1.0 + 3e-12, 1.0 + 1e-12, 1.0 + 2e-12, 0.5], dtype=torch.float64)
    assert select_top_k(s, 2).tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_nan_scores_are_refused_by_every_allocation(name):
    layers = [layer("a", [1.0, float("nan"), 3.0, 2.0]), layer("b", [1.0, 2.0])]
    with pytest.raises(PrunelabError, match="NaN"):
        allocate(get_allocation(name), layers, 0.5)
    with pytest.raises(PrunelabError, match="NaN"):
        select_top_k(torch.tensor([1.0, float("nan")]), 1)


@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_zero_size_layer_in_every_allocation(name):
    empty = LayerBudget("empty", torch.zeros(0), 1, (4, 0), 0, 0)
    empty_rows = LayerBudget("empty_rows", torch.zeros(4), 0, (4, 0), 0, 4)  # channels of a (4, 0) weight
    layers = [empty, empty_rows, layer("a", [4.0, 1.0, 3.0, 2.0])]
    keep = allocate(get_allocation(name), layers, 0.5)
    assert keep["empty"].numel() == 0 and keep["a"].tolist() == [True, False, True, False]


def test_lamp_positive_infinity_is_kept_not_pruned():
    scores = lamp_scores(torch.tensor([math.inf, 1.0, 2.0, -math.inf]))
    # +inf: must stay; the finite scores are LAMP among themselves: 1/(1+4), 4/4; -inf: pruned
    assert scores.tolist() == [math.inf, pytest.approx(0.2), 1.0, -math.inf]
    keep = allocate(get_allocation("lamp"), [layer("a", [math.inf, 1.0, 2.0, -math.inf], max_keep=3)], 0.5)
    assert keep["a"].tolist() == [True, False, True, False]


def test_lamp_refuses_signed_scores_instead_of_reordering_them():
    # squaring would rank -10 (the first to prune) above 1 and 2
    with pytest.raises(PrunelabError, match=r"LAMP .* non-negative scores .* 'a' has scores down to -10"):
        allocate(get_allocation("lamp"), [layer("a", [-10.0, 1.0, 2.0]), layer("b", [1.0, 2.0])], 0.4)
    assert lamp_scores(torch.tensor([0.0, -0.0, 2.0])).tolist() == [0.0, 0.0, 1.0]


def test_global_structured_keeps_one_group_per_layer_but_unstructured_may_collapse():
    # 'a': 3 channels of 9 weights with small sums; 'b': 4 channels of 63 weights with large sums
    small = [1.0, 2.0, 3.0]
    big = [10.0, 11.0, 12.0, 13.0]

    def layers(structured):
        return [LayerBudget("a", torch.tensor(small), 9, (3, 1, 3, 3), 0, 3, structured),
                LayerBudget("b", torch.tensor(big), 63, (4, 3, 3, 7), 0, 4, structured)]

    keep = allocate(get_allocation("global"), layers(True), 0.5)  # budget: 140 of 279 weights
    assert keep["a"].tolist() == [False, False, True]  # the layer's best group survives
    assert keep["b"].tolist() == [False, False, True, True]
    collapsed = allocate(get_allocation("global"), layers(False), 0.5)  # no floor without structure: unchanged
    assert not collapsed["a"].any() and collapsed["b"].tolist() == [False, False, True, True]
    bare = allocate(GlobalAllocation(keep_one_group=False), layers(True), 0.5)
    assert not bare["a"].any()
    # the floor respects caps: a layer capped at 0 groups (already pruned) stays empty
    capped = [LayerBudget("a", torch.tensor(small), 9, (3, 1, 3, 3), 0, 0, True), layers(True)[1]]
    assert not allocate(get_allocation("global"), capped, 0.5)["a"].any()


def test_global_structured_floor_that_cannot_be_met_is_a_one_line_error():
    layers = [LayerBudget("a", torch.tensor([1.0, 2.0]), 50, (2, 50), 0, 2, True),
              LayerBudget("b", torch.tensor([3.0, 4.0]), 50, (2, 50), 0, 2, True)]
    with pytest.raises(PrunelabError, match=r"keeps one group of every layer .*at least 100; .*"
                                            r"<= 0\.5000 or pass --no-layer-floor \(API: allocation=.*keep_one_group=False\)\)$"):
        allocate(get_allocation("global"), layers, 0.8)
    assert GlobalAllocation(keep_one_group=False).keep_counts(layers, 0.8) == [0, 0]  # the bare threshold
