"""Exact max pooling that is faster on CPU, chosen per layer by measuring it.

A channel-pruned CNN shrinks its convolutions about as its FLOPs promise, but its pooling
layers shrink only with their channel count -- and PyTorch's CPU ``max_pool2d`` on NCHW
tensors is slow (torch 2.13): ``benchmarks/structured_speedup.py`` times LeNet-5 with native
and with separable pools, side by side (and, from its next run, each pool's own time).

:class:`SeparableMaxPool2d` computes exactly ``F.max_pool2d``: a max over a window is a
max of maxima, so the ``kh x kw`` window is reduced along the width (``kw`` strided
slices, ``torch.maximum``), then along the height (``kh`` slices), each output element
being the maximum of the same input elements as PyTorch's kernel takes (padding is
``-inf``, as in PyTorch; NaN propagates as there).  Maximum is exact, so the values are
bit-identical -- up to the sign of a zero maximum, which compares equal.  Inference only:
where several inputs tie for the maximum, autograd splits the gradient between them
instead of giving it to one, so keep the native pool for training.

:func:`speed_up_pooling_` times the native and the separable pool of every
``nn.MaxPool2d`` on its real input at each batch size (interleaved rounds, fastest round, the
injectable timer of :mod:`~prunelab.materialise.autotune`) and swaps in the separable one
only where it is **no slower at every batch size** -- at batch 1 the few extra kernel
launches can cost more than they save.  The choice is a property of the machine, so it is
not saved: a reloaded model has native pools until this runs again.  Pooling written as
``F.max_pool2d`` inside a ``forward`` is not a module and is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.materialise.autotune import Timer, Trial, capture_inputs, check_inputs, median_timer, pick_fastest
from prunelab.materialise.tracing import eval_mode
from prunelab.measure.tables import markdown_table

__all__ = ["POOL_KERNELS", "PoolChoice", "PoolingReport", "SeparableMaxPool2d", "pool_unavailable_reason",
           "speed_up_pooling_"]

POOL_KERNELS: tuple[str, ...] = ("native", "separable")


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _reduce(x: torch.Tensor, dim: int, kernel: int, stride: int, dilation: int, size: int) -> torch.Tensor:
    """Max over ``kernel`` slices of ``x`` along ``dim``, slice ``i`` starting at ``i * dilation``."""
    span = (size - 1) * stride + 1
    out = None
    for i in range(kernel):
        window = x.narrow(dim, i * dilation, span)
        window = window[(slice(None),) * (dim % x.dim()) + (slice(None, None, stride),)]
        if out is None:
            out = window
        elif i == 1 or (torch.is_grad_enabled() and x.requires_grad):
            out = torch.maximum(out, window)  # the first result owns its memory ... (autograd: no out=)
        else:
            torch.maximum(out, window, out=out)  # ... so later windows reduce into it in place
    return out if kernel > 1 else out.contiguous()


class SeparableMaxPool2d(nn.Module):
    """``F.max_pool2d`` as strided maxima, along the width then the height (see the module docs)."""

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> "SeparableMaxPool2d":
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return cls(pool.kernel_size, stride, pool.padding, pool.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.dim() not in (3, 4):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=-math.inf)
        height, width = x.shape[-2:]
        out_h = (height - dh * (kh - 1) - 1) // sh + 1
        out_w = (width - dw * (kw - 1) - 1) // sw + 1
        rows = _reduce(x, -1, kw, sw, dw, out_w)  # (..., H, out_w)
        return _reduce(rows, -2, kh, sh, dh, out_h)  # (..., out_h, out_w)


def pool_unavailable_reason(pool: nn.Module) -> str | None:
    """Why ``pool`` cannot become a :class:`SeparableMaxPool2d`, or None."""
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} is not nn.MaxPool2d"
    if pool.ceil_mode:
        return "ceil_mode=True (its partial last window is not supported)"
    if pool.return_indices:
        return "return_indices=True (the separable pool returns values only)"
    return None


@dataclass(frozen=True)
class PoolChoice:
    """The pooling kernel kept for one ``nn.MaxPool2d``, with the measured seconds."""

    name: str
    kernel: str                                 # "native" or "separable"
    seconds: Mapping[str, Mapping[int, float]]  # kernel -> batch size -> seconds (fastest round)
    skipped: str = ""                           # why it was not timed

    def speedup(self, batch_size: int) -> float | None:
        native = self.seconds.get("native", {}).get(batch_size)
        mine = self.seconds.get(self.kernel, {}).get(batch_size)
        return native / mine if native and mine else None


@dataclass(frozen=True)
class PoolingReport:
    """What :func:`speed_up_pooling_` measured and swapped."""

    pools: tuple[PoolChoice, ...]
    batch_sizes: tuple[int, ...]

    def choices(self) -> dict[str, str]:
        return {pool.name: pool.kernel for pool in self.pools}

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for pool in self.pools:
            row: dict[str, Any] = {"pool": pool.name, "kernel": pool.kernel, "note": pool.skipped}
            for b in self.batch_sizes:
                native = pool.seconds.get("native", {}).get(b)
                row[f"native_b{b}_ms"] = None if native is None else 1e3 * native
                row[f"speedup_b{b}_x"] = pool.speedup(b)
            rows.append(row)
        return rows

    def table(self) -> str:
        return markdown_table(self.rows(), None) if self.pools else "(no nn.MaxPool2d layers)"


def speed_up_pooling_(model: nn.Module, example_inputs_by_batch: Mapping[int, torch.Tensor],
                      timer: Timer | None = None, *, rounds: int = 3) -> PoolingReport:
    """Swap each ``nn.MaxPool2d`` of ``model`` for a :class:`SeparableMaxPool2d` where that is no slower, in place.

    ``example_inputs_by_batch`` maps batch size -> model input of that size; each pool is
    timed on the input it receives (Trial ``kernel`` is ``"native"`` or ``"separable"``).
    Returns a :class:`PoolingReport`.
    """
    inputs_by_batch = check_inputs(example_inputs_by_batch, "speed_up_pooling_")
    timer = timer or median_timer
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)}
    with eval_mode(model):  # each module's own training flag comes back (a frozen BatchNorm stays in eval)
        captured = {b: capture_inputs(model, x, list(pools)) for b, x in inputs_by_batch.items()}
    choices = []
    for name, pool in pools.items():
        reason = pool_unavailable_reason(pool)
        if reason is None and any(name not in seen for seen in captured.values()):
            reason = "not reached by the example input"
        if reason is None and any(not seen[name].is_floating_point() for seen in captured.values()):
            reason = "input is not floating point"
        if reason:
            choices.append(PoolChoice(name, "native", {}, reason))
            continue
        built = {"native": pool, "separable": SeparableMaxPool2d.from_module(pool).train(pool.training)}
        seconds: dict[str, dict[int, float]] = {k: {} for k in built}
        for batch in inputs_by_batch:
            samples: dict[str, list[float]] = {k: [] for k in built}
            for _ in range(max(rounds, 1)):
                for kernel, candidate in built.items():  # interleaved, as in choose_kernels
                    samples[kernel].append(float(timer(Trial(name, kernel, batch, candidate, captured[batch][name]))))
            for kernel in built:
                seconds[kernel][batch] = min(samples[kernel])  # the fastest round, as in choose_kernels
        kernel = pick_fastest(seconds, POOL_KERNELS, baseline="native")
        if kernel == "separable":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, built["separable"])
        choices.append(PoolChoice(name, kernel, seconds))
    return PoolingReport(tuple(choices), tuple(inputs_by_batch))
