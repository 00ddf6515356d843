"""Pruning methods: drivers that combine a sparsifier, a schedule and the training engine.

Each method is a function ``run(model, train_loader, test_loader, spec, train_config,
*, score_data=None) -> MethodResult`` registered by name in :data:`METHODS`.
"""

from __future__ import annotations

from prunelab.methods.base import MethodResult, PruneSpec
from prunelab.methods.gradual import run_gradual
from prunelab.methods.iterative import run_iterative
from prunelab.methods.oneshot import run_oneshot
from prunelab.registry import Registry

METHODS: Registry = Registry("method")
METHODS.add("oneshot", run_oneshot, "prune once to the target, then optionally fine-tune")
METHODS.add("iterative", run_iterative, "IMP: R rounds of pruning p% of the remaining weights + retraining (Han et al. 2015)")
METHODS.add("gradual", run_gradual, "Zhu & Gupta 2017 cubic schedule during training, then fine-tune")

__all__ = ["METHODS", "MethodResult", "PruneSpec", "run_gradual", "run_iterative", "run_oneshot"]
