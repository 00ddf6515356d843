"""Training FLOPs of sparse and dense training (Evci et al. 2020, RigL, Appendix H).

With ``f_S`` the FLOPs of one sparse forward pass (inference) of a sample and ``f_D``
the dense one, a training step costs per sample:

* forward ``f``, backward ``2 f`` (gradient w.r.t. activations and w.r.t. weights):
  dense training ``3 f_D``; static sparse, SET and DSR ``3 f_S`` (random growth and
  magnitude ranking are negligible next to the passes);
* RigL needs the *dense* weight gradient on update steps only:
  ``(3 f_S * delta_t + 2 f_S + f_D) / (delta_t + 1)`` on average;
* SNFS needs the dense gradient every step for its momentum: ``2 f_S + f_D``.

``f_S`` and ``f_D`` are Linear/Conv multiply-adds from one
:func:`prunelab.measure.counting.measure_model` pass (``FLOPs = 2 MACs``, biases not
counted).  ``f_S`` counts by the *mask*: ``2 * sum_l |M_l| * positions_l``, every kept
connection whatever its value -- a sparse training kernel multiplies every kept weight,
and a kept weight is often exactly zero (a connection grown at zero that the gradient has
not moved, e.g. into a dead ReLU unit).  ``measure_model``'s own ``sparse_flops`` counts
kept *and nonzero* weights (inference work) and would undercount training.  A layer with no
mask counts all its weights (it is trained dense).  For methods that move weights between
layers (DSR, SNFS) ``f_S`` is that of the mask passed in (the final one): exact for MLPs,
where ``f_S = 2 * kept`` whatever the allocation, an approximation for convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.measure.attention import attention_modules, child_name, in_projections
from prunelab.measure.costs import ModelCost
from prunelab.measure.counting import measure_model, measured_layers

TRAINING_COSTS = ("dense", "static", "set", "dsr", "rigl", "snfs")


def flops_per_sample(method: str, sparse_flops: float, dense_flops: float, *, delta_t: int = 100) -> float:
    """Training FLOPs of one sample's step for ``method`` (formulas in the module docstring)."""
    if method not in TRAINING_COSTS:
        raise PrunelabError(f"no training-cost formula for {method!r}; valid names: {', '.join(TRAINING_COSTS)}")
    if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
        raise PrunelabError(f"delta T must be an integer >= 1, got {delta_t!r}")
    for what, value in (("sparse", sparse_flops), ("dense", dense_flops)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PrunelabError(f"{what} FLOPs must be a finite number, got {value!r}; pass f_S and f_D from "
                                "measure_model")
    if not 0 <= sparse_flops <= dense_flops:
        raise PrunelabError(f"sparse FLOPs {sparse_flops} must be in [0, dense FLOPs {dense_flops}]; pass f_S <= f_D")
    f_s, f_d = float(sparse_flops), float(dense_flops)
    if method == "dense":
        return 3.0 * f_d
    if method == "rigl":
        return (3.0 * f_s * delta_t + 2.0 * f_s + f_d) / (delta_t + 1)
    if method == "snfs":
        return 2.0 * f_s + f_d
    return 3.0 * f_s


@dataclass(frozen=True)
class TrainingFlops:
    """Training cost of a run: per-sample inference FLOPs, per-sample training FLOPs, totals."""

    method: str
    samples: int
    sparse_inference_flops: float
    dense_inference_flops: float
    per_sample_flops: float

    @property
    def total_flops(self) -> float:
        return self.per_sample_flops * self.samples

    @property
    def dense_total_flops(self) -> float:
        return 3.0 * self.dense_inference_flops * self.samples

    @property
    def fraction_of_dense(self) -> float:
        """Training FLOPs relative to dense training on the same samples (RigL Table 2's ``x dense``)."""
        return self.total_flops / self.dense_total_flops if self.dense_total_flops else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "sparse_inference_flops": self.sparse_inference_flops,
                "dense_inference_flops": self.dense_inference_flops, "train_flops_per_sample": self.per_sample_flops,
                "train_flops": self.total_flops, "dense_train_flops": self.dense_total_flops,
                "train_flops_fraction_of_dense": self.fraction_of_dense}


def training_flops(
    method: str,
    model: nn.Module,
    example_input: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    samples: int,
    delta_t: int = 100,
) -> TrainingFlops:
    """Training FLOPs of ``method`` over ``samples`` training samples (epochs x dataset size).

    ``f_S`` = sparse forward FLOPs of ``model`` under ``masks``, counted by kept connections
    (``2 * sum_l |M_l| * positions_l``, see the module docstring), and ``f_D`` = its dense
    forward FLOPs, both from one :func:`measure_model` pass of ``example_input``; per
    sample and step: dense ``3 f_D``; static/SET/DSR ``3 f_S``; RigL
    ``(3 f_S dT + 2 f_S + f_D) / (dT + 1)``; SNFS ``2 f_S + f_D`` (RigL, Appendix H).
    ``masks`` is required for every method but ``"dense"``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise PrunelabError(f"samples must be an integer >= 0 (training samples seen), got {samples!r}")
    if masks is None and method != "dense":
        raise PrunelabError(f"training FLOPs of {method!r} count the kept connections of its masks, got masks=None; "
                            "pass the sparsifier's masks (sparsifier.masks, or result.masks of a method run)")
    cost = measure_model(model, example_input, masks)  # also checks the masks' names
    f_s = cost.dense_flops if method == "dense" else kept_flops(model, cost, masks or {})
    per_sample = flops_per_sample(method, f_s, cost.dense_flops, delta_t=delta_t)
    return TrainingFlops(method, samples, float(f_s), float(cost.dense_flops), per_sample)


def kept_flops(model: nn.Module, cost: ModelCost, masks: Mapping[str, torch.Tensor]) -> int:
    """``2 * sum_l |M_l| * positions_l`` over ``cost``'s layers (``measure_model(model, ...)``): FLOPs by the mask.

    A layer's mask is found by its weight's FQN (a tied weight under any of its names, several
    masks of one tensor ANDed, as :func:`measure_model` does); an attention in-projection
    takes its rows of the mask.  A layer without a mask counts every weight; a materialised
    sparse module (whose weight is no parameter) counts the nonzeros its format stores.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))

    def key(fqn: str) -> object:
        tensor = tensors.get(fqn)
        return id(tensor) if tensor is not None else fqn

    keeps: dict[object, torch.Tensor] = {}
    for fqn, mask in masks.items():
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        k = key(fqn)
        keeps[k] = keeps[k] & mask if k in keeps else mask
    units: dict[str, tuple[object, slice | None, bool]] = {}  # layer name -> (mask key, rows, weight is a parameter)
    for name, module in measured_layers(model).items():
        units[name] = (key(child_name(name, "weight")), None, isinstance(getattr(module, "weight", None), nn.Parameter))
    for name, module in attention_modules(model).items():
        for projection in in_projections(name, module):
            units[projection.name] = (key(projection.weight_name), projection.rows, True)
    total = 0
    for layer in cost.layers:
        mask_key, rows, is_parameter = units[layer.name]
        mask = keeps.get(mask_key)
        if mask is not None:
            kept = int((mask if rows is None else mask[rows]).sum())
        else:
            kept = layer.weight_params if is_parameter else layer.weight_nonzeros
        total += 2 * kept * layer.output_positions
    return total
