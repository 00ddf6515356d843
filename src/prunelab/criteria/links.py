"""Channel links: which BatchNorm directly follows a layer, which Linear/Conv consumes its channels.

Producers are every pruning target layer (:data:`prunelab.targets.PRUNABLE_TYPES`), transposed
convs included (their output channels are ``out_channels``, weight dim 1); consumers are a
Linear or a Conv2d with groups=1 (a transposed conv is never a consumer here).

Shared by network slimming (:mod:`prunelab.criteria.slimming`, a layer's BatchNorm) and
regression-based channel pruning (:mod:`prunelab.criteria.regression`, a layer's
consumer).  :func:`channel_links` computes both from one trace; :func:`bn_pairs` and
:func:`consumers` are its two halves for callers that need only one (each traces again,
so a caller that needs both calls :func:`channel_links` once).  :func:`relu_after` follows
one traced call to the ReLU after it, for APoZ (:mod:`prunelab.criteria.activation`).

The links follow the dataflow of the model traced by
:func:`prunelab.materialise.tracing.trace_model` (the tracer of structured shrink: a
submodule torch.fx cannot trace becomes an opaque leaf): a partner is linked only when
the producer's output reaches it along a chain of single-user, channel-wise ops *and* the
partner reads the producer's channel axis (a Linear reads the last axis, a Conv /
BatchNorm axis 1, so Conv -> Linear without a flatten is no link even when the widths
agree).  Where the root ``forward`` (or an opaque submodule) cannot be traced, module
registration order is used, but only for links no other layer of the same width could
make; the others are *ambiguous* and scoring such a layer raises a one-line
PrunelabError, as does a layer called more than once whose calls disagree on the partner.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.criteria.activation import unwrap
from prunelab.errors import PrunelabError
from prunelab.materialise.tracing import UntraceableError, trace_model
from prunelab.structure import Channel
from prunelab.targets import PRUNABLE_TYPES

KINDS = ("bn", "consumer")
FALLBACKS = ("l1", "error")  # what slimming / regression do with a layer that has no partner: |w|, or raise

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
_SPATIAL = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3,
            nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}

# kind -> producer -> the partner of each of its calls (None: no partner on that call)
_Found = dict[str, dict[str, set[str | None]]]


def is_batchnorm(module: nn.Module) -> bool:
    """An affine BatchNorm (one with a scale ``gamma``)."""
    return isinstance(module, _BatchNorm) and module.weight is not None


def out_channels(module: nn.Module) -> int:
    """Output channels of a producer: the weight's rows, or ``out_channels`` of a transposed conv
    (weight ``(in, out / groups, *kernel)``)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return int(module.out_channels)
    return int(module.weight.shape[0])


def spread_channels(values: torch.Tensor, param: torch.Tensor, module: nn.Module, attr: str) -> torch.Tensor | None:
    """``(C,)`` per-output-channel values -> a float32 tensor of ``param``'s shape, every weight of output
    channel ``c`` holding ``values[c]``; None when ``param`` has no ``C`` output channels.

    ``param`` is ``module``'s ``attr``.  The channels are the rows ``param[c]`` (Linear / Conv weight, bias,
    BatchNorm affine), except a transposed conv's weight ``(in, out / groups, *kernel)``, whose output channel
    ``c`` is its slice ``weight[g*in/groups:(g+1)*in/groups, c - g*out/groups]``
    (:class:`prunelab.structure.TransposedChannel`).
    """
    if param.dim() == 0:
        return None
    structure = Channel().for_layer(module) if attr == "weight" else Channel()
    shape = tuple(param.shape)
    if structure.num_groups(shape) != values.numel():
        return None
    spread = structure.from_groups(values.to(device=param.device, dtype=torch.float32), shape)
    return spread.contiguous().clone()


def _in_channels(module: nn.Module) -> int | None:
    """Input channels of a supported consumer (Linear, or Conv2d with groups=1), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    return None


def _spatial_dims(module: nn.Module) -> int | None:
    """Trailing axes after the channel axis: 0 for Linear (channels last), 2 for (transposed) Conv2d / BatchNorm2d,
    None if any."""
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
        if partner.num_features != out_channels(producer):
            return False
    elif _in_channels(partner) != out_channels(producer):
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

    @classmethod
    def empty(cls) -> ChannelLinks:
        """No links and nothing ambiguous (for a model with no Linear/Conv layer to link)."""
        return cls({}, {}, {kind: {} for kind in KINDS})

    def check(self, kind: str, layers: list[str]) -> None:
        """Raise PrunelabError with the reason of the first layer in ``layers`` whose ``kind`` link is ambiguous."""
        for name in layers:
            if name in self.ambiguous[kind]:
                raise PrunelabError(self.ambiguous[kind][name])


def _graph_links(graph: fx.Graph, modules: Mapping[str, nn.Module], found: _Found) -> None:
    """Add every call's partners to ``found[kind][producer]`` (``None``: no partner on that call)."""
    for node in graph.nodes:
        producer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(producer, PRUNABLE_TYPES):
            continue
        name = str(node.target)
        users = list(node.users)
        direct = modules.get(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module" else None
        is_bn = direct is not None and is_batchnorm(direct) and users[0].args[:1] == (node,)
        bn = str(users[0].target) if is_bn and _reads_channels(producer, direct) else None
        found["bn"].setdefault(name, set()).add(bn)
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


def _order_links(scope: nn.Module, prefix: str, why: str, found: _Found,
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


def _agreed(found: _Found, ambiguous: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """``kind -> producer -> partner`` where every call agrees; a disagreement is marked ambiguous."""
    links: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
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
                ambiguous[kind][name] = (f"layer {name!r} is called more than once in forward and its calls "
                                         f"disagree on its {what} ({others}); exclude {name!r} or call it once")
    return links


def channel_links(model: nn.Module) -> ChannelLinks:
    """The :class:`ChannelLinks` of ``model`` (a DistributedDataParallel wrapper is unwrapped).

    Traces the model once, and warns once if any part of it is linked by module order;
    compute it once per scoring pass and hand it to whatever needs the links.
    """
    root, _ = unwrap(model)
    modules = dict(root.named_modules())
    found: _Found = {kind: {} for kind in KINDS}
    ambiguous: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
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
    links = _agreed(found, ambiguous)
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


# APoZ (prunelab.criteria.activation): the ReLU that follows a layer, past ops that move no value and
# change no value's position (a subset of the channel-wise ops above: no pooling, no other activation).
_RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS: tuple[Callable, ...] = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6)
_RELU_METHODS = ("relu", "relu_")
_POSITIONWISE_MODULES: tuple[type[nn.Module], ...] = (
    _BatchNorm, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POSITIONWISE_FUNCTIONS: tuple[Callable, ...] = (
    F.batch_norm, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
)
_BIAS_ADDS: tuple[Callable, ...] = (operator.add, operator.iadd, torch.add)


def _is_relu(node: fx.Node, previous: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if not node.args or node.args[0] is not previous:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_bias_add(node: fx.Node, previous: fx.Node) -> bool:
    """``previous + b`` or ``b + previous`` with ``b`` a number or a model attribute (a parameter / buffer)."""
    function = node.op == "call_function" and node.target in _BIAS_ADDS
    if not (function or (node.op == "call_method" and node.target == "add")) or len(node.args) != 2:
        return False
    if sum(arg is previous for arg in node.args) != 1:
        return False
    other = node.args[1] if node.args[0] is previous else node.args[0]
    if isinstance(other, fx.Node):
        return other.op == "get_attr"
    return isinstance(other, (int, float)) and not isinstance(other, bool)


def _is_positionwise(node: fx.Node, previous: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if _is_bias_add(node, previous):
        return True
    if not node.args or node.args[0] is not previous:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _POSITIONWISE_MODULES)
    if node.op == "call_function":
        return node.target in _POSITIONWISE_FUNCTIONS
    return node.op == "call_method" and node.target == "contiguous"


def relu_after(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    """The ReLU node (``nn.ReLU``/``ReLU6`` module, ``F.relu``, ``torch.relu``, ``.relu()``) that ``node``'s
    output reaches along a chain of single-user ops that keep every value in its place (BatchNorm,
    dropout, identity, ``.contiguous()``, adding a number or a model attribute such as a bias), or None.

    ``modules``: ``root.named_modules()`` of the traced model (:func:`trace_model`).  The chain
    follows the same dataflow rules as :func:`channel_links` (each op's own input, one user each).
    """
    previous = node
    while len(previous.users) == 1:
        current = next(iter(previous.users))
        if _is_relu(current, previous, modules):
            return current
        if not _is_positionwise(current, previous, modules):
            return None
        previous = current
    return None
