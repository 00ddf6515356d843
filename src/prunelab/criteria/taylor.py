"""First-order Taylor importance (Molchanov et al.)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.criteria.base import (
    Criterion, FunctionalModel, ScoreData, batch_errors, batch_loss, batches_over_ranks, iter_batches, leaves,
)


@dataclass(frozen=True)
class Taylor(Criterion):
    """First-order Taylor importance: the loss change predicted for removing a weight.

    Molchanov et al. 2017 ("Pruning Convolutional Neural Networks for Resource Efficient
    Inference") and 2019 ("Importance Estimation for Neural Network Pruning"): setting
    ``w_i`` to 0 changes the loss by about ``-g_i w_i``, so the importance of ``w_i`` is
    ``|g_i w_i|`` with ``g = dL/dw``.  prunelab accumulates the **mean over batches of
    the absolute per-batch value**::

        s_i = (1/B) * sum_{b=1..B} | w_i * dL_b/dw_i |

    where ``L_b`` is ``data.loss_fn`` on batch ``b`` (a batch mean) and ``B`` is the
    number of batches (``data.max_batches``, default: all).  Absolute values are taken per
    batch, before averaging, so contributions of opposite sign in different batches do not
    cancel (a weight whose removal helps one batch and hurts another is still important).

    Under ``torch.distributed`` the sum and ``B`` run over the batches of every rank (both are
    all-reduced, then divided), so every rank gets what one process gets on all the batches,
    whatever each rank's number of batches (DESIGN.md decision 3); a rank with no batches adds
    nothing.  A NaN on one rank reaches every rank through the sum, and a bad batch on one rank
    raises the same PrunelabError on every rank (none is left waiting in the all-reduce).

    Groups: the default reduction sums element scores, ``s_S = sum_{i in S} s_i``, the
    sum of absolute contributions.  Per batch it bounds ``|sum_{i in S} g_i w_i|`` from
    above; it is not Molchanov 2019's group score ``(sum_{i in S} g_i w_i)^2`` (eq. 8;
    squared, averaged over batches), which needs the group structure at scoring time.

    Gradients are taken with ``torch.autograd.grad`` on detached aliases of the weights in
    eval mode; parameters the loss does not depend on score 0.
    """

    name = "taylor"
    needs_data = True

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        forward = FunctionalModel(model, params)
        totals = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        num_batches = 0
        with distributed.errors_on_every_rank():  # one rank's bad batch: every rank raises, none waits below
            for inputs, targets in iter_batches(data, forward.device, allow_empty=True):
                tensors = leaves(params)  # (shape of each weight), requires_grad, aliasing the weights
                with batch_errors(self.name, inputs, targets):
                    loss = batch_loss(data, forward(tensors, inputs), targets)
                    grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
                for (name, weight), grad in zip(tensors.items(), grads):
                    if grad is not None:
                        totals[name] += (weight.detach().float() * grad.float()).abs()
                num_batches += 1
        total = batches_over_ranks(num_batches)  # B = sum_r B_r, exact
        # sum_r sum_b |w g_b| / B: a mean over the union of the batches, not a mean of per-rank means
        return {n: distributed.all_reduce_sum_(t) / total for n, t in totals.items()}
