"""Option checks of a ``prune`` run: refuse options the chosen method would silently ignore.

:func:`check_ignored_options` is the part of :func:`prunelab.pipeline.validate` that
compares what the user gave (``given``: the fields set on the command line, in
``--config`` or, for the API, away from their defaults) with what the method reads;
:func:`check_pattern_method` refuses N:M runs the method or sparsity cannot honour.
Every refusal is one PrunelabError line naming the option and how to fix it.
"""

from __future__ import annotations

from typing import Any

from prunelab.config import RunConfig, field_default
from prunelab.criteria import get_criterion
from prunelab.errors import PrunelabError
from prunelab.methods import FROM_SCRATCH

__all__ = ["DST_SCHEDULED", "EPOCH_METHODS", "FILELESS_DATASETS", "FINETUNE_METHODS", "LAYER_RATE_METHODS",
           "OWN_ALLOCATION", "OWN_CRITERION", "ROUND_METHODS", "STEPPED_METHODS", "check_dataset_files",
           "check_ignored_options", "check_pattern_method", "criterion_used"]


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
EPOCH_METHODS = ("gradual", *sorted(FROM_SCRATCH))  # train for RunConfig.epochs (see pipeline.finetune_config)
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


def check_ignored_options(config: RunConfig, given: frozenset[str]) -> None:
    """Refuse options the run would silently not use (they only act on a step this method/config skips).

    Only ``given`` options are refused (see :func:`prunelab.pipeline.validate`), and a value that says what
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
    check_dataset_files(config.dataset, config.data_dir if "data_dir" in given else None,
                        "download" in given and config.download)


def check_dataset_files(dataset: str, data_dir: str | None, download: bool) -> None:
    """Refuse ``--data-dir`` (``data_dir`` not None) / ``--download`` for a dataset that reads no files.

    Shared by every command that loads a zoo dataset (``prune``, ``lottery``): pass only the
    options the user gave (None / False for the others).
    """
    if dataset not in FILELESS_DATASETS:
        return
    for option, used in (("data_dir", data_dir is not None), ("download", download)):
        if used:
            flag = "--" + option.replace("_", "-")
            raise _refuse(option, data_dir if option == "data_dir" else None, f"--dataset "
                          f"{dataset} is bundled with scikit-learn and reads no files", f"drop {flag}")


# methods that prune through a series of lower targets: an N:M pattern fixes the sparsity, so they cannot use one
STEPPED_METHODS = ("iterative", "gradual", "force", "synflow")


def check_pattern_method(config: RunConfig, pattern) -> None:
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
