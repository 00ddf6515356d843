"""The few torch.distributed helpers prunelab needs, world-size-1 safe.

Single-process runs are the world-size-1 case of the same code: every helper here is a
no-op (or the identity) when ``torch.distributed`` is not initialised, so callers never
branch on "am I distributed?" themselves (DESIGN.md, decision 3).

Collectives accept tensors on any device: under a pure ``nccl`` group a CPU tensor is
staged through the current CUDA device; under ``cpu:gloo,cuda:nccl`` (what
:func:`init_from_env` picks on a GPU host) each tensor goes through its own device's backend.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist

from prunelab.errors import PrunelabError

# the backend init_from_env picks on a GPU host: CUDA tensors through NCCL, CPU tensors
# (scores of a CPU model, fingerprints, flags) through gloo, in one process group
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def launch_settings(env: Mapping[str, str], cuda_devices: int) -> tuple[str, int | None]:
    """``(backend, CUDA device index or None)`` for a ``torchrun`` launch: a pure function
    of the environment and the number of visible CUDA devices.

    With CUDA devices and ``LOCAL_RANK`` set, each process owns ``cuda:LOCAL_RANK`` and the
    backend is :data:`GPU_BACKEND` (NCCL for CUDA tensors, gloo for CPU ones); otherwise
    ``("gloo", None)``.  A ``LOCAL_RANK`` beyond the visible devices is an error, not a
    silent share of ``cuda:0``.
    """
    local = env.get("LOCAL_RANK")
    if cuda_devices <= 0 or local is None:
        return "gloo", None
    try:
        index = int(local)
    except ValueError:
        raise PrunelabError(f"LOCAL_RANK must be an integer, got {local!r}; launch with torchrun") from None
    if not 0 <= index < cuda_devices:
        raise PrunelabError(
            f"LOCAL_RANK {index} has no CUDA device: {cuda_devices} visible; launch at most {cuda_devices} "
            "processes per node (--nproc_per_node) or check CUDA_VISIBLE_DEVICES"
        )
    return GPU_BACKEND, index


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by ``torchrun``.

    Returns True when a process group is (now) initialised.  Without the ``torchrun``
    environment variables this does nothing and returns False.  On a host with CUDA and
    ``LOCAL_RANK`` set, the process first makes ``cuda:LOCAL_RANK`` its current device
    (``torch.cuda.set_device``; otherwise every rank would land on ``cuda:0``) and
    ``backend=None`` means :data:`GPU_BACKEND`; on a CPU host it means ``"gloo"``
    (:func:`launch_settings`).  An explicit ``backend`` is passed through as given.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    chosen, device = launch_settings(os.environ, cuda_devices)
    if device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(backend=chosen if backend is None else backend)
    return True


def _collective(tensor: torch.Tensor, op: Callable[[torch.Tensor], object]) -> None:
    """Run ``op`` on ``tensor``, staged through the current CUDA device under a pure NCCL
    group when ``tensor`` is not on CUDA (NCCL moves CUDA tensors only)."""
    if tensor.device.type != "cuda" and dist.get_backend() == "nccl":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        op(staged)
        tensor.copy_(staged)
    else:
        op(tensor)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks: ``x <- sum_r x_r`` (identity for world size 1).

    Exact for integer tensors (row counts) and one rounding per addition for floating
    ones, on any world size (unlike ``mean * world``).  Bool tensors are refused: add
    them as integers.
    """
    if tensor.dtype == torch.bool:
        raise PrunelabError("all_reduce_sum_ needs a numeric tensor, got dtype torch.bool; pass tensor.long()")
    if is_distributed() and world_size() > 1:
        _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` in place over all ranks (identity for world size 1)."""
    if tensor.dtype == torch.bool:
        raise PrunelabError("all_reduce_max_ needs a numeric tensor, got dtype torch.bool; pass tensor.long()")
    if is_distributed() and world_size() > 1:
        _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all ranks: ``x <- (1/W) sum_r x_r`` (identity for world size 1).

    Needs a floating-point (or complex) tensor, checked before any communication, on every
    world size: an integer one cannot hold the mean, and would otherwise be left holding
    the sum when the division failed.  For sums use :func:`all_reduce_sum_`.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise PrunelabError(f"all_reduce_mean_ needs a floating-point tensor, got dtype {tensor.dtype}; "
                            "pass tensor.float(), or use all_reduce_sum_ for integer sums")
    if is_distributed() and world_size() > 1:
        all_reduce_sum_(tensor).div_(world_size())
    return tensor


def first_rank_where(condition: bool) -> int | None:
    """The lowest rank on which ``condition`` holds, the same answer on every rank; None
    when it holds nowhere.  One 1-element MIN all-reduce (no communication for world size 1).

    Every rank must call it at the same point: it is how ranks agree to stop together
    (a rank that raised alone would leave its peers blocked in their next collective).
    """
    world = world_size()
    code = torch.tensor([rank() if condition else world], dtype=torch.int64)
    if is_distributed() and world > 1:
        _collective(code, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN))
    first = int(code.item())
    return first if first < world else None


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s copy (identity for world size 1)."""
    if is_distributed() and world_size() > 1:
        _collective(tensor, lambda t: dist.broadcast(t, src=src))
    return tensor


def broadcast_text(text: str, src: int = 0) -> str:
    """Rank ``src``'s ``text`` on every rank (``text`` itself for world size 1): its UTF-8
    length, then its bytes, in two broadcasts (what the other ranks pass is ignored)."""
    if not (is_distributed() and world_size() > 1):
        return text
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)  # (bytes,)
    size = int(broadcast_(torch.tensor([data.numel()], dtype=torch.int64), src).item())
    if size == 0:
        return ""
    buffer = data if rank() == src else torch.zeros(size, dtype=torch.uint8)
    return bytes(broadcast_(buffer, src).tolist()).decode("utf-8")


def raise_on_every_rank(error: PrunelabError | None) -> None:
    """Raise on every rank the error of the lowest rank that has one; nothing when no rank has one.

    Every rank must call it at the same point, with the error it caught there (or None): a rank
    that raised alone would leave its peers blocked in their next collective until the launcher
    kills them.  One 1-element all-reduce when no rank failed (:func:`first_rank_where`), two
    broadcasts of the message when one did.  For world size 1 ``error`` is re-raised as it is;
    otherwise every rank raises the same one-line message, ``"<message> (on rank r of W)"``.
    """
    first = first_rank_where(error is not None)
    if first is None:
        return
    if error is not None and world_size() == 1:
        raise error
    text = broadcast_text(str(error) if rank() == first else "", src=first)
    raise PrunelabError(f"{text} (on rank {first} of {world_size()})") from error


@contextmanager
def errors_on_every_rank() -> Iterator[None]:
    """Run the block; a PrunelabError it raises on any rank is raised on every rank when it ends
    (:func:`raise_on_every_rank`).  Wrap the rank-local part of a computation (e.g. the loop
    over a rank's own batches) that precedes a collective; every rank must enter it.

    With more than one rank any other exception (a TypeError from a user's loss_fn, an
    out-of-memory error on one rank) is agreed on too, as ``"TypeError: <its first line>"``:
    a rank that raised it alone would skip the agreement and leave its peers' collectives
    mismatched.  For a single process such an exception passes through unchanged."""
    error: PrunelabError | None = None
    try:
        yield
    except PrunelabError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 -- any failure of one rank must reach the others
        if not (is_distributed() and world_size() > 1):
            raise
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        error = PrunelabError(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)
        error.__cause__ = exc
    raise_on_every_rank(error)


def shutdown(failed: bool | None = None) -> None:
    """Tear the process group down (no-op when not distributed).

    On success every rank first waits at a barrier, so no rank closes its connections while
    a peer still talks to it.  On failure (``failed=True``, or ``None`` while an exception
    is being raised or handled: a ``finally:`` or ``except:`` block) the barrier is skipped: a peer may be
    blocked in a collective this rank never joined, or may have failed first, and a
    barrier would then hang (or pair up with that collective).  The group is destroyed
    directly; the peers' pending collectives then fail when this process exits.
    """
    if not is_distributed():
        return
    if failed is None:
        failed = sys.exc_info()[0] is not None
    if not failed:
        dist.barrier()
    dist.destroy_process_group()
