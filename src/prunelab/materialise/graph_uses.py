"""Tensors of a layer shrink cuts that the forward also uses outside the layer's own call.

A weight, bias or buffer of such a layer (``F.linear(x, self.fc.weight)``,
``x @ self.fc.weight.t()``, ``self.conv.weight.sum()``, a weight tied to another
module's, a second name of the same module) would change under the forward's feet once
the layer is cut.  :func:`pin_outside_uses` adds a :class:`Pin` on every channel space a
cut of that layer follows, so shrink's dry run reports the use before anything is cut.
Called by :func:`prunelab.materialise.graph.build_graph` after the graph is built.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from prunelab.materialise.layouts import ChannelGraph, Pin

# Op kinds of the layers a cut rewrites (their rows, input channels or heads).
CUT_KINDS = frozenset({"linear", "conv", "grouped", "depthwise", "bn", "attention"})


def layer_spaces(graph: ChannelGraph) -> dict[str, set[int]]:
    """Layer FQN -> the channel spaces whose cut changes its tensors (output rows, input channels, heads)."""
    found: dict[str, set[int]] = {}
    for op in graph.ops:
        if op.target is None or op.kind not in CUT_KINDS:
            continue
        rows = set(op.output.spaces()) if op.output is not None else set()
        cols = set(graph.layout(op.inputs[0]).spaces()) if op.inputs and graph.layout(op.inputs[0]) else set()
        if op.kind == "attention":
            found.setdefault(f"{op.target}.out_proj", set()).update(rows | {op.heads})
            for proj in ("q_proj", "k_proj", "v_proj"):
                found.setdefault(f"{op.target}.{proj}", set()).update(cols | {op.heads})
        else:
            found.setdefault(op.target, set()).update(rows | cols)
    return {name: spaces for name, spaces in found.items() if spaces}


def pin_outside_uses(graph: ChannelGraph, model: nn.Module, where: Callable[[fx.Node], str]) -> None:
    """Pin the channels of every layer whose parameter or buffer is used outside the layer's own call.

    A ``get_attr`` of ``fc.weight`` (``F.linear(x, self.fc.weight)``, ``self.fc.weight.t()``)
    would read the cut tensor, and a tensor also held by another module (tied weights,
    or the same module under a second name) would no longer be shared once the layer is
    replaced; either way the cut layer no longer computes what the forward expects.
    ``where`` describes a node for the message (the graph builder's op / node / module).
    """
    spaces = layer_spaces(graph)
    if spaces:
        _pin_attribute_reads(graph, spaces, where)
        _pin_shared_tensors(graph, model, spaces)


def _pin_attribute_reads(graph: ChannelGraph, spaces: dict[str, set[int]], where: Callable[[fx.Node], str]) -> None:
    """A ``get_attr`` node reading a cut layer's tensor (used by some node) pins that layer's spaces."""
    for node in graph.module.graph.nodes:
        owner, _, attr = str(node.target).rpartition(".")
        if node.op != "get_attr" or owner not in spaces or attr == "num_batches_tracked" or not node.users:
            continue
        users = ", ".join(where(user) for user in node.users)
        what = (f"{users} reads '{node.target}' outside a call of layer '{owner}': shrink cannot cut a layer "
                "whose tensors the forward uses itself")
        graph.pins.append(Pin(tuple(sorted(spaces[owner])), "op", what))


def _pin_shared_tensors(graph: ChannelGraph, model: nn.Module, spaces: dict[str, set[int]]) -> None:
    """A cut layer's tensor also held under another module's name (tied, or a second name) pins its spaces."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            holders.setdefault(id(tensor), []).append(f"{name}.{attr}" if name else attr)
    for owner, sids in spaces.items():
        layer = model.get_submodule(owner)
        for attr, tensor in (*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)):
            others = [h for h in holders.get(id(tensor), []) if h.rpartition(".")[0] != owner]
            if others and attr != "num_batches_tracked":
                what = (f"'{owner}.{attr}' is also '{others[0]}' (a tied tensor, or a second name of module "
                        f"'{owner}'): shrink cannot cut a layer whose tensors another module shares")
                graph.pins.append(Pin(tuple(sorted(sids)), "op", what))
                break
