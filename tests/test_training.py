"""Training engine: config validation, determinism, hook order, schedules, evaluation."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from prunelab.bench.datasets import load_digits, make_loaders
from prunelab.bench.models import build_model
from prunelab.bench.training import (
    TrainConfig, distributed_sampler, evaluate, make_lr_scheduler, make_optimizer, seed_everything, train,
)
from prunelab.errors import PrunelabError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def run_digits(splits, seed=0, **overrides):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 0.05, "seed": seed, "progress": False, **overrides})
    seed_everything(cfg.seed)
    model = build_model("digits_mlp", splits.input_shape, splits.num_classes)
    train_loader, test_loader = make_loaders(splits, cfg.batch_size, cfg.seed)
    result = train(model, train_loader, cfg)
    return model, result, evaluate(model, test_loader)


# --- config -----------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; valid names: sgd, adam, adamw"),
    ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'; valid names: constant, cosine, step"),
    ({"epochs": -1}, "epochs must be an integer >= 0, got -1"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"lr": -0.1}, "lr must be a positive number"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"optimizer": "adam", "nesterov": True}, "nesterov=True needs optimizer 'sgd'"),
    ({"seed": -1}, "seed must be an integer"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(PrunelabError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(("name", "value", "limit"), [
    ("lr", 1e300, r"beyond float32, 3\.4e\+38"),
    ("lr", 10**400, r"beyond float32, 3\.4e\+38"),  # an int lr is a float32 hyper-parameter too
    ("weight_decay", 1e39, r"beyond float32, 3\.4e\+38"),
    ("batch_size", 2**63, r"at most 9\.22e\+18 in magnitude"),
    ("epochs", 10**30, r"at most 9\.22e\+18 in magnitude"),
    ("step_epochs", 2**64, r"at most 9\.22e\+18 in magnitude"),
])
def test_config_refuses_numbers_torch_cannot_hold_in_one_line(name, value, limit):
    with pytest.raises(PrunelabError, match=rf"^{name} {re.escape(repr(value))} is too large for torch \({limit}\); pass a realistic "
                                            "value$") as info:
        TrainConfig(**{name: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["momentum", "gamma"])
def test_huge_momentum_and_gamma_are_refused_by_their_ranges(name):
    with pytest.raises(PrunelabError, match=rf"^{name} must be in "):
        TrainConfig(**{name: 1e300})


def test_numbers_torch_can_hold_are_accepted():
    TrainConfig(lr=3e38, weight_decay=1e30, batch_size=2**63 - 1, epochs=0)


def test_make_optimizer_follows_config():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, TrainConfig(lr=0.2, momentum=0.8, weight_decay=1e-4, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "weight_decay", "nesterov")} == {
        "lr": 0.2, "momentum": 0.8, "weight_decay": 1e-4, "nesterov": True}
    assert type(make_optimizer(params, TrainConfig(optimizer="adam", lr=1e-3))) is torch.optim.Adam
    adamw = make_optimizer(params, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05


def lrs(schedule, steps_per_epoch=5, **kwargs):
    cfg = TrainConfig(lr=1.0, lr_schedule=schedule, **kwargs)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_lr_scheduler(optimizer, cfg, steps_per_epoch)
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(cfg.epochs * steps_per_epoch):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_lr_schedules_per_step():
    cosine = lrs("cosine", epochs=2)  # 10 steps
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0, abs=1e-12)
    assert cosine[1] == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert lrs("constant", epochs=2) == [1.0] * 11
    step = lrs("step", epochs=4, step_epochs=2, gamma=0.5)  # halves after 10 steps
    assert step[9] == 1.0 and step[10] == 0.5 and step[20] == 0.25
    with pytest.raises(PrunelabError, match="steps_per_epoch must be a positive integer, got 0"):
        lrs("cosine", steps_per_epoch=0)


# --- training ---------------------------------------------------------------------------
def test_digits_mlp_learns_and_is_deterministic(digits):
    model_a, result, metrics = run_digits(digits)
    model_b, _, metrics_b = run_digits(digits)
    assert metrics["accuracy"] > 0.85 and metrics["n"] == 360
    assert metrics["error_pct"] == pytest.approx(100 * (1 - metrics["accuracy"]))
    assert result["steps"] == 2 * 45 and result["epochs"] == 2 and math.isfinite(result["final_loss"])
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert metrics == metrics_b
    model_c, _, _ = run_digits(digits, seed=1)
    assert not torch.equal(model_c.fc1.weight, model_a.fc1.weight)


def test_after_step_runs_after_optimizer_and_scheduler_steps(digits):
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-2, progress=False)
    seed_everything(0)
    model = build_model("digits_mlp", digits.input_shape, digits.num_classes)
    train_loader, _ = make_loaders(digits, cfg.batch_size, cfg.seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_lr_scheduler(optimizer, cfg, len(train_loader))
    steps, epochs = [], []

    def after_step(global_step):
        # Adam counts its own steps: equal means optimizer.step() already ran for this batch
        assert int(optimizer.state[model.fc1.weight]["step"]) == global_step
        assert scheduler.last_epoch == global_step
        steps.append(global_step)
        with torch.no_grad():
            model.fc1.weight[0].zero_()  # a "mask": Adam's moments would revive it if applied before step()

    result = train(model, train_loader, cfg, optimizer=optimizer, scheduler=scheduler, after_step=after_step,
                   after_epoch=epochs.append)
    n = 2 * len(train_loader)
    assert steps == list(range(1, n + 1)) and result["steps"] == n
    assert epochs == [1, 2]
    assert torch.count_nonzero(model.fc1.weight[0]) == 0
    assert torch.count_nonzero(model.fc1.weight[1]) == 64


def test_train_restores_mode_and_zero_epochs_is_a_no_op(digits):
    model = build_model("digits_mlp", digits.input_shape, 10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader, _ = make_loaders(digits, 64, 0)
    result = train(model, loader, TrainConfig(epochs=0, progress=False))
    assert result["steps"] == 0 and math.isnan(result["final_loss"]) and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train(model, [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))], TrainConfig(epochs=1, progress=False))
    assert not model.training


def test_progress_total_leaves_out_skipped_steps(monkeypatch):
    totals = []

    class RecordingBar:
        def __init__(self, total, **kwargs):
            totals.append(total)
            self.n = 0

        def update(self, n):
            self.n += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            totals.append(self.n)

    monkeypatch.setattr("prunelab.bench.training.tqdm", RecordingBar)
    batches = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))] * 3
    train(nn.Linear(2, 2), batches, TrainConfig(epochs=2, progress=False))


    class ResumedLoader(list):  # an epoch of 3 batches whose first one a resumed run has already taken
        def __len__(self):
            return 3

    train(nn.Linear(2, 2), ResumedLoader(batches[1:]), TrainConfig(epochs=2, progress=False), skipped_steps=1)
    assert totals == [6, 6, 5, 4]  # (bar total, steps shown) per call; this fake loader yields 2 batches per epoch


def test_non_finite_loss_is_a_clear_error():
    model = nn.Linear(2, 2)
    loader = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(PrunelabError, match="training loss became nan at step 1 .*lower the learning rate"):
        train(model, loader, TrainConfig(epochs=1, progress=False), loss_fn=lambda out, y: out.sum() * float("nan"))


def test_evaluate_counts_exactly_and_restores_mode():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])  # predicts 0, 1, 0, 1
    y = torch.tensor([0, 1, 1, 2])
    model.train()
    metrics = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3))
    assert model.training
    assert metrics["n"] == 4 and metrics["accuracy"] == 0.5 and metrics["error_pct"] == 50.0
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert metrics["loss"] == pytest.approx(expected)


def test_seed_everything_reproduces_all_generators():
    import random

    import numpy as np

    seed_everything(7)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_everything(7)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    with pytest.raises(PrunelabError, match="seed must be an integer"):
        seed_everything(2**32)


@pytest.mark.parametrize("name", ["momentum", "weight_decay", "gamma"])
def test_config_rejects_non_numbers_in_one_line(name):
    with pytest.raises(PrunelabError, match=f"{name} must be a number, got str '0.1'"):
        TrainConfig(**{name: "0.1"})


# --- DistributedSampler epochs across calls (DDP shuffling; no process group needed) --------------
def sharded_loader(rank, batch_sampler=False, n=24):
    """Rank ``rank`` of 2 over ``n`` samples whose inputs are their indices; 3 batches of 4 per epoch."""
    data = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.zeros(n, dtype=torch.long))
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0)
    if batch_sampler:
        return DataLoader(data, batch_sampler=BatchSampler(sampler, batch_size=4, drop_last=False))
    return DataLoader(data, batch_size=4, sampler=sampler)


def epoch_orders(loader, calls=2, epochs=2):
    """The sample indices of every epoch over ``calls`` consecutive train() calls."""
    model, seen, orders = nn.Linear(1, 2), [], []
    model.register_forward_pre_hook(lambda module, inputs: seen.extend(int(i) for i in inputs[0].flatten()))
    for _ in range(calls):
        train(model, loader, TrainConfig(epochs=epochs, lr=0.01, progress=False),
              after_epoch=lambda _e: (orders.append(list(seen)), seen.clear()))
    return orders


@pytest.mark.parametrize("batch_sampler", [False, True])
def test_consecutive_train_calls_draw_fresh_rank_consistent_distributed_orders(batch_sampler):
    loaders = [sharded_loader(rank, batch_sampler) for rank in (0, 1)]
    per_rank = [epoch_orders(loader) for loader in loaders]
    assert [distributed_sampler(loader).epoch for loader in loaders] == [4, 4]  # the next call starts at epoch 4
    for rank, orders in enumerate(per_rank):
        assert len(orders) == 4 and all(len(order) == 12 for order in orders)
        assert len({tuple(order) for order in orders}) == 4, f"rank {rank} repeated a shuffle order"
    for first, second in zip(*per_rank):  # the same permutation on both ranks: each epoch shards all 24 samples
        assert sorted(first + second) == list(range(24))
    # the 4 epochs of 2 calls are epochs 0..3 of one uninterrupted 4-epoch call
    assert epoch_orders(sharded_loader(0, batch_sampler), calls=1, epochs=4) == per_rank[0]


def test_a_pinned_distributed_sampler_epoch_reproduces_the_order():
    loader = sharded_loader(0)
    first = epoch_orders(loader, calls=1)
    distributed_sampler(loader).set_epoch(0)
    assert epoch_orders(loader, calls=1) == first
    assert epoch_orders(loader, calls=1) != first  # left at epoch 2: a fresh order


def test_a_failed_call_leaves_the_sampler_at_the_next_unused_epoch_and_restores_modes():
    loader = sharded_loader(0)
    model = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2)).eval()
    model[0].train()  # mixed modes
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        return nn.functional.cross_entropy(out, y) * (float("nan") if len(calls) == 5 else 1.0)  # 2nd epoch, 2nd batch

    with pytest.raises(PrunelabError, match="training loss became nan at step 5"):
        train(model, loader, TrainConfig(epochs=3, lr=0.01, progress=False), loss_fn=loss_fn)
    assert distributed_sampler(loader).epoch == 2  # epochs 0 and 1 were (partly) drawn
    assert [m.training for m in model.modules()] == [False, True, False]


def test_single_process_loaders_have_no_distributed_sampler(digits):
    loader, _ = make_loaders(digits, 64, 0)
    assert distributed_sampler(loader) is None and distributed_sampler([1, 2]) is None


def test_train_and_evaluate_restore_mixed_submodule_modes():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.Dropout(0.1), nn.Linear(3, 3)))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    model[2].eval()
    model[2][1].train()
    expected = [m.training for m in model.modules()]
    loader = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]
    train(model, loader, TrainConfig(epochs=1, lr=0.01, progress=False))
    assert [m.training for m in model.modules()] == expected
    evaluate(model, loader)
    assert [m.training for m in model.modules()] == expected


@pytest.mark.parametrize("kwargs, flag", [({}, "--lr"), ({"lr_flag": "--finetune-lr"}, "--finetune-lr")])
def test_non_finite_loss_names_the_callers_learning_rate_flag(kwargs, flag):
    loader = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(PrunelabError, match=rf"lower the learning rate \({flag}, now 0\.1\) or check the data$"):
        train(nn.Linear(2, 2), loader, TrainConfig(epochs=1, progress=False),
              loss_fn=lambda out, y: out.sum() * float("nan"), **kwargs)


def test_pruning_methods_pass_their_lr_flag_to_train():
    from prunelab.methods import METHODS, PruneSpec

    loader = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))] * 2
    nan_loss = lambda out, y: out.sum() * float("nan")  # noqa: E731
    for method in ("oneshot", "iterative"):
        import prunelab.methods.oneshot as oneshot_mod
        import prunelab.methods.iterative as iterative_mod

        module = oneshot_mod if method == "oneshot" else iterative_mod
        original = module.train

        def diverging(*args, _original=original, **kw):
            return _original(*args, **{**kw, "loss_fn": nan_loss})

        module.train = diverging
        try:
            with pytest.raises(PrunelabError, match=r"\(--finetune-lr, now "):
                METHODS.get(method)(nn.Sequential(nn.Linear(2, 2)), loader, loader,
                                    PruneSpec(sparsity=0.5, rounds=1, finetune_epochs=1),
                                    TrainConfig(epochs=1, progress=False), lr_flag="--finetune-lr")
        finally:
            module.train = original


def bn_net():
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))


def test_a_frozen_batchnorm_keeps_its_running_statistics_while_the_rest_trains():
    torch.manual_seed(0)
    model = bn_net().train()
    model[1].eval()  # frozen on purpose (an eval submodule of a train-mode parent)
    frozen = (model[1].running_mean.clone(), model[1].running_var.clone())
    live = (model[3].running_mean.clone(), model[3].running_var.clone())
    seen = []
    model[1].register_forward_pre_hook(lambda module, inputs: seen.append(module.training))
    loader = [(torch.randn(8, 2), torch.randint(0, 3, (8,)))] * 2
    train(model, loader, TrainConfig(epochs=1, lr=0.01, progress=False))
    assert seen == [False, False]
    assert torch.equal(model[1].running_mean, frozen[0]) and torch.equal(model[1].running_var, frozen[1])
    assert not torch.equal(model[3].running_mean, live[0]) and not torch.equal(model[3].running_var, live[1])
    assert int(model[1].num_batches_tracked) == 0 and int(model[3].num_batches_tracked) == 2
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


def test_a_model_entirely_in_eval_mode_is_no_freeze_and_trains_in_train_mode():
    torch.manual_seed(0)
    model = bn_net().eval()
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in (model[1], model[3])]
    seen = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda module, inputs: seen.append(module.training))
    train(model, [(torch.randn(8, 2), torch.randint(0, 3, (8,)))], TrainConfig(epochs=1, lr=0.01, progress=False))
    assert seen == [True] * 5
    for bn, (mean, var) in zip((model[1], model[3]), before):
        assert not torch.equal(bn.running_mean, mean) and not torch.equal(bn.running_var, var)
    assert not any(m.training for m in model.modules())


def test_a_frozen_subtree_keeps_every_descendants_own_mode_during_training():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 3), nn.BatchNorm1d(3)))
    model.train()
    model[1].eval()  # the frozen block: its dropout and BatchNorm stay in eval mode
    model[1][1].train()  # a child the user set to train mode inside it keeps that mode
    seen = {}
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda module, inputs, name=name: seen.update({name: module.training}))
    expected = {name: module.training for name, module in model.named_modules()}
    train(model, [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))], TrainConfig(epochs=1, lr=0.01, progress=False))
    assert seen == expected == {"": True, "0": True, "1": False, "1.0": False, "1.1": True, "1.2": False}
    assert {name: module.training for name, module in model.named_modules()} == expected


# --- review fixes -------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "value"), [("nesterov", "yes"), ("nesterov", 1), ("progress", "no"), ("progress", None)])
def test_config_flags_must_be_bools(name, value):
    with pytest.raises(PrunelabError, match=f"{name} must be True or False, got {value!r}"):  # was accepted silently
        TrainConfig(**{name: value})


def test_a_training_loader_without_length_is_a_one_line_error():
    batches = iter([(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))])
    with pytest.raises(PrunelabError, match="the training loader \\(list_iterator\\) has no length") as exc:
        train(nn.Linear(2, 2), batches, TrainConfig(epochs=1, progress=False))  # was TypeError from len()
    assert "\n" not in str(exc.value)
