"""The prunable layers of a model's blocks, each seen as ``Y = W X``.

Part of the one-shot calibration engine (:mod:`prunelab.oneshot.engine`, whose module docs
describe the whole procedure): :func:`find_blocks` finds the blocks by module type,
:func:`block_targets` the Linear / ``transformers`` Conv1D / Conv2d layers inside them, and
:class:`LayerTarget` maps each layer's weight and inputs to the ``(rows, cols)`` /
``(n, cols)`` matrices the solvers work on.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.errors import PrunelabError


def hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is loaded (never imports it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for a ``transformers.pytorch_utils.Conv1D`` (GPT-2's layers: ``y = x W + b``, ``W`` stored
    ``(in, out)``), found by type; transformers is never imported."""
    conv1d = hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing a Conv1D's map (weight ``W^T``, same bias), with its device, dtype,
    train/eval mode and frozen-ness; an ``nn.Linear`` is returned as it is."""
    if isinstance(module, nn.Linear):
        return module
    in_f, out_f = module.weight.shape
    bias = getattr(module, "bias", None)
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=module.weight.device,
                       dtype=module.weight.dtype).train(module.training)
    with torch.no_grad():
        linear.weight.copy_(module.weight.T)
        linear.weight.requires_grad_(module.weight.requires_grad)
        if bias is not None:
            linear.bias.copy_(bias)
            linear.bias.requires_grad_(bias.requires_grad)
    return linear


def _conv2d_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of ``conv`` as a pair, or ``None`` when unfold cannot express it."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)  # type: ignore[return-value]


@dataclass(eq=False)
class LayerTarget:
    """A prunable layer seen as ``Y = W X``: ``W`` ``(rows, cols)``, ``X`` ``(cols, n)``.

    Linear: ``W`` is the weight.  ``transformers`` Conv1D stores ``(in, out)``: ``W`` is its
    transpose.  Conv2d ``(O, C, kh, kw)``: ``W`` is ``(O, kh*kw*C)`` with columns ordered
    (kernel position, channel) so N:M groups of consecutive columns are consecutive input
    channels at one kernel position (the layout of :class:`prunelab.structure.NM`); ``X``
    is the unfolded input in the same order.
    """

    name: str
    module: nn.Module
    kind: str  # 'linear' | 'conv1d' | 'conv2d'
    padding: tuple[int, int] | None = None

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def features(self) -> int:
        """The input dimension N:M groups run along."""
        weight = self.module.weight
        return weight.shape[0] if self.kind == "conv1d" else weight.shape[1]

    def weight2d(self) -> Tensor:
        weight = self.module.weight.detach()
        if self.kind == "conv1d":
            return weight.T  # (out, in)
        if self.kind == "conv2d":
            return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (O, kh*kw*C)
        return weight  # (out, in)

    def to_param_layout(self, value2d: Tensor) -> Tensor:
        shape = self.module.weight.shape
        if self.kind == "conv1d":
            return value2d.T
        if self.kind == "conv2d":
            o, c, kh, kw = shape
            return value2d.reshape(o, kh, kw, c).permute(0, 3, 1, 2)  # (O, C, kh, kw)
        return value2d

    @torch.no_grad()
    def load2d(self, value2d: Tensor) -> None:
        weight = self.module.weight
        weight.copy_(self.to_param_layout(value2d).to(device=weight.device, dtype=weight.dtype))

    def inputs2d(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        """The layer input as rows of ``X^T``: ``(n, cols)``.

        ``tokens``: optional ``(B, T)`` bool mask of the real (not padding) positions of the
        calibration item; a Linear / Conv1D input ``(B, T, ..., in)`` then keeps only the rows
        of real positions, and so does one flattened to ``(B*T, in)`` (OPT's decoder layer
        reshapes its hidden states before ``fc1``/``fc2``); an input of another leading shape
        keeps all rows."""
        if self.kind == "conv2d":
            conv = self.module
            batched = x if x.dim() == 4 else x.unsqueeze(0)  # (B, C, H, W)
            cols = F.unfold(batched, conv.kernel_size, conv.dilation, self.padding, conv.stride)  # (B, C*K, L)
            b, _, length = cols.shape
            c = conv.in_channels
            cols = cols.view(b, c, -1, length).permute(0, 3, 2, 1)  # (B, L, K, C)
            return cols.reshape(b * length, -1)  # (B*L, K*C)
        return real_rows(x, tokens)


def real_rows(x: Tensor, tokens: Tensor | None) -> Tensor:
    """A Linear's input ``x`` as rows ``(n, in)``, without the padding positions of ``tokens``
    (``(B, T)`` bool, real positions True): ``x`` of shape ``(B, T, ..., in)`` or flattened to
    ``(B*T, in)`` in ``(B, T)`` order; any other leading shape keeps all rows."""
    if tokens is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(tokens.shape):
        x = x[tokens.to(x.device)]  # (n_real, ..., in): padding positions dropped
    elif tokens is not None and x.dim() == 2 and x.shape[0] == tokens.numel():
        x = x[tokens.reshape(-1).to(x.device)]  # (B*T, in) rows in (B, T) order: the real ones
    return x.reshape(-1, x.shape[-1])  # (n, in)


def classify_layer(name: str, module: nn.Module) -> LayerTarget | None | str:
    """A :class:`LayerTarget`, ``'dense'`` for a prunable type we cannot solve, or ``None``."""
    if getattr(module, "weight", None) is None or not isinstance(module.weight, Tensor):
        return None
    if isinstance(module, nn.Linear):
        return LayerTarget(name, module, "linear")
    conv1d = hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LayerTarget(name, module, "conv1d")
    if isinstance(module, nn.Conv2d):
        padding = _conv2d_padding(module)
        return LayerTarget(name, module, "conv2d", padding) if padding is not None else "dense"
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return "dense"
    return None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks the engine walks through, as ``(qualified name, module)`` in order.

    The ``nn.ModuleList`` whose children share one class and hold the most prunable
    layers (ties: the longer list, then the first) -- so a decoder's layer list wins over
    the expert list inside one of its MoE layers, and an outer list of stages over the
    blocks of one stage; else an ``nn.Sequential``'s top-level children; else
    ``[("", model)]``.
    """
    best: tuple[str, nn.ModuleList] | None = None
    best_key = (0, 0)
    for name, module, layers in _block_lists(model):
        if (layers, len(module)) > best_key:
            best, best_key = (name, module), (layers, len(module))
    if best is not None:
        prefix = f"{best[0]}." if best[0] else ""
        return [(f"{prefix}{i}", child) for i, child in enumerate(best[1])]
    if isinstance(model, nn.Sequential) and len(model) > 0:
        # not named_children(): it skips a module object used twice (a shared ReLU), and each use is a step
        return [(name, child) for name, child in model._modules.items() if child is not None]
    return [("", model)]


def _block_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList, int]]:
    """Every non-empty ``nn.ModuleList`` of one child class holding prunable layers, with their count."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(c) for c in module}) != 1:
            continue
        layers = sum(isinstance(classify_layer("", m), LayerTarget) for child in module for m in child.modules())
        if layers:
            yield name, module, layers


def unwalked_block_lists(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, int]]:
    """``(name, prunable layers)`` of each list of blocks beside the one :func:`find_blocks` chose,
    neither inside it nor holding it: an encoder-decoder's encoder stack when the decoder's is
    walked (T5, BART, Whisper), a vision tower beside a language model.  Its layers stay dense."""
    chosen = {id(module) for _, module in blocks}
    walked = next((name for name, module, _ in _block_lists(model) if any(id(c) in chosen for c in module)), None)
    if walked is None:
        return []
    prefix = f"{walked}." if walked else ""
    return [(name, layers) for name, _, layers in _block_lists(model)
            if name != walked and not name.startswith(prefix) and not (name == "" or walked.startswith(f"{name}."))]


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns)


def block_targets(model: nn.Module, blocks: list[tuple[str, nn.Module]], exclude: Sequence[str]
             ) -> tuple[list[list[LayerTarget]], list[str]]:
    """Per block, its prunable layers; and every Linear/Conv name that stays dense.

    A layer object that appears in several blocks (a shared module) is pruned in the first only.
    Weights of 2 or more dimensions inside a block that belong to no Linear/Conv (the fused
    3-D expert tensors and router of ``transformers`` 5 MoE layers, a custom module's own
    ``nn.Parameter``) stay dense and are listed too, as ``module.parameter``.  An ``exclude``
    glob that matches no Linear/Conv layer of the model is a one-line error (a typo would
    otherwise prune what it meant to keep).
    """
    per_block: list[list[LayerTarget]] = []
    inside: set[str] = set()
    dense: list[str] = []
    seen: set[int] = set()
    for block_name, block in blocks:
        found = []
        for local, module in block.named_modules():
            name = ".".join(p for p in (block_name, local) if p)
            kind = classify_layer(name, module)
            if kind is None:
                for pname, param in module.named_parameters(recurse=False):
                    if param.dim() >= 2 and id(param) not in seen:
                        seen.add(id(param))
                        dense.append(f"{name}.{pname}" if name else pname)
                continue
            inside.add(name)
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(kind, LayerTarget) and not _excluded(name, exclude):
                found.append(kind)
            else:
                dense.append(name)
        per_block.append(found)
    layers = []
    for name, module in model.named_modules():
        if classify_layer(name, module) is not None:
            layers.append(name)
            if name not in inside:
                dense.append(name)
    unused = [p for p in exclude if not any(_excluded(name, (p,)) for name in layers)]
    if unused:
        shown = ", ".join(layers[:6]) + (" ..." if len(layers) > 6 else "")
        raise PrunelabError(f"exclude pattern {unused[0]!r} matches no Linear/Conv layer of the model; layers are "
                            f"{shown} (a glob such as 'model.layers.*.mlp.*')")
    return per_block, dense
