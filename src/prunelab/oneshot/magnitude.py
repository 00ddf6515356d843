"""Magnitude baselines for one-shot pruning, and the mask-selection helpers all solvers share.

* ``magnitude`` -- per layer: prune the ``round(s * rows * cols)`` weights of smallest
  ``|W_ij|`` in the whole layer (Han et al. 2015, "Learning both Weights and Connections",
  applied once and per layer instead of iteratively).
* ``magnitude-row`` -- per output row: prune the ``round(s * cols)`` smallest ``|W_ij|``
  of every row (the same comparison group as Wanda, without the input norms).

Neither needs calibration statistics nor updates the kept weights.  With an N:M pattern
both keep the N largest ``|W_ij|`` of every M consecutive input columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from prunelab.errors import PrunelabError
from prunelab.oneshot.stats import InputStats, Solution, require_matrix

if TYPE_CHECKING:
    from prunelab.oneshot.engine import OneShotConfig


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a target ``sparsity`` removes (nearest whole weight)."""
    return int(round(sparsity * total))


def lowest_per_row(scores: Tensor, k: int) -> Tensor:
    """Keep-mask ``(rows, cols)`` dropping the ``k`` lowest scores of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)  # (rows, cols)
    if k > 0:
        drop = torch.topk(scores, k, dim=1, largest=False).indices  # (rows, k)
        keep.scatter_(1, drop, False)
    return keep


def lowest_in_layer(scores: Tensor, k: int) -> Tensor:
    """Keep-mask dropping the ``k`` lowest scores of the whole tensor."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)  # (rows * cols,)
    if k > 0:
        keep[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return keep.view(scores.shape)


def select_mask(scores: Tensor, config: OneShotConfig, *, per_row: bool) -> Tensor:
    """Keep-mask for ``scores`` ``(rows, cols)`` (higher = keep) under ``config``:
    N:M along columns when ``config.pattern`` is set, else the lowest fraction
    ``config.sparsity`` per row (``per_row``) or of the whole layer."""
    nm = config.nm
    if nm is not None:
        if scores.dim() != 2 or scores.shape[1] % nm.m:
            raise PrunelabError(
                f"N:M block size M={nm.m} does not divide the {scores.shape[-1]} input columns of a "
                f"{tuple(scores.shape)} weight; exclude the layer or pick another M"
            )
        return nm.pattern_mask(scores)  # (rows, cols): n kept in every m consecutive columns
    if per_row:
        return lowest_per_row(scores, prune_count(scores.shape[1], config.sparsity))
    return lowest_in_layer(scores, prune_count(scores.numel(), config.sparsity))


def magnitude_scores(weight: Tensor) -> Tensor:
    """``|W|`` ``(rows, cols)`` in float32 (exact for half precision), float64 for float64 weights
    (a float32 cast would merge nearby magnitudes into ties and prune the wrong one)."""
    scores = weight.detach().abs()
    return scores if scores.dtype == torch.float64 else scores.float()


def prune_magnitude(weight: Tensor, stats: InputStats | None, config: OneShotConfig) -> Solution:
    """Per-layer magnitude pruning: ``S_ij = |W_ij|``, lowest fraction of the layer removed."""
    require_matrix(weight, "magnitude")
    keep = select_mask(magnitude_scores(weight), config, per_row=False)  # (rows, cols)
    return Solution(weight.detach() * keep, keep)


def prune_magnitude_row(weight: Tensor, stats: InputStats | None, config: OneShotConfig) -> Solution:
    """Per-row magnitude pruning: ``S_ij = |W_ij|``, lowest fraction of every row removed."""
    require_matrix(weight, "magnitude-row")
    keep = select_mask(magnitude_scores(weight), config, per_row=True)  # (rows, cols)
    return Solution(weight.detach() * keep, keep)
