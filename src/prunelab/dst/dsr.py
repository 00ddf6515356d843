"""DSR: Dynamic Sparse Reparameterization (Mostafa & Wang 2019).

Mostafa & Wang, "Parameter Efficient Training of Deep Convolutional Neural Networks by
Dynamic Sparse Reparameterization", ICML 2019.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunelab.dst.base import ReallocatingSparsifier, _is_number, _round_half_up
from prunelab.errors import PrunelabError


class DSR(ReallocatingSparsifier):
    """DSR: adaptive global magnitude threshold, regrowth in proportion to survivors (Algorithm 1).

    Every update, with ``H`` the global threshold and ``N_p`` the target number pruned:

    * prune every kept weight with ``|w| < H`` (all layers); ``K`` = number pruned;
    * adapt the threshold: ``H <- 2H`` if ``K < (1 - delta) N_p``, ``H <- H/2`` if
      ``K > (1 + delta) N_p`` (default ``delta = 0.1``, ``H(0) = 0.001`` as in the paper);
    * regrow ``K`` zero-initialised weights, layer ``l`` receiving
      ``G_l = K * R_l / sum_j R_j`` (``R_l`` = its surviving weights; largest remainder,
      so ``sum G_l = K`` exactly) at random positions that are zero after the prune.

    A weight just pruned may come back, and then restarts at zero with zero optimizer state
    (``reinit_when_same``): the reference code (IntelAI dynamic-reparameterization,
    ``parameterized_tensors.py``, copied in TimDettmers/sparse_learning) zeroes pruned
    weights (``reinitialize_unused``) before it grows.  Deviation, documented: that code
    also leaves the just-pruned positions out of the growth candidates
    (``grow_random(None, pruned_indices)``, ``np.setdiff1d``); here they stay candidates,
    as for every method in this package, so a layer that reallocation has filled can
    always regrow its count and the global count stays exact.

    So the global count is exact while per-layer counts move.  The paper fixes ``N_p``;
    here ``N_p = f(t) * (kept weights)`` follows the shared cosine schedule.  A layer
    keeps at least one weight (and its rule's floor).
    """

    name = "dsr"
    grow_init = "zero"
    reinit_when_same = True

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        threshold: float = 1e-3,
        tolerance: float = 0.1,
        **common: Any,
    ) -> None:
        _check_threshold(threshold, "initial threshold H(0)")
        if not _is_number(tolerance) or not 0 <= tolerance < 1:
            raise PrunelabError(f"DSR tolerance delta must be a number in [0, 1), got {tolerance!r}; the paper uses 0.1")
        super().__init__(model, sparsity, **common)
        self.threshold = float(threshold)
        self.tolerance = float(tolerance)

    def drop_counts(self, fraction: float, old: Mapping[str, torch.Tensor]) -> dict[str, int]:
        counts = {}
        for name, param in self.params.items():
            below = (self._reduced(param.abs()) < self.threshold) & old[name]
            counts[name] = self._capped(name, int(below.sum()), old[name])
        pruned = sum(counts.values())
        target = _round_half_up(fraction * sum(int(m.sum()) for m in old.values()))
        if pruned < (1.0 - self.tolerance) * target:
            self.threshold *= 2.0
        elif pruned > (1.0 + self.tolerance) * target:
            self.threshold /= 2.0
        return counts

    def layer_shares(self, old: Mapping[str, torch.Tensor], survivors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {n: float(survivors[n].sum()) for n in self.params}

    def grow_scores(self, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._random_scores(param, generator)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self.threshold}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        threshold = state.get("threshold", self.threshold) if isinstance(state, Mapping) else self.threshold
        _check_threshold(threshold, "state's threshold H")  # before anything changes
        super().load_state_dict(state)
        self.threshold = float(threshold)


def _check_threshold(value: Any, what: str) -> None:
    """Refuse a DSR threshold that is no finite number > 0 (``True``, ``inf`` and NaN included)."""
    if not _is_number(value) or not value > 0:
        raise PrunelabError(f"DSR {what} must be a finite number > 0, got {value!r}; the paper starts at 0.001")
