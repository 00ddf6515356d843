"""The criterion contract: ``Criterion(model, params, data) -> {FQN: score}``.

A criterion is the *score* step of the pipeline (DESIGN.md): it maps each parameter in
``params`` to a float32 importance tensor of the same shape (higher = keep).  It is pure:
parameters, their ``.grad``, buffers and the train/eval flags of every module are the
same after the call as before.  Data-driven criteria therefore

* compute gradients with :func:`torch.autograd.grad` / :mod:`torch.func` on detached
  leaf aliases of the parameters (``torch.func.functional_call``), never ``.backward()``,
  so ``.grad`` is never written and frozen (``requires_grad=False``) weights can be scored;
* run the model in **eval mode** (dropout off, batch norm on running statistics, so no
  buffer is updated and the scores are deterministic for given data -- the same on every
  rank, DESIGN.md decision 3), restoring every module's own ``training`` flag afterwards.

Groups: :meth:`Criterion.reduce_group` turns a ``(..., group_size)`` tensor of element
scores into one score per group (default: the sum), e.g. ``l2`` uses ``sqrt(sum)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import distributed
from prunelab.errors import PrunelabError

NO_BATCHES = "ScoreData yielded no batches; pass a non-empty loader"


@dataclass
class ScoreData:
    """What a data-driven criterion scores on.

    ``batches``: an iterable of ``(inputs, targets)`` pairs, e.g. a ``DataLoader``; it is
    iterated once per criterion call, so pass a re-iterable object (not a generator) when
    scoring more than once.  ``loss_fn(outputs, targets)`` must return a scalar (a mean
    over the batch).  ``max_batches``: stop after this many batches (``None``: all).
    """

    batches: Iterable[tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    max_batches: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batches, (str, bytes)) or not (
            hasattr(type(self.batches), "__iter__") or hasattr(type(self.batches), "__getitem__")
        ):
            raise PrunelabError(
                f"ScoreData got batches of type {type(self.batches).__name__}; expected an iterable of "
                "(inputs, targets) pairs, e.g. a DataLoader or a list of tuples"
            )
        if not callable(self.loss_fn):
            raise PrunelabError(
                f"ScoreData got loss_fn={self.loss_fn!r}; expected a callable loss_fn(outputs, targets) -> scalar "
                "tensor, e.g. torch.nn.functional.cross_entropy"
            )
        if self.max_batches is not None and (
            isinstance(self.max_batches, bool) or not isinstance(self.max_batches, int) or self.max_batches < 1
        ):
            raise PrunelabError(
                f"ScoreData got max_batches={self.max_batches!r}; expected a positive int or None (all batches)"
            )


class Criterion:
    """Base class: subclasses set ``name``/``needs_data`` and implement :meth:`score`.

    ``__call__`` checks the inputs, keeps the model's modes intact and normalises the
    result (detached float32 tensors with the parameters' shapes and devices); a NaN score
    (NaN/inf weights or data) is a PrunelabError naming the parameter.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    #: False for a criterion that scores each parameter on its own and may warn or refuse about
    #: one it cannot score (slimming: a layer with no BatchNorm): the Sparsifier then asks it
    #: only for the layers its rules let it prune.  True (the default) scores every target
    #: layer, so scores that depend on the whole set (a random stream, a global normaliser)
    #: do not change with the rules.
    scores_kept_dense: ClassVar[bool] = True

    def __call__(
        self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None = None
    ) -> dict[str, Tensor]:
        if self.needs_data and data is None:
            raise PrunelabError(
                f"criterion {self.name!r} needs data: pass data=ScoreData(loader) in Python or --dataset on the CLI"
            )
        if data is not None and not isinstance(data, ScoreData):
            raise PrunelabError(
                f"criterion {self.name!r} got data of type {type(data).__name__}; expected ScoreData(loader, ...)"
            )
        if not isinstance(params, Mapping):
            raise PrunelabError(
                f"criterion {self.name!r} got params of type {type(params).__name__}; expected a mapping "
                "FQN -> parameter, e.g. dict(model.named_parameters())"
            )
        if not params:
            return {}
        if self.needs_data:
            with eval_mode(model), torch.enable_grad():
                raw = self.score(model, params, data)
        else:
            with torch.no_grad():
                raw = self.score(model, params, data)
        out: dict[str, Tensor] = {}
        nan: PrunelabError | None = None
        for name, param in params.items():
            score = raw[name].detach().to(device=param.device, dtype=torch.float32)
            if score.shape != param.shape:  # a bug in the criterion, not a user error
                raise RuntimeError(f"{self.name}: score of {name} has shape {tuple(score.shape)}, not {tuple(param.shape)}")
            if nan is None and bool(torch.isnan(score).any()):  # never a valid score: the allocators would keep too few
                nan = PrunelabError(
                    f"criterion {self.name!r} gave NaN scores for {name!r}; check the weights and the ScoreData "
                    "batches for NaN/inf values (and the loss for overflow)"
                )
            out[name] = score
        # agreed: a NaN on one rank only (replicas that differ, a criterion that reduces nothing itself) would
        # otherwise leave the other ranks in the caller's next collective
        distributed.raise_on_every_rank(nan)
        return out

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        """Element scores, one tensor per FQN in ``params`` (higher = keep)."""
        raise NotImplementedError

    def reduce_group(self, scores: Tensor) -> Tensor:
        """``(..., group_size)`` element scores -> ``(...)`` group scores: the sum."""
        return scores.sum(-1)


class eval_mode:
    """Put ``model`` in eval mode; restore every module's own ``training`` flag on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, flag in self.flags:
            module.training = flag


class FunctionalModel:
    """Call ``model`` with some parameters replaced, without touching the parameters.

    Resolves the FQNs in ``params`` against the model (unwrapping a
    ``DistributedDataParallel`` wrapper, whose FQNs start with ``module.``, so no DDP
    reducer hook expects a backward that never comes).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        prefix = ""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model, prefix = model.module, "module."
        own = dict(model.named_parameters(remove_duplicate=False))
        self.module = model
        self.local: dict[str, str] = {}  # FQN as given -> FQN inside self.module
        # FQN as given -> the first given FQN of the same (tied) parameter: functional_call
        # takes one tensor per tied parameter, so only representatives are passed.
        self.representative: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name in params:
            local = name[len(prefix):] if prefix and name.startswith(prefix) else name
            if local not in own:
                raise PrunelabError(
                    f"parameter {name!r} is not in the model; pass FQNs from model.named_parameters()"
                )
            self.local[name] = local
            self.representative[name] = first_name.setdefault(id(own[local]), name)
        first = next(iter(params.values()))
        self.device = first.device

    def __call__(self, tensors: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
        """Forward ``inputs`` with ``tensors`` (keyed by the given FQNs) in place of the parameters.

        Of several FQNs of one tied parameter only the first given one's tensor is used (it
        replaces every alias); give aliases the same tensor (:func:`leaves` does) so each
        gets the gradient of all uses.
        """
        replaced = {
            self.local[name]: t for name, t in tensors.items() if self.representative.get(name, name) == name
        }
        return torch.func.functional_call(self.module, replaced, (inputs,))


def iter_batches(data: ScoreData, device: torch.device, allow_empty: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` pairs on ``device``, at most ``data.max_batches`` of them; errors if
    none, unless ``allow_empty`` (then the caller checks with :func:`batches_over_ranks`).

    Exactly ``max_batches`` batches are drawn from ``data.batches``: the loop stops right
    after yielding the last one, so no further batch is loaded (and lost, for a one-pass
    iterator or a loader with side effects).
    """
    count = 0
    for batch in data.batches:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:  # a bare tensor would unpack along dim 0
            raise PrunelabError(
                f"ScoreData batch {count} is a {type(batch).__name__}, not an (inputs, targets) pair; "
                "yield (x, y) from the loader"
            )
        inputs, targets = batch
        count += 1
        yield _to(inputs, device), _to(targets, device)
        if data.max_batches is not None and count >= data.max_batches:
            break  # before asking the loader for another batch
    if count == 0 and not allow_empty:
        raise PrunelabError(NO_BATCHES)


def batches_over_ranks(count: int) -> int:
    """``sum_r count_r``: the number of batches scored on all ranks (``count`` for a single
    process), exact (an integer all-reduce); the same PrunelabError on every rank when it is 0.

    A rank with an empty shard adds nothing to sums over the union of the data, so it is no
    error while another rank has batches.  Every rank must call it.
    """
    total = int(distributed.all_reduce_sum_(torch.tensor([count], dtype=torch.int64)).item())
    if total == 0:
        raise no_batches_error()
    return total


def no_batches_error() -> PrunelabError:
    """The one-line error for ScoreData that yielded no batches (on any rank, under torch.distributed)."""
    world = distributed.world_size()
    if world == 1:
        return PrunelabError(NO_BATCHES)
    return PrunelabError(f"ScoreData yielded no batches on any of the {world} ranks; pass a non-empty loader")


@contextmanager
def batch_errors(criterion: str, inputs: object, targets: object) -> Iterator[None]:
    """Re-raise an error of running the model (or ``loss_fn``) on one ScoreData batch as a
    one-line PrunelabError naming the criterion and the batch's shapes (e.g. inputs that do
    not fit the first layer, targets that do not fit the loss).  Out-of-memory errors and
    PrunelabErrors pass through unchanged."""
    try:
        yield
    except PrunelabError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        text = str(exc)
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text:
            raise
        detail = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise PrunelabError(
            f"criterion {criterion!r} could not run the model and loss_fn on a ScoreData batch (inputs "
            f"{_shape(inputs)}, targets {_shape(targets)}): {detail}; check that the loader yields inputs the "
            "model accepts and targets its loss_fn accepts"
        ) from exc


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _to(value: Tensor, device: torch.device) -> Tensor:
    return value.to(device) if isinstance(value, Tensor) else value


def batch_loss(data: ScoreData, outputs: Tensor, targets: Tensor) -> Tensor:
    """``data.loss_fn(outputs, targets)``, checked to be a scalar."""
    loss = data.loss_fn(outputs, targets)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise PrunelabError(
            f"ScoreData.loss_fn returned {shape}; expected a scalar tensor (use reduction='mean')"
        )
    return loss


def leaves(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached aliases of ``params`` (no copy) that require grad: gradient targets that
    leave the parameters' ``.grad`` and ``requires_grad`` untouched.  FQNs of one tied
    parameter (the same tensor object) share one leaf, so each gets the full gradient."""
    shared: dict[int, Tensor] = {}
    out = {}
    for name, p in params.items():
        if id(p) not in shared:
            shared[id(p)] = p.detach().requires_grad_(True)
        out[name] = shared[id(p)]
    return out
