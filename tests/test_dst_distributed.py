"""Two gloo processes under torchrun: DST masks stay bit-identical on both ranks through rewiring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_rank_dst_masks_identical_after_every_update(tmp_path):
    worker = Path(__file__).with_name("ddp_dst_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(worker), str(tmp_path)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
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
