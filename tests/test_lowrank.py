"""Low-rank factorisation: exact at full rank, Eckart-Young optimal, whitening wins on the outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.lowrank import LowRankLinear, factorize_linear, low_rank_model, rank_for


def test_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    for moment in (None, (x.T @ x) / 5):
        low = factorize_linear(linear, 4, moment, dampening=0.0)
        torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=0)


def test_plain_svd_error_is_the_dropped_singular_values():
    torch.manual_seed(1)
    linear = nn.Linear(8, 6, bias=False)
    low = factorize_linear(linear, 2)
    W = linear.weight.detach().double()
    approx = (low.second.weight @ low.first.weight).detach().double()
    dropped = torch.linalg.svdvals(W)[2:]
    assert float((W - approx).norm()) == pytest.approx(float(dropped.norm()), rel=1e-5)  # Eckart-Young


def test_whitened_svd_minimises_the_output_error_on_its_inputs():
    torch.manual_seed(2)
    linear = nn.Linear(8, 6)
    x = torch.randn(200, 8) * torch.linspace(0.1, 5.0, 8)  # very uneven input scales
    moment = (x.T @ x) / x.shape[0]
    with torch.no_grad():
        y = linear(x)
        plain = (factorize_linear(linear, 2)(x) - y).norm()
        aware = (factorize_linear(linear, 2, moment, dampening=0.0)(x) - y).norm()
        # the optimum over rank-2 W' of ||(W - W') X||: the dropped singular values of W L
        L = torch.linalg.cholesky(moment.double())
        floor = torch.linalg.svdvals(linear.weight.detach().double() @ L)[2:].norm() * x.shape[0] ** 0.5
    assert float(aware) == pytest.approx(float(floor), rel=1e-4)
    assert aware < plain


def test_model_keeps_the_weight_budget_and_layers_outside_blocks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    x = torch.randn(10, 16)
    report = low_rank_model(model, 0.5, [x], exclude=("4",))
    assert report.ranks == {"0": rank_for(16, 32, 0.5), "2": rank_for(32, 24, 0.5)} == {"0": 5, "2": 6}
    assert isinstance(model[0], LowRankLinear) and isinstance(model[4], nn.Linear)
    assert (report.weights_before, report.weights_after) == (16 * 32 + 32 * 24, 5 * 48 + 6 * 56)  # excluded: not counted
    assert report.keep == pytest.approx(576 / 1280)
    assert model(x).shape == (10, 4)


def test_bad_inputs():
    with pytest.raises(PrunelabError, match=r"keep must be a fraction"):
        rank_for(4, 4, 0.0)
    with pytest.raises(PrunelabError, match=r"rank must be an integer in \[1, 4\]"):
        factorize_linear(nn.Linear(4, 6), 5)
    with pytest.raises(PrunelabError, match=r"no nn.Linear \(or transformers Conv1D\) layer"):
        low_rank_model(nn.Sequential(nn.ReLU(), nn.Tanh()), 0.5)


def test_a_wrong_second_moment_or_keep_is_a_one_line_error():
    linear = nn.Linear(12, 8)
    with pytest.raises(PrunelabError, match=r"second_moment must be the \(12, 12\) input .* got \(5, 5\)"):
        factorize_linear(linear, 2, torch.eye(5))  # was a RuntimeError from the matmul
    with pytest.raises(PrunelabError, match=r"second_moment must be the \(12, 12\).* got \(12,\)"):
        factorize_linear(linear, 2, torch.ones(12))
    with pytest.raises(PrunelabError, match=r"second_moment must be .* got list"):
        factorize_linear(linear, 2, [[1.0]])
    for keep in ("a", None, True, float("nan"), 1.5):
        with pytest.raises(PrunelabError, match=r"keep must be a fraction of the weights in \(0, 1\]"):
            rank_for(12, 8, keep)  # "a" was a TypeError
    assert rank_for(12, 8, 1) == 4  # an int 1 is a fraction too
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(PrunelabError, match="keep must be a fraction"):
        low_rank_model(model, "a", [torch.randn(3, 4)])
    assert isinstance(model[0], nn.Linear)


def test_calibration_restores_modes_and_new_layers_keep_mode_and_frozen_weights():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 4))
    model.eval()
    model[1].train()  # mixed modes come back as they were
    model[3].weight.requires_grad_(False)
    low_rank_model(model, 0.5, [torch.randn(10, 16)])
    assert isinstance(model[0], LowRankLinear) and isinstance(model[3], LowRankLinear)
    assert model[1].training  # was: every module set to eval
    assert not any(m.training for i, layer in enumerate(model) if i != 1 for m in layer.modules())
    assert not model[3].first.weight.requires_grad and not model[3].second.weight.requires_grad
    assert model[3].second.bias.requires_grad and model[0].first.weight.requires_grad


def test_bad_dampening_and_calibration_items_are_one_line_errors():
    linear = nn.Linear(4, 3)
    for dampening in ("a", -1.0, float("nan"), True):
        with pytest.raises(PrunelabError, match=r"dampening must be a finite number >= 0"):
            factorize_linear(linear, 2, torch.eye(4), dampening=dampening)  # "a" was a TypeError, -1 accepted
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(PrunelabError, match=r"dampening must be"):
        low_rank_model(model, 0.5, [torch.randn(3, 4)], dampening=-0.5)
    with pytest.raises(PrunelabError, match=r"calibration item 0 is a tuple; expected model inputs"):
        low_rank_model(model, 0.5, [(torch.randn(3, 4), torch.zeros(3))])  # was an AttributeError in a hook
    assert isinstance(model[0], nn.Linear)


def test_whitened_svd_spends_no_rank_on_inputs_dead_on_the_calibration_data():
    # input 2 is zero on every row (a dead ReLU unit) but its weight column is huge; its H_ii
    # is set to 1 for the Cholesky, which made the rank-1 SVD of W L pick that column:
    # output error 9.98 of 10.37 (nothing approximated) instead of the optimum 2.83
    torch.manual_seed(0)
    linear = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.5, 100.0], [0.5, 1.0, -100.0]]))
    x = torch.randn(50, 3)
    x[:, 2] = 0.0
    moment = (x.T @ x) / 50
    low = factorize_linear(linear, 1, moment, dampening=0.0)
    with torch.no_grad():
        error = (low(x) - linear(x)).norm()
        L = torch.linalg.cholesky(moment[:2, :2].double())  # the live inputs' second moment
        floor = torch.linalg.svdvals(linear.weight.double()[:, :2] @ L)[1:].norm() * 50 ** 0.5
        approx = low.second.weight @ low.first.weight
    assert float(error) == pytest.approx(float(floor), rel=1e-4)
    assert approx[:, 2].abs().max() == 0.0  # SparseGPT's convention: a dead input's column is zero


@pytest.mark.parametrize(("in_f", "out_f", "keep", "rank"), [(12, 15, 0.3, 2), (10, 15, 1 / 3, 2), (28, 21, 1 / 6, 2),
                                                              (24, 20, 11 / 30, 4), (16, 32, 0.5, 5)])
def test_rank_for_is_exact_for_decimal_keeps(in_f, out_f, keep, rank):
    # 0.3 * 12 * 15 / 27 = 2 exactly, but the float 0.3 is a hair below 0.3: floor gave 1
    assert rank_for(in_f, out_f, keep) == rank
    assert rank * (in_f + out_f) <= keep * in_f * out_f * (1 + 1e-9)


def test_a_linear_used_twice_is_factorised_once_at_every_use():
    # a shared Linear was replaced at its first name only: the second use stayed dense (the tie
    # broken) while the report counted its weights as factorised
    torch.manual_seed(5)
    shared = nn.Linear(8, 8, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = low_rank_model(model, 0.25)
    assert report.ranks == {"0": 1} and (report.weights_before, report.weights_after) == (64, 16)
    assert isinstance(model[0], LowRankLinear) and model[2] is model[0]
    assert sum(p.numel() for p in model.parameters()) == report.weights_after


def test_excluding_one_use_of_a_shared_linear_leaves_it_dense():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 8))
    report = low_rank_model(model, 0.25, exclude=("2",))  # excluded at one use: dense at every use
    assert model[0] is shared and model[2] is shared and set(report.ranks) == {"3"}


def test_a_conv1d_is_factorised_exactly_as_its_transposed_linear(monkeypatch):
    from conv1d_stand_in import register

    Conv1D = register(monkeypatch)  # found by type as transformers.pytorch_utils.Conv1D, as the engine finds it
    torch.manual_seed(0)
    conv_model = nn.Sequential(Conv1D(12, 10), nn.ReLU(), Conv1D(10, 12))  # 10 -> 12 -> 10
    with torch.no_grad():
        for p in conv_model.parameters():
            p.normal_()
    linear_model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 10))
    with torch.no_grad():
        for conv, linear in zip(conv_model[::2], linear_model[::2]):
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
    conv_model[2].weight.requires_grad_(False)
    x = torch.randn(64, 10)
    calibration = [x[:32], x[32:]]
    conv_report = low_rank_model(conv_model, 0.5, calibration)
    linear_report = low_rank_model(linear_model, 0.5, calibration)
    assert conv_report.ranks == linear_report.ranks == {"0": 2, "2": 2}  # 0.5 * 120 / 22 = 2.7 -> 2
    assert (conv_report.weights_before, conv_report.weights_after) == (240, 88)
    for a, b in zip(conv_model.parameters(), linear_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same factors, bit for bit
    assert not conv_model[2].first.weight.requires_grad and conv_model[0].first.weight.requires_grad
    torch.testing.assert_close(conv_model(x), linear_model(x), rtol=0, atol=0)
