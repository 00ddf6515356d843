"""Lottery tickets: iterative magnitude pruning with rewinding, resumable round by round.

Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks"), Algorithm / section 2: initialise ``theta_0``, train, prune ``p%`` of
the remaining weights of each layer by magnitude, reset the survivors to ``theta_0``,
repeat.  Frankle, Dziugaite, Roy & Carbin 2020 ("Linear Mode Connectivity and the
Lottery Ticket Hypothesis") rewind to ``theta_k``, the weights after ``k`` steps of the
first training run, instead of ``theta_0`` (late rewinding).

Rounds: round 0 trains the dense network from ``theta_0`` for all ``T`` steps
(``T = train.epochs x len(train_loader)``) and records ``theta_k`` (``rewind_step = k``;
``k = 0`` is ``theta_0``).  Round ``r >= 1`` keeps, in every layer ``l``, the
``round(n_l (1 - p_l)^r)`` largest-magnitude weights of round ``r - 1``'s trained ticket
among its survivors (so layer ``l`` is pruned by ``p_l`` of its remaining weights per
round: 20% by default, 10% for the output layer as in F&C's LeNet), resets every
parameter and buffer to ``theta_k``, applies the mask and trains again **from step k to
T** (Frankle et al. 2020, Algorithm 2: ``W_T = A^{k->T}(m * W_k)``): it runs the
remaining ``T - k`` optimizer steps, the learning-rate schedule continues at step ``k``
and the batches are those of steps ``k+1 .. T`` of the round's own data order (its first
``k`` batches are drawn and dropped, so epochs stay aligned with the run's steps).  The
optimizer state is *not* rewound (it is not saved at step ``k``): every round starts a
fresh optimizer (no momentum or Adam moments), as OpenLTH's reference implementation does
when it trains from a rewind point.  For ``k = 0`` this is plain training from step 0.  The *random reinitialisation* control
trains the same mask from a fresh initialisation (another seed) for all ``T`` steps from
step 0.

Every round records its sparsity, final test accuracy and the **early-stopping
iteration**: the step of minimum test loss among evaluations every ``eval_every`` steps
and at the end (F&C use a validation split; here the given ``test_loader``).  Steps are
iterations of the whole run (a round rewound to ``k`` evaluates at steps in ``k+1 .. T``);
a round's ``steps`` is the number of optimizer steps it ran (``T - k`` after rewinding).

Run folder (each file written atomically, each round folder swapped in whole)::

    out_dir/config.json                  the LotteryConfig + init fingerprint; resume refuses another config
    out_dir/round_000/rewind.safetensors theta_k (state_dict)
    out_dir/round_RRR/mask.safetensors   the round's MaskSet
    out_dir/round_RRR/weights.safetensors the trained ticket (state_dict)
    out_dir/round_RRR/metrics.json

``resume=True`` loads every finished round and continues after the last one;
``rounds`` may grow between runs (it is the only field allowed to change).  A damaged
file (unreadable, truncated, a round mask not fitting the model's prunable layers) stops
the resume with a PrunelabError naming it, before anything is written; deleting that round's folder (and the later ones) redoes the run
from that round, reusing the rounds before it.  Each round's randomness (data order:
the sampler's generator, or a ``DistributedSampler``'s epoch under DDP; dropout) is seeded
from ``(train.seed, round)``, so a resumed run computes the same numbers as an
uninterrupted one (on the same machine and device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.allocation import check_sparsity, select_top_k
from prunelab.bench.training import (
    TrainConfig, distributed_sampler, evaluate, make_lr_scheduler, make_optimizer, train,
)
from prunelab.criteria import ScoreData
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, ensure_writable_dir, write_json
from prunelab.masks import MaskSet
from prunelab.methods.base import MethodResult, PruneSpec, require_loader, require_test_loader
from prunelab.methods.lottery_folder import (
    check_resume, finished_rounds, fingerprint, folder_config, load_round, load_state, load_weights, save_state,
    snapshot,
)
from prunelab.methods.pai import fresh_init
from prunelab.schedules import Geometric
from prunelab.sparsifier import Sparsifier
from prunelab.targets import matching_layers, prunable_parameters

# Frankle & Carbin 2019, LeNet-300-100: Adam, lr 1.2e-3, mini-batches of 60.
LOTTERY_TRAIN = TrainConfig(epochs=5, batch_size=60, optimizer="adam", lr=1.2e-3, lr_schedule="constant",
                            weight_decay=0.0, seed=0, progress=False)


@dataclass(frozen=True)
class LotteryConfig:
    """How to search for lottery tickets.

    ``rounds``: pruning rounds after the dense round 0.  ``rate``: fraction of each
    layer's remaining weights pruned per round.  ``output_rate``: the rate of the last
    prunable layer (``None``: ``rate``).  ``layer_rates``: glob -> rate overrides (win
    over both).  ``rewind_step``: 0 rewinds to the initialisation, ``k`` to the weights
    after ``k`` optimizer steps of round 0.  ``train``: the training of every round (its
    ``seed`` seeds the initialisation and every round).  ``eval_every``: steps between
    test evaluations (for the early-stopping iteration).  ``reinit_rounds``: rounds that
    also train the random-reinitialisation control (``None``: every pruning round,
    ``()``: none).  ``exclude``: layer globs never pruned.
    """

    rounds: int = 5
    rate: float = 0.2
    output_rate: float | None = 0.1
    layer_rates: Mapping[str, float] = field(default_factory=dict)
    rewind_step: int = 0
    train: TrainConfig = field(default_factory=lambda: LOTTERY_TRAIN)
    eval_every: int = 100
    reinit_rounds: tuple[int, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, minimum in (("rounds", 0), ("rewind_step", 0), ("eval_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PrunelabError(f"LotteryConfig got {name}={value!r}; expected an int >= {minimum}")
        check_sparsity(self.rate, "per-round pruning rate")
        if self.output_rate is not None:
            check_sparsity(self.output_rate, "per-round pruning rate of the output layer")
        if not isinstance(self.train, TrainConfig):
            raise PrunelabError(f"LotteryConfig got train={self.train!r}; expected a TrainConfig(...)")
        if self.reinit_rounds is not None:
            rounds = tuple(self.reinit_rounds) if isinstance(self.reinit_rounds, (tuple, list, range)) else (None,)
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rounds):
                raise PrunelabError(
                    f"LotteryConfig got reinit_rounds={self.reinit_rounds!r}; expected pruning rounds (ints >= 1), "
                    "None for every round or () for none"
                )
            object.__setattr__(self, "reinit_rounds", rounds)
        if not isinstance(self.layer_rates, Mapping) or not all(isinstance(k, str) for k in self.layer_rates):
            raise PrunelabError(f"LotteryConfig got layer_rates={self.layer_rates!r}; expected a mapping from layer "
                                "globs to per-round rates, e.g. {'fc3': 0.1}")
        object.__setattr__(self, "layer_rates", dict(self.layer_rates))  # the caller's dict may change later
        exclude = self.exclude if self.exclude is not None else ()
        exclude = (exclude,) if isinstance(exclude, str) else exclude  # a bare glob: not its letters
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(p, str) for p in exclude):
            raise PrunelabError(f"LotteryConfig got exclude={self.exclude!r}; expected layer globs, e.g. ('fc3',)")
        object.__setattr__(self, "exclude", tuple(exclude))
        for pattern, rate in self.layer_rates.items():
            check_sparsity(rate, f"per-round rate for {pattern!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_rates"] = dict(self.layer_rates)
        data["reinit_rounds"] = None if self.reinit_rounds is None else list(self.reinit_rounds)
        data["exclude"] = list(self.exclude)
        return data

    def wants_reinit(self, round_index: int) -> bool:
        if round_index < 1:
            return False
        return self.reinit_rounds is None or round_index in self.reinit_rounds


@dataclass
class LotteryResult:
    """Per-round metrics and masks (index = round; round 0 is the dense network), the
    last round's trained ticket, the run folder and how many rounds were loaded from it."""

    rounds: list[dict[str, Any]]
    masks: list[MaskSet]
    model: nn.Module
    out_dir: Path
    resumed_rounds: int = 0


# --- small helpers -----------------------------------------------------------------------------
def derived_seed(seed: int, tag: str, round_index: int) -> int:
    """A seed for one purpose of one round, independent of everything else (sha256-derived)."""
    digest = hashlib.sha256(f"{seed}:{tag}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class _seeded:
    """Seed the global CPU generator (and, once CUDA is in use, every CUDA device's, which dropout on
    the GPU draws from) inside ``fork_rng``: the caller's state is restored afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        # only initialised devices: forking would otherwise start CUDA (on every visible GPU) for a CPU run
        self.devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self.fork = torch.random.fork_rng(devices=self.devices)

    def __enter__(self) -> None:
        self.fork.__enter__()
        torch.default_generator.manual_seed(self.seed)
        for device in self.devices:
            torch.cuda.default_generators[device].manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self.fork.__exit__(*exc)


def _reseed_loader(loader, seed: int) -> None:
    """Make the loader's shuffling a function of ``seed``: its sampler's generator, if it has one;
    a ``DistributedSampler`` (which shuffles epoch ``e`` by ``sampler.seed + e``, the same on every
    rank) is set to epoch ``seed``, where :func:`train` numbers the round's epochs from.  Either way
    a round's order does not depend on the rounds run before it in this process, so a resumed run
    draws the orders of an uninterrupted one."""
    sampler = distributed_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(seed)
        return
    generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


# --- one round ---------------------------------------------------------------------------------
class _FromStep:
    """``loader`` as :func:`train` should see it in a run that starts after ``start`` steps.

    ``train`` iterates it once per epoch; the batches of the run's first ``start`` steps
    (counted across epochs) are drawn and dropped, so the sampler's generator advances as
    in an uninterrupted run and the remaining batches come in the same order.
    """

    def __init__(self, loader, start: int) -> None:
        self.loader, self.start, self.epochs_begun = loader, start, 0

    @property
    def sampler(self):  # train() numbers epochs on from the DistributedSampler's (pinned by _reseed_loader)
        sampler = distributed_sampler(self.loader)
        return sampler if sampler is not None else getattr(self.loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        skip = self.start - self.epochs_begun * len(self.loader)
        self.epochs_begun += 1
        for index, batch in enumerate(self.loader):
            if index >= skip:
                yield batch


def _train_round(
    model: nn.Module, masks: MaskSet, train_loader, test_loader, config: LotteryConfig, seed: int,
    description: str, capture_step: int | None = None, start_step: int = 0,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Train ``model`` under ``masks`` from step ``start_step`` to the end of the run
    (``T - start_step`` optimizer steps, learning-rate schedule and data order continued
    from ``start_step``, a fresh optimizer); returns its metrics and, with
    ``capture_step``, the state after that many optimizer steps (0: before training)."""
    cfg = config.train
    sparsifier = Sparsifier(model, exclude=config.exclude)
    sparsifier.set_masks(masks)
    evals: list[list[float]] = []
    captured: dict[str, Tensor] | None = snapshot(model) if capture_step == 0 else None

    def after_step(step: int) -> None:
        nonlocal captured
        step += start_step  # the run's iteration, not this call's
        sparsifier.step()
        if capture_step is not None and step == capture_step:
            captured = snapshot(model)
        if step % config.eval_every == 0:
            metrics = evaluate(model, test_loader)
            evals.append([step, metrics["loss"], metrics["accuracy"]])

    started = time.perf_counter()
    steps = 0
    if cfg.epochs > 0:
        optimizer = make_optimizer(model.parameters(), cfg)
        sparsifier.prepare(optimizer)
        scheduler = make_lr_scheduler(optimizer, cfg, len(train_loader))
        with warnings.catch_warnings():  # stepping the schedule before the optimizer is the point here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`", category=UserWarning)
            for _ in range(start_step):
                scheduler.step()  # the learning rate of step start_step + 1 (as in the uninterrupted run)
        _reseed_loader(train_loader, derived_seed(seed, "data", 0))
        loader = _FromStep(train_loader, start_step) if start_step else train_loader
        with _seeded(derived_seed(seed, "train", 0)):
            steps = train(model, loader, cfg, optimizer=optimizer, scheduler=scheduler,
                          after_step=after_step, description=description, skipped_steps=start_step)["steps"]
    with torch.random.fork_rng(devices=[]):  # a test loader without a generator of its own draws from the global one
        final = evaluate(model, test_loader)
    if not evals or evals[-1][0] != start_step + steps:
        evals.append([start_step + steps, final["loss"], final["accuracy"]])
    best = min(evals, key=lambda e: (e[1], e[0]))  # minimum test loss, earliest on ties
    metrics = {
        "accuracy": final["accuracy"], "error_pct": final["error_pct"], "loss": final["loss"], "steps": steps,
        "early_stop_step": int(best[0]), "early_stop_loss": best[1], "early_stop_accuracy": best[2],
        "evals": evals, "wall_time_s": time.perf_counter() - started,
    }
    return metrics, captured


def _layer_rates(names: list[str], config: LotteryConfig) -> dict[str, float]:
    rates = {n: config.rate for n in names}
    if config.output_rate is not None and names:
        rates[names[-1]] = config.output_rate
    for pattern, rate in config.layer_rates.items():
        for name in matching_layers(names, pattern, "layer_rates"):
            rates[name] = rate
    return rates


@torch.no_grad()
def _next_masks(trained: nn.Module, previous: MaskSet, round_index: int, rates: Mapping[str, float]) -> MaskSet:
    """Round ``r``'s mask: per layer, the ``round(n (1 - p)^r)`` largest |w| among the survivors.

    Under ``torch.distributed`` ``|w|`` is averaged over ranks first (DESIGN.md decision 3), so
    every rank keeps the same weights even where the replicas differ (``epochs=0``: no DDP
    training synchronised them); identical replicas keep their own ``|w|`` (up to rounding).
    """
    params = dict(trained.named_parameters())
    masks = {}
    for name, rate in rates.items():
        weight = distributed.all_reduce_mean_(params[name].detach().abs().float())  # (shape,) a new tensor
        alive = previous[name].to(weight.device)
        scores = torch.where(alive, weight, torch.full_like(weight, float("-inf")))
        keep = min(round(weight.numel() * (1.0 - rate) ** round_index), int(alive.sum()))
        masks[name] = select_top_k(scores, keep).reshape(weight.shape).cpu()
    return MaskSet(masks)


def _round_metrics(round_index: int, masks: MaskSet, ticket: dict[str, Any], reinit: dict[str, Any] | None,
                   reinit_seed: int | None) -> dict[str, Any]:
    stats = masks.stats()
    return {
        "round": round_index, "sparsity": stats.sparsity, "remaining_pct": 100.0 * stats.kept / stats.total,
        "kept": stats.kept, "total": stats.total,
        "layers_remaining_pct": {l.name: 100.0 * l.kept / l.total if l.total else 100.0 for l in stats.layers},
        "ticket": ticket, "reinit": reinit, "reinit_seed": reinit_seed,
    }


# --- the run -------------------------------------------------------------------------------------
def _check_loaders(train_loader, test_loader, method: str) -> None:
    """Refuse a missing loader before anything is trained or written (every round trains and is evaluated)."""
    require_loader(train_loader, "a training loader (every round trains)", method, "pass the training DataLoader")
    require_test_loader(test_loader, method)
    try:
        len(train_loader)  # the run's length T = epochs x len(train_loader) places the rewind step and the evaluations
    except TypeError:
        raise PrunelabError(f"{method}: the training loader ({type(train_loader).__name__}) has no length, which the "
                            "rewind step and the learning-rate schedule need; pass a DataLoader over a map-style "
                            "dataset or a list of batches") from None


def _check_rewind(config: LotteryConfig, train_loader) -> None:
    total = config.train.epochs * len(train_loader)
    if config.rewind_step > total:
        raise PrunelabError(
            f"rewind_step (--rewind-iter) {config.rewind_step} is past the end of training ({config.train.epochs} epochs x "
            f"{len(train_loader)} steps = {total} steps); choose 0 <= rewind_step <= {total}"
        )


def _run(
    initial: nn.Module, reinit_builder: Callable[[int], nn.Module], train_loader, test_loader, config: LotteryConfig,
    out_dir: str | Path, resume: bool,
) -> LotteryResult:
    _check_rewind(config, train_loader)
    targets = prunable_parameters(initial, config.exclude)  # a bad exclude / layer_rates glob: before out_dir exists
    names = list(targets)
    rates = _layer_rates(names, config)
    out = ensure_writable_dir(out_dir)
    seed = config.train.seed
    theta0 = snapshot(initial)
    wanted = folder_config(config, fingerprint(theta0), len(train_loader))
    finished = finished_rounds(out)
    if (out / "config.json").exists() or finished:
        if not resume:
            raise PrunelabError(
                f"{str(out)!r} already holds a lottery run; resume it (resume=True, CLI --resume {out}) or choose an empty "
                "out_dir"
            )
        check_resume(out, wanted)
    else:
        finished = 0

    model = initial
    rounds: list[dict[str, Any]] = []
    masks: list[MaskSet] = []
    finished = min(finished, config.rounds + 1)
    for r in range(finished):  # load what is done; a damaged or foreign file stops here, before anything is written
        metrics, mask = load_round(out / f"round_{r:03d}", r, targets)
        rounds.append(metrics)
        masks.append(mask)
    rewind: dict[str, Tensor] | None = None
    if finished:
        path = out / "round_000" / "rewind.safetensors"
        rewind = load_state(path)
        load_weights(model, rewind, path)  # it must fit the model; the last ticket's weights replace it next
        path = out / f"round_{finished - 1:03d}" / "weights.safetensors"
        load_weights(model, load_state(path), path)
    write_json(out / "config.json", wanted)

    for r in range(finished, config.rounds + 1):
        if r == 0:
            mask = MaskSet.ones(prunable_parameters(model, config.exclude))
            ticket, rewind = _train_round(model, mask, train_loader, test_loader, config, derived_seed(seed, "ticket", 0),
                                          "lottery round 0 (dense)", capture_step=config.rewind_step)
            assert rewind is not None
            reinit, reinit_seed = None, None
        else:
            assert rewind is not None
            mask = _next_masks(model, masks[-1], r, rates)
            model.load_state_dict(rewind)  # rewind every parameter and buffer to theta_k
            ticket, _ = _train_round(model, mask, train_loader, test_loader, config, derived_seed(seed, "ticket", r),
                                     f"lottery round {r}/{config.rounds}", start_step=config.rewind_step)
            reinit, reinit_seed = None, None
            if config.wants_reinit(r):
                reinit_seed = derived_seed(seed, "reinit", r)
                control = reinit_builder(reinit_seed)
                reinit, _ = _train_round(control, mask, train_loader, test_loader, config,
                                         derived_seed(seed, "reinit-train", r), f"reinit control {r}/{config.rounds}")
        metrics = _round_metrics(r, mask, ticket, reinit, reinit_seed)
        with atomic_dir(out / f"round_{r:03d}") as tmp:
            if r == 0:
                save_state(tmp / "rewind.safetensors", rewind)
            mask.save(tmp / "mask.safetensors")
            save_state(tmp / "weights.safetensors", snapshot(model))
            write_json(tmp / "metrics.json", metrics)
        rounds.append(json.loads(json.dumps(metrics)))  # exactly what a resumed run reads back
        masks.append(mask)
    return LotteryResult(rounds, masks, model, out, resumed_rounds=finished)


def build_seeded(model_builder: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``model_builder()`` with the global CPU generator seeded by ``seed`` (state restored afterwards)."""
    with _seeded(seed):
        model = model_builder()
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"model_builder returned {type(model).__name__}; expected a function returning an nn.Module")
    return model


def run_lottery(
    model_builder: Callable[[], nn.Module], train_loader, test_loader, config: LotteryConfig, out_dir: str | Path,
    resume: bool = False,
) -> LotteryResult:
    """Search for a lottery ticket by IMP with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    ``model_builder()`` builds a freshly initialised model; it is called with the global
    CPU generator seeded by ``config.train.seed`` for the ticket, and by a derived seed
    for each random-reinitialisation control (the random state is restored afterwards).
    Writes the run folder ``out_dir`` (see the module docstring); ``resume=True``
    continues a folder written by the same config.  Raises PrunelabError when
    ``rewind_step`` is past the end of training or the folder holds another config.
    """
    if not isinstance(config, LotteryConfig):
        raise PrunelabError(f"run_lottery got config of type {type(config).__name__}; expected LotteryConfig(...)")
    _check_loaders(train_loader, test_loader, "run_lottery")
    _check_rewind(config, train_loader)
    initial = build_seeded(model_builder, config.train.seed)
    return _run(initial, lambda s: build_seeded(model_builder, s), train_loader, test_loader, config, out_dir, resume)


def _check_lottery_spec(spec: PruneSpec) -> None:
    """Refuse the PruneSpec options the lottery procedure has no use for (instead of ignoring them)."""
    if spec.criterion != "magnitude":
        raise PrunelabError(f"lottery tickets are found by weight magnitude (Frankle & Carbin 2019), got criterion "
                            f"{spec.criterion!r}; leave --criterion at magnitude, or use --method iterative for other "
                            "criteria")
    if spec.granularity != "unstructured":
        raise PrunelabError(f"lottery tickets prune single weights, got granularity {spec.granularity!r}; pass "
                            "--granularity unstructured, or use --method iterative for structured pruning")
    if spec.allocation not in ("global", "uniform"):
        raise PrunelabError(f"lottery prunes the same fraction of every layer's remaining weights each round, got "
                            f"allocation {spec.allocation!r}; pass --allocation uniform (or global, which means the same "
                            "here) and set per-layer rates with --layer-rates")


def _spec_layer_rates(model: nn.Module, spec: PruneSpec, rate: float) -> dict[str, float]:
    """``spec.layer_rates`` plus exact-name overrides lowering the first / last layer's per-round
    rate so that ``spec.keep_first`` / ``spec.keep_last`` hold after ``spec.rounds`` rounds."""
    names = list(prunable_parameters(model, spec.exclude))
    uncapped = LotteryConfig(rounds=spec.rounds, rate=rate, output_rate=None, layer_rates=dict(spec.layer_rates),
                             exclude=spec.exclude)
    rates = _layer_rates(names, uncapped)
    layer_rates = dict(spec.layer_rates)
    for name, (_, ceiling) in spec.rules().bounds(names).items():
        capped = min(rates[name], 1.0 - (1.0 - ceiling) ** (1.0 / spec.rounds))  # 'dense' (ceiling 0): rate 0
        if capped < rates[name]:
            layer_rates.pop(name, None)
            layer_rates[name] = capped  # last, so it wins over every glob
    return layer_rates


def run_lottery_method(
    model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
    score_data: ScoreData | None = None,
) -> MethodResult:
    """``lottery`` in :data:`prunelab.methods.METHODS`: IMP with rewinding to the weights given.

    The common method signature maps to a :class:`LotteryConfig` as: ``spec.rounds``
    rounds, each pruning ``p = 1 - (1 - spec.sparsity)^(1/rounds)`` of every layer's
    remaining weights (``spec.layer_rates`` override per layer; no special output rate),
    ``config`` trains every round, rewinding to ``model``'s weights as given (through the
    CLI they are the initialisation: the pipeline never pre-trains a from-scratch method,
    and refuses ``--pretrain-epochs`` > 0 with ``--method lottery``).  No reinit control;
    the run folder is temporary (use :func:`run_lottery` to keep and resume it).
    ``model`` ends holding the last round's trained ticket.

    ``spec.keep_first`` / ``spec.keep_last`` cap the first / last prunable layer's
    sparsity: ``'dense'`` prunes it at rate 0, a number ``c`` lowers its per-round rate to
    at most ``1 - (1 - c)^(1/rounds)`` (to the nearest weight).  The lottery procedure
    (Frankle & Carbin 2019) prunes single weights by magnitude, the same fraction of each
    layer: ``criterion`` must be ``'magnitude'``, ``granularity`` ``'unstructured'`` and
    ``allocation`` ``'global'`` (the default, which means these per-layer rates here) or
    ``'uniform'``; anything else raises PrunelabError before any training.
    """
    _check_lottery_spec(spec)
    _check_loaders(train_loader, test_loader, "lottery")
    rate = Geometric(spec.sparsity, rounds=spec.rounds).rate
    lottery = LotteryConfig(rounds=spec.rounds, rate=rate, output_rate=None,
                            layer_rates=_spec_layer_rates(model, spec, rate), train=config,
                            eval_every=max(len(train_loader), 1), reinit_rounds=(), exclude=spec.exclude)
    _check_rewind(lottery, train_loader)
    sizes = {n: p.numel() for n, p in prunable_parameters(model, spec.exclude).items()}
    rates = _layer_rates(list(sizes), lottery)  # the rates _run prunes by (a capped first / last layer's included)
    with tempfile.TemporaryDirectory(prefix="prunelab-lottery-") as folder:
        result = _run(model, lambda s: fresh_init(model, s), train_loader, test_loader, lottery, folder, resume=False)
    rows = []
    for metrics in result.rounds:
        ticket = metrics["ticket"]
        r = metrics["round"]
        target = sum(n * (1.0 - (1.0 - rates[name]) ** r) for name, n in sizes.items()) / max(sum(sizes.values()), 1)
        rows.append({
            "stage": f"round {r}", "round": r, "target_sparsity": target, "sparsity": metrics["sparsity"],
            "kept_weights": metrics["kept"], "accuracy": ticket["accuracy"], "error_pct": ticket["error_pct"],
            "test_loss": ticket["loss"], "early_stop_step": ticket["early_stop_step"],
        })
    return MethodResult(result.masks[-1], rows, [])
