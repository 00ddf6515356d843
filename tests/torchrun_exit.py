"""How the torchrun test workers end (they run from tests/, so they import this directly)."""

import gc
import os
import sys

from prunelab import distributed


def finish() -> None:
    """Barrier, tear gloo down, and leave without interpreter finalisation.

    DDP reducers are freed first, while the interpreter is whole.  Gloo threads still alive
    during finalisation can abort a finished process ("terminate called without an active
    exception", seen once in a fresh-clone test run), so the worker ends with ``os._exit(0)``
    once every rank has passed the barrier and its record is on disk.
    """
    gc.collect()
    distributed.shutdown()  # barrier first: no rank tears gloo down while its peer still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_parts(out, run_cases, parts=("uneven", "edges")) -> None:
    """A worker's life under a short gloo timeout: each part's cases, then an in-step sum, written after each part.

    ``run_cases(part, rank) -> dict``; ``<out>/rank<r>.json`` gets ``world_size``, every part's record
    and ``<part>_in_step`` (3.0 on 2 ranks: both reached the same collective after the part), so the
    earlier parts are checked even if a later one hangs.  A rank left waiting fails the run in seconds.
    """
    import datetime
    import json

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    torch.set_num_threads(1)
    rank = distributed.rank()
    record = {"rank": rank, "world_size": distributed.world_size()}
    for part in parts:
        record[part] = run_cases(part, rank)
        record[f"{part}_in_step"] = float(distributed.all_reduce_sum_(torch.tensor([rank + 1.0])).item())
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()
