"""Structured shrink edge cases: size-dependent sums, uncuttable depthwise inputs, shared units, avg-pool padding.

Each shrunk model is compared to the masked model on inputs of a *different* size than
the example input it was planned with, so a fold that only holds for the example's size
fails here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise.shrink import plan_shrink, shrink_model, silence_pruned_channels_

TOL = 1e-5


def drop_rows(weight: torch.Tensor, drop: list[int]) -> torch.Tensor:
    """A channel / neuron mask pruning rows ``drop`` of ``weight``."""
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[drop] = False
    return mask


@torch.no_grad()
def max_error(model: nn.Module, shrunk: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    reference = MaskSet(masks).apply_(copy.deepcopy(model)).eval()
    expected, got = reference(x), shrunk.eval()(x)
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


# --- 1. a sum over T / HxW ---------------------------------------------------------------------
class SumPool(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.sum(1)  # (B, T, C) -> (B, C)


class SumOverTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.pool = SumPool()
        self.o = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4) -> (B, 2)
        return self.o(self.pool(torch.relu(self.a(x))))


class SumOverSpace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 5, 1)
        self.o = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 2)
        return self.o(torch.sum(torch.sigmoid(self.c(x)), dim=(2, 3)))


def test_sum_of_a_nonzero_pruned_constant_is_reported_naming_op_and_module():
    torch.manual_seed(0)
    model = SumOverTime().eval()
    with torch.no_grad():
        model.a.bias.fill_(1.0)  # the pruned neuron carries relu(1) = 1 at every step
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    plan = plan_shrink(model, masks, torch.randn(2, 3, 4))
    assert plan.problems == (
        "pruned channels of 'a.weight' are summed over dim(s) (1,) by call_method .sum() at node 'sum_1' "
        "(module 'pool') with nonzero constant value (up to 1); the sum grows with the input's size, so no bias "
        "absorbs it for every size -- call silence_pruned_channels_(model, masks, example_input) first, use mean() "
        "instead, or exclude those layers from pruning",
    )
    assert plan.problem_kinds == ("constant",)
    with pytest.raises(PrunelabError, match=r"summed over dim\(s\) \(1,\)"):
        shrink_model(model, masks, torch.randn(2, 3, 4))

    model = SumOverSpace().eval()
    masks = {"c.weight": drop_rows(model.c.weight, [0, 3])}  # sigmoid(b) is never 0
    plan = plan_shrink(model, masks, torch.randn(2, 3, 4, 4))
    assert len(plan.problems) == 1
    assert "'c.weight' are summed over dim(s) (2, 3) by call_function torch.sum at node 'sum_1'" in plan.problems[0]


def test_sum_of_a_zero_pruned_constant_shrinks_exactly_for_every_length():
    torch.manual_seed(1)
    model = SumOverTime().eval()
    with torch.no_grad():
        model.a.bias.fill_(1.0)
        model.a.bias[1] = -1.0  # relu(-1) = 0: the pruned neuron is exactly 0
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 4))
    assert shrunk.a.out_features == 5 and shrunk.o.in_features == 5
    for steps in (1, 3, 7, 20):
        assert max_error(model, shrunk, masks, torch.randn(3, steps, 4)) <= TOL

    model = SumOverTime().eval()
    with torch.no_grad():
        model.a.bias.fill_(1.0)
    silence_pruned_channels_(model, masks, torch.randn(2, 3, 4))  # the documented way out
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 4))
    assert max_error(model, shrunk, masks, torch.randn(2, 7, 4)) <= TOL


# --- 2. a depthwise conv whose input channels cannot be cut ------------------------------------
class DepthwiseOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pw(torch.relu(self.dw(x))).mean((2, 3)))


class DepthwiseAfterBarrier(DepthwiseOnInput):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.roll(self.stem(x), 1, dims=1)  # shrink does not model roll: a barrier
        return self.fc(self.pw(torch.relu(self.dw(h))).mean((2, 3)))


class DepthwiseOnConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(7, 7, 3, groups=7)
        self.pw = nn.Conv2d(7, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, torch.relu(self.c(x))], dim=1)  # input channels 0..2 cannot be cut
        return self.pw(self.dw(h)).mean((2, 3))


@pytest.mark.parametrize("net", [DepthwiseOnInput, DepthwiseAfterBarrier])
def test_depthwise_conv_on_uncuttable_channels_keeps_its_rows_and_says_so(net):
    torch.manual_seed(2)
    model = net().eval()
    masks = {"dw.weight": drop_rows(model.dw.weight, [1])}
    plan = plan_shrink(model, masks, torch.randn(2, 4, 8, 8))
    assert plan.ok, plan.problems
    group = next(g for g in plan.groups if "dw.weight" in g.masks)
    assert (group.channels, group.kept) == (4, 4)
    assert group.note.startswith("kept whole: depthwise conv 'dw' channels 0..3 read input channels that cannot be cut")
    assert "dw" not in plan.cuts and "pw" not in plan.cuts
    for verify in (True, False):
        shrunk = shrink_model(model, masks, torch.randn(2, 4, 8, 8), verify=verify)
        assert shrunk.dw.groups == shrunk.dw.out_channels == shrunk.pw.in_channels == 4
        assert max_error(model, shrunk, masks, torch.randn(3, 4, 11, 9)) <= TOL


def test_depthwise_conv_on_a_concat_cuts_only_the_cuttable_part():
    torch.manual_seed(3)
    model = DepthwiseOnConcat().eval()
    masks = {"dw.weight": drop_rows(model.dw.weight, [1, 5]), "c.weight": drop_rows(model.c.weight, [2])}
    plan = plan_shrink(model, masks, torch.randn(2, 3, 6, 6))
    assert plan.ok, plan.problems
    notes = [g.note for g in plan.groups if g.note]
    assert notes == ["kept whole: depthwise conv 'dw' channels 0..2 read input channels that cannot be cut (the model "
                     "input or the output of an op shrink does not model), so its rows for them stay (as zeros)"]
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 6, 6))
    assert shrunk.c.out_channels == 3 and shrunk.dw.out_channels == shrunk.dw.groups == shrunk.pw.in_channels == 6
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 9, 10)) <= TOL


class SharedDepthwise(nn.Module):
    """One depthwise conv and one BatchNorm applied to two branches with separate consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.bn = nn.BatchNorm2d(4)
        self.oa, self.ob = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = self.oa(self.bn(self.dw(self.a(x)))).mean((2, 3))
        yb = self.ob(self.bn(self.dw(self.b(x)))).mean((2, 3))
        return ya + yb


def test_depthwise_conv_and_batchnorm_called_twice_cut_one_channel_set():
    torch.manual_seed(4)
    model = SharedDepthwise().eval()
    model.bn.running_mean.uniform_(-1, 1)
    x, other = torch.randn(2, 3, 7, 7), torch.randn(3, 3, 10, 8)
    # only one branch pruned: the other keeps every channel, so nothing of the shared layers is cut
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    shrunk = shrink_model(model, masks, x)
    assert shrunk.dw.out_channels == shrunk.bn.num_features == shrunk.a.out_channels == 4
    assert max_error(model, shrunk, masks, other) <= TOL
    # both branches pruned alike: one cut for both calls
    masks = {"a.weight": drop_rows(model.a.weight, [1]), "b.weight": drop_rows(model.b.weight, [1])}
    shrunk = shrink_model(model, masks, x)
    assert shrunk.dw.out_channels == shrunk.bn.num_features == shrunk.a.out_channels == shrunk.ob.in_channels == 3
    assert max_error(model, shrunk, masks, other) <= TOL


def test_batchnorm_also_called_on_the_model_input_is_kept_whole():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.o = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.bn(x) + 0) + self.o(self.bn(self.a(x)))

    torch.manual_seed(5)
    model = Net().eval()
    masks = {"a.weight": drop_rows(model.a.weight, [0])}
    plan = plan_shrink(model, masks, torch.randn(2, 3, 4, 4))
    assert plan.ok, plan.problems
    assert any(g.note == "kept whole: module 'bn' is also called on channels that cannot be cut" for g in plan.groups)
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 4, 4))
    assert shrunk.bn.num_features == 3
    assert max_error(model, shrunk, masks, torch.randn(1, 3, 6, 5)) <= TOL


# --- 3. an attention unit called twice -----------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, _ = x.shape
        hd = self.q_proj.out_features // self.num_heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.num_heads, hd).transpose(1, 2)  # (B, heads, T, hd)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(b, t, -1))


class SharedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(5, 8), Attention(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x))
        h = h + self.attn(h)
        h = h + self.attn(h)  # the same unit again
        return self.head(h)


def test_attention_unit_called_twice_with_pruned_inputs_is_reported():
    torch.manual_seed(6)
    model = SharedAttention().eval()
    with torch.no_grad():
        model.inp.bias.fill_(1.0)  # the pruned residual channel carries gelu(1) != 0
    masks = {"inp.weight": drop_rows(model.inp.weight, [6]), "attn.out_proj.weight": drop_rows(model.attn.out_proj.weight, [6])}
    plan = plan_shrink(model, masks, torch.randn(2, 3, 5))
    assert plan.problems == (
        "attention unit 'attn' is called 2 times in forward and its input channels are pruned by 'inp.weight', "
        "'attn.out_proj.weight'; a shared unit cannot be shrunk -- exclude the layers feeding it from pruning",
    )
    with pytest.raises(PrunelabError, match="attention unit 'attn' is called 2 times"):
        shrink_model(model, masks, torch.randn(2, 3, 5), verify=False)


def test_heads_of_an_attention_unit_called_twice_are_cut_once():
    torch.manual_seed(7)
    model = SharedAttention().eval()
    with torch.no_grad():
        model.attn.v_proj.bias.uniform_(0.5, 1.5)  # a removed head outputs this bias: folded into out_proj once
    rows = drop_rows(model.attn.q_proj.weight, [4, 5, 6, 7])  # drop head 1
    masks = {f"attn.{p}.weight": rows.clone() for p in ("q_proj", "k_proj", "v_proj")}
    plan = plan_shrink(model, masks, torch.randn(2, 3, 5))
    assert plan.ok, plan.problems
    heads = [g for g in plan.groups if any("num_heads" in m for m in g.members)]
    assert len(heads) == 1 and heads[0].members == ("attn heads: q_proj/k_proj/v_proj rows, out_proj inputs, num_heads",)
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 5))
    assert shrunk.attn.num_heads == 1 and shrunk.attn.out_proj.in_features == 4
    assert max_error(model, shrunk, masks, torch.randn(3, 6, 5)) <= TOL


# --- 4. functional average pools ---------------------------------------------------------------
class FunctionalPool(nn.Module):
    def __init__(self, pool) -> None:
        super().__init__()
        self.c, self.o, self.pool = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.pool(F.relu(self.c(x)))).mean((2, 3))


def _plan_with_nonzero_constants(pool):
    model = FunctionalPool(pool).eval()
    with torch.no_grad():
        model.c.bias.fill_(0.5)  # pruned channels carry relu(0.5) = 0.5
    masks = {"c.weight": drop_rows(model.c.weight, [1, 2])}
    return model, masks, plan_shrink(model, masks, torch.randn(2, 3, 4, 4))


EXACT_POOLS = {
    "no padding": lambda x: F.avg_pool2d(x, 2),
    "keyword padding 0": lambda x: F.avg_pool2d(x, kernel_size=2, stride=1, padding=0),
    "padding not counted": lambda x: F.avg_pool2d(x, 3, 1, 1, False, False),
    "padding not counted (keyword)": lambda x: F.avg_pool2d(x, 3, stride=1, padding=(1, 1), count_include_pad=False),
    "module, no padding": nn.AvgPool2d(2),
}
INEXACT_POOLS = {
    "positional padding": lambda x: F.avg_pool2d(x, 3, 1, 1),
    "keyword padding": lambda x: F.avg_pool2d(x, 3, stride=1, padding=(0, 1)),
    "divisor_override": lambda x: F.avg_pool2d(x, 2, divisor_override=3),
    "module, divisor_override": nn.AvgPool2d(2, divisor_override=3),
    "module, padding": nn.AvgPool2d(3, 1, 1),
}


@pytest.mark.parametrize("pool", EXACT_POOLS.values(), ids=EXACT_POOLS.keys())
def test_average_pool_without_counted_padding_passes_constants(pool):
    torch.manual_seed(8)
    model, masks, plan = _plan_with_nonzero_constants(pool)
    assert plan.ok, plan.problems
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 4, 4))
    assert shrunk.c.out_channels == 6 and shrunk.o.in_channels == 6
    assert max_error(model, shrunk, masks, torch.randn(3, 3, 6, 8)) <= TOL


@pytest.mark.parametrize("pool", INEXACT_POOLS.values(), ids=INEXACT_POOLS.keys())
def test_average_pool_with_counted_padding_or_divisor_needs_zero_constants(pool):
    torch.manual_seed(9)
    model, masks, plan = _plan_with_nonzero_constants(pool)
    assert len(plan.problems) == 1 and plan.problem_kinds == ("constant",)
    assert "pruned channels of 'c.weight' reach an average pool that pads with zeros or overrides its divisor" in plan.problems[0]


# --- an example input the model cannot run ------------------------------------------------------
class WrongWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x))


def test_example_input_the_model_cannot_run_names_node_and_real_error_without_a_traceback(capsys):
    # torch's ShapeProp printed a full traceback to stderr and the message quoted its wrapper
    # ("ShapeProp error for: node=... meta=...") instead of the model's own error
    model = WrongWidth()
    with pytest.raises(PrunelabError) as info:
        plan_shrink(model, {"a.weight": drop_rows(model.a.weight, [1])}, torch.randn(2, 4))
    message = str(info.value)
    assert "\n" not in message and "node 'c'" in message and "Linear 'c'" in message
    assert "mat1 and mat2 shapes cannot be multiplied" in message and "ShapeProp error" not in message
    assert "Traceback" not in capsys.readouterr().err


# --- a cut layer's tensors used outside its own call ----------------------------------------
class ReadsWeight(nn.Module):
    """``fc -> relu -> out``, plus a use of ``fc``'s (or ``out``'s) tensors outside their calls."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 2)
        y = self.out(torch.relu(self.bn(self.fc(x))))
        if self.use == "F.linear":
            return y + F.linear(x, self.fc.weight, self.fc.bias)[:, :2]
        if self.use == "matmul":
            return y + (x @ self.fc.weight.t())[:, 4:]
        if self.use == "sum":
            return y * self.fc.weight.sum()
        if self.use == "bn buffer":
            return y + self.bn.running_mean[:2]
        if self.use == "consumer":  # out's input columns are cut: its weight changes too
            return y + self.out.weight.sum(1)
        return y


OUTSIDE_USES = {
    "F.linear": ("call_function torch._C._nn.linear at node 'linear'", "fc.weight", "fc"),
    "matmul": ("call_method .t() at node 't'", "fc.weight", "fc"),
    "sum": ("call_method .sum() at node 'sum_1'", "fc.weight", "fc"),
    "bn buffer": ("call_function operator.getitem at node 'getitem'", "bn.running_mean", "bn"),
    "consumer": ("call_method .sum() at node 'sum_1'", "out.weight", "out"),
}


@pytest.mark.parametrize("use", OUTSIDE_USES, ids=OUTSIDE_USES)
def test_a_cut_layers_tensor_read_outside_its_call_is_reported_before_cutting(use):
    # was: planned as fine, cut, and caught only by the final output check (or a shape error)
    torch.manual_seed(10)
    model = ReadsWeight(use).eval()
    masks = {"fc.weight": drop_rows(model.fc.weight, [1])}
    op, tensor, layer = OUTSIDE_USES[use]
    expected = (f"{op} reads '{tensor}' outside a call of layer '{layer}': shrink cannot cut a layer whose tensors "
                "the forward uses itself; exclude 'fc.weight' from pruning")
    plan = plan_shrink(model, masks, torch.randn(3, 4))
    assert plan.problems == (expected,) and plan.problem_kinds == ("op",)
    assert not plan.cuts  # the pinned channels stay: nothing is planned to be cut
    with pytest.raises(PrunelabError) as info:
        shrink_model(model, masks, torch.randn(3, 4))
    assert str(info.value) == expected


@pytest.mark.parametrize("use", OUTSIDE_USES, ids=OUTSIDE_USES)
def test_reading_the_tensors_of_a_layer_that_is_not_cut_is_fine(use):
    torch.manual_seed(11)
    model = ReadsWeight(use).eval()
    masks = {"out.weight": torch.ones_like(model.out.weight, dtype=torch.bool)}
    assert plan_shrink(model, masks, torch.randn(3, 4)).ok


class TiedLayers(nn.Module):
    """Two branches ``a -> out`` and ``b -> out2``; ``b`` shares ``a``'s weight (or is ``a`` under a second name)."""

    def __init__(self, alias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        if alias:
            self.b = self.a
        else:
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
        self.out = nn.Linear(4, 2)
        self.out2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x))) + self.out2(torch.relu(self.b(x)))


@pytest.mark.parametrize("alias", [False, True], ids=["tied weight", "second name"])
def test_a_cut_layer_sharing_its_weight_with_another_module_is_reported(alias):
    # was: a cut replaced 'a' only, silently untying it from 'b' (or leaving the alias 'b' uncut)
    torch.manual_seed(12)
    model = TiedLayers(alias).eval()
    masks = {"a.weight": drop_rows(model.a.weight, [2])}
    plan = plan_shrink(model, masks, torch.randn(3, 4))
    assert len(plan.problems) == 1 and plan.problem_kinds == ("op",)
    assert plan.problems[0].startswith("'a.weight' is also 'b.weight' (a tied tensor, or a second name of module 'a')")
    assert plan.problems[0].endswith("; exclude 'a.weight' from pruning")
