"""Attention-head pruning: scores by hand, selection rules, masks that shrink exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.bench.row_transformer import SelfAttention
from prunelab.errors import PrunelabError
from prunelab.heads import attention_units, head_importance, head_magnitude, head_masks, remove_heads_
from prunelab.materialise.shrink import shrink_model



class TwoUnits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.a = SelfAttention(16, 4)
        self.b = SelfAttention(16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6) -> (B, 3)
        return self.head(self.b(self.a(self.embed(x)))).mean(1)


def test_magnitude_is_the_squared_norm_of_what_each_head_owns():
    torch.manual_seed(0)
    model = nn.Sequential(SelfAttention(16, 4))
    attn = model[0]
    expected = torch.zeros(4, dtype=torch.float64)
    for h in range(4):
        rows = slice(4 * h, 4 * h + 4)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            expected[h] += proj.weight.detach().double()[rows].square().sum()
        expected[h] += attn.out_proj.weight.detach().double()[:, rows].square().sum()
    torch.testing.assert_close(head_magnitude(model)["0"], expected)


def test_importance_is_the_gate_gradient_of_michel_et_al():
    torch.manual_seed(1)
    model = TwoUnits()
    x, y = torch.randn(5, 3, 6), torch.tensor([0, 1, 2, 0, 1])
    # by hand: gates multiply unit a's context per head; |dL/dgate| of the batch loss
    gate = torch.ones(4, requires_grad=True)
    unit = model.a
    context = {}

    def hook(module, args):
        context["c"] = args[0]
        return (args[0] * gate.repeat_interleave(4),)

    handle = unit.out_proj.register_forward_pre_hook(hook)
    loss = F.cross_entropy(model(x), y)
    (by_hand,) = torch.autograd.grad(loss, [gate])
    handle.remove()
    scores = head_importance(model, [(x, y)], normalise=False)
    torch.testing.assert_close(scores["a"], by_hand.abs().double(), rtol=1e-6, atol=1e-9)
    normalised = head_importance(model, [(x, y)])
    torch.testing.assert_close(normalised["b"].norm(), torch.tensor(1.0, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())  # gradients left as they were
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_global_selection_prunes_the_lowest_heads_but_keeps_one_per_unit():
    model = TwoUnits()
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    choice = head_masks(model, scores, 0.5)  # 4 of 8 heads: a's lowest 3 (one must stay), then b's lowest
    assert choice.keep["a"].tolist() == [False, False, False, True]
    assert choice.keep["b"].tolist() == [False, True, True, True]
    assert choice.pruned_fraction == 0.5
    rows = choice.masks["a.q_proj.weight"].all(1)  # (16,) whole rows kept or pruned
    assert rows.tolist() == [False] * 12 + [True] * 4
    assert set(choice.masks) == {f"{u}.{p}.weight" for u in "ab" for p in ("q_proj", "k_proj", "v_proj")}


def test_uniform_selection_prunes_the_same_count_in_every_unit():
    model = TwoUnits()
    scores = {"a": torch.tensor([0.4, 0.1, 0.3, 0.2]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    choice = head_masks(model, scores, 0.5, allocation="uniform")
    assert choice.keep["a"].tolist() == [True, False, True, False]
    assert choice.keep["b"].tolist() == [False, False, True, True]


def test_head_masks_shrink_to_fewer_heads_with_equal_outputs():
    torch.manual_seed(2)
    model = TwoUnits()
    x, y = torch.randn(6, 3, 6), torch.randint(0, 3, (6,))
    choice = head_masks(model, head_importance(model, [(x, y)]), 0.5)
    masked = choice.masks.apply_(model)
    shrunk = shrink_model(masked, choice.masks, x)
    assert shrunk.a.num_heads + shrunk.b.num_heads == 4
    cut = remove_heads_(copy.deepcopy(masked), choice.keep)  # the same cut without tracing
    assert cut.a.num_heads + cut.b.num_heads == 4 and cut.a.q_proj.out_features == 4 * cut.a.num_heads
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(cut(x), masked(x), atol=1e-5, rtol=0)


def test_bad_inputs_say_what_to_do():
    model = TwoUnits()
    good = {"a": torch.zeros(4), "b": torch.zeros(4)}
    with pytest.raises(PrunelabError, match="no attention unit"):
        attention_units(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(PrunelabError, match="unknown head allocation 'erk'"):
        head_masks(model, good, 0.5, allocation="erk")
    with pytest.raises(PrunelabError, match=r"expected \(4,\)"):
        head_masks(model, {"a": torch.zeros(3), "b": torch.zeros(4)}, 0.5)
    with pytest.raises(PrunelabError, match="scores name units"):
        head_masks(model, {"a": torch.zeros(4)}, 0.5)
    with pytest.raises(PrunelabError, match="sparsity must be in"):
        head_masks(model, good, 1.5)
    with pytest.raises(PrunelabError, match="got no batches"):
        head_importance(model, [])


def _assert_unchanged(model: nn.Module, before: dict, modules: list) -> None:
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert list(model.modules()) == modules  # the same module objects: nothing was swapped in
    assert model.a.num_heads == model.b.num_heads == 4


def test_remove_heads_checks_every_unit_before_cutting_any():
    torch.manual_seed(5)
    model = TwoUnits()
    model.b.out_proj = nn.Linear(16, 16, bias=False)  # b's value bias has nowhere to go
    before, modules = {k: v.clone() for k, v in model.state_dict().items()}, list(model.modules())
    keep = {"a": torch.tensor([True, False, True, True]), "b": torch.tensor([True, False, True, True])}
    with pytest.raises(PrunelabError, match=r"'b.out_proj' has no bias"):
        remove_heads_(model, keep)
    _assert_unchanged(model, before, modules)  # unit a was cut before the error


def test_remove_heads_refuses_an_int_keep_tensor_with_the_model_unchanged():
    torch.manual_seed(7)
    model = TwoUnits()
    before, modules = {k: v.clone() for k, v in model.state_dict().items()}, list(model.modules())
    good = torch.tensor([True, False, True, True])
    with pytest.raises(PrunelabError, match=r"keep\['b'\] must be a \(4,\) bool tensor, got a torch.int64 tensor"):
        remove_heads_(model, {"a": good, "b": torch.tensor([1, 0, 1, 1])})  # was a RuntimeError after passing
    _assert_unchanged(model, before, modules)


def test_remove_heads_refuses_unknown_units_and_bad_keep_with_the_model_unchanged():
    torch.manual_seed(6)
    model = TwoUnits()
    before, modules = {k: v.clone() for k, v in model.state_dict().items()}, list(model.modules())
    good = torch.tensor([True, False, True, True])
    with pytest.raises(PrunelabError, match=r"unknown attention unit 'nope'; the model's units are \['a', 'b'\]"):
        remove_heads_(model, {"a": good, "nope": good})  # was a bare KeyError
    _assert_unchanged(model, before, modules)
    with pytest.raises(PrunelabError, match=r"keep\['a'\] must be a \(4,\) bool tensor, got a torch.bool tensor "
                                            r"of shape \(3,\)"):
        remove_heads_(model, {"a": torch.tensor([True, False, True])})
    with pytest.raises(PrunelabError, match=r"keep\['a'\] must be a \(4,\) bool tensor, got list"):
        remove_heads_(model, {"a": [True, False, True, True]})
    with pytest.raises(PrunelabError, match=r"keep\['b'\] keeps no head"):
        remove_heads_(model, {"a": good, "b": torch.zeros(4, dtype=torch.bool)})
    _assert_unchanged(model, before, modules)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(4)
    return transformers.BertModel(config).eval()


def test_bert_attention_is_found_masked_and_cut_to_the_same_outputs():
    model = _tiny_bert()
    units = attention_units(model)
    assert list(units) == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    unit = units["encoder.layer.0.attention.self"]
    assert (unit.q, unit.o, unit.num_heads, unit.head_dim) == (
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense", 4, 4)
    batch = {"input_ids": torch.randint(5, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    scores = head_importance(model, [(batch, None)], loss_fn=lambda out, _: out.last_hidden_state.square().mean())
    choice = head_masks(model, scores, 0.5)
    masked = choice.masks.apply_(model)
    with torch.no_grad():
        expected = masked(**batch).last_hidden_state
        remove_heads_(masked, choice.keep)
        got = masked(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    kept = [int(choice.keep[name].sum()) for name in units]
    assert [masked.get_submodule(u.q).out_features for u in units.values()] == [4 * k for k in kept]
    assert sum(kept) == 4


def test_importance_restores_each_module_mode_and_runs_under_no_grad():
    torch.manual_seed(8)
    model = TwoUnits()
    model.train()
    model.a.eval()  # a mixed-mode model (e.g. a frozen sub-module) must come back exactly so
    modes = [m.training for m in model.modules()]
    x, y = torch.randn(5, 3, 6), torch.tensor([0, 1, 2, 0, 1])
    expected = head_importance(model, [(x, y)])
    assert [m.training for m in model.modules()] == modes  # was: every module left in train mode
    with torch.no_grad():  # was: RuntimeError "element 0 of tensors does not require grad"
        got = head_importance(model, [(x, y)])
    model.head.weight.grad = grad = torch.ones_like(model.head.weight)
    head_importance(model, [(x, y)])
    assert model.head.weight.grad is grad  # was replaced by a clone (breaks DDP gradient bucket views)
    assert torch.equal(grad, torch.ones_like(grad))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PrunelabError, match=r"head_importance got max_batches=.*; expected a positive int"):
            head_importance(model, [(x, y)], max_batches=bad)  # 0 was "got no batches"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_remove_heads_keeps_the_layers_mode_and_frozen_weights():
    torch.manual_seed(9)
    model = TwoUnits().eval()
    model.a.q_proj.weight.requires_grad_(False)
    model.a.out_proj.bias.requires_grad_(False)
    remove_heads_(model, {"a": torch.tensor([True, False, True, True])})
    assert model.a.q_proj.out_features == 12 and model.a.out_proj.in_features == 12
    assert not any(m.training for m in model.modules())  # the new Linears were created in train mode
    assert not model.a.q_proj.weight.requires_grad and model.a.q_proj.bias.requires_grad
    assert model.a.out_proj.weight.requires_grad and not model.a.out_proj.bias.requires_grad


def test_importance_draws_no_batch_beyond_max_batches():
    torch.manual_seed(10)
    model = TwoUnits()
    x, y = torch.randn(5, 3, 6), torch.tensor([0, 1, 2, 0, 1])
    drawn = []

    def batches():
        for i in range(4):
            drawn.append(i)
            yield x, y

    stream = batches()
    scores = head_importance(model, stream, max_batches=2)
    assert drawn == [0, 1]  # was [0, 1, 2]: a third batch was drawn from the caller's stream and dropped
    torch.testing.assert_close(scores["a"], head_importance(model, [(x, y)])["a"])


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_nan_scores_are_refused_instead_of_scrambling_the_order(allocation):
    # global sorted (0.3, nan, 0.1, 0.2) as if nan were low and pruned 0.3 before 0.1
    scores = {"a": torch.tensor([0.3, float("nan"), 0.1, 0.2]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    with pytest.raises(PrunelabError, match=r"scores\['a'\] contain NaN") as info:
        head_masks(TwoUnits(), scores, 0.25, allocation=allocation)
    assert "\n" not in str(info.value)


class Flat(nn.Module):
    """(*, 4) -> (*, 4) through one attention unit over length-1 sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.reshape(-1, 1, 4)).reshape(x.shape)


def test_importance_refuses_a_batch_that_is_no_inputs_targets_pair():
    torch.manual_seed(11)
    model = Flat()
    x = torch.randn(2, 4)  # a bare tensor of 2 rows unpacked into inputs x[0] and "targets" x[1]: a silent score
    with pytest.raises(PrunelabError, match=r"batch 0 is a Tensor; expected an \(inputs, targets\) pair") as info:
        head_importance(model, [x], loss_fn=F.mse_loss)
    assert "\n" not in str(info.value)
    with pytest.raises(PrunelabError, match=r"batch 1 is a dict; expected an \(inputs, targets\) pair"):
        head_importance(model, [(x, x), {"inputs": x, "labels": x}], loss_fn=F.mse_loss)  # 2 keys unpacked as names
    with pytest.raises(PrunelabError, match=r"batch 0 is a tuple of 1; expected an \(inputs, targets\) pair"):
        head_importance(model, [(x,)], loss_fn=F.mse_loss)  # was "not enough values to unpack"
    assert not any(m._forward_pre_hooks for m in model.modules())
    scores = head_importance(model, [[x, x]], loss_fn=F.mse_loss)  # a DataLoader's list pair is a pair
    assert scores["attn"].shape == (2,)


def test_head_masks_refuses_scores_that_are_not_tensors():
    with pytest.raises(PrunelabError, match=r"scores\['a'\] must be a \(4,\) tensor, got list"):
        head_masks(TwoUnits(), {"a": [0.1, 0.2, 0.3, 0.4], "b": torch.zeros(4)}, 0.5)  # was an AttributeError


class SkipsAttention(TwoUnits):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # unit a only on odd calls, b never
        self.calls = getattr(self, "calls", 0) + 1
        h = self.embed(x)
        return self.head(self.a(h) if self.calls % 2 == 0 else h).mean(1)


def test_a_batch_that_runs_no_unit_scores_zero_and_a_loss_without_gradient_is_a_one_line_error():
    torch.manual_seed(12)
    x, y = torch.randn(5, 3, 6), torch.tensor([0, 1, 2, 0, 1])
    model = SkipsAttention()
    scores = head_importance(model, [(x, y), (x, y)], normalise=False)  # batch 0 ran no unit: was a RuntimeError
    model.calls = 1
    alone = head_importance(model, [(x, y)], normalise=False)
    torch.testing.assert_close(scores["a"], alone["a"] / 2)  # the skipped batch counts 0 in the mean
    assert scores["b"].tolist() == [0.0] * 4
    with pytest.raises(PrunelabError, match=r"loss_fn returned a loss with no gradient") as info:
        head_importance(TwoUnits(), [(x, y)], loss_fn=lambda out, target: out.detach().sum())
    assert "\n" not in str(info.value)
