"""Which parameters are pruned, and the per-layer rules that bound them.

By default every weight of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` is
a target (a transposed conv's weight is ``(in, out / groups, *kernel)``: structured
granularities learn that layout from the layer, see
:meth:`prunelab.structure.Granularity.for_layer`), and the input
projection of every ``nn.MultiheadAttention`` (``in_proj_weight``; its ``out_proj`` is a
Linear), in module order; biases, norms and embeddings are left dense.  :class:`LayerRules` then keeps the
first and/or last target dense or at a sparsity ceiling (Gale et al. 2019, "The State of
Sparsity in Deep Neural Networks", keep the first layer dense and the last at most 80%
sparse), fixes some layers' sparsity, or excludes layers by glob pattern.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from prunelab.errors import PrunelabError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def _layer_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(module name, module, attribute, weight)`` of every Linear/Conv/ConvTranspose weight and every
    ``nn.MultiheadAttention`` input projection (``in_proj_weight``, or ``q/k/v_proj_weight``
    when key/value widths differ: three quarters of its weights, applied by ``F.linear`` like
    a Linear's), in module order."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PRUNABLE_TYPES) and getattr(module, "weight", None) is not None:
            yield module_name, module, "weight", module.weight
        elif isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attr, None) is not None:
                    yield module_name, module, attr, getattr(module, attr)


def prunable_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """``FQN -> weight`` of every Linear/Conv/ConvTranspose layer and ``nn.MultiheadAttention`` input
    projection (its ``out_proj`` is a Linear), in module order, minus ``exclude`` globs.

    A weight shared by several layers (tied) is one target, under its first name: pruning
    it under two names would count its weights twice and multiply two masks into it.  It
    is excluded when ``exclude`` matches any of its names.  A glob that matches no
    Linear/Conv layer (a typo) is a one-line error, as for the :class:`LayerRules` globs.
    """
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"expected an nn.Module to prune, got a {type(model).__name__}; pass the model itself")
    if exclude is None:
        exclude = ()
    if isinstance(exclude, str):  # a bare glob would be iterated letter by letter
        exclude = (exclude,)
    exclude = tuple(exclude)
    wrong = [p for p in exclude if not isinstance(p, str)]
    if wrong:
        raise PrunelabError(f"exclude pattern {wrong[0]!r} is a {type(wrong[0]).__name__}, not a str; pass globs "
                            "such as 'fc3' or 'features.*'")
    found: dict[str, nn.Parameter] = {}
    names_of: dict[int, str] = {}  # id(weight) -> the name it is found under
    excluded: set[int] = set()
    layer_names: list[str] = []
    unused = list(exclude)  # globs that matched nothing yet
    for module_name, _, attr, weight in _layer_weights(model):
        name = f"{module_name}.{attr}" if module_name else attr
        layer_names.append(name)
        hits = [p for p in exclude if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p)]
        if hits:
            unused = [p for p in unused if p not in hits]
            excluded.add(id(weight))
            continue
        if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
            raise PrunelabError(
                f"{name} is not a plain initialised nn.Parameter ({type(weight).__name__}: a lazy module before its "
                "first forward, a parametrization or torch.nn.utils.prune); run one forward pass or remove the "
                f"parametrization / prune hooks, or exclude {module_name or 'it'!r}"
            )
        if id(weight) not in names_of:
            names_of[id(weight)] = name
            found[name] = weight
    if unused and layer_names:
        shown = ", ".join(layer_names[:8]) + (" ..." if len(layer_names) > 8 else "")
        raise PrunelabError(f"exclude pattern {unused[0]!r} matches no Linear/Conv layer; layers are {shown} "
                            "(a glob such as 'fc3' or 'features.*')")
    found = {n: p for n, p in found.items() if id(p) not in excluded}
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
        for what, rule in (("max_sparsity", self.max_sparsity), ("fixed_sparsity", self.fixed_sparsity)):
            if not isinstance(rule, Mapping):
                raise PrunelabError(f"{what} must be a mapping glob -> sparsity, e.g. {{'fc3': 0.5}}, got a "
                                    f"{type(rule).__name__}")
            wrong = [p for p in rule if not isinstance(p, str)]
            if wrong:
                raise PrunelabError(f"{what} pattern {wrong[0]!r} is a {type(wrong[0]).__name__}, not a str; key it "
                                    "by a layer glob such as 'fc3' or 'features.*'")
        first, last = _parse_keep(self.keep_first, "first"), _parse_keep(self.keep_last, "last")
        for pattern, ceiling in self.max_sparsity.items():
            ceiling = _rate(ceiling, f"max_sparsity for {pattern!r}")
            for n in matching_layers(names, pattern, "max_sparsity"):
                bounds[n] = (0.0, min(bounds[n][1], ceiling))
        if first is not None and names:
            bounds[names[0]] = (0.0, min(bounds[names[0]][1], first))
        if last is not None and names:
            bounds[names[-1]] = (0.0, min(bounds[names[-1]][1], last))
        for pattern, value in self.fixed_sparsity.items():
            value = _rate(value, f"fixed sparsity for {pattern!r}")
            for n in matching_layers(names, pattern, "fixed_sparsity"):
                clamped = min(value, bounds[n][1])  # a keep rule / ceiling wins over a fixed rate
                bounds[n] = (clamped, clamped)
        return bounds


def _rate(value: object, what: str) -> float:
    """A sparsity in [0, 1) from a rule, or a one-line error naming the rule."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise PrunelabError(f"{what} must be in [0, 1) (a number: the fraction of weights removed), got {value!r}")
    return float(value)


def matching_layers(names: Sequence[str], pattern: str, what: str) -> list[str]:
    """The ``names`` a glob ``pattern`` matches (with or without ``.weight``); a one-line error naming ``what`` if none."""
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
