"""Bad input on every command: one ``error:`` line on stderr, exit status 2, no traceback, nothing written.

Each case here was found by a sweep of wrong types, ranges, names and paths over the CLI; all run
without training (every refusal comes before any work), so the module stays fast.
"""

from __future__ import annotations

import json
import os

import pytest

from prunelab.bench.models import build_model
from prunelab.checkpoint import save_checkpoint
from prunelab.masks import MaskSet

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNE = ["prune", "--model", "digits_mlp", "--dataset", "digits", "--method", "oneshot", "--pretrain-epochs", "1",
         "--finetune-epochs", "1", "--no-progress"]


def _tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, ds, fs in os.walk(folder) for n in ds + fs)


def _one_line(code: int, err: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ckpt(tmp_path):
    """An untrained digits_mlp checkpoint (no training: save_checkpoint of a masked fresh model)."""
    model = build_model("digits_mlp", (1, 8, 8), 10)
    masks = MaskSet.from_model(model, ["fc1.weight", "fc2.weight"])
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, masks, {"model": "digits_mlp", "dataset": "digits", "input_shape": [1, 8, 8],
                                           "num_classes": 10})
    return folder


# --- argparse's own errors: one line, not the whole usage block (18 lines for prune)
@pytest.mark.parametrize("argv, expected", [
    (["bogus"], "prunelab: argument command: invalid choice: 'bogus'"),
    (["list", "x"], "prunelab: unrecognized arguments: x"),
    (["inspect"], "prunelab inspect: the following arguments are required: checkpoint"),
    ([*PRUNE, "--sparsity", "abc"], "argument --sparsity: expected a number, got 'abc'"),
    ([*PRUNE, "--rounds", "1.5"], "argument --rounds: expected an integer, got '1.5'"),
    ([*PRUNE, "--sparsity", "-inf"], "must be attached: --flag=VALUE"),
    ([*PRUNE, "--layer-rates", "fc1"], "expected NAME=RATE"),
    (["compress", "ckpt"], "the following arguments are required: --out"),
    (["bench-latency", "ckpt", "--pooling", "x"], "invalid choice: 'x'"),
    (["oneshot", "--out", "o"], "the following arguments are required: --model"),
    (["drop-layers", "--model", "minilm", "--count", "abc", "--out", "o"], "--count: expected an integer"),
    (["lottery", "--epochs", "abc"], "--epochs: expected an integer"),
    (["demo", "--seed", "abc"], "--seed: expected an integer"),
])
def test_usage_errors_are_one_line(cli, argv, expected):
    code, out, err = cli(*argv)
    _one_line(code, err, expected, "--help")
    assert out == ""


def test_the_oneshot_module_entry_point_has_the_same_contract(capsys):
    from prunelab.oneshot_cli import main

    code = main(["oneshot", "--out", "o"])
    _one_line(code, capsys.readouterr().err, "required: --model")


# --- numbers torch cannot hold: refused as they are parsed (flags) or before training (--config)
@pytest.mark.parametrize("argv, expected", [
    ([*PRUNE, "--batch-size", "99999999999999999999"], "--batch-size: 99999999999999999999 is too large"),
    ([*PRUNE, "--lr", "1e308"], "--lr: 1e308 is too large (beyond float32"),
    ([*PRUNE, "--finetune-lr", "1e308"], "--finetune-lr: 1e308 is too large"),
    ([*PRUNE, "--weight-decay", "1e308"], "--weight-decay: 1e308 is too large"),
    (["lottery", "--lr", "1e300"], "--lr: 1e300 is too large"),
    (["oneshot", "--model", "minilm", "--seed", "99999999999999999999", "--out", "o"], "--seed: 9999"),
])
def test_numbers_beyond_torch_are_refused(cli, tmp_path, argv, expected):
    code, _, err = cli(*argv, "--out", str(tmp_path / "o")) if argv[0] == "prune" else cli(*argv)
    _one_line(code, err, expected)
    assert not (tmp_path / "o").exists()


def test_config_numbers_beyond_torch_are_refused_before_training(cli, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1.0e+300\n")
    code, out, err = cli(*PRUNE, "--config", str(config), "--out", str(tmp_path / "o"))
    _one_line(code, err, "--lr / lr 1e+300 is too large for torch")
    assert out == "" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 25600000000000 bytes. Error code 12 (Cannot allocate memory)")])
def test_an_allocation_failure_is_one_line(cli, monkeypatch, exc):
    # e.g. bench-latency --batch-sizes 99999999999, prune --rounds 99999999999
    from prunelab import cli_materialise

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(cli_materialise, "_checkpoint_and_inputs", boom)
    code, _, err = cli("bench-latency", "ckpt", "--forms", "csr")
    _one_line(code, err, "out of memory", "pass smaller values")


def test_other_runtime_errors_still_show_their_traceback(cli, monkeypatch):
    from prunelab import cli_materialise

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in prunelab")

    monkeypatch.setattr(cli_materialise, "_checkpoint_and_inputs", bug)
    with pytest.raises(RuntimeError, match="a bug in prunelab"):
        cli("bench-latency", "ckpt", "--forms", "csr")


@pytest.mark.parametrize("command", ["oneshot", "drop-layers"])
def test_seed_range_matches_the_other_commands(cli, tmp_path, command):
    extra = ["--count", "1"] if command == "drop-layers" else []
    code, _, err = cli(command, "--model", "minilm", *extra, "--seed", "-1", "--out", str(tmp_path / "o"))
    _one_line(code, err, "--seed must be an integer in [0, 2**32), got -1")
    assert not (tmp_path / "o").exists()


# --- paths
@pytest.mark.parametrize("name", ["results.json", "report.md", "model.safetensors", "sub/model.plc"])
def test_compress_refuses_an_out_inside_the_checkpoint(cli, ckpt, name):
    (ckpt / "results.json").write_text("{}")
    (ckpt / "report.md").write_text("# run")
    before = {p: (ckpt / p).read_bytes() for p in _tree(ckpt) if (ckpt / p).is_file()}
    code, _, err = cli("compress", str(ckpt), "--out", str(ckpt / name), "--no-progress")
    _one_line(code, err, "is inside the checkpoint", "would overwrite a file of the checkpoint")
    assert {p: (ckpt / p).read_bytes() for p in _tree(ckpt) if (ckpt / p).is_file()} == before


def test_materialise_refuses_an_out_inside_the_checkpoint(cli, ckpt):
    before = _tree(ckpt)
    for source in (ckpt, ckpt / "checkpoint.json"):
        code, _, err = cli("materialise", str(source), "--form", "csr", "--out", str(ckpt / "sub"))
        _one_line(code, err, "is inside the input", "beside it")
    assert _tree(ckpt) == before


@pytest.mark.parametrize("argv", [["materialise", "ckpt", "--form", "csr"], ["oneshot", "--model", "minilm"],
                                  ["drop-layers", "--model", "minilm", "--count", "1"]])
def test_an_empty_out_folder_says_so(cli, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*argv, "--out", "")
    _one_line(code, err, "--out is empty")
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("name", ["model.plc", "results.json"])
def test_inspect_of_a_file_says_it_is_a_file(cli, tmp_path, name):
    (tmp_path / name).write_text("x")
    code, _, err = cli("inspect", str(tmp_path / name))
    _one_line(code, err, "is a file, not a checkpoint folder")


@pytest.mark.parametrize("argv", [["materialise", "{ckpt}", "--form", "csr", "--out", "{tmp}/m"],
                                  ["bench-latency", "{ckpt}", "--forms", "csr", "--reps", "1", "--batch-sizes", "1"],
                                  ["compress", "{ckpt}", "--out", "{tmp}/m.plc", "--no-progress"]])
@pytest.mark.parametrize("dataset", [None, 3])
def test_a_checkpoint_without_a_dataset_is_one_line(cli, tmp_path, ckpt, argv, dataset):
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta.pop("dataset") if dataset is None else meta.update(dataset=dataset)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    code, _, err = cli(*(a.format(ckpt=ckpt, tmp=tmp_path) for a in argv))
    _one_line(code, err, "names no 'dataset'", "re-create the checkpoint")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.plc").exists()


@pytest.mark.parametrize("argv", [["materialise", "{ckpt}", "--form", "csr", "--out", "{tmp}/m"],
                                  ["bench-latency", "{ckpt}", "--forms", "csr", "--reps", "1", "--batch-sizes", "1"],
                                  ["compress", "{ckpt}", "--out", "{tmp}/m.plc", "--no-progress"]])
def test_data_dir_for_a_fileless_dataset_is_refused_not_ignored(cli, tmp_path, ckpt, argv):
    code, _, err = cli(*(a.format(ckpt=ckpt, tmp=tmp_path) for a in argv), "--data-dir", str(tmp_path / "nosuch"))
    _one_line(code, err, "would be ignored", "drop --data-dir")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.plc").exists()


@pytest.mark.parametrize("forms", ["", ",", " , "])
def test_bench_latency_with_no_forms_is_refused(cli, forms):
    code, out, err = cli("bench-latency", "ckpt", "--forms", forms)
    _one_line(code, err, "--forms names no form")
    assert out == ""


@pytest.mark.parametrize("text", ["[1]", "3", '"x"'])
def test_lottery_resume_of_a_config_that_is_no_object(cli, tmp_path, text):
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "config.json").write_text(text)
    code, _, err = cli("lottery", "--model", "digits_mlp", "--dataset", "digits", "--epochs", "1", "--rounds", "1",
                       "--no-progress", "--resume", str(tmp_path / "lr"))
    _one_line(code, err, "not a lottery run config")
    assert _tree(tmp_path / "lr") == ["config.json"]


def test_real_process_usage_error_is_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "prunelab.cli", "prune", "--sparsity", "abc"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stdout == ""
    _one_line(result.returncode, result.stderr, "--sparsity: expected a number")
