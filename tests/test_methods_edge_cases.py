"""Edge cases of the method drivers on tiny hand-made models: coarse groups in rising schedules,
loaders refused before anything is pruned, masks zero after every step, exact targets."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.bench.training import TrainConfig, seed_everything
from prunelab.criteria import Criterion, ScoreData
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.methods import METHODS, PruneSpec, run_gradual
from prunelab.methods.pai import run_force, run_synflow, shuffle_within_layers
from prunelab.schedules import Geometric
from prunelab.sparsifier import Sparsifier

CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-2, progress=False)
NONE = TrainConfig(epochs=0, progress=False)


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())  # 4 learnable classes


def loaders() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))  # 8 steps / epoch
    return train, DataLoader(data(), batch_size=32)


def mlp() -> nn.Sequential:
    seed_everything(0)
    return nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Dropout(0.1), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))


def whole_channels(mask: Tensor) -> bool:
    rows = mask.reshape(mask.shape[0], -1)
    return bool((rows.all(dim=1) | ~rows.any(dim=1)).all())


# --- rising schedules with coarse groups -------------------------------------------------------------
@pytest.mark.parametrize("name, spec", [
    ("iterative", PruneSpec(sparsity=0.5, granularity="channel", rounds=20, finetune_epochs=0)),
    ("gradual", PruneSpec(sparsity=0.5, granularity="channel", num_updates=15, end_fraction=1.0, finetune_epochs=0)),
    ("synflow", PruneSpec(sparsity=0.5, granularity="channel")),
])
def test_rising_schedules_with_channels_skip_steps_already_reached(name, spec):
    # a channel update removes whole groups and can overshoot its step; the next, smaller step
    # asked the allocator to keep more than was left ("at most N can be kept") and the run crashed
    train_loader, test_loader = loaders()
    model = mlp()
    result = METHODS.get(name)(model, train_loader, test_loader, spec, CONFIG if name == "gradual" else NONE)
    achieved = [h["achieved_sparsity"] for h in result.history]
    assert achieved == sorted(achieved) and achieved[-1] == result.masks.stats().sparsity
    assert result.masks.stats().sparsity >= 0.5  # the target is reached (channels may overshoot it)
    params = dict(model.named_parameters())
    for layer, mask in result.masks.items():
        assert whole_channels(mask) and torch.all(params[layer][~mask] == 0)


def test_iterative_with_channels_and_a_layer_rate_keeps_the_rate_every_round(monkeypatch):
    train_loader, test_loader = loaders()
    kept_per_round = []
    update = Sparsifier.update

    def record(self, sparsity, data=None):
        masks = update(self, sparsity, data)
        kept_per_round.append(int(masks["5.weight"].sum()))
        return masks

    monkeypatch.setattr(Sparsifier, "update", record)
    spec = PruneSpec(sparsity=0.5, granularity="channel", rounds=8, finetune_epochs=0, layer_rates={"5": 0.1})
    result = METHODS.get("iterative")(mlp(), train_loader, test_loader, spec, NONE)
    # the output layer (4 channels of 10) keeps round(4 * 0.9^r) channels after round r, whatever the others do
    assert kept_per_round == [10 * round(4 * 0.9 ** r) for r in range(1, 9)]
    assert [row["round"] for row in result.rows] == list(range(1, 9))
    assert all(whole_channels(mask) for mask in result.masks.values())


# --- loaders are refused before anything changes --------------------------------------------------
@pytest.mark.parametrize("name", ["oneshot", "iterative", "gradual", "snip", "force", "synflow", "random-erk", "pai",
                                  "pai-shuffled", "pai-reinit"])
@pytest.mark.parametrize("missing", ["train", "test"])
def test_a_missing_loader_is_refused_before_the_model_changes(name, missing):
    train_loader, test_loader = loaders()
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    args = (None, test_loader) if missing == "train" else (train_loader, None)
    spec = PruneSpec(sparsity=0.5, rounds=2, num_updates=2, finetune_epochs=1)
    data = ScoreData(train_loader, max_batches=1)  # data-driven PaI scores on this, so only training needs the loader
    with pytest.raises(PrunelabError, match=f"needs a {missing}[a-z ]* loader"):
        METHODS.get(name)(model, *args, spec, CONFIG, score_data=data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not pruned, not trained


# --- masks hold after every optimizer step ------------------------------------------------------
@pytest.mark.parametrize("name", ["oneshot", "iterative", "gradual", "snip", "grasp", "force", "synflow", "random-erk",
                                  "random-uniform", "pai", "pai-shuffled", "pai-reinit"])
def test_masked_weights_are_zero_after_every_step_and_runs_repeat(name, monkeypatch):
    leaks: list[str] = []
    step = Sparsifier.step

    def checked(self: Sparsifier) -> None:
        step(self)
        leaks.extend(n for n, p in self.params.items() if bool((p[~self.masks[n]] != 0).any()))
        for n, p in self.params.items():  # momentum of pruned weights is zero too
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    assert torch.all(value[~self.masks[n]] == 0)

    monkeypatch.setattr(Sparsifier, "step", checked)
    runs = []
    for _ in range(2):
        train_loader, test_loader = loaders()
        model = mlp()
        model.eval()
        spec = PruneSpec(sparsity=0.75, rounds=2, num_updates=3, finetune_epochs=1, score_batches=1)
        result = METHODS.get(name)(model, train_loader, test_loader, spec, CONFIG)
        assert not any(m.training for m in model.modules())  # the caller's mode is restored
        runs.append((result, [p.detach().clone() for p in model.parameters()]))
    assert not leaks
    (a, pa), (b, pb) = runs
    assert a.rows == b.rows and a.masks.equal(b.masks) and all(torch.equal(x, y) for x, y in zip(pa, pb))
    stats = a.masks.stats()
    assert stats.kept == round(0.25 * stats.total) and a.rows[-1]["sparsity"] == stats.sparsity
    assert a.rows[-1]["kept_weights"] == stats.kept


# --- gradual scores the sparse network ---------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CountNonzeros(Criterion):
    """Magnitude scores that record how many weights are nonzero when they are asked for."""

    seen: list = None  # type: ignore[assignment]
    name = "count-nonzeros"

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data) -> dict[str, Tensor]:
        self.seen.append(sum(int((p != 0).sum()) for p in params.values()))
        return {n: p.detach().abs() for n, p in params.items()}


def test_gradual_scores_the_network_with_its_masks_applied(monkeypatch):
    # the sparsifier's scheduled update scored right after optimizer.step(), before re-zeroing:
    # pruned weights had moved by -lr * grad, so data-driven scores saw a denser network
    train_loader, test_loader = loaders()
    model = mlp()
    seen: list[int] = []
    original = PruneSpec.sparsifier

    def spy(self, model, data, **kwargs):
        sparsifier = original(self, model, data, **kwargs)
        sparsifier.criterion = CountNonzeros(seen=seen)
        return sparsifier

    monkeypatch.setattr(PruneSpec, "sparsifier", spy)
    result = run_gradual(model, train_loader, test_loader, PruneSpec(sparsity=0.8, num_updates=4, finetune_epochs=0),
                         CONFIG)
    total = result.masks.stats().total  # 220 weights
    kept_before = [total] + [round((1 - h["achieved_sparsity"]) * total) for h in result.history[:-1]]
    assert len(seen) == len(result.history) == 4
    assert seen == kept_before  # exactly the survivors of the previous update are nonzero


def test_gradual_updates_start_and_end_on_the_documented_steps():
    train_loader, test_loader = loaders()  # 8 steps per epoch, 4 epochs = 32 steps
    spec = PruneSpec(sparsity=0.75, num_updates=4, start_epoch=1, end_fraction=0.75, finetune_epochs=0)
    config = TrainConfig(epochs=4, batch_size=8, lr=0.05, progress=False)
    result = run_gradual(mlp(), train_loader, test_loader, spec, config)
    # t0 = 8, end = 24, dt = (24 - 8) // 4 = 4: s_t0 = 0, then updates at 12, 16, 20, 24
    assert [h["step"] for h in result.history] == [12, 16, 20, 24]
    expected = [0.75 - 0.75 * (1 - k / 4) ** 3 for k in (1, 2, 3, 4)]
    assert [h["target_sparsity"] for h in result.history] == pytest.approx(expected) and expected[-1] == 0.75
    assert result.history[-1]["target_sparsity"] == 0.75  # exactly s_f at the last update


# --- FORCE / SynFlow schedules ---------------------------------------------------------------------
def test_force_and_synflow_follow_their_exponential_schedules_to_the_exact_target():
    train_loader, test_loader = loaders()
    spec = PruneSpec(sparsity=0.9, score_batches=1)  # 220 weights: keeps 22
    force = run_force(mlp(), train_loader, test_loader, spec, NONE, steps=6)
    assert [h["target_sparsity"] for h in force.history] == pytest.approx([1 - 0.1 ** (t / 6) for t in range(1, 7)])
    synflow = run_synflow(mlp(), train_loader, test_loader, spec, NONE)
    schedule = Geometric(0.9, rounds=100)
    assert [h["target_sparsity"] for h in synflow.history] == [schedule.sparsity_at(k) for k in range(1, 101)]
    for result in (force, synflow):
        assert result.history[-1]["target_sparsity"] == 0.9 and result.masks.stats().kept == 22


# --- shuffling whole groups ------------------------------------------------------------------------
def test_shuffle_refuses_a_mask_that_is_not_made_of_whole_groups():
    gen = torch.Generator().manual_seed(0)
    masks = MaskSet({"w": torch.rand(6, 5, generator=gen) < 0.5})  # unstructured
    with pytest.raises(PrunelabError, match="keeps parts of some .* groups .* change its kept count"):
        shuffle_within_layers(masks, 0, "channel")  # any() per row would keep whole rows: more weights
    rows = MaskSet({"w": torch.tensor([True, False, True, False, False, True])[:, None].expand(6, 5).clone()})
    shuffled = shuffle_within_layers(rows, 3, "channel")
    assert whole_channels(shuffled["w"]) and int(shuffled["w"].sum()) == 15


@pytest.mark.parametrize("spec, epochs, message", [
    (PruneSpec(start_epoch=4), 4, r"starts at epoch 4 \(--start-epoch\), but the run trains 4 epoch\(s\)"),
    (PruneSpec(start_epoch=2, end_fraction=0.5), 4, r"ends at step 16 of 32 \(--end-fraction 0\.5 of --epochs 4\), "
                                                    r"not after it starts at step 16 \(--start-epoch 2\); pass a larger "
                                                    r"--end-fraction \(> 0\.5\)"),
    (PruneSpec(num_updates=25), 4, r"needs room for 25 updates \(--num-updates\) between step 0 and 24 of 32 "
                                   r"\(8 per epoch\): at most 24 fit there"),
    (PruneSpec(), 0, r"prunes while training, but the run has 0 steps"),
])
def test_gradual_window_refuses_schedules_the_run_cannot_hold(spec, epochs, message):
    from prunelab.methods.gradual import gradual_window

    with pytest.raises(PrunelabError, match=message) as info:
        gradual_window(spec, epochs, 8)
    assert "\n" not in str(info.value)
    assert gradual_window(PruneSpec(num_updates=4, start_epoch=1, end_fraction=0.75), 4, 8) == (8, 24, 4)
