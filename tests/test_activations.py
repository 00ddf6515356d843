"""Sparse activations: exact k-WTA, measured zero fractions, a sparse-input Linear equal to the dense one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab.activations import SparseInputLinear, TopKActivation, activation_sparsity, sparse_input_model
from prunelab.errors import PrunelabError


def test_topk_keeps_exactly_the_k_largest_and_passes_their_gradient():
    x = torch.tensor([[0.5, -2.0, 3.0, 1.0], [4.0, 0.1, -1.0, 2.0]], requires_grad=True)
    y = TopKActivation(2)(x)
    assert y.tolist() == [[0.0, 0.0, 3.0, 1.0], [4.0, 0.0, 0.0, 2.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]]


def test_measured_sparsity_is_one_minus_k_over_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), TopKActivation(3), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))
    x = torch.randn(64, 8)
    sparsity = activation_sparsity(model, [x[:32], (x[32:], None)])
    assert sparsity["1"] == pytest.approx(1 - 3 / 20)
    relu_out = torch.relu(model[2](model[1](model[0](x))))
    assert sparsity["3"] == pytest.approx(float((relu_out == 0).float().mean()))


def test_sparse_input_linear_equals_the_dense_layer():
    torch.manual_seed(1)
    dense = nn.Linear(50, 7)
    x = TopKActivation(4)(torch.randn(3, 5, 50))  # (3, 5, 50), 4 nonzeros per row
    sparse = SparseInputLinear(dense)
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse(torch.zeros(2, 50)), dense.bias.expand(2, 7).detach())  # no active column


def test_sparse_input_model_swaps_only_linears_after_activations():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), TopKActivation(2), nn.Linear(16, 3))
    new = sparse_input_model(model)
    assert [type(m).__name__ for m in new] == ["Linear", "ReLU", "SparseInputLinear", "TopKActivation",
                                               "SparseInputLinear"]
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=0)
    assert isinstance(model[2], nn.Linear)  # the original is untouched


def test_bad_inputs():
    with pytest.raises(PrunelabError, match="k must be a positive integer"):
        TopKActivation(0)
    with pytest.raises(PrunelabError, match="no activation module"):
        activation_sparsity(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])
    with pytest.raises(PrunelabError, match="needs an nn.Sequential"):
        sparse_input_model(nn.Linear(2, 2))
