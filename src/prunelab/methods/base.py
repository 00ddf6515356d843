"""What every pruning method takes and returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunelab.allocation import Allocation, check_sparsity
from prunelab.bench.training import evaluate
from prunelab.criteria import ScoreData
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.sparsifier import Sparsifier
from prunelab.targets import LayerRules


@dataclass(frozen=True)
class PruneSpec:
    """What to prune, how, and how far -- shared by every method.

    ``rounds`` / ``layer_rates`` drive ``iterative`` (Frankle & Carbin 2019 prune 20% of
    the remaining hidden weights per round and 10% of the output layer's: ``layer_rates=
    {"fc3": 0.1}``); ``num_updates`` / ``start_epoch`` / ``end_fraction`` drive
    ``gradual``; ``finetune_epochs`` is the retraining after each pruning event;
    ``delta_t`` / ``alpha`` drive dynamic sparse training (RigL defaults 100 / 0.3), which
    also stops rewiring at ``end_fraction`` of its run (RigL's ``T_end``).  ``allocation``
    is a registered name or an :class:`~prunelab.allocation.Allocation`, e.g.
    ``GlobalAllocation(keep_one_group=False)`` (the CLI's ``--no-layer-floor``).
    """

    sparsity: float = 0.9
    criterion: str = "magnitude"
    granularity: str = "unstructured"
    allocation: str | Allocation = "global"
    keep_first: str | float | None = None
    keep_last: str | float | None = None
    exclude: tuple[str, ...] = ()
    rounds: int = 5
    layer_rates: Mapping[str, float] = field(default_factory=dict)
    finetune_epochs: int = 1
    num_updates: int = 10
    start_epoch: int = 0
    end_fraction: float = 0.75
    score_batches: int = 8
    delta_t: int = 100
    alpha: float = 0.3

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        for name, low, high in (("end_fraction", 0.0, 1.0), ("alpha", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise PrunelabError(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")
        for name, minimum in (("rounds", 1), ("finetune_epochs", 0), ("num_updates", 1), ("score_batches", 1),
                              ("delta_t", 1), ("start_epoch", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PrunelabError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.layer_rates, Mapping):
            raise PrunelabError(f"layer_rates must map layer names to per-round rates, got {self.layer_rates!r}; "
                                "e.g. {'fc3': 0.1}")
        for name, rate in self.layer_rates.items():
            if not isinstance(name, str):
                raise PrunelabError(f"layer_rates keys must be layer globs (strings), got {name!r}; e.g. {{'fc3': 0.1}}")
            check_sparsity(rate, f"per-round rate for {name!r}")
        object.__setattr__(self, "layer_rates", dict(self.layer_rates))  # a copy: the caller's dict may change later
        exclude = self.exclude if self.exclude is not None else ()
        exclude = (exclude,) if isinstance(exclude, str) else exclude  # a bare glob: not its letters
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(p, str) for p in exclude):
            raise PrunelabError(f"exclude must be layer globs (strings), got {self.exclude!r}; e.g. ('fc3',)")
        object.__setattr__(self, "exclude", tuple(exclude))

    def rules(self, fixed: Mapping[str, float] | None = None) -> LayerRules:
        return LayerRules(keep_first=self.keep_first, keep_last=self.keep_last, fixed_sparsity=dict(fixed or {}))

    def sparsifier(self, model: nn.Module, data: ScoreData | None, **kwargs: Any) -> Sparsifier:
        return Sparsifier(
            model,
            criterion=self.criterion,
            granularity=self.granularity,
            allocation=self.allocation,
            rules=kwargs.pop("rules", self.rules()),
            exclude=self.exclude,
            data=data,
            **kwargs,
        )


@dataclass
class MethodResult:
    """Final masks and one row per pruning stage (sparsity, accuracy...)."""

    masks: MaskSet
    rows: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)


def require_loader(loader: Any, role: str, method: str, fix: str) -> None:
    """Raise a one-line PrunelabError when ``loader`` (the ``role`` data of ``method``) is missing or
    has no batch (checked before anything is pruned: an empty training loader failed only at the
    fine-tuning after the model was already pruned)."""
    if loader is None or not hasattr(loader, "__iter__"):
        raise PrunelabError(f"{method} needs {role} but got {type(loader).__name__}; {fix}")
    if _batch_count(loader) == 0:
        raise PrunelabError(f"{method} needs {role} but the {type(loader).__name__} given has no batch; "
                            "check the dataset split and batch size (drop_last=True drops a short last batch)")


def _batch_count(loader: Any) -> int | None:
    """``len(loader)``, or ``None`` when it has no length: a DataLoader over an ``IterableDataset``
    without ``__len__`` has the method but raises TypeError (such a loader is not refused)."""
    try:
        return len(loader)
    except TypeError:
        return None


def loader_steps(loader: Any, method: str) -> int:
    """``len(loader)``, the optimizer steps of one epoch; a one-line PrunelabError for a loader without a
    length (checked before anything is pruned: the lr schedule needs it)."""
    steps = _batch_count(loader)
    if steps is None:
        raise PrunelabError(f"{method}: the training loader ({type(loader).__name__}) has no length, which the "
                            "learning-rate schedule needs; pass a DataLoader over a map-style dataset or a list of "
                            "batches")
    return steps


def require_test_loader(test_loader: Any, method: str) -> None:
    """Refuse a missing test loader before ``method`` prunes or trains (every stage is evaluated on it)."""
    require_loader(test_loader, "a test loader to evaluate the stages", method, "pass the test DataLoader")


def raise_sparsity(sparsifier: Sparsifier, target: float) -> bool:
    """Update the masks to ``target`` unless they are already at least that sparse; True if updated.

    Pruning is monotone (pruned stays pruned).  With coarse groups (channels, kernels) an
    update removes whole groups and can overshoot its target, so a later step of a rising
    schedule (IMP rounds, Zhu & Gupta's cubic, SynFlow's rounds) may ask for less than is
    already pruned: that step has nothing to prune (the allocator would refuse to keep
    more than is left).  Unstructured updates never overshoot, so this changes nothing there.
    """
    if target <= sparsifier.masks.stats().sparsity:
        return False
    sparsifier.update(target)
    return True


def stage_row(stage: str, model: nn.Module, masks: MaskSet, test_loader, **extra: Any) -> dict[str, Any]:
    """Evaluate the model now and describe the stage in one flat record."""
    require_loader(test_loader, "a test loader to evaluate the stage", stage, "pass the test DataLoader")
    metrics = evaluate(model, test_loader)
    stats = masks.stats()
    return {
        "stage": stage,
        **extra,
        "sparsity": stats.sparsity,
        "kept_weights": stats.kept,
        "accuracy": metrics["accuracy"],
        "error_pct": metrics["error_pct"],
        "test_loss": metrics["loss"],
    }
