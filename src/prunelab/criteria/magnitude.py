"""Magnitude criteria: element ``|w|`` and the group norms L1, L2, Lp.

All are data-free and read the weights as they are (already-pruned weights are real
zeros, so they score 0).  The element score and the group reduction together give a
group norm: ``reduce_group(score(w))`` over a group ``S`` is ``||w_S||_p``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from prunelab.criteria.base import Criterion, ScoreData
from prunelab.errors import PrunelabError


@dataclass(frozen=True)
class Magnitude(Criterion):
    """Weight magnitude, ``s_i = |w_i|`` (Han et al. 2015, "Learning both Weights and
    Connections for Efficient Neural Networks").  Groups: ``sum_{i in S} |w_i|``."""

    name = "magnitude"
    needs_data = False

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        return {n: p.detach().float().abs() for n, p in params.items()}


@dataclass(frozen=True)
class L1Norm(Magnitude):
    """Group L1 norm, ``s_S = sum_{i in S} |w_i|`` (Li et al. 2017, "Pruning Filters for
    Efficient ConvNets"); element score ``|w_i|``, group reduction the sum."""

    name = "l1"


@dataclass(frozen=True)
class L2Norm(Criterion):
    """Group L2 norm, ``s_S = sqrt(sum_{i in S} w_i^2)`` (the L2 variant studied in Li et
    al. 2017, "Pruning Filters for Efficient ConvNets"; He et al. 2018 "Soft Filter
    Pruning").  Element score ``w_i^2``, group reduction ``sqrt(sum)``."""

    name = "l2"
    needs_data = False

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        return {n: p.detach().float().square() for n, p in params.items()}

    def reduce_group(self, scores: Tensor) -> Tensor:
        return scores.sum(-1).sqrt()


@dataclass(frozen=True)
class LpNorm(Criterion):
    """Group Lp norm, ``s_S = (sum_{i in S} |w_i|^p)^(1/p)`` for ``p > 0`` (Li et al. 2017
    use p=1; p=2 is ``l2``).  Element score ``|w_i|^p`` -- monotone in ``|w_i|``, so
    unstructured pruning keeps the same weights as ``magnitude`` -- group reduction
    ``(sum)^(1/p)``."""

    p: float = 2.0
    name = "lp"
    needs_data = False

    def __post_init__(self) -> None:
        # p = inf would score |w|^inf (0 or inf) and reduce with (sum)^0 = 1: every group tied
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 < self.p < math.inf:
            raise PrunelabError(f"criterion 'lp' got p={self.p!r}; expected a number > 0, finite (e.g. p=2.0)")

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        return {n: p.detach().float().abs().pow(self.p) for n, p in params.items()}

    def reduce_group(self, scores: Tensor) -> Tensor:
        return scores.sum(-1).pow(1.0 / self.p)
