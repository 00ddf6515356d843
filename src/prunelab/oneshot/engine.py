"""The calibration engine: run calibration data through a model block by block and prune
every layer of a block with a layer-wise solver (SparseGPT / Wanda / OBS / ...).

Data-aware one-shot pruning (Frantar & Alistarh 2023, Sun et al. 2023) needs each layer's
inputs ``X`` on calibration data, and those inputs should come from the *already pruned*
earlier layers (so later layers compensate for earlier errors).  Holding every layer's
activations at once would need the memory of a training step; the engine instead keeps
**one block's** inputs:

1. **Blocks** are found by module type, never by architecture name: the longest
   ``nn.ModuleList`` whose children share one class and contain ``nn.Linear`` /
   ``transformers`` ``Conv1D`` / ``nn.Conv2d`` layers (``BertModel.encoder.layer``,
   GPT-2's ``transformer.h``, ...); else, for an ``nn.Sequential``, its top-level children;
   else the whole model is one block.
2. **Catcher**: a forward pre-hook (``with_kwargs=True``) on block 0 records the
   ``(args, kwargs)`` the block receives for each calibration item and raises a private
   exception to stop the forward, so the layers before the first block (embeddings) run
   once per item.  ``transformers`` cache objects in those arguments are replaced by
   ``None`` and ``use_cache`` by ``False`` (re-running a block must not grow a KV cache).
3. **Per block**, one probe forward (item 0) records the execution order of the block's
   prunable layers.  Then, **sequentially inside the block**, for each layer in that order:
   a forward pre-hook on that layer alone accumulates its input statistics (``H = 2 X X^T
   / n`` or ``||X_j||^2``, :mod:`prunelab.oneshot.stats`) over all items -- the forward is
   stopped right after the layer when it is called once per block forward -- the solver
   prunes it, the weights are written back and ``H`` is freed.  A layer therefore sees the
   inputs produced by the already pruned layers before it (SparseGPT's "true sequential"
   variant; its reference default instead prunes all layers of a block from the dense
   block's inputs).
4. **Propagate**: the block runs once more on every item with the pruned weights; hooks
   measure each layer's relative reconstruction error ``||W X - W' X||^2 / ||W X||^2`` on
   exactly the inputs it was pruned on, and the block's outputs replace the hidden states
   (``args[0]`` or ``kwargs["hidden_states"]``) as the next block's inputs, item by item.

With ``dense_targets`` the dense model runs beside the pruned one: a dense copy of the
current block is made before it is pruned, fed the dense model's own block inputs (a
second set of hidden states, propagated through the dense copies), and each layer's
statistics pair its pruned-model inputs ``X~`` with its dense-model inputs ``X`` on the same
tokens (``H~`` and ``C = 2 X~ X^T / n``), so the solver can aim at the dense output ``W X``.

Memory: the model (pruned in place), one block's activations for all calibration items,
one layer's statistics at a time and a dense copy of the current block's weights (for the
error report); with ``dense_targets`` also the dense model's block activations and a dense
copy of the current block.  Every hook is removed in ``finally`` blocks, also when a solver or the
model raises.  Layers outside the blocks (e.g. a pooler, classifier or ``lm_head`` after
the blocks, embeddings before) stay dense; ``exclude`` globs keep more layers dense.
Layers the engine cannot express as ``W X`` stay dense too and are listed in
``OneShotReport.dense_layers``: grouped / non-zero-padded / asymmetric-``'same'``
``Conv2d``, ``Conv1d``, ``Conv3d``.  The model runs in eval mode under ``torch.no_grad``;
its own train/eval flags are restored afterwards.  A block is assumed to be a function of
its inputs only (the next block consumes the previous block's first output).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.allocation import check_sparsity
from prunelab.criteria.base import eval_mode
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.measure.memory import peak_rss_mb
from prunelab.oneshot.stats import (
    ColumnNormAccumulator,
    HessianAccumulator,
    InputStats,
    PairedHessianAccumulator,
    Solution,
    dense_target_weight,
)
from prunelab.structure import NM

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
NEEDS = ("hessian", "norms", "none")


# --- configuration and report ------------------------------------------------------------
@dataclass(frozen=True)
class OneShotConfig:
    """What to prune and how.

    ``method``: a name in :data:`prunelab.oneshot.SOLVERS` (``sparsegpt``, ``wanda``,
    ``magnitude``, ``magnitude-row``, ``obs``, ``lobs``).  ``sparsity``: fraction of each
    layer's weights removed (ignored when ``pattern`` is set).  ``pattern``: ``"N:M"``
    (keep N of every M consecutive input features).  ``dampening``: fraction of
    ``mean(diag H)`` added to ``diag(H)`` (SparseGPT's ``percdamp``).  ``block_size``:
    SparseGPT's column block.  ``exclude``: module-name globs left dense.
    ``bias_correction``: after each layer is pruned, its bias absorbs the change of its mean
    output on the calibration inputs, ``b' = b + (W - W') E[x]`` -- the empirical bias
    correction of Nagel et al. 2019 ("Data-Free Quantization Through Weight Equalization
    and Bias Correction", ICCV, sec. 4.2), applied to pruning error as the bias
    compensation of An et al. 2024 (FLAP, AAAI).  It removes the mean part of the output
    error, ``||(W - W') X||^2 - n ||(W - W') E[x]||^2`` remains; layers without a bias are
    left as they are.
    ``dense_targets``: each layer reconstructs the *dense* model's output from the pruned
    model's inputs, ``min ||W X - W' X~||^2`` (``X`` the layer's inputs in the dense model,
    ``X~`` in the model pruned so far), instead of ``||W X~ - W' X~||^2``: earlier layers'
    errors are then compensated rather than carried along -- the asymmetric calibration of
    Li et al. 2025 (GPTAQ, ICML 2025).  The solver prunes the least-squares weight
    ``V = W C^T H~^{-1}`` (``C = 2 X~ X^T / n``, :func:`prunelab.oneshot.stats.dense_target_weight`)
    on ``H~``, which minimises that objective exactly.  Hessian methods only
    (``sparsegpt``, ``obs``, ``lobs``); it costs a dense copy of the current block, a second set of
    block activations and two forwards per statistic.
    """

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str | None = None
    dampening: float = 0.01
    block_size: int = 128
    exclude: tuple[str, ...] = ()
    bias_correction: bool = False
    dense_targets: bool = False

    def __post_init__(self) -> None:
        from prunelab.oneshot import SOLVERS  # the package registry (import cycle: engine <- __init__)

        SOLVERS.get(self.method)  # unknown names list the valid ones
        if self.pattern is None:
            check_sparsity(self.sparsity)
        elif not isinstance(self.pattern, str) or not _PATTERN.match(self.pattern):
            raise PrunelabError(f"pattern must look like 'N:M' (e.g. '2:4'), got {self.pattern!r}")
        else:
            _ = self.nm  # NM() rejects N >= M
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or not (
            math.isfinite(self.dampening) and self.dampening >= 0
        ):
            raise PrunelabError(f"dampening must be a number >= 0 (a fraction of mean diag(H)), got {self.dampening!r}; e.g. 0.01")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise PrunelabError(f"block_size must be a positive integer, got {self.block_size!r}; e.g. 128")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if not all(isinstance(p, str) for p in exclude):
            raise PrunelabError(f"exclude must be module-name globs (strings), got {self.exclude!r}; e.g. ('lm_head',)")
        object.__setattr__(self, "exclude", exclude)
        if not isinstance(self.bias_correction, bool):
            raise PrunelabError(f"bias_correction must be True or False, got {self.bias_correction!r}")
        if not isinstance(self.dense_targets, bool):
            raise PrunelabError(f"dense_targets must be True or False, got {self.dense_targets!r}")
        if self.dense_targets and SOLVERS.get(self.method).needs != "hessian":
            raise PrunelabError(
                f"dense_targets needs a method that reconstructs from a Hessian, not {self.method!r}; "
                "use method='sparsegpt', 'obs' or 'lobs', or drop dense_targets"
            )

    @property
    def nm(self) -> NM | None:
        """The N:M pattern, or ``None`` for unstructured sparsity."""
        if self.pattern is None:
            return None
        n, m = (int(v) for v in _PATTERN.match(self.pattern).groups())  # type: ignore[union-attr]
        return NM(n, m)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return nm.sparsity if nm is not None else float(self.sparsity)


@dataclass(frozen=True)
class LayerRow:
    """One pruned layer: ``error`` is ``||W X - W' X - c||^2 / ||W X||^2`` on its calibration
    inputs (dense ``W``, pruned ``W'``, biases left out; ``c`` the bias correction, 0 when
    off); ``dampening`` the fraction of
    ``mean(diag H)`` finally used (``None`` for methods without a Hessian).
    ``seconds``: the layer's whole time (statistics-collecting forward passes + solver);
    ``solve_seconds``: the solver alone -- the "time for computing the pruning metric"
    that Sun et al. 2023 (Table 4) compare, without the forward passes every method shares."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    error: float
    dampening: float | None
    seconds: float
    solve_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "sparsity": self.sparsity, "error": self.error,
                "dampening": self.dampening, "seconds": self.seconds, "solve_seconds": self.solve_seconds}


@dataclass
class OneShotReport:
    """What :func:`prune_oneshot` did: one row per pruned layer, timing, memory and masks
    (keyed ``"<module>.weight"``, pruned layers only)."""

    config: OneShotConfig
    rows: list[LayerRow]
    wall_time_s: float
    peak_rss_mb: float
    masks: MaskSet
    dense_layers: tuple[str, ...] = ()
    num_calibration: int = 0

    @property
    def sparsity(self) -> float:
        """Sparsity over the pruned layers."""
        return self.masks.stats().sparsity

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "config": {**dataclasses.asdict(self.config), "exclude": list(self.config.exclude)},
            "num_calibration": self.num_calibration,
            "sparsity": self.sparsity,
            "wall_time_s": self.wall_time_s,
            "peak_rss_mb": self.peak_rss_mb,
            "rows": [row.to_dict() for row in self.rows],
            "dense_layers": list(self.dense_layers),
        }


@dataclass(frozen=True)
class Solver:
    """A registered layer-wise method: ``fn(W (rows, cols), stats, config) -> Solution``,
    the statistics it needs (``'hessian'``, ``'norms'`` or ``'none'``) and an optional
    limit on input columns."""

    fn: Callable[[Tensor, InputStats | None, OneShotConfig], Solution]
    needs: str
    max_in_features: int | None = None

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"Solver.needs must be one of {NEEDS}, got {self.needs!r}")


# --- layers as W X -------------------------------------------------------------------------
def _hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is loaded (never imports it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


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
class _Target:
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

    def inputs2d(self, x: Tensor) -> Tensor:
        """The layer input as rows of ``X^T``: ``(n, cols)``."""
        if self.kind == "conv2d":
            conv = self.module
            batched = x if x.dim() == 4 else x.unsqueeze(0)  # (B, C, H, W)
            cols = F.unfold(batched, conv.kernel_size, conv.dilation, self.padding, conv.stride)  # (B, C*K, L)
            b, _, length = cols.shape
            c = conv.in_channels
            cols = cols.view(b, c, -1, length).permute(0, 3, 2, 1)  # (B, L, K, C)
            return cols.reshape(b * length, -1)  # (B*L, K*C)
        return x.reshape(-1, x.shape[-1])  # (n, in)


def _classify(name: str, module: nn.Module) -> _Target | None | str:
    """A :class:`_Target`, ``'dense'`` for a prunable type we cannot solve, or ``None``."""
    if getattr(module, "weight", None) is None or not isinstance(module.weight, Tensor):
        return None
    if isinstance(module, nn.Linear):
        return _Target(name, module, "linear")
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return _Target(name, module, "conv1d")
    if isinstance(module, nn.Conv2d):
        padding = _conv2d_padding(module)
        return _Target(name, module, "conv2d", padding) if padding is not None else "dense"
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return "dense"
    return None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks the engine walks through, as ``(qualified name, module)`` in order.

    The longest ``nn.ModuleList`` whose children share one class and contain a prunable
    layer; else an ``nn.Sequential``'s top-level children; else ``[("", model)]``.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(_classify("", m), _Target) for child in module for m in child.modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is not None:
        prefix = f"{best[0]}." if best[0] else ""
        return [(f"{prefix}{i}", child) for i, child in enumerate(best[1])]
    if isinstance(model, nn.Sequential) and len(model) > 0:
        return list(model.named_children())
    return [("", model)]


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns)


def _targets(model: nn.Module, blocks: list[tuple[str, nn.Module]], exclude: Sequence[str]
             ) -> tuple[list[list[_Target]], list[str]]:
    """Per block, its prunable layers; and every Linear/Conv name that stays dense."""
    per_block: list[list[_Target]] = []
    inside: set[str] = set()
    dense: list[str] = []
    for block_name, block in blocks:
        found = []
        for local, module in block.named_modules():
            name = ".".join(p for p in (block_name, local) if p)
            kind = _classify(name, module)
            if kind is None:
                continue
            inside.add(name)
            if isinstance(kind, _Target) and not _excluded(name, exclude):
                found.append(kind)
            else:
                dense.append(name)
        per_block.append(found)
    for name, module in model.named_modules():
        if name not in inside and _classify(name, module) is not None:
            dense.append(name)
    return per_block, dense


# --- running blocks --------------------------------------------------------------------------
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


def _check_calibration(calibration: Sequence[Any]) -> list[Tensor | Mapping[str, Any]]:
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
        elif not isinstance(item, Tensor):
            raise PrunelabError(
                f"calibration item {i} is a {type(item).__name__}; expected a Tensor (model(x)) or a dict (model(**x)), "
                "e.g. tokenizer outputs"
            )
    return items


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _capture(model: nn.Module, block0: tuple[str, nn.Module], items: list, device: torch.device) -> Inputs:
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
            try:
                if isinstance(item, Tensor):
                    model(_to(item, device))
                else:
                    model(**{k: _to(v, device) for k, v in item.items()})
            except _Stop:
                pass
            except _USER_ERRORS as exc:
                what = f"Tensor of shape {tuple(item.shape)}" if isinstance(item, Tensor) else f"dict with keys {sorted(item)}"
                raise PrunelabError(
                    f"calibration item {i} ({what}) fails in the model's forward ({_first_line(exc)}); "
                    "pass inputs the model accepts, as for model(x) or model(**x)"
                ) from None
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


def _with_hidden(item: tuple[tuple[Any, ...], dict[str, Any]], hidden: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = item
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _check_hidden_position(block_name: str, inputs: Inputs) -> None:
    args, kwargs = inputs[0]
    if not (args and isinstance(args[0], Tensor)) and not isinstance(kwargs.get("hidden_states"), Tensor):
        raise PrunelabError(
            f"block {block_name or '<model>'!r} receives no tensor as its first positional argument or as "
            "hidden_states=; the engine cannot feed one block's output to the next"
        )


def _probe(block: nn.Module, where: str, targets: list[_Target], item) -> list[tuple[_Target, int]]:
    """The targets in first-call order with their call counts in one block forward."""
    calls: dict[_Target, int] = {}

    def counter(target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            calls[target] = calls.get(target, 0) + 1
        return hook

    with _pre_hooks([(t.module, counter(t)) for t in targets]):
        _run(block, item, where, 0)
    return list(calls.items())


@dataclass
class _Reference:
    """The dense model beside the pruned one (``dense_targets``): a dense copy of the current
    block, the inputs the dense model gives it (one per item) and, per target name, the
    copy's module."""

    block: nn.Module
    inputs: Inputs
    modules: dict[str, nn.Module]

    @classmethod
    def of(cls, block: nn.Module, block_name: str, inputs: Inputs) -> _Reference:
        dense = copy.deepcopy(block)
        modules = {".".join(p for p in (block_name, local) if p): m for local, m in dense.named_modules()}
        return cls(dense, inputs, modules)


def _feed_inputs(block: nn.Module, module: nn.Module, target: _Target, item, where: str, index: int,
                 stop_early: bool, consume: Callable[[Tensor], None]) -> None:
    """One forward of ``block`` on ``item``; ``consume`` gets ``target``'s input rows
    ``(n, cols)`` at each call of ``module``, inside the forward (so a shape error raised
    there is reported as a calibration item that does not fit)."""

    def hook(_: nn.Module, args: tuple) -> None:
        consume(target.inputs2d(args[0]))
        if stop_early:
            raise _Stop

    with _pre_hooks([(module, hook)]):
        _run(block, item, where, index)


def _collect(block: nn.Module, where: str, target: _Target, inputs: Inputs, needs: str, stop_early: bool,
             reference: _Reference | None = None) -> InputStats:
    """Accumulate ``target``'s input statistics over every item (forward cut after it if
    ``stop_early``); with a ``reference``, the pruned inputs paired with the dense ones."""
    cols = target.weight2d().shape[1]
    device = target.module.weight.device
    if reference is not None:
        paired = PairedHessianAccumulator(cols, device)
        dense_module = reference.modules[target.name]
        for i, (item, dense_item) in enumerate(zip(inputs, reference.inputs, strict=True)):
            dense: list[Tensor] = []  # the dense model's rows, one entry per call
            _feed_inputs(reference.block, dense_module, target, dense_item, where, i, stop_early, dense.append)
            _feed_inputs(block, target.module, target, item, where, i, stop_early,
                         lambda rows: paired.add(rows, dense.pop(0)))
        return paired.result()
    acc = HessianAccumulator(cols, device) if needs == "hessian" else ColumnNormAccumulator(cols, device)
    for i, item in enumerate(inputs):
        _feed_inputs(block, target.module, target, item, where, i, stop_early, acc.add)
    return acc.result()


def _propagate(block: nn.Module, where: str, inputs: Inputs, dense: Mapping[_Target, tuple[Tensor, Tensor | None]],
               keep_outputs: bool, reference: _Reference | None = None) -> dict[_Target, float]:
    """Run ``block`` on every item (pruned weights), measure each pruned layer's relative
    reconstruction error and, if ``keep_outputs``, replace the items' hidden states by the
    block's outputs in place.  ``dense``: target -> (dense ``W``, bias correction or None).

    The error is ``||W X - W' X - c||^2 / ||W X||^2`` on the pruned model's inputs; with a
    ``reference`` it is ``||W X - W' X~ - c||^2 / ||W X||^2`` against the dense model's
    outputs (``X`` dense inputs, ``X~`` pruned ones), and the reference's inputs move on too."""
    num = {t: 0.0 for t in dense}
    den = {t: 0.0 for t in dense}
    wanted: dict[_Target, list[Tensor]] = {t: [] for t in dense}  # dense outputs W X per call (reference)

    def measure(target: _Target, W: Tensor, pruned: Tensor, shift: Tensor | None) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = target.inputs2d(args[0]).to(W.dtype)  # (n, cols)
            goal = wanted[target].pop(0) if reference is not None else x @ W.T  # (n, rows) W X
            change = goal - x @ pruned.T if shift is None else goal - x @ pruned.T - shift  # (n, rows)
            num[target] += float(change.double().square().sum())  # ||W X - W' X - c||^2
            den[target] += float(goal.double().square().sum())  # ||W X||^2
        return hook

    def record(target: _Target, W: Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            wanted[target].append(target.inputs2d(args[0]).to(W.dtype) @ W.T)
        return hook

    hooks, dense_hooks = [], []
    for target, (W, shift) in dense.items():
        pruned = target.weight2d().to(W.dtype)
        hooks.append((target.module, measure(target, W, pruned, None if shift is None else shift.to(W.dtype))))
        if reference is not None:
            dense_hooks.append((reference.modules[target.name], record(target, W)))
    with _pre_hooks(hooks), _pre_hooks(dense_hooks):
        for i, item in enumerate(inputs):
            if reference is not None:
                dense_output = _run(reference.block, reference.inputs[i], where, i)
                if keep_outputs:
                    reference.inputs[i] = _with_hidden(reference.inputs[i], _hidden_of(dense_output))
            output = _run(block, item, where, i)
            if keep_outputs:
                inputs[i] = _with_hidden(item, _hidden_of(output))
    return {t: (num[t] / den[t] if den[t] > 0 else (0.0 if num[t] == 0 else math.inf)) for t in dense}


# --- the public entry point ------------------------------------------------------------------
def prune_oneshot(model: nn.Module, calibration: Sequence[Any], config: OneShotConfig, *, progress: bool = True
                  ) -> OneShotReport:
    """Prune ``model`` in place, layer by layer, from calibration data; see the module docs.

    ``calibration``: model inputs, each a Tensor (``model(x)``) or a dict (``model(**x)``).
    Returns a :class:`OneShotReport`; the model holds real zeros, ``report.masks`` the masks.
    """
    from prunelab.oneshot import SOLVERS  # the package registry (import cycle: engine <- __init__)

    started = time.perf_counter()
    if not isinstance(config, OneShotConfig):
        raise PrunelabError(f"config must be a OneShotConfig, got {type(config).__name__}; e.g. OneShotConfig(method='wanda')")
    solver: Solver = SOLVERS.get(config.method)
    items = _check_calibration(calibration)
    blocks = find_blocks(model)
    per_block, dense_layers = _targets(model, blocks, config.exclude)
    if not any(per_block):
        raise PrunelabError(
            "the model has no Linear / Conv1D / Conv2d layers to prune inside its blocks "
            f"(blocks: {', '.join(n or '<model>' for n, _ in blocks[:4])}{'...' if len(blocks) > 4 else ''}); "
            "check exclude or pass a model built from such layers"
        )
    _check_targets([t for ts in per_block for t in ts], config, solver)
    first = next(iter(model.parameters()))
    rows: list[LayerRow] = []
    masks: dict[str, Tensor] = {}
    with eval_mode(model), torch.no_grad():
        inputs = _capture(model, blocks[0], items, first.device)
        _check_hidden_position(blocks[0][0], inputs)
        dense_inputs = list(inputs) if config.dense_targets else None  # the dense model's block inputs
        last = max(i for i, ts in enumerate(per_block) if ts)
        for b, ((block_name, block), targets) in enumerate(zip(blocks, per_block, strict=True)):
            if b > last:  # nothing left to prune: the rest of the model need not run
                break
            reference = None if dense_inputs is None else _Reference.of(block, block_name, dense_inputs)
            solved, uncalled = _prune_block(block, block_name, targets, inputs, solver, config, reference)
            dense_layers += uncalled
            errors = _propagate(block, block_name, inputs, {t: (dense, shift) for t, dense, _, shift, _ in solved},
                                keep_outputs=b < last, reference=reference)
            del reference  # one dense block copy at a time
            for target, _, solution, _, (seconds, solve_seconds) in solved:
                keep = solution.mask  # (rows, cols)
                row = LayerRow(target.name, tuple(target.module.weight.shape), 1.0 - float(keep.sum()) / keep.numel(),
                               errors[target], solution.dampening, seconds, solve_seconds)
                rows.append(row)
                masks[target.param_name] = target.to_param_layout(keep).contiguous()
                if progress:
                    damp = "" if row.dampening is None else f" dampening {row.dampening:g}"
                    print(f"[oneshot {config.method}] {row.name} {row.shape}: sparsity {row.sparsity:.4f} "
                          f"error {row.error:.4g}{damp} ({row.seconds:.2f} s)", file=sys.stderr, flush=True)
    return OneShotReport(config, rows, time.perf_counter() - started, peak_rss_mb(), MaskSet(masks),
                         tuple(dense_layers), len(items))


def _prune_block(block: nn.Module, block_name: str, targets: list[_Target], inputs: Inputs, solver: Solver,
                 config: OneShotConfig, reference: _Reference | None = None
                 ) -> tuple[list[tuple[_Target, Tensor, Solution, Tensor | None, tuple[float, float]]], list[str]]:
    """Prune ``targets`` one after the other in execution order, each from the inputs it
    receives with the earlier ones already pruned (and, with a ``reference``, towards the
    dense model's outputs).  Returns ``(target, dense W, solution, bias correction or None,
    (seconds, solver seconds))`` per pruned layer and the names of targets the block never
    called."""
    if not targets:
        return [], []
    called = _probe(block, block_name, targets, inputs[0])
    uncalled = [t.name for t in targets if t not in dict(called)]
    solved = []
    for target, count in called:
        tick = time.perf_counter()
        stats = None
        correct = config.bias_correction and getattr(target.module, "bias", None) is not None
        if solver.needs != "none" or correct:
            needs = "norms" if solver.needs == "none" else solver.needs
            stats = _collect(block, block_name, target, inputs, needs, stop_early=count == 1, reference=reference)
        mean = stats.mean if correct else None  # (cols,) float64
        dense_mean = stats.dense_mean if correct and reference is not None else mean  # E[x] in the dense model
        W = target.weight2d().clone()  # (rows, cols) dense
        solve_tick = time.perf_counter()
        try:
            goal = W if reference is None else dense_target_weight(W, stats, config.dampening)  # (rows, cols)
            solution = solver.fn(goal, stats, config)
        except PrunelabError as exc:
            raise PrunelabError(f"layer {target.name!r}: {exc}") from None
        solve_seconds = time.perf_counter() - solve_tick
        del stats  # one layer's Hessian at a time
        if not bool(torch.isfinite(solution.weight).all()):
            raise PrunelabError(
                f"layer {target.name!r}: method {config.method!r} produced non-finite weights; "
                "raise dampening or pass more calibration samples"
            )
        target.load2d(solution.weight)
        shift = None if mean is None else _correct_bias_(target, W, solution.weight, mean, dense_mean)
        solved.append((target, W, solution, shift, (time.perf_counter() - tick, solve_seconds)))
    return solved, uncalled


@torch.no_grad()
def _correct_bias_(target: _Target, dense: Tensor, pruned: Tensor, mean: Tensor, dense_mean: Tensor) -> Tensor:
    """``b += W E[x] - W' E[x~]`` (Nagel et al. 2019; ``E[x] = E[x~]`` without dense targets);
    returns the shift ``(rows,)``."""
    shift = dense.to(torch.float64) @ dense_mean - pruned.to(torch.float64) @ mean  # (rows,)
    bias = target.module.bias
    bias.add_(shift.to(device=bias.device, dtype=bias.dtype))
    return shift


def _check_targets(targets: list[_Target], config: OneShotConfig, solver: Solver) -> None:
    """Fail before any forward pass: N:M divisibility and the solver's size limit."""
    nm = config.nm
    for t in targets:
        if nm is not None and t.features % nm.m:
            raise PrunelabError(
                f"N:M block size M={nm.m} does not divide the {t.features} input features of {t.name!r} "
                f"(weight {tuple(t.module.weight.shape)}); exclude that layer (exclude=('{t.name}',)) or pick another M"
            )
        cols = t.weight2d().shape[1]
        if solver.max_in_features is not None and cols > solver.max_in_features:
            raise PrunelabError(
                f"method {config.method!r} handles layers with at most {solver.max_in_features} input features, but "
                f"{t.name!r} has {cols}; use 'lobs' or 'sparsegpt', or exclude that layer"
            )

