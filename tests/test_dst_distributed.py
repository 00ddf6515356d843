"""Two gloo processes under torchrun: DST masks stay bit-identical on both ranks through rewiring."""

import pytest


def test_two_rank_dst_masks_identical_after_every_update(torchrun):
    ranks = torchrun("ddp_dst_worker.py")
    assert ranks[0]["shard_sum"] != pytest.approx(ranks[1]["shard_sum"])  # each rank trained on its own data
    for name in ("rigl", "set", "snfs", "dsr"):
        a, b = ranks[0]["methods"][name], ranks[1]["methods"][name]
        assert len(a["fingerprints"]) >= 5, name  # the initial mask + several updates
        assert len(set(a["fingerprints"])) > 1, name  # the masks did change
        assert a["fingerprints"] == b["fingerprints"], name  # ... identically on both ranks, after every update
        assert a["kept"] == b["kept"]
        for r in (a, b):
            assert r["zeros_held"] and r["sparsity"] == pytest.approx(0.8, abs=1e-3)
        assert a["weight_sum"] == pytest.approx(b["weight_sum"], rel=1e-6)
    static = [r["methods"]["static"]["fingerprints"] for r in ranks]
    assert static[0] == static[1] and len(static[0]) == 1
