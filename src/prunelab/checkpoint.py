"""Checkpoints: a plain state_dict, the masks beside it, and what rebuilds the model.

A checkpoint is a directory::

    model.safetensors     the model's own state_dict (pruned weights are real zeros);
                          loads into an unpruned model of the same architecture
    masks.safetensors     FQN -> bool keep-mask (MaskSet)
    checkpoint.json       {"format", "model", "input_shape", "num_classes", ...}

No pickled code: the model is rebuilt from its zoo name and shapes (nanoGPT's
``model_args``), then the tensors are loaded by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from prunelab.errors import PrunelabError
from prunelab.io import atomic_paths, ensure_writable_dir
from prunelab.masks import MaskSet

CHECKPOINT_FORMAT = "prunelab.checkpoint.v1"
MODEL_FILE, MASKS_FILE, META_FILE = "model.safetensors", "masks.safetensors", "checkpoint.json"


@dataclass
class Checkpoint:
    model: nn.Module
    masks: MaskSet
    meta: dict[str, Any]


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, masks: MaskSet, meta: dict[str, Any]) -> Path:
    """Write model, masks and metadata into ``directory`` (all three complete before any replaces its old file,
    ``checkpoint.json`` last: :func:`prunelab.io.atomic_paths`).

    ``meta`` and the masks are checked first (JSON-serialisable; every mask fits a parameter
    whose pruned weights are real zeros), so a checkpoint :func:`load_checkpoint` would refuse
    fails before any file is replaced.  Tied or reused weights are saved under every name.  To replace a whole folder at once, call this inside :func:`prunelab.io.atomic_dir`.
    """
    from safetensors.torch import save_file

    if meta.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise PrunelabError(f"checkpoint meta holds 'format': {meta['format']!r}, but save_checkpoint writes "
                            f"{CHECKPOINT_FORMAT!r} (load_checkpoint would refuse the folder); drop that key from meta")
    try:
        meta_text = json.dumps({"format": CHECKPOINT_FORMAT, **meta}, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise PrunelabError(f"checkpoint meta must be JSON-serialisable ({exc}); pass plain numbers, strings, lists "
                            "and dicts (e.g. float(x) for a numpy scalar)") from None
    check_masks_applied(masks, model)
    state = _state_to_save(model)
    directory = ensure_writable_dir(directory)
    # all three written before any is renamed: a failure (disk full) leaves the old checkpoint whole, never
    # new weights beside old masks under the old checkpoint.json
    with atomic_paths(directory / MODEL_FILE, directory / MASKS_FILE, directory / META_FILE) as (model_tmp, masks_tmp,
                                                                                                 meta_tmp):
        save_file(state, str(model_tmp), metadata={"format": CHECKPOINT_FORMAT})
        masks.save(masks_tmp)
        meta_tmp.write_text(meta_text, encoding="utf-8")
    return directory


def _state_to_save(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` on the CPU, every key kept (it loads with ``strict=True``).

    A tied or reused weight appears under each of its names; past the first name it is a
    copy, since safetensors refuses tensors that share memory.  A parameter on the meta
    device has no values to save: a one-line error.
    """
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if value.device.type == "meta":
            raise PrunelabError(f"{key!r} is on the meta device and holds no values to save; materialise the model "
                                "first (model.to_empty(device='cpu') and load its weights)")
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:  # tied / shared with an earlier key
            tensor = tensor.clone()
        elif tensor.numel():
            seen.add(storage)
        state[key] = tensor
    return state


def check_masks_applied(masks: MaskSet, model: nn.Module) -> None:
    """Refuse to save masks that do not fit ``model`` or whose pruned weights are not real zeros.

    :func:`load_checkpoint` refuses such a folder (:func:`check_masks_fit`), so it is never written.
    """
    masks.check_model(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn, mask in masks.items():
        weight = params[fqn].detach()
        if weight.device.type == "meta":
            continue  # refused by _state_to_save with its own message
        stray = int(((weight != 0) & ~weight.isnan() & ~mask.to(weight.device)).sum())
        if stray:
            raise PrunelabError(
                f"{stray} weights of {fqn!r} are nonzero where its mask says pruned; zero them before saving "
                "(sparsifier.step() / finalize() after the optimizer step, or masks.apply_(model))"
            )


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (MODEL_FILE, MASKS_FILE, META_FILE):
        path = path.parent
    if path.is_file():
        raise PrunelabError(f"checkpoint {str(path)!r} is a file, not a checkpoint folder; pass the output folder of "
                            f"'prunelab prune' or 'demo' (or its {META_FILE})")
    if not path.is_dir():
        raise PrunelabError(f"checkpoint {str(path)!r} does not exist; pass the output folder of 'prunelab prune' or 'demo'")
    for name in (MODEL_FILE, MASKS_FILE, META_FILE):
        if not (path / name).is_file():
            raise PrunelabError(f"checkpoint folder {str(path)!r} has no {name}; pass the output folder of 'prunelab prune'")
    return path


def model_args(meta: Any, source: str | os.PathLike) -> tuple[str, tuple[int, ...], int]:
    """``(zoo name, input shape, classes)`` from a checkpoint-style record; one-line error if they are missing."""
    try:
        shape, classes = meta["input_shape"], meta["num_classes"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                           for d in shape):
            raise ValueError("input_shape must be a list of positive integers")
        if isinstance(classes, bool) or not isinstance(classes, int):
            raise ValueError("num_classes must be an integer")
        return str(meta["model"]), tuple(shape), classes
    except (KeyError, TypeError, ValueError):
        raise PrunelabError(
            f"{os.fspath(source)} lacks a valid 'model', 'input_shape' or 'num_classes' entry; the record is corrupt -- "
            "re-create it with the command that wrote it"
        ) from None


def build_recorded_model(meta: Any, source: str | os.PathLike, remedy: str) -> nn.Module:
    """The zoo model a record names (:func:`model_args`), freshly built; a build failure (an edited
    ``input_shape`` asking for terabytes) is a one-line error naming ``source`` and ``remedy``."""
    from prunelab.bench.models import build_model

    name, input_shape, num_classes = model_args(meta, source)
    try:
        return build_model(name, input_shape, num_classes)
    except (RuntimeError, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PrunelabError(f"cannot build model {name!r} with input_shape {list(input_shape)} and num_classes "
                            f"{num_classes} from {os.fspath(source)} ({first}); the record is corrupt -- "
                            f"{remedy}") from None


def checkpoint_dataset(meta: dict[str, Any], source: str | os.PathLike, data_dir: str | None = None) -> str:
    """The zoo dataset a checkpoint's ``meta`` names, for the commands that evaluate it (compress, materialise,
    bench-latency); one-line errors for a record without one and for a ``--data-dir`` that dataset never reads."""
    from prunelab.run_checks import FILELESS_DATASETS

    dataset = meta.get("dataset")
    if not isinstance(dataset, str):
        folder = _resolve(source)
        raise PrunelabError(f"{folder / META_FILE} names no 'dataset' (got {dataset!r}); the record is corrupt -- "
                            "re-create the checkpoint with prunelab prune")
    if data_dir is not None and dataset in FILELESS_DATASETS:  # as prune / lottery: refused, not silently ignored
        raise PrunelabError(f"--data-dir {data_dir} would be ignored: the checkpoint's dataset {dataset} is bundled "
                            "with scikit-learn and reads no files; drop --data-dir")
    return dataset


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the zoo model named in ``checkpoint.json`` and load its tensors and masks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = _resolve(path)
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PrunelabError(f"{directory / META_FILE} is not UTF-8 JSON; the checkpoint is corrupt") from None
    except json.JSONDecodeError as exc:
        raise PrunelabError(f"{directory / META_FILE} is not valid JSON ({exc.msg}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PrunelabError(f"{directory / META_FILE} has format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    model = build_recorded_model(meta, directory / META_FILE, "re-create the checkpoint")
    try:
        state = load_file(str(directory / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrunelabError(f"cannot read {directory / MODEL_FILE} ({exc}); the checkpoint is corrupt") from None
    _adopt_dtypes(model, state, directory / MODEL_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # the first line is only "Error(s) in loading state_dict for X:"; the lines after it say what differs
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[1:4] if len(lines) > 1 else lines)
        raise PrunelabError(f"{directory / MODEL_FILE} does not fit model {meta['model']!r} with input_shape "
                            f"{list(meta['input_shape'])} and num_classes {meta['num_classes']} ({detail}); "
                            f"the checkpoint is corrupt or {META_FILE} was edited -- re-create it") from None
    masks = MaskSet.load(directory / MASKS_FILE)
    check_masks_fit(masks, model, directory, str(meta["model"]))
    return Checkpoint(model, masks, meta)


def _adopt_dtypes(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Give ``model``'s floating tensors the dtypes saved in ``state`` (a float16 / float64 checkpoint loads as it was
    saved, not cast to the fresh model's float32); a tensor saved as another kind (int or bool for a float weight)
    is refused: no prunelab checkpoint holds one.  Tied weights are one tensor, changed once."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        saved = state.get(name)
        if saved is None or saved.dtype == tensor.dtype:
            continue
        if not (saved.dtype.is_floating_point and tensor.dtype.is_floating_point):
            raise PrunelabError(f"{source}: {name!r} is stored as {saved.dtype}, but the model holds {tensor.dtype} "
                                "there; the checkpoint is corrupt or was not written by prunelab -- re-create it")
        tensor.data = tensor.data.to(saved.dtype)


def check_masks_fit(masks: MaskSet, model: nn.Module, directory: Path, name: str) -> None:
    """Refuse masks that do not belong to the weights loaded from checkpoint ``directory`` (zoo model ``name``).

    Every mask must name a parameter of ``model`` with its shape, and the weights must be
    real zeros wherever their mask says pruned (DESIGN decision 1; a kept weight may be
    zero), so masks copied from another run of the same architecture are refused too.
    """
    source = directory / MASKS_FILE
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under any of its names
    for fqn, mask in masks.items():
        if fqn not in params:
            known = ", ".join(list(params)[:4]) + (" ..." if len(params) > 4 else "")
            raise PrunelabError(f"{source} holds a mask for {fqn!r}, but model {name!r} has no such parameter "
                                f"(it has {known}); was this checkpoint saved from another model? re-create it")
        weight = params[fqn].detach()
        if tuple(mask.shape) != tuple(weight.shape):
            raise PrunelabError(f"{source}: mask {fqn!r} has shape {tuple(mask.shape)}, but that parameter of model "
                                f"{name!r} has {tuple(weight.shape)}; was this checkpoint saved from another model? re-create it")
        stray = int(((weight != 0) & ~weight.isnan() & ~mask.to(weight.device)).sum())  # NaN * 0 stays NaN
        if stray:
            raise PrunelabError(
                f"{source}: mask {fqn!r} marks {stray} weights pruned that are nonzero in {MODEL_FILE} (expected real "
                "zeros wherever the mask is False); the masks do not belong to these weights -- was this checkpoint's "
                f"{MASKS_FILE} copied from another model or run? re-create the checkpoint"
            )
