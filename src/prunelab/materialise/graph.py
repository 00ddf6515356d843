"""Channel dependency graph of a model, traced with torch.fx.

A structured (channel / neuron) mask removes whole output rows ``w[o]`` of a Linear or
Conv (Li et al. 2017, "Pruning Filters for Efficient ConvNets").  To make the network
physically smaller, every tensor that carries those channels and every layer that reads
them must be cut consistently -- the dependency-graph view of Fang et al. 2023
("DepGraph: Towards Any Structural Pruning", the idea behind Torch-Pruning).

:func:`build_graph` traces the model with :mod:`torch.fx` (Linear, Conv, BatchNorm,
``torch.nn`` modules and attention units are leaves), runs ``ShapeProp`` on the example
input and describes the channel dimension of every tensor as a :class:`Layout`: runs of
channels (:class:`Segment`), each from one *channel space* -- the output rows of one
producer layer.  Ops that make tensors share channels (``x + f(x)``, ``x * gate``)
couple their spaces in a union-find; its classes are the *coupled groups* that are cut
together.  ``torch.cat`` along channels concatenates segments (each input keeps its own
offsets); ``flatten`` / ``view`` merging the channel dim with the spatial dims gives
every channel ``H*W`` consecutive positions (``inner``), which is how a Linear after a
flatten finds its input columns ``c*H*W .. (c+1)*H*W``.  Size-1 dims inserted or removed
around the channels (``unsqueeze``, ``squeeze(dim)``, ``x[:, :, None, None]``,
``x[..., 0]``; methods and ``torch.*`` functions) only move the channel dim; squeezing
the channel dim itself, ``squeeze()`` without a dim, and indexing that selects channels
(anything but ``:`` there, or a tensor index anywhere) are barriers.

Per-channel spatial ops pass channels through unchanged (op kind ``spatial``):
``F.interpolate`` / ``nn.Upsample`` (every mode resamples each ``(n, c)`` plane on its
own, with weights summing to one, so a constant channel stays that constant) and
reflect / replicate / circular padding (``F.pad``, ``nn.ReflectionPad*``,
``nn.ReplicationPad*``, ``nn.CircularPad*``) that leaves the channel dim alone.  Constant
padding (``F.pad(mode='constant')``, ``nn.ZeroPad*``, ``nn.ConstantPad*``; kind ``pad``)
fills the border with its value in every channel, pruned ones included: a pruned channel
stays constant only if its value equals the fill, which the planner checks.  Padding
that touches the channel dim, and channel-mixing ops such as ``nn.PixelShuffle``, are
barriers.

``nn.ConvTranspose1d/2d/3d`` (weight ``(in_channels, out_channels / groups, *kernel)``,
Dumoulin & Visin 2016, "A guide to convolution arithmetic for deep learning") is a
producer of its output channels -- weight dim 1 -- and a consumer of its input channels
-- weight dim 0 -- like a Conv with the two weight dims swapped: its output-channel
space is owned by ``weight[:, o]`` (what the channel granularity prunes in a transposed
conv, :class:`prunelab.structure.TransposedChannel`), and a mask's pruned input slices
``weight[i]`` (a hand-made or dim-0 mask) join the spaces of its input channels as a
pass-through owner (see :class:`Owner`: cut only where the producer's mask prunes them
too; a mask that prunes no input slice has no vote there).  The planner reads a transposed conv's mask as one
row vector ``(out_channels output channels, then in_channels input channels)``; owners'
offsets index into it.  Depthwise transposed convs are handled as depthwise convs;
other grouped ones are refused as grouped convs are.

Every op a pruned channel may not pass is recorded as a :class:`Pin` (a *barrier*); the
planner (:mod:`prunelab.materialise.shrink`) turns pins that pruned channels actually
reach into one-line problems naming the op, the node and the module.

A weight, bias or buffer of a layer shrink cuts that the forward also uses outside the
layer's own call (``F.linear(x, self.fc.weight)``, ``x @ self.fc.weight.t()``,
``self.conv.weight.sum()``, a weight tied to another module's, a second name of the same
module) would change under the forward's feet:
:func:`prunelab.materialise.graph_uses.pin_outside_uses` pins every channel a cut of that
layer follows, so the dry run reports the use before anything is cut.

Tracing (:mod:`prunelab.materialise.tracing`): a submodule whose ``forward`` torch.fx
cannot trace (data-dependent control flow, iterating a tensor, ...) is re-traced as an
*opaque* leaf; pruned channels that reach it are then reported.  A failure in the root
``forward`` raises PrunelabError.  The layout and graph types live in
:mod:`prunelab.materialise.layouts`.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from prunelab.errors import PrunelabError
from prunelab.materialise.graph_uses import pin_outside_uses
from prunelab.materialise.layouts import ChannelGraph, Layout, Op, Owner, Pin, Segment, Space
from prunelab.materialise.tracing import (
    as_inputs, describe_target, is_attention_unit, propagate_shapes, trace_model,
)

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Threshold,
)
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
AVGPOOL_MODULES: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
# per-channel resampling of the spatial dims (every Upsample* subclasses nn.Upsample)
RESAMPLE_MODULES: tuple[type[nn.Module], ...] = (nn.Upsample,)
PAD_MODES: dict[type[nn.Module], str] = {
    nn.modules.padding._ConstantPadNd: "constant", nn.modules.padding._ReflectionPadNd: "reflect",
    nn.modules.padding._ReplicationPadNd: "replicate", nn.modules.padding._CircularPadNd: "circular",
}
PAD_MODULES: tuple[type[nn.Module], ...] = tuple(PAD_MODES)

POINTWISE_FUNCTIONS = frozenset({
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp, operator.neg,
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.softplus, F.mish, F.sigmoid, F.tanh, F.hardshrink, F.softshrink, F.threshold, F.logsigmoid, F.softsign,
    F.tanhshrink,
})
IDENTITY_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout})
BINARY_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
})
MULTIPLICATIVE = frozenset({operator.mul, operator.imul, torch.mul, "mul", "mul_"})
CAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})
POOL_FUNCTIONS = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
})
AVGPOOL_FUNCTIONS = frozenset({F.avg_pool1d, F.avg_pool2d, F.avg_pool3d})
RESAMPLE_FUNCTIONS = frozenset({F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear})
REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "max"}

POINTWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_min", "clamp_max",
})
IDENTITY_METHODS = frozenset({"contiguous", "clone", "detach", "float", "double", "half", "to", "type_as"})
BINARY_METHODS = frozenset({"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"})
RESHAPE_METHODS = frozenset({"view", "reshape", "flatten"})
# insert / remove size-1 dims (the in-place squeeze_ / unsqueeze_ change their operand's shape: barriers)
SIZE_ONE_METHODS = frozenset({"squeeze", "unsqueeze"})
SIZE_ONE_FUNCTIONS = {torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze"}
REDUCE_METHODS = {"mean": "mean", "sum": "sum", "amax": "max"}


# --- helpers -------------------------------------------------------------------------------
def is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def channel_dim(shape: tuple[int, ...] | None, conv_or_pool: Any) -> int:
    """The channel dim of a conv / pool tensor: 1 for ``(B, C, *spatial)``, 0 for an unbatched ``(C, *spatial)``.

    ``conv_or_pool`` is a Conv / pool module or an ``F.*pool{1,2,3}d`` function; its
    (base) class or function name gives the number of spatial dims.
    """
    if isinstance(conv_or_pool, nn.Module):
        names = [t.__name__ for t in type(conv_or_pool).__mro__]
    else:
        names = [getattr(conv_or_pool, "__name__", "")]
    spatial = next((int(n[-2]) for n in names if n[-2:] in ("1d", "2d", "3d")), 2)
    return 1 if shape is None else max(len(shape) - spatial - 1, 0)


def zero_padded(conv_or_pool: nn.Module) -> bool:
    """True when the op pads with zeros (a constant channel then varies near the border)."""
    if getattr(conv_or_pool, "padding_mode", "zeros") != "zeros":
        return False
    padding = conv_or_pool.padding
    if padding == "valid":
        return False
    if padding == "same":
        return any(k > 1 for k in conv_or_pool.kernel_size)
    return any(p > 0 for p in (padding if isinstance(padding, tuple) else (padding,)))


def spreads_constants(convt: nn.Module) -> bool:
    """True when a transposed conv maps a constant input channel to a non-constant output.

    ``y[o, p] = b[o] + sum over the taps (i, k) landing on p of x[i] * w[i, o, k]``: how
    many taps land on ``p``, and which, depends on ``p`` (stride, overlap, borders,
    ``output_padding``), so a constant input channel only adds a constant when every
    output position gets exactly the one tap of a 1-sized kernel: kernel 1, stride 1 and
    no ``output_padding`` (``padding`` then only crops).
    """
    ones = all(k == 1 for k in convt.kernel_size) and all(s == 1 for s in convt.stride)
    return not (ones and all(p == 0 for p in convt.output_padding))


def pad_spec(node: fx.Node, module: nn.Module | None) -> tuple[Any, Any, Any]:
    """``(pad, mode, value)`` of an ``nn.*Pad*`` module or an ``F.pad(input, pad, mode, value)`` call.

    ``pad`` is in F.pad's order -- ``(before, after)`` pairs from the last dim backwards --
    and may hold fx nodes (sizes computed at run time); ``value`` is the fill of a
    constant pad (0 when not given), None for the other modes.
    """
    if module is not None:
        mode = next(m for t, m in PAD_MODES.items() if isinstance(module, t))
        return tuple(module.padding), mode, getattr(module, "value", 0) if mode == "constant" else None

    def arg(index: int, key: str, default: Any) -> Any:
        return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)

    mode = arg(2, "mode", "constant")
    value = arg(3, "value", None)
    return arg(1, "pad", None), mode, (0 if value is None else value) if mode == "constant" else None


def _int(value: Any) -> bool:
    """A literal Python int (not a bool, not an fx node computed at run time)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_node(value: Any) -> bool:
    """An fx node computed at run time that is not a tensor (``x.size(2) - 1``), usable as an int index."""
    return isinstance(value, fx.Node) and "tensor_meta" not in value.meta


def _zero(p: Any) -> bool:
    return isinstance(p, int) and not isinstance(p, bool) and p == 0


def pads_dim(pad: Any, rank: int, dim: int) -> bool:
    """True unless ``pad`` (F.pad's order) provably leaves dim ``dim`` of a rank-``rank`` tensor alone."""
    if not isinstance(pad, (tuple, list)):
        return True
    pair = rank - 1 - dim  # pair j pads dim rank-1-j
    return 2 * pair < len(pad) and not all(_zero(p) for p in pad[2 * pair: 2 * pair + 2])


def averages_exactly(node_or_pool: fx.Node | nn.Module) -> bool:
    """True when an average pool maps a constant channel to the same constant everywhere.

    Holds unless it pads with zeros that count in the divisor (``count_include_pad``) or
    sets ``divisor_override``.  Takes an ``nn.AvgPool*`` or an fx node calling
    ``F.avg_pool*(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override)``; a non-literal argument counts as padded.
    """
    if isinstance(node_or_pool, nn.Module):
        pool = node_or_pool
        return getattr(pool, "divisor_override", None) is None and not (pool.count_include_pad and zero_padded(pool))

    def arg(index: int, key: str, default: Any) -> Any:
        return node_or_pool.args[index] if len(node_or_pool.args) > index else node_or_pool.kwargs.get(key, default)

    padding, include = arg(3, "padding", 0), arg(5, "count_include_pad", True)
    divisor = arg(6, "divisor_override", None)
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    unpadded = all(isinstance(p, int) and not isinstance(p, bool) and p == 0 for p in pads)
    return divisor is None and (unpadded or include is False)


def _literal(value: Any) -> str:
    """``value`` for a message, fx nodes (sizes computed at run time) shown as ``?``."""
    return str(map_aggregate(value, lambda a: "?" if isinstance(a, fx.Node) else a)).replace("'?'", "?")


def _index_text(item: Any) -> str:
    """One index item as written in Python: ``1:2``, ``::2``, ``0``, ``None``; values computed at run time as ``?``."""
    if isinstance(item, slice):
        parts = ["" if v is None else _literal(v) for v in (item.start, item.stop, item.step)]
        return ":".join(parts if item.step is not None else parts[:2])
    return _literal(item)


def mutated_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The operand an op overwrites in place, else None.

    ``x.relu_()`` / ``x.add_(y)`` (a method ending in ``_``), ``F.relu(x, inplace=True)``
    and a module with ``inplace=True`` (``nn.ReLU(inplace=True)``) overwrite their first
    tensor operand: later readers of ``x`` see the result, not ``x``'s own value.
    """
    first = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        inplace = isinstance(node.target, str) and node.target.endswith("_")
    elif node.op == "call_module":
        inplace = getattr(gm.get_submodule(node.target), "inplace", False) is True
    elif node.op == "call_function":
        inplace = node.kwargs.get("inplace") is True
        if not inplace:
            try:
                inplace = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True
            except (TypeError, ValueError):  # builtins without a Python signature take no inplace flag
                inplace = False
    else:
        inplace = False
    return first if inplace else None


# --- pass 1: layouts, couplings, pins ------------------------------------------------------
class _Builder:
    def __init__(self, gm: fx.GraphModule, opaque: dict[str, str], scopes: dict[str, str]) -> None:
        self.gm = gm
        self.g = ChannelGraph(gm, [], [], [], {}, [], opaque, Counter(), {}, scopes)
        self.heads: dict[str, int] = {}  # attention unit FQN -> its heads' space
        self.tied: dict[str, Layout] = {}  # BatchNorm / depthwise FQN -> the channels of its first call

    # spaces and pins
    def new_space(self, size: int, label: str, owners: list[Owner]) -> int:
        self.g.spaces.append(Space(size, label, owners))
        self.g.parent.append(len(self.g.parent))
        return len(self.g.spaces) - 1

    def producer(self, name: str, size: int, inner: int = 1) -> int:
        if name not in self.g.producers:
            self.g.producers[name] = self.new_space(size, name, [Owner(f"{name}.weight", 0, inner)])
            self.g.accounted.add(f"{name}.weight")
        return self.g.producers[name]

    def pin(self, layouts: list[Layout | None], kind: str, what: str) -> None:
        spaces = tuple(s for lay in layouts if lay is not None for s in lay.spaces())
        if spaces:
            self.g.pins.append(Pin(spaces, kind, what))

    def tie(self, name: str, lay: Layout) -> None:
        """A BatchNorm / depthwise conv cuts its own rows as its channels are cut: one set for all its calls.

        Called again, channel ``i`` of this call and of the first are coupled (their spaces
        united); channels without a space (uncuttable) pin the other call's whole.
        """
        first = self.tied.setdefault(name, lay)
        if first is lay:
            return
        if not first.same_structure(lay):
            what = f"module '{name}' is called more than once on channels laid out differently"
            self.pin([first, lay], "op", f"{what}: its channels cannot be cut for every call")
            return
        for a, b in zip(first.segments, lay.segments):
            if a.space is not None and b.space is not None:
                self.g.union(a.space, b.space)
            elif a.space is not None or b.space is not None:
                self.pin([Layout(1, (a, b))], "fixed", f"module '{name}' is also called on channels that cannot be cut")

    def where(self, node: fx.Node) -> str:
        scope = self.g.scopes.get(node.name, "")
        module = node.target if node.op == "call_module" else scope
        suffix = f" (module '{module}')" if module and node.op != "call_module" else ""
        return f"{describe_target(node, self.gm)} at node '{node.name}'{suffix}"

    def barrier(self, node: fx.Node, why: str = "cannot propagate channel pruning") -> None:
        inputs = self.tensor_inputs(node)
        self.pin([self.g.layout(n) for n in inputs], "op", f"{self.where(node)}: {why}")
        self.emit(node, "barrier", inputs, None)

    def emit(self, node: fx.Node, kind: str, inputs: list[fx.Node], output: Layout | None, **extra: Any) -> None:
        target = node.target if node.op == "call_module" else None
        self.g.ops.append(Op(node, kind, target, tuple(inputs), output, **extra))
        self.g.layouts[node.name] = output

    # node facts
    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, fx.Node) else None)
        return [n for n in found if isinstance(n.meta.get("tensor_meta"), TensorMetadata)]

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def build(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.g.layouts[node.name] = None
            elif node.op == "output":
                outputs = self.tensor_inputs(node)
                self.pin([self.g.layout(n) for n in outputs], "output", "the model's output")
            elif not isinstance(node.meta.get("tensor_meta"), (TensorMetadata, tuple, list, dict)):
                self.g.layouts[node.name] = None  # shape queries (x.size(0), x.shape) carry no channels
            elif node.op == "call_module":
                self.g.calls[node.target] += 1
                self.visit_module(node, self.gm.get_submodule(node.target))
            elif node.op == "call_function":
                self.visit_function(node)
            else:
                self.visit_method(node)
        return self.g

    # modules
    def visit_module(self, node: fx.Node, module: nn.Module) -> None:
        name = node.target
        # the input: the first positional argument, or a keyword one (``self.fc(input=h)``)
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        x = x if isinstance(x, fx.Node) else None
        lay = self.g.layout(x) if x is not None else None
        out_rank = len(self.shape(node) or ())
        if name in self.g.opaque:
            self.barrier(node, f"torch.fx could not trace it ({self.g.opaque[name]}); cannot propagate channel pruning")
        elif isinstance(module, nn.MultiheadAttention):
            self.barrier(node, "nn.MultiheadAttention is not supported "
                               "(use an attention unit with q_proj/k_proj/v_proj/out_proj)")
        elif is_attention_unit(module):
            self.visit_attention(node, module, x, lay, out_rank)
        elif isinstance(module, LINEAR_TYPES):
            if lay is not None and lay.dim != len(self.shape(x)) - 1:
                self.barrier(node, "the pruned channels are not its input features")
                lay = None
            space = self.producer(name, module.out_features)
            inputs = [x] if lay is not None else []
            self.emit(node, "linear", inputs, Layout(out_rank - 1, (Segment(space, module.out_features),)))
        elif isinstance(module, CONV_TYPES + CONVT_TYPES):
            self.visit_conv(node, module, x, lay)
        elif isinstance(module, BN_TYPES):
            if lay is not None and lay.dim != 1:
                self.barrier(node, "the pruned channels are not its normalised features")
                lay = None
            else:
                self.emit(node, "bn", [x], lay)
            self.tie(name, lay or Layout(1, (Segment(None, module.num_features),)))
        elif isinstance(module, POINTWISE_MODULES):
            self.emit(node, "pointwise", [x], lay)
        elif isinstance(module, IDENTITY_MODULES):
            self.emit(node, "identity", [x], lay)
        elif isinstance(module, POOL_MODULES + AVGPOOL_MODULES):
            moved = lay is not None and lay.dim != channel_dim(self.shape(node), module)
            if moved or getattr(module, "return_indices", False):
                self.barrier(node)
            else:
                padded = isinstance(module, AVGPOOL_MODULES) and not averages_exactly(module)
                self.emit(node, "pool_zero" if padded else "pool", [x], lay)
        elif isinstance(module, nn.Flatten):
            self.visit_reshape(node, x, literal=False)
        elif isinstance(module, RESAMPLE_MODULES):
            self.visit_resample(node, x, lay)
        elif isinstance(module, PAD_MODULES):
            self.visit_pad(node, x, lay, module)
        else:
            self.barrier(node)

    def visit_resample(self, node: fx.Node, x: fx.Node | None, lay: Layout | None) -> None:
        """``F.interpolate`` / ``nn.Upsample``: resamples dims 2.. of ``(N, C, *spatial)``; dims 0 and 1 pass."""
        if lay is not None and lay.dim >= 2:
            self.barrier(node, "it resamples the pruned channel dim")
        else:
            self.emit(node, "spatial", [x] if x is not None else [], lay)

    def visit_pad(self, node: fx.Node, x: fx.Node | None, lay: Layout | None, module: nn.Module | None) -> None:
        """Padding: passes channels when it leaves the channel dim alone; constant fills are checked by the planner."""
        pad, mode, value = pad_spec(node, module)
        if lay is None:
            self.emit(node, "spatial", [x] if x is not None else [], None)
        elif pads_dim(pad, len(self.shape(x)), lay.dim):
            self.barrier(node, f"it pads the pruned channel dim {lay.dim} (pad={_literal(pad)}); pad only the spatial dims")
        elif mode not in ("reflect", "replicate", "circular", "constant"):
            self.barrier(node, f"padding mode {_literal(mode)} is not known")
        elif mode == "constant" and not all(isinstance(p, int) and p <= 0 for p in pad):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.barrier(node, "its fill value is computed at run time")
            else:
                self.emit(node, "pad", [x], lay)  # the border holds `value` in every channel
        else:  # copies of each channel's own values (or a crop): a constant channel stays constant
            self.emit(node, "spatial", [x], lay)

    def visit_conv(self, node: fx.Node, conv: nn.Module, x: fx.Node, lay: Layout | None) -> None:
        name = node.target
        dim = channel_dim(self.shape(node), conv)  # 1 for (B, C, *spatial), 0 for an unbatched (C, *spatial)
        if lay is not None and (lay.dim != dim or any(s.inner != 1 for s in lay.segments)):
            self.barrier(node, "the pruned channels are not its input channels")
            lay = None
        if conv.groups == 1:
            space = self.producer(name, conv.out_channels)
            if lay is not None and isinstance(conv, CONVT_TYPES):
                self.vote_inputs(name, conv.out_channels, lay)
            self.emit(node, "conv", [x] if lay is not None else [], Layout(dim, (Segment(space, conv.out_channels),)))
        elif is_depthwise(conv):
            self.visit_depthwise(node, conv, x, lay, dim)
        else:
            what = f"grouped conv '{name}' (groups={conv.groups})"
            self.pin([lay], "op", f"{what}: cutting channels of a grouped convolution is not supported")
            space = self.producer(name, conv.out_channels)
            out = Layout(dim, (Segment(space, conv.out_channels),))
            self.pin([out], "op", f"{what}: cutting channels of a grouped convolution is not supported")
            self.emit(node, "grouped", [x], out)

    def vote_inputs(self, name: str, out_channels: int, lay: Layout) -> None:
        """A transposed conv's input slices ``weight[i]`` join its input channels' spaces (pass-through owners).

        In the planner's row vector of a transposed conv, input channel ``i`` is entry
        ``out_channels + i``.  Channels without a space (the model input, a barrier's
        output) cannot be cut: a pruned ``weight[i]`` there stays as zeros.
        """
        offset = out_channels
        for seg in lay.segments:
            if seg.space is not None:
                self.g.spaces[seg.space].owners.append(Owner(f"{name}.weight", offset, 1, required=False))
            offset += seg.size

    def visit_depthwise(self, node: fx.Node, conv: nn.Module, x: fx.Node, lay: Layout | None, dim: int) -> None:
        """Depthwise: output channel o reads only input channel o -- both are cut together.

        The conv's own mask (if any) joins each input space it covers.  Input channels that
        cannot be cut (the model input, the output of a barrier) keep the conv's rows that
        read them: they get a space of their own, pinned whole, so the plan notes the mask
        it cannot honour instead of building a conv that no longer matches its input.
        """
        name = node.target
        readable = lay is not None
        if lay is None:
            lay = Layout(dim, (Segment(None, conv.in_channels),))
        offset, segments = 0, []
        for seg in lay.segments:
            owner = Owner(f"{name}.weight", offset, 1, required=False)
            if seg.space is None:
                space = self.new_space(seg.size, f"{name}[{offset}:{offset + seg.size}]", [owner])
                seg = Segment(space, seg.size)
                self.pin([Layout(dim, (seg,))], "fixed",
                         f"depthwise conv '{name}' channels {offset}..{offset + seg.size - 1} read input channels that "
                         "cannot be cut (the model input or the output of an op shrink does not model), so its rows "
                         "for them stay (as zeros)")
            else:
                self.g.spaces[seg.space].owners.append(owner)
            segments.append(seg)
            offset += seg.size
        self.g.accounted.add(f"{name}.weight")
        out = Layout(dim, tuple(segments))
        self.tie(name, out)
        self.emit(node, "depthwise", [x] if readable else [], out)

    def visit_attention(self, node: fx.Node, attn: nn.Module, x: fx.Node | None, lay: Layout | None, rank: int) -> None:
        name = node.target
        extra = [n for n in self.tensor_inputs(node) if n is not x]
        self.pin([self.g.layout(n) for n in extra], "op",
                 f"{self.where(node)}: only its first input may carry pruned channels")
        if lay is not None and lay.dim != len(self.shape(x)) - 1:
            self.pin([lay], "op", f"{self.where(node)}: the pruned channels are not its input features")
            lay = None
        head_dim = attn.q_proj.out_features // attn.num_heads
        owners = [Owner(f"{name}.{p}.weight", 0, head_dim) for p in ("q_proj", "k_proj", "v_proj")]
        if name not in self.heads:  # one heads space per unit, however often it is called
            self.heads[name] = self.new_space(attn.num_heads, f"{name} heads", owners)
        heads = self.heads[name]
        self.g.accounted.update(o.param for o in owners)
        out_space = self.producer(f"{name}.out_proj", attn.out_proj.out_features)
        out = Layout(rank - 1, (Segment(out_space, attn.out_proj.out_features),))
        self.emit(node, "attention", [x] if lay is not None else [], out, heads=heads)

    # functions and methods
    def visit_function(self, node: fx.Node) -> None:
        fn = node.target
        first = node.args[0] if node.args else node.kwargs.get("input")  # torch.mean(input=h, dim=1)
        x = first if isinstance(first, fx.Node) else None
        lay = self.g.layout(x) if x is not None else None
        if fn in POINTWISE_FUNCTIONS and (x is None or len(self.tensor_inputs(node)) > 1):
            self.visit_binary(node, fn)  # torch.clamp(x, max=y): y's channels are x's, or broadcast over them
        elif fn in POINTWISE_FUNCTIONS:
            self.emit(node, "pointwise", [x], lay)
        elif fn in IDENTITY_FUNCTIONS:
            self.emit(node, "identity", [x], lay)
        elif fn in BINARY_FUNCTIONS:
            self.visit_binary(node, fn)
        elif fn in CAT_FUNCTIONS:
            self.visit_cat(node)
        elif fn in POOL_FUNCTIONS or fn in AVGPOOL_FUNCTIONS:
            if lay is not None and lay.dim != channel_dim(self.shape(node), fn) or node.kwargs.get("return_indices"):
                self.barrier(node)
            else:
                padded = fn in AVGPOOL_FUNCTIONS and not averages_exactly(node)
                self.emit(node, "pool_zero" if padded else "pool", [x], lay)
        elif fn in RESAMPLE_FUNCTIONS:
            self.visit_resample(node, x, lay)
        elif fn is F.pad:
            self.visit_pad(node, x, lay, None)
        elif fn is torch.flatten or fn is torch.reshape:
            self.visit_reshape(node, x, literal=fn is torch.reshape)
        elif fn in SIZE_ONE_FUNCTIONS:
            self.visit_size_one(node, x, SIZE_ONE_FUNCTIONS[fn])
        elif fn is operator.getitem:
            self.visit_getitem(node, x)
        elif fn in REDUCE_FUNCTIONS:
            self.visit_reduce(node, x, REDUCE_FUNCTIONS[fn])
        else:
            self.barrier(node)

    def visit_method(self, node: fx.Node) -> None:
        name = node.target
        x = node.args[0]
        lay = self.g.layout(x)
        if name in POINTWISE_METHODS and len(self.tensor_inputs(node)) > 1:
            self.visit_binary(node, name)  # x.clamp(min=y): as for torch.clamp
        elif name in POINTWISE_METHODS:
            self.emit(node, "pointwise", [x], lay)
        elif name in IDENTITY_METHODS:
            self.emit(node, "identity", [x], lay)
        elif name in BINARY_METHODS:
            self.visit_binary(node, name)
        elif name in RESHAPE_METHODS:
            self.visit_reshape(node, x, literal=name != "flatten")
        elif name in SIZE_ONE_METHODS:
            self.visit_size_one(node, x, name)
        elif name in REDUCE_METHODS:
            self.visit_reduce(node, x, REDUCE_METHODS[name])
        else:
            self.barrier(node)

    def visit_binary(self, node: fx.Node, fn: Any) -> None:
        out_shape = self.shape(node)
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        tensors = [a for a in operands if self.shape(a) is not None]
        laid = [(a, self.g.layout(a)) for a in tensors if self.g.layout(a) is not None]
        if not laid or out_shape is None:
            self.emit(node, "binary", tensors, None)
            return
        rank = len(out_shape)
        aligned = [(a, lay.moved(lay.dim + rank - len(self.shape(a)))) for a, lay in laid]
        first = aligned[0][1]
        if any(lay.dim != first.dim or not lay.same_structure(first) for _, lay in aligned):
            self.barrier(node, "its operands carry channels in different layouts")
            return
        for _, lay in aligned[1:]:
            for a, b in zip(first.segments, lay.segments):
                if a.space is not None and b.space is not None:
                    self.g.union(a.space, b.space)
                elif a.space is not None or b.space is not None:
                    self.pin([Layout(0, (a, b))], "fixed",
                             f"added to channels without a prunable producer at node '{node.name}'")
        zero_required = False
        for a in tensors:
            if self.g.layout(a) is not None:
                continue
            size = (1,) * (rank - len(self.shape(a))) + self.shape(a)
            if size[first.dim] == first.length:
                self.pin([first], "fixed",
                         f"combined with tensor '{a.name}' (no prunable channels) at node '{node.name}'")
            elif fn in MULTIPLICATIVE:
                zero_required = True
            else:
                self.barrier(node, f"tensor '{a.name}' is broadcast over the pruned channels")
                return
        self.emit(node, "binary", tensors, first, zero_required=zero_required)

    def visit_cat(self, node: fx.Node) -> None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = self.shape(node)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
            self.barrier(node)
            return
        dim = dim % len(out_shape)
        layouts = [self.g.layout(p) if isinstance(p, fx.Node) else None for p in parts]
        if all(lay is None for lay in layouts):
            self.emit(node, "cat", list(parts), None)
            return
        if any(lay is not None and lay.dim != dim for lay in layouts):
            self.barrier(node, "concatenation along a dim other than the channels")
            return
        segments: list[Segment] = []
        for part, lay in zip(parts, layouts):
            segments.extend(lay.segments if lay is not None else (Segment(None, self.shape(part)[dim]),))
        self.emit(node, "cat", list(parts), Layout(dim, tuple(segments)))

    def visit_reshape(self, node: fx.Node, x: fx.Node | None, literal: bool) -> None:
        lay = self.g.layout(x) if x is not None else None
        if lay is None:
            self.emit(node, "reshape", [x] if x is not None else [], None)
            return
        before, after = self.shape(x), self.shape(node)
        d = lay.dim
        if tuple(after[:d]) == tuple(before[:d]):
            k = d
        else:
            k, acc = 0, 1
            while k < len(after) and acc < math.prod(before[:d]):
                acc *= after[k]
                k += 1
            if acc != math.prod(before[:d]):
                k = len(after)
        j, merged = d, 1
        while k < len(after) and j < len(before) and merged < after[k]:
            merged *= before[j]
            j += 1
        if k >= len(after) or merged != after[k] or j == d:
            self.barrier(node, "the reshape splits or reorders the pruned channel dim")
            return
        fixed = False
        if literal:
            sizes = [a for a in node.args[1:]]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            if not sizes and "shape" in node.kwargs:
                sizes = list(node.kwargs["shape"])
            fixed = k < len(sizes) and isinstance(sizes[k], int) and sizes[k] != -1
        factor = math.prod(before[d + 1:j])
        self.emit(node, "reshape", [x], lay.scaled(factor, k), factor=factor, literal=fixed)

    def visit_size_one(self, node: fx.Node, x: fx.Node | None, how: str) -> None:
        """``unsqueeze(dim)`` / ``squeeze(dim)``: a size-1 dim is inserted / removed; the channel dim moves past it.

        ``squeeze`` of the channel dim itself is refused even where it has more than one
        channel (a no-op there): it would remove the dim once a single channel is kept.
        ``squeeze()`` without a dim is refused for the same reason.
        """
        lay = self.g.layout(x) if x is not None else None
        if lay is None:
            self.emit(node, "reshape", [x] if x is not None else [], None)
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        before, after = self.shape(x), self.shape(node)
        if how == "unsqueeze":
            if not _int(dims):
                self.barrier(node, "its dim is computed at run time")
                return
            new_dim = lay.dim + (dims % len(after) <= lay.dim)
        elif dims is None:
            self.barrier(node, "squeeze() without a dim would also remove the pruned channel dim once one channel is "
                               "kept; name the dim(s) to remove, e.g. squeeze(-1)")
            return
        else:
            dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
            if not all(_int(d) for d in dims):
                self.barrier(node, "its dim is computed at run time")
                return
            dims = {d % len(before) for d in dims}
            if lay.dim in dims:
                self.barrier(node, f"it squeezes the pruned channel dim {lay.dim}; squeeze only the other dims")
                return
            new_dim = lay.dim - sum(d < lay.dim and before[d] == 1 for d in dims)
        self.emit_moved(node, x, lay, new_dim)

    def visit_getitem(self, node: fx.Node, x: fx.Node | None) -> None:
        """Basic indexing ``x[:, :, None, None]``, ``x[..., 0]``, ``x[:, :, 1:]``: the channel dim moves, its channels pass.

        Every index item is followed over the input dims: ``None`` inserts a dim, an int
        removes one, a slice keeps one, ``...`` stands for the untouched dims.  At the
        channel dim only a full slice ``:`` is allowed; any other item there selects
        channels, and tensor / list (advanced) indices anywhere are refused.
        """
        lay = self.g.layout(x) if x is not None else None
        if lay is None or len(node.args) != 2:  # tuples of outputs, buffers, the model input: as before
            self.barrier(node)
            return
        index = node.args[1]
        items = list(index) if isinstance(index, tuple) else [index]
        if not all(i is None or i is Ellipsis or isinstance(i, slice) or _int(i) or _scalar_node(i) for i in items):
            self.barrier(node, "advanced indexing (a tensor, list or bool index) is not supported")
            return
        consumed = sum(i is not None and i is not Ellipsis for i in items)
        before = self.shape(x)
        if items.count(Ellipsis) > 1 or consumed > len(before):
            self.barrier(node)
            return
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (len(before) - consumed)
        in_dim = out_dim = 0
        new_dim = None
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if in_dim == lay.dim:
                if not (isinstance(item, slice) and item.start in (None, 0) and item.stop is None
                        and item.step in (None, 1)):
                    self.barrier(node, f"the index [{_index_text(item)}] selects along the pruned channel dim "
                                       f"{lay.dim}; index only the other dims")
                    return
                new_dim = out_dim
            out_dim += isinstance(item, slice)
            in_dim += 1
        self.emit_moved(node, x, lay, new_dim if new_dim is not None else out_dim + lay.dim - in_dim)

    def emit_moved(self, node: fx.Node, x: fx.Node, lay: Layout, new_dim: int) -> None:
        """Emit a view that moves the channel dim ``lay.dim`` to ``new_dim`` (checked against the traced shapes)."""
        before, after = self.shape(x), self.shape(node)
        if not 0 <= new_dim < len(after) or after[new_dim] != before[lay.dim]:
            self.barrier(node)
            return
        self.emit(node, "reshape", [x], lay.moved(new_dim))

    def visit_reduce(self, node: fx.Node, x: fx.Node, how: str) -> None:
        lay = self.g.layout(x)
        if lay is None:
            self.emit(node, "reduce", [x], None)
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        rank = len(self.shape(x))
        if dims is None or not isinstance(keepdim, bool):
            self.barrier(node, "the reduction covers the pruned channel dim")
            return
        dims = [d % rank for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if lay.dim in dims:
            self.barrier(node, "the reduction covers the pruned channel dim")
            return
        new_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
        # mean / max of a constant is that constant; a sum is c * (summed length), which the
        # example input fixes but another input need not share: its constants must be 0.
        self.emit(node, "reduce", [x], lay.moved(new_dim), zero_required=how == "sum",
                  site=f"over dim(s) {tuple(sorted(dims))} by {self.where(node)}")


def build_graph(model: nn.Module, example_input: Any) -> ChannelGraph:
    """Trace ``model``, propagate shapes of ``example_input`` and build its channel graph."""
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"shrink needs an nn.Module, got {type(model).__name__}; pass the model itself")
    inputs = as_inputs(example_input)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise PrunelabError(
            f"example_input must be a tensor (or a tuple of tensors), got {type(example_input).__name__}; "
            "pass e.g. images[:1] of shape (1, C, H, W)"
        )
    gm, opaque, scopes = trace_model(model)
    propagate_shapes(gm, model, inputs)
    builder = _Builder(gm, opaque, scopes)
    graph = builder.build()
    pin_outside_uses(graph, model, builder.where)
    return graph
