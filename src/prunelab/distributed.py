"""The few torch.distributed helpers prunelab needs, world-size-1 safe.

Single-process runs are the world-size-1 case of the same code: every helper here is a
no-op (or the identity) when ``torch.distributed`` is not initialised, so callers never
branch on "am I distributed?" themselves (DESIGN.md, decision 3).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from prunelab.errors import PrunelabError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: str = "gloo") -> bool:
    """Initialise the default process group when launched by ``torchrun``.

    Returns True when a process group is (now) initialised.  Without the ``torchrun``
    environment variables this does nothing and returns False.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    dist.init_process_group(backend=backend)
    return True


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all ranks: ``x <- (1/W) sum_r x_r`` (identity for world size 1).

    Needs a floating-point (or complex) tensor, checked before any communication, on every
    world size: an integer one cannot hold the mean, and would otherwise be left holding
    the sum when the division failed.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise PrunelabError(f"all_reduce_mean_ needs a floating-point tensor, got dtype {tensor.dtype}; "
                            "pass tensor.float() (or .double() for exact integer sums)")
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s copy (identity for world size 1)."""
    if is_distributed() and world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def shutdown() -> None:
    """Wait for every rank, then tear the process group down (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
