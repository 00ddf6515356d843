"""Latency measured side by side: interleaved repetitions, medians, ratios.

Speed claims are ratios of variants timed in the same process, alternating between them
so that drift of the machine (frequency, other load) hits every variant alike
(DESIGN.md decision 6).  Each sample runs a variant enough times to last at least
``min_sample_s``, so sub-millisecond calls are not dominated by timer resolution.
Models are timed as they serve: in eval mode under ``torch.inference_mode`` (dropout off,
batch norm on its running statistics), and handed back in the train/eval mode they came in.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError


def interleaved_latency(variants: Mapping[str, Callable[[], Any]], reps: int = 15, min_sample_s: float = 2e-3,
                        warmup: int = 2, sync: Callable[[], Any] | None = None) -> dict[str, float]:
    """Median seconds per call of each variant; repetitions interleaved, order alternating.

    ``sync`` runs before each clock read (e.g. ``torch.cuda.synchronize`` for GPU work,
    whose calls return before the kernels finish).
    """
    if isinstance(reps, bool) or not isinstance(reps, numbers.Integral) or reps < 1:
        raise PrunelabError(f"reps must be >= 1, got {reps!r}; pass e.g. reps=15")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise PrunelabError(f"warmup must be an integer >= 0, got {warmup!r}; pass e.g. warmup=2")
    if (isinstance(min_sample_s, bool) or not isinstance(min_sample_s, numbers.Real)
            or not math.isfinite(min_sample_s) or min_sample_s < 0):
        raise PrunelabError(f"min_sample_s must be a finite number of seconds >= 0, got {min_sample_s!r}; "
                            f"pass e.g. min_sample_s=2e-3")
    wait = sync if sync is not None else (lambda: None)
    inner: dict[str, int] = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        wait()
        start = time.perf_counter()
        fn()
        wait()
        once = max(time.perf_counter() - start, 1e-9)
        inner[name] = max(1, min(1000, int(min_sample_s / once) + 1))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(reps):
        for name in order if r % 2 == 0 else reversed(order):
            fn, n = variants[name], inner[name]
            wait()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            wait()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def eval_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; each module's own train/eval flag restored after.

    Restored even when the block raises; a model that is not an ``nn.Module`` is left alone.
    """
    modules = [model for model in models if isinstance(model, nn.Module)]
    modes = {m: m.training for model in modules for m in model.modules()}
    try:
        for model in modules:
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def model_latency_ms(models: Mapping[str, nn.Module], example: torch.Tensor, reps: int = 15) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``example``, measured side by side.

    Each model runs in eval mode under ``torch.inference_mode`` (as it would serve); its
    modules' train/eval flags are restored afterwards, even if a forward raises.
    """
    with eval_mode(models.values()), torch.inference_mode():
        seconds = interleaved_latency({k: (lambda m=m: m(example)) for k, m in models.items()}, reps=reps)
    return {k: 1000.0 * v for k, v in seconds.items()}


def layer_latency_ms(models: Mapping[str, nn.Module], example: torch.Tensor, reps: int = 15
                     ) -> dict[str, dict[str, float]]:
    """Median milliseconds of each leaf module, per model, timed side by side.

    One forward of each model on ``example`` records the inputs every leaf module (one
    without children) receives; each leaf is then timed on its own recorded inputs,
    interleaved across the models that have a leaf of that name (a shrunk model keeps the
    dense model's module names); keyword arguments a leaf is called with are recorded and
    passed too.  Leaves called more than once per forward are skipped (their
    inputs are ambiguous), and so is work a model does outside its modules (functional calls
    in ``forward``): the whole-model latency minus the sum of the leaves is that remainder.
    Returns ``{leaf name: {model name: ms}}`` in the first model's call order.  As in
    :func:`model_latency_ms`, models run in eval mode and get their train/eval flags back.
    """
    with eval_mode(models.values()):
        return _layer_latency_ms(models, example, reps)


def _layer_latency_ms(models: Mapping[str, nn.Module], example: torch.Tensor, reps: int
                      ) -> dict[str, dict[str, float]]:
    # leaf -> model -> (module, args, kwargs, calls): a leaf called with keywords is timed with them too
    recorded: dict[str, dict[str, tuple[nn.Module, tuple, dict[str, Any], int]]] = {}
    order: list[str] = []
    for variant, model in models.items():
        leaves = {name: m for name, m in model.named_modules() if name and not any(True for _ in m.children())}
        handles = []

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], name: str, variant: str = variant) -> None:
            entry = recorded.setdefault(name, {})
            _, first_args, first_kwargs, calls = entry.get(variant, (module, args, dict(kwargs), 0))
            entry[variant] = (module, first_args, first_kwargs, calls + 1)
            if name not in order:
                order.append(name)

        try:
            for name, module in leaves.items():
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, name=name: hook(m, a, k, name), with_kwargs=True))
            with torch.inference_mode():
                model(example)
        finally:
            for handle in handles:
                handle.remove()
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name in order:
            entry = recorded[name]
            if any(calls != 1 for *_, calls in entry.values()):
                continue
            variants = {v: (lambda m=m, a=a, k=k: m(*a, **k)) for v, (m, a, k, _) in entry.items()}
            out[name] = {v: 1000.0 * s for v, s in interleaved_latency(variants, reps=reps).items()}
    return out
