"""What every block after the first receives besides its hidden states.

The calibration engine (:mod:`prunelab.oneshot.engine`) feeds block ``b + 1`` the pruned
outputs of block ``b``; the other arguments of the call (attention mask, position ids or
embeddings, flags) are those the model itself passes.  Most models pass every block the
same ones, and block 0's serve for all.  Some pass per-layer arguments: Gemma 2/3, Qwen2
with sliding windows, GPT-OSS and other ``transformers`` decoders build one causal mask per
attention type and give layer ``i`` the mask of ``config.layer_types[i]``.  Reusing block
0's there would calibrate every full-attention layer with a sliding-window mask (or the
reverse) and prune it from the wrong statistics, silently.

So the engine runs one calibration item through the whole dense model with a pre-hook on
every block and compares each block's extra arguments with block 0's: tensors by identity
(the same mask object handed to every layer), other values by equality.  When they all
match, block 0's arguments are reused (one extra forward on one item); otherwise every
item runs through the dense model once more and each block's own arguments are kept, with
the hidden states replaced by an empty placeholder, so only one block's activations are
ever held.

Before that, :func:`irregular_block_calls` checks on item 0 that the model calls every block
exactly once and in list order -- the premise of feeding block ``b``'s outputs to block ``b + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.oneshot.block_runs import Inputs, _hidden_key, _pre_hooks, _Stop, _strip_caches, run_model

Call = tuple[tuple[Any, ...], dict[str, Any]]


def _without_hidden(block: nn.Module, args: tuple, kwargs: dict) -> Call:
    """``(args, kwargs)`` of one block call, caches dropped, ``use_cache`` off, and the hidden
    states (first positional tensor, or their keyword) replaced by an empty tensor: the
    placeholder :func:`prunelab.oneshot.block_runs._with_hidden` overwrites.  The other
    tensors are kept as the very objects passed (the engine runs under ``no_grad``), so
    :func:`_same` can tell one mask handed to every block from one per block."""
    placeholder = torch.empty(0)
    args = tuple(_strip_caches(a) for a in args)
    kwargs = {k: (False if k == "use_cache" else _strip_caches(v)) for k, v in kwargs.items()}
    if args and isinstance(args[0], Tensor):
        return (placeholder, *args[1:]), kwargs
    key = _hidden_key(block, kwargs)
    return args, ({**kwargs, key: placeholder} if key is not None else kwargs)


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are the same: tensors by identity (an equal copy may differ
    on a longer item, e.g. a sliding-window mask on a short sequence), containers element-wise,
    anything else by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- an object without a usable ==: compare by identity
        return a is b


def _same_call(a: Call, b: Call) -> bool:
    # the placeholders differ by identity and stand for the hidden states: skip them
    (args_a, kw_a), (args_b, kw_b) = a, b
    if len(args_a) != len(args_b) or kw_a.keys() != kw_b.keys():
        return False
    pairs = [(x, y) for x, y in zip(args_a, args_b) if not (_is_placeholder(x) and _is_placeholder(y))]
    pairs += [(kw_a[k], kw_b[k]) for k in kw_a if not (_is_placeholder(kw_a[k]) and _is_placeholder(kw_b[k]))]
    return all(_same(x, y) for x, y in pairs)


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, Tensor) and value.numel() == 0 and value.dim() == 1


def _record_calls(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], item: Any, index: int,
                  device: torch.device) -> list[Call | None]:
    """Each block's first call on ``item`` (hidden states replaced), ``None`` for a block the
    forward never reached; the forward stops at the last block."""
    calls: list[Call | None] = [None] * len(blocks)

    def recorder(b: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if calls[b] is None:
                calls[b] = _without_hidden(module, args, kwargs)
            if b == len(blocks) - 1:
                raise _Stop
        return hook

    with _pre_hooks([(block, recorder(b)) for b, (_, block) in enumerate(blocks)], with_kwargs=True):
        run_model(model, item, index, device)  # block 0 itself may fail here: the catcher stopped before it
    return calls


def irregular_block_calls(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], item: Any,
                          device: torch.device) -> str | None:
    """Why chaining ``blocks`` (block ``b``'s output is block ``b + 1``'s input) would misread the
    model, or ``None`` when one dense forward on ``item`` calls every block exactly once, in order.

    A block run several times per forward (ALBERT's one shared layer group, a weight-tied loop)
    would be calibrated on its first call only, and a block skipped or run out of order would be
    fed another block's outputs; the engine then walks the whole model as one block instead.

    The forward stops at the first module outside the blocks (not inside one, not holding one)
    that runs once as many block calls as there are blocks were seen: a decoder's final norm,
    so the ``lm_head`` logits ``(B, T, vocab)`` are never computed."""
    if len(blocks) == 1 and blocks[0][1] is model:
        return None
    seen: list[int] = []  # id of each block module called, in call order
    modules = {id(block): block for _, block in blocks}  # a module listed twice is hooked once

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(id(module))

    def stop(module: nn.Module, args: tuple) -> None:
        if len(seen) >= len(blocks):
            raise _Stop

    with _pre_hooks([(module, hook) for module in modules.values()] + [(m, stop) for m in _outside(model, blocks)]):
        run_model(model, item, 0, device)
    expected = [id(block) for _, block in blocks]
    if seen == expected or not seen:  # no block reached: the catcher names the item that does not reach block 0
        return None
    names = {id(block): name for name, block in reversed(blocks)}
    counts = [(names[key], seen.count(key), expected.count(key)) for key in dict.fromkeys(expected)]
    odd = next(((name, got, want) for name, got, want in counts if got != want), None)
    if odd is not None:
        name, got, want = odd
        return f"block {name!r} runs {got} time(s) in one forward of calibration item 0, not {want}"
    return f"the blocks run in the order {', '.join(repr(names[key]) for key in seen)}, not in list order"


def _outside(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The modules of ``model`` neither inside a block nor holding one (embeddings, final norm, heads)."""
    names = [name for name, _ in blocks]
    inside = {id(m) for _, block in blocks for m in block.modules()}

    def holds_a_block(name: str) -> bool:
        return name == "" or any(b.startswith(f"{name}.") for b in names)

    return [m for name, m in model.named_modules() if id(m) not in inside and not holds_a_block(name)]


def later_block_calls(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], items: list,
                      first_inputs: Inputs, device: torch.device) -> list[Inputs] | None:
    """Per block ``1 .. len(blocks) - 1``, per item, the ``(args, kwargs)`` that block receives
    (hidden states as a placeholder); ``None`` when every block receives block 0's extra
    arguments on item 0, so ``first_inputs`` (block 0's calls) serve for all.  A block an
    item's forward does not reach keeps block 0's call for that item.  Runs under the
    caller's ``no_grad`` / eval mode."""
    if len(blocks) < 2:
        return None
    probe = _record_calls(model, blocks, items[0], 0, device)
    if probe[0] is None or all(c is None or _same_call(c, probe[0]) for c in probe[1:]):
        return None
    per_item = [probe] + [_record_calls(model, blocks, item, i, device) for i, item in enumerate(items[1:], 1)]
    return [[calls[b] if calls[b] is not None else first_inputs[i] for i, calls in enumerate(per_item)]
            for b in range(1, len(blocks))]
