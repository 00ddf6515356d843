"""Network slimming (Liu et al. 2017): BatchNorm scales as channel importance.

The training penalty (:func:`bn_l1_loss`, :func:`bn_l1_penalty_`, :class:`SlimmingLoss`)
and the ``slimming`` criterion (:class:`BNScale`).  Which BatchNorm belongs to which
layer comes from :func:`prunelab.criteria.links.channel_links` (the traced dataflow;
module order, where unambiguous, for what cannot be traced).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.criteria.activation import owning_modules, unwrap
from prunelab.criteria.base import Criterion, ScoreData
from prunelab.criteria.links import FALLBACKS, ChannelLinks, channel_links, is_batchnorm, spread_channels
from prunelab.errors import PrunelabError
from prunelab.targets import PRUNABLE_TYPES


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if is_batchnorm(m)]
    if not found:
        raise PrunelabError(
            f"network slimming needs affine BatchNorm layers, but {type(model).__name__} has none; "
            "use a model with BatchNorm or another criterion"
        )
    return found


def _check_strength(strength: float) -> None:
    is_number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
    if not is_number or not math.isfinite(strength) or strength < 0:
        raise PrunelabError(
            f"slimming strength must be a finite number >= 0, got {strength!r}; "
            "Liu et al. use 1e-4 (VGG) or 1e-5 (ResNet)"
        )


def bn_l1_loss(model: nn.Module, strength: float) -> Tensor:
    """The sparsity penalty ``lambda * sum_BN sum_c |gamma_c|`` to add to the training loss
    (Liu et al. 2017, eq. 1: ``L = sum l(f(x, W), y) + lambda * sum_{gamma} |gamma|``).

    Differentiable (subgradient ``sign(gamma)``, 0 at 0).  Liu et al. use ``lambda = 1e-4``
    for VGGNet and ``1e-5`` for ResNet/DenseNet on CIFAR.
    """
    _check_strength(strength)
    return strength * sum(bn.weight.abs().sum() for bn in _batchnorms(model))


@torch.no_grad()
def bn_l1_penalty_(model: nn.Module, strength: float) -> None:
    """Add the penalty's subgradient ``lambda * sign(gamma)`` to every BN scale's ``.grad``
    (Liu et al. 2017, the "sub-gradient descent" of the L1 term), in place.

    Call after ``loss.backward()`` and before ``optimizer.step()``; equivalent to adding
    :func:`bn_l1_loss` to the loss.  A scale with no ``.grad`` yet gets the penalty as its
    gradient; frozen scales (``requires_grad=False``) are left alone.
    """
    _check_strength(strength)
    for bn in _batchnorms(model):
        if not bn.weight.requires_grad:
            continue
        step = strength * torch.sign(bn.weight.detach())
        if bn.weight.grad is None:
            bn.weight.grad = step.clone()
        else:
            bn.weight.grad.add_(step)


class SlimmingLoss:
    """``base(outputs, targets) + bn_l1_loss(model, strength)``: a training loss for
    :func:`prunelab.bench.training.train` (``loss_fn=SlimmingLoss(model, 1e-4)``) that
    trains with the network-slimming penalty (Liu et al. 2017, eq. 1)."""

    def __init__(self, model: nn.Module, strength: float, base: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy):
        _check_strength(strength)
        _batchnorms(model)
        self.model, self.strength, self.base = model, strength, base

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.base(outputs, targets) + bn_l1_loss(self.model, self.strength)


@dataclass(frozen=True)
class BNScale(Criterion):
    """Network-slimming channel score (Liu, Li, Shen, Huang, Yan & Zhang 2017, "Learning
    Efficient Convolutional Networks through Network Slimming").

    Each BatchNorm scales channel ``c`` by ``gamma_c``; after training with the L1 penalty
    ``lambda * sum |gamma|`` (:func:`bn_l1_loss` / :func:`bn_l1_penalty_`), channels with
    small ``|gamma_c|`` contribute little and are pruned under one global threshold.
    Here the output channel ``c`` of a Linear/Conv layer is scored by::

        s_c = |gamma_c|    of the affine BatchNorm that directly consumes the layer's output

    broadcast to its row ``w[c]`` (and bias ``b[c]``) -- for a transposed conv, weight
    ``(in, out / groups, *kernel)``, to its output slice ``w[g*in/groups:(g+1)*in/groups, j]``
    of ``c = g * out/groups + j`` -- and a BatchNorm's own ``weight``/``bias`` get ``|gamma|`` too.  The pairing follows the traced dataflow (conv -> bn edge, the
    conv's only user, reading its channel axis), or module order where the model cannot be
    traced and no other layer has the width (see :mod:`prunelab.criteria.links`); a layer
    whose BatchNorm is ambiguous raises PrunelabError.

    Layers with no such BatchNorm (e.g. the classifier), and any other parameter:
    ``fallback='l1'`` (default) scores them by magnitude ``|w|``, so a channel's group
    score is its mean ``|w|`` (the L1 row norm / fan-in, Li et al. 2017) and warns,
    naming them; ``fallback='error'`` raises PrunelabError instead.  Global allocation
    then compares ``|gamma|`` with mean ``|w|`` -- exclude such layers (``--exclude``) or
    use uniform allocation when that matters.

    Group reduction: the **mean**, so a channel's score is exactly ``|gamma_c|`` (the
    paper's global threshold on ``|gamma|``).  Data-free; meant for channel granularity.
    """

    fallback: str = "l1"
    name = "slimming"
    needs_data = False
    scores_kept_dense = False  # per-parameter scores: a classifier kept dense by the rules is not warned about

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise PrunelabError(
                f"criterion 'slimming' got fallback={self.fallback!r}; expected one of {', '.join(FALLBACKS)}"
            )

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        owners = owning_modules(model, params)
        layers = sorted({o.module_name for o in owners.values() if isinstance(o.module, PRUNABLE_TYPES)})
        links = channel_links(model) if layers else ChannelLinks.empty()  # one trace for the whole pass
        links.check("bn", layers)
        pairs = links.bn
        root, _ = unwrap(model)
        modules = dict(root.named_modules())
        out: dict[str, Tensor] = {}
        unpaired: list[str] = []
        for fqn, param in params.items():
            owner = owners[fqn]
            bn = modules[pairs[owner.module_name]] if owner.module_name in pairs else None
            if bn is None and is_batchnorm(owner.module):
                bn = owner.module
            spread = spread_channels(bn.weight.detach().abs(), param, owner.module, owner.attr) if bn is not None else None
            if spread is not None:
                out[fqn] = spread
            else:
                out[fqn] = param.detach().float().abs()
                unpaired.append(fqn)
        if unpaired:
            handled = ("scored by |w| (fallback=l1)" if self.fallback == "l1"
                       else "expected every scored layer to have one")
            message = (
                f"slimming: {', '.join(unpaired)} have no directly following BatchNorm; {handled}"
                "; exclude them (--exclude) to prune by |gamma| only"
            )
            if self.fallback == "error":
                raise PrunelabError(message + " or pass fallback='l1'")
            warnings.warn(message, stacklevel=3)
        return out

    def reduce_group(self, scores: Tensor) -> Tensor:
        """``(..., group_size)`` -> ``(...)``: the mean (a channel's score is ``|gamma_c|``)."""
        return scores.mean(-1)
