"""User journey: "will my pruned checkpoint load?" -- a colleague's prunelab outputs, loaded with plain
torch/safetensors, with prunelab.load in a fresh process, after moving / copying / read-only, and with a
future format version."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import prunelab
from prunelab.bench.models import build_model
from prunelab.checkpoint import load_checkpoint, save_checkpoint
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet

FAST = ["--model", "digits_mlp", "--dataset", "digits", "--pretrain-epochs", "1", "--finetune-epochs", "0",
        "--no-progress", "--sparsity", "0.5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
X = torch.linspace(-1, 1, 3 * 64).reshape(3, 64)  # (3, 64) digits_mlp input


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def _fresh_output(folder) -> list:
    """prunelab.load in a new interpreter: no state from this process."""
    code = ("import sys, torch, prunelab; m = prunelab.load(sys.argv[1]).eval(); "
            "x = torch.linspace(-1, 1, 3 * 64).reshape(3, 64); print(repr(m(x).tolist()))")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout.strip())  # noqa: S307 -- our own repr of a list of floats


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("colleague") / "run"
    done = _cli("prune", *FAST, "--granularity", "neuron", "--out", str(out))  # neuron: shrinkable too
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_state_dict_loads_without_prunelab_into_unpruned_model(run_dir):
    code = f"""
import sys, torch
from torch import nn
from safetensors.torch import load_file
state = load_file({str(run_dir / 'model.safetensors')!r})
masks = load_file({str(run_dir / 'masks.safetensors')!r})
model = nn.Sequential()
model.fc1 = nn.Linear(64, 128); model.act1 = nn.ReLU(); model.fc2 = nn.Linear(128, 64); model.act2 = nn.ReLU()
model.fc3 = nn.Linear(64, 10)
assert 'prunelab' not in sys.modules
params = dict(model.named_parameters())
assert set(masks) <= set(params), (sorted(masks), sorted(params))
assert set(state) == set(model.state_dict()), (sorted(state), sorted(model.state_dict()))
print(sorted(masks))
print(sum(int((~m.bool()).sum()) for m in masks.values()))
print(sum(int((state[k][~m.bool()] != 0).sum()) for k, m in masks.items()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names, pruned, nonzero_pruned = done.stdout.split("\n")[:3]
    assert int(pruned) > 0 and int(nonzero_pruned) == 0


def test_plain_state_dict_fits_the_zoo_model_strictly(run_dir):
    from safetensors.torch import load_file
    model = build_model("digits_mlp", (64,), 10)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=True)
    masks = MaskSet.load(run_dir / "masks.safetensors")
    names = dict(model.named_parameters())
    for name, mask in masks.items():
        assert name in names and mask.dtype == torch.bool
        assert (names[name].detach()[~mask] == 0).all()


def test_fresh_process_load_gives_identical_outputs(run_dir):
    here = prunelab.load(run_dir).eval()
    with torch.no_grad():
        assert here(X).tolist() == _fresh_output(run_dir)


@pytest.mark.parametrize("form", ["shrink", "csr", "auto"])
def test_materialised_form_loads_in_fresh_process(run_dir, tmp_path, form):
    out = tmp_path / f"m_{form}"
    done = _cli("materialise", str(run_dir), "--form", form, "--out", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    with torch.no_grad():
        ref = prunelab.load(run_dir).eval()(X)
    got = torch.tensor(_fresh_output(out))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_compressed_file_reads_back(run_dir, tmp_path):
    from prunelab.compress.container import read_compressed
    out = tmp_path / "f.plc"
    done = _cli("compress", str(run_dir), "--out", str(out), "--finetune-epochs", "0")
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    tensors = read_compressed(out)
    ref = load_checkpoint(run_dir)
    state = ref.model.state_dict()
    for name, mask in ref.masks.items():
        assert tensors[name].shape == state[name].shape
        assert (tensors[name][~mask] == 0).all()


def test_moved_copied_folder_loads(run_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(run_dir, copy)
    moved = tmp_path / "moved"
    shutil.move(str(copy), moved)
    with torch.no_grad():
        assert prunelab.load(moved).eval()(X).tolist() == prunelab.load(run_dir).eval()(X).tolist()


def test_read_only_folder_loads_and_is_not_written(run_dir, tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(run_dir, ro)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ro.iterdir() if p.is_file()}
    for p in [*ro.iterdir(), ro]:
        p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
    try:
        prunelab.load(ro)
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ro.iterdir() if p.is_file()}
    finally:
        for p in [ro, *ro.iterdir()]:
            p.chmod(stat.S_IRWXU)
    assert after == before


def test_future_format_version_is_a_one_line_refusal(run_dir, tmp_path):
    future = tmp_path / "future"
    shutil.copytree(run_dir, future)
    meta = json.loads((future / "checkpoint.json").read_text())
    meta["format"] = "prunelab.checkpoint.v2"
    (future / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(PrunelabError) as info:
        prunelab.load(future)
    assert "\n" not in str(info.value) and "v2" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtype_round_trips_through_save_and_load(tmp_path, dtype):
    torch.manual_seed(0)
    model = build_model("digits_mlp", (64,), 10)
    with torch.no_grad():
        model.fc1.weight[::2] = 0
        model.fc1.bias[::2] = 0
    masks = MaskSet.from_model(model, ["fc1.weight"])
    model = model.to(dtype)
    save_checkpoint(tmp_path / "c", model, masks, {"model": "digits_mlp", "input_shape": [64], "num_classes": 10})
    back = prunelab.load(tmp_path / "c")
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_oneshot_bert_folder_loads_with_plain_transformers(tiny_bert, data_dir, tmp_path):
    out = tmp_path / "bert_sparse"
    done = _cli("oneshot", "--model", str(tiny_bert), "--method", "magnitude", "--sparsity", "0.5",
                "--calib-samples", "2", "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    code = f"""
import sys, torch, transformers
from safetensors.torch import load_file
m, info = transformers.AutoModel.from_pretrained({str(out)!r}, output_loading_info=True)
assert not info['missing_keys'] and not info['unexpected_keys'], info
assert 'prunelab' not in sys.modules
w = m.encoder.layer[0].attention.self.query.weight
print(float((w == 0).float().mean()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**ENV, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == 0.5
