"""Pruning methods: drivers that combine a sparsifier, a schedule and the training engine.

Each method is a function ``run(model, train_loader, test_loader, spec, train_config,
*, score_data=None) -> MethodResult`` registered by name in :data:`METHODS`.
"""

from __future__ import annotations

from prunelab.methods.base import MethodResult, PruneSpec
from prunelab.methods.dst import run_dsr, run_rigl, run_set, run_snfs, run_static
from prunelab.methods.gradual import run_gradual
from prunelab.methods.iterative import run_iterative
from prunelab.methods.lottery import run_lottery_method
from prunelab.methods.oneshot import run_oneshot
from prunelab.methods.pai import (
    run_force, run_grasp, run_pai, run_pai_reinit, run_pai_shuffled, run_random_erk, run_random_uniform, run_snip,
    run_synflow,
)
from prunelab.registry import Registry

METHODS: Registry = Registry("method")
METHODS.add("oneshot", run_oneshot, "prune once to the target, then optionally fine-tune")
METHODS.add("iterative", run_iterative, "IMP: R rounds of pruning p% of the remaining weights + retraining (Han et al. 2015)")
METHODS.add("gradual", run_gradual, "Zhu & Gupta 2017 cubic schedule during training, then fine-tune")
METHODS.add("snip", run_snip, "prune at init: SNIP |w dL/dw| in one shot, then train sparse (Lee et al. 2019)")
METHODS.add("grasp", run_grasp, "prune at init: GraSP, remove the highest -w*Hg, then train sparse (Wang et al. 2020)")
METHODS.add("force", run_force, "prune at init: FORCE, iterative SNIP with resurrection, 20 steps (de Jorge et al. 2021)")
METHODS.add("synflow", run_synflow, "prune at init: iterative SynFlow, 100 rounds keeping (1-s)^(k/R), data-free (Tanaka et al. 2020)")
METHODS.add("random-erk", run_random_erk, "prune at init: random mask with ERK layer densities (Evci et al. 2020), then train")
METHODS.add("random-uniform", run_random_uniform, "prune at init: random mask, every layer at the target sparsity, then train")
METHODS.add("pai", run_pai, "prune at init with --criterion in one shot (e.g. magnitude at init), then train sparse")
METHODS.add("pai-shuffled", run_pai_shuffled, "pai, then each layer's mask randomly permuted (Frankle et al. 2021 ablation)")
METHODS.add("pai-reinit", run_pai_reinit, "pai, then kept weights re-drawn from the default init (Frankle et al. 2021 ablation)")
METHODS.add("lottery", run_lottery_method, "lottery ticket: IMP rewinding to the given weights each round (Frankle & Carbin 2019)")
METHODS.add("static", run_static, "sparse from the start: static random ERK mask (baseline)")
METHODS.add("set", run_set, "DST: SET, drop smallest |w|, regrow at random (Mocanu et al. 2018)")
METHODS.add("dsr", run_dsr, "DST: DSR, adaptive global threshold, regrowth proportional to survivors (Mostafa & Wang 2019)")
METHODS.add("rigl", run_rigl, "DST: RigL, drop smallest |w|, grow largest dense |grad| (Evci et al. 2020)")
METHODS.add("snfs", run_snfs, "DST: sparse momentum, grow and redistribute by momentum (Dettmers & Zettlemoyer 2019)")

# Methods that start sparse (prune at init / rewire during training): no dense pre-training, they
# train for RunConfig.epochs at the dense learning rate.  The rest prune a trained model.
FROM_SCRATCH = frozenset({
    "snip", "grasp", "force", "synflow", "random-erk", "random-uniform", "pai", "pai-shuffled", "pai-reinit",
    "lottery", "static", "set", "dsr", "rigl", "snfs",
})

__all__ = ["FROM_SCRATCH", "METHODS", "MethodResult", "PruneSpec", "run_gradual", "run_iterative", "run_oneshot"]
