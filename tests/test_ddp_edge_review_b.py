"""DDP edge cases of snip, grasp, force, obd (exact / fisher), movement and regression (and synflow's input
shape), on 2 gloo ranks (tests/ddp_edge_review_b_worker.py).

* Unequal shards (3 and 5 samples, in 2 and 3 batches): every rank's scores are those of one process on
  the union of the data (hand-computed below), sums and counts reduced before any division -- not the
  mean of the per-rank scores, which keeps the other weight here.  Movement's one-pass sum is summed
  over the ranks inside the criterion (the union's sum), so a rank called alone no longer returns its own sum.
* An empty shard on one rank adds nothing; empty shards everywhere, and on rank 1 only a NaN input, a
  batch of the wrong width, a batch that is no (inputs, targets) pair or a loss that is no scalar: every
  rank raises the same one-line PrunelabError and the ranks stay in step (none is left waiting in a
  collective, which used to hang the run).
* World size 1 is unchanged, bit for bit: scores equal an independent loop of each formula.

One torchrun run serves every test here (cached); it is killed, with its workers, after 90 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from prunelab.criteria import ScoreData, get_criterion
from prunelab.criteria.regression import collect_input_grams
from prunelab.errors import PrunelabError

from cached_torchrun import CachedTorchrun  # tests/ helper

RUN = CachedTorchrun(Path(__file__).with_name("ddp_edge_review_b_worker.py"))
LOSS_KINDS = ["snip", "grasp", "force", "obd-exact", "obd-fisher", "movement"]
KINDS = LOSS_KINDS + ["regression"]
NAME = {"obd-exact": "obd", "obd-fisher": "obd"}  # the criterion's name in its messages


def _worker():
    return RUN.worker()


def _ranks(part: str, out: Path) -> list[dict]:
    return RUN.ranks(part, out)


@pytest.fixture
def uneven(tmp_path) -> list[dict]:
    return _ranks("uneven", tmp_path)


@pytest.fixture
def edges(tmp_path) -> list[dict]:
    records = _ranks("edges", tmp_path)
    assert RUN.failed is None, RUN.failed
    return records


def _both(records: list[dict], key: str) -> object:
    """The record ``key`` of rank 0, checked to be rank 1's too."""
    assert records[0][key] == records[1][key], key
    return records[0][key]


def _union(kind: str) -> list:
    worker = _worker()
    return worker.shard(kind, 0) + worker.shard(kind, 1)


def _mean_of_rank_scores(kind: str) -> list[float]:
    """The criterion on each rank's shard alone in this process, the two scores averaged: what a
    reduction of the per-rank scores only (the Sparsifier's mean) would give."""
    worker = _worker()
    scores = [torch.tensor(worker.direct(kind, worker.shard(kind, r))["scores"]["0.weight"]) for r in (0, 1)]
    return ((scores[0] + scores[1]) / 2).tolist()


# --- unequal shards: the union, exactly ----------------------------------------------------------------
# y = w . x with w = (1, 1).  Batch means of x: rank 0 (2, 0), (2, 0); rank 1 (0, 2), (0, 2), (0, 1).
# mean loss: g = mean_b mean_n x = (4, 5) / 5.  1/2 mean y^2: each sample has one nonzero feature, so the
# batch Hessians are diag(mean_n x^2): rank 0 diag(5, 0), diag(4, 0); rank 1 diag(0, 5), diag(0, 4),
# diag(0, 1), H = diag(9, 10) / 5 and g = H w; per-sample gradients x_n^2 on one feature: squares
# sum to (1 + 81 + 16, 1 + 81 + 16 + 16 + 1) = (98, 115) over N = 8 samples.
UNION = {
    "snip": ([4 / 9, 5 / 9], [False, True]),  # |w g| / sum = (0.8, 1) / 1.8
    "grasp": ([1.8 * 1.8, 2.0 * 2.0], [False, True]),  # w * H g
    "force": ([2 * 0.8, 1 * 1.0], [True, False]),  # |theta g|, theta = (2, 1)
    "obd-exact": ([0.5 * 1.8, 0.5 * 2.0], [False, True]),  # 1/2 h w^2
    "obd-fisher": ([0.5 * 98 / 8, 0.5 * 115 / 8], [False, True]),
    "movement": ([-4.0, -5.0], [True, False]),  # -sum_b w g_b
}
# every score is one process's on the union (movement's one-pass sum over batches too: summed over ranks)
SCALE: dict[str, float] = {}


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_loss_criteria_on_unequal_shards_score_the_union_of_the_batches(uneven, kind):
    union_scores, mask = UNION[kind]
    scale = SCALE.get(kind, 1.0)
    expected = (torch.tensor(union_scores) * scale).tolist()  # float32, as the criteria return
    got = _both(uneven, f"{kind}-uneven")
    if kind == "grasp":  # two float32 means over 2 and 3 batches, weighted 2/5 and 3/5: rounding only
        assert got["scores"]["0.weight"] == pytest.approx(expected, rel=1e-6)
    else:
        assert got["scores"] == {"0.weight": expected}
    assert got["masks"] == {"0.weight": mask}
    assert _both(uneven, f"{kind}-direct-uneven") == {"scores": got["scores"]}  # the criterion alone, too
    union = _worker().decide(kind, _union(kind))  # one process on the union: the same bits (grasp: rounding)
    assert union["masks"] == got["masks"]
    union_scores = (torch.tensor(union["scores"]["0.weight"]) * scale).tolist()
    if kind == "grasp":
        assert union_scores == pytest.approx(got["scores"]["0.weight"], rel=1e-6)
    else:
        assert union_scores == got["scores"]["0.weight"]
    if kind != "movement":  # the mean of the per-rank scores is another score: the checks can fail
        assert _mean_of_rank_scores(kind) != pytest.approx(expected, rel=1e-3)


def test_movement_one_pass_is_the_same_on_every_rank_called_alone(uneven):
    # each rank's -sum_b w g_b summed over the ranks inside the criterion: (-4 + 0, 0 - 5) on both ranks, the
    # union's sum (each rank used to return its own sum, (-4, 0) and (0, -5), leaving the reduction to the Sparsifier)
    assert _both(uneven, "movement-direct-uneven") == {"scores": {"0.weight": [-4.0, -5.0]}}
    assert _mean_of_rank_scores("movement") == [-2.0, -2.5]  # what averaging the ranks' sums would give


# relu(x) on rank 0: (1, 0), (2, 0), (3, 1); on rank 1: (0, 1) three times, (0, 0), (1, 1).
# G = sum_rows [r, 1]^T [r, 1] over the 8 rows of the union:
UNION_GRAM = [[15.0, 4.0, 7.0], [4.0, 5.0, 5.0], [7.0, 5.0, 8.0]]
RANK0_GRAM = [[14.0, 3.0, 6.0], [3.0, 1.0, 1.0], [6.0, 1.0, 3.0]]


def test_regression_on_unequal_shards_sums_the_consumer_grams_of_the_union(uneven):
    assert _both(uneven, "gram-uneven") == {"gram": UNION_GRAM, "rows": 8}
    worker = _worker()
    assert _both(uneven, "regression-uneven") == worker.decide("regression", _union("regression"))
    assert _both(uneven, "regression-direct-uneven") == worker.direct("regression", _union("regression"))
    pruned = _both(uneven, "channel-prune-uneven")
    assert pruned == worker.channel_prune(_union("regression"))
    # keep channel 0; least squares of y = r1 + 2 r2 on (r1, 1): slope Sxy / Sxx = (65/8) / (71/8),
    # intercept 17/8 - (65/71) 7/8 = 752/568
    assert pruned["keep"] == [True, False]
    assert pruned["weight"][0] == [pytest.approx(65 / 71, rel=1e-6), 0.0]
    assert pruned["bias"] == [pytest.approx(752 / 568, rel=1e-6)]
    scores = _both(uneven, "regression-uneven")["scores"]["p.weight"]
    assert scores[0] == scores[1] > scores[2] == scores[3]  # channel 0 first, as the LASSO keeps it
    assert _both(uneven, "regression-uneven")["masks"]["p.weight"] == [True, True, False, False]


# --- empty shards ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_shard_on_one_rank_adds_nothing(edges, kind):
    got = _both(edges, f"{kind}-empty-rank1")
    assert "error" not in got
    alone = _worker().decide(kind, _worker().shard(kind, 0))  # one process on rank 0's shard
    scale = SCALE.get(kind, 1.0)
    assert got["masks"] == alone["masks"]
    assert got["scores"] == {n: (torch.tensor(v) * scale).tolist() for n, v in alone["scores"].items()}


def test_regression_with_an_empty_shard_on_one_rank_uses_the_other_ranks_rows(edges):
    # the consumer did not run on rank 1: that used to raise "did not run" on rank 1 alone
    assert _both(edges, "gram-empty-rank1") == {"gram": RANK0_GRAM, "rows": 3}
    pruned = _both(edges, "channel-prune-empty-rank1")
    assert pruned == _worker().channel_prune(_worker().shard("regression", 0))
    # rank 0's rows: y = r1 + 2 r2 = (1, 2, 5) on r1 = (1, 2, 3): slope 2, intercept 8/3 - 4
    assert pruned["keep"] == [True, False]
    assert pruned["weight"] == [[2.0, 0.0]] and pruned["bias"] == [pytest.approx(-4 / 3, rel=1e-6)]


@pytest.mark.parametrize("kind", KINDS)
def test_no_batches_on_any_rank_is_one_error_on_every_rank(edges, kind):
    assert _both(edges, f"{kind}-empty-everywhere") == {
        "error": "ScoreData yielded no batches on any of the 2 ranks; pass a non-empty loader"}


def test_a_consumer_that_runs_on_no_rank_is_one_error_on_every_rank(edges):
    assert _both(edges, "channel-prune-spare-runs-nowhere") == {
        "error": "regression: consumer(s) spare did not run on the ScoreData batches; check the model"}


# --- failures on rank 1 only: the same error everywhere, no rank left waiting -----------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_input_on_one_rank_raises_the_same_error_on_every_rank(edges, kind):
    got = _both(edges, f"{kind}-nan-rank1")
    if kind == "regression":  # the NaN Gram is summed into every rank's
        expected = "regression: the input of consumer 'c' contains NaN/inf on the ScoreData batches; check the "
        assert _both(edges, "gram-nan-rank1")["error"].startswith(expected)
    else:  # the NaN gradient is summed into every rank's: Criterion.__call__ refuses it everywhere
        expected = f"criterion {NAME.get(kind, kind)!r} gave NaN scores for '0.weight'; check the weights"
    assert got["error"].startswith(expected)
    assert _both(edges, f"{kind}-direct-nan-rank1") == got  # the criterion alone, without the Sparsifier


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_that_does_not_fit_on_one_rank_raises_the_same_error_on_every_rank(edges, kind):
    message = _both(edges, f"{kind}-wrong-width-rank1")["error"]
    name = NAME.get(kind, kind)  # FORCE names itself though its gradients are loss_gradients' (SNIP's)
    assert message.startswith(f"criterion {name!r} could not run the model and loss_fn on a ScoreData batch "
                              "(inputs (1, 3), targets (1,)): mat1 and mat2 shapes cannot be multiplied")
    assert message.endswith("(on rank 1 of 2)") and "\n" not in message


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_that_is_not_a_pair_on_one_rank_raises_the_same_error_on_every_rank(edges, kind):
    assert _both(edges, f"{kind}-not-a-pair-rank1") == {
        "error": "ScoreData batch 2 is a Tensor, not an (inputs, targets) pair; yield (x, y) from the loader "
                 "(on rank 1 of 2)"}


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_a_loss_that_is_not_a_scalar_on_one_rank_raises_the_same_error_on_every_rank(edges, kind):
    shape = "(1, 1)" if kind == "obd-fisher" else "(2, 1)"  # the Fisher diagonal takes one sample at a time
    assert _both(edges, f"{kind}-not-a-scalar-rank1") == {
        "error": f"ScoreData.loss_fn returned {shape}; expected a scalar tensor (use reduction='mean') (on rank 1 of 2)"}


def test_synflow_takes_the_input_shape_from_each_ranks_data_and_fails_on_every_rank_without_it(edges, uneven):
    # R = |w| . 1: both weights score dR/d|w_i| |w_i| = 1, divided by the maximum
    assert _both(uneven, "synflow-uneven")["scores"] == {"0.weight": [1.0, 1.0]}
    assert _both(edges, "synflow-empty-rank1") == {
        "error": "ScoreData yielded no batches; pass a non-empty loader (on rank 1 of 2)"}
    assert _both(edges, "synflow-unbatched-rank1") == {
        "error": "criterion 'synflow' takes the input shape from the first ScoreData batch, but its inputs are not a "
                 "batched tensor (Tensor); pass input_shape=(...) instead (on rank 1 of 2)"}


def test_the_ranks_stay_in_step_after_the_agreed_errors(edges, uneven):
    assert [r["in_step"] for r in edges] == [3.0, 3.0]
    assert [r["in_step"] for r in uneven] == [3.0, 3.0]


# --- world size 1: unchanged --------------------------------------------------------------------------------
def _conv_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 3)).eval()


def _conv_batches() -> list:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (5, 3, 2)]


def _batch_grads(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple:
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()), **kwargs)


def test_world_size_1_snip_is_bit_identical_to_the_formula():
    model, batches = _conv_net(), _conv_batches()
    params = dict(model.named_parameters())
    g = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}  # sum_b dL_b/dw, float64
    for x, y in batches:
        for n, grad in zip(params, _batch_grads(model, params, x, y)):
            g[n] += grad.double()
    raw = {n: (p.detach().double() * (g[n] / 3)).abs() for n, p in params.items()}  # |w g|, g the batch mean
    total = sum(float(r.sum()) for r in raw.values())
    got = get_criterion("snip")(model, params, ScoreData(batches))
    assert all(torch.equal(got[n], (raw[n] / total).float()) for n in params)


def test_world_size_1_movement_is_bit_identical_to_the_formula():
    model, batches = _conv_net(), _conv_batches()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros(p.shape) for n, p in params.items()}  # -sum_b w g_b, float32 in batch order
    for x, y in batches:
        for (n, p), grad in zip(params.items(), _batch_grads(model, params, x, y)):
            expected[n] -= p.detach() * grad
    got = get_criterion("movement")(model, params, ScoreData(batches))
    assert all(torch.equal(got[n], expected[n]) for n in params)


def test_world_size_1_grasp_is_bit_identical_to_the_formula():
    model, batches = _conv_net(), _conv_batches()
    params = dict(model.named_parameters())

    def loss(x, y):
        return nn.functional.cross_entropy(model(x) / 200.0, y)

    g = {n: torch.zeros(p.shape) for n, p in params.items()}  # mean_b dL_b/dw, float32
    for x, y in batches:
        for n, grad in zip(params, torch.autograd.grad(loss(x, y), list(params.values()))):
            g[n] += grad / 3
    hg = {n: torch.zeros(p.shape) for n, p in params.items()}  # mean_b H_b g
    for x, y in batches:
        grads = torch.autograd.grad(loss(x, y), list(params.values()), create_graph=True)
        inner = sum((gr * g[n]).sum() for n, gr in zip(params, grads))
        for n, product in zip(params, torch.autograd.grad(inner, list(params.values()), allow_unused=True)):
            if product is not None:
                hg[n] += product / 3
    got = get_criterion("grasp")(model, params, ScoreData(batches))
    assert all(torch.equal(got[n], params[n].detach() * hg[n]) for n in params)


def test_world_size_1_obd_fisher_is_the_mean_squared_per_sample_gradient():
    model, batches = _conv_net(), _conv_batches()
    params = {n: p for n, p in model.named_parameters() if n in ("3.weight", "6.weight")}
    squares = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for x, y in batches:
        for i in range(len(x)):  # sum_n (d l_n / dw)^2, one sample at a time
            for n, grad in zip(params, _batch_grads(model, params, x[i:i + 1], y[i:i + 1])):
                squares[n] += grad.double().square()
    got = get_criterion("obd", hessian="fisher")(model, params, ScoreData(batches))
    for n, p in params.items():  # vmap and this loop round differently: float32 closeness, not bits
        torch.testing.assert_close(got[n], (0.5 * squares[n] / 10 * p.detach().double().square()).float(),
                                   rtol=1e-5, atol=1e-12)


def test_world_size_1_regression_gram_is_the_sum_over_the_rows():
    worker = _worker()
    stats = collect_input_grams(worker.WithSpare().eval(), ["c"], ScoreData(_union("regression")))["c"]
    assert stats.gram.tolist() == UNION_GRAM and stats.rows == 8
    with pytest.raises(PrunelabError, match=r"^regression: consumer\(s\) spare did not run"):
        collect_input_grams(worker.WithSpare().eval(), ["c", "spare"], ScoreData(_union("regression")))


@pytest.mark.parametrize("kind", KINDS)
def test_world_size_1_messages_have_no_rank_suffix(kind):
    worker = _worker()
    model = worker.build(kind)
    params = {n: p for n, p in model.named_parameters() if n in ("0.weight", "p.weight", "c.weight")}
    with pytest.raises(PrunelabError, match=r"^ScoreData yielded no batches; pass a non-empty loader$"):
        worker.criterion(kind)(model, params, worker.score_data(kind, []))
    with pytest.raises(PrunelabError, match=r"could not run the model and loss_fn on a ScoreData batch.*accepts$"):
        worker.criterion(kind)(model, params, worker.score_data(kind, worker.with_wrong_width(worker.shard(kind, 0))))


@pytest.mark.parametrize("kind", ["snip", "grasp", "force"])
def test_world_size_1_a_batch_that_does_not_fit_is_a_one_line_error_for_the_pai_criteria(kind):
    # SNIP, GraSP and FORCE let the model's RuntimeError escape with its traceback (and, under DDP, the
    # other ranks wait for the rank that raised)
    worker = _worker()
    model = worker.build(kind)
    data = worker.score_data(kind, worker.with_wrong_width(worker.shard(kind, 0)))
    with pytest.raises(PrunelabError, match=r"\(inputs \(1, 3\), targets \(1,\)\): mat1 and mat2") as info:
        worker.criterion(kind)(model, dict(model.named_parameters()), data)
    assert "\n" not in str(info.value)
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_a_nan_weight_on_one_rank_under_a_data_free_criterion_is_one_error_on_every_rank(edges):
    """magnitude reduces nothing itself: its NaN check on rank 1 alone used to leave rank 0 in the Sparsifier's
    all-reduce of the scores; now the criterion call is agreed on (Sparsifier.scores)."""
    message = _both(edges, "magnitude-nan-weight-rank1")["error"]
    assert message.startswith("criterion 'magnitude' gave NaN scores for '0.weight'")
    assert message.endswith("(on rank 1 of 2)") and "\n" not in message

