"""Structured shrink: shrunk outputs equal the masked model's, coupled layers cut together."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.bench.models import build_model
from prunelab.bench.row_transformer import SelfAttention
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise.shrink import (
    plan_shrink,
    shrink_model,
    silence_pruned_channels_,
)
from prunelab.materialise.spec import load_shrunk, save_shrunk


TOL = 1e-5


# --- helpers -------------------------------------------------------------------------------
def row_mask(weight: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """A channel / neuron mask keeping rows ``keep`` of ``weight``."""
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[keep] = True
    return mask


def masks_for(model: nn.Module, keep: dict[str, list[int]]) -> MaskSet:
    params = dict(model.named_parameters())
    return MaskSet({name: row_mask(params[name], rows) for name, rows in keep.items()})


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


@torch.no_grad()
def masked_output(model: nn.Module, masks: MaskSet, x: torch.Tensor) -> torch.Tensor:
    reference = masks.apply_(copy.deepcopy(model)).eval()
    return reference(x)


@torch.no_grad()
def check_equal(model: nn.Module, masks: MaskSet, x: torch.Tensor) -> nn.Module:
    shrunk = shrink_model(model, masks, x[:2])
    expected = masked_output(model, masks, x)
    got = shrunk.eval()(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= TOL
    return shrunk


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- models --------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(x))  # (B, 16)
        x = F.gelu(self.fc2(x))  # (B, 12)
        return self.fc3(x)  # (B, 4)


class ConvNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> flatten -> Linear."""

    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=padding)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * (4 + 2 * padding) ** 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 8, 6, 6)
        x = torch.relu(self.bn2(self.conv2(x)))  # (B, 6, 4, 4)
        return self.fc(x.flatten(1))  # (B, 5)


class ResBlockNet(nn.Module):
    """stem conv-bn-relu, one residual block conv-bn-relu-conv-bn + identity, pool, fc."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        pad = kernel // 2
        self.stem = nn.Conv2d(3, 8, kernel, padding=pad)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, kernel, padding=pad)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, kernel, padding=pad)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))  # (B, 8, H, W)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (B, 8, H, W)
        x = F.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, 5)


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)  # (B, 10, 8, 8)
        return self.fc(F.relu(self.c(y)).view(x.size(0), -1))  # (B, 3)


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.pw1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        x = self.pw2(x).mean((2, 3))  # (B, 6)
        return self.fc(x)


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = SelfAttention(16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)))  # (B, T, 3)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.gate = Gate()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(self.fc1(x)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if x.sum() > 0:
            x = -x
        return self.fc2(x)


class FixedView(ConvNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.view(-1, 96))


class Block2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.conv1(x), 1, dims=1)


class RollNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block2 = Block2()
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.block2(x)).sum((2, 3))


def images(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- equality with the masked model ----------------------------------------------------------
def test_mlp_linear_relu_linear_and_exact_parameter_count():
    torch.manual_seed(0)
    model = MLP()
    masks = masks_for(model, {"fc1.weight": [0, 2, 3, 5, 7, 8, 11, 12, 14, 15], "fc2.weight": [1, 4, 6, 7, 9, 10]})
    shrunk = check_equal(model, masks, torch.randn(32, 8))
    assert (shrunk.fc1.in_features, shrunk.fc1.out_features) == (8, 10)
    assert (shrunk.fc2.in_features, shrunk.fc2.out_features) == (10, 6)
    assert (shrunk.fc3.in_features, shrunk.fc3.out_features) == (6, 4)
    removed = (6 * 8 + 6) + (12 * 16 + 12 - 6 * 10 - 6) + (4 * 12 - 4 * 6)
    assert n_params(model) - n_params(shrunk) == removed
    assert type(shrunk) is MLP


def test_conv_bn_relu_conv_flatten_linear_folds_constants():
    torch.manual_seed(1)
    model = randomise_bn(ConvNet())
    masks = masks_for(model, {"conv1.weight": [0, 2, 3, 6, 7], "conv2.weight": [1, 3, 4]})
    shrunk = check_equal(model, masks, images(6, 8))
    assert shrunk.conv1.out_channels == 5 and shrunk.bn1.num_features == 5 and shrunk.conv2.in_channels == 5
    assert shrunk.conv2.out_channels == 3 and shrunk.bn2.running_var.shape == (3,)
    assert shrunk.fc.in_features == 3 * 4 * 4


def test_lenet5_from_the_zoo():
    torch.manual_seed(2)
    model = build_model("lenet5", (1, 28, 28), 10)
    masks = masks_for(model, {"conv1.weight": list(range(0, 20, 2)), "conv2.weight": list(range(0, 50, 3)),
                              "fc1.weight": list(range(0, 500, 4))})
    shrunk = check_equal(model, masks, torch.randn(4, 1, 28, 28))
    assert (shrunk.conv1.out_channels, shrunk.conv2.in_channels, shrunk.conv2.out_channels) == (10, 10, 17)
    assert (shrunk.fc1.in_features, shrunk.fc1.out_features, shrunk.fc2.in_features) == (17 * 16, 125, 125)


def test_padded_conv_needs_silenced_constants():
    torch.manual_seed(3)
    model = randomise_bn(ConvNet(padding=1))
    masks = masks_for(model, {"conv1.weight": [0, 1, 4, 5]})
    plan = plan_shrink(model, masks, images(2, 8))
    assert not plan.ok and "zero-padded conv 'conv2'" in plan.problems[0] and "'conv1.weight'" in plan.problems[0]
    with pytest.raises(PrunelabError, match="silence_pruned_channels_"):
        shrink_model(model, masks, images(2, 8))
    silence_pruned_channels_(model, masks, images(2, 8))
    check_equal(model, masks, images(4, 8))


def test_residual_block_with_agreeing_masks():
    torch.manual_seed(4)
    model = randomise_bn(ResBlockNet(kernel=1))  # 1x1 convs: constants fold exactly through the add
    kept = [0, 2, 3, 6]
    masks = masks_for(model, {"stem.weight": kept, "conv2.weight": kept, "conv1.weight": [1, 2, 5]})
    shrunk = check_equal(model, masks, images(4, 8))
    assert shrunk.stem.out_channels == shrunk.conv2.out_channels == shrunk.bn2.num_features == 4
    assert shrunk.conv1.in_channels == 4 and shrunk.conv1.out_channels == 3 and shrunk.fc.in_features == 4


def test_residual_block_3x3_after_silencing():
    torch.manual_seed(5)
    model = randomise_bn(ResBlockNet(kernel=3))
    kept = [1, 2, 4, 5, 7]
    masks = masks_for(model, {"stem.weight": kept, "conv2.weight": kept, "conv1.weight": [0, 3, 4, 6]})
    silence_pruned_channels_(model, masks, images(2, 8))
    shrunk = check_equal(model, masks, images(4, 8))
    assert shrunk.stem.out_channels == 5 and shrunk.conv1.out_channels == 4


def test_residual_group_keeps_the_union_of_its_masks():
    torch.manual_seed(6)
    model = randomise_bn(ResBlockNet(kernel=1))
    masks = masks_for(model, {"stem.weight": [0, 1, 2, 3, 4], "conv2.weight": [2, 3, 4, 5, 6]})
    plan = plan_shrink(model, masks, images(2, 8))
    group = next(g for g in plan.groups if "stem.weight rows, stem.bias" in g.members)
    assert (group.channels, group.kept) == (8, 7)
    assert set(group.masks) == {"stem.weight", "conv2.weight"}
    assert any(m.startswith("conv2.weight rows") for m in group.members)
    shrunk = check_equal(model, masks, images(4, 8))
    assert shrunk.stem.out_channels == shrunk.conv2.out_channels == 7


def test_concat_of_two_conv_branches():
    torch.manual_seed(7)
    model = CatNet()
    masks = masks_for(model, {"a.weight": [0, 3], "b.weight": [1, 2, 5], "c.weight": [0, 1, 4]})
    shrunk = check_equal(model, masks, images(4, 8))
    assert (shrunk.a.out_channels, shrunk.b.out_channels, shrunk.c.in_channels) == (2, 3, 5)
    assert shrunk.fc.in_features == 3 * 8 * 8
    plan = plan_shrink(model, masks, images(1, 8))
    members = {g.masks: g.members for g in plan.groups if g.masks}
    assert "c.weight inputs[0:4]" in members[("a.weight",)]
    assert "c.weight inputs[4:10]" in members[("b.weight",)]


def test_depthwise_conv_cut_with_its_producer():
    torch.manual_seed(8)
    model = randomise_bn(DepthwiseNet())
    kept = [0, 1, 3, 6, 7]
    masks = masks_for(model, {"pw1.weight": kept, "dw.weight": kept, "pw2.weight": [0, 2, 3, 5]})
    shrunk = check_equal(model, masks, images(4, 8))
    assert shrunk.dw.groups == shrunk.dw.in_channels == shrunk.dw.out_channels == 5
    assert shrunk.bn1.num_features == shrunk.bn2.num_features == 5 and shrunk.pw2.in_channels == 5


def test_attention_heads_removed_and_num_heads_updated():
    torch.manual_seed(9)
    model = AttnNet()
    heads = [0, 2]  # keep heads 0 and 2 of 4 (head_dim 4)
    rows = [h * 4 + j for h in heads for j in range(4)]
    masks = masks_for(model, {f"attn.{p}.weight": rows for p in ("q_proj", "k_proj", "v_proj")})
    shrunk = check_equal(model, masks, torch.randn(3, 5, 6))
    assert shrunk.attn.num_heads == 2 and model.attn.num_heads == 4
    assert shrunk.attn.q_proj.out_features == 8 and shrunk.attn.out_proj.in_features == 8
    plan = plan_shrink(model, masks, torch.randn(1, 5, 6))
    assert any(g.kept == 2 and g.channels == 4 and "num_heads" in g.members[0] for g in plan.groups)


# --- plan and errors -------------------------------------------------------------------------
def test_plan_lists_coupled_groups():
    model = randomise_bn(ConvNet())
    masks = masks_for(model, {"conv1.weight": [0, 1, 2]})
    plan = plan_shrink(model, masks, images(1, 8))
    assert plan.ok, plan.problems
    group = plan.groups[0]
    assert (group.channels, group.kept, group.masks) == (8, 3, ("conv1.weight",))
    assert group.members == ("conv1.weight rows, conv1.bias", "bn1 (weight, bias, running_mean, running_var)[0:8]",
                             "conv2.weight inputs[0:8]")
    fc_group = next(g for g in plan.groups if "conv2.weight rows, conv2.bias" in g.members)
    assert "fc.weight inputs[0:96]" in fc_group.members and fc_group.kept == 6
    assert "keeps 3 of 8 channels" in plan.describe()
    assert set(plan.cuts) == {"conv1", "bn1", "conv2"}


def test_unstructured_mask_is_rejected_naming_the_layer():
    model = MLP()
    mask = torch.ones(16, 8, dtype=torch.bool)
    mask[3, :4] = False
    with pytest.raises(PrunelabError, match=r"mask of 'fc1.weight' is not a neuron mask: row 3 keeps 4 of 8 weights"):
        shrink_model(model, {"fc1.weight": mask}, torch.randn(2, 8))


def test_untraceable_root_forward_is_an_error_naming_the_op():
    with pytest.raises(PrunelabError, match=r"cannot trace Untraceable .*if x.sum\(\) > 0"):
        plan_shrink(Untraceable(), {}, torch.randn(2, 8))


def test_untraceable_submodule_is_named_when_pruning_reaches_it():
    model = GatedMLP()
    plan = plan_shrink(model, {}, torch.randn(2, 8))
    assert plan.ok  # the gate is kept whole: nothing pruned reaches it
    masks = masks_for(model, {"fc1.weight": list(range(8))})
    with pytest.raises(PrunelabError, match=r"'gate'.*could not trace.*exclude 'fc1.weight' from pruning"):
        shrink_model(model, masks, torch.randn(2, 8))


def test_unsupported_op_named_with_node_and_module():
    model = RollNet()
    masks = masks_for(model, {"block2.conv1.weight": [0, 1, 2, 3]})
    plan = plan_shrink(model, masks, images(1, 8))
    expected = ("call_function torch.roll at node 'roll' (module 'block2'): cannot propagate channel pruning; "
                "exclude 'block2.conv1.weight' from pruning")
    assert plan.problems == (expected,)


def test_hard_coded_reshape_is_reported():
    model = FixedView()
    plan = plan_shrink(model, masks_for(model, {"conv2.weight": [0, 1]}), images(1, 8))
    assert len(plan.problems) == 1 and "reshape with a fixed size at node 'view'" in plan.problems[0]
    assert plan_shrink(model, masks_for(model, {"conv1.weight": [0, 1]}), images(1, 8)).ok


def test_pruning_the_output_layer_is_an_error():
    model = MLP()
    masks = masks_for(model, {"fc3.weight": [0, 1]})
    with pytest.raises(PrunelabError, match=r"'fc3.weight' prunes 2 of 4 rows .*model's output.*keep_last='dense'"):
        shrink_model(model, masks, torch.randn(2, 8))


def test_partial_heads_and_multihead_attention_are_reported():
    model = AttnNet()
    masks = masks_for(model, {"attn.v_proj.weight": [0, 1, 2, 4, 5, 6, 7]})
    plan = plan_shrink(model, masks, torch.randn(1, 5, 6))
    assert "not a head mask: head 0 keeps 3 of 4 rows" in plan.problems[0]

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.mha, self.out = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.out(self.mha(h, h, h)[0])

    model = Wrap()
    plan = plan_shrink(model, masks_for(model, {"fc.weight": [0, 1, 2, 3]}), torch.randn(1, 3, 4))
    assert "nn.MultiheadAttention is not supported" in plan.problems[0] and "'mha'" in plan.problems[0]


def test_original_model_is_not_modified():
    torch.manual_seed(10)
    model = randomise_bn(ResBlockNet(kernel=1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = masks_for(model, {"conv1.weight": [0, 1, 2]})
    shrink_model(model, masks, images(2, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert model.conv1.out_channels == 8


# --- save / load -------------------------------------------------------------------------------
def test_save_load_round_trip_zoo_and_class(tmp_path):
    torch.manual_seed(11)
    lenet = build_model("lenet5", (1, 28, 28), 10)
    masks = masks_for(lenet, {"conv1.weight": [1, 4, 5, 9], "fc1.weight": list(range(100))})
    shrunk = shrink_model(lenet, masks, torch.randn(1, 1, 28, 28)).eval()
    save_shrunk(tmp_path / "lenet", shrunk, (1, 1, 28, 28), {"model": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10})
    loaded = load_shrunk(tmp_path / "lenet").eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk(x))

    model = AttnNet()
    rows = [h * 4 + j for h in (1, 3) for j in range(4)]
    masks = masks_for(model, {f"attn.{p}.weight": rows for p in ("q_proj", "k_proj", "v_proj")} | {"embed.weight": [0, 1]})
    shrunk = shrink_model(model, masks, torch.randn(1, 5, 6)).eval()
    save_shrunk(tmp_path / "attn", shrunk, (1, 5, 6), {"note": "toy"})
    loaded = load_shrunk(tmp_path / "attn").eval()
    assert loaded.attn.num_heads == 2
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk(x))
    with pytest.raises(PrunelabError, match="refusing to replace"):
        (tmp_path / "attn" / "other.txt").write_text("x")
        save_shrunk(tmp_path / "attn", shrunk, (1, 5, 6), {})
