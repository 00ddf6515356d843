"""The training engine: a plain supervised loop that pruning plugs into via ``after_step``.

No pruning logic lives here.  A sparsifier (or any other hook) runs in
``after_step(global_step)``, which :func:`train` calls *after* ``optimizer.step()`` and
``scheduler.step()`` of every batch -- the place where masked weights must be re-zeroed
(Han et al. 2015 retrain with the pruned connections held at zero).

Under ``torch.distributed`` the model is wrapped in ``DistributedDataParallel`` for the
forward/backward only; the caller keeps (and hooks operate on) the same underlying
module, whose parameters DDP keeps identical on every rank.  A ``DistributedSampler``
shuffles by ``seed + epoch`` (the same on every rank), so :func:`train` numbers its epochs
on from the sampler's current epoch: consecutive calls draw fresh orders, as a
single-process shuffling loader (one generator advancing) does.
"""

from __future__ import annotations

import gc
import math
import numbers
import random
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm  # the terminal bar progress_bar draws (tests swap this name)

from prunelab import distributed
from prunelab.config import beyond_torch
from prunelab.errors import PrunelabError
from prunelab.progress import progress_bar

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "TrainConfig", "distributed_sampler", "evaluate", "make_lr_scheduler",
           "make_optimizer", "seed_everything", "train"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer, learning-rate schedule, epochs, seed.

    ``lr_schedule``: ``constant``; ``cosine`` (Loshchilov & Hutter 2017, SGDR, without
    restarts) decays per step to 0 over ``epochs * steps_per_epoch``; ``step`` multiplies
    the rate by ``gamma`` every ``step_epochs`` epochs.  ``epochs=0`` is allowed and
    trains nothing (e.g. no retraining between pruning rounds).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    lr_schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PrunelabError(f"unknown optimizer {self.optimizer!r}; valid names: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PrunelabError(f"unknown lr_schedule {self.lr_schedule!r}; valid names: {', '.join(LR_SCHEDULES)}")
        for name, minimum in (("epochs", 0), ("batch_size", 1), ("step_epochs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PrunelabError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise PrunelabError(f"{name} must be a number, got {type(value).__name__} {value!r}; "
                                    "pass a float such as 0.1")
        for name in ("epochs", "batch_size", "step_epochs", "lr", "weight_decay"):  # momentum, gamma: ranges below
            value = getattr(self, name)
            reason = beyond_torch(value, as_float=name in ("lr", "weight_decay"))
            if reason:
                raise PrunelabError(f"{name} {value!r} is too large for torch ({reason}); pass a realistic value")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PrunelabError(f"lr must be a positive number, got {self.lr!r}; try e.g. --lr 0.05")
        if not 0.0 <= self.momentum < 1.0:
            raise PrunelabError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise PrunelabError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise PrunelabError(f"gamma must be in (0, 1], got {self.gamma!r}")
        for name in ("nesterov", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise PrunelabError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise PrunelabError(
                f"nesterov=True needs optimizer 'sgd' with momentum > 0, got optimizer {self.optimizer!r} and "
                f"momentum {self.momentum}; drop nesterov or set a momentum"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise PrunelabError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PrunelabError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names: SGD (momentum, Nesterov), Adam or AdamW (Loshchilov & Hutter 2019)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _LRFactor:
    """Per-step learning-rate multiplier (a picklable callable, unlike a lambda)."""

    def __init__(self, schedule: str, total_steps: int, step_every: int, gamma: float) -> None:
        self.schedule, self.total_steps, self.step_every, self.gamma = schedule, total_steps, step_every, gamma

    def __call__(self, step: int) -> float:
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        if self.schedule == "step":
            return self.gamma ** (step // self.step_every)
        return 1.0


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to ``step()`` after every optimizer step, following ``cfg.lr_schedule``."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise PrunelabError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}; is the loader empty?")
    factor = _LRFactor(cfg.lr_schedule, max(cfg.epochs * steps_per_epoch, 1), cfg.step_epochs * steps_per_epoch,
                       cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule with its train/eval flag, to restore mixed modes (a frozen BatchNorm) exactly."""
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:  # parents before children: each call fixes a subtree, children win
        if module.training != training:
            module.train(training)


def _frozen_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The deliberately frozen subtrees' modes: an eval-mode submodule of a train-mode parent, and all below it.

    A model entirely in eval mode freezes nothing (an eval root is no freeze: it trains fully).
    """
    frozen: set[int] = set()
    for parent in model.modules():  # pre-order: a parent is marked before its children are visited
        for child in parent.children():
            if id(parent) in frozen or (parent.training and not child.training):
                frozen.add(id(child))
    return [(module, module.training) for module in model.modules() if id(module) in frozen]


def distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The ``DistributedSampler`` behind ``loader`` (its ``sampler`` or its ``batch_sampler``'s), else None."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def _check_finite(loss_value: float, step: int, description: str, optimizer: torch.optim.Optimizer,
                  lr_flag: str) -> None:
    """Raise the same one-line error on every rank at the same step if any rank's loss is not finite.

    All ranks take part in one 1-element all-reduce per step (a rank raising alone would
    leave its peers blocked in the next backward's gradient all-reduce).
    """
    bad = distributed.first_rank_where(not math.isfinite(loss_value))
    if bad is None:
        return
    seen = (f"{loss_value}" if distributed.world_size() == 1
            else f"non-finite on rank {bad} (first of {distributed.world_size()})")
    raise PrunelabError(
        f"training loss became {seen} at step {step} ({description}); lower the learning "
        f"rate ({lr_flag}, now {optimizer.param_groups[0]['lr']:.3g}) or check the data"
    )


def _release(wrapper: weakref.ref | None) -> None:
    """Free the DDP wrapper (its reducer holds gradient buckets the size of the model) now.

    Once :func:`train` has dropped its references only a reference cycle can keep it: the
    first ``DistributedDataParallel`` of a process imports ``torch._dynamo`` lazily from its
    ``__init__``; that import leaves its frames in cyclic garbage, and the chain of frames
    (``f_back``) reaches the ``__init__`` frame, whose ``self`` cell is the wrapper.  Only the
    cyclic collector frees it, so it runs then (once per process in practice), not per call.
    """
    if wrapper is not None and wrapper() is not None:
        gc.collect()


def train(
    model: nn.Module,
    train_loader: DataLoader,
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    after_step: Callable[[int], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    description: str = "train",
    skipped_steps: int = 0,
    lr_flag: str = "--lr",
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs over ``train_loader``.

    Per batch: ``zero_grad`` -> forward -> loss -> backward -> ``optimizer.step()`` ->
    ``scheduler.step()`` -> ``after_step(global_step)``, where ``global_step`` counts the
    optimizer steps taken by this call (1, 2, ...).  ``after_epoch(epoch)`` receives the
    number of completed epochs (1, 2, ...).  ``skipped_steps``: batches the loader leaves
    out of its first epoch(s) (a resumed run), taken off the progress bar's total.  Without ``optimizer`` one is made from
    ``cfg``; without ``scheduler`` one is made from ``cfg`` for the optimizer in use.
    Training runs in train mode, except for deliberately frozen submodules: one in eval
    mode whose parent module is in train mode on entry (mixed modes: a deliberate freeze,
    e.g. a BatchNorm frozen for fine-tuning) stays in eval mode, and its descendants keep
    their own modes, so a frozen BatchNorm keeps its running statistics.
    A model entirely in eval mode is no freeze: it trains fully in train mode.  The
    train/eval mode of the model and of each submodule is restored afterwards.

    With a ``DistributedSampler`` (:func:`distributed_sampler`), epoch ``e`` of this call
    shuffles with ``set_epoch(e0 + e)``, ``e0`` the sampler's epoch on entry, and the
    sampler is left at the next unused epoch (``e0`` + epochs begun, also after an error):
    every epoch of a multi-call run (rounds of retraining) gets its own order, the same on
    every rank.  To pin the order (a resumed run), ``set_epoch`` before calling.

    A non-finite loss raises :class:`PrunelabError` before its backward pass (the weights
    keep the last finite step) and names ``lr_flag`` as the learning rate to lower: the
    flag (or parameter) the caller's user set it with, e.g. ``--finetune-lr``; under ``torch.distributed`` the ranks agree on it each step
    (a 1-element all-reduce), so every rank raises the same error at the same step.  The
    DDP wrapper is released before :func:`train` returns or raises.

    Returns ``{"steps", "epochs", "final_loss"}`` (``final_loss``: the last batch's loss
    on this rank, NaN if no step ran).
    """
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        raise PrunelabError(f"the training loader ({type(train_loader).__name__}) has no length, which the lr "
                            "schedule and progress bar need; pass a DataLoader over a map-style dataset or a list "
                            "of batches") from None
    if cfg.epochs > 0 and steps_per_epoch == 0:
        raise PrunelabError("the training loader yields no batches; check the dataset and --batch-size")
    if optimizer is None:
        optimizer = make_optimizer(model.parameters(), cfg)
    if scheduler is None and cfg.epochs > 0:
        scheduler = make_lr_scheduler(optimizer, cfg, steps_per_epoch)
    device = _device_of(model)
    net: nn.Module = model
    if distributed.is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    wrapper = weakref.ref(net) if net is not model else None  # the DDP wrapper, to check it is freed
    sampler = distributed_sampler(train_loader)
    first_epoch = sampler.epoch if sampler is not None else 0
    epochs_begun = 0
    modes, frozen = _modes(model), _frozen_modes(model)
    model.train()
    _restore_modes(frozen)  # a frozen BatchNorm keeps its running statistics
    step, loss_value = 0, float("nan")
    # a bar on a terminal, a few plain lines in a log (no '\r'), nothing on other ranks or with --no-progress
    bar = progress_bar(max(0, cfg.epochs * steps_per_epoch - skipped_steps), description,
                       cfg.progress and distributed.is_main_process(), bar=tqdm)
    try:
        for epoch in range(cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(first_epoch + epoch)
            epochs_begun = epoch + 1
            for inputs, targets in train_loader:
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net(inputs), targets)
                loss_value = loss.item()
                _check_finite(loss_value, step + 1, description, optimizer, lr_flag)  # before backward: same step everywhere
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)  # before update: its line shows this step's loss
                bar.update(1)
            if after_epoch is not None:
                after_epoch(epoch + 1)
    finally:
        bar.close()
        _restore_modes(modes)
        if sampler is not None:
            sampler.set_epoch(first_epoch + epochs_begun)  # the next call draws a fresh order
        loss = net = None  # an error's traceback keeps this frame: drop the DDP wrapper (and the graph) now
        _release(wrapper)
    return {"steps": step, "epochs": cfg.epochs, "final_loss": loss_value}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: LossFn = F.cross_entropy) -> dict[str, float | int]:
    """Top-1 ``accuracy`` (fraction), ``error_pct``, mean ``loss`` and sample count ``n``.

    Runs in eval mode under ``torch.no_grad`` and restores the previous mode of the model
    and of each submodule.  ``loss_fn`` must accept ``reduction="sum"``.  Torch's global CPU
    generator is left as it was, even for a loader without a generator of its own (each pass
    over a DataLoader draws a worker seed): an evaluation never shifts later random draws.
    """
    device = _device_of(model)
    modes = _modes(model)
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.random.fork_rng(devices=[]):
        try:
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                logits = model(inputs)  # (B, num_classes)
                loss_sum += float(loss_fn(logits, targets, reduction="sum"))
                correct += int((logits.argmax(dim=1) == targets).sum())
                total += targets.numel()
        finally:
            _restore_modes(modes)
    if total == 0:
        raise PrunelabError("the evaluation loader yields no samples; check the dataset split")
    return {"accuracy": correct / total, "error_pct": 100.0 * (total - correct) / total, "loss": loss_sum / total,
            "n": total}
