"""Channel links of slimming / regression follow the dataflow, not channel counts or module order.

Each model here has two layers of equal width where matching by count (or by the next
module in registration order) picks the wrong partner; the links must come from the
traced graph, and where they cannot, scoring the layer is a one-line PrunelabError.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prunelab.criteria import ScoreData, get_criterion
from prunelab.criteria import links as links_module
from prunelab.criteria.links import bn_pairs, channel_links, consumers
from prunelab.criteria.regression import regression_channel_prune
from prunelab.errors import PrunelabError


def data_for(shape: tuple[int, ...], n: int = 8) -> ScoreData:
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    return ScoreData([(x, torch.zeros(n))])


def quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# --- traced: the partner must read the producer's channel axis -----------------------------------
class ConvThenLinearOverWidth(nn.Module):
    """A Linear applied to the *width* axis of a conv output whose width equals its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)  # reads W = 4, not the 4 channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 2, 4, 4) -> (N, 4, 4, 3)
        return self.fc(torch.relu(self.conv(x)))


class LinearThenConv(nn.Module):
    """A Linear over the last axis of an image, then a Conv over its channel axis (both of width 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 4, 3, 4) -> (N, 2, 3, 4)
        return self.conv(torch.relu(self.fc(x)))


def test_conv_to_linear_over_the_width_axis_is_no_link():
    # was: consumers() == {"conv": "fc"} because fc.in_features == conv.out_channels
    model = ConvThenLinearOverWidth()
    assert consumers(model) == {}
    with pytest.raises(PrunelabError, match="found no consumer for 'conv'"):
        regression_channel_prune(model, "conv", None, data_for((2, 4, 4)), 2)


def test_linear_to_conv_is_no_link():
    assert consumers(LinearThenConv()) == {}  # was {"fc": "conv"}


def test_regression_criterion_scores_a_layer_without_a_real_consumer_by_magnitude():
    model = ConvThenLinearOverWidth()
    params = {"conv.weight": model.conv.weight}
    with pytest.warns(UserWarning, match="conv.weight have no consumer"):
        scores = get_criterion("regression")(model, params, data_for((2, 4, 4)))
    weight = model.conv.weight.detach().abs()
    torch.testing.assert_close(scores["conv.weight"], weight / weight.max())


# --- traced: the graph, not module order, pairs a BatchNorm with its conv ------------------------
class CrossRegistered(nn.Module):
    """``conv_a -> bn_a -> conv_b -> bn_b``, registered as conv_a, bn_b, conv_b, bn_a (all width 4)."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.branchy = branchy
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))
        if self.branchy and bool(h.sum() > 1e9):  # data-dependent control flow: fx cannot trace it
            h = -h
        return self.head(h.mean((2, 3)))


def test_traced_pairs_follow_the_dataflow_not_registration_order():
    model = CrossRegistered()
    assert bn_pairs(model) == {"conv_a": "bn_a", "conv_b": "bn_b"}
    assert consumers(model) == {"conv_a": "conv_b"}


# --- untraceable: module order only where no other layer has the width ----------------------------
class ParallelBranches(nn.Module):
    """Two parallel conv -> bn branches of equal width, registered conv_a, conv_b, bn_a, bn_b."""

    def __init__(self, branchy: bool = True) -> None:
        super().__init__()
        self.branchy = branchy
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))
        return -y if self.branchy and bool(y.sum() > 1e9) else y


def test_parallel_branches_traced_pair_each_conv_with_its_own_batchnorm():
    assert bn_pairs(ParallelBranches(branchy=False)) == {"conv_a": "bn_a", "conv_b": "bn_b"}


def test_untraceable_parallel_branches_are_ambiguous_not_paired_by_module_order():
    # was: bn_pairs() == {"conv_b": "bn_a"} -- bn_a is the leaf after conv_b in registration order
    model = ParallelBranches()
    with pytest.warns(UserWarning, match=r"ParallelBranches.forward cannot be traced by torch.fx"):
        links = channel_links(model)
    assert dict(links.bn) == {}
    assert set(links.ambiguous["bn"]) == {"conv_a", "conv_b"}
    params = {"conv_b.weight": model.conv_b.weight}
    with pytest.raises(PrunelabError) as info:
        quietly(get_criterion("slimming"), model, params)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot tell which layer feeds 'bn_a'")
    assert "'conv_a', 'conv_b' all have its channels" in message and message.endswith("or exclude 'conv_b'")


def test_untraceable_cross_registered_batchnorm_is_ambiguous():
    model = CrossRegistered(branchy=True)
    links = quietly(channel_links, model)
    assert dict(links.bn) == {}  # was {"conv_a": "bn_b", "conv_b": "bn_a"}: both wrong
    assert set(links.ambiguous["bn"]) == {"conv_a", "conv_b"}


class ParallelMLP(nn.Module):
    """``out_a(fc_a(x)) + out_b(fc_b(x))`` registered fc_a, fc_b, out_a, out_b, with control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.out_a, self.out_b = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out_a(torch.relu(self.fc_a(x))) + self.out_b(torch.relu(self.fc_b(x)))
        return -y if bool(y.sum() > 1e9) else y


def test_untraceable_consumer_by_module_order_is_ambiguous_for_regression():
    # was: consumers() == {"fc_b": "out_a"} and regression reconstructed the wrong layer
    model = ParallelMLP()
    assert quietly(consumers, model) == {}
    with pytest.raises(PrunelabError) as info:
        quietly(regression_channel_prune, model, "fc_b", None, data_for((4,)), 3)
    assert "\n" not in str(info.value) and str(info.value).startswith("cannot tell which layer feeds 'out_a'")
    result = quietly(regression_channel_prune, model, "fc_b", "out_b", data_for((4,)), 3)  # explicit: fine
    assert result.consumer == "out_b" and int(result.keep.sum()) == 3


class WithUntraceableBlock(nn.Module):
    """A traceable root (ParallelBranches' layers) plus a submodule fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ParallelBranches()
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        return self.bn_a(self.conv_a(h)) + self.bn_b(self.conv_b(h))


def test_an_untraceable_submodule_does_not_send_the_whole_model_to_module_order():
    # was: symbolic_trace failed on the block, so every pair came from module order
    # ({"block.conv_b": "block.bn_a", "conv_b": "bn_a"})
    with pytest.warns(UserWarning, match="module 'block' cannot be traced"):
        links = channel_links(WithUntraceableBlock())
    assert dict(links.bn) == {"conv_a": "bn_a", "conv_b": "bn_b"}
    assert set(links.ambiguous["bn"]) == {"block.conv_a", "block.conv_b"}


# --- a layer called twice with different partners -------------------------------------------------
class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(2 * x))


def test_a_layer_whose_calls_disagree_on_its_batchnorm_raises_one_line():
    # was: silently unpaired, scored by |w| with a warning that it has no following BatchNorm
    model = SharedConv()
    assert bn_pairs(model) == {}
    with pytest.raises(PrunelabError) as info:
        get_criterion("slimming")(model, {"conv.weight": model.conv.weight})
    assert str(info.value) == ("layer 'conv' is called more than once in forward and its calls disagree on its "
                               "BatchNorm ('bn1', 'bn2'); exclude 'conv' or call it once")


# --- one scoring pass traces the model once -----------------------------------------------------
class UntraceableChain(nn.Module):
    """``conv1 -> bn1 -> conv2 -> bn2 -> conv3 -> bn3 -> head`` (widths 4, 6, 8) with control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        h = self.relu3(self.bn3(self.conv3(h)))
        if bool(h.sum() > 1e9):  # data-dependent control flow: fx cannot trace it
            h = -h
        return self.head(h.mean((2, 3)))


def counting_traces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the tracer channel links use; returns the (growing) list of calls."""
    calls: list[int] = []
    real = links_module.trace_model

    def counted(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(links_module, "trace_model", counted)
    return calls


def link_warnings(fn, *args, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught if str(w.message).startswith("channel links:")]


@pytest.mark.parametrize("criterion", ["slimming", "regression"])
def test_a_score_over_several_layers_traces_and_warns_once(monkeypatch, criterion):
    model = UntraceableChain()
    calls = counting_traces(monkeypatch)
    params = dict(model.named_parameters())
    data = data_for((3, 5, 5)) if criterion == "regression" else None
    scores, warned = link_warnings(get_criterion(criterion), model, params, data)
    assert len(calls) == 1 and len(warned) == 1
    assert "UntraceableChain.forward cannot be traced by torch.fx" in warned[0]
    assert set(scores) == set(params)


def test_untraceable_chain_links_by_module_order():
    links, warned = link_warnings(channel_links, UntraceableChain())
    assert dict(links.bn) == {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}
    assert dict(links.consumer) == {"conv1": "conv2", "conv2": "conv3"} and len(warned) == 1


def test_regression_channel_prune_with_given_links_does_not_trace_again(monkeypatch):
    model, data = UntraceableChain(), data_for((3, 5, 5))
    links = quietly(channel_links, model)
    calls = counting_traces(monkeypatch)
    results, warned = link_warnings(
        lambda: [regression_channel_prune(model, p, None, data, 2, links=links) for p in ("conv1", "conv2")]
    )
    assert calls == [] and warned == []
    assert [(r.producer, r.consumer) for r in results] == [("conv1", "conv2"), ("conv2", "conv3")]
    again = quietly(regression_channel_prune, model, "conv1", None, data, 2)
    assert len(calls) == 1 and torch.equal(again.keep, results[0].keep)


# --- relu_after: the ReLU APoZ counts zeros at ----------------------------------------------------
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)  # a residual add is not a bias add


def relu_of(model: nn.Module, layer: str) -> str | None:
    from prunelab.materialise.tracing import trace_model

    graph, _, _ = trace_model(model)
    node = next(n for n in graph.graph.nodes if n.op == "call_module" and n.target == layer)
    found = links_module.relu_after(node, dict(model.named_modules()))
    return None if found is None else found.name


@pytest.mark.parametrize(("model", "layer", "relu"), [
    (nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Dropout(), nn.ReLU()), "0", "_3"),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Identity(), nn.ReLU6()), "0", "_3"),
    (nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(1), nn.ReLU()), "0", None),  # pooling moves values
    (nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh(), nn.ReLU()), "0", None),
    (nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.ReLU()), "0", None),
    (Residual(), "conv", None),
])
def test_relu_after_passes_only_value_preserving_single_user_ops(model, layer, relu):
    assert relu_of(model, layer) == relu
