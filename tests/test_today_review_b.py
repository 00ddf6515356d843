"""Fresh-eyes review (b) of the day's changes to methods / oneshot / heads / layers / pipeline / DST.

Each test is a regression test for a bug found in review: it fails on the code before the fix.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from prunelab.errors import PrunelabError
from prunelab.methods.base import require_loader, require_test_loader


class _Stream(IterableDataset):
    """An IterableDataset without __len__: ``len(DataLoader(stream))`` raises TypeError."""

    def __iter__(self):
        for i in range(3):
            yield torch.full((2,), float(i)), i % 2


def test_require_loader_accepts_a_loader_without_length():
    # the empty-loader check called len() on every DataLoader: one over an IterableDataset raised
    # a bare TypeError ("object of type '_Stream' has no len()") instead of being accepted
    loader = DataLoader(_Stream(), batch_size=2)
    with pytest.raises(TypeError):
        len(loader)
    require_loader(loader, "data to score on", "snip", "pass a loader")  # no error
    require_test_loader(loader, "iterative")  # evaluate() only iterates the test loader
    assert sum(1 for _ in loader) == 2  # the check consumed nothing: 3 samples, batches of 2 and 1


def test_require_loader_still_refuses_an_empty_loader():
    with pytest.raises(PrunelabError, match="has no batch") as info:
        require_loader(DataLoader([], batch_size=2), "a test loader", "iterative", "pass the test DataLoader")
    assert "\n" not in str(info.value)
    with pytest.raises(PrunelabError, match="has no batch"):
        require_loader([], "a test loader", "iterative", "pass the test DataLoader")


def test_lottery_loader_without_length_gets_its_own_message():
    # lottery's check names the missing length (rewind step, lr schedule); the new empty check pre-empted it
    from prunelab.methods.lottery import _check_loaders

    loader = DataLoader(_Stream(), batch_size=2)
    with pytest.raises(PrunelabError, match="has no length, which the rewind step") as info:
        _check_loaders(loader, loader, "lottery")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value, why", [
    (float("inf"), "T_end beyond the run never ends the updates"),  # said "T_end at step 0 leaves no update"
    (1.5, "T_end beyond the run never ends the updates"),
    (0.0, "T_end at step 0 leaves no update"),
    (-0.25, "T_end at step 0 leaves no update"),
    ("0.5", "pass a number, not a str"),  # said "T_end at step 0 leaves no update"
    (True, "pass a number, not a bool"),
    (float("nan"), "pass a number, not nan"),
])
def test_end_fraction_refusal_gives_the_right_reason(value, why):
    from prunelab.dst.base import UpdateSchedule

    with pytest.raises(PrunelabError) as info:
        UpdateSchedule.for_run(100, end_fraction=value)
    message = str(info.value)
    assert message == f"T_end fraction must be in (0, 1] of the run, got {value!r}; {why}, RigL uses 0.75"


class _Samples(IterableDataset):
    """Four (x, label) samples of a 3-input, 2-class problem, streamed: no __len__."""

    def __iter__(self):
        torch.manual_seed(0)
        for i in range(4):
            yield torch.randn(3), i % 2


@pytest.mark.parametrize("method", ["iterative", "gradual", "rigl", "set", "static"])
def test_training_loader_without_length_is_refused_in_one_line_before_pruning(method):
    # iterative pruned its first round and then crashed with a raw TypeError in len(train_loader);
    # gradual and the DST methods crashed with the same TypeError before training
    from torch import nn

    from prunelab.bench.training import TrainConfig
    from prunelab.methods import METHODS
    from prunelab.methods.base import PruneSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = DataLoader(_Samples(), batch_size=2)
    test = [(torch.randn(2, 3), torch.tensor([0, 1]))]
    spec = PruneSpec(sparsity=0.5, rounds=2, finetune_epochs=1)
    config = TrainConfig(epochs=1, batch_size=2, progress=False)
    with pytest.raises(PrunelabError, match=rf"^{method}: the training loader \(DataLoader\) has no length, which the "
                                            r"learning-rate schedule needs; pass a DataLoader over a map-style") as info:
        METHODS.get(method)(model, stream, test, spec, config)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned
