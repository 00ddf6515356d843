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

Gradients of masked weights.  Between ``backward()`` and ``step()`` a masked weight holds
its *dense* gradient (gradient criteria and DST growth read it).  An element-wise
optimizer (SGD, Adam(W), Adagrad, RMSprop) uses it only on the masked entry itself, which
``step()`` re-zeroes; but anything that mixes gradients across entries -- a gradient norm
(``clip_grad_norm_``), a matrix-wise update (Muon's orthogonalisation, Adafactor's factored
second moment) -- lets it change the *kept* weights' updates.  Opt in to training exactly
the sub-network by calling :meth:`Sparsifier.mask_gradients_` after the last ``backward()``
and before clipping / ``optimizer.step()``; the default loop is unchanged.

Parameters are named, not held.  The sparsifier targets parameters by FQN: when the
model's Parameter objects are replaced after it was built (``model.to_empty(device=...)``
of a meta-device model, ``load_state_dict(sd, assign=True)``), ``prepare()``,
``update()``, ``set_masks()`` and ``finalize()`` look the names up again, and ``step()``
notices a replaced Parameter, or a replaced module on its path (``model[0] = nn.Linear(...)``),
with a few identity checks per layer and re-binds it.  An attached optimizer that still
trains a replaced Parameter is refused in one line (rebuild it from ``model.parameters()``
and pass it to ``prepare()``).
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a wrapper trains: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``),
    ``DistributedDataParallel`` and ``DataParallel`` (``module``), nested in any order.

    The wrappers share their parameters with the wrapped module, so a sparsifier built on a
    wrapper names its masks as the plain model does (``0.weight``, not ``module.0.weight`` or
    ``_orig_mod.0.weight``) and the masks load into the unwrapped model.
    """
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


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
        model = unwrap_model(model)  # masks named like the plain model's, not 'module.0.weight'
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
        self._slots = self._owner_slots()  # name -> (module, attribute): the cheap per-step identity check
        self.structures = layer_granularities(self.granularity, model, self.params)  # name -> the layer's view
        self.bounds = self.rules.bounds(list(self.params))
        if self.granularity.is_pattern:
            self._check_pattern_rules()
        for name, param in self.params.items():
            if not self._kept_as_is(name):  # layers a rule keeps dense (or below an N:M pattern) need not fit
                self.structures[name].check(name, tuple(param.shape))
        self.masks = MaskSet.ones(self.params)
        self._held_masks: dict[str, torch.Tensor] = {}  # values of masks set while their parameter is on meta
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
        self._bind_parameters(optimizer)  # before adopting it: a refused optimizer is not attached
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
        self._check_bound()  # a refused replacement leaves the step count as it was
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
        self._bind_parameters(self.optimizer)
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
        self._bind_parameters(self.optimizer)
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
            masks[name] = self.structures[name].pattern_mask(score)  # the layer's view: a ConvTranspose blocks dim 0
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
        self._bind_parameters(self.optimizer)
        missing = set(self.params) - set(masks)
        if missing:
            raise PrunelabError(f"masks are missing layers {sorted(missing)}; load masks saved for this model")
        wrong = [n for n in self.params if not isinstance(masks[n], torch.Tensor)]
        if wrong:
            raise PrunelabError(
                f"mask {wrong[0]!r} is a {type(masks[wrong[0]]).__name__}, not a tensor; pass bool tensors (e.g. a MaskSet)"
            )
        meta = [n for n in self.params if masks[n].device.type == "meta"]
        if meta:
            raise PrunelabError(f"mask {meta[0]!r} is on the meta device and holds no values; pass masks with values "
                                "(e.g. MaskSet.load(path) or torch.load without map_location='meta')")
        adopted = MaskSet({n: masks[n].to(self.params[n].device) for n in self.params})
        adopted.check_model(self.model)  # before adopting: a wrong shape leaves the old masks in place
        self.masks = adopted
        # a meta mask has no bits: keep the values for when the model is materialised (to_empty)
        self._held_masks = {n: masks[n].detach().clone() for n, p in self.params.items() if p.device.type == "meta"}
        self.enforce()

    # --- enforcement -----------------------------------------------------------------
    @torch.no_grad()
    def enforce(self) -> None:
        """Zero masked weights, their gradients and the optimizer state of masked entries."""
        self._check_bound()
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

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of masked weights now, so the optimizer step trains exactly the sub-network.

        Opt-in; call it once after the last ``backward()`` of an optimizer step and before
        ``clip_grad_norm_`` / ``optimizer.step()``.  Without it a masked weight keeps its dense
        gradient until :meth:`step`, which is harmless for element-wise optimizers (SGD,
        Adam(W), Adagrad, RMSprop: the masked entry is re-zeroed) but leaks into the kept
        weights through anything that mixes gradient entries: a global gradient norm, Muon's
        orthogonalised update, Adafactor's factored second moment.  With it, training equals
        the reference "zero the pruned gradients, step, zero the pruned weights".  Weights and
        optimizer state are left to :meth:`step`.  Dynamic sparse training keeps what growth
        needs from the dense gradient (see :meth:`prunelab.dst.DynamicSparsifier.mask_gradients_`).
        """
        self._check_bound()
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.masked_fill_(~self.masks[name].to(param.grad.device), 0)

    # --- parameters by name ------------------------------------------------------------
    def _owner_slots(self) -> dict[str, tuple[tuple[tuple[nn.Module, str, nn.Module], ...], nn.Module, str]]:
        """``name -> (the path's (parent, child name, child) links, the module that registers it, attribute)``."""
        slots = {}
        for name in self.params:
            module_name, _, attr = name.rpartition(".")
            links, module = [], self.model
            for part in module_name.split(".") if module_name else ():
                child = module.get_submodule(part)
                links.append((module, part, child))
                module = child
            slots[name] = (tuple(links), module, attr)
        return slots

    def _check_bound(self) -> None:
        """A few identity checks per layer: re-bind when a module's Parameter, or a module on its path
        (``model[0] = nn.Linear(...)``), was replaced."""
        for name, (links, owner, attr) in self._slots.items():
            if owner._parameters.get(attr) is not self.params[name] or any(
                    parent._modules.get(part) is not child for parent, part, child in links):
                self._bind_parameters(self.optimizer)
                return

    def _bind_parameters(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Look every target up by FQN in the model and adopt replaced Parameters.

        ``load_state_dict(assign=True)`` and ``to_empty()`` (meta -> real device) put new
        Parameter objects into the modules; the masks, keyed by name, carry over (a meta
        model's all-kept placeholder masks are re-made on the new device).  Refused in one
        line: a name that no longer is a plain Parameter of the same shape, and an attached
        optimizer that still trains the replaced Parameter (its steps would miss the model);
        ``optimizer``: the one to check (the attached one, or the one ``prepare`` is given).
        """
        live = {name: self._live_parameter(name) for name in self.params}
        replaced = [n for n, p in live.items() if p is not self.params[n]]
        placeholders = [n for n, p in live.items() if self.masks[n].device.type == "meta" and p.device.type != "meta"]
        if not replaced and not placeholders:
            return
        trained = self._optimizer_params(optimizer)
        for name in replaced:
            if id(self.params[name]) in trained and id(live[name]) not in trained:
                raise PrunelabError(
                    f"{name!r} was replaced by a new Parameter (load_state_dict(assign=True), to_empty() or a new "
                    "module) but the optimizer given to prepare() still trains the old one; build the optimizer from "
                    "model.parameters() after replacing them and call sparsifier.prepare(optimizer)"
                )
        self.params.update(live)  # in place: the same dict object, now holding the live Parameters
        self._slots = self._owner_slots()
        if placeholders:  # a meta mask: the values set_masks() held, else the all-kept mask of __init__
            held = self._held_masks
            self.masks = MaskSet({
                n: (held.pop(n).to(live[n].device) if n in held else torch.ones_like(live[n], dtype=torch.bool))
                if n in placeholders else m for n, m in self.masks.items()})
        self._on_rebind(replaced)

    def _on_rebind(self, names: Sequence[str]) -> None:
        """Hook for subclasses holding per-Parameter state; ``names`` got new Parameter objects."""

    def _live_parameter(self, name: str) -> nn.Parameter:
        try:
            param = self.model.get_parameter(name)
        except AttributeError:
            param = None
        old = self.params[name]
        if not isinstance(param, nn.Parameter) or isinstance(param, nn.parameter.UninitializedParameter):
            raise PrunelabError(
                f"{name!r} is no longer a plain initialised nn.Parameter of the model (a parametrization, prune hook "
                "or module removed after the Sparsifier was built); build the Sparsifier on the model as it is now"
            )
        if param.shape != old.shape:
            raise PrunelabError(
                f"{name!r} was replaced by a Parameter of shape {tuple(param.shape)}, not {tuple(old.shape)}; the masks "
                "fit the old shape -- build a new Sparsifier for the changed model"
            )
        return param

    @staticmethod
    def _optimizer_params(optimizer: torch.optim.Optimizer | None) -> set[int]:
        if optimizer is None:
            return set()
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    # --- resume ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # values, not meta placeholders: a meta mask set_masks() held no values for is __init__'s all-kept one
        masks = {n: self._held_masks.get(n, torch.ones(m.shape, dtype=torch.bool) if m.device.type == "meta" else m)
                 for n, m in self.masks.items()}
        return {"step_count": self.step_count, "masks": masks, "history": list(self.history)}

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
