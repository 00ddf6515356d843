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
   else the whole model is one block.  One dense forward of item 0 (stopped at the first module
   after the blocks) checks that the model calls every block once, in list order; when it does
   not (ALBERT's one shared layer group, a skipped, repeated or reordered block) the same layers
   are pruned with the whole model walked as one block, so each sees all its calls (one forward
   per layer; with ``dense_targets`` a dense copy of the whole model), and a warning says so (:func:`prunelab.oneshot.block_calls.irregular_block_calls`).  A second list
   of blocks beside the walked one (an encoder-decoder's encoder) stays dense, with a warning.
2. **Catcher**: a forward pre-hook (``with_kwargs=True``) on block 0 records the
   ``(args, kwargs)`` the block receives for each calibration item and raises a private
   exception to stop the forward, so the layers before the first block (embeddings) run
   once per item.  ``transformers`` cache objects in those arguments are replaced by
   ``None`` and ``use_cache`` by ``False`` (re-running a block must not grow a KV cache).
   Later blocks receive block 0's extra arguments (mask, positions) unless item 0's full
   dense forward shows a block receiving its own, e.g. Gemma 2's per-layer sliding-window
   or full causal masks; then each block's own calls are recorded per item
   (:mod:`prunelab.oneshot.block_calls`).
3. **Per block**, one probe forward (item 0; more items only while some layer is still
   uncalled, e.g. an MoE expert item 0 does not route to) records the execution order of the
   block's prunable layers.  Then, **sequentially inside the block**, for each layer in that order:
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
   (``args[0]``, else ``kwargs["hidden_states"]`` or the keyword named like the block forward's
   first parameter) as the next block's inputs, item by item.  A layer's input is likewise its
   first positional argument or that keyword (``linear(input=x)``).

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
Padding: for a dict item with a 2-D ``attention_mask`` ``(B, T)`` (tokenizer outputs), only
the rows of real positions of a Linear / Conv1D input ``(B, T, ...)`` enter the statistics
and the reported error -- padding tokens carry no data but would otherwise weigh as much as
real ones.  A layer that receives no row, or an inf/NaN row, is a PrunelabError (no weight is
written).
Layers the engine cannot express as ``W X`` stay dense too and are listed in
``OneShotReport.dense_layers``: grouped / non-zero-padded / asymmetric-``'same'``
``Conv2d``, ``Conv1d``, ``Conv3d``.  The model runs in eval mode under ``torch.no_grad``;
its own train/eval flags are restored afterwards.  A block is assumed to be a function of
its inputs only (the next block consumes the previous block's first output).

Code layout: :mod:`prunelab.oneshot.layer_targets` finds the blocks and their layers as
``W X``; :mod:`prunelab.oneshot.block_runs` runs calibration items through a block (capture,
probe, statistics, propagation) and :mod:`prunelab.oneshot.block_calls` records what later
blocks receive besides their hidden states; this module holds the configuration, the report and the
loop that ties them to the solvers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.allocation import check_sparsity
from prunelab.criteria.base import eval_mode
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.measure.memory import peak_rss_mb
from prunelab.oneshot.block_runs import (
    Inputs,
    Reference,
    agree_call_order,
    capture_block_inputs,
    check_calibration,
    check_hidden_position,
    collect_stats,
    hidden_states_of,
    probe_call_order,
    propagate,
    token_masks,
)
from prunelab.oneshot.block_calls import irregular_block_calls, later_block_calls
from prunelab.oneshot.layer_targets import LayerTarget, block_targets, find_blocks, unwalked_block_lists
from prunelab.oneshot.stats import InputStats, Solution, dense_target_weight
from prunelab.structure import NM

__all__ = ["LayerRow", "OneShotConfig", "OneShotReport", "Solver", "eval_mode", "find_blocks", "hidden_states_of",
           "prune_oneshot"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
DEFAULT_SPARSITY = 0.5  # OneShotConfig's sparsity when neither sparsity nor pattern is given
NEEDS = ("hessian", "norms", "none")


# --- configuration and report ------------------------------------------------------------
@dataclass(frozen=True)
class OneShotConfig:
    """What to prune and how.

    ``method``: a name in :data:`prunelab.oneshot.SOLVERS` (``sparsegpt``, ``wanda``,
    ``magnitude``, ``magnitude-row``, ``obs``, ``lobs``).  ``sparsity``: fraction of each
    layer's weights removed; ``None`` (the default) means 0.5 without a pattern.
    ``pattern``: ``"N:M"`` (keep N of every M consecutive input features); it fixes the
    sparsity at ``1 - N/M``, so ``sparsity`` may then be left out (it is set to
    ``1 - N/M``, what the report records) or must equal ``1 - N/M`` -- any other value is
    refused, as the CLI refuses ``--sparsity`` with ``--pattern``.  ``dampening``: fraction of
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
    sparsity: float | None = None  # resolved in __post_init__: DEFAULT_SPARSITY, or 1 - N/M with a pattern
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
            sparsity = DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
            check_sparsity(sparsity)
        elif not isinstance(self.pattern, str) or not _PATTERN.match(self.pattern):
            raise PrunelabError(f"pattern must look like 'N:M' (e.g. '2:4'), got {self.pattern!r}")
        else:
            sparsity = self.nm.sparsity  # NM() rejects N >= M; the pattern removes 1 - N/M of every layer
            given = self.sparsity
            if given is not None and (isinstance(given, bool) or not isinstance(given, (int, float))
                                      or not math.isclose(given, sparsity, rel_tol=0.0, abs_tol=1e-9)):
                raise PrunelabError(
                    f"sparsity {given!r} conflicts with pattern {self.pattern!r}, which removes 1 - N/M = {sparsity:g} "
                    f"of every layer; leave sparsity out (or pass sparsity={sparsity:g}) with an N:M pattern"
                )
        object.__setattr__(self, "sparsity", sparsity)
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or not (
            math.isfinite(self.dampening) and self.dampening >= 0
        ):
            raise PrunelabError(f"dampening must be a number >= 0 (a fraction of mean diag(H)), got {self.dampening!r}; e.g. 0.01")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise PrunelabError(f"block_size must be a positive integer, got {self.block_size!r}; e.g. 128")
        if self.exclude is None:
            exclude: tuple = ()
        elif isinstance(self.exclude, str):
            exclude = (self.exclude,)
        elif isinstance(self.exclude, Iterable):
            exclude = tuple(self.exclude)
        else:
            exclude = (self.exclude,)  # refused just below
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
    off) -- with ``dense_targets``, ``||W X - W' X~ - c||^2 / ||W X||^2`` against the dense
    model's inputs ``X`` (so it includes the drift of earlier layers); ``dampening`` the
    fraction of ``mean(diag H)`` finally used (``None`` for methods without a Hessian).
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


# --- the public entry point ------------------------------------------------------------------
def prune_oneshot(model: nn.Module, calibration: Sequence[Any], config: OneShotConfig, *, progress: bool = True
                  ) -> OneShotReport:
    """Prune ``model`` in place, layer by layer, from calibration data; see the module docs.

    ``calibration``: model inputs, each a Tensor (``model(x)``) or a dict (``model(**x)``).
    Returns a :class:`OneShotReport`; the model holds real zeros, ``report.masks`` the masks.
    Layers are written as they are pruned (there is no second model copy to roll back to): an
    error raised after the first one is written says that the model is left partially pruned
    and up to which layer (a PrunelabError keeps one line; any other exception gets a note).
    """
    from prunelab.oneshot import SOLVERS  # the package registry (import cycle: engine <- __init__)

    started = time.perf_counter()
    if not isinstance(config, OneShotConfig):
        raise PrunelabError(f"config must be a OneShotConfig, got {type(config).__name__}; e.g. OneShotConfig(method='wanda')")
    solver: Solver = SOLVERS.get(config.method)
    items = check_calibration(calibration)
    blocks = find_blocks(model)
    first = next(iter(model.parameters()), None)
    device = torch.device("cpu") if first is None else first.device  # where the items are moved
    per_block, dense_layers = block_targets(model, blocks, config.exclude)
    if not any(per_block):
        raise PrunelabError(
            "the model has no Linear / Conv1D / Conv2d layers to prune inside its blocks "
            f"(blocks: {', '.join(n or '<model>' for n, _ in blocks[:4])}{'...' if len(blocks) > 4 else ''}); "
            "check exclude or pass a model built from such layers"
        )
    _check_targets([t for ts in per_block for t in ts], config, solver)
    _warn_unwalked(model, blocks)
    with eval_mode(model), torch.no_grad():
        irregular = irregular_block_calls(model, blocks, items[0], device)
    seen_on = distributed.first_rank_where(irregular is not None)  # every rank walks the model alike
    if seen_on is not None:  # the same layers (the rest stays dense), each from all its calls in the model
        irregular = irregular or f"rank {seen_on}'s calibration item 0 does not call every block once, in list order"
        warnings.warn(f"prune_oneshot: {irregular}; the whole model is walked as one block instead (statistics from "
                      "every call; one forward per layer, slower)", UserWarning, stacklevel=2)
        blocks, per_block = [("", model)], [[t for ts in per_block for t in ts]]
    rows: list[LayerRow] = []
    masks: dict[str, Tensor] = {}
    written: list[str] = []  # the layers whose pruned weights are in the model so far
    try:
        _walk(model, items, blocks, per_block, solver, config, device, rows, masks, dense_layers, written, progress)
    except PrunelabError as exc:
        if not written:
            raise
        raise PrunelabError(f"{exc}; {_partial_note(written, per_block)}") from None
    except BaseException as exc:  # a bug or an interrupt: keep its type and traceback, say what it left
        if written and hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(_partial_note(written, per_block))
        raise
    if progress and dense_layers:
        shown = ", ".join(dense_layers[:6]) + (f", ... ({len(dense_layers)} in all)" if len(dense_layers) > 6 else "")
        print(f"[oneshot {config.method}] left dense (outside the blocks, excluded or never called): {shown}",
              file=sys.stderr, flush=True)
    return OneShotReport(config, rows, time.perf_counter() - started, peak_rss_mb(), MaskSet(masks),
                         tuple(dense_layers), len(items))


def _warn_unwalked(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    """Warn when a second stack of blocks stays dense (an encoder-decoder's encoder): the engine
    walks one list of blocks, and the report's sparsity counts pruned layers only."""
    others = unwalked_block_lists(model, blocks)
    if others:
        walked = blocks[0][0].rpartition(".")[0]
        stacks = ", ".join(f"{name!r} ({layers})" for name, layers in others)
        warnings.warn(f"prune_oneshot walks the blocks of {walked!r} only; the Linear/Conv layers of {stacks} stay "
                      "dense (listed in report.dense_layers); to prune them too, call prune_oneshot on that part of "
                      "the model on its own (e.g. model.encoder)",
                      UserWarning, stacklevel=3)


def _partial_note(written: list[str], per_block: list[list[LayerTarget]]) -> str:
    """What an error after the first written layer leaves: the model is pruned in place, block by block."""
    total = sum(len(ts) for ts in per_block)
    return (f"the model is left partially pruned ({len(written)} of {total} layers, up to {written[-1]!r}, hold "
            "pruned weights); reload it before pruning again")


def _walk(model: nn.Module, items: list, blocks: list[tuple[str, nn.Module]], per_block: list[list[LayerTarget]],
          solver: Solver, config: OneShotConfig, device: torch.device, rows: list[LayerRow], masks: dict[str, Tensor],
          dense_layers: list[str], written: list[str], progress: bool) -> None:
    """The block loop of :func:`prune_oneshot`: fills ``rows``, ``masks``, ``dense_layers`` and ``written``
    (the name of each layer as soon as its pruned weight is in the model)."""
    with eval_mode(model), torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], items, device)
        tokens = token_masks(items, device)  # per item: real (not padding) positions, or None
        check_hidden_position(*blocks[0], inputs)
        last = max(i for i, ts in enumerate(per_block) if ts)
        later = later_block_calls(model, blocks[: last + 1], items, inputs, device)  # per-layer masks?
        dense_inputs = list(inputs) if config.dense_targets else None  # the dense model's block inputs
        for b, ((block_name, block), targets) in enumerate(zip(blocks, per_block, strict=True)):
            if b > last:  # nothing left to prune: the rest of the model need not run
                break
            reference = None if dense_inputs is None else Reference.of(block, block_name, dense_inputs)
            solved, uncalled = _prune_block(block, block_name, targets, inputs, solver, config, reference, tokens,
                                            written)
            dense_layers += uncalled
            errors = propagate(block, block_name, inputs, {e.target: (e.dense, e.shift) for e in solved},
                                keep_outputs=b < last, reference=reference, tokens=tokens,
                                next_calls=None if later is None or b == last else later[b])
            del reference  # one dense block copy at a time
            block_rows = _record(solved, errors, masks)
            del solved  # the block's dense weight copies go before the next block is pruned
            rows += block_rows
            for row in block_rows:
                if progress:
                    damp = "" if row.dampening is None else f" dampening {row.dampening:g}"
                    print(f"[oneshot {config.method}] {row.name} {row.shape}: sparsity {row.sparsity:.4f} "
                          f"error {row.error:.4g}{damp} ({row.seconds:.2f} s)", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Solved:
    """What the engine keeps of one pruned layer until its block is done: the dense ``W``
    ``(rows, cols)`` (for the error report), the keep-mask ``(rows, cols)``, the bias shift
    ``(rows,)`` or ``None``, the dampening used and the timings -- not the solver's weight,
    which lives only in the layer once written (one copy of the block's pruned weights)."""

    target: LayerTarget
    dense: Tensor
    mask: Tensor
    shift: Tensor | None
    dampening: float | None
    seconds: float
    solve_seconds: float


def _record(solved: list[_Solved], errors: dict[LayerTarget, float], masks: dict[str, Tensor]) -> list[LayerRow]:
    """One :class:`LayerRow` per pruned layer of a block; its mask goes into ``masks`` in the
    parameter's layout (keyed ``"<module>.weight"``)."""
    rows = []
    for entry in solved:
        keep, target = entry.mask, entry.target  # (rows, cols)
        rows.append(LayerRow(target.name, tuple(target.module.weight.shape), 1.0 - float(keep.sum()) / keep.numel(),
                             errors[target], entry.dampening, entry.seconds, entry.solve_seconds))
        masks[target.param_name] = target.to_param_layout(keep).contiguous()
    return rows


def _prune_block(block: nn.Module, block_name: str, targets: list[LayerTarget], inputs: Inputs, solver: Solver,
                 config: OneShotConfig, reference: Reference | None = None,
                 tokens: Sequence[Tensor | None] | None = None, written: list[str] | None = None
                 ) -> tuple[list[_Solved], list[str]]:
    """Prune ``targets`` one after the other in execution order, each from the inputs it
    receives with the earlier ones already pruned (and, with a ``reference``, towards the
    dense model's outputs).  Returns a :class:`_Solved` per pruned layer and the names of
    targets the block never called.  ``tokens``: per item, the real positions whose rows
    enter the statistics.  ``written`` (if given) gets each layer's name once its pruned weight is
    in the model.  Each solver's weight (and dense-target weight ``V``) is dropped
    as soon as it is written into its layer."""
    if not targets:
        return [], []
    called = agree_call_order(probe_call_order(block, block_name, targets, inputs), targets)  # same on every rank
    uncalled = [t.name for t in targets if t not in dict(called)]
    solved = []
    for target, count in called:
        tick = time.perf_counter()
        stats = None
        correct = config.bias_correction and getattr(target.module, "bias", None) is not None
        if solver.needs != "none" or correct:
            needs = "norms" if solver.needs == "none" else solver.needs
            stats = collect_stats(block, block_name, target, inputs, needs, stop_early=count == 1, reference=reference,
                                  tokens=tokens)
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
        del stats, goal  # one layer's Hessian (and dense-target weight) at a time
        if not bool(torch.isfinite(solution.weight).all()):
            raise PrunelabError(
                f"layer {target.name!r}: method {config.method!r} produced non-finite weights; "
                "raise dampening or pass more calibration samples"
            )
        target.load2d(solution.weight)  # the final cast to the layer's dtype
        if written is not None:
            written.append(target.name)
        mask, dampening = solution.mask, solution.dampening
        del solution  # the layer now holds the pruned weight: no second copy
        shift = None if mean is None else _correct_bias_(target, W, mean, dense_mean)
        solved.append(_Solved(target, W, mask, shift, dampening, time.perf_counter() - tick, solve_seconds))
    return solved, uncalled


@torch.no_grad()
def _correct_bias_(target: LayerTarget, dense: Tensor, mean: Tensor, dense_mean: Tensor) -> Tensor:
    """``b += W E[x] - W' E[x~]`` (Nagel et al. 2019; ``E[x] = E[x~]`` without dense targets),
    ``W'`` the pruned weight as written into the layer; returns the shift ``(rows,)``."""
    pruned = target.weight2d().contiguous()  # (rows, cols), in the layer's dtype
    shift = dense.to(torch.float64) @ dense_mean - pruned.to(torch.float64) @ mean  # (rows,)
    bias = target.module.bias
    bias.add_(shift.to(device=bias.device, dtype=bias.dtype))
    return shift


def _check_targets(targets: list[LayerTarget], config: OneShotConfig, solver: Solver) -> None:
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
