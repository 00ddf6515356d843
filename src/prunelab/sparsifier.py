"""The sparsifier: score -> structure -> allocate -> mask -> enforce, with a life cycle.

Use it like an optimizer companion in any training loop::

    sparsifier = Sparsifier(model, criterion="magnitude", schedule=Cubic(0.9, num_updates=10, frequency=100))
    sparsifier.prepare(optimizer)
    for x, y in loader:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        sparsifier.step()              # updates masks when the schedule says, keeps zeros zero
                                       # (before the next zero_grad: gradient criteria and RigL read .grad)
    masks = sparsifier.finalize()      # a MaskSet; the model holds real zeros

Step numbering: schedule step ``t`` is the state after ``t`` optimizer steps.  Step 0 --
before any training -- is applied by ``prepare()`` (so ``OneShot(s)`` prunes at once and
``Cubic(s_f, initial_sparsity=s_i, start_step=0)`` starts at ``s_i``); the ``t``-th call
of ``step()`` applies step ``t``.

``step()`` runs after ``optimizer.step()``: it re-zeroes masked weights *and* the
optimizer state of masked entries (momentum buffers, Adam moments), so masked weights
stay exactly zero under momentum, weight decay and Adam(W).  Masks are always decided
from scores averaged over all ranks, so every rank holds the identical mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelab import distributed
from prunelab.allocation import Allocation, LayerBudget, allocate, check_sparsity, get_allocation
from prunelab.criteria import Criterion, ScoreData, get_criterion
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.schedules import Schedule
from prunelab.structure import Granularity, get_granularity, layer_granularities
from prunelab.targets import LayerRules, keep_bounds, prunable_parameters


class Sparsifier:
    """Decides masks for a model's Linear/Conv weights and keeps them enforced.

    Life cycle: ``prepare(optimizer)`` -> ``step()`` after every optimizer step (or
    ``update(sparsity)`` by hand) -> ``finalize()``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        criterion: str | Criterion = "magnitude",
        granularity: str | Granularity = "unstructured",
        allocation: str | Allocation = "global",
        schedule: Schedule | None = None,
        rules: LayerRules | None = None,
        exclude: Sequence[str] = (),
        data: ScoreData | None = None,
    ) -> None:
        if rules is not None and not isinstance(rules, LayerRules):
            raise PrunelabError(
                f"rules must be a LayerRules, got a {type(rules).__name__}; pass e.g. LayerRules(keep_first='dense')"
            )
        if schedule is not None and not all(callable(getattr(schedule, a, None)) for a in ("sparsity_at", "is_update_step")):
            raise PrunelabError(
                f"schedule must be a Schedule (e.g. OneShot(0.9) or Cubic(0.9, num_updates=10, frequency=100)), got "
                f"{schedule!r:.60}; to prune once by hand call update(sparsity) instead"
            )
        # a torch.compile'd model shares its parameters with the module it wraps: name them as that
        # module does, so the masks fit the plain model (not '_orig_mod.fc1.weight')
        model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
        self.model = model
        self.criterion = get_criterion(criterion) if isinstance(criterion, str) else criterion
        self.granularity = get_granularity(granularity)
        self.allocation = get_allocation(allocation)
        self.schedule = schedule
        self.rules = rules if rules is not None else LayerRules()
        self.data = data
        if schedule is not None and data is None and getattr(self.criterion, "needs_data", False):
            raise PrunelabError(
                f"criterion {self.criterion.name!r} needs data and the schedule updates the masks by itself; pass "
                "Sparsifier(..., data=ScoreData(loader)) (it would fail at the first scheduled update, mid-training)"
            )
        self.params = prunable_parameters(model, exclude)
        self.structures = layer_granularities(self.granularity, model, self.params)  # name -> the layer's view
        self.bounds = self.rules.bounds(list(self.params))
        if self.granularity.is_pattern:
            self._check_pattern_rules()
        for name, param in self.params.items():
            if not self._kept_as_is(name):  # layers a rule keeps dense (or below an N:M pattern) need not fit
                self.structures[name].check(name, tuple(param.shape))
        self.masks = MaskSet.ones(self.params)
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_count = 0
        self.prepared = False  # step() before prepare() would never apply the step-0 update
        self.history: list[dict[str, Any]] = []

    # --- life cycle ------------------------------------------------------------------
    def prepare(self, optimizer: torch.optim.Optimizer | None = None) -> "Sparsifier":
        """Attach the optimizer whose state must respect the masks; apply current masks.

        Before any ``step()`` (``step_count == 0``) this also applies the schedule's step-0
        update, e.g. ``OneShot(s)`` with its default ``at_step=0``.  It is applied once: a
        second ``prepare()`` at step 0 (or a resumed step-0 state) does not prune again.
        """
        if optimizer is not None and not isinstance(getattr(optimizer, "state", None), Mapping):
            raise PrunelabError(
                f"prepare needs a torch.optim.Optimizer (or None), got a {type(optimizer).__name__}; pass the optimizer "
                "that trains the model, so its momentum / Adam state of pruned weights is zeroed too"
            )
        self.optimizer = optimizer
        if self.step_count == 0:
            self._scheduled_update(0, once=True)
        self.enforce()
        self.prepared = True
        return self

    def step(self) -> None:
        """Call after ``optimizer.step()``: enforce the masks, then update them if the schedule says so.

        Enforcing first means a scheduled update scores the network the masks define, not the
        one the optimizer just moved (pruned weights drift by ``-lr * grad`` until enforced);
        ``update`` enforces its new masks itself.  The ``t``-th call applies schedule step ``t``
        (step 0 is applied by ``prepare()``).
        """
        if not self.prepared:
            raise PrunelabError(
                "Sparsifier.step() called before prepare(); call sparsifier.prepare(optimizer) once before training "
                "(it applies the schedule's step-0 update and zeroes the optimizer state of pruned weights)"
            )
        self.step_count += 1
        self.enforce()
        self._scheduled_update(self.step_count)

    def _scheduled_update(self, step: int, once: bool = False) -> None:
        """Update the masks to the schedule's target when ``step`` is one of its update steps.

        ``once``: skip it when the history already records this step at this target.  A step
        whose target the masks already meet is skipped too: a coarse (channel, kernel) update
        removes whole groups and can overshoot, and pruning is monotone, so the next step of a
        rising schedule may have nothing to prune (as :func:`prunelab.methods.base.raise_sparsity`).
        """
        if self.schedule is None or not self.schedule.is_update_step(step):
            return
        target = self.schedule.sparsity_at(step)
        if target <= 0.0 or target <= self.masks.stats().sparsity:
            return
        if once and any(h["step"] == step and h["target_sparsity"] == target for h in self.history):
            return
        self.update(target)

    def finalize(self) -> MaskSet:
        """Enforce the masks a last time and return them; the model keeps its real zeros."""
        self.enforce()
        self.masks.verify_across_ranks()
        return self.masks

    # --- mask decisions --------------------------------------------------------------
    def scores(self, data: ScoreData | None = None) -> dict[str, torch.Tensor]:
        """Criterion scores, averaged over ranks so every rank decides the same mask."""
        data = data if data is not None else self.data
        if self.criterion.needs_data and data is None:
            raise PrunelabError(
                f"criterion {self.criterion.name!r} needs data; pass data=ScoreData(loader) or a --dataset"
            )
        params = self.params
        if not getattr(self.criterion, "scores_kept_dense", True):  # e.g. slimming: only the layers it may prune
            params = {n: p for n, p in self.params.items() if self.bounds[n][1] > 0}
        raw = self.criterion(self.model, params, data) if params else {}
        # a layer the rules keep dense and the criterion was not asked about: placeholder zeros (never decide)
        raw = {n: raw[n] if n in raw else torch.zeros(p.shape, device=p.device) for n, p in self.params.items()}
        return {n: distributed.all_reduce_mean_(s.detach().float().clone()) for n, s in raw.items()}

    @torch.no_grad()
    def update(self, sparsity: float, data: ScoreData | None = None) -> MaskSet:
        """Re-decide the masks at ``sparsity`` (pruning is monotone: pruned stays pruned).

        For an N:M pattern the sparsity is fixed at ``1 - N/M`` (Mishra et al. 2021), so
        any other ``sparsity`` is refused rather than silently replaced.
        """
        check_sparsity(sparsity)
        if self.granularity.is_pattern:
            self._check_pattern_sparsity(sparsity)
        self._refuse_meta("decide masks")
        with torch.enable_grad():
            scores = self.scores(data)
        if self.granularity.is_pattern:
            new = self._pattern_masks(scores)
        else:
            new = self._allocated_masks(scores, sparsity)
        self.masks = MaskSet(new).intersect(self.masks)
        self.enforce()
        stats = self.masks.stats()
        self.history.append({"step": self.step_count, "target_sparsity": sparsity, "achieved_sparsity": stats.sparsity})
        return self.masks

    def _allocated_masks(self, scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        layers: list[LayerBudget] = []
        for name, param in self.params.items():
            if param.numel() == 0:  # a zero-size layer (e.g. Linear(0, n)) has nothing to prune
                continue
            shape = tuple(param.shape)
            structure = self.structures[name]
            groups = structure.to_groups(scores[name].to(param.device))  # (G, group_size)
            group_scores = self.criterion.reduce_group(groups).float()  # (G,)
            alive = structure.to_groups(self.masks[name].to(param.device)).any(dim=1)  # pruned = all of it pruned
            group_scores = torch.where(alive, group_scores, torch.full_like(group_scores, float("-inf")))
            lo_s, hi_s = self.bounds[name]
            min_keep, max_keep = keep_bounds(group_scores.numel(), lo_s, hi_s)
            max_keep = min(max_keep, int(alive.sum()))
            min_keep = min(min_keep, max_keep)
            layers.append(LayerBudget(name, group_scores, structure.group_size(shape), shape, min_keep, max_keep,
                                      self.granularity.structured))
        keep = allocate(self.allocation, layers, sparsity)
        return {n: self.structures[n].from_groups(keep[n], tuple(p.shape)) if n in keep else self.masks[n]
                for n, p in self.params.items()}

    def check_target(self, sparsity: float) -> None:
        """Raise the allocator's one-line error now if the layer rules make ``sparsity`` unreachable.

        Runs the allocation on placeholder scores (no data, no training needed), so a run
        can refuse an infeasible ``--keep-first dense --sparsity 0.99`` before it trains.  Under an N:M
        pattern nothing is allocated: it checks that ``sparsity`` is the pattern's ``1 - N/M``, as :meth:`update` does.
        """
        check_sparsity(sparsity)
        if self.granularity.is_pattern:  # N:M is not allocated: its one reachable target is 1 - N/M per pattern layer
            self._check_pattern_sparsity(sparsity)
            return
        layers: list[LayerBudget] = []
        for name, param in self.params.items():
            shape = tuple(param.shape)
            if param.numel() == 0:
                continue
            count = self.structures[name].num_groups(shape)  # no placeholder copy of the weight
            min_keep, max_keep = keep_bounds(count, *self.bounds[name])
            layers.append(LayerBudget(name, torch.zeros(count), self.structures[name].group_size(shape), shape,
                                      min(min_keep, max_keep), max_keep, self.granularity.structured))
        allocate(self.allocation, layers, sparsity)

    def _refuse_meta(self, action: str) -> None:
        """One-line error when a target is on the meta device: it has a shape but no values."""
        meta = [n for n, p in self.params.items() if p.device.type == "meta"]
        if meta:
            raise PrunelabError(
                f"cannot {action}: {meta[0]!r} is on the meta device and holds no values; materialise the model first "
                "(model.to_empty(device='cpu') and load its weights) -- check_target() works on meta parameters"
            )

    def _kept_as_is(self, name: str) -> bool:
        """True for a layer no update changes: kept dense by a rule, capped below an N:M
        pattern's fixed sparsity, or zero-size (nothing to prune)."""
        if self.params[name].numel() == 0:
            return True
        hi_s = self.bounds[name][1]
        if self.granularity.is_pattern:
            return hi_s < self.granularity.sparsity
        return hi_s <= 0.0

    def _check_pattern_rules(self) -> None:
        """Under an N:M pattern a layer is at the pattern's sparsity, or left dense when a rule
        caps it below that: a fixed sparsity *above* the pattern's cannot be met, so it is
        refused rather than silently lowered to ``1 - N/M``."""
        fixed = self.granularity.sparsity
        for name, (lo_s, _) in self.bounds.items():
            if lo_s > fixed + 1e-6:
                raise PrunelabError(
                    f"layer {name!r} has a fixed sparsity of {lo_s:.6g}, above the {fixed:.6g} (1 - N/M) that "
                    f"{self.granularity.describe()} removes; fix it at {fixed:.6g} or use another granularity"
                )

    def _check_pattern_sparsity(self, sparsity: float) -> None:
        # compared with the pattern's own sparsity, not the model's: layers kept dense by
        # keep_first / keep_last lower the overall number but not what the pattern does
        fixed = self.granularity.sparsity
        if not math.isclose(sparsity, fixed, rel_tol=0.0, abs_tol=1e-6):
            pattern = self.granularity.describe()
            raise PrunelabError(
                f"N:M fixes the sparsity at 1 - N/M = {fixed:.6g} for {pattern}, but sparsity {sparsity:.6g} was "
                f"asked for; pass sparsity {fixed:.6g} (methods that raise the sparsity in steps, such as "
                "iterative or gradual, cannot apply an N:M pattern: use oneshot), or another granularity"
            )

    def _pattern_masks(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks = {}
        for name in self.params:
            if self._kept_as_is(name):  # a dense / capped layer keeps its mask
                masks[name] = self.masks[name]
                continue
            alive = self.masks[name].to(scores[name].device)  # masks stay where they were made if the model moved
            score = torch.where(alive, scores[name], torch.full_like(scores[name], float("-inf")))
            masks[name] = self.granularity.pattern_mask(score)
        return masks

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Adopt externally decided masks (e.g. loaded from a checkpoint).

        Each mask moves to its parameter's device (masks read from a file are on the CPU),
        and nothing changes unless every mask fits its parameter.  A mask for a layer this
        sparsifier does not target (an excluded one, say) is refused, not silently dropped:
        its weights would stay dense although the caller asked for them to be masked.
        """
        if not isinstance(masks, Mapping):
            raise PrunelabError(f"set_masks needs a mapping FQN -> bool tensor, got {type(masks).__name__}")
        extra = [n for n in masks if n not in self.params]
        if extra:
            raise PrunelabError(
                f"mask {extra[0]!r} is for a layer this sparsifier does not target (excluded, a second name of a tied "
                "weight, or no Linear/Conv weight of this model); drop that mask, or include the layer by building the "
                "Sparsifier without excluding it (exclude= / --exclude)"
            )
        missing = set(self.params) - set(masks)
        if missing:
            raise PrunelabError(f"masks are missing layers {sorted(missing)}; load masks saved for this model")
        wrong = [n for n in self.params if not isinstance(masks[n], torch.Tensor)]
        if wrong:
            raise PrunelabError(
                f"mask {wrong[0]!r} is a {type(masks[wrong[0]]).__name__}, not a tensor; pass bool tensors (e.g. a MaskSet)"
            )
        adopted = MaskSet({n: masks[n].to(self.params[n].device) for n in self.params})
        adopted.check_model(self.model)  # before adopting: a wrong shape leaves the old masks in place
        self.masks = adopted
        self.enforce()

    # --- enforcement -----------------------------------------------------------------
    @torch.no_grad()
    def enforce(self) -> None:
        """Zero masked weights and the optimizer state of masked entries."""
        for name, param in self.params.items():
            pruned = ~self.masks[name].to(param.device)
            # masked_fill, not mul: inf * 0 = nan, so a multiply would keep an overflowed pruned weight (or Adam
            # moment) non-finite for ever, and a nan weight poisons every output although it is "pruned"
            param.masked_fill_(pruned, 0)
            if param.grad is not None:
                param.grad.masked_fill_(pruned, 0)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(pruned.to(value.device), 0)

    # --- resume ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "masks": dict(self.masks), "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s step count, history and masks (all or nothing)."""
        if not isinstance(state, Mapping) or "step_count" not in state or "masks" not in state:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise PrunelabError(
                f"sparsifier state needs 'step_count' and 'masks' (from Sparsifier.state_dict()), got {got}"
            )
        step_count = state["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise PrunelabError(f"sparsifier state has step_count={step_count!r}; expected an int >= 0")
        history = state.get("history", [])
        if not isinstance(history, (list, tuple)) or not all(
                isinstance(h, Mapping) and "step" in h and "target_sparsity" in h for h in history):
            raise PrunelabError(
                f"sparsifier state has history={history!r:.60}; expected a list of dicts with 'step' and "
                "'target_sparsity' (from Sparsifier.state_dict())"
            )
        self.set_masks(state["masks"])  # last: a bad state leaves masks, model and step count as they were
        self.step_count = step_count
        self.history = [dict(h) for h in history]
