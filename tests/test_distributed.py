"""Two gloo processes under torchrun: masks bit-identical, sparsity held after training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_rank_masks_identical(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(worker), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # each rank saw different data, so its local scores differ ...
    assert ranks[0]["local_score_sum"] != pytest.approx(ranks[1]["local_score_sum"])
    # ... yet the masks, decided from reduced scores, are bit-identical
    assert ranks[0]["mask_fingerprint"] == ranks[1]["mask_fingerprint"]
    for r in ranks:
        assert r["zeros_held"] and r["steps"] > 5
        assert r["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert ranks[0]["weight_sum"] == pytest.approx(ranks[1]["weight_sum"], rel=1e-6)  # DDP kept replicas in sync
