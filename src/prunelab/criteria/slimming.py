"""Network slimming (Liu et al. 2017): BatchNorm scales as channel importance.

Also home of the layer-graph helpers :func:`bn_pairs` and :func:`consumers` (which
BatchNorm directly follows a layer, which Linear/Conv consumes its channels), shared with
the ``regression`` criterion.  Both read the graph from ``torch.fx.symbolic_trace`` and,
where the model cannot be traced (data-dependent control flow), fall back to module
registration order -- which assumes the forward pass calls the leaf modules in the order
they are registered, as ``nn.Sequential`` and the zoo models do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.criteria.activation import broadcast_rows, owning_modules, unwrap
from prunelab.criteria.base import Criterion, ScoreData
from prunelab.errors import PrunelabError
from prunelab.targets import PRUNABLE_TYPES

FALLBACKS = ("l1", "error")

# Ops that keep channel c of their input in channel c of their output and mix no channels.
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, _BatchNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)
_CHANNELWISE_FUNCTIONS: tuple[Callable, ...] = (
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh,
    torch.sigmoid, F.sigmoid, F.hardswish, F.hardtanh, F.softplus, F.dropout, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
)
_CHANNELWISE_METHODS = ("relu", "relu_", "tanh", "sigmoid", "contiguous")


def is_batchnorm(module: nn.Module) -> bool:
    """An affine BatchNorm (one with a scale ``gamma``)."""
    return isinstance(module, _BatchNorm) and module.weight is not None


def _out_channels(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def _in_channels(module: nn.Module) -> int | None:
    """Input channels of a supported consumer (Linear, or Conv2d with groups=1), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    return None


def _trace(root: nn.Module) -> torch.fx.Graph | None:
    try:
        return torch.fx.symbolic_trace(root).graph
    except Exception:  # noqa: BLE001 -- any tracing failure means: use module order
        return None


def _is_channelwise(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _CHANNELWISE_METHODS
    return False


def _graph_links(root: nn.Module) -> tuple[dict[str, str], dict[str, str]] | None:
    """From an fx trace: ``(producer -> BN directly after it, producer -> consumer)``.

    A link is only made along a chain where every node has a single user, so the
    producer's channels reach nothing else; a layer called more than once is linked only
    when every call agrees.
    """
    graph = _trace(root)
    if graph is None:
        return None
    modules = dict(root.named_modules())
    bns: dict[str, set[str | None]] = {}
    cons: dict[str, set[str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), PRUNABLE_TYPES):
            continue
        name = str(node.target)
        users = list(node.users)
        direct = users[0] if len(users) == 1 else None
        is_bn = direct is not None and direct.op == "call_module" and is_batchnorm(modules[str(direct.target)])
        bns.setdefault(name, set()).add(str(direct.target) if is_bn else None)
        consumer = None
        current = node
        while len(current.users) == 1:
            current = next(iter(current.users))
            if current.op == "call_module" and isinstance(modules.get(str(current.target)), PRUNABLE_TYPES):
                consumer = str(current.target)
                break
            if not _is_channelwise(current, modules):
                break
        cons.setdefault(name, set()).add(consumer)
    return _agreed(bns), _agreed(cons)


def _agreed(found: Mapping[str, set[str | None]]) -> dict[str, str]:
    """Keep the links on which every call of the producer agrees."""
    return {k: next(iter(v)) for k, v in found.items() if len(v) == 1 and None not in v}


def _order_links(root: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Module-registration-order fallback of :func:`_graph_links` (leaf modules only)."""
    leaves = [(n, m) for n, m in root.named_modules() if n and not any(True for _ in m.children())]
    bns: dict[str, str] = {}
    cons: dict[str, str] = {}
    for i, (name, module) in enumerate(leaves):
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if i + 1 < len(leaves) and is_batchnorm(leaves[i + 1][1]):
            bns[name] = leaves[i + 1][0]
        for other_name, other in leaves[i + 1:]:
            if isinstance(other, PRUNABLE_TYPES):
                cons[name] = other_name
                break
            if not isinstance(other, _CHANNELWISE_MODULES):
                break
    return bns, cons


def _links(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    root, _ = unwrap(model)
    links = _graph_links(root)
    return links if links is not None else _order_links(root)


def bn_pairs(model: nn.Module) -> dict[str, str]:
    """``Linear/Conv module name -> name of the affine BatchNorm that directly consumes
    its output`` (and nothing else does), with matching channel counts."""
    root, _ = unwrap(model)
    modules = dict(root.named_modules())
    return {
        p: bn for p, bn in _links(model)[0].items() if modules[bn].num_features == _out_channels(modules[p])
    }


def consumers(model: nn.Module) -> dict[str, str]:
    """``Linear/Conv module name -> the Linear or Conv2d (groups=1) that consumes its output
    channels`` through channel-wise ops only (activations, BatchNorm, dropout, pooling),
    with the producer's output channels equal to the consumer's input channels."""
    root, _ = unwrap(model)
    modules = dict(root.named_modules())
    return {
        p: c for p, c in _links(model)[1].items() if _in_channels(modules[c]) == _out_channels(modules[p])
    }


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if is_batchnorm(m)]
    if not found:
        raise PrunelabError(
            f"network slimming needs affine BatchNorm layers, but {type(model).__name__} has none; "
            "use a model with BatchNorm or another criterion"
        )
    return found


def _check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength < 0:
        raise PrunelabError(
            f"slimming strength must be a finite number >= 0, got {strength!r}; Liu et al. use 1e-4 (VGG) or 1e-5 (ResNet)"
        )


def bn_l1_loss(model: nn.Module, strength: float) -> Tensor:
    """The sparsity penalty ``lambda * sum_BN sum_c |gamma_c|`` to add to the training loss
    (Liu et al. 2017, eq. 1: ``L = sum l(f(x, W), y) + lambda * sum_{gamma} |gamma|``).

    Differentiable (subgradient ``sign(gamma)``, 0 at 0).  Liu et al. use ``lambda = 1e-4``
    for VGGNet and ``1e-5`` for ResNet/DenseNet on CIFAR.
    """
    _check_strength(strength)
    return strength * sum(bn.weight.abs().sum() for bn in _batchnorms(model))


@torch.no_grad()
def bn_l1_penalty_(model: nn.Module, strength: float) -> None:
    """Add the penalty's subgradient ``lambda * sign(gamma)`` to every BN scale's ``.grad``
    (Liu et al. 2017, the "sub-gradient descent" of the L1 term), in place.

    Call after ``loss.backward()`` and before ``optimizer.step()``; equivalent to adding
    :func:`bn_l1_loss` to the loss.  A scale with no ``.grad`` yet gets the penalty as its
    gradient; frozen scales (``requires_grad=False``) are left alone.
    """
    _check_strength(strength)
    for bn in _batchnorms(model):
        if not bn.weight.requires_grad:
            continue
        step = strength * torch.sign(bn.weight.detach())
        if bn.weight.grad is None:
            bn.weight.grad = step.clone()
        else:
            bn.weight.grad.add_(step)


class SlimmingLoss:
    """``base(outputs, targets) + bn_l1_loss(model, strength)``: a training loss for
    :func:`prunelab.bench.training.train` (``loss_fn=SlimmingLoss(model, 1e-4)``) that
    trains with the network-slimming penalty (Liu et al. 2017, eq. 1)."""

    def __init__(self, model: nn.Module, strength: float, base: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy):
        _check_strength(strength)
        _batchnorms(model)
        self.model, self.strength, self.base = model, strength, base

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.base(outputs, targets) + bn_l1_loss(self.model, self.strength)


@dataclass(frozen=True)
class BNScale(Criterion):
    """Network-slimming channel score (Liu, Li, Shen, Huang, Yan & Zhang 2017, "Learning
    Efficient Convolutional Networks through Network Slimming").

    Each BatchNorm scales channel ``c`` by ``gamma_c``; after training with the L1 penalty
    ``lambda * sum |gamma|`` (:func:`bn_l1_loss` / :func:`bn_l1_penalty_`), channels with
    small ``|gamma_c|`` contribute little and are pruned under one global threshold.
    Here the output channel ``c`` of a Linear/Conv layer is scored by::

        s_c = |gamma_c|    of the affine BatchNorm that directly consumes the layer's output

    broadcast to its row ``w[c]`` (and bias ``b[c]``); a BatchNorm's own ``weight``/``bias``
    get ``|gamma|`` too.  The pairing comes from the fx graph (conv -> bn edge, the conv's
    only user), or from module order when the model cannot be traced (see module doc).

    Layers with no such BatchNorm (e.g. the classifier), and any other parameter:
    ``fallback='l1'`` (default) scores them by magnitude ``|w|``, so a channel's group
    score is its mean ``|w|`` (the L1 row norm / fan-in, Li et al. 2017) and warns,
    naming them; ``fallback='error'`` raises PrunelabError instead.  Global allocation
    then compares ``|gamma|`` with mean ``|w|`` -- exclude such layers (``--exclude``) or
    use uniform allocation when that matters.

    Group reduction: the **mean**, so a channel's score is exactly ``|gamma_c|`` (the
    paper's global threshold on ``|gamma|``).  Data-free; meant for channel granularity.
    """

    fallback: str = "l1"
    name = "slimming"
    needs_data = False

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise PrunelabError(
                f"criterion 'slimming' got fallback={self.fallback!r}; expected one of {', '.join(FALLBACKS)}"
            )

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        owners = owning_modules(model, params)
        pairs = bn_pairs(model) if any(isinstance(o.module, PRUNABLE_TYPES) for o in owners.values()) else {}
        root, _ = unwrap(model)
        modules = dict(root.named_modules())
        out: dict[str, Tensor] = {}
        unpaired: list[str] = []
        for fqn, param in params.items():
            owner = owners[fqn]
            bn = modules[pairs[owner.module_name]] if owner.module_name in pairs else None
            if bn is None and is_batchnorm(owner.module):
                bn = owner.module
            if bn is not None and param.dim() >= 1 and param.shape[0] == bn.weight.numel():
                out[fqn] = broadcast_rows(bn.weight.detach().float().abs(), param)
            else:
                out[fqn] = param.detach().float().abs()
                unpaired.append(fqn)
        if unpaired:
            message = (
                f"slimming: {', '.join(unpaired)} have no directly following BatchNorm; "
                f"{'scored by |w| (fallback=l1)' if self.fallback == 'l1' else 'expected every scored layer to have one'}"
                "; exclude them (--exclude) to prune by |gamma| only"
            )
            if self.fallback == "error":
                raise PrunelabError(message + " or pass fallback='l1'")
            warnings.warn(message, stacklevel=3)
        return out

    def reduce_group(self, scores: Tensor) -> Tensor:
        """``(..., group_size)`` -> ``(...)``: the mean (a channel's score is ``|gamma_c|``)."""
        return scores.mean(-1)
