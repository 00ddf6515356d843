"""Review of the schedule-driven methods (iterative, gradual, oneshot) and the head / layer granularities:
exact values on hand-made models, invariants, and the regressions found in that review."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab.methods.gradual as gradual_module
from prunelab.bench.row_transformer import SelfAttention
from prunelab.bench.training import TrainConfig, seed_everything
from prunelab.errors import PrunelabError
from prunelab.heads import attention_units, head_importance, head_masks
from prunelab.layers import block_influence, drop_blocks, lowest_influence
from prunelab.methods import PruneSpec, run_gradual, run_iterative, run_oneshot
from prunelab.sparsifier import Sparsifier

pytestmark = pytest.mark.usefixtures("one_thread")

NO_TRAINING = TrainConfig(epochs=0, progress=False)


def loaders(features: int = 8, classes: int = 4) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, features, generator=gen)
    y = torch.randint(0, classes, (64,), generator=gen)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(x, y), batch_size=32)  # 8 training steps per epoch


def mlp() -> nn.Sequential:
    seed_everything(0)
    return nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))  # 220 weights


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


# --- iterative (Han et al. 2015 / Frankle & Carbin 2019) ----------------------------------------------
@pytest.mark.parametrize("rounds", [1, 3])
def test_iterative_last_round_keeps_exactly_what_oneshot_keeps(rounds):
    # 4 + 4 + 42 = 50 weights at 0.45: round(0.55 * 50) = round(27.500000000000004) = 28 kept.  The round's
    # target was the size-weighted mean of 0.45 over the layers, 0.45000000000000007, which kept 27
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 21))

    loader = DataLoader(TensorDataset(torch.randn(8, 2), torch.randint(0, 21, (8,))), batch_size=8)
    spec = PruneSpec(sparsity=0.45, rounds=rounds, finetune_epochs=0)
    iterative = run_iterative(model(), loader, loader, spec, NO_TRAINING)
    oneshot = run_oneshot(model(), loader, loader, spec, NO_TRAINING)
    assert iterative.rows[-1]["target_sparsity"] == 0.45
    assert iterative.masks.stats().kept == oneshot.masks.stats().kept == 28
    assert iterative.masks.equal(oneshot.masks)  # magnitude of untrained weights: the same weights survive


def test_iterative_rounds_follow_the_geometric_schedule_monotone_masks_and_zeros_through_retraining(monkeypatch):
    # 0.75 in 2 rounds: p = 1 - 0.25^(1/2) = 0.5 exactly, so 110 then 55 of 220 weights are kept
    masks_after_update = []
    update = Sparsifier.update

    def record(self, sparsity, data=None):
        masks = update(self, sparsity, data)
        masks_after_update.append({n: m.clone() for n, m in masks.items()})
        return masks

    leaks = []
    step = Sparsifier.step

    def checked(self):
        step(self)
        leaks.extend(n for n, p in self.params.items() if bool((p[~self.masks[n]] != 0).any()))

    monkeypatch.setattr(Sparsifier, "update", record)
    monkeypatch.setattr(Sparsifier, "step", checked)
    train_loader, test_loader = loaders()
    model = mlp()
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-2, progress=False)
    result = run_iterative(model, train_loader, test_loader, PruneSpec(sparsity=0.75, rounds=2, finetune_epochs=1), config)
    assert [row["target_sparsity"] for row in result.rows] == [0.5, 0.75]
    assert [sum(int(m.sum()) for m in masks.values()) for masks in masks_after_update] == [110, 55]
    first, second = masks_after_update
    assert all(bool((second[n] <= first[n]).all()) for n in first)  # a pruned weight never comes back
    assert not leaks  # retrained with momentum and weight decay, masked weights stay exactly zero
    assert sum(int((w != 0).sum()) for w in weights(model)) == 55


# --- gradual (Zhu & Gupta 2017) -----------------------------------------------------------------------
def test_gradual_sparsity_at_every_step_is_the_cubic_schedule(monkeypatch):
    # 4 epochs x 8 steps; t0 = 8 (start_epoch 1), end = 24 (0.75 of 32), n = 2 -> dt = 8: updates at 8, 16, 24.
    # s_8 = s_i = 0; s_16 = 0.875 - 0.875 (1 - 8/16)^3 = 0.765625; s_24 = s_f = 0.875; dense before t0, s_f after
    kept_after_step = []
    train = gradual_module.train

    def spy(model, loader, config, *, after_step, **kwargs):
        def recorded(step: int) -> None:
            after_step(step)
            kept_after_step.append(sum(int((w != 0).sum()) for w in weights(model)))
        return train(model, loader, config, after_step=recorded, **kwargs)

    monkeypatch.setattr(gradual_module, "train", spy)
    train_loader, test_loader = loaders()
    spec = PruneSpec(sparsity=0.875, num_updates=2, start_epoch=1, end_fraction=0.75, finetune_epochs=0)
    config = TrainConfig(epochs=4, batch_size=8, lr=0.05, progress=False)
    result = run_gradual(mlp(), train_loader, test_loader, spec, config)
    kept_16, kept_24 = round((1 - 0.765625) * 220), round((1 - 0.875) * 220)  # 52 and 28 (27.5 rounds to even)
    assert kept_after_step == [220] * 15 + [kept_16] * 8 + [kept_24] * 9  # steps 1..15, 16..23, 24..32
    assert [(h["step"], h["target_sparsity"]) for h in result.history] == [(16, 0.765625), (24, 0.875)]
    assert result.masks.stats().kept == 28


# --- attention heads (Michel et al. 2019) -------------------------------------------------------------
class SharedAttention(nn.Module):
    """One attention unit applied twice (shared weights): (B, T, 8) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.attn(x))).mean(1)


def test_importance_of_a_unit_run_twice_counts_both_calls():
    # Michel et al.: one gate xi_h per head; a head used at two depths is gated at both, so dL/dxi_h sums
    # both calls.  The second call's gate replaced the first's, and only its gradient was counted
    torch.manual_seed(2)
    model = SharedAttention()
    x, y = torch.randn(4, 3, 8), torch.randint(0, 3, (4,))
    gate = torch.ones(2, requires_grad=True)
    handle = model.attn.out_proj.register_forward_pre_hook(lambda m, args: (args[0] * gate.repeat_interleave(4),))
    (by_hand,) = torch.autograd.grad(F.cross_entropy(model(x), y), [gate])
    handle.remove()
    scores = head_importance(model, [(x, y)], normalise=False)
    torch.testing.assert_close(scores["attn"], by_hand.abs().double(), rtol=1e-6, atol=1e-9)
    normalised = head_importance(model, [(x, y)])["attn"]  # sec. 4.2: divided by the unit's L2 norm
    torch.testing.assert_close(normalised, scores["attn"] / scores["attn"].norm(), rtol=1e-12, atol=0)
    assert not any(m._forward_pre_hooks for m in model.modules())


class TwoUnits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = SelfAttention(8, 2)
        self.b = SelfAttention(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_head_masks_keep_one_head_per_unit_and_agree_across_q_k_v(allocation):
    model = TwoUnits()
    scores = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.4, 0.3, 0.6, 0.5])}
    choice = head_masks(model, scores, 0.95, allocation=allocation)  # asks for every head: 1 stays per unit
    assert choice.keep["a"].tolist() == [False, True] and choice.keep["b"].tolist() == [False, False, True, False]
    for name, unit in attention_units(model).items():
        rows = choice.keep[name].repeat_interleave(unit.head_dim)  # (H*d,)
        for proj in (unit.q, unit.k, unit.v):
            mask = choice.masks[f"{proj}.weight"]
            assert torch.equal(mask, rows[:, None].expand_as(mask))  # whole rows, the same heads in q, k and v


def test_a_head_masked_unit_outputs_the_value_bias_of_its_pruned_heads():
    # a pruned head's q/k/v rows are zero: its keys are constant and all its values are b_v, so its
    # context is exactly b_v (what remove_heads_ / shrink fold into the output projection's bias)
    torch.manual_seed(3)
    attn = SelfAttention(4, 2)
    choice = head_masks(nn.Sequential(attn), {"0": torch.tensor([0.0, 1.0])}, 0.5)
    choice.masks.apply_(nn.Sequential(attn))
    contexts = {}
    attn.out_proj.register_forward_pre_hook(lambda m, args: contexts.setdefault("c", args[0]))
    with torch.no_grad():
        attn(torch.randn(3, 5, 4))
    context = contexts["c"]  # (B, T, H*d)
    torch.testing.assert_close(context[..., :2], attn.v_proj.bias[:2].expand(3, 5, 2), rtol=0, atol=1e-6)


# --- layer dropping (ShortGPT block influence) --------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, weight: torch.Tensor, inplace: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        self.inplace = inplace
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 2)
        if self.inplace:
            x += self.fc(x)
            return x
        return x + self.fc(x)


class Stack(nn.Module):
    ROTATE = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # x + Rx is x turned by 45 degrees: cos = 1/sqrt(2)

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(3, 2)
        self.blocks = nn.ModuleList([
            Residual(torch.zeros(2, 2), inplace),  # x -> x: BI = 0
            Residual(self.ROTATE, inplace),  # BI = 1 - 1/sqrt(2)
            Residual(-2 * torch.eye(2), inplace),  # x -> -x: BI = 2
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return h


@pytest.mark.parametrize("inplace", [False, True])
def test_block_influence_exact_on_hand_made_blocks_even_when_they_add_in_place(inplace):
    # an in-place residual (x += f(x)) made the saved input the output itself: every block scored 0
    model = Stack(inplace)
    x = torch.randn(2, 5, 3)
    scores = block_influence(model, [x])
    assert list(scores) == ["blocks.0", "blocks.1", "blocks.2"]
    assert scores["blocks.0"] == pytest.approx(0.0, abs=1e-6)  # the blocks compute in float32
    assert scores["blocks.1"] == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert scores["blocks.2"] == pytest.approx(2.0, abs=1e-6)


def test_dropped_blocks_are_identity_and_the_model_saves_and_loads(tmp_path):
    model = Stack()
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        expected = model(x)  # block 0 is the identity: dropping it changes nothing
    dropped = lowest_influence(block_influence(model, [x]), 1)
    assert dropped == ["blocks.0"]
    drop_blocks(model, dropped)
    assert len(model.blocks) == 2
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = Stack()
    del fresh.blocks[0]
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(model(x), expected) and torch.equal(fresh(x), expected)


def test_drop_blocks_takes_a_bare_string_as_one_name_and_a_generator_once():
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(12)))
    drop_blocks(model, "11")  # was set("11") = {"1"}: block 1 dropped instead of block 11
    assert [i for i, m in enumerate(model) if isinstance(m, nn.Identity)] == [11]
    stack = Stack()
    drop_blocks(stack, (name for name in ["blocks.1"]))  # was consumed by the name check: nothing dropped
    assert len(stack.blocks) == 2 and torch.equal(stack.blocks[1].fc.weight, -2 * torch.eye(2))


def test_block_influence_of_blocks_without_weights():
    # a model with no parameter at all raised StopIteration looking for the device
    model = nn.Sequential(nn.Tanh(), nn.Sigmoid())
    torch.manual_seed(5)
    x = torch.randn(4, 3, 5)
    h = torch.tanh(x)

    def one_minus_cos(a, b):  # by hand, per token
        a, b = a.double(), b.double()
        return 1 - float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())

    scores = block_influence(model, [x])
    assert scores["0"] == pytest.approx(one_minus_cos(x, h), abs=1e-12)
    assert scores["1"] == pytest.approx(one_minus_cos(h, torch.sigmoid(h)), abs=1e-12)


class ShapeChanging(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4 if i else 3) for i in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](F.pad(self.blocks[0](x), (0, 1)))


def test_block_influence_error_leaves_no_hook_behind():
    model = ShapeChanging()
    with pytest.raises(PrunelabError, match="'blocks.0' does not map hidden states") as info:
        block_influence(model, [torch.randn(2, 4)])
    assert "\n" not in str(info.value)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- bad input: one-line PrunelabError ------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: PruneSpec(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (lambda: PruneSpec(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (lambda: PruneSpec(num_updates=0), "num_updates must be an integer >= 1, got 0"),
    (lambda: PruneSpec(rounds=0), "rounds must be an integer >= 1, got 0"),
    (lambda: head_masks(nn.Sequential(nn.Linear(2, 2)), {}, 0.5), "has no attention unit"),
    (lambda: head_importance(nn.Sequential(nn.Linear(2, 2)), [(torch.zeros(1, 2), torch.zeros(1))]),
     "has no attention unit"),
    (lambda: drop_blocks(Stack(), ["blocks.0", "blocks.1", "blocks.2"]), "dropping 3 of 3 blocks leaves none"),
    (lambda: lowest_influence({"a": 0.1, "b": 0.2}, 2), r"count must be an integer in \[0, 2\)"),
])
def test_bad_input_is_a_one_line_error(call, match):
    with pytest.raises(PrunelabError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_prune_spec_keeps_its_own_copy_of_the_validated_layer_rates():
    rates = {"fc3": 0.1}
    spec = PruneSpec(layer_rates=rates)
    rates["fc3"] = 5.0  # was seen by the frozen spec: a rate that passed validation became an impossible one
    assert spec.layer_rates == {"fc3": 0.1}


@pytest.mark.parametrize("name", ["oneshot", "iterative", "gradual"])
def test_an_empty_training_loader_is_refused_before_the_model_is_pruned(name):
    # oneshot / iterative pruned the model, then failed at the fine-tuning's learning-rate schedule
    from prunelab.methods import METHODS

    empty = DataLoader(TensorDataset(torch.randn(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    _, test_loader = loaders()
    model = mlp()
    before = [w.detach().clone() for w in weights(model)]
    with pytest.raises(PrunelabError, match=f"{name} needs a training loader .* the DataLoader given has no batch") as info:
        METHODS.get(name)(model, empty, test_loader, PruneSpec(sparsity=0.5, rounds=2, finetune_epochs=1),
                          TrainConfig(epochs=1, progress=False))
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))  # not pruned


def test_block_influence_of_conv_blocks_compares_channel_vectors_per_position():
    from prunelab.layers import block_influence

    class Scale(nn.Module):  # block(x) = x * s (per channel): a residual-shaped CNN block
        def __init__(self, scale: list[float]) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor(scale).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    x = torch.zeros(1, 2, 1, 2)  # (B, C=2, H=1, W=2); position 0: channels (1, 0), position 1: (1, 1)
    x[0, 0, 0, :] = 1.0
    x[0, 1, 0, 1] = 1.0
    # channel vectors: (1, 0) -> (1, 0): cos 1; (1, 1) -> (1, -1): cos 0; BI = 1 - mean(1, 0) = 0.5
    # (along the last dim W it would be channel 0: (1, 1) -> (1, 1) cos 1, channel 1: (0, 1) -> (0, -1) cos -1: BI 1)
    net = nn.Sequential(Scale([1.0, -1.0]), Scale([1.0, 1.0]))  # the second block is the identity: BI 0
    assert block_influence(net, [x]) == {"0": pytest.approx(0.5, abs=1e-12), "1": pytest.approx(0.0, abs=1e-12)}


def test_a_bert_with_heads_removed_reloads_by_removing_the_same_heads_from_a_fresh_model():
    transformers = pytest.importorskip("transformers")
    from prunelab.heads import attention_units, remove_heads_

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    model = transformers.BertModel(config).eval()
    keep = {name: torch.tensor([True, False, True, False]) for name in attention_units(model)}
    remove_heads_(model, keep)
    ids = torch.randint(0, 50, (2, 7))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = remove_heads_(transformers.BertModel(config).eval(), keep)  # the README's reload path
    fresh.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)
    assert model.encoder.layer[0].attention.self.query.weight.shape == (16, 32)


def test_block_influence_of_conv1d_blocks_compares_channel_vectors_per_position():
    from prunelab.layers import block_influence

    class Res(nn.Module):  # x + conv(x), a 1x1 Conv1d residual block on (B, C, L)
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(weight.view(2, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x)

    swap_minus = torch.tensor([[0.0, -2.0], [0.0, -2.0]])  # channel vector (a, b) -> (a - 2b, -b)
    x = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # (B=1, C=2, L=2): position 0 (1, 0), position 1 (1, 1)
    # per position: (1, 0) -> (1, 0) cos 1; (1, 1) -> (-1, -1) cos -1; BI = 1 - mean(1, -1) = 1
    # (along L it would be channel 0: (1, 1) -> (1, -1) cos 0, channel 1: (0, 1) -> (0, -1) cos -1: BI 1.5)
    scores = block_influence(nn.Sequential(Res(swap_minus), Res(torch.zeros(2, 2))), [x])  # the second: identity
    assert scores == {"0": pytest.approx(1.0, abs=1e-12), "1": pytest.approx(0.0, abs=1e-12)}
