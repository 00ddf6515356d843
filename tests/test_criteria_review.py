"""Review of the criteria: exact values on a hand-made two-layer net, the paper's LASSO
objective, purity on error (modes, hooks, weights), the global RNG, and bad input that
must give one-line PrunelabErrors (NaN, batches that do not fit, wrong argument types)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.criteria import CRITERIA, ScoreData, get_criterion
from prunelab.criteria.movement import Movement, MovementAccumulator
from prunelab.criteria.regression import ChannelProblem, collect_input_grams, regression_channel_prune
from prunelab.errors import PrunelabError


def half_sse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum()


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


def two_layer_net() -> nn.Sequential:
    """h = relu(W1 x), o = W2 h, no biases; W1 = [[1, -1], [0.5, 0.5]], W2 = [[2, 1]]."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.5]]))
        model[2].weight.copy_(torch.tensor([[2.0, 1.0]]))
    return model


# One sample x = [1, 2], target -0.5.  Pre-activations W1 x = [-1, 1.5]: unit 0 is off, h = [0, 1.5];
# o = 1.5, residual r = o - t = 2, L = r^2 / 2 = 2.
#   dL/dW2 = r h = [0, 3];  dL/dh = r W2 = [4, 2], gated by the ReLU: [0, 2];  dL/dW1 = [[0, 0], [2, 4]]
#   exact diagonal Hessian: d2L/dW2_j^2 = h_j^2 = [0, 2.25]; d2L/dW1_ij^2 = (W2_i x_j)^2 [unit i on] = [[0, 0], [1, 4]]
#   Fisher (one sample): g^2 = W2: [0, 9], W1: [[0, 0], [4, 16]]
X1 = torch.tensor([[1.0, 2.0]])
T1 = torch.tensor([[-0.5]])
HAND = {
    # criterion (kwargs) -> (score of 0.weight, score of 2.weight)
    ("taylor", ()): ([[0.0, 0.0], [1.0, 2.0]], [[0.0, 3.0]]),  # |w g|
    ("movement", ()): ([[0.0, 0.0], [-1.0, -2.0]], [[0.0, -3.0]]),  # -w g (signed)
    ("obd", (("hessian", "exact"),)): ([[0.0, 0.0], [0.125, 0.5]], [[0.0, 1.125]]),  # h w^2 / 2
    ("obd", (("hessian", "fisher"),)): ([[0.0, 0.0], [0.5, 2.0]], [[0.0, 4.5]]),  # g^2 w^2 / 2
    # 1 - APoZ: unit 0 is always 0 after the ReLU, unit 1 never; the output layer (no ReLU) is o = 1.5 > 0
    ("apoz", ()): ([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0]]),
}


@pytest.mark.parametrize(("name", "kwargs"), list(HAND))
def test_two_layer_relu_net_matches_hand_computed_scores(name, kwargs):
    model = two_layer_net()
    params = dict(model.named_parameters())
    scores = get_criterion(name, **dict(kwargs))(model, params, ScoreData([(X1, T1)], loss_fn=half_sse))
    first, second = HAND[(name, kwargs)]
    torch.testing.assert_close(scores["0.weight"], torch.tensor(first), rtol=0, atol=1e-6)
    torch.testing.assert_close(scores["2.weight"], torch.tensor(second), rtol=0, atol=1e-6)


def test_regression_lasso_is_he_et_al_objective_on_explicit_conv_outputs():
    """The Gram-form problem equals He et al.'s eq. 3 built from the consumer's real per-channel
    outputs Z_c = conv(h_c, W_c) / ||W_c||_F, and the selected beta satisfies that LASSO's KKT
    conditions at the returned lambda (scikit-learn scaling: objective / C)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1, bias=False))
    x = torch.randn(6, 2, 5, 5, generator=gen)
    stats = collect_input_grams(model, ["2"], ScoreData([(x, torch.zeros(6))]))["2"]
    problem = ChannelProblem.build(stats, model[2].weight)
    with torch.no_grad():
        h = model[1](model[0](x)).double()
    w = model[2].weight.detach().double()
    z = [F.conv2d(h[:, c:c + 1], w[:, c:c + 1], padding=1) / w[:, c].norm() for c in range(5)]
    gram = torch.tensor([[float((z[c] * z[d]).sum()) / stats.rows for d in range(5)] for c in range(5)], dtype=torch.float64)
    assert stats.rows == 6 * 5 * 5
    np.testing.assert_allclose(problem.gram, gram.numpy(), rtol=1e-10, atol=1e-14)
    t = problem.target
    y = F.conv2d(h, w, padding=1)
    torch.testing.assert_close(sum(float(t[c]) * z[c] for c in range(5)), y, rtol=1e-10, atol=1e-12)
    for keep in (1, 2, 3):
        kept, beta, alpha = problem.select(keep)
        assert kept.sum() == keep and np.count_nonzero(beta) == keep and set(np.flatnonzero(beta)) == set(np.flatnonzero(kept))
        grad = problem.gram @ (t - beta) / 5  # -d/dbeta of the smooth part
        on = beta != 0
        np.testing.assert_allclose(grad[on], alpha * np.sign(beta[on]), rtol=1e-6, atol=1e-9)
        assert (np.abs(grad[~on]) <= alpha * (1 + 1e-6)).all()


def test_regression_result_applied_to_another_model_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    result = regression_channel_prune(model, "0", None, ScoreData([(torch.randn(16, 3), torch.zeros(16))]), 2)
    for other in (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)),  # consumer of another width
                  nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)),  # no consumer bias
                  nn.Linear(2, 2)):  # no such layers
        state = copy.deepcopy(other.state_dict())
        with pytest.raises(PrunelabError, match="does not fit") as info:
            result.apply(other)  # used to zero the producer rows, then fail on the consumer
        assert "\n" not in str(info.value)
        assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
        with pytest.raises(PrunelabError, match="does not fit"):
            result.masks(other)


# --- bad input ------------------------------------------------------------------------------
DATA_CRITERIA = [("taylor", {}), ("movement", {}), ("obd", {"hessian": "exact"}), ("obd", {"hessian": "fisher"}),
                 ("apoz", {}), ("regression", {})]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def assert_untouched(model: nn.Module, state: dict, modes: list[bool]) -> None:
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize(("name", "kwargs"), DATA_CRITERIA)
def test_nan_in_the_batches_is_a_one_line_error(name, kwargs):
    # taylor/movement/obd used to return NaN scores, apoz counted NaN as "not zero" (a silent
    # wrong score), regression crashed in numpy's eigh (LinAlgError)
    model = mlp().train()
    state, modes = copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    x[3, 1] = float("nan")
    data = ScoreData([(x, torch.randn(8, 2))], loss_fn=mse)
    with warnings.catch_warnings(), pytest.raises(PrunelabError, match="NaN") as info:
        warnings.simplefilter("ignore", UserWarning)  # regression's fallback notice for the classifier
        get_criterion(name, **kwargs)(model, dict(model.named_parameters()), data)
    assert "\n" not in str(info.value)
    assert_untouched(model, state, modes)


def test_nan_in_the_calibration_data_of_regression_channel_prune_is_a_one_line_error():
    model = mlp()
    x = torch.randn(8, 3)
    x[0, 0] = float("inf")
    with pytest.raises(PrunelabError, match="NaN/inf") as info:
        regression_channel_prune(model, "0", None, ScoreData([(x, torch.zeros(8))]), 2)
    assert "\n" not in str(info.value)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(PrunelabError, match="NaN/inf"):
        regression_channel_prune(model, "0", None, ScoreData([(torch.randn(8, 3), torch.zeros(8))]), 2)


@pytest.mark.parametrize(
    ("name", "kwargs", "bad"),
    [(n, k, "inputs") for n, k in DATA_CRITERIA]
    + [(n, k, "targets") for n, k in DATA_CRITERIA if n not in ("apoz", "regression")],  # those never call the loss
)
def test_a_batch_that_does_not_fit_is_a_one_line_error_and_leaves_the_model_as_it_was(name, kwargs, bad):
    # the second batch does not fit: a traceback (RuntimeError/IndexError) from the model or the loss,
    # raised while hooks / eval mode / swapped parameters are in place
    model = mlp().train()
    model[2].eval()
    state, modes = copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]
    good = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    wrong = (torch.randn(4, 5), torch.randint(0, 2, (4,))) if bad == "inputs" else (torch.randn(4, 3), torch.full((4,), 7))
    criterion = get_criterion(name, **kwargs)
    with warnings.catch_warnings(), pytest.raises(PrunelabError, match=f"criterion '{name}' could not run") as info:
        warnings.simplefilter("ignore", UserWarning)
        criterion(model, dict(model.named_parameters()), ScoreData([good, wrong]))
    message = str(info.value)
    assert "\n" not in message and ("(4, 5)" in message if bad == "inputs" else "out of bounds" in message)
    assert_untouched(model, state, modes)


def test_regression_channel_prune_with_batches_that_do_not_fit_is_a_one_line_error():
    model = mlp()
    with pytest.raises(PrunelabError, match="could not run") as info:
        regression_channel_prune(model, "0", None, ScoreData([(torch.randn(4, 7), torch.zeros(4))]), 2)
    assert "\n" not in str(info.value) and "(4, 7)" in str(info.value)
    assert all(not m._forward_pre_hooks for m in model.modules()) and model.training


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ScoreData(None), "batches of type NoneType"),
        (lambda: ScoreData(5), "batches of type int"),
        (lambda: ScoreData("x.pt"), "batches of type str"),
        (lambda: ScoreData([], loss_fn="cross_entropy"), "expected a callable loss_fn"),
        (lambda: get_criterion("lp", p=float("inf")), "finite"),
        (lambda: get_criterion("lp", p=float("nan")), "p=nan"),
    ],
)
def test_bad_score_data_and_options_raise_one_line_errors(build, match):
    with pytest.raises(PrunelabError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["magnitude", "taylor"])
def test_params_that_are_not_a_mapping_raise_one_line(name):
    model = mlp()
    with pytest.raises(PrunelabError, match="expected a mapping FQN -> parameter"):
        get_criterion(name)(model, list(model.parameters()), ScoreData([(torch.randn(2, 3), torch.zeros(2, 2))]))


def test_movement_accumulator_of_another_model_is_a_one_line_error_not_a_bug_report():
    small, wide = mlp(), nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    acc = MovementAccumulator(dict(wide.named_parameters()))
    for p in wide.parameters():
        p.grad = torch.ones_like(p)
    acc.update()
    with pytest.raises(PrunelabError, match=r"0.weight \(5, 3\) vs \(4, 3\)") as info:  # was a RuntimeError
        Movement(accumulator=acc)(small, dict(small.named_parameters()))
    assert "\n" not in str(info.value)


# --- APoZ on layers whose channels are not axis 1 ---------------------------------------------
class LinearNormReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, 3) -> (N, L, 4)
        return torch.relu(self.ln(self.fc(x)))


def test_apoz_of_a_layernorm_counts_its_feature_axis_not_the_sequence_axis():
    # (N, L, C) with L == C = 4: counting along axis 1 (positions) had the right length and was silently wrong
    torch.manual_seed(0)
    model = LinearNormReLU()
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    scores = get_criterion("apoz")(model, {"ln.weight": model.ln.weight}, ScoreData([(x, torch.zeros(2))]))
    with torch.no_grad():
        post = torch.relu(model.ln(model.fc(x)))  # (2, 4, 4)
    expected = 1.0 - (post == 0).float().mean((0, 1))  # per feature over N * L positions
    torch.testing.assert_close(scores["ln.weight"], expected, rtol=0, atol=1e-6)


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N, L) -> (N, L, 2)
        return self.fc(torch.relu(self.emb(ids)))


def test_apoz_refuses_an_embedding_even_when_its_rows_match_a_count():
    # 5 tokens and sequences of length 5: the rows used to get the zero fractions of sequence positions
    model = Embedded()
    ids = torch.randint(0, 5, (4, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PrunelabError, match="embedding") as info:
        get_criterion("apoz")(model, {"emb.weight": model.emb.weight}, ScoreData([(ids, torch.zeros(4))]))
    assert "\n" not in str(info.value)


# --- the global RNG -------------------------------------------------------------------------
@pytest.mark.parametrize("name", CRITERIA.names())
def test_no_criterion_draws_from_the_global_rng(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).train()
    gen = torch.Generator().manual_seed(1)
    data = ScoreData([(torch.randn(6, 2, 4, 4, generator=gen), torch.randint(0, 2, (6,), generator=gen))])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        get_criterion(name)(model, dict(model.named_parameters()), data)
    assert torch.equal(torch.get_rng_state(), state)


def test_slimming_scores_only_the_layers_the_rules_let_it_prune():
    from prunelab.criteria.slimming import BNScale
    from prunelab.schedules import OneShot
    from prunelab.sparsifier import Sparsifier
    from prunelab.targets import LayerRules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
    # fallback='error' refuses a scored layer without BatchNorm; the classifier is kept dense, so it is not scored
    sparsifier = Sparsifier(model, criterion=BNScale(fallback="error"), granularity="channel",
                            schedule=OneShot(0.1), rules=LayerRules(keep_last="dense"))  # 18 of 180 weights: 2 channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = sparsifier.prepare().finalize()
    assert masks["0.weight"].flatten(1).all(dim=1).tolist() == [False, True, False, True]  # |gamma| 2 and 1 kept
    assert bool(masks["4.weight"].all())
    with pytest.raises(PrunelabError, match=r"4\.weight have no directly following BatchNorm"):
        Sparsifier(model, criterion=BNScale(fallback="error"), granularity="channel", schedule=OneShot(0.5),
                   rules=LayerRules(keep_last=None)).prepare()
