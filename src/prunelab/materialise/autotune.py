"""Pick each layer's kernel by measuring it: the ``auto`` form never makes a model slower.

Which sparse kernel pays depends on sparsity, shape, batch size, the CPU, its threads and
even how busy the machine is (see :mod:`prunelab.materialise.sparse_modules`), so no
fixed rule is right everywhere -- the approach of auto-tuned libraries such as ATLAS
(Whaley & Dongarra 1998) and OSKI (Vuduc et al. 2005, sparse kernels tuned per matrix at
run time).  :func:`choose_kernels`:

1. runs the model once per batch size with forward pre-hooks that record the input of
   every Linear/Conv layer (``transformers``' Conv1D included: its sparse kernels are those of
   the Linear of ``W^T``), so each layer is timed on its real input shape;
2. for every layer, builds each applicable candidate module and times it on that input
   at every batch size, interleaving candidates over ``rounds`` so drift in machine load
   hits all candidates alike, and keeps each candidate's *fastest* round: interference
   from other work only ever adds time, so a burst must slow every round of a kernel to
   change the choice (with the median, two bad rounds of three once kept a 90%-sparse
   4096x4096 layer dense, 7x slower than its CSR form);
3. keeps a sparse kernel only if it is **no slower than dense at every batch size**,
   and among those picks the smallest geometric mean of ``time / dense_time``; ties go
   to the earlier candidate, dense first.

The timer is injectable: ``timer(trial) -> seconds``.  ``trial`` is a :class:`Trial`, a
zero-argument callable that also carries ``layer``, ``kernel`` and ``batch_size``, so a
test can pass a fake timer that returns preset times and check the choice exactly.
The default :func:`median_timer` warms up, sizes an inner loop from the fastest warm-up
call so one sample lasts at least ``min_sample_s``, and returns the median of several
samples; on CUDA it waits for the GPU (``Trial.synchronize``) before every clock read,
since CUDA calls return before their kernels have run.

Not timed (recorded as ``skipped`` with the reason): kernels that cannot apply (see
``kernel_unavailable_reason``), 2:4 where it would run its dense fallback (no sparse
tensor cores, or a dtype/shape they refuse), sparse kernels on a layer without zeros, BSR when its
stored elements exceed ``bsr_max_fill`` x the nonzeros (measured: a filled 4x4 BSR runs
2-4x slower than dense, so it cannot win), and layers the example input never reaches.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise.formats import block_shape
from prunelab.materialise.sparse_modules import build_sparse, is_hf_conv1d, kernel_unavailable_reason, linear_weight
from prunelab.measure.tables import markdown_table

__all__ = ["KERNELS", "KernelReport", "LayerChoice", "Trial", "choose_kernels", "median_timer"]

KERNELS: tuple[str, ...] = ("dense", "csr", "bsr", "2:4")
TUNED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # + transformers' Conv1D

Timer = Callable[[Callable[[], Any]], float]


@dataclass(frozen=True, eq=False)
class Trial:
    """One thing to time: ``module(inputs)`` for ``(layer, kernel, batch_size)``; call it to run once."""

    layer: str
    kernel: str
    batch_size: int
    module: nn.Module = field(repr=False)
    inputs: torch.Tensor = field(repr=False)

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(self.inputs)

    def synchronize(self) -> None:
        """Wait until the GPU has run the work queued so far (a no-op unless ``inputs`` is on CUDA)."""
        if self.inputs.device.type == "cuda":
            torch.cuda.synchronize(self.inputs.device)


def median_timer(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, min_sample_s: float = 2e-4,
                 max_inner: int = 200) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples, after ``warmup`` calls.

    Each sample runs ``fn`` ``inner`` times, ``inner = ceil(min_sample_s / t_warm)`` (at most
    ``max_inner``) so a sample lasts at least ``min_sample_s`` (short kernels are otherwise
    dominated by timer noise).  ``t_warm`` is the *fastest* warm-up call: the first call of a
    fresh sparse module also builds its cached matrix, a one-time cost that must not shrink
    ``inner``.  If ``fn`` has a ``synchronize()`` method (a :class:`Trial` does), it is called
    before every clock read, so queued CUDA work is counted where it runs.
    """
    sync = getattr(fn, "synchronize", None) or (lambda: None)
    per_call = math.inf
    for _ in range(max(warmup, 1)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        per_call = min(per_call, time.perf_counter() - start)
    inner = max(1, min(max_inner, math.ceil(min_sample_s / max(per_call, 1e-9))))
    samples = []
    for _ in range(max(repeats, 1)):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


@dataclass(frozen=True)
class LayerChoice:
    """The kernel picked for one layer, with every measured time and skipped candidate."""

    name: str                                   # module FQN
    kind: str                                   # "Linear", "Conv2d", ...
    sparsity: float                             # fraction of zero weights
    kernel: str                                 # the choice
    seconds: Mapping[str, Mapping[int, float]]  # kernel -> batch size -> seconds (fastest round)
    skipped: Mapping[str, str]                  # kernel -> why it was not timed

    def speedup(self, batch_size: int, kernel: str | None = None) -> float | None:
        """``dense time / kernel time`` at ``batch_size`` (the chosen kernel by default)."""
        times = self.seconds.get(kernel or self.kernel, {})
        dense = self.seconds.get("dense", {}).get(batch_size)
        mine = times.get(batch_size)
        return dense / mine if dense and mine else None


@dataclass(frozen=True)
class KernelReport:
    """Per-layer kernel choices of :func:`choose_kernels`, ready for a table."""

    layers: tuple[LayerChoice, ...]
    batch_sizes: tuple[int, ...]
    threads: int

    def choices(self) -> dict[str, str]:
        """``layer FQN -> kernel``."""
        return {layer.name: layer.kernel for layer in self.layers}

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for layer in self.layers:
            row: dict[str, Any] = {"layer": layer.name, "kind": layer.kind, "sparsity_pct": 100 * layer.sparsity,
                                   "kernel": layer.kernel}
            for b in self.batch_sizes:
                dense = layer.seconds.get("dense", {}).get(b)
                row[f"dense_b{b}_ms"] = None if dense is None else 1e3 * dense
                row[f"speedup_b{b}_x"] = layer.speedup(b)
            rows.append(row)
        return rows

    def table(self) -> str:
        columns = [("layer", "layer"), ("kind", "kind"), ("sparsity_pct", "sparsity %"), ("kernel", "kernel")]
        for b in self.batch_sizes:
            columns += [(f"dense_b{b}_ms", f"dense ms b{b}"), (f"speedup_b{b}_x", f"speedup b{b}")]
        return markdown_table(self.rows(), columns)


def capture_inputs(model: nn.Module, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The first positional input of each named module during one forward of ``inputs``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        return hook

    modules = dict(model.named_modules())
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
        with torch.inference_mode():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def check_inputs(example_inputs_by_batch: Mapping[int, torch.Tensor], caller: str = "choose_kernels"
                 ) -> dict[int, torch.Tensor]:
    """The example inputs sorted by batch size; a one-line error unless a non-empty {batch: tensor} mapping."""
    if not isinstance(example_inputs_by_batch, Mapping) or not example_inputs_by_batch:
        raise PrunelabError(
            f"{caller} needs example inputs keyed by batch size, got {type(example_inputs_by_batch).__name__}; "
            "pass e.g. {1: x[:1], 64: x[:64]}"
        )
    for batch, tensor in example_inputs_by_batch.items():
        if not isinstance(tensor, torch.Tensor):
            raise PrunelabError(f"example input for batch {batch} is {type(tensor).__name__}; pass a tensor")
    return dict(sorted(example_inputs_by_batch.items()))


def choose_kernels(
    model: nn.Module,
    example_inputs_by_batch: Mapping[int, torch.Tensor],
    candidates: Sequence[str] = ("dense", "csr", "bsr"),
    timer: Timer | None = None,
    *,
    layers: Sequence[str] | None = None,
    block_size: tuple[int, int] = (4, 4),
    rounds: int = 3,
    bsr_max_fill: float = 2.0,
) -> KernelReport:
    """Measure every candidate kernel of every Linear/Conv layer and pick the fastest per layer.

    ``model`` holds the (masked) weights with real zeros and is not changed.
    ``example_inputs_by_batch`` maps batch size -> model input of that batch size.
    ``layers`` restricts tuning to these module FQNs (default: all Linear/Conv layers).
    ``timer(trial) -> seconds`` defaults to :func:`median_timer`.  Dense is always a
    candidate.  Returns a :class:`KernelReport`; ``report.choices()`` maps layer -> kernel.
    """
    unknown = [c for c in candidates if c not in KERNELS]
    if unknown:
        raise PrunelabError(f"unknown kernel(s) {unknown}; valid kernels: {', '.join(KERNELS)}")
    kernels = ["dense"] + [c for c in dict.fromkeys(candidates) if c != "dense"]
    block_size = block_shape(block_size)
    inputs_by_batch = check_inputs(example_inputs_by_batch)
    timer = timer or median_timer
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else [n for n, m in modules.items() if _tunable(m)]
    missing = [n for n in names if not _tunable(modules.get(n))]
    if missing:
        raise PrunelabError(f"layers {missing} are not Linear/Conv modules of the model; valid: "
                            f"{', '.join(n for n, m in modules.items() if _tunable(m))}")

    was_training = model.training
    model.eval()
    try:
        captured = {b: capture_inputs(model, x, names) for b, x in inputs_by_batch.items()}
    finally:
        model.train(was_training)

    choices = []
    for name in names:
        module = modules[name]
        weight = module.weight.detach()
        nnz = int((weight != 0).sum())
        sparsity = 1.0 - nnz / weight.numel() if weight.numel() else 0.0
        skipped: dict[str, str] = {}
        built: dict[str, nn.Module] = {}
        for kernel in kernels:
            reason = _skip_reason(module, kernel, nnz, name, captured, block_size, bsr_max_fill)
            if reason:
                skipped[kernel] = reason
                continue
            candidate = build_sparse(module, kernel, name=f"{name}.weight", block_size=block_size)
            if getattr(candidate, "accelerated", True) is False:  # 2:4 without sparse tensor cores runs dense
                skipped[kernel] = "no sparse tensor cores for this layer (it would run the dense fallback)"
                continue
            built[kernel] = candidate
        seconds: dict[str, dict[int, float]] = {k: {} for k in built}
        if "dense" in built:
            for batch in inputs_by_batch:
                samples: dict[str, list[float]] = {k: [] for k in built}
                for _ in range(max(rounds, 1)):
                    for kernel, candidate in built.items():  # interleaved: every round times every kernel
                        trial = Trial(name, kernel, batch, candidate, captured[batch][name])
                        samples[kernel].append(float(timer(trial)))
                for kernel in built:
                    seconds[kernel][batch] = min(samples[kernel])  # the fastest round (see the module docs)
        choices.append(LayerChoice(name, type(module).__name__, sparsity, pick_fastest(seconds, kernels), seconds, skipped))
    return KernelReport(tuple(choices), tuple(inputs_by_batch), torch.get_num_threads())


def _tunable(module: nn.Module | None) -> bool:
    """A layer with kernels to time: ``TUNED_TYPES``, or a ``transformers`` Conv1D (timed as its Linear twin)."""
    return isinstance(module, TUNED_TYPES) or (module is not None and is_hf_conv1d(module))


def _skip_reason(module: nn.Module, kernel: str, nnz: int, name: str, captured: Mapping[int, Mapping[str, Any]],
                 block_size: tuple[int, int], bsr_max_fill: float) -> str | None:
    if any(name not in layer_inputs for layer_inputs in captured.values()):
        return "not reached by the example input"
    if kernel == "dense":
        return None
    reason = kernel_unavailable_reason(module, kernel, block_size=block_size)
    if reason:
        return reason
    if nnz == module.weight.numel():
        return "no zeros"
    if kernel == "bsr" and nnz:
        bh, bw = block_size
        weight = module.weight.detach()
        matrix = linear_weight(module) if is_hf_conv1d(module) else weight.reshape(weight.shape[0], -1)  # (out, in)
        rows, cols = matrix.shape
        blocks = (matrix != 0).reshape(rows // bh, bh, cols // bw, bw).any(dim=3).any(dim=1)
        fill = int(blocks.sum()) * bh * bw / nnz
        if fill > bsr_max_fill:
            return f"{bh}x{bw} blocks store {fill:.1f}x the nonzeros (limit {bsr_max_fill:g})"
    return None


def pick_fastest(seconds: Mapping[str, Mapping[int, float]], order: Sequence[str], baseline: str = "dense") -> str:
    """Fastest kernel that is no slower than ``baseline`` at any batch size (geometric-mean ratio)."""
    dense = seconds.get(baseline)
    if not dense:
        return baseline
    best, best_score = baseline, 1.0
    for kernel in order:
        times = seconds.get(kernel)
        if kernel == baseline or not times:
            continue
        if any(times[b] > dense[b] for b in dense):
            continue
        ratios = [times[b] / dense[b] if dense[b] > 0 else 1.0 for b in dense]
        score = math.exp(sum(math.log(max(r, 1e-12)) for r in ratios) / len(ratios))
        if score < best_score:
            best, best_score = kernel, score
    return best
