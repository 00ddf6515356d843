"""Layer-wise one-shot solvers: exact results on small quadratic problems."""

from __future__ import annotations

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.oneshot import (
    SOLVERS, InputStats, OneShotConfig, prune_lobs, prune_magnitude_row, prune_obs, prune_sparsegpt, prune_wanda,
    woodbury_inverse,
)
from prunelab.structure import NM


def _problem(rows: int, cols: int, n: int = 400, seed: int = 0):
    """``W (rows, cols)``; inputs ``X (cols, n)`` with correlated features of log-normal scales
    (like activations); ``H = 2 X X^T / n`` is full rank."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(cols, n, generator=gen, dtype=torch.float64)
    mixing = torch.eye(cols, dtype=torch.float64) + 0.2 * torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    scale = torch.randn(cols, generator=gen, dtype=torch.float64).exp()  # (cols,)
    X = scale.unsqueeze(1) * (mixing @ Z)  # (cols, n)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return W, X, 2 * X @ X.T / n


def _stats(X: torch.Tensor, H: torch.Tensor) -> InputStats:
    return InputStats(hessian=H, sq_norms=X.square().sum(1), count=X.shape[1])


def _error(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - W_new) @ X).square().sum() / (W @ X).square().sum())


def _constrained_optimum(W: torch.Tensor, keep: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Per row: argmin ||(w - w') X||^2 subject to w'_j = 0 where keep is False (least squares)."""
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        F = keep[r]
        sol = torch.linalg.lstsq(X[F].T, (W[r] @ X).unsqueeze(1)).solution.squeeze(1)
        out[r, F] = sol
    return out


def test_woodbury_inverse_equals_closed_form():
    G = torch.randn(25, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha = 1e-2
    expected = torch.linalg.inv(alpha * torch.eye(6, dtype=torch.float64) + G.T @ G / G.shape[0])
    torch.testing.assert_close(woodbury_inverse(G, alpha), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(PrunelabError):
        woodbury_inverse(G, 0.0)


def test_obs_single_weight_matches_closed_form():
    W, X, H = _problem(3, 6, seed=2)
    config = OneShotConfig(method="obs", sparsity=1 / 6, dampening=0.0)
    sol = prune_obs(W, _stats(X, H), config)
    Hinv = torch.linalg.inv(H)
    saliency = W.square() / (2 * torch.diagonal(Hinv))  # (rows, cols)
    q = saliency.argmin(1)
    assert torch.equal((~sol.mask).nonzero()[:, 1], q)  # the lowest-saliency weight of each row is removed
    for r in range(3):  # dw = -w_q / [H^-1]_qq * H^-1 e_q
        expected = W[r] - W[r, q[r]] / Hinv[q[r], q[r]] * Hinv[:, q[r]]
        torch.testing.assert_close(sol.weight[r], expected, rtol=1e-9, atol=1e-9)
        # ... and that is the analytic minimiser of ||(w - w') X||^2 with w'_q = 0
        loss_increase = 0.5 * (W[r] - sol.weight[r]) @ H @ (W[r] - sol.weight[r])
        torch.testing.assert_close(loss_increase, saliency[r, q[r]], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sol.weight, _constrained_optimum(W, sol.mask, X), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("group_size", [1, 3])
def test_obs_greedy_removals_stay_optimal_for_the_mask(group_size):
    """After many removals with downdates, the kept weights are the constrained optimum."""
    W, X, H = _problem(4, 12, seed=3)
    sol = prune_obs(W, _stats(X, H), OneShotConfig(method="obs", sparsity=0.5, dampening=0.0), group_size=group_size)
    assert (sol.mask.sum(1) == 6).all()
    torch.testing.assert_close(sol.weight, _constrained_optimum(W, sol.mask, X), rtol=1e-7, atol=1e-8)


def test_obs_limits_layer_size():
    W, X, H = _problem(2, 12)
    with pytest.raises(PrunelabError, match="at most 8 input features"):
        prune_obs(W, _stats(X, H), OneShotConfig(method="obs"), max_in_features=8)


def test_lobs_selects_by_saliency_and_compensates_exactly():
    W, X, H = _problem(5, 10, seed=4)
    sol = prune_lobs(W, _stats(X, H), OneShotConfig(method="lobs", sparsity=0.6, dampening=0.0))
    saliency = W.square() / (2 * torch.diagonal(torch.linalg.inv(H)))
    assert int((~sol.mask).sum()) == 30
    assert saliency[~sol.mask].max() <= saliency[sol.mask].min()  # one-shot selection over the whole layer
    torch.testing.assert_close(sol.weight, _constrained_optimum(W, sol.mask, X), rtol=1e-8, atol=1e-9)


def test_sparsegpt_reconstructs_better_than_magnitude():
    W, X, H = _problem(16, 64, n=600, seed=5)
    config = OneShotConfig(method="sparsegpt", sparsity=0.5, dampening=0.0, block_size=16)
    sol = prune_sparsegpt(W, _stats(X, H), config)
    assert sol.dampening == 0.0
    magnitude = prune_magnitude_row(W, None, OneShotConfig(method="magnitude-row", sparsity=0.5))
    assert int(sol.mask.sum()) == int(magnitude.mask.sum()) == 16 * 32
    assert _error(W, sol.weight, X) < 0.5 * _error(W, magnitude.weight, X)
    assert torch.equal(sol.weight != 0, sol.mask)


def test_sparsegpt_lazy_block_updates_do_not_change_the_result():
    """N:M masks are chosen at the same columns from the same updated weights whatever the block size."""
    W, X, H = _problem(8, 32, seed=6)
    small = prune_sparsegpt(W, _stats(X, H), OneShotConfig(method="sparsegpt", pattern="2:4", block_size=4))
    large = prune_sparsegpt(W, _stats(X, H), OneShotConfig(method="sparsegpt", pattern="2:4", block_size=128))
    assert torch.equal(small.mask, large.mask)
    torch.testing.assert_close(small.weight, large.weight, rtol=1e-10, atol=1e-12)


def test_wanda_matches_hand_computed_scores():
    W = torch.tensor([[1.0, -2.0, 3.0, -5.0], [0.5, 3.0, -2.0, 8.0]])
    sq_norms = torch.tensor([9.0, 1.0, 4.0, 0.25])  # ||X_j|| = 3, 1, 2, 0.5
    # S = |W| * ||X_j||: row 0 -> [3, 2, 6, 2.5], row 1 -> [1.5, 3, 4, 4]
    sol = prune_wanda(W, InputStats(sq_norms=sq_norms), OneShotConfig(method="wanda", sparsity=0.5))
    assert sol.mask.tolist() == [[True, False, True, False], [False, False, True, True]]
    assert torch.equal(sol.weight, W * sol.mask)
    assert sol.dampening is None
    # plain magnitude would keep a different row 0
    assert prune_magnitude_row(W, None, OneShotConfig(method="magnitude-row")).mask[0].tolist() == [False, False, True, True]


@pytest.mark.parametrize("method", SOLVERS.names())
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_masks_satisfy_the_pattern_exactly(method, pattern):
    W, X, H = _problem(6, 16, seed=7)
    nm = NM(*(int(v) for v in pattern.split(":")))
    sol = SOLVERS.get(method).fn(W, _stats(X, H), OneShotConfig(method=method, pattern=pattern))
    assert (sol.mask.view(6, -1, nm.m).sum(-1) == nm.n).all()
    assert torch.isfinite(sol.weight).all()
    assert (sol.weight[~sol.mask] == 0).all()


@pytest.mark.parametrize("method", SOLVERS.names())
def test_achieved_sparsity_equals_target(method):
    W, X, H = _problem(8, 20, seed=8)
    sol = SOLVERS.get(method).fn(W, _stats(X, H), OneShotConfig(method=method, sparsity=0.35))
    assert int((~sol.mask).sum()) == 56  # 0.35 * 160 (per row: 7 of 20)
    assert (sol.weight[~sol.mask] == 0).all()


@pytest.mark.parametrize("method", ["sparsegpt", "lobs", "obs"])
def test_singular_hessian_gets_more_dampening_and_no_nan(method):
    W, X, _ = _problem(4, 8, seed=9)
    X = X.clone()
    X[1] = X[0]  # duplicated input feature: H is singular
    X[5] = 0.0  # dead input feature
    H = 2 * X @ X.T / X.shape[1]
    sol = SOLVERS.get(method).fn(W, _stats(X, H), OneShotConfig(method=method, sparsity=0.5, dampening=0.0))
    assert sol.dampening is not None and sol.dampening > 0.0
    assert torch.isfinite(sol.weight).all()
    assert (sol.weight[:, 5] == 0).all()  # a dead input's weights are zeroed (SparseGPT reference)


def test_all_zero_inputs_give_finite_zero_weights():
    W = torch.randn(3, 8, dtype=torch.float64)
    H = torch.zeros(8, 8, dtype=torch.float64)
    sol = prune_sparsegpt(W, InputStats(hessian=H), OneShotConfig(method="sparsegpt"))
    assert torch.isfinite(sol.weight).all() and (sol.weight == 0).all()


def test_config_rejects_bad_values():
    for kwargs, text in [({"method": "sparsgpt"}, "unknown one-shot method"), ({"sparsity": 1.2}, "sparsity"),
                         ({"pattern": "2-4"}, "N:M"), ({"pattern": "4:4"}, "N < M"), ({"dampening": -1}, "dampening"),
                         ({"block_size": 0}, "block_size"), ({"exclude": (1,)}, "exclude")]:
        with pytest.raises(PrunelabError, match=text):
            OneShotConfig(**kwargs)
    assert OneShotConfig(exclude="lm_head").exclude == ("lm_head",)


def test_solvers_check_their_statistics():
    W = torch.randn(2, 4)
    with pytest.raises(PrunelabError, match="Hessian"):
        prune_sparsegpt(W, None, OneShotConfig())
    with pytest.raises(PrunelabError, match=r"\(4, 4\)"):
        prune_lobs(W, InputStats(hessian=torch.eye(3)), OneShotConfig(method="lobs"))
    with pytest.raises(PrunelabError, match="norms"):
        prune_wanda(W, InputStats(hessian=torch.eye(4)), OneShotConfig(method="wanda"))
