"""Review of the layer-wise one-shot solvers against brute-force references written here:
SparseGPT against a transcription of the paper's reference code, N:M OBS against greedy
elimination with fresh inverses, accumulators against ``X^T X`` computed at once, and the
input checks (shapes, spent accumulators, non-finite norms) found missing in review."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot import (
    SOLVERS, ColumnNormAccumulator, HessianAccumulator, InputStats, OneShotConfig, prune_lobs, prune_obs,
    prune_sparsegpt, prune_wanda, woodbury_inverse,
)
from prunelab.oneshot.diagnostics import input_norm_spread
from prunelab.oneshot.stats import PairedHessianAccumulator


def _reference_sparsegpt(W, H, sparsity=0.0, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
    """SparseGPT's ``fasterprune`` (Frantar & Alistarh 2023, reference code) transcribed in float64.
    ``prune_n`` of every ``prune_m`` are *pruned* there.  One deliberate change: the block's
    unstructured mask prunes the ``round(s * numel)`` lowest scores (the reference's
    ``<= sorted[int(s * numel)]`` prunes one more)."""
    W, H = W.clone().double(), H.clone().double()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), torch.zeros(rows, i2 - i1,
                                                                                                    dtype=W.dtype)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(round(tmp.numel() * sparsity))
            mask1 = tmp <= torch.sort(tmp.flatten())[0][k - 1] if k else torch.zeros_like(tmp, dtype=torch.bool)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if prune_n and i % prune_m == 0:
                tmp = W1[:, i:i + prune_m] ** 2 / torch.diag(Hinv1)[i:i + prune_m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def _layer(rows: int, cols: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    X = torch.randn(cols, n, generator=gen, dtype=torch.float64) * (3 * torch.rand(cols, 1, generator=gen,
                                                                                    dtype=torch.float64) + 0.1)
    return W, X


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_sparsegpt_one_block_without_dampening_matches_the_reference_algorithm(sparsity):
    W, X = _layer(5, 12, 40, seed=3)  # n = 40 > cols: H full rank, dampening 0 is accepted
    H = 2 * X @ X.T / 40
    sol = prune_sparsegpt(W, InputStats(hessian=H), OneShotConfig(sparsity=sparsity, dampening=0.0, block_size=128))
    expected = _reference_sparsegpt(W, H, sparsity, percdamp=0.0)
    assert sol.dampening == 0.0
    assert int((~sol.mask).sum()) == round(60 * sparsity)
    assert torch.equal(sol.mask, expected != 0)
    torch.testing.assert_close(sol.weight, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "4:8", "1:2"])
def test_sparsegpt_nm_matches_the_reference_algorithm(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    W, X = _layer(6, 16, 50, seed=4)
    H = 2 * X @ X.T / 50
    sol = prune_sparsegpt(W, InputStats(hessian=H), OneShotConfig(pattern=pattern, dampening=0.0))
    expected = _reference_sparsegpt(W, H, prune_n=m - n, prune_m=m, percdamp=0.0)
    assert (sol.mask.view(6, -1, m).sum(-1) == n).all()
    assert torch.equal(sol.mask, expected != 0)
    torch.testing.assert_close(sol.weight, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_size", [4, 7, 14])
def test_sparsegpt_blocks_dead_inputs_and_a_rank_deficient_hessian_match_the_reference(block_size):
    """9 calibration rows for 14 inputs (H singular without the 1% dampening), inputs 3 and 10 dead:
    the reference zeroes W[:, dead], sets H_jj = 1 and chooses each block's mask at its start."""
    W, X = _layer(6, 14, 9, seed=5)
    X[3] = 0
    X[10] = 0
    H = 2 * X @ X.T / 9
    sol = prune_sparsegpt(W, InputStats(hessian=H), OneShotConfig(sparsity=0.5, block_size=block_size))
    expected = _reference_sparsegpt(W, H, 0.5, blocksize=block_size)  # every block has an even count of weights
    assert sol.dampening == 0.01
    assert torch.equal(sol.mask, expected != 0)
    assert (sol.weight[:, [3, 10]] == 0).all()
    torch.testing.assert_close(sol.weight, expected, rtol=1e-10, atol=1e-12)


def _greedy_obs_nm(W, H, n, m, damp=0.01):
    """Per row: remove the least-saliency weight among groups of m that still keep more than n,
    re-optimising the others with a freshly inverted H[F, F], until n of every m are left."""
    H = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out, keep = W.clone(), torch.ones_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        alive = list(range(W.shape[1]))
        while len(alive) > W.shape[1] // m * n:
            Hinv = torch.linalg.inv(H[alive][:, alive])
            saliency = out[r, alive].square() / (2 * torch.diagonal(Hinv))
            for j, c in enumerate(alive):
                if sum(1 for a in alive if a // m == c // m) <= n:
                    saliency[j] = float("inf")
            j = int(saliency.argmin())
            out[r, alive] -= out[r, alive[j]] / Hinv[j, j] * Hinv[:, j]
            keep[r, alive.pop(j)] = False
        out[r, ~keep[r]] = 0
    return out, keep


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "1:2"])
def test_obs_nm_is_greedy_obs_restricted_to_groups_that_can_still_lose_a_weight(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    W, X = _layer(3, 8, 30, seed=2)
    X[2] += X[1]  # correlated inputs: the order of removals matters
    H = 2 * X @ X.T / 30
    sol = prune_obs(W, InputStats(hessian=H), OneShotConfig(method="obs", pattern=pattern))
    expected, keep = _greedy_obs_nm(W, H, n, m)
    assert torch.equal(sol.mask, keep)
    torch.testing.assert_close(sol.weight, expected, rtol=1e-10, atol=1e-12)


def test_lobs_row_that_loses_every_weight_is_zero_and_the_others_are_optimal():
    W, X = _layer(3, 6, 20, seed=0)
    W[0] *= 1e-3  # the whole of row 0 has the lowest saliencies of the layer
    H = 2 * X @ X.T / 20
    sol = prune_lobs(W, InputStats(hessian=H), OneShotConfig(method="lobs", sparsity=0.5, dampening=0.0))
    assert not sol.mask[0].any() and (sol.weight[0] == 0).all()
    for r in (1, 2):  # argmin (w - w') H (w - w')^T with w'_Q = 0, solved directly
        F = sol.mask[r]
        expected = torch.zeros(6, dtype=torch.float64)
        expected[F] = torch.linalg.solve(H[F][:, F], H[F] @ W[r])
        torch.testing.assert_close(sol.weight[r], expected, rtol=1e-9, atol=1e-10)


def test_wanda_nm_and_per_row_counts_on_hand_computed_scores():
    W = torch.tensor([[4.0, -1.0, 0.5, 2.0, 1.0, 1.0, -3.0, 0.2]])
    sq_norms = torch.tensor([0.01, 4.0, 16.0, 1.0, 1.0, 9.0, 0.25, 100.0])  # ||X_j|| = .1 2 4 1 1 3 .5 10
    # S = [0.4, 2, 2, 2, 1, 3, 1.5, 2]: 2:4 keeps {1, 2} of the first group (ties: lower index), {5, 7} of the second
    nm = prune_wanda(W, InputStats(sq_norms=sq_norms), OneShotConfig(method="wanda", pattern="2:4"))
    assert nm.mask.tolist() == [[False, True, True, False, False, True, False, True]]
    row = prune_wanda(W, InputStats(sq_norms=sq_norms), OneShotConfig(method="wanda", sparsity=0.25))
    assert row.mask.tolist() == [[False, True, True, True, False, True, True, True]]  # the 2 lowest: 0.4 and 1


@pytest.mark.parametrize("method", SOLVERS.names())
def test_all_equal_and_all_zero_rows_still_prune_the_exact_count(method):
    W, X = _layer(4, 8, 30, seed=6)
    W[0] = 1.0  # every score of the row ties
    W[1] = 0.0  # a row of zeros
    H = 2 * X @ X.T / 30
    sol = SOLVERS.get(method).fn(W, InputStats(hessian=H, sq_norms=X.square().sum(1)),
                                 OneShotConfig(method=method, sparsity=0.375))
    assert int((~sol.mask).sum()) == 12  # 0.375 * 32 (per row: 3 of 8)
    if method in ("wanda", "magnitude-row", "obs"):
        assert (sol.mask.sum(1) == 5).all()
    assert (sol.weight[~sol.mask] == 0).all() and torch.isfinite(sol.weight).all()


@pytest.mark.parametrize("method", SOLVERS.names())
def test_float32_weights_give_the_float64_result(method):
    W, X = _layer(6, 16, 60, seed=7)
    stats = InputStats(hessian=2 * X @ X.T / 60, sq_norms=X.square().sum(1))
    config = OneShotConfig(method=method, sparsity=0.5)
    a = SOLVERS.get(method).fn(W, stats, config)
    b = SOLVERS.get(method).fn(W.float(), stats, config)
    assert b.weight.dtype == torch.float32 and a.weight.dtype == torch.float64
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.weight.double(), a.weight, rtol=1e-5, atol=1e-6)


def test_accumulators_over_uneven_float16_batches_equal_the_sums_at_once():
    gen = torch.Generator().manual_seed(8)
    x = (3 * torch.randn(50, 7, generator=gen)).half()  # (n, cols)
    hess, norms = HessianAccumulator(7), ColumnNormAccumulator(7)
    for lo, hi in [(0, 3), (3, 3), (3, 20), (20, 21), (21, 50)]:  # an empty batch and a single row among them
        hess.add(x[lo:hi])
        norms.add(x[lo:hi].float())
    x64 = x.double()  # float16 -> float64 is exact: the sums may differ only by float64 round-off
    h, c = hess.result(), norms.result()
    assert h.count == c.count == 50
    torch.testing.assert_close(h.hessian, 2 * x64.T @ x64 / 50, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.mean, x64.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.sq_norms, x64.square().sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.mean, x64.mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [HessianAccumulator, ColumnNormAccumulator])
def test_accumulators_refuse_rows_of_the_wrong_shape_without_changing(make):
    acc = make(4)
    acc.add(torch.ones(2, 4))
    for bad in (torch.ones(4), torch.ones(2, 3), torch.ones(1, 2, 4)):  # was a RuntimeError (or a broadcast)
        with pytest.raises(PrunelabError, match=r"rows of shape \(n, 4\)") as info:
            acc.add(bad)
        assert "\n" not in str(info.value)
    assert acc.count == 2 and float(acc.total.sum()) == 8.0


@pytest.mark.parametrize("make", [HessianAccumulator, ColumnNormAccumulator, PairedHessianAccumulator])
def test_a_spent_accumulator_refuses_a_second_result_and_more_rows(make):
    acc = make(3)
    rows = torch.arange(6.0).view(2, 3)
    acc.add(*(rows,) * (2 if make is PairedHessianAccumulator else 1))
    first = acc.result()
    kept = (first.hessian if first.hessian is not None else first.sq_norms).clone()
    with pytest.raises(PrunelabError, match="after result"):  # was: H scaled by 2/n a second time, silently
        acc.result()
    with pytest.raises(PrunelabError, match="after result"):
        acc.add(*(rows,) * (2 if make is PairedHessianAccumulator else 1))
    assert torch.equal(first.hessian if first.hessian is not None else first.sq_norms, kept)


@pytest.mark.parametrize("method", SOLVERS.names())
def test_solvers_refuse_weights_that_are_not_matrices(method):
    stats = InputStats(hessian=torch.eye(6, dtype=torch.float64), sq_norms=torch.ones(6, dtype=torch.float64))
    for weight in (torch.ones(6), torch.ones(2, 3, 6)):  # was IndexError / ValueError (or a silent 1-D mask)
        with pytest.raises(PrunelabError, match="2-D weight") as info:
            SOLVERS.get(method).fn(weight, stats, OneShotConfig(method=method))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", SOLVERS.names())
def test_a_layer_without_inputs_gives_an_empty_solution(method):
    stats = InputStats(hessian=torch.zeros(0, 0, dtype=torch.float64), sq_norms=torch.zeros(0, dtype=torch.float64))
    sol = SOLVERS.get(method).fn(torch.zeros(3, 0), stats, OneShotConfig(method=method))  # was a RuntimeError
    assert sol.weight.shape == sol.mask.shape == (3, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_wanda_refuses_norms_that_are_not_finite_sums_of_squares(bad):
    sq_norms = torch.tensor([1.0, 4.0, bad, 9.0])
    with pytest.raises(PrunelabError, match="negative, inf or NaN") as info:  # was: an arbitrary mask
        prune_wanda(torch.randn(2, 4), InputStats(sq_norms=sq_norms), OneShotConfig(method="wanda"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("group_size", [0, -2, 2.5, True, "3"])
def test_obs_group_size_must_be_a_positive_integer(group_size):
    W, X = _layer(2, 6, 20, seed=9)
    with pytest.raises(PrunelabError, match="group_size"):  # 0 and -2 were silently 1, 2.5 silently 2
        prune_obs(W, InputStats(hessian=2 * X @ X.T / 20), OneShotConfig(method="obs"), group_size=group_size)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), "1", None])
def test_woodbury_inverse_refuses_alpha_that_is_not_a_finite_positive_number(alpha):
    with pytest.raises(PrunelabError, match="alpha"):  # inf gave H^-1 = 0, "1" a TypeError
        woodbury_inverse(torch.ones(3, 2), alpha)


def test_woodbury_recursion_equals_the_empirical_fisher_inverse_with_more_params_than_samples():
    G = torch.randn(3, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)  # N < P
    expected = torch.linalg.inv(0.5 * torch.eye(8, dtype=torch.float64) + G.T @ G / 3)
    torch.testing.assert_close(woodbury_inverse(G, 0.5), expected, rtol=1e-10, atol=1e-12)


def test_input_norm_spread_refuses_nan_inputs():
    model = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(PrunelabError, match="layer '0' received non-finite inputs") as info:  # was reported as inf
        input_norm_spread(model, [torch.tensor([[float("nan"), 1.0], [2.0, 1.0]])])
    assert "\n" not in str(info.value) and not model[0]._forward_pre_hooks
