"""Two gloo processes under torchrun: masks bit-identical, sparsity held after training."""

import pytest


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
