"""How much do a model's Linear / Conv1D inputs have outlier features?  (Predicts whether Wanda helps.)

Wanda (Sun et al. 2023) scores ``|W_ij| * ||X_j||_2``; it differs from per-row magnitude
pruning only as far as the input-feature norms ``||X_j||`` differ from each other.  Large
language models develop a few *outlier features* whose magnitude is up to ~100x the rest
(Dettmers et al. 2022, "LLM.int8()"), which is where Wanda's gain over magnitude comes
from (Sun et al. 2023, sec. 3).  :func:`input_norm_spread` measures, for every
``nn.Linear``, the ratio ``max_j ||X_j|| / median_j ||X_j||`` over calibration inputs: near 1
means Wanda is close to magnitude-per-row; tens to hundreds mean outlier features.
``transformers``' ``Conv1D`` (GPT-2's layers, weight stored ``(in, out)``) counts as a Linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.errors import PrunelabError
from prunelab.oneshot.block_runs import check_calibration, layer_input, run_model, token_masks
from prunelab.oneshot.engine import eval_mode
from prunelab.oneshot.layer_targets import LayerTarget, classify_layer
from prunelab.oneshot.stats import ColumnNormAccumulator

# the layers whose inputs are token features (``(..., in)``): nn.Linear and transformers' Conv1D
_FEATURE_KINDS = ("linear", "conv1d")


def feature_layers(model: nn.Module) -> list[LayerTarget]:
    """The ``nn.Linear`` and ``transformers`` ``Conv1D`` layers of ``model`` (GPT-2 style,
    weight ``(in, out)``), found by module type as the one-shot engine finds them
    (:func:`prunelab.oneshot.layer_targets.classify_layer`; transformers is never imported)."""
    found = []
    for name, module in model.named_modules():
        target = classify_layer(name, module)
        if isinstance(target, LayerTarget) and target.kind in _FEATURE_KINDS:
            found.append(target)
    return found


def input_norm_spread(model: nn.Module, calibration: Sequence[Any]) -> dict[str, float]:
    """``{Linear / Conv1D name: max_j ||X_j||_2 / median_j ||X_j||_2}`` over the calibration inputs.

    ``calibration``: model inputs, each a Tensor (``model(x)``) or a dict (``model(**x)``).
    Padding positions of a dict item with a 2-D ``attention_mask`` are left out, as the
    one-shot engine leaves them out of its statistics.  Items are moved to the device of
    the model's first parameter, as the engine moves them.
    The model is not changed; hooks are removed even if the forward raises.  Calibration
    that is empty or does not fit the model is a :class:`PrunelabError` naming the item;
    inf/NaN inputs to a layer are a :class:`PrunelabError` naming the layer.
    """
    accumulators: dict[str, ColumnNormAccumulator] = {}
    handles = []
    items = check_calibration(calibration)
    first = next(iter(model.parameters()), None)
    device = torch.device("cpu") if first is None else first.device  # items are moved there, as the engine does
    tokens = token_masks(items, device)  # per item: real positions, or None
    current: list[Tensor | None] = [None]

    def hook(target: LayerTarget):
        def record(layer: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
            x = layer_input(layer, args, kwargs).detach()  # also linear(input=x), Conv1D's x=
            accumulators[target.name].add(target.inputs2d(x, current[0]))  # (tokens, in_features)
        return record

    try:
        for target in feature_layers(model):
            weight = target.module.weight
            accumulators[target.name] = ColumnNormAccumulator(target.features, weight.device)
            handles.append(target.module.register_forward_pre_hook(hook(target), with_kwargs=True))
        with eval_mode(model), torch.no_grad():
            for i, (item, real) in enumerate(zip(items, tokens, strict=True)):
                current[0] = real
                run_model(model, item, i, device)  # a forward that fails: PrunelabError naming item i
    finally:
        for handle in handles:
            handle.remove()
    spread = {}
    for name, acc in accumulators.items():
        stats = acc.result()  # summed over ranks under torch.distributed, as the solvers see them
        if not bool(torch.isfinite(stats.sq_norms).all()):  # NaN would read as a ratio of inf (or NaN)
            raise PrunelabError(
                f"layer {name!r} received non-finite inputs (inf or NaN) on the calibration data; check the "
                "calibration inputs and the layers before it"
            )
        if stats.count:
            norms = stats.sq_norms.sqrt()  # (in_features,)
            median = float(norms.median())
            spread[name] = float(norms.max()) / median if median > 0 else float("inf")
    return spread


def spread_summary(spread: dict[str, float]) -> dict[str, float]:
    """Median and max over layers of :func:`input_norm_spread`'s ratios."""
    if not spread:
        raise PrunelabError("spread_summary got no layers; input_norm_spread found no Linear/Conv inputs to measure")
    values = torch.tensor(list(spread.values()), dtype=torch.float64)
    return {"median_over_layers": float(values.median()), "max_over_layers": float(values.max())}
