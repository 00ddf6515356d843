"""``prunelab.load(path)``: rebuild any model folder prunelab writes, without pickled code.

* a checkpoint (``checkpoint.json``: plain state_dict + masks) -> the masked model;
* a shrunk model (``architecture.json``) -> the physically smaller dense model;
* a sparse-format model (``materialised.json``) -> the model with sparse modules.

``path`` may also name a file prunelab writes into such a folder (``model.safetensors``,
``checkpoint.json``, ...): its folder is loaded, as ``load_checkpoint`` accepts it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from prunelab.errors import PrunelabError

MATERIALISED_META, MATERIALISED_STATE = "materialised.json", "materialised.pt"

_T = TypeVar("_T")


def _rebuild(folder: Path, record: str, rebuild: Callable[[], _T]) -> _T:
    """``rebuild()``; a damaged record (a missing key, a wrong type) becomes a one-line error, not a traceback."""
    try:
        return rebuild()
    except PrunelabError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as exc:
        raise PrunelabError(
            f"{str(folder / record)!r} is damaged ({type(exc).__name__}: {exc}); re-create the folder with the "
            "prunelab command that wrote it"
        ) from None


def _folder_of(path: Path) -> Path:
    """``path``, or its folder when ``path`` is one of the files a prunelab model folder holds."""
    if path.is_file():
        from prunelab.checkpoint import MASKS_FILE, META_FILE, MODEL_FILE
        from prunelab.materialise.spec import ARCH_FILE

        known = (MODEL_FILE, MASKS_FILE, META_FILE, ARCH_FILE, MATERIALISED_META, MATERIALISED_STATE)
        if path.name not in known:
            from prunelab.compress.container import MAGIC

            with path.open("rb") as handle:
                compressed = handle.read(len(MAGIC)) == MAGIC
            if compressed:
                raise PrunelabError(f"{str(path)!r} is a Deep Compression file (prunelab compress), which stores a "
                                    "state_dict without the architecture; read it with "
                                    "prunelab.compress.read_compressed(path) and load that into the model: "
                                    "model.load_state_dict(read_compressed(path))")
            raise PrunelabError(f"{str(path)!r} is a file, not a prunelab model folder; pass the folder written by "
                                f"prune, demo or materialise (or one of its files: {', '.join(known)})")
        return path.parent
    return path


def load(path: str | os.PathLike) -> nn.Module:
    """The model stored in folder ``path`` (or the folder of one of its files), in eval mode."""
    folder = _folder_of(Path(path))
    if not folder.is_dir():
        raise PrunelabError(f"{str(folder)!r} does not exist; pass a folder written by prune, demo or materialise")
    if (folder / "architecture.json").is_file():
        from prunelab.materialise.spec import load_shrunk

        return _rebuild(folder, "architecture.json", lambda: load_shrunk(folder)).eval()
    if (folder / MATERIALISED_META).is_file():
        return load_sparse_folder(folder).eval()
    if (folder / "checkpoint.json").is_file():
        from prunelab.checkpoint import load_checkpoint

        return _rebuild(folder, "checkpoint.json", lambda: load_checkpoint(folder)).model.eval()
    raise PrunelabError(
        f"{str(folder)!r} holds no prunelab model (checkpoint.json, architecture.json or {MATERIALISED_META}); "
        "pass a folder written by prune, demo or materialise"
    )


def load_sparse_folder(folder: Path) -> nn.Module:
    from prunelab.checkpoint import build_recorded_model
    from prunelab.materialise import load_materialised

    try:
        meta = json.loads((folder / MATERIALISED_META).read_text(encoding="utf-8"))
        state = torch.load(folder / MATERIALISED_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- a damaged file raises anything from EOFError to UnpicklingError
        first = (str(exc).strip().splitlines() or [""])[0][:200]  # UnpicklingError's message runs to many lines
        raise PrunelabError(f"cannot read the sparse model in {str(folder)!r} ({type(exc).__name__}: {first}); "
                            "re-create it with prunelab materialise") from None
    if not isinstance(state, dict):
        raise PrunelabError(f"{folder / MATERIALISED_STATE} holds a {type(state).__name__}, not a state_dict; "
                            "re-create it with prunelab materialise")
    skeleton = build_recorded_model(meta, folder / MATERIALISED_META, "re-create it with prunelab materialise")
    model = _rebuild(folder, MATERIALISED_STATE, lambda: load_materialised(skeleton, state))
    _check_sparse_modules(model, folder, tuple(meta["input_shape"]))
    return model


def _check_sparse_modules(model: nn.Module, folder: Path, input_shape: tuple[int, ...]) -> None:
    """Refuse a sparse model whose stored formats are damaged, before any kernel reads them.

    The sparse kernels run with ``check_invariants=False`` (fast), so a corrupt index array
    would read past its tensors; the CSR/BSR invariants (monotone row pointers, column
    indices in range) are checked here once, every format is expanded to its dense weight,
    and one all-zero sample of the recorded ``input_shape`` must run through the model.
    """
    from prunelab.materialise.sparse_modules import SparseModule

    name = ""
    try:
        for name, module in model.named_modules():
            if not isinstance(module, SparseModule):
                continue
            fmt = module.format()
            if hasattr(fmt, "crow_indices"):  # CSR (values (nnz,)) or BSR (values (nnz, bh, bw))
                layout = torch.sparse_bsr if fmt.values.dim() == 3 else torch.sparse_csr
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                    torch.sparse_compressed_tensor(fmt.crow_indices, fmt.col_indices, fmt.values, fmt.matrix_shape,
                                                   layout=layout, check_invariants=True)
            module.dense_weight()
        name = ""
        sample = next((t for t in model.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()),
                      torch.empty(0))
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, dtype=sample.dtype))
    except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as exc:
        where = f"layer {name!r}" if name else "the model"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PrunelabError(f"{folder / MATERIALISED_STATE} is damaged: {where} does not hold a valid sparse weight "
                            f"or does not run on input_shape {list(input_shape)} ({type(exc).__name__}: {first}); "
                            "re-create it with prunelab materialise") from None
