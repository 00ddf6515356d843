"""Dynamic sparse training (DST): start sparse, keep the count, move the connections.

A :class:`DynamicSparsifier` is a :class:`~prunelab.sparsifier.Sparsifier` whose mask is
decided once at the start -- a random mask at the target sparsity with per-layer counts
from an allocation, ERK by default (Evci et al. 2020, "Rigging the Lottery", sec. 3) --
and then rewired every ``delta_t`` optimizer steps: each update drops connections and
grows the same number elsewhere, so the sparsity never changes.  The fraction rewired
decays by cosine (RigL eq. 1)::

    f(t) = alpha / 2 * (1 + cos(pi * t / T_end))     for t < T_end, no update afterwards

One update (:meth:`DynamicSparsifier.rewire`), with ``M`` the mask before it:

1. **drop** ``d_l`` kept weights per layer with the lowest *drop score* (``|w|`` for every
   method here), ``d_l = round(f * |M_l|)`` unless the method says otherwise (DSR);
2. **grow** ``g_l`` weights among the positions that are zero *after* the drop -- RigL's
   ``i not in theta_l minus I_drop`` (eq. 2), also the candidate set of SET's and SNFS's
   reference code (DSR's leaves the just-pruned out, see :class:`~prunelab.dst.DSR`) --
   those with the highest *grow score* (random, ``|dL/dw|`` or ``|momentum|``); a
   connection just dropped can be regrown;
   ``g_l = d_l`` keeps every layer's count (SET, RigL), DSR/SNFS reallocate
   ``sum_l d_l`` across layers;
3. *new* connections -- grown and not kept before the update -- start at zero (or at a
   fresh draw, SET) and their optimizer state starts where the optimizer starts a fresh
   parameter's: zero (momentum buffer, Adam moments, RMSprop averages), Adagrad's sum at
   ``initial_accumulator_value``, Rprop's step size at ``lr`` (:data:`FRESH_STATE`);
   dropped weights and their state are zeroed by
   :meth:`~prunelab.sparsifier.Sparsifier.enforce`.  A connection dropped and regrown in
   the same update is no new connection: it keeps its value and its optimizer state, as
   in RigL's reference code (google-research/rigl, ``rigl/sparse_optimizers.py``,
   ``_get_update_op`` with its default ``reinit_when_same=False``: ``new_connections =
   grown & (mask == 0)``, only those are re-initialised and get their slots zeroed) --
   unless the method sets :attr:`DynamicSparsifier.reinit_when_same` (SET: its reference
   code re-draws every added connection).

Ties in any ranking go to the lower flat index (:func:`~prunelab.allocation.select_top_k`),
as ``tf.math.top_k`` does for growth in RigL's reference code (which breaks *drop* ties with
``N(0, 1e-5)`` noise on ``|w|`` instead).  Ties matter where a score is exactly zero -- kept
weights grown at zero and not yet moved (dropped from the highest index down); candidates
with zero gradient or momentum, e.g. from inputs that are always zero or dead units (grown
from the lowest index up, once every candidate with a signal is taken).  A growth signal
that is zero *everywhere* (RigL, SNFS) is refused: it means ``.grad`` was zeroed before
:meth:`step` (``optimizer.zero_grad(set_to_none=False)`` leaves zeros, not ``None``), and
growth would fill the first rows of every layer.

Hook point.  :meth:`step` runs after ``optimizer.step()`` (prunelab's ``train`` calls
``after_step`` there).  ``.grad`` still holds the batch's *dense* gradient -- masked
weights are zero, but their gradient is not, and ``step`` reads it *before* ``enforce``
re-zeroes the masked entries.  The optimizer has already used that gradient, so a mask
change applies after the step: dropped weights are zeroed, grown ones set to their start
value, exactly as if the update had happened just before the step with the grown
weights' first step skipped.  ``step`` must therefore run before ``optimizer.zero_grad()``.

Masked gradients (:meth:`DynamicSparsifier.mask_gradients_`, opt-in, for gradient clipping
or matrix-wise optimizers).  Zeroing the masked entries of ``.grad`` before
``optimizer.step()`` would hide exactly what RigL grows by and what SNFS smooths.  So, on a
step that reads it, the part removed is kept aside and :meth:`step` reads ``.grad`` plus
that part: the same dense gradient, bit for bit, however many times it was called (the
removed parts add up as the micro-batch gradients do).  Other steps keep nothing.

Distributed (DESIGN.md decision 3).  Under DDP ``.grad`` is already all-reduced and the
replicas' weights are identical, so magnitudes, gradients and momenta agree on every
rank; drop and grow scores are still averaged over ranks (exact for equal values), and
random growth draws from a CPU generator seeded by ``(seed, step)``, identical on every
rank.  :meth:`finalize` verifies the masks bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prunelab import distributed
from prunelab.allocation import check_sparsity, select_top_k
from prunelab.criteria.random_scores import RandomScores
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.sparsifier import Sparsifier
from prunelab.structure import Channel, layer_granularities
from prunelab.targets import LayerRules, keep_bounds

INIT_ALLOCATIONS = ("erk", "uniform")
GROW_INITS = ("zero", "init")

#: optimizer state that a fresh parameter does not start at zero: ``(optimizer class, state key,
#: the param-group option it starts at)`` -- ``torch.optim.Adagrad``: ``sum = initial_accumulator_value``
#: (Duchi et al. 2011's ``G_0``); ``torch.optim.Rprop``: ``step_size = lr`` (Riedmiller & Braun 1993's
#: ``Delta_0``; at 0 it would never grow again, so a regrown weight would never move)
FRESH_STATE: tuple[tuple[type[torch.optim.Optimizer], str, str], ...] = (
    (torch.optim.Adagrad, "sum", "initial_accumulator_value"),
    (torch.optim.Rprop, "step_size", "lr"),
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _end_fraction_problem(value: Any) -> str:
    """Why ``value`` is no T_end fraction in (0, 1]: a non-number, beyond the run (inf too) or at step 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"pass a number, not a {type(value).__name__}"
    if math.isnan(value):
        return "pass a number, not nan"
    if value > 1.0:
        return "T_end beyond the run never ends the updates"
    return "T_end at step 0 leaves no update"


@dataclass(frozen=True)
class UpdateSchedule:
    """When DST rewires and how much: the cosine decay of Evci et al. 2020 (RigL), eq. 1.

    ``f(t) = alpha / 2 * (1 + cos(pi t / T_end))``; updates happen at
    ``t = delta_t, 2 delta_t, ...`` strictly before ``T_end = end_step`` (RigL:
    ``t mod delta_t == 0 and t < T_end``).  A pure function of the step, so a resumed
    run rewires at the same steps by the same fractions.
    """

    end_step: int
    delta_t: int = 100
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if not _is_int(self.delta_t) or self.delta_t < 1:
            raise PrunelabError(f"delta T must be an integer >= 1 (optimizer steps between updates), got "
                                f"{self.delta_t!r}; e.g. --delta-t 100")
        if not _is_number(self.alpha) or not 0.0 < self.alpha <= 1.0:
            raise PrunelabError(f"alpha (initial update fraction) must be in (0, 1], got {self.alpha!r}; RigL uses 0.3")
        if not _is_int(self.end_step) or self.end_step < 1:
            raise PrunelabError(f"T_end must be an integer step >= 1, got {self.end_step!r}; e.g. 75% of the run's "
                                "steps")

    @classmethod
    def for_run(cls, total_steps: int, *, delta_t: int = 100, alpha: float = 0.3,
                end_fraction: float = 0.75) -> UpdateSchedule:
        """The schedule for a run of ``total_steps`` with ``T_end = end_fraction * total_steps``, checked."""
        if not _is_number(end_fraction) or not 0.0 < end_fraction <= 1.0:
            why = _end_fraction_problem(end_fraction)
            raise PrunelabError(f"T_end fraction must be in (0, 1] of the run, got {end_fraction!r}; {why}, RigL uses "
                                "0.75")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise PrunelabError(f"the run's length must be an integer number of optimizer steps, got {total_steps!r}")
        # floor of the product, read to 6 decimals: 0.29 * 100 is 28.999999999999996 in floats, T_end is 29
        end_step = math.floor(round(end_fraction * total_steps, 6))
        schedule = cls(end_step=max(end_step, 1), delta_t=delta_t, alpha=alpha)
        schedule.check_run(total_steps)
        return schedule

    def fraction_at(self, step: int) -> float:
        """``f(t)``; 0 from ``T_end`` on."""
        if step >= self.end_step:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * max(step, 0) / self.end_step))

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end_step and step % self.delta_t == 0

    def update_steps(self) -> list[int]:
        return list(range(self.delta_t, self.end_step, self.delta_t))

    def check_run(self, total_steps: int) -> None:
        """Raise PrunelabError unless the schedule fits a run of ``total_steps`` optimizer steps."""
        if self.delta_t > total_steps:
            raise PrunelabError(f"delta T={self.delta_t} exceeds the run's {total_steps} steps; lower --delta-t or "
                                "train longer")
        if self.end_step > total_steps:
            raise PrunelabError(f"T_end={self.end_step} is beyond the run's {total_steps} steps; set T_end <= "
                                f"{total_steps} (end fraction <= 1) or train longer")
        if not self.update_steps():
            raise PrunelabError(f"delta T={self.delta_t} leaves no update before T_end={self.end_step} of "
                                f"{total_steps} steps; lower --delta-t or raise the end fraction")


class DynamicSparsifier(Sparsifier):
    """Base of every DST method: random start, then drop/grow on an :class:`UpdateSchedule`.

    Subclasses set :attr:`name`, implement :meth:`grow_scores` and may override
    :meth:`drop_counts` / :meth:`grow_counts` (reallocation across layers), :meth:`observe`
    (per-step statistics), :attr:`grow_init` and :attr:`reinit_when_same`.  ``schedule=None``
    never rewires.

    ``allocation``: the initial per-layer counts, ``"erk"`` (Evci et al. 2020) or
    ``"uniform"``.  ``rules``/``exclude`` as for :class:`Sparsifier`: a layer kept dense
    stays dense, a fixed-sparsity layer keeps its count even under reallocation.
    ``seed`` drives the initial mask and random growth (``(seed, step)`` per update).
    ``sparse_init``: rescale the initial kept weights for their sparse fan-in (see
    :meth:`initialise`); off by default, since the model may already be trained.
    """

    name: ClassVar[str] = "dst"
    grow_init: ClassVar[str] = "zero"
    #: re-initialise (value and optimizer state) a connection dropped and regrown in the same
    #: update; False keeps it as it was (RigL reference, ``reinit_when_same=False``)
    reinit_when_same: ClassVar[bool] = False
    #: what ranks growth when it is no random draw (RigL: the dense gradient); an update whose
    #: grow scores are exactly zero in every growing layer is refused (:meth:`_check_growth_signal`)
    grow_signal: ClassVar[str | None] = None

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        schedule: UpdateSchedule | None = None,
        allocation: str = "erk",
        rules: LayerRules | None = None,
        exclude: Sequence[str] = (),
        seed: int = 0,
        sparse_init: bool = False,
    ) -> None:
        check_sparsity(sparsity)
        if allocation not in INIT_ALLOCATIONS:
            raise PrunelabError(f"{self.name} starts from a random mask with 'erk' or 'uniform' per-layer counts, got "
                                f"allocation {allocation!r}; pass --allocation erk (default) or uniform")
        if not _is_int(seed) or not 0 <= seed < 2**32:
            raise PrunelabError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if schedule is not None and not isinstance(schedule, UpdateSchedule):
            raise PrunelabError(
                f"{self.name} rewires on an UpdateSchedule (delta_t, alpha, end_step), got a {type(schedule).__name__}; "
                "its sparsity is fixed -- pass schedule=UpdateSchedule(end_step=..., delta_t=100, alpha=0.3)"
            )
        super().__init__(model, criterion=RandomScores(seed=seed), allocation=allocation, rules=rules, exclude=exclude)
        self.sparsity = float(sparsity)
        self.rewiring = schedule
        self.seed = seed
        self.sparse_init = bool(sparse_init)
        self.initialised = False
        self._removed_grads: dict[str, torch.Tensor] = {}  # masked gradient parts mask_gradients_() took this step
        self.keep_limits = {n: keep_bounds(p.numel(), *self.bounds[n]) for n, p in self.params.items()}

    # --- life cycle ------------------------------------------------------------------
    def prepare(self, optimizer: torch.optim.Optimizer | None = None) -> DynamicSparsifier:
        """Draw the initial random mask (first call only), attach the optimizer, enforce."""
        if not self.initialised:
            self.initialise()
        super().prepare(optimizer)
        return self

    def initialise(self) -> MaskSet:
        """Random mask at ``sparsity``: i.i.d. uniform scores (seeded), top-k per layer with
        the allocation's counts -- ERK density ``eps * (n_in + n_out) / (n_in n_out)``
        (Mocanu et al. 2018's Erdos-Renyi; kernel sizes join for convolutions).

        With ``sparse_init`` every output unit's kept weights are multiplied by
        ``sqrt(fan_in / kept_fan_in)``, so a unit with ``k`` of its ``fan_in`` inputs keeps
        the variance of a dense unit -- the "sparse initialisation" of Evci, Ioannou,
        Keskin & Dauphin 2022 ("Gradient Flow in Sparse Neural Networks and How Lottery
        Tickets Win", AAAI), without which signals shrink by ``sqrt(density)`` per layer."""
        self.masks = MaskSet.ones(self.params)
        self.update(self.sparsity)
        if self.sparse_init:
            units = layer_granularities(Channel(), self.model, self.params)  # a ConvTranspose's units are dim 1
            with torch.no_grad():
                for name, param in self.params.items():
                    unit_of = units[name]
                    rows = unit_of.to_groups(self.masks[name].to(param.device))  # (out, fan_in)
                    scale = torch.sqrt(rows.shape[1] / rows.sum(dim=1).clamp_min(1).to(param.dtype))
                    param.mul_(unit_of.from_groups(scale, tuple(param.shape)))
        self.initialised = True
        return self.masks

    def step(self) -> None:
        """After ``optimizer.step()``, before ``zero_grad``: observe, rewire on update steps, enforce."""
        if not self.prepared:
            raise PrunelabError(
                f"{self.name}.step() called before prepare(); call prepare(optimizer) once before training (it draws "
                "the initial sparse mask -- without it the model trains dense)"
            )
        self._check_bound()
        self.step_count += 1
        try:
            self.observe()
            if self.rewiring is not None and self.rewiring.is_update_step(self.step_count):
                self.rewire(self.rewiring.fraction_at(self.step_count))
        finally:
            self._removed_grads = {}  # this step's: never added to the next step's gradient
        self.enforce()

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero masked gradients before the optimizer step, keeping what growth needs (see the module docstring).

        On a step whose :meth:`step` reads the dense gradient (:meth:`reads_dense_grad`) the
        masked part of ``.grad`` is added to a side buffer before it is zeroed, and
        :meth:`step` grows by ``.grad`` + that buffer -- the dense gradient it would have seen
        without this call.  Costs one gradient copy of the prunable weights on those steps.
        """
        self._check_bound()
        keep = self.reads_dense_grad(self.step_count + 1)
        for name, param in self.params.items():
            if param.grad is None:
                continue
            pruned = ~self.masks[name].to(param.grad.device)
            if keep:
                removed = param.grad.detach().masked_fill(~pruned, 0)  # the masked entries' gradient, 0 elsewhere
                held = self._removed_grads.get(name)
                self._removed_grads[name] = removed if held is None else held.add_(removed)
            param.grad.masked_fill_(pruned, 0)

    def reads_dense_grad(self, step: int) -> bool:
        """Whether :meth:`step` number ``step`` reads the dense ``.grad``: an update step of a method
        that grows by a gradient signal (RigL); SNFS reads it every step."""
        return self.grow_signal is not None and self.rewiring is not None and self.rewiring.is_update_step(step)

    def _on_rebind(self, names: Sequence[str]) -> None:
        for name in names:  # a side buffer of a replaced Parameter's gradient belongs to the old one
            self._removed_grads.pop(name, None)

    def observe(self) -> None:
        """Per-step hook, run while ``.grad`` is still dense (SNFS's momentum); default: nothing."""

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        super().set_masks(masks)
        self.initialised = True

    # --- one update ------------------------------------------------------------------
    @torch.no_grad()
    def rewire(self, fraction: float) -> MaskSet:
        """Drop and grow once with update fraction ``fraction`` (see the module docstring)."""
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise PrunelabError(f"update fraction must be in [0, 1], got {fraction!r}")
        old = {n: self.masks[n].to(p.device) for n, p in self.params.items()}
        kept = {n: int(m.sum()) for n, m in old.items()}
        drop = self.drop_counts(fraction, old)
        survivors = {}
        for name, param in self.params.items():
            score = self._reduced(self.drop_scores(name, param))
            score = torch.where(old[name], score, torch.full_like(score, -math.inf))
            survivors[name] = select_top_k(score, kept[name] - drop[name]).view(param.shape)
        grow = self.grow_counts(drop, old, survivors)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.step_count)
        self._check_growth_signal(grow, generator)
        grown = {}
        for name, param in self.params.items():
            grown[name] = torch.zeros_like(old[name])
            if grow[name] > 0:
                score = self._reduced(self.grow_scores(name, param, generator))
                score = torch.where(survivors[name], torch.full_like(score, -math.inf), score)  # zero after the drop
                grown[name] = select_top_k(score, grow[name]).view(param.shape)
        self.masks = MaskSet({n: survivors[n] | grown[n] for n in self.params})
        # new connections only: a just-dropped weight that is regrown keeps its value and state
        fresh = grown if self.reinit_when_same else {n: grown[n] & ~old[n] for n in self.params}
        self._start_grown(fresh, generator)
        self.enforce()
        self.history.append({
            "step": self.step_count, "update_fraction": fraction, "dropped": sum(drop.values()),
            "grown": sum(grow.values()),
            # counted in both "dropped" and "grown": the same connection (kept, or re-drawn under reinit_when_same)
            "regrown_dropped": sum(int((grown[n] & old[n]).sum()) for n in self.params),
            "target_sparsity": self.sparsity,
            "achieved_sparsity": self.masks.stats().sparsity,
        })
        return self.masks

    def drop_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Higher = keep.  ``|w|`` (every method here drops by magnitude)."""
        return param.detach().abs()

    def grow_scores(self, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Higher = grow first, over the whole tensor (non-candidates are masked out later)."""
        raise NotImplementedError

    def drop_counts(self, fraction: float, old: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """``d_l = round(f * |M_l|)``; a layer with no zeros (kept dense) is left alone, ``d_l = 0``.

        The dropped positions are candidates again, so ``d_l`` can always regrow; a dense layer
        would only drop and regrow the same weights (re-drawing them under ``reinit_when_same``).
        """
        return {name: 0 if bool(mask.all()) else _round_half_up(fraction * int(mask.sum())) for name, mask in old.items()}

    def grow_counts(self, drop: Mapping[str, int], old: Mapping[str, torch.Tensor],
                    survivors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """``g_l = d_l``: every layer keeps its count."""
        return dict(drop)

    # --- helpers ---------------------------------------------------------------------
    def _check_growth_signal(self, grow: Mapping[str, int], generator: torch.Generator) -> None:
        """Refuse an update whose :attr:`grow_signal` is exactly zero in every growing layer.

        With ``optimizer.zero_grad(set_to_none=False)`` before :meth:`step` the gradient is all
        zeros, not ``None``: every candidate would tie and growth would go to the lowest flat
        indices (the first rows of each layer).  Decided on every rank alike (a flag averaged
        over ranks), so no rank raises alone.
        """
        growing = [n for n in self.params if grow[n] > 0]
        if self.grow_signal is None or not growing:
            return
        silent = not any(bool(self.grow_scores(n, self.params[n], generator).any()) for n in growing)
        flag = distributed.all_reduce_mean_(torch.tensor([float(silent)], device=self._device()))
        if float(flag) > 0.0:
            raise PrunelabError(
                f"{self.name} grows by {self.grow_signal}, which is exactly zero in every layer at update step "
                f"{self.step_count}, so growth would pick the lowest indices; call sparsifier.step() after "
                "optimizer.step() and before optimizer.zero_grad() (zero_grad(set_to_none=False) leaves zeros)"
            )

    def _device(self) -> torch.device:
        first = next(iter(self.params.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def _reduced(self, score: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_mean_(score.detach().float().clone())

    def _random_scores(self, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(param.shape, generator=generator, dtype=torch.float32).to(param.device)

    def _start_grown(self, grown: Mapping[str, torch.Tensor], generator: torch.Generator) -> None:
        """The weights at ``grown`` (new connections) start at zero (or a fresh init draw) with zero optimizer state."""
        for name, param in self.params.items():
            where = grown[name]
            if not bool(where.any()):
                continue
            if self.grow_init == "init":
                # PyTorch's default Linear/Conv init U(-b, b), b = 1/sqrt(fan_in) (kaiming_uniform, a=sqrt(5))
                bound = 1.0 / math.sqrt(param[0].numel())
                draw = (torch.rand(param.shape, generator=generator) * 2.0 - 1.0) * bound
                param[where] = draw.to(param.device, param.dtype)[where]
            else:
                param[where] = 0.0
            if self.optimizer is not None:
                for key, value in self.optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value[where] = self._fresh_state(param, key, value)

    def _fresh_state(self, param: torch.Tensor, key: str, value: torch.Tensor) -> float | complex:
        """Where the optimizer starts state ``key`` of a fresh parameter (:data:`FRESH_STATE`; else 0)."""
        for kind, state_key, option in FRESH_STATE:
            if isinstance(self.optimizer, kind) and key == state_key:
                group = next((g for g in self.optimizer.param_groups if any(p is param for p in g["params"])), None)
                if group is not None:
                    start = float(group[option])
                    return complex(start, start) if value.is_complex() else start  # as torch's full_like for complex
        return 0.0

    def _dense_grad(self, name: str, param: torch.Tensor) -> torch.Tensor:
        if param.grad is None:
            raise PrunelabError(
                f"{self.name} needs the dense gradient but {name!r} has no .grad at step {self.step_count}; call "
                "sparsifier.step() after optimizer.step() and before optimizer.zero_grad()"
            )
        grad = param.grad.detach()
        removed = self._removed_grads.get(name)  # what mask_gradients_() took from the masked entries
        return grad if removed is None else grad + removed.to(grad.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state saved by another method (its ``name``) is refused first.

        Resume in the order: build the sparsifier, ``load_state_dict(state)``, then
        ``prepare(optimizer)``.  A :meth:`prepare` before the load draws a fresh random mask
        and zeroes the model's weights outside it, so a checkpoint's connections that mask
        dropped come back as zeros: loading masks that differ from that fresh draw warns."""
        fresh = self.prepared and self.step_count == 0
        before = dict(self.masks) if fresh else None
        saved = state.get("name") if isinstance(state, Mapping) else None
        if isinstance(state, Mapping) and saved != self.name:
            what = f"method {saved!r}" if "name" in state else "no method name"
            raise PrunelabError(f"{self.name} cannot load a sparsifier state of {what}; load the state_dict() of a "
                                f"{self.name} sparsifier, or build the sparsifier of the method that saved it")
        super().load_state_dict(state)
        if before is not None and any(not torch.equal(before[n], m.to(before[n].device)) for n, m in self.masks.items()):
            warnings.warn(
                f"{self.name}.load_state_dict() after prepare(): prepare() drew a fresh random mask and zeroed the "
                "weights outside it, so the loaded masks' weights there are now 0; resume in the order: build the "
                "sparsifier, load_state_dict(state), prepare(optimizer)", stacklevel=2)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def proportional_counts(total: int, shares: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` into integers proportional to ``shares``, each at most ``capacity``.

    Largest-remainder apportionment; a layer whose share exceeds its capacity is filled
    and the rest re-split among the others (water-filling), so the counts always sum to
    ``total`` when ``total <= sum(capacity)``.  Zero (or all-zero) shares split equally
    once every positive-share layer is full.
    """
    room = sum(capacity.values())
    if total > room:
        raise ValueError(f"cannot place {total} weights in layers with room for {room}")
    names = list(shares)
    counts = {n: 0 for n in names}
    open_ = [n for n in names if capacity[n] > 0]
    remaining = total
    while remaining > 0 and open_:
        weights = {n: max(float(shares[n]), 0.0) for n in open_}
        wsum = sum(weights.values())
        if wsum <= 0.0:
            weights, wsum = {n: 1.0 for n in open_}, float(len(open_))
        ideal = {n: remaining * weights[n] / wsum for n in open_}
        full = [n for n in open_ if ideal[n] >= capacity[n] - counts[n]]
        if full:
            for n in full:
                remaining -= capacity[n] - counts[n]
                counts[n] = capacity[n]
            open_ = [n for n in open_ if n not in full]
            continue
        floors = {n: math.floor(ideal[n]) for n in open_}
        for n in open_:
            counts[n] += floors[n]
        remaining -= sum(floors.values())
        order = sorted(open_, key=lambda n: (-(ideal[n] - floors[n]), names.index(n)))
        for n in order[:remaining]:
            counts[n] += 1
        remaining = max(remaining - len(order), 0)
    return counts


class ReallocatingSparsifier(DynamicSparsifier):
    """DST whose growth is split across layers by :meth:`layer_shares` (DSR, SNFS).

    Drops are capped so every layer keeps at least ``max(1, min_keep)`` weights and can
    regrow what it dropped; growth room per layer is ``min(zeros after the drop,
    max_keep - survivors)``.  Fixed-sparsity / dense-rule layers regrow exactly what they
    dropped; the rest of ``sum_l d_l`` goes to the others by :func:`proportional_counts`,
    so the global count is exact.  A free layer that reallocation has filled up (or that
    ERK started dense) still prunes like every other layer -- DSR prunes ``|w| < H`` in
    all sparse layers, SNFS ``p`` of every layer -- so its weights can move out again.
    """

    def _capped(self, name: str, want: int, mask: torch.Tensor) -> int:
        kept = int(mask.sum())
        low, high = self.keep_limits[name]
        if low == high:  # a fixed layer regrows exactly what it drops
            if kept == mask.numel():
                return 0  # fixed and dense: it would only drop and regrow the same weights
            floor = 1
        else:
            floor = max(low, 1)
        return max(min(want, kept - floor), 0)

    def layer_shares(self, old: Mapping[str, torch.Tensor], survivors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def grow_counts(self, drop: Mapping[str, int], old: Mapping[str, torch.Tensor],
                    survivors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        fixed = [n for n in self.params if self.keep_limits[n][0] == self.keep_limits[n][1]]
        counts = {n: drop[n] for n in fixed}
        free = [n for n in self.params if n not in counts]
        capacity = {n: min(old[n].numel(), self.keep_limits[n][1]) - int(survivors[n].sum()) for n in free}
        shares = self.layer_shares(old, survivors)
        counts.update(proportional_counts(sum(drop[n] for n in free), {n: shares[n] for n in free}, capacity))
        return counts
