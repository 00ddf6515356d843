"""Saving and loading: failed writes leave the old files whole, checkpoints keep their dtypes, damaged files are
one-line errors."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import prunelab
import prunelab.io
from prunelab.bench.models import build_model
from prunelab.checkpoint import load_checkpoint, save_checkpoint
from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, write_json
from prunelab.masks import MaskSet

META = {"model": "digits_mlp", "dataset": "digits", "input_shape": [64], "num_classes": 10}


def pruned_mlp(seed: int) -> tuple[torch.nn.Module, MaskSet]:
    torch.manual_seed(seed)
    model = build_model("digits_mlp", (64,), 10)
    with torch.no_grad():
        model.fc1.weight[::2] = 0  # whole neurons: shrinkable, and sparse for CSR / BSR
        model.fc1.bias[::2] = 0
    return model, MaskSet.from_model(model, ["fc1.weight"])


def test_writing_a_file_over_a_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(PrunelabError, match="a folder of that name is there") as exc:
        write_json(tmp_path / "results.json", {"a": 1})
    assert "\n" not in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no temporary file left behind


def test_a_failed_move_aside_leaves_no_empty_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text("1")
    real = os.replace

    def replace(src, dst):
        if os.fspath(src) == os.fspath(out):
            raise PermissionError(errno.EACCES, "denied")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(prunelab.io, "_exchange", lambda a, b: False)  # the two-rename path (no renameat2)
    with pytest.raises(PermissionError):
        with atomic_dir(out) as tmp:
            (tmp / "results.json").write_text("2")
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert (out / "results.json").read_text() == "1"


def test_a_failed_checkpoint_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    old_model, old_masks = pruned_mlp(0)
    save_checkpoint(folder, old_model, old_masks, META)
    new_model, _ = pruned_mlp(1)
    with torch.no_grad():
        new_model.fc2.weight[:, ::2] = 0
    new_masks = MaskSet.from_model(new_model, ["fc1.weight", "fc2.weight"])

    def disk_full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MaskSet, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(folder, new_model, new_masks, META)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["checkpoint.json", "masks.safetensors", "model.safetensors"]  # no temp files
    loaded = load_checkpoint(folder)
    assert list(loaded.masks) == ["fc1.weight"]
    for key, value in old_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_checkpoint_keeps_its_dtype(tmp_path, dtype):
    model, masks = pruned_mlp(0)
    model = model.to(dtype)
    with torch.no_grad():
        model.fc3.weight[0, 0] = 1.0 + 2.0 ** -40  # float64 only: lost in a float32 round trip
    save_checkpoint(tmp_path / "ckpt", model, masks, META)
    for loaded in (load_checkpoint(tmp_path / "ckpt").model, prunelab.load(tmp_path / "ckpt")):
        state = loaded.state_dict()
        assert state.keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_a_checkpoint_with_integer_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, masks = pruned_mlp(0)
    save_checkpoint(tmp_path / "ckpt", model, masks, META)
    path = tmp_path / "ckpt" / "model.safetensors"
    state = {k: v.to(torch.int32) for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "prunelab.checkpoint.v1"})
    with pytest.raises(PrunelabError, match=r"'fc1.weight' is stored as torch.int32, but the model holds torch.float32"):
        load_checkpoint(tmp_path / "ckpt")


def test_load_of_a_missing_folder_says_it_does_not_exist(tmp_path):
    with pytest.raises(PrunelabError, match="does not exist"):
        prunelab.load(tmp_path / "nope")


@pytest.fixture(scope="module")
def sparse_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    model, masks = pruned_mlp(0)
    save_checkpoint(root / "ckpt", model, masks, META)
    for form in ("csr", "bsr"):
        assert main(["materialise", str(root / "ckpt"), "--form", form, "--out", str(root / form)]) == 0
    model.eval()
    return root, model


@pytest.mark.parametrize("form", ["csr", "bsr"])
def test_sparse_folders_round_trip(sparse_folders, form):
    root, model = sparse_folders
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    loaded = prunelab.load(root / form)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage", ["columns out of range", "row pointers cut", "weight shape"])
def test_a_damaged_sparse_format_is_refused_before_any_kernel_reads_it(sparse_folders, tmp_path, damage):
    import shutil

    root, _ = sparse_folders
    folder = tmp_path / "csr"
    shutil.copytree(root / "csr", folder)
    state = torch.load(folder / "materialised.pt", weights_only=True)
    if damage == "columns out of range":  # the kernel skips its checks: this read past the tensor before
        state["fc1.col_indices"] = state["fc1.col_indices"] + 1000
    elif damage == "row pointers cut":
        state["fc1.crow_indices"] = state["fc1.crow_indices"][:50]
    else:
        state["fc1._extra_state"]["weight_shape"] = [128, 65]
    torch.save(state, folder / "materialised.pt")
    with pytest.raises(PrunelabError, match=r"materialised.pt is damaged.*re-create it with prunelab materialise") as exc:
        prunelab.load(folder)
    assert "\n" not in str(exc.value)


def test_a_sparse_state_holding_pickled_code_is_a_one_line_error(sparse_folders, tmp_path):
    import shutil

    root, _ = sparse_folders
    folder = tmp_path / "csr"
    shutil.copytree(root / "csr", folder)
    torch.save({"layer": torch.nn.Linear(2, 2)}, folder / "materialised.pt")  # a module: refused by weights_only
    with pytest.raises(PrunelabError, match="cannot read the sparse model") as exc:
        prunelab.load(folder)
    assert "\n" not in str(exc.value)
