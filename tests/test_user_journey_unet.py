"""A segmentation / autoencoder engineer's journey with their OWN U-Net, DCGAN-style generator and 1-D conv
autoencoder (README "Python API" and "Make it pay"): unstructured / N:M pruning including ConvTranspose weights,
channel pruning (l1 / taylor / slimming; uniform / global) -> shrink, save + fresh-process ``prunelab.load``,
``measure_model`` FLOPs of transposed convs, CSR / BSR / auto forms, Deep Compression, and the dry-run plan.

A transposed conv's weight is ``(in, out / groups, *k)``: its output channel ``o`` (groups=1) is ``weight[:, o]``.
Expected numbers come from brute-force loops and hand counts written here.  The tests that are not plain
round trips are regressions of bugs found on this journey (each was a strict xfail until fixed).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab import LayerRules, MaskSet, OneShot, PrunelabError, ScoreData, Sparsifier, materialise
from prunelab.compress import read_compressed, write_compressed
from prunelab.materialise.shrink import plan_shrink, shrink_model, silence_pruned_channels_
from prunelab.materialise.spec import save_shrunk
from prunelab.measure import measure_model

from fake_timer import FakeTimer

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = str(Path(__file__).resolve().parent)
SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- the user's own models (module level, no-arg constructors: save_shrunk records them) ---------------------
class UNet(nn.Module):
    """A two-level U-Net for (B, 1, 16, 16) -> (B, 2, 16, 16) logits.

    Down: max-pool and a strided conv; bottleneck: a depthwise conv; up: a ConvTranspose2d whose output is ADDED
    to the level-2 skip, then nn.Upsample whose output is CONCATENATED with the level-1 skip; a 1x1 head.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.enc2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down, self.bn3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn4 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.dec2, self.bn5 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1, self.bn6 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = F.relu(self.bn1(self.enc1(x)))                # (B, 8, 16, 16)
        s2 = F.relu(self.bn2(self.enc2(self.pool(s1))))    # (B, 16, 8, 8)
        b = F.relu(self.bn3(self.down(s2)))                # (B, 16, 4, 4)
        b = F.relu(self.bn4(self.dw(b)))                   # (B, 16, 4, 4)
        u2 = self.up2(b) + s2                              # (B, 16, 8, 8)  skip by addition
        d2 = F.relu(self.bn5(self.dec2(u2)))               # (B, 8, 8, 8)
        u1 = torch.cat([self.up1(d2), s1], dim=1)          # (B, 16, 16, 16)  skip by concatenation
        return self.head(F.relu(self.bn6(self.dec1(u1))))  # (B, 2, 16, 16)


class Generator(nn.Module):
    """DCGAN-style: z (B, 8, 1, 1) -> ConvT 4x4 -> BN -> ReLU -> ConvT s2 -> BN -> ReLU -> ConvT s2 -> tanh (B, 3, 16, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.t1, self.b1 = nn.ConvTranspose2d(8, 16, 4, 1, 0, bias=False), nn.BatchNorm2d(16)
        self.t2, self.b2 = nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.t3 = nn.ConvTranspose2d(8, 3, 4, 2, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.t1(z)))     # (B, 16, 4, 4)
        h = F.relu(self.b2(self.t2(h)))     # (B, 8, 8, 8)
        return torch.tanh(self.t3(h))       # (B, 3, 16, 16)


class AutoEncoder1d(nn.Module):
    """1-D: Conv1d -> BN -> ReLU (skip) -> strided Conv1d -> BN -> ReLU -> ConvTranspose1d -> ReLU, cat skip, 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.b1 = nn.Conv1d(2, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.e2, self.b2 = nn.Conv1d(8, 12, 4, stride=2, padding=1, bias=False), nn.BatchNorm1d(12)
        self.up = nn.ConvTranspose1d(12, 8, 2, stride=2)
        self.head = nn.Conv1d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.b1(self.e1(x)))                           # (B, 8, L)
        h = F.relu(self.b2(self.e2(s)))                           # (B, 12, L/2)
        return self.head(torch.cat([F.relu(self.up(h)), s], 1))  # (B, 2, L)


# --- helpers ----------------------------------------------------------------------------------------------
def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: the 8x8 digits upsampled to (N, 1, 16, 16), and a foreground segmentation (N, 16, 16)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(images, scale_factor=2, mode="nearest")  # (N, 1, 16, 16)
    return x, (x[:, 0] > 0.4).long()


def _signals(n: int = 8) -> torch.Tensor:
    """Two-channel 1-D signals (N, 2, 16): sines of different frequencies plus noise."""
    g = torch.Generator().manual_seed(5)
    t = torch.arange(16, dtype=torch.float32)
    freq = 0.2 + torch.rand(n, 2, 1, generator=g)
    return torch.sin(freq * t) + 0.1 * torch.randn(n, 2, 16, generator=g)


def _latents(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 8, 1, 1, generator=torch.Generator().manual_seed(6))


def _random_bn_(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a pruned channel's constant act(BN shift) is not 0."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model.eval()


def _built(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return _random_bn_(cls())


def _out_slice(module: nn.Module, tensor: torch.Tensor, o: int) -> torch.Tensor:
    """Brute force: the weights (or mask bits) of output channel ``o`` -- ``w[o]`` for a conv, ``w[:, o]`` for a
    groups=1 transposed conv."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        assert module.groups == 1
        return tensor[:, o]
    return tensor[o]


def _out_channels(module: nn.Module) -> int:
    return module.out_channels


def _kept(model: nn.Module, masks, name: str) -> set[int]:
    """Output channels of layer ``name`` whose mask keeps anything (brute force over channels)."""
    module = model.get_submodule(name)
    mask = masks[f"{name}.weight"]
    return {o for o in range(_out_channels(module)) if bool(_out_slice(module, mask, o).any())}


def _whole_channels(model: nn.Module, masks, name: str) -> bool:
    """Every output channel of ``name`` is kept or pruned whole."""
    module = model.get_submodule(name)
    mask = masks[f"{name}.weight"]
    return all(bool(_out_slice(module, mask, o).all()) or not bool(_out_slice(module, mask, o).any())
               for o in range(_out_channels(module)))


def _channel_l1(model: nn.Module, name: str) -> list[float]:
    module = model.get_submodule(name)
    return [float(_out_slice(module, module.weight.detach(), o).abs().sum()) for o in range(_out_channels(module))]


def _masked(model: nn.Module, masks) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    MaskSet(masks).apply_(ref)
    return ref


def _max_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _channel_masks(model: nn.Module, sparsity: float, *, criterion: str = "l1", allocation: str = "uniform",
                   data: ScoreData | None = None, exclude=(), keep_last: str | None = "dense") -> MaskSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # slimming's |w| fallback for a layer without a BN after it
        return Sparsifier(model, criterion=criterion, granularity="channel", allocation=allocation,
                          schedule=OneShot(sparsity), rules=LayerRules(keep_last=keep_last), exclude=exclude,
                          data=data).prepare().finalize()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unet_groups(model: UNet, masks) -> tuple[int, int, int, int, int]:
    """Kept channels of the five coupled groups, by the union rule: (c1, c2, c3, c5, c6).

    c1: enc1 (its channels go to enc2 and to dec1's concat offset 8); c2: enc2 + up2's outputs (the addition);
    c3: down + dw (depthwise: in = out); c5: dec2; c6: dec1."""
    c1 = len(_kept(model, masks, "enc1"))
    c2 = len(_kept(model, masks, "enc2") | _kept(model, masks, "up2"))
    c3 = len(_kept(model, masks, "down") | _kept(model, masks, "dw"))
    return c1, c2, c3, len(_kept(model, masks, "dec2")), len(_kept(model, masks, "dec1"))


def unet_params(c1: int, c2: int, c3: int, c5: int, c6: int) -> int:
    """By hand: weights of every conv / transposed conv + 2 per BN channel + up2's and head's biases."""
    weights = 9 * 1 * c1 + 9 * c1 * c2 + 9 * c2 * c3 + 9 * c3 + 4 * c3 * c2 + 9 * c2 * c5 + 9 * (c5 + c1) * c6 + c6 * 2
    bn = 2 * (c1 + c2 + c3 + c3 + c5 + c6)
    return weights + bn + c2 + 2


def unet_macs(c1: int, c2: int, c3: int, c5: int, c6: int) -> int:
    """By hand, per 16x16 sample: conv MACs = out * in/groups * k * H_out * W_out; the transposed conv up2's
    MACs = in * out/groups * kh * kw * H_in * W_in (4x4 input)."""
    return (c1 * 1 * 9 * 256 + c2 * c1 * 9 * 64 + c3 * c2 * 9 * 16 + c3 * 9 * 16
            + c3 * c2 * 4 * 16 + c5 * c2 * 9 * 64 + c6 * (c5 + c1) * 9 * 256 + 2 * c6 * 256)


def _added_biases(original: nn.Module, shrunk: nn.Module) -> int:
    """Biases the shrink gave to layers that had none (it folds constants of cut channels into them)."""
    return sum(shrunk.get_submodule(n).bias.numel() for n, m in original.named_modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.bias is None and shrunk.get_submodule(n).bias is not None)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (TESTS, SRC, os.environ.get("PYTHONPATH", "")) if p)}


# --- unstructured and N:M ---------------------------------------------------------------------------------
def test_unstructured_global_magnitude_hits_the_exact_count_including_the_conv_transpose():
    model = _built(UNet)
    weights = {n: p.detach().clone() for n, p in prunelab.prunable_parameters(model).items()}
    assert list(weights) == ["enc1.weight", "enc2.weight", "down.weight", "dw.weight", "up2.weight", "dec2.weight",
                             "dec1.weight", "head.weight"]
    total = sum(w.numel() for w in weights.values())
    assert total == 72 + 1152 + 2304 + 144 + 1024 + 1152 + 1152 + 16 == 7016
    pruned = round(0.7 * total)
    threshold = float(torch.sort(torch.cat([w.abs().flatten() for w in weights.values()])).values[pruned - 1])
    masks = Sparsifier(model, criterion="magnitude", granularity="unstructured", allocation="global",
                       schedule=OneShot(0.7)).prepare().finalize()
    stats = masks.stats()
    assert (stats.total, stats.kept) == (total, total - pruned)
    for name, w in weights.items():
        assert torch.equal(masks[name], w.abs() > threshold), name
    up2 = {layer.name: layer for layer in stats.layers}["up2.weight"]
    assert (up2.shape, up2.total, up2.kept) == ((16, 16, 2, 2), 1024, int((weights["up2.weight"].abs() > threshold).sum()))
    assert int((model.up2.weight == 0).sum()) == 1024 - up2.kept > 0  # the model holds the zeros
    cost = measure_model(model, torch.zeros(1, 1, 16, 16), masks)
    assert {l.name: l.weight_nonzeros for l in cost.layers}["up2"] == up2.kept


def test_unstructured_uniform_prunes_each_layer_by_its_own_magnitudes():
    model = _built(Generator)
    masks = Sparsifier(model, criterion="magnitude", granularity="unstructured", allocation="uniform",
                       schedule=OneShot(0.5)).prepare().finalize()
    for name, w in prunelab.prunable_parameters(model).items():
        mask, numel = masks[name], w.numel()
        assert int(mask.sum()) == numel - round(0.5 * numel), name  # 1024, 2048, 384 weights: exact halves
        assert bool((w.detach().abs()[~mask] == 0).all())  # the model holds the zeros ...
    original = _built(Generator)  # ... so compare against the original weights
    for name, w in prunelab.prunable_parameters(original).items():
        mask = masks[name]
        assert float(w.detach().abs()[mask].min()) > float(w.detach().abs()[~mask].max()), name  # no ties in floats


def test_two_four_covers_the_conv_transpose_with_exactly_half_kept():
    model = _built(UNet)
    # enc1 has 1 input channel and dw 1 input per group: no block of 4 fits; the rest, up2 included, is 2:4
    masks = Sparsifier(model, granularity="2:4", exclude=["enc1", "dw"]).update(0.5)
    assert "up2.weight" in masks and masks.stats().sparsity == 0.5
    assert int(masks["up2.weight"].sum()) == 512
    for name in ("enc2", "down", "dec2", "dec1", "head"):
        mask = masks[f"{name}.weight"]  # (O, I, kh, kw): blocks of 4 consecutive input channels
        blocks = mask.movedim(1, -1).reshape(-1, 4)
        assert bool((blocks.sum(1) == 2).all()), name


def test_two_four_on_a_conv_transpose_runs_along_its_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(), nn.Conv2d(6, 4, 1))
    masks = Sparsifier(model, granularity="2:4", exclude=["2"]).update(0.5)  # 8 input channels: two blocks of 4
    mask = masks["0.weight"]  # (in=8, out=6, 2, 2)
    blocks = mask.reshape(2, 4, 6, 2, 2).sum(dim=1)  # per (block of 4 inputs, output channel, kernel position)
    assert bool((blocks == 2).all())


# --- channel pruning -> shrink (the U-Net trained a little, as in the README loop) -------------------------
def test_trained_unet_channel_pruned_in_the_loop_shrinks_exactly_with_hand_counts():
    torch.manual_seed(0)
    x, y = _digits(64)
    model = UNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = Sparsifier(model, criterion="l1", granularity="channel", allocation="uniform",
                            schedule=prunelab.Cubic(0.5, start_step=0, num_updates=2, frequency=3),
                            rules=LayerRules(keep_last="dense")).prepare(opt)
    for step in range(8):
        batch = torch.arange(16 * step, 16 * step + 16) % x.shape[0]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
    masks = sparsifier.finalize()
    model.eval()
    for name in ("enc1", "enc2", "down", "dw", "up2", "dec2", "dec1"):
        assert _whole_channels(model, masks, name), name
    norms = _channel_l1(model, "up2")  # pruned channels are zeros now: l1 0 < any kept channel's l1
    assert all(norms[o] > 0 for o in _kept(model, masks, "up2"))
    assert all(norms[o] == 0 for o in set(range(16)) - _kept(model, masks, "up2"))
    assert abs(len(_kept(model, masks, "up2")) - 8) <= 1  # uniform 50%: half of 16 output channels, up to one group
    silence_pruned_channels_(model, masks, x[:8])  # padded convs after BN: the README's fix
    new = materialise(model, "shrink", masks=masks, example_input=x[:16])
    masked = _masked(model, masks)
    assert _max_error(new, masked, x) <= 1e-5
    c1, c2, c3, c5, c6 = unet_groups(model, masks)
    assert (c1, c2, c3, c5, c6) < (8, 16, 16, 8, 8)
    assert _params(new) == unet_params(c1, c2, c3, c5, c6) + _added_biases(model, new)
    assert _params(model) == unet_params(8, 16, 16, 8, 8) == 7178
    # the skips are cut consistently: addition (enc2 rows == up2 outputs == dec2/down inputs), concat (c5 + c1)
    assert new.enc2.out_channels == new.up2.out_channels == new.bn2.num_features == new.down.in_channels \
        == new.dec2.in_channels == c2
    assert new.down.out_channels == new.dw.groups == new.up2.in_channels == c3
    assert new.dec1.in_channels == c5 + c1 and new.dec1.out_channels == new.head.in_channels == c6
    # the transposed conv's kept weights are exactly the masked ones: rows = kept inputs, dim 1 = kept outputs
    ins = sorted(_kept(model, masks, "down") | _kept(model, masks, "dw"))
    outs = sorted(_kept(model, masks, "enc2") | _kept(model, masks, "up2"))
    assert torch.equal(new.up2.weight, masked.up2.weight[ins][:, outs])
    assert torch.equal(new.up2.bias, masked.up2.bias[outs])
    assert measure_model(model, x[:1]).dense_macs == unet_macs(8, 16, 16, 8, 8)
    assert measure_model(new, x[:1]).dense_macs == unet_macs(c1, c2, c3, c5, c6)


def _score_data(cls: type[nn.Module]) -> tuple[torch.Tensor, ScoreData]:
    if cls is UNet:
        x, y = _digits(16)
        return x, ScoreData([(x, y)])
    if cls is Generator:
        z = _latents()
        return z, ScoreData([(z, torch.zeros(8, 3, 16, 16))], loss_fn=F.mse_loss)
    s = _signals()
    return s, ScoreData([(s, s)], loss_fn=F.mse_loss)


@pytest.mark.parametrize("cls", [UNet, Generator, AutoEncoder1d])
@pytest.mark.parametrize("criterion,allocation", [("l1", "uniform"), ("l1", "global"), ("taylor", "uniform"),
                                                  ("slimming", "global")])
def test_channel_criteria_and_allocations_shrink_every_model_to_the_masked_model(cls, criterion, allocation):
    model = _built(cls)
    x, data = _score_data(cls)
    masks = _channel_masks(model, 0.5, criterion=criterion, allocation=allocation,
                           data=data if criterion == "taylor" else None)
    assert masks.stats().sparsity == pytest.approx(0.5, abs=0.06)
    silence_pruned_channels_(model, masks, x)
    new = materialise(model, "shrink", masks=masks, example_input=x)
    fresh = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))  # not the example input
    assert _max_error(new, _masked(model, masks), fresh) <= 1e-5
    assert _params(new) < _params(model)
    if cls is UNet:
        assert _params(new) == unet_params(*unet_groups(model, masks)) + _added_biases(model, new)
    elif cls is Generator:  # t1 (8 -> a, 4x4), t2 (a -> b, 4x4), t3 (b -> 3, 4x4) + bias, BN 2a + 2b
        a, b = len(_kept(model, masks, "t1")), len(_kept(model, masks, "t2"))
        assert (new.t1.out_channels, new.t2.in_channels, new.t2.out_channels, new.t3.in_channels) == (a, a, b, b)
        assert _params(new) == 8 * a * 16 + a * b * 16 + b * 3 * 16 + 3 + 2 * a + 2 * b
    else:  # e1 (2 -> c, 3), e2 (c -> d, 4), up (d -> u, 2) + bias, head (u + c -> 2) + bias, BN 2c + 2d
        c, d, u = (len(_kept(model, masks, n)) for n in ("e1", "e2", "up"))
        assert new.head.in_channels == u + c and new.up.in_channels == d
        assert _params(new) == 2 * c * 3 + c * d * 4 + d * u * 2 + u + (u + c) * 2 + 2 + 2 * c + 2 * d \
            + _added_biases(model, new)


def test_taylor_channel_mask_of_the_conv_transpose_matches_a_brute_force_reference():
    model = _built(UNet)
    x, y = _digits(16)
    ref = copy.deepcopy(model)
    loss = F.cross_entropy(ref(x), y)
    grad = torch.autograd.grad(loss, ref.up2.weight)[0]
    contribution = (ref.up2.weight.detach() * grad).abs()  # |w g| per weight (one batch)
    scores = [float(contribution[:, o].sum()) for o in range(16)]  # summed over output channel o's slice
    top = set(sorted(range(16), key=lambda o: -scores[o])[:8])
    masks = Sparsifier(model, criterion="taylor", granularity="channel", allocation="uniform",
                       exclude=["enc1", "enc2", "down", "dw", "dec2", "dec1", "head"],
                       data=ScoreData([(x, y)])).update(0.5)
    assert _kept(_built(UNet), masks, "up2") == top and _whole_channels(model, masks, "up2")


def test_slimming_prunes_the_generators_smallest_gamma_channels_and_names_a_conv_transpose_without_bn():
    model = _built(Generator)
    gamma1, gamma2 = model.b1.weight.detach().abs(), model.b2.weight.detach().abs()
    masks = Sparsifier(model, criterion="slimming", granularity="channel", allocation="uniform",
                       rules=LayerRules(keep_last="dense")).update(0.5)
    for name, gamma in (("t1", gamma1), ("t2", gamma2)):  # t3 is dense, so the others go a little further than 50%
        kept = _kept(model, masks, name)
        assert 0 < len(kept) <= len(gamma) // 2 and _whole_channels(model, masks, name)
        assert kept == set(torch.argsort(gamma, descending=True)[:len(kept)].tolist()), name
    unet = _built(UNet)
    with pytest.warns(UserWarning, match=r"slimming: up2\.weight have no directly following BatchNorm"):
        Sparsifier(unet, criterion="slimming", granularity="channel", rules=LayerRules(keep_last="dense")).update(0.3)


def test_global_channel_allocation_is_one_l1_threshold_across_convs_and_the_conv_transpose():
    model = _built(UNet)
    names = ["enc1", "enc2", "down", "dw", "up2", "dec2", "dec1"]
    norms = {n: _channel_l1(model, n) for n in names}  # before pruning zeroes them
    masks = _channel_masks(model, 0.5, allocation="global")
    kept = {n: _kept(model, masks, n) for n in names}
    floored = [n for n in names if len(kept[n]) == 1]  # held at the one-group floor: keep their best channel
    assert "up2" in floored  # its 64-weight channels have smaller l1 norms than the 144-weight conv channels
    for n in floored:
        assert kept[n] == {max(range(len(norms[n])), key=norms[n].__getitem__)}, n
    above = [norms[n][o] for n in names if n not in floored for o in kept[n]]
    below = [norms[n][o] for n in names if n not in floored for o in set(range(len(norms[n]))) - kept[n]]
    assert above and below and min(above) > max(below)  # one threshold across the other layers
    assert masks.stats().sparsity == pytest.approx(0.5, abs=0.03)


# --- the dry run: coupled groups and what cannot be handled ----------------------------------------------
def test_plan_lists_the_coupled_groups_through_both_skips_and_names_each_constant_problem():
    model = _built(UNet)
    x, _ = _digits(8)
    masks = _channel_masks(model, 0.5)
    plan = plan_shrink(model, masks, x)
    members = {m for g in plan.groups for m in g.members}
    by_member = {m: g for g in plan.groups for m in g.members}
    assert "up2.weight[:, o] (outputs), up2.bias" in members  # its outputs join the addition with enc2
    assert by_member["up2.weight[:, o] (outputs), up2.bias"] is by_member["enc2.weight rows"]
    assert by_member["up2.weight inputs[0:16]"] is by_member["down.weight rows"]  # its inputs: the bottleneck
    assert by_member["dec1.weight inputs[8:16]"] is by_member["enc1.weight rows"]  # the concat's second half
    assert by_member["dec1.weight inputs[0:8]"] is by_member["dec2.weight rows"]
    group = by_member["enc2.weight rows"]
    assert (group.channels, group.kept) == (16, len(_kept(model, masks, "enc2") | _kept(model, masks, "up2")))
    assert all("\n" not in p for p in plan.problems)
    assert [p for p in plan.problems if "reach transposed conv 'up2'" in p and "silence_pruned_channels_" in p]
    padded = {c for c in ("enc2", "down", "dec2", "dec1") if any(f"zero-padded conv '{c}'" in p for p in plan.problems)}
    assert padded == {"enc2", "down", "dec2", "dec1"}
    with pytest.raises(PrunelabError, match="silence_pruned_channels_") as info:
        shrink_model(model, masks, x)
    assert "\n" not in str(info.value)
    silenced = silence_pruned_channels_(copy.deepcopy(model), masks, x)
    assert plan_shrink(silenced, masks, x).ok


class GroupedUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.enc(x)))))


class PixelShuffleUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.head(self.ps(F.relu(self.enc(x))))


class GroupNormUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 8, 2, stride=2)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.gn(self.up(x))))


@pytest.mark.parametrize("cls,expected", [
    (GroupedUp, "grouped conv 'up' (groups=2)"),
    (PixelShuffleUp, "call_module PixelShuffle 'ps' at node 'ps': cannot propagate channel pruning"),
    (GroupNormUp, "call_module GroupNorm 'gn' at node 'gn': cannot propagate channel pruning"),
])
def test_plan_names_the_op_it_cannot_handle_and_shrink_refuses_in_one_line(cls, expected):
    model = _built(cls)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    masks = _channel_masks(model, 0.5)
    plan = plan_shrink(model, masks, x)
    assert not plan.ok and any(expected in p for p in plan.problems), plan.problems
    assert all("\n" not in p and "exclude" in p for p in plan.problems)
    with pytest.raises(PrunelabError) as info:
        materialise(model, "shrink", masks=masks, example_input=x)
    assert "\n" not in str(info.value)


class DepthwiseUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.bn = nn.Conv2d(1, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn2(self.up(F.relu(self.bn(self.enc(x)))))))


def test_depthwise_conv_transpose_is_cut_with_its_producer_as_one_channel_set():
    model = _built(DepthwiseUp)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    masks = _channel_masks(model, 0.5)
    up = masks["up.weight"]  # (8, 1, 2, 2): depthwise, output channel o is weight[o]
    kept = {o for o in range(8) if bool(up[o].any())} | _kept(model, masks, "enc")
    silence_pruned_channels_(model, masks, x)
    new = materialise(model, "shrink", masks=masks, example_input=x)
    assert new.up.groups == new.up.in_channels == new.up.out_channels == new.enc.out_channels == len(kept) < 8
    assert _max_error(new, _masked(model, masks), x) <= 1e-5


def test_pruning_the_next_transposed_convs_input_slices_too_shrinks_exactly_without_silencing():
    """The plan's other fix: prune t2's input slices weight[i] of t1's pruned channels (t2 then never reads them)."""
    model = _built(Generator)
    z = _latents()
    masks = dict(_channel_masks(model, 0.5, exclude=["t2", "t3"], keep_last=None))  # t1's outputs only
    cut = sorted(set(range(16)) - _kept(model, masks, "t1"))
    assert any("reach transposed conv 't2'" in p for p in plan_shrink(model, masks, z).problems)
    t2 = torch.ones_like(model.t2.weight, dtype=torch.bool)
    t2[cut] = False  # (16, 8, 4, 4): input slices
    masks["t2.weight"] = t2
    plan = plan_shrink(model, masks, z)
    assert plan.ok, plan.problems
    new = shrink_model(model, masks, z)
    assert (new.t1.out_channels, new.t2.in_channels, new.t2.out_channels) == (16 - len(cut), 16 - len(cut), 8)
    assert _max_error(new, _masked(model, masks), z) <= 1e-5


def test_pruned_conv_transpose_outputs_fold_their_bias_into_the_1x1_head():
    """A pruned output channel o of ``up`` outputs its bias b_o everywhere; after ReLU and the concat the 1x1 head
    gets b_head += W_head[:, o] relu(b_o) (by hand), so no silencing is needed."""
    model = _built(AutoEncoder1d)
    s = _signals()
    masks = _channel_masks(model, 0.5, exclude=["e1", "e2"])
    cut = sorted(set(range(8)) - _kept(model, masks, "up"))
    assert 4 <= len(cut) < 8  # the dense head's share of the budget is taken from up
    plan = plan_shrink(model, masks, s)
    assert plan.ok, plan.problems
    new = shrink_model(model, masks, s)
    w = model.head.weight.detach()[:, :, 0]  # (2, 16): columns 0..7 read up's channels
    expected = model.head.bias.detach() + (w[:, cut] * F.relu(model.up.bias.detach()[cut])).sum(1)
    torch.testing.assert_close(new.head.bias, expected, rtol=0, atol=1e-6)
    assert new.up.out_channels == 8 - len(cut) and new.head.in_channels == 8 - len(cut) + 8
    assert _max_error(new, _masked(model, masks), s) <= 1e-5


# --- save + load in a fresh process -------------------------------------------------------------------------
def test_shrunk_unet_and_1d_autoencoder_load_in_a_fresh_process_with_identical_outputs(tmp_path):
    cases = {"unet": (UNet, _digits(8)[0]), "ae1d": (AutoEncoder1d, _signals())}
    expected = {}
    for key, (cls, x) in cases.items():
        model = _built(cls)
        masks = _channel_masks(model, 0.5)
        silence_pruned_channels_(model, masks, x)
        new = materialise(model, "shrink", masks=masks, example_input=x)
        save_shrunk(tmp_path / key, new, tuple(x.shape[1:]), {})
        torch.save(x, tmp_path / f"{key}_x.pt")
        with torch.no_grad():
            expected[key] = (new(x), type(new.up2 if cls is UNet else new.up).__name__,
                             tuple((new.up2 if cls is UNet else new.up).weight.shape))
    code = ("import sys, torch, prunelab\n"
            "for key in ('unet', 'ae1d'):\n"
            "    folder = sys.argv[1] + '/' + key\n"
            "    m = prunelab.load(folder)\n"
            "    up = m.up2 if key == 'unet' else m.up\n"
            "    x = torch.load(folder + '_x.pt')\n"
            "    with torch.no_grad():\n"
            "        torch.save((m(x), type(up).__name__, tuple(up.weight.shape), m.training), folder + '_y.pt')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for key, (y, kind, shape) in expected.items():
        got, got_kind, got_shape, training = torch.load(tmp_path / f"{key}_y.pt")
        assert torch.equal(got, y) and (got_kind, got_shape, training) == (kind, shape, False), key


# --- measure_model: FLOPs of transposed convs by hand --------------------------------------------------------
def test_measure_model_counts_conv_transpose_macs_from_its_input_positions():
    torch.manual_seed(0)
    # ConvTranspose2d(4, 6, 3, stride=2, groups=2) on 5x5: in * out/groups * kh * kw * H_in * W_in = 4*3*9*25
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2))
    layer = measure_model(grouped, torch.randn(2, 4, 5, 5)).layers[0]
    assert (layer.kind, layer.weight_shape, layer.output_positions, layer.dense_macs) == \
        ("ConvTranspose2d", (4, 3, 3, 3), 25, 2700)
    # ConvTranspose1d(12, 8, 2, stride=2) on L_in = 8: 12 * 8 * 2 * 8
    ae = _built(AutoEncoder1d)
    cost = {l.name: l for l in measure_model(ae, _signals()[:1]).layers}
    assert (cost["up"].output_positions, cost["up"].dense_macs, cost["up"].dense_flops) == (8, 1536, 3072)
    # the generator: t1 on 1x1 (8*16*16*1), t2 on 4x4 (16*8*16*16), t3 on 8x8 (8*3*16*64)
    gen = measure_model(_built(Generator), _latents()[:1])
    assert [l.dense_macs for l in gen.layers] == [2048, 32768, 24576] and gen.dense_macs == 59392
    # a masked transposed conv: sparse MACs = kept weights * input positions
    model = _built(UNet)
    masks = Sparsifier(model, granularity="unstructured", schedule=OneShot(0.6)).prepare().finalize()
    up2 = {l.name: l for l in measure_model(model, torch.zeros(1, 1, 16, 16), masks).layers}["up2"]
    assert up2.sparse_macs == int(masks["up2.weight"].sum()) * 16 and up2.dense_macs == 1024 * 16


# --- sparse formats: the transposed conv stays dense, with a warning ----------------------------------------
def test_csr_bsr_auto_keep_the_conv_transpose_dense_with_a_warning_and_equal_outputs():
    model = _built(UNet)
    x, _ = _digits(8)
    masks = Sparsifier(model, granularity="unstructured", allocation="uniform", schedule=OneShot(0.7)).prepare().finalize()
    masked = _masked(model, masks)
    timer = FakeTimer({("dec1", "csr"): 0.5})  # auto: csr measured faster for dec1 only
    for form, extra in (("csr", {}), ("bsr", {}), ("auto", {"timer": timer, "batch_sizes": (1, 4)})):
        with pytest.warns(UserWarning, match=r"up2\.weight \(its ConvTranspose2d is not a layer materialise swaps\)"):
            new = materialise(model, form, masks=masks, example_input=x, **extra)
        assert _max_error(new, masked, x) <= 1e-5, form
        assert type(new.up2) is nn.ConvTranspose2d and torch.equal(new.up2.weight, masked.up2.weight), form
        kernels = {row.name: row.kernel for row in new.materialise_report.layers}
        if form == "csr":
            assert kernels["enc2"] == kernels["dec1"] == "csr" and kernels["dw"] == "dense"
        if form == "auto":
            assert kernels["dec1"] == "csr" and kernels["enc2"] == "dense"
            assert not [c for c in timer.calls if c[0] == "up2"]


def test_shrink_without_masks_cuts_the_zeroed_conv_transpose_channels_too():
    model = _built(Generator)
    z = _latents()
    masks = _channel_masks(model, 0.5)  # the model now holds the zeros
    silence_pruned_channels_(model, masks, z)
    with_masks = materialise(model, "shrink", masks=masks, example_input=z)
    from_zeros = materialise(model, "shrink", example_input=z)  # README: "without them the zeros ... are the sparsity"
    assert _params(from_zeros) == _params(with_masks) < _params(model)


# --- Deep Compression ---------------------------------------------------------------------------------------
def test_deep_compression_round_trip_of_a_unet_whose_conv_transpose_is_left_unpruned(tmp_path):
    model = _built(UNet)
    masks = Sparsifier(model, granularity="unstructured", allocation="uniform", schedule=OneShot(0.6),
                       exclude=["up2"]).prepare().finalize()
    report = write_compressed(tmp_path / "unet.plc", copy.deepcopy(model), masks, bits=4)
    back = UNet()
    back.load_state_dict(read_compressed(tmp_path / "unet.plc"))  # strict: BN buffers and up2 included
    params = dict(back.named_parameters())
    for name, keep in masks.items():
        assert not params[name][~keep].any(), name
        assert params[name][keep].unique().numel() <= 16, name  # 4-bit weight sharing
    assert torch.equal(back.bn3.running_var, model.bn3.running_var) and torch.equal(back.up2.bias, model.up2.bias)
    assert report.total_bytes < 4 * _params(model)


def test_deep_compression_round_trip_with_the_conv_transpose_pruned(tmp_path):
    model = _built(UNet)
    masks = Sparsifier(model, granularity="unstructured", allocation="uniform", schedule=OneShot(0.6)).prepare().finalize()
    write_compressed(tmp_path / "unet.plc", copy.deepcopy(model), masks, bits=4)
    state = read_compressed(tmp_path / "unet.plc")
    keep = masks["up2.weight"]
    assert not state["up2.weight"][~keep].any() and state["up2.weight"][keep].unique().numel() <= 16


def test_deep_compression_weight_shares_the_generators_conv_transpose_weights(tmp_path):
    model = _built(Generator)
    write_compressed(tmp_path / "gen.plc", copy.deepcopy(model), None, bits=3)
    state = read_compressed(tmp_path / "gen.plc")
    assert all(state[f"{n}.weight"].unique().numel() <= 8 for n in ("t1", "t2", "t3"))
