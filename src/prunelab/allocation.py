"""Allocation: how many groups each layer keeps, and which ones.

An allocator receives one :class:`LayerBudget` per prunable parameter (its group scores
and the bounds its layer rules impose) and a global target sparsity, and returns the
number of groups each layer keeps.  :func:`select_top_k` then keeps the highest-scoring
groups of each layer.  Neither step sorts all weights (DESIGN.md decision 4):

* ``global`` finds one score threshold by bisection over the total order of float32
  values (at most 33 counting passes, no copy of the scores), then hands the budget left
  at the boundary to tied groups in a fixed order, so ties never make the achieved
  sparsity drift: achieved == target up to one group per layer.  With a structured
  granularity (``LayerBudget.structured``: vector, kernel, channel) it keeps at least one
  group of every layer by default: group scores of layers with different group sizes
  (an L1 sum over 9 weights vs one over 63) are not comparable, and one threshold over
  them can empty a whole layer, which disconnects the network.  The floor is the layer's
  ``min_keep`` raised to 1 (within its ``max_keep``), so rules and caps still win.
  Unstructured global allocation has no floor: layer collapse there is the documented
  behaviour of single-shot criteria (Tanaka et al. 2020, ``benchmarks/layer_collapse.py``).
* ``uniform`` and ``erk`` solve for per-layer densities by water-filling (bisection on a
  scale factor, layers that would exceed their bounds are clipped and the rest
  rescaled -- exactly RigL's ERK redistribution step), then round to whole groups and
  settle the rounding remainder one group at a time.  Every layer keeps at least one
  group (:func:`density_floor`): a small layer's share can round to 0 (10 weights at 99%
  sparsity keep 0.1 of a weight), which would disconnect the network; the floor is part
  of the water-filling, so the other layers give the weight back and the total still
  meets the budget.  Only when the budget is below one group per layer is it dropped.
* ``lamp`` rescales scores per layer (a per-layer sort) and then thresholds globally; it
  needs non-negative scores (the paper squares magnitudes) and refuses signed ones.

Already pruned groups carry the score ``-inf``: they are never selected again, which
keeps iterative pruning monotone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunelab.errors import PrunelabError
from prunelab.registry import Registry


@dataclass(frozen=True)
class LayerBudget:
    """One layer as the allocator sees it.

    ``scores``: ``(G,)`` group scores, higher = keep; ``-inf`` = already pruned.
    ``group_size``: weights per group.  ``shape``: the parameter shape (for ERK).
    ``min_keep`` / ``max_keep``: bounds on kept groups set by layer rules
    (dense layer: ``min_keep == max_keep == G``; fixed sparsity: both equal).
    ``structured``: the groups are several weights of a structured granularity
    (``Granularity.structured``); ``global`` then keeps at least one of them.
    """

    name: str
    scores: torch.Tensor
    group_size: int
    shape: tuple[int, ...]
    min_keep: int
    max_keep: int
    structured: bool = False

    @property
    def num_groups(self) -> int:
        return self.scores.numel()

    @property
    def numel(self) -> int:
        return self.num_groups * self.group_size


def keep_budget(layers: Sequence[LayerBudget], sparsity: float) -> int:
    """Weights to keep for a global target ``sparsity`` (rounded to the nearest weight)."""
    check_sparsity(sparsity)
    total = sum(layer.numel for layer in layers)
    return int(round((1.0 - sparsity) * total))


def check_sparsity(sparsity: float, what: str = "sparsity") -> None:
    """Refuse a ``sparsity`` that is no number in [0, 1) (a bool, ``False`` for 0, included)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0) \
            or math.isnan(sparsity):
        raise PrunelabError(
            f"{what} must be in [0, 1) (the fraction of weights removed), got {sparsity!r}; e.g. 0.9 for 90%"
        )


def _check_bounds(layers: Sequence[LayerBudget], budget: int,
                  floors: str = "the layer rules (dense / floor layers) keep",
                  relax: str = "relax --keep-first/--keep-last") -> None:
    """Refuse a ``budget`` below the layers' floors (``floors`` says whose, ``relax`` how to lower them)
    or above their caps."""
    low = sum(l.min_keep * l.group_size for l in layers)
    high = sum(l.max_keep * l.group_size for l in layers)
    total = sum(l.numel for l in layers)
    if budget < low:
        raise PrunelabError(
            f"target keeps {budget} of {total} weights but {floors} at least "
            f"{low}; lower the sparsity to <= {1 - low / total:.4f} or {relax}"
        )
    if budget > high:
        raise PrunelabError(
            f"target keeps {budget} of {total} weights but at most {high} can be kept "
            f"(fixed-sparsity layers or weights already pruned); raise the sparsity to >= {1 - high / total:.4f}"
        )


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the ``k`` highest scores; ties go to the lower index.

    Uses ``kthvalue`` (linear time), not a sort.  The k-th value is found in the scores'
    own precision (float16/bfloat16 are widened to float32 exactly), so float64 scores
    that differ only beyond float32 precision are still told apart and exactly ``k`` are
    kept.  NaN scores are refused: no threshold orders them.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    flat = scores.reshape(-1)
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise PrunelabError("scores contain NaN; check the criterion's inputs (NaN or inf weights, gradients or data)")
    if k == 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    exact = flat if flat.dtype == torch.float64 or not flat.is_floating_point() else flat.float()
    kth = torch.kthvalue(exact.cpu(), n - k + 1).values.to(flat.device)
    keep = exact > kth
    need = k - int(keep.sum())
    if need > 0:
        tied = torch.nonzero(exact == kth).reshape(-1)[:need]
        keep[tied] = True
    return keep


# --- float32 total order, for bisection over thresholds ------------------------------

def _key_to_float(key: int) -> float:
    """Inverse of the monotone map float32 -> int (key of -x is -key-1 for x >= +0)."""
    bits = key if key >= 0 else (-key - 1) | 0x80000000
    return torch.tensor([bits & 0xFFFFFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


_MIN_KEY = -0x7F800001  # key of -inf: "score > -inf" keeps every group not already pruned
_MAX_KEY = 0x7F800000  # key of +inf: "score > +inf" keeps nothing


def _count_above(layers: Sequence[LayerBudget], threshold: float) -> list[int]:
    return [int((layer.scores > threshold).sum()) for layer in layers]


def _clamped_kept(layers: Sequence[LayerBudget], counts: list[int]) -> list[int]:
    return [min(max(c, l.min_keep), l.max_keep) for c, l in zip(counts, layers)]


def _check_no_nan(layers: Sequence[LayerBudget]) -> None:
    for layer in layers:
        if layer.scores.is_floating_point() and bool(torch.isnan(layer.scores).any()):
            raise PrunelabError(f"scores of {layer.name!r} contain NaN; check the criterion's inputs (NaN or inf weights, gradients or data)")


def global_threshold_counts(layers: Sequence[LayerBudget], budget: int) -> list[int]:
    """Groups kept per layer for one global score threshold meeting ``budget`` weights."""
    _check_bounds(layers, budget)
    _check_no_nan(layers)

    def kept_weights(key: int) -> tuple[list[int], int]:
        kept = _clamped_kept(layers, _count_above(layers, _key_to_float(key)))
        return kept, sum(k * l.group_size for k, l in zip(kept, layers))

    # smallest key t with kept(t) <= budget; kept() is non-increasing in t
    lo, hi = _MIN_KEY, _MAX_KEY
    if kept_weights(lo)[1] <= budget:
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kept_weights(mid)[1] <= budget:
            hi = mid
        else:
            lo = mid
    kept, used = kept_weights(hi)
    if used == budget or hi == lo:
        return kept
    wider, _ = kept_weights(hi - 1)  # also keeps the groups whose score equals the threshold
    remaining = budget - used
    for i, layer in enumerate(layers):  # hand the boundary budget out in a fixed order
        if layer.group_size == 0:  # a zero-size layer: its groups hold no weight
            continue
        extra = min(wider[i] - kept[i], remaining // layer.group_size)
        kept[i] += extra
        remaining -= extra * layer.group_size
    return kept


def water_fill_counts(layers: Sequence[LayerBudget], budget: int, raw_density: Sequence[float]) -> list[int]:
    """Groups kept per layer with densities proportional to ``raw_density``.

    Solves ``sum_l clip(eps * raw_l, lo_l, hi_l) * N_l = budget`` for ``eps`` by bisection
    (layers that hit a bound are fixed there and the rest rescaled: RigL's ERK
    redistribution), then rounds to whole groups and settles the remainder.
    """
    _check_bounds(layers, budget)
    lo_d = [l.min_keep / l.num_groups if l.num_groups else 0.0 for l in layers]  # a zero-size layer: no groups
    hi_d = [l.max_keep / l.num_groups if l.num_groups else 0.0 for l in layers]

    def total(eps: float) -> float:
        return sum(min(max(eps * r, a), b) * l.numel for r, a, b, l in zip(raw_density, lo_d, hi_d, layers))

    lo, hi = 0.0, 1.0
    while total(hi) < budget and hi < 1e300:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) < budget:
            lo = mid
        else:
            hi = mid
    dens = [min(max(hi * r, a), b) for r, a, b in zip(raw_density, lo_d, hi_d)]
    exact = [d * l.num_groups for d, l in zip(dens, layers)]
    kept = [min(max(int(math.floor(e)), l.min_keep), l.max_keep) for e, l in zip(exact, layers)]
    remaining = budget - sum(k * l.group_size for k, l in zip(kept, layers))
    # settle the rounding remainder: largest fractional parts first, one group per layer
    order = sorted(range(len(layers)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in order:
        layer = layers[i]
        if 0 < layer.group_size <= remaining and kept[i] < layer.max_keep:
            kept[i] += 1
            remaining -= layer.group_size
    return kept


@dataclass(frozen=True)
class Allocation:
    """Base class: decide kept groups per layer for a global target sparsity."""

    name = "base"

    def keep_counts(self, layers: Sequence[LayerBudget], sparsity: float) -> list[int]:
        raise NotImplementedError

    def prepare_scores(self, layers: Sequence[LayerBudget]) -> list[LayerBudget]:
        """Scores used for the within-layer choice (LAMP rescales them)."""
        return list(layers)


def one_group_floor(layers: Sequence[LayerBudget]) -> list[LayerBudget]:
    """``layers`` with every structured layer's ``min_keep`` raised to one group.

    A layer whose ``max_keep`` is 0 (a rule prunes it fully, or every group is already
    pruned) keeps its cap: the floor never overrides a rule or regrows a group.
    """
    return [dataclasses.replace(l, min_keep=max(l.min_keep, min(1, l.max_keep))) if l.structured else l
            for l in layers]


@dataclass(frozen=True)
class GlobalAllocation(Allocation):
    """One threshold on group scores across all layers (Han et al. 2015 style, global).

    ``keep_one_group`` (default ``True``): every structured layer keeps at least one group
    (:func:`one_group_floor`), so a channel/kernel/vector threshold never removes a whole
    layer.  ``GlobalAllocation(keep_one_group=False)`` restores the bare threshold.
    Unstructured layers are never floored.
    """

    keep_one_group: bool = True
    name = "global"

    def keep_counts(self, layers: Sequence[LayerBudget], sparsity: float) -> list[int]:
        budget = keep_budget(layers, sparsity)
        if self.keep_one_group and any(l.structured for l in layers):
            _check_bounds(layers, budget)  # the layer rules' own limits first, with their own message
            layers = one_group_floor(layers)
            _check_bounds(layers, budget, "global allocation keeps one group of every layer (so no layer is removed):",
                          "pass --no-layer-floor (API: allocation=prunelab.allocation.GlobalAllocation("
                          "keep_one_group=False))")
        return global_threshold_counts(layers, budget)


def density_floor(layers: Sequence[LayerBudget], budget: int) -> list[LayerBudget]:
    """``layers`` with every non-empty layer's ``min_keep`` raised to one group, for ``uniform``
    and ``erk``: a per-layer density never rounds a layer away (disconnecting the network).

    A layer whose ``max_keep`` is 0 (a rule prunes it fully, or all of it is already pruned)
    keeps its cap.  When ``budget`` cannot hold one group of every layer (on top of the
    rules' floors) the layers are returned unchanged: no allocation can keep them all.
    """
    floored = [dataclasses.replace(l, min_keep=max(l.min_keep, min(1, l.max_keep)))
               if l.num_groups and l.group_size else l for l in layers]
    return floored if sum(l.min_keep * l.group_size for l in floored) <= budget else list(layers)


@dataclass(frozen=True)
class UniformAllocation(Allocation):
    """Every layer at the same sparsity (layers bound by rules excepted, the rest rescaled);
    every layer keeps at least one group (:func:`density_floor`)."""

    name = "uniform"

    def keep_counts(self, layers: Sequence[LayerBudget], sparsity: float) -> list[int]:
        budget = keep_budget(layers, sparsity)
        _check_bounds(layers, budget)  # the layer rules' own limits, with their own message
        return water_fill_counts(density_floor(layers, budget), budget, [1.0] * len(layers))


def erk_raw_density(shape: tuple[int, ...]) -> float:
    """Erdos-Renyi-Kernel factor ``sum(shape) / prod(shape)`` (Evci et al. 2020, RigL).

    For a Linear ``(n_out, n_in)`` this is the Erdos-Renyi ``(n_in + n_out) / (n_in n_out)``
    of Mocanu et al. 2018; for a conv ``(n_out, n_in, kh, kw)`` the kernel dimensions join
    the sum.  Layer density is ``eps * factor``, with ``eps`` set by the global budget.
    """
    size = math.prod(shape)
    return sum(shape) / size if size else 0.0  # a zero-size layer keeps nothing either way


@dataclass(frozen=True)
class ERKAllocation(Allocation):
    """Erdos-Renyi-Kernel densities with redistribution of layers that would exceed 1;
    every layer keeps at least one group (:func:`density_floor`)."""

    name = "erk"

    def keep_counts(self, layers: Sequence[LayerBudget], sparsity: float) -> list[int]:
        raw = [erk_raw_density(tuple(l.shape)) for l in layers]
        budget = keep_budget(layers, sparsity)
        _check_bounds(layers, budget)  # the layer rules' own limits, with their own message
        return water_fill_counts(density_floor(layers, budget), budget, raw)


def lamp_scores(scores: torch.Tensor, name: str = "a layer") -> torch.Tensor:
    """LAMP score (Lee et al. 2021, "Layer-adaptive sparsity for the magnitude-based pruning").

    With the layer's scores sorted ascending, ``s[1] <= ... <= s[n]``:
    ``lamp(u) = s[u]^2 / sum_{v >= u} s[v]^2``.  For the magnitude criterion ``s = |W|``,
    exactly the paper's score.  Ties are ordered by index (stable sort); ``-inf`` stays
    ``-inf`` (already pruned) and ``+inf`` stays ``+inf`` (kept first; the finite scores
    are rescaled among themselves).  Needs a per-layer sort, never a global one.

    The formula is monotone in ``s`` only for ``s >= 0`` (squaring would rank a score of
    -10 above one of 1), so signed scores (``grasp``, ``movement``) and NaN are refused
    with a one-line error instead of being silently reordered.
    """
    flat = scores.reshape(-1).double()
    if bool(torch.isnan(flat).any()):
        raise PrunelabError(f"LAMP got NaN scores in {name}; check the criterion's inputs (NaN or inf weights, gradients or data)")
    alive = torch.isfinite(flat)  # -inf: already pruned; +inf: must stay
    values = flat[alive]
    if values.numel() and float(values.min()) < 0.0:
        raise PrunelabError(
            f"LAMP (Lee et al. 2021) rescales non-negative scores (magnitudes), but {name} has scores down to "
            f"{float(values.min()):.4g}; use a non-negative criterion (magnitude, l1, taylor, ...) or "
            "--allocation global, uniform or erk for signed criteria such as grasp or movement"
        )
    out = torch.where(torch.isposinf(flat), flat, torch.full_like(flat, -math.inf))
    order = torch.sort(values, stable=True).indices
    squared = values[order] ** 2
    suffix = torch.flip(torch.cumsum(torch.flip(squared, [0]), 0), [0])
    lamp_sorted = torch.where(suffix > 0, squared / suffix.clamp_min(1e-300), torch.zeros_like(squared))
    lamp = torch.empty_like(values)
    lamp[order] = lamp_sorted
    out[alive] = lamp
    return out.float().reshape(scores.shape)


@dataclass(frozen=True)
class LAMPAllocation(Allocation):
    """Global threshold on LAMP-rescaled scores (Lee et al. 2021)."""

    name = "lamp"

    def prepare_scores(self, layers: Sequence[LayerBudget]) -> list[LayerBudget]:
        return [dataclasses.replace(l, scores=lamp_scores(l.scores, repr(l.name))) for l in layers]

    def keep_counts(self, layers: Sequence[LayerBudget], sparsity: float) -> list[int]:
        return global_threshold_counts(self.prepare_scores(layers), keep_budget(layers, sparsity))


ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation")
ALLOCATIONS.add("global", GlobalAllocation, "one score threshold across all layers")
ALLOCATIONS.add("uniform", UniformAllocation, "the same sparsity in every layer")
ALLOCATIONS.add("erk", ERKAllocation, "Erdos-Renyi-Kernel densities with redistribution (Evci et al. 2020)")
ALLOCATIONS.add("lamp", LAMPAllocation, "global threshold on LAMP scores s^2/sum_{v>=u} s_v^2 (Lee et al. 2021)")


def get_allocation(spec: str | Allocation) -> Allocation:
    return spec if isinstance(spec, Allocation) else ALLOCATIONS.get(spec)()


def allocate(allocation: Allocation, layers: Sequence[LayerBudget], sparsity: float) -> dict[str, torch.Tensor]:
    """Group keep-decisions per layer: ``name -> (G,) bool``."""
    _check_no_nan(layers)  # every allocation: NaN scores would make select_top_k keep too few
    counts = allocation.keep_counts(layers, sparsity)
    ranked = allocation.prepare_scores(layers)
    return {l.name: select_top_k(l.scores, k) for l, k in zip(ranked, counts)}
