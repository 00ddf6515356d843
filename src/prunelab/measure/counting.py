"""Count what a (masked) model costs: parameters, nonzeros, MACs/FLOPs and storage bytes.

One forward pass of an example input, with forward hooks on every ``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and materialised sparse module
(:mod:`prunelab.materialise.sparse_modules`: ``CSRLinear``, ``BSRLinear``,
``SemiStructuredLinear``, ``CSRConv2d``), tells each layer how many positions it applies
its whole weight at per sample (a conv's ``H_out * W_out`` whatever its stride, padding,
dilation or groups; a Linear applied to ``(B, T, C)`` inputs computes ``T``; a transposed
conv scatters the whole weight from every INPUT position, so ``H_in * W_in``).  Everything
else follows from the weight and its nonzeros:

* ``dense_macs  = weight.numel() * output_positions``  (``out * in/groups * k...`` per position;
  ``in * out/groups * k...`` per input position for a transposed conv)
* ``sparse_macs = nnz(weight)    * output_positions``  (pruned weights are skipped)
* FLOPs are ``2 * MACs``.  Bias additions are not counted (the usual convention).

A materialised sparse module counts like the dense layer it replaced (its weight is the
exact dense weight of its format, its buffers are not parameters but are counted as the
layer's params); ``format_bytes`` adds what its format really stores (``nbytes``: CSR/BSR
values + int32 column indices + int32 row pointers, 2:4 values + 16-bit metadata per 16
columns, plus the bias).

Nonzeros.  A weight counts as nonzero when its value is nonzero **and** its mask (if one is
given) keeps it: ``nnz = (mask & (w != 0)).sum()``.  The model holds real zeros where a
mask prunes (DESIGN.md decision 1), so both agree in the normal case; taking the
intersection means a kept weight that happens to be exactly zero, or a pruned weight that
has not been zeroed yet, is never counted as work or storage.  Biases and every parameter
outside Linear/Conv layers (norms, embeddings, ...) are counted dense.

Storage (fp32 values, per layer; the bias is always stored dense, ``4 * bias.numel()``):

* dense:  ``4 * params``
* CSR:    weight viewed as the 2-D matrix ``(out, in/groups * k...)``:
  ``4 * nnz`` values + ``4 * nnz`` int32 column indices + ``4 * (rows + 1)`` int32 row pointers
* bitmap: ``4 * nnz`` values + ``ceil(numel / 8)`` bytes of 1-bit keep-map

Costs are per sample: the pass's counts are divided by ``example_input.shape[0]``, so the
first dimension of the example input must be the batch dimension.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError

TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MEASURED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_TYPES)
BYTES_PER_VALUE = 4  # fp32 values
BYTES_PER_INDEX = 4  # int32 indices

__all__ = ["LayerCost", "ModelCost", "format_bytes", "measure_model"]


@dataclass(frozen=True)
class LayerCost:
    """Per-sample cost of one Linear/Conv layer (or materialised sparse module).

    Stored fields are the raw counts; every derived number (params, MACs, FLOPs, bytes,
    sparsity) is a property, so a ``LayerCost`` can never be internally inconsistent.
    ``reached`` is False when the forward pass never called this layer; its MACs are 0.
    """

    name: str                       # module FQN, e.g. "features.0"
    kind: str                       # "Linear", "Conv2d", ...
    weight_shape: tuple[int, ...]
    weight_params: int
    weight_nonzeros: int            # nonzero AND kept by the mask
    bias_params: int                # counted dense
    output_positions: int           # per sample: 1 for Linear on (B, C), T on (B, T, C), H_out*W_out for Conv2d,
                                    # H_in*W_in for ConvTranspose2d (positions the whole weight is applied at)
    reached: bool = True
    shares_storage: bool = False    # its weight is an earlier layer's (tied): MACs count, storage does not
    format_bytes: int | None = None  # a materialised sparse module: bytes its format + bias really store

    @property
    def params(self) -> int:
        return self.weight_params + self.bias_params

    @property
    def nonzeros(self) -> int:
        """Weight nonzeros plus the (dense) bias."""
        return self.weight_nonzeros + self.bias_params

    @property
    def sparsity(self) -> float:
        """Fraction of the weight that is zero or pruned (the bias is not included)."""
        return 1.0 - self.weight_nonzeros / self.weight_params if self.weight_params else 0.0

    @property
    def dense_macs(self) -> int:
        return self.weight_params * self.output_positions

    @property
    def sparse_macs(self) -> int:
        return self.weight_nonzeros * self.output_positions

    @property
    def dense_flops(self) -> int:
        return 2 * self.dense_macs

    @property
    def sparse_flops(self) -> int:
        return 2 * self.sparse_macs

    @property
    def dense_bytes(self) -> int:
        return BYTES_PER_VALUE * self.params

    @property
    def csr_bytes(self) -> int:
        rows = self.weight_shape[0] if self.weight_shape else 1
        nnz = self.weight_nonzeros
        weight = BYTES_PER_VALUE * nnz + BYTES_PER_INDEX * nnz + BYTES_PER_INDEX * (rows + 1)
        return weight + BYTES_PER_VALUE * self.bias_params

    @property
    def bitmap_bytes(self) -> int:
        weight = BYTES_PER_VALUE * self.weight_nonzeros + math.ceil(self.weight_params / 8)
        return weight + BYTES_PER_VALUE * self.bias_params

    @property
    def best_sparse_bytes(self) -> int:
        """The smaller of CSR and bitmap (dense is not considered: compare with ``dense_bytes``)."""
        return min(self.csr_bytes, self.bitmap_bytes)

    @property
    def stored_bytes(self) -> int:
        """What the layer stores as it is: ``format_bytes`` when materialised, else ``dense_bytes``."""
        return self.dense_bytes if self.format_bytes is None else self.format_bytes

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready numbers; ``size_format_bytes`` only for a materialised sparse module."""
        extra = {} if self.format_bytes is None else {"size_format_bytes": self.format_bytes}
        return {
            "name": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape), "reached": self.reached,
            "params": self.params, "weight_params": self.weight_params, "weight_nonzeros": self.weight_nonzeros,
            "bias_params": self.bias_params, "nonzeros": self.nonzeros, "sparsity": self.sparsity,
            "output_positions": self.output_positions,
            "dense_macs": self.dense_macs, "sparse_macs": self.sparse_macs,
            "dense_flops": self.dense_flops, "sparse_flops": self.sparse_flops,
            "size_dense_bytes": self.dense_bytes, "size_csr_bytes": self.csr_bytes,
            "size_bitmap_bytes": self.bitmap_bytes, "size_best_sparse_bytes": self.best_sparse_bytes, **extra,
        }


@dataclass(frozen=True)
class ModelCost:
    """Per-sample cost of a whole model: its Linear/Conv layers plus ``other_params`` counted dense."""

    layers: tuple[LayerCost, ...]
    other_params: int = 0  # parameters outside Linear/Conv layers (norms, embeddings, ...), stored dense

    @property
    def stored_layers(self) -> tuple[LayerCost, ...]:
        """The layers that own their weight (a tied weight is stored, and counted, once)."""
        return tuple(l for l in self.layers if not l.shares_storage)

    @property
    def weight_params(self) -> int:
        return sum(l.weight_params for l in self.stored_layers)

    @property
    def weight_nonzeros(self) -> int:
        return sum(l.weight_nonzeros for l in self.stored_layers)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.stored_layers) + self.other_params

    @property
    def nonzeros(self) -> int:
        return sum(l.nonzeros for l in self.stored_layers) + self.other_params

    @property
    def sparsity(self) -> float:
        """Fraction of Linear/Conv weights that are zero or pruned (biases and other params excluded)."""
        total = self.weight_params
        return 1.0 - self.weight_nonzeros / total if total else 0.0

    @property
    def dense_macs(self) -> int:
        return sum(l.dense_macs for l in self.layers)

    @property
    def sparse_macs(self) -> int:
        return sum(l.sparse_macs for l in self.layers)

    @property
    def dense_flops(self) -> int:
        return 2 * self.dense_macs

    @property
    def sparse_flops(self) -> int:
        return 2 * self.sparse_macs

    @property
    def other_bytes(self) -> int:
        return BYTES_PER_VALUE * self.other_params

    @property
    def dense_bytes(self) -> int:
        return sum(l.dense_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def csr_bytes(self) -> int:
        return sum(l.csr_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def bitmap_bytes(self) -> int:
        return sum(l.bitmap_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def best_sparse_bytes(self) -> int:
        """Each layer in the smaller of CSR and bitmap, other parameters dense."""
        return sum(l.best_sparse_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def stored_bytes(self) -> int:
        """Bytes the model stores as it is: materialised layers at their format's size, the rest dense."""
        return sum(l.stored_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def compression_x(self) -> float:
        """``params / nonzeros``, the compression rate of Han et al. (2015)."""
        return self.params / self.nonzeros if self.nonzeros else math.inf

    @property
    def storage_ratio_x(self) -> float:
        """``dense_bytes / best_sparse_bytes``: how much smaller the file really gets (below 1 when sparse is bigger)."""
        best = self.best_sparse_bytes
        return self.dense_bytes / best if best else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready numbers with units in the keys, plus a ``layers`` list of per-layer dicts.

        ``size_stored_bytes`` is present only when some layer is a materialised sparse module.
        """
        materialised = any(l.format_bytes is not None for l in self.stored_layers)
        extra = {"size_stored_bytes": self.stored_bytes} if materialised else {}
        return {
            "params": self.params, "nonzeros": self.nonzeros, "weight_params": self.weight_params,
            "weight_nonzeros": self.weight_nonzeros, "other_params": self.other_params, "sparsity": self.sparsity,
            "dense_macs": self.dense_macs, "sparse_macs": self.sparse_macs,
            "dense_flops": self.dense_flops, "sparse_flops": self.sparse_flops,
            "size_dense_bytes": self.dense_bytes, "size_csr_bytes": self.csr_bytes,
            "size_bitmap_bytes": self.bitmap_bytes, "size_best_sparse_bytes": self.best_sparse_bytes,
            "compression_x": self.compression_x, "storage_ratio_x": self.storage_ratio_x, **extra,
            "layers": [l.to_dict() for l in self.layers],
        }


def _sparse_module_type() -> type[nn.Module]:
    # imported on use: prunelab.materialise imports prunelab.measure.tables, which imports this module
    from prunelab.materialise.sparse_modules import SparseModule

    return SparseModule


def measured_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose MACs are counted, by FQN: Linear/Conv/ConvTranspose with a weight, and sparse modules."""
    sparse = _sparse_module_type()
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, sparse)
        or (isinstance(module, MEASURED_TYPES) and isinstance(getattr(module, "weight", None), torch.Tensor))
    }


def _apply_width(module: nn.Module) -> tuple[int, bool]:
    """``(channels, from_input)``: positions = elements / channels of the output (input for a transposed conv)."""
    if isinstance(module, _sparse_module_type()):
        return module.weight_shape[0], False
    if isinstance(module, nn.Linear):
        return module.out_features, False
    if isinstance(module, TRANSPOSED_TYPES):
        return module.in_channels, True
    return module.out_channels, False


def _masks_by_weight(
    model: nn.Module, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Check ``masks`` and key them by the weight tensor they mask (``id``).

    Parameters are looked up with ``remove_duplicate=False``: a TIED weight (shared by two
    layers, or by an embedding and a Linear head) may be masked under any of its names, and
    the mask applies to every layer that uses it (several masks of one tensor are ANDed).
    A materialised sparse module's weight (a buffer format, not a parameter) is masked under
    the dense layer's name, ``"<module>.weight"``.
    """
    params = {**weights, **dict(model.named_parameters(remove_duplicate=False))}
    weight_ids = {id(w) for w in weights.values()}
    by_id: dict[int, torch.Tensor] = {}
    for name, mask in masks.items():
        if name not in params:
            raise PrunelabError(
                f"mask {name!r} names no parameter of the model; mask keys must be parameter FQNs such as "
                f"{next(iter(weights), 'fc1.weight')!r} -- build the masks from this model"
            )
        param = params[name]
        if id(param) not in weight_ids:
            raise PrunelabError(
                f"mask {name!r} is not the weight of a Linear/Conv layer; measure_model counts masks on "
                f"Linear/Conv weights only -- drop that mask or apply it to the model before measuring"
            )
        if tuple(mask.shape) != tuple(param.shape):
            raise PrunelabError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the weight has shape "
                f"{tuple(param.shape)}; pass masks built from this model"
            )
        keep = mask.detach().to(device=param.device, dtype=torch.bool)
        by_id[id(param)] = keep if id(param) not in by_id else by_id[id(param)] & keep
    return by_id


def _weight_nonzeros(weight: torch.Tensor, mask: torch.Tensor | None) -> int:
    nonzero = weight.detach() != 0
    if mask is not None:
        nonzero &= mask.to(device=weight.device, dtype=torch.bool)
    return int(nonzero.sum())


def measure_model(
    model: nn.Module, example_input: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None
) -> ModelCost:
    """Per-sample parameters, nonzeros, MACs/FLOPs and storage of ``model``'s Linear/Conv layers.

    Linear/Conv here means ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``
    and the materialised sparse modules (see the module docstring).

    Runs ONE forward pass of ``example_input`` (leading dimension = batch; batch 1 is
    typical) in eval mode under ``torch.no_grad``; the hooks are always removed and every
    module's train/eval flag restored, even if the forward raises.  ``masks`` maps weight
    FQNs (``"fc1.weight"``) to bool keep-masks; a weight counts as nonzero when it is
    nonzero and kept.  Layers the forward never calls are listed with ``reached=False``
    and 0 MACs.  Layers whose module is called more than once add up their positions.
    Weights used outside their module's ``forward`` (e.g. ``nn.MultiheadAttention``'s
    ``out_proj``) show as not reached; their MACs are not counted.
    """
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"measure_model needs an nn.Module, got {type(model).__name__}; pass the model itself")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        got = "a 0-d tensor" if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise PrunelabError(
            f"example_input must be a tensor with a leading batch dimension, got {got}; "
            f"pass e.g. images[:1] of shape (1, C, H, W)"
        )
    batch = example_input.shape[0]
    if batch == 0:
        raise PrunelabError(
            f"example_input has batch size 0 (shape {tuple(example_input.shape)}); pass at least one sample"
        )

    layers = measured_layers(model)
    sparse = _sparse_module_type()
    weights = {  # a sparse module's dense weight is rebuilt from its format (once, here)
        f"{name}.weight" if name else "weight": module.dense_weight() if isinstance(module, sparse) else module.weight
        for name, module in layers.items()
    }
    keeps = _masks_by_weight(model, masks, weights) if masks is not None else {}

    positions: dict[str, int] = {name: 0 for name in layers}
    called: set[str] = set()

    def make_hook(name: str, channels: int, from_input: bool):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # Linear: (..., out_features); Conv: (B, C_out, *spatial) -- positions = numel / channels;
            # ConvTranspose: its input (B, C_in, *spatial) -- every input position scatters the whole weight;
            # a Linear(in, 0) (torch refuses a conv without output channels) has (...,) positions
            tensor = inputs[0] if from_input else output
            positions[name] += tensor.numel() // channels if channels else math.prod(tensor.shape[:-1])
            called.add(name)
        return hook

    param = next(model.parameters(), None)
    if param is not None and example_input.device != param.device:
        example_input = example_input.to(param.device)

    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name, *_apply_width(module))))
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    costs = []
    tied_own_bias = 0
    measured_ids: set[int] = set()
    for name, module in layers.items():
        weight_name = f"{name}.weight" if name else "weight"
        weight = weights[weight_name]
        bias = getattr(module, "bias", None)
        bias_params = bias.numel() if isinstance(bias, torch.Tensor) else 0
        tied = id(weight) in measured_ids
        if tied and isinstance(bias, torch.Tensor) and id(bias) not in measured_ids:
            other_bias = bias_params  # a tied weight with a bias of its own: the bias is stored
        else:
            other_bias = 0
        measured_ids.add(id(weight))
        if isinstance(bias, torch.Tensor):
            measured_ids.add(id(bias))
        total_positions = positions[name]
        if total_positions % batch:
            raise PrunelabError(
                f"layer {name!r} computed {total_positions} output positions for a batch of {batch}, which does not "
                f"divide; example_input's first dimension must be the batch (got shape {tuple(example_input.shape)})"
            )
        mask = keeps.get(id(weight))  # a tied weight's mask, under whichever name it was given
        costs.append(LayerCost(
            name=name,
            kind=type(module).__name__,
            weight_shape=tuple(weight.shape),
            weight_params=weight.numel(),
            weight_nonzeros=_weight_nonzeros(weight, mask),
            bias_params=bias_params,
            output_positions=total_positions // batch,
            reached=name in called,
            shares_storage=tied,
            format_bytes=int(module.nbytes) if isinstance(module, sparse) else None,
        ))
        tied_own_bias += other_bias
    other = sum(p.numel() for p in model.parameters() if id(p) not in measured_ids) + tied_own_bias
    return ModelCost(layers=tuple(costs), other_params=other)


def format_bytes(n: float) -> str:
    """Human-readable size in decimal (SI) units, powers of 1000: ``1024 -> "1.02 KB"``, ``999 -> "999 B"``.

    "KB" here means 1000 bytes, matching the ``size_kb = bytes / 1000`` columns of the reports.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n) or n < 0:
        raise PrunelabError(f"format_bytes needs a byte count >= 0, got {n!r}; pass e.g. cost.dense_bytes")
    if n < 1000:
        return f"{int(n)} B" if float(n).is_integer() else f"{n:.1f} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        if value < 999.995 or unit == "PB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")
