"""Layer pruning: score whole residual blocks by how little they change their input, drop them.

The coarsest granularity removes entire blocks of a residual network: the model becomes
really shallower, so it runs faster in proportion, with no sparse kernel.

Score -- :func:`block_influence`, Men et al. 2024 ("ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect", eq. 1): over calibration tokens ``t``,

    BI_i = 1 - E_t [ x_{i,t} . x_{i+1,t} / (||x_{i,t}|| ||x_{i+1,t}||) ]

with ``x_i`` the hidden states entering block ``i`` and ``x_{i+1}`` those leaving it.  A
block whose output points where its input did (BI near 0) adds little.  Tokens are the
positions of every calibration batch; where a batch is a dict with an ``attention_mask``
of the hidden states' ``(batch, length)`` shape, padding positions are left out.  Hidden
states are compared along their last dim (``(B, T, C)`` tokens, ``(B, C)`` vectors); CNN
feature maps ``(B, C, H, W)`` (4-D or more), and ``(B, C, L)`` ones of blocks that hold a
convolution, along the channel dim 1, so each spatial position's channel vector counts as one
token.

Apply -- :func:`drop_blocks` removes the named blocks from their ``nn.ModuleList`` (the
blocks :func:`prunelab.oneshot.find_blocks` finds: BERT's ``encoder.layer``, GPT-2's
``transformer.h``, the char-GPT's ``blocks``) and lowers a ``config.num_hidden_layers`` /
``n_layer`` / ``num_layers`` to match, so a ``transformers`` model saved afterwards
reloads with ``from_pretrained``: per-layer config lists (``layer_types``,
``mlp_layer_types``, ``num_attention_heads_per_layer``, ``no_rope_layers``) lose the
dropped blocks' entries, a list of layer indices (``mlp_only_layers``, the dense layers of
Qwen-MoE models) is renumbered, a ``decoder_sparse_step`` other than 1 is folded into
``mlp_only_layers`` (which layers hold experts is decided by index, and the indices move), and every ``layer_idx`` attribute inside a kept block (the index
a ``transformers`` attention uses into the KV cache) becomes the block's new position.
Blocks of an ``nn.Sequential`` become ``nn.Identity``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.criteria.base import eval_mode
from prunelab.errors import PrunelabError
from prunelab.oneshot.engine import find_blocks, hidden_states_of

__all__ = ["block_influence", "drop_blocks", "lowest_influence"]

_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
# config lists with one entry per layer (transformers validates some against num_hidden_layers)
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "num_attention_heads_per_layer", "no_rope_layers")
_DENSE_LAYER_INDICES = "mlp_only_layers"  # Qwen2/3-MoE: indices of layers with a dense MLP instead of experts


def _hidden_in(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, Tensor) else None


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = find_blocks(model)
    if len(blocks) < 2:
        raise PrunelabError(
            f"{type(model).__name__} has no repeated blocks to drop (no nn.ModuleList of one block class with "
            "Linear layers, nor an nn.Sequential); layer pruning needs a stack of residual blocks"
        )
    return blocks


@torch.no_grad()
def block_influence(model: nn.Module, calibration: Sequence[Tensor | Mapping[str, Any]]) -> dict[str, float]:
    """Block name -> ShortGPT block influence ``BI`` (higher = more important), in block order.

    ``calibration``: model inputs, each a Tensor (``model(x)``) or a dict (``model(**x)``).
    The model runs in eval mode; every module's own train/eval flag and its hooks are restored afterwards.
    """
    blocks = _blocks(model)
    items = list(calibration)
    if not items:
        raise PrunelabError("block_influence got no calibration inputs; pass a list of batches, e.g. [x]")
    for i, item in enumerate(items):
        if not isinstance(item, (Tensor, Mapping)):
            raise PrunelabError(
                f"calibration item {i} is a {type(item).__name__}; expected model inputs (a Tensor, or a dict "
                "of keyword inputs) -- drop the targets, e.g. [x for x, _ in loader]"
            )
    sums = {name: 0.0 for name, _ in blocks}
    counts = {name: 0 for name, _ in blocks}
    state: dict[str, Any] = {}
    # a block object used at several positions (shared weights) is hooked once; its i-th call
    # in a forward pass is its i-th position, so each position gets its own score
    positions: dict[int, list[str]] = {}
    for name, block in blocks:
        positions.setdefault(id(block), []).append(name)
    calls: dict[int, int] = {}
    running: dict[int, list[str]] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = positions[id(module)]
        index = calls.get(id(module), 0)
        calls[id(module)] = index + 1
        name = names[index % len(names)]
        running.setdefault(id(module), []).append(name)
        hidden = _hidden_in(args, kwargs)
        # a copy: a block that adds in place (x += f(x); return x) would otherwise compare its output with itself
        state[name] = hidden.clone() if hidden is not None else None

    convolutional = {id(block) for _, block in blocks  # a 3-D input of a conv block is (B, C, L), not (B, T, C)
                     if any(isinstance(m, nn.modules.conv._ConvNd) for m in block.modules())}

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = running[id(module)].pop()
        before, after = state.pop(name, None), hidden_states_of(output)
        if before is None or after is None or before.shape != after.shape:
            raise PrunelabError(f"block {name!r} does not map hidden states to hidden states of the same shape; "
                                "layer pruning needs residual blocks")
        # (B, C, H, W) feature maps, and (B, C, L) ones of a block with convolutions: per-position channel vectors
        channel_dim = 1 if before.dim() >= 4 or (before.dim() == 3 and id(module) in convolutional) else -1
        cosine = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=channel_dim)  # (B, T) / (B,) / (B, H, W)
        keep = state.get("mask")
        if keep is not None and keep.shape == cosine.shape:
            cosine = cosine[keep]
        sums[name] += float(cosine.sum())
        counts[name] += cosine.numel()

    handles = []
    try:
        for name, block in blocks:
            if positions[id(block)][0] != name:
                continue  # a shared block: hooked at its first position only
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
        first = next(model.parameters(), None)  # blocks without weights (a Sequential of ReLUs) run on the CPU
        device = first.device if first is not None else torch.device("cpu")
        with eval_mode(model):  # restores every module's own train/eval flag
            for item in items:
                calls.clear()  # positions of shared blocks count from the start of each forward pass
                if isinstance(item, Mapping):
                    mask = item.get("attention_mask")
                    state["mask"] = mask.to(device).bool() if isinstance(mask, Tensor) else None
                    model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in item.items()})
                else:
                    state["mask"] = None
                    model(item.to(device))
    finally:
        for handle in handles:
            handle.remove()
    # under torch.distributed every rank drops the same blocks: sums and token counts over all ranks
    # (blocks in model order, the same on every rank); world size 1: unchanged
    names = list(sums)
    totals = distributed.all_reduce_sum_(torch.tensor([sums[n] for n in names], dtype=torch.float64))
    tokens = distributed.all_reduce_sum_(torch.tensor([counts[n] for n in names], dtype=torch.int64))
    sums, counts = dict(zip(names, totals.tolist())), dict(zip(names, tokens.tolist()))
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise PrunelabError(f"blocks {missing} never ran on the calibration inputs; every block must be called")
    return {name: 1.0 - sums[name] / counts[name] for name, _ in blocks}


def _score_value(name: str, value: Any) -> float:
    """``value`` as a float; a NaN (it breaks the sort order) or a non-number is a PrunelabError."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise PrunelabError(f"scores[{name!r}] is {value!r}; expected a number (not NaN) -- check the calibration "
                            "inputs and dtype that block_influence ran on")
    return float(value)


def lowest_influence(scores: Mapping[str, float], count: int) -> list[str]:
    """The ``count`` block names with the lowest scores (ties: earlier block first)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < len(scores):
        raise PrunelabError(f"count must be an integer in [0, {len(scores)}) (keep at least one block), got {count!r}")
    names, values = list(scores), [_score_value(name, value) for name, value in scores.items()]
    order = sorted(range(len(names)), key=lambda i: (values[i], i))
    return [names[i] for i in sorted(order[:count])]


def drop_blocks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Remove the blocks ``names`` from ``model`` in place (see the module docs); returns ``model``.

    ``names``: block names (:func:`lowest_influence`); a bare string is one name, not its characters.
    """
    names = [names] if isinstance(names, str) else list(names)  # once: a generator was consumed by the first check
    blocks = _blocks(model)
    known = [name for name, _ in blocks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PrunelabError(f"unknown blocks {unknown}; the model's blocks are {known}")
    if len(set(names)) >= len(known):
        raise PrunelabError(f"dropping {len(set(names))} of {len(known)} blocks leaves none; keep at least one")
    if not names:
        return model
    # not named_children(): it skips a module object used twice, as find_blocks does not
    if isinstance(model, nn.Sequential) and known == [n for n, c in model._modules.items() if c is not None]:
        for name in names:
            model._modules[name] = nn.Identity()
        return model
    list_name = known[0].rpartition(".")[0]
    if not list_name:
        raise PrunelabError("the model itself is the block list; wrap it in a module to drop blocks from it")
    owner_name, _, attr = list_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    dropped = set(names)
    kept = nn.ModuleList(block for name, block in blocks if name not in dropped)
    setattr(owner, attr, kept)
    for position, block in enumerate(kept):  # transformers attention indexes its KV-cache layer with it
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    _set_layer_count_(model, [i for i, name in enumerate(known) if name not in dropped], len(known))
    return model


def _set_layer_count_(model: nn.Module, kept: list[int], old_count: int) -> None:
    """Keep the layers ``kept`` (old indices) in ``model.config`` (a transformers config or a
    dataclass): its layer counts become ``len(kept)``, and every per-layer list
    (:data:`_PER_LAYER_LISTS`) of ``old_count`` entries keeps only the entries ``kept``."""
    config = getattr(model, "config", None)
    updates: dict[str, Any] = {f: len(kept) for f in _LAYER_COUNTS if isinstance(getattr(config, f, None), int)}
    if not updates:
        return
    for field in _PER_LAYER_LISTS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            updates[field] = type(values)(values[i] for i in kept)
    updates.update(_dense_layer_indices(config, kept))
    if dataclasses.is_dataclass(config) and getattr(type(config), "__dataclass_params__").frozen:
        model.config = dataclasses.replace(config, **updates)
    else:
        for field, value in updates.items():
            setattr(config, field, value)


def _dense_layer_indices(config: Any, kept: list[int]) -> dict[str, Any]:
    """Config updates that keep each kept layer's MLP kind when layer indices move.

    Qwen-MoE builds layer ``i`` with experts iff ``i not in mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0``; both are index rules, so after a drop they
    are rewritten as one explicit list of the new indices of dense layers (step 1)."""
    dense = getattr(config, _DENSE_LAYER_INDICES, None)
    if not isinstance(dense, (list, tuple)) or not all(isinstance(i, int) for i in dense):
        return {}
    step = getattr(config, "decoder_sparse_step", 1)
    step = step if isinstance(step, int) and step > 0 else 1
    new_dense = [new for new, old in enumerate(kept) if old in dense or (old + 1) % step != 0]
    updates: dict[str, Any] = {_DENSE_LAYER_INDICES: type(dense)(new_dense)}
    if step != 1:
        updates["decoder_sparse_step"] = 1
    return updates
