"""Worker for tests/test_ddp_edge_review.py: one rank of a 2-process gloo run of taylor / apoz edge cases.

Shards of unequal size (rank 0: 3 samples in batches of 2 and 1; rank 1: 5 samples in batches of
2, 2 and 1), an empty shard on one rank or on both, a NaN input and a batch of the wrong width on
rank 1 only.  The unequal shards run first and their records are written before the rest, so a
missing reduction shows as wrong numbers even where a later case hangs.  Each case runs a Sparsifier at sparsity 0.5 (or the criterion alone) and records
the scores and masks, or the PrunelabError; after the failing cases every rank must still be in
step (a final all-reduce checks it).  Writes ``<out>/rank<r>.json``.

The hand-made models and shards (:func:`taylor_model`, :func:`apoz_model`, :func:`shard`) are
imported by the test too, for its one-process references.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from prunelab.criteria import ScoreData, get_criterion
from prunelab.errors import PrunelabError
from prunelab.sparsifier import Sparsifier
from torchrun_exit import run_parts

CASES = ("taylor", "apoz")
GRANULARITY = {"taylor": "unstructured", "apoz": "channel"}


def taylor_model() -> nn.Module:
    """``y = w . x`` with ``w = (1, 1)``: with ``loss = mean_n y_n`` the gradient is the batch mean of ``x``,
    so the Taylor score of batch ``b`` is ``|mean_b x|`` per weight."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    return model


def apoz_model() -> nn.Module:
    """``relu(x)`` through an identity Linear: channel ``c`` is zero exactly where ``x_c <= 0``."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    return model


def mean_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.mean()


SAMPLES = {
    # taylor: rank 0's batch means are (2, 0), (2, 0); rank 1's (0, 2), (0, 2), (0, 1)
    "taylor": ([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]],
               [[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [0.0, 2.0], [0.0, 1.0]]),
    # apoz: zeros of channel 0: 0 of 3 on rank 0, 4 of 5 on rank 1; of channel 1: 2 of 3, 1 of 5
    "apoz": ([[1.0, -1.0], [2.0, -1.0], [3.0, 1.0]],
             [[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]),
}


def shard(kind: str, rank: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s batches of ``kind``: its samples (3 on rank 0, 5 on rank 1) in batches of 2 (the
    last one shorter), as a loader with ``batch_size=2, drop_last=False`` gives them."""
    x = torch.tensor(SAMPLES[kind][rank])  # (N, 2)
    return [(x[i:i + 2], torch.zeros(len(x[i:i + 2]), dtype=torch.long)) for i in range(0, len(x), 2)]


def build(kind: str) -> nn.Module:
    return taylor_model() if kind == "taylor" else apoz_model()


def score_data(kind: str, batches: list) -> ScoreData:
    return ScoreData(batches, loss_fn=mean_loss) if kind == "taylor" else ScoreData(batches)


def decide(kind: str, batches: list) -> dict:
    """The Sparsifier's scores and masks at sparsity 0.5 on ``batches``, or the PrunelabError it raised."""
    sparsifier = Sparsifier(build(kind), criterion=kind, granularity=GRANULARITY[kind], data=score_data(kind, batches))
    try:
        scores = sparsifier.scores()
        masks = sparsifier.update(0.5)
    except PrunelabError as error:
        return {"error": str(error)}
    return {"scores": {n: s.reshape(-1).tolist() for n, s in scores.items()},
            "masks": {n: m.reshape(-1).tolist() for n, m in masks.items()}}


def criterion_error(kind: str, batches: list) -> str | None:
    """The criterion called directly (no Sparsifier), the PrunelabError it raised or None."""
    model = build(kind)
    try:
        get_criterion(kind)(model, dict(model.named_parameters()), score_data(kind, batches))
    except PrunelabError as error:
        return str(error)
    return None


def with_nan(batches: list) -> list:
    x, y = batches[0]
    return [(torch.full_like(x, float("nan")), y)] + batches[1:]


def with_wrong_width(batches: list) -> list:
    x, y = batches[-1]
    return batches[:-1] + [(torch.zeros(len(x), 3), y)]  # the layers take 2 features


def run_cases(mode: str, rank: int) -> dict:
    """``uneven``: the reductions (no rank fails); ``edges``: empty shards and failures on one rank."""
    out = {}
    for kind in CASES:
        own = shard(kind, rank)
        if mode == "uneven":
            out[f"{kind}-uneven"] = decide(kind, own)
            out[f"{kind}-direct-uneven"] = criterion_error(kind, own)
            continue
        out[f"{kind}-empty-rank1"] = decide(kind, own if rank == 0 else [])
        out[f"{kind}-empty-everywhere"] = decide(kind, [])
        out[f"{kind}-nan-rank1"] = decide(kind, with_nan(own) if rank == 1 else own)
        out[f"{kind}-wrong-width-rank1"] = decide(kind, with_wrong_width(own) if rank == 1 else own)
        out[f"{kind}-direct-nan-rank1"] = criterion_error(kind, with_nan(own) if rank == 1 else own)
    return out


if __name__ == "__main__":
    run_parts(Path(sys.argv[1]), run_cases)
