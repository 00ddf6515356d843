"""The prunelab CLI: list, prune (+ --config), inspect, and every bad input -> one line, exit 2."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunelab
from prunelab.cli import main

# no --rounds: oneshot runs (below) refuse an option they would ignore
FAST = ["--model", "digits_mlp", "--dataset", "digits", "--pretrain-epochs", "3", "--finetune-epochs", "1", "--no-progress"]


def test_list_shows_every_registered_name(cli):
    from prunelab.allocation import ALLOCATIONS
    from prunelab.bench.datasets import DATASETS
    from prunelab.bench.models import MODELS
    from prunelab.criteria import CRITERIA
    from prunelab.methods import METHODS
    from prunelab.structure import GRANULARITIES

    code, out, _ = cli("list")
    assert code == 0
    for registry in (CRITERIA, GRANULARITIES, ALLOCATIONS, METHODS, MODELS, DATASETS):
        for entry in registry.entries():
            assert f"  {entry.name} " in out and entry.description in out
    for name in ("magnitude", "taylor", "obd", "nm", "erk", "lamp", "iterative", "gradual", "lenet300", "mnist"):
        assert name in out


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    assert main(["prune", *FAST, "--rounds", "2", "--sparsity", "0.8", "--out", str(out)]) == 0
    return out


def test_prune_writes_complete_results(pruned_run):
    names = {p.name for p in pruned_run.iterdir()}
    assert {"results.json", "report.md", "sparsity_curve.png", "model.safetensors", "masks.safetensors",
            "checkpoint.json"} <= names
    record = json.loads((pruned_run / "results.json").read_text())
    assert record["achieved_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert [row["stage"] for row in record["stages"]] == ["dense", "round 1", "round 2"]
    assert record["pruned"]["cost"]["nonzeros"] < record["dense"]["cost"]["nonzeros"]
    assert (pruned_run / "sparsity_curve.png").read_bytes()[:4] == b"\x89PNG"
    report = (pruned_run / "report.md").read_text()
    assert "Dense vs pruned" in report
    threads = record["environment"]["threads"]
    assert f"on {threads} thread{'' if threads == 1 else 's'}." in report


def test_checkpoint_state_dict_loads_into_unpruned_model(pruned_run):
    from prunelab.bench.models import build_model

    state = load_file(str(pruned_run / "model.safetensors"))
    fresh = build_model("digits_mlp", (1, 8, 8), 10)
    fresh.load_state_dict(state, strict=True)
    masks = load_file(str(pruned_run / "masks.safetensors"))
    for name, mask in masks.items():
        assert torch.all(state[name][~mask] == 0)


def test_inspect_prints_layer_table(cli, pruned_run):
    code, out, _ = cli("inspect", str(pruned_run))
    assert code == 0
    assert "| total" in out and "fc1.weight" in out
    record = json.loads((pruned_run / "results.json").read_text())
    assert f"{100 * record['achieved_sparsity']:.2f}" in out


def test_yaml_config_equals_flags(tmp_path, cli):
    config = tmp_path / "run.yaml"
    config.write_text("model: digits_mlp\ndataset: digits\nmethod: oneshot\nsparsity: 0.5\npretrain_epochs: 2\n"
                      "finetune_epochs: 0\nprogress: false\ncriterion: l2\ngranularity: neuron\nallocation: uniform\n")
    code, out, err = cli("prune", "--config", str(config), "--out", str(tmp_path / "a"))
    assert code == 0, err
    record = json.loads((tmp_path / "a" / "results.json").read_text())
    assert record["config"]["granularity"] == "neuron" and record["config"]["method"] == "oneshot"
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)


def _corrupt_mnist(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not really mnist")
    return folder


BAD = {
    "sparsity": (["--sparsity", "1.5"], r"\[0, 1\)"),
    "nm-not-dividing": (["--granularity", "3:5", "--method", "oneshot"], "does not divide"),
    "nm-n-ge-m": (["--granularity", "4:4"], "N < M"),
    "nm-n-zero": (["--granularity", "0:4"], r"1 <= N < M, got 0:4"),
    "nm-other-sparsity": (["--granularity", "2:4", "--method", "oneshot", "--sparsity", "0.9"],
                          r"the N:M pattern 2:4 fixes the sparsity at 1 - N/M = 0.5, but --sparsity 0.9 was given"),
    "nm-stepped-method": (["--granularity", "2:4"],  # the default method, iterative
                          r"--method iterative raises the sparsity in steps, but the N:M pattern 2:4 fixes it at 0.5"),
    "unknown-criterion": (["--criterion", "magnitud"], "valid names: "),
    "unknown-model": (["--model", "resnet9000"], "valid names: "),
    "missing-data": (["--dataset", "mnist", "--data-dir", "/nonexistent/prunelab"], "PRUNELAB_DATA|--data-dir|download"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_prune_input_is_one_line_exit_2(case, cli, tmp_path):
    extra, pattern = BAD[case]
    out_dir = tmp_path / "out"
    code, _, err = cli("prune", *FAST, *extra, "--out", str(out_dir))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists()


def test_corrupt_data_file(cli, tmp_path):
    folder = _corrupt_mnist(tmp_path)
    code, _, err = cli("prune", *FAST, "--dataset", "mnist", "--data-dir", str(folder), "--out",
                           str(tmp_path / "o"))
    assert code == 2 and "sha256" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli("prune", *FAST, "--out", str(blocker / "sub" / "out"))
    assert code == 2 and "output directory" in err


def test_output_under_a_read_only_file_system_fails_before_training(cli):
    # /proc refuses new entries even for root, for whom os.access() always says "writable"
    code, out, err = cli("prune", *FAST, "--out", "/proc/prunelab-out")
    assert code == 2 and "not writable" in err and len(err.strip().splitlines()) == 1
    assert "dense" not in out  # refused before any training


def test_checkpoint_masks_not_matching_model(cli, tmp_path, pruned_run):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(pruned_run, broken)
    masks = load_file(str(broken / "masks.safetensors"))
    first = next(iter(masks))
    masks[first] = torch.ones(3, 3, dtype=torch.bool)
    save_file(masks, str(broken / "masks.safetensors"), metadata={"format": "prunelab.maskset.v1"})
    code, _, err = cli("inspect", str(broken))
    assert code == 2 and "shape" in err and len(err.strip().splitlines()) == 1


def _other_masks(masks):
    """Masks of the same shapes that disagree with the weights: another run's (here: the complement)."""
    return {name: ~mask for name, mask in masks.items()}


@pytest.mark.parametrize("edit, message", [
    (lambda masks: {**masks, "conv9.weight": torch.ones(3, dtype=torch.bool)},
     r"holds a mask for 'conv9.weight', but model 'digits_mlp' has no such parameter \(it has fc1.weight, "
     r".*was this checkpoint saved from another model\?"),
    (lambda masks: {**masks, "fc2.weight": torch.ones(3, 3, dtype=torch.bool)},
     r"mask 'fc2.weight' has shape \(3, 3\), but that parameter of model 'digits_mlp' has \(64, 128\); "
     r"was this checkpoint saved from another model\?"),
    (_other_masks, r"mask 'fc1.weight' marks \d+ weights pruned that are nonzero in model.safetensors \(expected real "
     r"zeros wherever the mask is False\).*copied from another model or run\?"),
])
def test_a_checkpoint_with_masks_of_another_model_is_refused(cli, tmp_path, pruned_run, edit, message):
    import re
    import shutil

    from prunelab.checkpoint import load_checkpoint
    from prunelab.errors import PrunelabError

    foreign = tmp_path / "ckpt"
    shutil.copytree(pruned_run, foreign)
    masks = load_file(str(foreign / "masks.safetensors"))
    save_file(edit(masks), str(foreign / "masks.safetensors"), metadata={"format": "prunelab.maskset.v1"})
    with pytest.raises(PrunelabError, match=message):
        load_checkpoint(foreign)
    code, _, err = cli("inspect", str(foreign))
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert str(foreign / "masks.safetensors") in err  # names the file the first offending mask is in
    assert load_checkpoint(pruned_run).masks.sparsity == pytest.approx(0.8, abs=1e-4)  # the real one still loads


def test_unknown_config_key(cli, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("sparsty: 0.5\n")
    code, _, err = cli("prune", "--config", str(config))
    assert code == 2 and "sparsty" in err and "valid keys" in err


def test_real_process_exit_status_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "prunelab.cli", "prune", "--sparsity", "-0.2", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    assert not (tmp_path / "x").exists()


def test_compress_writes_a_file_that_decodes(cli, tmp_path, pruned_run):
    from prunelab.compress import read_compressed

    target = tmp_path / "model.plc"
    code, out, err = cli("compress", str(pruned_run), "--out", str(target), "--bits", "5", "--no-progress")
    assert code == 0, err
    assert target.is_file() and "decoded from the file" in out and "| total" in out
    state = read_compressed(target)
    masks = load_file(str(pruned_run / "masks.safetensors"))
    for name, mask in masks.items():
        assert torch.all(state[name][~mask] == 0)
        assert len(torch.unique(state[name][mask])) <= 32  # 5-bit codebook


def test_compress_bad_bits_is_one_line(cli, tmp_path, pruned_run):
    code, _, err = cli("compress", str(pruned_run), "--out", str(tmp_path / "m.plc"), "--bits", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "m.plc").exists()


@pytest.mark.parametrize("argv, message", [
    (["--bits", "fc=5,fc=6"], "--bits gives 'fc' twice (fc=5 and fc=6) in 'fc=5,fc=6'; give each name once"),
    (["--index-bits", "fc1=4, fc1=8"], "--index-bits gives 'fc1' twice (fc1=4 and fc1=8)"),
    (["--bits", "fc=five"], "--bits expects BITS or NAME=BITS[,NAME=BITS...], got 'fc=five'"),
    (["--finetune-lr", "0", "--finetune-epochs", "1"], "--finetune-lr must be a positive number, got 0.0; e.g. 0.01"),
    (["--finetune-lr", "-0.01"], "--finetune-lr must be a positive number, got -0.01"),
    (["--finetune-lr", "nan"], "--finetune-lr must be a positive number, got nan"),
    (["--finetune-lr", "inf"], "--finetune-lr must be a positive number, got inf"),
])
def test_compress_bad_options_are_one_line_errors_before_any_work(cli, tmp_path, pruned_run, monkeypatch, argv,
                                                                  message):
    from prunelab import checkpoint

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("work before the check"))
    code, out, err = cli("compress", str(pruned_run), "--out", str(tmp_path / "m.plc"), *argv, "--no-progress")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err, err
    assert not (tmp_path / "m.plc").exists()


def test_materialise_writes_a_model_that_loads_and_matches(cli, tmp_path, pruned_run):
    import prunelab
    from prunelab.checkpoint import load_checkpoint

    out = tmp_path / "csr"
    code, _, err = cli("materialise", str(pruned_run), "--form", "csr", "--out", str(out))
    assert code == 0, err
    ckpt = load_checkpoint(str(pruned_run))
    ckpt.masks.apply_(ckpt.model)
    loaded = prunelab.load(str(out))
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ckpt.model.eval()(x), atol=1e-5, rtol=0)


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_materialise_refuses_to_replace_a_prune_run(cli, tmp_path, pruned_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    before = _tree(run)
    code, out, err = cli("materialise", str(pruned_run), "--form", "csr", "--out", str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"--out {str(run)!r} holds a prune / demo run (checkpoint.json, masks.safetensors, report.md ...), not an " \
           "earlier materialise output; materialise replaces its whole --out folder and would delete it" in err
    assert _tree(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing deleted or left


def test_materialise_replaces_its_own_earlier_output_but_not_other_files(cli, tmp_path, pruned_run):
    out = tmp_path / "csr"
    for _ in range(2):  # re-running into its own folder replaces it
        code, _, err = cli("materialise", str(pruned_run), "--form", "csr", "--out", str(out))
        assert code == 0, err
    (out / "notes.txt").write_text("keep me")
    code, _, err = cli("materialise", str(pruned_run), "--form", "csr", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds files materialise does not write (notes.txt), not an earlier materialise output" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_materialise_forms_replace_each_others_output(cli, tmp_path, monkeypatch):
    import prunelab
    from prunelab import cli_materialise

    pruned_run = tmp_path / "neurons"  # whole neurons pruned: both shrink and csr apply
    code, _, err = cli("prune", *FAST, "--method", "oneshot", "--granularity", "neuron", "--sparsity", "0.5",
                       "--out", str(pruned_run))
    assert code == 0, err
    out = tmp_path / "mat"
    for form, files in (("csr", ["materialised.json", "materialised.pt"]),
                        ("shrink", ["architecture.json", "model.safetensors"]),
                        ("csr", ["materialised.json", "materialised.pt"])):
        code, _, err = cli("materialise", str(pruned_run), "--form", form, "--out", str(out))
        assert code == 0, err  # a shrink into an earlier csr output was refused after the work was done
        assert sorted(p.name for p in out.iterdir()) == files  # the new form only, nothing of the old one left
        prunelab.load(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mat", "neurons"]  # no temporary folder left beside it
    (out / "notes.txt").write_text("keep me")
    monkeypatch.setattr(cli_materialise, "_checkpoint_and_inputs", lambda *a: pytest.fail("work before the check"))
    code, _, err = cli("materialise", str(pruned_run), "--form", "shrink", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds files materialise does not write (notes.txt), not an earlier materialise output" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_bench_latency_prints_ratios_and_per_layer_times(cli, pruned_run):
    code, out, err = cli("bench-latency", str(pruned_run), "--forms", "csr", "--batch-sizes", "1,4", "--reps", "1",
                         "--per-layer")
    assert code == 0, err
    assert "csr_speedup_x" in out and " thread" in out and "subnormal floats flushed to zero" in out
    assert torch.tensor(1e-40).item() != 0.0  # the flush was undone: later code sees subnormals again
    assert "per leaf module at batch 4" in out
    layer_rows = [line for line in out.splitlines() if line.startswith("| fc")]
    assert len(layer_rows) >= 2 and all(line.count("|") == 5 for line in layer_rows)  # layer, dense, share, csr


def test_bench_latency_pooling_auto_reports_the_dense_pools(cli, pruned_run):
    code, out, err = cli("bench-latency", str(pruned_run), "--forms", "csr", "--batch-sizes", "2", "--reps", "1",
                         "--pooling", "auto")
    assert code == 0, err
    assert "max pools, dense model (pooling auto" in out and "(no nn.MaxPool2d layers)" in out  # an MLP has none
    assert "csr_speedup_x" in out


def test_bench_latency_threads_sets_and_restores_the_thread_count_and_times_each_form_once(cli, pruned_run):
    before = torch.get_num_threads()
    code, out, err = cli("bench-latency", str(pruned_run), "--forms", "csr,csr", "--batch-sizes", "2", "--reps", "1",
                         "--threads", "1")
    assert code == 0, err
    assert ", 1 thread;" in out and torch.get_num_threads() == before
    header = next(line for line in out.splitlines() if line.startswith("| batch"))
    assert header.count("csr_speedup_x") == 1


@pytest.mark.parametrize("extra, message", [
    (["--batch-sizes", "one"], "--batch-sizes must be comma-separated integers"),
    (["--reps", "0"], "--batch-sizes and --reps must be positive"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_bench_latency_bad_input_is_one_line(cli, pruned_run, extra, message):
    code, _, err = cli("bench-latency", str(pruned_run), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_nm_granularity_without_sparsity_targets_one_minus_n_over_m(cli, tmp_path):
    out = tmp_path / "nm"
    code, _, err = cli("prune", *FAST, "--method", "oneshot", "--granularity", "2:4", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["sparsity"] == 0.5
    assert record["target_sparsity"] == 0.5 and record["achieved_sparsity"] == 0.5


def test_sparsity_help_names_the_nm_default():
    from prunelab.cli import build_parser

    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    text = " ".join(prune.format_help().split())
    assert "(default 0.9; with an N:M granularity, 1 - N/M)" in text


def test_demo_refuses_an_empty_out(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("demo", "--out", "", "--no-progress")
    assert code == 2 and "--out is empty" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # not a silent run into runs/demo


def test_checkpoint_meta_that_does_not_fit_the_weights_names_the_mismatch(cli, tmp_path, pruned_run):
    import shutil

    edited = tmp_path / "ckpt"
    shutil.copytree(pruned_run, edited)
    meta = json.loads((edited / "checkpoint.json").read_text())
    (edited / "checkpoint.json").write_text(json.dumps({**meta, "input_shape": [32]}))
    code, _, err = cli("inspect", str(edited))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "size mismatch for fc1.weight" in err and "input_shape [32]" in err  # not just "Error(s) in loading"
    (edited / "checkpoint.json").write_text(json.dumps({**meta, "input_shape": "64"}))  # a string, not a list
    code, _, err = cli("inspect", str(edited))
    assert code == 2 and "lacks a valid 'model', 'input_shape' or 'num_classes' entry" in err


def test_sparsity_plot_labels_an_untrained_dense_line_and_keeps_the_callers_backend(cli, tmp_path, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    legends = []
    savefig = Figure.savefig

    def recording_savefig(fig, *args, **kwargs):
        legends.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # a user's own (non-Agg) backend
    try:
        code, _, err = cli("prune", "--model", "digits_mlp", "--dataset", "digits", "--method", "snip", "--epochs", "1",
                           "--no-progress", "--out", str(tmp_path / "snip"))
        assert code == 0, err
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        plt.switch_backend(before)
    assert legends == [["pruned", "dense at init (untrained)"]]  # the gray line is the untrained init, not "dense"


def test_checkpoint_meta_asking_for_an_impossible_model_is_one_line(cli, tmp_path, pruned_run):
    import shutil

    edited = tmp_path / "ckpt"
    shutil.copytree(pruned_run, edited)
    meta = json.loads((edited / "checkpoint.json").read_text())
    (edited / "checkpoint.json").write_text(json.dumps({**meta, "input_shape": [10**12]}))  # terabytes of fc1 weight
    code, _, err = cli("inspect", str(edited))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "input_shape [1000000000000]" in err and "re-create" in err


def test_gradual_start_and_end_reach_the_schedule_from_flags_and_yaml(cli, tmp_path):
    # digits: 23 steps per epoch, 4 epochs = 92 steps; t0 = 1 epoch = step 23, end = 0.5 * 92 = 46, dt = 23 // 2 = 11
    argv = ["--method", "gradual", "--epochs", "4", "--num-updates", "2", "--sparsity", "0.5",
            "--model", "digits_mlp", "--dataset", "digits", "--pretrain-epochs", "1", "--finetune-epochs", "0",
            "--no-progress"]
    code, _, err = cli("prune", *argv, "--start-epoch", "1", "--end-fraction", "0.5", "--out", str(tmp_path / "a"))
    assert code == 0, err
    record = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [h["step"] for h in record["mask_updates"]] == [34, 45]  # t0 + k dt, k = 1, 2 (s_t0 = 0 prunes nothing)
    assert record["mask_updates"][-1]["target_sparsity"] == 0.5
    assert (record["config"]["start_epoch"], record["config"]["end_fraction"]) == (1, 0.5)
    config = tmp_path / "run.yaml"
    config.write_text("start_epoch: 1\nend_fraction: 0.5\n")
    code, _, err = cli("prune", "--config", str(config), *argv, "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "results.json").read_text())["mask_updates"] == record["mask_updates"]


def test_no_layer_floor_lets_the_global_channel_threshold_empty_a_layer(cli, tmp_path):
    argv = ["prune", "--method", "oneshot", "--granularity", "channel", "--sparsity", "0.98", *FAST[:4],
            "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress", "--keep-last", "none"]
    kept = {}
    for flag in ("--layer-floor", "--no-layer-floor"):
        code, _, err = cli(*argv, flag, "--out", str(tmp_path / flag))
        assert code == 0, err
        record = json.loads((tmp_path / flag / "results.json").read_text())
        kept[flag] = {layer["name"]: layer["kept"] for layer in record["layers"]}
        assert record["config"]["layer_floor"] == (flag == "--layer-floor")
    assert all(k > 0 for k in kept["--layer-floor"].values())  # the floor: every layer keeps a neuron
    assert min(kept["--no-layer-floor"].values()) == 0  # without it the threshold removes a whole layer


def test_channel_granularity_keeps_the_output_layer_dense_unless_asked(cli, tmp_path):
    # channel cuts of the last layer remove model outputs (classes): left dense by default
    argv = ["prune", "--method", "oneshot", "--granularity", "channel", "--sparsity", "0.5", *FAST[:4],
            "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress"]
    kept = {}
    for extra in ([], ["--keep-last", "none"]):
        out = tmp_path / ("default" if not extra else "none")
        code, _, err = cli(*argv, *extra, "--out", str(out))
        assert code == 0, err
        layers = json.loads((out / "results.json").read_text())["layers"]
        kept[bool(extra)] = (layers[-1]["kept"], layers[-1]["total"])
    assert kept[False][0] == kept[False][1]  # every output row kept
    assert kept[True][0] < kept[True][1]  # --keep-last none lets the threshold cut output rows


def test_materialise_silence_pruned_channels_lets_a_padded_cnn_shrink(cli, tmp_path):
    # lenet5 on 8x8 digits has padded convs: pruned channels' act(bias) reaches them and shrink refuses
    run = tmp_path / "run"
    code, _, err = cli("prune", "--model", "lenet5", "--dataset", "digits", "--method", "oneshot", "--criterion", "l1",
                       "--granularity", "channel", "--allocation", "uniform", "--sparsity", "0.5",
                       "--pretrain-epochs", "1", "--finetune-epochs", "0", "--no-progress", "--out", str(run))
    assert code == 0, err
    code, _, err = cli("materialise", str(run), "--form", "shrink", "--out", str(tmp_path / "a"))
    assert code == 2 and "--silence-pruned-channels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    code, out, err = cli("materialise", str(run), "--form", "shrink", "--out", str(tmp_path / "b"),
                         "--silence-pruned-channels")
    assert code == 0, err
    assert "silenced the pruned channels' constant outputs: test accuracy" in out
    shrunk = prunelab.load(tmp_path / "b")
    assert shrunk.conv1.out_channels == 10  # of 20: half the channels cut
    code, _, err = cli("materialise", str(run), "--form", "csr", "--out", str(tmp_path / "c"),
                       "--silence-pruned-channels")
    assert code == 2 and "applies to --form shrink only" in err
