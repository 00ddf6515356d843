"""prune/compress refuse bad configurations in one line, before any training, and keep rules win over rates."""

from __future__ import annotations

import shutil
import time

import pytest

from prunelab.config import config_from_mapping
from prunelab.errors import PrunelabError
from prunelab.methods import PruneSpec
from prunelab.targets import LayerRules

QUICK = ["--model", "digits_mlp", "--dataset", "digits", "--no-progress"]


@pytest.mark.parametrize("values, message", [
    ({"exclude": 5}, "exclude in c.yaml must be a layer-name glob or a list of them, got 5"),
    ({"exclude": ["fc1", 3]}, "exclude in c.yaml must be a layer-name glob"),
    ({"layer_rates": [1, 2]}, "layer_rates in c.yaml must be a mapping"),
    ({"rounds": 2.5}, "rounds in c.yaml must be an integer, got 2.5"),
    ({"rounds": "3"}, "rounds in c.yaml must be an integer, got '3'"),
    ({"download": "false"}, "download in c.yaml must be true or false, got 'false'"),
    ({"sparsity": "0.5"}, "sparsity in c.yaml must be a number"),
    ({1: 2}, "unknown key"),
])
def test_yaml_values_of_the_wrong_type_are_refused(values, message):
    with pytest.raises(PrunelabError, match=message):
        config_from_mapping(values, "c.yaml")


def test_yaml_nulls_mean_empty_and_numbers_become_floats():
    config = config_from_mapping({"exclude": None, "layer_rates": None, "lr": 1, "keep_first": 0.5}, "c.yaml")
    assert config.exclude == () and config.layer_rates == {} and config.lr == 1.0 and config.keep_first == "0.5"


@pytest.mark.parametrize("extra, message", [
    (["--pretrain-epochs", "-3"], "--pretrain-epochs must be >= 0, got -3"),
    (["--slimming-strength", "nan"], "--slimming-strength must be a number >= 0"),
    (["--finetune-lr", "nan"], "--finetune-lr must be a positive number"),
    (["--out", " "], "--out is empty"),
    (["--method", "gradual", "--num-updates", "0"], "num_updates must be an integer >= 1, got 0"),
])
def test_bad_numbers_are_refused_before_training(cli, tmp_path, extra, message):
    started = time.perf_counter()
    argv = ["prune", *QUICK, "--pretrain-epochs", "50", *extra]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = cli(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - started < 5.0  # 50 dense epochs were not run first
    assert not (tmp_path / "out").exists()


def test_keep_rules_cap_a_fixed_per_layer_rate():
    rules = LayerRules(keep_first="dense", keep_last=0.3, fixed_sparsity={"fc1": 0.5, "fc3": 0.6, "fc2": 0.4})
    assert rules.bounds(["fc1", "fc2", "fc3"]) == {"fc1": (0.0, 0.0), "fc2": (0.4, 0.4), "fc3": (0.3, 0.3)}


def test_iterative_layer_rates_leave_a_keep_dense_layer_dense(cli, tmp_path):
    import json

    out = tmp_path / "kf"
    code, _, err = cli("prune", *QUICK, "--method", "iterative", "--rounds", "2", "--pretrain-epochs", "1",
                       "--finetune-epochs", "0", "--sparsity", "0.5", "--keep-first", "dense", "--layer-rates", "fc1=0.3",
                       "--out", str(out))
    assert code == 0, err
    layers = {row["name"]: row for row in json.loads((out / "results.json").read_text())["layers"]}
    assert layers["fc1.weight"]["kept"] == layers["fc1.weight"]["total"] == 8192


def test_prunespec_integer_knobs_are_checked():
    with pytest.raises(PrunelabError, match="delta_t must be an integer >= 1"):
        PruneSpec(delta_t=0)
    with pytest.raises(PrunelabError, match="score_batches must be an integer >= 1"):
        PruneSpec(score_batches=-2)


def test_compress_refuses_to_overwrite_the_checkpoint_it_reads(cli, tmp_path):
    from prunelab.bench.models import build_model
    from prunelab.checkpoint import save_checkpoint
    from prunelab.masks import MaskSet

    model = build_model("digits_mlp", (64,), 10)
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, model, MaskSet.from_model(model, ["fc1.weight"]),
                    {"model": "digits_mlp", "dataset": "digits", "input_shape": [64], "num_classes": 10})
    before = (checkpoint / "model.safetensors").read_bytes()
    code, _, err = cli("compress", str(checkpoint), "--out", str(checkpoint / "model.safetensors"), "--no-progress")
    assert code == 2 and "would overwrite a file of the checkpoint" in err
    assert (checkpoint / "model.safetensors").read_bytes() == before
    code, _, err = cli("compress", str(checkpoint), "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "--out must name a file" in err
    shutil.rmtree(checkpoint)


def test_an_unreachable_target_is_refused_before_training(cli, tmp_path):
    started = time.perf_counter()
    code, _, err = cli("prune", *QUICK, "--method", "oneshot", "--keep-first", "dense", "--keep-last", "dense",
                       "--sparsity", "0.99", "--pretrain-epochs", "300", "--out", str(tmp_path / "out"))
    assert code == 2 and "the layer rules (dense / floor layers) keep at least 8832" in err
    assert time.perf_counter() - started < 5.0 and not (tmp_path / "out").exists()


def test_an_unset_sparsity_means_one_minus_n_over_m_in_the_api_and_the_cli(cli, tmp_path):
    from prunelab.config import RunConfig
    from prunelab.pipeline import validate

    assert RunConfig().sparsity == 0.9 and RunConfig(granularity="2:4").sparsity == 0.5
    assert RunConfig(granularity="nm").sparsity == 0.5 and RunConfig(granularity="2:4", sparsity=0.5).sparsity == 0.5
    validate(RunConfig(granularity="2:4", method="oneshot"))  # the API default is not refused
    code, _, err = cli("prune", *QUICK, "--granularity", "nm", "--method", "oneshot", "--pretrain-epochs", "1",
                       "--finetune-epochs", "0", "--out", str(tmp_path / "nm"))
    assert code == 0, err


def test_compress_given_checkpoint_json_still_protects_the_checkpoint(cli, tmp_path):
    from prunelab.bench.models import build_model
    from prunelab.checkpoint import save_checkpoint
    from prunelab.masks import MaskSet

    model = build_model("digits_mlp", (64,), 10)
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, model, MaskSet.from_model(model, ["fc1.weight"]),
                    {"model": "digits_mlp", "dataset": "digits", "input_shape": [64], "num_classes": 10})
    code, _, err = cli("compress", str(checkpoint / "checkpoint.json"), "--out", str(checkpoint / "model.safetensors"),
                       "--no-progress")
    assert code == 2 and "would overwrite a file of the checkpoint" in err


@pytest.mark.parametrize("extra, message", [
    (["--method", "snip", "--slimming-strength", "1e-4"],
     "--slimming-strength applies to dense pre-training, but --method snip trains sparse from scratch"),
    (["--method", "oneshot", "--pretrain-epochs", "0", "--slimming-strength", "1e-4"],
     "--slimming-strength applies to dense pre-training, but --pretrain-epochs is 0"),
    (["--method", "rigl", "--finetune-lr", "0.01"],
     "--finetune-lr sets the retraining rate after pruning a trained model, but --method rigl trains sparse"),
])
def test_options_the_run_would_silently_ignore_are_refused(cli, tmp_path, extra, message):
    code, out, err = cli("prune", *QUICK, "--model", "lenet5", "--epochs", "1", *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [
    ["--layer-rates", "nope=0.1"],   # refused by the layer-level checks (the model is needed for them)
    ["--keep-first", "nan"],
    ["--method", "oneshot", "--keep-first", "dense", "--keep-last", "dense", "--sparsity", "0.99"],
])
def test_input_refused_by_the_layer_checks_leaves_no_empty_output_parent(cli, tmp_path, extra, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("prune", *QUICK, "--pretrain-epochs", "1", *extra, "--out", "a/b/run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = cli("prune", *QUICK, "--pretrain-epochs", "1", *extra)  # the default runs/<model>-<method>-<hash>
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither a/b/ nor runs/ was created


def test_a_layer_rate_glob_naming_no_layer_is_refused_before_the_dense_training(cli, tmp_path):
    started = time.perf_counter()
    code, out, err = cli("prune", *QUICK, "--method", "iterative", "--pretrain-epochs", "2000", "--layer-rates",
                         "nope=0.1", "--out", str(tmp_path / "o"))
    assert code == 2 and "layer_rates pattern 'nope' matches no prunable layer" in err
    assert time.perf_counter() - started < 5.0 and not (tmp_path / "o").exists()  # 2000 dense epochs were not run


def test_layer_rates_with_a_method_without_rounds_are_refused(cli, tmp_path):
    code, _, err = cli("prune", *QUICK, "--method", "oneshot", "--pretrain-epochs", "1", "--layer-rates", "fc3=0.1",
                       "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--layer-rates sets per-round rates of --method iterative / lottery, but --method oneshot has no rounds" in err
    assert not (tmp_path / "o").exists()


def test_a_yaml_out_under_the_home_folder_is_expanded(cli, tmp_path, monkeypatch):
    from prunelab.config import load_yaml_config

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    config = work / "run.yaml"
    config.write_text("out: ~/runs/r\n")
    assert config_from_mapping(load_yaml_config(config)).out_dir() == home / "runs" / "r"
    code, out, err = cli("prune", "--config", str(config), *QUICK, "--method", "oneshot", "--pretrain-epochs", "1",
                         "--finetune-epochs", "0")
    assert code == 0, err
    assert (home / "runs" / "r" / "results.json").is_file() and not (work / "~").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "snip", "--criterion", "taylor"],
     "--method snip scores with its own criterion (snip), so --criterion taylor would be ignored"),
    (["--method", "random-uniform", "--criterion", "magnitude", "--allocation", "erk"],
     "--method random-uniform fixes the allocation (uniform), so --allocation erk would be ignored"),
])
def test_a_criterion_or_allocation_the_method_replaces_is_refused(cli, tmp_path, extra, message):
    code, _, err = cli("prune", *QUICK, "--epochs", "1", *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_report_names_the_criterion_the_method_scored_with(cli, tmp_path):
    import json

    out = tmp_path / "grasp"
    code, _, err = cli("prune", *QUICK, "--method", "grasp", "--epochs", "1", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "results.json").read_text())
    assert record["criterion"] == "grasp" and record["config"]["criterion"] == "magnitude"
    assert record["pretrain_epochs_run"] == 0  # grasp prunes at init: no dense training ran, whatever the flag says
    report = (out / "report.md").read_text()
    assert "Method `grasp`, criterion `grasp`" in report and "criterion `magnitude`" not in report


def test_a_config_that_is_a_folder_says_so(cli, tmp_path):
    code, _, err = cli("prune", "--config", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"config file '{tmp_path}' is a folder; pass a YAML file" in err and "does not exist" not in err


@pytest.mark.parametrize("extra, message", [
    (["--method", "snip", "--pretrain-epochs", "5"],
     "--pretrain-epochs 5 would be ignored: --method snip prunes at init and trains sparse from scratch for --epochs"),
    (["--method", "rigl", "--finetune-epochs", "2"],
     "--finetune-epochs 2 would be ignored: --method rigl prunes at init and trains sparse from scratch"),
    (["--method", "oneshot", "--epochs", "3"],
     "--epochs 3 would be ignored: it sets the training of --method gradual and of the sparse-from-scratch methods"),
    (["--method", "oneshot", "--rounds", "3"],
     "--rounds 3 would be ignored: it sets the pruning rounds of --method iterative / lottery, but --method oneshot"),
    (["--method", "iterative", "--num-updates", "4"],
     "--num-updates 4 would be ignored: it sets the mask updates of --method gradual's cubic schedule"),
    (["--method", "static", "--delta-t", "50"],
     "--delta-t 50 would be ignored: it drives the mask updates of dynamic sparse training (--method set / dsr"),
    (["--method", "gradual", "--alpha", "0.2"], "--alpha 0.2 would be ignored: "),
    (["--method", "iterative", "--score-batches", "4"],
     "--score-batches 4 would be ignored: --method iterative with criterion magnitude scores without batches"),
    (["--method", "synflow", "--score-batches", "4"], "--method synflow with criterion synflow scores without"),
    (["--method", "oneshot", "--finetune-epochs", "0", "--finetune-lr", "0.01"],
     "--finetune-lr 0.01 would be ignored: --finetune-epochs is 0, so nothing is retrained"),
    (["--optimizer", "adam", "--momentum", "0.5"],
     "--momentum 0.5 would be ignored: --optimizer adam has no momentum setting"),
    (["--data-dir", "/tmp"], "--data-dir /tmp would be ignored: --dataset digits is bundled with scikit-learn"),
    (["--download"], "--download would be ignored: --dataset digits is bundled with scikit-learn and reads no files"),
])
def test_a_given_option_the_method_would_ignore_is_refused_before_training(cli, tmp_path, extra, message):
    started = time.perf_counter()
    code, out, err = cli("prune", *QUICK, *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert time.perf_counter() - started < 5.0 and not (tmp_path / "o").exists()


def test_options_left_at_their_defaults_or_used_by_the_method_are_not_refused(cli, tmp_path):
    from prunelab.config import RunConfig
    from prunelab.pipeline import validate

    for method in ("snip", "rigl", "static", "lottery", "oneshot", "gradual"):
        validate(RunConfig(method=method))  # the API's defaults (pretrain_epochs=30, rounds=5, ...) are not "given"
    validate(RunConfig(method="rigl", delta_t=50, alpha=0.2, epochs=3, pretrain_epochs=0, finetune_epochs=0))
    validate(RunConfig(method="gradual", num_updates=4, epochs=3, finetune_epochs=2, score_batches=2, criterion="taylor"))
    validate(RunConfig(method="snip", score_batches=2, optimizer="adam"))
    with pytest.raises(PrunelabError, match="--pretrain-epochs 5 would be ignored"):
        validate(RunConfig(method="snip", pretrain_epochs=5))  # the API: a non-default value counts as asked for
    # a YAML file may repeat every default (e.g. results.json's "config"): only values that differ count
    config = tmp_path / "run.yaml"
    config.write_text("method: snip\npretrain_epochs: 30\nrounds: 5\nfinetune_epochs: 8\nnum_updates: 10\n"
                      "momentum: 0.9\nepochs: 1\nscore_batches: 2\nprogress: false\n")
    code, _, err = cli("prune", "--config", str(config), "--model", "digits_mlp", "--pretrain-epochs", "0",
                       "--out", str(tmp_path / "snip"))
    assert code == 0, err
    config.write_text("method: snip\npretrain_epochs: 3\n")
    code, _, err = cli("prune", "--config", str(config), *QUICK, "--out", str(tmp_path / "o"))
    assert code == 2 and "--pretrain-epochs 3 would be ignored" in err


@pytest.mark.parametrize("values, message", [
    ({"finetune_lr": 1e300}, r"^--finetune-lr 1e\+300 is too large for torch \(beyond float32, 3\.4e\+38\); pass a "),
    ({"lr": 1e300}, r"^lr 1e\+300 is too large for torch \(beyond float32, 3\.4e\+38\); pass a realistic value$"),
    ({"weight_decay": 1e300}, r"^weight_decay 1e\+300 is too large for torch"),
    ({"batch_size": 2**63}, r"^batch_size 9223372036854775808 is too large for torch \(at most 9\.22e\+18"),
])
def test_api_validate_refuses_numbers_torch_cannot_hold(values, message):
    from prunelab.config import RunConfig
    from prunelab.pipeline import validate

    with pytest.raises(PrunelabError, match=message) as info:
        validate(RunConfig(**values))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("values, message", [
    ({"method": "iterative", "rounds": 10**12}, r"^--rounds must be <= 1,000,000 \(each mask update rescores the model\), "
                                                r"got 1,000,000,000,000; use fewer$"),
    ({"method": "gradual", "num_updates": 10**7}, r"^--num-updates must be <= 1,000,000 .*got 10,000,000; use fewer$"),
])
def test_api_validate_refuses_more_mask_updates_than_a_schedule_makes_before_training(values, message):
    from prunelab.config import RunConfig
    from prunelab.pipeline import validate

    with pytest.raises(PrunelabError, match=message):
        validate(RunConfig(**values))


# --- the gradual window, the layer floor and round counts reach the CLI ------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--method", "oneshot", "--start-epoch", "2"],
     "--start-epoch 2 would be ignored: it sets when --method gradual's cubic schedule starts pruning, but --method "
     "oneshot has no such schedule; drop --start-epoch"),
    (["--method", "static", "--end-fraction", "0.5"],
     "--end-fraction 0.5 would be ignored: it sets when --method gradual stops pruning and when --method set / dsr / "
     "rigl / snfs stop rewiring, but --method static changes no mask while training; drop --end-fraction"),
    (["--method", "iterative", "--end-fraction", "0.5"], "--end-fraction 0.5 would be ignored"),
    (["--method", "rigl", "--start-epoch", "1"], "--start-epoch 1 would be ignored"),
    (["--method", "oneshot", "--no-layer-floor"],
     "--no-layer-floor would be ignored: --granularity unstructured prunes single weights, which are never floored"),
    (["--method", "oneshot", "--granularity", "channel", "--allocation", "uniform", "--no-layer-floor"],
     "--no-layer-floor would be ignored: only --allocation global floors layers; --allocation uniform has no floor"),
    (["--method", "oneshot", "--granularity", "2:4", "--no-layer-floor"],
     "--no-layer-floor would be ignored: the N:M pattern 2:4 is decided inside blocks"),
    (["--method", "random-uniform", "--granularity", "channel", "--no-layer-floor"],
     "--no-layer-floor would be ignored: --method random-uniform fixes its own allocation (uniform)"),
    (["--method", "gradual", "--start-epoch", "-1"], "--start-epoch must be an integer >= 0 (0: prune from the first"),
    (["--method", "gradual", "--end-fraction", "0"], "--end-fraction must be in (0, 1] (a fraction of --epochs"),
    (["--method", "rigl", "--end-fraction", "1.5"], "--end-fraction must be in (0, 1]"),
    (["--method", "gradual", "--end-fraction", "nan"], "--end-fraction must be in (0, 1]"),
])
def test_schedule_window_and_floor_options_are_checked_and_refused_where_ignored(cli, tmp_path, extra, message):
    code, out, err = cli("prune", *QUICK, *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_layer_floor_and_the_gradual_window_are_accepted_where_used():
    from prunelab.config import RunConfig
    from prunelab.pipeline import validate

    validate(RunConfig(method="gradual", start_epoch=2, end_fraction=0.9, epochs=5))
    validate(RunConfig(method="rigl", end_fraction=0.5, epochs=3))
    validate(RunConfig(method="oneshot", granularity="channel", layer_floor=False))
    validate(RunConfig(method="snip", granularity="kernel", layer_floor=False, model="lenet5"))
    # --layer-floor (the default) says what happens anyway: accepted with any granularity
    validate(RunConfig(method="oneshot"), given={"layer_floor"})


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "3", "--start-epoch", "3"],
     "gradual pruning starts at epoch 3 (--start-epoch), but the run trains 3 epoch(s) (--epochs): it would never "
     "prune; pass --start-epoch < --epochs"),
    (["--epochs", "4", "--start-epoch", "2", "--end-fraction", "0.5"],
     "gradual pruning ends at step 46 of 92 (--end-fraction 0.5 of --epochs 4), not after it starts at step 46 "
     "(--start-epoch 2); pass a larger --end-fraction (> 0.5) or an earlier --start-epoch"),
    (["--epochs", "1", "--num-updates", "1000"],
     "gradual pruning needs room for 1000 updates (--num-updates) between step 0 and 17 of 23 (23 per epoch): at "
     "most 17 fit there"),
    (["--epochs", "0"], "gradual pruning prunes while training, but the run has 0 steps"),
])
def test_a_gradual_window_that_cannot_hold_the_schedule_is_refused_before_the_dense_training(
        cli, tmp_path, monkeypatch, extra, message):
    import prunelab.pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the gradual window was checked")

    monkeypatch.setattr(prunelab.pipeline, "train", no_training)  # was: 30 dense epochs, then the error
    code, out, err = cli("prune", *QUICK, "--method", "gradual", *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "iterative", "--pretrain-epochs", "1", "--rounds", "1000000"],
     "--rounds 1,000,000 is more than the 17,024 weights of digits_mlp there are to prune: each round prunes at least "
     "one, so later rounds would only retrain the same mask; pass --rounds 17,024 or fewer"),
    (["--method", "iterative", "--pretrain-epochs", "1", "--granularity", "channel", "--rounds", "203"],
     "--rounds 203 is more than the 202 channel groups of digits_mlp"),
    (["--method", "lottery", "--epochs", "1", "--rounds", "20000"], "--rounds 20,000 is more than the 17,024 weights"),
])
def test_more_rounds_than_groups_to_prune_are_refused_before_training(cli, tmp_path, monkeypatch, extra, message):
    import prunelab.pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("trained before --rounds was checked")

    monkeypatch.setattr(prunelab.pipeline, "train", no_training)
    started = time.perf_counter()
    code, out, err = cli("prune", *QUICK, *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert time.perf_counter() - started < 5.0 and not (tmp_path / "o").exists()


def test_new_fields_at_their_defaults_keep_the_run_folder_hash():
    import dataclasses
    import hashlib
    import json

    from prunelab.config import LATER_FIELDS, RunConfig

    config = RunConfig(method="gradual", sparsity=0.8)
    payload = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in ("out", "progress", "data_dir", "download", *LATER_FIELDS)}
    assert config.digest() == hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]
    assert RunConfig(method="gradual", sparsity=0.8, start_epoch=1).digest() != config.digest()
    assert RunConfig(method="gradual", sparsity=0.8, end_fraction=0.5).digest() != config.digest()
    assert RunConfig(granularity="channel", layer_floor=False).digest() != RunConfig(granularity="channel").digest()


def test_yaml_accepts_the_schedule_window_and_floor_keys():
    config = config_from_mapping({"method": "gradual", "start_epoch": 1, "end_fraction": 1, "layer_floor": False}, "c.yaml")
    assert (config.start_epoch, config.end_fraction, config.layer_floor) == (1, 1.0, False)
    with pytest.raises(PrunelabError, match="start_epoch in c.yaml must be an integer, got 1.5"):
        config_from_mapping({"start_epoch": 1.5}, "c.yaml")
    with pytest.raises(PrunelabError, match="layer_floor in c.yaml must be true or false"):
        config_from_mapping({"layer_floor": "no"}, "c.yaml")
