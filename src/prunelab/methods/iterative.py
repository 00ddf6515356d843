"""Iterative magnitude pruning (IMP) with retraining.

Han et al. 2015 ("Learning both Weights and Connections for Efficient Neural Networks")
prune and retrain repeatedly; Frankle & Carbin 2019 prune a fixed fraction ``p`` of the
*remaining* weights per round, so after round ``r`` the sparsity is
``s_r = 1 - (1 - p)^r``.  Here ``p = 1 - (1 - s_f)^(1/R)`` reaches the target ``s_f`` in
``R`` rounds; ``layer_rates`` give some layers their own per-round rate ``p_l`` (their
sparsity after round ``r`` is fixed at ``1 - (1 - p_l)^r``), and the global target of the
round counts them at that rate, the others at ``p``.  Each round restarts the optimizer
and learning-rate schedule and retrains for ``finetune_epochs``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from prunelab.bench.training import TrainConfig, make_lr_scheduler, make_optimizer, train
from prunelab.criteria import ScoreData
from prunelab.methods.base import (
    MethodResult, PruneSpec, loader_steps, raise_sparsity, require_loader, require_test_loader, stage_row,
)
from prunelab.schedules import Geometric, per_round_sparsity
from prunelab.targets import keep_bounds, matching_layers


def run_iterative(
    model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *, score_data: ScoreData | None = None,
    lr_flag: str = "--lr",
) -> MethodResult:
    schedule = Geometric(spec.sparsity, rounds=spec.rounds)
    sparsifier = spec.sparsifier(model, score_data)
    names = list(sparsifier.params)
    sizes = {n: p.numel() for n, p in sparsifier.params.items()}
    overridden = {n: rate for pattern, rate in spec.layer_rates.items() for n in matching_layers(names, pattern, "layer_rates")}
    tune = dataclasses.replace(config, epochs=spec.finetune_epochs)
    if tune.epochs > 0:
        require_loader(train_loader, "a training loader to retrain after each round", "iterative",
                       "pass the training DataLoader (or finetune_epochs=0)")
        steps_per_epoch = loader_steps(train_loader, "iterative")  # before the first round prunes anything
    require_test_loader(test_loader, "iterative")
    rows = []
    for r in schedule.update_steps():
        base = schedule.sparsity_at(r)
        fixed = {n: per_round_sparsity(rate, r) for n, rate in overridden.items()}
        sparsifier.bounds = spec.rules(fixed).bounds(names)  # keep_first/keep_last cap a fixed rate
        target = _round_target(base, fixed, sizes, sparsifier.bounds)
        reached = _reachable(sparsifier, fixed, target)
        if fixed:
            sparsifier.update(reached)  # the fixed layers move on to this round's rate in any case
        else:
            raise_sparsity(sparsifier, reached)
        if tune.epochs > 0:
            optimizer = make_optimizer(model.parameters(), tune)
            sparsifier.prepare(optimizer)
            train(model, train_loader, tune, optimizer=optimizer,
                  scheduler=make_lr_scheduler(optimizer, tune, steps_per_epoch),
                  after_step=lambda _step: sparsifier.step(), description=f"round {r}/{spec.rounds}", lr_flag=lr_flag)
        rows.append(stage_row(f"round {r}", model, sparsifier.masks, test_loader, round=r, target_sparsity=target))
    masks = sparsifier.finalize()
    return MethodResult(masks, rows, sparsifier.history)


def _round_target(base: float, fixed: dict[str, float], sizes: dict[str, int], bounds) -> float:
    """The global sparsity of a round: ``base`` itself when no layer has a fixed rate (a weighted
    mean of equal values can round off it: 0.45 became 0.45000000000000007 and kept one weight
    fewer than ``round(0.55 * n)``), else each fixed layer at its rate, the others at ``base``."""
    if not fixed:
        return base
    return sum(n * (bounds[name][0] if name in fixed else base) for name, n in sizes.items()) / sum(sizes.values())


def _reachable(sparsifier, fixed: dict[str, float], target: float) -> float:
    """``target``, or the sparsity the layers without a fixed rate already exceed it with.

    Coarse groups (channels) may have overshot an earlier, smaller round; asking them to
    keep more than is left would be refused (pruned stays pruned), so they keep what they
    have while the fixed layers move on to this round's rate (see ``raise_sparsity``).
    """
    total = sum(p.numel() for p in sparsifier.params.values())
    fixed_kept, free_kept = 0, 0
    for name, param in sparsifier.params.items():
        if name not in fixed:
            free_kept += int(sparsifier.masks[name].sum())
            continue
        shape, granularity = tuple(param.shape), sparsifier.structures[name]
        alive = int(granularity.to_groups(sparsifier.masks[name]).any(dim=1).sum()) if param.numel() else 0
        keep = min(keep_bounds(granularity.num_groups(shape), *sparsifier.bounds[name])[1], alive)
        fixed_kept += keep * granularity.group_size(shape)  # what the allocator lets a fixed layer keep
    if int(round((1.0 - target) * total)) - fixed_kept <= free_kept:
        return target
    return 1.0 - (fixed_kept + free_kept) / total
