"""Review of dynamic sparse training against the papers: hand-computed cases and brute-force references.

SET (Mocanu et al. 2018), DSR (Mostafa & Wang 2019), RigL (Evci et al. 2020), SNFS (Dettmers &
Zettlemoyer 2019) and the training-FLOPs formulas of RigL's Appendix H.
"""

import math

import pytest
import torch
from torch import nn

from prunelab.dst import DSR, DST_SPARSIFIERS, SET, SNFS, RigL, UpdateSchedule, flops_per_sample, training_flops
from prunelab.errors import PrunelabError

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)) for _ in range(n)]


def kept(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def brute_top(scores, allowed, k):
    """Positions of the ``k`` largest ``scores`` among ``allowed`` (flat; ties to the lower index), by a full sort."""
    flat, ok = scores.reshape(-1).tolist(), allowed.reshape(-1).tolist()
    order = sorted((i for i in range(len(flat)) if ok[i]), key=lambda i: (-flat[i], i))
    out = torch.zeros(len(flat), dtype=torch.bool)
    out[order[:k]] = True
    return out.view(scores.shape)


# --- RigL: growth sees the dense gradient of the masked forward -----------------------------
@pytest.mark.parametrize("set_to_none", [True, False])
def test_rigl_growth_is_the_brute_force_dense_gradient_topk_at_every_update(set_to_none):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = UpdateSchedule(end_step=5, delta_t=1, alpha=0.5)
    sparsifier = RigL(model, 0.6, schedule=schedule).prepare(optimizer)
    linears = [model[0], model[2]]
    for step, (x, y) in enumerate(batches(4), start=1):
        optimizer.zero_grad(set_to_none=set_to_none)
        # the reference gradient: autograd of the loss of mask * W at the weights before the step
        masks = [sparsifier.masks[f"{i}.weight"].clone() for i in (0, 2)]
        ws = [(lin.weight.detach() * m).requires_grad_() for lin, m in zip(linears, masks)]
        h = torch.relu(nn.functional.linear(x, ws[0], model[0].bias.detach()))
        nn.functional.cross_entropy(nn.functional.linear(h, ws[1], model[2].bias.detach()), y).backward()
        dense = [w.grad.clone() for w in ws]
        assert all(bool((g[~m] != 0).any()) for g, m in zip(dense, masks))  # really dense at masked positions
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        after = [lin.weight.detach().clone() for lin in linears]
        sparsifier.step()
        f = 0.25 * (1 + math.cos(math.pi * step / 5))
        assert sparsifier.history[-1]["update_fraction"] == pytest.approx(f)
        for i, (m, w, g) in enumerate(zip(masks, after, dense)):
            k = math.floor(f * int(m.sum()) + 0.5)
            survivors = brute_top(w.abs(), m, int(m.sum()) - k)
            expected = survivors | brute_top(g.abs(), ~survivors, k)
            assert torch.equal(sparsifier.masks[f"{2 * i}.weight"], expected), (step, i)


def test_rigl_new_connection_starts_at_zero_not_its_drifted_value_and_a_regrown_kept_one_is_current():
    # after optimizer.step() a masked weight has drifted to -lr * grad; a *new* connection must start at 0 with 0
    # momentum, not at that stale value.  A kept weight dropped and regrown keeps its post-step value and state.
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = UpdateSchedule(end_step=1000, delta_t=1, alpha=1.0)  # f(1) = 0.5 (1 + cos(pi / 1000)) ~ 0.999998
    sparsifier = RigL(model, 0.5, schedule=schedule).prepare(optimizer)
    sparsifier.set_masks({"0.weight": torch.tensor([[True, True, False, False]])})
    param = model[0].weight
    with torch.no_grad():
        param.copy_(torch.tensor([[0.001, 1.0, 0.0, 0.0]]))
    optimizer.zero_grad()
    model(torch.tensor([[10.0, 0.0, 3.0, 1.0]])).sum().backward()  # dense grad = the input [10, 0, 3, 1]
    optimizer.step()  # w = [0.001 - 1, 1, -0.3, -0.1], momentum [10, 0, 3, 1]
    assert param.detach().tolist() == [[pytest.approx(-0.999), 1.0, pytest.approx(-0.3), pytest.approx(-0.1)]]
    sparsifier.step()  # drop round(2 * 0.999998) = 2 (both kept), grow the 2 largest |grad|: 0 (just dropped) and 2
    assert sparsifier.masks["0.weight"].tolist() == [[True, False, True, False]]
    assert param.detach().tolist() == [[pytest.approx(-0.999), 0.0, 0.0, 0.0]]  # position 2 was -0.3: now 0
    assert optimizer.state[param]["momentum_buffer"].tolist() == [[10.0, 0.0, 0.0, 0.0]]
    assert sparsifier.history[-1]["regrown_dropped"] == 1


@pytest.mark.parametrize("cls", [RigL, SNFS])
def test_zero_grad_with_set_to_none_false_before_step_is_refused_not_grown_at_index_0(cls):
    # zero_grad(set_to_none=False) before sparsifier.step() leaves all-zero gradients, not None: every candidate
    # tied and growth silently filled the first rows of every layer (rows 0-2 of 0.weight became dense)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = cls(model, 0.8, schedule=UpdateSchedule(end_step=8, delta_t=2, alpha=0.5)).prepare(optimizer)
    start = {n: m.clone() for n, m in sparsifier.masks.items()}
    (x, y), = batches(1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    sparsifier.step()  # step 1: no update
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    with pytest.raises(PrunelabError, match=r"exactly zero in every layer at update step 2, so growth would pick the "
                                            r"lowest indices; call sparsifier.step\(\) after optimizer.step\(\) and "
                                            r"before optimizer.zero_grad\(\)") as info:
        sparsifier.step()
    assert "\n" not in str(info.value)
    assert all(torch.equal(start[n], m) for n, m in sparsifier.masks.items())  # nothing changed


def test_history_counts_connections_dropped_and_regrown_in_the_same_update():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    sparsifier = RigL(model, 0.5).prepare()
    sparsifier.set_masks({"0.weight": torch.tensor([[True, True, True, False]])})
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.01, 0.02, 0.9, 0.0]]))
    model[0].weight.grad = torch.tensor([[100.0, 0.0, 0.0, 50.0]])
    sparsifier.rewire(0.5)  # drop round(1.5) = 2 (positions 0, 1); grow 2 among {0, 1, 3}: 0 (regrown) and 3
    entry = sparsifier.history[-1]
    assert (entry["dropped"], entry["grown"], entry["regrown_dropped"]) == (2, 2, 1)
    assert sparsifier.masks["0.weight"].tolist() == [[True, False, True, True]]


# --- the schedule ------------------------------------------------------------------------------
def test_rigl_defaults_and_cosine_fraction_by_hand():
    schedule = UpdateSchedule.for_run(1000)
    assert (schedule.delta_t, schedule.alpha, schedule.end_step) == (100, 0.3, 750)
    assert schedule.update_steps() == [100, 200, 300, 400, 500, 600, 700]
    # 0.15 * (1 + cos(pi * 100 / 750)), cos(2 pi / 15) = 0.913545457642601
    assert schedule.fraction_at(100) == pytest.approx(0.15 * 1.913545457642601, abs=1e-12)
    assert schedule.fraction_at(375) == pytest.approx(0.15, abs=1e-12)
    assert [schedule.is_update_step(t) for t in (0, 99, 100, 101, 700, 750, 800)] == \
        [False, False, True, False, True, False, False]


@pytest.mark.parametrize("call, message", [
    (lambda: UpdateSchedule.for_run(50), "delta T=100 exceeds the run's 50 steps; lower --delta-t or train longer"),
    (lambda: UpdateSchedule.for_run(500, alpha=0.0), "alpha (initial update fraction) must be in (0, 1], got 0.0"),
    (lambda: UpdateSchedule.for_run(500, alpha=1.2), "alpha (initial update fraction) must be in (0, 1], got 1.2"),
    (lambda: UpdateSchedule.for_run(500, end_fraction=1.5), "got 1.5; T_end beyond the run never ends the updates"),
    (lambda: UpdateSchedule.for_run(500, end_fraction=0.0), "got 0.0; T_end at step 0 leaves no update, RigL uses"),
    (lambda: UpdateSchedule(end_step=600).check_run(500), "T_end=600 is beyond the run's 500 steps"),
    (lambda: RigL(mlp(), 1.0), "sparsity must be in [0, 1)"),
    (lambda: SET(mlp(), -0.5), "sparsity must be in [0, 1)"),
])
def test_bad_schedule_and_sparsity_are_one_line_errors(call, message):
    with pytest.raises(PrunelabError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


# --- SET ---------------------------------------------------------------------------------------
def test_erdos_renyi_counts_by_hand():
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 30), nn.Linear(30, 5))
    sparsifier = SET(model, 0.8).prepare()
    # keep 430 of 2150; eps * (60 + 70 + 35) = 430 -> 156.36, 182.42, 91.21 -> floors + the largest remainder
    assert kept(sparsifier.masks) == {"0.weight": 156, "1.weight": 183, "2.weight": 91}


def test_set_drops_smallest_magnitude_of_both_signs_together_and_grows_among_the_empty():
    # the paper drops zeta of the positive and zeta of the negative weights separately (here: 0.5 and -0.01);
    # the implementation ranks |w| of both signs together, as its docstring says: -0.01 and -0.02 go
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    sparsifier = SET(model, 0.25).prepare()
    mask = torch.tensor([[True] * 6 + [False] * 2])
    sparsifier.set_masks({"0.weight": mask})
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.01, -0.02, -0.03, 0.5, 0.6, 0.7, 0.0, 0.0]]))
    new = sparsifier.rewire(1 / 3)["0.weight"][0]
    assert new[2:6].tolist() == [True] * 4  # -0.03, 0.5, 0.6, 0.7 survive
    assert int(new.sum()) == 6 and int(new[[0, 1, 6, 7]].sum()) == 2  # two grown among the four empty
    assert "positive and" in SET.__doc__ and "ranked together by ``|w|``" in SET.__doc__


# --- DSR ---------------------------------------------------------------------------------------
def two_layers(cls, weights, **kwargs):
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False))
    sparsifier = cls(model, 0.5, allocation="uniform", **kwargs).prepare()
    half = torch.tensor([[True] * 4, [False] * 4])
    sparsifier.set_masks({"0.weight": half, "1.weight": half})
    with torch.no_grad():
        for lin, row in zip(model, weights):
            lin.weight.copy_(torch.tensor([row, [0.0] * 4]))
    return model, sparsifier


def test_dsr_threshold_and_reallocation_by_survivors_by_hand():
    model, sp = two_layers(DSR, [[1e-4, 2e-4, 0.5, 0.6], [3e-4, 0.7, 0.8, 0.9]], threshold=1e-3, tolerance=0.1)
    new = sp.rewire(0.5)
    # |w| < H = 1e-3: 2 in layer 0, 1 in layer 1 -> K = 3 < (1 - 0.1) * N_p, N_p = 0.5 * 8 = 4 -> H doubles;
    # survivors R = (2, 3): G = 3 * (2/5, 3/5) = (1.2, 1.8) -> floors (1, 1), the remainder to layer 1: (1, 2)
    assert sp.threshold == pytest.approx(2e-3)
    assert kept(new) == {"0.weight": 3, "1.weight": 5}
    survivors = {"0.weight": torch.tensor([[False, False, True, True], [False] * 4]),
                 "1.weight": torch.tensor([[False, True, True, True], [False] * 4])}
    for lin, (name, alive) in zip(model, survivors.items()):
        assert bool(new[name][alive].all())
        assert torch.all(lin.weight[new[name] & ~alive] == 0)  # regrown at zero (a just-pruned one included)
    assert sp.history[-1]["dropped"] == sp.history[-1]["grown"] == 3


@pytest.mark.parametrize("rows, pruned, threshold_after", [
    ([[1e-4, 1e-4, 1e-4, 0.5], [2e-4, 2e-4, 0.9, 0.9]], 5, 5e-4),  # K = 5 > 1.1 * N_p = 4.4: H halves
    ([[1e-4, 1e-4, 0.5, 0.5], [2e-4, 2e-4, 0.9, 0.9]], 4, 1e-3),  # within the tolerance: H stays
    ([[1e-4, 1e-4, 0.5, 0.5], [2e-4, 0.9, 0.9, 0.9]], 3, 2e-3),  # K = 3 < 0.9 * N_p = 3.6: H doubles
])
def test_dsr_threshold_moves_only_outside_the_tolerance(rows, pruned, threshold_after):
    _, sp = two_layers(DSR, rows, threshold=1e-3, tolerance=0.1)
    sp.rewire(0.5)  # N_p = round(0.5 * 8) = 4
    assert sp.history[-1]["dropped"] == pruned and sp.threshold == pytest.approx(threshold_after)
    assert sp.masks.stats().kept == 8


# --- SNFS --------------------------------------------------------------------------------------
def test_snfs_prune_rate_decay_and_exact_global_count_through_training():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    schedule = UpdateSchedule(end_step=12, delta_t=2, alpha=0.5)
    sparsifier = SNFS(model, 0.7, schedule=schedule).prepare(optimizer)
    total = sparsifier.masks.stats().kept
    expected_drops = []
    for x, y in batches(14):
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        step = sparsifier.step_count + 1
        if schedule.is_update_step(step):
            f = 0.25 * (1 + math.cos(math.pi * step / 12))
            expected_drops.append(sum(math.floor(f * k + 0.5) for k in kept(sparsifier.masks).values()))
        sparsifier.step()
        assert sparsifier.masks.stats().kept == total
        for n, p in sparsifier.params.items():
            assert torch.all(p[~sparsifier.masks[n]] == 0)
            assert torch.all(optimizer.state[p]["momentum_buffer"][~sparsifier.masks[n]] == 0)
    updates = [h for h in sparsifier.history if "update_fraction" in h]
    assert [h["step"] for h in updates] == [2, 4, 6, 8, 10]
    assert [h["dropped"] for h in updates] == expected_drops and all(h["grown"] == h["dropped"] for h in updates)


def test_snfs_shares_use_mean_momentum_of_the_active_weights_only():
    _, sp = two_layers(SNFS, [[0.1, 0.2, 0.5, 0.6], [0.3, 0.7, 0.8, 0.9]])
    # active (row 0) means: layer 0 = 1, layer 1 = 3; the inactive row's huge momentum must not count
    sp.momentum = {"0.weight": torch.tensor([[1.0] * 4, [100.0] * 4]), "1.weight": torch.tensor([[3.0] * 4, [0.0] * 4])}
    masks = dict(sp.masks)
    assert sp.layer_shares(masks, masks) == {"0.weight": 1.0, "1.weight": 3.0}


# --- determinism and the global RNG ------------------------------------------------------------
def train(name, seed):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = {"threshold": 0.05} if name == "dsr" else {}
    sparsifier = DST_SPARSIFIERS.get(name)(model, 0.7, schedule=UpdateSchedule(end_step=8, delta_t=2, alpha=0.5),
                                           seed=seed, **options)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    sparsifier.prepare(optimizer)
    for x, y in batches(8):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    assert torch.equal(torch.random.get_rng_state(), state)  # mask decisions never touch the global RNG
    return sparsifier.masks.fingerprint(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["set", "dsr", "rigl", "snfs"])
def test_deterministic_given_the_seed_and_global_rng_untouched(name):
    first, again, other = train(name, 0), train(name, 0), train(name, 1)
    assert first[0] == again[0] and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert other[0] != first[0]  # the seed draws the initial mask


# --- training FLOPs (RigL, Appendix H) ---------------------------------------------------------
def test_training_flops_of_a_tiny_mlp_by_hand():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    masks = {"0.weight": torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool),
             "2.weight": torch.tensor([[1, 0]], dtype=torch.bool)}
    # f_S = 2 * (4 + 1) = 10, f_D = 2 * (6 + 2) = 16 (multiply-adds x 2, biases not counted), per sample
    expected = {"dense": 3 * 16, "static": 3 * 10, "set": 3 * 10, "dsr": 3 * 10, "snfs": 2 * 10 + 16,
                "rigl": (3 * 10 * 2 + 2 * 10 + 16) / 3}  # delta T = 2: two sparse steps, one with dense grads
    for method, per_sample in expected.items():
        cost = training_flops(method, model, torch.randn(4, 3), masks, samples=7, delta_t=2)  # batch 4: per sample
        assert cost.per_sample_flops == pytest.approx(per_sample)
        assert cost.total_flops == pytest.approx(7 * per_sample) and cost.dense_total_flops == 7 * 48
        assert cost.fraction_of_dense == pytest.approx(per_sample / 48)
        assert flops_per_sample(method, 10, 16, delta_t=2) == pytest.approx(per_sample)
    assert expected["rigl"] == 32
