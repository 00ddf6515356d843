"""Gradual pruning during training (Zhu & Gupta 2017, "To prune, or not to prune").

The cubic schedule ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3`` raises the
sparsity from ``start_epoch`` to ``end_fraction`` of the run in ``num_updates`` steps of
``dt = (end - t0) // n`` optimizer steps, so the last update ``t0 + n dt`` lands at or
before ``end <= total`` and the final sparsity is reached within the run (step ``t`` is
the ``t``-th optimizer step; ``t0 = 0`` is applied before the first); the rest of the
run trains at the final sparsity, followed by ``finetune_epochs`` more epochs (0 for
none).  With ``criterion="movement"`` the scores are accumulated over the training
steps themselves (Sanh et al. 2020).
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from prunelab.bench.training import TrainConfig, make_lr_scheduler, make_optimizer, train
from prunelab.criteria import ScoreData
from prunelab.criteria.movement import Movement, MovementAccumulator
from prunelab.errors import PrunelabError
from prunelab.methods.base import (
    MethodResult, PruneSpec, loader_steps, raise_sparsity, require_loader, require_test_loader, stage_row,
)
from prunelab.schedules import Cubic


def gradual_window(spec: PruneSpec, epochs: int, steps_per_epoch: int) -> tuple[int, int, int]:
    """``(start, end, frequency)`` in optimizer steps of a gradual run of ``epochs`` x ``steps_per_epoch``.

    The ``num_updates`` updates of the cubic schedule land at ``start + k * frequency`` (``k = 0..n``),
    the last at most ``end <= total``.  A start at or past the end of the run, an end not after the
    start and a window with fewer steps than updates are one-line errors naming the flags to change
    (``prunelab prune`` asks this before the dense training).
    """
    total = epochs * steps_per_epoch
    start = spec.start_epoch * steps_per_epoch
    end = math.floor(round(spec.end_fraction * total, 6))  # 0.29 * 100 is 28.999...: the end is step 29
    if total < 1:
        raise PrunelabError(f"gradual pruning prunes while training, but the run has {total} steps ({epochs} epoch(s) "
                            f"x {steps_per_epoch} batches); pass --epochs >= 1 and a non-empty training set")
    if start >= total:
        raise PrunelabError(
            f"gradual pruning starts at epoch {spec.start_epoch} (--start-epoch), but the run trains {epochs} "
            f"epoch(s) (--epochs): it would never prune; pass --start-epoch < --epochs"
        )
    if end <= start:
        raise PrunelabError(
            f"gradual pruning ends at step {end} of {total} (--end-fraction {spec.end_fraction:g} of --epochs "
            f"{epochs}), not after it starts at step {start} (--start-epoch {spec.start_epoch}); pass a larger "
            f"--end-fraction (> {spec.start_epoch / epochs:.4g}) or an earlier --start-epoch"
        )
    frequency = (end - start) // spec.num_updates
    if frequency < 1:
        raise PrunelabError(
            f"gradual pruning needs room for {spec.num_updates} updates (--num-updates) between step {start} and "
            f"{end} of {total} ({steps_per_epoch} per epoch): at most {end - start} fit there; train longer "
            f"(--epochs), lower --num-updates / --start-epoch, or raise --end-fraction"
        )
    return start, end, frequency


def run_gradual(
    model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *, score_data: ScoreData | None = None,
    lr_flag: str = "--lr",
) -> MethodResult:
    require_loader(train_loader, "a training loader (it prunes while training)", "gradual",
                   "pass the training DataLoader")
    steps_per_epoch = loader_steps(train_loader, "gradual")
    start, _end, frequency = gradual_window(spec, config.epochs, steps_per_epoch)
    require_test_loader(test_loader, "gradual")
    # updates at start + k * frequency, k = 0..n: the last is at most end <= total, a step the run reaches
    schedule = Cubic(spec.sparsity, start_step=start, num_updates=spec.num_updates, frequency=frequency)
    # the schedule is driven here, not by the sparsifier: a step never asks to un-prune (see raise_sparsity)
    sparsifier = spec.sparsifier(model, score_data)
    if sparsifier.granularity.is_pattern:
        raise PrunelabError(
            f"gradual pruning raises the sparsity in steps, but an N:M pattern ({sparsifier.granularity.describe()}) "
            "fixes it at 1 - N/M; use --method oneshot, or another granularity"
        )
    accumulator = None
    if spec.criterion == "movement":  # Sanh et al. 2020: scores accumulate over the fine-tuning steps
        accumulator = MovementAccumulator(sparsifier.params)
        sparsifier.criterion = Movement(accumulator=accumulator)

    def after_step(_step: int) -> None:
        if accumulator is not None:
            accumulator.update()
        sparsifier.step()  # step t = sparsifier.step_count: enforce the masks after every optimizer step
        if schedule.is_update_step(sparsifier.step_count):
            raise_sparsity(sparsifier, schedule.sparsity_at(sparsifier.step_count))

    optimizer = make_optimizer(model.parameters(), config)
    sparsifier.prepare(optimizer)
    if schedule.is_update_step(0):  # s_t0 = s_i = 0: nothing to prune before the first step
        raise_sparsity(sparsifier, schedule.sparsity_at(0))
    train(model, train_loader, config, optimizer=optimizer,
          scheduler=make_lr_scheduler(optimizer, config, steps_per_epoch),
          after_step=after_step, description="gradual", lr_flag=lr_flag)
    rows = [stage_row("gradual", model, sparsifier.masks, test_loader, round=1, target_sparsity=spec.sparsity)]
    if spec.finetune_epochs > 0:
        tune = dataclasses.replace(config, epochs=spec.finetune_epochs)
        optimizer = make_optimizer(model.parameters(), tune)
        sparsifier.prepare(optimizer)
        train(model, train_loader, tune, optimizer=optimizer,
              scheduler=make_lr_scheduler(optimizer, tune, steps_per_epoch),
              after_step=lambda _step: sparsifier.step(), description="fine-tune", lr_flag=lr_flag)
        rows.append(stage_row("fine-tuned", model, sparsifier.masks, test_loader, round=1, target_sparsity=spec.sparsity))
    masks = sparsifier.finalize()
    return MethodResult(masks, rows, sparsifier.history)
