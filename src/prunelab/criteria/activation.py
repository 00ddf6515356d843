"""Activation-based criteria: APoZ (Hu et al. 2016, "Network Trimming").

Also home of :func:`owning_modules`, which resolves parameter FQNs to the modules that
own them (shared by the criteria that hook or inspect layers: apoz, slimming, regression).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunelab.criteria.base import Criterion, ScoreData, iter_batches
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
    """The output dimension that indexes channels/neurons: last for Linear, 1 otherwise
    (Conv ``(N, C, ...)``, BatchNorm ``(N, C[, L])``)."""
    return -1 if isinstance(module, nn.Linear) else 1


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

    Assumption: ``relu(O) == 0  <=>  O <= 0``, so the zeros are counted as ``O <= 0`` on the
    **layer's own output** (a forward hook on the layer).  That is exactly the paper's
    post-ReLU zero count when a ReLU directly follows the layer (the zoo MLPs); with a
    BatchNorm or another op in between, or no ReLU at all (a classifier layer; LeNet-5's
    convolutions, which feed a max-pool and no ReLU), it is the fraction of non-positive
    pre-activations instead.

    Granularity: APoZ is a *neuron/channel* score -- use ``channel``/``neuron``
    granularity.  Element-wise (unstructured) pruning with it removes weights of the
    most-often-zero neurons first, all weights of one row tied (ties go by index).
    Group reduction: the **mean** over the group, so a channel's score is exactly
    ``1 - APoZ_c``, comparable across layers for global allocation.

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
        """``module name -> (C,)`` float32 APoZ (fraction of outputs ``<= 0`` per channel).

        Call inside eval mode for deterministic numbers (``Criterion.__call__`` does).
        """
        counts: dict[str, list[Tensor]] = {}  # name -> [zeros (C,), total (1,)] float64

        def hook_for(name: str, module: nn.Module):
            dim = channel_dim(module)

            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                if not isinstance(out, Tensor) or out.dim() < 2:
                    raise PrunelabError(
                        f"apoz needs a (N, C, ...) output from {name!r}, got "
                        f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; exclude that layer"
                    )
                per_channel = (out.detach() <= 0).movedim(dim, 0).reshape(out.shape[dim], -1)  # (C, N*M)
                zeros = per_channel.sum(1, dtype=torch.float64)
                total = torch.tensor([float(per_channel.shape[1])], dtype=torch.float64, device=zeros.device)
                if name in counts:
                    counts[name][0] += zeros
                    counts[name][1] += total
                else:
                    counts[name] = [zeros, total]

            return hook

        handles = []
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(hook_for(name, module)))
            root, _ = unwrap(model)  # no DDP forward: nothing to synchronise for a scoring pass
            device = next((p.device for p in root.parameters()), torch.device("cpu"))
            with torch.no_grad():
                for inputs, _targets in iter_batches(data, device):
                    root(inputs)
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(modules) - set(counts))
        if missing:
            raise PrunelabError(
                f"apoz: layer(s) {', '.join(missing)} did not run on the ScoreData batches; exclude them or check the model"
            )
        return {name: (z / t).float() for name, (z, t) in counts.items()}
