"""A computer-vision engineer's journey with their OWN small CNNs (README "Python API", "Make it pay" and the
CLI): channel pruning (l1 / magnitude / taylor / slimming; uniform / global / ERK), shrink, save, reload,
measure; unstructured pruning into CSR / BSR / 2:4 / auto; Deep Compression; the `prunelab` commands on the
zoo CNN (LeNet-5 on the 8x8 digits).  Strict xfails are expected behaviour that does not hold yet."""

from __future__ import annotations

import copy
import os
import re
import shutil
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
from prunelab.materialise import load_materialised
from prunelab.materialise.shrink import silence_pruned_channels_
from prunelab.materialise.spec import save_shrunk
from prunelab.measure import measure_model

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- the user's own models (module level, no-arg constructors: save_shrunk can record them) -------------------
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1 project -> BN, + x."""

    def __init__(self, c: int = 8, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.bn2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.project, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))  # (B, h, H, W)
        y = F.relu6(self.bn2(self.dw(y)))      # (B, h, H, W)
        return x + self.bn3(self.project(y))   # (B, c, H, W)


class MobileNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = InvertedResidual(8, 4)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):  # (B, 1, 8, 8)
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, 10)


def mobilenet_params(c: int, h: int, bias_of: "nn.Module | None" = None) -> int:
    """By hand: stem 9c + BN 2c + expand c*h + BN 2h + dw 9h + BN 2h + project h*c + BN 2c + fc 10c + 10.

    A shrunk model also gives the 1x1 consumer of cut channels a bias, into which their constant
    act(BN shift) is folded: ``bias_of`` (the shrunk model) says whether expand (h) / project (c) got one."""
    count = 9 * c + 2 * c + c * h + 2 * h + 9 * h + 2 * h + h * c + 2 * c + 10 * c + 10
    if bias_of is not None:
        count += h * (bias_of.block.expand.bias is not None) + c * (bias_of.block.project.bias is not None)
    return count


def folded_project_bias(model: "MobileNetish", cut: list[int]) -> torch.Tensor:
    """By hand: a cut expanded channel i outputs c_i = relu6(bn2 shift) (its dw row is pruned), so the 1x1
    project conv gets b = sum_{i cut} W[:, i] c_i."""
    bn = model.block.bn2
    shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (h,)
    constant = F.relu6(shift)[cut]  # (cut,)
    return (model.block.project.weight[:, cut, 0, 0] * constant).sum(1).detach()  # (c,)


def mobilenet_flops(c: int, h: int) -> int:
    """By hand, 8x8 maps (64 positions): stem 9c, expand c*h, dw 9h, project h*c MACs per position; fc 10c."""
    return 2 * (64 * (9 * c + c * h + 9 * h + h * c) + 10 * c)


class ResNetish(nn.Module):
    """ResNet bottleneck, stride 2, with a strided 1x1 conv + BN shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))                  # (B, 8, 8, 8)
        y = F.relu(self.bn1(self.conv1(x)))       # (B, 4, 8, 8)
        y = F.relu(self.bn2(self.conv2(y)))       # (B, 4, 4, 4)
        y = F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))  # (B, 16, 4, 4)
        return self.head(y.mean((2, 3)))


class SENet(nn.Module):
    """Conv -> squeeze-and-excitation (global pool -> fc -> ReLU -> fc -> sigmoid -> channel multiply) -> conv."""

    def __init__(self, style: str = "view") -> None:
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))                             # (B, 16, 8, 8)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))  # (B, 16)
        if self.style == "view":
            s = s.view(x.shape[0], x.shape[1], 1, 1)
        elif self.style == "unsqueeze":
            s = s.unsqueeze(-1).unsqueeze(-1)
        else:  # "none_index"
            s = s[:, :, None, None]
        x = x * s                                             # (B, 16, 8, 8)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1).flatten(1))


class TwoBranch(nn.Module):
    """Inception-style: two branches concatenated along channels, then a 1x1 merge."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.merge = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)  # (B, 12, 8, 8)
        return self.fc(F.relu(self.merge(y)).amax((2, 3)))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.gconv(F.relu(self.conv1(x))))))  # (B, 8, 8, 8)
        return self.fc(F.max_pool2d(x, 8).flatten(1))


class Audio(nn.Module):
    """Conv1d keyword-spotting style model on (B, 1, 64) waveforms."""

    def __init__(self, head: str = "flatten") -> None:
        super().__init__()
        self.head = head
        self.c1, self.bn1 = nn.Conv1d(1, 16, 5, stride=2), nn.BatchNorm1d(16)
        self.c2, self.bn2 = nn.Conv1d(16, 16, 3), nn.BatchNorm1d(16)
        self.pool, self.fc = nn.AdaptiveMaxPool1d(1), nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))  # (B, 16, 28)
        pooled = self.pool(x)                                         # (B, 16, 1)
        return self.fc(pooled.flatten(1) if self.head == "flatten" else pooled.squeeze(-1))


class Regular(nn.Module):
    """Dropout, Identity and nn.Flatten(start_dim=1) between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.drop, self.ident, self.flat = nn.Dropout(0.25), nn.Identity(), nn.Flatten(start_dim=1)
        self.fc1, self.fc2 = nn.Linear(8 * 6 * 6, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.ident(self.drop(F.relu(self.conv(x))))  # (B, 8, 6, 6)
        return self.fc2(self.drop(F.relu(self.fc1(self.flat(x)))))


# --- helpers ----------------------------------------------------------------------------------------------
def _digits(n: int = 256):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    return x, torch.tensor(digits.target[:n])


def _random_bn_(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a pruned channel's constant act(BN shift) is not 0."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model.eval()


def _kept_rows(mask: torch.Tensor) -> set[int]:
    return set(mask.reshape(mask.shape[0], -1).any(1).nonzero().flatten().tolist())


def _channel_masks(model, sparsity, *, criterion="l1", allocation="uniform", data=None, exclude=(),
                   rules=None) -> MaskSet:
    rules = rules if rules is not None else LayerRules(keep_last="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # slimming's |w| fallback for layers without a BN
        return Sparsifier(model, criterion=criterion, granularity="channel", allocation=allocation,
                          schedule=OneShot(sparsity), rules=rules, exclude=exclude, data=data).prepare().finalize()


def _close(a: nn.Module, b: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> bool:
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=atol)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}


def _prunelab(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `prunelab` entry point in a subprocess (falls back to the same main() if the script is not on PATH)."""
    exe = shutil.which("prunelab")
    cmd = [exe, *argv] if exe else [sys.executable, "-c", "import sys; from prunelab.cli import main; "
                                                          "sys.exit(main(sys.argv[1:]))", *argv]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240, check=False)


# --- channel pruning -> shrink -> save -> load -> measure (Python) -----------------------------------------
def test_mobilenet_trained_on_digits_shrinks_saves_reloads_and_measures_as_counted_by_hand(tmp_path):
    torch.manual_seed(0)
    x, y = _digits()
    model = MobileNetish()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = Sparsifier(model, criterion="l1", granularity="channel", allocation="global",
                            schedule=prunelab.Cubic(0.5, start_step=0, num_updates=3, frequency=4),
                            rules=LayerRules(keep_last="dense")).prepare(opt)
    for step in range(16):
        batch = torch.arange(16 * step, 16 * step + 16) % x.shape[0]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
    masks = sparsifier.finalize()
    model.eval()
    new = materialise(model, "shrink", masks=masks, example_input=x[:32])
    assert _close(new, model, x[:64])  # eval mode: BN folded with running statistics
    # residual: stem and project share the channel set (union); depthwise: expand and dw rows cut together
    c = len(_kept_rows(masks["stem.weight"]) | _kept_rows(masks["block.project.weight"]))
    h = len(_kept_rows(masks["block.expand.weight"]) | _kept_rows(masks["block.dw.weight"]))
    assert (c, h) < (8, 32) and new.block.dw.groups == h == new.block.dw.out_channels
    assert sum(p.numel() for p in new.parameters()) == mobilenet_params(c, h, new)
    assert (new.block.expand.bias is not None) == (c < 8) and (new.block.project.bias is not None) == (h < 32)
    assert sum(p.numel() for p in model.parameters()) == mobilenet_params(8, 32) == 1122
    cut = sorted(set(range(32)) - _kept_rows(masks["block.expand.weight"]) - _kept_rows(masks["block.dw.weight"]))
    if c == 8:  # the residual keeps every channel: the project rows are the original ones
        assert torch.allclose(new.block.project.bias, folded_project_bias(model, cut), atol=1e-6)
    dense_cost, new_cost = measure_model(model, x[:1]), measure_model(new, x[:1])
    assert dense_cost.params == 1122 and dense_cost.dense_flops == mobilenet_flops(8, 32)
    assert new_cost.params == mobilenet_params(c, h, new) and new_cost.dense_flops == mobilenet_flops(c, h)

    save_shrunk(tmp_path / "shrunk", new, (1, 8, 8), {})
    back = prunelab.load(tmp_path / "shrunk")
    assert not back.training
    with torch.no_grad():
        assert torch.equal(back(x[:64]), new(x[:64]))


@pytest.mark.parametrize("criterion,allocation", [("magnitude", "uniform"), ("l1", "erk"), ("taylor", "global"),
                                                  ("slimming", "uniform")])
def test_mobilenet_channel_criteria_and_allocations_shrink_exactly(criterion, allocation):
    torch.manual_seed(0)
    model = _random_bn_(MobileNetish())
    x, y = _digits(64)
    data = ScoreData([(x, y)]) if criterion == "taylor" else None
    masks = _channel_masks(model, 0.5, criterion=criterion, allocation=allocation, data=data)
    assert masks.stats().sparsity == pytest.approx(0.5, abs=0.06)
    new = materialise(model, "shrink", masks=masks, example_input=x[:16])
    assert _close(new, model, x)
    c = len(_kept_rows(masks["stem.weight"]) | _kept_rows(masks["block.project.weight"]))
    h = len(_kept_rows(masks["block.expand.weight"]) | _kept_rows(masks["block.dw.weight"]))
    assert sum(p.numel() for p in new.parameters()) == mobilenet_params(c, h, new) < 1122


def test_slimming_prunes_the_channels_with_the_smallest_bn_gamma():
    model = _random_bn_(MobileNetish())
    model.bn.weight.data = torch.tensor([0.9, -0.1, 0.5, 0.05, -0.7, 0.3, 0.2, 1.1])  # |gamma| order: 3,1,6,5,2,4,0,7
    masks = _channel_masks(model, 0.5, criterion="slimming", exclude=("block.*", "fc"), rules=LayerRules())
    assert _kept_rows(masks["stem.weight"]) == {0, 2, 4, 7}


def test_taylor_channel_scores_match_a_brute_force_reference():
    torch.manual_seed(1)
    model = _random_bn_(MobileNetish())
    x, y = _digits(48)
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    reference = torch.zeros(8)
    for xb, yb in batches:  # s_o = mean over batches of sum_i |w_oi * dL_b/dw_oi|
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        reference += (model.stem.weight * model.stem.weight.grad).abs().flatten(1).sum(1).detach() / 2
    masks = _channel_masks(model, 0.5, criterion="taylor", exclude=("block.*", "fc"), rules=LayerRules(),
                           data=ScoreData(batches))
    assert _kept_rows(masks["stem.weight"]) == set(reference.topk(4).indices.tolist())


def test_bottleneck_shortcut_keeps_the_union_and_padded_conv_needs_silencing_with_a_clear_message():
    torch.manual_seed(0)
    model = _random_bn_(ResNetish())
    x, _ = _digits(32)
    masks = MaskSet.ones({n: p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1})
    keep3, keep_sc = torch.zeros(16, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)
    keep3[:8], keep_sc[4:12] = True, True  # union: channels 0..11
    masks = MaskSet({**masks, "conv3.weight": keep3[:, None, None, None].expand(16, 4, 1, 1).clone(),
                     "shortcut.0.weight": keep_sc[:, None, None, None].expand(16, 8, 1, 1).clone()})
    new = materialise(model, "shrink", masks=masks, example_input=x)
    masks.apply_(model)  # the reference: the masked model
    assert new.conv3.out_channels == new.shortcut[0].out_channels == new.head.in_features == 12
    assert new.shortcut[0].stride == (2, 2) and _close(new, model, x)

    keep1 = torch.tensor([True, False, True, False])[:, None, None, None].expand(4, 8, 1, 1).clone()
    masks = MaskSet({**masks, "conv1.weight": keep1})
    masks.apply_(model)
    with pytest.raises(PrunelabError, match=r"zero-padded conv 'conv2'.*silence_pruned_channels_") as info:
        materialise(model, "shrink", masks=masks, example_input=x)
    assert "\n" not in str(info.value)
    silenced = silence_pruned_channels_(copy.deepcopy(model), masks, x)
    new = materialise(silenced, "shrink", masks=masks, example_input=x)
    assert new.conv1.out_channels == new.conv2.in_channels == 2 and _close(new, silenced, x)


def test_concat_of_two_branches_cuts_the_merge_columns_at_each_branch_offset():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x, _ = _digits(16)
    masks = MaskSet.ones({n: p for n, p in model.named_parameters() if n.endswith("weight")})
    keep_a = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    keep_b = torch.tensor([0, 1, 0, 1], dtype=torch.bool)
    masks = MaskSet({**masks, "a.weight": keep_a[:, None, None, None].expand(8, 1, 3, 3).clone(),
                     "b.weight": keep_b[:, None, None, None].expand(4, 1, 1, 1).clone()})
    new = materialise(model, "shrink", masks=masks, example_input=x)
    original = model.merge.weight.detach().clone()
    masks.apply_(model)  # the reference: the masked model
    columns = [0, 2, 4, 6, 8 + 1, 8 + 3]
    assert new.merge.in_channels == 6 and _close(new, model, x)
    assert sum(p.numel() for p in new.parameters()) == (4 * 9 + 4) + (2 + 2) + (8 * 6 + 8) + (8 * 10 + 10)
    # merge's bias absorbs relu(bias) of the cut channels; its kept weight columns are the original ones
    assert torch.equal(new.merge.weight, original[:, columns])


def test_squeeze_excitation_written_with_view_shrinks_exactly():
    torch.manual_seed(0)
    model = SENet("view").eval()
    x, _ = _digits(16)
    masks = _channel_masks(model, 0.4)
    new = materialise(model, "shrink", masks=masks, example_input=x)
    assert new.conv1.out_channels == new.fc2.out_features < 16 and _close(new, model, x)


@pytest.mark.parametrize("build", [lambda: SENet("unsqueeze"), lambda: SENet("none_index"), lambda: Audio("squeeze")],
                         ids=["se-unsqueeze", "se-none-index", "conv1d-squeeze"])
def test_size_one_dim_ops_outside_the_channel_dim_shrink_like_view(build):
    torch.manual_seed(0)
    model = _random_bn_(build())
    x = torch.randn(8, 1, 64) if isinstance(model, Audio) else _digits(8)[0]
    masks = _channel_masks(model, 0.4)
    new = materialise(model, "shrink", masks=masks, example_input=x)
    assert _close(new, model, x)


def test_conv1d_audio_model_shrinks_with_batchnorm1d():
    torch.manual_seed(0)
    model = _random_bn_(Audio("flatten"))
    x = torch.randn(8, 1, 64)
    masks = _channel_masks(model, 0.4)
    new = materialise(model, "shrink", masks=masks, example_input=x)
    k1, k2 = len(_kept_rows(masks["c1.weight"])), len(_kept_rows(masks["c2.weight"]))
    assert (new.c1.out_channels, new.bn1.num_features, new.c2.out_channels, new.fc.in_features) == (k1, k1, k2, k2)
    assert sum(p.numel() for p in new.parameters()) == (5 * k1 + k1) + 2 * k1 + (3 * k1 * k2 + k2) + 2 * k2 + 5 * k2 + 5
    assert _close(new, model, x)


def test_grouped_conv_is_refused_with_a_fix_that_works():
    torch.manual_seed(0)
    model = Grouped().eval()
    x, _ = _digits(8)
    masks = _channel_masks(model, 0.3)
    with pytest.raises(PrunelabError, match=r"grouped conv 'gconv' \(groups=4\).*not supported; exclude") as info:
        materialise(model, "shrink", masks=masks, example_input=x)
    assert "\n" not in str(info.value)
    masks = _channel_masks(model, 0.3, exclude=("conv1", "gconv"))  # what the message (and its plan) name
    new = materialise(model, "shrink", masks=masks, example_input=x)
    assert new.gconv.groups == 4 and new.conv3.out_channels < 8 and _close(new, model, x)


def test_dropout_identity_flatten_model_in_training_mode_shrinks_and_stays_untouched():
    torch.manual_seed(0)
    model = Regular().train()
    x, _ = _digits(16)
    masks = _channel_masks(model, 0.5)
    before = copy.deepcopy(model.state_dict())
    new = materialise(model, "shrink", masks=masks, example_input=x)
    k_conv, k_fc1 = len(_kept_rows(masks["conv.weight"])), len(_kept_rows(masks["fc1.weight"]))
    assert new.fc1.in_features == 36 * k_conv  # flatten: columns c*36 .. (c+1)*36 of each kept channel
    assert sum(p.numel() for p in new.parameters()) == (9 * k_conv + k_conv) + (36 * k_conv * k_fc1 + k_fc1) + (
        10 * k_fc1 + 10)
    assert model.training and not new.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # masks applied to a copy only
    assert _close(new, model.eval(), x)


def test_slimming_does_not_warn_about_a_layer_kept_dense_by_the_rules():
    model = _random_bn_(MobileNetish())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sparsifier(model, criterion="slimming", granularity="channel", schedule=OneShot(0.3),
                   rules=LayerRules(keep_last="dense")).prepare()
    assert not [w for w in caught if "fc.weight" in str(w.message)]


# --- unstructured -> sparse formats ---------------------------------------------------------------------
def test_unstructured_cnn_to_csr_bsr_auto_equal_masked_and_reload(tmp_path):
    torch.manual_seed(0)
    model = MobileNetish().eval()
    x, _ = _digits(16)
    masks = Sparsifier(model, granularity="unstructured", allocation="uniform", schedule=OneShot(0.7)).prepare().finalize()
    for form in ("csr", "bsr", "auto"):
        new = materialise(model, form, masks=masks, example_input=x)
        assert _close(new, model, x)
    csr = materialise(model, "csr", masks=masks, example_input=x)
    kernels = {row.name: (row.kernel, row.note) for row in csr.materialise_report.layers}
    assert kernels["stem"][0] == kernels["block.expand"][0] == kernels["fc"][0] == "csr"
    assert kernels["block.dw"] == ("dense", "kept dense: groups=32 (only groups=1 is supported)")
    cost, masked_cost = measure_model(csr, x[:1]), measure_model(model, x[:1], masks)
    assert (cost.params, cost.sparse_flops) == (masked_cost.params, masked_cost.sparse_flops)
    assert masked_cost.nonzeros == sum(int(m.sum()) for m in masks.values()) + (masked_cost.params - sum(
        m.numel() for m in masks.values()))
    torch.save(csr.state_dict(), tmp_path / "csr.pt")
    back = load_materialised(MobileNetish(), torch.load(tmp_path / "csr.pt", weights_only=True)).eval()
    with torch.no_grad():
        assert torch.equal(back(x), csr(x))


def test_two_four_on_cpu_warns_and_falls_back_with_equal_outputs():
    torch.manual_seed(0)
    model = Regular().eval()
    x, _ = _digits(16)
    masks = Sparsifier(model, granularity="2:4", schedule=OneShot(0.5),
                       rules=LayerRules(keep_first="dense")).prepare().finalize()
    with pytest.warns(UserWarning, match=r"2:4 kernels need an NVIDIA Ampere.*fc1, fc2 fall back to dense"):
        new = materialise(model, "2:4", masks=masks, example_input=x)
    notes = {row.name: (row.kernel, row.note) for row in new.materialise_report.layers}
    assert notes["fc1"] == notes["fc2"] == ("2:4", "dense fallback") and notes["conv"][0] == "dense"
    assert _close(new, model, x, atol=0)


def test_unstructured_masks_into_shrink_say_which_granularity_to_use():
    model = Regular().eval()
    masks = Sparsifier(model, granularity="unstructured", schedule=OneShot(0.5)).prepare().finalize()
    with pytest.raises(PrunelabError, match=r"not a channel mask.*--granularity channel/neuron.*--form csr") as info:
        materialise(model, "shrink", masks=masks, example_input=_digits(4)[0])
    assert "\n" not in str(info.value)


def test_wrong_example_input_is_a_one_line_error_for_every_form():
    model = Regular().eval()
    masks = Sparsifier(model, granularity="unstructured", schedule=OneShot(0.5)).prepare().finalize()
    with pytest.raises(PrunelabError) as info:
        materialise(model, "csr", masks=masks, example_input=torch.randn(2, 3, 8, 8))  # 3 channels, model takes 1
    assert "\n" not in str(info.value)


def test_compressed_custom_cnn_decodes_to_its_codebook_with_pruned_weights_zero(tmp_path):
    torch.manual_seed(0)
    model = _random_bn_(MobileNetish())
    masks = Sparsifier(model, granularity="unstructured", allocation="uniform", schedule=OneShot(0.6)).prepare().finalize()
    write_compressed(tmp_path / "m.plc", copy.deepcopy(model), masks, bits=3)
    back = MobileNetish()
    back.load_state_dict(read_compressed(tmp_path / "m.plc"))  # strict: BN buffers included
    params = dict(back.named_parameters())
    for name, keep in masks.items():
        assert not params[name][~keep].any(), name
        assert params[name][keep].unique().numel() <= 2 ** 3, name  # 3-bit weight sharing
    assert torch.equal(back.bn.running_var, model.bn.running_var)


# --- the command line on the zoo CNN (LeNet-5 on the 8x8 digits) --------------------------------------------
@pytest.fixture(scope="module")
def channel_run(tmp_path_factory) -> Path:
    """`prunelab prune` (subprocess): LeNet-5 on digits, l1 channel pruning, uniform 50%, last layer dense."""
    root = tmp_path_factory.mktemp("cli")
    done = _prunelab("prune", "--model", "lenet5", "--dataset", "digits", "--method", "oneshot", "--criterion", "l1",
                     "--granularity", "channel", "--allocation", "uniform", "--sparsity", "0.5", "--pretrain-epochs",
                     "1", "--finetune-epochs", "0", "--keep-last", "dense", "--no-progress", "--out", "ck", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "ck"


def test_cli_shrink_refuses_padded_lenet5_in_one_line_then_silenced_shrink_reloads_with_hand_counts(channel_run, cli):
    code, _, err = cli("materialise", str(channel_run), "--form", "shrink", "--out", str(channel_run.parent / "no"))
    assert code == 2 and err.count("\n") == 1 and "--silence-pruned-channels" in err
    assert not (channel_run.parent / "no").exists()

    out = channel_run.parent / "shrunk"
    done = _prunelab("materialise", str(channel_run), "--form", "shrink", "--silence-pruned-channels", "--out",
                     str(out), cwd=channel_run.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    masks = MaskSet.load(channel_run / "masks.safetensors")
    k1, k2, k3 = (len(_kept_rows(masks[f"{n}.weight"])) for n in ("conv1", "conv2", "fc1"))
    assert masks["fc2.weight"].all()
    # LeNet-5 on 8x8 (padding 2): conv1 5x5 -> pool -> 4x4 -> conv2 5x5 -> pool -> 2x2 -> fc1 -> fc2
    params = (25 * k1 + k1) + (25 * k1 * k2 + k2) + (4 * k2 * k3 + k3) + (10 * k3 + 10)
    flops = 2 * (64 * 25 * k1 + 16 * 25 * k1 * k2 + 4 * k2 * k3 + 10 * k3)
    assert f"131,080 -> {params:,} parameters" in done.stdout and f"-> {flops:,} FLOPs" in done.stdout
    back = prunelab.load(out)
    assert sum(p.numel() for p in back.parameters()) == params and back.fc1.in_features == 4 * k2
    cost = measure_model(back, torch.zeros(1, 1, 8, 8))
    assert (cost.params, cost.dense_flops) == (params, flops)


def test_cli_bench_latency_shrink_error_only_suggests_options_it_accepts(channel_run, cli):
    code, out, err = cli("bench-latency", str(channel_run), "--forms", "shrink", "--batch-sizes", "1", "--reps", "1")
    if code == 0:
        assert "shrink_speedup_x" in out
        return
    help_text = cli("bench-latency", "--help")[1]
    suggested = re.findall(r"--[a-z][a-z-]+", err)
    assert suggested and all(option in help_text for option in suggested), (suggested, err)


@pytest.fixture(scope="module")
def two_four_run(tmp_path_factory) -> Path:
    """`prunelab prune` in process: LeNet-5 on digits, 2:4 (first layer dense: 1 input channel)."""
    from prunelab.cli import main

    out = tmp_path_factory.mktemp("cli24") / "ck"
    assert main(["prune", "--model", "lenet5", "--dataset", "digits", "--method", "oneshot", "--granularity", "2:4",
                 "--keep-first", "dense", "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress",
                 "--out", str(out)]) == 0
    return out


def test_cli_bench_latency_prints_the_table_and_the_cpu_fallback_note(two_four_run):
    done = _prunelab("bench-latency", str(two_four_run), "--forms", "2:4,csr", "--batch-sizes", "1,8", "--reps", "2",
                     cwd=two_four_run.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: 2:4 kernels need an NVIDIA Ampere" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("| batch"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["batch", "dense_ms", "2:4_ms", "2:4_speedup_x",
                                                                  "csr_ms", "csr_speedup_x"]
    rows = [line for line in done.stdout.splitlines() if re.match(r"\|\s+(1|8) \|", line)]
    assert len(rows) == 2


def test_cli_compress_then_reload_the_file(two_four_run, cli):
    from prunelab.bench.models import build_model

    plc = two_four_run.parent / "l5.plc"
    code, out, err = cli("compress", str(two_four_run), "--out", str(plc), "--finetune-epochs", "0")
    assert code == 0, err
    model = build_model("lenet5", (1, 8, 8), 10)
    model.load_state_dict(read_compressed(plc))
    masks = MaskSet.load(two_four_run / "masks.safetensors")
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert not params[name][~keep].any(), name
        bits = 8 if name.startswith("conv") else 5  # the default weight bits: 8 conv / 5 fc
        assert params[name][keep].unique().numel() <= 2 ** bits, name
    assert f"{plc}: " in out and "smaller than dense fp32" in out


def test_load_of_a_compressed_file_loads_or_says_how(two_four_run, cli):
    plc = two_four_run.parent / "l5b.plc"
    assert cli("compress", str(two_four_run), "--out", str(plc), "--finetune-epochs", "0")[0] == 0
    try:
        model = prunelab.load(plc)
    except PrunelabError as exc:
        assert "read_compressed" in str(exc)
    else:
        assert isinstance(model, nn.Module)


def test_python_dash_m_prunelab_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "prunelab", "list"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "granularities:" in done.stdout, done.stderr[-500:]
