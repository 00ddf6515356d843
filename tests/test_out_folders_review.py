"""Review of output folders and progress output: links as --out, plain progress lines off a terminal."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from tqdm import tqdm

from prunelab.bench.training import TrainConfig, train
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir
from prunelab.out_folders import OutFiles, check_out_folder, link_target
from prunelab.pipeline import PRUNE_OUTPUT
from prunelab.progress import LineProgress, is_terminal, progress_bar


WRITES = OutFiles("prune", ("results.json", "report.md"), output="run")


class FakeClock:
    """A clock that reads ``now`` and moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- progress output ------------------------------------------------------------------------
def test_line_progress_writes_one_plain_line_per_tenth():
    stream, clock = io.StringIO(), FakeClock()
    bar = LineProgress(20, "dense", stream, clock=clock)
    for step in range(1, 21):
        clock.now += 0.25
        bar.set_postfix(loss=f"{1.0 / step:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    expected = "".join(f"dense: {n}/20 ({5 * n}%) {0.25 * n:.1f} s, loss={1.0 / n:.4f}\n" for n in range(2, 21, 2))
    assert stream.getvalue() == expected


def test_line_progress_uneven_total_and_large_updates():
    stream, clock = io.StringIO(), FakeClock()
    bar = LineProgress(3, "train char-GPT", stream, clock=clock)
    bar.update(1)  # 33%: parts 1..3 of 10 reached at once -> one line
    bar.update(2)  # 100%
    assert stream.getvalue() == "train char-GPT: 1/3 (33%) 0.0 s\ntrain char-GPT: 3/3 (100%) 0.0 s\n"


def test_line_progress_shows_life_every_minute_and_nothing_for_an_empty_total():
    stream, clock = io.StringIO(), FakeClock()
    bar = LineProgress(1000, "slow", stream, clock=clock)
    bar.update(1)  # 0.1%: no new tenth, no minute passed
    clock.now += 59.9
    bar.update(1)
    assert stream.getvalue() == ""
    clock.now += 0.1  # 60 s since the start (no line yet): one now
    bar.update(1)
    clock.now += 30.0
    bar.update(1)
    assert stream.getvalue() == "slow: 3/1000 (0%) 60.0 s\n"
    empty = io.StringIO()
    nothing = LineProgress(0, "none", empty, clock=clock)
    nothing.update(5)
    nothing.close()
    assert empty.getvalue() == ""


def test_is_terminal():
    closed = io.StringIO()
    closed.close()
    assert [is_terminal(s) for s in (io.StringIO(), Terminal(), object(), closed)] == [False, True, False, False]


def test_progress_bar_picks_lines_off_a_terminal_and_tqdm_on_one():
    log = io.StringIO()
    assert isinstance(progress_bar(5, "x", True, stream=log), LineProgress)
    terminal = Terminal()
    bar = progress_bar(5, "x", True, stream=terminal)
    assert isinstance(bar, tqdm)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in terminal.getvalue()  # the live bar, redrawn in place
    quiet = io.StringIO()  # disabled: a tqdm that shows nothing, terminal or not
    for stream in (quiet, Terminal()):
        off = progress_bar(5, "x", False, stream=stream)
        assert isinstance(off, tqdm) and off.disable
        off.update(5)
        off.close()
        assert stream.getvalue() == ""


def test_progress_bar_passes_tqdm_its_options():
    calls = []

    def recording(**kwargs):
        calls.append(kwargs)
        return "bar"

    terminal = Terminal()
    assert progress_bar(7, "d", True, bar=recording, stream=terminal, mininterval=1.0) == "bar"
    assert calls == [{"total": 7, "desc": "d", "leave": False, "disable": False, "file": terminal, "mininterval": 1.0}]


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 2, generator=generator), torch.tensor([0, 1, 0, 1])) for _ in range(2)]


def test_train_progress_off_a_terminal_is_plain_lines_with_each_steps_loss(monkeypatch):
    losses = []

    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        losses.append(loss.item())
        return loss

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    train(model, _batches(), TrainConfig(epochs=2, lr=0.1, progress=True), loss_fn=loss_fn, description="dense")
    monkeypatch.undo()
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and len(lines) == 4 == len(losses)
    for n, (line, loss) in enumerate(zip(lines, losses, strict=True), start=1):
        assert re.fullmatch(rf"dense: {n}/4 \({25 * n}%\) \d+\.\d s, loss={loss:.4f}\n", line), line
    torch.manual_seed(0)  # the same training without progress output: the same weights
    quiet = nn.Linear(2, 2)
    train(quiet, _batches(), TrainConfig(epochs=2, lr=0.1, progress=False), description="dense")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), quiet.state_dict().values()))


def test_train_progress_written_to_a_log_file_has_no_carriage_returns(tmp_path):
    script = (
        "import torch\n"
        "from torch import nn\n"
        "from prunelab.bench.training import TrainConfig, train\n"
        "torch.manual_seed(0)\n"
        "batches = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))] * 5\n"
        "train(nn.Linear(2, 2), batches, TrainConfig(epochs=2, lr=0.1, progress=True), description='dense')\n"
    )
    log = tmp_path / "log"
    with open(log, "w") as stderr:  # like `prunelab prune ... 2> log`
        done = subprocess.run([sys.executable, "-c", script], stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=120)
    assert done.returncode == 0
    text = log.read_bytes().decode()  # not read_text(): its universal newlines turn '\r' into '\n'
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10
    for n, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"dense: {n}/10 \({10 * n}%\) \d+\.\d s, loss=\d+\.\d{{4}}", line), line


def test_chargpt_training_progress_off_a_terminal(monkeypatch):
    from prunelab.bench.chargpt import CharGPTConfig, CharGPTTrainConfig, train_chargpt
    from prunelab.bench.text import CharCorpus

    text = "".join(f"Line {i} of the play, said {'ABCDEFG'[i % 7]}!\n" for i in range(60))
    chars = "".join(sorted(set(text)))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n_train = int(0.9 * len(ids))
    corpus = CharCorpus(text=text, chars=chars, train=ids[:n_train], val=ids[n_train:], path="synthetic", sha256="0")
    config = CharGPTTrainConfig(model=CharGPTConfig(vocab_size=len(chars), block_size=8, n_layer=1, n_head=1, n_embd=8),
                                iters=4, batch_size=2, warmup_iters=1, eval_windows=2)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    model, _ = train_chargpt(corpus, config, progress=True)
    monkeypatch.undo()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4
    loss = re.fullmatch(r"train char-GPT: 1/4 \(25%\) \d+\.\d s, loss=(\d+\.\d{3})", lines[0]).group(1)
    for n, line in enumerate(lines, start=1):  # the loss is shown every 50 iterations: iteration 0's throughout
        assert re.fullmatch(rf"train char-GPT: {n}/4 \({25 * n}%\) \d+\.\d s, loss={loss}", line), line
    quiet, _ = train_chargpt(corpus, config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), quiet.state_dict().values()))


# --- links as --out ---------------------------------------------------------------------------
def _run_folder(folder, accuracy):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config_hash": "abc", "accuracy": accuracy}))
    (folder / "report.md").write_text(f"# run {accuracy}\n")


def test_a_dangling_link_is_refused_before_any_work(tmp_path):
    link = tmp_path / "run"
    os.symlink(tmp_path / "disk" / "runs" / "a", link)  # the disk is not mounted
    with pytest.raises(PrunelabError) as exc:
        check_out_folder(link, WRITES)
    assert str(exc.value) == (
        f"--out {str(link)!r} is a symbolic link to {str(tmp_path / 'disk' / 'runs' / 'a')!r}, which does not exist "
        "(or loops); create the folder it points to (or mount its disk), or remove the link"
    )
    assert os.readlink(link) == str(tmp_path / "disk" / "runs" / "a") and os.listdir(tmp_path) == ["run"]


def test_a_loop_of_links_is_refused(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(PrunelabError, match=r"is a symbolic link to 'b', which does not exist \(or loops\)"):
        check_out_folder(tmp_path / "a", WRITES)


def test_link_target_follows_chains_and_leaves_other_paths_alone(tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink("disk", tmp_path / "l1")
    os.symlink(tmp_path / "l1", tmp_path / "l2")
    assert link_target(tmp_path / "l2") == (tmp_path / "disk").resolve()
    assert link_target(tmp_path / "disk") == tmp_path / "disk"
    assert link_target(tmp_path / "new") == tmp_path / "new"


def test_a_link_is_judged_by_what_its_target_holds(tmp_path):
    _run_folder(tmp_path / "disk" / "a", 0.5)
    os.symlink(tmp_path / "disk" / "a", tmp_path / "run")
    assert check_out_folder(tmp_path / "run", WRITES) == tmp_path / "run"
    (tmp_path / "disk" / "a" / "notes.txt").write_text("mine")
    with pytest.raises(PrunelabError, match=r"holds files prune does not write \(notes.txt\), not an earlier prune run"):
        check_out_folder(tmp_path / "run", WRITES)


def test_atomic_dir_through_a_link_replaces_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "disk" / "runs" / "a"
    _run_folder(target, 0.5)
    (tmp_path / "work").mkdir()
    link = tmp_path / "work" / "run"
    os.symlink(target, link)
    with atomic_dir(link) as tmp:
        (tmp / "results.json").write_text('{"config_hash": "new"}')
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert os.listdir(target) == ["results.json"] and (target / "results.json").read_text() == '{"config_hash": "new"}'
    assert os.listdir(tmp_path / "work") == ["run"] and os.listdir(target.parent) == ["a"]  # no temporary leftovers


def test_atomic_dir_refuses_a_dangling_link(tmp_path):
    link = tmp_path / "run"
    os.symlink(tmp_path / "missing", link)
    with pytest.raises(PrunelabError, match="is a symbolic link to .*which does not exist"):
        with atomic_dir(link) as tmp:
            (tmp / "results.json").write_text("{}")
    assert os.path.islink(link) and os.listdir(tmp_path) == ["run"]


def test_prune_into_a_linked_run_folder_writes_through_the_link(tmp_path, capsys):
    from prunelab.cli import main

    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    os.symlink(target, tmp_path / "run")
    argv = ["prune", "--model", "digits_mlp", "--dataset", "digits", "--method", "oneshot", "--pretrain-epochs", "1",
            "--finetune-epochs", "0", "--no-progress", "--sparsity", "0.5", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    capsys.readouterr()
    assert os.path.islink(tmp_path / "run")
    assert json.loads((target / "results.json").read_text())["target_sparsity"] == 0.5


# --- folders that are not a prunelab run ------------------------------------------------------------
def test_prune_does_not_replace_a_users_results_json_and_report_md(tmp_path):
    mine = tmp_path / "experiment"
    mine.mkdir()
    (mine / "results.json").write_text('{"accuracy": 0.9}')  # common names; not a prunelab run's record
    (mine / "report.md").write_text("# my notes\n")
    with pytest.raises(PrunelabError, match=r"holds a results.json that is not prune's record \(no 'config_hash' key\) \(results.json\), not an earlier prune run"):
        check_out_folder(mine, PRUNE_OUTPUT)


def test_prune_replaces_a_folder_whose_results_json_is_a_prune_record(tmp_path):
    _run_folder(tmp_path / "run", 0.5)
    assert check_out_folder(tmp_path / "run", PRUNE_OUTPUT) == tmp_path / "run"


def test_loading_a_transformers_model_off_a_terminal_writes_no_carriage_returns(tiny_bert, capsys) -> None:
    """transformers' own "Loading weights" tqdm bar is switched off when stderr is not a terminal."""
    pytest.importorskip("transformers")
    from prunelab.bench.minilm import load_transformers_model
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    model, _ = load_transformers_model(tiny_bert, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and sum(p.numel() for p in model.parameters()) > 0
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored
