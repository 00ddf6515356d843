"""Movement pruning (Sanh, Wolf & Rush 2020): keep the weights moving away from zero."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.criteria.base import (
    Criterion,
    FunctionalModel,
    ScoreData,
    batch_errors,
    batch_loss,
    batches_over_ranks,
    eval_mode,
    iter_batches,
    leaves,
)
from prunelab.errors import PrunelabError
from prunelab.targets import prunable_parameters


class MovementAccumulator:
    """Accumulates the movement score ``S = -sum_t w^(t) * dL/dw^(t)`` during training.

    Sanh, Wolf & Rush 2020 ("Movement Pruning: Adaptive Sparsity by Fine-Tuning", eq. 4
    for hard movement pruning): ``S_i = -sum_t (dL/dW_i)^(t) W_i^(t)``.  A weight whose
    gradient keeps pushing it away from zero (``w`` and ``-g`` of the same sign) gains
    score; one shrinking towards zero loses it.  Scores are signed.

    Call :meth:`update` once per optimizer step, while ``param.grad`` still holds that
    step's gradient: it adds ``-w * g`` (float32) for every tracked parameter with a
    gradient.  The instance is callable with the step number, so it can be the
    ``after_step`` hook of :func:`prunelab.bench.training.train` (there ``.grad`` is still
    populated, since ``zero_grad`` runs at the start of the next step)::

        acc = MovementAccumulator(sparsifier.params)
        train(model, loader, cfg, after_step=lambda step: (acc.update(), sparsifier.step()))

    In that hook ``w`` is the weight *after* the optimizer step (``w^(t+1)`` with
    ``g^(t)``), which differs from the paper's ``w^(t) g^(t)`` by ``O(lr)`` per step.

    ``params``: ``FQN -> parameter`` (e.g. ``sparsifier.params``) or a model, whose
    Linear/Conv weights are then tracked.  Under DDP gradients are already averaged and
    weights identical, so every rank accumulates the same scores.
    """

    def __init__(self, params: Mapping[str, nn.Parameter] | nn.Module) -> None:
        if isinstance(params, nn.Module):
            params = prunable_parameters(params)
        if not isinstance(params, Mapping) or not params:
            raise PrunelabError(
                f"MovementAccumulator got {type(params).__name__}; expected a non-empty mapping FQN -> parameter "
                "(e.g. sparsifier.params or dict(model.named_parameters())) or a model"
            )
        self.params: dict[str, nn.Parameter] = dict(params)
        self.totals: dict[str, Tensor] = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()
        }
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """``S += -w * dL/dw`` for every tracked parameter that has a ``.grad``."""
        for name, param in self.params.items():
            if param.grad is not None:
                self.totals[name] -= param.detach().float() * param.grad.detach().float()
        self.steps += 1

    def __call__(self, step: int | None = None) -> None:
        """``after_step`` hook form of :meth:`update` (the step number is not needed)."""
        self.update()

    def reset(self) -> None:
        """Zero the scores (e.g. between pruning rounds)."""
        for total in self.totals.values():
            total.zero_()
        self.steps = 0

    def scores(self, names: list[str] | None = None) -> dict[str, Tensor]:
        """Copies of the accumulated scores (all tracked FQNs, or ``names``)."""
        names = list(self.totals) if names is None else names
        missing = [n for n in names if n not in self.totals]
        if missing:
            raise PrunelabError(
                f"MovementAccumulator does not track {', '.join(missing)}; build it from the same parameters the "
                "sparsifier scores (MovementAccumulator(sparsifier.params))"
            )
        return {n: self.totals[n].clone() for n in names}


@dataclass(frozen=True)
class Movement(Criterion):
    """Movement score (Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by
    Fine-Tuning"): ``S_i = -sum_t w_i^(t) * dL/dw_i^(t)``, higher = keep.

    * With an ``accumulator`` (:class:`MovementAccumulator`) that has seen at least one
      update: its scores, accumulated over the fine-tuning steps (the paper's method;
      needs no data).
    * Otherwise (needs ScoreData): the one-pass estimate over the ScoreData batches at
      the current weights, ``S_i = -sum_b w_i * dL_b/dw_i`` -- first-order movement over
      one pass, i.e. the signed first-order Taylor term (``taylor`` is its per-batch
      absolute value, averaged).  Gradients by ``torch.autograd.grad`` in eval mode, so
      ``.grad`` is never written.  Under ``torch.distributed`` each rank's sum is averaged
      over the ``W`` ranks, ``(1/W) sum_r S_r``: every rank gets the same scores, ``1/W`` times
      what one process scores on all the batches (a positive factor: the same ranking and masks;
      it is the scale the Sparsifier's mean over ranks always gave).  A rank with no batches adds
      nothing, a NaN on one rank reaches every rank through the mean, and a bad batch or a
      non-scalar loss on one rank raises the same PrunelabError on every rank (none is left
      waiting in a collective).  The accumulator's scores are not reduced: under DDP gradients
      are averaged and weights identical, so every rank accumulates the same ones.

    Scores are signed (negative: the weight moves towards zero).  Global and uniform
    allocation use them as they are; LAMP squares scores and so is meant for magnitude-
    like, non-negative scores -- avoid it with movement.  Group reduction: the sum.
    """

    accumulator: MovementAccumulator | None = None
    name = "movement"
    needs_data = True  # for the class; an instance with an accumulator needs none

    def __post_init__(self) -> None:
        if self.accumulator is not None and not isinstance(self.accumulator, MovementAccumulator):
            raise PrunelabError(
                f"criterion 'movement' got accumulator of type {type(self.accumulator).__name__}; "
                "expected MovementAccumulator(params) or None"
            )
        object.__setattr__(self, "needs_data", self.accumulator is None)

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        if self.accumulator is not None and self.accumulator.steps > 0:
            scores = self.accumulator.scores(list(params))
            wrong = [f"{n} {tuple(scores[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
                     if scores[n].shape != p.shape]
            if wrong:
                raise PrunelabError(
                    f"criterion 'movement': the accumulator's scores do not match the parameters' shapes "
                    f"({', '.join(wrong)}); build MovementAccumulator from the same model's parameters"
                )
            return scores
        if data is None:
            raise PrunelabError(
                "criterion 'movement' has an accumulator with no updates yet and no data; call "
                "accumulator.update() after optimizer steps, or pass data=ScoreData(loader) for the one-pass estimate"
            )
        with eval_mode(model), torch.enable_grad():
            return self._one_pass(model, params, data)

    @staticmethod
    def _one_pass(model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData) -> dict[str, Tensor]:
        """``S = -sum_b w * dL_b/dw`` over the batches of every rank (float32): one process's score on all the data."""
        forward = FunctionalModel(model, params)
        totals = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        num_batches = 0
        with distributed.errors_on_every_rank():  # one rank's bad batch: every rank raises, none waits below
            for inputs, targets in iter_batches(data, forward.device, allow_empty=True):
                tensors = leaves(params)  # aliases of the weights that require grad
                with batch_errors("movement", inputs, targets):
                    loss = batch_loss(data, forward(tensors, inputs), targets)
                    grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
                for (name, weight), grad in zip(tensors.items(), grads):
                    if grad is not None:
                        totals[name] -= weight.detach().float() * grad.float()
                num_batches += 1
        batches_over_ranks(num_batches)  # no batches on any rank: the same error on every rank
        # sum_r S_r, as one process on the union; a NaN on one rank reaches every rank
        return {n: distributed.all_reduce_sum_(t) for n, t in totals.items()}
