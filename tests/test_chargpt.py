"""The Tiny Shakespeare char-GPT and its data: shapes, parameter count, determinism, errors, cache."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import pytest
import torch

from prunelab.bench.chargpt import (
    CharGPT,
    CharGPTConfig,
    CharGPTTrainConfig,
    chargpt_cache_root,
    evaluate_loss,
    load_chargpt,
    load_or_train_chargpt,
    save_chargpt,
)
from prunelab.bench.text import (
    calibration_lines,
    calibration_sequences,
    eval_windows,
    find_tinyshakespeare,
    get_batch,
    held_out_lines,
    load_tinyshakespeare,
    split_lines,
    train_batches,
)
from prunelab.errors import PrunelabError

TINY = CharGPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)
TINY_TRAIN = CharGPTTrainConfig(model=TINY, iters=3, batch_size=4, warmup_iters=1, eval_windows=4)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture
def small_data(tmp_path) -> Path:
    """A data folder with a synthetic ``tinyshakespeare/input.txt`` of ~12k characters."""
    lines = [f"Line number {i} of the play, said {'ABCDEFG'[i % 7]}!" for i in range(300)]
    folder = tmp_path / "data"
    (folder / "tinyshakespeare").mkdir(parents=True)
    (folder / "tinyshakespeare" / "input.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def real_data() -> Path:
    try:
        return find_tinyshakespeare(None)
    except PrunelabError:
        pytest.skip("tinyshakespeare/input.txt not found in $PRUNELAB_DATA or ../shared/data; set PRUNELAB_DATA")


# --- model ----------------------------------------------------------------------------------
def test_default_model_shapes_and_param_count():
    model = CharGPT(CharGPTConfig())
    # wte 65*128 + wpe 64*128 + 4 blocks * 198,272 + ln_f 256 + lm_head 65*128 (no bias)
    assert model.num_params() == 8320 + 8192 + 4 * 198_272 + 256 + 8320 == 818_176
    idx = torch.randint(0, 65, (3, 64))
    assert model(idx).shape == (3, 64, 65)
    assert model(idx[:, :10]).shape == (3, 10, 65)
    with pytest.raises(PrunelabError, match="longer than block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_linear_names_and_blocks_for_oneshot_pruners():
    model = CharGPT(CharGPTConfig())
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"blocks.0.attn.c_attn", "blocks.0.attn.c_proj", "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj",
            "lm_head"} <= linears
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 4
    assert len(linears) == 4 * 4 + 1


def test_causal_logits_do_not_see_the_future():
    model = CharGPT(TINY)
    idx = torch.randint(0, 30, (1, 16))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 30
    torch.testing.assert_close(model(idx)[:, :-1], model(changed)[:, :-1])


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = CharGPT(TINY, seed=0), CharGPT(TINY, seed=0), CharGPT(TINY, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.c_attn.weight, c.blocks[0].attn.c_attn.weight)


def test_config_rejects_bad_shapes_in_one_line():
    with pytest.raises(PrunelabError) as exc:
        CharGPTConfig(n_embd=130, n_head=4)
    assert "not divisible by n_head 4" in _one_line(exc)
    with pytest.raises(PrunelabError):
        CharGPTConfig(n_layer=0)
    with pytest.raises(PrunelabError):
        CharGPTTrainConfig(iters=10, warmup_iters=10)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = CharGPTTrainConfig(iters=100, warmup_iters=10, lr=1e-3, min_lr=1e-4)
    lrs = [cfg.lr_at(i) for i in range(100)]
    assert lrs[0] < lrs[9] <= 1e-3 and lrs[10] == pytest.approx(1e-3)
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))
    assert cfg.lr_at(100) == pytest.approx(1e-4)


# --- data -----------------------------------------------------------------------------------
def test_batches_are_deterministic_and_shifted_by_one():
    data = torch.arange(1000)
    x1, y1 = get_batch(data, 8, 16, torch.Generator().manual_seed(3))
    x2, y2 = get_batch(data, 8, 16, torch.Generator().manual_seed(3))
    assert x1.shape == y1.shape == (8, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(y1, x1 + 1)
    stream_a, stream_b = train_batches(data, 4, 8, seed=5), train_batches(data, 4, 8, seed=5)
    for _ in range(3):
        assert torch.equal(next(stream_a)[0], next(stream_b)[0])
    assert not torch.equal(next(train_batches(data, 4, 8, seed=6))[0], next(train_batches(data, 4, 8, seed=5))[0])


def test_eval_windows_tile_the_split():
    data = torch.arange(100)
    x, y = eval_windows(data, 16)
    assert x.shape == (6, 16) and torch.equal(x.flatten(), data[:96]) and torch.equal(y, x + 1)
    assert eval_windows(data, 16, max_windows=2)[0].shape == (2, 16)


def test_loader_finds_data_dir_and_splits_90_10(small_data):
    corpus = load_tinyshakespeare(small_data)
    assert corpus.path == os.fspath(small_data / "tinyshakespeare" / "input.txt")
    assert corpus.train.numel() == int(0.9 * len(corpus.text))
    assert corpus.train.numel() + corpus.val.numel() == len(corpus.text)
    assert corpus.decode(corpus.encode("Line 12")) == "Line 12"
    # also found directly in the folder and through $PRUNELAB_DATA
    assert find_tinyshakespeare(small_data / "tinyshakespeare").name == "input.txt"


def test_loader_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(PrunelabError) as exc:
        load_tinyshakespeare(tmp_path / "nowhere")
    message = _one_line(exc)
    assert "nowhere" in message and "--data-dir" in message and "PRUNELAB_DATA" in message
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path))
    with pytest.raises(PrunelabError, match=r"from \$PRUNELAB_DATA"):
        load_tinyshakespeare()
    (tmp_path / "input.txt").write_text("too short")
    with pytest.raises(PrunelabError) as exc:
        load_tinyshakespeare()
    assert "only 9 characters" in _one_line(exc)


def test_calibration_and_held_out_lines_are_disjoint(small_data):
    corpus = load_tinyshakespeare(small_data)
    calib = calibration_sequences(corpus, 10, 16, seed=0, batch_size=4)
    assert [b.shape for b in calib] == [(4, 16), (4, 16), (2, 16)]
    assert torch.equal(torch.cat(calib), torch.cat(calibration_sequences(corpus, 10, 16, seed=0, batch_size=4)))
    lines = calibration_lines(corpus, 20)
    held = held_out_lines(corpus, 20, exclude=lines)
    assert len(set(held)) == 20 and not set(held) & set(split_lines(corpus, "train"))
    with pytest.raises(PrunelabError) as exc:
        calibration_sequences(corpus, 0, 16)
    assert "calibration samples must be a positive integer" in _one_line(exc)
    with pytest.raises(PrunelabError, match="use fewer"):
        held_out_lines(corpus, 10_000)


def test_real_tinyshakespeare_has_65_chars_and_1000_held_out_lines(real_data):
    corpus = load_tinyshakespeare(real_data.parent.parent)
    assert corpus.vocab_size == 65 and len(corpus.text) == 1_115_394
    assert corpus.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    calib = calibration_lines(corpus, 128)
    held = held_out_lines(corpus, 1000, exclude=calib)
    assert len(held) == 1000 and not set(held) & set(calib) and all(held)


# --- training and cache ------------------------------------------------------------------------
def test_train_caches_and_reuses_the_model(small_data, tmp_path):
    cache = tmp_path / "cache"
    model, meta = load_or_train_chargpt(small_data, cache, progress=False, train_config=TINY_TRAIN)
    assert meta["cached"] is False and meta["model_args"]["vocab_size"] == load_tinyshakespeare(small_data).vocab_size
    folder = Path(meta["folder"])
    assert folder.parent == cache and folder.name == meta["sha256"][:12]
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json"}
    again, meta2 = load_or_train_chargpt(small_data, cache, progress=False, train_config=TINY_TRAIN)
    assert meta2["cached"] is True and meta2["sha256"] == meta["sha256"]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = dataclasses.replace(TINY_TRAIN, seed=1)
    _, meta3 = load_or_train_chargpt(small_data, cache, progress=False, train_config=other)
    assert meta3["cached"] is False and meta3["folder"] != meta["folder"]


def test_cache_root_follows_prunelab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))
    assert chargpt_cache_root() == tmp_path / "chargpt"
    assert chargpt_cache_root(tmp_path / "x") == tmp_path / "x"


def test_save_load_round_trip_and_errors(tmp_path):
    model = CharGPT(TINY, seed=4)
    save_chargpt(model, tmp_path, {"note": "x"})
    loaded, meta = load_chargpt(tmp_path)
    assert meta["note"] == "x" and loaded.config == TINY
    x = torch.randint(0, 30, (2, 16))
    torch.testing.assert_close(loaded(x), model(x))
    assert evaluate_loss(loaded, x, x)["perplexity"] > 1
    with pytest.raises(PrunelabError) as exc:
        load_chargpt(tmp_path / "missing")
    assert "not a char-GPT checkpoint" in _one_line(exc)


@pytest.mark.parametrize("damage", ["weights", "config", "weights_missing"])
def test_damaged_cache_entry_is_trained_again_not_fatal(small_data, tmp_path, damage):
    cache = tmp_path / "cache"
    model, meta = load_or_train_chargpt(small_data, cache, progress=False, train_config=TINY_TRAIN)
    folder = Path(meta["folder"])
    if damage == "weights":
        (folder / "model.safetensors").write_bytes(b"\x00garbage")
    elif damage == "config":
        (folder / "config.json").write_text("{ not json")
    else:
        (folder / "model.safetensors").unlink()
    again, meta2 = load_or_train_chargpt(small_data, cache, progress=False, train_config=TINY_TRAIN)
    assert meta2["cached"] is False and meta2["folder"] == meta["folder"]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # the same recipe trains the same model
    assert load_or_train_chargpt(small_data, cache, progress=False, train_config=TINY_TRAIN)[1]["cached"] is True


def test_training_with_dropout_is_seeded_and_leaves_the_global_rng_alone(small_data):
    from prunelab.bench.chargpt import train_chargpt

    corpus = load_tinyshakespeare(small_data)
    config = dataclasses.replace(TINY_TRAIN, model=dataclasses.replace(TINY, dropout=0.2))
    state = torch.get_rng_state()
    a, _ = train_chargpt(corpus, config, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # whatever the caller's RNG did in between
    b, _ = train_chargpt(corpus, config, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_evaluate_loss_restores_train_mode_on_error_and_rejects_no_windows():
    model = CharGPT(TINY).train()
    with pytest.raises(PrunelabError, match="longer than block_size"):
        evaluate_loss(model, torch.zeros(2, 20, dtype=torch.long), torch.zeros(2, 20, dtype=torch.long))
    assert model.training
    empty = torch.zeros(0, 16, dtype=torch.long)
    with pytest.raises(PrunelabError, match="no tokens"):
        evaluate_loss(model, empty, empty)
    assert model.training
