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


def test_topk_zeroes_unkept_infinities_instead_of_making_nan():
    y = TopKActivation(2)(torch.tensor([[3.0, 1.0, -float("inf"), 2.0]]))
    assert y.tolist() == [[3.0, 0.0, 0.0, 2.0]]  # x * keep gave -inf * 0 = nan


def test_sparse_input_model_state_dict_loads_into_the_original_architecture():
    from collections import OrderedDict

    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.ReLU(), fc2=nn.Linear(8, 3),
                                      top=TopKActivation(2), fc3=nn.Linear(3, 2, bias=False)))
    new = sparse_input_model(model)
    assert list(new._modules) == ["fc1", "act", "fc2", "top", "fc3"]
    assert isinstance(new.fc2, SparseInputLinear) and isinstance(new.fc3, SparseInputLinear)
    state = new.state_dict()
    assert list(state) == list(model.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                                       "fc3.weight"]
    assert state["fc2.weight"].shape == (3, 8)
    fresh = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.ReLU(), fc2=nn.Linear(8, 3),
                                      top=TopKActivation(2), fc3=nn.Linear(3, 2, bias=False)))
    fresh.load_state_dict(state)  # strict
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)
    # and back: a plain Linear state_dict loads into the sparse-input copy (its transposed weight follows)
    other = sparse_input_model(fresh)
    torch.manual_seed(4)
    for p in fresh.parameters():
        p.data.normal_()
    other.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), fresh(x), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in fresh.state_dict().items() if k != "fc2.weight"})


def test_bad_inputs():
    with pytest.raises(PrunelabError, match="k must be a positive integer"):
        TopKActivation(0)
    with pytest.raises(PrunelabError, match="no activation module"):
        activation_sparsity(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])
    with pytest.raises(PrunelabError, match="needs an nn.Sequential"):
        sparse_input_model(nn.Linear(2, 2))


class FunctionalRelu(nn.Module):
    """Holds an nn.ReLU but calls torch.relu in forward: the module never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 3), nn.ReLU()

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_activation_sparsity_says_no_activation_module_ran_and_what_it_looked_for():
    with pytest.raises(PrunelabError) as info:
        activation_sparsity(FunctionalRelu(), [torch.randn(2, 4), torch.randn(2, 4)])
    message = str(info.value)
    assert "\n" not in message and "saw no batch" not in message  # it saw two batches
    assert message.startswith("no activation module ran in 2 forward pass(es) of FunctionalRelu: it has 'act' of "
                              "types ['ReLU', ") and "its forward never calls them" in message
    with pytest.raises(PrunelabError, match="saw no batch"):  # really no batch: still says so
        activation_sparsity(FunctionalRelu(), [])


def test_activation_sparsity_restores_each_module_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    activation_sparsity(model, [torch.randn(3, 4)])
    assert [m.training for m in model.modules()] == modes  # was: all modules set to train


def test_activation_sparsity_draws_no_batch_beyond_max_batches_and_refuses_a_bad_count():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    drawn = []

    def batches():
        for i in range(5):
            drawn.append(i)
            yield torch.randn(3, 4)

    stream = batches()
    activation_sparsity(model, stream, max_batches=2)
    assert drawn == [0, 1]  # was [0, 1, 2]: batch 3 was drawn and thrown away
    assert next(stream) is not None and drawn == [0, 1, 2]  # the caller's stream resumes where it stopped
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PrunelabError, match=r"max_batches=.*; expected a positive int or None"):
            activation_sparsity(model, [torch.randn(3, 4)], max_batches=bad)  # 0 was "saw no batch"


def test_topk_keeps_k_features_but_a_kept_zero_is_still_a_zero():
    # the documented sparsity 1 - k / features is a floor: a row with fewer than k nonzeros keeps zeros
    model = nn.Sequential(nn.ReLU(), TopKActivation(2))
    x = torch.tensor([[-1.0, -2.0, 3.0, -4.0]])  # one positive feature after the ReLU
    assert activation_sparsity(model, [x])["1"] == 0.75 > 1 - 2 / 4
    assert int((TopKActivation(2)(torch.randn(5, 9)) != 0).sum(1).max()) <= 2
