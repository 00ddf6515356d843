"""Dynamic sparse training methods: sparse from the first step, rewired while training.

Each method trains ``model`` for ``config.epochs`` from a random mask at
``spec.sparsity`` -- per-layer counts by ERK (Evci et al. 2020; ``spec.allocation``
``"global"``, the default, means ERK here, since a global threshold on random scores is
just uniform; ``"uniform"`` and ``"erk"`` are honoured, anything else is refused) -- and
rewires it every ``delta_t`` optimizer steps by the cosine schedule
``f(t) = alpha/2 (1 + cos(pi t / T_end))`` (RigL eq. 1), ``T_end = end_fraction`` of the
run (``spec.end_fraction``, 0.75 by default).  The model's current weights are kept and
masked (pass a freshly initialised model for "sparse from scratch"); ``spec.finetune_epochs``
and ``score_data`` are not used.  See :mod:`prunelab.dst` for the algorithms:

* ``static`` -- fixed random ERK mask (baseline);
* ``set``  -- Mocanu et al. 2018; ``dsr`` -- Mostafa & Wang 2019;
* ``rigl`` -- Evci et al. 2020;   ``snfs`` -- Dettmers & Zettlemoyer 2019.

Their hyper-parameters beyond :class:`PruneSpec` travel in :class:`DSTConfig`
(``run_rigl(..., dst=DSTConfig(delta_t=50))``); defaults are RigL's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunelab.bench.training import (
    TrainConfig,
    make_lr_scheduler,
    make_optimizer,
    train,
)
from prunelab.criteria import ScoreData
from prunelab.dst import DST_SPARSIFIERS, DynamicSparsifier, UpdateSchedule
from prunelab.errors import PrunelabError
from prunelab.methods.base import MethodResult, PruneSpec, loader_steps, require_loader, stage_row


@dataclass(frozen=True)
class DSTConfig:
    """DST hyper-parameters: ``delta_t`` steps between updates, ``alpha`` the initial update
    fraction and ``end_fraction`` of the run at which updates stop (``None``, the default:
    the :class:`PruneSpec`'s ``delta_t`` / ``alpha`` / ``end_fraction``, RigL's 100 / 0.3 /
    0.75 unless set there), ``sparse_init`` rescales the initial kept weights
    by ``sqrt(fan_in / kept fan_in)`` per unit (Evci et al. 2022; for untrained models),
    ``options`` for the method's own constructor (``dsr``: ``threshold``, ``tolerance``;
    ``snfs``: ``momentum``)."""

    delta_t: int | None = None
    alpha: float | None = None
    end_fraction: float | None = None
    sparse_init: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def build_dst_sparsifier(
    name: str, model: nn.Module, spec: PruneSpec, total_steps: int, *, seed: int = 0, dst: DSTConfig | None = None
) -> DynamicSparsifier:
    """The DST sparsifier ``name`` for a run of ``total_steps`` optimizer steps, all inputs checked."""
    dst = dst if dst is not None else DSTConfig()
    cls = DST_SPARSIFIERS.get(name)
    if spec.granularity != "unstructured":
        raise PrunelabError(f"dynamic sparse training ({name}) rewires single weights, got granularity "
                            f"{spec.granularity!r}; pass --granularity unstructured")
    if spec.criterion != "magnitude":
        raise PrunelabError(f"{name} decides its own drop/grow scores, got criterion {spec.criterion!r}; leave "
                            "--criterion at magnitude")
    if spec.allocation not in ("global", "erk", "uniform"):
        raise PrunelabError(f"{name} starts from a random mask with erk or uniform layer counts, got allocation "
                            f"{spec.allocation!r}; pass --allocation erk (or global, which means erk here) or uniform")
    if not isinstance(dst.options, Mapping):
        raise PrunelabError(f"{name} options must be a mapping of keyword -> value, got {dst.options!r}; e.g. "
                            "DSTConfig(options={'momentum': 0.9}) for snfs")
    common = ("self", "model", "sparsity", "schedule", "allocation", "rules", "exclude", "seed", "sparse_init")
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)  # not **common / *args
    accepted = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                if n not in common and p.kind in keywords]
    unknown = sorted(set(dst.options) - set(accepted))
    if unknown:
        raise PrunelabError(f"{name} got unknown option(s) {', '.join(unknown)}; it accepts: "
                            f"{', '.join(accepted) if accepted else 'no options'}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise PrunelabError(f"{name} trains sparse from the start but the run has {total_steps!r} steps; "
                            "pass --epochs >= 1 and a non-empty training set")
    schedule = None
    if name != "static":
        # a DSTConfig field left at None defers to the spec (DSTConfig(sparse_init=True) keeps spec.delta_t)
        end = dst.end_fraction if dst.end_fraction is not None else spec.end_fraction
        delta_t = dst.delta_t if dst.delta_t is not None else spec.delta_t
        alpha = dst.alpha if dst.alpha is not None else spec.alpha
        schedule = UpdateSchedule.for_run(total_steps, delta_t=delta_t, alpha=alpha, end_fraction=end)
    allocation = "erk" if spec.allocation == "global" else spec.allocation
    return cls(model, spec.sparsity, schedule=schedule, allocation=allocation, rules=spec.rules(),
               exclude=spec.exclude, seed=seed, sparse_init=dst.sparse_init, **dict(dst.options))


def run_dst(
    name: str, model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
    dst: DSTConfig | None = None,
) -> MethodResult:
    """Train ``model`` sparse from the first step with the DST method ``name``."""
    require_loader(train_loader, "a training loader (it trains sparse from the first step)", name,
                   "pass the training DataLoader")
    steps_per_epoch = loader_steps(train_loader, name)
    sparsifier = build_dst_sparsifier(name, model, spec, config.epochs * steps_per_epoch, seed=config.seed, dst=dst)
    optimizer = make_optimizer(model.parameters(), config)
    sparsifier.prepare(optimizer)
    train(model, train_loader, config, optimizer=optimizer,
          scheduler=make_lr_scheduler(optimizer, config, steps_per_epoch),
          after_step=lambda _step: sparsifier.step(), description=name)
    masks = sparsifier.finalize()
    updates = sum(1 for h in sparsifier.history if "update_fraction" in h)
    rows = [stage_row(name, model, masks, test_loader, round=1, target_sparsity=spec.sparsity, mask_updates=updates)]
    return MethodResult(masks, rows, sparsifier.history)


def run_static(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
               score_data: ScoreData | None = None, dst: DSTConfig | None = None) -> MethodResult:
    """Static random ERK mask trained from the start (the baseline of Evci et al. 2020)."""
    return run_dst("static", model, train_loader, test_loader, spec, config, dst=dst)


def run_set(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
            score_data: ScoreData | None = None, dst: DSTConfig | None = None) -> MethodResult:
    """SET (Mocanu et al. 2018): drop the smallest |w|, regrow at random."""
    return run_dst("set", model, train_loader, test_loader, spec, config, dst=dst)


def run_dsr(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
            score_data: ScoreData | None = None, dst: DSTConfig | None = None) -> MethodResult:
    """DSR (Mostafa & Wang 2019): adaptive global threshold, regrowth proportional to survivors."""
    return run_dst("dsr", model, train_loader, test_loader, spec, config, dst=dst)


def run_rigl(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
             score_data: ScoreData | None = None, dst: DSTConfig | None = None) -> MethodResult:
    """RigL (Evci et al. 2020): drop the smallest |w|, grow the largest dense |grad|."""
    return run_dst("rigl", model, train_loader, test_loader, spec, config, dst=dst)


def run_snfs(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
             score_data: ScoreData | None = None, dst: DSTConfig | None = None) -> MethodResult:
    """SNFS (Dettmers & Zettlemoyer 2019): grow and redistribute by momentum magnitude."""
    return run_dst("snfs", model, train_loader, test_loader, spec, config, dst=dst)
