"""The dry run of structured shrink: which channels each coupled group keeps, and why not.

:func:`plan_shrink` walks the channel graph of :mod:`prunelab.materialise.graph` in
graph order (pass 2): it reads the row masks of every channel space, keeps a channel of
a coupled group unless every member's mask prunes it, propagates the constant value of
pruned channels (bias through BatchNorm, activations, pools, reshapes, sums, products,
concatenation) and folds it into each consumer's bias, and collects every problem --
an op a pruned channel may not pass, a constant that cannot be folded exactly -- as a
one-line message naming op, node and module.  The rules are described in
:mod:`prunelab.materialise.shrink`, which applies the plan.

A transposed conv's weight is ``(in_channels, out_channels / groups, *kernel)``: its mask
is read as one row vector -- which output channels ``weight[:, o]`` it keeps, then which
input channels ``weight[i]`` -- and must prune whole slices of either kind.  Its input part
votes on its input channels only when it prunes some input slice: an output-channel mask
(what the channel granularity gives a transposed conv, :class:`prunelab.structure.TransposedChannel`)
keeps every input slice and has no opinion on them, so the producer's mask alone decides.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise.graph import (
    CONV_TYPES, CONVT_TYPES, build_graph, mutated_input, pad_spec, spreads_constants, zero_padded,
)
from prunelab.materialise.layouts import ChannelGraph, Layout, Op, Segment
from prunelab.materialise.tracing import describe_target, eval_mode

__all__ = ["SILENCE_CLI", "CoupledGroup", "LayerCut", "ShrinkPlan", "plan_shrink"]

# The CLI's way to silence pruned channels, named in problems; a command other than `materialise` that
# shrinks (bench-latency) names its own option instead (prunelab.cli_materialise).
SILENCE_CLI = "materialise --silence-pruned-channels"


@dataclass(frozen=True)
class CoupledGroup:
    """Channels cut together: ``kept`` of ``channels`` stay in every member."""

    channels: int
    kept: int
    members: tuple[str, ...]
    masks: tuple[str, ...]
    note: str = ""

    def describe(self) -> str:
        masks = f" (masks: {', '.join(self.masks)})" if self.masks else " (no masks)"
        note = f" [{self.note}]" if self.note else ""
        return f"keeps {self.kept} of {self.channels} channels{masks}: {'; '.join(self.members)}{note}"


@dataclass(frozen=True)
class LayerCut:
    """How one submodule is cut.

    ``rows``: kept output rows / channels (BatchNorm: kept features; depthwise: kept
    channels).  ``cols``: kept input columns / channels.  ``bias_delta``: folded
    constants added to the bias before the rows are cut.  ``heads``: an attention unit's
    new ``num_heads``.
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None
    heads: int | None = None


@dataclass(frozen=True)
class ShrinkPlan:
    """The dry run of :func:`shrink_model`: coupled groups, per-layer cuts and problems."""

    groups: tuple[CoupledGroup, ...]
    problems: tuple[str, ...]
    cuts: Mapping[str, LayerCut]
    problem_kinds: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        head = (f"shrink plan: {len(self.groups)} coupled groups, {len(self.cuts)} layers cut, "
                f"{len(self.problems)} problems")
        lines = [head]
        lines += [f"  group {i}: {g.describe()}" for i, g in enumerate(self.groups)]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more; see plan_shrink(...).problems)" if len(self.problems) > 1 else ""
            raise PrunelabError(f"{self.problems[0]}{more}")


# --- planning ------------------------------------------------------------------------------
@dataclass
class _Cut:
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    heads: int | None = None


class _Planner:
    """Pass 2 over the channel graph: decide kept channels, fold constants, collect problems."""

    def __init__(self, model: nn.Module, masks: MaskSet, graph: ChannelGraph) -> None:
        self.model, self.masks, self.g = model, masks, graph
        self.params = dict(model.named_parameters())
        self.problems: list[tuple[str, str]] = []
        self.rows: dict[str, torch.Tensor] = {}       # masked weight -> (rows,) any weight kept
        self.keep: dict[int, torch.Tensor] = {}       # group root -> (size,) kept channels
        self.const: dict[str, torch.Tensor] = {}      # node -> (length,) float64 value of pruned positions
        self.cuts: dict[str, _Cut] = {}
        self.abstaining: set[str] = set()  # transposed convs' masks that prune no input slice: no vote on their inputs
        self.notes: dict[int, str] = {}
        self.members: dict[int, list[int]] = {}
        self.ops_by_node: dict[str, Op] = {op.node.name: op for op in graph.ops}
        self.order: dict[str, int] = {node.name: i for i, node in enumerate(graph.module.graph.nodes)}

    def problem(self, kind: str, message: str) -> None:
        if all(message != m for _, m in self.problems):
            self.problems.append((kind, message))

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        """The masked weight of ``name`` in float64 (pruned rows are exact zeros)."""
        weight = self.module(name).weight.detach().double()
        mask = self.masks.get(f"{name}.weight")
        return weight * mask.to(weight.device) if mask is not None else weight

    def bias(self, name: str, size: int) -> torch.Tensor:
        bias = getattr(self.module(name), "bias", None)
        device = self.module(name).weight.device
        return bias.detach().double() if bias is not None else torch.zeros(size, dtype=torch.float64, device=device)

    # masks -> kept channels of every coupled group
    def read_masks(self) -> None:
        for name, mask in self.masks.items():
            owner = _get(self.model, name.rpartition(".")[0])
            if isinstance(owner, CONVT_TYPES) and name.endswith(".weight"):
                self.rows[name] = self.transposed_rows(name, mask, owner.groups)
                if owner.groups == 1 and bool(self.rows[name][owner.out_channels:].all()):
                    self.abstaining.add(name)
                continue
            rows = mask.reshape(mask.shape[0], -1) if mask.dim() > 0 else mask.reshape(1, 1)
            kept, pruned = rows.all(dim=1), ~rows.any(dim=1)
            partial = (~(kept | pruned)).nonzero()
            if len(partial):
                r = int(partial[0])
                unit = "channel" if mask.dim() > 2 else "neuron"
                self.problem("mask", f"mask of {name!r} is not a {unit} mask: row {r} keeps {int(rows[r].sum())} of "
                                     f"{rows.shape[1]} weights; prune with granularity='channel'/'neuron' (CLI: --granularity "
                                     "channel/neuron) to shrink, or use materialise(model, 'csr', ...) (CLI: --form csr)")
            self.rows[name] = rows.any(dim=1)

    def transposed_rows(self, name: str, mask: torch.Tensor, groups: int) -> torch.Tensor:
        """``(out_channels + in_channels,)``: the output channels, then the input channels a transposed conv's mask keeps.

        The weight is ``(in, out/groups, *k)``; output channel ``o = g*(out/groups) + j`` of
        group ``g`` is ``weight[g*in/groups:(g+1)*in/groups, j]``.  A channel mask keeps
        ``weight[i, j]`` whole exactly when it keeps both input ``i`` and its group's output
        ``j``; anything else is reported.
        """
        cells = mask.reshape(mask.shape[0], mask.shape[1], -1)  # (in, out/g, k)
        some, whole = cells.any(dim=2), cells.all(dim=2)        # (in, out/g)
        n_in, out_g = some.shape
        ins = some.any(dim=1)                                   # (in,)
        outs = some.reshape(groups, n_in // groups, out_g).any(dim=1)  # (g, out/g)
        expected = ins[:, None] & outs.repeat_interleave(n_in // groups, dim=0)  # (in, out/g)
        wrong = ((some != expected) | (whole != expected)).nonzero()
        if len(wrong):
            i, j = (int(v) for v in wrong[0])
            self.problem("mask", f"mask of {name!r} is not a channel mask of a transposed conv: weight[{i}, {j}] keeps "
                                 f"{int(cells[i, j].sum())} of {cells.shape[2]} weights but input channel {i} and output "
                                 f"slice {j} are kept elsewhere; prune whole input channels weight[i] or output channels "
                                 "weight[:, j] (the weight is (in_channels, out_channels/groups, *kernel)) to shrink, or "
                                 "use materialise(model, 'csr', ...) (CLI: --form csr)")
        return torch.cat([outs.reshape(-1), ins])

    def space_keep(self, sid: int) -> torch.Tensor:
        space = self.g.spaces[sid]
        keep: torch.Tensor | None = None
        for owner in space.owners:
            rows = self.rows.get(owner.param)
            if not owner.required and owner.param in self.abstaining:  # an output-channel mask of a transposed conv
                continue
            if rows is None:
                if owner.required:
                    keep = torch.ones(space.size, dtype=torch.bool)
                continue
            block = rows[owner.offset: owner.offset + space.size * owner.inner].cpu().reshape(space.size, owner.inner)
            partial = (block.any(dim=1) & ~block.all(dim=1)).nonzero()
            if len(partial):
                h = int(partial[0])
                self.problem("mask", f"mask of {owner.param!r} is not a head mask: head {h} keeps {int(block[h].sum())} of "
                                     f"{owner.inner} rows; prune whole heads (rows h*head_dim..(h+1)*head_dim of q_proj, k_proj and v_proj)")
            chosen = block.any(dim=1)
            keep = chosen if keep is None else keep | chosen
        return keep if keep is not None else torch.ones(space.size, dtype=torch.bool)

    def decide_groups(self) -> None:
        for sid in range(len(self.g.spaces)):
            self.members.setdefault(self.g.find(sid), []).append(sid)
        for root, sids in self.members.items():
            keep = self.space_keep(sids[0])
            for sid in sids[1:]:
                keep = keep | self.space_keep(sid)
            self.keep[root] = keep
        for pin in self.g.pins:
            for root in sorted({self.g.find(s) for s in pin.spaces}):
                if pin.kind == "fixed":
                    if not self.keep[root].all():
                        self.notes[root] = f"kept whole: {pin.what}"
                elif not self.keep[root].all():
                    self.pin_problem(pin.kind, pin.what, root)
                self.keep[root] = torch.ones_like(self.keep[root])

    def culprits(self, root: int) -> list[str]:
        """Masks that prune channels of group ``root``."""
        found = []
        for sid in self.members[root]:
            size = self.g.spaces[sid].size
            for owner in self.g.spaces[sid].owners:
                rows = self.rows.get(owner.param)
                block = rows[owner.offset: owner.offset + size * owner.inner] if rows is not None else None
                if block is not None and not block.all() and owner.param not in found:
                    found.append(owner.param)
        return found

    def pin_problem(self, kind: str, what: str, root: int) -> None:
        names = self.culprits(root)
        listed = ", ".join(repr(n) for n in names)
        if kind == "output":
            cut = int((~self.keep[root]).sum())
            unit = self.unit_of(names)
            which = "rows whose channels are" if unit == "rows" else f"{unit}, which are"
            self.problem("output", f"mask of {listed} prunes {cut} of {len(self.keep[root])} {which} "
                                   f"{what}; model outputs cannot be removed -- keep the last layer dense "
                                   f"(prune --keep-last dense; in Python LayerRules(keep_last='dense')) or exclude {listed} from pruning")
        else:
            self.problem("op", f"{what}; exclude {listed} from pruning")

    def unit_of(self, names: list[str]) -> str:
        """What the masks ``names`` prune: "output channels" of transposed convs (``weight[:, o]``), else "rows"."""
        transposed = [isinstance(_get(self.model, n.rpartition(".")[0]), CONVT_TYPES) for n in names]
        if transposed and all(transposed):
            return "output channels"
        return "rows / output channels" if any(transposed) else "rows"

    def pruned_units(self, name: str, rows: torch.Tensor) -> str:
        """``"3 rows"``, or for a transposed conv's weight ``"2 output channels and 1 input channels"``."""
        owner = _get(self.model, name.rpartition(".")[0])
        if not (isinstance(owner, CONVT_TYPES) and name.endswith(".weight")):
            return f"{int((~rows).sum())} rows"
        outs, ins = int((~rows[:owner.out_channels]).sum()), int((~rows[owner.out_channels:]).sum())
        parts = []
        if outs:
            parts.append(f"{outs} output channels")
        if ins:
            parts.append(f"{ins} input channels")
        return " and ".join(parts)

    def check_unaccounted(self) -> None:
        for name, rows in self.rows.items():
            if rows.all() or name in self.g.accounted:
                continue
            owner = name.rsplit(".", 1)[0]
            inside = [m for m in self.g.opaque if owner == m or owner.startswith(m + ".")]
            if inside:
                why = f"it is inside module {inside[0]!r}, which torch.fx could not trace ({self.g.opaque[inside[0]]})"
            elif not name.endswith(".weight") or not isinstance(_get(self.model, owner),
                                                                (nn.Linear, *CONV_TYPES, *CONVT_TYPES)):
                why = "it is not the weight of a Linear/Conv layer"
            else:
                why = f"layer {owner!r} is not called as a module in the traced forward (or only inside an unsupported module)"
            self.problem("op", f"mask of {name!r} prunes {self.pruned_units(name, rows)} but shrink cannot cut them: "
                               f"{why}; exclude {name!r} from pruning")

    # positions and constants
    def keep_positions(self, layout: Layout) -> torch.Tensor:
        parts = []
        for seg in layout.segments:
            keep = self.keep[self.g.find(seg.space)] if seg.space is not None else torch.ones(seg.size, dtype=torch.bool)
            parts.append(keep.repeat_interleave(seg.inner))
        return torch.cat(parts)

    def const_of(self, node: fx.Node) -> torch.Tensor:
        layout = self.g.layout(node)
        value = self.const.get(node.name)
        return value.cpu() if value is not None else torch.zeros(layout.length, dtype=torch.float64)

    def layout_culprits(self, layout: Layout) -> str:
        names: list[str] = []
        for seg in layout.segments:
            if seg.space is not None:
                names += [n for n in self.culprits(self.g.find(seg.space)) if n not in names]
        return ", ".join(repr(n) for n in names)

    def cut(self, name: str) -> _Cut:
        return self.cuts.setdefault(name, _Cut())

    def add_delta(self, name: str, delta: torch.Tensor) -> None:
        cut = self.cut(name)
        cut.delta = delta if cut.delta is None else cut.delta + delta

    def set_cols(self, name: str, cols: torch.Tensor) -> None:
        cut = self.cut(name)
        if self.g.calls[name] > 1:
            self.problem("shared", f"layer {name!r} is called {self.g.calls[name]} times in forward and its input "
                                   f"channels are pruned; a shared layer cannot be shrunk -- exclude the layers feeding it from pruning")
        cut.cols = cols

    def set_rows(self, name: str, rows: torch.Tensor) -> None:
        if not rows.all():
            self.cut(name).rows = rows

    def fold_input(self, op: Op, name: str) -> None:
        """Cut the input columns of Linear/Conv ``name`` and fold the removed constants into its bias."""
        x = op.inputs[0]
        layout = self.g.layout(x)
        keep = self.keep_positions(layout)
        if keep.all():
            return
        self.set_cols(name, keep)
        removed = ~keep
        c = self.const_of(x)[removed]  # (removed,)
        module = self.module(name)
        weight = self.weight(name).cpu()
        if isinstance(module, CONVT_TYPES):  # (I, O, *kernel) -> (O, I, *kernel); groups == 1 here
            weight = weight.transpose(0, 1)
        weight = weight[:, removed]  # (O, removed, *kernel)
        if weight.dim() > 2:
            live = (c != 0) & weight.flatten(2).ne(0).any(dim=2).any(dim=0)
            if isinstance(module, CONVT_TYPES):  # its `padding` crops the output: only the taps matter
                if spreads_constants(module) and live.any():
                    self.problem("constant", self.spread_message(layout, name, c[live]))
            elif zero_padded(module) and live.any():
                self.problem("constant", f"pruned channels of {self.layout_culprits(layout)} reach zero-padded conv {name!r} "
                                         f"with nonzero constant value act(bias)/BatchNorm shift (up to {float(c.abs().max()):.3g}); "
                                         "a padded conv cannot absorb it exactly -- call silence_pruned_channels_(model, masks, "
                                         f"example_input) first (CLI: {SILENCE_CLI}; re-check accuracy "
                                         "after) or exclude those layers from pruning")
            weight = weight.flatten(2).sum(dim=2)  # (O, removed)
        if (c != 0).any():
            self.add_delta(name, weight @ c)

    def spread_message(self, layout: Layout, name: str, c: torch.Tensor) -> str:
        return (f"pruned channels of {self.layout_culprits(layout)} reach transposed conv {name!r} with nonzero constant "
                f"value act(bias)/BatchNorm shift (up to {float(c.abs().max()):.3g}); a transposed conv with a kernel or "
                "stride above 1 spreads a constant unevenly over its output, so no bias absorbs it -- prune its input "
                "slices weight[i] with the same channels, call silence_pruned_channels_(model, masks, example_input) "
                f"first (CLI: {SILENCE_CLI}) or exclude those layers from pruning")

    def where(self, node: fx.Node) -> str:
        scope = self.g.scopes.get(node.name, "")
        suffix = f" (module '{scope}')" if scope and node.op != "call_module" else ""
        return f"{describe_target(node, self.g.module)} at node '{node.name}'{suffix}"

    def check_fill(self, op: Op, x: fx.Node) -> None:
        """Constant padding writes its fill into pruned channels too: they stay constant only if they equal it."""
        module = self.module(op.target) if op.node.op == "call_module" else None
        fill = float(pad_spec(op.node, module)[2])
        layout = self.g.layout(x)
        c = self.const_of(x)[~self.keep_positions(layout)]
        if not (c != fill).any():
            return
        if fill == 0:
            self.problem("constant", f"pruned channels of {self.layout_culprits(layout)} are padded with zeros by "
                                     f"{self.where(op.node)} with nonzero constant value (up to {float(c.abs().max()):.3g}); "
                                     "the zero border makes them vary over positions, so no bias absorbs them -- call "
                                     f"silence_pruned_channels_(model, masks, example_input) first (CLI: {SILENCE_CLI}) "
                                     "or exclude those layers from pruning")
        else:
            self.problem("op", f"pruned channels of {self.layout_culprits(layout)} are padded with {fill:g} by "
                               f"{self.where(op.node)} but carry other constant values (e.g. {float(c[c != fill][0]):.3g}); "
                               "the border then differs from the inside, so no bias absorbs them -- pad with 0 or with "
                               "mode='replicate'/'reflect', or exclude those layers from pruning")

    def visit(self, op: Op) -> None:
        node, kind, name = op.node, op.kind, op.target
        out = op.output
        x = op.inputs[0] if op.inputs else None
        if kind in ("linear", "conv", "grouped"):
            size = out.length
            if x is not None and kind != "grouped":
                self.fold_input(op, name)
            self.set_rows(name, self.keep_positions(out))
            self.const[node.name] = self.bias(name, size).cpu()
        elif kind == "depthwise":
            self.visit_depthwise(op, name, x)
        elif kind == "bn":
            if out is not None:
                self.visit_bn(op, name, x)
        elif kind == "attention":
            self.visit_attention(op, name, x)
        elif out is None:
            return
        elif kind in ("identity", "pool", "spatial"):
            self.const[node.name] = self.const_of(x)
        elif kind == "pad":
            self.check_fill(op, x)
            self.const[node.name] = self.const_of(x)
        elif kind == "pool_zero":
            self.require_zero(op, x, "reach an average pool that pads with zeros or overrides its divisor")
            self.const[node.name] = self.const_of(x)
        elif kind == "reshape":
            if op.literal and not self.keep_positions(out).all():
                self.problem("op", f"pruned channels of {self.layout_culprits(out)} reach a reshape with a fixed size at "
                                   f"node '{node.name}'; write it with -1 or sizes read from the tensor (e.g. x.flatten(1)) "
                                   "or exclude those layers from pruning")
            self.const[node.name] = self.const_of(x).repeat_interleave(op.factor)
        elif kind == "reduce":
            if op.zero_required:
                self.require_sum_zero(op, x)
            self.const[node.name] = self.const_of(x)  # mean / max of a constant; a sum's is 0 (or reported)
        elif kind == "cat":
            self.const[node.name] = torch.cat([
                self.const_of(p) if self.g.layout(p) is not None
                else torch.zeros(p.meta["tensor_meta"].shape[out.dim], dtype=torch.float64) for p in op.inputs])
        elif kind in ("pointwise", "binary"):
            if op.zero_required:
                for p in op.inputs:
                    if self.g.layout(p) is not None:
                        self.require_zero(op, p, "are multiplied by a tensor broadcast over channels")
            self.const[node.name] = self.evaluate(op)
            self.overwrite(op)

    def overwrite(self, op: Op) -> None:
        """An in-place op (``h.relu_()``, ``nn.ReLU(inplace=True)``) also changes its operand's pruned constants.

        Later readers of the operand node see the op's result, so its constant becomes the
        op's (through a chain of in-place ops).  An operand that is the output of a view /
        identity op may share memory with that op's input, whose constant cannot be
        followed: a change of a pruned constant there is reported.
        """
        value = self.const[op.node.name]
        target = mutated_input(op.node, self.g.module)
        while target is not None:
            layout = self.g.layout(target)
            if layout is None or layout.length != len(value):
                return
            removed = ~self.keep_positions(layout)
            changed = bool((self.const_of(target)[removed] != value[removed]).any())
            self.const[target.name] = value
            source = self.ops_by_node.get(target.name)
            if source is None or source.kind not in ("pointwise", "binary", "identity", "reshape"):
                return
            nxt = mutated_input(target, self.g.module)
            if nxt is None:
                base = source.inputs[0] if source.kind in ("identity", "reshape") and source.inputs else None
                if changed and base is not None and any(self.order[u.name] > self.order[op.node.name] for u in base.users):
                    self.problem("op", f"pruned channels of {self.layout_culprits(layout)} are changed in place by "
                                       f"{describe_target(op.node, self.g.module)} at node '{op.node.name}' through a view "
                                       f"of '{base.name}', which is read again later; make the op out of place (e.g. "
                                       "inplace=False) or exclude those layers from pruning")
                return
            target = nxt

    def require_zero(self, op: Op, x: fx.Node, what: str) -> None:
        layout = self.g.layout(x)
        removed = ~self.keep_positions(layout)
        c = self.const_of(x)[removed]
        if (c != 0).any():
            self.problem("constant", f"pruned channels of {self.layout_culprits(layout)} {what} at node '{op.node.name}' "
                                     f"with nonzero constant value (up to {float(c.abs().max()):.3g}); call "
                                     f"silence_pruned_channels_(model, masks, example_input) (CLI: {SILENCE_CLI}) first or "
                                     "exclude those layers from pruning")

    def require_sum_zero(self, op: Op, x: fx.Node) -> None:
        """A sum of a pruned constant ``c`` over ``n`` positions is ``c * n``: no bias absorbs it for every ``n``."""
        layout = self.g.layout(x)
        c = self.const_of(x)[~self.keep_positions(layout)]
        if (c != 0).any():
            self.problem("constant", f"pruned channels of {self.layout_culprits(layout)} are summed {op.site} with "
                                     f"nonzero constant value (up to {float(c.abs().max()):.3g}); the sum grows with the "
                                     "input's size, so no bias absorbs it for every size -- call silence_pruned_channels_"
                                     "(model, masks, example_input) first, use mean() instead, or exclude those layers "
                                     "from pruning")

    def evaluate(self, op: Op) -> torch.Tensor:
        """Apply a pointwise / binary op to the constant vectors of its operands.

        A non-tensor operand computed at run time (``x.size(1)``, ``x.shape[-1]``) is not
        known when planning and may differ from input to input: if the pruned channels'
        value depends on it (it differs when that operand is 1 or 2), no bias absorbs it
        and a problem is reported.  One read from the pruned channel dim itself
        (``h / h.size(-1)``) changes with the cut for every channel: reported too.
        """
        node = op.node
        length = op.output.length
        runtime = [a for a in node.all_input_nodes if self.g.layout(a) is None and "tensor_meta" not in a.meta]
        for counted in {t.name: t for a in runtime for t in self.counted_tensors(a)}.values():
            layout = self.g.layout(counted)
            if not self.keep_positions(layout).all():
                self.problem("op", f"{describe_target(node, self.g.module)} at node '{node.name}' uses the number of "
                                   f"channels of '{counted.name}', which the cut of {self.layout_culprits(layout)} "
                                   "changes; use a constant instead or exclude those layers from pruning")

        def compute(scalar: float) -> torch.Tensor:
            def substitute(arg: fx.Node) -> Any:
                if self.g.layout(arg) is not None:
                    return self.const_of(arg).clone()
                return torch.zeros((), dtype=torch.float64) if "tensor_meta" in arg.meta else scalar

            args = map_arg(node.args, substitute)
            kwargs = {k: v for k, v in map_arg(node.kwargs, substitute).items() if k != "inplace"}
            with torch.no_grad():
                if node.op == "call_module":
                    value = self.module(node.target)(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(torch.as_tensor(args[0], dtype=torch.float64), node.target)(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
            return torch.as_tensor(value, dtype=torch.float64).expand(length).clone()

        removed = ~self.keep_positions(op.output)
        try:
            value = compute(1.0)
            if runtime and removed.any():
                other = compute(2.0)
                if not torch.isclose(value[removed], other[removed], rtol=0, atol=0, equal_nan=True).all():
                    names = ", ".join(f"'{a.name}'" for a in runtime)
                    self.problem("constant", f"pruned channels of {self.layout_culprits(op.output)} are combined with "
                                             f"{names}, a value computed from the input at run time, at node "
                                             f"'{node.name}' ({describe_target(node, self.g.module)}); their value then "
                                             "depends on the input, so no bias absorbs it -- call silence_pruned_channels_"
                                             "(model, masks, example_input) first (for a product) or exclude those layers "
                                             "from pruning")
            return value
        except (RuntimeError, TypeError, ValueError) as exc:
            if removed.any():
                self.problem("op", f"cannot compute the value of pruned channels of {self.layout_culprits(op.output)} at "
                                   f"node '{node.name}' ({type(exc).__name__}); exclude those layers from pruning")
            return torch.zeros(length, dtype=torch.float64)

    def counted_tensors(self, arg: fx.Node) -> list[fx.Node]:
        """Tensors with pruned-channel layouts whose channel-dim size the non-tensor value ``arg`` is computed from.

        Follows non-tensor nodes back to ``t.size(d)`` / ``t.shape[d]`` / ``t.size()[d]``
        with ``d`` the channel dim of ``t``'s layout.
        """
        found: list[fx.Node] = []
        stack, seen = [arg], set()
        while stack:
            node = stack.pop()
            if node.name in seen or "tensor_meta" in node.meta:
                continue
            seen.add(node.name)
            base, dim = None, None
            if node.op == "call_method" and node.target == "size" and node.args:
                base = node.args[0]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
                source, index = node.args
                if isinstance(source, fx.Node) and isinstance(index, int) and (
                        source.op == "call_method" and source.target == "size" and len(source.args) == 1
                        or source.op == "call_function" and source.target is getattr and source.args[1:] == ("shape",)):
                    base, dim = source.args[0], index
            layout = self.g.layout(base) if isinstance(base, fx.Node) else None
            if layout is not None and isinstance(dim, int) and "tensor_meta" in base.meta:
                if dim % len(base.meta["tensor_meta"].shape) == layout.dim:
                    found.append(base)
                continue
            stack.extend(n for n in node.all_input_nodes if "tensor_meta" not in n.meta)
        return found

    def visit_depthwise(self, op: Op, name: str, x: fx.Node | None) -> None:
        module = self.module(name)
        out = op.output
        bias = self.bias(name, out.length).cpu()
        if x is None:  # a producer of its own channels
            self.set_rows(name, self.keep_positions(out))
            self.const[op.node.name] = bias
            return
        keep = self.keep_positions(out)
        self.set_rows(name, keep)
        c = self.const_of(x)
        weight = self.weight(name).cpu().flatten(1)  # (C, k)
        value = torch.where(weight.ne(0).any(dim=1), c * weight.sum(dim=1), torch.zeros_like(c)) + bias
        live = ~keep & weight.ne(0).any(dim=1) & (c != 0)
        if isinstance(module, CONVT_TYPES):  # its `padding` crops the output: only the taps matter
            if spreads_constants(module) and live.any():
                self.problem("constant", self.spread_message(out, name, c[live]))
        elif zero_padded(module) and live.any():
            self.problem("constant", f"pruned channels of {self.layout_culprits(out)} reach zero-padded depthwise conv {name!r} "
                                     f"with nonzero constant value (up to {float(c[live].abs().max()):.3g}); prune the depthwise "
                                     "conv with the same channels, call silence_pruned_channels_(...) first, or exclude those layers")
        self.const[op.node.name] = value

    def visit_bn(self, op: Op, name: str, x: fx.Node) -> None:
        bn = self.module(name)
        keep = self.keep_positions(op.output)
        self.set_rows(name, keep)
        c = self.const_of(x)
        n = op.output.length
        weight = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
        shift = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
        if bn.running_mean is not None:
            mean, var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
            self.const[op.node.name] = (c - mean) / torch.sqrt(var + bn.eps) * weight + shift
        else:  # batch statistics: a constant channel normalises to its shift
            self.const[op.node.name] = shift.clone()

    def visit_attention(self, op: Op, name: str, x: fx.Node | None) -> None:
        """Cut an attention unit's inputs, whole heads and outputs.

        Its projections are called inside the unit (not counted as calls of their own), so
        a unit called more than once is checked here: its removed input constants would be
        folded into the q/k/v biases once per call, as for a shared layer.  The heads are
        cut (and their value bias folded into ``out_proj``) once per unit.
        """
        attn = self.module(name)
        calls = self.g.calls[name]
        if x is not None:
            layout = self.g.layout(x)
            if calls > 1 and not self.keep_positions(layout).all():
                self.problem("shared", f"attention unit {name!r} is called {calls} times in forward and its input "
                                       f"channels are pruned by {self.layout_culprits(layout)}; a shared unit cannot be "
                                       "shrunk -- exclude the layers feeding it from pruning")
            for proj in ("q_proj", "k_proj", "v_proj"):
                self.fold_input(op, f"{name}.{proj}")
        heads = self.keep[self.g.find(op.heads)]
        head_dim = attn.q_proj.out_features // attn.num_heads
        if not heads.any():
            self.problem("mask", f"masks of {self.layout_culprits(Layout(0, (Segment(op.heads, len(heads)),)))} "
                                 f"prune all {len(heads)} heads of attention unit {name!r}; an attention unit needs at "
                                 "least one head -- keep one, or remove the unit from the model yourself")
            return
        if not heads.all() and self.cut(name).heads is None:
            cols = heads.repeat_interleave(head_dim)
            for proj in ("q_proj", "k_proj", "v_proj"):
                self.set_rows(f"{name}.{proj}", cols)
            self.cut(f"{name}.out_proj").cols = cols
            self.cut(name).heads = int(heads.sum())
            value = self.bias(f"{name}.v_proj", len(cols)).cpu()[~cols]  # a removed head outputs its value bias
            self.add_delta(f"{name}.out_proj", self.weight(f"{name}.out_proj").cpu()[:, ~cols] @ value)
        self.set_rows(f"{name}.out_proj", self.keep_positions(op.output))
        self.const[op.node.name] = self.bias(f"{name}.out_proj", op.output.length).cpu()

    # report
    def group_report(self) -> tuple[CoupledGroup, ...]:
        members: dict[int, list[str]] = {}

        def add(layout: Layout | None, text: str, ranged: bool = True) -> None:
            if layout is None:
                return
            start = 0
            for seg in layout.segments:
                if seg.space is not None:
                    label = f"{text}[{start}:{start + seg.length}]" if ranged else text
                    entries = members.setdefault(self.g.find(seg.space), [])
                    if label not in entries:
                        entries.append(label)
                start += seg.length

        for op in self.g.ops:
            name, x = op.target, (op.inputs[0] if op.inputs else None)
            if op.kind in ("linear", "conv", "grouped"):
                has_bias = getattr(self.module(name), "bias", None) is not None
                rows = "weight[:, o] (outputs)" if isinstance(self.module(name), CONVT_TYPES) else "weight rows"
                add(op.output, f"{name}.{rows}" + (f", {name}.bias" if has_bias else ""), ranged=False)
                if x is not None and op.kind != "grouped":
                    add(self.g.layout(x), f"{name}.weight inputs")
            elif op.kind == "depthwise":
                add(op.output, f"{name} (depthwise: weight, bias)")
            elif op.kind == "bn":
                add(op.output, f"{name} (weight, bias, running_mean, running_var)")
            elif op.kind == "attention":
                entries = members.setdefault(self.g.find(op.heads), [])
                label = f"{name} heads: q_proj/k_proj/v_proj rows, out_proj inputs, num_heads"
                if label not in entries:
                    entries.append(label)
                if x is not None:
                    add(self.g.layout(x), f"{name}.q_proj/k_proj/v_proj.weight inputs")
                add(op.output, f"{name}.out_proj.weight rows", ranged=False)
        groups = []
        for root in sorted(members):
            keep = self.keep[root]
            groups.append(CoupledGroup(len(keep), int(keep.sum()), tuple(members[root]), tuple(self.culprits(root)),
                                       self.notes.get(root, "")))
        return tuple(groups)

    def plan(self) -> ShrinkPlan:
        self.read_masks()
        self.decide_groups()
        self.check_unaccounted()
        for op in self.g.ops:
            self.visit(op)
        cuts = {name: LayerCut(c.rows, c.cols, c.delta, c.heads) for name, c in self.cuts.items()
                if c.rows is not None or c.cols is not None or c.delta is not None or c.heads is not None}
        return ShrinkPlan(self.group_report(), tuple(m for _, m in self.problems), cuts,
                          tuple(k for k, _ in self.problems))


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def plan_shrink(model: nn.Module, masks: Mapping[str, torch.Tensor], example_input: Any) -> ShrinkPlan:
    """Dry run of :func:`shrink_model`: coupled groups, per-layer cuts and problems; changes nothing.

    ``masks``: FQN ``"layer.weight"`` -> bool keep-mask (True = kept) whose rows are all
    kept or all pruned.  ``example_input``: a tensor (or tuple) the model accepts; its
    shapes fix the spatial sizes (flatten -> Linear).  Raises PrunelabError only when the
    model cannot be traced or run; everything else is listed in ``plan.problems``.
    """
    if not isinstance(masks, Mapping):
        raise PrunelabError(f"masks must map 'layer.weight' to a bool keep-mask, got {type(masks).__name__}; pass a "
                            "MaskSet or a dict")
    masks = MaskSet(masks)
    masks.check_model(model)
    graph = build_graph(model, example_input)
    with eval_mode(model):
        return _Planner(model, masks, graph).plan()
