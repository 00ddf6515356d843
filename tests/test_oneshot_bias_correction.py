"""Bias correction in the one-shot engine: b' = b + (W - W') E[x] (Nagel et al. 2019)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot import OneShotConfig, prune_oneshot


def _shifted_calibration(seed: int = 0) -> list[torch.Tensor]:
    """Inputs with a clearly nonzero mean per feature, as after a LayerNorm or a GELU."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-2.0, 3.0, 12)
    return [torch.randn(40, 12, generator=gen) + offset for _ in range(3)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_bias_absorbs_the_mean_output_change(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6))
    dense_weight, dense_bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    calibration = _shifted_calibration()
    config = OneShotConfig(method=method, sparsity=0.5, bias_correction=True)
    report = prune_oneshot(model, calibration, config, progress=False)
    X = torch.cat(calibration).double()  # (120, 12)
    W, Wp = dense_weight.double(), model[0].weight.detach().double()
    expected_bias = dense_bias.double() + (W - Wp) @ X.mean(0)
    torch.testing.assert_close(model[0].bias.detach().double(), expected_bias, atol=1e-6, rtol=0)
    with torch.no_grad():  # the invariant: the mean output over the calibration set is unchanged
        dense_mean = F.linear(X, W, dense_bias.double()).mean(0)
        pruned_mean = model(X.float()).double().mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean, atol=1e-5, rtol=0)
    change = X @ (W - Wp).T - (expected_bias - dense_bias.double())  # the error the row reports
    assert report.rows[0].error == pytest.approx(float(change.square().sum() / (X @ W.T).square().sum()), rel=1e-5)


def test_correction_lowers_the_reported_error_and_keeps_the_mask():
    def run(correct: bool):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(12, 6))
        report = prune_oneshot(model, _shifted_calibration(1), OneShotConfig(method="wanda", sparsity=0.5,
                                                                              bias_correction=correct), progress=False)
        return report

    plain, corrected = run(False), run(True)
    assert torch.equal(plain.masks["0.weight"], corrected.masks["0.weight"])  # weights untouched, only the bias
    assert corrected.rows[0].error < plain.rows[0].error


def test_layers_without_bias_are_left_alone():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 4))
    report = prune_oneshot(model, _shifted_calibration(2), OneShotConfig(method="magnitude", sparsity=0.5,
                                                                          bias_correction=True), progress=False)
    assert model[0].bias is None and len(report.rows) == 2


def test_bias_correction_must_be_a_bool():
    with pytest.raises(PrunelabError, match="bias_correction must be True or False"):
        OneShotConfig(bias_correction="yes")
