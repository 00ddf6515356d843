"""Layer-wise Optimal Brain Surgeon (Dong, Chen & Pan 2017, "Learning to Prune Deep
Neural Networks via Layer-wise Optimal Brain Surgeon", NeurIPS 2017).

L-OBS replaces the network loss by each layer's reconstruction error
``E = ||W X - W' X||^2 / (2n)``, whose Hessian is the input covariance (Dong et al.,
up to a constant factor that cancels below)::

    H = 2 X X^T / n     (cols, cols), the same block for every output row

Exact procedure used here (one shot per layer):

1. Damp and invert: ``H_d = H + lambda I``, ``lambda = dampening * mean(diag H)``
   (dead inputs with ``H_ii = 0`` get ``H_ii = 1`` and ``W[:, i] = 0``, as SparseGPT).
2. Saliency of every weight (OBS, Hassibi & Stork 1992, as used by Dong et al.)::

       L_ij = W_ij^2 / (2 [H_d^{-1}]_jj)          (rows, cols)

   and **one-shot selection** of the ``round(s * rows * cols)`` lowest saliencies of the
   whole layer (L-OBS sets one compression ratio per layer; N:M: the N highest of every M
   consecutive columns of a row).
3. **Compensating update**: for each row with kept set ``F`` and pruned set ``Q``, the
   exact minimiser of the layer-wise quadratic under ``w'_Q = 0``::

       w'_F = w_F + (H_d[F, F])^{-1} H_d[F, Q] w_Q
            = w_F - [H_d^{-1}]_{F,Q} ([H_d^{-1}]_{Q,Q})^{-1} w_Q     (OBS multi-weight form)

   whichever system is smaller is solved (Cholesky), so the cost is
   ``O(rows * min(|F|, |Q|)^3)``.

This differs from Dong et al.'s Algorithm 1, which removes weights one at a time with
the *fixed* ``H^{-1}`` (no downdate, so later updates may revive pruned weights); the
joint update above is the exact optimum for the selected mask (what OBC / SparseGPT call
the optimal reconstruction for a given mask).  Greedy removal with downdates is ``obs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from prunelab.oneshot.magnitude import select_mask
from prunelab.oneshot.stats import InputStats, Solution, inverse_hessian, require_hessian, require_matrix

if TYPE_CHECKING:
    from prunelab.oneshot.engine import OneShotConfig


def _spd_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix^{-1} rhs`` for a symmetric positive definite ``matrix`` ``(k, k)``, ``rhs`` ``(k,)``."""
    chol = torch.linalg.cholesky(matrix)  # (k, k)
    return torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)  # (k,)


def compensate(weight: Tensor, keep: Tensor, hessian: Tensor, hessian_inv: Tensor) -> Tensor:
    """Optimal kept weights for a fixed mask: per row, minimise ``(w'-w)^T H (w'-w)`` s.t.
    ``w'_Q = 0``.  ``weight``/``keep`` ``(rows, cols)``; ``hessian``/``hessian_inv`` the damped
    ``H`` and its inverse ``(cols, cols)``, float64.  Returns float64 ``(rows, cols)``."""
    W = weight.to(torch.float64).clone()  # (rows, cols)
    for r in range(W.shape[0]):
        F = keep[r]  # (cols,) kept
        Q = ~F  # (cols,) pruned
        num_q = int(Q.sum())
        if num_q == 0:
            continue
        w_q = W[r, Q]  # (|Q|,)
        if num_q <= W.shape[1] - num_q:  # OBS form: dw = -Hinv[:, Q] Hinv[Q, Q]^{-1} w_Q
            z = _spd_solve(hessian_inv[Q][:, Q], w_q)  # (|Q|,)
            W[r] -= hessian_inv[:, Q] @ z
        else:  # restricted normal equations: w_F += H[F, F]^{-1} H[F, Q] w_Q
            W[r, F] += _spd_solve(hessian[F][:, F], hessian[F][:, Q] @ w_q)
        W[r, Q] = 0.0
    return W


def prune_lobs(weight: Tensor, stats: InputStats | None, config: OneShotConfig) -> Solution:
    """L-OBS for one layer: saliency selection per layer, then the exact compensating update."""
    _, cols = require_matrix(weight, "lobs")
    hessian = require_hessian(stats, cols, "lobs")
    hinv, damped, frac, dead = inverse_hessian(hessian, config.dampening)  # (cols, cols) float64
    W = weight.detach().to(torch.float64).clone()  # (rows, cols)
    W[:, dead.to(W.device)] = 0
    hinv, damped = hinv.to(W.device), damped.to(W.device)
    saliency = W.square() / (2.0 * torch.diagonal(hinv)).unsqueeze(0)  # (rows, cols)
    keep = select_mask(saliency, config, per_row=False)  # (rows, cols)
    new = compensate(W, keep, damped, hinv)
    return Solution(new.to(weight.dtype), keep, frac)
