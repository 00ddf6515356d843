"""Worker for tests/test_dst_distributed.py: one rank of a 2-process gloo DDP run of DST.

Each rank trains the same small MLP on its own shard of the digits data with every DST
method (RigL and SET first), rewiring every 4 steps, and writes the mask fingerprint
after every update to ``<out>/rank<r>.json`` so the test can compare ranks.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from prunelab import distributed
from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.training import TrainConfig, make_optimizer, train
from prunelab.methods import PruneSpec
from prunelab.methods.dst import DSTConfig, build_dst_sparsifier
from torchrun_exit import finish  # tests/ helper (this script runs from tests/)

METHODS = ("rigl", "set", "snfs", "dsr", "static")


def run_method(name: str, train_loader) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, progress=False)
    total = config.epochs * len(train_loader)
    sparsifier = build_dst_sparsifier(name, model, PruneSpec(sparsity=0.8), total, seed=0, dst=DSTConfig(delta_t=4))
    optimizer = make_optimizer(model.parameters(), config)
    sparsifier.prepare(optimizer)
    fingerprints = [sparsifier.masks.fingerprint()]

    def after_step(_step: int) -> None:
        updates = len(sparsifier.history)
        sparsifier.step()
        if len(sparsifier.history) > updates:
            fingerprints.append(sparsifier.masks.fingerprint())

    train(model, train_loader, config, optimizer=optimizer, after_step=after_step)
    masks = sparsifier.finalize()  # raises unless every rank holds bit-identical masks
    return {
        "fingerprints": fingerprints,
        "sparsity": masks.stats().sparsity,
        "kept": {l.name: l.kept for l in masks.stats().layers},
        "zeros_held": all(bool(torch.all(p[~masks[n]] == 0)) for n, p in sparsifier.params.items()),
        "steps": sparsifier.step_count,
        "weight_sum": float(sum(p.double().sum() for p in model.parameters())),
    }


def main(out: Path) -> None:
    assert distributed.init_from_env(), "run me under torchrun"
    rank = distributed.rank()
    train_loader, _ = make_loaders(load_dataset("digits"), batch_size=32, seed=0)  # one shard per rank
    first_inputs, _ = next(iter(train_loader))
    record = {"rank": rank, "world_size": distributed.world_size(), "shard_sum": float(first_inputs.double().sum()),
              "methods": {name: run_method(name, train_loader) for name in METHODS}}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
