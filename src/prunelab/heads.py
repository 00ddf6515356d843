"""Attention-head pruning: score whole heads, choose which to keep, write the row masks.

A head is a granularity that spans four weights: rows ``h*d .. (h+1)*d`` of the query,
key and value projections and the same input columns of the output projection (``d =
head_dim``).  Three layouts are found (:func:`attention_units`), each as a :class:`HeadUnit`:

* modules with Linear ``q_proj/k_proj/v_proj/out_proj`` and an int ``num_heads`` (the
  attention units :func:`prunelab.materialise.shrink.shrink_model` also cuts heads from);
* Hugging Face BERT-style self-attention: Linear ``query/key/value`` and an int
  ``attention_head_size``, with the output projection at ``<parent>.output.dense``
  (``BertModel``, and so all-MiniLM-L6-v2);
* LLaMA-style attention with grouped key/value heads (Ainslie et al. 2023, "GQA", EMNLP):
  Linear ``q_proj/k_proj/v_proj/o_proj``, an int ``head_dim`` and ``num_key_value_groups``
  (``transformers``' Llama, Mistral, Qwen2/Qwen3, Gemma 1-3 attention; MHA configs are
  the one-query-head-per-group case).  Query head ``h`` reads key/value head
  ``h // num_key_value_groups`` (``repeat_kv``), so the pruning unit is one key/value
  group: its ``head_dim`` rows of ``k_proj`` and ``v_proj``, the rows of its
  ``num_key_value_groups`` query heads in ``q_proj`` and the same input columns of
  ``o_proj``.  Cutting whole groups leaves ``num_key_value_groups`` as it is, and
  ``transformers`` reads every head count from the tensor shapes (``view(..., -1,
  head_dim)``), so the cut model runs unchanged (KV caches are sized from the key
  tensors).  Refused in one line: a fused ``qkv_proj`` (Phi-3), per-head parameters on the
  attention module (gpt-oss ``sinks``) and query/key norms wider than one head (OLMo-2,
  Cohere).  For such a unit ``HeadUnit.num_heads`` counts key/value groups and
  ``group_size`` the query heads of each.

Score (pure, never mutates the model):

* :func:`head_magnitude` -- data-free: ``||W_q[h]||^2 + ||W_k[h]||^2 + ||W_v[h]||^2 +
  ||W_o[:, h]||^2``, the squared L2 norm of every weight the head (or key/value group:
  all its query heads' rows and columns) owns.
* :func:`head_importance` -- Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better
  than One?" (NeurIPS), eq. 2: put a gate ``xi_h = 1`` on each head's output and score
  ``I_h = E_x |dL(x)/dxi_h|``.  With the gate on the input of ``out_proj`` (the heads'
  concatenated context ``c``), ``dL/dxi_h = sum_{t,j in head h} c_tj dL/dc_tj``.  The
  expectation runs over mini-batches (the gradient of a batch's mean loss, then its
  absolute value), and, as in the paper (sec. 4.2), scores are divided by their L2 norm
  within each attention unit so units of different scale compare under one threshold.
  For a key/value group ``g`` one gate ``xi_g`` multiplies the outputs of all its query
  heads (pruning removes them together), so ``dL/dxi_g = sum_{h in g} dL/dxi_h``: the
  per-head gradients are summed before the absolute value.

Select and apply: :func:`head_masks` keeps the best heads -- one ``global`` threshold over
all units or the same share in every unit (``uniform``) -- and always at least
``min_heads`` per unit, then returns a :class:`MaskSet` over the q/k/v weights that zeroes
the pruned heads' rows.  A pruned head then outputs its value bias ``b_v`` (uniform
softmax over constant keys; with rotary embeddings the softmax is not uniform, but every
value is ``b_v``, so the average still is), exactly what ``shrink_model`` folds into
``out_proj``'s bias, so the masked and the shrunk model agree.  :func:`remove_heads_`
cuts the pruned heads out of the model in place for every layout (rows of q/k/v, columns
of the output projection, ``b_v`` folded into its bias) -- a ``transformers`` config has
one head count for every layer, so such a model is smaller and faster in memory but is
saved as a state_dict; to reload it, build the model again, call ``remove_heads_`` with
the same ``keep``, then ``load_state_dict`` (``from_pretrained`` cannot: transformers 5 has
no per-layer head counts).  The one ``transformers`` path that sizes a KV cache from the
config is a static cache pre-allocated for chunked prefill (``generate(...,
prefill_chunk_size=...)``); the default dynamic cache and a lazily built static cache follow
the cut head counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import distributed
from prunelab.allocation import check_sparsity
from prunelab.criteria.base import eval_mode
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise.graph import is_attention_unit

__all__ = ["HEAD_ALLOCATIONS", "HeadChoice", "HeadUnit", "attention_units", "head_importance", "head_magnitude",
           "head_masks", "remove_heads_"]

HEAD_ALLOCATIONS = ("global", "uniform")


@dataclass(frozen=True)
class HeadUnit:
    """One attention unit: qualified names of its projections, its head count and head width."""

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int  # prunable heads; key/value groups for grouped attention
    head_dim: int
    group_size: int = 1  # query heads per prunable head (LLaMA's num_key_value_groups; 1 for multi-head)

    @property
    def q_width(self) -> int:
        """Rows of the query projection (= input columns of the output projection) one prunable head owns."""
        return self.group_size * self.head_dim


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _bert_unit(model: nn.Module, name: str, module: nn.Module) -> HeadUnit | None:
    projections = [getattr(module, n, None) for n in ("query", "key", "value")]
    head_dim = getattr(module, "attention_head_size", None)
    if not all(isinstance(p, nn.Linear) for p in projections) or isinstance(head_dim, bool) or not isinstance(head_dim, int):
        return None
    parent = name.rpartition(".")[0]
    out_name = _join(parent, "output.dense")
    try:
        out = model.get_submodule(out_name)
    except AttributeError:
        return None
    q = projections[0]
    if not isinstance(out, nn.Linear) or head_dim < 1 or q.out_features % head_dim or out.in_features != q.out_features:
        return None
    return HeadUnit(name, _join(name, "query"), _join(name, "key"), _join(name, "value"), out_name,
                    q.out_features // head_dim, head_dim)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _grouped_refusal(name: str, module: nn.Module, head_dim: int) -> str | None:
    """Why the LLaMA-style ``module`` cannot be pruned by key/value group, or ``None`` when it can."""
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:  # e.g. gpt-oss's per-head attention sinks: cutting heads would have to cut them too
        return f"has its own parameters {own}"
    for child_name, child in module.named_children():
        if child_name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        shapes = [tuple(p.shape) for p in child.parameters()]
        if child_name in ("q_norm", "k_norm") and all(shape == (head_dim,) for shape in shapes):
            continue  # a norm over one head's channels (Qwen3, Gemma 3): shared by every head
        if shapes:  # a norm over all heads (OLMo-2, Cohere) or anything else with weights
            return f"has a submodule {child_name!r} with parameters of shapes {shapes}"
    return None


def _grouped_unit(name: str, module: nn.Module) -> HeadUnit | None:
    """A LLaMA-style attention module as a unit of key/value groups, ``None`` if it is not one.

    Raises when ``module`` looks like one (an ``o_proj`` with ``num_key_value_groups``) but cannot be cut.
    """
    out, groups = getattr(module, "o_proj", None), getattr(module, "num_key_value_groups", None)
    if not isinstance(out, nn.Linear) or groups is None:
        return None
    where = f"{type(module).__name__} {name!r}"
    if isinstance(getattr(module, "qkv_proj", None), nn.Module):
        raise PrunelabError(f"{where}: fused qkv_proj attention (Phi-3 style) is not supported for head pruning; "
                            "its query/key/value rows share one Linear -- prune its weights unstructured instead")
    projections = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    head_dim = getattr(module, "head_dim", None)
    if not all(isinstance(p, nn.Linear) for p in projections) or not _positive_int(head_dim) or not _positive_int(
            groups):
        raise PrunelabError(f"{where} has o_proj and num_key_value_groups={groups!r} but not Linear q_proj/k_proj/"
                            f"v_proj with a positive int head_dim (got {head_dim!r}); not supported for head pruning")
    q, k, v = projections
    kv_heads, rest = divmod(k.out_features, head_dim)
    widths = (q.out_features, k.out_features, v.out_features, out.in_features)
    if rest or kv_heads == 0 or widths != (kv_heads * groups * head_dim, kv_heads * head_dim,
                                           kv_heads * head_dim, kv_heads * groups * head_dim):
        raise PrunelabError(f"{where}: q/k/v outputs and o_proj inputs are {list(widths)}, which is not n key/value "
                            f"heads of head_dim={head_dim} with num_key_value_groups={groups} query heads each; "
                            "not supported for head pruning")
    if (reason := _grouped_refusal(name, module, head_dim)) is not None:
        raise PrunelabError(f"{where} {reason}; head pruning cuts only q/k/v/o_proj (and per-head q_norm/k_norm), "
                            "so this attention is not supported")
    return HeadUnit(name, _join(name, "q_proj"), _join(name, "k_proj"), _join(name, "v_proj"), _join(name, "o_proj"),
                    kv_heads, head_dim, groups)


def attention_units(model: nn.Module) -> dict[str, HeadUnit]:
    """Every attention unit of ``model`` by qualified name, in module order (see the module docs)."""
    units = {}
    for name, module in model.named_modules():
        if is_attention_unit(module):
            units[name] = HeadUnit(name, _join(name, "q_proj"), _join(name, "k_proj"), _join(name, "v_proj"),
                                   _join(name, "out_proj"), module.num_heads,
                                   module.q_proj.out_features // module.num_heads)
        elif (unit := _bert_unit(model, name, module) or _grouped_unit(name, module)) is not None:
            units[name] = unit
    if not units:
        raise PrunelabError(
            f"{type(model).__name__} has no attention unit (Linear q_proj/k_proj/v_proj/out_proj with an int num_heads, "
            "BERT's query/key/value with attention_head_size, or LLaMA-style q_proj/k_proj/v_proj/o_proj with int "
            "head_dim and num_key_value_groups); not supported: nn.MultiheadAttention"
        )
    return units


def _get(model: nn.Module, name: str) -> nn.Linear:
    return model.get_submodule(name)  # type: ignore[return-value]


def head_magnitude(model: nn.Module) -> dict[str, Tensor]:
    """Unit name -> ``(num_heads,)`` squared L2 norm of each head's q/k/v rows and output-projection columns.

    For grouped attention a "head" is a key/value group: its k/v rows plus all its query heads' q rows and
    output-projection columns.
    """
    scores = {}
    for name, unit in attention_units(model).items():
        heads = unit.num_heads
        total = torch.zeros(heads, dtype=torch.float64)
        for proj, width in ((unit.q, unit.q_width), (unit.k, unit.head_dim), (unit.v, unit.head_dim)):
            rows = _get(model, proj).weight.detach().double().cpu().reshape(heads, width, -1)  # (H, g*d or d, in)
            total += rows.square().sum((1, 2))
        out = _get(model, unit.o).weight.detach().double().cpu()  # (out, H*g*d)
        scores[name] = total + out.reshape(out.shape[0], heads, unit.q_width).square().sum((0, 2))
    return scores


def _check_pair(index: int, batch: object) -> None:
    """``batch`` must be an ``(inputs, targets)`` pair: unpacking a bare 2-row tensor or a 2-key
    dict would silently score ``x[0]`` against ``x[1]`` (or the dict's key names)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        given = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else (
            f"a {type(batch).__name__}")
        raise PrunelabError(f"head_importance: batch {index} is {given}; expected an (inputs, targets) pair, "
                            "e.g. [(x, y)] or a DataLoader of (x, y)")


def head_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[..., Tensor] = F.cross_entropy,
    *,
    max_batches: int | None = None,
    normalise: bool = True,
) -> dict[str, Tensor]:
    """Unit name -> ``(num_heads,)`` Michel et al. 2019 importance ``E |dL/dxi_h|``.

    ``batches`` yields ``(inputs, targets)``, of which the first ``max_batches`` (all when
    ``None``) are drawn; the loss is ``loss_fn(model(inputs), targets)``,
    or ``loss_fn(model(**inputs), targets)`` when ``inputs`` is a dict (a ``transformers``
    output object passes its ``.logits``).  A unit whose output projection runs several times in
    one forward (shared weights) has one gate per head for all its calls, so ``dL/dxi_h`` sums
    them; a batch it did not run in adds 0 to its heads.  The model runs in eval mode (every module's own
    train/eval flag is restored afterwards) with gradients enabled, even when called under
    ``torch.no_grad()``; gradients come from ``torch.autograd.grad``, so every parameter's
    ``.grad`` is left untouched (the same tensor object: DDP's bucket views stay intact).
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise PrunelabError(f"head_importance got max_batches={max_batches!r}; expected a positive int or None (all)")
    units = attention_units(model)
    totals = {name: torch.zeros(unit.num_heads, dtype=torch.float64) for name, unit in units.items()}
    gates: dict[str, Tensor] = {}

    def gate_hook(name: str, unit: HeadUnit) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            context = args[0]  # (..., H*d): the heads' concatenated outputs
            if name not in gates:  # one gate per head and batch: a unit run twice sums both calls' dL/dxi_h
                gates[name] = torch.ones(unit.num_heads, dtype=context.dtype, device=context.device, requires_grad=True)
            gate = gates[name].to(dtype=context.dtype, device=context.device)  # (H,), differentiable
            return (context * gate.repeat_interleave(unit.q_width), *args[1:])  # a group's query heads share xi_g
        return hook

    handles = [_get(model, unit.o).register_forward_pre_hook(gate_hook(name, unit)) for name, unit in units.items()]
    seen = 0
    try:
        with eval_mode(model), torch.enable_grad():  # per-module modes restored on exit
            for batch in itertools.islice(batches, max_batches):  # draws no batch beyond max_batches
                _check_pair(seen, batch)
                inputs, targets = batch
                gates.clear()
                output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
                if not isinstance(output, Tensor) and isinstance(getattr(output, "logits", None), Tensor):
                    output = output.logits  # a transformers ModelOutput: the loss takes its logits
                loss = loss_fn(output, targets)
                called = [name for name in units if name in gates]  # a unit the forward skipped scores 0
                if not called:  # no unit ran in this batch: every head scores 0 for it
                    seen += 1
                    continue
                if not isinstance(loss, Tensor) or not loss.requires_grad:
                    given = "a Tensor that needs no grad" if isinstance(loss, Tensor) else f"a {type(loss).__name__}"
                    raise PrunelabError(f"head_importance: loss_fn returned a loss with no gradient ({given}); "
                                        "return a differentiable scalar of the model output, e.g. F.cross_entropy")
                grads = torch.autograd.grad(loss, [gates[name] for name in called], allow_unused=True)
                for name, grad in zip(called, grads, strict=True):
                    if grad is not None:
                        totals[name] += grad.detach().double().abs().cpu()
                seen += 1
    finally:  # .grad is never written (autograd.grad, not backward), so nothing to restore
        for handle in handles:
            handle.remove()
    # under torch.distributed every rank keeps the same heads: sums and batch counts over all ranks
    # (units in model order, the same on every rank); world size 1: unchanged
    count = distributed.all_reduce_sum_(torch.tensor([seen], dtype=torch.int64))
    for total in totals.values():
        distributed.all_reduce_sum_(total)
    seen = int(count)
    if seen == 0:
        raise PrunelabError("head_importance got no batches; pass an iterable of (inputs, targets), e.g. a DataLoader")
    scores = {name: total / seen for name, total in totals.items()}
    if normalise:
        scores = {name: s / s.norm() if s.norm() > 0 else s for name, s in scores.items()}
    return scores


@dataclass(frozen=True)
class HeadChoice:
    """Which heads of each unit are kept (``True``), and the masks that prune the others."""

    keep: dict[str, Tensor]  # unit name -> (num_heads,) bool
    masks: MaskSet

    @property
    def pruned_fraction(self) -> float:
        total = sum(k.numel() for k in self.keep.values())
        return 1.0 - sum(int(k.sum()) for k in self.keep.values()) / total


def head_masks(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    allocation: str = "global",
    min_heads: int = 1,
) -> HeadChoice:
    """Prune the ``sparsity`` share of all heads with the lowest ``scores``.

    ``allocation``: ``global`` (one threshold over every unit's scores) or ``uniform``
    (``round(sparsity * num_heads)`` heads in each unit).  Every unit keeps at least
    ``min_heads``; with ``global`` the heads that rule saves are taken from the other
    units, lowest score first, so the number pruned is ``round(sparsity * all heads)``
    whenever the floor allows it.  Ties break by unit order, then head index.
    """
    check_sparsity(sparsity)
    if allocation not in HEAD_ALLOCATIONS:
        raise PrunelabError(f"unknown head allocation {allocation!r}; valid names: {', '.join(HEAD_ALLOCATIONS)}")
    units = attention_units(model)
    if set(scores) != set(units):
        raise PrunelabError(f"scores name units {sorted(scores)} but the model has {sorted(units)}; score this model")
    for name, unit in units.items():
        if not isinstance(scores[name], Tensor):
            raise PrunelabError(f"scores[{name!r}] must be a ({unit.num_heads},) tensor, got "
                                f"{type(scores[name]).__name__}; e.g. head_importance(...) or head_magnitude(model)")
        if tuple(scores[name].shape) != (unit.num_heads,):
            raise PrunelabError(f"scores[{name!r}] has shape {tuple(scores[name].shape)}, expected ({unit.num_heads},)")
        if bool(torch.isnan(torch.as_tensor(scores[name], dtype=torch.float64)).any()):  # NaN breaks the sort order
            raise PrunelabError(f"scores[{name!r}] contain NaN; check the loss and inputs the scores came from")
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 1:
        raise PrunelabError(f"min_heads must be a positive integer, got {min_heads!r}")
    keep = {name: torch.ones(unit.num_heads, dtype=torch.bool) for name, unit in units.items()}
    if allocation == "uniform":
        for name, unit in units.items():
            count = min(round(sparsity * unit.num_heads), max(unit.num_heads - min_heads, 0))
            order = torch.argsort(scores[name].double().cpu(), stable=True)
            keep[name][order[:count]] = False
    else:
        names = list(units)
        candidates = sorted((float(scores[name][h]), u, h) for u, name in enumerate(names)
                            for h in range(units[name].num_heads))
        budget = round(sparsity * len(candidates))
        for _, u, h in candidates:
            if budget == 0:
                break
            if int(keep[names[u]].sum()) > min_heads:
                keep[names[u]][h] = False
                budget -= 1
    masks = {}
    for name, unit in units.items():
        for proj, width in ((unit.q, unit.q_width), (unit.k, unit.head_dim), (unit.v, unit.head_dim)):
            rows = keep[name].repeat_interleave(width)  # (H*g*d,) for q, (H*d,) for k and v
            weight = _get(model, proj).weight
            masks[f"{proj}.weight"] = rows.to(weight.device).unsqueeze(1).expand_as(weight).clone()
    return HeadChoice(keep, MaskSet(masks))


def _cut_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, int(rows.sum()), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[rows])
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new.bias.copy_(linear.bias[rows])
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new.train(linear.training)


def _pruned_value_bias(unit: HeadUnit, value: nn.Linear, kept: Tensor) -> Tensor:
    """``(H*g*d,)`` context of the pruned heads in the head-masked model, 0 at kept heads' columns.

    A pruned head's values are all ``b_v`` (its v rows are zero), so its attention output is
    ``b_v`` whatever the softmax weights are; each of a key/value group's query heads repeats it.
    """
    bias = value.bias.detach().reshape(unit.num_heads, 1, unit.head_dim)  # (H, 1, d)
    pruned = (~kept).to(bias.device, bias.dtype).reshape(unit.num_heads, 1, 1)
    return (bias * pruned).expand(-1, unit.group_size, -1).reshape(-1)  # (H*g*d,)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def remove_heads_(model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
    """Cut the heads ``keep`` marks False out of ``model`` in place; returns ``model``.

    Gives the outputs of the head-masked model (:func:`head_masks` applied): a pruned head's
    constant output ``b_v`` goes through the output projection into its bias first (refused
    when that projection has no bias and a pruned head's ``b_v`` is not zero, e.g. Qwen2's
    biased ``v_proj`` with a bias-free ``o_proj``).  For grouped attention a head is a
    key/value group (its k/v rows, its query heads' q rows and output columns); the
    module's ``num_key_value_groups`` stays, its ``config`` (shared by all layers) is not
    changed, and int ``num_heads``/``num_key_value_heads`` attributes, where a module has
    them, are set to the new counts.
    ``keep``: unit name (:func:`attention_units`) -> ``(num_heads,)`` bool tensor; units not
    named keep all their heads.  Every entry is checked before the model is changed, so on
    an error the model is left as it was.
    """
    units = attention_units(model)
    plan = []
    for name, kept in keep.items():  # check everything first: nothing half-cut on an error
        if name not in units:
            raise PrunelabError(f"keep names an unknown attention unit {name!r}; the model's units are {list(units)}")
        unit = units[name]
        if not isinstance(kept, Tensor) or kept.dtype != torch.bool or tuple(kept.shape) != (unit.num_heads,):
            given = (f"a {kept.dtype} tensor of shape {tuple(kept.shape)}" if isinstance(kept, Tensor)
                     else type(kept).__name__)
            raise PrunelabError(f"keep[{name!r}] must be a ({unit.num_heads},) bool tensor, got {given}; "
                                "e.g. HeadChoice.keep from head_masks, or a comparison such as scores > t")
        if not bool(kept.any()):
            raise PrunelabError(f"keep[{name!r}] keeps no head; keep at least one per unit (or drop the block)")
        if bool(kept.all()):
            continue
        q_width, kv_width = unit.num_heads * unit.q_width, unit.num_heads * unit.head_dim
        shapes = [_get(model, p).out_features for p in (unit.q, unit.k, unit.v)] + [_get(model, unit.o).in_features]
        if shapes != [q_width, kv_width, kv_width, q_width]:
            raise PrunelabError(f"unit {name!r} has q/k/v outputs and output-projection inputs {shapes}, expected "
                                f"{[q_width, kv_width, kv_width, q_width]} ({unit.num_heads} heads of "
                                f"{unit.head_dim}, {unit.group_size} query heads each); cannot cut its heads")
        value = _get(model, unit.v)
        if value.bias is not None and _get(model, unit.o).bias is None and bool(
                _pruned_value_bias(unit, value, kept).any()):  # a zero b_v adds nothing: no bias needed
            raise PrunelabError(f"{unit.o!r} has no bias to take the pruned heads' constant output (value bias of "
                                f"{unit.v!r}); give it a zero bias, zero the pruned heads' value bias, or keep every "
                                f"head of {name!r}")
        plan.append((name, unit, kept))
    for name, unit, kept in plan:
        device = _get(model, unit.q).weight.device
        rows = kept.repeat_interleave(unit.head_dim).to(device)  # (H*d,) rows of k and v
        columns = kept.repeat_interleave(unit.q_width).to(device)  # (H*g*d,) rows of q, columns of the output
        value, out = _get(model, unit.v), _get(model, unit.o)
        if value.bias is not None and out.bias is not None:  # (out,) what the pruned heads still add
            out.bias.add_(out.weight[:, ~columns] @ _pruned_value_bias(unit, value, kept)[~columns])
        for proj, cut in ((unit.q, columns), (unit.k, rows), (unit.v, rows)):
            _set(model, proj, _cut_rows(_get(model, proj), cut))
        new_out = nn.Linear(int(columns.sum()), out.out_features, bias=out.bias is not None,
                            device=out.weight.device, dtype=out.weight.dtype)
        new_out.weight.copy_(out.weight[:, columns])
        new_out.weight.requires_grad_(out.weight.requires_grad)
        if out.bias is not None:
            new_out.bias.copy_(out.bias)
            new_out.bias.requires_grad_(out.bias.requires_grad)
        _set(model, unit.o, new_out.train(out.training))
        module = model.get_submodule(name)  # its config is shared by every layer: left as it is
        heads = int(kept.sum())
        counts = [("num_heads", heads * unit.group_size), ("num_attention_heads", heads * unit.group_size),
                  ("all_head_size", heads * unit.q_width)]
        if unit.group_size > 1 or hasattr(module, "num_key_value_groups"):
            counts.append(("num_key_value_heads", heads))
        for attr, value_ in counts:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value_)
    return model
