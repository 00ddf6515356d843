"""Network slimming (Liu et al. 2017): BatchNorm scales as channel importance.

Also home of the layer-graph helpers :func:`channel_links`, :func:`bn_pairs` and
:func:`consumers` (which BatchNorm directly follows a layer, which Linear/Conv consumes
its channels), shared with the ``regression`` criterion.  The links follow the dataflow
of the model traced by :func:`prunelab.materialise.tracing.trace_model` (the tracer of
structured shrink: a submodule torch.fx cannot trace becomes an opaque leaf): a partner
is linked only when the producer's output reaches it along a chain of single-user,
channel-wise ops *and* the partner reads the producer's channel axis (a Linear reads the
last axis, a Conv / BatchNorm axis 1, so Conv -> Linear without a flatten is no link even
when the widths agree).  Where the root ``forward`` (or an opaque submodule) cannot be
traced, module registration order is used, but only for links no other layer of the same
width could make; the others are *ambiguous* and scoring such a layer raises a one-line
PrunelabError, as does a layer called more than once whose calls disagree on the partner.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.criteria.activation import broadcast_rows, owning_modules, unwrap
from prunelab.criteria.base import Criterion, ScoreData
from prunelab.errors import PrunelabError
from prunelab.materialise.tracing import UntraceableError, trace_model
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
_SPATIAL = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


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


def _spatial_dims(module: nn.Module) -> int | None:
    """Trailing axes after the channel axis: 0 for Linear (channels last), 2 for Conv2d / BatchNorm2d, None if any."""
    if isinstance(module, nn.Linear):
        return 0
    return next((d for t, d in _SPATIAL.items() if isinstance(module, t)), None)


def _reads_channels(producer: nn.Module, partner: nn.Module) -> bool:
    """Whether ``partner`` reads ``producer``'s output channels as its own channels (same axis, same count).

    Channel-wise ops keep a tensor's rank, so the axes agree iff both have as many axes
    after the channel axis -- except BatchNorm1d, which takes ``(N, C)`` (after a Linear;
    assumed 2-D, the only case where its axis 1 is the Linear's last) or ``(N, C, L)``.
    """
    if is_batchnorm(partner):
        if partner.num_features != _out_channels(producer):
            return False
    elif _in_channels(partner) != _out_channels(producer):
        return False
    mine, theirs = _spatial_dims(producer), _spatial_dims(partner)
    if isinstance(partner, nn.BatchNorm1d) and mine == 0:
        return True
    return mine is None or theirs is None or mine == theirs


def _is_channelwise(node: fx.Node, previous: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if not node.args or node.args[0] is not previous:  # the channels must be the op's own input
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _CHANNELWISE_METHODS
    return False


@dataclass(frozen=True)
class ChannelLinks:
    """Where each Linear/Conv layer's output channels go, from the model's dataflow.

    ``bn``: layer -> the affine BatchNorm that directly normalises its output (its only
    user).  ``consumer``: layer -> the Linear / Conv2d (groups=1) that reads its channels
    as input channels through single-user channel-wise ops (activations, BatchNorm,
    dropout, pooling).  ``ambiguous``: ``"bn"`` / ``"consumer"`` -> layer -> a one-line
    reason why no single partner of that kind can be named; :meth:`check` raises it for
    the layers a caller needs.
    """

    bn: Mapping[str, str]
    consumer: Mapping[str, str]
    ambiguous: Mapping[str, Mapping[str, str]]

    def check(self, kind: str, layers: list[str]) -> None:
        """Raise PrunelabError with the reason of the first layer in ``layers`` whose ``kind`` link is ambiguous."""
        for name in layers:
            if name in self.ambiguous[kind]:
                raise PrunelabError(self.ambiguous[kind][name])


def _graph_links(graph: fx.Graph, modules: Mapping[str, nn.Module], found: dict[str, dict[str, set[str | None]]]) -> None:
    """Add every call's partners to ``found[kind][producer]`` (``None``: no partner on that call)."""
    for node in graph.nodes:
        producer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(producer, PRUNABLE_TYPES):
            continue
        name = str(node.target)
        users = list(node.users)
        direct = modules.get(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module" else None
        is_bn = direct is not None and is_batchnorm(direct) and users[0].args[:1] == (node,)
        found["bn"].setdefault(name, set()).add(str(users[0].target) if is_bn and _reads_channels(producer, direct) else None)
        consumer, previous = None, node
        while len(previous.users) == 1:
            current = next(iter(previous.users))
            partner = modules.get(str(current.target)) if current.op == "call_module" else None
            if isinstance(partner, PRUNABLE_TYPES):
                if current.args[:1] == (previous,) and _reads_channels(producer, partner):
                    consumer = str(current.target)
                break
            if not _is_channelwise(current, previous, modules):
                break
            previous = current
        found["consumer"].setdefault(name, set()).add(consumer)


def _order_links(scope: nn.Module, prefix: str, why: str, found: dict[str, dict[str, set[str | None]]],
                 ambiguous: dict[str, dict[str, str]]) -> None:
    """Module-registration-order links inside an untraceable ``scope``, where no other layer could make them.

    The BatchNorm right after a layer in registration order, and the next Linear/Conv
    after it past channel-wise modules only, are linked only when no other layer of
    ``scope`` could feed them (has that many channels on that axis); otherwise each such
    layer is marked ambiguous.
    """
    leaves = [(prefix + n, m) for n, m in scope.named_modules() if not any(True for _ in m.children())]
    layers = [(n, m) for n, m in leaves if isinstance(m, PRUNABLE_TYPES)]

    def link(kind: str, name: str, partner: str, module: nn.Module) -> None:
        rivals = [n for n, m in layers if n != partner and _reads_channels(m, module)]
        if rivals == [name]:
            found[kind].setdefault(name, set()).add(partner)
            return
        listed = ", ".join(repr(r) for r in rivals)
        for rival in rivals:
            ambiguous[kind].setdefault(rival, (
                f"cannot tell which layer feeds {partner!r}: {why}, and by module order it follows {name!r}, but "
                f"{listed} all have its channels; make the forward fx-traceable (move the data-dependent code into "
                f"a submodule) or exclude {rival!r}"))

    for i, (name, module) in enumerate(leaves):
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if i + 1 < len(leaves) and is_batchnorm(leaves[i + 1][1]) and _reads_channels(module, leaves[i + 1][1]):
            link("bn", name, *leaves[i + 1])
        for other, partner in leaves[i + 1:]:
            if isinstance(partner, PRUNABLE_TYPES):
                if _reads_channels(module, partner):
                    link("consumer", name, other, partner)
                break
            if not isinstance(partner, _CHANNELWISE_MODULES):
                break


def channel_links(model: nn.Module) -> ChannelLinks:
    """The :class:`ChannelLinks` of ``model`` (a DistributedDataParallel wrapper is unwrapped)."""
    root, _ = unwrap(model)
    modules = dict(root.named_modules())
    found: dict[str, dict[str, set[str | None]]] = {"bn": {}, "consumer": {}}
    ambiguous: dict[str, dict[str, str]] = {"bn": {}, "consumer": {}}
    try:
        gm, opaque, _ = trace_model(root)
    except UntraceableError as exc:
        scopes = {"": f"{type(root).__name__}.forward cannot be traced by torch.fx ({exc.why})"}
    else:
        _graph_links(gm.graph, modules, found)
        scopes = {name: f"module {name!r} cannot be traced by torch.fx ({why})" for name, why in opaque.items()}
    scopes = {n: why for n, why in scopes.items() if any(isinstance(m, PRUNABLE_TYPES) for m in modules[n].modules())}
    for name, why in scopes.items():
        _order_links(modules[name], f"{name}." if name else "", why, found, ambiguous)
    if scopes:
        warnings.warn(f"channel links: {'; '.join(scopes.values())}; its layers are linked by module order where "
                      "no other layer has the channel count", stacklevel=3)
    links: dict[str, dict[str, str]] = {"bn": {}, "consumer": {}}
    for kind, partners in found.items():
        what = "BatchNorm" if kind == "bn" else "consumer"
        for name, seen in partners.items():
            named = sorted(p for p in seen if p is not None)
            if name in ambiguous[kind] or not named:
                continue
            if len(seen) == 1:
                links[kind][name] = named[0]
            else:
                others = ", ".join(repr(p) if p is not None else "none" for p in sorted(seen, key=str))
                ambiguous[kind][name] = (f"layer {name!r} is called more than once in forward and its calls disagree on its "
                                   f"{what} ({others}); exclude {name!r} or call it once")
    return ChannelLinks(links["bn"], links["consumer"], ambiguous)


def bn_pairs(model: nn.Module) -> dict[str, str]:
    """``Linear/Conv module name -> name of the affine BatchNorm that directly consumes
    its output`` (and nothing else does), reading its channels (see :func:`channel_links`)."""
    return dict(channel_links(model).bn)


def consumers(model: nn.Module) -> dict[str, str]:
    """``Linear/Conv module name -> the Linear or Conv2d (groups=1) that consumes its output
    channels`` through channel-wise ops only (activations, BatchNorm, dropout, pooling),
    as its own input channels (see :func:`channel_links`)."""
    return dict(channel_links(model).consumer)


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
    get ``|gamma|`` too.  The pairing follows the traced dataflow (conv -> bn edge, the
    conv's only user, reading its channel axis), or module order where the model cannot be
    traced and no other layer has the width (see module doc); a layer whose BatchNorm is
    ambiguous raises PrunelabError.

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
        layers = sorted({o.module_name for o in owners.values() if isinstance(o.module, PRUNABLE_TYPES)})
        links = channel_links(model) if layers else ChannelLinks({}, {}, {"bn": {}, "consumer": {}})
        links.check("bn", layers)
        pairs = links.bn
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
