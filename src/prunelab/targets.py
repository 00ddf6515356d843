"""Which parameters are pruned, and the per-layer rules that bound them.

By default every weight of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` is a target, in module
order; biases, norms and embeddings are left dense.  :class:`LayerRules` then keeps the
first and/or last target dense or at a sparsity ceiling (Gale et al. 2019, "The State of
Sparsity in Deep Neural Networks", keep the first layer dense and the last at most 80%
sparse), fixes some layers' sparsity, or excludes layers by glob pattern.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from prunelab.errors import PrunelabError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """``FQN -> weight`` of every Linear/Conv layer, in module order, minus ``exclude`` globs."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and getattr(module, "weight", None) is not None:
            name = f"{module_name}.weight" if module_name else "weight"
            if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in exclude):
                continue
            found[name] = module.weight
    if not found:
        raise PrunelabError(
            "the model has no Linear or Conv layers left to prune; check --exclude or pass a model built from nn.Linear/nn.Conv"
        )
    return found


def _parse_keep(value: str | float | None, which: str) -> float | None:
    """``None``/'none' -> no rule; 'dense' -> 0.0; a number -> maximum sparsity of that layer."""
    if value is None or value == "none":
        return None
    if value == "dense":
        return 0.0
    try:
        ceiling = float(value)
    except (TypeError, ValueError):
        raise PrunelabError(
            f"--keep-{which} must be 'dense', 'none' or a maximum sparsity in [0, 1), got {value!r}"
        ) from None
    if not 0.0 <= ceiling < 1.0:
        raise PrunelabError(f"--keep-{which} maximum sparsity must be in [0, 1), got {ceiling}")
    return ceiling


@dataclass(frozen=True)
class LayerRules:
    """Per-layer constraints on top of the global target.

    ``keep_first`` / ``keep_last``: ``'dense'``, ``None`` or a maximum sparsity for the first
    / last target layer.  ``max_sparsity``: glob -> ceiling.  ``fixed_sparsity``: glob ->
    exact sparsity of matching layers (the other layers share the remaining budget).
    """

    keep_first: str | float | None = None
    keep_last: str | float | None = None
    max_sparsity: Mapping[str, float] = field(default_factory=dict)
    fixed_sparsity: Mapping[str, float] = field(default_factory=dict)

    def bounds(self, names: Sequence[str]) -> dict[str, tuple[float, float]]:
        """``name -> (min_sparsity, max_sparsity)`` for every target layer."""
        bounds = {n: (0.0, 1.0) for n in names}
        first, last = _parse_keep(self.keep_first, "first"), _parse_keep(self.keep_last, "last")
        for pattern, ceiling in self.max_sparsity.items():
            for n in _matching(names, pattern, "max_sparsity"):
                bounds[n] = (0.0, min(bounds[n][1], ceiling))
        if first is not None and names:
            bounds[names[0]] = (0.0, min(bounds[names[0]][1], first))
        if last is not None and names:
            bounds[names[-1]] = (0.0, min(bounds[names[-1]][1], last))
        for pattern, value in self.fixed_sparsity.items():
            if not 0.0 <= value < 1.0:
                raise PrunelabError(f"fixed sparsity for {pattern!r} must be in [0, 1), got {value}")
            for n in _matching(names, pattern, "fixed_sparsity"):
                clamped = min(value, bounds[n][1])  # a keep rule / ceiling wins over a fixed rate
                bounds[n] = (clamped, clamped)
        return bounds


def _matching(names: Sequence[str], pattern: str, what: str) -> list[str]:
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.rsplit(".", 1)[0], pattern)]
    if not hits:
        raise PrunelabError(f"{what} pattern {pattern!r} matches no prunable layer; layers are {', '.join(names)}")
    return hits


def keep_bounds(num_groups: int, min_sparsity: float, max_sparsity: float) -> tuple[int, int]:
    """Convert a layer's sparsity bounds into bounds on kept groups."""
    if min_sparsity == max_sparsity:
        keep = int(round((1.0 - min_sparsity) * num_groups))
        return keep, keep
    return int(math.ceil((1.0 - max_sparsity) * num_groups - 1e-9)), int(math.floor((1.0 - min_sparsity) * num_groups + 1e-9))
