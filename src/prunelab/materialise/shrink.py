"""Structured shrink: cut pruned channels out of a model so it is really smaller, exactly.

From a channel / neuron MaskSet (whole output rows ``w[o]`` of Linear/Conv weights
pruned), :func:`shrink_model` returns a smaller *dense* copy of the model -- the same
module classes with their Linear / Conv / ConvTranspose / BatchNorm submodules replaced
by smaller ones -- whose outputs equal the masked model's (eval mode, fp32 error ~1e-6).
:func:`plan_shrink` is the dry run: it lists the coupled groups (what is cut together,
how many channels stay) and every problem, naming op, node and module.

Coupling (see :mod:`prunelab.materialise.graph`): Linear -> act -> Linear, Conv -> BN ->
act/pool -> Conv, flatten -> Linear (columns ``c*H*W .. (c+1)*H*W``), ``torch.cat``
along channels (offsets per input), residual ``+`` / ``*`` (one channel set for all
operands), depthwise convs (input and output channel ``o`` cut together; rows reading
channels that cannot be cut -- the model input, a barrier's output -- are kept, and the
plan notes it) and attention units with ``q_proj/k_proj/v_proj/out_proj`` +
``num_heads`` (whole heads; ``num_heads`` is updated).  A BatchNorm or depthwise conv
called more than once couples the channels of all its calls (one set of rows to cut).
Channels pass unchanged through ``F.interpolate`` / ``nn.Upsample*`` (any mode) and
through padding (``F.pad``, ``nn.ZeroPad*`` / ``ConstantPad*`` / ``ReflectionPad*`` /
``ReplicationPad*`` / ``CircularPad*``) that leaves the channel dim alone, so U-Net
style decoders (upsample, pad to the skip's size, ``torch.cat`` with the skip) shrink.
Size-1 dims added or removed around the channels (``unsqueeze``, ``squeeze(dim)``,
``x[:, :, None, None]``, ``x[..., 0]``) pass them as ``view`` does, so squeeze-and-
excitation gates and Conv1d heads shrink; ``squeeze()`` without a dim and indexing that
selects channels are refused.

Transposed convolutions (``nn.ConvTranspose1d/2d/3d``, weight ``(in_channels,
out_channels/groups, *kernel)``) are cut like convs with the weight dims swapped: as a
producer its output channels are ``weight[:, o]`` (dim 1) and ``bias[o]``; as a consumer
its input channels are ``weight[i]`` (dim 0), cut when the layer producing them is
pruned.  prunelab's ``channel`` granularity prunes a transposed conv's *output* channels
(:class:`~prunelab.structure.TransposedChannel`), so such a mask makes it a pruned producer.
A mask that prunes whole *input* slices ``weight[i]`` (hand-made) is read as the layer's
vote on its input channels, as a depthwise conv's mask votes: a channel is cut only where
the producer's mask prunes it too (the union rule below), and an input slice it prunes
alone stays, as zeros; a groups=1 mask that prunes no input slice has no vote.  Depthwise transposed
convs are cut as depthwise convs; other grouped ones are unsupported.

Residual groups keep the **union**: a channel is removed only if *every* member's mask
prunes it (a member without a mask keeps all its channels).  A producer whose mask prunes
a channel some other member keeps holds on to that (zeroed) row, so the shrunk model
still equals the masked model; it is just less small than the mask suggests.  Give the
members of a group agreeing masks to get the full reduction.

Exactness: the bias of a pruned neuron.  A neuron mask zeroes ``w[o]`` but not ``b[o]``,
so in the masked model a pruned channel is not 0 but a constant ``act(BN(b_o))``.
Shrink removes the channel and *folds* that constant into every consumer's bias, so the
result is exact, not merely close:

* constants are propagated per channel through BatchNorm (eval-mode running statistics:
  ``(c - mu) / sqrt(var + eps) * gamma + beta``), pointwise activations, max/adaptive
  pools, means, flatten, ``+``/``*`` with scalars or coupled tensors and concatenation;
* a Linear consumer gets ``b += W[:, cut] @ c``; an unpadded Conv consumer gets
  ``b[o] += sum_i c_i * sum_k W[o, i, k]`` (a consumer without bias gets one);
* a removed attention head outputs its constant value bias ``b_v`` (its softmax weights
  sum to one), folded into ``out_proj``'s bias the same way;
* interpolation (its weights sum to one) and reflect / replicate / circular padding keep
  a constant channel that constant; a pruned output channel of a transposed conv is its
  bias ``b[o]`` everywhere.

Where a constant cannot be folded exactly -- a zero-padded conv (border pixels see only
part of the kernel), a transposed conv with a kernel or stride above 1 (the number of
kernel taps landing on an output position, and which, varies with the position), constant
padding (its border holds the fill value, not the channel's constant: a nonzero fill is
refused unless it equals the constant, even for silenced channels), an average pool
counting zero padding or with ``divisor_override``,
a product with a tensor broadcast over channels, a ``sum`` over positions (``c * n``
depends on the actual input's length ``n``, not the example's), an op with a value
computed from the input at run time (``h / x.size(1)``) -- the plan reports a
problem unless the constant is 0 (or, for the last, the result does not depend on it).
An in-place op (``h.relu_()``, ``nn.ReLU(inplace=True)``) also changes the constant its
operand carries for later readers; one through a view of a tensor read again later is
reported.  Make it 0 with
:func:`silence_pruned_channels_` (zeroes the pruned channels' bias and BatchNorm
scale/shift in place: the model changes, so re-check accuracy) -- the usual
Conv -> BN -> ReLU -> padded Conv case of ResNets needs that.  Folding uses running
statistics, so the equality holds in eval mode; in training mode BatchNorm would use
batch statistics.

Unsupported (reported by the dry run, never silently wrong): nn.MultiheadAttention,
grouped convolutions other than depthwise, LayerNorm/GroupNorm/softmax over channels,
padding of the channel dim, ops that move channels into space or back (``nn.PixelShuffle``,
``nn.PixelUnshuffle``, ``nn.ChannelShuffle``),
transposes/permutes/slicing/split of pruned channels, layers and attention units called
more than once with pruned inputs, submodules torch.fx cannot trace (kept whole; pruning
that reaches them is reported), and pruning the rows of a layer whose output is a model
output.
The original model is never modified: the shrink works on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import skip_init

from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise.graph import BN_TYPES, CONV_TYPES, CONVT_TYPES
from prunelab.materialise.shrink_plan import CoupledGroup, LayerCut, ShrinkPlan, plan_shrink
from prunelab.materialise.tracing import as_inputs, eval_mode

__all__ = ["CoupledGroup", "LayerCut", "ShrinkPlan", "apply_plan_", "plan_shrink", "shrink_model",
           "silence_pruned_channels_"]


# --- cutting -------------------------------------------------------------------------------
def _index(keep: torch.Tensor | None, device: torch.device) -> torch.Tensor | slice:
    return keep.nonzero().flatten().to(device) if keep is not None else slice(None)


def _cut_params(module: nn.Module, cut: LayerCut) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if cut.bias_delta is not None:
        delta = cut.bias_delta.to(device=weight.device, dtype=weight.dtype)
        bias = delta if bias is None else bias + delta
    rows, cols = _index(cut.rows, weight.device), _index(cut.cols, weight.device)
    if isinstance(module, CONVT_TYPES) and module.groups == 1:  # (I, O, *k): inputs are dim 0, outputs dim 1
        weight = weight[cols][:, rows]
    else:  # (O, I, *k); a depthwise conv (C, 1, *k) of either kind: only rows are cut
        weight = weight[rows][:, cols]
    return weight, (bias[rows] if bias is not None else None)


def _base(module: nn.Module, types: tuple[type[nn.Module], ...]) -> type[nn.Module]:
    return next(t for t in types if isinstance(module, t))


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """``channels_last`` (4-D) / ``channels_last_3d`` (5-D) when ``tensor`` is laid out so and not
    also plain contiguous (size-1 dims can make it both), else ``contiguous_format``."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    if channels_last is not None and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _new_module(module: nn.Module, cut: LayerCut) -> nn.Module:
    """A freshly constructed, smaller Linear / Conv / ConvTranspose / BatchNorm holding the kept values.

    Built with ``skip_init`` (every tensor is then copied in), so shrinking draws nothing
    from the global RNG.  A conv weight keeps its memory format (a ``channels_last`` model
    stays ``channels_last``; ``copy_`` keeps the destination's strides).
    """
    like = module.weight if module.weight is not None else module.running_mean  # BatchNorm(affine=False): buffers
    factory = {"device": like.device if like is not None else torch.device("cpu"),
               "dtype": like.dtype if like is not None else None}
    if isinstance(module, BN_TYPES):
        keep = _index(cut.rows, module.running_mean.device if module.running_mean is not None else None)
        size = int(cut.rows.sum())
        new = skip_init(_base(module, BN_TYPES), size, eps=module.eps, momentum=module.momentum, affine=module.affine,
                        track_running_stats=module.track_running_stats, **factory)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(module, attr)
                if value is not None:
                    getattr(new, attr).copy_(value.detach()[keep])
            if module.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
    else:
        weight, bias = _cut_params(module, cut)
        if isinstance(module, nn.Linear):
            new = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, **factory)
        elif isinstance(module, CONVT_TYPES):
            depthwise = module.groups > 1  # (C, 1, *k) as a depthwise conv; else (I, O, *k)
            channels_out = weight.shape[0] if depthwise else weight.shape[1]
            new = skip_init(
                _base(module, CONVT_TYPES), weight.shape[0], channels_out, module.kernel_size, stride=module.stride,
                padding=module.padding, output_padding=module.output_padding, groups=weight.shape[0] if depthwise else 1,
                bias=bias is not None, dilation=module.dilation, padding_mode=module.padding_mode, **factory)
        else:
            depthwise = module.groups > 1  # (C, 1, *k): only rows are cut, one channel set in and out
            channels_in = weight.shape[0] if depthwise else weight.shape[1]
            new = skip_init(
                _base(module, CONV_TYPES), channels_in, weight.shape[0], module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=weight.shape[0] if depthwise else 1,
                bias=bias is not None, padding_mode=module.padding_mode, **factory)
        layout = _memory_format(module.weight)
        if layout is not torch.contiguous_format:
            new.to(memory_format=layout)  # only the 4-D / 5-D weight changes; the bias is 1-D
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
    for attr, param in new.named_parameters(recurse=False):  # a frozen weight, bias or BatchNorm affine stays frozen
        old = getattr(module, attr, None)
        param.requires_grad_((old if old is not None else module.weight).requires_grad)  # a folded-in bias: as weight
    new.train(module.training)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_plan_(model: nn.Module, plan: ShrinkPlan) -> nn.Module:
    """Cut ``model`` (a masked copy of the planned model) in place, submodule by submodule."""
    for name, cut in plan.cuts.items():
        module = model.get_submodule(name)
        if cut.heads is not None:
            module.num_heads = cut.heads
        if cut.rows is not None or cut.cols is not None or cut.bias_delta is not None:
            _replace(model, name, _new_module(module, cut))
    return model


def _flatten(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return found


def _run(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        return _flatten(model(*inputs))


def shrink_model(
    model: nn.Module, masks: Mapping[str, torch.Tensor], example_input: Any, *, verify: bool = True
) -> nn.Module:
    """A smaller dense copy of ``model`` with the channels ``masks`` prune cut out.

    Plans first (:func:`plan_shrink`) and raises PrunelabError with the first problem
    before anything is built.  The copy keeps the model's classes; its pruned Linear /
    Conv / BatchNorm submodules are replaced by smaller ones and attention units get a
    smaller ``num_heads``.  With ``verify`` (default) the shrunk copy is run on
    ``example_input`` in eval mode and must match the masked model.
    """
    plan = plan_shrink(model, masks, example_input)
    plan.raise_if_problems()
    shrunk = copy.deepcopy(model)
    MaskSet(masks).apply_(shrunk)
    inputs = as_inputs(example_input)
    reference = _run(shrunk, inputs) if verify else []
    apply_plan_(shrunk, plan)
    if verify:
        try:
            outputs = _run(shrunk, inputs)
        except Exception as exc:  # noqa: BLE001 -- any failure of the user's forward is reported
            raise PrunelabError(
                f"the shrunk {type(model).__name__} fails on example_input ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); its forward probably hard-codes a "
                "pruned size -- exclude the layers involved from pruning"
            ) from None
        for ref, out in zip(reference, outputs):
            error = float((ref.double() - out.double()).abs().max()) if ref.numel() else 0.0
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            tol = (1e-4 if ref.dtype in (torch.float32, torch.float64) else 1e-2) * scale
            if ref.shape != out.shape or not error <= tol:
                raise PrunelabError(
                    f"the shrunk {type(model).__name__} differs from the masked model on example_input (max abs error "
                    f"{error:.3g}, shapes {tuple(ref.shape)} vs {tuple(out.shape)}); its forward uses an op shrink does not "
                    "model -- exclude the layers involved from pruning and report this model"
                )
    return shrunk


@torch.no_grad()
def silence_pruned_channels_(model: nn.Module, masks: Mapping[str, torch.Tensor], example_input: Any) -> nn.Module:
    """Zero the constant outputs of pruned channels in place, so shrinking can drop them.

    Applies ``masks`` to ``model``, then sets the bias of every row shrink would cut and
    the BatchNorm scale and shift of every cut channel to 0: a pruned channel then
    carries 0 instead of ``act(BN(b_o))`` (for activations with ``act(0) = 0``), which
    any consumer -- a zero-padded conv included -- loses exactly.  This changes the
    model's function (the masked model differs from before): re-check accuracy, and call
    it after the last fine-tuning step (a sparsifier re-zeroes weights, not biases).
    Raises PrunelabError for problems other than constants, before changing anything.  Returns ``model``.
    """
    plan = plan_shrink(model, masks, example_input)  # plans with the masked weights; the model is still untouched
    blocking = [p for p, kind in zip(plan.problems, plan.problem_kinds) if kind != "constant"]
    if blocking:
        raise PrunelabError(blocking[0])
    MaskSet(masks).apply_(model)
    for name, cut in plan.cuts.items():
        if cut.rows is None:
            continue
        module = model.get_submodule(name)
        dropped = (~cut.rows).nonzero().flatten()
        for attr in ("bias",) if not isinstance(module, BN_TYPES) else ("weight", "bias"):
            value = getattr(module, attr, None)
            if value is not None:
                value[dropped.to(value.device)] = 0
    return model
