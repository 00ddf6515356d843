"""DDP edge cases of the taylor and apoz criteria, on 2 gloo ranks (tests/ddp_edge_review_worker.py).

* Unequal shards (3 and 5 samples, in 2 and 3 batches): every rank's scores are those of one
  process on the union of the data, sums and counts reduced before the division -- not the mean
  of the per-rank means (which keeps the other weight / channel here).
* An empty shard on one rank adds nothing; empty shards everywhere, a NaN input or a batch of the
  wrong width on rank 1 only: every rank raises the same one-line PrunelabError, and the ranks stay
  in step (none is left waiting in a collective).
* World size 1 is unchanged, bit for bit: scores equal an independent loop of the formula.

One torchrun run serves every test here (cached); it is killed, with its workers, after 90 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from prunelab.criteria import ScoreData, get_criterion
from prunelab.errors import PrunelabError

from cached_torchrun import CachedTorchrun  # tests/ helper

RUN = CachedTorchrun(Path(__file__).with_name("ddp_edge_review_worker.py"))


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


def _one_process(kind: str, batches: list) -> dict:
    """The worker's decision in this (single) process."""
    return _worker().decide(kind, batches)


def _mean_of_rank_means(kind: str) -> torch.Tensor:
    """The criterion on each rank's shard in this process, the two scores averaged (flat)."""
    worker = _worker()
    scores = []
    for r in (0, 1):
        model = worker.build(kind)
        scores.append(get_criterion(kind)(model, dict(model.named_parameters()),
                                          worker.score_data(kind, worker.shard(kind, r)))["0.weight"])
    return ((scores[0] + scores[1]) / 2).reshape(-1)


def _union(kind: str) -> list:
    worker = _worker()
    return worker.shard(kind, 0) + worker.shard(kind, 1)


# --- unequal shards: the union, exactly ------------------------------------------------------------
def test_taylor_on_unequal_shards_is_the_mean_over_the_union_of_the_batches(uneven):
    # batch means of x: rank 0 (2, 0), (2, 0); rank 1 (0, 2), (0, 2), (0, 1); w = (1, 1), so
    # s = sum_b |mean_b x| / 5 = (4/5, 5/5); the mean of the rank means would be (4/2, 5/3) / 2 = (1, 5/6)
    expected = (torch.tensor([4.0, 5.0]) / 5).tolist()  # float32, as the criterion divides
    for r in uneven:
        got = r["taylor-uneven"]
        assert got["scores"] == {"0.weight": expected}
        assert got["masks"] == {"0.weight": [False, True]}
    assert _one_process("taylor", _union("taylor")) == uneven[0]["taylor-uneven"]
    # the per-rank means averaged (the old reduction) keep the other weight: the check can fail
    assert _mean_of_rank_means("taylor").tolist() == [1.0, pytest.approx(5 / 6)]


def test_apoz_on_unequal_shards_counts_zeros_over_the_union_of_the_samples(uneven):
    # zeros of channel 0: 0 of 3 + 4 of 5 -> APoZ 4/8; channel 1: 2 of 3 + 1 of 5 -> 3/8; scores 1 - APoZ.
    # the mean of the rank fractions would be (0.4, 13/30): scores (0.6, 0.567), keeping channel 0
    expected = [0.5, 0.5, 0.625, 0.625]  # rows of the (2, 2) weight
    for r in uneven:
        got = r["apoz-uneven"]
        assert got["scores"] == {"0.weight": expected}
        assert got["masks"] == {"0.weight": [False, False, True, True]}
    assert _one_process("apoz", _union("apoz")) == uneven[0]["apoz-uneven"]
    old = _mean_of_rank_means("apoz")  # the old reduction ranks the channels the other way round
    assert old.tolist() == [pytest.approx(0.6)] * 2 + [pytest.approx(1 - 13 / 30)] * 2


@pytest.mark.parametrize("kind", ["taylor", "apoz"])
def test_an_empty_shard_on_one_rank_adds_nothing(edges, kind):
    got = [r[f"{kind}-empty-rank1"] for r in edges]
    assert got[0] == got[1] == _one_process(kind, _worker().shard(kind, 0))
    assert "error" not in got[0]


@pytest.mark.parametrize("kind", ["taylor", "apoz"])
def test_no_batches_on_any_rank_is_one_error_on_every_rank(edges, kind):
    got = [r[f"{kind}-empty-everywhere"] for r in edges]
    assert got[0] == got[1] == {"error": "ScoreData yielded no batches on any of the 2 ranks; pass a non-empty loader"}


# --- failures on one rank: the same error everywhere, no rank left waiting --------------------------
def test_a_nan_input_on_one_rank_raises_the_same_error_on_every_rank(edges):
    taylor = [r["taylor-nan-rank1"] for r in edges]  # NaN reaches rank 0 through the sum
    assert taylor[0] == taylor[1]
    assert taylor[0]["error"].startswith("criterion 'taylor' gave NaN scores for '0.weight'")
    assert [r["taylor-direct-nan-rank1"] for r in edges] == [taylor[0]["error"]] * 2
    apoz = [r["apoz-nan-rank1"] for r in edges]  # found on rank 1 before any collective, then agreed
    assert apoz[0] == apoz[1]
    assert apoz[0]["error"].startswith("apoz: the output of '0' contains NaN")
    assert apoz[0]["error"].endswith("(on rank 1 of 2)")
    assert [r["apoz-direct-nan-rank1"] for r in edges] == [apoz[0]["error"]] * 2


@pytest.mark.parametrize("kind", ["taylor", "apoz"])
def test_a_bad_batch_on_one_rank_raises_the_same_error_on_every_rank(edges, kind):
    got = [r[f"{kind}-wrong-width-rank1"] for r in edges]
    assert got[0] == got[1]
    assert got[0]["error"].startswith(f"criterion {kind!r} could not run the model and loss_fn on a ScoreData batch "
                                      "(inputs (1, 3), targets (1,))")
    assert got[0]["error"].endswith("(on rank 1 of 2)") and "\n" not in got[0]["error"]


def test_the_ranks_stay_in_step_after_the_agreed_errors(edges, uneven):
    assert [r["in_step"] for r in edges] == [3.0, 3.0]
    assert [r["in_step"] for r in uneven] == [3.0, 3.0]
    assert all(r[f"{kind}-direct-uneven"] is None for r in uneven for kind in ("taylor", "apoz"))


# --- world size 1: unchanged ------------------------------------------------------------------------
def _conv_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 3))


def _conv_batches() -> list:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (5, 3, 2)]


def test_world_size_1_taylor_is_bit_identical_to_the_per_batch_loop():
    model, batches = _conv_net().eval(), _conv_batches()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros(p.shape) for n, p in params.items()}  # float32, summed in batch order
    for x, y in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
        for (n, p), g in zip(params.items(), grads):
            expected[n] += (p.detach() * g).abs()
    got = get_criterion("taylor")(model, params, ScoreData(batches))
    assert all(torch.equal(got[n], expected[n] / 3) for n in params)


def test_world_size_1_apoz_is_the_zero_fraction_of_the_relu_outputs():
    model, batches = _conv_net().eval(), _conv_batches()
    with torch.no_grad():
        first = torch.cat([model[2](model[1](model[0](x))) for x, _ in batches])  # (10, 6, 6, 6)
        second = torch.cat([model[4](model[3](model[2](model[1](model[0](x))))) for x, _ in batches])  # (10, 4, 4, 4)
    params = {"0.weight": model[0].weight, "3.weight": model[3].weight}
    got = get_criterion("apoz")(model, params, ScoreData(batches))
    for name, out in (("0.weight", first), ("3.weight", second)):
        zeros = (out <= 0).transpose(0, 1).reshape(out.shape[1], -1).double()  # (C, N * M)
        expected = (1.0 - (zeros.sum(1) / zeros.shape[1]).float())  # (C,)
        assert torch.equal(got[name][:, 0, 0, 0], expected)
        assert torch.equal(got[name], expected.reshape(-1, 1, 1, 1).expand_as(got[name]))


def test_world_size_1_no_batches_keeps_its_message():
    model = _worker().taylor_model()
    for kind in ("taylor", "apoz"):
        with pytest.raises(PrunelabError, match=r"^ScoreData yielded no batches; pass a non-empty loader$"):
            get_criterion(kind)(model, dict(model.named_parameters()), ScoreData([]))


class _WithEmptyLayer(nn.Module):
    """``cat(relu(a(x)), relu(empty(x)))``: ``a`` the identity on 2 features, ``empty`` a zero-width layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.empty = nn.Linear(2, 2, bias=False), nn.Linear(2, 0)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 2) -> (N, 2)
        return torch.cat([torch.relu(self.a(x)), torch.relu(self.empty(x))], dim=1)


def test_apoz_scores_a_zero_width_layer_as_empty():
    # reshape(0, -1) of the zero-width layer's (N, 0) output used to fail as "could not run the model"
    model = _WithEmptyLayer()
    x = torch.tensor([[1.0, -1.0], [-2.0, -1.0], [3.0, 1.0], [4.0, -5.0]])  # zeros: channel 0 1 of 4, channel 1 3 of 4
    got = get_criterion("apoz")(model, dict(model.named_parameters()), ScoreData([(x, torch.zeros(4))]))
    assert got["a.weight"].tolist() == [[0.75, 0.75], [0.25, 0.25]]
    assert got["empty.weight"].shape == (0, 2) and got["empty.bias"].shape == (0,)
