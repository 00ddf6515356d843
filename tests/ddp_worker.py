"""Worker for tests/test_distributed.py: one rank of a 2-process gloo DDP run.

Each rank sees a different shard of the data, scores the model with a data-driven
criterion (taylor), prunes, trains several DDP steps in two train() calls (as a round of
retraining does; each epoch records its DistributedSampler epoch and this rank's sample
order) and writes what it holds to ``<out>/rank<r>.json`` so the test can compare ranks.
"""

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

from prunelab import distributed
from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.training import TrainConfig, make_optimizer, seed_everything, train
from prunelab.criteria import ScoreData
from prunelab.criteria.base import iter_batches
from prunelab.errors import PrunelabError
from prunelab.sparsifier import Sparsifier
from torchrun_exit import finish  # tests/ helper (this script runs from tests/)


def main(out: Path) -> None:
    assert distributed.init_from_env(), "run me under torchrun"
    rank = distributed.rank()
    seed_everything(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    splits = load_dataset("digits")
    train_loader, _ = make_loaders(splits, batch_size=32, seed=0)  # DistributedSampler: a shard per rank
    data = ScoreData(train_loader, max_batches=3)

    # this rank's own shard (taylor itself now reduces over the ranks, so its scores agree)
    local_fp = float(sum(x.double().sum() for x, _ in iter_batches(data, torch.device("cpu"))))

    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, progress=False)
    optimizer = make_optimizer(model.parameters(), config)
    sparsifier = Sparsifier(model, criterion="taylor", data=data).prepare(optimizer)
    sparsifier.update(0.75)
    sampler = train_loader.sampler
    epochs, orders = [], []

    def after_epoch(_epoch: int) -> None:
        epochs.append(sampler.epoch)
        orders.append(list(iter(sampler)))  # this rank's indices in the epoch just trained

    wrappers = []  # a weak reference to the DDP wrapper each train() call builds

    class RecordedDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrappers.append(weakref.ref(self))

    nn.parallel.DistributedDataParallel = RecordedDDP  # train() looks the class up at call time
    gc.disable()  # so a wrapper found freed was freed by train() itself
    wrappers_freed = []
    for call in range(2):  # two train() calls, as rounds of retraining make (each with a fresh optimizer)
        if call:
            optimizer = make_optimizer(model.parameters(), config)
            sparsifier.prepare(optimizer)
        train(model, train_loader, config, optimizer=optimizer, after_step=lambda _s: sparsifier.step(),
              after_epoch=after_epoch)
        wrappers_freed.append(len(wrappers) == call + 1 and wrappers[-1]() is None)
    gc.enable()
    masks = sparsifier.finalize()
    ints = torch.arange(3)
    try:
        distributed.all_reduce_mean_(ints)
        int_mean_refused = False
    except PrunelabError:
        int_mean_refused = torch.equal(ints, torch.arange(3))  # refused before any communication
    zeros_held = all(bool(torch.all(p[~masks[n]] == 0)) for n, p in sparsifier.params.items())
    record = {
        "rank": rank,
        "world_size": distributed.world_size(),
        "local_score_sum": local_fp,
        "mask_fingerprint": masks.fingerprint(),
        "sparsity": masks.stats().sparsity,
        "zeros_held": zeros_held,
        "steps": sparsifier.step_count,
        "weight_sum": float(sum(p.double().sum() for p in model.parameters())),
        "epochs": epochs,
        "orders": orders,
        "dataset_size": len(splits.train),
        "int_mean_refused": int_mean_refused,
        "int_sum": distributed.all_reduce_sum_(torch.tensor([rank + 1])).tolist(),
        "wrappers_freed": wrappers_freed,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
