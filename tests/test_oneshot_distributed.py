"""One-shot pruning under torchrun: ranks with different calibration shards prune identically,
and exactly as one process with all the data (plain SparseGPT and with dense targets)."""

import importlib.util
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_oneshot_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_oneshot_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ranks_prune_like_one_process_with_all_batches(torchrun):
    ranks = torchrun(WORKER.name)
    worker = _worker_module()
    for label, config in worker.CONFIGS.items():
        single = worker.pruned_weights(config, worker.calibration())  # one process, all four batches
        alone = worker.pruned_weights(config, worker.calibration()[0::2])  # rank 0's shard, not reduced
        assert not torch.allclose(torch.tensor(alone["blocks.1.fc2.weight"]), torch.tensor(single["blocks.1.fc2.weight"]))
        for name, expected in single.items():
            expected = torch.tensor(expected)
            got = [torch.tensor(r["weights"][label][name]) for r in ranks]
            assert torch.equal(got[0], got[1]), (label, name)  # ranks bit-identical
            assert torch.equal(got[0] == 0, expected == 0), (label, name)  # the same mask as one process
            torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
