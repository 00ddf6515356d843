"""Dynamic sparse training: exact counts through rewiring, the paper rules on hand-made cases."""

import math

import pytest
import torch
from torch import nn

from prunelab.dst import (
    DSR,
    DST_SPARSIFIERS,
    SET,
    SNFS,
    RigL,
    StaticSparse,
    UpdateSchedule,
    flops_per_sample,
    proportional_counts,
    training_flops,
)
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.methods import METHODS, PruneSpec
from prunelab.methods.dst import DSTConfig, build_dst_sparsifier

DYNAMIC = ("set", "dsr", "rigl", "snfs")


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(n)]


def train_steps(model, optimizer, sparsifier, data, check=None):
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = {n: m.clone() for n, m in sparsifier.masks.items()}
        sparsifier.step()
        if check is not None:
            check(before, sparsifier)


def kept(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


# --- the schedule -----------------------------------------------------------------------
def test_cosine_fraction_matches_rigl_eq1():
    s = UpdateSchedule(end_step=100, delta_t=10, alpha=0.3)
    assert s.fraction_at(0) == pytest.approx(0.3)
    assert s.fraction_at(50) == pytest.approx(0.15)
    assert s.fraction_at(25) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert s.fraction_at(90) == pytest.approx(0.15 * (1 + math.cos(0.9 * math.pi)))
    assert s.fraction_at(100) == 0.0 and s.fraction_at(250) == 0.0
    assert [t for t in range(120) if s.is_update_step(t)] == list(range(10, 100, 10)) == s.update_steps()


@pytest.mark.parametrize("kwargs, match", [
    ({"end_step": 10, "alpha": 0.0}, "alpha"),
    ({"end_step": 10, "alpha": 1.5}, "alpha"),
    ({"end_step": 10, "delta_t": 0}, "delta T"),
])
def test_schedule_bad_inputs(kwargs, match):
    with pytest.raises(PrunelabError, match=match):
        UpdateSchedule(**kwargs)


def test_schedule_must_fit_the_run():
    with pytest.raises(PrunelabError, match="delta T=500 exceeds the run's 200 steps; lower --delta-t or train longer"):
        UpdateSchedule.for_run(200, delta_t=500)
    with pytest.raises(PrunelabError, match="T_end=300 is beyond the run's 200 steps"):
        UpdateSchedule(end_step=300, delta_t=10).check_run(200)
    with pytest.raises(PrunelabError, match="T_end fraction"):
        UpdateSchedule.for_run(200, delta_t=10, end_fraction=1.5)
    with pytest.raises(PrunelabError, match="no update before T_end"):
        UpdateSchedule.for_run(200, delta_t=190, end_fraction=0.75)


@pytest.mark.parametrize("end_fraction, end_step", [(0.29, 29), (0.57, 57), (0.58, 58), (0.75, 75), (1.0, 100)])
def test_t_end_is_the_fraction_of_the_run_despite_float_rounding(end_fraction, end_step):
    # 0.29 * 100 = 28.999999999999996 and 0.57 * 100 = 56.99999999999999 in floats: int() was one step short
    assert UpdateSchedule.for_run(100, delta_t=1, end_fraction=end_fraction).end_step == end_step


def test_dst_config_fields_left_unset_defer_to_the_spec():
    spec = PruneSpec(sparsity=0.9, delta_t=7, alpha=0.2, end_fraction=0.5)
    schedule = build_dst_sparsifier("rigl", mlp(), spec, 100, dst=DSTConfig(sparse_init=True)).rewiring
    assert (schedule.delta_t, schedule.alpha, schedule.end_step) == (7, 0.2, 50)  # was RigL's 100 / 0.3, silently
    schedule = build_dst_sparsifier("rigl", mlp(), spec, 100, dst=DSTConfig(delta_t=5, end_fraction=0.8)).rewiring
    assert (schedule.delta_t, schedule.alpha, schedule.end_step) == (5, 0.2, 80)
    schedule = build_dst_sparsifier("rigl", mlp(), PruneSpec(sparsity=0.9), 1000).rewiring
    assert (schedule.delta_t, schedule.alpha, schedule.end_step) == (100, 0.3, 750)  # RigL's defaults


def test_method_level_bad_inputs():
    spec = PruneSpec(sparsity=0.9)
    with pytest.raises(PrunelabError, match="exceeds the run"):
        build_dst_sparsifier("rigl", mlp(), spec, 50)  # default delta T = 100
    with pytest.raises(PrunelabError, match="alpha"):
        build_dst_sparsifier("set", mlp(), spec, 500, dst=DSTConfig(alpha=0.0))
    with pytest.raises(PrunelabError, match="granularity"):
        build_dst_sparsifier("rigl", mlp(), PruneSpec(granularity="neuron"), 500)
    with pytest.raises(PrunelabError, match="unknown option"):
        build_dst_sparsifier("rigl", mlp(), spec, 500, dst=DSTConfig(options={"momentum": 0.5}))
    with pytest.raises(PrunelabError, match="allocation"):
        build_dst_sparsifier("set", mlp(), PruneSpec(allocation="lamp"), 500)
    with pytest.raises(PrunelabError, match="options must be a mapping"):
        build_dst_sparsifier("snfs", mlp(), spec, 500, dst=DSTConfig(options=None))
    with pytest.raises(PrunelabError, match="sparse FLOPs must be a finite number, got '10'"):
        flops_per_sample("rigl", "10", 100.0)
    with pytest.raises(PrunelabError, match="dense FLOPs must be a finite number, got nan"):
        flops_per_sample("set", 10.0, float("nan"))


# --- RigL --------------------------------------------------------------------------------
def test_rigl_grows_exactly_the_largest_grad_zero_weights():
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    sparsifier = RigL(model, 0.5).prepare()
    weight = model[0].weight
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    sparsifier.set_masks({"0.weight": mask})
    with torch.no_grad():
        weight.copy_(torch.tensor([[0.9, -0.05, 0, 0], [0.7, 0, -0.6, 0], [0, 0.02, 0.8, 0]]))
    # dense gradient: large on zero positions (0,2), (1,3), (2,3); huge on a kept weight (ignored)
    weight.grad = torch.tensor([[0.0, 0.0, 0.5, 0.1], [5.0, 0.3, 0.0, 0.9], [0.2, 0.0, 0.0, 0.7]])
    new = sparsifier.rewire(0.5)["0.weight"]  # 6 kept -> drop 3 smallest |w|, grow 3
    expected = mask.clone()
    expected[0, 1] = expected[2, 1] = expected[1, 2] = False  # |w| 0.05, 0.02, 0.6 are the 3 smallest kept
    expected[0, 2] = expected[1, 3] = expected[2, 3] = True  # |grad| 0.5, 0.9, 0.7 are the 3 largest zeros
    assert torch.equal(new, expected)
    assert int(new.sum()) == 6
    assert torch.all(weight[expected & ~mask] == 0)  # grown weights start at zero


def one_row(method, mask, weight, momentum, **kwargs):
    """A Linear(4, 1) under ``method`` with SGD momentum, the given mask, weights and momentum buffer."""
    model = nn.Sequential(nn.Linear(len(weight), 1, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = method(model, 0.5, **kwargs).prepare(optimizer)
    sparsifier.set_masks({"0.weight": torch.tensor([mask])})
    param = model[0].weight
    with torch.no_grad():
        param.copy_(torch.tensor([weight]))
    optimizer.state[param]["momentum_buffer"] = torch.tensor([momentum])
    return model, optimizer, sparsifier


def test_rigl_regrown_just_dropped_weight_keeps_value_and_momentum():
    # RigL eq. 2: I_grow = ArgTopK over i not in (theta \ I_drop) -- the dropped position is a candidate again;
    # the reference (google-research/rigl, _get_update_op, reinit_when_same=False) re-initialises and zeroes the
    # optimizer slots of new_connections = grown & (mask == 0) only: a weight dropped and regrown is kept as it was
    model, optimizer, sparsifier = one_row(RigL, [True, True, False, False], [0.01, 0.9, 0.0, 0.0],
                                           [0.5, 0.25, 0.0, 0.0])
    param = model[0].weight
    param.grad = torch.tensor([[100.0, 0.0, 0.1, 0.2]])  # the dropped weight has the largest gradient
    new = sparsifier.rewire(0.5)["0.weight"]  # 2 kept: drop 1 (|0.01|), grow 1 (|grad| 100, position 0 again)
    assert new.tolist() == [[True, True, False, False]]
    assert param.detach().tolist() == [[pytest.approx(0.01), pytest.approx(0.9), 0.0, 0.0]]  # was 0.0, 0.9
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[0.5, 0.25, 0.0, 0.0]]  # was 0.0, 0.25
    param.grad = torch.tensor([[0.0, 0.0, 0.1, 0.2]])
    assert sparsifier.rewire(0.5)["0.weight"].tolist() == [[False, True, False, True]]  # else the largest zero
    assert param.detach().tolist() == [[0.0, pytest.approx(0.9), 0.0, 0.0]]  # dropped: zero; new: starts at zero
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[0.0, 0.25, 0.0, 0.0]]


def test_rigl_one_update_regrowing_a_dropped_and_a_new_connection():
    # 3 kept -> drop round(1.5) = 2 (|w| 0.01, 0.02); grow 2 among {0, 1, 3} by |grad| 100, 0, 50 -> 0 and 3
    model, optimizer, sparsifier = one_row(RigL, [True, True, True, False], [0.01, 0.02, 0.9, 0.0],
                                           [0.5, 0.4, 0.3, 0.7])  # 0.7: stale state on a masked entry
    param = model[0].weight
    param.grad = torch.tensor([[100.0, 0.0, 0.0, 50.0]])
    assert sparsifier.rewire(0.5)["0.weight"].tolist() == [[True, False, True, True]]
    assert param.detach().tolist() == [[pytest.approx(0.01), 0.0, pytest.approx(0.9), 0.0]]
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[0.5, 0.0, pytest.approx(0.3), 0.0]]


def test_snfs_regrown_just_pruned_weight_keeps_value_and_momentum():
    # sparse_learning's truncate_weights writes the pruned mask, grows on it, and zeroes weights (apply_mask)
    # only after the growth: a weight pruned and regrown was never zeroed
    model, optimizer, sparsifier = one_row(SNFS, [True, True, False, False], [0.01, 0.9, 0.0, 0.0],
                                           [0.5, 0.25, 0.0, 0.0])
    param = model[0].weight
    sparsifier.momentum = {"0.weight": torch.tensor([[5.0, 1.0, 0.1, 0.2]])}  # position 0 has the largest |M|
    assert sparsifier.rewire(0.5)["0.weight"].tolist() == [[True, True, False, False]]
    assert param.detach().tolist() == [[pytest.approx(0.01), pytest.approx(0.9), 0.0, 0.0]]
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[0.5, 0.25, 0.0, 0.0]]


def test_dsr_regrown_just_pruned_weight_restarts_at_zero():
    # DSR's reference zeroes pruned weights (reinitialize_unused) before it grows: the only zero position after
    # the prune is the pruned one, so it comes back at zero with zero momentum
    model, optimizer, sparsifier = one_row(DSR, [True, True], [0.0005, 0.9], [0.5, 0.25], threshold=1e-3)
    param = model[0].weight
    assert sparsifier.rewire(0.5)["0.weight"].tolist() == [[True, True]]
    assert param.detach().tolist() == [[0.0, pytest.approx(0.9)]]
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[0.0, 0.25]]


def test_set_re_added_just_removed_weight_is_drawn_afresh():
    # SET's reference (weightsEvolution) rebuilds the layer from the kept weights and draws every added
    # connection a new value with a zero momentum entry, one just removed included
    model, optimizer, sparsifier = one_row(SET, [True, True, False], [0.01, 0.9, 0.0], [0.5, 0.25, 0.0])
    param = model[0].weight
    generator = torch.Generator().manual_seed(0 * 1_000_003 + 0)  # seed 0, step 0: what rewire draws from
    scores = torch.rand((1, 3), generator=generator)  # growth scores, then the fresh values
    fresh = (torch.rand((1, 3), generator=generator) * 2 - 1) / math.sqrt(3)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert scores[0, 0] > scores[0, 2]  # of the candidates {0 (just removed), 2}, position 0 wins
    assert sparsifier.rewire(0.5)["0.weight"].tolist() == [[True, True, False]]  # drop 1 (|0.01|), re-add it
    assert param.detach().tolist() == [[pytest.approx(float(fresh[0, 0])), pytest.approx(0.9), 0.0]]
    assert fresh[0, 0] != pytest.approx(0.01)
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[0.0, 0.25, 0.0]]


def test_grown_weights_and_optimizer_state_start_at_zero():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = RigL(model, 0.8, schedule=UpdateSchedule(end_step=40, delta_t=5, alpha=0.5)).prepare(optimizer)
    grown_seen = 0

    def check(before, sp):
        nonlocal grown_seen
        for name, param in sp.params.items():
            grown = sp.masks[name] & ~before[name]
            grown_seen += int(grown.sum())
            assert torch.all(param[grown] == 0)
            for value in optimizer.state[param].values():
                if value.shape == param.shape:
                    assert torch.all(value[grown] == 0) and torch.all(value[~sp.masks[name]] == 0)
            assert torch.all(param[~sp.masks[name]] == 0)

    train_steps(model, optimizer, sparsifier, batches(20), check)
    assert grown_seen > 0


def test_set_grows_fresh_random_weights_with_zero_state():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = SET(model, 0.8, schedule=UpdateSchedule(end_step=40, delta_t=5, alpha=0.5)).prepare(optimizer)

    def check(before, sp):
        for name, param in sp.params.items():
            grown = sp.masks[name] & ~before[name]
            bound = 1 / math.sqrt(param.shape[1])
            assert torch.all(param[grown].abs() <= bound)
            assert torch.all(optimizer.state[param]["momentum_buffer"][grown] == 0)

    train_steps(model, optimizer, sparsifier, batches(10), check)


# --- exact counts through many updates ---------------------------------------------------
@pytest.mark.parametrize("name", ["set", "rigl"])
def test_constant_per_layer_counts_through_50_updates(name):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    schedule = UpdateSchedule(end_step=51, delta_t=1, alpha=0.5)
    sparsifier = DST_SPARSIFIERS.get(name)(model, 0.85, schedule=schedule).prepare(optimizer)
    start = kept(sparsifier.masks)
    assert sum(start.values()) == round((1 - 0.85) * sum(m.numel() for m in sparsifier.masks.values()))
    changed = []

    def check(before, sp):
        assert kept(sp.masks) == start
        changed.append(sum(int((sp.masks[n] != before[n]).sum()) for n in sp.masks))
        for n, p in sp.params.items():
            assert torch.all(p[~sp.masks[n]] == 0)

    train_steps(model, optimizer, sparsifier, batches(55), check)
    updates = [h for h in sparsifier.history if "update_fraction" in h]
    assert len(updates) == 50
    assert all(h["achieved_sparsity"] == updates[0]["achieved_sparsity"] for h in updates)
    assert sum(changed) > 0


def test_erk_initial_allocation():
    model = mlp()
    sparsifier = SET(model, 0.8).prepare()
    layers = {l.name: l for l in sparsifier.masks.stats().layers}
    density = {n: 1 - l.sparsity for n, l in layers.items()}
    # ERK: density proportional to (n_in + n_out) / (n_in n_out)
    ratio = density["0.weight"] / density["2.weight"]
    assert ratio == pytest.approx((60 / 800) / (70 / 1200), rel=0.02)
    assert sparsifier.masks.stats().kept == round(0.2 * sparsifier.masks.stats().total)


def test_sparse_init_rescales_each_unit_by_its_fan_in():
    plain, scaled = mlp(), mlp()
    RigL(plain, 0.9).prepare()
    sparsifier = RigL(scaled, 0.9, sparse_init=True).prepare()
    for name, param in sparsifier.params.items():
        mask = sparsifier.masks[name]
        factor = torch.sqrt(mask.shape[1] / mask.sum(dim=1).clamp_min(1).float()).unsqueeze(1)  # (out, 1)
        torch.testing.assert_close(param, dict(plain.named_parameters())[name] * factor)


def test_dsr_keeps_global_count_and_moves_layers():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = DSR(model, 0.8, schedule=UpdateSchedule(end_step=60, delta_t=2, alpha=0.5), threshold=0.05)
    sparsifier.prepare(optimizer)
    start = kept(sparsifier.masks)
    total = sum(start.values())
    thresholds = []

    def check(before, sp):
        assert sum(kept(sp.masks).values()) == total
        thresholds.append(sp.threshold)

    train_steps(model, optimizer, sparsifier, batches(40), check)
    assert kept(sparsifier.masks) != start  # reallocation moved weights between layers
    assert len(set(thresholds)) > 1  # H adapted
    assert all(h["dropped"] == h["grown"] for h in sparsifier.history if "dropped" in h)


def test_dsr_threshold_rule():
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    sparsifier = DSR(model, 0.5, threshold=0.1, tolerance=0.1).prepare()
    with torch.no_grad():
        for p in sparsifier.params.values():
            p.copy_(torch.linspace(0.01, 1.0, 100).view(10, 10))
    sparsifier.enforce()
    n_below = sum(int(((p.abs() < 0.1) & sparsifier.masks[n]).sum()) for n, p in sparsifier.params.items())
    sparsifier.rewire(0.5)  # target N_p = 50 >> n_below: H doubles
    assert sparsifier.history[-1]["dropped"] == n_below
    assert sparsifier.threshold == pytest.approx(0.2)


def test_snfs_redistributes_by_mean_momentum():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    sparsifier = SNFS(model, 0.5).prepare()
    half = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    sparsifier.set_masks({"0.weight": half, "1.weight": half})
    with torch.no_grad():
        for p in sparsifier.params.values():
            p.copy_(torch.arange(1.0, 17.0).view(4, 4))
    sparsifier.enforce()
    # momentum: layer 0's kept weights average 3, layer 1's average 1 -> 3/4 and 1/4 of the regrowth
    m0 = torch.full((4, 4), 3.0)
    m0[0], m0[1] = 0.0, 6.0  # the row that will be dropped has no momentum, so it is not regrown
    m0[2:] = torch.arange(1.0, 9.0).view(2, 4)  # candidates ranked by |momentum|
    m1 = torch.ones(4, 4)
    m1[2:] = torch.arange(8.0, 0.0, -1.0).view(2, 4)
    sparsifier.momentum = {"0.weight": m0, "1.weight": m1}
    new = sparsifier.rewire(0.5)  # each layer drops 4 (K = 8): layer 0 regrows 6, layer 1 regrows 2
    assert kept(new) == {"0.weight": 4 + 6, "1.weight": 4 + 2}
    assert new["0.weight"][2:].reshape(-1).tolist() == [False, False, True, True, True, True, True, True]
    assert new["1.weight"][2:].reshape(-1).tolist() == [True, True, False, False, False, False, False, False]
    assert new["0.weight"][:2].reshape(-1).tolist() == [False] * 4 + [True] * 4  # smallest |w| dropped


def test_snfs_layer_shares_are_averaged_over_ranks(monkeypatch):
    """The per-layer momentum means decide the growth counts, so they are all-reduced too (decision 3)."""
    from prunelab import distributed

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    sparsifier = SNFS(model, 0.5).prepare()
    sparsifier.momentum = {"0.weight": torch.full((4, 4), 3.0), "1.weight": torch.ones(4, 4)}
    reduced = []

    def other_rank_mean_(tensor):  # a second rank whose layer means are (1, 3): the average is (2, 2)
        if tensor.dim() == 1:
            reduced.append(tensor.tolist())
            tensor.add_(torch.tensor([1.0, 3.0], dtype=tensor.dtype)).div_(2)
        return tensor

    monkeypatch.setattr(distributed, "all_reduce_mean_", other_rank_mean_)
    masks = dict(sparsifier.masks)
    assert sparsifier.layer_shares(masks, masks) == {"0.weight": 2.0, "1.weight": 2.0}
    assert reduced == [[3.0, 1.0]]


def test_snfs_state_with_foreign_momentum_is_a_one_line_error():
    sparsifier = SNFS(mlp(), 0.8).prepare()
    state = sparsifier.state_dict()
    before = dict(sparsifier.masks)
    for momentum in ({"0.weight": torch.zeros(3, 3)}, {"missing.weight": torch.zeros(40, 20)}):
        with pytest.raises(PrunelabError, match="matches no prunable weight of this model"):
            sparsifier.load_state_dict({**state, "momentum": momentum})
    assert all(torch.equal(before[n], m) for n, m in sparsifier.masks.items())
    sparsifier.load_state_dict({**state, "momentum": {"0.weight": torch.ones(40, 20, dtype=torch.float64)}})
    assert sparsifier.momentum["0.weight"].dtype == torch.float32


def test_snfs_needs_dense_grad_before_zero_grad():
    model = mlp()
    sparsifier = SNFS(model, 0.8).prepare()
    with pytest.raises(PrunelabError, match="before optimizer.zero_grad"):
        sparsifier.step()


def test_proportional_counts_exact_with_caps():
    counts = proportional_counts(10, {"a": 3.0, "b": 1.0, "c": 0.0}, {"a": 5, "b": 100, "c": 100})
    assert counts == {"a": 5, "b": 5, "c": 0}
    counts = proportional_counts(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 10, "b": 10, "c": 10})
    assert sum(counts.values()) == 7 and max(counts.values()) - min(counts.values()) <= 1
    assert proportional_counts(3, {"a": 0.0, "b": 0.0}, {"a": 1, "b": 5}) == {"a": 1, "b": 2}


def test_dense_rule_layer_stays_dense():
    from prunelab.targets import LayerRules

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for cls in (SET, DSR, SNFS):
        sp = cls(model, 0.7, schedule=UpdateSchedule(end_step=10, delta_t=2, alpha=0.5),
                 rules=LayerRules(keep_last="dense")).prepare(optimizer)
        train_steps(model, optimizer, sp, batches(8))
        assert bool(sp.masks["4.weight"].all())


def test_static_never_changes():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = StaticSparse(model, 0.9).prepare(optimizer)
    first = sparsifier.masks.fingerprint()
    train_steps(model, optimizer, sparsifier, batches(5))
    assert sparsifier.masks.fingerprint() == first
    with pytest.raises(PrunelabError, match="never rewires"):
        StaticSparse(model, 0.9, schedule=UpdateSchedule(end_step=10, delta_t=2))


# --- training FLOPs ----------------------------------------------------------------------
def test_training_flops_formulas():
    f_s, f_d = 10.0, 100.0
    assert flops_per_sample("dense", f_s, f_d) == 300.0
    assert flops_per_sample("set", f_s, f_d) == flops_per_sample("static", f_s, f_d) == 30.0
    assert flops_per_sample("snfs", f_s, f_d) == 120.0
    assert flops_per_sample("rigl", f_s, f_d, delta_t=100) == pytest.approx((3 * 10 * 100 + 2 * 10 + 100) / 101)
    with pytest.raises(PrunelabError, match="valid names"):
        flops_per_sample("lottery", f_s, f_d)
    model = mlp()
    sparsifier = RigL(model, 0.9).prepare()
    cost = training_flops("rigl", model, torch.randn(1, 20), sparsifier.masks, samples=1000, delta_t=10)
    f_s, f_d = 2 * sparsifier.masks.stats().kept, 2 * (20 * 40 + 40 * 30 + 30 * 5)
    assert cost.sparse_inference_flops == f_s and cost.dense_inference_flops == f_d
    assert cost.total_flops == pytest.approx(1000 * (30 * f_s + 2 * f_s + f_d) / 11)
    assert cost.dense_total_flops == 3000 * f_d and 0 < cost.fraction_of_dense < 1


def test_training_flops_count_kept_connections_not_nonzero_values():
    # a connection grown at zero and not moved yet (e.g. into a dead ReLU unit) is still multiplied by a sparse
    # training kernel: f_S = 2 * sum_l |M_l| * positions_l, not 2 * sum_l nnz(M_l * W_l) * positions_l
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(18, 2, bias=False))
    conv, fc = torch.zeros(2, 1, 3, 3, dtype=torch.bool), torch.zeros(2, 18, dtype=torch.bool)
    conv.view(-1)[:4] = True  # 4 kept, applied at 3 x 3 positions of a 5 x 5 input
    fc.view(-1)[:5] = True  # 5 kept, one position
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[2].weight.fill_(0.5)
        model[0].weight.view(-1)[0] = 0.0  # kept, exactly zero
        model[2].weight.view(-1)[:2] = 0.0  # two kept, exactly zero
    masks = {"0.weight": conv, "2.weight": fc}
    cost = training_flops("set", model, torch.randn(1, 1, 5, 5), masks, samples=10)
    assert cost.sparse_inference_flops == 2 * (4 * 9 + 5 * 1) == 82  # by nonzeros it was 2 * (3 * 9 + 3) = 60
    assert cost.dense_inference_flops == 2 * (18 * 9 + 36) == 396
    assert cost.per_sample_flops == 3 * 82 and cost.total_flops == 10 * 3 * 82
    assert training_flops("dense", model, torch.randn(1, 1, 5, 5), None, samples=10).per_sample_flops == 3 * 396
    with pytest.raises(PrunelabError, match="count the kept connections of its masks, got masks=None"):
        training_flops("rigl", model, torch.randn(1, 1, 5, 5), None, samples=10)


def test_training_flops_by_mask_match_measure_model_when_no_kept_weight_is_zero():
    from prunelab.dst.flops import kept_flops
    from prunelab.measure.counting import measure_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Block()
    gen = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=gen) > 0.6 for n, p in model.named_parameters()
             if n in ("attn.in_proj_weight", "attn.out_proj.weight", "fc.weight")}
    x = torch.randn(2, 5, 8)
    cost = measure_model(model, x, masks)
    assert kept_flops(model, cost, masks) == cost.sparse_flops  # the in-projection's q/k/v rows included
    assert kept_flops(model, cost, {}) == cost.dense_flops


# --- the registered methods end to end -----------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from prunelab.bench.datasets import load_dataset, make_loaders

    splits = load_dataset("digits")
    return splits, *make_loaders(splits, 64, seed=0)


@pytest.mark.parametrize("name", ["static", *DYNAMIC])
def test_registered_method_trains_at_exact_sparsity(name, digits):
    from prunelab.bench.models import build_model
    from prunelab.bench.training import TrainConfig, seed_everything

    splits, train_loader, test_loader = digits
    seed_everything(0)
    model = build_model("digits_mlp", splits.input_shape, splits.num_classes)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.1, progress=False)
    result = METHODS.get(name)(model, train_loader, test_loader, PruneSpec(sparsity=0.8), config,
                               dst=DSTConfig(delta_t=5))
    stats = result.masks.stats()
    assert stats.kept == round((1 - 0.8) * stats.total)
    assert result.rows[0]["accuracy"] > 0.6  # chance is 0.1
    assert result.rows[0]["mask_updates"] == (0 if name == "static" else len(range(5, int(0.75 * 69), 5)))
    for n, p in model.named_parameters():
        if n in result.masks:
            assert torch.all(p[~result.masks[n]] == 0)
    assert MaskSet.from_model(model, list(result.masks)).stats().kept <= stats.kept


@pytest.mark.parametrize("method", [RigL, SET])
def test_a_dense_layer_is_left_alone_by_rewiring(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    sparsifier = method(model, 0.5).prepare()
    sparsifier.set_masks({"0.weight": torch.rand(8, 8) > 0.5, "2.weight": torch.ones(2, 8, dtype=torch.bool)})
    sparsifier.enforce()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = model[2].weight.detach().clone()
    sparsifier.rewire(0.3)
    assert torch.equal(model[2].weight.detach(), before) and bool(sparsifier.masks["2.weight"].all())
