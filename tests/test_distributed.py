"""Two gloo processes under torchrun: masks bit-identical, sparsity held after training,
a fresh rank-consistent shuffle order in every epoch of consecutive train() calls."""

import pytest
import torch

from prunelab.distributed import all_reduce_mean_
from prunelab.errors import PrunelabError


def test_two_rank_masks_identical(torchrun):
    ranks = torchrun("ddp_worker.py")
    # each rank saw different data, so its local scores differ ...
    assert ranks[0]["local_score_sum"] != pytest.approx(ranks[1]["local_score_sum"])
    # ... yet the masks, decided from reduced scores, are bit-identical
    assert ranks[0]["mask_fingerprint"] == ranks[1]["mask_fingerprint"]
    for r in ranks:
        assert r["zeros_held"] and r["steps"] > 5
        assert r["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert ranks[0]["weight_sum"] == pytest.approx(ranks[1]["weight_sum"], rel=1e-6)  # DDP kept replicas in sync
    # two train() calls of one epoch: DistributedSampler epochs 0 then 1 (not 0 twice), the same on both ranks
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == [0, 1]
    for r in ranks:
        assert r["orders"][0] != r["orders"][1]  # a fresh order for the second call
        assert r["int_mean_refused"]
    n = ranks[0]["dataset_size"]
    for epoch in range(2):  # one permutation shared by the ranks: their shards cover every sample
        assert set(ranks[0]["orders"][epoch]) | set(ranks[1]["orders"][epoch]) == set(range(n))


def test_all_reduce_mean_refuses_integer_tensors_before_touching_them():
    ints = torch.arange(4)
    with pytest.raises(PrunelabError, match=r"all_reduce_mean_ needs a floating-point tensor, got dtype torch\.int64"):
        all_reduce_mean_(ints)
    assert torch.equal(ints, torch.arange(4))
    floats = torch.tensor([1.0, 2.0])
    assert all_reduce_mean_(floats) is floats and torch.equal(floats, torch.tensor([1.0, 2.0]))  # world size 1
