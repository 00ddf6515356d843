"""Lottery tickets: iterative magnitude pruning with rewinding, resumable round by round.

Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks"), Algorithm / section 2: initialise ``theta_0``, train, prune ``p%`` of
the remaining weights of each layer by magnitude, reset the survivors to ``theta_0``,
repeat.  Frankle, Dziugaite, Roy & Carbin 2020 ("Linear Mode Connectivity and the
Lottery Ticket Hypothesis") rewind to ``theta_k``, the weights after ``k`` steps of the
first training run, instead of ``theta_0`` (late rewinding).

Rounds: round 0 trains the dense network from ``theta_0`` and records ``theta_k``
(``rewind_step = k``; ``k = 0`` is ``theta_0``).  Round ``r >= 1`` keeps, in every layer
``l``, the ``round(n_l (1 - p_l)^r)`` largest-magnitude weights of round ``r - 1``'s
trained ticket among its survivors (so layer ``l`` is pruned by ``p_l`` of its remaining
weights per round: 20% by default, 10% for the output layer as in F&C's LeNet), resets
every parameter and buffer to ``theta_k``, applies the mask and trains again.  The
*random reinitialisation* control trains the same mask from a fresh initialisation
(another seed) the same way.

Every round records its sparsity, final test accuracy and the **early-stopping
iteration**: the step of minimum test loss among evaluations every ``eval_every`` steps
and at the end (F&C use a validation split; here the given ``test_loader``).

Run folder (each file written atomically, each round folder swapped in whole)::

    out_dir/config.json                  the LotteryConfig + init fingerprint; resume refuses another config
    out_dir/round_000/rewind.safetensors theta_k (state_dict)
    out_dir/round_RRR/mask.safetensors   the round's MaskSet
    out_dir/round_RRR/weights.safetensors the trained ticket (state_dict)
    out_dir/round_RRR/metrics.json

``resume=True`` loads every finished round and continues after the last one;
``rounds`` may grow between runs (it is the only field allowed to change).  Each round's
randomness (data order, dropout) is seeded from ``(train.seed, round)``, so a resumed run
computes the same numbers as an uninterrupted one (on the same machine and device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.allocation import check_sparsity, select_top_k
from prunelab.bench.training import TrainConfig, evaluate, make_lr_scheduler, make_optimizer, train
from prunelab.criteria import ScoreData
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, atomic_path, ensure_writable_dir, write_json
from prunelab.masks import MaskSet
from prunelab.methods.base import MethodResult, PruneSpec
from prunelab.methods.pai import fresh_init
from prunelab.schedules import Geometric
from prunelab.sparsifier import Sparsifier
from prunelab.targets import _matching, prunable_parameters

LOTTERY_FORMAT = "prunelab.lottery.v1"
RESUMABLE_KEYS = ("rounds", "train.progress")  # may differ between a folder and a resuming config

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
        for pattern, rate in self.layer_rates.items():
            check_sparsity(rate, f"per-round rate for {pattern!r}")
        if not isinstance(self.train, TrainConfig):
            raise PrunelabError(f"LotteryConfig got train={self.train!r}; expected a TrainConfig(...)")
        if self.reinit_rounds is not None:
            rounds = tuple(self.reinit_rounds)
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rounds):
                raise PrunelabError(
                    f"LotteryConfig got reinit_rounds={self.reinit_rounds!r}; expected pruning rounds (ints >= 1), "
                    "None for every round or () for none"
                )
            object.__setattr__(self, "reinit_rounds", rounds)
        object.__setattr__(self, "exclude", tuple(self.exclude))

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
    """Seed the global CPU generator inside ``fork_rng``: the caller's state is restored afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.fork = torch.random.fork_rng(devices=[])

    def __enter__(self) -> None:
        self.fork.__enter__()
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self.fork.__exit__(*exc)


def _reseed_loader(loader, seed: int) -> None:
    """Make the loader's shuffling a function of ``seed`` (its sampler's generator, if it has one)."""
    generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def _fingerprint(state: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _save_state(path: Path, state: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": LOTTERY_FORMAT})


def _load_state(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise PrunelabError(f"lottery run file {str(path)!r} is missing; the folder is damaged, start a new out_dir")
    return load_file(str(path))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key != "layer_rates":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- one round ---------------------------------------------------------------------------------
def _train_round(
    model: nn.Module, masks: MaskSet, train_loader, test_loader, config: LotteryConfig, seed: int,
    description: str, capture_step: int | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Train ``model`` under ``masks``; returns its metrics and, with ``capture_step``,
    the state after that many optimizer steps (0: before training)."""
    cfg = config.train
    sparsifier = Sparsifier(model, exclude=config.exclude)
    sparsifier.set_masks(masks)
    evals: list[list[float]] = []
    captured: dict[str, Tensor] | None = _state(model) if capture_step == 0 else None

    def after_step(step: int) -> None:
        nonlocal captured
        sparsifier.step()
        if capture_step is not None and step == capture_step:
            captured = _state(model)
        if step % config.eval_every == 0:
            metrics = evaluate(model, test_loader)
            evals.append([step, metrics["loss"], metrics["accuracy"]])

    started = time.perf_counter()
    steps = 0
    if cfg.epochs > 0:
        optimizer = make_optimizer(model.parameters(), cfg)
        sparsifier.prepare(optimizer)
        _reseed_loader(train_loader, derived_seed(seed, "data", 0))
        with _seeded(derived_seed(seed, "train", 0)):
            steps = train(model, train_loader, cfg, optimizer=optimizer,
                          scheduler=make_lr_scheduler(optimizer, cfg, len(train_loader)),
                          after_step=after_step, description=description)["steps"]
    final = evaluate(model, test_loader)
    if not evals or evals[-1][0] != steps:
        evals.append([steps, final["loss"], final["accuracy"]])
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
        for name in _matching(names, pattern, "layer_rates"):
            rates[name] = rate
    return rates


@torch.no_grad()
def _next_masks(trained: nn.Module, previous: MaskSet, round_index: int, rates: Mapping[str, float]) -> MaskSet:
    """Round ``r``'s mask: per layer, the ``round(n (1 - p)^r)`` largest |w| among the survivors."""
    params = dict(trained.named_parameters())
    masks = {}
    for name, rate in rates.items():
        weight = params[name].detach().abs().float()
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
        "layers_remaining_pct": {l.name: 100.0 * l.kept / l.total for l in stats.layers},
        "ticket": ticket, "reinit": reinit, "reinit_seed": reinit_seed,
    }


# --- the run -------------------------------------------------------------------------------------
def _check_rewind(config: LotteryConfig, train_loader) -> None:
    total = config.train.epochs * len(train_loader)
    if config.rewind_step > total:
        raise PrunelabError(
            f"rewind_step (--rewind-iter) {config.rewind_step} is past the end of training ({config.train.epochs} epochs x "
            f"{len(train_loader)} steps = {total} steps); choose 0 <= rewind_step <= {total}"
        )


def _folder_config(config: LotteryConfig, fingerprint: str, train_batches: int) -> dict[str, Any]:
    return {"format": LOTTERY_FORMAT, "config": config.to_dict(), "init_fingerprint": fingerprint,
            "train_batches": train_batches}


def _check_resume(out: Path, wanted: dict[str, Any]) -> None:
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrunelabError(f"cannot read {str(path)!r} ({exc}); resume only from a folder written by run_lottery") from None
    if saved.get("format") != LOTTERY_FORMAT:
        raise PrunelabError(f"{str(path)!r} is not a {LOTTERY_FORMAT} run config; resume only from a run_lottery folder")
    old = _flatten({k: v for k, v in saved.items() if k != "format"})
    new = _flatten({k: v for k, v in json.loads(json.dumps(wanted)).items() if k != "format"})
    differ = sorted(k for k in set(old) | set(new)
                    if k.removeprefix("config.") not in RESUMABLE_KEYS and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} in the folder, {new.get(k)!r} now)" for k in differ)
        raise PrunelabError(
            f"cannot resume {str(out)!r}: it was written by another config; keys that differ: {shown}; "
            "resume with the same config (only rounds may change) or use a new out_dir"
        )


def _finished_rounds(out: Path) -> int:
    count = 0
    while (out / f"round_{count:03d}" / "metrics.json").is_file():
        count += 1
    return count


def _run(
    initial: nn.Module, reinit_builder: Callable[[int], nn.Module], train_loader, test_loader, config: LotteryConfig,
    out_dir: str | Path, resume: bool,
) -> LotteryResult:
    _check_rewind(config, train_loader)
    out = ensure_writable_dir(out_dir)
    seed = config.train.seed
    names = list(prunable_parameters(initial, config.exclude))
    rates = _layer_rates(names, config)
    theta0 = _state(initial)
    wanted = _folder_config(config, _fingerprint(theta0), len(train_loader))
    finished = _finished_rounds(out)
    if (out / "config.json").exists() or finished:
        if not resume:
            raise PrunelabError(
                f"{str(out)!r} already holds a lottery run; resume it (resume=True, CLI --resume {out}) or choose an empty "
                "out_dir"
            )
        _check_resume(out, wanted)
    else:
        finished = 0
    write_json(out / "config.json", wanted)

    model = initial
    rounds: list[dict[str, Any]] = []
    masks: list[MaskSet] = []
    finished = min(finished, config.rounds + 1)
    for r in range(finished):  # load what is done
        folder = out / f"round_{r:03d}"
        rounds.append(json.loads((folder / "metrics.json").read_text()))
        masks.append(MaskSet.load(folder / "mask.safetensors"))
    rewind: dict[str, Tensor] | None = None
    if finished:
        rewind = _load_state(out / "round_000" / "rewind.safetensors")
        model.load_state_dict(_load_state(out / f"round_{finished - 1:03d}" / "weights.safetensors"))

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
                                     f"lottery round {r}/{config.rounds}")
            reinit, reinit_seed = None, None
            if config.wants_reinit(r):
                reinit_seed = derived_seed(seed, "reinit", r)
                control = reinit_builder(reinit_seed)
                reinit, _ = _train_round(control, mask, train_loader, test_loader, config,
                                         derived_seed(seed, "reinit-train", r), f"reinit control {r}/{config.rounds}")
        metrics = _round_metrics(r, mask, ticket, reinit, reinit_seed)
        with atomic_dir(out / f"round_{r:03d}") as tmp:
            if r == 0:
                _save_state(tmp / "rewind.safetensors", rewind)
            mask.save(tmp / "mask.safetensors")
            _save_state(tmp / "weights.safetensors", _state(model))
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
    _check_rewind(config, train_loader)
    initial = build_seeded(model_builder, config.train.seed)
    return _run(initial, lambda s: build_seeded(model_builder, s), train_loader, test_loader, config, out_dir, resume)


def run_lottery_method(
    model: nn.Module, train_loader, test_loader, spec: PruneSpec, config: TrainConfig, *,
    score_data: ScoreData | None = None,
) -> MethodResult:
    """``lottery`` in :data:`prunelab.methods.METHODS`: IMP with rewinding to the weights given.

    The common method signature maps to a :class:`LotteryConfig` as: ``spec.rounds``
    rounds, each pruning ``p = 1 - (1 - spec.sparsity)^(1/rounds)`` of every layer's
    remaining weights (``spec.layer_rates`` override per layer; no special output rate),
    ``config`` trains every round, rewinding to ``model``'s weights as given (through the
    CLI pass ``--pretrain-epochs 0`` so they are the initialisation).  No reinit control;
    the run folder is temporary (use :func:`run_lottery` to keep and resume it).
    ``model`` ends holding the last round's trained ticket.
    """
    rate = Geometric(spec.sparsity, rounds=spec.rounds).rate
    lottery = LotteryConfig(rounds=spec.rounds, rate=rate, output_rate=None, layer_rates=dict(spec.layer_rates),
                            train=config, eval_every=max(len(train_loader), 1), reinit_rounds=(), exclude=spec.exclude)
    _check_rewind(lottery, train_loader)
    with tempfile.TemporaryDirectory(prefix="prunelab-lottery-") as folder:
        result = _run(model, lambda s: fresh_init(model, s), train_loader, test_loader, lottery, folder, resume=False)
    rows = []
    for metrics in result.rounds:
        ticket = metrics["ticket"]
        rows.append({
            "stage": f"round {metrics['round']}", "round": metrics["round"],
            "target_sparsity": 1.0 - (1.0 - rate) ** metrics["round"], "sparsity": metrics["sparsity"],
            "kept_weights": metrics["kept"], "accuracy": ticket["accuracy"], "error_pct": ticket["error_pct"],
            "test_loss": ticket["loss"], "early_stop_step": ticket["early_stop_step"],
        })
    return MethodResult(result.masks[-1], rows, [])
