"""Review of pruning at initialisation and per-layer allocation: SynFlow numerics on deep nets,
SNIP / GraSP / FORCE on a hand-computed network with biases, tiny layers under uniform / ERK,
purity of PaI scoring, and the errors of the PaI runners."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.allocation import LayerBudget, allocate, get_allocation, keep_budget
from prunelab.bench.training import TrainConfig
from prunelab.criteria import ScoreData, get_criterion
from prunelab.errors import PrunelabError
from prunelab.methods import METHODS, PruneSpec
from prunelab.methods.pai import ForceSaliency, _input_shape, reinitialise_kept

NO_TRAINING = TrainConfig(epochs=0, progress=False)


# --- SynFlow on deep networks -----------------------------------------------------------------------
def linear_stack(depth: int, width: int, bias: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width, bias=bias), nn.ReLU())])


def log_synflow(model: nn.Sequential) -> dict[str, torch.Tensor]:
    """Exact log-scores of a bias-free ReLU chain, independent of overflow: with forward path sums
    v_l = |W_l| v_{l-1} (v_0 = 1) and backward ones u_{l-1} = |W_l|^T u_l (u_L = 1), the score of
    W_l[i, j] is |W_l[i, j]| u_l[i] v_{l-1}[j]; every vector is renormalised and its log scale kept."""
    weights = {f"{i}.weight": m.weight.detach().double().abs() for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    names = list(weights)
    v, log_v = [torch.ones(weights[names[0]].shape[1], dtype=torch.float64)], [0.0]
    for n in names:
        nxt = weights[n] @ v[-1]
        v.append(nxt / nxt.sum())
        log_v.append(log_v[-1] + math.log(float(nxt.sum())))
    u, log_u = [torch.ones(weights[names[-1]].shape[0], dtype=torch.float64)], [0.0]
    for n in reversed(names):
        prv = weights[n].T @ u[0]
        u.insert(0, prv / prv.sum())
        log_u.insert(0, log_u[0] + math.log(float(prv.sum())))
    # layer l (0-based) sits between v[l] (its input) and u[l + 1] (its output)
    return {n: weights[n].log() + (u[l + 1].log() + log_u[l + 1])[:, None] + (v[l].log() + log_v[l])[None, :]
            for l, n in enumerate(names)}


def test_synflow_on_a_60_layer_stack_equals_the_exact_scores_where_float32_overflows():
    # default init, width 100: every layer multiplies the flow by ~100 * E|w| = 5, so R ~ 5^60 ~ 1e42
    model = linear_stack(60, 100, bias=False)
    with torch.no_grad():
        flow32 = torch.ones(1, 100)
        for m in model:
            flow32 = flow32 @ m.weight.abs().T if isinstance(m, nn.Linear) else flow32
    assert torch.isinf(flow32).any()  # a float32 computation would have no scores at all
    params = {n: p for n, p in model.named_parameters()}
    scores = get_criterion("synflow", input_shape=(100,))(model, params)
    exact = log_synflow(model)
    peak = max(float(e.max()) for e in exact.values())
    for n in params:
        torch.testing.assert_close(scores[n].double(), (exact[n] - peak).exp(), rtol=2e-5, atol=0)
    # the ranking: the top 5% over all layers are the same weights
    flat_scores = torch.cat([scores[n].reshape(-1) for n in params])
    flat_exact = torch.cat([exact[n].reshape(-1) for n in params])
    k = flat_scores.numel() // 20
    assert torch.equal(torch.topk(flat_scores, k).indices.sort().values, torch.topk(flat_exact, k).indices.sort().values)


def test_synflow_with_biases_on_a_deep_stack_matches_a_float64_reference():
    model = linear_stack(50, 100, bias=True, seed=1)
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    scores = get_criterion("synflow")(model, params)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.abs_()
    reference(torch.ones(1, 100, dtype=torch.float64)).sum().backward()
    want = {n: (p * p.grad).detach().abs() for n, p in reference.named_parameters() if n in params}
    peak = max(float(w.max()) for w in want.values())
    for n in params:
        torch.testing.assert_close(scores[n].double(), want[n] / peak, rtol=1e-5, atol=1e-12)


def test_synflow_out_of_float64_range_is_a_one_line_error():
    too_deep = linear_stack(500, 100, bias=False)  # R ~ 5^500 ~ 1e349
    with pytest.raises(PrunelabError, match="out of float64's range"):
        get_criterion("synflow")(too_deep, dict(too_deep.named_parameters()))
    tiny = linear_stack(60, 100, bias=False)  # R ~ (5e-6)^60 ~ 1e-318: a subnormal, most digits lost
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(1e-6)
    with pytest.raises(PrunelabError, match="below its smallest normal number"):
        get_criterion("synflow")(tiny, dict(tiny.named_parameters()))
    # a pruned weight (0) before amplifying layers: R = 0 is finite, but dR/dw = 1e400 is not, and the score
    # 0 * inf was NaN (the allocator then blamed "NaN weights, gradients or data")

    class Amplified(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (nn.Linear(1, 1, bias=False) for _ in range(3))

        def forward(self, x):
            return self.c(self.b(self.a(x)) * 1e200) * 1e200

    model = Amplified()
    with torch.no_grad():
        model.a.weight.zero_()
        model.b.weight.fill_(1.0)
        model.c.weight.fill_(1.0)
    with pytest.raises(PrunelabError, match=r"scores of a\.weight, b\.weight overflow float64"):
        get_criterion("synflow")(model, dict(model.named_parameters()), ScoreData([(torch.ones(1, 1), None)]))


def test_synflow_names_the_layer_it_cannot_run():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.embed(x))

    model = Tokens()
    with pytest.raises(PrunelabError, match=r"in layer 'embed' \(Embedding\).*integer indices"):
        get_criterion("synflow", input_shape=(3,))(model, {"head.weight": model.head.weight})
    mismatched = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(PrunelabError, match=r"input of shape \(1, 4\) in layer '2' \(Linear\)"):
        get_criterion("synflow")(mismatched, dict(mismatched.named_parameters()))


def test_synflow_shape_peek_leaves_the_global_generator_alone():
    loader = DataLoader(TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), batch_size=4)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    state = torch.get_rng_state()
    get_criterion("synflow")(model, dict(model.named_parameters()), ScoreData(loader))
    assert _input_shape(None, loader) == (5,) and _input_shape(ScoreData(loader), None) == (5,)
    assert torch.equal(torch.get_rng_state(), state)  # starting a DataLoader iterator draws from it


# --- SNIP / GraSP / FORCE on a hand-computed network with biases and a ReLU ------------------------
# x = (1, 2) -> W1 = [[1, -1], [.5, 2]], b1 = [.5, 1] -> z = [-.5, 5.5] -> ReLU h = [0, 5.5]
#   -> w2 = [2, -1], b2 = .5 -> f = -5,  y = 1, L = (f - y)^2 = 36, r = f - y = -6
X, Y = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]])


def biased_toy() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        model[0].bias.copy_(torch.tensor([0.5, 1.0]))
        model[2].weight.copy_(torch.tensor([[2.0, -1.0]]))
        model[2].bias.fill_(0.5)
    return model


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


def test_snip_with_biases_and_a_dead_relu_equals_hand_computation():
    # dL/df = 2r = -12: dL/dw2 = -12 h = [0, -66], dL/db2 = -12, dL/dz = -12 w2 ⊙ relu' = [0, 12],
    # dL/dW1 = outer([0, 12], x) = [[0, 0], [12, 24]], dL/db1 = [0, 12].  |g ⊙ w| sums to 6+48+12+66+6 = 138
    model = biased_toy()
    scores = get_criterion("snip")(model, dict(model.named_parameters()), ScoreData([(X, Y)], loss_fn=mse))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[0.0, 0.0], [6.0, 48.0]]) / 138)
    torch.testing.assert_close(scores["0.bias"], torch.tensor([0.0, 12.0]) / 138)
    torch.testing.assert_close(scores["2.weight"], torch.tensor([[0.0, 66.0]]) / 138)
    torch.testing.assert_close(scores["2.bias"], torch.tensor([6.0]) / 138)


def test_grasp_with_biases_and_a_dead_relu_equals_hand_computation():
    # L = r^2, g = 2r dr:  Hg = 4r |dr|^2 dr + 4r^2 (d2r dr), with dr = (W1: [[0, 0], [-1, -2]], b1: [0, -1],
    # w2: [0, 5.5], b2: 1), |dr|^2 = 37.25, and d2r dr = (W1: [[0, 0], [5.5, 11]], b1: [0, 5.5], w2: [0, -6], b2: 0)
    # (the only second derivatives of r are d2r/dw2_i dW1_ij = relu'_i x_j and d2r/dw2_i db1_i = relu'_i).
    # Hg = (W1: [[0, 0], [1686, 3372]], b1: [0, 1686], w2: [0, -5781], b2: -894); keep-score = w ⊙ Hg
    model = biased_toy()
    scores = get_criterion("grasp", temperature=1.0)(model, dict(model.named_parameters()),
                                                     ScoreData([(X, Y)], loss_fn=mse))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[0.0, 0.0], [843.0, 6744.0]]))
    torch.testing.assert_close(scores["0.bias"], torch.tensor([0.0, 1686.0]))
    torch.testing.assert_close(scores["2.weight"], torch.tensor([[0.0, 5781.0]]))
    torch.testing.assert_close(scores["2.bias"], torch.tensor([-447.0]))


def test_force_saliency_scores_the_initial_weights_at_the_pruned_network():
    # no biases, W1[0, 1] pruned: W1 ⊙ m = [[1, 0], [.5, 2]], h = [1, 4.5], f = 2 - 4.5 = -2.5, r = -3.5;
    # dL/dW1 = 2r outer(w2, x) = [[-14, -28], [7, 14]], dL/dw2 = 2r h = [-7, -31.5].
    # S = |theta ⊙ dL/dw| keeps scoring the pruned theta = -1: 28, so FORCE can bring it back
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    theta = {"0.weight": torch.tensor([[1.0, -1.0], [0.5, 2.0]]), "1.weight": torch.tensor([[2.0, -1.0]])}
    with torch.no_grad():
        model[0].weight.copy_(theta["0.weight"] * torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        model[1].weight.copy_(theta["1.weight"])
    scores = ForceSaliency(theta)(model, dict(model.named_parameters()), ScoreData([(X, Y)], loss_fn=mse))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[14.0, 28.0], [3.5, 28.0]]))
    torch.testing.assert_close(scores["1.weight"], torch.tensor([[14.0, 31.5]]))


@pytest.mark.parametrize("name", ["snip", "grasp", "synflow"])
def test_pai_scoring_leaves_weights_grads_modes_and_the_generator_untouched(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    model[4].eval()  # mixed modes
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    params = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    first = get_criterion(name)(model, params, ScoreData([(x, y), (x[:5], y[:5])]))
    second = get_criterion(name)(model, params, ScoreData([(x, y), (x[:5], y[:5])]))
    assert torch.equal(torch.get_rng_state(), rng)  # dropout is off: nothing is drawn
    assert all(torch.equal(first[n], second[n]) for n in params)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad


# --- the runners ---------------------------------------------------------------------------------------
def small_loaders():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def small_mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("name", ["force", "synflow"])
def test_iterative_pai_refuses_an_unreachable_target_before_pruning_anything(name):
    # the dense first layer keeps 48 of 136 weights: 80% sparsity (27 kept) is unreachable.  The first
    # rounds (lower sparsity) used to succeed and leave the model pruned when a later one failed.
    train_loader, test_loader = small_loaders()
    model = small_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunelabError, match="target keeps 27 of 136 weights"):
        METHODS.get(name)(model, train_loader, test_loader, PruneSpec(sparsity=0.8, keep_first="dense"), NO_TRAINING)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_force_schedule_keeps_an_exponentially_decaying_count_and_rescores_every_weight():
    train_loader, test_loader = small_loaders()
    calls = []

    class Recording(ForceSaliency):
        def score(self, model, params, data):
            calls.append(sum(int((p != 0).sum()) for p in params.values()))  # nonzeros of theta ⊙ m_{t-1}
            return super().score(model, params, data)

    import prunelab.methods.pai as pai

    original = pai.ForceSaliency
    pai.ForceSaliency = Recording
    try:
        result = pai.run_force(small_mlp(), train_loader, test_loader, PruneSpec(sparsity=0.9, score_batches=1),
                               NO_TRAINING, steps=4)
    finally:
        pai.ForceSaliency = original
    total = 48 + 64 + 24
    kept = [round(total * 0.1 ** (t / 4)) for t in range(0, 5)]  # k_t = n (k / n)^(t / T)
    assert calls == kept[:4]  # step t scores the network pruned by step t - 1 (dense at t = 1)
    assert [total - round(h["achieved_sparsity"] * total) for h in result.history] == kept[1:]


def test_reinitialise_kept_redraws_attention_and_refuses_what_it_cannot_redraw():
    torch.manual_seed(0)
    attention = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))
    before = attention[0].in_proj_weight.detach().clone()
    mask = torch.rand(12, 4) < 0.5
    reinitialise_kept(attention, {"0.in_proj_weight": mask}, seed=1)  # nn.MultiheadAttention: _reset_parameters
    after = attention[0].in_proj_weight.detach()
    assert torch.equal(after[~mask], torch.zeros(int((~mask).sum())))
    assert not torch.equal(after[mask], before[mask]) and int((after != 0).sum()) == int(mask.sum())

    class Custom(nn.Module):  # its own parameter and no reset_parameters: fresh_init cannot redraw it
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.randn(3, 3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x @ self.scale)

    model = Custom()
    state = copy.deepcopy(model.state_dict())
    masks = {"scale": torch.ones(3, 3, dtype=torch.bool), "fc.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(PrunelabError, match="cannot re-initialise 'scale'"):
        reinitialise_kept(model, masks, seed=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing half-changed


# --- allocation: tiny layers under uniform / ERK --------------------------------------------------------
def dense_layer(name: str, shape: tuple[int, ...], seed: int) -> LayerBudget:
    n = math.prod(shape)
    return LayerBudget(name, torch.rand(n, generator=torch.Generator().manual_seed(seed)), 1, shape, 0, n)


@pytest.mark.parametrize("name", ["uniform", "erk"])
@pytest.mark.parametrize("sparsity", [0.9, 0.99, 0.999])
def test_uniform_and_erk_keep_a_tiny_layer_and_hit_the_target_exactly(name, sparsity):
    # a 10-weight output layer at 99% uniform sparsity is 0.1 of a weight: rounded to 0 it cut the network
    layers = [dense_layer("big", (1000, 784), 0), dense_layer("mid", (100, 1000), 1), dense_layer("tiny", (1, 10), 2)]
    counts = get_allocation(name).keep_counts(layers, sparsity)
    assert sum(counts) == keep_budget(layers, sparsity)  # the other layers give the weight back
    assert all(c >= 1 for c in counts)
    if name == "uniform":
        for c, layer in zip(counts[:2], layers[:2]):  # the rest stay at the target to within a weight
            assert abs(c - (1 - sparsity) * layer.numel) <= 1 + layer.numel * 1e-3


@pytest.mark.parametrize("name", ["uniform", "erk"])
def test_density_floor_yields_to_rules_and_to_budgets_below_one_weight_per_layer(name):
    pruned = LayerBudget("pruned", torch.full((6,), -math.inf), 1, (2, 3), 0, 0)  # fully pruned: stays at 0
    layers = [dense_layer("a", (50, 20), 0), pruned, dense_layer("b", (1, 4), 1)]
    keep = allocate(get_allocation(name), layers, 0.99)
    assert int(keep["pruned"].sum()) == 0 and int(keep["b"].sum()) >= 1
    few = [dense_layer(f"l{i}", (2, 5), i) for i in range(5)]  # 50 weights, 2 kept: no allocation keeps all 5
    counts = get_allocation(name).keep_counts(few, 0.96)
    assert sum(counts) == 2
