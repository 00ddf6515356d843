"""Worker for tests/test_distributed.py: one rank of a 2-process gloo run that fails.

1. Only rank 1's loss becomes NaN (at its 3rd batch): every rank must raise the same
   PrunelabError at the same step (none blocks in the next gradient all-reduce), with the
   DDP wrapper already freed and the weights untouched by the NaN step.
2. Rank 1 fails outside any collective while rank 0 waits in an all-reduce: rank 1's
   ``shutdown()`` on the failure path must not wait at a barrier, and rank 0's pending
   all-reduce must then fail instead of hanging.

Writes ``<out>/rank<r>.json`` and leaves with ``os._exit(0)`` (the group is gone by then).
"""

import gc
import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from prunelab import distributed
from prunelab.bench.training import TrainConfig, train
from prunelab.errors import PrunelabError

wrappers = []  # weak references to every DDP wrapper train() builds


class RecordedDDP(nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wrappers.append(weakref.ref(self))


def nan_on_rank1(rank: int):
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if rank == 1 and len(calls) == 3 else loss

    return loss_fn


def main(out: Path) -> None:
    assert distributed.init_from_env(), "run me under torchrun"
    rank = distributed.rank()
    nn.parallel.DistributedDataParallel = RecordedDDP  # train() looks the class up at call time
    gc.disable()  # a wrapper freed below was freed by train(), not by a collector run in between
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    record = {"rank": rank, "world_size": distributed.world_size()}
    before_nan = {}

    def after_step(step: int) -> None:
        if step == 2:
            before_nan.update({k: v.clone() for k, v in model.state_dict().items()})

    start = time.monotonic()
    try:
        train(model, loader, TrainConfig(epochs=1, lr=0.1, progress=False), loss_fn=nan_on_rank1(rank),
              after_step=after_step)
        record["error"] = None
    except PrunelabError as error:
        record["error"] = str(error)
        record["wrapper_freed"] = len(wrappers) == 1 and wrappers[0]() is None  # even while the traceback lives
    gc.enable()
    record["nan_seconds"] = time.monotonic() - start
    record["weights_kept"] = all(torch.equal(v, before_nan[k]) for k, v in model.state_dict().items())
    record["weights_finite"] = all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    distributed.all_reduce_sum_(torch.zeros(1))  # the group still works after the agreed error

    start = time.monotonic()
    try:
        if rank == 1:
            raise RuntimeError("rank 1 fails outside any collective")
        distributed.all_reduce_sum_(torch.ones(1))  # rank 1 never joins
        record["peer_error"] = None
    except Exception as error:  # noqa: BLE001 - rank 0 sees whatever gloo raises when its peer leaves
        record["peer_error"] = type(error).__name__
        distributed.shutdown()  # the failure path: no barrier
    record["shutdown_seconds"] = time.monotonic() - start
    record["group_destroyed"] = not distributed.is_distributed()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the peer's sockets close with this process (rank 0's all-reduce then fails)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
