"""Methods end to end on the embedded digits data: targets met, per-layer rates honoured."""

import pytest
import torch

from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.models import build_model
from prunelab.bench.training import TrainConfig, seed_everything, train
from prunelab.methods import METHODS, PruneSpec, run_gradual, run_iterative, run_oneshot
from prunelab.schedules import per_round_sparsity

CONFIG = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False)


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits")
    train_loader, test_loader = make_loaders(splits, 64, seed=0)
    return splits, train_loader, test_loader


def trained_mlp(digits):
    splits, train_loader, _ = digits
    seed_everything(0)
    model = build_model("digits_mlp", splits.input_shape, splits.num_classes)
    train(model, train_loader, TrainConfig(epochs=3, batch_size=64, lr=0.05, progress=False))
    return model


def test_registry_lists_the_three_methods():
    assert {"gradual", "iterative", "oneshot"} <= set(METHODS.names())


def test_oneshot_hits_target_and_fine_tunes(digits):
    _, train_loader, test_loader = digits
    model = trained_mlp(digits)
    result = run_oneshot(model, train_loader, test_loader, PruneSpec(sparsity=0.8, finetune_epochs=1), CONFIG)
    assert [r["stage"] for r in result.rows] == ["pruned", "fine-tuned"]
    assert result.masks.stats().kept == round(0.2 * result.masks.stats().total)
    for name, param in model.named_parameters():
        if name in result.masks:
            assert torch.all(param[~result.masks[name]] == 0)


def test_iterative_rounds_and_per_layer_rates(digits):
    _, train_loader, test_loader = digits
    model = trained_mlp(digits)
    spec = PruneSpec(sparsity=0.9, rounds=3, finetune_epochs=1, allocation="uniform", layer_rates={"fc3": 0.1})
    result = run_iterative(model, train_loader, test_loader, spec, CONFIG)
    assert [r["round"] for r in result.rows] == [1, 2, 3]
    layers = {l.name: l for l in result.masks.stats().layers}
    assert layers["fc3.weight"].kept == round((1 - per_round_sparsity(0.1, 3)) * 640)  # 0.9^3 of the output layer
    assert layers["fc1.weight"].sparsity == pytest.approx(0.9, abs=2e-3)  # the rest prune p = 1 - 0.1^(1/3) per round
    sparsities = [r["sparsity"] for r in result.rows]
    assert sparsities == sorted(sparsities)


def test_gradual_follows_cubic_schedule(digits):
    _, train_loader, test_loader = digits
    model = trained_mlp(digits)
    config = TrainConfig(epochs=4, batch_size=64, lr=0.02, progress=False)
    result = run_gradual(model, train_loader, test_loader, PruneSpec(sparsity=0.75, num_updates=5, finetune_epochs=0), config)
    targets = [h["target_sparsity"] for h in result.history]
    assert len(targets) == 5 and targets == sorted(targets)  # the update at t0 has s_i = 0: nothing to prune and targets[-1] == pytest.approx(0.75)
    assert result.masks.stats().sparsity == pytest.approx(0.75, abs=1e-3)


def test_gradual_needs_room(digits):
    from prunelab.errors import PrunelabError

    _, train_loader, test_loader = digits
    with pytest.raises(PrunelabError, match="train longer"):
        run_gradual(trained_mlp(digits), train_loader, test_loader, PruneSpec(num_updates=500), CONFIG)


@pytest.mark.parametrize("end_fraction, last_step", [(1.0, 100), (0.75, 70)])
def test_gradual_reaches_the_target_within_the_run(end_fraction, last_step):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(100, 10), torch.randint(0, 2, (100,)))
    loader = DataLoader(data, batch_size=10, shuffle=True)  # 10 batches x 10 epochs = 100 steps
    model = nn.Sequential(nn.Linear(10, 200), nn.ReLU(), nn.Linear(200, 2))  # 2400 weights
    spec = PruneSpec(sparsity=0.9, num_updates=10, end_fraction=end_fraction, finetune_epochs=0)
    config = TrainConfig(epochs=10, batch_size=10, optimizer="sgd", lr=0.01, progress=False)
    result = run_gradual(model, loader, loader, spec, config)
    assert result.history[-1]["step"] == last_step and result.history[-1]["target_sparsity"] == 0.9
    assert result.masks.stats().kept == 240  # achieved == target: 1 - 240 / 2400 = 0.9
    assert result.masks.stats().sparsity == 1 - 240 / 2400


def test_gradual_refuses_nm_before_training(digits):
    from prunelab.errors import PrunelabError

    _, train_loader, test_loader = digits
    model = trained_mlp(digits)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrunelabError, match="N:M pattern \\(2:4\\) fixes it at 1 - N/M; use --method oneshot"):
        run_gradual(model, train_loader, test_loader, PruneSpec(sparsity=0.5, granularity="2:4"), CONFIG)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": "3"}, "rounds must be an integer >= 1, got '3'"),
    ({"rounds": 2.5}, "rounds must be an integer >= 1"),
    ({"finetune_epochs": None}, "finetune_epochs must be an integer >= 0, got None"),
    ({"end_fraction": "0.5"}, "end_fraction must be a number in \\(0, 1\\], got '0.5'"),
    ({"alpha": 0.0}, "alpha must be a number in \\(0, 1\\]"),
    ({"layer_rates": None}, "layer_rates must map layer names"),
])
def test_prune_spec_bad_inputs_are_one_line_errors(kwargs, match):
    from prunelab.errors import PrunelabError

    with pytest.raises(PrunelabError, match=match):
        PruneSpec(**kwargs)


def test_gradual_end_is_the_fraction_of_the_run_despite_float_rounding():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(100, 10), torch.randint(0, 2, (100,))), batch_size=10)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    # 0.57 * 100 = 56.99999999999999 in floats: the end is step 57, so 3 updates every 19 steps
    spec = PruneSpec(sparsity=0.5, num_updates=3, end_fraction=0.57, finetune_epochs=0)
    config = TrainConfig(epochs=10, batch_size=10, optimizer="sgd", lr=0.01, progress=False)
    result = run_gradual(model, loader, loader, spec, config)
    assert [h["step"] for h in result.history] == [19, 38, 57]


@pytest.mark.parametrize("name", ["oneshot", "iterative", "gradual", "rigl"])
def test_training_methods_without_a_train_loader_are_one_line_errors(name, digits):
    from prunelab.errors import PrunelabError

    _, _, test_loader = digits
    with pytest.raises(PrunelabError, match="needs a training loader .* got NoneType; pass the training DataLoader"):
        METHODS.get(name)(trained_mlp(digits), None, test_loader, PruneSpec(sparsity=0.5, rounds=1), CONFIG)
