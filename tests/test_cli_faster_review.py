"""The "make it faster" commands end to end: materialise, compress, bench-latency.

Normal runs reload with ``prunelab.load`` and match the masked model; bad input is one
``error:`` line, exit status 2, and nothing written (no folder, no parent, no temporary);
an interruption mid-write leaves the previous output as it was.  Untrained digits models only.
"""

from __future__ import annotations


import pytest
import torch

import prunelab
from prunelab.bench.models import build_model
from prunelab.checkpoint import load_checkpoint, save_checkpoint
from prunelab.masks import MaskSet

from test_cli_bad_input import _one_line, _tree  # the shared one-line-error and folder-listing checks

pytestmark = pytest.mark.usefixtures("one_thread")

META = {"model": "digits_mlp", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10}


def _checkpoint(folder, structured: bool):
    """digits_mlp with a random unstructured mask, or (``structured``) one dropping half of fc1's neurons."""
    torch.manual_seed(0)
    model = build_model("digits_mlp", (1, 8, 8), 10)
    params = dict(model.named_parameters())
    if structured:
        keep = torch.ones_like(params["fc1.weight"], dtype=torch.bool)
        keep[::2] = False  # whole output rows of fc1: shrinkable
        masks = MaskSet({"fc1.weight": keep})
    else:
        masks = MaskSet({name: torch.rand(params[name].shape) > 0.7 for name in ("fc1.weight", "fc2.weight")})
    masks.apply_(model)
    save_checkpoint(folder, model, masks, dict(META))
    return folder


@pytest.fixture
def dense_ckpt(tmp_path):
    return _checkpoint(tmp_path / "ckpt", structured=False)


@pytest.fixture
def chan_ckpt(tmp_path):
    return _checkpoint(tmp_path / "chan", structured=True)


def _masked_outputs(folder, x):
    ckpt = load_checkpoint(folder)
    ckpt.masks.apply_(ckpt.model)
    with torch.no_grad():
        return ckpt.model.eval()(x)


@pytest.mark.parametrize("form, fixture", [("csr", "dense_ckpt"), ("shrink", "chan_ckpt")])
def test_materialise_reloads_equal_to_the_masked_model(cli, tmp_path, request, form, fixture):
    folder = request.getfixturevalue(fixture)
    out = tmp_path / f"m_{form}"
    code, stdout, err = cli("materialise", str(folder), "--form", form, "--out", str(out))
    assert code == 0, err
    assert "max abs error vs the masked model" in stdout
    assert ("| layer" in stdout) if form == "csr" else ("shrunk:" in stdout)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        got = prunelab.load(out).eval()(x)
    torch.testing.assert_close(got, _masked_outputs(folder, x), atol=1e-5, rtol=1e-5)


def test_materialise_checkpoint_that_is_a_file_is_named_as_such(cli, tmp_path, monkeypatch):
    # was: "--out 'o' is inside the input 'notes.txt'" (the file's folder taken for the input)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = cli("materialise", "notes.txt", "--form", "csr", "--out", "o")
    _one_line(code, err, "checkpoint 'notes.txt' is a file, not a checkpoint folder")
    assert _tree(tmp_path) == ["notes.txt"]


def test_compress_checkpoint_that_is_a_file_is_named_as_such(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = cli("compress", "notes.txt", "--out", "m.plc", "--no-progress")
    _one_line(code, err, "checkpoint 'notes.txt' is a file, not a checkpoint folder")
    assert _tree(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("form, expected", [("2:4", "is not 2:4 sparse"), ("shrink", "is not a neuron mask")])
def test_failed_materialise_creates_no_parent_folders(cli, tmp_path, dense_ckpt, form, expected):
    # was: the missing parents of --out were created up front and left behind, empty, on failure
    out = tmp_path / "new" / "deeper" / "m"
    code, _, err = cli("materialise", str(dense_ckpt), "--form", form, "--out", str(out))
    _one_line(code, err, expected)
    assert not (tmp_path / "new").exists()


def test_materialise_out_under_a_file_is_one_line(cli, tmp_path, dense_ckpt):
    (tmp_path / "f").write_text("x")
    code, _, err = cli("materialise", str(dense_ckpt), "--form", "csr", "--out", str(tmp_path / "f" / "m"))
    _one_line(code, err, "cannot create output directory")
    assert (tmp_path / "f").read_text() == "x"


def test_materialise_missing_parents_are_created_on_success(cli, tmp_path, dense_ckpt):
    out = tmp_path / "new" / "deeper" / "m"
    code, _, err = cli("materialise", str(dense_ckpt), "--form", "csr", "--out", str(out))
    assert code == 0, err
    assert _tree(out) == ["materialised.json", "materialised.pt"]


def test_materialise_interrupted_mid_write_keeps_the_old_output(cli, tmp_path, dense_ckpt, monkeypatch):
    out = tmp_path / "m"
    assert cli("materialise", str(dense_ckpt), "--form", "csr", "--out", str(out))[0] == 0
    before = {name: (out / name).read_bytes() for name in _tree(out)}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunelab.io._fsync_tree", interrupt)  # every file written, the swap not yet made
    code, _, err = cli("materialise", str(dense_ckpt), "--form", "bsr", "--out", str(out))
    assert code == 130 and err.strip() == "interrupted", err
    assert {name: (out / name).read_bytes() for name in _tree(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m"]  # no .m.*.tmp left


def test_bench_latency_huge_batch_size_is_one_line(cli, dense_ckpt):
    # was: a RuntimeError traceback (torch's storage-size arithmetic overflowed)
    code, out, err = cli("bench-latency", str(dense_ckpt), "--batch-sizes", "99999999999999999999", "--reps", "1")
    _one_line(code, err, "--batch-sizes", "too large")
    assert out == ""


def test_bench_latency_prints_the_table(cli, dense_ckpt):
    code, out, err = cli("bench-latency", str(dense_ckpt), "--forms", "csr", "--batch-sizes", "1,4", "--reps", "1")
    assert code == 0, err
    assert " thread" in out and "| batch | dense_ms |" in out and "csr_speedup_x" in out


def test_compress_refuses_to_overwrite_a_file_it_did_not_write(cli, tmp_path, dense_ckpt, chan_ckpt):
    # was: silently overwritten -- a user's file, or another checkpoint's model file (that checkpoint then unreadable)
    victim = chan_ckpt / "model.safetensors"
    before = victim.read_bytes()
    code, out, err = cli("compress", str(dense_ckpt), "--out", str(victim), "--no-progress")
    _one_line(code, err, "refusing to overwrite", "not a file written by prunelab compress")
    assert out == "" and victim.read_bytes() == before


def test_compress_replaces_its_own_file_and_is_read_back(cli, tmp_path, dense_ckpt):
    from prunelab.compress import MAGIC, read_compressed

    out = tmp_path / "sub" / "m.plc"
    for _ in range(2):  # the second run replaces the first run's file
        code, stdout, err = cli("compress", str(dense_ckpt), "--out", str(out), "--no-progress")
        assert code == 0, err
        assert "smaller than dense fp32" in stdout and "| layer" in stdout
    assert out.read_bytes().startswith(MAGIC)
    assert set(read_compressed(out)) >= {"fc1.weight", "fc2.weight"}


def test_compress_interrupted_mid_write_leaves_nothing(cli, tmp_path, dense_ckpt, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunelab.io._fsync", interrupt)  # the temporary file written, not yet renamed
    code, _, err = cli("compress", str(dense_ckpt), "--out", str(tmp_path / "m.plc"), "--no-progress")
    assert code == 130 and err.strip() == "interrupted", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_compress_truncated_existing_file_is_replaced(cli, tmp_path, dense_ckpt):
    from prunelab.compress import read_compressed
    from prunelab.errors import PrunelabError

    out = tmp_path / "m.plc"
    assert cli("compress", str(dense_ckpt), "--out", str(out), "--no-progress")[0] == 0
    out.write_bytes(out.read_bytes()[:100])
    with pytest.raises(PrunelabError, match="corrupt or truncated"):
        read_compressed(out)
    code, _, err = cli("compress", str(dense_ckpt), "--out", str(out), "--no-progress")  # an own file, if cut short
    assert code == 0, err
    read_compressed(out)


def test_compress_out_with_a_trailing_slash_is_refused(cli, tmp_path, dense_ckpt):
    # was: written as a FILE named like the folder asked for ('new/' -> a file 'new')
    code, _, err = cli("compress", str(dense_ckpt), "--out", f"{tmp_path / 'new'}/", "--no-progress")
    _one_line(code, err, "--out must name a file to write")
    assert not (tmp_path / "new").exists()
