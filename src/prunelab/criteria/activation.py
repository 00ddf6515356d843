"""Activation-based criteria: APoZ (Hu et al. 2016, "Network Trimming").

Also home of :func:`owning_modules`, which resolves parameter FQNs to the modules that
own them (shared by the criteria that hook or inspect layers: apoz, slimming, regression).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from prunelab import distributed
from prunelab.criteria.base import Criterion, ScoreData, batch_errors, iter_batches, no_batches_error
from prunelab.errors import PrunelabError


@dataclass(frozen=True)
class Owner:
    """Where a scored parameter lives: ``module_name`` inside the unwrapped model, the
    module itself and the parameter's attribute name (``weight``, ``bias``...)."""

    module_name: str
    module: nn.Module
    attr: str


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """``(model without a DistributedDataParallel wrapper, FQN prefix it added)``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, "module."
    return model, ""


def owning_modules(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Owner]:
    """``FQN -> Owner`` for every FQN in ``params`` (FQNs as ``model.named_parameters()``
    gives them; a DDP wrapper's ``module.`` prefix is accepted)."""
    root, prefix = unwrap(model)
    modules = dict(root.named_modules(remove_duplicate=False))
    owners: dict[str, Owner] = {}
    for fqn in params:
        local = fqn[len(prefix):] if prefix and fqn.startswith(prefix) else fqn
        module_name, _, attr = local.rpartition(".")
        module = modules.get(module_name)
        if module is None or attr not in dict(module.named_parameters(recurse=False)):
            raise PrunelabError(f"parameter {fqn!r} is not in the model; pass FQNs from model.named_parameters()")
        owners[fqn] = Owner(module_name, module, attr)
    return owners


def channel_dim(module: nn.Module) -> int:
    """The output dimension that indexes channels/neurons: last for Linear, the first
    normalised axis for LayerNorm/RMSNorm (whose weight rows index it), 1 otherwise
    (Conv ``(N, C, ...)``, BatchNorm ``(N, C[, L])``)."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return -len(module.normalized_shape)
    return 1


def broadcast_rows(values: Tensor, param: Tensor) -> Tensor:
    """``(C,)`` per-output-channel values -> a tensor of ``param``'s shape whose row ``c``
    (``param[c]``) is ``values[c]`` everywhere."""
    view = values.reshape((-1,) + (1,) * (param.dim() - 1))
    return view.expand(param.shape).to(device=param.device, dtype=torch.float32).clone()


@dataclass(frozen=True)
class APoZ(Criterion):
    """Average Percentage of Zeros (Hu, Peng, Tai & Tang 2016, "Network Trimming: A
    Data-Driven Neuron Pruning Approach towards Efficient Deep Architectures").

    For output channel/neuron ``c`` of a layer, over the ``N`` samples of the ScoreData
    batches and (conv) the ``M`` spatial positions of its output map ``O``::

        APoZ_c = (1 / (N M)) * sum_n sum_m 1[ relu(O_c,n,m) == 0 ]          (Hu et al., eq. 1)

    and the score (higher = keep) is ``1 - APoZ_c``, broadcast to every weight of output
    row ``c`` (``w[c]``; a bias ``b[c]`` gets it too).  Neurons that are mostly zero after
    the ReLU carry little information and are removed first.

    Where the zeros are counted: on the **post-ReLU activation** that follows the layer, as the
    paper defines it.  The model is traced once (:func:`prunelab.materialise.tracing.trace_model`)
    and each call of the layer is followed along the dataflow (:func:`prunelab.criteria.links.relu_after`)
    through single-user ops that keep every value in place -- BatchNorm, dropout, identity, a bias
    add -- to a ReLU (``nn.ReLU``/``ReLU6``, ``F.relu``, ``torch.relu``, ``.relu()``); the traced
    graph is run and zeros of that ReLU's output are counted.  So conv -> BatchNorm -> ReLU
    counts ``relu(BN(O)) == 0``, not ``O <= 0``.

    Fallback (documented deviation): where no ReLU follows a call this way (a classifier layer;
    LeNet-5's convolutions, which feed a max-pool and no ReLU; a residual add or a second user
    in between), the zeros are counted as ``O <= 0`` on the **layer's own output** -- the
    post-ReLU zero count if a ReLU came right after, else the fraction of non-positive
    outputs.  The same holds, with a one-line warning, for every layer when the root
    ``forward`` cannot be traced by torch.fx, and for the layers inside a submodule that
    cannot be traced (those run as opaque leaves); the layers of an attention unit (a tracing
    leaf) are counted on their own outputs too.  For a Linear directly followed by a ReLU
    both counts are the same (``relu(O) == 0  <=>  O <= 0``).

    Granularity: APoZ is a *neuron/channel* score -- use ``channel``/``neuron``
    granularity.  Element-wise (unstructured) pruning with it removes weights of the
    most-often-zero neurons first, all weights of one row tied (ties go by index).
    Group reduction: the **mean** over the group, so a channel's score is exactly
    ``1 - APoZ_c``, comparable across layers for global allocation.

    Under ``torch.distributed`` the zero counts and ``N M`` are summed over every rank's batches
    before the division, so every rank gets ``APoZ_c`` of the union of the data, whatever each
    rank's number of samples (not the mean of per-rank fractions); a rank with no batches adds
    nothing.  A NaN output or a bad batch on one rank raises the same PrunelabError on every rank.

    Runs the model in eval mode under ``torch.no_grad``; hooks are always removed.
    Parameters whose first dimension is not the owning module's output channels (e.g.
    an embedding) cannot be scored and raise PrunelabError; a transposed conv's weight
    ``(in, out, *kernel)`` gets its scores along dim 1 (groups=1 only).
    """

    name = "apoz"
    needs_data = True

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        owners = owning_modules(model, params)
        for fqn, owner in owners.items():
            if isinstance(owner.module, (nn.Embedding, nn.EmbeddingBag)):  # rows are tokens, not output channels
                raise PrunelabError(
                    f"apoz scores output channels, but the rows of {fqn!r} (an embedding) are tokens; exclude it"
                )
        zeros = self.zero_fractions(model, {o.module_name: o.module for o in owners.values()}, data)
        out = {}
        for fqn, param in params.items():
            owner = owners[fqn]
            fraction = zeros[owner.module_name]  # (C,)
            if isinstance(owner.module, nn.modules.conv._ConvTransposeNd) and owner.attr == "weight":
                # (in, out / groups, *kernel): output channels are dim 1, not the rows
                if owner.module.groups != 1 or param.shape[1] != fraction.numel():
                    raise PrunelabError(
                        f"apoz cannot map the output channels of {owner.module_name!r} (a transposed conv with "
                        f"groups={owner.module.groups}) onto {fqn!r} (shape {tuple(param.shape)}); exclude it"
                    )
                out[fqn] = broadcast_rows(1.0 - fraction, param.transpose(0, 1)).transpose(0, 1).contiguous()
                continue
            if param.dim() == 0 or param.shape[0] != fraction.numel():
                raise PrunelabError(
                    f"apoz scores output channels, but {fqn!r} (shape {tuple(param.shape)}) has no row per output "
                    f"channel of {owner.module_name!r} ({fraction.numel()} channels); exclude it"
                )
            out[fqn] = broadcast_rows(1.0 - fraction, param)
        return out

    def reduce_group(self, scores: Tensor) -> Tensor:
        """``(..., group_size)`` -> ``(...)``: the mean (a row's score is ``1 - APoZ_c``)."""
        return scores.mean(-1)

    @staticmethod
    def zero_fractions(model: nn.Module, modules: Mapping[str, nn.Module], data: ScoreData) -> dict[str, Tensor]:
        """``module name -> (C,)`` float32 APoZ: the fraction of zeros per channel of the ReLU
        output that follows each module, else of the module's own outputs ``<= 0`` (see the
        class docstring for when).

        Call inside eval mode for deterministic numbers (``Criterion.__call__`` does).
        """
        root, _ = unwrap(model)  # no DDP forward: nothing to synchronise for a scoring pass
        graph, counted_at, hooked = _count_points(root, modules)
        counts: dict[str, list[Tensor]] = {}  # name -> [zeros (C,), total (1,)] float64

        def record(name: str, output: object) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, Tensor) or out.dim() < 2:
                raise PrunelabError(
                    f"apoz needs a (N, C, ...) output from {name!r}, got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; exclude that layer"
                )
            if out.is_floating_point() and bool(torch.isnan(out).any()):  # NaN <= 0 is False: would count as nonzero
                raise PrunelabError(
                    f"apoz: the output of {name!r} contains NaN on the ScoreData batches; check the inputs and "
                    "the weights for NaN/inf values"
                )
            dim = channel_dim(modules[name])
            channels = out.shape[dim]  # C; 0 for a zero-width layer (reshape(0, -1) is ambiguous)
            per_channel = (out.detach() <= 0).movedim(dim, 0)
            per_channel = per_channel.reshape(channels, out.numel() // max(channels, 1))  # (C, N*M)
            zeros = per_channel.sum(1, dtype=torch.float64)
            total = torch.tensor([float(per_channel.shape[1])], dtype=torch.float64, device=zeros.device)
            if name in counts:
                counts[name][0] += zeros
                counts[name][1] += total
            else:
                counts[name] = [zeros, total]

        def hook_for(name: str):
            return lambda _module, _inputs, output: record(name, output)

        handles = []
        device = next((p.device for p in root.parameters()), torch.device("cpu"))
        num_batches = 0
        with distributed.errors_on_every_rank():  # one rank's NaN or bad batch: every rank raises, none waits
            try:
                for name in hooked:
                    handles.append(modules[name].register_forward_hook(hook_for(name)))
                run = root if graph is None else _Counter(graph, counted_at, record).run
                with torch.no_grad():
                    for inputs, targets in iter_batches(data, device, allow_empty=True):
                        with batch_errors("apoz", inputs, targets):
                            run(inputs)
                        num_batches += 1
            finally:
                for handle in handles:
                    handle.remove()
        counts = _counts_over_ranks(counts, list(modules), num_batches, device)
        missing = sorted(set(modules) - set(counts))
        if missing:
            raise PrunelabError(
                f"apoz: layer(s) {', '.join(missing)} did not run on the ScoreData batches; exclude them or check the model"
            )
        return {name: (z / t).float() for name, (z, t) in counts.items()}


def _counts_over_ranks(counts: Mapping[str, list[Tensor]], names: list[str], num_batches: int,
                       device: torch.device) -> dict[str, list[Tensor]]:
    """``name -> [sum_r zeros_r (C,), sum_r total_r (1,)]`` (float64, exact integer sums) for every
    layer in ``names`` that ran on some rank; ``counts`` itself, copied to ``device``, for a single process.

    A rank where a layer did not run (e.g. a rank with no batches) adds zeros: the channel counts
    ``C`` (-1: did not run) are agreed first in a MAX all-reduce, together with the number of
    batches, so that no batches on any rank is the same error on every rank; then every count
    goes in one SUM all-reduce.
    """
    local = [counts[n][0].numel() if n in counts else -1 for n in names]
    agreed = distributed.all_reduce_max_(torch.tensor(local + [num_batches], dtype=torch.int64))  # (L + 1,)
    if int(agreed[-1]) == 0:
        raise no_batches_error()
    sizes = [int(c) for c in agreed[:-1]]  # channels of each layer, -1 where it ran on no rank
    flat = torch.cat([torch.cat(counts[n]).to(device) if n in counts else
                      torch.zeros(max(c, 0) + 1, dtype=torch.float64, device=device)
                      for n, c in zip(names, sizes)])  # (sum_l (C_l + 1),): C_l zero counts, then the total
    distributed.all_reduce_sum_(flat)
    out: dict[str, list[Tensor]] = {}
    offset = 0
    for name, c in zip(names, sizes):
        if c >= 0:
            out[name] = [flat[offset:offset + c], flat[offset + c:offset + c + 1]]
        offset += max(c, 0) + 1
    return out


class _Counter(fx.Interpreter):
    """Runs a traced model and hands the output of each node in ``counted_at`` to ``record``
    (once per layer counted there), right when it is computed (before any in-place op)."""

    def __init__(self, graph: fx.GraphModule, counted_at: Mapping[fx.Node, list[str]],
                 record: Callable[[str, object], None]) -> None:
        super().__init__(graph)
        self.extra_traceback = False  # else fx appends "While executing ..." lines to our one-line errors
        self.counted_at = counted_at
        self.record = record

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        for name in self.counted_at.get(n, ()):
            self.record(name, result)
        return result


def _count_points(root: nn.Module, modules: Mapping[str, nn.Module]
                  ) -> tuple[fx.GraphModule | None, dict[fx.Node, list[str]], list[str]]:
    """Where APoZ counts zeros: ``(traced root or None, node -> modules counted at its output,
    modules counted on their own output by a forward hook)``.

    Each call (``call_module`` node) of a module in ``modules`` is counted at the ReLU that
    :func:`~prunelab.criteria.links.relu_after` finds, else at the call itself.  Modules with
    no node of their own (layers inside an opaque or attention-unit leaf) are hooked; when
    the root forward cannot be traced, or the root itself is scored (a bare layer), every
    module is, and ``None`` is returned as the graph (the model then runs as it is).
    """
    # imported here: links imports unwrap from this module
    from prunelab.criteria.links import relu_after
    from prunelab.materialise.tracing import UntraceableError, trace_model

    if any(module is root for module in modules.values()):
        return None, {}, list(modules)  # the model is the layer (e.g. a bare nn.Linear): no ReLU inside it
    try:
        graph, opaque, _ = trace_model(root)
    except UntraceableError as exc:
        warnings.warn(f"apoz: {type(root).__name__}.forward cannot be traced by torch.fx ({exc.why}); zeros are "
                      "counted on each layer's own output (its pre-activation), not after the ReLU that follows it",
                      stacklevel=5)
        return None, {}, list(modules)
    named = dict(root.named_modules())
    names_of: dict[int, list[str]] = {}  # id(module) -> its names in ``modules`` (a module may have aliases)
    for name, module in modules.items():
        names_of.setdefault(id(module), []).append(name)
    counted_at: dict[fx.Node, list[str]] = {}
    in_graph: set[str] = set()
    for node in graph.graph.nodes:
        names = names_of.get(id(named.get(str(node.target)))) if node.op == "call_module" else None
        if names:
            in_graph.update(names)
            counted_at.setdefault(relu_after(node, named) or node, []).extend(names)
    hooked = [name for name in modules if name not in in_graph]
    hidden = [name for name in hooked if any(name.startswith(f"{scope}.") for scope in opaque)]
    if hidden:
        scopes = sorted({scope for scope in opaque for name in hidden if name.startswith(f"{scope}.")})
        warnings.warn(f"apoz: {', '.join(f'module {s!r} ({opaque[s]})' for s in scopes)} cannot be traced by "
                      f"torch.fx; the zeros of {', '.join(hidden)} are counted on their own outputs, not after "
                      "a ReLU", stacklevel=5)
    return graph, counted_at, hooked
