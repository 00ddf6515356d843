"""One pruning run end to end: data -> dense training -> method -> measure -> results folder.

Shared by ``prunelab prune``, ``prunelab demo`` and the benchmarks, so every entry point
writes the same records: ``results.json``, ``report.md``, ``sparsity_curve.png`` and a
checkpoint (``model.safetensors`` + ``masks.safetensors`` + ``checkpoint.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F

from prunelab import distributed
from prunelab.allocation import get_allocation
from prunelab.bench.datasets import DATASETS, load_dataset, make_loaders
from prunelab.bench.models import MODELS, build_model
from prunelab.bench.training import TrainConfig, evaluate, seed_everything, train
from prunelab.checkpoint import MASKS_FILE, META_FILE, MODEL_FILE, save_checkpoint
from prunelab.config import RunConfig, field_default, non_default_fields
from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.criteria.slimming import SlimmingLoss
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, check_replaceable, ensure_writable_dir, write_json, write_text
from prunelab.measure.counting import measure_model
from prunelab.measure.tables import model_cost_table
from prunelab.loading import MATERIALISED_META
from prunelab.methods import FROM_SCRATCH, METHODS, PruneSpec
from prunelab.methods.lottery_folder import LOTTERY_FORMAT
from prunelab.report import plot_sparsity_curve, render_report
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
    if config.out is not None and not config.out.strip():
        raise PrunelabError("--out is empty; name an output folder, or leave it out for runs/<model>-<method>-<hash>")
    _check_ignored_options(config, non_default_fields(config) if given is None else frozenset(given))
    prune_spec(config)
    pretrain_config(config)
    finetune_config(config)
    if granularity.is_pattern:
        _check_pattern_method(config, granularity)


# methods that score with their own fixed criterion / allocation: --criterion / --allocation would be ignored
OWN_CRITERION = {"snip": "snip", "grasp": "grasp", "force": "force", "synflow": "synflow", "random-erk": "random",
                 "random-uniform": "random", "static": "random"}
OWN_ALLOCATION = {"random-erk": "erk", "random-uniform": "uniform"}


def criterion_used(config: RunConfig) -> str:
    """The criterion the method really scores with (``snip`` for ``--method snip``, ...)."""
    return OWN_CRITERION.get(config.method, config.criterion)


# methods that read RunConfig.layer_rates (per-round rates of their rounds)
LAYER_RATE_METHODS = ("iterative", "lottery")
ROUND_METHODS = ("iterative", "lottery")  # read RunConfig.rounds
EPOCH_METHODS = ("gradual", *sorted(FROM_SCRATCH))  # train for RunConfig.epochs (see finetune_config)
DST_SCHEDULED = ("set", "dsr", "rigl", "snfs")  # rewire their masks every delta_t steps by alpha's schedule
FINETUNE_METHODS = ("oneshot", "iterative", "gradual")  # retrain for RunConfig.finetune_epochs
FILELESS_DATASETS = ("digits",)  # bundled with scikit-learn: --data-dir / --download are not read


def _uses_score_batches(config: RunConfig) -> bool:
    """Whether a scoring pass reads ``config.score_batches`` batches of training data."""
    if config.method in ("snip", "grasp", "force"):
        return True
    if config.method == "gradual" and config.criterion == "movement":
        return False  # scores accumulate over the training steps themselves
    return config.method in (*FINETUNE_METHODS, "pai", "pai-shuffled", "pai-reinit") and \
        get_criterion(config.criterion).needs_data


def _refuse(option: str, value: Any, why: str, fix: str) -> PrunelabError:
    """The one-line error for a given ``option`` (``value``; None for a switch) the run would not use."""
    flag = "--" + option.replace("_", "-") + ("" if value is None else f" {value}")
    return PrunelabError(f"{flag} would be ignored: {why}; {fix}")


def _check_ignored_options(config: RunConfig, given: frozenset[str]) -> None:
    """Refuse options the run would silently not use (they only act on a step this method/config skips).

    Only ``given`` options are refused (see :func:`validate`), and a value that says what
    happens anyway (``--pretrain-epochs 0`` for a from-scratch method) is accepted.
    """
    method = config.method
    if config.slimming_strength > 0:
        if method in FROM_SCRATCH:
            raise PrunelabError(
                f"--slimming-strength applies to dense pre-training, but --method {method} trains sparse from "
                "scratch (no dense training); drop --slimming-strength or use e.g. --method oneshot / iterative"
            )
        if config.pretrain_epochs == 0:
            raise PrunelabError(
                "--slimming-strength applies to dense pre-training, but --pretrain-epochs is 0; "
                "drop --slimming-strength or pass --pretrain-epochs >= 1"
            )
    # --criterion magnitude (the default) stays accepted: the CLI tests promise it for random-uniform
    if method in OWN_CRITERION and "criterion" in given and config.criterion not in (
            field_default("criterion"), OWN_CRITERION[method]):
        raise PrunelabError(
            f"--method {method} scores with its own criterion ({OWN_CRITERION[method]}), so --criterion "
            f"{config.criterion} would be ignored; drop --criterion, or use --method pai --criterion {config.criterion} "
            "to prune at init with it"
        )
    if method in OWN_ALLOCATION and "allocation" in given and config.allocation not in (
            field_default("allocation"), OWN_ALLOCATION[method]):
        raise PrunelabError(
            f"--method {method} fixes the allocation ({OWN_ALLOCATION[method]}), so --allocation "
            f"{config.allocation} would be ignored; drop --allocation"
        )
    if config.layer_rates and method not in LAYER_RATE_METHODS:
        raise PrunelabError(
            f"--layer-rates sets per-round rates of --method {' / '.join(LAYER_RATE_METHODS)}, but --method "
            f"{method} has no rounds; drop --layer-rates, or use --exclude / --keep-first / --keep-last"
        )
    if config.finetune_lr is not None and method in FROM_SCRATCH:
        raise PrunelabError(
            f"--finetune-lr sets the retraining rate after pruning a trained model, but --method {method} "
            "trains sparse from scratch at --lr; drop --finetune-lr (set --lr instead)"
        )
    scratch = f"--method {method} prunes at init and trains sparse from scratch for --epochs"
    if "pretrain_epochs" in given and config.pretrain_epochs > 0 and method in FROM_SCRATCH:
        raise _refuse("pretrain_epochs", config.pretrain_epochs, f"{scratch} (no dense training first)",
                      "drop --pretrain-epochs (or pass 0), or use --method oneshot / iterative / gradual to prune a "
                      "trained model")
    if "finetune_epochs" in given and config.finetune_epochs > 0 and method not in FINETUNE_METHODS:
        raise _refuse("finetune_epochs", config.finetune_epochs, f"{scratch} (no retraining after pruning)",
                      "drop --finetune-epochs (set --epochs for the length of the sparse training)")
    if "epochs" in given and method not in EPOCH_METHODS:
        raise _refuse("epochs", config.epochs, f"it sets the training of --method gradual and of the "
                      f"sparse-from-scratch methods, but --method {method} trains for --pretrain-epochs, then "
                      "--finetune-epochs after each pruning step", "drop --epochs")
    if "rounds" in given and method not in ROUND_METHODS:
        raise _refuse("rounds", config.rounds, f"it sets the pruning rounds of --method "
                      f"{' / '.join(ROUND_METHODS)}, but --method {method} has no rounds", "drop --rounds")
    if "num_updates" in given and method != "gradual":
        raise _refuse("num_updates", config.num_updates, f"it sets the mask updates of --method "
                      f"gradual's cubic schedule, but --method {method} has no such schedule", "drop --num-updates")
    for option in ("delta_t", "alpha"):
        if option in given and method not in DST_SCHEDULED:
            flag = "--" + option.replace("_", "-")
            raise _refuse(option, getattr(config, option), f"it drives the mask updates of dynamic sparse "
                          f"training (--method {' / '.join(DST_SCHEDULED)}), but --method {method} does not rewire "
                          "its mask while training", f"drop {flag}")
    if "score_batches" in given and not _uses_score_batches(config):
        raise _refuse("score_batches", config.score_batches, f"--method {method} with criterion "
                      f"{criterion_used(config)} scores without batches of data", "drop --score-batches")
    if (config.finetune_lr is not None and method in ("oneshot", "iterative") and config.finetune_epochs == 0):
        raise _refuse("finetune_lr", config.finetune_lr, "--finetune-epochs is 0, so nothing is retrained",
                      "drop --finetune-lr or pass --finetune-epochs >= 1")
    if "momentum" in given and config.optimizer != "sgd":
        raise _refuse("momentum", config.momentum, f"--optimizer {config.optimizer} has no momentum setting "
                      "(only sgd reads it)", "drop --momentum, or pass --optimizer sgd")
    if config.dataset in FILELESS_DATASETS:
        for option, used in (("data_dir", config.data_dir is not None), ("download", config.download)):
            if option in given and used:
                flag = "--" + option.replace("_", "-")
                raise _refuse(option, config.data_dir if option == "data_dir" else None, f"--dataset "
                              f"{config.dataset} is bundled with scikit-learn and reads no files", f"drop {flag}")


# methods that prune through a series of lower targets: an N:M pattern fixes the sparsity, so they cannot use one
STEPPED_METHODS = ("iterative", "gradual", "force", "synflow")


def _check_pattern_method(config: RunConfig, pattern) -> None:
    """N:M runs, refused before any training when the method or the sparsity cannot apply the pattern."""
    name = pattern.describe()
    if config.method in STEPPED_METHODS:
        raise PrunelabError(
            f"--method {config.method} raises the sparsity in steps, but the N:M pattern {name} fixes it at "
            f"{pattern.sparsity:g}; use --method oneshot (or snip, grasp, random-uniform), or another granularity"
        )
    if abs(config.sparsity - pattern.sparsity) > 1e-6:
        raise PrunelabError(
            f"the N:M pattern {name} fixes the sparsity at 1 - N/M = {pattern.sparsity:g}, but --sparsity "
            f"{config.sparsity:g} was given; drop --sparsity or pass {pattern.sparsity:g}"
        )


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
        allocation=config.allocation, keep_first=config.keep_first, keep_last=config.keep_last,
        exclude=tuple(config.exclude), rounds=config.rounds, layer_rates=dict(config.layer_rates),
        finetune_epochs=config.finetune_epochs, num_updates=config.num_updates, score_batches=config.score_batches,
        delta_t=config.delta_t, alpha=config.alpha,
    )


def run(config: RunConfig, given: Collection[str] | None = None) -> dict[str, Any]:
    """Run ``config`` and write its results folder; returns the ``results.json`` record.

    ``given``: the fields the user set, see :func:`validate`.
    """
    validate(config, given)
    out = config.out_dir()
    check_out_folder(out)  # before training, not after (creates nothing)
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
    pretrain = config.pretrain_epochs > 0 and config.method not in FROM_SCRATCH
    loss_fn = SlimmingLoss(model, config.slimming_strength) if pretrain and config.slimming_strength > 0 else F.cross_entropy
    # only now, with every check passed, create the parent folder: bad input leaves no empty runs/ behind
    ensure_writable_dir(out.parent if str(out.parent) else Path("."))

    if pretrain:
        train(model, train_loader, pretrain_config(config), loss_fn=loss_fn, description="dense")
    dense_metrics = evaluate(model, test_loader)
    dense_cost = measure_model(model, example)

    criterion = get_criterion(config.criterion)
    score_data = ScoreData(train_loader, max_batches=config.score_batches) if criterion.needs_data else None
    method = METHODS.get(config.method)
    result = method(model, train_loader, test_loader, prune_spec(config), finetune_config(config), score_data=score_data)
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
        "dense_label": "dense at init (untrained)" if config.method in FROM_SCRATCH else "dense",
        "stages": [{"stage": "dense at init" if config.method in FROM_SCRATCH else "dense", "target_sparsity": 0.0, "sparsity": 0.0, **{k: dense_metrics[k] for k in ("accuracy", "error_pct")}}]
        + result.rows,
        "mask_updates": result.history,
        "layers": stats.to_dict()["layers"],
    }
    if distributed.is_main_process():
        write_results(out, record, model, result.masks, splits, config, pruned_cost)
    return record


# what write_results puts in a results folder: a folder holding only these is an earlier prune / demo run
RUN_FILES = (MODEL_FILE, MASKS_FILE, META_FILE, "results.json", "report.md", "sparsity_curve.png")


def _folder_kind(folder: Path, entries: list[str]) -> str:
    """What a folder holding ``entries`` (beyond :data:`RUN_FILES`) is, in words, for the refusal."""
    if (folder / "config.json").is_file() or any(name.startswith("round_") for name in entries):
        try:
            record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if any(name.startswith("round_") for name in entries) or (
                isinstance(record, dict) and record.get("format") == LOTTERY_FORMAT):
            return "a lottery run (written by prunelab lottery)"
    for name, kind in (("metrics.json", "a lottery round"), ("architecture.json", "a shrunk model (prunelab materialise)"),
                       (MATERIALISED_META, "a sparse-format model (prunelab materialise)"),
                       ("report.json", "a oneshot / drop-layers output")):
        if name in entries:
            return kind
    return "files prune does not write"


def check_out_folder(out: Path) -> Path:
    """Refuse ``out`` unless it is absent, empty or an earlier prune / demo results folder.

    The new results replace the whole folder (:func:`prunelab.io.atomic_dir`), so a folder
    holding anything else -- another command's run (a lottery run folder with its rounds,
    a materialised model) or files of the user's -- would be deleted: one-line error instead.
    """
    check_replaceable(out)
    if not out.is_dir():
        return out
    entries = sorted(p.name for p in out.iterdir())
    others = [name for name in entries if name not in RUN_FILES]
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise PrunelabError(
            f"--out {str(out)!r} holds {_folder_kind(out, entries)} ({shown}), not an earlier prune run; prune "
            "replaces its whole --out folder and would delete it -- choose a new or empty folder for --out"
        )
    return out


def write_results(out: Path, record: dict[str, Any], model, masks, splits, config: RunConfig, cost) -> None:
    """Write the whole folder into a temporary sibling and swap it in (never half-written)."""
    check_out_folder(out)  # again: another command may have written there while this run trained
    meta = {"model": config.model, "dataset": config.dataset, "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes, "config": config.to_dict()}
    points = [(row["sparsity"], row["accuracy"]) for row in record["stages"]]
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp, model, masks, meta)
        write_json(tmp / "results.json", record)
        write_text(tmp / "report.md", render_report(record, model_cost_table(cost)))
        plot_sparsity_curve(points, tmp / "sparsity_curve.png", f"{config.model} / {config.method} / {record['criterion']}",
                            record["dense"]["accuracy"], record["dense_label"])
