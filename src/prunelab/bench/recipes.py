"""Reusable training/pruning recipes shared by benchmarks (one place, no copy-paste drivers)."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

from torch import nn

from prunelab.bench.datasets import DatasetSplits, make_loaders
from prunelab.bench.models import build_model
from prunelab.bench.training import TrainConfig, evaluate, seed_everything, train
from prunelab.methods import MethodResult, PruneSpec, run_iterative

# Han et al. 2015-style LeNet-300-100 recipe: SGD + momentum, L2 weight decay, cosine LR.
LENET300_DENSE = TrainConfig(epochs=40, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                             lr_schedule="cosine", seed=0, progress=True)
LENET300_FINETUNE_LR = 0.02
LENET300_PRUNE = PruneSpec(criterion="magnitude", allocation="global", rounds=6, finetune_epochs=10)


@dataclass
class PrunedRun:
    model: nn.Module
    result: MethodResult
    error_pct: float
    wall_time_s: float


def train_dense(splits: DatasetSplits, model_name: str, config: TrainConfig) -> tuple[nn.Module, float]:
    """Train a zoo model from scratch; returns the model and the wall time in seconds."""
    seed_everything(config.seed)
    model = build_model(model_name, splits.input_shape, splits.num_classes)
    train_loader, _ = make_loaders(splits, config.batch_size, config.seed)
    started = time.perf_counter()
    train(model, train_loader, config, description="dense")
    return model, time.perf_counter() - started


def iterative_prune(dense: nn.Module, splits: DatasetSplits, spec: PruneSpec, finetune: TrainConfig) -> PrunedRun:
    """Prune a copy of ``dense`` by iterative magnitude pruning with retraining."""
    model = copy.deepcopy(dense)
    seed_everything(finetune.seed)
    train_loader, test_loader = make_loaders(splits, finetune.batch_size, finetune.seed)
    started = time.perf_counter()
    result = run_iterative(model, train_loader, test_loader, spec, finetune)
    wall = time.perf_counter() - started
    return PrunedRun(model, result, evaluate(model, test_loader)["error_pct"], wall)


def lenet300_finetune_config(quick: bool = False) -> TrainConfig:
    return dataclasses.replace(LENET300_DENSE, lr=LENET300_FINETUNE_LR, epochs=1 if quick else LENET300_DENSE.epochs)


def lenet300_dense_config(quick: bool = False) -> TrainConfig:
    return dataclasses.replace(LENET300_DENSE, epochs=2) if quick else LENET300_DENSE


def lenet300_prune_spec(sparsity: float, quick: bool = False) -> PruneSpec:
    spec = dataclasses.replace(LENET300_PRUNE, sparsity=sparsity)
    return dataclasses.replace(spec, rounds=2, finetune_epochs=1) if quick else spec
