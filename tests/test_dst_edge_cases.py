"""Dynamic sparse training edge cases: layers that reallocation fills up, option names, paper invariants."""

import pytest
import torch
from torch import nn

from prunelab.dst import DSR, DST_SPARSIFIERS, SNFS, UpdateSchedule
from prunelab.errors import PrunelabError
from prunelab.methods import PruneSpec
from prunelab.methods.dst import DSTConfig, build_dst_sparsifier


pytestmark = pytest.mark.usefixtures("one_thread")


def two_layers():
    """A (4 -> 4) and B (4 -> 2), no biases: 16 + 8 weights; at sparsity 0.5, 12 are kept."""
    return nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))


A_ROW = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
B_FULL = torch.ones(2, 4, dtype=torch.bool)  # B filled up by earlier reallocation: free, but dense now


def kept(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


# --- a free layer that reallocation filled up keeps pruning -----------------------------
def test_snfs_prunes_a_free_layer_that_reallocation_filled_up():
    # SNFS (Dettmers & Zettlemoyer 2019, Alg. 1) prunes p of EVERY layer and regrows K = sum of the prunes by
    # c_l = mean |momentum| / sum; a free layer at density 1 is no exception (it was frozen dense forever)
    model = two_layers()
    sparsifier = SNFS(model, 0.5).prepare()
    sparsifier.set_masks({"0.weight": A_ROW, "1.weight": B_FULL})
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 17.0).view(4, 4))
        model[1].weight.copy_(torch.arange(1.0, 9.0).view(2, 4))
    sparsifier.enforce()
    sparsifier.momentum = {"0.weight": torch.ones(4, 4), "1.weight": torch.full((2, 4), 0.01)}
    new = sparsifier.rewire(0.5)  # A drops 2, B drops 4: K = 6, c_A = 1 / 1.01 -> A regrows 6, B 0
    assert sparsifier.history[-1]["dropped"] == sparsifier.history[-1]["grown"] == 6
    assert kept(new) == {"0.weight": 2 + 6, "1.weight": 4}
    assert new["1.weight"].tolist() == [[False] * 4, [True] * 4]  # B's 4 smallest |w| went
    assert torch.all(model[1].weight[0] == 0)


def test_dsr_prunes_below_threshold_in_a_free_layer_that_reallocation_filled_up():
    # DSR (Mostafa & Wang 2019, Alg. 1): prune |w| < H in every sparse layer, regrow K by surviving weights
    model = two_layers()
    sparsifier = DSR(model, 0.5, threshold=0.01).prepare()
    sparsifier.set_masks({"0.weight": A_ROW, "1.weight": B_FULL})
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(4, 4))
        model[1].weight.copy_(torch.full((2, 4), 1e-4))  # all of B below H
    sparsifier.enforce()
    new = sparsifier.rewire(0.5)
    # B keeps its floor of one weight: K = 7; survivors A 4, B 1 -> A regrows 5.6 -> 6, B 1.4 -> 1
    assert sparsifier.history[-1]["dropped"] == sparsifier.history[-1]["grown"] == 7
    assert kept(new) == {"0.weight": 4 + 6, "1.weight": 1 + 1}
    assert sum(kept(new).values()) == 12


@pytest.mark.parametrize("cls", [SNFS, DSR])
def test_a_layer_a_rule_keeps_dense_is_still_left_alone(cls):
    from prunelab.targets import LayerRules

    model = two_layers()
    sparsifier = cls(model, 0.5, rules=LayerRules(keep_last="dense")).prepare()
    sparsifier.set_masks({"0.weight": A_ROW, "1.weight": B_FULL})
    with torch.no_grad():
        model[1].weight.copy_(torch.full((2, 4), 1e-4))
    if cls is SNFS:
        sparsifier.momentum = {"0.weight": torch.ones(4, 4), "1.weight": torch.ones(2, 4)}
    before = model[1].weight.detach().clone()
    new = sparsifier.rewire(0.5)
    assert bool(new["1.weight"].all()) and torch.equal(model[1].weight.detach(), before)


# --- method options ----------------------------------------------------------------------
@pytest.mark.parametrize("name, accepts", [("dsr", "threshold, tolerance"), ("snfs", "momentum"),
                                           ("static", "no options"), ("rigl", "no options")])
def test_unknown_option_lists_only_real_options(name, accepts):
    model = two_layers()
    with pytest.raises(PrunelabError, match=f"it accepts: {accepts}$"):  # was "...tolerance, common"
        build_dst_sparsifier(name, model, PruneSpec(sparsity=0.5), 500, dst=DSTConfig(options={"bogus": 1}))


def test_the_var_keyword_name_is_not_an_option():
    with pytest.raises(PrunelabError, match="unknown option"):  # was a TypeError from the constructor
        build_dst_sparsifier("dsr", two_layers(), PruneSpec(sparsity=0.5), 500, dst=DSTConfig(options={"common": {}}))


# --- the paper invariants through training, every dynamic method --------------------------
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("name", ["set", "rigl", "dsr", "snfs"])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_invariants_through_training(name, optim):
    model = mlp()
    if optim == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = UpdateSchedule(end_step=20, delta_t=3, alpha=0.5)
    options = {"threshold": 0.05} if name == "dsr" else {}
    sparsifier = DST_SPARSIFIERS.get(name)(model, 0.8, schedule=schedule, **options).prepare(optimizer)
    start, total = kept(sparsifier.masks), sparsifier.masks.stats().kept
    gen = torch.Generator().manual_seed(1)
    for _ in range(26):
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = {n: m.clone() for n, m in sparsifier.masks.items()}
        sparsifier.step()
        assert sparsifier.masks.stats().kept == total  # exact global count
        if name in ("set", "rigl"):
            assert kept(sparsifier.masks) == start  # exact per-layer counts
        for n, p in sparsifier.params.items():
            mask = sparsifier.masks[n]
            assert torch.all(p[~mask] == 0)  # masked weights exactly zero (weight decay, momentum)
            grown = mask & ~before[n]
            if name != "set":
                assert torch.all(p[grown] == 0)  # RigL / DSR / SNFS grow at zero
            for value in optimizer.state[p].values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert torch.all(value[~mask] == 0) and torch.all(value[grown] == 0)
    updates = [h for h in sparsifier.history if "update_fraction" in h]
    assert [h["step"] for h in updates] == schedule.update_steps() == [3, 6, 9, 12, 15, 18]  # none at 0 or >= T_end
    assert [h["update_fraction"] for h in updates] == [schedule.fraction_at(t) for t in schedule.update_steps()]
    assert all(h["dropped"] == h["grown"] for h in updates)


# --- options and saved states that would silently mean something else -------------------
@pytest.mark.parametrize("method, options, message", [
    (DSR, {"threshold": float("inf")}, "DSR initial threshold H(0) must be a finite number > 0, got inf"),
    (DSR, {"threshold": float("nan")}, "DSR initial threshold H(0) must be a finite number > 0, got nan"),
    (DSR, {"threshold": True}, "DSR initial threshold H(0) must be a finite number > 0, got True"),
    (DSR, {"tolerance": False}, "DSR tolerance delta must be a number in [0, 1), got False"),
    (DSR, {"tolerance": True}, "DSR tolerance delta must be a number in [0, 1), got True"),
    (SNFS, {"momentum": False}, "SNFS momentum beta must be a number in [0, 1), got False"),
])
def test_dst_refuses_booleans_and_infinite_options(method, options, message):
    with pytest.raises(PrunelabError) as info:
        method(two_layers(), 0.5, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dst_load_state_dict_refuses_another_methods_state():
    from prunelab.dst import RigL

    source = RigL(two_layers(), 0.5, seed=1).prepare()
    source.step_count = 7
    for target in (SNFS(two_layers(), 0.5).prepare(), DSR(two_layers(), 0.5).prepare()):
        before, steps = dict(target.masks), target.step_count
        for state, what in ((source.state_dict(), "method 'rigl'"),
                            ({k: v for k, v in source.state_dict().items() if k != "name"}, "no method name")):
            with pytest.raises(PrunelabError, match=rf"^{target.name} cannot load a sparsifier state of {what}; load "
                                                    rf"the state_dict\(\) of a {target.name} sparsifier"):
                target.load_state_dict(state)
            assert target.step_count == steps and all(torch.equal(before[n], m) for n, m in target.masks.items())
    same = RigL(two_layers(), 0.5).prepare()
    same.load_state_dict(source.state_dict())  # its own method's state still loads
    assert same.step_count == 7 and same.masks.equal(source.masks)


@pytest.mark.parametrize("threshold", [float("inf"), 0.0, -1e-3, True, "0.001", None])
def test_dsr_load_state_dict_refuses_a_bad_threshold_before_changing_anything(threshold):
    saved = DSR(two_layers(), 0.5, seed=1).prepare()
    saved.step_count = 3
    target = DSR(two_layers(), 0.5, threshold=0.02).prepare()
    before = dict(target.masks)
    with pytest.raises(PrunelabError, match="DSR state's threshold H must be a finite number > 0, got "):
        target.load_state_dict({**saved.state_dict(), "threshold": threshold})
    assert target.threshold == 0.02 and target.step_count == 0
    assert all(torch.equal(before[n], m) for n, m in target.masks.items())
    target.load_state_dict({**saved.state_dict(), "threshold": 0.004})
    assert target.threshold == 0.004 and target.step_count == 3
