"""Review regressions for structured shrink: in-place ops, unbatched convs, clamp bounds, specs, state on error."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fake_timer import FakeTimer
from test_shrink_edge_cases import TOL, drop_rows, max_error  # the shared mask and error helpers
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise.pooling import speed_up_pooling_
from prunelab.materialise.shrink import plan_shrink, shrink_model, silence_pruned_channels_
from prunelab.materialise.spec import load_shrunk, save_shrunk

# --- in-place ops: later readers of the operand see the result ---------------------------------
class InplaceModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.act(h)  # h itself is now relu(h)
        return self.b(h)


class InplaceFunction(InplaceModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        F.relu(h, inplace=True)
        return self.b(h)


class InplaceChain(InplaceModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.relu_().add_(2.0)  # h is relu(h) + 2
        return self.b(h)


@pytest.mark.parametrize("cls", [InplaceModule, InplaceFunction, InplaceChain])
def test_an_inplace_op_changes_the_pruned_constant_its_operand_carries_later(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        model.a.bias.fill_(-1.0)  # pruned neurons carry -1 before the op, relu(-1) (+ 2) after it
    masks = {"a.weight": drop_rows(model.a.weight, [1, 2])}
    x = torch.randn(3, 4)
    assert plan_shrink(model, masks, x).ok
    shrunk = shrink_model(model, masks, x, verify=False)  # the plan alone must be right, not only the check
    assert shrunk.a.out_features == 4 and shrunk.b.in_features == 4
    assert max_error(model, shrunk, masks, torch.randn(5, 4)) <= TOL


class InplaceThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.flatten(2).relu_()  # changes h through a view
        return self.b(h).mean((2, 3))


class InplaceOnAView(InplaceThroughView):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(6 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.a(x).flatten(1)
        v.relu_()  # nobody reads the conv output again
        return self.b(v)


def test_an_inplace_op_through_a_view_of_a_tensor_read_again_is_reported():
    torch.manual_seed(0)
    model = InplaceThroughView().eval()
    with torch.no_grad():
        model.a.bias.fill_(-1.0)
    masks = {"a.weight": drop_rows(model.a.weight, [1, 2])}
    plan = plan_shrink(model, masks, torch.randn(2, 3, 4, 4))
    assert plan.problems == (
        "pruned channels of 'a.weight' are changed in place by call_method .relu_() at node 'relu_' through a view of "
        "'a', which is read again later; make the op out of place (e.g. inplace=False) or exclude those layers from "
        "pruning",
    )


def test_an_inplace_op_on_a_view_nobody_else_reads_shrinks_exactly():
    torch.manual_seed(0)
    model = InplaceOnAView().eval()
    with torch.no_grad():
        model.a.bias.fill_(-1.0)
    masks = {"a.weight": drop_rows(model.a.weight, [1, 2])}
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 4, 4), verify=False)
    assert shrunk.b.in_features == 4 * 16
    assert max_error(model, shrunk, masks, torch.randn(3, 3, 4, 4)) <= TOL


# --- unbatched conv inputs: the channel dim is 0 ---------------------------------------------------
class UnbatchedMeanOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 1)
        self.o = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (3, 4, 5) -> (2,)
        return self.o(self.c(x).mean(0).flatten())


class UnbatchedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 6, 1)
        self.p = nn.MaxPool1d(2)
        self.o = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (3, L) -> (2,) or (B, 3, L) -> (B, 2)
        return self.o(self.p(torch.relu(self.c(x))).mean(-1))


def test_a_mean_over_the_channels_of_an_unbatched_conv_is_reported_not_a_crash():
    torch.manual_seed(0)
    model = UnbatchedMeanOverChannels().eval()
    plan = plan_shrink(model, {"c.weight": drop_rows(model.c.weight, [1, 2])}, torch.randn(3, 4, 5))
    assert plan.problems == (
        "call_method .mean() at node 'mean': the reduction covers the pruned channel dim; exclude 'c.weight' from "
        "pruning",
    )


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8)])
def test_unbatched_and_batched_conv_pool_shrink_exactly(shape):
    torch.manual_seed(0)
    model = UnbatchedPool().eval()
    with torch.no_grad():
        model.c.bias.fill_(0.5)
    masks = {"c.weight": drop_rows(model.c.weight, [1, 2])}
    shrunk = shrink_model(model, masks, torch.randn(shape))
    assert shrunk.c.out_channels == 4 and shrunk.o.in_features == 4
    assert max_error(model, shrunk, masks, torch.randn(shape[:-1] + (12,))) <= TOL


# --- clamp with a tensor bound ---------------------------------------------------------------------
class ClampByBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.clamp(self.a(x), max=self.b(x)))


class ClampByInput(ClampByBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x).clamp(min=x[:, :1]))


def test_clamp_by_another_branch_couples_both_branches():
    torch.manual_seed(0)
    model = ClampByBranch().eval()
    x = torch.randn(3, 4)
    one = {"a.weight": drop_rows(model.a.weight, [1])}  # b keeps channel 1, so a must keep it too
    shrunk = shrink_model(model, one, x, verify=False)
    assert shrunk.a.out_features == 6 and shrunk.c.in_features == 6
    assert max_error(model, shrunk, one, x) <= TOL
    both = {"a.weight": drop_rows(model.a.weight, [1]), "b.weight": drop_rows(model.b.weight, [1])}
    shrunk = shrink_model(model, both, x, verify=False)
    assert shrunk.a.out_features == shrunk.b.out_features == shrunk.c.in_features == 5
    assert max_error(model, shrunk, both, torch.randn(5, 4)) <= TOL


def test_clamp_by_a_tensor_broadcast_over_pruned_channels_is_reported():
    model = ClampByInput().eval()
    plan = plan_shrink(model, {"a.weight": drop_rows(model.a.weight, [1])}, torch.randn(3, 4))
    assert plan.problems == (
        "call_method .clamp() at node 'clamp': tensor 'getitem' is broadcast over the pruned channels; "
        "exclude 'a.weight' from pruning",
    )


# --- BatchNorm(affine=False) in float64 --------------------------------------------------------------
class Float64Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.o = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.bn(self.c(x)).mean((2, 3)))


def test_batchnorm_without_affine_keeps_its_dtype_through_shrink_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = Float64Net().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2.0)
    masks = {"c.weight": drop_rows(model.c.weight, [1])}
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    shrunk = shrink_model(model, masks, x)
    assert shrunk.bn.running_mean.dtype == torch.float64 and shrunk.bn.num_features == 5
    save_shrunk(tmp_path / "m", shrunk, x.shape[1:], {})
    loaded = load_shrunk(tmp_path / "m").eval()
    assert loaded.bn.running_mean.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk.eval()(x))


# --- spec files: damaged records and bad arguments are one-line errors ---------------------------
class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _saved(tmp_path) -> tuple[nn.Module, object]:
    model = SmallMLP().eval()
    shrunk = shrink_model(model, {"a.weight": drop_rows(model.a.weight, [1])}, torch.randn(2, 4))
    folder = save_shrunk(tmp_path / "m", shrunk, (4,), {})
    return shrunk, folder


@pytest.mark.parametrize("damage, expected", [
    (lambda layers: layers["a"].pop("in_features"),
     "architecture.json records layer 'a' as Linear with arguments it cannot be built from (TypeError: "),
    (lambda layers: layers["a"].update(dtype="nonsense"),
     "architecture.json records layer 'a' as Linear with arguments it cannot be built from (ValueError: dtype "
     "'nonsense' is not a torch dtype)"),
    (lambda layers: layers.update(b={"type": "attention", "num_heads": 2}),
     "architecture.json records 'b' as an attention unit with num_heads=2 but the rebuilt model has Linear there"),
])
def test_a_damaged_layer_record_is_a_one_line_error(tmp_path, damage, expected):
    _, folder = _saved(tmp_path)
    path = folder / "architecture.json"
    record = json.loads(path.read_text())
    damage(record["layers"])
    path.write_text(json.dumps(record))
    with pytest.raises(PrunelabError) as info:
        load_shrunk(folder)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_save_shrunk_checks_the_shape_and_meta_before_writing(tmp_path):
    shrunk, _ = _saved(tmp_path)
    with pytest.raises(PrunelabError, match="example_input_shape must be a sequence of non-negative ints, got 'abc'"):
        save_shrunk(tmp_path / "x", shrunk, "abc", {})
    with pytest.raises(PrunelabError, match="meta must be a dict, got NoneType"):
        save_shrunk(tmp_path / "y", shrunk, (4,), None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_plan_shrink_rejects_masks_that_are_not_a_mapping():
    model = SmallMLP()
    with pytest.raises(PrunelabError, match="masks must map 'layer.weight' to a bool keep-mask, got list"):
        plan_shrink(model, [model.a.weight > 0], torch.randn(2, 4))


# --- state on error --------------------------------------------------------------------------------
def test_silence_pruned_channels_changes_nothing_when_it_refuses():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"0.weight": drop_rows(model[0].weight, [1])}
    with pytest.raises(PrunelabError, match="call_module LayerNorm '1' at node '_1': cannot propagate"):
        silence_pruned_channels_(model, masks, torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_speed_up_pooling_restores_each_modules_own_training_flag():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2))
    model.train()
    model[1].eval()  # a frozen BatchNorm in a model that trains
    timer = FakeTimer({("2", "separable"): 1.0, ("2", "native"): 2.0})
    report = speed_up_pooling_(model, {1: torch.randn(1, 1, 8, 8)}, timer)
    assert report.choices() == {"2": "separable"}
    assert model.training and model[0].training and not model[1].training and model[2].training


# --- attention units -------------------------------------------------------------------------------
class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from prunelab.bench.row_transformer import SelfAttention

        self.embed = nn.Linear(6, 16)
        self.attn = SelfAttention(16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6) -> (B, T, 3)
        h = self.embed(x)
        return self.head(h + self.attn(h))


def test_pruning_every_head_of_an_attention_unit_is_reported_by_the_dry_run():
    model = AttentionNet().eval()
    none = torch.zeros(16, 16, dtype=torch.bool)
    masks = {f"attn.{p}.weight": none.clone() for p in ("q_proj", "k_proj", "v_proj")}
    plan = plan_shrink(model, masks, torch.randn(2, 5, 6))
    assert plan.problems == (
        "masks of 'attn.q_proj.weight', 'attn.k_proj.weight', 'attn.v_proj.weight' prune all 4 heads of attention "
        "unit 'attn'; an attention unit needs at least one head -- keep one, or remove the unit from the model yourself",
    )


# --- a value read from the input's shape at run time -----------------------------------------------
class DivideByLength(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4) -> (B, T, 2)
        t = x.shape[1]
        return self.b(self.a(x) / t)


class AddLength(DivideByLength):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + x.size(1))


def test_a_pruned_constant_scaled_by_the_inputs_length_is_reported():
    model = DivideByLength().eval()
    with torch.no_grad():
        model.a.bias.fill_(0.5)  # the pruned neuron carries 0.5 / T: T = 1 in the example, not in general
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    plan = plan_shrink(model, masks, torch.randn(2, 1, 4))
    assert plan.problems == (
        "pruned channels of 'a.weight' are combined with 'getitem', a value computed from the input at run time, at "
        "node 'truediv' (call_function operator.truediv); their value then depends on the input, so no bias absorbs "
        "it -- call silence_pruned_channels_(model, masks, example_input) first (for a product) or exclude those "
        "layers from pruning",
    )
    assert plan.problem_kinds == ("constant",)
    silence_pruned_channels_(model, masks, torch.randn(2, 1, 4))  # 0 / T is 0 for every T
    shrunk = shrink_model(model, masks, torch.randn(2, 1, 4))
    assert max_error(model, shrunk, masks, torch.randn(3, 7, 4)) <= TOL


def test_a_pruned_channel_plus_the_inputs_length_is_reported_even_when_silenced():
    model = AddLength().eval()
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    silence_pruned_channels_(model, masks, torch.randn(2, 3, 4))
    plan = plan_shrink(model, masks, torch.randn(2, 3, 4))
    assert len(plan.problems) == 1 and "combined with 'size', a value computed from the input" in plan.problems[0]


# --- global RNG --------------------------------------------------------------------------------------
class ConvBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.o = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.bn(self.c(x))).mean((2, 3)))


def test_shrink_and_load_leave_the_global_rng_alone(tmp_path):
    model = ConvBNNet().eval()
    masks = {"c.weight": drop_rows(model.c.weight, [1, 4])}
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(123)
    shrunk = shrink_model(model, masks, x)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(123)))
    assert max_error(model, shrunk, masks, torch.randn(3, 3, 5, 5)) <= TOL
    save_shrunk(tmp_path / "m", shrunk, x.shape[1:], {})
    torch.manual_seed(7)
    loaded = load_shrunk(tmp_path / "m").eval()
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk.eval()(x))


def test_frozen_parameters_stay_frozen_in_the_shrunk_layers():
    model = ConvBNNet().eval()
    for param in (model.c.bias, model.bn.weight, model.bn.bias, model.o.weight):
        param.requires_grad_(False)
    shrunk = shrink_model(model, {"c.weight": drop_rows(model.c.weight, [1, 4])}, torch.randn(2, 3, 4, 4))
    assert shrunk.c.out_channels == shrunk.bn.num_features == shrunk.o.in_features == 4
    frozen = {name for name, p in shrunk.named_parameters() if not p.requires_grad}
    assert frozen == {"c.bias", "bn.weight", "bn.bias", "o.weight"}


# --- layers and functions called with keyword inputs --------------------------------------------
class KeywordLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(input=torch.relu(self.bn(input=self.a(input=x))))


class KeywordFunctions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.mean(input=F.relu(input=self.a(x)), dim=(2, 3), keepdim=True)  # (B, 6, 1, 1)
        return self.b(torch.flatten(input=h, start_dim=1))


@pytest.mark.parametrize("cls, shape", [(KeywordLayers, (3, 4)), (KeywordFunctions, (3, 3, 4, 4))])
def test_inputs_passed_by_keyword_are_followed(cls, shape):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        model.a.bias.fill_(0.3)
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    shrunk = shrink_model(model, masks, torch.randn(shape), verify=False)
    assert shrunk.a.weight.shape[0] == 5 and shrunk.b.in_features == 5
    assert max_error(model, shrunk, masks, torch.randn(shape)) <= TOL


def test_a_damaged_zoo_builder_or_zoo_meta_is_a_one_line_error(tmp_path):
    from prunelab.bench.models import build_model

    model = build_model("digits_mlp", (64,), 10).eval()
    first = next(n for n, p in model.named_parameters() if n.endswith("weight"))
    masks = {first: drop_rows(dict(model.named_parameters())[first], [1])}
    shrunk = shrink_model(model, masks, torch.randn(2, 64))
    with pytest.raises(PrunelabError, match="meta names zoo model 'digits_mlp' with input_shape 'abc'"):
        save_shrunk(tmp_path / "bad", shrunk, (64,), {"model": "digits_mlp", "input_shape": "abc", "num_classes": 10})
    folder = save_shrunk(tmp_path / "m", shrunk, (64,), {"model": "digits_mlp", "input_shape": [64], "num_classes": 10})
    path = folder / "architecture.json"
    record = json.loads(path.read_text())
    del record["builder"]["input_shape"]
    path.write_text(json.dumps(record))
    with pytest.raises(PrunelabError, match="names zoo model 'digits_mlp' without a valid input_shape and num_classes"):
        load_shrunk(folder)


class Pool2dOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 6, 1)
        self.p = nn.MaxPool2d(2)  # on (B, 6, L) it pools over the channels and L
        self.o = nn.Linear(3 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8) -> (B, 2)
        return self.o(self.p(self.c(x)).flatten(1))


def test_a_2d_pool_over_the_channels_of_a_3d_tensor_is_reported():
    model = Pool2dOverChannels().eval()
    plan = plan_shrink(model, {"c.weight": drop_rows(model.c.weight, [1, 2])}, torch.randn(2, 3, 8))
    assert plan.problems == (
        "call_module MaxPool2d 'p' at node 'p': cannot propagate channel pruning; exclude 'c.weight' from pruning",
    )


class ScaleByWidth(DivideByLength):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 2)
        h = self.a(x)
        return self.b(h * h.size(-1) ** -0.5)  # the cut changes h.size(-1), so every kept channel too


class ScaleByLength(DivideByLength):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4) -> (B, 2)
        h = self.a(x)
        return self.b(h.mean(1) * h.size(1))  # T, not the channel count


def test_a_value_read_from_the_pruned_channel_dim_is_reported():
    model = ScaleByWidth().eval()
    with torch.no_grad():
        model.a.bias.zero_()  # even with zero constants, the kept channels change
    plan = plan_shrink(model, {"a.weight": drop_rows(model.a.weight, [1])}, torch.randn(3, 4))
    assert plan.problems == (
        "call_function operator.mul at node 'mul' uses the number of channels of 'a', which the cut of 'a.weight' "
        "changes; use a constant instead or exclude those layers from pruning",
    )


def test_a_value_read_from_another_dim_with_zero_constants_shrinks_exactly():
    model = ScaleByLength().eval()
    with torch.no_grad():
        model.a.bias.zero_()
    masks = {"a.weight": drop_rows(model.a.weight, [1])}
    shrunk = shrink_model(model, masks, torch.randn(2, 5, 4), verify=False)
    assert shrunk.b.in_features == 5
    assert max_error(model, shrunk, masks, torch.randn(3, 7, 4)) <= TOL
