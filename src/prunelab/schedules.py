"""Sparsity schedules: pure functions of the step.

A schedule answers two questions for any step ``t`` -- is the mask updated at ``t``,
and to what target sparsity -- without holding state, so a resumed run recomputes
exactly the same targets.  What a "step" is depends on the method driving it:
optimizer steps for ``gradual``, pruning rounds for ``iterative``.  Driven by a
:class:`~prunelab.sparsifier.Sparsifier`, step ``t`` is the state after ``t`` optimizer
steps: step 0 (before training) is applied by ``prepare()``, the ``t``-th ``step()``
applies step ``t``.

A schedule makes at most :data:`MAX_UPDATES` mask updates (``num_updates`` of
:class:`Cubic`, ``rounds`` of :class:`Geometric`): :meth:`Schedule.update_steps` lists
them all, and each update rescores the whole model, so a larger count is a typo, not a
plan (it would only run out of memory or time).
"""

from __future__ import annotations

from dataclasses import dataclass

from prunelab.allocation import check_sparsity
from prunelab.errors import PrunelabError
from prunelab.registry import Registry


MAX_UPDATES = 10**6  # mask updates one schedule may make (update_steps() lists them all)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Schedule:
    final_sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "final sparsity")

    def sparsity_at(self, step: int) -> float:
        raise NotImplementedError

    def is_update_step(self, step: int) -> bool:
        raise NotImplementedError

    def update_steps(self) -> list[int]:
        """Every step at which the mask is updated, in order (at most :data:`MAX_UPDATES`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune once, to ``final_sparsity``, at ``at_step``."""

    at_step: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.at_step) or self.at_step < 0:  # a negative or fractional step never comes
            raise PrunelabError(f"one-shot schedule needs an integer at_step >= 0, got {self.at_step!r}")

    def sparsity_at(self, step: int) -> float:
        return self.final_sparsity if step >= self.at_step else 0.0

    def is_update_step(self, step: int) -> bool:
        return step == self.at_step

    def update_steps(self) -> list[int]:
        return [self.at_step]


@dataclass(frozen=True)
class Cubic(Schedule):
    """Gradual pruning of Zhu & Gupta 2017 ("To prune, or not to prune"), eq. (1).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` for
    ``t in {t0, t0 + dt, ..., t0 + n dt}``; between updates the last value holds, before
    ``t0`` the network is dense, after ``t0 + n dt`` the sparsity stays ``s_f``.
    """

    initial_sparsity: float = 0.0
    start_step: int = 0
    num_updates: int = 10
    frequency: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.initial_sparsity, "initial sparsity")
        steps = (self.num_updates, self.frequency, self.start_step)
        if not all(_is_int(v) for v in steps) or self.num_updates < 1 or self.frequency < 1 or self.start_step < 0:
            raise PrunelabError(
                f"cubic schedule needs num_updates >= 1, frequency >= 1, start_step >= 0; got "
                f"{self.num_updates!r}, {self.frequency!r}, {self.start_step!r} (integers)"
            )
        if self.num_updates > MAX_UPDATES:
            raise PrunelabError(f"cubic schedule needs num_updates <= {MAX_UPDATES:,} (each update rescores the model), "
                                f"got {self.num_updates:,}; use fewer updates with a larger frequency")
        if self.initial_sparsity > self.final_sparsity:
            raise PrunelabError(
                f"cubic schedule raises the sparsity from initial_sparsity to final_sparsity, but {self.initial_sparsity} "
                f"> {self.final_sparsity}; pass initial_sparsity <= final_sparsity (pruned weights never come back)"
            )

    @property
    def end_step(self) -> int:
        return self.start_step + self.num_updates * self.frequency

    def sparsity_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        last = min(step, self.end_step)
        last = self.start_step + (last - self.start_step) // self.frequency * self.frequency
        if last == self.start_step:  # exactly s_i: s_f + (s_i - s_f) rounds (0.9 + (0.1 - 0.9) = 0.09999...)
            return float(self.initial_sparsity)
        progress = (last - self.start_step) / (self.num_updates * self.frequency)
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (step - self.start_step) % self.frequency == 0

    def update_steps(self) -> list[int]:
        return list(range(self.start_step, self.end_step + 1, self.frequency))


@dataclass(frozen=True)
class Geometric(Schedule):
    """Iterative magnitude pruning rounds (Han et al. 2015; Frankle & Carbin 2019).

    Round ``r`` (1-based) removes the fraction ``p`` of the weights still remaining, so
    ``s_r = 1 - (1 - p)^r``, with ``p = 1 - (1 - s_f)^(1/R)`` reaching ``s_f`` after
    ``R = rounds`` rounds.  Step 0 is the dense network.
    """

    rounds: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.rounds) or self.rounds < 1:
            raise PrunelabError(f"iterative pruning needs an integer rounds >= 1, got {self.rounds!r}")
        if self.rounds > MAX_UPDATES:
            raise PrunelabError(f"iterative pruning needs rounds <= {MAX_UPDATES:,} (each round rescores the model), "
                                f"got {self.rounds:,}; use fewer rounds")

    @property
    def rate(self) -> float:
        return 1.0 - (1.0 - self.final_sparsity) ** (1.0 / self.rounds)

    def sparsity_at(self, step: int) -> float:
        r = min(max(step, 0), self.rounds)
        return 1.0 - (1.0 - self.rate) ** r if r < self.rounds else self.final_sparsity

    def is_update_step(self, step: int) -> bool:
        return 1 <= step <= self.rounds

    def update_steps(self) -> list[int]:
        return list(range(1, self.rounds + 1))


def per_round_sparsity(rate: float, round_index: int) -> float:
    """Sparsity after ``round_index`` rounds that each remove ``rate`` of the remaining weights."""
    check_sparsity(rate, "per-round pruning rate")
    if not _is_int(round_index) or round_index < 0:  # -1 gave a negative sparsity, 1.5 a fractional round
        raise PrunelabError(f"round_index must be an integer >= 0 (rounds done), got {round_index!r}")
    return 1.0 - (1.0 - rate) ** round_index


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
SCHEDULES.add("oneshot", OneShot, "prune once to the target at a given step")
SCHEDULES.add("cubic", Cubic, "Zhu & Gupta 2017: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 every dt steps")
SCHEDULES.add("geometric", Geometric, "iterative rounds, each removing p of the remaining weights: s_r = 1 - (1-p)^r")
