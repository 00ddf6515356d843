"""Save and load a shrunk model: a plain state_dict plus the shapes that rebuild it.

A shrunk model's Linear / Conv / BatchNorm layers are smaller than its class builds
them, so its state_dict does not load into a fresh model.  :func:`save_shrunk` writes a
directory (atomically: readers see the old complete folder or the new one)::

    model.safetensors     the shrunk model's state_dict
    architecture.json     {"format", "builder", "example_input_shape", "meta",
                           "layers": {FQN: {"type": "Conv2d", "in_channels": ..., ...}}}

and :func:`load_shrunk` rebuilds the skeleton, replaces every listed layer by a freshly
constructed one of the recorded shape (``num_heads`` for attention units), then loads
the tensors strictly.  No code is pickled (nanoGPT's ``model_args``; timm stores pruned
shapes the same way).

The skeleton comes from, in this order:

* the model zoo -- ``meta`` has ``"model"`` (a :data:`prunelab.bench.models.MODELS`
  name), ``"input_shape"`` (one sample, no batch) and ``"num_classes"``, the same keys
  as ``checkpoint.json``;
* ``meta["builder"] = "package.module:QualName"`` -- an importable callable that takes
  no arguments and returns the unshrunk model;
* otherwise the model's own class, ``type(model)``, which must be importable (not
  defined in ``__main__`` or inside a function) and constructible with no arguments.
"""

from __future__ import annotations

import importlib
import inspect
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir
from prunelab.materialise.tracing import is_attention_unit

SHRUNK_FORMAT = "prunelab.shrunk.v1"
MODEL_FILE, ARCH_FILE = "model.safetensors", "architecture.json"

LAYER_TYPES: dict[str, type[nn.Module]] = {
    t.__name__: t for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                            nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}


def layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of a Linear / Conv / ConvTranspose / BatchNorm (exact class only), else None."""
    kind = type(module).__name__
    if LAYER_TYPES.get(kind) is not type(module):
        return None
    tensor = next(module.parameters(), next(module.buffers(), torch.empty(0)))  # BatchNorm(affine=False): buffers
    dtype = str(tensor.dtype).removeprefix("torch.")
    if isinstance(module, nn.Linear):
        return {"type": kind, "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "dtype": dtype}
    if isinstance(module, nn.modules.conv._ConvNd):
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        spec = {"type": kind, "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride), "padding": padding,
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode, "dtype": dtype}
        if module.transposed:  # ConvTranspose: output_padding fixes its output size (weight (in, out/groups, *k))
            spec["output_padding"] = list(module.output_padding)
        return spec
    return {"type": kind, "num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
            "affine": module.affine, "track_running_stats": module.track_running_stats, "dtype": dtype}


def build_layer(spec: Mapping[str, Any]) -> nn.Module:
    """A fresh module from :func:`layer_spec`'s record."""
    args = dict(spec)
    cls = LAYER_TYPES[args.pop("type")]
    dtype = getattr(torch, str(args.pop("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {spec.get('dtype')!r} is not a torch dtype")
    for key in ("kernel_size", "stride", "dilation", "output_padding"):
        if key in args:
            args[key] = tuple(args[key])
    if isinstance(args.get("padding"), list):
        args["padding"] = tuple(args["padding"])
    return cls(**args, dtype=dtype)


def _builder_of(model: nn.Module, meta: Mapping[str, Any]) -> dict[str, Any]:
    if "model" in meta:
        missing = [k for k in ("input_shape", "num_classes") if k not in meta]
        if missing:
            raise PrunelabError(
                f"meta names zoo model {meta['model']!r} but lacks {', '.join(missing)}; pass "
                "meta={'model': name, 'input_shape': [C, H, W], 'num_classes': n} as in checkpoint.json"
            )
        try:
            return {"zoo": str(meta["model"]), "input_shape": [operator.index(d) for d in meta["input_shape"]],
                    "num_classes": operator.index(meta["num_classes"])}
        except TypeError:
            raise PrunelabError(
                f"meta names zoo model {meta['model']!r} with input_shape {meta['input_shape']!r} and num_classes "
                f"{meta['num_classes']!r}; pass ints, e.g. meta={{'model': name, 'input_shape': [1, 28, 28], "
                "'num_classes': 10}"
            ) from None
    if "builder" in meta:
        return {"callable": str(meta["builder"])}
    cls = type(model)
    path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__ or _import(path, check=False) is not cls:
        raise PrunelabError(
            f"cannot record how to rebuild {cls.__name__}: {path} is not importable; pass meta={{'model': zoo name, "
            "'input_shape': ..., 'num_classes': ...} or meta={'builder': 'package.module:factory'} (no-arg callable)"
        )
    container = cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # cls() is empty: its layers are not rebuilt
    if container or _required_arguments(cls):
        raise PrunelabError(
            f"cannot record how to rebuild {cls.__name__}: {cls.__name__}() "
            f"{'builds an empty container' if container else 'needs arguments'}"
            ", so prunelab.load could not rebuild it; pass meta={'builder': 'package.module:factory'}, a no-arg "
            "callable returning the unpruned model"
        )
    return {"callable": path}


def _required_arguments(cls: type) -> list[str]:
    """The parameters ``cls()`` cannot do without (``[]`` when its signature cannot be read)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                       p.KEYWORD_ONLY)]


def _import(path: str, check: bool = True) -> Any:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError, ValueError) as exc:
        if not check:
            return None
        raise PrunelabError(
            f"cannot import builder {path!r} ({type(exc).__name__}: {exc}); make the package importable "
            "(pip install -e . or PYTHONPATH) or save with meta={'builder': 'package.module:factory'}"
        ) from None


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU contiguous tensors; tensors sharing storage are cloned (safetensors refuses shared storage)."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        state[key] = tensor
    return state


def save_shrunk(
    directory: str | os.PathLike, model: nn.Module, example_input_shape: Sequence[int], meta: Mapping[str, Any]
) -> Path:
    """Write ``model.safetensors`` + ``architecture.json`` into ``directory`` (replaced atomically).

    ``meta``: JSON-serialisable facts kept in the record; it also says how to rebuild
    the skeleton (see the module docstring).  ``directory`` may be new or a previous
    shrunk-model folder; a folder holding other files is refused.  (A command that
    decides itself which folders it may replace -- ``prunelab materialise`` -- writes
    with :func:`write_shrunk` into its own :func:`prunelab.io.atomic_dir`.)
    """
    directory = Path(directory)
    if directory.exists():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in (MODEL_FILE, ARCH_FILE)) \
            if directory.is_dir() else [directory.name]
        if foreign:
            raise PrunelabError(
                f"refusing to replace {str(directory)!r}: it holds {', '.join(foreign[:3])}; save the shrunk model "
                "into a new or empty folder"
            )
    text = _record_text(model, example_input_shape, meta)  # a bad meta fails before any folder is made
    with atomic_dir(directory) as tmp:
        _write(tmp, model, text)
    return directory


def write_shrunk(
    folder: str | os.PathLike, model: nn.Module, example_input_shape: Sequence[int], meta: Mapping[str, Any]
) -> None:
    """Write :func:`save_shrunk`'s two files into the existing ``folder`` as they are, checking nothing it holds.

    For a caller that writes into a fresh temporary folder it swaps in itself (an
    :func:`prunelab.io.atomic_dir`) after its own check of what the target may hold.
    """
    _write(Path(folder), model, _record_text(model, example_input_shape, meta))


def _record_text(model: nn.Module, example_input_shape: Sequence[int], meta: Mapping[str, Any]) -> str:
    """``architecture.json``'s text for ``model``; PrunelabError when ``meta`` is not JSON-serialisable."""
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"save_shrunk needs the shrunk nn.Module, got {type(model).__name__}")
    if not isinstance(meta, Mapping):
        raise PrunelabError(f"meta must be a dict, got {type(meta).__name__}; pass {{}} or e.g. {{'builder': "
                            "'package.module:factory'}")
    try:
        shape = [operator.index(d) for d in example_input_shape] if not isinstance(example_input_shape, (str, bytes)) \
            else None
    except TypeError:
        shape = None
    if shape is None or any(d < 0 for d in shape):
        raise PrunelabError(f"example_input_shape must be a sequence of non-negative ints, got {example_input_shape!r}; "
                            "pass e.g. x.shape[1:] (one sample, no batch) or x.shape")
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if is_attention_unit(module):
            layers[name] = {"type": "attention", "num_heads": module.num_heads}
        elif (spec := layer_spec(module)) is not None:
            layers[name] = spec
    record = {"format": SHRUNK_FORMAT, "builder": _builder_of(model, meta),
              "example_input_shape": shape, "meta": dict(meta), "layers": layers}
    try:
        return json.dumps(record, indent=2) + "\n"
    except TypeError as exc:
        raise PrunelabError(f"meta must be JSON-serialisable ({exc}); pass plain numbers, strings, lists and dicts") from None


def _write(folder: Path, model: nn.Module, text: str) -> None:
    from safetensors.torch import save_file

    save_file(_state(model), str(folder / MODEL_FILE), metadata={"format": SHRUNK_FORMAT})
    (folder / ARCH_FILE).write_text(text)


def _skeleton(builder: Mapping[str, Any]) -> nn.Module:
    if "zoo" in builder:
        from prunelab.bench.models import build_model

        try:
            shape, classes = tuple(int(d) for d in builder["input_shape"]), int(builder["num_classes"])
        except (KeyError, TypeError, ValueError):
            raise PrunelabError(
                f"{ARCH_FILE} names zoo model {builder['zoo']!r} without a valid input_shape and num_classes "
                f"(got {builder.get('input_shape')!r}, {builder.get('num_classes')!r}); the folder is damaged -- "
                "re-create it with save_shrunk"
            ) from None
        return build_model(str(builder["zoo"]), shape, classes)
    factory = _import(str(builder.get("callable")))
    try:
        model = factory()
    except TypeError as exc:
        raise PrunelabError(
            f"builder {builder.get('callable')!r} cannot be called without arguments ({exc}); save with "
            "meta={'builder': 'package.module:factory'} naming a no-arg factory"
        ) from None
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"builder {builder.get('callable')!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def load_shrunk(directory: str | os.PathLike) -> nn.Module:
    """Rebuild the shrunk model saved by :func:`save_shrunk` (in training mode, like a fresh model).

    A ``callable`` builder is imported and called, as ``trust_remote_code`` does in
    ``transformers``: load only folders you trust (zoo builders import nothing else).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (ARCH_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise PrunelabError(f"{str(directory)!r} has no {name}; pass a folder written by save_shrunk")
    try:
        record = json.loads((directory / ARCH_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise PrunelabError(f"{directory / ARCH_FILE} is not valid JSON ({exc.msg}); the folder is corrupt") from None
    if not isinstance(record, dict) or record.get("format") != SHRUNK_FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise PrunelabError(f"{directory / ARCH_FILE} has format {got!r}, expected {SHRUNK_FORMAT!r}; pass a folder written by save_shrunk")
    builder, layers = record.get("builder"), record.get("layers")
    if not isinstance(builder, dict) or not isinstance(layers, dict) or not all(
            isinstance(spec, dict) and isinstance(spec.get("type"), str) for spec in layers.values()):
        raise PrunelabError(f"{str(directory / ARCH_FILE)!r} is damaged (it needs a builder object and a layers object "
                            "of typed layer specs); re-create the folder with save_shrunk")
    with torch.random.fork_rng(devices=[]):  # the skeleton's and layers' random init leave the global RNG as it was
        model = _rebuild(builder, layers)
    try:
        state = load_file(str(directory / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrunelabError(f"cannot read {directory / MODEL_FILE} ({exc}); the folder is corrupt") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise PrunelabError(f"{directory / MODEL_FILE} does not fit the rebuilt model: {first}") from None
    return model


def _rebuild(builder: Mapping[str, Any], layers: Mapping[str, Any]) -> nn.Module:
    """The skeleton with every recorded layer replaced by a fresh one of the recorded shape."""
    model = _skeleton(builder)
    for name, spec in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise PrunelabError(
                f"{ARCH_FILE} lists layer {name!r} but the rebuilt {type(model).__name__} has no such submodule; "
                "the builder does not make the architecture that was saved"
            ) from None
        if spec["type"] == "attention":
            if not is_attention_unit(current) or isinstance(spec.get("num_heads"), bool) \
                    or not isinstance(spec.get("num_heads"), int):
                raise PrunelabError(
                    f"{ARCH_FILE} records {name!r} as an attention unit with num_heads={spec.get('num_heads')!r} but the "
                    f"rebuilt model has {type(current).__name__} there; the builder does not make the architecture that "
                    "was saved, or the folder is damaged"
                )
            current.num_heads = spec["num_heads"]
            continue
        if spec["type"] not in LAYER_TYPES or not isinstance(current, LAYER_TYPES[spec["type"]]):
            raise PrunelabError(
                f"{ARCH_FILE} records {name!r} as {spec['type']} but the rebuilt model has {type(current).__name__} there; "
                "the builder does not make the architecture that was saved"
            )
        try:
            layer = build_layer(spec)
        except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise PrunelabError(
                f"{ARCH_FILE} records layer {name!r} as {spec['type']} with arguments it cannot be built from "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); the folder is "
                "damaged -- re-create it with save_shrunk"
            ) from None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model
