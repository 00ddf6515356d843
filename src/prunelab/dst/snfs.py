"""SNFS: Sparse Networks From Scratch / sparse momentum (Dettmers & Zettlemoyer 2019).

Dettmers & Zettlemoyer, "Sparse Networks from Scratch: Faster Training without Losing
Performance", arXiv:1907.04840 (2019).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.dst.base import ReallocatingSparsifier, _is_number, _round_half_up
from prunelab.errors import PrunelabError


class SNFS(ReallocatingSparsifier):
    """Sparse momentum: redistribute and regrow by momentum magnitude (Algorithm 1).

    Momentum, the exponentially smoothed dense gradient, updated every step in
    :meth:`observe` (while ``.grad`` is still dense, under DDP already all-reduced, so it
    is the same on every rank)::

        M_t = beta * M_{t-1} + (1 - beta) * g_t            (default beta = 0.9)

    Every update, with prune rate ``p = f(t)`` (the cosine decay of the paper):

    * layer contribution ``c_l = m_l / sum_j m_j``, ``m_l`` = mean ``|M|`` over the layer's
      kept weights;
    * prune the ``round(p * kept_l)`` smallest-``|w|`` weights of every layer;
      ``K = sum_l`` of those;
    * regrow ``g_l = K * c_l`` (largest remainder, capped at the layer's room and the
      overflow re-split, so ``sum g_l = K``) weights at the positions that are zero after
      the prune with the largest ``|M|`` (the reference code's candidates: a weight just
      pruned may come back).  New connections start at zero with zero optimizer state; a
      weight pruned and regrown in the same update keeps its value and optimizer state.
      That is the reference code (TimDettmers/sparse_learning, ``sparselearning/core.py``,
      ``truncate_weights``: the pruned mask is written, growth is chosen on it, and
      ``apply_mask`` -- the only place weights are zeroed -- runs after the growth, so a
      regrown weight was never zeroed) and RigL's SNFS reimplementation
      (``SparseMomentumOptimizer``, ``reinit_when_same=False``).

    The paper reads the optimizer's momentum buffer; prunelab zeroes optimizer state of
    masked weights, so SNFS keeps its own dense EMA (one extra copy of the weights) -- the
    same quantity up to the factor ``1 - beta``, which cancels in ``c_l`` and in ranking.
    """

    name = "snfs"
    grow_init = "zero"
    grow_signal = "the gradients' momentum (smoothed from .grad at every step)"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        momentum: float = 0.9,
        **common: Any,
    ) -> None:
        if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
            raise PrunelabError(f"SNFS momentum beta must be a number in [0, 1), got {momentum!r}; the paper uses 0.9")
        super().__init__(model, sparsity, **common)
        self.beta = float(momentum)
        self.momentum: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self) -> None:
        for name, param in self.params.items():
            grad = self._dense_grad(name, param).float()
            buffer = self.momentum.get(name)
            if buffer is None:
                buffer = self.momentum[name] = torch.zeros_like(grad)
            buffer.mul_(self.beta).add_(grad, alpha=1.0 - self.beta)

    def reads_dense_grad(self, step: int) -> bool:
        return True  # observe() smooths the dense gradient at every step

    def _on_rebind(self, names: Sequence[str]) -> None:
        super()._on_rebind(names)
        for name in names:  # same name and shape; the replacing Parameter may live elsewhere (meta -> cpu)
            if name in self.momentum:
                self.momentum[name] = self.momentum[name].to(self.params[name].device)

    def _momentum(self, name: str, param: torch.Tensor) -> torch.Tensor:
        buffer = self.momentum.get(name)
        if buffer is None:
            raise PrunelabError(f"snfs has no momentum for {name!r} yet; call sparsifier.step() after every "
                                "optimizer.step() (before zero_grad) so it can smooth the gradients")
        return buffer

    def drop_counts(self, fraction: float, old: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return {n: self._capped(n, _round_half_up(fraction * int(m.sum())), m) for n, m in old.items()}

    def layer_shares(self, old: Mapping[str, torch.Tensor], survivors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        means = []
        for name, param in self.params.items():
            magnitude = self._momentum(name, param).abs()[old[name]]
            means.append(float(magnitude.mean()) if magnitude.numel() else 0.0)
        # averaged over ranks like every other statistic that decides a mask (DESIGN.md decision 3)
        reduced = self._reduced(torch.tensor(means, dtype=torch.float64, device=self._device()))
        return dict(zip(self.params, reduced.tolist()))

    def grow_scores(self, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._momentum(name, param).abs()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momentum": {n: m.clone() for n, m in self.momentum.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        momentum = state.get("momentum", {}) if isinstance(state, Mapping) else {}
        for name, buffer in momentum.items():  # checked before anything changes
            param = self.params.get(name)
            if param is None or not isinstance(buffer, torch.Tensor) or tuple(buffer.shape) != tuple(param.shape):
                got = tuple(buffer.shape) if isinstance(buffer, torch.Tensor) else type(buffer).__name__
                raise PrunelabError(f"snfs state has momentum for {name!r} of {got}, which matches no prunable weight "
                                    "of this model; load the state saved for this model")
        super().load_state_dict(state)
        # on the weights' devices: a checkpoint read with map_location="cpu" resumes on the GPU
        self.momentum = {n: m.detach().clone().float().to(self.params[n].device) for n, m in momentum.items()}
