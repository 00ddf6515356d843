"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023,
"A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

Score every weight by its magnitude times the norm of the input feature it multiplies::

    S_ij = |W_ij| * ||X_j||_2            W: (rows, cols), X: (cols, n) calibration inputs

and remove the lowest fraction ``s`` of **each output row** (Wanda's comparison group,
Sec. 3 of the paper: per-output pruning beats per-layer for LLMs).  With an N:M pattern
the N highest-scoring weights of every M consecutive input columns are kept.  Kept
weights are not updated (no Hessian, no reconstruction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from prunelab.errors import PrunelabError
from prunelab.oneshot.magnitude import select_mask
from prunelab.oneshot.stats import InputStats, Solution, require_matrix

if TYPE_CHECKING:
    from prunelab.oneshot.engine import OneShotConfig


def wanda_scores(weight: Tensor, sq_norms: Tensor) -> Tensor:
    """``S = |W| * sqrt(sq_norms)`` ``(rows, cols)`` from ``||X_j||^2`` ``(cols,)``."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    norms = sq_norms.to(device=weight.device, dtype=dtype).sqrt()  # (cols,)
    return weight.detach().abs().to(dtype) * norms.unsqueeze(0)  # (rows, cols)


def prune_wanda(weight: Tensor, stats: InputStats | None, config: OneShotConfig) -> Solution:
    """Wanda mask (per output row, or N:M) and the masked weight."""
    _, cols = require_matrix(weight, "wanda")
    if stats is None or stats.sq_norms is None or tuple(stats.sq_norms.shape) != (cols,):
        raise PrunelabError(
            f"method 'wanda' needs the squared input norms ||X_j||^2 of shape ({cols},); "
            "pass InputStats(sq_norms=...) (the engine collects them)"
        )
    if not bool((torch.isfinite(stats.sq_norms) & (stats.sq_norms >= 0)).all()):  # NaN scores: an arbitrary mask
        raise PrunelabError(
            "method 'wanda' got squared input norms ||X_j||^2 that are negative, inf or NaN; pass sums of squares "
            "of finite calibration inputs (check the layers before this one for inf/NaN activations)"
        )
    keep = select_mask(wanda_scores(weight, stats.sq_norms), config, per_row=True)  # (rows, cols)
    return Solution(weight.detach() * keep, keep)
