"""ConvTranspose layers are pruning targets, and channel pruning removes their OUTPUT channels.

A transposed conv's weight is ``(in, out / groups, *k)``: output channel ``o = g * out/groups + j``
of group ``g`` is ``weight[g*in/groups:(g+1)*in/groups, j]``.  Expected values below come from
brute-force loops written here, never from the library's own reshapes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab import PrunelabError, Sparsifier, prunable_parameters
from prunelab.criteria import ScoreData, get_criterion
from prunelab.criteria.links import channel_links
from prunelab.criteria.regression import Regression, regression_channel_prune
from prunelab.criteria.slimming import BNScale
from prunelab.masks import MaskSet
from prunelab.materialise.shrink import plan_shrink, shrink_model
from prunelab.structure import Channel, NM, TransposedChannel, get_granularity, layer_granularities


class EncDec(nn.Module):
    """Conv2d -> ReLU -> ConvTranspose2d -> BN -> ReLU -> Conv2d (1x1): a tiny encoder-decoder."""

    def __init__(self, groups: int = 1, dec_out: int = 6) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # no bias: a pruned channel is exactly 0
        self.act = nn.ReLU()
        self.dec = nn.ConvTranspose2d(4, dec_out, 2, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(dec_out)
        self.act2 = nn.ReLU()
        self.head = nn.Conv2d(dec_out, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.bn(self.dec(self.act(self.enc(x))))))


def _model(groups: int = 1, dec_out: int = 6) -> EncDec:
    torch.manual_seed(0)
    model = EncDec(groups, dec_out)
    with torch.no_grad():
        model.bn.weight.copy_(torch.linspace(0.3, 1.7, dec_out) * torch.tensor([1.0, -1.0] * (dec_out // 2)))
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _out_slice(weight: torch.Tensor, groups: int, o: int) -> torch.Tensor:
    """Brute force: the weights of output channel ``o`` of a transposed conv weight ``(in, out/g, *k)``."""
    in_g, out_g = weight.shape[0] // groups, weight.shape[1]
    g, j = divmod(o, out_g)
    return weight[g * in_g:(g + 1) * in_g, j]


def _channel_mask(weight: torch.Tensor, groups: int, kept: set[int]) -> torch.Tensor:
    """Brute force: a bool mask of ``weight``'s shape keeping whole output channels ``kept``."""
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    in_g, out_g = weight.shape[0] // groups, weight.shape[1]
    for o in kept:
        g, j = divmod(o, out_g)
        mask[g * in_g:(g + 1) * in_g, j] = True
    return mask


# --- targets and the granularity's view of the layer ----------------------------------------------------------
def test_conv_transpose_weights_are_pruning_targets() -> None:
    assert list(prunable_parameters(_model())) == ["enc.weight", "dec.weight", "head.weight"]
    for cls, shape in ((nn.ConvTranspose1d, (4, 3, 2)), (nn.ConvTranspose3d, (4, 3, 2, 2, 2))):
        layer = nn.Sequential(cls(4, 3, 2))
        assert {n: tuple(p.shape) for n, p in prunable_parameters(layer).items()} == {"0.weight": shape}


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_channel_groups_are_output_channels(groups: int) -> None:
    weight = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)  # (in, out/g, kh, kw)
    structure = TransposedChannel(groups)
    rows = structure.to_groups(weight)
    assert rows.shape == (3 * groups, (4 // groups) * 4)
    for o in range(3 * groups):
        assert torch.equal(rows[o], _out_slice(weight, groups, o).flatten())
    values = torch.arange(3 * groups, dtype=torch.float32) * 10
    spread = structure.from_groups(values, tuple(weight.shape))
    for o in range(3 * groups):
        assert bool((_out_slice(spread, groups, o) == 10 * o).all())
    keep = torch.tensor([True, False, True] * groups)
    assert torch.equal(structure.from_groups(keep, tuple(weight.shape)),
                       _channel_mask(weight, groups, {o for o in range(3 * groups) if keep[o]}))


def test_channel_learns_the_layout_from_the_layer() -> None:
    model = _model(groups=2)
    views = layer_granularities(get_granularity("channel"), model, prunable_parameters(model))
    assert views == {"enc.weight": Channel(), "dec.weight": TransposedChannel(2), "head.weight": Channel()}
    assert get_granularity("unstructured").for_layer(model.dec) == get_granularity("unstructured")
    assert NM(2, 4).for_layer(model.dec) == NM(2, 4)
    assert TransposedChannel(2).describe() == "channel" and TransposedChannel(2).structured
    with pytest.raises(PrunelabError, match="groups=2"):
        TransposedChannel(2).check("x.weight", (3, 3, 2, 2))  # 3 input channels cannot form 2 groups
    with pytest.raises(PrunelabError, match="6 output channels"):
        TransposedChannel(2).from_groups(torch.ones(4, dtype=torch.bool), (4, 3, 2, 2))
    with pytest.raises(PrunelabError, match="not in the model"):
        layer_granularities(Channel(), model, ["nope.weight"])


# --- the Sparsifier: channel masks keep the top-k output channels ------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_channel_mask_keeps_top_output_channels_by_l1(groups: int) -> None:
    model = _model(groups)
    weight = model.dec.weight.detach()
    norms = [float(_out_slice(weight, groups, o).abs().sum()) for o in range(6)]  # L1 over dim 1's slices
    top3 = set(sorted(range(6), key=lambda o: -norms[o])[:3])
    sparsifier = Sparsifier(model, criterion="l1", granularity="channel", allocation="uniform",
                            exclude=["enc", "head"])
    masks = sparsifier.update(0.5)
    assert torch.equal(masks["dec.weight"], _channel_mask(weight, groups, top3))
    assert masks.stats().kept == 3 * weight.numel() // 6
    for o in range(6):  # the model holds the zeros
        assert bool((_out_slice(model.dec.weight.detach(), groups, o) != 0).all()) == (o in top3)


def test_slimming_scores_transposed_output_channels_by_gamma() -> None:
    for groups in (1, 2):
        model = _model(groups)
        scores = BNScale()(model, {"dec.weight": model.dec.weight}, None)["dec.weight"]
        gamma = model.bn.weight.detach().abs()
        for o in range(6):
            assert bool((_out_slice(scores, groups, o) == gamma[o]).all())
    # in == out channels: a row-wise broadcast would also fit the shape, and be wrong
    model = _model(1, dec_out=4)
    scores = BNScale()(model, {"dec.weight": model.dec.weight}, None)["dec.weight"]
    gamma = model.bn.weight.detach().abs()
    assert all(bool((scores[:, o] == gamma[o]).all()) for o in range(4))


def test_slimming_prunes_the_smallest_gamma_channels_through_the_sparsifier() -> None:
    model = _model(2)
    gamma = model.bn.weight.detach().abs()
    keep = set(torch.argsort(gamma, descending=True)[:2].tolist())
    sparsifier = Sparsifier(model, criterion="slimming", granularity="channel", allocation="uniform",
                            exclude=["enc", "head"])
    masks = sparsifier.update(4 / 6)
    assert torch.equal(masks["dec.weight"], _channel_mask(model.dec.weight, 2, keep))


def test_links_name_the_batchnorm_and_consumer_of_a_transposed_conv() -> None:
    links = channel_links(_model(1))
    assert dict(links.bn) == {"dec": "bn"}  # 6 output channels (weight dim 1), not the 4 rows of its weight
    assert dict(links.consumer) == {"dec": "head"}  # enc -> dec: a transposed conv is no regression consumer


def _data(n: int = 8) -> ScoreData:
    torch.manual_seed(1)
    batches = [(torch.randn(n, 2, 3, 3), torch.zeros(n, 6, 6, dtype=torch.long)) for _ in range(2)]
    return ScoreData(batches)


def test_regression_channel_prune_cuts_transposed_output_slices() -> None:
    model = _model(1)
    result = regression_channel_prune(model, "dec", None, _data(), keep=3)
    assert result.consumer == "head" and int(result.keep.sum()) == 3
    kept = {o for o in range(6) if result.keep[o]}
    masks = result.masks(model)
    assert torch.equal(masks["dec.weight"], _channel_mask(model.dec.weight, 1, kept))
    assert torch.equal(masks["head.weight"], result.keep.reshape(1, 6, 1, 1).expand(3, 6, 1, 1))
    result.apply(model)
    for o in range(6):
        assert bool((model.dec.weight[:, o] == 0).all()) == (o not in kept)
        assert bool(model.dec.bias[o] == 0) == (o not in kept)


def test_regression_criterion_spreads_channel_scores_over_output_slices() -> None:
    model = _model(1)
    with pytest.warns(UserWarning, match="head.weight"):  # the classifier falls back to |w|
        scores = Regression(num_alphas=8)(model, {"dec.weight": model.dec.weight, "head.weight": model.head.weight},
                                          _data())
    dec = scores["dec.weight"]
    values = dec[0, :, 0, 0]
    assert bool((values >= 0).all() and (values <= 1).all()) and float(values.max()) > 0
    assert torch.equal(dec, values.reshape(1, 6, 1, 1).expand(4, 6, 2, 2))  # constant on each output slice


def test_apoz_refuses_a_grouped_transposed_conv_naming_it() -> None:
    model = _model(2)
    with pytest.raises(PrunelabError, match="'dec'") as info:
        get_criterion("apoz")(model, {"dec.weight": model.dec.weight}, _data())
    assert "\n" not in str(info.value)


# --- unstructured / N:M and stats --------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_unstructured_magnitude_hits_the_exact_count_including_conv_transpose(groups: int) -> None:
    model = _model(groups)
    weights = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    total = sum(w.numel() for w in weights.values())
    assert total == 4 * 2 * 9 + 4 * (6 // groups) * 4 + 3 * 6
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    pruned = int(round(0.6 * total))
    threshold = float(torch.sort(flat).values[pruned - 1])  # the pruned-th smallest |w| (no ties in random floats)
    masks = Sparsifier(model, criterion="magnitude", granularity="unstructured").update(0.6)
    stats = masks.stats()
    assert stats.total == total and stats.kept == total - pruned
    assert {layer.name: layer.total for layer in stats.layers}["dec.weight"] == weights["dec.weight"].numel()
    for name, w in weights.items():
        assert torch.equal(masks[name], w.abs() > threshold), name
    assert int((model.dec.weight == 0).sum()) == int((~masks["dec.weight"]).sum()) > 0


def test_nm_applies_to_conv_transpose_weights() -> None:
    model = _model(1, dec_out=8)
    masks = Sparsifier(model, criterion="magnitude", granularity="2:4", exclude=["enc", "head"]).update(0.5)
    mask = masks["dec.weight"]  # (4, 8, 2, 2): blocks of 4 along dim 1
    assert bool((mask.reshape(4, 2, 4, 2, 2).sum(dim=2) == 2).all())


# --- shrink: the shrunk model equals the masked model -----------------------------------------------------
def _hand_masks(model: EncDec, groups: int) -> dict[str, torch.Tensor]:
    enc = torch.ones_like(model.enc.weight, dtype=torch.bool)
    enc[1] = False  # enc output channel 1 (= dec input channel 1)
    return {"enc.weight": enc, "dec.weight": _channel_mask(model.dec.weight, groups, {1, 2, 3, 5})}


def test_shrink_cuts_transposed_output_channels_exactly() -> None:
    model = _model(1)
    masks = _hand_masks(model, 1)
    x = torch.randn(2, 2, 5, 5)
    shrunk = shrink_model(model, masks, x)
    assert tuple(shrunk.enc.weight.shape) == (3, 2, 3, 3)
    assert tuple(shrunk.dec.weight.shape) == (3, 4, 2, 2) and tuple(shrunk.dec.bias.shape) == (4,)
    assert shrunk.bn.num_features == 4 and tuple(shrunk.head.weight.shape) == (3, 4, 1, 1)
    masked = _model(1)
    MaskSet(masks).apply_(masked)
    with torch.no_grad():
        error = float((shrunk(x) - masked(x)).abs().max())
        assert error <= 1e-5
        assert torch.equal(shrunk.dec.weight, masked.dec.weight[[0, 2, 3]][:, [1, 2, 3, 5]])


def test_shrink_of_a_grouped_transposed_conv_is_refused_in_one_line() -> None:
    model = _model(2)
    masks = _hand_masks(model, 2)
    plan = plan_shrink(model, masks, torch.randn(1, 2, 5, 5))
    assert any("grouped conv 'dec' (groups=2)" in p and "\n" not in p for p in plan.problems)
    with pytest.raises(PrunelabError, match="grouped"):
        shrink_model(model, masks, torch.randn(1, 2, 5, 5))


def test_sparse_init_rescales_a_transposed_conv_by_each_output_channels_fan_in() -> None:
    """Evci et al. 2022's sparse init: every OUTPUT unit's kept weights times sqrt(fan_in / kept_fan_in);
    a transposed conv's output channel o is weight[:, o] (groups=1), its fan-in in * kh * kw."""
    from prunelab.dst import RigL

    plain, scaled = _model(), _model()
    RigL(plain, 0.7).prepare()
    sparsifier = RigL(scaled, 0.7, sparse_init=True).prepare()
    mask, weight, before = sparsifier.masks["dec.weight"], scaled.dec.weight, plain.dec.weight
    for o in range(weight.shape[1]):
        kept = int(mask[:, o].sum())
        factor = (mask[:, o].numel() / max(kept, 1)) ** 0.5  # fan-in of channel o: 4 * 2 * 2 = 16
        torch.testing.assert_close(weight[:, o], before[:, o] * factor)


def test_shuffle_within_layers_permutes_transposed_output_channels() -> None:
    """The shuffle ablation with the model permutes whole output channels of a transposed conv."""
    from prunelab.methods.pai import shuffle_within_layers

    model = _model()
    weight = model.dec.weight
    masks = {"dec.weight": _channel_mask(weight, 1, {0, 3, 4})}
    shuffled = shuffle_within_layers(masks, 5, "channel", model=model)["dec.weight"]
    kept = [o for o in range(weight.shape[1]) if bool(_out_slice(shuffled, 1, o).all())]
    assert len(kept) == 3 and int(shuffled.sum()) == int(masks["dec.weight"].sum())
    assert torch.equal(shuffled, _channel_mask(weight, 1, set(kept)))
    with pytest.raises(PrunelabError, match="keeps parts"):  # without the model: grouped by input rows
        shuffle_within_layers(masks, 5, "channel")
