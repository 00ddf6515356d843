"""Count what a (masked) model costs: parameters, nonzeros, MACs/FLOPs and storage bytes.

One forward pass of an example input, with forward hooks on every ``nn.Linear``,
``transformers``' ``Conv1D`` (GPT-2's layers: a Linear whose weight is stored ``(in, out)``,
so ``in = weight.shape[0]``, ``out = weight.shape[1]``; found by type, transformers is never
imported), ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and materialised sparse module
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
outside Linear/Conv layers and attention in-projections (norms, embeddings, ...) are
counted dense.

Storage (fp32 values, per layer; the bias is always stored dense, ``4 * bias.numel()``):

* dense:  ``4 * params``
* CSR:    weight viewed as the 2-D matrix ``(out, in/groups * k...)`` (a Conv1D: ``W^T``, ``out`` rows):
  ``4 * nnz`` values + ``4 * nnz`` int32 column indices + ``4 * (rows + 1)`` int32 row pointers
* bitmap: ``4 * nnz`` values + ``ceil(numel / 8)`` bytes of 1-bit keep-map

Attention (:mod:`prunelab.measure.attention`).  An ``nn.MultiheadAttention``'s q/k/v
in-projection is counted as three layers ``"<mha>.in_proj.q"``, ``".k"``, ``".v"`` (kind
``"MultiheadAttention.in_proj"``, weights = the rows of ``in_proj_weight``, or
``q/k/v_proj_weight``; masks are given under those parameters' names; each is stored as
its own ``(E, in)`` matrix, so CSR counts ``E + 1`` row pointers per projection) applied to
``N*L``, ``N*S``, ``N*S`` tokens, and its ``out_proj`` (which it calls functionally) to
``N*L`` tokens -- ``4 * E^2`` MACs per token for self-attention.  The attention products, Q K^T
and A V, multiply two activations: they are reported apart, as ``ModelCost.attention``
(``2 * heads * L * S * head_dim`` per batch element for ``nn.MultiheadAttention``;
``F.scaled_dot_product_attention`` calls and batched matmuls of two activations are
counted by a ``TorchFunctionMode`` active only during the pass), so ``dense_macs`` and
``sparse_macs`` keep meaning weight MACs and ``dense_macs_with_attention`` adds them.

Costs are per sample: the pass's counts are divided by ``example_input.shape[0]``, so the
first dimension of the example input must be the batch dimension.  The records are the
frozen dataclasses of :mod:`prunelab.measure.costs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.measure.attention import (
    IN_PROJECTION_KIND, ActivationProductCounter, attention_modules, child_name, in_projections,
    mha_attention_macs, mha_call,
)
from prunelab.measure.costs import BYTES_PER_INDEX, BYTES_PER_VALUE, AttentionCost, LayerCost, ModelCost
from prunelab.measure.tables import format_bytes  # imported from here before the split: kept importable
from prunelab.oneshot.layer_targets import hf_conv1d_type, is_hf_conv1d

TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MEASURED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_TYPES)

__all__ = ["BYTES_PER_INDEX", "BYTES_PER_VALUE", "AttentionCost", "LayerCost", "ModelCost", "format_bytes",
           "measure_model", "measured_layers"]


def _sparse_module_type() -> type[nn.Module]:
    # imported on use: prunelab.materialise imports prunelab.measure.tables, whose package imports this module
    from prunelab.materialise.sparse_modules import SparseModule

    return SparseModule


def measured_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose MACs are counted, by FQN: Linear/Conv/ConvTranspose (and ``transformers`` Conv1D)
    with a weight, and sparse modules."""
    sparse = _sparse_module_type()
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, sparse)
        or ((isinstance(module, MEASURED_TYPES) or is_hf_conv1d(module))
            and isinstance(getattr(module, "weight", None), torch.Tensor))
    }


def _apply_width(module: nn.Module) -> tuple[int, bool]:
    """``(channels, from_input)``: positions = elements / channels of the output (input for a transposed conv)."""
    if isinstance(module, _sparse_module_type()):
        return module.weight_shape[0], False
    if isinstance(module, nn.Linear):
        return module.out_features, False
    if is_hf_conv1d(module):  # weight (in, out): output (..., out)
        return module.weight.shape[1], False
    if isinstance(module, TRANSPOSED_TYPES):
        return module.in_channels, True
    return module.out_channels, False


_CONV_DIMS: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3),
    (nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3),
)


def _input_problem(module: nn.Module, x: Any) -> str | None:
    """Why a stock Linear/Conv ``module`` cannot take ``x`` (``"expects ... but got ..."``), or None.

    Only layers that run their class's own ``forward`` are checked (a subclass may reshape
    its input); a Linear needs ``(..., in_features)``, a ``ConvNd`` ``(N, C_in, *d)`` or
    ``(C_in, *d)`` with ``d`` of N spatial sizes; a floating-point weight needs a
    floating-point input (token ids or labels are integers; no autocast casts those).
    """
    if not isinstance(x, torch.Tensor):
        return None
    expected = None
    conv1d = hf_conv1d_type()
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        if x.dim() == 0 or x.shape[-1] != module.in_features:
            expected = f"(..., {module.in_features})"
    elif conv1d is not None and isinstance(module, conv1d):
        if type(module).forward is not conv1d.forward:
            return None
        if x.dim() == 0 or x.shape[-1] != module.weight.shape[0]:  # weight (in, out)
            expected = f"(..., {module.weight.shape[0]})"
    else:
        stock = [dims for conv, dims in _CONV_DIMS
                 if isinstance(module, conv) and type(module).forward is conv.forward]
        if not stock:
            return None
        dims, channels = stock[0], module.in_channels
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-(dims + 1)] != channels:
            spatial = ("L", "H, W", "D, H, W")[dims - 1]
            expected = f"(N, {channels}, {spatial}) or ({channels}, {spatial})"
    if expected is not None:
        return f"expects input of shape {expected} but got shape {tuple(x.shape)}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not (x.is_floating_point() or x.is_complex()):
        return f"expects a floating-point input (its weight is {weight.dtype}) but got {x.dtype}"
    return None


def _check_input_hook(name: str):
    """A forward pre-hook that refuses, naming the layer, an input its stock Linear/Conv forward would reject."""
    def hook(module: nn.Module, args: tuple) -> None:
        problem = _input_problem(module, args[0]) if args else None
        if problem is not None:
            raise PrunelabError(
                f"layer {name!r} ({type(module).__name__}) {problem}; pass an example_input of the shape and dtype "
                f"the model was built for"
            )
    return hook


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
                f"Linear/Conv weights only (nn.MultiheadAttention's in-projection included) -- drop that mask or "
                f"apply it to the model before measuring"
            )
        if tuple(mask.shape) != tuple(param.shape):
            raise PrunelabError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the weight has shape "
                f"{tuple(param.shape)}; pass masks built from this model"
            )
        keep = mask.detach().to(device=param.device, dtype=torch.bool)
        by_id[id(param)] = keep if id(param) not in by_id else by_id[id(param)] & keep
    return by_id


def _reparametrised_originals(model: nn.Module) -> set[int]:
    """``id`` of the stored originals behind a re-parametrised weight, counted with its layer, not as other.

    ``torch.nn.utils.prune`` keeps ``weight_orig`` (a parameter) and ``weight_mask`` (a buffer) and
    computes ``weight`` from them; ``torch.nn.utils.parametrize`` keeps
    ``parametrizations.weight.original``.  The layer's cost already counts ``weight``.
    """
    found = set()
    for module in model.modules():
        original = getattr(module, "weight_orig", None)
        if isinstance(original, nn.Parameter) and hasattr(module, "weight_mask"):
            found.add(id(original))
        parametrizations = getattr(module, "parametrizations", None)
        if isinstance(parametrizations, nn.ModuleDict) and "weight" in parametrizations:
            original = getattr(parametrizations["weight"], "original", None)
            if isinstance(original, nn.Parameter):
                found.add(id(original))
    return found


def _weight_nonzeros(weight: torch.Tensor, mask: torch.Tensor | None) -> int:
    nonzero = weight.detach() != 0
    if mask is not None:
        nonzero &= mask.to(device=weight.device, dtype=torch.bool)
    return int(nonzero.sum())


@dataclass(frozen=True)
class _Weighted:
    """One weight whose MACs are counted: a measured layer, or the rows of an attention in-projection."""

    name: str
    kind: str
    weight: torch.Tensor            # the whole tensor: masks and ties are keyed by it
    rows: slice | None              # the rows this unit multiplies (None: all of them)
    bias: torch.Tensor | None
    bias_rows: slice | None
    format_bytes: int | None = None
    matrix_rows: int | None = None  # rows of the (out, in) matrix when not weight.shape[0] (a Conv1D's out)

    def part(self, tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
        return tensor if rows is None else tensor[rows]

    def key(self, tensor: torch.Tensor, rows: slice | None) -> tuple[int, int | None, int | None]:
        """Identifies storage: the same tensor rows in two units are stored once (tied)."""
        return (id(tensor), None, None) if rows is None else (id(tensor), rows.start, rows.stop)


def _weighted_units(model: nn.Module, layers: Mapping[str, nn.Module],
                    weights: Mapping[str, torch.Tensor]) -> list[_Weighted]:
    """Measured layers and attention in-projections in module order (an attention's projections before its out_proj)."""
    sparse = _sparse_module_type()
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            units.extend(_Weighted(p.name, IN_PROJECTION_KIND, p.weight, p.rows, p.bias, p.bias_rows)
                         for p in in_projections(name, module))
        if name in layers:
            bias = getattr(module, "bias", None)
            units.append(_Weighted(
                name, type(module).__name__, weights[child_name(name, "weight")], None,
                bias if isinstance(bias, torch.Tensor) else None, None,
                int(module.nbytes) if isinstance(module, sparse) else None,
                int(module.weight.shape[1]) if is_hf_conv1d(module) else None,
            ))
    return units


def _per_sample(what: str, total: int, counted: str, batch: int, example_input: torch.Tensor) -> int:
    """``total / batch``; a count the batch does not divide means the first dimension is not the batch."""
    if total % batch:
        raise PrunelabError(
            f"{what} computed {total} {counted} for a batch of {batch}, which does not divide; example_input's first "
            f"dimension must be the batch (got shape {tuple(example_input.shape)})"
        )
    return total // batch


def measure_model(
    model: nn.Module, example_input: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None
) -> ModelCost:
    """Per-sample parameters, nonzeros, MACs/FLOPs and storage of ``model``'s Linear/Conv layers, and its attention.

    Linear/Conv here means ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
    the materialised sparse modules and the q/k/v in-projections of ``nn.MultiheadAttention``
    (see the module docstring).  Attention products (Q K^T, A V) go to ``ModelCost.attention``:
    ``2 * heads * L * S * head_dim`` MACs per batch element for an ``nn.MultiheadAttention``
    (``S`` keys, ``L`` queries), ``prod(batch dims) * L * S * (E + E_v)`` for an
    ``F.scaled_dot_product_attention`` call, ``out.numel() * a.shape[-1]`` for a batched matmul
    of two activations (see :mod:`prunelab.measure.attention`).

    Runs ONE forward pass of ``example_input`` (leading dimension = batch; batch 1 is
    typical) in eval mode under ``torch.no_grad``; the hooks and the ``TorchFunctionMode``
    that counts functional attention are always removed and every module's train/eval flag
    restored, even if the forward raises.  An input a Linear/Conv layer cannot take (wrong
    last dimension, channel count, rank, or integer dtype) is refused with a one-line ``PrunelabError`` that
    names the layer, before torch's own error.  ``masks`` maps weight FQNs (``"fc1.weight"``,
    ``"attn.in_proj_weight"``) to bool keep-masks; a weight counts as nonzero when it is
    nonzero and kept.  Layers the forward never calls are listed with ``reached=False``
    and 0 MACs.  Layers whose module is called more than once add up their positions.
    Weights used outside their module's ``forward`` (``F.linear(x, fc.weight)``) show as
    not reached and their MACs are not counted; ``nn.MultiheadAttention``'s ``out_proj`` is
    the exception: it is counted for each call of its attention module.
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
    mhas = attention_modules(model)
    sparse = _sparse_module_type()
    weights = {  # a sparse module's dense weight is rebuilt from its format (once, here)
        child_name(name, "weight"): module.dense_weight() if isinstance(module, sparse) else module.weight
        for name, module in layers.items()
    }
    weights.update({p.weight_name: p.weight for name, m in mhas.items() for p in in_projections(name, m)})
    keeps = _masks_by_weight(model, masks, weights) if masks is not None else {}
    units = _weighted_units(model, layers, weights)

    positions: dict[str, int] = {unit.name: 0 for unit in units}
    called: set[str] = set()
    running: list[str] = []  # FQNs of the modules whose forward is running, innermost last
    inside_mha = [0]         # > 0 while an nn.MultiheadAttention runs: its products are counted from its shapes
    counter = ActivationProductCounter(
        [id(t) for t in (*model.parameters(), *model.buffers())],
        where=lambda: None if inside_mha[0] else (running[-1] if running else ""),
    )

    def make_hook(name: str, channels: int, from_input: bool):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # Linear: (..., out_features); Conv: (B, C_out, *spatial) -- positions = numel / channels;
            # ConvTranspose: its input (B, C_in, *spatial) -- every input position scatters the whole weight;
            # a Linear(in, 0) (torch refuses a conv without output channels) has (...,) positions
            tensor = inputs[0] if from_input else output
            positions[name] += tensor.numel() // channels if channels else math.prod(tensor.shape[:-1])
            called.add(name)
        return hook

    def enter_mha(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inside_mha[0] += 1

    def leave_mha(module: nn.Module, args: tuple, output: Any) -> None:
        inside_mha[0] -= 1

    def make_mha_hook(name: str):
        projections = in_projections(name, mhas[name])
        out_proj = child_name(name, "out_proj")

        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            call = mha_call(module, args, kwargs)
            if call.batch % batch:  # e.g. a seq-first (L, N, E) input: its first dimension is not the batch
                raise PrunelabError(
                    f"nn.MultiheadAttention {name!r} (batch_first={module.batch_first}) ran on a batch of "
                    f"{call.batch}, which example_input's first dimension {batch} does not divide; costs are per "
                    f"sample, so pass an example input whose first dimension is the batch (got shape "
                    f"{tuple(example_input.shape)})"
                )
            for projection in projections:
                positions[projection.name] += projection.positions(call)
                called.add(projection.name)
            if out_proj in positions:
                positions[out_proj] += call.batch * call.query_len
                called.add(out_proj)
            counter.add(name, "MultiheadAttention", mha_attention_macs(module, call))
        return hook

    def make_running_hooks(name: str):
        def push(module: nn.Module, args: Any) -> None:
            running.append(name)

        def pop(module: nn.Module, args: Any, output: Any) -> None:
            running.pop()
        return push, pop

    param = next(model.parameters(), None)
    if param is not None and example_input.device != param.device:
        example_input = example_input.to(param.device)

    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            push, pop = make_running_hooks(name)  # pop even when the forward raises (a caller may catch it)
            handles += [module.register_forward_pre_hook(push), module.register_forward_hook(pop, always_call=True)]
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(_check_input_hook(name)))
            handles.append(module.register_forward_hook(make_hook(name, *_apply_width(module))))
        for name, module in mhas.items():
            handles.append(module.register_forward_pre_hook(enter_mha, with_kwargs=True))
            handles.append(module.register_forward_hook(make_mha_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(leave_mha, always_call=True))
        model.eval()
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    costs = []
    tied_own_bias = 0
    owners: dict[tuple[int, int | None, int | None], str] = {}  # weight/bias storage -> first unit that has it
    measured_ids: set[int] = set()                              # parameters counted in some unit
    for unit in units:
        weight = unit.part(unit.weight, unit.rows)
        bias = None if unit.bias is None else unit.part(unit.bias, unit.bias_rows)
        bias_params = bias.numel() if bias is not None else 0
        weight_key = unit.key(unit.weight, unit.rows)
        bias_key = None if unit.bias is None else unit.key(unit.bias, unit.bias_rows)
        tied_to = owners.get(weight_key)
        bias_tied_to = None if bias_key is None else owners.get(bias_key)
        if tied_to is not None and bias is not None and bias_tied_to is None:
            tied_own_bias += bias_params  # a tied weight with a bias of its own: the bias is stored
        owners.setdefault(weight_key, unit.name)
        measured_ids.add(id(unit.weight))
        if bias_key is not None:
            owners.setdefault(bias_key, unit.name)
            measured_ids.add(id(unit.bias))
        mask = keeps.get(id(unit.weight))  # a tied weight's mask, under whichever name it was given
        costs.append(LayerCost(
            name=unit.name,
            kind=unit.kind,
            weight_shape=tuple(weight.shape),
            weight_params=weight.numel(),
            weight_nonzeros=_weight_nonzeros(weight, None if mask is None else unit.part(mask, unit.rows)),
            bias_params=bias_params,
            output_positions=_per_sample(f"layer {unit.name!r}", positions[unit.name], "output positions", batch,
                                          example_input),
            reached=unit.name in called,
            tied_to=tied_to,
            format_bytes=unit.format_bytes,
            bias_tied_to=bias_tied_to,
            matrix_rows=unit.matrix_rows,
        ))
    measured_ids |= _reparametrised_originals(model)
    other = sum(p.numel() for p in model.parameters() if id(p) not in measured_ids) + tied_own_bias
    attention = tuple(
        AttentionCost(name=name, kind=kind, calls=calls,
                      macs=_per_sample(f"attention in {name!r} ({kind})", macs, "MACs", batch, example_input))
        for (name, kind), (calls, macs) in counter.totals.items()
    )
    return ModelCost(layers=tuple(costs), other_params=other, attention=attention)
