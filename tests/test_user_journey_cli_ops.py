"""User journey: an MLOps engineer who drives prunelab only through the CLI and config files.

What a script around ``prunelab`` relies on: the same config gives the same masks and numbers
again, in the folder named by its hash (``runs/<model>-<method>-<hash>``); a YAML config and
the equivalent flags are one run; ``lottery --resume`` continues exactly where a run stopped;
every refusal is exit status 2 with one ``error:`` line on stderr, nothing on stdout and no
file written; records are strict JSON whose numbers agree with the printed tables; stdout
holds the tables and progress goes to stderr.  Behaviour that does not hold is written as the
expected behaviour and marked ``xfail(strict=True)``.

Every run is the digits MLP on the bundled 8x8 digits with at most one epoch, in-process
(``prunelab.cli.main``), except one real process that checks the pipes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from prunelab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# oneshot magnitude to 50% after one dense epoch, one fine-tune epoch: the same run spelled three ways
QUICK_YAML = "method: oneshot\nsparsity: 0.5\npretrain_epochs: 1\nfinetune_epochs: 1\n"
QUICK_FLAGS = ["--method", "oneshot", "--sparsity", "0.5", "--pretrain-epochs", "1", "--finetune-epochs", "1"]
NO_TRAIN = ["--method", "oneshot", "--sparsity", "0.5", "--pretrain-epochs", "0", "--finetune-epochs", "0",
            "--no-progress"]
LOTTERY = ["lottery", "--model", "digits_mlp", "--dataset", "digits", "--epochs", "1", "--eval-every", "20",
           "--no-progress"]
RUN_FILES = ["checkpoint.json", "masks.safetensors", "model.safetensors", "report.md", "results.json",
             "sparsity_curve.png"]
# fc1 128x64, fc2 64x128, fc3 10x64 weights + 128 + 64 + 10 biases
WEIGHTS, BIASES = 128 * 64 + 64 * 128 + 10 * 64, 128 + 64 + 10
PROGRESS_LINE = re.compile(r"^[\w ()-]+: \d+/\d+ \(\d+%\) \d+\.\d s(, loss=\d+\.\d{4})?$")


def _call(argv: list[str]) -> tuple[int, str, str]:
    """``prunelab argv`` in this process: (exit status, stdout, stderr); stderr is not a terminal."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _tree(folder: Path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), folder): Path(d, n).read_bytes()
            for d, _, names in os.walk(folder) for n in names}


def _listing(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, names in os.walk(folder)
                  for n in dirs + names)


def _tensors(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def _same_masks(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _run_folder(stdout: str) -> str:
    """The checkpoint folder the last stdout line names: 'results: ...; checkpoint: DIR/'."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: ") and last.endswith("/"), last
    return last.rsplit("checkpoint: ", 1)[1].rstrip("/")


def _table(stdout: str, header_start: str) -> list[dict[str, str]]:
    """The markdown table of ``stdout`` whose header row starts with ``header_start``, as dicts of cells."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def _printed(cell: str, value: float) -> bool:
    """Whether ``cell`` is ``value`` as the tables print it: >= 1000 whole, >= 1 two decimals, else 4 digits."""
    got = _num(cell)
    if abs(value) >= 999.995:
        return abs(got - value) <= 0.5
    if abs(value) >= 0.99995:
        return abs(got - value) <= 0.005 + 1e-9
    return got == pytest.approx(value, rel=5e-4, abs=1e-12)


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """One config run twice into its default folder: first from ``run.yaml`` (progress on, to a non-terminal
    stderr), then from the equivalent flags with ``--no-progress``; each run's files are kept as bytes."""
    home = tmp_path_factory.mktemp("ops")
    (home / "run.yaml").write_text(QUICK_YAML)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        first = _call(["prune", "--config", "run.yaml"])
        folder = home / _run_folder(first[1])
        first_files = _tree(folder)
        again = _call(["prune", *QUICK_FLAGS, "--no-progress"])
        runs = sorted(os.listdir(home / "runs"))
    return dict(home=home, folder=folder, first=first, again=again, first_files=first_files,
                again_files=_tree(folder), runs=runs, record=_strict_json(folder / "results.json"))


# --- reproducibility and the hash-named run folder -------------------------------------------------------
def test_config_file_and_flags_are_one_run_in_the_folder_named_by_its_hash(twice):
    (code1, out1, _), (code2, out2, _) = twice["first"], twice["again"]
    assert code1 == 0 and code2 == 0
    record = twice["record"]
    name = f"digits_mlp-oneshot-{record['config_hash']}"
    assert re.fullmatch(r"[0-9a-f]{10}", record["config_hash"])
    assert _run_folder(out1) == _run_folder(out2) == f"runs/{name}"
    assert twice["runs"] == [name]  # the re-run replaced its own folder, it did not start a second one
    assert sorted(twice["again_files"]) == RUN_FILES
    first = json.loads(twice["first_files"]["results.json"])
    assert first["config_hash"] == record["config_hash"]
    # the hash ignores progress and out; the configs differ only there
    diff = {k for k in first["config"] if first["config"][k] != record["config"][k]}
    assert diff == {"progress"} and first["config"]["progress"] is True and record["config"]["progress"] is False


def test_the_same_config_twice_gives_bit_identical_masks_weights_and_numbers(twice):
    a, b = twice["first_files"], twice["again_files"]
    assert _same_masks(_tensors(a["masks.safetensors"]), _tensors(b["masks.safetensors"]))
    assert a["model.safetensors"] == b["model.safetensors"]  # byte for byte
    first, again = json.loads(a["results.json"]), twice["record"]
    keep = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s", "config")}  # noqa: E731
    assert keep(first) == keep(again)
    # the printed tables are identical too, but for the wall time
    strip = lambda out: re.sub(r"wall time [\d.]+ s", "wall time T s", out)  # noqa: E731
    assert strip(twice["first"][1]) == strip(twice["again"][1])


def test_yaml_lists_and_mappings_equal_their_flag_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text("method: iterative\nrounds: 1\nsparsity: 0.5\npretrain_epochs: 0\nfinetune_epochs: 0\n"
                              "exclude: fc1\nlayer_rates: {fc3: 0.1}\nprogress: false\n")
    code1, out1, _ = _call(["prune", "--config", "r.yaml"])
    code2, out2, _ = _call(["prune", "--method", "iterative", "--rounds", "1", "--sparsity", "0.5",
                            "--pretrain-epochs", "0", "--finetune-epochs", "0", "--exclude", "fc1",
                            "--layer-rates", "fc3=0.1", "--no-progress"])
    assert code1 == code2 == 0 and _run_folder(out1) == _run_folder(out2)
    masks = load_file(os.path.join(_run_folder(out1), "masks.safetensors"))
    assert sorted(masks) == ["fc2.weight", "fc3.weight"]  # fc1 excluded, as asked in both spellings
    assert int(masks["fc3.weight"].sum()) == 576  # fc3's own rate: 10% of 640 removed in the one round


# --- pipes: tables on stdout, progress on stderr ---------------------------------------------------------
def test_stdout_holds_only_the_tables_and_progress_goes_to_stderr(twice):
    _, out, err = twice["first"]
    for line in out.splitlines():
        assert line == "" or line.startswith("| ") or line.startswith("target sparsity ") \
            or line.startswith("results: "), line
    lines = err.splitlines()
    assert "\r" not in err and lines, "progress on, stderr not a terminal: plain progress lines"
    assert all(PROGRESS_LINE.match(line) for line in lines), lines
    assert {line.split(":")[0] for line in lines} == {"dense", "fine-tune"}
    assert twice["again"][2] == ""  # --no-progress: quiet


def test_a_real_process_in_a_pipe_exits_0_with_tables_on_stdout(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, "-m", "prunelab", "prune", "--method", "oneshot", "--sparsity", "0.5",
                           "--pretrain-epochs", "0", "--finetune-epochs", "1", "--out", "piped"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _run_folder(done.stdout) == "piped" and sorted(os.listdir(tmp_path / "piped")) == RUN_FILES
    assert "fine-tune:" not in done.stdout and "Traceback" not in done.stderr
    progress = done.stderr.splitlines()
    assert progress and all(PROGRESS_LINE.match(line) for line in progress), progress
    record = _strict_json(tmp_path / "piped" / "results.json")
    assert f"achieved {record['achieved_sparsity']:.4f}" in done.stdout


# --- records: strict JSON, units in the keys, numbers = the printed tables ----------------------------------
def test_results_json_is_strict_json_with_units_in_its_keys(twice):
    record = twice["record"]
    assert {"config", "config_hash", "environment", "wall_time_s", "dense", "pruned", "target_sparsity",
            "achieved_sparsity", "stages", "layers"} <= set(record)
    assert record["wall_time_s"] > 0 and record["environment"]["torch"]
    for part in ("dense", "pruned"):
        assert {"accuracy", "error_pct", "loss", "n", "cost"} <= set(record[part])
        assert record[part]["error_pct"] == pytest.approx(100 * (1 - record[part]["accuracy"]))
        sizes = [k for k in record[part]["cost"] if "size" in k]
        assert sizes and all(k.endswith("_bytes") for k in sizes), sizes
    for stage in record["stages"]:
        assert stage["error_pct"] == pytest.approx(100 * (1 - stage["accuracy"]))
    assert record["achieved_sparsity"] == 0.5 == record["target_sparsity"]


def test_printed_summary_table_is_the_record_and_the_hand_count(twice):
    record = twice["record"]
    rows = {r["model"]: r for r in _table(twice["again"][1], "| model ")}
    assert sorted(rows) == ["dense", "pruned"]
    masks = load_file(str(twice["folder"] / "masks.safetensors"))
    kept = {name: int(m.sum()) for name, m in masks.items()}
    assert sum(kept.values()) == WEIGHTS // 2
    # independent sizes: fp32 values (+bias); CSR adds an int32 column index per value and rows + 1 row pointers,
    # a bitmap one bit per weight; the report takes the smaller per layer
    best = 0
    for name, mask in masks.items():
        rows_, cols = mask.shape
        values = 4 * (kept[name] + rows_)  # kept weights + the layer's bias
        best += min(values + 4 * kept[name] + 4 * (rows_ + 1), values + rows_ * cols // 8)
    expected = {
        "dense": (record["dense"]["error_pct"], 0.0, WEIGHTS + BIASES, 2 * WEIGHTS, 4 * (WEIGHTS + BIASES) / 1000,
                  record["dense"]["cost"]["size_best_sparse_bytes"] / 1000),
        "pruned": (record["pruned"]["error_pct"], 50.0, WEIGHTS // 2 + BIASES, WEIGHTS, 4 * (WEIGHTS + BIASES) / 1000,
                   best / 1000),
    }
    columns = ("test error %", "sparsity %", "nonzero params", "FLOPs / sample", "fp32 dense KB",
               "sparse KB (best of CSR/bitmap)")
    for model, values in expected.items():
        for column, value in zip(columns, values):
            assert _printed(rows[model][column], value), (model, column, rows[model][column], value)
    assert record["pruned"]["cost"]["size_best_sparse_bytes"] == best
    assert record["pruned"]["error_pct"] == record["stages"][-1]["error_pct"]  # the fine-tuned model
    assert _table(twice["again"][1], "| model ") == _table((twice["folder"] / "report.md").read_text(), "| model ")


def test_inspect_table_agrees_with_the_masks_and_the_record(twice):
    code, out, err = _call(["inspect", str(twice["folder"])])
    assert code == 0 and err == ""
    rows = {r["layer"]: r for r in _table(out, "| layer ")}
    masks = load_file(str(twice["folder"] / "masks.safetensors"))
    for layer in twice["record"]["layers"]:
        row = rows[layer["name"]]
        assert _num(row["kept (mask)"]) == layer["kept"] == int(masks[layer["name"]].sum())
        assert _num(row["nonzero (weights)"]) == layer["kept"]  # pruned weights are stored as zeros
        assert _printed(row["sparsity %"], 100 * layer["sparsity"])
    assert _num(rows["total"]["kept (mask)"]) == WEIGHTS // 2 and rows["total"]["sparsity %"] == "50.00"


def test_materialise_table_equals_its_json_and_the_runs_layers(twice, tmp_path):
    code, out, err = _call(["materialise", str(twice["folder"]), "--form", "csr", "--out", str(tmp_path / "csr")])
    assert code == 0 and err == ""
    meta = _strict_json(tmp_path / "csr" / "materialised.json")
    rows = _table(out, "| layer ")
    assert [r["layer"] for r in rows] == [r["layer"] for r in meta["layers"]] == ["fc1", "fc2", "fc3"]
    sparsity = {layer["name"]: layer["sparsity"] for layer in twice["record"]["layers"]}
    for row, layer in zip(rows, meta["layers"]):
        assert row["kernel"] == layer["kernel"] == "csr"
        assert _printed(row["sparsity_pct"], layer["sparsity_pct"])
        assert layer["sparsity_pct"] == pytest.approx(100 * sparsity[f"{layer['layer']}.weight"])
        assert _printed(row["dense_kb"], layer["dense_kb"]) and _printed(row["stored_kb"], layer["stored_kb"])


def test_materialise_kb_is_the_kb_of_the_prune_report(twice, tmp_path):
    assert _call(["materialise", str(twice["folder"]), "--form", "csr", "--out", str(tmp_path / "csr")])[0] == 0
    meta = _strict_json(tmp_path / "csr" / "materialised.json")
    layers = {layer["name"]: layer for layer in twice["record"]["pruned"]["cost"]["layers"]}
    for layer in meta["layers"]:  # fc1: 8,320 fp32 parameters = 33,280 bytes = 33.28 KB in the prune report
        assert layer["dense_kb"] == pytest.approx(layers[layer["layer"]]["size_dense_bytes"] / 1000)
    assert meta["layers"][0]["dense_kb"] == pytest.approx(33.28)


def test_compress_twice_is_byte_identical_and_quotes_the_records_error(twice, tmp_path):
    outs = []
    for name in ("a.plc", "b.plc"):
        code, out, err = _call(["compress", str(twice["folder"]), "--out", str(tmp_path / name), "--no-progress"])
        assert code == 0 and err == ""
        outs.append(out.replace(str(tmp_path / name), "FILE"))
    assert (tmp_path / "a.plc").read_bytes() == (tmp_path / "b.plc").read_bytes()
    assert outs[0] == outs[1]
    size = (tmp_path / "a.plc").stat().st_size
    assert f"FILE: {size:,} bytes" in outs[0]
    assert f"test error {twice['record']['pruned']['error_pct']:.2f}% pruned" in outs[0]


# --- lottery: re-run, resume ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lottery_runs(tmp_path_factory):
    """Two rounds in one go (``whole``), and one round (``one``) then ``--resume`` to two (``resumed``)."""
    home = tmp_path_factory.mktemp("lottery")
    whole = _call([*LOTTERY, "--rounds", "2", "--out", str(home / "whole")])
    one = _call([*LOTTERY, "--rounds", "1", "--out", str(home / "resumed")])
    resumed = _call([*LOTTERY, "--rounds", "2", "--resume", str(home / "resumed")])
    return home, whole, resumed, one


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "wall_time_s"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_a_resumed_lottery_run_equals_the_uninterrupted_one(lottery_runs):
    home, whole, resumed, _ = lottery_runs
    assert whole[0] == resumed[0] == 0 and whole[2] == resumed[2] == ""
    a, b = _strict_json(home / "whole" / "results.json"), _strict_json(home / "resumed" / "results.json")
    assert (a["resumed_rounds"], b["resumed_rounds"]) == (0, 2)
    assert _without_times(a["rounds"]) == _without_times(b["rounds"])
    for name in ("model.safetensors", "round_002/weights.safetensors"):
        assert (home / "whole" / name).read_bytes() == (home / "resumed" / name).read_bytes(), name
    for name in ("masks.safetensors", "round_001/mask.safetensors", "round_002/mask.safetensors"):
        assert _same_masks(*(load_file(str(home / run / name)) for run in ("whole", "resumed"))), name
    assert _table(whole[1], "| round ") == _table(resumed[1], "| round ")
    assert "2 finished rounds read back from the folder, 1 trained now" in resumed[1]


def test_lottery_table_is_its_json_record(lottery_runs):
    home, whole, _, _ = lottery_runs
    rounds = _strict_json(home / "whole" / "results.json")["rounds"]
    rows = _table(whole[1], "| round ")
    assert [int(r["round"]) for r in rows] == [r["round"] for r in rounds] == [0, 1, 2]
    for row, rnd in zip(rows, rounds):
        assert _printed(row["weights left %"], rnd["remaining_pct"])
        assert rnd["remaining_pct"] == pytest.approx(100 * rnd["kept"] / rnd["total"])
        assert _printed(row["ticket acc %"], 100 * rnd["ticket"]["accuracy"])
        assert int(row["early-stop iter"]) == rnd["ticket"]["early_stop_step"]
        if rnd["reinit"] is None:
            assert row["reinit acc %"] == ""
        else:
            assert _printed(row["reinit acc %"], 100 * rnd["reinit"]["accuracy"])
    # F&C rates: 20% of fc1/fc2's and 10% of fc3's remaining weights per round, rounded per layer
    assert rounds[2]["kept"] == 2 * round(8192 * 0.8 ** 2) + round(640 * 0.9 ** 2)


def test_resuming_a_finished_lottery_run_trains_nothing_and_changes_no_round(lottery_runs, tmp_path):
    home, whole, _, _ = lottery_runs
    run = tmp_path / "run"
    shutil.copytree(home / "whole", run)
    before = _tree(run)
    code, out, err = _call([*LOTTERY, "--rounds", "2", "--resume", str(run)])
    assert code == 0 and err == "" and "3 finished rounds read back from the folder, 0 trained now" in out
    after = _tree(run)
    assert sorted(after) == sorted(before)
    assert all(after[k] == before[k] for k in after if k.startswith("round_"))  # finished rounds untouched
    assert after["model.safetensors"] == before["model.safetensors"]  # the same last ticket, rewritten
    assert _same_masks(_tensors(after["masks.safetensors"]), _tensors(before["masks.safetensors"]))
    assert _table(out, "| round ") == _table(whole[1], "| round ")


def test_a_lottery_rerun_into_its_own_folder_without_resume_is_refused(lottery_runs):
    home, _, _, _ = lottery_runs
    before = _listing(home / "whole")
    code, out, err = _call([*LOTTERY, "--rounds", "2", "--out", str(home / "whole")])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"pass --resume {home / 'whole'}" in err and _listing(home / "whole") == before


# --- bad input: exit 2, one line on stderr, nothing on stdout, nothing written ----------------------------------
BAD = [
    # prune
    (["prune", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["prune", "--config", "adir"], "config file 'adir' is a folder"),
    (["prune", "--config", "bad.yaml"], "sparsity in --config / flags must be a number, got 'high'"),
    (["prune", "--config", "afile"], "must hold a mapping of RunConfig keys, got str"),
    (["prune", "--config", "dash.yaml"], "unknown key(s) pretrain-epochs"),
    (["prune", "--epochs", "abc"], "argument --epochs: expected an integer, got 'abc'"),
    (["prune", "--method", "nope"], "valid names: dsr, force, gradual"),
    (["prune", "--model", "nope"], "unknown model 'nope'; valid names: digits_mlp, lenet300, lenet5"),
    (["prune", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["prune", "--out", "/proc/prunelab-h6"], "not writable"),
    (["prune", "--out", "afile"], "output path 'afile' is a file"),
    (["prune", "--out", "afile/run"], "'afile' is a file"),
    (["prune", "--dataset", "mnist", "--data-dir", "afile"], "not found in 'afile'"),
    # inspect
    (["inspect", "nope"], "checkpoint 'nope' does not exist"),
    (["inspect", "afile"], "checkpoint 'afile' is a file"),
    (["inspect", "adir"], "has no model.safetensors"),
    # compress
    (["compress", "nope", "--out", "x.plc"], "checkpoint 'nope' does not exist"),
    (["compress", "{ckpt}", "--out", "x.plc", "--bits", "abc"], "--bits expects BITS or NAME=BITS"),
    (["compress", "{ckpt}", "--out", "x.plc", "--bits", "0"], "bits must be an integer in [1, 16]"),
    (["compress", "{ckpt}", "--out", "adir"], "--out must name a file to write"),
    (["compress", "{ckpt}", "--out", "afile/x.plc"], "'afile' is a file"),
    (["compress", "{ckpt}", "--out", "/proc/prunelab-h6.plc"], "not writable"),
    # materialise
    (["materialise", "nope", "--out", "m"], "checkpoint 'nope' does not exist"),
    (["materialise", "{ckpt}", "--form", "nope", "--out", "m"], "valid names: 2:4, auto, bsr, csr, shrink"),
    (["materialise", "{ckpt}", "--form", "csr", "--out", "afile"], "output path 'afile' is a file"),
    (["materialise", "{ckpt}", "--form", "csr", "--out", "/proc/prunelab-h6"], "not writable"),
    # bench-latency
    (["bench-latency", "nope"], "checkpoint 'nope' does not exist"),
    (["bench-latency", "afile"], "checkpoint 'afile' is a file"),
    (["bench-latency", "{ckpt}", "--forms", "nope"], "unknown materialise form 'nope'"),
    (["bench-latency", "{ckpt}", "--batch-sizes", "a"], "--batch-sizes must be comma-separated integers"),
    (["bench-latency", "{ckpt}", "--reps", "0"], "must be positive"),
    # lottery
    (["lottery", "--model", "digits_mlp", "--dataset", "digits", "--resume", "nope"], "holds no lottery run"),
    (["lottery", "--model", "digits_mlp", "--dataset", "digits", "--resume", "afile"], "holds no lottery run"),
    (["lottery", "--model", "digits_mlp", "--dataset", "digits", "--rate", "1.5", "--out", "L"], "must be in [0, 1)"),
    (["lottery", "--model", "digits_mlp", "--dataset", "digits", "--rounds", "-1", "--out", "L"],
     "--rounds must be an integer >= 0"),
    (["lottery", "--epochs", "abc"], "argument --epochs: expected an integer, got 'abc'"),
    (["lottery", "--model", "nope", "--dataset", "digits", "--out", "L"], "unknown model 'nope'"),
    (["lottery", "--model", "digits_mlp", "--dataset", "digits", "--out", "afile"], "run folder 'afile' is a file"),
    (["lottery", "--model", "digits_mlp", "--dataset", "digits", "--rounds", "1", "--out", "/proc/prunelab-h6"],
     "cannot create output directory"),
    # oneshot / drop-layers: refused before any model or data is loaded
    (["oneshot", "--model", "chargpt", "--method", "nope", "--out", "o"], "unknown one-shot method 'nope'"),
    (["oneshot", "--model", "chargpt", "--sparsity", "1.5", "--out", "o"], "--sparsity 1.5 is out of range"),
    (["oneshot", "--model", "nope", "--out", "o"], "'nope' is neither a known model name"),
    (["oneshot", "--model", "chargpt", "--out", "afile"], "output path 'afile' is a file"),
    (["drop-layers", "--model", "chargpt", "--count", "0", "--out", "o"], "--count must be a positive integer"),
    (["drop-layers", "--model", "chargpt", "--count", "abc", "--out", "o"], "expected an integer, got 'abc'"),
    (["drop-layers", "--model", "chargpt", "--count", "1", "--out", "/proc/prunelab-h6"], "not writable"),
    # no / unknown command
    (["nope"], "invalid choice: 'nope'"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_input_is_exit_2_one_line_on_stderr_and_writes_nothing(twice, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.yaml").write_text("sparsity: high\n")
    (tmp_path / "dash.yaml").write_text("pretrain-epochs: 1\n")
    before, ckpt_before = _listing(tmp_path), _listing(twice["folder"])
    argv = [a.replace("{ckpt}", str(twice["folder"])) for a in argv]
    code, out, err = _call([*argv, "--no-progress"] if argv and argv[0] in ("prune", "lottery") else argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert out == ""
    assert _listing(tmp_path) == before and (tmp_path / "afile").read_text() == "mine"
    assert _listing(twice["folder"]) == ckpt_before


@pytest.mark.parametrize("command", ["demo", "prune", "list", "inspect", "compress", "materialise", "bench-latency",
                                     "oneshot", "lottery", "drop-layers"])
def test_every_subcommand_help_is_stdout_and_exit_0(command):
    code, out, err = _call([command, "--help"])
    assert code == 0 and err == "" and out.startswith(f"usage: prunelab {command} ")


def test_a_refused_demo_prints_nothing_on_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    code, out, err = _call(["demo", "--out", "afile", "--no-progress"])
    assert code == 2 and err.count("\n") == 1 and "output path 'afile' is a file" in err
    assert out == ""


def test_oneshot_refuses_an_unwritable_out_before_loading_anything(tmp_path, monkeypatch):
    # an empty --data-dir: a oneshot that reaches its data reports the missing corpus instead (with the
    # corpus present it prunes every layer, printing its progress, and only then refuses the folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, out, err = _call(["oneshot", "--model", "chargpt", "--method", "magnitude", "--data-dir", "empty",
                            "--out", "/proc/prunelab-h6"])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "output directory '/proc' is not writable" in err, err


def test_a_failed_oneshot_leaves_no_output_parent_it_created(tmp_path, monkeypatch):
    # --out new/deeper/x: the missing parents are made before loading (to check they are writable), and
    # removed again when the run then fails (here: no corpus), as prune does
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, out, err = _call(["oneshot", "--model", "chargpt", "--method", "magnitude", "--data-dir", "empty",
                            "--out", "new/deeper/x"])
    assert code == 2 and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    code, out, err = _call(["drop-layers", "--model", "chargpt", "--count", "1", "--data-dir", "empty",
                            "--out", "new/deeper/x"])
    assert code == 2 and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --- a config file and the equivalent flags: spellings that should be one run -------------------------------
def _hash_and_masks(argv: list[str]) -> tuple[str, dict]:
    code, out, err = _call(["prune", *argv])
    assert code == 0, err
    folder = Path(_run_folder(out))
    return _strict_json(folder / "results.json")["config_hash"], load_file(str(folder / "masks.safetensors"))


def test_yaml_granularity_2_4_is_the_flag_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("nm.yaml").write_text("granularity: 2:4\n")
    from_flags = _hash_and_masks([*NO_TRAIN[:2], *NO_TRAIN[4:], "--granularity", "2:4"])
    assert from_flags[1]["fc1.weight"].sum() == 128 * 64 // 2  # 2 of every 4
    from_yaml = _hash_and_masks(["--config", "nm.yaml", *NO_TRAIN[:2], *NO_TRAIN[4:]])
    assert from_yaml[0] == from_flags[0] and _same_masks(from_yaml[1], from_flags[1])


def test_yaml_exponent_numbers_are_the_flag_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("wd.yaml").write_text("weight_decay: 1e-4\nlr: 5e-2\n")
    from_flags = _hash_and_masks([*NO_TRAIN, "--weight-decay", "1e-4", "--lr", "5e-2"])
    from_yaml = _hash_and_masks(["--config", "wd.yaml", *NO_TRAIN])
    assert from_yaml[0] == from_flags[0]


def test_keep_first_spellings_of_one_number_are_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("kf.yaml").write_text("keep_first: .5\n")
    from_yaml = _hash_and_masks(["--config", "kf.yaml", *NO_TRAIN])
    from_flag = _hash_and_masks([*NO_TRAIN, "--keep-first", ".5"])
    padded = _hash_and_masks([*NO_TRAIN, "--keep-first", "0.50"])
    assert _same_masks(from_yaml[1], from_flag[1]) and _same_masks(from_yaml[1], padded[1])  # the same run
    assert from_yaml[0] == from_flag[0] == padded[0]


def test_saving_the_same_masks_again_gives_the_same_bytes(twice, tmp_path):
    # a pipeline that caches artefacts by content hash (DVC, CI caches) sees every identical rerun as changed
    from prunelab.masks import MaskSet

    masks = MaskSet.load(twice["folder"] / "masks.safetensors")
    digests = set()
    for i in range(16):  # two keys in random order: 16 equal saves by chance has probability 2 ** -15
        masks.save(tmp_path / f"m{i}.safetensors")
        digests.add((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(digests) == 1


# --- regression tests of the fixes above: the pieces on their own ------------------------------------------
def _yaml(text: str) -> dict:
    from prunelab.config import load_yaml_config

    Path("c.yaml").write_text(text)
    return load_yaml_config("c.yaml")


@pytest.mark.parametrize("text, expected", [
    # YAML 1.1 quirks the config loader drops: base 60 and a float exponent that needs a dot
    ("2:4", "2:4"), ("4:8", "4:8"), ("1:30", "1:30"), ("1:30.5", "1:30.5"),
    ("1e-4", 1e-4), ("5e-2", 0.05), ("5E+2", 500.0), ("1.0e5", 100000.0), ("-.5", -0.5), ("1_0e1", 100.0),
    # every other type as PyYAML resolves it
    ("0.5", 0.5), (".5", 0.5), ("0.", 0.0), ("12", 12), ("-3", -3), ("+1", 1), ("1_000", 1000), ("0x1f", 31),
    ("0b11", 3), ("010", 8), ("true", True), ("no", False), ("~", None), ("null", None), ("abc", "abc"),
    ("1e", "1e"), ("e5", "e5"), ("'2:4'", "2:4"), ('"1e-4"', "1e-4"),
])
def test_config_yaml_numbers_are_yaml_1_2_and_other_types_unchanged(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    value = _yaml(f"v: {text}\n")["v"]
    assert value == expected and type(value) is type(expected), (text, value)


def test_config_yaml_keeps_special_floats_dates_and_merge_keys(tmp_path, monkeypatch):
    import datetime
    import math

    monkeypatch.chdir(tmp_path)
    data = _yaml("a: .inf\nb: -.inf\nc: .nan\nd: 2001-12-14\nbase: &b {x: 1, y: 2}\ne:\n  <<: *b\n  x: 3\n")
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])
    assert data["d"] == datetime.date(2001, 12, 14)
    assert data["e"] == {"x": 3, "y": 2}  # a merge key's value may be overridden: no duplicate
    import yaml

    assert yaml.safe_load("v: 2:4") == {"v": 124}  # PyYAML's own SafeLoader is left as it was


@pytest.mark.parametrize("text, expected", [
    ("sparsity: 0.5\nlr: 0.1\nsparsity: 0.8\n", "config file 'dup.yaml' sets 'sparsity' twice (lines 1 and 3)"),
    ("layer_rates: {fc3: 0.1, fc3: 0.2}\n", "config file 'dup.yaml' sets 'fc3' twice (line 1)"),
])
def test_a_key_given_twice_in_a_yaml_config_is_refused_in_one_line(tmp_path, monkeypatch, text, expected):
    # before: the last value won silently (sparsity 0.8 above)
    monkeypatch.chdir(tmp_path)
    Path("dup.yaml").write_text(text)
    code, out, err = _call(["prune", "--config", "dup.yaml", "--no-progress"])
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["dup.yaml"]


def test_keep_rules_hash_the_number_not_its_spelling_and_the_default_hash_stays():
    from prunelab.config import RunConfig

    for field_name in ("keep_first", "keep_last"):
        digests = {RunConfig(**{field_name: text}).digest() for text in (".5", "0.50", "0.5", "5e-1", " 0.5")}
        assert len(digests) == 1, field_name
        assert RunConfig(**{field_name: "0.5"}).digest() != RunConfig(**{field_name: "0.4"}).digest()
        assert RunConfig(**{field_name: "dense"}).digest() != RunConfig(**{field_name: "none"}).digest()
    assert RunConfig().digest() == "5df1efbd97"  # default folders keep their names
    # the spellings hashed before the fix keep their folders: '0.5' (and YAML 0.5) and 'dense'
    assert RunConfig(keep_first="0.5").digest() == "2e0dc1c12a" and RunConfig(keep_first="dense").digest() == "ca8a9e2bdd"


def _mask_file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_mask_files_hold_one_sorted_json_metadata_key(tmp_path):
    import torch

    from prunelab.masks import MASK_FORMAT, MaskSet

    masks = MaskSet({"z.weight": torch.tensor([True, False]), "a.weight": torch.tensor([[False], [True]])})
    masks.save(tmp_path / "m.safetensors")
    meta = _mask_file_metadata(tmp_path / "m.safetensors")
    assert meta == {"prunelab": json.dumps({"format": MASK_FORMAT, "names": ["z.weight", "a.weight"]}, sort_keys=True)}
    back = MaskSet.load(tmp_path / "m.safetensors")
    assert list(back) == ["z.weight", "a.weight"] and _same_masks(dict(back), dict(masks))  # the saved order


def test_mask_files_written_the_old_way_with_two_metadata_keys_still_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    from prunelab.masks import MaskSet

    tensors = {"b.weight": torch.tensor([True, False, True]), "a.weight": torch.tensor([False, True])}
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"format": "prunelab.maskset.v1", "names": json.dumps(["b.weight", "a.weight"])})
    masks = MaskSet.load(tmp_path / "old.safetensors")
    assert list(masks) == ["b.weight", "a.weight"]  # the recorded order, not safetensors' sorted one
    assert masks["b.weight"].tolist() == [True, False, True] and masks["a.weight"].tolist() == [False, True]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "prunelab.checkpoint.v1"})
    with pytest.raises(Exception, match="is a prunelab.checkpoint.v1 file, not a mask file"):
        MaskSet.load(tmp_path / "model.safetensors")
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata={"prunelab": "{not json"})
    with pytest.raises(Exception, match="has no prunelab format metadata"):
        MaskSet.load(tmp_path / "broken.safetensors")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder no file can be created in")
def test_an_unwritable_out_names_what_failed_in_the_folder_that_exists(tmp_path, monkeypatch):
    # before: "output directory '/proc' is not writable (No such file or directory)", as if /proc were missing
    from prunelab.errors import PrunelabError
    from prunelab.io import ensure_writable_dir

    with pytest.raises(PrunelabError) as info:
        ensure_writable_dir("/proc")
    assert str(info.value).startswith("output directory '/proc' is not writable: creating a file in it failed (")
    monkeypatch.chdir(tmp_path)
    code, out, err = _call(["demo", "--out", "/proc/prunelab-h6", "--no-progress"])  # refused before any training
    assert code == 2 and out == "" and err.count("\n") == 1 and "creating a file in it failed" in err, err


def test_one_lottery_round_is_singular_in_the_summary(lottery_runs):
    _, whole, _, one = lottery_runs
    assert one[0] == 0 and "1 pruning round after the dense round 0; 0 finished rounds read back from the folder, " \
        "2 trained now;" in one[1], one[1]
    assert "2 pruning rounds after the dense round 0; 0 finished rounds read back" in whole[1]


def test_materialise_report_rows_are_kb_of_1000_bytes():
    from prunelab.materialise import LayerForm, MaterialiseReport

    layer = LayerForm("fc1", "Linear", "csr", 0.5, dense_bytes=33_280, stored_bytes=20_996)
    report = MaterialiseReport("csr", (layer,), max_abs_error=0.0, output_scale=1.0, tolerance=1e-5)
    row = report.rows()[0]
    assert row["dense_kb"] == 33.28 and row["stored_kb"] == 20.996
    row_line = next(line for line in report.table().splitlines() if line.startswith("| fc1 "))
    assert [c.strip() for c in row_line.strip("|").split("|")][4:6] == ["33.28", "21.00"]  # dense KB, stored KB
