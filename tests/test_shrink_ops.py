"""Structured shrink through channel-preserving ops (upsample, pad) and transposed convolutions.

Tiny U-Net-like models (conv -> pool -> conv -> upsample / transposed conv -> concat with
the skip -> conv) and pad + conv models.  Every shrunk model is compared with the masked
model on inputs of a *different* size than the example it was planned with; parameter
counts are computed by hand in each test.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab.errors import PrunelabError
from prunelab.materialise.shrink import plan_shrink, shrink_model, silence_pruned_channels_
from prunelab.materialise.spec import load_shrunk, save_shrunk
from prunelab.structure import Channel
from test_shrink import randomise_bn  # shared shrink-test helpers
from test_shrink_edge_cases import drop_rows, max_error

TOL = 1e-5


# --- helpers -------------------------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def one_line_error(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> str:
    with pytest.raises(PrunelabError) as info:
        shrink_model(model, masks, x)
    message = str(info.value)
    assert "\n" not in message
    return message


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


# --- 1. upsample / interpolate -------------------------------------------------------------
class UpsampleUNet(nn.Module):
    """enc1 3x3 -> BN -> ReLU (skip) -> pool -> enc2 1x1 -> ReLU -> upsample -> cat(up, skip) -> dec 1x1."""

    def __init__(self, up: nn.Module | dict | None = None) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.enc2 = nn.Conv2d(6, 8, 1)
        self.up = up if isinstance(up, nn.Module) else nn.Upsample(scale_factor=2)
        self.interp = up if isinstance(up, dict) else None  # F.interpolate keywords, to the skip's size
        self.dec = nn.Conv2d(14, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 4, H, W)
        s = F.relu(self.bn1(self.enc1(x)))  # (B, 6, H, W)
        h = F.relu(self.enc2(self.pool(s)))  # (B, 8, H/2, W/2)
        u = F.interpolate(h, size=s.shape[2:], **self.interp) if self.interp is not None else self.up(h)
        return self.dec(torch.cat([u, s], 1))  # (B, 14, H, W) -> (B, 4, H, W)


@pytest.mark.parametrize("up", [
    nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2, mode="bilinear"),
    nn.Upsample(scale_factor=2, mode="bicubic", align_corners=True), nn.UpsamplingNearest2d(scale_factor=2),
    nn.UpsamplingBilinear2d(scale_factor=2), {"mode": "nearest-exact"}, {"mode": "area"},
    {"mode": "bilinear", "antialias": True},
], ids=["nearest", "bilinear", "bicubic", "UpsamplingNearest2d", "UpsamplingBilinear2d", "F-nearest-exact", "F-area",
        "F-bilinear-antialias"])
def test_upsample_passes_channels_and_their_constants_in_a_unet(up):
    torch.manual_seed(0)
    model = randomise_bn(UpsampleUNet(up)).eval()
    masks = {"enc1.weight": drop_rows(model.enc1.weight, [0, 3]), "enc2.weight": drop_rows(model.enc2.weight, [1, 4, 6])}
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 8, 8))
    # the pruned channels are nonzero constants (BN shift, ReLU(bias)): exact only if the upsample keeps them
    assert max_error(model, shrunk, masks, torch.randn(3, 3, 12, 12)) <= TOL
    assert (shrunk.enc1.out_channels, shrunk.enc2.in_channels, shrunk.enc2.out_channels, shrunk.dec.in_channels) == (4, 4, 5, 9)
    # enc1 4*3*9+4, bn1 2*4, enc2 5*4+5, dec 4*(5+4)+4
    assert n_params(shrunk) == 112 + 8 + 25 + 40


def test_interpolate_over_the_pruned_channel_dim_is_a_one_line_error_naming_op_and_module():
    class Stretch(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return F.interpolate(h, scale_factor=2)  # (B, T, C) resamples C, the channels

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.stretch, self.o = nn.Linear(4, 6), Stretch(), nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.stretch(self.a(x)))

    model = Seq()
    message = one_line_error(model, {"a.weight": drop_rows(model.a.weight, [2])}, torch.randn(2, 3, 4))
    assert message == ("call_function torch.nn.functional.interpolate at node 'interpolate' (module 'stretch'): it "
                       "resamples the pruned channel dim; exclude 'a.weight' from pruning")


# --- 2. padding ----------------------------------------------------------------------------
class PadNet(nn.Module):
    """c 1x1 -> ReLU -> pad -> o 1x1 (a consumer without padding of its own)."""

    def __init__(self, pad: nn.Module | dict, bias: bool = True) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 1, bias=bias)
        self.pad = pad if isinstance(pad, nn.Module) else None
        self.fpad = pad if isinstance(pad, dict) else None  # F.pad keywords
        self.o = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        h = self.pad(h) if self.pad is not None else F.pad(h, **self.fpad)
        return self.o(h)


@pytest.mark.parametrize("pad", [
    nn.ReflectionPad2d(1), nn.ReplicationPad2d((1, 2, 0, 1)), nn.CircularPad2d(1),
    {"pad": (2, 1, 1, 0), "mode": "reflect"}, {"pad": (1, 1, 2, 0), "mode": "replicate"},
    {"pad": (-1, -1, 0, -2)},  # constant mode cropping only: nothing is filled
    {"pad": (0, -1, 0, 0, 0, 0)},  # a crop naming the channel dim with a zero pair
], ids=["ReflectionPad2d", "ReplicationPad2d", "CircularPad2d", "F-reflect", "F-replicate", "F-crop", "F-zero-pairs"])
def test_padding_that_copies_values_passes_nonzero_constants_exactly(pad):
    torch.manual_seed(1)
    model = PadNet(pad).eval()
    with torch.no_grad():
        model.c.bias.copy_(torch.linspace(0.2, 0.7, 6))  # ReLU(bias) > 0: every pruned channel is a nonzero constant
    masks = {"c.weight": drop_rows(model.c.weight, [0, 2, 5])}
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 6, 6))
    assert max_error(model, shrunk, masks, torch.randn(3, 3, 7, 9)) <= TOL
    assert n_params(shrunk) == (3 * 3 + 3) + (4 * 3 + 4)  # c: 3 rows of 3 + bias; o: 4 x 3 inputs + bias


@pytest.mark.parametrize("pad, op", [
    (nn.ZeroPad2d(1), "call_module ZeroPad2d 'pad' at node 'pad'"),
    (nn.ConstantPad2d((1, 0, 2, 0), 0.0), "call_module ConstantPad2d 'pad' at node 'pad'"),
    ({"pad": (1, 1, 1, 1)}, "call_function torch.nn.functional.pad at node 'pad'"),
])
def test_zero_padding_needs_zero_constants_and_shrinks_after_silencing(pad, op):
    torch.manual_seed(2)
    model = PadNet(pad).eval()
    with torch.no_grad():
        model.c.bias.copy_(torch.linspace(0.2, 0.7, 6))
    masks = {"c.weight": drop_rows(model.c.weight, [1, 4])}
    message = one_line_error(model, masks, torch.randn(2, 3, 5, 5))
    assert message.startswith(f"pruned channels of 'c.weight' are padded with zeros by {op} with nonzero constant "
                              "value (up to 0.6); the zero border makes them vary")
    silence_pruned_channels_(model, masks, torch.randn(2, 3, 5, 5))
    shrunk = shrink_model(model, masks, torch.randn(2, 3, 5, 5))
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 8, 6)) <= TOL
    assert n_params(shrunk) == (4 * 3 + 4) + (4 * 4 + 4)


def test_zero_padding_of_zero_constants_needs_no_silencing():
    torch.manual_seed(3)
    model = PadNet(nn.ZeroPad2d((1, 2, 3, 0)), bias=False).eval()  # pruned channels are ReLU(0) = 0
    masks = {"c.weight": drop_rows(model.c.weight, [0, 5])}
    shrunk = shrink_model(model, masks, torch.randn(1, 3, 4, 4))
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 6, 5)) <= TOL
    assert n_params(shrunk) == 4 * 3 + (4 * 4 + 4)


def test_padding_with_a_nonzero_value_is_refused_even_after_silencing():
    model = PadNet(nn.ConstantPad2d(1, 0.5)).eval()
    masks = {"c.weight": drop_rows(model.c.weight, [1])}
    x = torch.randn(2, 3, 4, 4)
    message = one_line_error(model, masks, x)
    assert message.startswith("pruned channels of 'c.weight' are padded with 0.5 by call_module ConstantPad2d 'pad' at "
                              "node 'pad' but carry other constant values")
    with pytest.raises(PrunelabError, match="are padded with 0.5"):
        silence_pruned_channels_(model, masks, x)  # a silenced channel is 0, not 0.5: silencing cannot help


def test_padding_with_a_value_equal_to_the_pruned_constant_is_exact():
    torch.manual_seed(4)
    model = PadNet(nn.ConstantPad2d(1, 0.25)).eval()
    with torch.no_grad():
        model.c.bias.fill_(0.25)  # every pruned channel is ReLU(0.25) = 0.25, the fill: it stays constant
    masks = {"c.weight": drop_rows(model.c.weight, [2, 3])}
    shrunk = shrink_model(model, masks, torch.randn(1, 3, 4, 4))
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 5, 7)) <= TOL


class ChannelPad(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.pad(h, (0, 0, 0, 0, 1, 1))  # pads dim 1, the channels


class ChannelPadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.block, self.o = nn.Conv2d(3, 6, 1), ChannelPad(), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.block(self.c(x)))


@pytest.mark.parametrize("model, expected", [
    (ChannelPadNet(), "call_function torch.nn.functional.pad at node 'pad' (module 'block'): it pads the pruned "
                      "channel dim 1 (pad=(0, 0, 0, 0, 1, 1)); pad only the spatial dims; exclude 'c.weight' from pruning"),
    (nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2), nn.Conv2d(2, 2, 1)),
     "call_module PixelShuffle '1' at node '_1': cannot propagate channel pruning; exclude '0.weight' from pruning"),
    (nn.Sequential(nn.Conv2d(3, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 2, 1)),
     "call_module ChannelShuffle '1' at node '_1': cannot propagate channel pruning; exclude '0.weight' from pruning"),
], ids=["pad-channels", "PixelShuffle", "ChannelShuffle"])
def test_ops_that_move_channels_are_one_line_errors_naming_op_and_module(model, expected):
    first = next(name for name, p in model.named_parameters() if p.dim() == 4)
    masks = {first: drop_rows(dict(model.named_parameters())[first], [1])}
    assert one_line_error(model, masks, torch.randn(1, 3, 4, 4)) == expected


@pytest.mark.parametrize("act", [nn.Hardshrink(0.3), nn.Softshrink(0.2), nn.Threshold(0.4, -0.5), F.logsigmoid,
                                 F.softsign, F.tanhshrink, lambda h: F.threshold(h, 0.1, 2.0)],
                         ids=["Hardshrink", "Softshrink", "Threshold", "logsigmoid", "softsign", "tanhshrink",
                              "F-threshold"])
def test_more_pointwise_activations_pass_their_constants(act):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.o = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)
            self.act = act if isinstance(act, nn.Module) else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c(x)
            return self.o(self.act(h) if self.act is not None else act(h))

    torch.manual_seed(5)
    model = Net().eval()
    with torch.no_grad():
        model.c.bias.copy_(torch.tensor([-1.0, 0.35, 0.5, -0.25, 1.5, 0.05]))  # both sides of every threshold
    masks = {"c.weight": drop_rows(model.c.weight, [0, 1, 3, 5])}
    shrunk = shrink_model(model, masks, torch.randn(1, 3, 3, 3))
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 5, 4)) <= TOL
    assert n_params(shrunk) == (2 * 3 + 2) + (2 * 2 + 2)


# --- 3. transposed convolutions --------------------------------------------------------------
class DeconvUNet(nn.Module):
    """enc1 -> BN -> ReLU (skip) -> pool -> enc2 1x1 -> ReLU -> up (transposed, k=2 s=2) -> pad -> cat -> dec 1x1."""

    def __init__(self, dims: int = 2, up_channels: int = 5, groups: int = 1) -> None:
        super().__init__()
        self.dims = dims
        self.enc1 = CONV[dims](3, 6, 3, padding=1)
        self.bn1 = BN[dims](6)
        self.pool = POOL[dims](2)
        self.enc2 = CONV[dims](6, 8, 1)
        self.up = CONVT[dims](8, up_channels, 2, stride=2, groups=groups)
        self.dec = CONV[dims](up_channels + 6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, *S) -> (B, 4, *S)
        s = F.relu(self.bn1(self.enc1(x)))  # (B, 6, *S)
        h = F.relu(self.enc2(self.pool(s)))  # (B, 8, *S/2)
        u = self.up(h)  # (B, up_channels, *2*(S//2))
        pad = []
        for d in range(self.dims + 1, 1, -1):  # pad odd sizes to the skip's, as U-Nets do (sizes known at run time)
            diff = s.size(d) - u.size(d)
            pad += [diff // 2, diff - diff // 2]
        return self.dec(torch.cat([F.pad(u, pad), s], 1))


def deconv_masks(model: DeconvUNet) -> dict[str, torch.Tensor]:
    """enc2 prunes rows 1, 3, 5; up prunes input slices 1, 3 (as the channel granularity does) and output slice 2."""
    w = model.up.weight  # (in=8, out=5, *k)
    channel = Channel()
    up = channel.from_groups(torch.tensor([i not in (1, 3) for i in range(8)]), tuple(w.shape)).clone()
    up[:, 2] = False  # output channel 2: weight dim 1
    return {"enc2.weight": drop_rows(model.enc2.weight, [1, 3, 5]), "up.weight": up}


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_transposed_conv_is_cut_as_consumer_and_producer(dims):
    torch.manual_seed(6)
    model = randomise_bn(DeconvUNet(dims)).eval()
    masks = deconv_masks(model)
    # the channel granularity groups a transposed conv's weight by dim 0: its *input* channels
    assert Channel().to_groups(model.up.weight).shape == (8, 5 * 2 ** dims)
    example = torch.randn(2, 3, *(4,) * dims)
    plan = plan_shrink(model, masks, example)
    described = plan.describe()
    assert "keeps 6 of 8 channels (masks: enc2.weight, up.weight): enc2.weight rows, enc2.bias; up.weight inputs[0:8]" \
        in described
    assert "keeps 4 of 5 channels (masks: up.weight): up.weight[:, o] (outputs), up.bias; dec.weight inputs[0:5]" in described
    silence_pruned_channels_(model, masks, example)  # the padded border of a pruned output channel (its bias) must be 0
    shrunk = shrink_model(model, masks, example)
    assert max_error(model, shrunk, masks, torch.randn(2, 3, *(5,) * dims)) <= TOL  # odd sizes: the pad is not empty
    # enc2 keeps rows 0, 2, 4, 5, 6, 7 (row 5: up still reads it); up keeps inputs of those and outputs 0, 1, 3, 4
    assert (shrunk.enc2.out_channels, shrunk.up.in_channels, shrunk.up.out_channels, shrunk.dec.in_channels) == (6, 6, 4, 10)
    assert torch.equal(shrunk.up.weight, model.up.weight.detach()[[0, 2, 4, 5, 6, 7]][:, [0, 1, 3, 4]])
    k = 3 ** dims
    # enc1 6*3*k+6, bn1 12, enc2 6*6+6, up 6*4*2^d+4, dec 4*10+4
    assert n_params(shrunk) == (18 * k + 6) + 12 + 42 + (24 * 2 ** dims + 4) + 44


def test_a_transposed_convs_pruned_output_channel_is_its_bias_folded_into_the_consumer():
    torch.manual_seed(7)
    model = randomise_bn(DeconvUNet()).eval()
    up = torch.ones_like(model.up.weight, dtype=torch.bool)
    up[:, [0, 4]] = False
    masks = {"up.weight": up}
    example = torch.randn(1, 3, 8, 8)  # even: the pad is empty, but the plan cannot know it: pads of bias must be 0
    assert "are padded with zeros by call_function torch.nn.functional.pad" in one_line_error(model, masks, example)

    class NoPad(DeconvUNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = F.relu(self.bn1(self.enc1(x)))
            return self.dec(torch.cat([self.up(F.relu(self.enc2(self.pool(s)))), s], 1))

    model = NoPad()
    model.load_state_dict(randomise_bn(DeconvUNet()).state_dict())
    model.eval()
    shrunk = shrink_model(model, masks, example)  # no silencing: the bias constant is folded into dec's bias
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 6, 10)) <= TOL
    assert (shrunk.up.in_channels, shrunk.up.out_channels, shrunk.dec.in_channels) == (8, 3, 9)
    assert n_params(shrunk) - n_params(model) == -(2 * 8 * 4 + 2) - 4 * 2  # up: 2 slices (8, 2, 2) + bias; dec: 2 columns


def test_a_channel_granularity_mask_on_a_transposed_conv_alone_votes_and_cuts_nothing():
    """Its pruned input slices are cut only where the producer prunes them too; alone, they stay as zeros."""
    torch.manual_seed(8)
    model = randomise_bn(DeconvUNet()).eval()
    shape = tuple(model.up.weight.shape)
    masks = {"up.weight": Channel().from_groups(torch.tensor([i % 2 == 0 for i in range(8)]), shape)}
    example = torch.randn(1, 3, 8, 8)
    plan = plan_shrink(model, masks, example)
    assert plan.ok and plan.cuts == {}
    assert "keeps 8 of 8 channels (masks: up.weight): enc2.weight rows" in plan.describe()
    # its mask prunes no output slice: the group of its outputs names no mask
    assert "keeps 5 of 5 channels (no masks): up.weight[:, o] (outputs), up.bias" in plan.describe()
    shrunk = shrink_model(model, masks, example)
    assert n_params(shrunk) == n_params(model) and not shrunk.up.weight[1::2].any()
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 7, 9)) <= TOL


def test_pruned_inputs_of_a_transposed_conv_with_nonzero_constants_need_silencing():
    torch.manual_seed(9)
    model = randomise_bn(DeconvUNet()).eval()
    masks = {"enc2.weight": drop_rows(model.enc2.weight, [0, 7])}
    with torch.no_grad():
        model.enc2.bias.fill_(0.5)  # ReLU(0.5): the transposed conv would spread it unevenly (one tap per 2x2 block)
    example = torch.randn(1, 3, 8, 8)
    assert one_line_error(model, masks, example).startswith(
        "pruned channels of 'enc2.weight' reach transposed conv 'up' with nonzero constant value act(bias)/BatchNorm "
        "shift (up to 0.5); a transposed conv with a kernel or stride above 1 spreads a constant unevenly")
    silence_pruned_channels_(model, masks, example)
    shrunk = shrink_model(model, masks, example)
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 9, 7)) <= TOL
    assert (shrunk.enc2.out_channels, shrunk.up.in_channels) == (6, 6)
    assert n_params(model) - n_params(shrunk) == (2 * 6 + 2) + 2 * 5 * 4  # enc2 2 rows + bias; up 2 slices (5, 2, 2)


@pytest.mark.parametrize("kwargs, folds", [
    ({"kernel_size": 1}, True), ({"kernel_size": 1, "padding": 1}, True),
    ({"kernel_size": 2}, False), ({"kernel_size": 1, "stride": 2}, False),
    ({"kernel_size": 1, "dilation": 2, "output_padding": 1}, False),
])
def test_a_transposed_conv_folds_constants_only_when_each_output_gets_one_tap(kwargs, folds):
    torch.manual_seed(10)
    up = nn.ConvTranspose2d(6, 3, **kwargs)
    # independent check of the rule: a constant input gives a constant output exactly when it folds
    with torch.no_grad():
        out = up(torch.full((1, 6, 5, 5), 0.7)) - up.bias.view(1, 3, 1, 1)
    assert bool((out.amax(dim=(2, 3)) - out.amin(dim=(2, 3)) < 1e-6).all()) == folds
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), up, nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(0.7)
    masks = {"0.weight": drop_rows(model[0].weight, [2, 3])}
    if not folds:
        assert "reach transposed conv '2' with nonzero constant value" in one_line_error(model, masks, torch.randn(1, 3, 4, 4))
        return
    shrunk = shrink_model(model, masks, torch.randn(1, 3, 4, 4))
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 6, 5)) <= TOL
    assert shrunk[2].in_channels == 4 and n_params(model) - n_params(shrunk) == 2 * (3 + 1) + 2 * 3


def test_a_depthwise_transposed_conv_is_cut_with_its_producer():
    torch.manual_seed(11)
    model = randomise_bn(DeconvUNet(up_channels=8, groups=8)).eval()
    masks = {"enc2.weight": drop_rows(model.enc2.weight, [0, 2, 5]),
             "up.weight": drop_rows(model.up.weight, [0, 2, 5])}  # (8, 1, 2, 2): rows are its channels
    example = torch.randn(1, 3, 8, 8)
    silence_pruned_channels_(model, masks, example)
    shrunk = shrink_model(model, masks, example)
    assert max_error(model, shrunk, masks, torch.randn(2, 3, 7, 10)) <= TOL
    assert (shrunk.up.in_channels, shrunk.up.out_channels, shrunk.up.groups, shrunk.dec.in_channels) == (5, 5, 5, 11)
    # enc2: 3 rows (6 + 1); up: 3 channels (4 + 1); dec: 3 columns of 4 rows
    assert n_params(model) - n_params(shrunk) == 3 * 7 + 3 * 5 + 3 * 4


def test_a_grouped_transposed_conv_and_a_partial_mask_are_one_line_errors():
    model = DeconvUNet(up_channels=6, groups=2).eval()
    masks = {"enc2.weight": drop_rows(model.enc2.weight, [1])}
    assert one_line_error(model, masks, torch.randn(1, 3, 4, 4)) == (
        "grouped conv 'up' (groups=2): cutting channels of a grouped convolution is not supported; exclude "
        "'enc2.weight' from pruning")
    model = DeconvUNet().eval()
    partial = torch.ones_like(model.up.weight, dtype=torch.bool)
    partial[3, 1, 0, 1] = False
    assert one_line_error(model, {"up.weight": partial}, torch.randn(1, 3, 4, 4)).startswith(
        "mask of 'up.weight' is not a channel mask of a transposed conv: weight[3, 1] keeps 3 of 4 weights")


# --- 4. save / load ------------------------------------------------------------------------
class DeconvSpecNet(nn.Module):
    """Transposed convs with output_padding, padding, dilation and groups, for the saved spec."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, dilation=1)
        self.grouped = nn.ConvTranspose2d(6, 4, 2, groups=2, bias=False)
        self.o = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.grouped(F.relu(self.up(F.relu(self.c(x))))))


def test_a_shrunk_transposed_conv_saves_and_loads(tmp_path):
    torch.manual_seed(12)
    model = DeconvSpecNet().eval()
    up = Channel().from_groups(torch.tensor([i not in (2, 6) for i in range(8)]), tuple(model.up.weight.shape))
    masks = {"c.weight": drop_rows(model.c.weight, [2, 6]), "up.weight": up}
    x = torch.randn(1, 3, 5, 5)
    shrunk = shrink_model(model, masks, x).eval()
    assert (shrunk.c.out_channels, shrunk.up.in_channels, shrunk.up.output_padding) == (6, 6, (1, 1))
    save_shrunk(tmp_path / "m", shrunk, x.shape[1:], {})
    layers = json.loads((tmp_path / "m" / "architecture.json").read_text())["layers"]
    assert layers["up"] == {"type": "ConvTranspose2d", "in_channels": 6, "out_channels": 6, "kernel_size": [3, 3],
                            "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": True,
                            "padding_mode": "zeros", "dtype": "float32", "output_padding": [1, 1]}
    assert layers["grouped"]["groups"] == 2 and layers["grouped"]["bias"] is False
    y = torch.randn(2, 3, 6, 7)
    for loaded in (load_shrunk(tmp_path / "m").eval(), prunelab.load(tmp_path / "m")):
        assert loaded.up.in_channels == 6 and loaded.grouped.groups == 2
        with torch.no_grad():
            assert torch.equal(loaded(y), shrunk(y))
    assert max_error(model, shrunk, masks, y) <= TOL
