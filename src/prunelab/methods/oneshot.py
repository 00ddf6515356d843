"""One-shot pruning: score once, prune to the target, optionally fine-tune."""

from __future__ import annotations

import dataclasses

from torch import nn

from prunelab.bench.training import TrainConfig, make_optimizer, make_lr_scheduler, train
from prunelab.criteria import ScoreData
from prunelab.methods.base import MethodResult, PruneSpec, require_loader, require_test_loader, stage_row


def run_oneshot(
    model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *, score_data: ScoreData | None = None,
    lr_flag: str = "--lr",
) -> MethodResult:
    require_test_loader(test_loader, "oneshot")  # both loaders checked before anything is pruned
    if spec.finetune_epochs > 0:
        require_loader(train_loader, "a training loader to fine-tune", "oneshot",
                       "pass the training DataLoader (or finetune_epochs=0)")
    sparsifier = spec.sparsifier(model, score_data)
    sparsifier.prepare()
    sparsifier.update(spec.sparsity)
    rows = [stage_row("pruned", model, sparsifier.masks, test_loader, round=1, target_sparsity=spec.sparsity)]
    if spec.finetune_epochs > 0:
        tune = dataclasses.replace(config, epochs=spec.finetune_epochs)
        optimizer = make_optimizer(model.parameters(), tune)
        sparsifier.prepare(optimizer)
        train(model, train_loader, tune, optimizer=optimizer,
              scheduler=make_lr_scheduler(optimizer, tune, len(train_loader)),
              after_step=lambda _step: sparsifier.step(), description="fine-tune", lr_flag=lr_flag)
        rows.append(stage_row("fine-tuned", model, sparsifier.masks, test_loader, round=1, target_sparsity=spec.sparsity))
    masks = sparsifier.finalize()
    return MethodResult(masks, rows, sparsifier.history)
