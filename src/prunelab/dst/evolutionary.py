"""SET: Sparse Evolutionary Training (Mocanu et al. 2018).

Mocanu, Mocanu, Stone, Nguyen, Gibescu, Liotta, "Scalable training of artificial neural
networks with adaptive sparse connectivity inspired by network science", Nature
Communications 9:2383 (2018).
"""

from __future__ import annotations

import torch

from prunelab.dst.base import DynamicSparsifier


class SET(DynamicSparsifier):
    """SET: Erdos-Renyi start, magnitude drop, random regrowth.

    Start: a random mask whose layer ``l`` has density
    ``eps * (n_in + n_out) / (n_in * n_out)`` (the ``"erk"`` allocation; ``eps`` is solved
    from the global target, layers that would exceed density 1 are capped and the rest
    rescaled).  Every update: remove the fraction ``zeta = f(t)`` of each layer's kept
    weights with the smallest ``|w|`` and add as many connections at uniformly random
    positions among those that are zero after the removal (a connection just removed may
    be re-added, with a fresh draw).

    Choices, documented: (1) the paper removes the ``zeta`` fraction of the smallest
    *positive* weights and of the largest *negative* weights separately; here positive and
    negative weights are ranked together by ``|w|`` (as in RigL's reimplementation of
    SET) -- the same set whenever both signs are equally frequent near zero.  (2) The
    paper keeps ``zeta = 0.3`` constant and rewires after every epoch; here ``zeta``
    follows the shared cosine schedule ``f(t)`` every ``delta_t`` steps, so all DST
    methods are compared at the same update cost.  (3) New weights are drawn afresh as in
    the paper, from PyTorch's default initialisation ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
    with zero optimizer state -- a weight removed and re-added in the same update included
    (``reinit_when_same``): the reference code (dcmocanu/sparse-evolutionary-artificial-
    neural-networks, ``weightsEvolution``) rebuilds the layer from the kept weights only and
    draws every added connection -- one just removed can be picked, since candidates are the
    positions empty after the removal -- a new random value with a zero momentum entry
    (``pdwdok[ik, jk] = 0``).
    """

    name = "set"
    grow_init = "init"
    reinit_when_same = True

    def grow_scores(self, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._random_scores(param, generator)  # uniform: a random subset of the candidates
