"""``prunelab lottery``: rounds table, run folder + checkpoint, resume, refusals (digits, seconds)."""

import json

import pytest
import torch

from prunelab.checkpoint import load_checkpoint
from prunelab.cli import main
from prunelab.masks import MaskSet

FAST = ["--model", "digits_mlp", "--dataset", "digits", "--epochs", "1", "--eval-every", "10", "--no-progress"]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    out = tmp_path_factory.mktemp("lottery") / "run"
    assert main(["lottery", *FAST, "--rounds", "2", "--out", str(out)]) == 0
    return out


def test_lottery_writes_rounds_and_a_loadable_checkpoint(two_rounds):
    rounds = json.loads((two_rounds / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # F&C rates: hidden layers lose 20% of their remaining weights per round, the output layer 10%
    layers = rounds[2]["layers_remaining_pct"]
    assert layers["fc1.weight"] == pytest.approx(100 * round(8192 * 0.8**2) / 8192)
    assert layers["fc3.weight"] == pytest.approx(100 * round(640 * 0.9**2) / 640)
    assert rounds[1]["reinit"] is not None and rounds[0]["reinit"] is None
    ckpt = load_checkpoint(two_rounds)  # the last ticket, masked weights real zeros
    last = MaskSet.load(two_rounds / "round_002" / "mask.safetensors")
    params = dict(ckpt.model.named_parameters())
    for name in last:
        assert torch.equal(ckpt.masks[name], last[name])
        assert not bool(params[name][~last[name]].any())


def test_resume_continues_after_the_last_round_and_keeps_finished_ones(cli, two_rounds, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rounds, run)
    before = (run / "round_001" / "weights.safetensors").read_bytes()
    code, out, _ = cli("lottery", *FAST, "--rounds", "3", "--resume", str(run))
    assert code == 0 and "3 finished rounds read back from the folder, 1 trained now" in out
    assert (run / "round_003" / "metrics.json").is_file()
    assert (run / "round_001" / "weights.safetensors").read_bytes() == before  # finished rounds untouched


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "2", "--rate", "0.3"], "config.rate (0.2 in the folder, 0.3 now)"),
])
def test_resume_refuses_another_config(cli, two_rounds, argv, message):
    code, _, err = cli("lottery", *FAST, *argv, "--resume", str(two_rounds))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_refusals_are_one_line_errors(cli, two_rounds, tmp_path):
    code, _, err = cli("lottery", *FAST, "--out", str(two_rounds))
    assert code == 2 and f"pass --resume {two_rounds}" in err
    code, _, err = cli("lottery", *FAST, "--resume", str(tmp_path))
    assert code == 2 and "holds no lottery run" in err
    code, _, err = cli("lottery", *FAST, "--rewind-iter", "9999", "--out", str(tmp_path / "r"))
    assert code == 2 and "past the end of training" in err and not (tmp_path / "r" / "config.json").exists()
    code, _, err = cli("lottery", *FAST, "--model", "nope", "--out", str(tmp_path / "m"))
    assert code == 2 and "valid names" in err


def test_resume_from_a_damaged_round_is_a_one_line_error(cli, two_rounds, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rounds, run)
    weights = run / "round_002" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:7])  # an interrupted copy
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = cli("lottery", *FAST, "--rounds", "3", "--resume", str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"lottery run file '{weights}' is damaged" in err and f"delete '{run / 'round_002'}'" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten
    shutil.rmtree(run / "round_002")  # what the message says: round 2 is redone, rounds 0 and 1 are reused
    code, out, _ = cli("lottery", *FAST, "--rounds", "2", "--resume", str(run))
    assert code == 0 and "2 finished rounds read back from the folder, 1 trained now" in out
    assert (run / "round_001" / "weights.safetensors").read_bytes() == before[run / "round_001" / "weights.safetensors"]


def test_prune_with_the_lottery_method_refuses_options_it_ignores(cli, tmp_path):
    code, out, err = cli("prune", "--method", "lottery", "--granularity", "channel", "--pretrain-epochs", "0",
                         "--rounds", "2", "--sparsity", "0.5", "--no-progress", "--out", str(tmp_path / "p"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "lottery tickets prune single weights, got granularity 'channel'; pass --granularity unstructured" in err
    assert not (tmp_path / "p").exists()


def test_lottery_refuses_an_empty_out_or_resume(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flag in ("--out", "--resume"):
        code, out, err = cli("lottery", *FAST, "--rounds", "1", flag, "")
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert f"{flag} is empty; name the run folder" in err
    assert not (tmp_path / "runs").exists()  # it did not quietly run into runs/lottery


def test_lottery_out_that_is_a_file_says_so(cli, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    code, _, err = cli("lottery", *FAST, "--rounds", "1", "--out", str(blocker))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"run folder '{blocker}' is a file; choose a new folder for --out" in err
    assert blocker.read_text() == "keep me"


def test_resume_with_fewer_rounds_than_finished_is_refused(cli, tmp_path, two_rounds):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rounds, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = cli("lottery", *FAST, "--rounds", "1", "--resume", str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "already holds rounds up to 2, but --rounds is 1" in err and "pass --rounds 2 or more" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the last ticket is still round 2's


@pytest.mark.parametrize("flag, value, message", [
    ("--rounds", "-1", "--rounds must be an integer >= 0, got -1"),
    ("--epochs", "0", "--epochs must be an integer >= 1 (a ticket is found by training), got 0"),
    ("--eval-every", "0", "--eval-every must be an integer >= 1, got 0"),
    ("--rewind-iter", "-2", "--rewind-iter must be an integer >= 0, got -2"),
])
def test_lottery_bad_numbers_name_the_flag(cli, tmp_path, flag, value, message):
    code, _, err = cli("lottery", *FAST, flag, value, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prune_refuses_to_replace_a_lottery_run_folder(cli, two_rounds, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rounds, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = cli("prune", "--model", "digits_mlp", "--dataset", "digits", "--method", "oneshot",
                         "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress", "--out", str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"--out {str(run)!r} holds a lottery run (written by prunelab lottery) (config.json, round_000, " in err
    assert "choose a new or empty folder for --out" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing deleted or rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left beside it


def test_out_and_resume_naming_one_folder_differently_is_accepted(cli, two_rounds, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(two_rounds, tmp_path / "runs" / "x")
    monkeypatch.chdir(tmp_path)
    for out_flag, resume_flag in (("runs/x", str(tmp_path / "runs" / "x")), ("runs/../runs/x", "./runs/x")):
        code, out, err = cli("lottery", *FAST, "--rounds", "2", "--out", out_flag, "--resume", resume_flag)
        assert code == 0, err
        assert "3 finished rounds read back from the folder, 0 trained now" in out
    code, _, err = cli("lottery", *FAST, "--rounds", "2", "--out", "runs/y", "--resume", "runs/x")
    assert code == 2 and "name different folders" in err  # really different folders stay refused


@pytest.mark.parametrize("command", [
    ["materialise", "{run}", "--form", "csr"],
    ["oneshot", "--model", "{tiny_bert}", "--method", "magnitude", "--calib-samples", "2", "--no-progress"],
])
def test_other_commands_refuse_to_replace_a_lottery_run_folder(cli, two_rounds, tmp_path, tiny_bert, command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rounds, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    argv = [part.format(run=two_rounds, tiny_bert=tiny_bert) for part in command]
    code, out, err = cli(*argv, "--out", str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"--out {str(run)!r} holds a lottery run (written by prunelab lottery) (" in err
    assert f"not an earlier {command[0]} output; {command[0]} replaces its whole --out folder" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing deleted or rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left beside it


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "/tmp"], "--data-dir /tmp would be ignored: --dataset digits is bundled with scikit-learn and "
                             "reads no files; drop --data-dir"),
    (["--download"], "--download would be ignored: --dataset digits is bundled with scikit-learn and reads no files; "
                     "drop --download"),
])
def test_lottery_refuses_file_options_of_a_fileless_dataset_as_prune_does(cli, tmp_path, argv, message):
    code, out, err = cli("lottery", *FAST, "--rounds", "1", *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()  # refused before any training
    code, _, prune_err = cli("prune", "--model", "digits_mlp", "--dataset", "digits", *argv, "--out",
                             str(tmp_path / "p"))
    assert code == 2 and prune_err == err  # the same check, the same words


def test_rounds_past_the_round_that_empties_every_layer_are_refused_before_training(cli, tmp_path):
    import time

    started = time.perf_counter()  # was: ran for ever, one identical empty round folder after another
    # fc3 (640 weights, 10% a round) is the last to empty: round(640 * 0.9**68) == 0 < round(640 * 0.9**67)
    code, out, err = cli("lottery", *FAST, "--rounds", "1000000000", "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert ("--rounds 1,000,000,000: by round 68 every pruned layer of digits_mlp has no weight left (--rate 0.2 / "
            "--output-rate 0.1 of the remaining weights pruned per round), so later rounds would retrain the same "
            "empty mask; pass --rounds 68 or fewer") in err
    assert time.perf_counter() - started < 5.0 and not (tmp_path / "o").exists()
    code, _, err = cli("lottery", *FAST, "--rounds", "3", "--rate", "0", "--output-rate", "0", "--out", str(tmp_path / "o"))
    assert code == 2 and "--rate 0 / --output-rate 0 prune nothing, so every round would retrain round 0's dense mask" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n, rate", [(8192, 0.2), (640, 0.1), (1, 0.2), (2, 0.5), (3, 0.999), (10**6, 1e-3), (5, 0.0)])
def test_the_empty_round_is_the_first_round_keeping_no_weight(n, rate):
    from prunelab.cli_lottery import empty_round

    limit = empty_round({"w": n}, {"w": rate})
    if rate == 0.0:
        assert limit is None
        return
    keep = [round(n * (1.0 - rate) ** r) for r in range(limit + 1)]  # what methods.lottery keeps in round r
    assert keep[-1] == 0 and (limit == 0 or keep[-2] > 0)
