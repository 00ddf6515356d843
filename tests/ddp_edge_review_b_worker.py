"""Worker for tests/test_ddp_edge_review_b.py: one rank of a 2-process gloo run of the snip, grasp, force,
obd (exact / fisher), movement and regression criteria on edge cases (and synflow's input shape).

Shards of unequal size (rank 0: 3 samples in batches of 2 and 1; rank 1: 5 samples in batches of 2, 2
and 1), an empty shard on one rank or on both, and on rank 1 only: a NaN input, a batch of the wrong
width, a batch that is not an (inputs, targets) pair and a loss_fn that returns no scalar.  The unequal
shards run first and their records are written before the rest, so a missing reduction shows as wrong
numbers even where a later case hangs.  Each case runs a Sparsifier (or the criterion
alone) and records the scores and masks, or the PrunelabError; after the failing cases every rank must
still be in step (a final all-reduce checks it).  Writes ``<out>/rank<r>.json``.

The models, criteria and shards (:func:`build`, :func:`criterion`, :func:`shard`) are imported by the
test too, for its one-process references.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from prunelab.criteria import Criterion, ScoreData
from prunelab.criteria.movement import Movement
from prunelab.criteria.obd import OBD
from prunelab.criteria.pai import SNIP, GraSP, SynFlow
from prunelab.criteria.regression import Regression, collect_input_grams, regression_channel_prune
from prunelab.errors import PrunelabError
from prunelab.methods.pai import ForceSaliency
from prunelab.sparsifier import Sparsifier
from torchrun_exit import run_parts

CASES = ("snip", "grasp", "force", "obd-exact", "obd-fisher", "movement", "regression")
LOSS_CASES = CASES[:-1]  # regression never calls loss_fn
FORCE_THETA = (2.0, 1.0)  # FORCE's initial weights: S = |theta * g|


def mean_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_n y_n``: for ``y = w . x`` the gradient is the batch mean of ``x``."""
    return outputs.mean()


def half_square(outputs: Tensor, targets: Tensor) -> Tensor:
    """``1/2 mean_n y_n^2``: for ``y = w . x`` the gradient is ``mean_n x_n (x_n . w)``, the Hessian
    ``mean_n x_n x_n^T``."""
    return 0.5 * outputs.square().mean()


def not_a_scalar(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs


LOSS = {"snip": mean_loss, "force": mean_loss, "movement": mean_loss,
        "grasp": half_square, "obd-exact": half_square, "obd-fisher": half_square}


def linear_model() -> nn.Module:
    """``y = w . x`` with ``w = (1, 1)``."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    return model


class WithSpare(nn.Module):
    """``c(relu(p(x)))``: producer ``p`` the identity on 2 features, consumer ``c`` with weights (1, 2) and
    bias 0; ``spare`` (2 -> 1, weights 0.5) is never run."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.c, self.spare = nn.Linear(2, 2, bias=False), nn.Linear(2, 1), nn.Linear(2, 1)
        with torch.no_grad():
            self.p.weight.copy_(torch.eye(2))
            self.c.weight.copy_(torch.tensor([[1.0, 2.0]]))
            self.c.bias.zero_()
            self.spare.weight.fill_(0.5)
            self.spare.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:  # (N, 2) -> (N, 1)
        return self.c(torch.relu(self.p(x)))


def build(kind: str) -> nn.Module:
    return WithSpare() if kind == "regression" else linear_model()


def criterion(kind: str) -> Criterion:
    if kind == "force":
        return ForceSaliency(initial={"0.weight": torch.tensor([FORCE_THETA])})
    return {"snip": SNIP(), "grasp": GraSP(temperature=1.0), "obd-exact": OBD(hessian="exact"),
            "obd-fisher": OBD(hessian="fisher"), "movement": Movement(), "regression": Regression(),
            "synflow": SynFlow()}[kind]


SAMPLES = {
    # one nonzero feature per sample: rank 0 feature 0, rank 1 feature 1
    "linear": ([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]],
               [[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [0.0, 2.0], [0.0, 1.0]]),
    # regression: relu(x) is the consumer's input
    "regression": ([[1.0, -1.0], [2.0, -1.0], [3.0, 1.0]],
                   [[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]),
}


def shard(kind: str, rank: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s batches: its samples (3 on rank 0, 5 on rank 1) in batches of 2 (the last one
    shorter), as a loader with ``batch_size=2, drop_last=False`` gives them."""
    x = torch.tensor(SAMPLES["regression" if kind == "regression" else "linear"][rank])  # (N, 2)
    return [(x[i:i + 2], torch.zeros(len(x[i:i + 2]), dtype=torch.long)) for i in range(0, len(x), 2)]


def score_data(kind: str, batches: list, loss_fn=None) -> ScoreData:
    return ScoreData(batches, loss_fn=loss_fn or LOSS.get(kind, nn.functional.cross_entropy))


def decide(kind: str, batches: list, loss_fn=None) -> dict:
    """The Sparsifier's scores and masks on ``batches``, or the PrunelabError it raised: sparsity 0.5 of
    the 2 weights, or for regression 0.25 (channels; every layer keeps one: 1 of ``p``'s 2 channels goes)."""
    granularity, sparsity = ("channel", 0.25) if kind == "regression" else ("unstructured", 0.5)
    sparsifier = Sparsifier(build(kind), criterion=criterion(kind), granularity=granularity,
                            data=score_data(kind, batches, loss_fn))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # regression's l1 fallback for its last layer
            scores = sparsifier.scores()
            masks = sparsifier.update(sparsity)
    except PrunelabError as error:
        return {"error": str(error)}
    return {"scores": {n: s.reshape(-1).tolist() for n, s in scores.items()},
            "masks": {n: m.reshape(-1).tolist() for n, m in masks.items()}}


def direct(kind: str, batches: list) -> dict:
    """The criterion called directly (no Sparsifier): its scores, or the PrunelabError it raised."""
    model = build(kind)
    params = {n: p for n, p in model.named_parameters() if n in ("0.weight", "p.weight", "c.weight")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scores = criterion(kind)(model, params, score_data(kind, batches))
    except PrunelabError as error:
        return {"error": str(error)}
    return {"scores": {n: s.reshape(-1).tolist() for n, s in scores.items()}}


def channel_prune(batches: list, consumer: str | None = None) -> dict:
    """regression_channel_prune of producer ``p`` keeping 1 channel, or the PrunelabError it raised."""
    try:
        result = regression_channel_prune(WithSpare(), "p", consumer, ScoreData(batches), 1)
    except PrunelabError as error:
        return {"error": str(error)}
    return {"keep": result.keep.tolist(), "beta": result.beta.tolist(), "weight": result.consumer_weight.tolist(),
            "bias": result.consumer_bias.tolist(), "error": result.relative_error}


def gram(batches: list) -> dict:
    """collect_input_grams of consumer ``c``: ``G`` and ``M``, or the PrunelabError."""
    try:
        stats = collect_input_grams(WithSpare().eval(), ["c"], ScoreData(batches))["c"]
    except PrunelabError as error:
        return {"error": str(error)}
    return {"gram": stats.gram.tolist(), "rows": stats.rows}


def with_nan(batches: list) -> list:
    x, y = batches[0]
    return [(torch.full_like(x, float("nan")), y)] + batches[1:]


def with_wrong_width(batches: list) -> list:
    x, y = batches[-1]
    return batches[:-1] + [(torch.zeros(len(x), 3), y)]  # the layers take 2 features


def with_bare_tensor(batches: list) -> list:
    return batches[:-1] + [batches[-1][0]]  # inputs without targets


def run_cases(mode: str, rank: int) -> dict:
    """``uneven``: the reductions (no rank fails); ``edges``: empty shards and failures on rank 1."""
    out = {}
    on_rank1 = (lambda bad, good: bad if rank == 1 else good)
    for kind in CASES:
        own = shard(kind, rank)
        if mode == "uneven":
            out[f"{kind}-uneven"] = decide(kind, own)
            out[f"{kind}-direct-uneven"] = direct(kind, own)
            continue
        out[f"{kind}-empty-rank1"] = decide(kind, on_rank1([], own))
        out[f"{kind}-empty-everywhere"] = decide(kind, [])
        out[f"{kind}-nan-rank1"] = decide(kind, on_rank1(with_nan(own), own))
        out[f"{kind}-direct-nan-rank1"] = direct(kind, on_rank1(with_nan(own), own))
        out[f"{kind}-wrong-width-rank1"] = decide(kind, on_rank1(with_wrong_width(own), own))
        out[f"{kind}-not-a-pair-rank1"] = decide(kind, on_rank1(with_bare_tensor(own), own))
        if kind in LOSS_CASES:
            out[f"{kind}-not-a-scalar-rank1"] = decide(kind, own, loss_fn=on_rank1(not_a_scalar, None))
    own = shard("regression", rank)
    linear = shard("synflow", rank)  # synflow takes only the input shape from its first batch
    if mode == "uneven":
        out["gram-uneven"] = gram(own)
        out["channel-prune-uneven"] = channel_prune(own)
        out["synflow-uneven"] = decide("synflow", linear)
    else:
        out["synflow-empty-rank1"] = decide("synflow", on_rank1([], linear))
        out["synflow-unbatched-rank1"] = decide("synflow", on_rank1([(torch.ones(2), torch.zeros(1))], linear))
        out["gram-empty-rank1"] = gram(on_rank1([], own))
        out["channel-prune-empty-rank1"] = channel_prune(on_rank1([], own))
        out["channel-prune-spare-runs-nowhere"] = channel_prune(own, consumer="spare")
        out["gram-nan-rank1"] = gram(on_rank1(with_nan(own), own))
        out["magnitude-nan-weight-rank1"] = magnitude_with_nan_weight(rank == 1)
    return out


def magnitude_with_nan_weight(bad: bool) -> dict:
    """A data-free criterion (no collective of its own) on replicas that differ: a NaN weight on one rank."""
    model = linear_model()
    if bad:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    try:
        return {"masks": {n: m.reshape(-1).tolist() for n, m in Sparsifier(model).update(0.5).items()}}
    except PrunelabError as error:
        return {"error": str(error)}


if __name__ == "__main__":
    run_parts(Path(sys.argv[1]), run_cases)
