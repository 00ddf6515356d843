"""Worker for tests/test_ddp_review.py: one rank of a 2-process gloo run of every mask-deciding entry point.

Each rank gets its own shard (:func:`shard`: ``batches[rank::world]``) of four fixed batches and
runs: the Sparsifier with every registered criterion (and exact OBD on a tanh network), the PaI
runners, lottery (also with replicas that differ) / iterative / gradual with DDP training,
attention-head importance, ShortGPT block influence, the calibrated low-rank factorisation,
one-shot Wanda, and one-shot SparseGPT on blocks whose layer order the data decides.  It writes
what each decided to ``<out>/rank<r>.json``.

The functions that decide from a list of batches (:func:`decide`) are imported by the test too,
which runs them in one process on all four batches: the union every rank should agree with.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.bench.training import TrainConfig
from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.heads import head_importance, head_masks
from prunelab.layers import block_influence, lowest_influence
from prunelab.lowrank import low_rank_model
from prunelab.methods import PruneSpec
from prunelab.methods.gradual import run_gradual
from prunelab.methods.iterative import run_iterative
from prunelab.methods.lottery import run_lottery_method
from prunelab.methods.pai import (
    run_force, run_grasp, run_pai, run_pai_reinit, run_pai_shuffled, run_random_erk, run_random_uniform, run_snip,
    run_synflow,
)
from prunelab.oneshot import OneShotConfig, prune_oneshot
from prunelab.sparsifier import Sparsifier
from residual_mlp import Stack  # tests/ helpers (this script runs from tests/)
from test_heads import TwoUnits  # two 4-head attention units on (B, T, 6), mean-pooled to 3 classes
from torchrun_exit import finish

STRUCTURED = {"apoz": "channel", "slimming": "channel", "regression": "channel"}  # channel scores
NO_TRAINING = TrainConfig(epochs=0, progress=False)
TRAINING = TrainConfig(epochs=1, batch_size=16, lr=0.05, lr_schedule="constant", progress=False)


# --- models and data (the same on every rank and in the test process) --------------------------
def mlp() -> nn.Module:
    """8 -> 16 (BatchNorm with non-trivial scales and statistics) -> 12 -> 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4))
    with torch.no_grad():
        bn = model[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def residual(depth: int = 3) -> nn.Module:
    """``depth`` blocks ``x + fc2(relu(fc1(x)))`` of width 12 (one-shot / layer / low-rank blocks)."""
    torch.manual_seed(1)
    return Stack(width=12, depth=depth)


def attention() -> nn.Module:
    torch.manual_seed(2)
    return TwoUnits()


def shard(kind: str, rank: int, world: int) -> list:
    """Rank ``rank``'s share of the batches of ``kind`` (every ``world``-th, from ``rank``)."""
    return (routed_batches() if kind == "routed" else batches(kind))[rank::world]


def batches(kind: str) -> list[tuple[Tensor, Tensor]]:
    """Four fixed (inputs, targets) batches: ``mlp`` (16, 8) / 4 classes, ``residual`` (16, 12), ``attention``
    (8, 5, 6) / 3 classes; the two halves differ in scale and offset, so each rank's shard has its own statistics."""
    gen = torch.Generator().manual_seed({"mlp": 10, "residual": 11, "attention": 12}[kind])
    shape, classes = {"mlp": ((16, 8), 4), "residual": ((16, 12), 12), "attention": ((8, 5, 6), 3)}[kind]
    out = []
    for b in range(4):
        x = torch.randn(*shape, generator=gen) * (1.0 + b) + 0.3 * b  # (B, ...)
        out.append((x, torch.randint(0, classes, (shape[0],), generator=gen)))
    return out


# --- what each entry point decides --------------------------------------------------------------
def _bits(masks) -> dict[str, str]:
    return {n: "".join("1" if b else "0" for b in m.reshape(-1).tolist()) for n, m in masks.items()}


def _scores(scores: dict[str, Tensor]) -> dict[str, list[float]]:
    return {n: s.reshape(-1).tolist() for n, s in scores.items()}


def tanh_mlp() -> nn.Module:
    """8 -> 16 -> tanh -> 4: smooth, so the exact Hessian diagonal changes sign between the shards
    (in a ReLU network it is a Gauss-Newton diagonal, >= 0 on every shard)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _sparsifier_decision(model: nn.Module, criterion, granularity: str, shard: list) -> dict:
    sparsifier = Sparsifier(model, criterion=criterion, granularity=granularity, data=ScoreData(shard))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slimming / regression: the classifier falls back to |w|
        scores = sparsifier.scores()
        masks = sparsifier.update(0.5)
    return {"scores": _scores(scores), "masks": _bits(masks), "fingerprint": masks.fingerprint()}


def sparsifier_decisions(shard: list) -> dict:
    """Every registered criterion in a Sparsifier at sparsity 0.5 (and exact OBD on a tanh network):
    the (reduced) scores and the masks."""
    out = {name: _sparsifier_decision(mlp(), name, STRUCTURED.get(name, "unstructured"), shard)
           for name in CRITERIA.names()}
    out["obd-tanh"] = _sparsifier_decision(tanh_mlp(), get_criterion("obd", hessian="exact"), "unstructured", shard)
    return out


PAI_RUNNERS = {
    "snip": lambda m, d, t: run_snip(m, None, t, PruneSpec(sparsity=0.5), NO_TRAINING, score_data=d),
    "grasp": lambda m, d, t: run_grasp(m, None, t, PruneSpec(sparsity=0.5), NO_TRAINING, score_data=d),
    "force": lambda m, d, t: run_force(m, None, t, PruneSpec(sparsity=0.5), NO_TRAINING, score_data=d, steps=3),
    "synflow": lambda m, d, t: run_synflow(m, None, t, PruneSpec(sparsity=0.5), NO_TRAINING, score_data=d, rounds=4),
    "random-erk": lambda m, d, t: run_random_erk(m, None, t, PruneSpec(sparsity=0.5), NO_TRAINING),
    "random-uniform": lambda m, d, t: run_random_uniform(m, None, t, PruneSpec(sparsity=0.5), NO_TRAINING),
    "pai-taylor": lambda m, d, t: run_pai(m, None, t, PruneSpec(sparsity=0.5, criterion="taylor"), NO_TRAINING,
                                          score_data=d),
    "pai-shuffled-snip": lambda m, d, t: run_pai_shuffled(m, None, t, PruneSpec(sparsity=0.5, criterion="snip"),
                                                          NO_TRAINING, score_data=d),
    "pai-reinit-obd": lambda m, d, t: run_pai_reinit(m, None, t, PruneSpec(sparsity=0.5, criterion="obd"),
                                                     NO_TRAINING, score_data=d),
}


def pai_decisions(shard: list) -> dict:
    out = {}
    for name, runner in PAI_RUNNERS.items():
        model = mlp()
        result = runner(model, ScoreData(shard), shard)
        out[name] = {"masks": _bits(result.masks), "fingerprint": result.masks.fingerprint(),
                     "weights": {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()
                                 if n in result.masks}}
    return out


def head_decisions(shard: list) -> dict:
    model = attention()
    scores = head_importance(model, shard)
    choice = head_masks(model, scores, 0.5)
    return {"scores": _scores(scores), "keep": _bits(choice.keep), "fingerprint": choice.masks.fingerprint()}


def layer_decisions(shard: list) -> dict:
    scores = block_influence(residual(), [x for x, _ in shard])
    return {"scores": scores, "dropped": lowest_influence(scores, 1)}


def lowrank_decisions(shard: list) -> dict:
    model = residual(depth=2)
    low_rank_model(model, 0.5, [x for x, _ in shard])
    return {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters() if n.endswith("first.weight")}


def wanda_decisions(shard: list) -> dict:
    report = prune_oneshot(residual(), [x for x, _ in shard], OneShotConfig(method="wanda", sparsity=0.5),
                           progress=False)
    return {"masks": _bits(report.masks), "fingerprint": report.masks.fingerprint()}


class Routed(nn.Module):
    """A block whose two same-shape layers run in an order the data decides (as conditional
    computation does: MoE routing), ``x + b(relu(a(x)))`` for inputs of positive sum, else ``x + a(relu(b(x)))``."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # (B, width) -> (B, width)
        first, second = (self.a, self.b) if float(x.sum()) > 0 else (self.b, self.a)
        return x + second(torch.relu(first(x)))


class RoutedStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.blocks = nn.ModuleList(Routed() for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def routed_batches() -> list[Tensor]:
    """Four (16, 12) inputs of alternating sign: rank 0's shard runs ``a`` first, rank 1's ``b``."""
    gen = torch.Generator().manual_seed(13)
    return [torch.randn(16, 12, generator=gen) + (2.0 if b % 2 == 0 else -2.0) for b in range(4)]


def routed_decisions(shard: list[Tensor]) -> dict:
    report = prune_oneshot(RoutedStack(), shard, OneShotConfig(method="sparsegpt", sparsity=0.5), progress=False)
    return {"masks": _bits(report.masks), "fingerprint": report.masks.fingerprint()}


def decide(shard_of) -> dict:
    """Everything decided from data, ``shard_of(kind)`` giving the batches of each kind of model."""
    return {
        "sparsifier": sparsifier_decisions(shard_of("mlp")),
        "pai": pai_decisions(shard_of("mlp")),
        "heads": head_decisions(shard_of("attention")),
        "layers": layer_decisions(shard_of("residual")),
        "lowrank": lowrank_decisions(shard_of("residual")),
        "wanda": wanda_decisions(shard_of("residual")),
        "routed": routed_decisions(shard_of("routed")),
    }


# --- runs that train under DDP (compared across ranks only) --------------------------------------
def trained_decisions(shard: list) -> dict:
    out = {}
    model = mlp()
    result = run_snip(model, shard, shard, PruneSpec(sparsity=0.5), TRAINING, score_data=ScoreData(shard))
    out["snip-trained"] = result.masks.fingerprint()  # finalize() verified it across ranks too
    lottery = run_lottery_method(mlp(), shard, shard, PruneSpec(sparsity=0.5, rounds=2), TRAINING)
    out["lottery"] = lottery.masks.fingerprint()
    unsynced = mlp()  # replicas that differ, and no DDP training to synchronise them (epochs=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(100 + distributed.rank())
        for param in unsynced.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    out["lottery-unsynced"] = run_lottery_method(unsynced, shard, shard, PruneSpec(sparsity=0.5, rounds=2),
                                                 NO_TRAINING).masks.fingerprint()
    iterative = run_iterative(mlp(), shard, shard, PruneSpec(sparsity=0.5, criterion="taylor", rounds=2),
                              TRAINING, score_data=ScoreData(shard))
    out["iterative-taylor"] = iterative.masks.fingerprint()
    gradual = run_gradual(mlp(), shard, shard, PruneSpec(sparsity=0.5, criterion="movement", num_updates=2,
                                                         finetune_epochs=0), dataclasses.replace(TRAINING, epochs=2))
    out["gradual-movement"] = gradual.masks.fingerprint()
    return out


def main(out: Path) -> None:
    assert distributed.init_from_env(), "run me under torchrun"
    torch.set_num_threads(1)
    rank, world = distributed.rank(), distributed.world_size()
    record = {"rank": rank, "world_size": world,
              "decided": decide(lambda kind: shard(kind, rank, world)),
              "trained": trained_decisions(batches("mlp")[rank::world])}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
