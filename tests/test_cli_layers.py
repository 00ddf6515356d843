"""``prunelab drop-layers``: the shallower model reloads, the report names what was dropped, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch


def test_drops_the_lowest_influence_block_and_reloads(cli, tmp_path, tiny_bert, data_dir):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "shallow"
    code, stdout, err = cli("drop-layers", "--model", str(tiny_bert), "--count", "1", "--calib-samples", "8",
                            "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    scores = report["block_influence"]
    assert list(scores) == ["encoder.layer.0", "encoder.layer.1"]
    assert report["dropped"] == [min(scores, key=scores.get)]
    assert report["summary"]["blocks_after"] == 1 and report["summary"]["params_after"] < report["summary"]["params_before"]
    assert "<- dropped" in stdout and "block influence" in (out / "report.md").read_text()
    model = transformers.AutoModel.from_pretrained(str(out), local_files_only=True)
    assert model.config.num_hidden_layers == 1 and len(model.encoder.layer) == 1
    dense = transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True)
    kept = 1 - int(report["dropped"][0].rsplit(".", 1)[1])
    assert torch.equal(model.encoder.layer[0].output.dense.weight, dense.encoder.layer[kept].output.dense.weight)


@pytest.mark.parametrize(("argv", "message"), [
    (["--count", "0"], "--count must be a positive integer"),
    (["--count", "2"], "would drop all 2 blocks"),
    (["--count", "1", "--calib-samples", "0"], "--calib-samples must be a positive integer"),
])
def test_bad_inputs_exit_2_with_one_line_and_nothing_written(cli, tmp_path, tiny_bert, data_dir, argv, message):
    out = tmp_path / "never"
    code, _, err = cli("drop-layers", "--model", str(tiny_bert), "--calib-samples", "4", "--data-dir", str(data_dir),
                       "--out", str(out), "--no-progress", *argv)  # argparse keeps the last value of a flag
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_count_of_every_block_is_refused_before_calibration(cli, tmp_path, tiny_bert, data_dir, monkeypatch):
    import prunelab.cli_layers

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before --count was checked")

    monkeypatch.setattr(prunelab.cli_layers, "calibration_for", no_calibration)
    out = tmp_path / "never"
    code, _, err = cli("drop-layers", "--model", str(tiny_bert), "--count", "5", "--data-dir", str(data_dir),
                       "--out", str(out), "--no-progress")
    assert code == 2 and "--count 5 would drop all 2 blocks" in err and "use at most 1" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_drop_layers_and_oneshot_replace_their_own_output_but_not_each_others(cli, tmp_path, tiny_bert, data_dir):
    pytest.importorskip("prunelab.oneshot")
    common = ["--model", str(tiny_bert), "--calib-samples", "2", "--data-dir", str(data_dir), "--no-progress"]
    shallow, pruned = tmp_path / "shallow", tmp_path / "pruned"
    for _ in range(2):  # re-running into its own folder replaces it
        code, _, err = cli("drop-layers", *common, "--count", "1", "--out", str(shallow))
        assert code == 0, err
    code, _, err = cli("oneshot", *common, "--method", "magnitude", "--out", str(pruned))
    assert code == 0, err
    for argv, out, message in (
        (["oneshot", *common, "--method", "magnitude"], shallow,
         "holds a drop-layers output (report.json), not an earlier oneshot output"),  # same file names, other record
        (["drop-layers", *common, "--count", "1"], pruned,
         "holds a oneshot output (masks.safetensors), not an earlier drop-layers output"),
    ):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, stdout, err = cli(*argv, "--out", str(out))
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
        assert f"--out {str(out)!r} {message}; {argv[0]} replaces its whole --out folder" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "shallow"]  # no temporary folder left


def test_drop_layers_refuses_to_replace_a_prune_checkpoint(cli, tmp_path, tiny_bert, data_dir):
    from prunelab.bench.models import build_model
    from prunelab.checkpoint import save_checkpoint
    from prunelab.masks import MaskSet

    model = build_model("digits_mlp", (64,), 10)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, MaskSet.from_model(model, ["fc1.weight"]),
                           {"model": "digits_mlp", "dataset": "digits", "input_shape": [64], "num_classes": 10})
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    code, _, err = cli("drop-layers", "--model", str(tiny_bert), "--count", "1", "--calib-samples", "2",
                       "--data-dir", str(data_dir), "--no-progress", "--out", str(ckpt))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds a prune / demo run (checkpoint.json, masks.safetensors), not an earlier drop-layers output" in err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
