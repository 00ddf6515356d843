"""APoZ, movement, network slimming and LASSO-regression channel pruning: exact values on
hand-made cases, the paper's mechanics, purity, and Sparsifier integration."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab
from prunelab.bench.models import build_model
from prunelab.bench.training import TrainConfig, train
from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.criteria.movement import Movement, MovementAccumulator
from prunelab.criteria.links import bn_pairs, consumers
from prunelab.criteria.regression import regression_channel_prune
from prunelab.criteria.slimming import SlimmingLoss, bn_l1_loss, bn_l1_penalty_
from prunelab.errors import PrunelabError

NEW = ("apoz", "movement", "slimming", "regression")


def linear_with(weight, bias=None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def mse(outputs, targets):
    return ((outputs - targets) ** 2).mean()


def conv_bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )


def conv_data(n: int = 8, seed: int = 1) -> ScoreData:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return ScoreData([(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])])


# --- APoZ ----------------------------------------------------------------------------------
def test_apoz_equals_hand_computed_fraction_of_zeros():
    # out = x W^T: neuron 0 = x0 -> [1, -1, 0, 2] (2 of 4 <= 0), neuron 1 = x1 -> [2, 1, 3, -1]
    # (1 of 4), neuron 2 = -(x0 + x1) -> [-3, 0, -3, -1] (4 of 4)
    layer = linear_with(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.zeros(3))
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.0, 3.0], [2.0, -1.0]])
    data = ScoreData([(x[:3], torch.zeros(3)), (x[3:], torch.zeros(1))])  # counts accumulate over batches
    scores = get_criterion("apoz")(layer, dict(layer.named_parameters()), data)
    keep = torch.tensor([0.5, 0.75, 0.0])  # 1 - APoZ
    torch.testing.assert_close(scores["weight"], keep[:, None].expand(3, 2))
    torch.testing.assert_close(scores["bias"], keep)
    torch.testing.assert_close(get_criterion("apoz").reduce_group(scores["weight"]), keep)
    first = get_criterion("apoz")(layer, {"weight": layer.weight}, ScoreData(data.batches, max_batches=1))
    torch.testing.assert_close(first["weight"][:, 0], torch.tensor([1 / 3, 1.0, 0.0]))


def test_apoz_counts_spatial_positions_of_conv_channels():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).reshape(1, 1, 2, 2)  # channel 0 = x, channel 1 = -x
    scores = get_criterion("apoz")(conv, {"weight": conv.weight}, ScoreData([(x, torch.zeros(1))]))
    torch.testing.assert_close(scores["weight"].reshape(2), torch.tensor([2 / 4, 1 / 4]))


def test_apoz_scores_a_transposed_conv_along_its_output_channel_dim():
    # ConvTranspose2d weight is (in, out, kh, kw): the score of output channel c belongs to
    # weight[:, c], not to row weight[c] (which was filled silently when in == out).
    deconv = nn.ConvTranspose2d(3, 3, 2, stride=2)
    with torch.no_grad():
        deconv.weight.zero_()
        deconv.bias.copy_(torch.tensor([1.0, -1.0, 1.0]))  # output channel 1 is always <= 0
    data = ScoreData([(torch.randn(2, 3, 4, 4), torch.zeros(2))])
    scores = get_criterion("apoz")(deconv, dict(deconv.named_parameters()), data)
    expected = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(scores["weight"], expected.reshape(1, 3, 1, 1).expand(3, 3, 2, 2))
    torch.testing.assert_close(scores["bias"], expected)
    grouped = nn.ConvTranspose2d(4, 4, 2, groups=2)
    with pytest.raises(PrunelabError, match="transposed conv with groups=2"):
        get_criterion("apoz")(grouped, {"weight": grouped.weight},
                              ScoreData([(torch.randn(1, 4, 3, 3), torch.zeros(1))]))


def test_apoz_neuron_pruning_removes_the_dead_neuron():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[2] = -100.0  # neuron 2 never fires
    data = ScoreData([(torch.randn(16, 3), torch.randint(0, 2, (16,)))])
    sparsifier = prunelab.Sparsifier(model, criterion="apoz", granularity="neuron", allocation="uniform",
                                     exclude=["2"], data=data).prepare()
    masks = sparsifier.update(0.25)
    assert masks["0.weight"].all(1).tolist() == [True, True, False, True]


# --- movement -------------------------------------------------------------------------------
def test_movement_accumulator_sums_minus_w_times_g_over_steps():
    layer = linear_with(torch.tensor([[1.0, -2.0]]))
    acc = MovementAccumulator({"weight": layer.weight})
    steps = [  # (weights at the step, gradient)
        (torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])),
        (torch.tensor([[0.5, -3.0]]), torch.tensor([[-2.0, 0.25]])),
    ]
    for w, g in steps:
        with torch.no_grad():
            layer.weight.copy_(w)
        layer.weight.grad = g.clone()
        acc(7)  # the after_step form
    expected = -(steps[0][0] * steps[0][1] + steps[1][0] * steps[1][1])  # [[-0.5 + 1, 2 + 0.75]]
    torch.testing.assert_close(acc.scores()["weight"], expected)
    assert acc.steps == 2
    scores = Movement(accumulator=acc)(layer, {"weight": layer.weight})  # needs no data
    torch.testing.assert_close(scores["weight"], expected)
    acc.reset()
    assert acc.steps == 0 and not acc.totals["weight"].any()
    with pytest.raises(PrunelabError, match="no updates yet"):
        Movement(accumulator=acc)(layer, {"weight": layer.weight})


def test_movement_one_pass_is_minus_w_g_summed_over_batches():
    # as in the taylor test: g_w = [3.5, 2.0] on the first batch, [-4, -4] on the second
    layer = linear_with(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]))
    first = (torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([[1.0], [0.0]]))
    second = (torch.tensor([[1.0, 1.0]]), torch.tensor([[5.5]]))
    scores = get_criterion("movement")(layer, {"weight": layer.weight}, ScoreData([first, second], loss_fn=mse))
    torch.testing.assert_close(scores["weight"], torch.tensor([[-3.5 + 4.0, -4.0 + 8.0]]))


def test_movement_accumulator_as_train_after_step_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    loader = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), batch_size=4)
    acc = MovementAccumulator(model)  # tracks the Linear weights
    assert list(acc.params) == ["0.weight", "2.weight"]
    train(model, loader, TrainConfig(epochs=1, lr=0.1, progress=False), after_step=acc)
    assert acc.steps == 3 and all(t.abs().sum() > 0 for t in acc.totals.values())  # .grad was populated
    scores = Movement(accumulator=acc)(model, acc.params)
    assert torch.equal(scores["2.weight"], acc.totals["2.weight"])


# --- network slimming ----------------------------------------------------------------------
def test_slimming_scores_are_abs_gamma_of_the_following_batchnorm():
    model = conv_bn_net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 0.0]))
        model[4].weight.copy_(torch.linspace(0.6, 1.1, 6))
    assert bn_pairs(model) == {"0": "1", "3": "4"} and consumers(model) == {"0": "3"}
    params = dict(model.named_parameters())
    criterion = get_criterion("slimming")
    with pytest.warns(UserWarning, match="7.weight, 7.bias"):
        scores = criterion(model, params)
    gamma = torch.tensor([0.5, 2.0, 0.1, 0.0])
    torch.testing.assert_close(scores["0.weight"], gamma.reshape(4, 1, 1, 1).expand(4, 2, 3, 3))
    torch.testing.assert_close(criterion.reduce_group(scores["0.weight"].reshape(4, -1)), gamma)
    torch.testing.assert_close(scores["0.bias"], gamma)
    torch.testing.assert_close(scores["1.weight"], gamma)
    torch.testing.assert_close(scores["3.weight"][:, 0, 0, 0], model[4].weight.detach().abs())
    torch.testing.assert_close(scores["7.weight"], model[7].weight.detach().abs())  # fallback l1
    with pytest.raises(PrunelabError, match="7.weight.*exclude") as info:
        get_criterion("slimming", fallback="error")(model, params)
    assert "\n" not in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded layers: no fallback, no warning
        sparsifier = prunelab.Sparsifier(model, criterion="slimming", granularity="channel", exclude=["7"]).prepare()
        masks = sparsifier.update(36 / 288)  # 2 x 18 of 288 weights: the two smallest |gamma| of one global order
    assert masks["0.weight"].all((1, 2, 3)).tolist() == [True, True, False, False]
    assert masks["3.weight"].all()


class Branchy(nn.Module):
    """Data-dependent control flow defeats fx: pairing falls back to module order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.bn(self.fc(x)))
        return self.out(h) if bool(x.sum() > -1e9) else -self.out(h)


def test_pairing_falls_back_to_module_order_without_fx():
    model = Branchy()
    assert bn_pairs(model) == {"fc": "bn"} and consumers(model) == {"fc": "out"}


def test_bn_l1_penalty_adds_strength_times_sign_gamma():
    model = conv_bn_net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0, 3.0]))
    x = torch.randn(4, 2, 4, 4)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    bn_l1_penalty_(model, 0.01)
    for name, p in model.named_parameters():
        expected = before[name] + 0.01 * torch.sign(p.detach()) if name in ("1.weight", "4.weight") else before[name]
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)
    assert model[1].weight.grad[2] == before["1.weight"][2]  # sign(0) = 0
    loss = bn_l1_loss(model, 0.01)
    torch.testing.assert_close(loss, 0.01 * (model[1].weight.abs().sum() + model[4].weight.abs().sum()))
    model.zero_grad()
    loss.backward()
    torch.testing.assert_close(model[1].weight.grad, 0.01 * torch.sign(model[1].weight.detach()))
    combined = SlimmingLoss(model, 0.01)(model(x), torch.tensor([0, 1, 2, 0]))
    assert combined.dim() == 0
    with pytest.raises(PrunelabError, match="no(ne)?"):
        bn_l1_loss(nn.Sequential(nn.Linear(2, 2)), 0.01)
    with pytest.raises(PrunelabError, match=">= 0"):
        bn_l1_penalty_(model, -1.0)


# --- regression (He et al. 2017) ----------------------------------------------------------
def regression_net(dead=(2, 3), consumer_scale=None, relu=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU() if relu else nn.Identity(), nn.Linear(4, 2))
    with torch.no_grad():
        for c in dead:
            model[0].bias[c] = -100.0  # channel c is always 0 after the ReLU: Y depends on the others only
        if consumer_scale is not None:
            model[2].weight.mul_(consumer_scale)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, ScoreData([(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))])


def test_regression_keeps_the_two_channels_y_depends_on_and_reconstructs_exactly():
    model, x, data = regression_net()
    before = model(x).detach()
    result = regression_channel_prune(model, "0", None, data, 2)
    assert result.consumer == "2" and result.keep.tolist() == [True, True, False, False]
    assert result.relative_error < 1e-10 and result.beta[2:].eq(0).all()
    assert torch.equal(model(x), before)  # nothing changed before apply
    result.apply(model)
    assert not model[0].weight[2:].any() and not model[0].bias[2:].any()
    assert not model[2].weight[:, 2:].any()
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4)
    masks = result.masks(model)
    assert masks["0.weight"].all(1).tolist() == [True, True, False, False]
    assert masks["2.weight"].all(0).tolist() == [True, True, False, False]


def test_regression_lasso_picks_the_channels_with_large_contributions():
    # no ReLU, all 4 channels live, but the consumer barely reads channels 1 and 3
    model, _x, data = regression_net(dead=(), consumer_scale=torch.tensor([1.0, 1e-3, 1.0, 1e-3]), relu=False)
    result = regression_channel_prune(model, "0.weight", "2", data, 0.5)
    assert result.keep.tolist() == [True, False, True, False]
    assert result.relative_error < 1e-4


def test_least_squares_compensates_a_redundant_channel():
    # channel 2 = 2 * channel 0 (a copy), channel 3 dead: two channels carry all of Y, and
    # least squares moves channel 2's weight onto channel 0 when 2 is dropped (or vice versa)
    model, x, data = regression_net(dead=(3,))  # relu(2 z) = 2 relu(z): the copy survives the ReLU
    with torch.no_grad():
        model[0].weight[2] = 2 * model[0].weight[0]
        model[0].bias[2] = 2 * model[0].bias[0]
    before = model(x).detach()
    result = regression_channel_prune(model, "0", "2", data, 2)
    assert result.keep[1] and not result.keep[3] and result.relative_error < 1e-10
    result.apply(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4)


def test_regression_conv_to_conv_via_unfold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        model[0].bias[1] = -100.0
        model[0].bias[3] = -100.0
    x = torch.randn(6, 2, 6, 6)
    before = model(x).detach()
    result = regression_channel_prune(model, "0", None, ScoreData([(x, torch.zeros(6))]), 2)
    assert result.consumer == "3" and result.keep.tolist() == [True, False, True, False]
    assert result.relative_error < 1e-10
    result.apply(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4)


def test_regression_criterion_scores_producer_rows_and_drives_the_sparsifier():
    model, _x, data = regression_net(dead=(1,))
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning, match="2.weight, 2.bias"):
        scores = get_criterion("regression")(model, params, data)
    rows = scores["0.weight"][:, 0]
    assert torch.equal(scores["0.weight"], rows[:, None].expand(4, 3)) and torch.equal(scores["0.bias"], rows)
    assert rows[1] == 0 and (rows[[0, 2, 3]] > 0).all() and rows.max() <= 1
    magnitude = model[2].weight.detach().abs()
    torch.testing.assert_close(scores["2.weight"], magnitude / magnitude.max())
    with pytest.raises(PrunelabError, match="fallback='l1'"):
        get_criterion("regression", fallback="error")(model, params, data)
    sparsifier = prunelab.Sparsifier(model, criterion="regression", granularity="channel", allocation="uniform",
                                     exclude=["2"], data=data).prepare()
    assert not sparsifier.update(0.25)["0.weight"][1].any()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, d: regression_channel_prune(m, "1", None, d, 2), "not a Linear/Conv"),
        (lambda m, d: regression_channel_prune(m, "2", None, d, 1), "no consumer"),
        (lambda m, d: regression_channel_prune(m, "0", "2", d, 5), "expected 1..4"),
        (lambda m, d: regression_channel_prune(m, "0", "2", d, 1.5), r"\(0, 1\]"),
        (lambda m, d: regression_channel_prune(m, "0", "2", [], 2), "expected ScoreData"),
        (lambda m, d: get_criterion("regression", num_alphas=1), "num_alphas"),
        (lambda m, d: get_criterion("slimming", fallback="zero"), "l1, error"),
        (lambda m, d: Movement(accumulator="acc"), "MovementAccumulator"),
    ],
)
def test_bad_inputs_raise_one_line_errors(call, match):
    model, _x, data = regression_net()
    with pytest.raises(PrunelabError, match=match) as info:
        call(model, data)
    assert "\n" not in str(info.value)


# --- every new criterion: purity and the sparsifier ------------------------------------------
def grad_set_net():
    model = conv_bn_net()
    model.train()
    model[1].eval()  # mixed modes must come back exactly as they were
    model[0].bias.requires_grad_(False)
    model[7].weight.grad = torch.full_like(model[7].weight, 0.25)
    return model


@pytest.mark.parametrize("name", NEW)
def test_new_criteria_are_pure_on_a_conv_bn_model(name):
    model = grad_set_net()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    criterion = get_criterion(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallback notices for the classifier
        scores = criterion(model, params, conv_data())
        again = criterion(model, params, conv_data())
    for n, p in params.items():
        assert scores[n].shape == p.shape and scores[n].dtype == torch.float32 and torch.isfinite(scores[n]).all()
        assert torch.equal(scores[n], again[n])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[7].weight.grad, torch.full_like(model[7].weight, 0.25))
    assert all(p.grad is None for n, p in params.items() if n != "7.weight")
    assert not params["0.bias"].requires_grad


def test_movement_with_accumulator_is_pure():
    model = grad_set_net()
    acc = MovementAccumulator(model)
    acc.update()  # only 7.weight has a grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = Movement(accumulator=acc)(model, acc.params)
    torch.testing.assert_close(scores["7.weight"], -model[7].weight.detach() * 0.25)
    assert not scores["0.weight"].any()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", NEW)
def test_new_criteria_prune_channels_through_the_sparsifier(name):
    assert name in CRITERIA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = conv_bn_net()
        masks = prunelab.Sparsifier(model, criterion=name, granularity="channel", allocation="uniform",
                                    data=conv_data()).prepare().update(0.5)
        digits = build_model("digits_mlp", (64,), 10)
        gen = torch.Generator().manual_seed(3)
        data = ScoreData([(torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen))])
        digit_masks = prunelab.Sparsifier(digits, criterion=name, granularity="neuron", allocation="uniform",
                                          exclude=["fc3"],
                                          data=data).prepare().update(0.5)
    for ms in (masks, digit_masks):
        for mask in ms.values():
            rows = mask.reshape(mask.shape[0], -1)
            assert torch.equal(rows.all(1), rows.any(1)) and rows.any()
    assert abs(digit_masks.stats().sparsity - 0.5) < 0.01


def _consumer_gram(model, x):
    """``sum_rows [h, 1]^T [h, 1]`` of the consumer's (``model[2]``) input rows ``h``, by hand."""
    h = model[1](model[0](x)).detach().double()  # (rows, 4)
    aug = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    return aug.T @ aug


def test_regression_input_gram_is_an_exact_sum_with_an_integer_row_count():
    from prunelab.criteria.regression import collect_input_grams

    model, x, data = regression_net()
    stats = collect_input_grams(model, ["2"], data)["2"]
    assert type(stats.rows) is int and stats.rows == 64
    assert stats.gram.dtype == torch.float64
    torch.testing.assert_close(stats.gram, _consumer_gram(model, x), rtol=1e-12, atol=1e-10)


def test_regression_input_gram_sums_over_ranks(monkeypatch):
    """Two ranks holding the same batches (a faked SUM all-reduce that doubles): the Gram and
    the row count are sums, the count an exact integer -- not a mean of counts, rounded."""
    import torch.distributed as dist

    from prunelab.criteria.regression import collect_input_grams

    model, x, data = regression_net()
    seen = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM, **_):
        assert op == dist.ReduceOp.SUM
        seen.append(tensor.dtype)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stats = collect_input_grams(model, ["2"], data)["2"]
    assert type(stats.rows) is int and stats.rows == 2 * 64
    torch.testing.assert_close(stats.gram, 2 * _consumer_gram(model, x), rtol=1e-12, atol=1e-10)
    assert torch.int64 in seen  # the count travels as an integer
