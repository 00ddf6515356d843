"""Regression tests from a review of schedules, sparse attention, activations, attention costs and low-rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.activations import SparseInputLinear, TopKActivation, activation_sparsity
from prunelab.errors import PrunelabError
from prunelab.lowrank import LowRankLinear, factorize_linear, low_rank_model, rank_for
from prunelab.schedules import Cubic
from prunelab.sparse_attention import (
    block_local_attention, block_local_attention_mask, local_attention, local_attention_mask,
)


# -- schedules ---------------------------------------------------------------------------------------------------


def test_cubic_starts_at_exactly_the_initial_sparsity_and_ends_at_exactly_the_final():
    sched = Cubic(0.9, initial_sparsity=0.1, start_step=3, num_updates=4, frequency=5)
    assert sched.sparsity_at(2) == 0.0  # dense before t0
    assert sched.sparsity_at(3) == 0.1 and sched.sparsity_at(7) == 0.1  # was 0.09999999999999998
    assert sched.sparsity_at(23) == 0.9 and sched.sparsity_at(10**9) == 0.9
    # in between: Zhu & Gupta eq. (1), held until the next update
    assert sched.sparsity_at(13) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 2 / 4) ** 3)
    assert sched.sparsity_at(17) == sched.sparsity_at(13)
    assert [sched.sparsity_at(t) for t in range(30)] == [sched.sparsity_at(t) for t in range(30)]  # pure


# -- sparse attention --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [local_attention_mask, block_local_attention_mask])
@pytest.mark.parametrize("length", [-1, 2.5, True])
def test_mask_refuses_a_length_that_is_not_a_count(mask, length):
    with pytest.raises(PrunelabError, match=r"^length must be an integer >= 0") as info:
        mask(length, 2)  # -1 was a RuntimeError from arange, 2.5 a silent 3x3 mask, True a 1x1 mask
    assert "\n" not in str(info.value)
    assert mask(0, 2).shape == (0, 0)


@pytest.mark.parametrize("attention", [local_attention, block_local_attention])
def test_attention_refuses_integer_or_mixed_dtype_inputs_in_one_line(attention):
    q = torch.randn(1, 6, 4)
    with pytest.raises(PrunelabError, match=r"floating-point tensors of one dtype.*float32/cpu, torch.float64/cpu"):
        attention(q, q.double(), q, 2)  # was a RuntimeError from scaled_dot_product_attention
    ints = torch.zeros(1, 6, 4, dtype=torch.long)
    with pytest.raises(PrunelabError, match=r"floating-point"):
        attention(ints, ints, ints, 2)


@pytest.mark.parametrize(("attention", "mask"), [(local_attention, local_attention_mask),
                                                 (block_local_attention, block_local_attention_mask)])
def test_full_pattern_is_dense_causal_attention_and_rows_are_never_nan(attention, mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, dtype=torch.float64) for _ in range(3))
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, 37), causal, atol=1e-12, rtol=0)
    for size in (1, 5, 16, 20):  # tiles with padded queries and keys: no fully masked row, no NaN
        got = attention(q, k, v, size)
        assert bool(got.isfinite().all())
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask(37, size)),
                                   atol=1e-12, rtol=0)


# -- activations -------------------------------------------------------------------------------------------------


def test_topk_refuses_a_scalar_and_keeps_exactly_k_of_tied_values():
    with pytest.raises(PrunelabError, match=r"needs inputs of shape \(\.\.\., features\), got a 0-d tensor"):
        TopKActivation(2)(torch.tensor(3.0))  # was an IndexError
    y = TopKActivation(2)(torch.ones(3, 5))
    assert (y != 0).sum(1).tolist() == [2, 2, 2]
    assert torch.equal(TopKActivation(7)(torch.tensor([[1.0, -2.0]])), torch.tensor([[1.0, -2.0]]))  # k > features


def test_activation_sparsity_of_empty_batches_is_a_one_line_error():
    with pytest.raises(PrunelabError, match=r"produced only empty outputs in 1 batch") as info:
        activation_sparsity(nn.Sequential(nn.ReLU()), [torch.zeros(0, 3)])  # was a ZeroDivisionError
    assert "\n" not in str(info.value)
    assert activation_sparsity(nn.Sequential(nn.ReLU()), [torch.zeros(0, 3), torch.tensor([[1.0, -1.0]])]) \
        == {"0": 0.5}  # an empty batch among others just adds nothing


def test_sparse_input_linear_refuses_a_wrong_width_and_a_non_linear():
    layer = SparseInputLinear(nn.Linear(4, 2))
    with pytest.raises(PrunelabError, match=r"needs inputs of shape \(\.\.\., 4\), got \(3, 5\)"):
        layer(torch.zeros(3, 5))  # was "shape '[-1, 4]' is invalid for input of size 15"
    with pytest.raises(PrunelabError, match=r"wraps an nn.Linear, got Conv1d"):
        SparseInputLinear(nn.Conv1d(1, 1, 1))  # was an AttributeError


# -- low rank ----------------------------------------------------------------------------------------------------


def test_rank_r_factors_are_exactly_the_truncated_svd_and_keep_bias_dtype_and_shape():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5).double()
    low = factorize_linear(linear, 3)
    U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    truncated = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(low.second.weight @ low.first.weight, truncated, atol=1e-12, rtol=0)
    assert torch.equal(low.second.bias, linear.bias) and low.first.bias is None
    assert low.first.weight.dtype == torch.float64 and low.rank == 3
    assert sum(p.numel() for p in low.parameters()) == 3 * (7 + 5) + 5


def test_rank_for_and_factorize_linear_refuse_bad_layers_in_one_line():
    with pytest.raises(PrunelabError, match=r"rank_for needs in_features to be a positive integer, got 0"):
        rank_for(0, 0, 0.5)  # was a ZeroDivisionError
    with pytest.raises(PrunelabError, match=r"factorize_linear needs an nn.Linear, got Conv1d"):
        factorize_linear(nn.Conv1d(1, 1, 1), 1)  # was "too many values to unpack"


def _mlp() -> nn.Module:
    from collections import OrderedDict
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act1=nn.ReLU(), fc2=nn.Linear(8, 8), act2=nn.ReLU(),
                                     fc3=nn.Linear(8, 8)))


def test_low_rank_exclude_takes_one_name_as_a_string_and_refuses_unknown_names():
    model = _mlp()
    report = low_rank_model(model, 0.25, exclude="fc2")  # was split into ('f', 'c', '2'): nothing excluded
    assert set(report.ranks) == {"fc1", "fc3"} and isinstance(model.fc2, nn.Linear)
    model = _mlp()
    with pytest.raises(PrunelabError, match=r"exclude names \['fc9'\], which are no Linear of Sequential") as info:
        low_rank_model(model, 0.25, exclude=("fc9",))  # a typo was silently ignored: every layer factorised
    assert "\n" not in str(info.value)
    assert all(isinstance(m, nn.Linear) for m in (model.fc1, model.fc2, model.fc3))
    with pytest.raises(PrunelabError, match=r"exclude must be Linear names \(strings\)"):
        low_rank_model(model, 0.25, exclude=(1,))


class _Blow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("inf")  # the next layer's second moment is not finite: it cannot be factorised


def test_a_layer_that_cannot_be_factorised_leaves_the_whole_model_unchanged_and_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), _Blow(), nn.Linear(8, 8))
    with pytest.raises(PrunelabError, match=r"^layer '4': the layer Hessian stays singular"):
        low_rank_model(model, 0.25, [torch.randn(5, 4)])
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, _Blow, nn.Linear]  # were: layers 0, 2 swapped
    low_rank_model(model, 0.25, [torch.randn(5, 4)], exclude=("4",))
    assert isinstance(model[0], LowRankLinear) and isinstance(model[4], nn.Linear)
