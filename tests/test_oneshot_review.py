"""Review regressions for the one-shot solvers: float64 magnitude scores, non-finite Hessians,
N:M divisibility messages."""

from __future__ import annotations

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.oneshot import SOLVERS, InputStats, OneShotConfig


@pytest.mark.parametrize("method", ["magnitude", "magnitude-row"])
def test_magnitude_scores_keep_float64_precision(method):
    # 1.0 and 1.0 + 1e-12 are one float32 value: a float32 score made them a tie and pruned index 1
    W = torch.tensor([[1.0, 1.0 + 1e-12, 3.0, 4.0]], dtype=torch.float64)
    sol = SOLVERS.get(method).fn(W, None, OneShotConfig(method=method, sparsity=0.25))
    assert sol.mask.tolist() == [[False, True, True, True]]
    assert sol.weight.tolist() == [[0.0, 1.0 + 1e-12, 3.0, 4.0]]


@pytest.mark.parametrize("method", ["sparsegpt", "obs", "lobs"])
def test_non_finite_hessian_is_reported_as_such(method):
    H = torch.eye(4, dtype=torch.float64)
    H[1, 1] = float("nan")  # was reported as "stays singular even with dampening 100"
    with pytest.raises(PrunelabError, match="inf/NaN") as info:
        SOLVERS.get(method).fn(torch.ones(2, 4), InputStats(hessian=H), OneShotConfig(method=method))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "magnitude-row", "lobs"])
def test_nm_columns_not_divisible_by_m_name_the_layer_shape(method):
    W = torch.ones(3, 10)
    stats = InputStats(hessian=torch.eye(10, dtype=torch.float64), sq_norms=torch.ones(10, dtype=torch.float64))
    with pytest.raises(PrunelabError, match=r"M=4 does not divide the 10 input columns of a \(3, 10\) weight") as info:
        SOLVERS.get(method).fn(W, stats, OneShotConfig(method=method, pattern="2:4"))
    assert "a tensor" not in str(info.value) and "--keep-first" not in str(info.value)
