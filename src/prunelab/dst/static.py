"""Static sparse training: a random ERK mask that never changes (the DST baseline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.dst.base import DynamicSparsifier
from prunelab.errors import PrunelabError


class StaticSparse(DynamicSparsifier):
    """A fixed random mask with Erdos-Renyi-Kernel per-layer counts, trained as is.

    The "Static" baseline of Evci et al. 2020 (RigL, sec. 4) and the "fixed Erdos-Renyi"
    network of Mocanu et al. 2018: layer density ``eps * sum(shape) / prod(shape)``
    (``"erk"`` allocation), positions uniformly random; masked weights and their optimizer
    state are held at zero.  No update ever happens, so training costs ``3 f_S`` per sample.
    """

    name = "static"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        **common: Any,
    ) -> None:
        """``common``: the :class:`DynamicSparsifier` keywords, except a schedule."""
        if common.get("schedule") is not None:
            raise PrunelabError("the static method never rewires, got an update schedule; pass schedule=None or use "
                                "set / rigl / dsr / snfs")
        super().__init__(model, sparsity, **common)

    def grow_scores(self, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise PrunelabError("the static method never grows connections; use set / rigl / dsr / snfs to rewire")
