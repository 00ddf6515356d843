"""One pruning run end to end: data -> dense training -> method -> measure -> results folder.

Shared by ``prunelab prune``, ``prunelab demo`` and the benchmarks, so every entry point
writes the same records: ``results.json``, ``report.md``, ``sparsity_curve.png`` and a
checkpoint (``model.safetensors`` + ``masks.safetensors`` + ``checkpoint.json``).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prunelab import distributed
from prunelab.allocation import GlobalAllocation, get_allocation
from prunelab.bench.datasets import DATASETS, load_dataset, make_loaders
from prunelab.bench.models import MODELS, build_model
from prunelab.bench.training import TrainConfig, evaluate, seed_everything, train
from prunelab.checkpoint import MASKS_FILE, META_FILE, MODEL_FILE, save_checkpoint
from prunelab.config import RunConfig, beyond_torch, non_default_fields
from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.criteria.slimming import SlimmingLoss
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, ensure_writable_dir, write_json, write_text
from prunelab.measure.counting import measure_model
from prunelab.measure.tables import model_cost_table
from prunelab.methods import FROM_SCRATCH, METHODS, PruneSpec
from prunelab.methods.gradual import gradual_window
from prunelab.out_folders import OutFiles, check_out_folder
from prunelab.report import plot_sparsity_curve, render_report
from prunelab.run_checks import (
    DST_SCHEDULED, OWN_ALLOCATION, ROUND_METHODS, check_ignored_options, check_pattern_method, criterion_used,
)
from prunelab.schedules import MAX_UPDATES
from prunelab.structure import get_granularity
from prunelab.targets import matching_layers


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "world_size": distributed.world_size(),
        "date": time.strftime("%Y-%m-%d"),
    }


def validate(config: RunConfig, given: Collection[str] | None = None) -> None:
    """Fail fast, before any training, on names and numbers that cannot work.

    ``given`` names the fields the user set (the CLI passes its flags and ``--config`` keys);
    a given option this run would not use is refused.  ``None`` (the API): the fields whose
    value differs from RunConfig's default.
    """
    MODELS.get(config.model)
    DATASETS.get(config.dataset)
    METHODS.get(config.method)
    CRITERIA.get(config.criterion)
    granularity = get_granularity(config.granularity)
    get_allocation(config.allocation)
    if config.pretrain_epochs < 0:
        raise PrunelabError(f"--pretrain-epochs must be >= 0, got {config.pretrain_epochs}")
    if not (math.isfinite(config.slimming_strength) and config.slimming_strength >= 0):
        raise PrunelabError(f"--slimming-strength must be a number >= 0, got {config.slimming_strength!r}; e.g. 1e-4")
    if config.finetune_lr is not None and not (math.isfinite(config.finetune_lr) and config.finetune_lr > 0):
        raise PrunelabError(f"--finetune-lr must be a positive number, got {config.finetune_lr!r}; e.g. 0.01")
    reason = beyond_torch(config.finetune_lr, as_float=True)
    if reason:
        raise PrunelabError(f"--finetune-lr {config.finetune_lr!r} is too large for torch ({reason}); "
                            "pass a realistic value such as 0.01")
    if isinstance(config.start_epoch, int) and config.start_epoch < 0:
        raise PrunelabError(f"--start-epoch must be an integer >= 0 (0: prune from the first step), got {config.start_epoch}")
    if isinstance(config.end_fraction, float) and not 0.0 < config.end_fraction <= 1.0:  # nan included
        raise PrunelabError(f"--end-fraction must be in (0, 1] (a fraction of --epochs; 1: the end of the run), "
                            f"got {config.end_fraction!r}; e.g. 0.75")
    if config.out is not None and not config.out.strip():
        raise PrunelabError("--out is empty; name an output folder, or leave it out for runs/<model>-<method>-<hash>")
    given = non_default_fields(config) if given is None else frozenset(given)
    check_ignored_options(config, given)
    check_training_epochs(config)
    check_schedule_options(config, given, granularity)
    for flag, value in (("--rounds", config.rounds), ("--num-updates", config.num_updates)):
        if isinstance(value, int) and value > MAX_UPDATES:  # refused now, not by the schedule after the dense training
            raise PrunelabError(f"{flag} must be <= {MAX_UPDATES:,} (each mask update rescores the model), got {value:,}; "
                                "use fewer")
    prune_spec(config)
    pretrain_config(config)
    finetune_config(config)
    if granularity.is_pattern:
        check_pattern_method(config, granularity)


def pretrain_config(config: RunConfig) -> TrainConfig:
    return TrainConfig(
        epochs=max(config.pretrain_epochs, 1), batch_size=config.batch_size, optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay, lr_schedule=config.lr_schedule,
        seed=config.seed, progress=config.progress,
    )


def finetune_config(config: RunConfig) -> TrainConfig:
    """Training config handed to the method: sparse-from-scratch methods train at ``lr``."""
    if config.method in FROM_SCRATCH:
        return dataclasses.replace(pretrain_config(config), epochs=config.epochs)
    lr = config.finetune_lr if config.finetune_lr is not None else config.lr / 5.0
    base = dataclasses.replace(pretrain_config(config), lr=lr)
    return dataclasses.replace(base, epochs=config.epochs) if config.method == "gradual" else base


def prune_spec(config: RunConfig) -> PruneSpec:
    return PruneSpec(
        sparsity=config.sparsity, criterion=config.criterion, granularity=config.granularity,
        allocation=allocation_for(config), keep_first=config.keep_first, keep_last=keep_last_for(config),
        exclude=tuple(config.exclude), rounds=config.rounds, layer_rates=dict(config.layer_rates),
        finetune_epochs=config.finetune_epochs, num_updates=config.num_updates, score_batches=config.score_batches,
        start_epoch=config.start_epoch, end_fraction=config.end_fraction, delta_t=config.delta_t, alpha=config.alpha,
    )


OUTPUT_PRUNING = ("channel", "neuron")  # granularities that remove a layer's output units


def keep_last_for(config: RunConfig) -> str | None:
    """``--keep-last`` as given; left unset with a channel / neuron granularity, ``'dense'``:
    the last layer's output units are the model's outputs (its classes), and removing them
    changes what the model predicts, not what it costs -- structured-pruning tools leave the
    output layer alone for the same reason.  ``--keep-last none`` prunes it anyway."""
    if config.keep_last is None and config.granularity in OUTPUT_PRUNING:
        return "dense"
    return config.keep_last


def allocation_for(config: RunConfig):
    """``config.allocation``'s name, or ``GlobalAllocation(keep_one_group=False)`` for ``--no-layer-floor``."""
    return GlobalAllocation(keep_one_group=False) if config.allocation == "global" and not config.layer_floor \
        else config.allocation


END_FRACTION_METHODS = ("gradual", *DST_SCHEDULED)  # read RunConfig.end_fraction
# from-scratch methods whose training of --epochs 0 would run nothing (gradual and the dynamic sparse
# methods refuse a run of 0 steps themselves, naming their schedule)
UNTRAINED_IF_NO_EPOCHS = tuple(sorted(FROM_SCRATCH - {*DST_SCHEDULED, "static"}))


def check_training_epochs(config: RunConfig) -> None:
    """Refuse ``--epochs 0`` for a method that trains sparse from scratch (or, ``lottery``, per round).

    With no training the run would report the untrained initialisation as "pruned" (about 90% error
    on digits), and a lottery round would rewind weights that never trained -- ``prunelab lottery``
    refuses the same; ``--method static`` / ``set`` / ``rigl`` / ... already refuse a run of 0 steps.
    """
    if config.method in UNTRAINED_IF_NO_EPOCHS and isinstance(config.epochs, int) and config.epochs == 0:
        what = "trains each round" if config.method == "lottery" else "prunes at init, then trains sparse"
        raise PrunelabError(f"--epochs must be >= 1 with --method {config.method}: it {what} for --epochs, so 0 "
                            "would report an untrained network; pass --epochs >= 1 (e.g. 30)")


def check_schedule_options(config: RunConfig, given: frozenset[str], granularity) -> None:
    """Refuse ``--start-epoch`` / ``--end-fraction`` / ``--no-layer-floor`` where the run would ignore them."""
    method = config.method
    if "start_epoch" in given and method != "gradual":
        raise PrunelabError(f"--start-epoch {config.start_epoch} would be ignored: it sets when --method gradual's "
                            f"cubic schedule starts pruning, but --method {method} has no such schedule; "
                            "drop --start-epoch")
    if "end_fraction" in given and method not in END_FRACTION_METHODS:
        raise PrunelabError(f"--end-fraction {config.end_fraction:g} would be ignored: it sets when --method gradual "
                            f"stops pruning and when --method {' / '.join(DST_SCHEDULED)} stop rewiring, but "
                            f"--method {method} changes no mask while training; drop --end-fraction")
    if config.layer_floor:
        return  # --layer-floor (the default) says what happens anyway
    why = None
    if method in OWN_ALLOCATION:
        why = f"--method {method} fixes its own allocation ({OWN_ALLOCATION[method]}), which has no floor"
    elif config.allocation != "global":
        why = f"only --allocation global floors layers; --allocation {config.allocation} has no floor"
    elif granularity.is_pattern:
        why = f"the N:M pattern {config.granularity} is decided inside blocks of M weights, with no allocation floor"
    elif not granularity.structured:
        why = (f"--granularity {config.granularity} prunes single weights, which are never floored; "
               "the floor applies to vector / kernel / channel / neuron groups")
    if why:
        raise PrunelabError(f"--no-layer-floor would be ignored: {why}; drop --no-layer-floor")


def check_rounds(config: RunConfig, checker) -> None:
    """Refuse more ``--rounds`` than the model has groups (weights, channels, ...) to prune.

    A round that prunes removes at least one group and pruned groups stay pruned, so beyond
    that many rounds some rounds must prune nothing and only retrain the same mask.
    """
    groups = sum(checker.structures[n].num_groups(tuple(p.shape)) for n, p in checker.params.items())
    if config.rounds > groups:
        unit = "weights" if not checker.granularity.structured else f"{config.granularity} groups"
        raise PrunelabError(f"--rounds {config.rounds:,} is more than the {groups:,} {unit} of {config.model} there "
                            f"are to prune: each round prunes at least one, so later rounds would only retrain the "
                            f"same mask; pass --rounds {groups:,} or fewer")


@contextmanager
def output_parent(out: Path) -> Iterator[Path]:
    """Create ``out``'s parent folder (checked writable) for the body; if the body raises (an error, Ctrl-C),
    remove the folders this created that are still empty, so a failed ``runs/<name>`` run leaves no bare
    ``runs/`` behind.  Folders that existed before, or that hold anything, are left alone."""
    parent = out.parent if str(out.parent) else Path(".")
    created = []  # deepest first: parent, then its missing ancestors
    for folder in (parent, *parent.parents):
        if folder.exists() or folder.is_symlink():
            break
        created.append(folder)
    try:
        yield ensure_writable_dir(parent)
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break
        raise


def run(config: RunConfig, given: Collection[str] | None = None) -> dict[str, Any]:
    """Run ``config`` and write its results folder; returns the ``results.json`` record.

    ``given``: the fields the user set, see :func:`validate`.
    """
    validate(config, given)
    given = non_default_fields(config) if given is None else frozenset(given)
    out = config.out_dir()
    check_out_folder(out, PRUNE_OUTPUT)  # before training, not after (creates nothing)
    started = time.perf_counter()
    seed_everything(config.seed)
    splits = load_dataset(config.dataset, config.data_dir, config.download)
    model = build_model(config.model, splits.input_shape, splits.num_classes)
    train_loader, test_loader = make_loaders(splits, config.batch_size, config.seed)
    example = splits.test[0][0].unsqueeze(0)
    checker = prune_spec(config).sparsifier(model, None)  # layer-level checks (N:M fit, rules, exclude) before training
    if config.method in ("oneshot", "iterative", "gradual") and not config.layer_rates and not checker.granularity.is_pattern:
        checker.check_target(config.sparsity)  # their last update asks exactly this: refuse an infeasible one now
    for pattern in config.layer_rates:  # a glob naming no layer: refused now, not after the dense training
        matching_layers(list(checker.params), pattern, "layer_rates")
    if config.method in ROUND_METHODS and "rounds" in given:
        check_rounds(config, checker)
    if config.method == "gradual":  # its schedule's window, checked now, not after the dense training
        gradual_window(prune_spec(config), config.epochs, len(train_loader))
    pretrain = config.pretrain_epochs > 0 and config.method not in FROM_SCRATCH
    loss_fn = SlimmingLoss(model, config.slimming_strength) if pretrain and config.slimming_strength > 0 else F.cross_entropy
    # only now, with every check passed, create the parent folder: bad input leaves no empty runs/ behind,
    # and a run that fails or is interrupted later removes the folders it created for its output
    with output_parent(out):
        if pretrain:
            train(model, train_loader, pretrain_config(config), loss_fn=loss_fn, description="dense")
        dense_metrics = evaluate(model, test_loader)
        dense_cost = measure_model(model, example)

        criterion = get_criterion(config.criterion)
        score_data = ScoreData(train_loader, max_batches=config.score_batches) if criterion.needs_data else None
        method = METHODS.get(config.method)
        # the methods pruning a trained model train at the fine-tuning rate: a diverging loss names its flag
        extra = {} if config.method in FROM_SCRATCH else {"lr_flag": "--finetune-lr"}
        result = method(model, train_loader, test_loader, prune_spec(config), finetune_config(config), score_data=score_data,
                        **extra)
        pruned_metrics = evaluate(model, test_loader)
        pruned_cost = measure_model(model, example, result.masks)
        wall = time.perf_counter() - started

        stats = result.masks.stats()
        record: dict[str, Any] = {
            "config": config.to_dict(),
            "config_hash": config.digest(),
            "environment": environment(),
            "wall_time_s": wall,
            "dense": {**dense_metrics, "cost": dense_cost.to_dict()},
            "pruned": {**pruned_metrics, "cost": pruned_cost.to_dict()},
            "criterion": criterion_used(config),  # what scored the weights (config["criterion"] is what was passed)
            "target_sparsity": config.sparsity,
            "achieved_sparsity": stats.sparsity,
            "pretrain_epochs_run": config.pretrain_epochs if pretrain else 0,  # from-scratch methods never pretrain
            # untrained: a from-scratch method, or --pretrain-epochs 0 (the "dense" numbers are those of the init)
            "dense_label": "dense" if pretrain else "dense at init (untrained)",
            "stages": [{"stage": "dense" if pretrain else "dense at init", "target_sparsity": 0.0, "sparsity": 0.0,
                        **{k: dense_metrics[k] for k in ("accuracy", "error_pct")}}]
            + result.rows,
            "mask_updates": result.history,
            "layers": stats.to_dict()["layers"],
        }
        if distributed.is_main_process():
            write_results(out, record, model, result.masks, splits, config, pruned_cost)
    return record


# what write_results puts in a results folder: a folder holding only these is an earlier prune / demo run
RUN_FILES = (MODEL_FILE, MASKS_FILE, META_FILE, "results.json", "report.md", "sparsity_curve.png")
PRUNE_OUTPUT = OutFiles("prune", RUN_FILES, output="run", record=("results.json", "config_hash"))


def write_results(out: Path, record: dict[str, Any], model, masks, splits, config: RunConfig, cost) -> None:
    """Write the whole folder into a temporary sibling and swap it in (never half-written)."""
    check_out_folder(out, PRUNE_OUTPUT)  # again: another command may have written there while this run trained
    meta = {"model": config.model, "dataset": config.dataset, "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes, "config": config.to_dict()}
    points = [(row["sparsity"], row["accuracy"]) for row in record["stages"]]
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp, model, masks, meta)
        write_json(tmp / "results.json", record)
        write_text(tmp / "report.md", render_report(record, model_cost_table(cost)))
        plot_sparsity_curve(points, tmp / "sparsity_curve.png", f"{config.model} / {config.method} / {record['criterion']}",
                            record["dense"]["accuracy"], record["dense_label"])
