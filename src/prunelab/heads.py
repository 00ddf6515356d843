"""Attention-head pruning: score whole heads, choose which to keep, write the row masks.

A head is a granularity that spans four weights: rows ``h*d .. (h+1)*d`` of ``q_proj``,
``k_proj`` and ``v_proj`` and the same columns of ``out_proj`` (``d = head_dim``).  The
units are the modules :func:`prunelab.materialise.graph.is_attention_unit` accepts
(Linear ``q_proj/k_proj/v_proj/out_proj`` plus an int ``num_heads``), the same ones
:func:`prunelab.materialise.shrink.shrink_model` cuts whole heads from.

Score (pure, never mutates the model):

* :func:`head_magnitude` -- data-free: ``||W_q[h]||^2 + ||W_k[h]||^2 + ||W_v[h]||^2 +
  ||W_o[:, h]||^2``, the squared L2 norm of every weight the head owns.
* :func:`head_importance` -- Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better
  than One?" (NeurIPS), eq. 2: put a gate ``xi_h = 1`` on each head's output and score
  ``I_h = E_x |dL(x)/dxi_h|``.  With the gate on the input of ``out_proj`` (the heads'
  concatenated context ``c``), ``dL/dxi_h = sum_{t,j in head h} c_tj dL/dc_tj``.  The
  expectation runs over mini-batches (the gradient of a batch's mean loss, then its
  absolute value), and, as in the paper (sec. 4.2), scores are divided by their L2 norm
  within each attention unit so units of different scale compare under one threshold.

Select and apply: :func:`head_masks` keeps the best heads -- one ``global`` threshold over
all units or the same share in every unit (``uniform``) -- and always at least
``min_heads`` per unit, then returns a :class:`MaskSet` over the q/k/v weights that zeroes
the pruned heads' rows.  A pruned head then outputs its value bias ``b_v`` (uniform
softmax over constant keys), exactly what ``shrink_model`` folds into ``out_proj``'s bias,
so the masked and the shrunk model agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.allocation import check_sparsity
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise.graph import is_attention_unit

__all__ = ["HEAD_ALLOCATIONS", "HeadChoice", "attention_units", "head_importance", "head_magnitude", "head_masks"]

HEAD_ALLOCATIONS = ("global", "uniform")
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def attention_units(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention unit of ``model`` by qualified name, in module order."""
    units = {name: module for name, module in model.named_modules() if is_attention_unit(module)}
    if not units:
        raise PrunelabError(
            f"{type(model).__name__} has no attention unit (a module with Linear q_proj/k_proj/v_proj/out_proj and "
            "an int num_heads); head pruning needs one -- nn.MultiheadAttention is not supported"
        )
    return units


def _head_dim(unit: nn.Module) -> int:
    return unit.q_proj.out_features // unit.num_heads


def head_magnitude(model: nn.Module) -> dict[str, Tensor]:
    """Unit name -> ``(num_heads,)`` squared L2 norm of each head's q/k/v rows and out_proj columns."""
    scores = {}
    for name, unit in attention_units(model).items():
        heads, d = unit.num_heads, _head_dim(unit)
        total = torch.zeros(heads, dtype=torch.float64)
        for proj in PROJECTIONS:
            rows = getattr(unit, proj).weight.detach().double().reshape(heads, d, -1)  # (H, d, in)
            total += rows.square().sum((1, 2))
        cols = unit.out_proj.weight.detach().double().reshape(unit.out_proj.out_features, heads, d)  # (out, H, d)
        scores[name] = total + cols.square().sum((0, 2))
    return scores


def head_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    *,
    max_batches: int | None = None,
    normalise: bool = True,
) -> dict[str, Tensor]:
    """Unit name -> ``(num_heads,)`` Michel et al. 2019 importance ``E |dL/dxi_h|``.

    ``batches`` yields ``(inputs, targets)``; ``loss_fn(model(inputs), targets)`` is the
    loss.  The model runs in eval mode and its gradients are left as they were.
    """
    units = attention_units(model)
    totals = {name: torch.zeros(unit.num_heads, dtype=torch.float64) for name, unit in units.items()}
    gates: dict[str, Tensor] = {}

    def gate_hook(name: str, unit: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            (context,) = args  # (..., H*d)
            gate = torch.ones(unit.num_heads, dtype=context.dtype, device=context.device, requires_grad=True)
            gates[name] = gate
            return (context * gate.repeat_interleave(_head_dim(unit)),)
        return hook

    was_training = model.training
    saved = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    handles = [unit.out_proj.register_forward_pre_hook(gate_hook(name, unit)) for name, unit in units.items()]
    seen = 0
    try:
        model.eval()
        for inputs, targets in batches:
            if max_batches is not None and seen >= max_batches:
                break
            gates.clear()
            loss = loss_fn(model(inputs), targets)
            called = [name for name in units if name in gates]  # a unit the forward skipped scores 0
            grads = torch.autograd.grad(loss, [gates[name] for name in called], allow_unused=True)
            for name, grad in zip(called, grads, strict=True):
                if grad is not None:
                    totals[name] += grad.detach().double().abs().cpu()
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.grad = saved[n]
    if seen == 0:
        raise PrunelabError("head_importance got no batches; pass an iterable of (inputs, targets), e.g. a DataLoader")
    scores = {name: total / seen for name, total in totals.items()}
    if normalise:
        scores = {name: s / s.norm() if s.norm() > 0 else s for name, s in scores.items()}
    return scores


@dataclass(frozen=True)
class HeadChoice:
    """Which heads of each unit are kept (``True``), and the masks that prune the others."""

    keep: dict[str, Tensor]  # unit name -> (num_heads,) bool
    masks: MaskSet

    @property
    def pruned_fraction(self) -> float:
        total = sum(k.numel() for k in self.keep.values())
        return 1.0 - sum(int(k.sum()) for k in self.keep.values()) / total


def head_masks(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    allocation: str = "global",
    min_heads: int = 1,
) -> HeadChoice:
    """Prune the ``sparsity`` share of all heads with the lowest ``scores``.

    ``allocation``: ``global`` (one threshold over every unit's scores) or ``uniform``
    (``round(sparsity * num_heads)`` heads in each unit).  Every unit keeps at least
    ``min_heads``; with ``global`` the heads that rule saves are taken from the other
    units, lowest score first, so the number pruned is ``round(sparsity * all heads)``
    whenever the floor allows it.  Ties break by unit order, then head index.
    """
    check_sparsity(sparsity)
    if allocation not in HEAD_ALLOCATIONS:
        raise PrunelabError(f"unknown head allocation {allocation!r}; valid names: {', '.join(HEAD_ALLOCATIONS)}")
    units = attention_units(model)
    if set(scores) != set(units):
        raise PrunelabError(f"scores name units {sorted(scores)} but the model has {sorted(units)}; score this model")
    for name, unit in units.items():
        if tuple(scores[name].shape) != (unit.num_heads,):
            raise PrunelabError(f"scores[{name!r}] has shape {tuple(scores[name].shape)}, expected ({unit.num_heads},)")
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 1:
        raise PrunelabError(f"min_heads must be a positive integer, got {min_heads!r}")
    keep = {name: torch.ones(unit.num_heads, dtype=torch.bool) for name, unit in units.items()}
    if allocation == "uniform":
        for name, unit in units.items():
            count = min(round(sparsity * unit.num_heads), max(unit.num_heads - min_heads, 0))
            order = torch.argsort(scores[name].double().cpu(), stable=True)
            keep[name][order[:count]] = False
    else:
        candidates = sorted((float(scores[name][h]), u, h) for u, name in enumerate(units)
                            for h in range(units[name].num_heads))
        budget = round(sparsity * len(candidates))
        names = list(units)
        for _, u, h in candidates:
            if budget == 0:
                break
            name = names[u]
            if int(keep[name].sum()) > min_heads:
                keep[name][h] = False
                budget -= 1
    masks = {}
    for name, unit in units.items():
        rows = keep[name].repeat_interleave(_head_dim(unit))  # (H*d,)
        for proj in PROJECTIONS:
            weight = getattr(unit, proj).weight
            masks[f"{name}.{proj}.weight" if name else f"{proj}.weight"] = rows.to(weight.device).unsqueeze(1).expand_as(weight).clone()
    return HeadChoice(keep, MaskSet(masks))
