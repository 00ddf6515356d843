"""The lottery run folder: resumable round by round (see :mod:`prunelab.methods.lottery`).

Every file is written atomically; a damaged one (unreadable, truncated, not fitting the
model) is a one-line PrunelabError that names it and says how to redo the run from that
round.  ``config.json`` records the LotteryConfig with a fingerprint of the initial
weights, and a resume is refused when anything but :data:`RESUMABLE_KEYS` differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.errors import PrunelabError
from prunelab.io import atomic_path
from prunelab.masks import MaskSet

__all__ = ["LOTTERY_FORMAT", "RESUMABLE_KEYS", "check_resume", "damaged", "finished_rounds", "fingerprint",
           "folder_config", "load_round", "load_state", "load_weights", "save_state", "snapshot"]

LOTTERY_FORMAT = "prunelab.lottery.v1"
RESUMABLE_KEYS = ("rounds", "train.progress")  # may differ between a folder and a resuming config


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model.state_dict()``."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: tells two initialisations apart."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_state(path: Path, state: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": LOTTERY_FORMAT})


def damaged(path: Path, problem: object) -> PrunelabError:
    """The error for an unusable file of round folder ``path.parent`` (one line, says how to recover)."""
    reason = " ".join(str(problem).split())
    folder = path.parent
    return PrunelabError(
        f"lottery run file {str(path)!r} is damaged ({reason}); delete {str(folder)!r} and any later round_* folders, "
        f"then resume to redo the run from {folder.name} (the rounds before it are kept)"
    )


def load_state(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise damaged(path, "the file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise damaged(path, exc) from None


def load_round(folder: Path, round_index: int, params: Mapping[str, Tensor]) -> tuple[dict[str, Any], MaskSet]:
    """Round ``round_index``'s metrics and mask as the lottery run writes them.

    ``params``: the run's prunable parameters (FQN -> weight).  The mask must hold exactly
    these names with their shapes: a ``mask.safetensors`` copied from another run (another
    model, other ``exclude`` globs) is refused, naming the file and its round folder.
    """
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: truncated or not UTF-8 / JSON
        raise damaged(path, exc) from None
    if not isinstance(metrics, dict) or metrics.get("round") != round_index or not isinstance(metrics.get("ticket"), dict):
        raise damaged(path, f"it does not hold the metrics of round {round_index}")
    path = folder / "mask.safetensors"
    try:
        mask = MaskSet.load(path)
    except PrunelabError as exc:  # MaskSet.load's own message; the safetensors reason is shorter
        raise damaged(path, exc.__context__ or exc) from None
    problem = _mask_misfit(mask, params)
    if problem:
        raise damaged(path, f"it does not fit the model: {problem}")
    return metrics, mask


def _mask_misfit(mask: MaskSet, params: Mapping[str, Tensor]) -> str | None:
    """Why ``mask`` is not a mask of exactly ``params`` (names and shapes); None when it is."""
    extra = [name for name in mask if name not in params]
    if extra:
        return f"it masks {extra[0]!r}, which is no prunable parameter of the model (it has {_names(params)})"
    missing = [name for name in params if name not in mask]
    if missing:
        return f"it has no mask for the model's {missing[0]!r}"
    for name, weight in params.items():
        if tuple(mask[name].shape) != tuple(weight.shape):
            return f"mask {name!r} has shape {tuple(mask[name].shape)}, but the parameter has {tuple(weight.shape)}"
    return None


def _names(params: Mapping[str, Tensor]) -> str:
    names = list(params)
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def load_weights(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """``model.load_state_dict(state)``; ``state`` was read from ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
        raise damaged(path, f"it does not fit the model: {str(exc).splitlines()[0]}") from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key != "layer_rates":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def folder_config(config: Any, init_fingerprint: str, train_batches: int) -> dict[str, Any]:
    """What ``config.json`` records about a run (``config``: a LotteryConfig)."""
    record = {"format": LOTTERY_FORMAT, "config": config.to_dict(), "init_fingerprint": init_fingerprint,
              "train_batches": train_batches}
    if config.rewind_step:  # folders from before 2026-12-01 trained all T steps after rewinding: refuse to mix
        record["rewound_rounds_train"] = "steps k..T, learning-rate schedule continued (Frankle et al. 2020)"
    return record


def check_resume(out: Path, wanted: dict[str, Any]) -> None:
    """Refuse to resume ``out`` unless its ``config.json`` equals ``wanted`` outside :data:`RESUMABLE_KEYS`."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrunelabError(f"cannot read {str(path)!r} ({exc}); resume only from a folder written by run_lottery") from None
    if not isinstance(saved, dict):  # a list, number, string, null: no run_lottery record
        kind = "null" if saved is None else {list: "list", str: "string", bool: "boolean"}.get(type(saved), "number")
        raise PrunelabError(f"{str(path)!r} is not a {LOTTERY_FORMAT} run config (it holds a JSON {kind}, not an object); "
                            "resume only from a run_lottery folder")
    if saved.get("format") != LOTTERY_FORMAT:
        raise PrunelabError(f"{str(path)!r} is not a {LOTTERY_FORMAT} run config; resume only from a run_lottery folder")
    old = _flatten({k: v for k, v in saved.items() if k != "format"})
    new = _flatten({k: v for k, v in json.loads(json.dumps(wanted)).items() if k != "format"})
    differ = sorted(k for k in set(old) | set(new)
                    if k.removeprefix("config.") not in RESUMABLE_KEYS and old.get(k) != new.get(k))
    if "config.rewind_step" in differ and len(differ) > 1:  # follows from rewind_step: not a second difference
        differ = [k for k in differ if k != "rewound_rounds_train"]
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} in the folder, {new.get(k)!r} now)" for k in differ)
        raise PrunelabError(
            f"cannot resume {str(out)!r}: it was written by another config; keys that differ: {shown}; "
            "resume with the same config (only rounds may change) or use a new out_dir"
        )


def finished_rounds(out: Path) -> int:
    """How many consecutive rounds, from round 0, have their metrics written."""
    count = 0
    while (out / f"round_{count:03d}" / "metrics.json").is_file():
        count += 1
    return count
