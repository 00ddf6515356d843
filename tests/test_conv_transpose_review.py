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
from prunelab.structure import Channel, NM, TransposedChannel, TransposedNM, get_granularity, layer_granularities


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
    assert NM(2, 4).for_layer(model.dec) == TransposedNM(2, 4, 2)  # blocks along dim 0, the input channels
    assert NM(2, 4).for_layer(model.enc) == NM(2, 4) and type(NM(2, 4).for_layer(model.enc)) is NM
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


def _nm_reference(weight: torch.Tensor, n: int, m: int, dim: int, magnitude: bool = True) -> torch.Tensor:
    """Brute force: keep the ``n`` largest ``|w|`` (``w`` itself if not ``magnitude``; ties: lower index) of every
    ``m`` consecutive entries along ``dim``."""
    w = weight.detach().abs() if magnitude else weight.detach()
    keep = torch.zeros(w.shape, dtype=torch.bool)
    for index in torch.cartesian_prod(*[torch.arange(s) for s in w.shape]).tolist():
        if index[dim] % m:
            continue  # visit each block once, from its first entry
        block = [list(index) for _ in range(m)]
        for t in range(m):
            block[t][dim] += t
        values = [float(w[tuple(b)]) for b in block]
        for t in sorted(range(m), key=lambda t: (-values[t], t))[:n]:
            keep[tuple(block[t])] = True
    return keep


def test_nm_applies_to_conv_transpose_weights_along_their_input_channels() -> None:
    model = _model(1, dec_out=6)  # dec (4, 6, 2, 2): 6 output channels, which 4 does not divide
    original = model.dec.weight.detach().clone()
    masks = Sparsifier(model, criterion="magnitude", granularity="2:4", exclude=["enc", "head"]).update(0.5)
    mask = masks["dec.weight"]  # (in=4, out=6, 2, 2): one block of 4 inputs per (output channel, kernel position)
    assert bool((mask.sum(dim=0) == 2).all())
    assert torch.equal(mask, _nm_reference(original, 2, 4, dim=0))
    assert torch.equal(model.dec.weight.detach(), original * mask)


@pytest.mark.parametrize("groups", [1, 2])
def test_nm_on_a_grouped_conv_transpose_blocks_each_groups_input_slice(groups: int) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 3 * groups, 2, groups=groups))
    original = model[2].weight.detach().clone()  # (8, 3, 2, 2): inputs 0-3 and 4-7 are the blocks (and groups)
    masks = Sparsifier(model, criterion="magnitude", granularity="2:4", exclude=["0"]).update(0.5)
    assert torch.equal(masks["2.weight"], _nm_reference(original, 2, 4, dim=0))
    assert int(masks["2.weight"].sum()) == original.numel() // 2


def test_nm_refuses_a_conv_transpose_whose_input_channels_it_does_not_divide() -> None:
    with pytest.raises(PrunelabError, match=r"M=4 does not divide the input dimension 6 \(its input channels, weight "
                                            r"dim 0\) of the transposed conv weight '0\.weight'.*exclude=\['0'\]"):
        Sparsifier(nn.Sequential(nn.ConvTranspose2d(6, 8, 2)), granularity="2:4")
    with pytest.raises(PrunelabError, match=r"does not divide the input dimension 2 input channels per group "
                                            r"\(weight dim 0 / groups=2\)"):
        Sparsifier(nn.Sequential(nn.ConvTranspose2d(4, 8, 2, groups=2)), granularity="2:4")
    with pytest.raises(PrunelabError, match=r"input dimension 6 of '0\.weight' \(shape \(8, 6, 1, 1\)\)"):
        Sparsifier(nn.Sequential(nn.Conv2d(6, 8, 1)), granularity="2:4")
    with pytest.raises(PrunelabError, match="groups=2"):
        TransposedNM(2, 4, 2).check("x.weight", (3, 3, 2, 2))
    with pytest.raises(PrunelabError, match="groups as an int"):
        TransposedNM(2, 4, 0)
    assert TransposedNM(2, 4, 2).describe() == "2:4" and TransposedNM(2, 4).sparsity == 0.5


def test_nm_masks_of_linear_and_conv_layers_still_block_along_weight_dim_1() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.ConvTranspose2d(4, 2, 1))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    masks = Sparsifier(model, criterion="magnitude", granularity="2:4").update(0.5)
    assert torch.equal(masks["0.weight"], _nm_reference(weights["0.weight"], 2, 4, dim=1))
    assert torch.equal(masks["2.weight"], _nm_reference(weights["2.weight"], 2, 4, dim=1))
    assert torch.equal(masks["3.weight"], _nm_reference(weights["3.weight"], 2, 4, dim=0))
    scores = torch.randn(4, 8, 3, 3)
    assert torch.equal(NM(2, 4).pattern_mask(scores), _nm_reference(scores, 2, 4, dim=1, magnitude=False))
    assert torch.equal(TransposedNM(2, 4).pattern_mask(scores), _nm_reference(scores, 2, 4, dim=0, magnitude=False))


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


# --- shrink without masks: the zeros are the sparsity, ConvTranspose output channels included -----------------
def _zeroed_model() -> tuple[EncDec, torch.Tensor]:
    """``_model(1)`` holding the zeros of ``_hand_masks`` (enc channel 1, dec output channels 0 and 4), plus
    scattered zeros inside kept dec channels (which cut nothing); returns it and the original dec weight."""
    model = _model(1)
    original = model.dec.weight.detach().clone()
    MaskSet(_hand_masks(model, 1)).apply_(model)
    with torch.no_grad():
        model.dec.weight[2, 1, 0, 0] = 0.0  # one zero in kept output channel 1
        model.dec.weight[:, 3, 1] = 0.0     # a zero kernel row in kept output channel 3
    return model, original


def test_shrink_without_masks_cuts_whole_zero_conv_transpose_output_channels() -> None:
    from prunelab.materialise import materialise

    model, original = _zeroed_model()
    x = torch.randn(2, 2, 5, 5)
    new = materialise(model, "shrink", example_input=x)
    assert tuple(new.enc.weight.shape) == (3, 2, 3, 3)  # enc channel 1 (= dec input 1) cut, as before
    assert tuple(new.dec.weight.shape) == (3, 4, 2, 2) and tuple(new.dec.bias.shape) == (4,)  # dec outputs 0, 4 cut
    assert new.bn.num_features == 4 and tuple(new.head.weight.shape) == (3, 4, 1, 1)
    expected = original[[0, 2, 3]][:, [1, 2, 3, 5]].clone()  # brute force: kept inputs 0, 2, 3; outputs 1, 2, 3, 5
    expected[1, 0, 0, 0] = 0.0  # dec.weight[2, 1, 0, 0]: input 2 -> row 1, output 1 -> column 0
    expected[:, 2, 1] = 0.0     # output 3 -> column 2
    assert torch.equal(new.dec.weight, expected)
    with torch.no_grad():
        assert float((new(x) - model(x)).abs().max()) <= 1e-5


def test_shrink_without_masks_equals_shrink_with_the_channel_masks() -> None:
    from prunelab.materialise import materialise

    model = _model(1)
    masks = _hand_masks(model, 1)
    MaskSet(masks).apply_(model)
    x = torch.randn(2, 2, 5, 5)
    with_masks = materialise(model, "shrink", masks=masks, example_input=x)
    from_zeros = materialise(model, "shrink", example_input=x)
    for (name, a), (_, b) in zip(with_masks.state_dict().items(), from_zeros.state_dict().items()):
        assert torch.equal(a, b), name


# --- shrink-plan messages name a transposed conv's output channels --------------------------------------------
def test_shrink_problems_call_a_conv_transposes_output_channels_so() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2, stride=2))
    mask = torch.ones_like(model[2].weight, dtype=torch.bool)
    mask[:, 1:3] = False  # output channels 1 and 2 of the model's output layer
    plan = plan_shrink(model, {"2.weight": mask}, torch.randn(1, 2, 3, 3))
    assert plan.problems[0].startswith("mask of '2.weight' prunes 2 of 4 output channels, which are the model's "
                                       "output; model outputs cannot be removed")
    linear = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    rows = torch.ones(4, 4, dtype=torch.bool)
    rows[1:3] = False
    plan = plan_shrink(linear, {"2.weight": rows}, torch.randn(1, 3))
    assert plan.problems[0].startswith("mask of '2.weight' prunes 2 of 4 rows whose channels are the model's output")


def test_shrink_problem_of_an_unused_conv_transpose_counts_its_output_and_input_channels() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.spare = nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(4, 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = Unused()
    mask = torch.ones_like(model.spare.weight, dtype=torch.bool)  # (4, 3, 2, 2)
    mask[:, 0] = False  # output channel 0
    mask[3] = False     # input channel 3
    plan = plan_shrink(model, {"spare.weight": mask}, torch.randn(1, 2, 3, 3))
    assert any(p.startswith("mask of 'spare.weight' prunes 1 output channels and 1 input channels but shrink cannot "
                            "cut them: layer 'spare' is not called") for p in plan.problems), plan.problems


# --- Deep Compression: ConvTranspose weights are weight-shared like conv weights -------------------------------
def test_quantizable_layers_count_a_conv_transpose_as_a_conv() -> None:
    from prunelab.compress.quantize import DEFAULT_BITS, quantizable_layers, resolve_bits

    model = nn.Sequential(nn.Linear(3, 4), nn.ConvTranspose1d(4, 2, 2), nn.ConvTranspose3d(2, 2, 1), nn.Conv2d(2, 2, 1))
    layers = quantizable_layers(model)
    assert layers == {"0.weight": "fc", "1.weight": "conv", "2.weight": "conv", "3.weight": "conv"}
    assert resolve_bits(None, layers, DEFAULT_BITS) == {"0.weight": 5, "1.weight": 8, "2.weight": 8, "3.weight": 8}


def test_compressed_conv_transpose_with_its_mask_decodes_exactly(tmp_path) -> None:
    import copy

    from prunelab.compress import read_compressed, write_compressed
    from prunelab.compress.quantize import quantize_model

    model = _model(1)
    with torch.no_grad():  # dec holds exactly 4 distinct values: 2 bits reproduce them, nothing is clustered
        levels = torch.tensor([-0.5, -0.25, 0.25, 0.75])
        model.dec.weight.copy_(levels[torch.arange(model.dec.weight.numel()) % 4].reshape(model.dec.weight.shape))
    keep = _channel_mask(model.dec.weight, 1, {0, 2, 3, 5})
    write_compressed(tmp_path / "m.plc", copy.deepcopy(model), {"dec.weight": keep}, bits=2)
    state = read_compressed(tmp_path / "m.plc")
    assert torch.equal(state["dec.weight"], model.dec.weight.detach() * keep)  # hand-made: exact, pruned are 0
    # and with k-means (3 bits over 96 distinct values) the file decodes to the in-place quantised model
    model = _model(1)
    write_compressed(tmp_path / "k.plc", copy.deepcopy(model), {"dec.weight": keep}, bits=3)
    state = read_compressed(tmp_path / "k.plc")
    books = quantize_model(model, {"dec.weight": keep}, bits=3)
    assert torch.equal(state["dec.weight"], model.dec.weight.detach()) and books["dec.weight"].centroids.numel() == 8
    assert not state["dec.weight"][~keep].any() and state["dec.weight"].unique().numel() <= 9  # 8 centroids and 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_compress_refuses_a_mask_of_no_layer_naming_conv_transpose_in_the_fix(tmp_path) -> None:
    from prunelab.compress import write_compressed

    model = _model(1)
    with pytest.raises(PrunelabError, match=r"mask 'bn\.weight' is not the weight of a Linear/Conv/ConvTranspose layer"):
        write_compressed(tmp_path / "m.plc", model, {"bn.weight": torch.ones(6, dtype=torch.bool)})
