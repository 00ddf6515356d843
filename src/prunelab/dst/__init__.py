"""Dynamic sparse training: sparse from the first step, connections rewired during training.

Every entry of :data:`DST_SPARSIFIERS` is a :class:`DynamicSparsifier` subclass with the
constructor ``(model, sparsity, *, schedule, allocation, rules, exclude, seed, **options)``:

* ``static`` -- random ERK mask, never rewired (baseline);
* ``set``  -- Mocanu et al. 2018: magnitude drop, random growth;
* ``dsr``  -- Mostafa & Wang 2019: adaptive global threshold, regrowth proportional to survivors;
* ``rigl`` -- Evci et al. 2020: magnitude drop, growth by dense-gradient magnitude;
* ``snfs`` -- Dettmers & Zettlemoyer 2019: growth and redistribution by momentum.

Use like any sparsifier, calling ``step()`` after ``optimizer.step()`` and before
``zero_grad()``::

    schedule = UpdateSchedule.for_run(total_steps, delta_t=100, alpha=0.3, end_fraction=0.75)
    sparsifier = RigL(model, 0.9, schedule=schedule).prepare(optimizer)
"""

from __future__ import annotations

from prunelab.dst.base import (
    DynamicSparsifier,
    ReallocatingSparsifier,
    UpdateSchedule,
    proportional_counts,
)
from prunelab.dst.dsr import DSR
from prunelab.dst.evolutionary import SET
from prunelab.dst.flops import (
    TRAINING_COSTS,
    TrainingFlops,
    flops_per_sample,
    training_flops,
)
from prunelab.dst.rigl import RigL
from prunelab.dst.snfs import SNFS
from prunelab.dst.static import StaticSparse
from prunelab.registry import Registry

DST_SPARSIFIERS: Registry[type[DynamicSparsifier]] = Registry("dynamic sparse training method")
DST_SPARSIFIERS.add("static", StaticSparse, "static random ERK mask, never rewired (baseline)")
DST_SPARSIFIERS.add("set", SET, "SET (Mocanu et al. 2018): drop smallest |w|, grow at random")
DST_SPARSIFIERS.add("dsr", DSR, "DSR (Mostafa & Wang 2019): adaptive global threshold, regrowth by survivors")
DST_SPARSIFIERS.add("rigl", RigL, "RigL (Evci et al. 2020): drop smallest |w|, grow largest dense |grad|")
DST_SPARSIFIERS.add("snfs", SNFS, "SNFS (Dettmers & Zettlemoyer 2019): grow and redistribute by momentum magnitude")

__all__ = [
    "DSR", "DST_SPARSIFIERS", "SET", "SNFS", "TRAINING_COSTS", "DynamicSparsifier", "ReallocatingSparsifier", "RigL",
    "StaticSparse", "TrainingFlops", "UpdateSchedule", "flops_per_sample", "proportional_counts", "training_flops",
]
