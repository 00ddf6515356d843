"""Pruning at initialisation: SNIP / GraSP / SynFlow on hand-computed cases, the PaI methods, the ablations."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.models import build_model
from prunelab.bench.training import TrainConfig, seed_everything
from prunelab.criteria import ScoreData, get_criterion
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.methods import METHODS, PruneSpec
from prunelab.methods.pai import (
    fresh_init, reinitialise_kept, run_force, run_pai, run_snip, run_synflow, shuffle_within_layers,
)
from prunelab.sparsifier import Sparsifier

# --- the toy network: x (2) -> W1 (2x2) -> h (2) -> w2 (1x2) -> f, no biases, MSE ------------------
W1 = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
W2 = torch.tensor([[2.0, -1.0]])
X = torch.tensor([[1.0, 2.0]])
Y = torch.tensor([[1.0]])


def toy(activation: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Linear(2, 2, bias=False)] + ([activation] if activation is not None else []) + [nn.Linear(2, 1, bias=False)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[0].weight.copy_(W1)
        model[-1].weight.copy_(W2)
    return model


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


def toy_params(model: nn.Sequential) -> dict[str, nn.Parameter]:
    return {"0.weight": model[0].weight, f"{len(model) - 1}.weight": model[-1].weight}


def analytic_gradient():
    """L = r^2, r = w2^T W1 x - y:  dL/dw2 = 2 r h,  dL/dW1 = 2 r w2 x^T,  h = W1 x."""
    h = W1 @ X[0]  # [-1, 4.5]
    r = float(W2[0] @ h - Y[0, 0])  # -7.5
    return h, r, (2 * r * h)[None], 2 * r * torch.outer(W2[0], X[0])


def test_analytic_gradient_numbers():
    h, r, g2, g1 = analytic_gradient()
    assert r == -7.5 and h.tolist() == [-1.0, 4.5]
    assert g2.tolist() == [[15.0, -67.5]] and g1.tolist() == [[-30.0, -60.0], [15.0, 30.0]]


def test_snip_equals_hand_computation():
    # |g ⊙ w|: W1 -> [[30, 60], [7.5, 60]], w2 -> [[30, 67.5]]; the sum is 255
    model = toy()
    scores = get_criterion("snip")(model, toy_params(model), ScoreData([(X, Y)], loss_fn=mse))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[30.0, 60.0], [7.5, 60.0]]) / 255)
    torch.testing.assert_close(scores["1.weight"], torch.tensor([[30.0, 67.5]]) / 255)


def test_snip_averages_gradients_before_the_absolute_value():
    model = toy()
    x2, y2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[-14.0]])  # r = +7.5: the gradient flips sign
    scores = get_criterion("snip")(model, toy_params(model), ScoreData([(X, Y), (x2, y2)], loss_fn=mse))
    assert all(torch.equal(s, torch.zeros_like(s)) for s in scores.values())  # mean gradient is 0


def analytic_hessian_gradient():
    """H v for v = g, from the second derivatives of L = r^2:

    d2L/dw2_i dw2_k = 2 h_i h_k;  d2L/dW1_ij dW1_kl = 2 w2_i x_j w2_k x_l;
    d2L/dw2_i dW1_kl = 2 h_i w2_k x_l + 2 r [i = k] x_l.  With a = h.v2, b = w2^T V1 x, c = V1 x:
    (Hv)_w2 = 2 h (a + b) + 2 r c,   (Hv)_W1 = 2 (a + b) w2 x^T + 2 r v2 x^T.
    """
    h, r, g2, g1 = analytic_gradient()
    v2, v1 = g2[0], g1
    a, c = float(h @ v2), v1 @ X[0]
    b = float(W2[0] @ c)
    hv2 = 2 * h * (a + b) + 2 * r * c
    hv1 = 2 * (a + b) * torch.outer(W2[0], X[0]) + 2 * r * torch.outer(v2, X[0])
    return hv1, hv2[None]


def test_grasp_equals_hand_computation():
    hv1, hv2 = analytic_hessian_gradient()
    torch.testing.assert_close(hv1, torch.tensor([[-3000.0, -6000.0], [2400.0, 4800.0]]))
    torch.testing.assert_close(hv2, torch.tensor([[3637.5, -7368.75]]))
    model = toy()
    scores = get_criterion("grasp", temperature=1.0)(model, toy_params(model), ScoreData([(X, Y)], loss_fn=mse))
    # keep-score = w ⊙ Hg = -S of Wang et al. (they remove the highest S)
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[-3000.0, 6000.0], [1200.0, 9600.0]]))
    torch.testing.assert_close(scores["1.weight"], torch.tensor([[7275.0, 7368.75]]))


def test_grasp_matches_full_autograd_hessian_and_temperature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [p.shape for p in params.values()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split([math.prod(s) for s in shapes]), shapes))))
        return nn.functional.cross_entropy(torch.func.functional_call(model, pieces, (x,)) / 3.0, y)

    g = torch.autograd.functional.jacobian(loss, flat0)
    hg = torch.autograd.functional.hessian(loss, flat0) @ g
    expected = (flat0 * hg).split([math.prod(s) for s in shapes])
    scores = get_criterion("grasp", temperature=3.0)(model, params, ScoreData([(x, y)]))
    for name, want, shape in zip(names, expected, shapes):
        torch.testing.assert_close(scores[name], want.reshape(shape), rtol=1e-4, atol=1e-7)


def test_synflow_equals_hand_computation_and_conserves_flow():
    # |W1| = [[1, 1], [.5, 2]], |w2| = [2, 1]: R = [2, 1] . (|W1| 1) = [2, 1] . [2, 2.5] = 6.5
    # s_w2 = |w2| ⊙ |W1| 1 = [4, 2.5];  s_W1 = |W1| ⊙ (|w2| 1^T) = [[2, 2], [.5, 2]]; each layer sums to R
    for activation in (None, nn.ReLU()):
        model = toy(activation)
        scores = get_criterion("synflow", input_shape=(2,))(model, toy_params(model))
        last = f"{len(model) - 1}.weight"
        torch.testing.assert_close(scores[last], torch.tensor([[4.0, 2.5]]) / 4)  # divided by the max, 4
        torch.testing.assert_close(scores["0.weight"], torch.tensor([[2.0, 2.0], [0.5, 2.0]]) / 4)
        assert float(scores[last].sum()) * 4 == pytest.approx(6.5) == float(scores["0.weight"].sum()) * 4


def test_synflow_is_data_free_and_sign_invariant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.BatchNorm1d(7), nn.Linear(7, 3))
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    first = ScoreData([(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))])
    second = ScoreData([(100 * torch.rand(9, 5), torch.ones(9, dtype=torch.long))])
    a = get_criterion("synflow")(model, params, first)
    b = get_criterion("synflow")(model, params, second)
    c = get_criterion("synflow", input_shape=[5])(model, params)
    d = get_criterion("synflow")(model, params)  # shape inferred from the first Linear
    with torch.no_grad():
        model[0].weight.neg_()
    e = get_criterion("synflow")(model, params)
    for n in params:
        assert torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) and torch.equal(a[n], d[n]) and torch.equal(a[n], e[n])
        assert a[n].max() <= 1.0 and a[n].min() > 0


def test_synflow_is_finite_for_deep_networks():
    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(60) for layer in (nn.Linear(32, 32), nn.ReLU())])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # float32 products would overflow after ~20 layers
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    scores = get_criterion("synflow")(model, params)
    assert all(torch.isfinite(s).all() and s.max() > 0 for s in scores.values())


def test_synflow_errors_name_the_problem():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    with pytest.raises(PrunelabError, match="cannot score unused.weight"):
        get_criterion("synflow")(model, {n: p for n, p in model.named_parameters() if n.endswith("weight")})
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(PrunelabError, match="input_shape"):
        get_criterion("synflow")(conv, dict(conv.named_parameters()))
    assert get_criterion("synflow", input_shape=(1, 4, 4))(conv, dict(conv.named_parameters()))["2.weight"].shape == (2, 8)
    with pytest.raises(PrunelabError, match="all-ones input of shape"):
        get_criterion("synflow", input_shape=(1, 5, 5))(conv, dict(conv.named_parameters()))
    for bad in ((0, 3), "abc", (2.5,)):
        with pytest.raises(PrunelabError, match="input_shape"):
            get_criterion("synflow", input_shape=bad)
    with pytest.raises(PrunelabError, match="temperature"):
        get_criterion("grasp", temperature=0)


@pytest.mark.parametrize("name", ["snip", "grasp"])
def test_snip_and_grasp_without_data_raise(name):
    model = toy()
    with pytest.raises(PrunelabError, match=f"criterion '{name}' needs data"):
        get_criterion(name)(model, toy_params(model))


# --- ablations -------------------------------------------------------------------------------------
def some_masks() -> MaskSet:
    gen = torch.Generator().manual_seed(0)
    return MaskSet({"0.weight": torch.rand(16, 8, generator=gen) < 0.3, "2.weight": torch.rand(4, 16, generator=gen) < 0.6})


def test_shuffle_keeps_per_layer_counts_exactly():
    masks = some_masks()
    a, b, c = shuffle_within_layers(masks, 1), shuffle_within_layers(masks, 1), shuffle_within_layers(masks, 2)
    assert a.equal(b) and not a.equal(c) and not a.equal(masks)
    for name in masks:
        assert int(a[name].sum()) == int(masks[name].sum()) and a[name].shape == masks[name].shape
    with pytest.raises(PrunelabError, match="seed"):
        shuffle_within_layers(masks, 1.5)


def test_reinitialise_kept_redraws_kept_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = some_masks()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    reinitialise_kept(model, masks, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    fresh = dict(fresh_init(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 5).named_parameters())
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        assert int((p != 0).sum()) == int(mask.sum())  # same kept count, zeros elsewhere
        assert torch.equal(p[mask], fresh[name][mask]) and not torch.equal(p[mask], before[name][mask])
    assert torch.equal(params["0.bias"], before["0.bias"])  # unmasked parameters untouched
    with pytest.raises(PrunelabError, match="names no parameter"):
        reinitialise_kept(model, {"fc.weight": torch.ones(2, 2, dtype=torch.bool)}, seed=0)


# --- methods ---------------------------------------------------------------------------------------
CONFIG = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False)
PAI = ["snip", "grasp", "force", "synflow", "random-erk", "random-uniform", "pai", "pai-shuffled", "pai-reinit"]


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits")
    x, y = splits.train.tensors
    small = dataclasses.replace(splits, train=TensorDataset(x[:512], y[:512]))  # 8 steps per epoch: quick tests
    return splits, *make_loaders(small, 64, seed=0)


def fresh_mlp(splits):
    seed_everything(0)
    return build_model("digits_mlp", splits.input_shape, splits.num_classes)


def test_every_pai_method_is_registered():
    assert set(PAI) | {"lottery"} <= set(METHODS.names())


@pytest.mark.parametrize("name", PAI)
def test_pai_methods_prune_at_init_then_train_sparse(name, digits):
    splits, train_loader, test_loader = digits
    model = fresh_mlp(splits)
    spec = PruneSpec(sparsity=0.75, score_batches=2)
    result = METHODS.get(name)(model, train_loader, test_loader, spec, CONFIG)
    assert [r["stage"] for r in result.rows] == ["pruned at init", "trained"]
    stats = result.masks.stats()
    assert stats.kept == round(0.25 * stats.total)
    assert result.rows[1]["test_loss"] < result.rows[0]["test_loss"]  # one epoch of sparse training learns
    params = dict(model.named_parameters())
    for layer, mask in result.masks.items():
        assert torch.all(params[layer][~mask] == 0) and mask.any()


@pytest.mark.parametrize("name", PAI)
def test_after_epoch_runs_after_every_epoch_with_the_masks_applied(name, digits):
    """The hook (checkpoint selection on a validation split) sees epochs 1..E of a masked model."""
    splits, train_loader, test_loader = digits
    model = fresh_mlp(splits)
    snapshots = []

    def after_epoch(epoch: int) -> None:
        snapshots.append((epoch, {n: p.detach().clone() for n, p in model.named_parameters()}))

    spec = PruneSpec(sparsity=0.75, score_batches=2)
    config = dataclasses.replace(CONFIG, epochs=2)
    result = METHODS.get(name)(model, train_loader, test_loader, spec, config, after_epoch=after_epoch)
    assert [epoch for epoch, _ in snapshots] == [1, 2]
    for _, params in snapshots:  # the masks are held fixed, so the final ones are those of every epoch
        for layer, mask in result.masks.items():
            assert torch.all(params[layer][~mask] == 0)
    assert not torch.equal(snapshots[0][1]["fc1.weight"], snapshots[1][1]["fc1.weight"])  # it trained in between


def test_force_with_one_step_is_snip_and_synflow_with_one_round_is_one_shot(digits):
    splits, train_loader, test_loader = digits
    data = ScoreData([next(iter(train_loader))])
    no_training = TrainConfig(epochs=0, progress=False)
    spec = PruneSpec(sparsity=0.8)
    force = run_force(fresh_mlp(splits), train_loader, test_loader, spec, no_training, score_data=data, steps=1)
    snip = run_snip(fresh_mlp(splits), train_loader, test_loader, spec, no_training, score_data=data)
    assert force.masks.equal(snip.masks)
    synflow = run_synflow(fresh_mlp(splits), train_loader, test_loader, spec, no_training, rounds=1)
    oneshot = run_pai(fresh_mlp(splits), train_loader, test_loader, PruneSpec(sparsity=0.8, criterion="synflow"), no_training)
    assert synflow.masks.equal(oneshot.masks)


def test_force_iterates_and_may_resurrect_but_hits_the_target(digits):
    splits, train_loader, test_loader = digits
    model = fresh_mlp(splits)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_force(model, train_loader, test_loader, PruneSpec(sparsity=0.95, score_batches=1),
                       TrainConfig(epochs=0, progress=False), steps=5)
    targets = [h["target_sparsity"] for h in result.history]
    assert len(targets) == 5 and targets[-1] == pytest.approx(0.95) and targets == sorted(targets)
    assert targets[0] == pytest.approx(1 - 0.05 ** 0.2)  # exponential decay of the kept count
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():  # survivors hold their initial values
        assert torch.equal(params[name][mask], initial[name][mask])


def test_synflow_keeps_every_layer_connected_at_extreme_sparsity(digits):
    splits, train_loader, test_loader = digits
    none = TrainConfig(epochs=0, progress=False)
    synflow = run_synflow(fresh_mlp(splits), train_loader, test_loader, PruneSpec(sparsity=0.999), none)
    assert all(layer.kept > 0 for layer in synflow.masks.stats().layers)


def test_random_erk_follows_erk_densities(digits):
    splits, train_loader, test_loader = digits
    none = TrainConfig(epochs=0, seed=3, progress=False)
    result = METHODS.get("random-erk")(fresh_mlp(splits), train_loader, test_loader, PruneSpec(sparsity=0.9), none)
    reference = Sparsifier(fresh_mlp(splits), criterion=get_criterion("random", seed=3), allocation="erk").prepare()
    assert result.masks.equal(reference.update(0.9))


def test_pai_shuffled_keeps_the_layer_counts_of_the_criterion(digits):
    splits, train_loader, test_loader = digits
    none = TrainConfig(epochs=0, progress=False)
    spec = PruneSpec(sparsity=0.9, criterion="magnitude")
    plain = run_pai(fresh_mlp(splits), train_loader, test_loader, spec, none)
    model = fresh_mlp(splits)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    shuffled = METHODS.get("pai-shuffled")(model, train_loader, test_loader, spec, none)
    reinit = METHODS.get("pai-reinit")(fresh_mlp(splits), train_loader, test_loader, spec, none)
    for a, b, c in zip(plain.masks.stats().layers, shuffled.masks.stats().layers, reinit.masks.stats().layers):
        assert a.kept == b.kept == c.kept
    assert not plain.masks.equal(shuffled.masks) and plain.masks.equal(reinit.masks)
    params = dict(model.named_parameters())
    for name, mask in shuffled.masks.items():  # shuffled mask on the original initial weights
        assert torch.equal(params[name][mask], initial[name][mask])


def test_data_loader_score_data_is_used_when_given(digits):
    splits, train_loader, test_loader = digits
    x, y = next(iter(train_loader))
    data = ScoreData(DataLoader(TensorDataset(x, y), batch_size=32))
    none = TrainConfig(epochs=0, progress=False)
    a = run_snip(fresh_mlp(splits), train_loader, test_loader, PruneSpec(sparsity=0.9), none, score_data=data)
    b = run_snip(fresh_mlp(splits), train_loader, test_loader, PruneSpec(sparsity=0.9), none, score_data=data)
    assert a.masks.equal(b.masks)


@pytest.mark.parametrize("name", ["snip", "grasp", "force", "pai"])
def test_scoring_without_any_data_is_a_one_line_error(name, digits):
    splits, _, test_loader = digits
    spec = PruneSpec(sparsity=0.5, criterion="snip")  # "pai" with a data-driven criterion
    with pytest.raises(PrunelabError, match="needs data to score on but got NoneType; pass a training DataLoader"):
        METHODS.get(name)(fresh_mlp(splits), None, test_loader, spec, CONFIG)


@pytest.mark.parametrize("name", ["synflow", "random-erk", "pai-reinit"])
def test_training_without_a_train_loader_is_a_one_line_error(name, digits):
    splits, _, test_loader = digits
    with pytest.raises(PrunelabError, match="needs a training loader to train the pruned network but got NoneType"):
        METHODS.get(name)(fresh_mlp(splits), None, test_loader, PruneSpec(sparsity=0.5), CONFIG)
    with pytest.raises(PrunelabError, match="needs a test loader"):  # synflow's input shape then comes from the model
        METHODS.get(name)(fresh_mlp(splits), None, None, PruneSpec(sparsity=0.5), TrainConfig(epochs=0, progress=False))


def test_shuffle_keeps_a_structured_mask_structured(digits):
    splits, train_loader, test_loader = digits
    spec = PruneSpec(sparsity=0.5, granularity="channel", criterion="magnitude")
    no_training = TrainConfig(epochs=0, progress=False)
    plain = run_pai(fresh_mlp(splits), train_loader, test_loader, spec, no_training)
    shuffled = METHODS.get("pai-shuffled")(fresh_mlp(splits), train_loader, test_loader, spec, no_training)
    assert not shuffled.masks.equal(plain.masks)
    for name, mask in shuffled.masks.items():
        rows = mask.reshape(mask.shape[0], -1)  # (out, fan_in): a channel is kept whole or not at all
        assert bool((rows.all(dim=1) | ~rows.any(dim=1)).all()), name
        assert int(rows.all(dim=1).sum()) == int(plain.masks[name].reshape(mask.shape[0], -1).all(dim=1).sum())
    with pytest.raises(PrunelabError, match="N:M pattern with none to permute"):
        shuffle_within_layers(plain.masks, 0, "2:4")


# --- SynFlow leaves mask buffers alone ------------------------------------------------------------
class CausalMix(nn.Module):
    """One causal self-attention-like mixing step over T=3 tokens of width 2, masked by a buffer:
    a ``-inf`` upper triangle added to the logits (``add``) or used by ``masked_fill`` (``fill``),
    or a bool lower triangle (``bool``); ``shift`` is a signed constant buffer (not a weight)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.mode = mode
        self.q, self.v, self.head = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(6, 3)
        self.register_buffer("mask", torch.full((3, 3), float("-inf")).triu(1))  # (T, T)
        self.register_buffer("causal", torch.ones(3, 3, dtype=torch.bool).tril())  # (T, T)
        self.register_buffer("shift", torch.tensor([-0.5, 2.0]))  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        logits = self.q(x) @ x.transpose(1, 2)  # (B, T, T)
        if self.mode == "add":
            logits = logits + self.mask
        elif self.mode == "fill":
            logits = logits.masked_fill(self.mask == float("-inf"), float("-inf"))
        else:
            logits = logits.masked_fill(~self.causal, float("-inf"))
        mixed = torch.softmax(logits, -1) @ self.v(x + self.shift)  # (B, T, C)
        return self.head(mixed.flatten(1))


@pytest.mark.parametrize("mode", ["add", "fill", "bool"])
def test_synflow_keeps_mask_buffers_and_restores_everything(mode):
    # |buffer| turned the -inf causal mask into +inf: R = nan ("not finite") when added to the logits,
    # silently no masking under masked_fill, and flipped the sign of ``shift``.  Only parameters (and
    # normalisation statistics) are linearised now; every other buffer is used as it is.
    model = CausalMix(mode)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = get_criterion("synflow", input_shape=(3, 2))(model, params)
    # reference: |parameters| in float64, the buffers as they are, all-ones input, R = sum, |w * dR/dw|
    reference = CausalMix(mode).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.abs_()
    reference(torch.ones(1, 3, 2, dtype=torch.float64)).sum().backward()
    want = {n: (p.grad * p).detach().abs() for n, p in reference.named_parameters()}
    peak = max(float(w.max()) for w in want.values())
    for n in params:
        assert torch.isfinite(scores[n]).all()
        torch.testing.assert_close(scores[n].double(), want[n] / peak, rtol=1e-5, atol=1e-7)
    for k, v in model.state_dict().items():  # bit-exact, dtypes and -inf included
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert model.mask.isneginf().sum() == 3 and model.shift[0] == -0.5
    assert all(p.grad is None and p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_synflow_linearises_batchnorm_running_statistics_and_restores_them():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(16, 3) - 2.0)  # negative running means
    assert (model[1].running_mean < 0).any()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = get_criterion("synflow")(model, dict(model.named_parameters()))
    reference = copy.deepcopy(model).double().eval()  # Tanaka et al.: abs() of every state_dict entry
    with torch.no_grad():
        for value in reference.state_dict().values():
            value.abs_()
    reference(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    want = {n: (p.grad * p).detach().abs() for n, p in reference.named_parameters()}
    peak = max(float(w.max()) for w in want.values())
    for n, w in want.items():
        torch.testing.assert_close(scores[n].double(), w / peak, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.training
