"""MaskSet: parameter FQN -> bool keep-mask, kept outside the modules.

DESIGN.md decision 1: masks never live inside the model.  The model holds real zeros
where its mask says "pruned", so ``model.state_dict()`` is always a plain state_dict that
loads into an unpruned model of the same architecture; the masks are saved beside it as
safetensors, keyed by the same fully qualified parameter names.

``True`` means *kept*, ``False`` means *pruned* -- the same convention as
``torch.nn.utils.prune``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from prunelab import distributed
from prunelab.errors import PrunelabError
from prunelab.io import atomic_path

MASK_FORMAT = "prunelab.maskset.v1"
MASK_METADATA_KEY = "prunelab"  # MaskSet.save's one metadata key: JSON {"format": MASK_FORMAT, "names": [...]}


@dataclass(frozen=True)
class LayerSparsity:
    """Counts for one masked parameter."""

    name: str
    shape: tuple[int, ...]
    total: int
    kept: int

    @property
    def pruned(self) -> int:
        return self.total - self.kept

    @property
    def sparsity(self) -> float:
        return self.pruned / self.total if self.total else 0.0


@dataclass(frozen=True)
class MaskStats:
    """Per-layer and global sparsity of a MaskSet."""

    layers: tuple[LayerSparsity, ...]

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        # pruned / total (one rounding), not 1 - kept / total (two): 32 of 320 pruned is 0.1, not 0.09999999999999998,
        # and a single layer's global sparsity equals its LayerSparsity.sparsity
        return (self.total - self.kept) / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "kept": self.kept,
            "sparsity": self.sparsity,
            "layers": [
                {"name": l.name, "shape": list(l.shape), "total": l.total, "kept": l.kept,
                 "sparsity": l.sparsity}
                for l in self.layers
            ],
        }


def _as_bool(name: str, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor; an integer or float mask must hold only 0 and 1 (a 0.3 is no keep/prune bit)."""
    mask = mask.detach()
    if mask.dtype == torch.bool or mask.device.type == "meta":  # a meta tensor has no values to check
        return mask.to(torch.bool)
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()
        shown = f" such as {bad[0].item():g}" if bad.numel() else ""
        raise PrunelabError(
            f"mask {name!r} ({mask.dtype}) holds values other than 0 and 1{shown}; a mask is bool (True = kept) or "
            "0/1 -- threshold scores into one first, e.g. scores > t"
        )
    return mask.to(torch.bool)


def _saved_format_and_names(metadata: Mapping[str, str]) -> tuple[Any, Any]:
    """``(format, names)`` from a mask file's safetensors metadata, ``(None, None)`` where there is none.

    :meth:`MaskSet.save` writes one key, :data:`MASK_METADATA_KEY` (JSON); earlier versions wrote
    two plain keys, ``format`` and ``names`` (a JSON list), which are read the same way.
    """
    packed = metadata.get(MASK_METADATA_KEY)
    if packed is None:
        saved, names_text = {"format": metadata.get("format")}, metadata.get("names", "[]")
        try:
            saved["names"] = json.loads(names_text)
        except ValueError:
            saved["names"] = None
    else:
        try:
            saved = json.loads(packed)
        except ValueError:
            saved = None
    if not isinstance(saved, dict):
        return None, None
    return saved.get("format"), saved.get("names")


class MaskSet(Mapping[str, torch.Tensor]):
    """An immutable mapping ``parameter FQN -> bool tensor`` (True = kept).

    Masks may be given as bool tensors or as integer / float tensors holding only 0 and
    1 (``torch.nn.utils.prune``'s float ``weight_mask``); any other value, or a mask that is
    no tensor (a list, a numpy array), is refused with a PrunelabError naming the mask
    instead of being rounded to True; so are a ``masks`` that is no mapping and a name
    that is no str (an FQN).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(masks, Mapping):
            raise PrunelabError(
                f"MaskSet needs a mapping parameter FQN -> bool tensor, got a {type(masks).__name__}; pass e.g. "
                "{name: mask for name, mask in ...} keyed by names from model.named_parameters()"
            )
        checked: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if not isinstance(name, str):  # a parameter FQN; safetensors and check_model need str keys
                raise PrunelabError(
                    f"mask name {name!r} is a {type(name).__name__}, not a str; key masks by parameter FQN "
                    "(names from model.named_parameters(), e.g. 'fc1.weight')"
                )
            if not isinstance(mask, torch.Tensor):
                raise PrunelabError(
                    f"mask {name!r} is a {type(mask).__name__}, not a torch.Tensor; pass a bool tensor (True = kept), "
                    "e.g. torch.as_tensor(mask, dtype=torch.bool)"
                )
            checked[name] = _as_bool(name, mask)
        self._masks = checked

    # --- Mapping -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        if any(m.device.type == "meta" for m in self._masks.values()):  # shapes only: no bits to count
            return f"MaskSet({len(self)} tensors, on the meta device)"
        return f"MaskSet({len(self)} tensors, sparsity={self.stats().sparsity:.4f})"

    # --- construction ----------------------------------------------------------------
    @classmethod
    def ones(cls, params: Mapping[str, torch.Tensor]) -> "MaskSet":
        """All-kept masks for ``params`` (FQN -> tensor)."""
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})

    @classmethod
    def from_model(cls, model: nn.Module, names: list[str] | None = None) -> "MaskSet":
        """Masks read off the model's zeros: kept where the weight is nonzero."""
        if names is None:  # each (tied) weight once, under its first name
            names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
        elif isinstance(names, str):  # one name, not its letters
            names = [names]
        params = dict(model.named_parameters(remove_duplicate=False))  # names may use any alias
        unknown = [n for n in names if n not in params]
        if unknown:
            raise PrunelabError(
                f"from_model got {unknown[0]!r}, which names no parameter of the model; pass names from "
                "model.named_parameters()"
            )
        return cls({n: params[n].detach() != 0 for n in names})

    # --- use -------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise PrunelabError unless every mask names a parameter of matching shape."""
        params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under any of its names
        for name, mask in self._masks.items():
            if name not in params:
                raise PrunelabError(
                    f"mask {name!r} names no parameter of the model; the model has "
                    f"{', '.join(list(params)[:6])}{'...' if len(params) > 6 else ''} "
                    "-- were the masks saved for another architecture?"
                )
            if tuple(params[name].shape) != tuple(mask.shape):
                raise PrunelabError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                    f"{tuple(params[name].shape)}; use the masks saved with this model"
                )

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero every pruned weight of ``model`` in place; returns the model."""
        self.check_model(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, mask in self._masks.items():
            param = params[name]
            # masked_fill, not mul: inf * 0 and nan * 0 are nan, so a multiply would leave a non-finite pruned weight
            # non-zero (and it poisons every output); negative weights also become +0.0 rather than -0.0
            param.masked_fill_(~mask.to(param.device), 0)
        return model

    def _refuse_meta(self, action: str) -> None:
        """One-line error when a mask is on the meta device: it has a shape but no bits."""
        meta = [n for n, m in self._masks.items() if m.device.type == "meta"]
        if meta:
            raise PrunelabError(
                f"mask {meta[0]!r} is on the meta device and holds no bits to {action}; decide the masks on a "
                "materialised model (model.to_empty(device='cpu') and load its weights) or load them from a file"
            )

    def stats(self) -> MaskStats:
        self._refuse_meta("count")
        return MaskStats(tuple(
            LayerSparsity(n, tuple(m.shape), m.numel(), int(m.sum())) for n, m in self._masks.items()
        ))

    @property
    def sparsity(self) -> float:
        return self.stats().sparsity

    def equal(self, other: Mapping[str, torch.Tensor]) -> bool:
        """Same names and bits (the order of the names does not matter, as for :meth:`fingerprint`)."""
        if not isinstance(other, Mapping):
            raise PrunelabError(f"equal needs a mapping FQN -> bool tensor (a MaskSet), got a {type(other).__name__}")
        if len(self) != len(other) or set(self) != set(other):
            return False
        for n in self:  # checked like a MaskSet's masks: a 0.3 is no kept bit, a list no mask
            if not isinstance(other[n], torch.Tensor):
                raise PrunelabError(f"equal got a {type(other[n]).__name__} for mask {n!r}; pass bool tensors (True = kept)")
        return all(torch.equal(self[n].cpu(), _as_bool(n, other[n]).cpu()) for n in self)

    def intersect(self, other: Mapping[str, torch.Tensor]) -> "MaskSet":
        """Kept where both keep (a name missing from ``other`` keeps its own mask).

        ``other``'s masks are checked like a MaskSet's (tensors of 0/1 or bool) and must have the same shape:
        ``&`` would otherwise broadcast a ``(4,)`` mask against a ``(4, 4)`` one, or read 0.3 as kept.
        """
        if not isinstance(other, Mapping):  # a list would make every `n not in other` true: self, silently
            raise PrunelabError(f"intersect needs a mapping FQN -> bool tensor (a MaskSet), got a {type(other).__name__}")
        out = {}
        for n, m in self.items():
            if n not in other:
                out[n] = m
                continue
            theirs = other[n]
            if not isinstance(theirs, torch.Tensor):
                raise PrunelabError(f"intersect got a {type(theirs).__name__} for mask {n!r}; pass bool tensors (True = kept)")
            theirs = _as_bool(n, theirs)
            if tuple(theirs.shape) != tuple(m.shape):
                raise PrunelabError(
                    f"intersect got shape {tuple(theirs.shape)} for mask {n!r}, which has shape {tuple(m.shape)}; "
                    "intersect masks of the same parameters"
                )
            out[n] = m & theirs.to(m.device)
        return MaskSet(out)

    def fingerprint(self) -> str:
        """sha256 over names, shapes and bits: equal fingerprints <=> equal masks."""
        self._refuse_meta("hash")
        digest = hashlib.sha256()
        for name in sorted(self._masks):
            mask = self._masks[name].cpu().contiguous()
            digest.update(name.encode())
            digest.update(json.dumps(list(mask.shape)).encode())
            digest.update(mask.numpy().tobytes())
        return digest.hexdigest()

    def collective_device(self, backend: str | None = None) -> torch.device:
        """Where a tensor broadcast about these masks must live for ``backend``.

        NCCL only moves CUDA tensors, so under ``nccl`` it is the current CUDA device
        (masks may be on the CPU, e.g. loaded from a file); otherwise the masks' own device
        (the CPU for gloo runs and for an empty set).
        """
        if backend is not None and str(backend).lower() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        first = next(iter(self._masks.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def fingerprint_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The first 16 hex digits of :meth:`fingerprint` as an int64 tensor ``(16,)`` on ``device``."""
        return torch.tensor([int(c, 16) for c in self.fingerprint()[:16]], dtype=torch.int64, device=device)

    def verify_across_ranks(self) -> None:
        """Raise RuntimeError on every rank unless every rank holds bit-identical masks (DDP).

        Every rank raises, rank 0 included, not only the ranks that differ: a rank that went on
        alone would block in its next collective waiting for peers that stopped.
        """
        if distributed.world_size() == 1:
            return
        local = self.fingerprint_tensor(self.collective_device(dist.get_backend()))
        reference = distributed.broadcast_(local.clone())
        first = distributed.first_rank_where(not torch.equal(local, reference))  # the same answer on every rank
        if first is not None:
            raise RuntimeError(
                f"rank {first} holds different masks than rank 0 (seen from rank {distributed.rank()}); "
                "mask decisions must be made from scores reduced across ranks"
            )

    # --- files -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the masks as safetensors (bool tensors keyed by FQN), atomically.

        The metadata records the names in order, so :meth:`load` returns the same mapping
        in the same order (safetensors itself stores tensors sorted by name).  It is one key,
        :data:`MASK_METADATA_KEY`, holding JSON with sorted keys: safetensors writes several
        metadata keys in hash order, which made two saves of one MaskSet differ byte-wise.
        """
        from safetensors.torch import save_file

        self._refuse_meta("save")
        path = Path(path)
        # clone: safetensors refuses tensors sharing memory (one mask under two tied names)
        tensors = {n: m.detach().cpu().clone().contiguous() for n, m in self._masks.items()}
        metadata = {MASK_METADATA_KEY: json.dumps({"format": MASK_FORMAT, "names": list(self._masks)}, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "MaskSet":
        """Read masks written by :meth:`save` (on the CPU, or on ``device``), in their saved order.

        The file must carry :meth:`save`'s ``format`` metadata (:data:`MASK_FORMAT`; every
        version of prunelab has written it, earlier ones as the two plain keys ``format`` and
        ``names``, read too): a safetensors file without it, or with another prunelab format (a
        model's weights), is refused, as is a mask holding values other than 0 and 1.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise PrunelabError(f"mask file {str(path)!r} does not exist; pass the masks.safetensors written next to the model")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise PrunelabError(f"cannot read masks from {str(path)!r} ({exc}); the file is corrupt or not a safetensors mask file") from None
        kind, order = _saved_format_and_names(metadata)
        if kind is None:
            raise PrunelabError(
                f"{str(path)!r} has no prunelab format metadata, so MaskSet.save did not write it; pass the "
                f"masks.safetensors written next to the model, or build a MaskSet from the tensors and save it"
            )
        if kind != MASK_FORMAT:
            raise PrunelabError(
                f"{str(path)!r} is a {kind} file, not a mask file ({MASK_FORMAT}); pass the masks.safetensors "
                "written next to the model"
            )
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(tensors):
            order = list(tensors)  # no (usable) recorded order: the file's own
        try:
            masks = cls({name: tensors[name] for name in order})
        except PrunelabError as exc:
            raise PrunelabError(f"{str(path)!r}: {exc}") from None
        return masks.to(device) if device is not None else masks

    def to(self, device: torch.device | str) -> "MaskSet":
        """The same masks on ``device``."""
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise PrunelabError(f"unknown device {device!r}; pass e.g. 'cpu', 'cuda' or 'cuda:0'") from None
        return MaskSet({n: m.to(device) for n, m in self._masks.items()})
