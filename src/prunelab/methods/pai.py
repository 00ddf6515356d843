"""Pruning at initialisation (PaI): decide the mask on the untrained network, then train it sparse.

Every method here prunes ``model`` *as given* (call it on a freshly initialised model:
through the CLI pass ``--pretrain-epochs 0``), then trains the sparse network for
``config.epochs`` epochs while a :class:`~prunelab.sparsifier.Sparsifier` holds the
masked weights (and their optimizer state) at zero.  The returned rows are
``"pruned at init"`` (accuracy before training) and ``"trained"``.

=================  ==========================================================================
method             mask
=================  ==========================================================================
snip               SNIP, one shot (Lee et al. 2019)
grasp              GraSP, one shot (Wang et al. 2020)
force              FORCE, iterative SNIP with resurrection, ``FORCE_STEPS`` steps (de Jorge et al. 2021)
synflow            SynFlow, ``SYNFLOW_ROUNDS`` rounds, keep ``(1 - s)^(k/R)`` (Tanaka et al. 2020)
random-erk         random scores, ERK layer densities (Evci et al. 2020; Liu et al. 2022)
random-uniform     random scores, every layer at the target sparsity
pai                ``spec.criterion`` in one shot at init (e.g. magnitude at init)
pai-shuffled       ``pai``, then each layer's mask permuted at random (Frankle et al. 2021)
pai-reinit         ``pai``, then the kept weights re-drawn from the default init (Frankle et al. 2021)
=================  ==========================================================================

Layer budgets follow ``spec.allocation`` (default ``global``) and ``spec.keep_first`` /
``keep_last`` / ``exclude``, except ``random-*`` which set their own.  Data-driven
criteria score on ``score_data`` or, when it is ``None``, on the first
``spec.score_batches`` batches of ``train_loader``.  SynFlow takes the input shape from
``score_data`` or else from the first batch of ``test_loader`` (only its shape).

The ablations of Frankle, Dziugaite, Roy & Carbin 2021 ("Pruning Neural Networks at
Initialization: Why Are We Missing the Mark?") are plain functions --
:func:`shuffle_within_layers` and :func:`reinitialise_kept` -- and the methods
``pai-shuffled`` / ``pai-reinit`` apply them to any criterion from the command line::

    prunelab prune --method pai-shuffled --criterion snip --pretrain-epochs 0 --sparsity 0.95
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.bench.training import TrainConfig, make_lr_scheduler, make_optimizer, train
from prunelab.criteria import Criterion, ScoreData, get_criterion
from prunelab.criteria.pai import SynFlow, loss_gradients
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.methods.base import (
    MethodResult, PruneSpec, raise_sparsity, require_loader, require_test_loader, stage_row,
)
from prunelab.schedules import Geometric
from prunelab.sparsifier import Sparsifier
from prunelab.structure import Granularity, get_granularity, layer_granularities
from prunelab.targets import prunable_parameters

EpochHook = Callable[[int], None]  # after_epoch(epoch): epoch 1, 2, ... of the sparse training, masks applied
FORCE_STEPS = 20  # de Jorge et al. run many more; 20 keeps the method cheap (pass steps=... in Python)
SYNFLOW_ROUNDS = 100  # Tanaka et al.'s default number of rounds


# --- ablations (Frankle et al. 2021) --------------------------------------------------------
def _check_seed(seed: object, what: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrunelabError(f"{what} got seed={seed!r}; expected an int (e.g. seed=0)")
    return seed


def shuffle_within_layers(masks: Mapping[str, Tensor], seed: int,
                          granularity: str | Granularity = "unstructured", *, model: nn.Module | None = None) -> MaskSet:
    """Randomly permute each layer's mask: per-layer kept counts stay exactly the same.

    Frankle et al. 2021's "random shuffling" ablation: if a PaI method's accuracy
    survives it, the method only chose *how many* weights each layer keeps, not which.
    Deterministic: one CPU generator seeded with ``seed`` draws ``randperm(num_groups)``
    layer by layer in the order of ``masks``.  ``granularity``: the structure the mask was
    decided in; whole groups (weights, kernels, channels...) are permuted, so a structured
    mask stays structured.  An N:M pattern has no groups to permute and is refused.
    ``model``: the model the masks belong to, so each layer is grouped in its own layout
    (a ``ConvTranspose``'s channels are its weight's dim 1, :func:`layer_granularities`);
    without it every mask is grouped along dim 0.
    """
    _check_seed(seed, "shuffle_within_layers")
    granular = _shuffle_granularity(granularity)
    structures = layer_granularities(granular, model, masks) if model is not None else {}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shuffled = {}
    for name, mask in masks.items():
        shape, structure = tuple(mask.shape), structures.get(name, granular)
        groups = structure.to_groups(mask.detach().to(device="cpu", dtype=torch.bool))  # (G, group_size)
        alive = groups.any(dim=1) if groups.shape[1] else torch.zeros(groups.shape[0], dtype=torch.bool)  # (G,)
        if groups.shape[1] and not bool((groups.all(dim=1) | ~alive).all()):  # a partly kept group
            raise PrunelabError(
                f"mask {name!r} keeps parts of some {structure.describe()} groups, so permuting whole groups would "
                "change its kept count; pass the granularity the mask was decided in (e.g. 'unstructured')"
            )
        perm = torch.randperm(alive.numel(), generator=generator)
        shuffled[name] = structure.from_groups(alive[perm], shape).contiguous().to(mask.device)
    return MaskSet(shuffled)


def _shuffle_granularity(granularity: str | Granularity) -> Granularity:
    structure = get_granularity(granularity)
    if structure.is_pattern:
        raise PrunelabError(f"shuffling within layers permutes whole groups, but {structure.describe()} is an N:M "
                            "pattern with none to permute; use an unstructured or structured granularity")
    return structure


def fresh_init(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` (on the CPU) re-initialised by every module's ``reset_parameters()``.

    The copy is drawn from the CPU generator seeded with ``seed`` inside
    ``torch.random.fork_rng``, so the global random state is left untouched and the
    result is the same on every device and rank.  Then a module that has no
    ``reset_parameters`` but its own parameters and a ``_reset_parameters`` (as
    ``nn.MultiheadAttention``, whose ``in_proj_weight`` it draws) calls that one, after
    its children, as in its constructor.  Modules with neither keep their values (a
    custom init in a model's ``__init__`` is not replayed; see :func:`redrawn_parameters`).
    """
    _check_seed(seed, "fresh_init")
    fresh = copy.deepcopy(model).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        for module in fresh.modules():
            private = getattr(module, "_reset_parameters", None)
            if not callable(getattr(module, "reset_parameters", None)) and callable(private) \
                    and any(True for _ in module.parameters(recurse=False)):
                private()
    return fresh


def redrawn_parameters(model: nn.Module) -> set[str]:
    """FQNs of the parameters :func:`fresh_init` re-draws: those of a module with
    ``reset_parameters`` (or below one), and those a module's own ``_reset_parameters`` draws."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if callable(getattr(module, "reset_parameters", None)):
            names.update(dot + n for n, _ in module.named_parameters(remove_duplicate=False))
        elif callable(getattr(module, "_reset_parameters", None)):
            names.update(dot + n for n, _ in module.named_parameters(recurse=False, remove_duplicate=False))
    return names


@torch.no_grad()
def reinitialise_kept(model: nn.Module, masks: Mapping[str, Tensor], seed: int) -> nn.Module:
    """Re-draw the kept weights of every masked parameter from its layer's default init;
    pruned entries become 0.  In place; returns ``model``.

    Frankle et al. 2021's "reinitialisation" ablation: if accuracy survives it, the
    method's mask does not depend on the particular initial values.  New values come
    from :func:`fresh_init` (``reset_parameters()`` under ``seed``); parameters without
    a mask (biases, norms) are left as they are.  A masked parameter that no
    ``reset_parameters()`` re-draws (:func:`redrawn_parameters`; a custom module's own
    ``nn.Parameter``) is refused before anything changes: it would silently keep its values.
    """
    _check_seed(seed, "reinitialise_kept")
    masks = masks if isinstance(masks, MaskSet) else MaskSet(masks)
    masks.check_model(model)
    stuck = sorted(set(masks) - redrawn_parameters(model))
    if stuck:
        raise PrunelabError(
            f"cannot re-initialise {', '.join(map(repr, stuck))}: no module on its path has reset_parameters(), so "
            "its values would stay as they are; give that module a reset_parameters() or exclude the parameter"
        )
    fresh = dict(fresh_init(model, seed).named_parameters())
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params[name]
        param.copy_(fresh[name].to(device=param.device, dtype=param.dtype) * mask.to(param.device))
    return model


# --- FORCE -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ForceSaliency(Criterion):
    """FORCE saliency (de Jorge, Sanyal, Behl, Torr, Rogez & Dokania 2021, "Progressive
    Skeletonization: Trimming more fat from a network at initialization")::

        S(theta) = | theta ⊙ dL(w)/dw |   at  w = theta ⊙ m

    the connection sensitivity of *every* initial weight ``theta`` (pruned ones too),
    with the gradient taken at the currently pruned network ``theta ⊙ m`` -- the model
    must hold ``theta ⊙ m`` when called.  ``initial`` holds ``theta`` by FQN.  Under
    ``torch.distributed`` the gradient is the mean over the batches of every rank
    (:func:`~prunelab.criteria.pai.loss_gradients`), taken before ``|.|``.
    """

    initial: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)
    name = "force"
    needs_data = True

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        grads = loss_gradients(model, params, data, criterion=self.name)  # at the model's (masked) weights
        return {n: (self.initial[n].double() * grads[n]).abs() for n in params}


# --- shared steps ----------------------------------------------------------------------------
def _sparsifier(model: nn.Module, spec: PruneSpec, criterion: Criterion, data: ScoreData | None,
                allocation: str | None = None) -> Sparsifier:
    return Sparsifier(model, criterion=criterion, granularity=spec.granularity,
                      allocation=allocation if allocation is not None else spec.allocation,
                      rules=spec.rules(), exclude=spec.exclude, data=data)


def _score_data(score_data: ScoreData | None, train_loader, spec: PruneSpec, method: str) -> ScoreData:
    if score_data is not None:
        return score_data
    require_loader(train_loader, "data to score on", method,
                   "pass a training DataLoader or score_data=ScoreData(batches)")
    return ScoreData(train_loader, max_batches=spec.score_batches)


def _input_shape(score_data: ScoreData | None, test_loader) -> tuple[int, ...] | None:
    """One sample's shape from the first batch of ``score_data`` or ``test_loader`` (only its shape).

    Starting a DataLoader iterator draws its base seed from the global generator, so the
    peek runs under ``torch.random.fork_rng``: the global random state is left as it was.
    """
    source = score_data.batches if score_data is not None else test_loader
    if source is None or not hasattr(source, "__iter__"):
        return None  # SynFlow then infers it from the model or says how to pass input_shape
    with torch.random.fork_rng(devices=[]):
        for batch in source:
            if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() >= 2:
                return tuple(int(d) for d in batch[0].shape[1:])
            break
    return None


def _criterion(name: str, seed: int, score_data: ScoreData | None, test_loader) -> Criterion:
    """``name`` built for a PaI run: random scores seeded with the run's seed, SynFlow
    with the input shape of the data."""
    if name == "synflow":
        return SynFlow(input_shape=_input_shape(score_data, test_loader))
    if name == "random":
        return get_criterion("random", seed=seed)
    return get_criterion(name)


def _check_loaders(train_loader, test_loader, config: TrainConfig, description: str) -> None:
    """Refuse missing loaders before anything is pruned: the model is left as it was given."""
    if config.epochs > 0:
        require_loader(train_loader, "a training loader to train the pruned network", description,
                       "pass the training DataLoader (or TrainConfig(epochs=0) to skip training)")
    require_test_loader(test_loader, description)


def train_sparse(model: nn.Module, sparsifier: Sparsifier, train_loader, config: TrainConfig,
                 description: str = "sparse training", after_epoch: EpochHook | None = None) -> None:
    """Train ``model`` for ``config.epochs`` epochs with the sparsifier's masks held fixed.

    ``after_epoch(epoch)`` runs after each epoch (1, 2, ...) with the masks applied, e.g. to
    evaluate a validation split for checkpoint selection.
    """
    if config.epochs == 0:
        return
    require_loader(train_loader, "a training loader to train the pruned network", description,
                   "pass the training DataLoader (or TrainConfig(epochs=0) to skip training)")
    optimizer = make_optimizer(model.parameters(), config)
    sparsifier.schedule = None
    sparsifier.prepare(optimizer)
    train(model, train_loader, config, optimizer=optimizer,
          scheduler=make_lr_scheduler(optimizer, config, len(train_loader)),
          after_step=lambda _step: sparsifier.step(), after_epoch=after_epoch, description=description)


def _finish(model: nn.Module, sparsifier: Sparsifier, train_loader, test_loader, spec: PruneSpec,
            config: TrainConfig, description: str, after_epoch: EpochHook | None = None, **extra: Any) -> MethodResult:
    rows = [stage_row("pruned at init", model, sparsifier.masks, test_loader, round=1,
                      target_sparsity=spec.sparsity, **extra)]
    train_sparse(model, sparsifier, train_loader, config, description, after_epoch)
    rows.append(stage_row("trained", model, sparsifier.masks, test_loader, round=1, target_sparsity=spec.sparsity,
                          **extra))
    return MethodResult(sparsifier.finalize(), rows, sparsifier.history)


def _one_shot(model, train_loader, test_loader, spec, config, criterion: Criterion, data: ScoreData | None,
              description: str, allocation: str | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    _check_loaders(train_loader, test_loader, config, description)
    sparsifier = _sparsifier(model, spec, criterion, data, allocation)
    sparsifier.prepare()
    sparsifier.update(spec.sparsity)
    return _finish(model, sparsifier, train_loader, test_loader, spec, config, description, after_epoch)


# --- methods ---------------------------------------------------------------------------------
def run_snip(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
             score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """SNIP at init (Lee et al. 2019): keep the top ``1 - s`` of ``|w dL/dw| / sum``, one shot, then train."""
    data = _score_data(score_data, train_loader, spec, "snip")
    return _one_shot(model, train_loader, test_loader, spec, config, get_criterion("snip"), data, "snip",
                     after_epoch=after_epoch)


def run_grasp(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
              score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """GraSP at init (Wang et al. 2020): remove the highest ``-w ⊙ Hg`` in one shot, then train."""
    data = _score_data(score_data, train_loader, spec, "grasp")
    return _one_shot(model, train_loader, test_loader, spec, config, get_criterion("grasp"), data, "grasp",
                     after_epoch=after_epoch)


def run_force(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
              score_data: ScoreData | None = None, after_epoch: EpochHook | None = None,
              steps: int = FORCE_STEPS) -> MethodResult:
    """FORCE (de Jorge et al. 2021): iterative SNIP on the pruned network, pruned weights may come back.

    Step ``t = 1..T`` keeps ``k_t = n (k / n)^(t/T)`` weights (an exponential decay of
    the kept count from ``n`` to ``k``, i.e. sparsity ``1 - (1 - s)^(t/T)``): it scores
    every initial weight with :class:`ForceSaliency` at the network pruned by step
    ``t - 1`` and keeps the top ``k_t`` of *all* weights (not only the survivors), then
    sets the model to ``theta ⊙ m_t``.  Each step re-reads ``score_data`` (fresh batches
    when it is a shuffling loader).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrunelabError(f"force got steps={steps!r}; expected an int >= 1 (e.g. {FORCE_STEPS})")
    data = _score_data(score_data, train_loader, spec, "force")
    _check_loaders(train_loader, test_loader, config, "force")
    initial = {n: p.detach().clone() for n, p in prunable_parameters(model, spec.exclude).items()}  # theta
    sparsifier = _sparsifier(model, spec, ForceSaliency(initial), data)
    sparsifier.check_target(spec.sparsity)  # an unreachable target fails before step 1 prunes the model
    sparsifier.prepare()
    schedule = Geometric(spec.sparsity, rounds=steps)
    for step in schedule.update_steps():
        sparsifier.masks = MaskSet.ones(sparsifier.params)  # FORCE may resurrect pruned weights
        sparsifier.update(schedule.sparsity_at(step))
        with torch.no_grad():  # the model becomes theta ⊙ m_t
            for name, param in sparsifier.params.items():
                param.copy_(initial[name])
        sparsifier.enforce()
    return _finish(model, sparsifier, train_loader, test_loader, spec, config, "force", after_epoch)


def run_synflow(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
                score_data: ScoreData | None = None, after_epoch: EpochHook | None = None,
                rounds: int = SYNFLOW_ROUNDS) -> MethodResult:
    """Iterative SynFlow (Tanaka et al. 2020, Algorithm 1), data-free, then train.

    Round ``k = 1..R`` rescores the pruned network and keeps the fraction
    ``(1 - s)^(k/R)`` of the weights (``spec.allocation``, default global; pruned weights
    stay pruned).  ``R`` defaults to 100 as in the paper.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrunelabError(f"synflow got rounds={rounds!r}; expected an int >= 1 (the paper uses {SYNFLOW_ROUNDS})")
    _check_loaders(train_loader, test_loader, config, "synflow")
    criterion = SynFlow(input_shape=_input_shape(score_data, test_loader))
    sparsifier = _sparsifier(model, spec, criterion, None)
    sparsifier.check_target(spec.sparsity)  # an unreachable target fails before round 1 prunes the model
    sparsifier.prepare()
    schedule = Geometric(spec.sparsity, rounds=rounds)
    for k in schedule.update_steps():
        raise_sparsity(sparsifier, schedule.sparsity_at(k))  # coarse groups may overshoot a round: never un-prune
    return _finish(model, sparsifier, train_loader, test_loader, spec, config, "synflow", after_epoch)


def run_random_erk(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
                   score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """Random pruning with Erdos-Renyi-Kernel densities ``eps (sum shape)/(prod shape)`` (Evci et al.
    2020; the baseline of Liu et al. 2022), seeded with ``config.seed``, then train."""
    criterion = get_criterion("random", seed=config.seed)
    return _one_shot(model, train_loader, test_loader, spec, config, criterion, None, "random-erk", "erk", after_epoch)


def run_random_uniform(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
                       score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """Random pruning with every layer at sparsity ``s`` (seeded with ``config.seed``), then train."""
    criterion = get_criterion("random", seed=config.seed)
    return _one_shot(model, train_loader, test_loader, spec, config, criterion, None, "random-uniform", "uniform",
                     after_epoch)


def _pai_mask(model, train_loader, test_loader, spec, config, score_data) -> tuple[Sparsifier, dict[str, Tensor]]:
    """Prune at init with ``spec.criterion`` in one shot; returns the sparsifier and the weights before pruning."""
    criterion = _criterion(spec.criterion, config.seed, score_data, test_loader)
    data = _score_data(score_data, train_loader, spec, f"pai {spec.criterion}") if criterion.needs_data else None
    _check_loaders(train_loader, test_loader, config, f"pai {spec.criterion}")
    sparsifier = _sparsifier(model, spec, criterion, data)
    before = {n: p.detach().clone() for n, p in sparsifier.params.items()}
    sparsifier.prepare()
    sparsifier.update(spec.sparsity)
    return sparsifier, before


def run_pai(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
            score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """Prune at init with any criterion (``spec.criterion``, e.g. magnitude at init) in one shot, then train."""
    sparsifier, _ = _pai_mask(model, train_loader, test_loader, spec, config, score_data)
    return _finish(model, sparsifier, train_loader, test_loader, spec, config, f"pai {spec.criterion}", after_epoch)


def run_pai_shuffled(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
                     score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """``pai``'s mask with each layer permuted (:func:`shuffle_within_layers`, seed ``config.seed``),
    on the original initial weights, then train (Frankle et al. 2021)."""
    structure = _shuffle_granularity(spec.granularity)  # refused before any scoring
    sparsifier, before = _pai_mask(model, train_loader, test_loader, spec, config, score_data)
    shuffled = shuffle_within_layers(sparsifier.masks, config.seed, structure, model=model)
    with torch.no_grad():
        for name, param in sparsifier.params.items():
            param.copy_(before[name])
    sparsifier.set_masks(shuffled)
    return _finish(model, sparsifier, train_loader, test_loader, spec, config, "pai shuffled", after_epoch)


def run_pai_reinit(model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
                   score_data: ScoreData | None = None, after_epoch: EpochHook | None = None) -> MethodResult:
    """``pai``'s mask on re-drawn initial weights (:func:`reinitialise_kept`, seed ``config.seed + 1``),
    then train (Frankle et al. 2021)."""
    sparsifier, _ = _pai_mask(model, train_loader, test_loader, spec, config, score_data)
    reinitialise_kept(model, sparsifier.masks, config.seed + 1)
    sparsifier.enforce()
    return _finish(model, sparsifier, train_loader, test_loader, spec, config, "pai reinit", after_epoch)
