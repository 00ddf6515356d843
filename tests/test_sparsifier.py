"""Sparsifier invariants: zeros stay zero through training, targets are met, masks monotone."""

import pytest
import torch
from torch import nn

from prunelab import LayerRules, MaskSet, Sparsifier
from prunelab.criteria import Criterion
from prunelab.errors import PrunelabError
from prunelab.schedules import Cubic, OneShot


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def train_steps(model, optimizer, sparsifier, steps=20, shape=(8, 16)):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen)
        y = torch.randint(0, 4, (shape[0],), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_masked_weights_and_optimizer_state_stay_zero(opt):
    model = mlp()
    optimizer = OPTIMIZERS[opt](model.parameters())
    sparsifier = Sparsifier(model).prepare(optimizer)
    train_steps(model, optimizer, sparsifier, steps=5)  # optimizer state exists before pruning
    masks = sparsifier.update(0.8)
    train_steps(model, optimizer, sparsifier, steps=25)
    for name, param in sparsifier.params.items():
        mask = masks[name]
        assert torch.all(param[~mask] == 0), name
        assert torch.count_nonzero(param[mask]) > 0.9 * mask.sum()
        for value in optimizer.state[param].values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                assert torch.all(value[~mask] == 0), (name, opt)


def test_achieved_equals_target_unstructured():
    model = mlp()
    sparsifier = Sparsifier(model, allocation="global").prepare()
    for s in (0.3, 0.77, 0.95):
        masks = sparsifier.update(s)
        total = masks.stats().total
        assert masks.stats().kept == round((1 - s) * total)


@pytest.mark.parametrize("granularity", ["channel", "kernel", "vector"])
def test_structured_masks_are_whole_groups(granularity):
    model = cnn()
    sparsifier = Sparsifier(model, criterion="l1", granularity=granularity, allocation="uniform").prepare()
    masks = sparsifier.update(0.5)
    for name, param in sparsifier.params.items():
        groups = sparsifier.granularity.to_groups(masks[name])
        assert torch.equal(groups.all(1), groups.any(1)), name  # each group all-kept or all-pruned
    group_size = max(sparsifier.granularity.group_size(tuple(p.shape)) for p in sparsifier.params.values())
    assert abs(masks.stats().kept - 0.5 * masks.stats().total) <= 3 * group_size


def test_channel_mask_prunes_output_rows_of_linear():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:5] *= 0.001  # five tiny neurons
    sparsifier = Sparsifier(model, criterion="l2", granularity="neuron", allocation="uniform").prepare()
    masks = sparsifier.update(5 / 32 + 1e-9)
    assert masks["0.weight"].all(1).tolist() == [False] * 5 + [True] * 27


def test_nm_pattern_through_sparsifier():
    model = mlp()
    sparsifier = Sparsifier(model, granularity="2:4", rules=LayerRules(keep_last="dense")).prepare()
    masks = sparsifier.update(0.5)
    assert masks["0.weight"].reshape(-1, 4).sum(1).eq(2).all()
    assert masks["4.weight"].all()


def test_keep_first_dense_and_global_target():
    model = mlp()
    sparsifier = Sparsifier(model, rules=LayerRules(keep_first="dense")).prepare()
    masks = sparsifier.update(0.5)
    assert masks["0.weight"].all()
    assert masks.stats().kept == round(0.5 * masks.stats().total)


def test_pruning_is_monotone():
    model = mlp()
    sparsifier = Sparsifier(model, criterion="random").prepare()
    first = sparsifier.update(0.5)
    second = sparsifier.update(0.8)
    for name in first:
        assert not (second[name] & ~first[name]).any()


def test_gradual_schedule_drives_updates():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = Cubic(0.9, num_updates=4, frequency=5, start_step=1)
    sparsifier = Sparsifier(model, schedule=schedule).prepare(optimizer)
    train_steps(model, optimizer, sparsifier, steps=30)
    assert [h["step"] for h in sparsifier.history] == [6, 11, 16, 21]
    assert sparsifier.masks.stats().sparsity == pytest.approx(0.9, abs=1e-3)
    assert [round(h["target_sparsity"], 4) for h in sparsifier.history] == [
        round(schedule.sparsity_at(t), 4) for t in (6, 11, 16, 21)
    ]


def test_finalize_returns_masks_matching_model_zeros():
    model = mlp()
    sparsifier = Sparsifier(model).prepare()
    sparsifier.update(0.6)
    masks = sparsifier.finalize()
    assert MaskSet.from_model(model, list(masks)).equal(masks)


def test_state_dict_resume():
    model = mlp()
    sparsifier = Sparsifier(model, criterion="random").prepare()
    sparsifier.update(0.7)
    state = sparsifier.state_dict()
    other = Sparsifier(mlp(seed=3)).prepare()
    other.load_state_dict(state)
    assert other.masks.equal(sparsifier.masks) and other.step_count == sparsifier.step_count


def test_bad_inputs():
    with pytest.raises(PrunelabError, match="does not divide"):
        Sparsifier(nn.Sequential(nn.Linear(6, 8)), granularity="2:4")
    with pytest.raises(PrunelabError, match=r"\[0, 1\)"):
        Sparsifier(mlp()).prepare().update(1.0)
    with pytest.raises(PrunelabError, match="valid names"):
        Sparsifier(mlp(), criterion="magnitud")
    with pytest.raises(PrunelabError, match="needs data"):
        Sparsifier(mlp(), criterion="taylor").prepare().update(0.5)
    with pytest.raises(PrunelabError, match="no Linear or Conv"):
        Sparsifier(nn.Sequential(nn.ReLU()))


def _score_data():
    from prunelab.criteria import ScoreData

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(2)]
    return ScoreData(batches)


def _every_criterion():
    from prunelab.criteria import CRITERIA

    return CRITERIA.names()


SIGNED_CRITERIA = ("grasp", "movement")  # scores of either sign (see their docstrings)


def _every_allocation():
    from prunelab.allocation import ALLOCATIONS

    return ALLOCATIONS.names()


@pytest.mark.parametrize("criterion", _every_criterion())
@pytest.mark.parametrize("allocation", _every_allocation())
def test_every_criterion_and_allocation_hits_the_target(criterion, allocation):
    model = mlp()
    sparsifier = Sparsifier(model, criterion=criterion, allocation=allocation, data=_score_data()).prepare()
    if allocation == "lamp" and criterion in SIGNED_CRITERIA:  # LAMP squares scores: refused, not reordered
        with pytest.raises(PrunelabError, match="LAMP .* non-negative scores"):
            sparsifier.update(0.75)
        assert sparsifier.masks.stats().kept == sparsifier.masks.stats().total  # nothing pruned
        return
    masks = sparsifier.update(0.75)
    stats = masks.stats()
    assert stats.kept == round(0.25 * stats.total)
    for name, param in sparsifier.params.items():
        assert torch.all(param[~masks[name]] == 0)
        assert masks[name].any(), f"{criterion}/{allocation} emptied {name}"


def test_dense_first_layer_need_not_fit_nm():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))  # 6 inputs: no 2:4 blocks
    sparsifier = Sparsifier(model, granularity="2:4", rules=LayerRules(keep_first="dense")).prepare()
    masks = sparsifier.update(0.5)
    assert masks["0.weight"].all() and masks["2.weight"].reshape(-1, 4).sum(1).eq(2).all()


def test_oneshot_at_step_zero_prunes_at_prepare():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))  # 120 weights
    sparsifier = Sparsifier(model, schedule=OneShot(0.9)).prepare(None)
    assert sparsifier.history == [{"step": 0, "target_sparsity": 0.9, "achieved_sparsity": 1 - 12 / 120}]
    sparsifier.prepare(None)  # a second prepare at step 0 does not prune again
    for _ in range(5):
        sparsifier.step()
    assert [h["step"] for h in sparsifier.history] == [0]
    assert sparsifier.masks.stats().kept == 12
    assert int(model[0].weight.count_nonzero() + model[1].weight.count_nonzero()) == 12


def test_schedule_step_numbers_unchanged_after_step_zero():
    model = mlp()
    sparsifier = Sparsifier(model, schedule=OneShot(0.5, at_step=2)).prepare(None)
    assert sparsifier.history == []
    for _ in range(4):
        sparsifier.step()
    assert [h["step"] for h in sparsifier.history] == [2]  # the 2nd step() call, as before


def test_cubic_initial_sparsity_at_start_step_zero():
    model = mlp()  # 512 + 1024 + 128 = 1664 weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = Cubic(0.9, initial_sparsity=0.5, start_step=0, num_updates=2, frequency=3)
    sparsifier = Sparsifier(model, schedule=schedule).prepare(optimizer)
    assert sparsifier.history[0]["step"] == 0 and sparsifier.history[0]["target_sparsity"] == 0.5
    assert sparsifier.masks.stats().kept == 832
    train_steps(model, optimizer, sparsifier, steps=8)
    assert [h["step"] for h in sparsifier.history] == [0, 3, 6]
    assert [h["target_sparsity"] for h in sparsifier.history] == [schedule.sparsity_at(t) for t in (0, 3, 6)]
    assert sparsifier.masks.stats().kept == round(0.1 * 1664)


def test_nm_refuses_another_sparsity():
    sparsifier = Sparsifier(mlp(), granularity="2:4").prepare()
    with pytest.raises(PrunelabError, match=r"N:M fixes the sparsity at 1 - N/M = 0.5 for 2:4, but sparsity 0.9") as info:
        sparsifier.update(0.9)
    assert "\n" not in str(info.value)
    assert sparsifier.masks.stats().kept == 1664  # nothing pruned
    with pytest.raises(PrunelabError, match="N:M fixes the sparsity"):
        Sparsifier(mlp(), granularity="1:4").prepare().update(0.5)
    assert Sparsifier(mlp(), granularity="1:4").prepare().update(0.75).stats().kept == 416


def test_nm_target_is_per_pattern_not_overall():
    # the dense last layer lowers the overall sparsity below 0.5; the pattern target is still 0.5
    sparsifier = Sparsifier(mlp(), granularity="2:4", rules=LayerRules(keep_last="dense")).prepare()
    sparsifier.update(0.5)
    sparsifier.update(0.5)  # again, now that the model's overall sparsity is 768 / 1664
    assert sparsifier.masks.stats().kept == 256 + 512 + 128
    assert sparsifier.history[-1]["achieved_sparsity"] == 768 / 1664


def test_nm_with_a_schedule():
    sparsifier = Sparsifier(mlp(), granularity="2:4", schedule=OneShot(0.5)).prepare()
    assert sparsifier.masks.stats().kept == 832
    with pytest.raises(PrunelabError, match="N:M fixes the sparsity"):
        Sparsifier(mlp(), granularity="2:4", schedule=Cubic(0.5, initial_sparsity=0.1, start_step=0)).prepare()


def tied_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].weight = model[0].weight  # one weight, two layers
    return model


def test_tied_weight_is_one_target_and_meets_the_target():
    model = tied_mlp()
    sparsifier = Sparsifier(model).prepare()
    assert list(sparsifier.params) == ["0.weight", "4.weight"]  # the tied weight once, by its first name
    masks = sparsifier.update(0.5)
    assert masks.stats().total == 64 + 16 and masks.stats().kept == 40
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]  # the real tensors
    assert sum(int(w.count_nonzero()) for w in weights) == 40
    excluded = Sparsifier(tied_mlp(), exclude=["2"])  # excluding either name keeps the shared weight dense
    assert list(excluded.params) == ["4.weight"]


def test_zero_size_layers_are_left_alone():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 4), "empty_in": nn.Linear(0, 4), "empty_out": nn.Linear(8, 0)})
    for granularity in ("unstructured", "channel"):
        for allocation in ("global", "uniform", "erk", "lamp"):
            sparsifier = Sparsifier(model, criterion="l1", granularity=granularity, allocation=allocation).prepare()
            masks = sparsifier.update(0.5)
            assert masks["empty_in.weight"].shape == (4, 0) and masks["empty_out.weight"].shape == (0, 8)
            assert masks.stats().kept == 16, (granularity, allocation)
            sparsifier.check_target(0.5)


def test_set_masks_moves_masks_to_the_parameters_device():
    model = nn.Linear(4, 4, device="meta")  # stands for a CUDA model: masks loaded from a file are on the CPU
    sparsifier = Sparsifier(model)
    sparsifier.set_masks({"weight": torch.ones(4, 4, dtype=torch.bool)})
    assert sparsifier.masks["weight"].device == torch.device("meta")


def test_bad_masks_and_state_leave_the_sparsifier_unchanged():
    model = mlp()
    sparsifier = Sparsifier(model, criterion="random").prepare()
    before = sparsifier.update(0.5)
    wrong = {**dict(before), "2.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(PrunelabError, match=r"shape \(3, 3\)"):
        sparsifier.set_masks(wrong)
    assert sparsifier.masks.equal(before)
    with pytest.raises(PrunelabError, match="not a tensor"):
        sparsifier.set_masks({**dict(before), "2.weight": [[1]]})
    with pytest.raises(PrunelabError, match="needs 'step_count' and 'masks'"):
        sparsifier.load_state_dict({"masks": dict(before)})
    with pytest.raises(PrunelabError, match="step_count"):
        sparsifier.load_state_dict({"step_count": -1, "masks": dict(before)})
    assert sparsifier.masks.equal(before) and sparsifier.step_count == 0


def test_layer_capped_below_the_nm_pattern_need_not_fit_it():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))  # 6 inputs: no 2:4 blocks
    sparsifier = Sparsifier(model, granularity="2:4", rules=LayerRules(keep_first=0.3)).prepare()
    masks = sparsifier.update(0.5)  # a 30% ceiling is below 2:4's 50%: the layer stays as it is
    assert masks["0.weight"].all() and masks["2.weight"].reshape(-1, 4).sum(1).eq(2).all()


@pytest.mark.parametrize("rules,match", [
    (LayerRules(max_sparsity={"0": 1.5}), r"max_sparsity for '0' must be in \[0, 1\)"),
    (LayerRules(max_sparsity={"0": -0.2}), r"max_sparsity for '0' must be in \[0, 1\)"),
    (LayerRules(fixed_sparsity={"0": "0.5"}), r"fixed sparsity for '0' must be in \[0, 1\)"),
    (LayerRules(fixed_sparsity={"0": float("nan")}), r"fixed sparsity for '0' must be in \[0, 1\)"),
])
def test_bad_layer_rules_are_one_line_errors(rules, match):
    with pytest.raises(PrunelabError, match=match):
        Sparsifier(mlp(), rules=rules)


def test_weights_recomputed_by_hooks_are_refused():
    import torch.nn.utils.prune
    # torch.nn.utils.prune recomputes .weight from weight_orig * weight_mask before every forward:
    # zeros written into it would come back, so such a layer is refused, not silently "pruned"
    model = mlp()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(PrunelabError, match="0.weight is not a plain initialised nn.Parameter"):
        Sparsifier(model)
    assert list(Sparsifier(model, exclude=["0"]).params) == ["2.weight", "4.weight"]


def test_exclude_given_as_one_string_is_one_glob():
    model = nn.ModuleDict({"fc": nn.Linear(4, 4), "f": nn.Linear(4, 4), "c": nn.Linear(4, 4)})
    assert list(Sparsifier(model, exclude="fc").params) == ["f.weight", "c.weight"]  # not the globs 'f' and 'c'


def test_a_fixed_sparsity_above_the_nm_pattern_is_refused_not_lowered():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(PrunelabError, match=r"layer '0.weight' has a fixed sparsity of 0.7, above the 0.5 \(1 - N/M\)"):
        Sparsifier(model, granularity="2:4", rules=LayerRules(fixed_sparsity={"0": 0.7}))
    masks = Sparsifier(model, granularity="2:4", rules=LayerRules(fixed_sparsity={"0": 0.5})).prepare().update(0.5)
    assert masks["0.weight"].reshape(-1, 4).sum(1).eq(2).all()


def small_cnn():
    """conv1 has the larger weights but its channels sum only 9 of them, conv2's sum 63."""
    model = nn.Sequential(nn.Conv2d(1, 7, 3), nn.ReLU(), nn.Conv2d(7, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_((0.5 + 0.01 * torch.arange(7.0)).reshape(7, 1, 1, 1).expand(7, 1, 3, 3))  # L1 4.5..5.0
        model[2].weight.fill_(0.1)  # L1 6.3 per channel
        model[6].weight.fill_(1.0)  # L1 8 per neuron
    return model


def test_global_channel_pruning_never_removes_a_whole_layer():
    masks = Sparsifier(small_cnn(), criterion="l1", granularity="channel").prepare().update(0.5)
    kept = {name: mask.flatten(1).all(1) for name, mask in masks.items()}
    assert kept["0.weight"].tolist() == [False] * 6 + [True]  # was 0 of 7: the network was disconnected
    assert int(kept["2.weight"].sum()) == 4 and kept["6.weight"].all()
    x = torch.randn(2, 1, 7, 7)
    model = small_cnn()
    Sparsifier(model, criterion="l1", granularity="channel").prepare().update(0.5)
    assert model[0](x).abs().sum() > 0
    for granularity in ("kernel", "vector"):
        masks = Sparsifier(small_cnn(), criterion="l1", granularity=granularity).prepare().update(0.5)
        assert all(mask.any() for mask in masks.values()), granularity
    collapsed = Sparsifier(small_cnn(), criterion="l1").prepare().update(0.95)  # unstructured: may still collapse
    assert not collapsed["0.weight"].any()


def test_set_masks_refuses_a_mask_for_a_layer_it_does_not_target():
    model = mlp()
    sparsifier = Sparsifier(model, exclude=["0"]).prepare()
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters() if name.endswith("weight")}
    with pytest.raises(PrunelabError, match=r"^mask '0\.weight' is for a layer this sparsifier does not target "
                                            r"\(excluded.*exclude= / --exclude\)$"):
        sparsifier.set_masks(masks)
    assert sparsifier.masks.stats().sparsity == 0.0 and model[0].weight.count_nonzero() == model[0].weight.numel()
    with pytest.raises(PrunelabError, match="'typo.weight' is for a layer this sparsifier does not target"):
        sparsifier.load_state_dict({"step_count": 0, "masks": {**sparsifier.masks, "typo.weight": torch.ones(1)}})
    sparsifier.set_masks({n: m for n, m in masks.items() if n != "0.weight"})  # the targets alone are adopted
    assert model[2].weight.count_nonzero() == 0 and model[0].weight.count_nonzero() == model[0].weight.numel()


def test_scheduled_update_scores_the_network_its_masks_define():
    # step() enforced after the scheduled update, so a criterion scored pruned weights that the
    # optimizer had just moved away from zero (a denser network than the masks define)
    seen = []

    class CountNonzeros(Criterion):
        name = "count-nonzeros"

        def score(self, model, params, data):
            seen.append(sum(int((p != 0).sum()) for p in params.values()))
            return {n: p.detach().abs() for n, p in params.items()}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # 16 + 8 weights
    sparsifier = Sparsifier(model, criterion=CountNonzeros(), schedule=Cubic(0.5, num_updates=2, frequency=1,
                                                                            start_step=1))
    sparsifier.prepare()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # updates at steps 2 and 3 (step 1 = t0 keeps sparsity 0)
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()  # moves every weight, pruned ones included
        sparsifier.step()
    kept = [24] + [round((1 - h["achieved_sparsity"]) * 24) for h in sparsifier.history[:-1]]
    assert seen == kept and len(seen) == 2  # the scores saw exactly the previous update's survivors


def test_an_overflowed_pruned_weight_and_its_adam_moments_become_zero_not_nan():
    # inf * 0 = nan: multiplying by the mask kept a pruned weight (and its moments) nan, which poisons the output
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model).prepare(optimizer)
    sparsifier.update(0.5)  # keeps 3.0
    model.weight.grad = torch.tensor([[float("inf"), 1.0]])
    optimizer.step()  # the pruned entry overflows: exp_avg inf, exp_avg_sq inf, weight nan
    sparsifier.step()
    assert model.weight[0, 0].item() == 0.0 and model.weight.grad[0, 0].item() == 0.0
    state = optimizer.state[model.weight]
    assert state["exp_avg"][0, 0].item() == 0.0 and state["exp_avg_sq"][0, 0].item() == 0.0
    assert model(torch.tensor([[1.0, 1.0]])).isfinite().all()


def test_bad_history_in_a_state_is_refused_before_anything_changes():
    model = mlp()
    sparsifier = Sparsifier(model, criterion="random").prepare()
    before = sparsifier.update(0.5)
    weights = model[0].weight.detach().clone()
    state = {"step_count": 7, "masks": {n: torch.zeros_like(m) for n, m in before.items()}, "history": [1, 2]}
    with pytest.raises(PrunelabError, match="history=\\[1, 2\\]; expected a list of dicts"):
        sparsifier.load_state_dict(state)  # used to zero every weight, then fail with a TypeError
    assert sparsifier.masks.equal(before) and sparsifier.step_count == 0
    assert torch.equal(model[0].weight, weights)
    with pytest.raises(PrunelabError, match="'step' and 'target_sparsity'"):
        sparsifier.load_state_dict({**state, "history": [{"step": 1}]})  # prepare() would KeyError on it


def test_check_target_under_nm_checks_the_pattern_not_an_allocation():
    # a dense first layer of 256 of 320 weights: 2:4 reaches 0.5 per pattern layer (0.1 overall), which
    # check_target used to refuse ("lower the sparsity to <= 0.2"), while it passed 0.9, which update refuses
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    sparsifier = Sparsifier(model, granularity="2:4", rules=LayerRules(keep_first="dense"))
    sparsifier.check_target(0.5)
    with pytest.raises(PrunelabError, match="N:M fixes the sparsity at 1 - N/M = 0.5"):
        sparsifier.check_target(0.9)
    assert sparsifier.update(0.5).sparsity == 32 / 320


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nm_update_after_the_model_moved_to_cuda():
    model = nn.Sequential(nn.Linear(8, 4))
    sparsifier = Sparsifier(model, granularity="2:4")  # masks made on the CPU
    model.cuda()  # same Parameter objects, now on the GPU
    masks = sparsifier.update(0.5)
    assert masks.sparsity == 0.5 and model[0].weight.is_cuda
