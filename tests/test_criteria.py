"""Criteria: exact values on hand-made cases, purity, and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.errors import PrunelabError

W23 = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])


def linear_with(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


# --- magnitude family ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("magnitude", {}, W23.abs()),
        ("l1", {}, W23.abs()),
        ("l2", {}, W23**2),
        ("lp", {"p": 3.0}, W23.abs() ** 3),
        ("lp", {}, W23**2),
    ],
)
def test_magnitude_family_element_scores(name, kwargs, expected):
    layer = linear_with(W23)
    scores = get_criterion(name, **kwargs)(layer, {"weight": layer.weight})
    assert scores["weight"].dtype == torch.float32
    torch.testing.assert_close(scores["weight"], expected, rtol=0, atol=1e-6)


def test_reduce_group_exact_numbers():
    # groups are rows: w = [[1, 2, 2], [3, 4, 0]] and [[3, 4, 5], [1, 6, 8]]
    torch.testing.assert_close(get_criterion("l1").reduce_group(torch.tensor([[1.0, 2, 2], [3, 4, 0]])),
                               torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(get_criterion("l2").reduce_group(torch.tensor([[1.0, 4, 4], [9, 16, 0]])),
                               torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(get_criterion("lp", p=3).reduce_group(torch.tensor([[27.0, 64, 125], [1, 216, 512]])),
                               torch.tensor([6.0, 9.0]))
    # default reduction (magnitude, taylor, obd, random): the sum, over the last dim only
    groups = torch.arange(12.0).reshape(2, 2, 3)
    torch.testing.assert_close(get_criterion("magnitude").reduce_group(groups), groups.sum(-1))


@pytest.mark.parametrize(("name", "kwargs", "norm_p"), [("l1", {}, 1.0), ("l2", {}, 2.0), ("lp", {"p": 3.0}, 3.0)])
def test_group_scores_are_group_norms(name, kwargs, norm_p):
    criterion = get_criterion(name, **kwargs)
    layer = linear_with(W23)
    groups = criterion(layer, {"weight": layer.weight})["weight"]  # rows = output neurons
    torch.testing.assert_close(criterion.reduce_group(groups), torch.linalg.vector_norm(W23, ord=norm_p, dim=1))


# --- random ----------------------------------------------------------------------------
def test_random_is_deterministic_per_seed():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = dict(model.named_parameters())
    a = get_criterion("random", seed=7)(model, params)
    b = get_criterion("random", seed=7)(model, params)
    c = get_criterion("random", seed=8)(model, params)
    for name in params:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
        assert a[name].min() >= 0 and a[name].max() < 1
    assert torch.equal(a["0.weight"], torch.rand(4, 3, generator=torch.Generator().manual_seed(7)))


# --- taylor ----------------------------------------------------------------------------
def test_taylor_single_batch_matches_hand_computation():
    # pred = x w^T + b with w = [1, 2], b = 0.5: pred = [3.5, 0.5], r = pred - y = [2.5, 0.5]
    # dL/dw = 2/n sum r_n x_n = [3.5, 2.0], dL/db = 3.0 -> |w g| = [3.5, 4.0], |b g_b| = 1.5
    layer = linear_with(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]))
    batch = (torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([[1.0], [0.0]]))
    scores = get_criterion("taylor")(layer, dict(layer.named_parameters()), ScoreData([batch], loss_fn=mse))
    torch.testing.assert_close(scores["weight"], torch.tensor([[3.5, 4.0]]))
    torch.testing.assert_close(scores["bias"], torch.tensor([1.5]))


def test_taylor_averages_absolute_values_over_batches_and_respects_max_batches():
    layer = linear_with(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]))
    first = (torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([[1.0], [0.0]]))  # g_w = [3.5, 2.0]
    second = (torch.tensor([[1.0, 1.0]]), torch.tensor([[5.5]]))  # r = -2: g_w = [-4, -4]
    params = dict(layer.named_parameters())
    both = get_criterion("taylor")(layer, params, ScoreData([first, second], loss_fn=mse))
    torch.testing.assert_close(both["weight"], torch.tensor([[(3.5 + 4.0) / 2, (4.0 + 8.0) / 2]]))
    one = get_criterion("taylor")(layer, params, ScoreData([first, second], loss_fn=mse, max_batches=1))
    torch.testing.assert_close(one["weight"], torch.tensor([[3.5, 4.0]]))


# --- obd -------------------------------------------------------------------------------
def regression_case():
    torch.manual_seed(0)
    layer = linear_with(torch.tensor([[0.5, -1.5, 2.0]]))
    batches = [(torch.randn(6, 3), torch.randn(6, 1)), (torch.randn(4, 3), torch.randn(4, 1))]
    return layer, batches


def test_obd_exact_matches_closed_form_hessian_of_linear_regression():
    # loss mean((Xw - y)^2) has H = 2 X^T X / n, so h_jj = 2 mean_n x_nj^2 (averaged over batches)
    layer, batches = regression_case()
    criterion = get_criterion("obd", hessian="exact", hvp_chunk=2)  # chunking: 2 + 1 basis vectors
    params = {"weight": layer.weight}
    data = ScoreData(batches, loss_fn=mse)
    h = torch.stack([2 * (x**2).mean(0) for x, _ in batches]).mean(0)[None]  # (1, 3)
    torch.testing.assert_close(criterion.hessian_diagonal(layer, params, data)["weight"], h, rtol=0, atol=1e-5)
    saliency = criterion(layer, params, data)["weight"]
    torch.testing.assert_close(saliency, 0.5 * h * layer.weight.detach() ** 2, rtol=0, atol=1e-5)


def test_obd_exact_matches_autograd_hessian_on_a_nonlinear_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    params = dict(model.named_parameters())
    diag = get_criterion("obd", hessian="exact", hvp_chunk=5).hessian_diagonal(model, params, ScoreData([(x, y)]))
    for name, p in params.items():
        def loss(t, name=name):
            return F.cross_entropy(torch.func.functional_call(model, {name: t}, (x,)), y)

        full = torch.autograd.functional.hessian(loss, p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(diag[name], full.diagonal().abs().reshape(p.shape), rtol=1e-4, atol=1e-6)


def test_obd_exact_uses_absolute_value_of_negative_diagonal():
    layer, batches = regression_case()
    data = ScoreData(batches[:1], loss_fn=lambda out, y: -(out**2).mean())  # H = -2 X^T X / n
    x = batches[0][0]
    diag = get_criterion("obd", hessian="exact").hessian_diagonal(layer, {"weight": layer.weight}, data)
    torch.testing.assert_close(diag["weight"], (2 * (x**2).mean(0))[None], rtol=0, atol=1e-5)


def per_sample_fisher(model, params, batches, loss_fn):
    """Reference: mean over all samples of squared per-sample gradients, by a plain loop."""
    reference = copy.deepcopy(model).eval()
    ref_params = dict(reference.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = loss_fn(reference(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, [ref_params[n] for n in params])
            for n, g in zip(params, grads):
                total[n] += g**2
            count += 1
    return {n: t / count for n, t in total.items()}


def fisher_case():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 3), torch.randint(0, 3, (5,))), (torch.randn(3, 3), torch.randint(0, 3, (3,)))]
    return model, batches


def test_obd_fisher_equals_mean_of_squared_per_sample_gradients():
    model, batches = fisher_case()
    params = dict(model.named_parameters())
    criterion = get_criterion("obd", hessian="fisher")
    diag = criterion.hessian_diagonal(model, params, ScoreData(batches))
    expected = per_sample_fisher(model, params, batches, F.cross_entropy)
    for name, p in params.items():
        torch.testing.assert_close(diag[name], expected[name], rtol=1e-5, atol=1e-7)
    scores = criterion(model, params, ScoreData(batches))
    torch.testing.assert_close(scores["0.weight"], 0.5 * expected["0.weight"] * params["0.weight"].detach() ** 2)


class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot trace it, so fisher falls back to a loop."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if bool(x.sum() > -1e9) else -self.inner(x)


def test_obd_fisher_loop_fallback_gives_the_same_numbers():
    model, batches = fisher_case()
    wrapped = Branchy(model)
    params = dict(wrapped.named_parameters())
    diag = get_criterion("obd", hessian="fisher").hessian_diagonal(wrapped, params, ScoreData(batches))
    expected = per_sample_fisher(model, dict(model.named_parameters()), batches, F.cross_entropy)
    torch.testing.assert_close(diag["inner.0.weight"], expected["0.weight"], rtol=1e-5, atol=1e-7)


def test_obd_auto_picks_exact_for_small_and_fisher_for_large_parameters():
    model, batches = fisher_case()
    params = dict(model.named_parameters())
    data = ScoreData(batches)
    auto = get_criterion("obd", exact_max_params=4).hessian_diagonal(model, params, data)  # biases (4, 3) exact
    exact = get_criterion("obd", hessian="exact").hessian_diagonal(model, params, data)
    fisher = get_criterion("obd", hessian="fisher").hessian_diagonal(model, params, data)
    for name, p in params.items():
        torch.testing.assert_close(auto[name], (exact if p.numel() <= 4 else fisher)[name])


# --- every registered criterion ----------------------------------------------------------
def purity_case():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3))
    model.train()
    model[2].eval()  # mixed modes must come back exactly as they were
    model[0].bias.requires_grad_(False)  # frozen parameters are scored too
    model[4].weight.grad = torch.full_like(model[4].weight, 0.25)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    data = ScoreData(DataLoader(TensorDataset(x, y), batch_size=4), max_batches=2)
    return model, data


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(n, {}) for n in CRITERIA.names()] + [("obd", {"hessian": "fisher"}), ("obd", {"hessian": "exact"})],
)
def test_every_criterion_is_pure_and_returns_float32_scores(name, kwargs):
    model, data = purity_case()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    requires = {n: p.requires_grad for n, p in params.items()}
    criterion = get_criterion(name, **kwargs)
    assert criterion.name == name
    scores = criterion(model, params, data if criterion.needs_data else None)
    assert set(scores) == set(params)
    for n, p in params.items():
        assert scores[n].shape == p.shape and scores[n].dtype == torch.float32 and scores[n].device == p.device
        assert not scores[n].requires_grad and scores[n].data_ptr() != p.data_ptr()
        assert torch.isfinite(scores[n]).all()
        assert p.requires_grad == requires[n]
    for k, v in model.state_dict().items():  # parameters and buffers (BN running stats)
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[4].weight.grad, torch.full_like(model[4].weight, 0.25))
    assert all(p.grad is None for n, p in params.items() if n != "4.weight")
    again = criterion(model, params, data if criterion.needs_data else None)
    for n in params:  # deterministic (eval mode, seeded): the same on every rank
        assert torch.equal(scores[n], again[n])


@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if CRITERIA.get(n).needs_data])
def test_data_criteria_without_data_raise(name):
    model, _ = purity_case()
    with pytest.raises(PrunelabError, match=f"criterion '{name}' needs data"):
        get_criterion(name)(model, dict(model.named_parameters()))


def test_registry_has_every_entry_and_unknown_name_lists_them():
    assert {"random", "magnitude", "l1", "l2", "lp", "taylor", "obd"} <= set(CRITERIA.names())
    with pytest.raises(PrunelabError) as info:
        get_criterion("magnitud")
    assert all(n in str(info.value) for n in CRITERIA.names())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: get_criterion("lp", p=0), "p=0"),
        (lambda: get_criterion("lp", p=-1.0), "expected a number > 0"),
        (lambda: get_criterion("obd", hessian="diag"), "auto, exact, fisher"),
        (lambda: get_criterion("obd", exact_max_params=-1), "exact_max_params"),
        (lambda: get_criterion("magnitude", p=2), "accepts: no options"),
        (lambda: get_criterion("obd", hesian="exact"), "accepts: hessian, exact_max_params, hvp_chunk"),
        (lambda: ScoreData([], max_batches=0), "max_batches=0"),
    ],
)
def test_bad_options_raise_one_line_errors(build, match):
    with pytest.raises(PrunelabError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_bad_data_raises():
    layer = linear_with(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]))
    params = dict(layer.named_parameters())
    batch = (torch.ones(2, 2), torch.ones(2, 1))
    with pytest.raises(PrunelabError, match="expected a scalar"):
        get_criterion("taylor")(layer, params, ScoreData([batch], loss_fn=lambda o, t: (o - t) ** 2))
    with pytest.raises(PrunelabError, match="no batches"):
        get_criterion("taylor")(layer, params, ScoreData([], loss_fn=mse))
    with pytest.raises(PrunelabError, match="not an \\(inputs, targets\\) pair"):
        get_criterion("obd")(layer, params, ScoreData([torch.ones(2, 2)], loss_fn=mse))
    with pytest.raises(PrunelabError, match="not in the model"):
        get_criterion("taylor")(layer, {"fc.weight": layer.weight}, ScoreData([batch], loss_fn=mse))
    assert layer.training and all(p.grad is None for p in params.values())


# --- tied weights ----------------------------------------------------------------------------
class TiedNet(nn.Module):
    """``emb`` and ``dec`` are two Linear modules sharing one weight (prunable_parameters lists both)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.emb = nn.Linear(3, 4, bias=False)
        self.hid = nn.Linear(4, 3, bias=False)
        self.dec = nn.Linear(3, 4, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N, 4)
        return self.dec(torch.tanh(self.hid(torch.relu(self.emb(x)))))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("taylor", {}), ("snip", {}), ("grasp", {"temperature": 1.0}), ("obd", {"hessian": "exact"}),
     ("obd", {"hessian": "fisher"}), ("movement", {}), ("synflow", {})],
)
def test_tied_weight_aliases_score_as_the_one_shared_tensor(name, kwargs):
    # Both FQNs of a tied weight used to crash functional_call ("got multiple values for keys ...
    # which are tied"; synflow: KeyError).  Now both aliases get the score of the shared tensor
    # (all its uses), exactly what scoring the first FQN alone gives.
    model = TiedNet()
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(6, 3, generator=gen), torch.randn(6, 4, generator=gen)
    data = ScoreData([(x[:3], y[:3]), (x[3:], y[3:])], loss_fn=mse)
    both = {"emb.weight": model.emb.weight, "hid.weight": model.hid.weight, "dec.weight": model.dec.weight}
    first = {"emb.weight": model.emb.weight, "hid.weight": model.hid.weight}
    criterion = get_criterion(name, **kwargs)
    scores, alone = criterion(model, both, data), criterion(model, first, data)
    torch.testing.assert_close(scores["dec.weight"], scores["emb.weight"], rtol=0, atol=0)
    if name != "snip":  # snip's normalising sum counts the shared tensor once per FQN: same ranking
        for n in first:
            torch.testing.assert_close(scores[n], alone[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_synflow_scores_a_tied_alias_that_named_parameters_skips():
    # A tied lm_head: prunable_parameters gives "dec.weight", named_parameters() only "emb.weight"
    # (was a KeyError 'dec.weight').
    model = TiedNet()
    synflow = get_criterion("synflow")
    alias = synflow(model, {"hid.weight": model.hid.weight, "dec.weight": model.dec.weight})
    canonical = synflow(model, {"hid.weight": model.hid.weight, "emb.weight": model.emb.weight})
    torch.testing.assert_close(alias["dec.weight"], canonical["emb.weight"], rtol=0, atol=0)
    torch.testing.assert_close(alias["hid.weight"], canonical["hid.weight"], rtol=0, atol=0)


# --- APoZ counts zeros of the post-ReLU activation (Hu et al. 2016) ------------------------------
def conv_bn_relu(dropout: bool = False) -> nn.Sequential:
    """1x1 conv (channel 0 = x, channel 1 = -x) -> BatchNorm (running mean [2, -2.5]) -> ReLU."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
        bn.running_mean.copy_(torch.tensor([2.0, -2.5]))
    middle = [nn.Dropout(0.5)] if dropout else []
    return nn.Sequential(conv, bn, *middle, nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


APOZ_X = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).reshape(1, 1, 2, 2)


@pytest.mark.parametrize("dropout", [False, True])
def test_apoz_counts_zeros_after_batchnorm_and_relu_not_of_the_conv_output(dropout):
    # conv: channel 0 = [1, -2, 3, 0], channel 1 = [-1, 2, -3, 0].  Pre-BN zeros (<= 0): 2/4 and 3/4
    # (the old count, scores [0.5, 0.25]).  BN(eval) subtracts [2, -2.5]: channel 0 = [-1, -4, 1, -2]
    # -> ReLU zeros 3/4, channel 1 = [1.5, 4.5, -0.5, 2.5] -> 1/4, so 1 - APoZ = [0.25, 0.75].
    model = conv_bn_relu(dropout)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = get_criterion("apoz")(model, {"0.weight": model[0].weight}, ScoreData([(APOZ_X, torch.zeros(1))]))
    torch.testing.assert_close(scores["0.weight"].reshape(2), torch.tensor([0.25, 0.75]), rtol=0, atol=0)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_apoz_of_a_linear_followed_by_relu_is_unchanged():
    # neuron 0 = x0 -> [1, -1, 0, 2] (2 of 4 zero after the ReLU), neuron 1 = x1 -> [2, 1, 3, -1] (1 of 4),
    # neuron 2 = -(x0 + x1) -> [-3, 0, -3, -1] (4 of 4): 1 - APoZ = [0.5, 0.75, 0]
    model = nn.Sequential(linear_with(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.zeros(3)),
                          nn.ReLU(inplace=True), nn.Linear(3, 2))
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.0, 3.0], [2.0, -1.0]])
    data = ScoreData([(x[:3], torch.zeros(3)), (x[3:], torch.zeros(1))])
    scores = get_criterion("apoz")(model, {"0.weight": model[0].weight, "0.bias": model[0].bias}, data)
    keep = torch.tensor([0.5, 0.75, 0.0])
    torch.testing.assert_close(scores["0.weight"], keep[:, None].expand(3, 2), rtol=0, atol=0)
    torch.testing.assert_close(scores["0.bias"], keep, rtol=0, atol=0)


class FunctionalReLU(nn.Module):
    """Linear (no bias) -> + offset (a parameter) -> a functional ReLU -> Linear."""

    def __init__(self, relu) -> None:
        super().__init__()
        self.fc = linear_with(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        self.offset = nn.Parameter(torch.tensor([-1.5, 0.0, 4.0]))
        self.out = nn.Linear(3, 2)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.fc(x) + self.offset))


@pytest.mark.parametrize("relu", [F.relu, torch.relu, lambda t: t.relu(), lambda t: F.relu(t, inplace=True)],
                         ids=["F.relu", "torch.relu", "method", "inplace"])
def test_apoz_follows_a_bias_add_to_a_functional_relu(relu):
    # fc(x) = [x0, x1, -(x0 + x1)] is [1, -1, 0, 2], [2, 1, 3, -1], [-3, 0, -3, -1] (old counts 2/4, 1/4, 4/4);
    # + offset [-1.5, 0, 4]: [-0.5, -2.5, -1.5, 0.5] -> 3/4, unchanged 1/4, [1, 4, 1, 3] -> 0/4
    model = FunctionalReLU(relu)
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.0, 3.0], [2.0, -1.0]])
    scores = get_criterion("apoz")(model, {"fc.weight": model.fc.weight}, ScoreData([(x, torch.zeros(4))]))
    torch.testing.assert_close(scores["fc.weight"][:, 0], torch.tensor([0.25, 0.75, 1.0]), rtol=0, atol=0)


class SharedReLU(nn.Module):
    """Two conv -> BN blocks sharing one ReLU module (as torchvision's ResNet blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        for bn in (self.bn1, self.bn2):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.weight.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def test_apoz_with_a_shared_relu_counts_each_layer_at_its_own_relu_call():
    model = SharedReLU().eval()
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h1 = model.relu(model.bn1(model.conv1(x)))
        h2 = model.relu(model.bn2(model.conv2(h1)))
    params = {"conv1.weight": model.conv1.weight, "conv2.weight": model.conv2.weight}
    scores = get_criterion("apoz")(model, params, ScoreData([(x, torch.zeros(4))]))
    for name, h in (("conv1.weight", h1), ("conv2.weight", h2)):
        expected = 1.0 - (h == 0).double().mean((0, 2, 3)).float()
        torch.testing.assert_close(scores[name][:, 0, 0, 0], expected, rtol=0, atol=0)


class UntraceableConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn_relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if bool(x.sum() > -1e9) else -self.body(x)


def test_apoz_falls_back_to_the_layer_output_without_a_relu_or_a_trace():
    data = ScoreData([(APOZ_X, torch.zeros(1))])
    pre_bn = torch.tensor([0.5, 0.25])  # 1 - (conv output <= 0): see the BatchNorm test above
    # conv -> max-pool with no ReLU (LeNet-5): the conv's own output, no warning
    pooled = nn.Sequential(conv_bn_relu()[0], nn.MaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = get_criterion("apoz")(pooled, {"0.weight": pooled[0].weight}, data)
    torch.testing.assert_close(scores["0.weight"].reshape(2), pre_bn, rtol=0, atol=0)
    # an untraceable forward: today's count, with a one-line warning
    model = UntraceableConvBN()
    with pytest.warns(UserWarning, match=r"apoz: UntraceableConvBN.forward cannot be traced by torch.fx \(") as caught:
        scores = get_criterion("apoz")(model, {"body.0.weight": model.body[0].weight}, data)
    assert all("\n" not in str(w.message) for w in caught)
    torch.testing.assert_close(scores["body.0.weight"].reshape(2), pre_bn, rtol=0, atol=0)


class OpaqueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.relu(h) if bool(h.sum() > -1e9) else h


def test_apoz_inside_an_untraceable_submodule_counts_its_layers_own_outputs_with_a_warning():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), OpaqueBranch(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    params = {"0.weight": model[0].weight, "3.fc.weight": model[3].fc.weight}
    with pytest.warns(UserWarning, match=r"apoz: module '3' \(TraceError.*the zeros of 3.fc are counted on their own"):
        scores = get_criterion("apoz")(model, params, ScoreData([(x, torch.zeros(16))]))
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))  # traced part: after BatchNorm and ReLU
        inner = model[3].fc(h)  # opaque part: the layer's own output
    torch.testing.assert_close(scores["0.weight"][:, 0], 1.0 - (h == 0).float().mean(0), rtol=0, atol=0)
    torch.testing.assert_close(scores["3.fc.weight"][:, 0], 1.0 - (inner <= 0).float().mean(0), rtol=0, atol=0)
