"""Random scores: the baseline every criterion has to beat."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunelab.criteria.base import Criterion, ScoreData
from prunelab.errors import PrunelabError


@dataclass(frozen=True)
class RandomScores(Criterion):
    """I.i.d. uniform scores, ``s_i ~ U[0, 1)`` -- random pruning, the baseline of Liu et
    al. 2022 ("The Unreasonable Effectiveness of Random Pruning") and of Blalock et al.
    2020 ("What is the State of Neural Network Pruning?").

    Deterministic: a CPU ``torch.Generator`` seeded with ``seed`` draws the scores
    parameter by parameter in the order of ``params``' keys, so every call, device and
    rank gets the same scores (DESIGN.md decision 3).  Group reduction: the sum.
    """

    seed: int = 0
    name = "random"
    needs_data = False

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PrunelabError(f"criterion 'random' got seed={self.seed!r}; expected an int (e.g. seed=0)")

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return {
            n: torch.rand(p.shape, generator=generator, dtype=torch.float32).to(p.device) for n, p in params.items()
        }
