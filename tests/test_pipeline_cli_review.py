"""Review of ``prunelab prune`` / ``demo`` and the pipeline behind them, as a demanding user checks it.

Reported numbers against independent recomputation (hand-counted masks, the checkpoint evaluated
again, the costs measured again), bit-identical reruns, the config hash, the refusals of bad input
and what a failed or interrupted run leaves behind.  Every run is a digits_mlp on the bundled digits
with at most one training epoch, so the module takes a few seconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunelab import pipeline
from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.training import evaluate
from prunelab.checkpoint import load_checkpoint
from prunelab.cli import _scalar_type, build_parser
from prunelab.config import FLOAT_FIELDS, RunConfig, config_from_mapping
from prunelab.measure.counting import measure_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--model", "digits_mlp", "--dataset", "digits", "--method", "oneshot", "--sparsity", "0.5",
         "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress"]
DIGITS_WEIGHTS = 128 * 64 + 64 * 128 + 10 * 64  # fc1, fc2, fc3 of the 64-128-64-10 MLP: 17,024


def _tree(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, files in os.walk(folder) for n in files}


def _one_line_error(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``(folder, record, stdout)`` of one quick oneshot run to 50%."""
    from prunelab.cli import main
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("quick") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["prune", *QUICK, "--out", str(folder)]) == 0
    return folder, json.loads((folder / "results.json").read_text()), stdout.getvalue()


# --- reported numbers = independent recomputation -----------------------------------------------
def test_achieved_sparsity_is_the_hand_count_of_the_saved_masks(quick_run):
    folder, record, _ = quick_run
    masks = load_file(str(folder / "masks.safetensors"))
    assert sorted(masks) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert total == DIGITS_WEIGHTS
    assert kept == DIGITS_WEIGHTS // 2 == 8512  # 50% of 17,024 is exact: no rounding
    assert record["achieved_sparsity"] == 0.5 == record["target_sparsity"]
    weights = load_file(str(folder / "model.safetensors"))
    for name, mask in masks.items():  # pruned weights are real zeros, kept ones are not
        assert torch.all(weights[name][~mask] == 0)
    assert record["pruned"]["cost"]["weight_nonzeros"] == 8512


def test_reported_accuracy_and_costs_equal_the_saved_checkpoint_evaluated_again(quick_run):
    folder, record, _ = quick_run
    ckpt = load_checkpoint(folder)
    splits = load_dataset("digits")
    _, test_loader = make_loaders(splits, 64, 0)
    again = evaluate(ckpt.model, test_loader)
    assert again["accuracy"] == record["pruned"]["accuracy"]
    assert again["loss"] == record["pruned"]["loss"]
    assert again["n"] == record["pruned"]["n"] == 360
    cost = measure_model(ckpt.model, splits.test[0][0].unsqueeze(0), ckpt.masks).to_dict()
    assert cost == record["pruned"]["cost"]
    assert record["dense"]["cost"]["params"] == 17226 and record["dense"]["cost"]["dense_flops"] == 2 * DIGITS_WEIGHTS


def test_printed_stage_table_is_the_json_record(quick_run):
    _, record, stdout = quick_run
    rows = [line for line in stdout.splitlines() if line.startswith("| dense ") or line.startswith("| pruned ")]
    stage_rows = rows[:len(record["stages"])]
    for line, stage in zip(stage_rows, record["stages"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == stage["stage"]
        assert float(cells[3]) == pytest.approx(stage["error_pct"], abs=0.005)  # 2 decimals
        assert float(cells[4]) == pytest.approx(stage["accuracy"], rel=1e-3)  # 4 significant digits
    assert "target sparsity 0.5000, achieved 0.5000" in stdout


# --- reproducibility -----------------------------------------------------------------------------
def test_same_seed_is_bit_identical_and_another_seed_differs(tmp_path):
    def run(seed, name):
        config = config_from_mapping({"method": "oneshot", "sparsity": 0.5, "pretrain_epochs": 1,
                                      "finetune_epochs": 1, "progress": False, "seed": seed,
                                      "out": str(tmp_path / name)})
        record = pipeline.run(config)
        return record, load_file(str(tmp_path / name / "masks.safetensors")), \
            load_file(str(tmp_path / name / "model.safetensors"))

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s", "config")}  # noqa: E731
    assert strip(first[0]) == strip(again[0])
    for a, b in ((first[1], again[1]), (first[2], again[2])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(first[1][k], other[1][k]) for k in first[1])
    assert first[0]["config_hash"] != other[0]["config_hash"]


# --- the config hash (OpenLTH run folders) ---------------------------------------------------------
def test_hash_ignores_key_order_output_and_progress_but_not_results():
    a = config_from_mapping(yaml.safe_load("method: oneshot\nsparsity: 0.5\nlr: 0.1\n"))
    b = config_from_mapping(yaml.safe_load("lr: 0.1\nsparsity: 0.5\nmethod: oneshot\nprogress: false\nout: x\n"))
    assert a.digest() == b.digest()
    assert a.out_dir().name == f"digits_mlp-oneshot-{a.digest()}"
    assert RunConfig().digest() == RunConfig(sparsity=0.9).digest()  # the resolved default
    assert len({RunConfig(seed=s).digest() for s in range(5)}) == 5
    assert RunConfig(lr=0.1).digest() != RunConfig(lr=0.2).digest()


def test_hash_of_an_int_valued_float_option_equals_the_yaml_and_cli_spelling():
    # RunConfig(lr=1) (Python) and 'lr: 1' (YAML, made 1.0) / '--lr 1' (a float flag) are one run:
    # the hash differed, so the same run landed in two folders
    from_yaml = config_from_mapping({"lr": 1, "weight_decay": 0, "layer_rates": {"fc3": 0}, "method": "iterative"})
    from_api = RunConfig(lr=1, weight_decay=0, layer_rates={"fc3": 0}, method="iterative")
    assert from_api.digest() == from_yaml.digest()
    assert RunConfig(momentum=0).digest() == RunConfig(momentum=0.0).digest()


def test_float_fields_of_the_hash_are_every_float_typed_field():
    floats = {f.name for f in fields(RunConfig) if _scalar_type(f.type) is float}
    assert floats == set(FLOAT_FIELDS)


def test_hash_ignores_the_order_and_repeats_of_exclude_globs():
    assert RunConfig(exclude=("fc1", "fc3")).digest() == RunConfig(exclude=("fc3", "fc1", "fc3")).digest()
    assert RunConfig(exclude=("fc1",)).digest() != RunConfig(exclude=("fc3",)).digest()
    assert RunConfig().digest() == "5df1efbd97"  # default folders keep their names


# --- bad input: one line, exit 2, nothing written -------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--method", "snip", "--epochs", "0"], "--epochs must be >= 1 with --method snip"),
    (["--method", "lottery", "--epochs", "0"], "--epochs must be >= 1 with --method lottery"),
    (["--method", "pai", "--epochs", "0"], "--epochs must be >= 1 with --method pai"),
])
def test_epochs_0_of_a_from_scratch_method_is_refused(cli, tmp_path, monkeypatch, extra, expected):
    # before: snip / pai / lottery with --epochs 0 reported the untrained init as the pruned result
    # (about 90% error), while set / rigl / static and 'prunelab lottery --epochs 0' refused
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("prune", "--no-progress", *extra)
    _one_line_error(code, err, expected)
    assert out == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, expected", [
    (["--method", "nope"], "valid names: dsr, force, gradual"),
    (["--criterion", "nope"], "valid names: apoz, grasp, l1"),
    (["--granularity", "nope"], "valid names: channel, kernel, neuron, nm, unstructured, vector"),
    (["--allocation", "nope"], "valid names: erk, global, lamp, uniform"),
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity=-0.1"], "sparsity must be in [0, 1)"),
    (["--sparsity", "abc"], "argument --sparsity: expected a number, got 'abc'"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--dataset", "mnist", "--data-dir", "."], "MNIST file 'train-images-idx3-ubyte.gz' not found in '.'"),
    (["--out", "a_file"], "output path 'a_file' is a file"),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("mine")
    code, out, err = cli("prune", *QUICK, *extra)
    _one_line_error(code, err, expected)
    assert sorted(os.listdir(tmp_path)) == ["a_file"] and (tmp_path / "a_file").read_text() == "mine"


def test_a_run_refused_late_leaves_no_empty_runs_folder(cli, tmp_path, monkeypatch):
    # rigl's schedule (delta T=100 > 46 steps) is checked once the run has created runs/ for its
    # default output folder: before, a bare runs/ was left behind
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("prune", "--method", "rigl", "--epochs", "2", "--no-progress")
    _one_line_error(code, err, "delta T=100 exceeds the run's 46 steps")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_mid_training_leaves_no_folder_behind(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()  # an existing folder above --out stays, even when empty

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train", interrupted)
    code, _, err = cli("prune", *QUICK, "--out", "keep/new/run")
    assert code == 130 and err.strip() == "interrupted"
    assert sorted(os.listdir(tmp_path)) == ["keep"] and os.listdir(tmp_path / "keep") == []


def test_ctrl_c_while_writing_keeps_the_previous_output_whole(cli, tmp_path, monkeypatch, quick_run):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(quick_run[0], folder)
    before = _tree(folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "plot_sparsity_curve", interrupted)  # the last file written
    code, _, err = cli("prune", *QUICK, "--seed", "3", "--out", str(folder))
    assert code == 130 and err.strip() == "interrupted"
    assert _tree(folder) == before
    assert os.listdir(tmp_path) == ["run"]  # no temporary sibling left


# --- labels and help ----------------------------------------------------------------------------------
def test_a_run_without_dense_training_labels_the_dense_row_untrained(tmp_path):
    # before: --pretrain-epochs 0 printed the untrained init as "dense" (about 90% error)
    config = config_from_mapping({"method": "oneshot", "sparsity": 0.5, "pretrain_epochs": 0, "finetune_epochs": 0,
                                  "progress": False, "out": str(tmp_path / "run")})
    record = pipeline.run(config)
    assert record["pretrain_epochs_run"] == 0
    assert record["stages"][0]["stage"] == "dense at init"
    assert record["dense_label"] == "dense at init (untrained)"
    assert "| dense at init (untrained) |" in (tmp_path / "run" / "report.md").read_text()


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


def test_prune_help_shows_defaults_and_the_flag_syntax_of_layer_rates():
    text = _help("prune")
    text = text[text.index("options:"):]  # the option descriptions, not the usage line
    for flag, default in (("--rounds ROUNDS", "5"), ("--pretrain-epochs PRETRAIN_EPOCHS", "30"),
                          ("--method METHOD", "iterative"), ("--lr LR", "0.05"), ("--batch-size BATCH_SIZE", "64")):
        start = text.index(flag)
        assert f"(default: {default})" in text[start:text.index(" --", start + len(flag))], flag
    assert "fc3=0.1" in text  # the flag's own syntax, not only YAML's {fc3: 0.1}
    assert "(default: on)" in text[text.index("--progress, --no-progress"):]
    demo = _help("demo")
    assert "random seed (default: 0)" in demo and "show progress bars (default: on)" in demo


def test_an_nm_run_with_a_dense_kept_layer_says_why_achieved_is_below_the_pattern(tmp_path, capsys):
    from prunelab.cli import main

    args = ["prune", "--model", "digits_mlp", "--dataset", "digits", "--method", "oneshot", "--granularity", "2:4",
            "--keep-last", "dense", "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    # fc1 and fc2 at exactly 1/2, fc3 (640 weights) dense: (8192 + 8192) / 2 / 17,024 = 0.48120
    assert ("target sparsity 0.5000, achieved 0.4812 (layers kept dense by --keep-last count at 0%; every other "
            "layer is exactly 1 - N/M sparse)") in capsys.readouterr().out


def test_a_global_neuron_threshold_that_all_but_removes_a_layer_is_warned_about():
    from prunelab.cli import _lopsided_global_note

    def record(allocation: str, sparsities: list[float], **config) -> dict:
        layers = [{"name": f"fc{i + 1}.weight", "total": 100, "sparsity": s} for i, s in enumerate(sparsities)]
        return {"config": {"allocation": allocation, "granularity": "neuron", **config}, "target_sparsity": 0.5,
                "layers": layers}

    note = _lopsided_global_note(record("global", [0.997, 0.2, 0.0]))  # fc3: kept dense by the neuron default
    assert note == ("warning: the global threshold left fc1.weight 99.7% sparse while fc2.weight is 20.0%: neuron "
                    "scores are norms over the group, which grow with the fan-in, so one threshold favours wide "
                    "layers; --allocation uniform or lamp keeps every layer in play")
    assert _lopsided_global_note(record("uniform", [0.997, 0.2, 0.0])) is None
    assert _lopsided_global_note(record("global", [0.9, 0.2, 0.0])) is None  # no layer all but removed
    assert _lopsided_global_note(record("global", [0.997, 0.4, 0.0])) is None  # the other keeps less than 1 - s/2
    assert _lopsided_global_note(record("global", [0.997, 0.2], keep_last="none")) is not None


def test_the_lopsided_warning_goes_to_stderr_of_a_real_run(tmp_path, capsys):
    from prunelab.cli import main

    args = ["prune", "--model", "lenet300", "--dataset", "digits", "--method", "oneshot", "--granularity", "neuron",
            "--sparsity", "0.5", "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "global")]) == 0
    assert "warning: the global threshold left fc1.weight" in capsys.readouterr().err
    assert main([*args, "--allocation", "uniform", "--out", str(tmp_path / "uniform")]) == 0
    assert "warning" not in capsys.readouterr().err
