"""Review tests for lottery tickets and the schedule runners: interrupted runs resume to the
uninterrupted one, per-layer rates compound, masks hold after rewinding, bad input is one line."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from test_lottery import comparable  # metrics without wall times
from torch.utils.data import DataLoader, TensorDataset

from prunelab.bench.datasets import load_digits
from prunelab.bench.training import TrainConfig
from prunelab.errors import PrunelabError
from prunelab.methods import METHODS, PruneSpec, lottery
from prunelab.methods.lottery import LotteryConfig, build_seeded, run_lottery

DIGITS = load_digits()
# SGD with momentum and a cosine schedule: the optimizer state and the lr of every step matter
TRAIN = TrainConfig(epochs=2, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, lr_schedule="cosine", seed=0,
                    progress=False)
T = 8  # 2 epochs x 4 batches


def loaders() -> tuple[DataLoader, DataLoader]:
    """256 digits to train on (4 shuffled batches of 64), 128 to test on; the test loader has no generator."""
    x, y = DIGITS.train.tensors
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(*(t[:128] for t in DIGITS.test.tensors)), batch_size=128)
    return train, test


def builder() -> nn.Module:  # dropout and batch norm: the randomness and the buffers of a round matter too
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.BatchNorm1d(32),
                         nn.Linear(32, 10))


def config(**overrides) -> LotteryConfig:
    return LotteryConfig(**{"rounds": 3, "train": TRAIN, "eval_every": 3, "rewind_step": 2, **overrides})


def tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``folder`` (file bytes differ only in metadata order)."""
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- an interrupted run resumes to exactly the uninterrupted one ----------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    return run_lottery(builder, *loaders(), config(), out), out


def _round_of(description: str) -> int:
    return int(description.split()[2].split("/")[0])  # "lottery round 2/3", "reinit control 2/3", "... 0 (dense)"


@pytest.mark.parametrize("crash_round, crash_call", [(0, 0), (2, 0), (2, 1), (3, 1)])  # call 1: the reinit control
def test_a_run_interrupted_mid_round_resumes_to_the_uninterrupted_one(straight, tmp_path, monkeypatch, crash_round,
                                                                        crash_call):
    reference, reference_dir = straight
    real = lottery._train_round
    calls: dict[int, int] = {}

    def crashing(model, masks, *args, **kwargs):
        r = _round_of(args[4])
        calls[r] = calls.get(r, 0) + 1
        if r == crash_round and calls[r] == crash_call + 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the round
        return real(model, masks, *args, **kwargs)

    monkeypatch.setattr(lottery, "_train_round", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_lottery(builder, *loaders(), config(), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == \
        ["config.json", *(f"round_{r:03d}" for r in range(crash_round))]  # no half-written round, no temp folder
    monkeypatch.setattr(lottery, "_train_round", real)
    resumed = run_lottery(builder, *loaders(), config(), tmp_path / "run", resume=True)
    assert resumed.resumed_rounds == crash_round
    assert [comparable(m) for m in resumed.rounds] == [comparable(m) for m in reference.rounds]
    assert all(a.equal(b) for a, b in zip(resumed.masks, reference.masks)) and len(resumed.masks) == 4
    assert same_tensors(tensors(tmp_path / "run"), tensors(reference_dir))  # rewind point, masks, every ticket
    s, t = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)


def test_an_interrupted_cli_run_resumes_to_the_uninterrupted_one(cli, tmp_path, monkeypatch):
    fast = ["--model", "digits_mlp", "--dataset", "digits", "--epochs", "1", "--eval-every", "10", "--no-progress",
            "--rounds", "2", "--rewind-iter", "5"]
    assert cli("lottery", *fast, "--out", str(tmp_path / "straight"))[0] == 0
    real = lottery._train_round

    def crashing(model, masks, *args, **kwargs):
        if _round_of(args[4]) == 2:
            raise KeyboardInterrupt
        return real(model, masks, *args, **kwargs)

    monkeypatch.setattr(lottery, "_train_round", crashing)
    code, _, err = cli("lottery", *fast, "--out", str(tmp_path / "run"))
    assert code == 130 and "interrupted" in err
    monkeypatch.setattr(lottery, "_train_round", real)
    code, out, _ = cli("lottery", *fast, "--resume", str(tmp_path / "run"))
    assert code == 0 and "2 finished rounds read back from the folder, 1 trained now" in out
    read = [json.loads((tmp_path / d / "results.json").read_text())["rounds"] for d in ("straight", "run")]
    assert [comparable(m) for m in read[0]] == [comparable(m) for m in read[1]]
    assert same_tensors(tensors(tmp_path / "straight"), tensors(tmp_path / "run"))  # the last-ticket checkpoint too


def test_run_lottery_leaves_the_global_random_state_as_it_was(tmp_path):
    # each round's final evaluation ran outside the seeded block, and a test loader without a generator of its own
    # draws its base seed from the global generator: the caller's random state moved with every round run
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run_lottery(builder, *loaders(), config(rounds=1), tmp_path)
    assert torch.equal(torch.get_rng_state(), before)


# --- rounds: masks, rates, rewinding ---------------------------------------------------------------
def test_the_reinit_control_trains_the_tickets_mask_on_another_model(tmp_path, monkeypatch):
    real = lottery._train_round
    seen = []

    def spy(model, masks, *args, **kwargs):
        seen.append((_round_of(args[4]), model, {k: v.clone() for k, v in masks.items()}))
        return real(model, masks, *args, **kwargs)

    monkeypatch.setattr(lottery, "_train_round", spy)
    result = run_lottery(builder, *loaders(), config(rounds=2), tmp_path)
    assert [r for r, _, _ in seen] == [0, 1, 1, 2, 2]  # ticket, then its control, every pruning round
    for ticket, control in ((seen[1], seen[2]), (seen[3], seen[4])):
        assert control[1] is not ticket[1] and control[1] is not result.model
        assert ticket[2].keys() == control[2].keys()
        assert all(torch.equal(ticket[2][k], control[2][k]) for k in ticket[2])
        assert result.masks[ticket[0]].equal(control[2])


def test_masked_weights_are_zero_in_every_forward_after_rewinding_to_dense_weights(tmp_path, monkeypatch):
    # theta_k (k = 3) is dense: the rewound ticket must never see its pruned weights, from the first forward on
    real = lottery._train_round
    leaks: list[int] = []

    def checked(model, masks, *args, **kwargs):
        params = dict(model.named_parameters())

        def hook(module, inputs):
            if module.training:
                leaks.extend(int((params[n][~m] != 0).sum()) for n, m in masks.items())

        handle = model.register_forward_pre_hook(hook)
        try:
            return real(model, masks, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(lottery, "_train_round", checked)
    result = run_lottery(builder, *loaders(), config(rounds=2, rewind_step=3, reinit_rounds=()), tmp_path)
    assert len(leaks) == 2 * (T + 2 * (T - 3)) and not any(leaks)  # 2 masks x every step of rounds 0, 1, 2
    from safetensors.torch import load_file

    for r in (1, 2):
        weights = load_file(str(tmp_path / f"round_{r:03d}" / "weights.safetensors"))
        assert all(not bool(weights[n][~m].any()) for n, m in result.masks[r].items())


def test_per_layer_rates_compound_round_by_round(tmp_path):
    cfg = config(rounds=3, rate=0.3, output_rate=None, layer_rates={"1": 0.5}, rewind_step=0, reinit_rounds=(),
                 train=TrainConfig(**{**TRAIN.__dict__, "epochs": 1}))
    result = run_lottery(builder, *loaders(), cfg, tmp_path)
    for r, masks in enumerate(result.masks):  # kept after r rounds: round(n prod (1 - p_l)) per layer
        assert {l.name: l.kept for l in masks.stats().layers} == {"1.weight": round(2048 * 0.5 ** r),
                                                                   "5.weight": round(320 * 0.7 ** r)}
        assert result.rounds[r]["kept"] == round(2048 * 0.5 ** r) + round(320 * 0.7 ** r)


def test_rewinding_to_the_last_step_keeps_the_masked_final_weights(tmp_path):
    from safetensors.torch import load_file

    result = run_lottery(builder, *loaders(), config(rounds=1, rewind_step=T, reinit_rounds=()), tmp_path)
    ticket = result.rounds[1]["ticket"]
    assert ticket["steps"] == 0 and ticket["early_stop_step"] == T and [e[0] for e in ticket["evals"]] == [T]
    theta_t = load_file(str(tmp_path / "round_000" / "rewind.safetensors"))
    dense = load_file(str(tmp_path / "round_000" / "weights.safetensors"))
    assert all(torch.equal(theta_t[k], dense[k]) for k in dense)  # theta_T is round 0's trained network
    final = result.model.state_dict()
    for name, value in theta_t.items():
        mask = result.masks[1].get(name)
        assert torch.equal(final[name], value if mask is None else value * mask)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_a_zero_size_layer_is_reported_as_fully_remaining(tmp_path):
    def with_empty_layer() -> nn.Module:  # Linear(16, 0) -> Linear(0, 10): the Sparsifier has nothing to prune there
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 0), nn.Linear(0, 10))

    result = run_lottery(with_empty_layer, *loaders(), config(rounds=1, rewind_step=0, reinit_rounds=()), tmp_path)
    layers = result.rounds[1]["layers_remaining_pct"]  # was: ZeroDivisionError after round 0 had trained
    assert layers["3.weight"] == 100.0 and layers["1.weight"] == pytest.approx(100 * round(1024 * 0.8) / 1024)


# --- the lottery method through the common signature ---------------------------------------------------
def test_the_lottery_methods_target_counts_the_capped_first_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))  # 1024 + 160 weights
    spec = PruneSpec(sparsity=0.5, rounds=2, keep_first="dense")
    result = METHODS.get("lottery")(model, *loaders(), spec, TrainConfig(**{**TRAIN.__dict__, "epochs": 1}))
    # the first layer stays dense, the last one prunes p = 1 - 0.5^(1/2) per round: the target was 0.5 regardless
    assert [r["kept_weights"] for r in result.rows] == [1184, 1024 + round(160 * 0.5 ** 0.5), 1024 + 80]
    for row in result.rows:
        assert row["target_sparsity"] == pytest.approx(160 * (1 - 0.5 ** (row["round"] / 2)) / 1184)
        assert row["target_sparsity"] == pytest.approx(row["sparsity"], abs=1 / 1184)


def named_mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(64, 16), relu=nn.ReLU(), fc2=nn.Linear(16, 10)))


def test_a_bare_exclude_glob_is_one_glob_not_its_letters():
    assert LotteryConfig(exclude="fc2").exclude == ("fc2",) and PruneSpec(exclude="fc2").exclude == ("fc2",)
    assert LotteryConfig(exclude=None).exclude == () == PruneSpec(exclude=None).exclude  # as OneShotConfig: none
    model = build_seeded(named_mlp, 0)
    # was: LotteryConfig made ('f', 'c', '2') of it, and 'f' matches no layer
    result = METHODS.get("lottery")(model, *loaders(), PruneSpec(sparsity=0.5, rounds=1, exclude="fc2"),
                                    TrainConfig(**{**TRAIN.__dict__, "epochs": 1}))
    assert list(result.masks) == ["fc1.weight"] and result.masks.stats().kept == 512


# --- bad input: one line, before anything is trained or written ---------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"layer_rates": [("fc3", 0.1)]}, r"layer_rates=\[\('fc3', 0\.1\)\]; expected a mapping from layer globs"),
    ({"layer_rates": None}, r"layer_rates=None; expected a mapping"),
    ({"layer_rates": {3: 0.1}}, r"layer_rates=\{3: 0\.1\}; expected a mapping from layer globs"),
    ({"exclude": (3,)}, r"exclude=\(3,\); expected layer globs"),
    ({"reinit_rounds": 2}, r"reinit_rounds=2; expected pruning rounds \(ints >= 1\)"),
])
def test_bad_lottery_configs_are_one_line_errors(overrides, match):
    with pytest.raises(PrunelabError, match=match) as info:
        LotteryConfig(**overrides)
    assert "\n" not in str(info.value)


def test_lottery_config_keeps_its_own_copy_of_the_layer_rates():
    rates = {"fc3": 0.1}
    cfg = LotteryConfig(layer_rates=rates)
    rates["fc3"] = 0.9  # after the check: the config stays as validated
    assert cfg.layer_rates == {"fc3": 0.1} and cfg.to_dict()["layer_rates"] == {"fc3": 0.1}


@pytest.mark.parametrize("overrides, match", [
    ({"layer_rates": {3: 0.1}}, r"layer_rates keys must be layer globs \(strings\), got 3"),
    ({"exclude": [3]}, r"exclude must be layer globs \(strings\), got \[3\]"),
    ({"exclude": {"fc3": 1}}, r"exclude must be layer globs \(strings\), got \{'fc3': 1\}"),
])
def test_bad_prune_spec_globs_are_one_line_errors(overrides, match):
    with pytest.raises(PrunelabError, match=match):  # were a TypeError deep in fnmatch
        PruneSpec(**overrides)


def _batches():
    yield from ()


@pytest.mark.parametrize("missing, match", [
    ("train", r"needs a training loader \(every round trains\) but got NoneType"),
    ("test", r"needs a test loader to evaluate the stages but got NoneType"),
    ("unsized", r"the training loader \(generator\) has no length"),
])
def test_missing_loaders_are_refused_before_anything_is_trained_or_written(tmp_path, missing, match):
    train, test = loaders()
    args = {"train": (None, test), "test": (train, None), "unsized": (_batches(), test)}[missing]
    with pytest.raises(PrunelabError, match=match):  # were TypeErrors, the test one after round 0 had trained
        run_lottery(builder, *args, config(rounds=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    model = build_seeded(builder, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match=match):
        METHODS.get("lottery")(model, *args, PruneSpec(sparsity=0.5, rounds=1), TRAIN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("overrides, match", [
    ({"layer_rates": {"nope": 0.1}}, r"layer_rates pattern 'nope' matches no prunable layer"),
    ({"exclude": ("nope",)}, r"exclude pattern 'nope' matches no Linear/Conv layer"),
])
def test_a_glob_matching_no_layer_leaves_no_run_folder(tmp_path, overrides, match):
    with pytest.raises(PrunelabError, match=match):
        run_lottery(builder, *loaders(), config(rounds=1, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # was: an empty run folder left behind


# --- iterative: the per-round sparsity ---------------------------------------------------------------
def test_iterative_prunes_the_geometric_fraction_exactly_every_round():
    model = build_seeded(builder, 0)  # 2048 + 320 = 2368 weights
    spec = PruneSpec(sparsity=0.875, rounds=3, finetune_epochs=0)  # p = 1/2 per round
    result = METHODS.get("iterative")(model, *loaders(), spec, TRAIN)
    assert [r["target_sparsity"] for r in result.rows] == [0.5, 0.75, 0.875]
    assert [r["kept_weights"] for r in result.rows] == [1184, 592, 296]
    spec = PruneSpec(sparsity=0.875, rounds=3, finetune_epochs=0, allocation="uniform", layer_rates={"5": 0.1})
    result = METHODS.get("iterative")(build_seeded(builder, 0), *loaders(), spec, TRAIN)
    assert {l.name: l.kept for l in result.masks.stats().layers} == {"1.weight": 256, "5.weight": round(320 * 0.9 ** 3)}
    # the free layer prunes p = 1/2 per round: 1024, 512, 256 kept, beside 288, 259, 233 of the fixed one
    assert [r["kept_weights"] for r in result.rows] == [1024 + 288, 512 + 259, 256 + 233]


def test_resume_with_another_rewind_step_names_it_once(tmp_path):
    from prunelab.methods.lottery_folder import check_resume, folder_config

    (tmp_path / "config.json").write_text(json.dumps(folder_config(config(rewind_step=0), "f", 3)))
    with pytest.raises(PrunelabError) as info:
        check_resume(tmp_path, folder_config(config(rewind_step=2), "f", 3))
    message = str(info.value)
    assert "keys that differ: config.rewind_step (0 in the folder, 2 now);" in message
    assert "rewound_rounds_train" not in message  # it follows from rewind_step: an internal key, not a 2nd difference
