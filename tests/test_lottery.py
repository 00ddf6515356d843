"""Lottery tickets: IMP with rewinding, per-layer rates, reinit control, resumable run folders."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from prunelab.bench.training import TrainConfig
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.methods import METHODS, PruneSpec
from prunelab.methods.lottery import LotteryConfig, build_seeded, run_lottery

TRAIN = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-2, lr_schedule="constant", seed=0, progress=False)


def builder() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def loaders():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))  # 4 steps per epoch
    test = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=64)
    return train, test


def config(**overrides) -> LotteryConfig:
    return LotteryConfig(**{"rounds": 2, "train": TRAIN, "eval_every": 2, **overrides})


def comparable(metrics: dict) -> dict:
    """Metrics without wall times (which differ run to run)."""
    out = json.loads(json.dumps(metrics))
    for part in ("ticket", "reinit"):
        if out.get(part):
            out[part].pop("wall_time_s")
    return out


def test_rounds_follow_per_layer_rates_and_record_early_stopping(tmp_path):
    train, test = loaders()
    result = run_lottery(builder, train, test, config(rounds=3), tmp_path / "run")
    assert [m["round"] for m in result.rounds] == [0, 1, 2, 3] and len(result.masks) == 4
    sizes = {"0.weight": 8 * 24, "2.weight": 24 * 16, "4.weight": 16 * 3}
    for r, masks in enumerate(result.masks):
        kept = {l.name: l.kept for l in masks.stats().layers}
        assert kept == {n: round(s * (0.9 if n == "4.weight" else 0.8) ** r) for n, s in sizes.items()}
        if r:
            assert all(torch.equal(masks[n] & result.masks[r - 1][n], masks[n]) for n in masks)  # monotone
    for metrics in result.rounds:
        ticket = metrics["ticket"]
        assert ticket["steps"] == 4 and ticket["early_stop_step"] in (2, 4)
        assert [e[0] for e in ticket["evals"]] == [2, 4]
        assert ticket["early_stop_loss"] == min(e[1] for e in ticket["evals"])
        assert (metrics["reinit"] is None) == (metrics["round"] == 0)
    for r, masks in enumerate(result.masks):  # everything is in the folder
        folder = tmp_path / "run" / f"round_{r:03d}"
        assert MaskSet.load(folder / "mask.safetensors").equal(masks)
        assert json.loads((folder / "metrics.json").read_text()) == result.rounds[r]
    params = dict(result.model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in result.masks[-1].items())


def test_each_round_rewinds_the_survivors_to_the_initial_weights(tmp_path):
    train, test = loaders()
    no_training = TrainConfig(epochs=0, progress=False)
    result = run_lottery(builder, train, test, config(train=no_training, rounds=2, reinit_rounds=()), tmp_path)
    init = build_seeded(builder, 0)
    theta0, final = dict(init.named_parameters()), dict(result.model.named_parameters())
    for name, mask in result.masks[-1].items():  # no training: round 2 holds exactly theta_0 ⊙ m
        assert torch.equal(final[name], theta0[name] * mask)
    assert result.rounds[1]["reinit"] is None


def test_late_rewinding_saves_the_weights_after_k_steps(tmp_path):
    from safetensors.torch import load_file

    train, test = loaders()
    run_lottery(builder, train, test, config(rounds=1, rewind_step=3), tmp_path / "late")
    run_lottery(builder, train, test, config(rounds=1, rewind_step=0), tmp_path / "zero")
    theta0 = build_seeded(builder, 0).state_dict()
    late = load_file(str(tmp_path / "late" / "round_000" / "rewind.safetensors"))
    zero = load_file(str(tmp_path / "zero" / "round_000" / "rewind.safetensors"))
    assert all(torch.equal(zero[k], theta0[k]) for k in theta0)
    assert not torch.equal(late["0.weight"], theta0["0.weight"])


def test_resume_restores_finished_rounds_bit_for_bit_and_continues(tmp_path):
    train, test = loaders()
    first = run_lottery(builder, train, test, config(rounds=2), tmp_path / "run")  # "interrupted" after round 2
    resumed = run_lottery(builder, train, test, config(rounds=3), tmp_path / "run", resume=True)
    assert resumed.resumed_rounds == 3  # rounds 0, 1, 2 were loaded
    for r in range(3):
        assert resumed.rounds[r] == first.rounds[r]  # loaded identically, wall times included
        assert resumed.masks[r].equal(first.masks[r])
    assert resumed.rounds[3]["round"] == 3 and len(resumed.masks) == 4
    straight = run_lottery(builder, *loaders(), config(rounds=3), tmp_path / "straight")  # never interrupted
    assert comparable(straight.rounds[3]) == comparable(resumed.rounds[3])
    assert straight.masks[3].equal(resumed.masks[3])
    s, t = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
    again = run_lottery(builder, train, test, config(rounds=3), tmp_path / "run", resume=True)  # all done: only loads
    assert again.resumed_rounds == 4 and [comparable(m) for m in again.rounds] == [comparable(m) for m in resumed.rounds]


def test_resume_with_another_config_is_refused(tmp_path):
    train, test = loaders()
    run_lottery(builder, train, test, config(rounds=1, reinit_rounds=()), tmp_path)
    with pytest.raises(PrunelabError, match=r"keys that differ: config\.rate .*config\.train\.lr") as info:
        run_lottery(builder, train, test, config(rounds=2, rate=0.3, reinit_rounds=(),
                                                 train=TrainConfig(**{**TRAIN.__dict__, "lr": 0.5})), tmp_path, resume=True)
    assert "\n" not in str(info.value)
    with pytest.raises(PrunelabError, match="init_fingerprint"):
        run_lottery(_other_init, train, test, config(rounds=1, reinit_rounds=()), tmp_path, resume=True)
    with pytest.raises(PrunelabError, match="resume=True"):
        run_lottery(builder, train, test, config(rounds=1, reinit_rounds=()), tmp_path)


def _other_init() -> nn.Module:
    model = builder()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    return model


def test_rewinding_past_the_end_is_refused(tmp_path):
    train, test = loaders()
    with pytest.raises(PrunelabError, match=r"rewind_step \(--rewind-iter\) 5 is past the end of training \(1 epochs x 4 steps = 4 steps\)"):
        run_lottery(builder, train, test, config(rewind_step=5), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_configs_raise():
    for overrides, match in (({"rate": 1.0}, "rate"), ({"rounds": -1}, "rounds"), ({"eval_every": 0}, "eval_every"),
                             ({"reinit_rounds": (0,)}, "reinit_rounds"), ({"train": {"epochs": 1}}, "TrainConfig")):
        with pytest.raises(PrunelabError, match=match):
            LotteryConfig(**overrides)


def test_reinit_control_uses_the_same_mask_with_other_weights(tmp_path):
    train, test = loaders()
    result = run_lottery(builder, train, test, config(rounds=2, reinit_rounds=(2,)), tmp_path)
    assert result.rounds[1]["reinit"] is None and result.rounds[2]["reinit"] is not None
    assert result.rounds[2]["reinit_seed"] != 0
    assert result.rounds[2]["reinit"]["accuracy"] != result.rounds[2]["ticket"]["accuracy"] or \
        result.rounds[2]["reinit"]["loss"] != result.rounds[2]["ticket"]["loss"]


def test_lottery_method_fits_the_common_signature():
    train, test = loaders()
    model = builder()
    spec = PruneSpec(sparsity=0.5, rounds=2)
    result = METHODS.get("lottery")(model, train, test, spec, TRAIN)
    assert [r["round"] for r in result.rows] == [0, 1, 2]
    assert result.masks.stats().sparsity == pytest.approx(0.5, abs=0.02)
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in result.masks.items())


# --- the lottery method honours keep_first / keep_last and refuses what it cannot do --------------
@pytest.mark.parametrize("overrides, kept", [
    ({"keep_first": "dense"}, {"0.weight": 192, "2.weight": 192, "4.weight": 24}),
    ({"keep_last": "dense"}, {"0.weight": 96, "2.weight": 192, "4.weight": 48}),
    ({"keep_first": "dense", "keep_last": "dense", "layer_rates": {"0": 0.4}}, {"0.weight": 192, "2.weight": 192,
                                                                               "4.weight": 48}),
    ({"keep_first": 0.25}, {"0.weight": 144, "2.weight": 192, "4.weight": 24}),  # at most 25% sparse after 2 rounds
    ({"keep_first": 0.9}, {"0.weight": 96, "2.weight": 192, "4.weight": 24}),  # a ceiling above the target: no change
])
def test_lottery_method_keeps_the_first_and_last_layer_as_asked(overrides, kept):
    train, test = loaders()
    model = build_seeded(builder, 0)
    result = METHODS.get("lottery")(model, train, test, PruneSpec(sparsity=0.5, rounds=2, **overrides), TRAIN)
    assert {l.name: l.kept for l in result.masks.stats().layers} == kept
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in result.masks.items())


@pytest.mark.parametrize("overrides, match", [
    ({"criterion": "taylor"}, r"lottery tickets are found by weight magnitude .* got criterion 'taylor'; leave "
                              r"--criterion at magnitude"),
    ({"granularity": "channel"}, r"lottery tickets prune single weights, got granularity 'channel'; pass "
                                 r"--granularity unstructured"),
    ({"allocation": "erk"}, r"got allocation 'erk'; pass --allocation uniform"),
    ({"keep_first": "dense", "criterion": "taylor", "granularity": "channel"}, "got criterion 'taylor'"),
])
def test_lottery_method_refuses_options_it_cannot_honour(overrides, match):
    train, test = loaders()
    model = build_seeded(builder, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match=match) as info:
        METHODS.get("lottery")(model, train, test, PruneSpec(sparsity=0.5, rounds=2, **overrides), TRAIN)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any training


def test_lottery_method_accepts_uniform_allocation_as_its_per_layer_rates():
    train, test = loaders()
    masks = [METHODS.get("lottery")(build_seeded(builder, 0), train, test,
                                    PruneSpec(sparsity=0.5, rounds=2, allocation=a), TRAIN).masks
             for a in ("global", "uniform")]
    assert masks[0].equal(masks[1])


# --- a damaged run folder stops the resume with a one-line error naming the file ------------------
def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damaged, how", [
    ("round_002/weights.safetensors", "truncate"),
    ("round_002/weights.safetensors", "garbage"),
    ("round_000/rewind.safetensors", "truncate"),
    ("round_001/metrics.json", "truncate"),
    ("round_001/mask.safetensors", "garbage"),
])
def test_resume_from_a_damaged_folder_names_the_file_and_keeps_the_rounds_before_it(tmp_path, damaged, how):
    import shutil

    train, test = loaders()
    run = tmp_path / "run"
    first = run_lottery(builder, train, test, config(rounds=2), run)
    path = run / damaged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"not a safetensors file at all")
    before = _files(run)
    folder = damaged.split("/")[0]
    with pytest.raises(PrunelabError, match=rf"lottery run file '{path}' is damaged \(.+\); delete '{run / folder}' "
                                            rf"and any later round_\* folders, then resume to redo the run from {folder}"
                       ) as info:
        run_lottery(builder, *loaders(), config(rounds=3), run, resume=True)
    assert "\n" not in str(info.value)
    assert _files(run) == before  # nothing written, config.json included
    damaged_round = int(folder.removeprefix("round_"))
    for r in range(damaged_round, 3):  # as the message says
        shutil.rmtree(run / f"round_{r:03d}")
    resumed = run_lottery(builder, *loaders(), config(rounds=2), run, resume=True)
    assert resumed.resumed_rounds == damaged_round
    assert resumed.rounds[:damaged_round] == first.rounds[:damaged_round]  # the rounds before it, read back as they were
    assert [comparable(m) for m in resumed.rounds] == [comparable(m) for m in first.rounds]  # the rest redone identically
    assert all(a.equal(b) for a, b in zip(resumed.masks, first.masks))


@pytest.mark.parametrize("foreign, message", [
    ({"0.weight": torch.ones(24, 8, dtype=torch.bool), "9.weight": torch.ones(3, dtype=torch.bool)},
     r"it masks '9\.weight', which is no prunable parameter of the model \(it has 0\.weight, 2\.weight, 4\.weight\)"),
    ({"0.weight": torch.ones(24, 8, dtype=torch.bool)}, r"it has no mask for the model's '2\.weight'"),
    ({"0.weight": torch.ones(24, 8, dtype=torch.bool), "2.weight": torch.ones(16, 24, dtype=torch.bool),
      "4.weight": torch.ones(3, 8, dtype=torch.bool)},
     r"mask '4\.weight' has shape \(3, 8\), but the parameter has \(3, 16\)"),
])
def test_resume_refuses_a_round_mask_that_does_not_fit_the_model(tmp_path, foreign, message):
    train, test = loaders()
    run = tmp_path / "run"
    run_lottery(builder, train, test, config(rounds=2, reinit_rounds=()), run)
    MaskSet(foreign).save(run / "round_001" / "mask.safetensors")  # another run's mask, copied in
    before = _files(run)
    with pytest.raises(PrunelabError, match=rf"lottery run file '{run / 'round_001' / 'mask.safetensors'}' is damaged "
                                            rf"\(it does not fit the model: {message}\); delete '{run / 'round_001'}'"
                       ) as info:
        run_lottery(builder, *loaders(), config(rounds=3, reinit_rounds=()), run, resume=True)
    assert "\n" not in str(info.value)
    assert _files(run) == before  # refused before anything was written


# --- late rewinding: a round rewound to step k trains from k to T ---------------------------------
def test_rewound_rounds_train_the_remaining_steps_with_the_schedule_and_data_continued(tmp_path, monkeypatch):
    import math

    from prunelab.methods import lottery

    runs: list[dict[str, list]] = []  # one per training run: the lr of every optimizer step, the batches it saw
    made = lottery.make_optimizer

    def counting_optimizer(params, cfg):
        optimizer = made(params, cfg)
        run = {"lrs": [], "batches": []}
        runs.append(run)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: run["lrs"].append(opt.param_groups[0]["lr"]))
        return optimizer

    def recording_builder() -> nn.Module:
        model = builder()
        model.register_forward_pre_hook(
            lambda module, inputs: runs[-1]["batches"].append(inputs[0].clone()) if module.training and runs else None)
        return model

    monkeypatch.setattr(lottery, "make_optimizer", counting_optimizer)
    cosine = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.1, lr_schedule="cosine", seed=0, progress=False)
    total, k = 8, 3  # 2 epochs x 4 batches; rewind to step 3 (inside the first epoch)
    schedule = [0.1 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]  # lr of step s + 1

    # rewind 0: every round trains all T steps from step 0 with the whole schedule
    run_lottery(recording_builder, *loaders(), config(rounds=1, rewind_step=0, train=cosine, reinit_rounds=()),
                tmp_path / "zero")
    assert [len(r["lrs"]) for r in runs] == [total, total]
    assert runs[0]["lrs"] == runs[1]["lrs"] == pytest.approx(schedule, abs=1e-12)
    zero = runs[1]

    runs.clear()
    result = run_lottery(recording_builder, *loaders(), config(rounds=1, rewind_step=k, train=cosine, reinit_rounds=()),
                         tmp_path / "late")
    dense, rewound = runs
    assert dense["lrs"] == pytest.approx(schedule, abs=1e-12)
    assert len(rewound["lrs"]) == total - k and rewound["lrs"][0] == pytest.approx(schedule[k], abs=1e-12)
    assert rewound["lrs"] == pytest.approx(schedule[k:], abs=1e-12)
    # round 1's data order (seeded by the round) continued at step k: its batches k+1..T
    assert len(rewound["batches"]) == total - k
    assert all(torch.equal(a, b) for a, b in zip(rewound["batches"], zero["batches"][k:]))
    ticket = result.rounds[1]["ticket"]
    assert ticket["steps"] == total - k and [e[0] for e in ticket["evals"]] == [4, 6, 8]  # steps of the whole run
    assert result.rounds[0]["ticket"]["steps"] == total


# --- under DDP (a DistributedSampler) every round draws its own order, and a resume repeats it ------
class RecordingSampler(DistributedSampler):
    """A DistributedSampler that records the epoch of every pass over it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs: list[int] = []

    def __iter__(self):
        self.epochs.append(self.epoch)
        return super().__iter__()


def sharded_loaders(rank: int = 0):
    """``loaders()`` with the training set sharded as rank ``rank`` of 2 (2 steps per epoch); no process group."""
    train, test = loaders()
    sampler = RecordingSampler(train.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
    return DataLoader(train.dataset, batch_size=32, sampler=sampler), test


def test_under_a_distributed_sampler_every_round_draws_its_own_order_and_a_resume_repeats_it(tmp_path):
    two_epochs = TrainConfig(**{**TRAIN.__dict__, "epochs": 2})

    def run(rounds, folder, resume=False, rank=0):
        train, test = sharded_loaders(rank)  # a fresh loader, as in a new process
        result = run_lottery(builder, train, test, config(rounds=rounds, rewind_step=1, train=two_epochs), folder,
                             resume=resume)
        return result, train.sampler.epochs

    straight, epochs = run(2, tmp_path / "straight")
    # round 0, round 1 + its reinit control, round 2 + its control: 5 trainings x 2 epochs, each its own order
    assert len(epochs) == 10 and len(set(epochs)) == 10
    assert run(2, tmp_path / "rank1", rank=1)[1] == epochs  # the same epochs (so one permutation) on every rank
    _, first = run(1, tmp_path / "run")
    assert first == epochs[:6]
    resumed, rest = run(2, tmp_path / "run", resume=True)
    assert rest == epochs[6:]  # round 2 and its control draw the orders of the uninterrupted run
    assert comparable(straight.rounds[2]) == comparable(resumed.rounds[2])
    assert straight.masks[2].equal(resumed.masks[2])
    s, t = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)


@pytest.mark.parametrize("text, kind", [("[1]", "list"), ("3", "number"), ('"x"', "string"), ("null", "null")])
def test_resume_refuses_a_config_json_that_is_no_object(tmp_path, text, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    with pytest.raises(PrunelabError, match=rf"'{run / 'config.json'}' is not a prunelab\.lottery\.v1 run config "
                                            rf"\(it holds a JSON {kind}, not an object\); resume only from a run_lottery"
                       ) as info:
        run_lottery(builder, *loaders(), config(rounds=1), run, resume=True)
    assert "\n" not in str(info.value)
    assert _files(run) == {"config.json": text.encode()}  # nothing written
