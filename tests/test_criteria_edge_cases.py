"""Criteria edge cases: exact batch counts, closed forms against independent references,
masked weights, and numerical corner cases."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.criteria import ScoreData, get_criterion
from prunelab.errors import PrunelabError


class CountingBatches:
    """A re-iterable list of batches that counts how many batches were drawn from it."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.drawn = 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


# --- data iteration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("taylor", {}), ("snip", {}), ("grasp", {}), ("obd", {"hessian": "exact"}), ("obd", {"hessian": "fisher"}),
     ("movement", {}), ("apoz", {})],
)
@pytest.mark.parametrize("max_batches", [1, 2])
def test_max_batches_draws_exactly_that_many_batches(name, kwargs, max_batches):
    # iter_batches used to fetch batch max_batches + 1 before stopping: one batch too many
    # was loaded (and lost for a one-pass iterator).
    model = mlp()
    gen = torch.Generator().manual_seed(1)
    source = CountingBatches([(torch.randn(5, 3, generator=gen), torch.randint(0, 2, (5,), generator=gen))
                              for _ in range(4)])
    get_criterion(name, **kwargs)(model, dict(model.named_parameters()), ScoreData(source, max_batches=max_batches))
    assert source.drawn == max_batches


def test_max_batches_leaves_the_rest_of_a_one_pass_iterator_unread():
    model = mlp()
    batches = [(torch.randn(2, 3), torch.randint(0, 2, (2,))) for _ in range(3)]
    stream = iter(batches)
    params = dict(model.named_parameters())
    first = get_criterion("taylor")(model, params, ScoreData(stream, max_batches=1))
    second = get_criterion("taylor")(model, params, ScoreData(stream, max_batches=1))  # must see batch 2, not 3
    only_second = get_criterion("taylor")(model, params, ScoreData(batches[1:2]))
    assert not torch.equal(first["0.weight"], second["0.weight"])
    for n in params:
        torch.testing.assert_close(second[n], only_second[n], rtol=0, atol=0)


def test_synflow_takes_its_input_shape_from_one_batch_only():
    model = mlp()
    source = CountingBatches([(torch.randn(2, 3), torch.zeros(2, dtype=torch.long)) for _ in range(3)])
    get_criterion("synflow")(model, dict(model.named_parameters()), ScoreData(source))
    assert source.drawn == 1


# --- closed forms against independent references ---------------------------------------------
def test_synflow_with_biases_matches_the_closed_form():
    # |.| everywhere, all-ones input: h = |W1| 1 + |b1|, R = |w2| . h + |b2|
    # s_W1 = |W1| ⊙ (|w2| 1^T), s_b1 = |b1| ⊙ |w2|, s_w2 = |w2| ⊙ h, s_b2 = |b2|
    w1, b1 = torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([-0.5, 1.0])
    w2, b2 = torch.tensor([[2.0, -1.0]]), torch.tensor([-3.0])
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(w1), model[0].bias.copy_(b1), model[2].weight.copy_(w2), model[2].bias.copy_(b2)
    h = w1.abs().sum(1) + b1.abs()  # [2.5, 3.5]
    expected = {"0.weight": w1.abs() * w2.abs()[0][:, None], "0.bias": b1.abs() * w2.abs()[0],
                "2.weight": w2.abs() * h, "2.bias": b2.abs()}
    peak = max(float(v.max()) for v in expected.values())  # 5.0, s_w2[0]
    scores = get_criterion("synflow")(model, dict(model.named_parameters()))
    for n, want in expected.items():
        torch.testing.assert_close(scores[n], want / peak)


def test_synflow_matches_tanaka_reference_with_batchnorm_and_a_pruned_kernel():
    # Tanaka et al.'s code: abs() of every state_dict entry, eval mode, all-ones input, sum, backward.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(12, 5))
    for _ in range(3):
        model(torch.randn(8, 2, 6, 6))  # non-trivial running statistics
    with torch.no_grad():
        model[0].weight[0, 0].zero_()  # an already-pruned kernel
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for value in reference.state_dict().values():
            value.abs_()
    reference(torch.ones(1, 2, 6, 6, dtype=torch.float64)).sum().backward()
    want = {n: (p.grad * p).detach().abs() for n, p in reference.named_parameters()}
    peak = max(float(v.max()) for v in want.values())
    scores = get_criterion("synflow", input_shape=(2, 6, 6))(model, dict(model.named_parameters()))
    for n in want:
        torch.testing.assert_close(scores[n].double(), want[n] / peak, rtol=1e-5, atol=1e-7)
    assert torch.equal(scores["0.weight"][0, 0], torch.zeros(3, 3))
    assert model.training and all(p.grad is None for p in model.parameters())


def test_grasp_over_unequal_batches_is_mean_of_per_batch_hessians_times_mean_gradient():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 3), torch.randint(0, 3, (5,))), (torch.randn(2, 3), torch.randint(0, 3, (2,)))]
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [math.prod(s) for s in shapes]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_on(x, y):
        def loss(flat):
            pieces = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
            return F.cross_entropy(torch.func.functional_call(model, pieces, (x,)), y)
        return loss

    g = sum(torch.autograd.functional.jacobian(loss_on(x, y), flat0) for x, y in batches) / 2
    hg = sum(torch.autograd.functional.hessian(loss_on(x, y), flat0) @ g for x, y in batches) / 2
    scores = get_criterion("grasp", temperature=1.0)(model, params, ScoreData(batches))
    for n, want, s in zip(names, (flat0 * hg).split(sizes), shapes):
        torch.testing.assert_close(scores[n], want.reshape(s), rtol=1e-4, atol=1e-7)


def test_obd_exact_diagonal_of_least_squares_with_bias():
    # mean((x w + b - y)^2): h_ww = 2 mean x^2, h_bb = 2 (bias enters linearly with coefficient 1)
    torch.manual_seed(5)
    layer = nn.Linear(2, 1)
    x, y = torch.randn(7, 2), torch.randn(7, 1)
    diag = get_criterion("obd", hessian="exact").hessian_diagonal(
        layer, dict(layer.named_parameters()), ScoreData([(x, y)], loss_fn=mse))
    torch.testing.assert_close(diag["weight"], 2 * (x**2).mean(0)[None], rtol=0, atol=1e-5)
    torch.testing.assert_close(diag["bias"], torch.tensor([2.0]), rtol=0, atol=1e-6)


# --- masked weights ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("magnitude", {}), ("taylor", {}), ("snip", {}), ("grasp", {}), ("obd", {"hessian": "exact"}),
     ("obd", {"hessian": "fisher"}), ("movement", {}), ("synflow", {})],
)
def test_pruned_weights_score_exactly_zero(name, kwargs):
    model = mlp()
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[2].weight[:, 0].zero_()
    gen = torch.Generator().manual_seed(6)
    data = ScoreData([(torch.randn(6, 3, generator=gen), torch.randint(0, 2, (6,), generator=gen))])
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    scores = get_criterion(name, **kwargs)(model, params, data)
    assert torch.equal(scores["0.weight"][1], torch.zeros(3))
    assert torch.equal(scores["2.weight"][:, 0], torch.zeros(2))
    assert all((s != 0).any() for s in scores.values())  # the unpruned weights are scored


# --- numerics ------------------------------------------------------------------------------------
def test_synflow_overflow_is_a_one_line_error_without_warnings():
    model = nn.Sequential(*[layer for _ in range(200) for layer in (nn.Linear(64, 64, bias=False), nn.ReLU())])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a tensor that requires grad used to warn
        with pytest.raises(PrunelabError, match="is out of float64.s range") as info:
            get_criterion("synflow")(model, dict(model.named_parameters()))
    assert "\n" not in str(info.value)


def test_synflow_fp32_range_is_not_a_limit():
    # 40 layers with a per-layer gain of ~64: R ~ 1e72, far beyond float32 (3.4e38)
    model = nn.Sequential(*[layer for _ in range(40) for layer in (nn.Linear(16, 16, bias=False), nn.ReLU())])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(4.0)
    scores = get_criterion("synflow")(model, dict(model.named_parameters()))
    for s in scores.values():  # every weight is on all paths equally: identical scores, normalised to 1
        torch.testing.assert_close(s, torch.ones_like(s))


def test_obd_fisher_of_least_squares_is_the_empirical_fisher_not_the_hessian():
    # per-sample l_n = (x_n w - y_n)^2: g_n = 2 r_n x_n, so the empirical Fisher is 4 mean r^2 x^2
    # (documented: not the Gauss-Newton / exact diagonal 2 mean x^2 of LeCun et al.)
    torch.manual_seed(7)
    layer = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(9, 3), torch.randn(9, 1)
    r = (layer(x) - y).detach()  # (9, 1)
    diag = get_criterion("obd", hessian="fisher").hessian_diagonal(
        layer, {"weight": layer.weight}, ScoreData([(x[:4], y[:4]), (x[4:], y[4:])], loss_fn=mse))
    torch.testing.assert_close(diag["weight"], (4 * r**2 * x**2).mean(0)[None], rtol=1e-5, atol=1e-6)


def test_obd_fisher_refuses_dict_inputs_in_one_line():
    # per-sample gradients run along dim 0 of a tensor batch; a dict batch was an AttributeError traceback
    class DictInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, batch):
            return self.fc(batch["x"])

    model = DictInput()
    data = ScoreData([({"x": torch.randn(4, 3)}, torch.randn(4, 1))], loss_fn=mse)
    with pytest.raises(PrunelabError, match=r"^obd's empirical Fisher needs ScoreData inputs that are tensors .* got a "
                                            r"dict; .*hessian='exact'\)$"):
        get_criterion("obd", hessian="fisher")(model, {"fc.weight": model.fc.weight}, data)
    exact = get_criterion("obd", hessian="exact")(model, {"fc.weight": model.fc.weight}, data)  # the way out works
    assert exact["fc.weight"].shape == (1, 3) and bool((exact["fc.weight"] >= 0).all())
