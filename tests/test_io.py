"""Atomic writes never destroy what prunelab did not write, and publish files with the umask's mode."""

from __future__ import annotations

import os
import re

import pytest

from prunelab.bench.models import build_model
from prunelab.checkpoint import save_checkpoint
from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, atomic_path, check_replaceable
from prunelab.masks import MaskSet


def test_check_replaceable_accepts_absent_empty_and_prunelab_folders(tmp_path):
    assert check_replaceable(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    (run / "extra.png").write_bytes(b"")
    check_replaceable(run)


def test_check_replaceable_refuses_foreign_folders_files_and_inputs(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (home / name).write_text("precious")
    with pytest.raises(PrunelabError, match=r"refusing to replace .*home.*: it holds a.txt, b.txt, c.txt \.\.\. and "
                                            "was not written by prunelab"):
        check_replaceable(home)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrunelabError, match="is a file"):
        check_replaceable(tmp_path / "file")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "checkpoint.json").write_text("{}")
    with pytest.raises(PrunelabError, match="would replace the input"):
        check_replaceable(checkpoint, inputs=(checkpoint,))
    with pytest.raises(PrunelabError, match="would replace the input"):  # a folder holding the input
        check_replaceable(tmp_path, inputs=(checkpoint,))


def test_atomic_dir_leaves_a_foreign_folder_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(PrunelabError, match="not written by prunelab"):
        with atomic_dir(target) as tmp:
            (tmp / "results.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_atomic_writes_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "results.json").write_text("{}")
        with atomic_path(tmp_path / "file.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600


def record_fsyncs_and_renames(monkeypatch, events):
    """Log ``("fsync", path)`` and ``("replace", src, dst)`` in call order (paths of fds via /proc)."""
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the flushed descriptors")
def test_atomic_writes_flush_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    record_fsyncs_and_renames(monkeypatch, events)
    with atomic_path(tmp_path / "file.json") as tmp:
        tmp.write_text("{}")
    tmp_name, parent = os.path.realpath(tmp), os.path.realpath(tmp_path)
    assert events == [("fsync", tmp_name), ("replace", tmp_name, os.path.realpath(tmp_path / "file.json")),
                      ("fsync", parent)]
    events.clear()
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.bin").write_bytes(b"weights")  # written without atomic_path (torch.save, ...)
        (tmp / "results.json").write_text("{}")
    flushed = [e[1] for e in events if e[0] == "fsync"]
    swap = events.index(("replace", os.path.realpath(tmp), os.path.realpath(tmp_path / "run")))
    before = {e[1] for e in events[:swap] if e[0] == "fsync"}
    assert {os.path.join(os.path.realpath(tmp), p) for p in ("sub/model.bin", "results.json", "sub")} <= before
    assert os.path.realpath(tmp) in before and flushed[-1] == parent


def test_atomic_dir_swap_is_not_blocked_by_a_leftover_moved_aside_folder(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text('{"run": 1}')
    leftover = tmp_path / f".run.old-{os.getpid()}"  # what an earlier crash mid-swap left (the old fixed name)
    leftover.mkdir()
    (leftover / "results.json").write_text('{"run": 0}')
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text('{"run": 2}')
    assert (out / "results.json").read_text() == '{"run": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "run"]  # the leftover is not ours to delete
    assert (leftover / "results.json").read_text() == '{"run": 0}'


def test_materialise_refuses_to_overwrite_its_own_checkpoint(tmp_path, capsys):
    model = build_model("digits_mlp", (64,), 10)
    masks = MaskSet.from_model(model, [n for n, p in model.named_parameters() if p.dim() > 1])
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, model, masks, {"model": "digits_mlp", "dataset": "digits", "input_shape": [64],
                                               "num_classes": 10})
    before = sorted(os.listdir(checkpoint))
    assert main(["materialise", str(checkpoint), "--form", "csr", "--out", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    # refused as the input itself or as a folder holding a prune run (the checkpoint is checked first)
    assert ("would replace the input" in err or "holds a prune / demo run" in err) and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(checkpoint)) == before


def test_a_config_json_counts_only_when_prunelab_wrote_it(tmp_path):
    hf_model = tmp_path / "hf"
    hf_model.mkdir()
    (hf_model / "config.json").write_text('{"model_type": "bert"}')
    (hf_model / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrunelabError, match="not written by prunelab"):
        check_replaceable(hf_model)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "config.json").write_text('{"format": "prunelab.chargpt.v1"}')
    check_replaceable(cache)


@pytest.mark.parametrize("record", [
    {},  # no builder
    {"builder": {"zoo": "digits_mlp", "input_shape": [1, 8, 8], "num_classes": 10}},  # no layers
    {"builder": {"zoo": "digits_mlp", "input_shape": [1, 8, 8], "num_classes": 10}, "layers": {"fc1": {}}},
    {"builder": "digits_mlp", "layers": {}},
])
def test_load_of_a_damaged_shrunk_folder_is_a_one_line_error(tmp_path, record):
    import json

    import prunelab
    from prunelab.materialise.spec import SHRUNK_FORMAT

    (tmp_path / "architecture.json").write_text(json.dumps({"format": SHRUNK_FORMAT, **record}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrunelabError, match="architecture.json.* is damaged .*re-create the folder") as exc:
        prunelab.load(tmp_path)
    assert "\n" not in str(exc.value)


def test_the_current_folder_or_one_holding_it_is_never_replaced(tmp_path, monkeypatch):
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", str(here), "..", ""):
        with pytest.raises(PrunelabError, match="replacing it would delete the folder you are working in"):
            check_replaceable(out)
    with pytest.raises(PrunelabError, match="is the current folder"):
        with atomic_dir("."):
            raise AssertionError("the body must not run")
    assert sorted(os.listdir(here)) == []  # no temporary folder left behind
    check_replaceable("sub")  # a folder below it is fine


def test_prune_into_the_current_folder_is_refused_before_training(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code = main(["prune", "--model", "digits_mlp", "--dataset", "digits", "--pretrain-epochs", "2000", "--no-progress",
                 "--out", "."])
    assert code == 2 and time.perf_counter() - started < 5.0
    assert sorted(os.listdir(tmp_path)) == []


def test_prune_replaces_its_own_earlier_results_but_not_a_folder_with_other_files(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    argv = ["prune", "--model", "digits_mlp", "--dataset", "digits", "--method", "oneshot", "--pretrain-epochs", "1",
            "--finetune-epochs", "0", "--no-progress", "--out", str(out)]
    assert main([*argv, "--sparsity", "0.5"]) == 0
    assert main([*argv, "--sparsity", "0.7"]) == 0  # re-running into its own output folder replaces it
    assert json.loads((out / "results.json").read_text())["target_sparsity"] == 0.7
    capsys.readouterr()
    (out / "notes.txt").write_text("precious")  # prune did not write this: replacing the folder would delete it
    before = sorted(os.listdir(out))
    assert main([*argv, "--sparsity", "0.6"]) == 2
    err = capsys.readouterr().err
    assert "holds files prune does not write (notes.txt), not an earlier prune run" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == before and (out / "notes.txt").read_text() == "precious"


def test_an_output_path_under_a_file_names_the_file(tmp_path):
    from prunelab.io import ensure_writable_dir

    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile" / "sub" / "deeper", tmp_path / "afile"):
        with pytest.raises(PrunelabError, match=rf"'{re.escape(str(tmp_path / 'afile'))}' is a file, not a directory"):
            ensure_writable_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created
