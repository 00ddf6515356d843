"""Optimal Brain Surgeon (Hassibi & Stork 1992, "Second order derivatives for network
pruning: Optimal Brain Surgeon", NIPS 5; Hassibi, Stork & Wolff 1993).

With a quadratic model of the error around a minimum, deleting weight ``w_q`` and
re-optimising all others costs::

    L_q = w_q^2 / (2 [H^{-1}]_qq)                  saliency
    dw  = -(w_q / [H^{-1}]_qq) H^{-1} e_q          compensating update (sets w_q to 0)

and, once ``q`` is gone, the inverse Hessian of the remaining weights is ``H^{-1}`` with
``q`` eliminated (a rank-1 downdate; row and column ``q`` become 0)::

    H^{-1} <- H^{-1} - H^{-1} e_q e_q^T H^{-1} / [H^{-1}]_qq

Two pieces are provided:

* :func:`woodbury_inverse` -- the paper's model-level inverse of the empirical Fisher
  ``H = alpha I + (1/N) sum_m g_m g_m^T`` from ``N`` per-sample gradients, built by the
  Woodbury / Sherman-Morrison recursion of the paper::

      H_0^{-1} = alpha^{-1} I
      H_m^{-1} = H_{m-1}^{-1} - (H_{m-1}^{-1} g_m g_m^T H_{m-1}^{-1}) / (N + g_m^T H_{m-1}^{-1} g_m)

* :func:`prune_obs` -- the layer-wise use.  For the layer-wise quadratic
  ``||W X - W' X||^2`` the "gradients" are the layer inputs ``x``, and the Hessian of the
  flattened weight is block-diagonal with one identical block ``H = 2 X X^T / n`` per
  output row.  So OBS runs **row by row** with the shared ``(H + lambda I)^{-1}``: every row
  greedily removes its lowest-saliency weight, applies ``dw``, downdates its own copy of
  ``H^{-1}`` and repeats until ``round(s * cols)`` weights are gone (N:M: only weights of
  groups with more than N survivors are candidates).  This is the exact greedy OBS of the
  layer-wise problem (as in Frantar et al. 2022, "Optimal Brain Compression").

Cost: ``O(rows * k * cols^2)`` for ``k`` removals per row and a ``(rows_chunk, cols,
cols)`` float64 working set, so ``prune_obs`` is limited to layers with at most
``max_in_features`` (1024) input columns; use ``lobs`` or ``sparsegpt`` for larger ones.
To bound the number of ``(rows, cols, cols)`` passes, each step picks the ``g = ceil(k /
64)`` lowest saliencies of a row (``group_size`` overrides) and removes them one after the
other with the exact update and downdate above, applied to the group's ``g`` columns of
``H^{-1}`` only; the ``(cols, cols)`` inverse is then downdated once by the rank-``g``
product (equal to ``g`` rank-1 downdates; for the set ``Q`` it is Hassibi & Stork's joint
update ``dw = -H^{-1}[:, Q] (H^{-1}[Q, Q])^{-1} w_Q``).  Only the *choice* within a group
skips the saliency refresh: rows pruning at most 64 weights follow the exact greedy order,
larger ones a close approximation.  N:M removes one weight at a time (exact pattern).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from prunelab.errors import PrunelabError
from prunelab.oneshot.magnitude import prune_count
from prunelab.oneshot.stats import InputStats, Solution, inverse_hessian, require_hessian, require_matrix
from prunelab.structure import NM

if TYPE_CHECKING:
    from prunelab.oneshot.engine import OneShotConfig

OBS_MAX_IN_FEATURES = 1024
_MAX_STEPS = 64  # automatic group size: at most this many removal steps per row
_WORKSET_BYTES = 256 * 2**20  # per-chunk (rows_chunk, cols, cols) float64 inverse Hessians


def woodbury_inverse(grads: Tensor, alpha: float) -> Tensor:
    """``(alpha I + G^T G / N)^{-1}`` ``(P, P)`` from per-sample gradients ``grads`` ``(N, P)``
    by Hassibi & Stork's recursion (one Sherman-Morrison step per sample), float64."""
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise PrunelabError(f"woodbury_inverse needs gradients of shape (N, P) with N >= 1, got {tuple(grads.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise PrunelabError(f"woodbury_inverse needs a finite alpha > 0 (H_0 = alpha I), got {alpha!r}; e.g. 1e-4")
    n, p = grads.shape
    G = grads.detach().to(torch.float64)  # (N, P)
    hinv = torch.eye(p, dtype=torch.float64, device=G.device) / alpha  # (P, P) H_0^{-1}
    for g in G:  # g: (P,)
        v = hinv @ g  # (P,) H_{m-1}^{-1} g_m
        hinv -= torch.outer(v, v) / (n + g @ v)
    return hinv


def prune_obs(
    weight: Tensor, stats: InputStats | None, config: OneShotConfig, *,
    max_in_features: int = OBS_MAX_IN_FEATURES, group_size: int | None = None,
) -> Solution:
    """Row-wise greedy OBS for one layer ``weight`` ``(rows, cols)`` with the shared input Hessian."""
    rows, cols = require_matrix(weight, "obs")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise PrunelabError(f"obs group_size must be a positive integer or None (automatic), got {group_size!r}")
    if cols > max_in_features:
        raise PrunelabError(
            f"method 'obs' handles layers with at most {max_in_features} input features, got {cols}; "
            "use method 'lobs' or 'sparsegpt' for this layer, or exclude it"
        )
    hessian = require_hessian(stats, cols, "obs")
    nm = config.nm
    if nm is not None and cols % nm.m:
        raise PrunelabError(f"N:M block size M={nm.m} does not divide the {cols} input columns; exclude the layer")
    hinv, _, frac, dead = inverse_hessian(hessian, config.dampening)  # (cols, cols) float64
    W = weight.detach().to(torch.float64).clone()  # (rows, cols)
    hinv = hinv.to(W.device)
    W[:, dead.to(W.device)] = 0
    k = cols - cols // nm.m * nm.n if nm is not None else prune_count(cols, config.sparsity)
    if nm is not None:
        step = 1  # one at a time keeps the N:M pattern exact
    else:
        step = max(1, math.ceil(k / _MAX_STEPS)) if group_size is None else group_size
    chunk = max(1, _WORKSET_BYTES // max(1, cols * cols * 8))
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)  # (rows, cols)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        W[r0:r1], keep[r0:r1] = _greedy_rows(W[r0:r1], hinv, k, step, nm)
    return Solution(W.to(weight.dtype), keep, frac)


def _greedy_rows(w: Tensor, hinv: Tensor, k: int, step: int, nm: NM | None) -> tuple[Tensor, Tensor]:
    """Remove ``k`` weights from each row of ``w`` ``(R, P)`` by greedy OBS, ``step`` at a time;
    returns ``(w', keep)``."""
    R, P = w.shape
    w = w.clone()  # (R, P)
    Hi = hinv.contiguous().repeat(R, 1, 1)  # (R, P, P) row-major: each row's own downdated inverse
    alive = torch.ones(R, P, dtype=torch.bool, device=w.device)  # (R, P)
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    removed = 0
    while removed < k:
        g = min(step, k - removed)
        d = Hi.diagonal(dim1=1, dim2=2)  # (R, P) [H^{-1}]_qq
        eligible = alive
        if nm is not None:  # only groups that still keep more than N weights
            full = alive.view(R, -1, nm.m).sum(-1, keepdim=True) > nm.n  # (R, P/m, 1)
            eligible = alive & full.expand(R, -1, nm.m).reshape(R, P)
        saliency = torch.where(eligible, w.square() / (2.0 * d), inf)  # (R, P) L_q
        Q = torch.topk(saliency, g, dim=1, largest=False).indices  # (R, g)
        C = Hi.gather(2, Q.unsqueeze(1).expand(R, P, g))  # (R, P, g) H^{-1}[:, Q]
        V = torch.empty_like(C)  # (R, P, g): H^{-1} after the group = H^{-1} - V V^T
        for j in range(g):  # eliminate Q[:, j] from the inverse already reduced by Q[:, :j]
            c = C[:, :, j]  # (R, P) column q of the current inverse
            q = Q[:, j:j + 1]  # (R, 1)
            d_q = c.gather(1, q)  # (R, 1) [H^{-1}]_qq
            w -= (w.gather(1, q) / d_q) * c  # dw = -(w_q / [H^{-1}]_qq) H^{-1} e_q
            v = c / d_q.sqrt()  # (R, P)
            V[:, :, j] = v
            if j + 1 < g:  # the group's other columns after this elimination
                C[:, :, j + 1:] -= v.unsqueeze(2) * v.gather(1, Q[:, j + 1:]).unsqueeze(1)
        Hi.baddbmm_(V, V.transpose(1, 2), alpha=-1.0)  # H^{-1} -= H^{-1} e_q e_q^T H^{-1} / [H^{-1}]_qq, q in Q
        alive.scatter_(1, Q, False)
        w.masked_fill_(~alive, 0.0)  # removed weights stay exactly 0 (round-off in later updates)
        removed += g
    return w, alive
