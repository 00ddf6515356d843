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
        assert r["int_sum"] == [3]  # an integer sum over the ranks, exact
        assert r["wrappers_freed"] == [True, True]  # each call's DDP wrapper released when it returned
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


def test_a_nan_loss_on_one_rank_stops_every_rank_and_a_failed_rank_shuts_down_without_a_barrier(torchrun):
    ranks = torchrun("ddp_nan_worker.py")  # the fixture's subprocess timeout turns a hang into a failure
    expected = "training loss became non-finite on rank 1 (first of 2) at step 3 (train); lower the learning rate"
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[0]["error"].startswith(expected)
    assert "\n" not in ranks[0]["error"]
    for r in ranks:
        assert r["wrapper_freed"]  # train() released its DDP wrapper before raising
        assert r["weights_kept"] and r["weights_finite"]  # the NaN step never reached the optimizer
    assert ranks[1]["peer_error"] == "RuntimeError" and ranks[1]["group_destroyed"]
    assert ranks[1]["shutdown_seconds"] < 30  # no barrier waiting for rank 0
    assert ranks[0]["peer_error"] is not None and ranks[0]["group_destroyed"]  # its all-reduce failed, not hung


def test_all_reduce_sum_keeps_integers_and_refuses_bools_at_world_size_1():
    from prunelab.distributed import all_reduce_sum_

    ints = torch.arange(4)
    assert all_reduce_sum_(ints) is ints and torch.equal(ints, torch.arange(4)) and ints.dtype == torch.int64
    with pytest.raises(PrunelabError, match=r"all_reduce_sum_ needs a numeric tensor, got dtype torch\.bool"):
        all_reduce_sum_(torch.ones(2, dtype=torch.bool))


def test_first_rank_where_is_the_local_answer_at_world_size_1():
    from prunelab.distributed import first_rank_where

    assert first_rank_where(True) == 0 and first_rank_where(False) is None


@pytest.mark.parametrize(("env", "cuda_devices", "expected"), [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, ("gloo", None)),  # a CPU host keeps gloo
    ({"RANK": "0", "WORLD_SIZE": "1"}, 2, ("gloo", None)),  # no LOCAL_RANK: not a torchrun worker, no device
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, 2, ("cpu:gloo,cuda:nccl", 1)),  # cuda:LOCAL_RANK
    ({"LOCAL_RANK": "0"}, 1, ("cpu:gloo,cuda:nccl", 0)),
])
def test_launch_settings_pick_the_backend_and_the_local_cuda_device(env, cuda_devices, expected):
    from prunelab.distributed import launch_settings

    assert launch_settings(env, cuda_devices) == expected


def test_launch_settings_refuse_a_local_rank_without_its_device():
    from prunelab.distributed import launch_settings

    with pytest.raises(PrunelabError, match=r"LOCAL_RANK 2 has no CUDA device: 2 visible; launch at most 2"):
        launch_settings({"LOCAL_RANK": "2"}, 2)
    with pytest.raises(PrunelabError, match=r"LOCAL_RANK must be an integer, got 'x'"):
        launch_settings({"LOCAL_RANK": "x"}, 1)


def test_shutdown_is_a_no_op_without_a_process_group():
    from prunelab.distributed import shutdown

    shutdown()
    shutdown(failed=True)
