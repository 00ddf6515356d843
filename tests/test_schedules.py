"""Schedules are pure functions of the step with the published formulas."""

import pytest

from prunelab.errors import PrunelabError
from prunelab.schedules import MAX_UPDATES, Cubic, Geometric, OneShot, per_round_sparsity


def test_cubic_matches_zhu_gupta_formula():
    sched = Cubic(0.9, initial_sparsity=0.1, start_step=10, num_updates=4, frequency=5)
    assert sched.update_steps() == [10, 15, 20, 25, 30]
    assert sched.sparsity_at(9) == 0.0
    for k, t in enumerate(sched.update_steps()):
        expected = 0.9 + (0.1 - 0.9) * (1 - k / 4) ** 3
        assert sched.sparsity_at(t) == pytest.approx(expected)
    assert sched.sparsity_at(17) == sched.sparsity_at(15)  # holds between updates
    assert sched.sparsity_at(10_000) == pytest.approx(0.9)
    assert [t for t in range(40) if sched.is_update_step(t)] == [10, 15, 20, 25, 30]


def test_geometric_rounds():
    sched = Geometric(0.9, rounds=3)
    p = 1 - 0.1 ** (1 / 3)
    assert sched.rate == pytest.approx(p)
    assert sched.sparsity_at(0) == 0.0
    assert sched.sparsity_at(1) == pytest.approx(p)
    assert sched.sparsity_at(2) == pytest.approx(1 - (1 - p) ** 2)
    assert sched.sparsity_at(3) == 0.9
    assert per_round_sparsity(0.2, 2) == pytest.approx(0.36)


def test_oneshot():
    sched = OneShot(0.5, at_step=3)
    assert [sched.sparsity_at(t) for t in range(5)] == [0, 0, 0, 0.5, 0.5]
    assert [sched.is_update_step(t) for t in range(5)] == [False, False, False, True, False]


def test_schedule_errors():
    with pytest.raises(PrunelabError):
        Cubic(1.2)
    with pytest.raises(PrunelabError, match="frequency"):
        Cubic(0.5, frequency=0)
    with pytest.raises(PrunelabError, match="rounds"):
        Geometric(0.5, rounds=0)


@pytest.mark.parametrize("make", [
    lambda: OneShot(0.5, at_step=-1),  # would never prune
    lambda: OneShot(0.5, at_step=1.5),
    lambda: Cubic(0.5, num_updates=2.5),
    lambda: Cubic(0.5, frequency=True),
    lambda: Cubic(0.5, initial_sparsity=0.8),  # would ask to un-prune
    lambda: Geometric(0.5, rounds=2.5),
])
def test_schedule_arguments_that_could_never_run_are_refused(make):
    with pytest.raises(PrunelabError) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_per_round_sparsity_refuses_a_round_that_is_not_a_count(bad):
    with pytest.raises(PrunelabError, match=r"round_index must be an integer >= 0") as info:
        per_round_sparsity(0.2, bad)  # -1 returned -0.25, a negative sparsity
    assert "\n" not in str(info.value)
    assert per_round_sparsity(0.2, 0) == 0.0


@pytest.mark.parametrize("make, message", [
    (lambda n: Cubic(0.9, num_updates=n, frequency=1),
     r"^cubic schedule needs num_updates <= 1,000,000 \(each update rescores the model\), got 1,000,001; use fewer "),
    (lambda n: Geometric(0.9, rounds=n),
     r"^iterative pruning needs rounds <= 1,000,000 \(each round rescores the model\), got 1,000,001; use fewer rounds$"),
])
def test_a_schedule_refuses_more_updates_than_it_can_list(make, message):
    with pytest.raises(PrunelabError, match=message):
        make(MAX_UPDATES + 1)
    with pytest.raises(PrunelabError, match=message.replace("1,000,001", "1,000,000,000,000")):
        make(10**12)  # used to build a list of 10**12 steps in update_steps(): out of memory
    assert len(make(MAX_UPDATES).update_steps()) == MAX_UPDATES + (1 if "cubic" in message else 0)  # the limit itself works
