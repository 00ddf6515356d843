"""Running calibration data through one block at a time, with hooks that never outlive a call.

Part of the one-shot calibration engine (:mod:`prunelab.oneshot.engine`, whose module docs
describe the whole procedure): capture what block 0 receives, probe the order in which a
block calls its layers, accumulate one layer's input statistics (paired with the dense
model's inputs for dense targets, :class:`Reference`), and propagate the pruned block's
outputs to the next block while measuring each layer's reconstruction error.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.errors import PrunelabError
from prunelab.oneshot.layer_targets import LayerTarget
from prunelab.oneshot.stats import ColumnNormAccumulator, HessianAccumulator, InputStats, PairedHessianAccumulator


class _Stop(Exception):
    """Private: raised from a hook to end a forward pass early (caught by the engine)."""


# what a model raises when handed inputs of the wrong shape / type / keys
_USER_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError)


Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


@contextlib.contextmanager
def _pre_hooks(hooks: Sequence[tuple[nn.Module, Callable]], with_kwargs: bool = False) -> Iterator[None]:
    """Register forward pre-hooks; they are removed on exit, also on error."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(block: nn.Module, item: tuple[tuple[Any, ...], dict[str, Any]], where: str, index: int) -> Any:
    """``block(*args, **kwargs)``; ``None`` when a hook stopped the forward early.  A failure
    on a captured input means the calibration item does not fit the model: PrunelabError."""
    args, kwargs = item
    try:
        return block(*args, **kwargs)
    except _Stop:
        return None
    except _USER_ERRORS as exc:
        raise PrunelabError(
            f"block {where or '<model>'!r} fails on calibration item {index} ({_first_line(exc)}); "
            "pass calibration inputs of the shape and type the model expects"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _strip_caches(value: Any) -> Any:
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache_type = getattr(cache_utils, "Cache", None)
    return None if cache_type is not None and isinstance(value, cache_type) else value


def _first_parameter(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module.forward`` that can be passed by position."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read
        return None
    return next((p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)


def layer_input(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Tensor:
    """The input a layer's forward receives (a forward pre-hook's ``args, kwargs``): its first
    positional argument, else the keyword argument of the forward's first parameter
    (``linear(input=x)``, Conv1D's ``x=``), else the only Tensor passed by keyword."""
    if args:
        return args[0]
    name = _first_parameter(module)
    if name is not None and isinstance(kwargs.get(name), Tensor):
        return kwargs[name]
    tensors = [v for v in kwargs.values() if isinstance(v, Tensor)]
    if len(tensors) == 1:
        return tensors[0]
    raise PrunelabError(
        f"a {type(module).__name__} layer was called without its input (keywords {sorted(kwargs)}); "
        "call it with the input as its first argument"
    )


def check_calibration(calibration: Sequence[Any]) -> list[Tensor | Mapping[str, Any]]:
    if isinstance(calibration, (Tensor, Mapping)):
        raise PrunelabError(
            f"calibration must be a sequence of model inputs, got one {type(calibration).__name__}; "
            "pass a list of batches, e.g. [x] or list(x.split(16))"
        )
    try:
        items = list(calibration)
    except TypeError:
        raise PrunelabError(
            f"calibration must be a sequence of model inputs (Tensors or dicts), got {type(calibration).__name__}"
        ) from None
    if not items:
        raise PrunelabError("calibration is empty; pass at least one model input (a Tensor batch or a tokenizer dict)")
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            if not all(isinstance(k, str) for k in item):
                raise PrunelabError(f"calibration item {i} is a dict with non-string keys; expected keyword inputs such as input_ids")
        elif isinstance(item, (tuple, list)):  # a DataLoader batch: (inputs, labels) would feed labels as an input
            raise PrunelabError(
                f"calibration item {i} is a {type(item).__name__} of {len(item)}; expected a Tensor (model(x)) or a dict "
                "(model(**x)) -- for (inputs, labels) batches pass the inputs alone, e.g. [x for x, _ in loader]"
            )
        elif not isinstance(item, Tensor):
            raise PrunelabError(
                f"calibration item {i} is a {type(item).__name__}; expected a Tensor (model(x)) or a dict (model(**x)), "
                "e.g. tokenizer outputs"
            )
        elif item.numel() == 0:
            raise PrunelabError(
                f"calibration item {i} is an empty Tensor of shape {tuple(item.shape)}; every item needs at least "
                "one sample (drop empty batches)"
            )
    return items


def token_masks(items: Sequence[Any], device: torch.device) -> list[Tensor | None]:
    """Per calibration item, the ``(B, T)`` bool mask of its real (not padding) positions:
    a dict item's 2-D 0/1 ``attention_mask`` (tokenizer outputs), ``None`` when it has none
    (or an additive float mask, which is not read) or every position is real.

    A padded batch runs its padding positions through every layer; their rows carry no
    data, so they are left out of each layer's statistics (``H``, ``||X_j||``, ``E[x]``) and
    of the reported error (:meth:`LayerTarget.inputs2d`)."""
    masks: list[Tensor | None] = []
    for item in items:
        mask = item.get("attention_mask") if isinstance(item, Mapping) else None
        binary = isinstance(mask, Tensor) and mask.dim() == 2 and bool(((mask == 0) | (mask == 1)).all())
        real = mask.to(device) != 0 if binary else None
        masks.append(None if real is None or bool(real.all()) else real)
    return masks


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def run_model(model: nn.Module, item: Any, index: int, device: torch.device, where: str = "") -> None:
    """``model(item)`` or ``model(**item)`` on ``device``, until a hook raises :class:`_Stop`; a
    model that cannot take the item is a PrunelabError naming it (``where`` follows "the model's forward").
    A ``transformers`` cache object in the item runs as a copy: the forward would grow the caller's."""
    try:
        if isinstance(item, Tensor):
            model(_to(item, device))
        else:
            model(**{k: _to(copy.deepcopy(v) if _strip_caches(v) is None and v is not None else v, device)
                     for k, v in item.items()})
    except _Stop:
        pass
    except _USER_ERRORS as exc:
        what = f"Tensor of shape {tuple(item.shape)}" if isinstance(item, Tensor) else f"dict with keys {sorted(item)}"
        raise PrunelabError(
            f"calibration item {index} ({what}) fails in the model's forward{where} ({_first_line(exc)}); "
            "pass inputs the model accepts, as for model(x) or model(**x)"
        ) from None


def capture_block_inputs(model: nn.Module, block0: tuple[str, nn.Module], items: list, device: torch.device) -> Inputs:
    """The ``(args, kwargs)`` block 0 receives for each calibration item (the catcher)."""
    captured: Inputs = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        args = tuple(_strip_caches(a.detach() if isinstance(a, Tensor) else a) for a in args)
        kwargs = {k: (False if k == "use_cache" else _strip_caches(v)) for k, v in kwargs.items()}
        captured.append((args, kwargs))
        raise _Stop

    name, block = block0
    with _pre_hooks([(block, catch)], with_kwargs=True):
        for i, item in enumerate(items):
            before = len(captured)
            run_model(model, item, i, device)
            if len(captured) == before:
                raise PrunelabError(
                    f"calibration item {i} ran through the model without reaching block {name or '<model>'!r}; "
                    "the engine needs every block to be called in the forward"
                )
    return captured


def hidden_states_of(output: Any) -> Tensor | None:
    """The hidden states a block returns: the tensor itself, or the first element of a tuple
    (or of a ``transformers`` output object); ``None`` for anything else."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _hidden_of(output: Any) -> Tensor:
    hidden = hidden_states_of(output)
    if hidden is None:
        raise PrunelabError(f"a block returned {type(output).__name__}; expected a Tensor or a tuple starting with one")
    return hidden


def _hidden_key(block: nn.Module, kwargs: Mapping[str, Any]) -> str | None:
    """The keyword that carries a block's hidden states when none comes by position:
    ``hidden_states`` (transformers), else the name of the forward's first parameter."""
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    name = _first_parameter(block)
    return name if name is not None and isinstance(kwargs.get(name), Tensor) else None


def _with_hidden(block: nn.Module, item: tuple[tuple[Any, ...], dict[str, Any]], hidden: Tensor
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``item`` with its hidden states (first positional argument, or their keyword) replaced."""
    args, kwargs = item
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, _hidden_key(block, kwargs) or "hidden_states": hidden}


def check_hidden_position(block_name: str, block: nn.Module, inputs: Inputs) -> None:
    args, kwargs = inputs[0]
    if not (args and isinstance(args[0], Tensor)) and _hidden_key(block, kwargs) is None:
        raise PrunelabError(
            f"block {block_name or '<model>'!r} receives no tensor as its first positional argument, as "
            "hidden_states= or as its forward's first parameter; the engine cannot feed one block's output to the next"
        )


def probe_call_order(block: nn.Module, where: str, targets: list[LayerTarget], inputs: Inputs
                     ) -> list[tuple[LayerTarget, int]]:
    """The targets in first-call order with their most calls in one block forward.

    One forward on item 0; only if it leaves some target uncalled (conditional computation,
    e.g. an MoE expert no token of item 0 was routed to) do the other items run too, until
    every target has been called -- a later item's new target goes right after the target
    called just before it there.  Targets no item calls are left out."""
    order: list[LayerTarget] = []
    most: dict[LayerTarget, int] = {}
    calls: dict[LayerTarget, int] = {}  # in the current item
    last: list[LayerTarget | None] = [None]  # the target called last in the current item

    def counter(target: LayerTarget) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            calls[target] = calls.get(target, 0) + 1
            if target not in most:
                order.insert(0 if last[0] is None else order.index(last[0]) + 1, target)
                most[target] = 0
            most[target] = max(most[target], calls[target])
            last[0] = target
        return hook

    with _pre_hooks([(t.module, counter(t)) for t in targets]):
        for i, item in enumerate(inputs):
            if i > 0 and len(most) == len(targets):
                break
            calls.clear()
            last[0] = None
            _run(block, item, where, i)
    return [(t, most[t]) for t in order]


def agree_call_order(called: list[tuple[LayerTarget, int]], targets: list[LayerTarget]
                     ) -> list[tuple[LayerTarget, int]]:
    """:func:`probe_call_order`'s answer made the same on every rank (identity at world size 1).

    Where the data decides the order or which layers run (MoE routing), ranks probing their
    own items disagree, and would then sum different layers' statistics or run different
    numbers of collectives.  Every rank takes rank 0's order, then, in block order, the
    targets only other ranks called; a target's call count is its largest on any rank.
    """
    if distributed.world_size() == 1:
        return called
    index = {id(t): i for i, t in enumerate(targets)}
    position = torch.full((len(targets),), -1, dtype=torch.int64)  # first-call position on this rank, -1: never
    counts = torch.zeros(len(targets), dtype=torch.int64)
    for rank, (target, count) in enumerate(called):
        position[index[id(target)]], counts[index[id(target)]] = rank, count
    first = distributed.broadcast_(position.clone())  # rank 0's order
    distributed.all_reduce_max_(counts)
    ordered = sorted((i for i in range(len(targets)) if first[i] >= 0), key=lambda i: int(first[i]))
    ordered += [i for i in range(len(targets)) if first[i] < 0 and counts[i] > 0]  # called elsewhere only
    return [(targets[i], int(counts[i])) for i in ordered]


@dataclass
class Reference:
    """The dense model beside the pruned one (``dense_targets``): a dense copy of the current
    block, the inputs the dense model gives it (one per item) and, per target name, the
    copy's module."""

    block: nn.Module
    inputs: Inputs
    modules: dict[str, nn.Module]

    @classmethod
    def of(cls, block: nn.Module, block_name: str, inputs: Inputs) -> Reference:
        dense = copy.deepcopy(block)
        modules = {".".join(p for p in (block_name, local) if p): m for local, m in dense.named_modules()}
        return cls(dense, inputs, modules)


def _feed_inputs(block: nn.Module, module: nn.Module, target: LayerTarget, item, where: str, index: int,
                 stop_early: bool, consume: Callable[[Tensor], None], tokens: Tensor | None = None) -> None:
    """One forward of ``block`` on ``item``; ``consume`` gets ``target``'s input rows
    ``(n, cols)`` (real positions of ``tokens`` only) at each call of ``module``, inside the
    forward (so a shape error raised there is reported as a calibration item that does not fit)."""

    def hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
        consume(target.inputs2d(layer_input(layer, args, kwargs), tokens))
        if stop_early:
            raise _Stop

    with _pre_hooks([(module, hook)], with_kwargs=True):
        _run(block, item, where, index)


def collect_stats(block: nn.Module, where: str, target: LayerTarget, inputs: Inputs, needs: str, stop_early: bool,
             reference: Reference | None = None, tokens: Sequence[Tensor | None] | None = None) -> InputStats:
    """Accumulate ``target``'s input statistics over every item (forward cut after it if
    ``stop_early``); with a ``reference``, the pruned inputs paired with the dense ones.
    ``tokens``: per item, the real positions (:func:`token_masks`); padding rows are left out.
    Raises PrunelabError when no row reached the layer or a row is not finite."""
    cols = target.weight2d().shape[1]
    device = target.module.weight.device
    real = [None] * len(inputs) if tokens is None else tokens
    if reference is not None:
        paired = PairedHessianAccumulator(cols, device)
        dense_module = reference.modules[target.name]
        for i, (item, dense_item) in enumerate(zip(inputs, reference.inputs, strict=True)):
            dense: list[Tensor] = []  # the dense model's rows, one entry per call
            _feed_inputs(reference.block, dense_module, target, dense_item, where, i, stop_early, dense.append, real[i])
            _feed_inputs(block, target.module, target, item, where, i, stop_early,
                         lambda rows: paired.add(rows, dense.pop(0)), real[i])
        return _checked(paired.result(), target)
    acc = HessianAccumulator(cols, device) if needs == "hessian" else ColumnNormAccumulator(cols, device)
    for i, item in enumerate(inputs):
        _feed_inputs(block, target.module, target, item, where, i, stop_early, acc.add, real[i])
    return _checked(acc.result(), target)


def _checked(stats: InputStats, target: LayerTarget) -> InputStats:
    """``stats`` (summed over ranks, so every rank decides alike), refused when empty or not finite:
    no rows would zero every weight (all inputs "dead"), inf/NaN would give an arbitrary mask."""
    if stats.count == 0:
        raise PrunelabError(
            f"layer {target.name!r} received no input rows from the calibration data (every item empty or all "
            "padding); pass calibration items with at least one real sample or token"
        )
    sums = [t for t in (stats.hessian, stats.sq_norms, stats.cross) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in sums):
        raise PrunelabError(
            f"layer {target.name!r} received non-finite inputs (inf or NaN) on the calibration data; check the "
            "calibration inputs, or run the model in float32 if float16 activations overflow"
        )
    return stats


def propagate(block: nn.Module, where: str, inputs: Inputs, dense: Mapping[LayerTarget, tuple[Tensor, Tensor | None]],
               keep_outputs: bool, reference: Reference | None = None, tokens: Sequence[Tensor | None] | None = None,
               next_calls: Inputs | None = None) -> dict[LayerTarget, float]:
    """Run ``block`` on every item (pruned weights), measure each pruned layer's relative
    reconstruction error and, if ``keep_outputs``, replace the items' hidden states by the
    block's outputs in place.  ``dense``: target -> (dense ``W``, bias correction or None).
    ``next_calls``: per item, the next block's own call (:mod:`prunelab.oneshot.block_calls`)
    whose hidden states the outputs replace; ``None``: this block's call, with its extra
    arguments, is reused.

    The error is ``||W X - W' X - c||^2 / ||W X||^2`` on the pruned model's inputs; with a
    ``reference`` it is ``||W X - W' X~ - c||^2 / ||W X||^2`` against the dense model's
    outputs (``X`` dense inputs, ``X~`` pruned ones), and the reference's inputs move on too.
    Padding rows (``tokens``, :func:`token_masks`) are left out; float16 / bfloat16 layers are
    measured in float32 (in half precision ``W X - W' X`` loses most of its digits)."""
    current: list[Tensor | None] = [None]  # the real positions of the item being run
    num = {t: 0.0 for t in dense}
    den = {t: 0.0 for t in dense}
    wanted: dict[LayerTarget, list[Tensor]] = {t: [] for t in dense}  # dense outputs W X per call (reference)

    def measure(target: LayerTarget, W: Tensor, pruned: Tensor, shift: Tensor | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = target.inputs2d(layer_input(module, args, kwargs), current[0]).to(W.dtype)  # (n, cols)
            goal = wanted[target].pop(0) if reference is not None else x @ W.T  # (n, rows) W X
            change = goal - x @ pruned.T if shift is None else goal - x @ pruned.T - shift  # (n, rows)
            num[target] += float(change.double().square().sum())  # ||W X - W' X - c||^2
            den[target] += float(goal.double().square().sum())  # ||W X||^2
        return hook

    def record(target: LayerTarget, W: Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = target.inputs2d(layer_input(module, args, kwargs), current[0])  # (n, cols)
            wanted[target].append(x.to(W.dtype) @ W.T)
        return hook

    hooks, dense_hooks = [], []
    for target, (W, shift) in dense.items():
        if W.dtype in (torch.float16, torch.bfloat16):
            W = W.float()
        pruned = target.weight2d().to(W.dtype)
        hooks.append((target.module, measure(target, W, pruned, None if shift is None else shift.to(W.dtype))))
        if reference is not None:
            dense_hooks.append((reference.modules[target.name], record(target, W)))
    with _pre_hooks(hooks, with_kwargs=True), _pre_hooks(dense_hooks, with_kwargs=True):
        for i, item in enumerate(inputs):
            current[0] = None if tokens is None else tokens[i]
            following = item if next_calls is None else next_calls[i]  # the call the outputs go into
            if reference is not None:
                dense_output = _run(reference.block, reference.inputs[i], where, i)
                if keep_outputs:
                    base = reference.inputs[i] if next_calls is None else following
                    reference.inputs[i] = _with_hidden(reference.block, base, _hidden_of(dense_output))
            output = _run(block, item, where, i)
            if keep_outputs:
                inputs[i] = _with_hidden(block, following, _hidden_of(output))
    return {t: (num[t] / den[t] if den[t] > 0 else (0.0 if num[t] == 0 else math.inf)) for t in dense}
