"""Dense targets in the one-shot engine: min ||W X - W' X~||^2 (GPTAQ's asymmetric calibration)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot import OneShotConfig, prune_oneshot
from prunelab.oneshot.stats import InputStats, PairedHessianAccumulator, dense_target_weight
from residual_mlp import Stack


def _stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack()


def _calibration(seed: int = 0, batches: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 12, generator=gen) for _ in range(batches)]


def _inputs_of(model: nn.Module, layer: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """The rows ``layer`` receives over ``batches`` ``(n, in)``."""
    seen = []
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return torch.cat(seen).double()


def _accumulate(pruned: torch.Tensor, dense: torch.Tensor) -> InputStats:
    acc = PairedHessianAccumulator(pruned.shape[1])
    for p, d in zip(pruned.split(50), dense.split(50), strict=True):
        acc.add(p, d)
    return acc.result()


def _output_error(dense: nn.Module, calibration: list, evaluation: list, dense_targets: bool = False) -> float:
    """``sum ||f_pruned(x) - f_dense(x)||^2`` over ``evaluation`` after SparseGPT to 50% on ``calibration``."""
    model = copy.deepcopy(dense)
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", dense_targets=dense_targets),
                           progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    with torch.no_grad():
        return float(sum((model(x) - dense(x)).square().sum() for x in evaluation))


def _paired_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 8, generator=gen, dtype=torch.float64)  # dense inputs
    X_pruned = X + 0.3 * torch.randn(200, 8, generator=gen, dtype=torch.float64)  # drifted inputs
    W = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    return W, X, X_pruned


def test_dense_target_weight_is_the_least_squares_solution():
    W, X, X_pruned = _paired_rows()
    stats = _accumulate(X_pruned, X)
    torch.testing.assert_close(stats.hessian, 2 * X_pruned.T @ X_pruned / 200)
    torch.testing.assert_close(stats.cross, 2 * X_pruned.T @ X / 200)
    torch.testing.assert_close(stats.dense_mean, X.mean(0))
    V = dense_target_weight(W, stats, percdamp=0.0)  # (5, 8)
    expected = torch.linalg.lstsq(X_pruned, X @ W.T).solution.T  # argmin_V ||X W^T - X~ V^T||
    torch.testing.assert_close(V, expected, atol=1e-10, rtol=0)


def test_asymmetric_error_splits_into_target_error_plus_solver_error():
    """||W X - W' X~||^2 = ||W X - V X~||^2 + ||(V - W') X~||^2 for any W': pruning V on H~ is exact."""
    W, X, X_pruned = _paired_rows(1)
    V = dense_target_weight(W, _accumulate(X_pruned, X), percdamp=0.0)
    pruned = V * (torch.rand(V.shape, generator=torch.Generator().manual_seed(2)) > 0.5)
    whole = (X @ W.T - X_pruned @ pruned.T).square().sum()
    parts = (X @ W.T - X_pruned @ V.T).square().sum() + (X_pruned @ (V - pruned).T).square().sum()
    assert float(whole) == pytest.approx(float(parts), rel=1e-10)


def test_paired_rows_must_match():
    acc = PairedHessianAccumulator(4)
    with pytest.raises(PrunelabError, match="same inputs rows"):
        acc.add(torch.zeros(3, 4), torch.zeros(2, 4))


def test_first_layer_sees_no_drift_and_matches_plain_sparsegpt():
    """Layer 1 of block 1 gets the same inputs in both models, so V = W (no dampening) and the
    solver does exactly what plain SparseGPT does; later layers differ."""
    calibration = _calibration()
    plain, dense_targets = _stack(), _stack()
    prune_oneshot(plain, calibration, OneShotConfig(method="sparsegpt", dampening=0.0), progress=False)
    prune_oneshot(dense_targets, calibration, OneShotConfig(method="sparsegpt", dampening=0.0, dense_targets=True),
                  progress=False)
    torch.testing.assert_close(dense_targets.blocks[0].fc1.weight, plain.blocks[0].fc1.weight, atol=1e-5, rtol=0)
    assert not torch.allclose(dense_targets.blocks[2].fc2.weight, plain.blocks[2].fc2.weight, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_targets_bring_model_outputs_closer_to_dense(seed):
    dense = _stack(seed)
    calibration, held_out = _calibration(seed), _calibration(seed + 100, batches=2)
    plain = _output_error(dense, calibration, held_out)
    assert _output_error(dense, calibration, held_out, dense_targets=True) < plain


def test_reported_error_is_measured_against_the_dense_outputs():
    dense = _stack(3)
    calibration = _calibration(3)
    model = copy.deepcopy(dense)
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", dense_targets=True), progress=False)
    name = "blocks.2.fc2"
    X = _inputs_of(dense, name, calibration)  # dense model's inputs
    X_pruned = _inputs_of(model, name, calibration)  # pruned model's inputs
    W = dict(dense.named_modules())[name].weight.detach().double()
    Wp = dict(model.named_modules())[name].weight.detach().double()
    expected = (X @ W.T - X_pruned @ Wp.T).square().sum() / (X @ W.T).square().sum()
    row = next(r for r in report.rows if r.name == name)
    assert row.error == pytest.approx(float(expected), rel=1e-4)


def test_bias_correction_matches_the_dense_mean_output():
    """With dense targets, b' = b + W E[x] - W' E[x~]: the layer's mean output on the pruned
    model's inputs equals the dense model's mean output."""
    dense = _stack(4)
    calibration = _calibration(4)
    model = copy.deepcopy(dense)
    prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", dense_targets=True, bias_correction=True),
                  progress=False)
    name = "blocks.2.fc2"
    dense_layer, pruned_layer = dict(dense.named_modules())[name], dict(model.named_modules())[name]
    with torch.no_grad():
        dense_mean = dense_layer(_inputs_of(dense, name, calibration).float()).double().mean(0)
        pruned_mean = pruned_layer(_inputs_of(model, name, calibration).float()).double().mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean, atol=1e-5, rtol=0)


class _SharedBlock(nn.Module):
    """One Linear called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(torch.relu(self.fc(x)))


def test_a_layer_called_twice_pairs_its_calls_in_order():
    torch.manual_seed(5)
    model = nn.Sequential(_SharedBlock(), _SharedBlock())
    dense = copy.deepcopy(model)
    calibration = _calibration(5)
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", dense_targets=True), progress=False)
    assert [r.name for r in report.rows] == ["0.fc", "1.fc"]
    assert report.sparsity == pytest.approx(0.5)
    for x in calibration:
        assert torch.isfinite(model(x)).all()
    W = dense[0].fc.weight.detach().double()
    Wp = model[0].fc.weight.detach().double()
    X = _inputs_of(dense, "0.fc", calibration)  # both calls, in order
    X_pruned = _inputs_of(model, "0.fc", calibration)
    expected = (X @ W.T - X_pruned @ Wp.T).square().sum() / (X @ W.T).square().sum()
    assert report.rows[0].error == pytest.approx(float(expected), rel=1e-4)


def test_dense_targets_need_a_hessian_method_and_a_bool():
    with pytest.raises(PrunelabError, match="dense_targets needs a method that reconstructs from a Hessian, not 'wanda'"):
        OneShotConfig(method="wanda", dense_targets=True)
    with pytest.raises(PrunelabError, match="dense_targets must be True or False"):
        OneShotConfig(dense_targets=1)
    assert OneShotConfig(method="lobs", dense_targets=True).dense_targets


def test_conv_layers_take_dense_targets_too():
    """Conv2d inputs are unfolded the same way in both models, so the pairs line up."""
    torch.manual_seed(6)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    gen = torch.Generator().manual_seed(6)
    calibration = [torch.randn(8, 3, 10, 10, generator=gen) for _ in range(3)]
    plain = _output_error(dense, calibration, calibration)
    assert _output_error(dense, calibration, calibration, dense_targets=True) < plain


def test_dead_and_duplicate_inputs_stay_finite():
    """A feature that is always zero (dead) and two identical features (a singular H~): the
    dampening escalation serves the least-squares step too, and no NaN is written."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(7)
    calibration = []
    for _ in range(3):
        x = torch.randn(40, 6, generator=gen)
        x[:, 0] = 0.0  # dead input
        x[:, 2] = x[:, 1]  # duplicated input
        calibration.append(x)
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", dampening=0.0, dense_targets=True),
                           progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.all(model[0].weight[:, 0] == 0)  # the dead input's column is cleared, as SparseGPT does
    assert report.rows[0].dampening > 0  # escalated from 0


# --- half-precision layers: the dense target stays in float32 until the final cast ----------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_target_weight_of_a_half_layer_is_the_fp32_solve(dtype):
    gen = torch.Generator().manual_seed(0)
    pruned = torch.randn(128, 12, generator=gen)
    acc = PairedHessianAccumulator(12)
    acc.add(pruned, pruned + 0.3 * torch.randn(128, 12, generator=gen))
    stats = acc.result()
    weight = torch.randn(6, 12, generator=gen).to(dtype)
    target = dense_target_weight(weight, stats, 0.01)
    assert target.dtype == torch.float32
    assert torch.equal(target, dense_target_weight(weight.float(), stats, 0.01))
    assert dense_target_weight(weight.double(), stats, 0.01).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_with_dense_targets_matches_the_fp32_run_cast_at_the_end(dtype):
    # one layer: its inputs are the calibration items themselves, so the fp16 and fp32 runs see
    # the same statistics and differ only in where the weights are rounded to the layer's dtype
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(16, 8)).to(dtype)
    full = copy.deepcopy(half).float()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(48, 16, generator=gen).to(dtype) for _ in range(2)]
    config = OneShotConfig(method="sparsegpt", dense_targets=True)
    rh = prune_oneshot(half, calibration, config, progress=False)
    rf = prune_oneshot(full, [x.float() for x in calibration], config, progress=False)
    assert torch.equal(rh.masks["0.weight"], rf.masks["0.weight"])
    assert half[0].weight.dtype == dtype
    assert torch.equal(half[0].weight, full[0].weight.to(dtype))
