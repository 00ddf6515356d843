"""Edge cases of the core: tied / reused / meta / fp16 weights, exact targets, files that are never half-written."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunelab
from prunelab import LayerRules, MaskSet, Sparsifier
from prunelab.bench.models import build_model
from prunelab.checkpoint import MASKS_FILE, MODEL_FILE, load_checkpoint, save_checkpoint
from prunelab.errors import PrunelabError
import prunelab.io
from prunelab.io import atomic_dir, write_json
from prunelab.layers import block_influence


class TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.fc(self.emb(x)))  # (B, T, 10)


class Reused(nn.Module):
    """One Linear applied twice under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


META = {"model": "digits_mlp", "input_shape": [1, 8, 8], "num_classes": 10}


@pytest.mark.parametrize("build", [TiedLM, Reused])
def test_checkpoint_of_tied_or_reused_weights_round_trips(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    masks = Sparsifier(model).prepare().update(0.5)
    save_checkpoint(tmp_path, model, masks, META)
    state = load_file(str(tmp_path / MODEL_FILE))
    assert set(state) == set(model.state_dict())  # every name, so it loads with strict=True
    fresh = build()
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert MaskSet.load(tmp_path / MASKS_FILE).equal(masks)


def test_checkpoint_with_unapplied_masks_is_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    masks = MaskSet({"0.weight": torch.rand(8, 8) > 0.5})  # decided, never applied: weights still nonzero
    with pytest.raises(PrunelabError, match="nonzero where its mask says pruned"):
        save_checkpoint(tmp_path / "ckpt", model, masks, META)
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_meta_cannot_override_the_format(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PrunelabError, match="format"):
        save_checkpoint(tmp_path / "ckpt", model, MaskSet.ones({"0.weight": model[0].weight}), {**META, "format": "x"})
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_resaved_from_its_own_meta_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits_mlp", (1, 8, 8), 10)
    sparsifier = Sparsifier(model).prepare()
    sparsifier.update(0.7)
    save_checkpoint(tmp_path / "a", model, sparsifier.finalize(), META)
    first = load_checkpoint(tmp_path / "a")
    save_checkpoint(tmp_path / "b", first.model, first.masks, first.meta)  # meta now holds 'format'
    second = load_checkpoint(tmp_path / "b")
    assert second.masks.equal(first.masks)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(prunelab.load(tmp_path / "b")(x), first.model.eval()(x))


def test_load_accepts_a_file_inside_the_checkpoint_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits_mlp", (1, 8, 8), 10)
    save_checkpoint(tmp_path / "ckpt", model, Sparsifier(model).prepare().update(0.5), META)
    x = torch.randn(3, 1, 8, 8)
    expected = model.eval()(x)
    for name in (MODEL_FILE, MASKS_FILE, "checkpoint.json"):  # as load_checkpoint accepts them
        assert torch.equal(prunelab.load(tmp_path / "ckpt" / name)(x), expected), name
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(PrunelabError, match=r"notes\.txt' is a file, not a prunelab model folder; pass the folder"):
        prunelab.load(tmp_path / "ckpt" / "notes.txt")


def test_sparse_folder_whose_model_cannot_be_built_is_a_one_line_error(tmp_path, monkeypatch):
    import prunelab.bench.models

    folder = tmp_path / "csr"
    folder.mkdir()
    write_json(folder / "materialised.json", {**META, "form": "csr"})
    torch.save({}, folder / "materialised.pt")

    def out_of_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory\nsecond line")

    monkeypatch.setattr(prunelab.bench.models, "build_model", out_of_memory)
    with pytest.raises(PrunelabError) as error:
        prunelab.load(folder / "materialised.json")
    message = str(error.value)
    assert "\n" not in message and message.startswith("cannot build model 'digits_mlp' with input_shape [1, 8, 8]")
    assert "DefaultCPUAllocator: not enough memory); the record is corrupt -- re-create it" in message


def test_meta_parameters_check_targets_but_refuse_mask_decisions(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    sparsifier = Sparsifier(model, rules=LayerRules(keep_first="dense"))
    sparsifier.check_target(0.3)  # shapes are enough
    with pytest.raises(PrunelabError, match="meta device"):
        sparsifier.update(0.5)
    with pytest.raises(PrunelabError, match="meta device"):
        save_checkpoint(tmp_path / "ckpt", model, MaskSet.ones(sparsifier.params), META)
    assert not (tmp_path / "ckpt").exists()


def test_exclude_glob_matching_no_layer_is_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(PrunelabError, match="'fc9' matches no Linear/Conv layer"):
        Sparsifier(model, exclude=("0", "fc9"))
    assert list(Sparsifier(model, exclude=("0",)).params) == ["2.weight"]


class _Block(nn.Module):
    def __init__(self, shift: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(shift)

    def forward(self, x):
        return x + self.fc(x)


class _Stack(nn.Module):
    def __init__(self, blocks) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_block_influence_scores_each_position_of_a_shared_block():
    shared, last = _Block(1.0), _Block(3.0)
    x = [torch.tensor([[1.0, -1.0, 0.0, 0.0]])]
    separate = block_influence(_Stack([_Block(1.0), _Block(1.0), _Block(3.0)]), x)
    reused = block_influence(_Stack([shared, shared, last]), x)
    assert reused == pytest.approx(separate)
    assert reused["blocks.0"] > 5 * reused["blocks.1"]  # the first use moves the input much more


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", {"run": 1})
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp") and os.fspath(dst) == os.fspath(out):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.setattr(prunelab.io, "_exchange", lambda a, b: False)  # the two-rename path (no renameat2)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out) as tmp:
            write_json(tmp / "results.json", {"run": 2})
    monkeypatch.undo()
    assert (out / "results.json").read_text(encoding="utf-8") == '{\n  "run": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary or moved-aside folder left


def test_write_text_is_utf8_whatever_the_locale(tmp_path):
    path = tmp_path / "report.md"
    code = f"from prunelab.io import write_text; write_text({str(path)!r}, 'sparsity \\u00d7 90 %')"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], check=True, env=env, capture_output=True)
    assert path.read_bytes().decode("utf-8") == "sparsity \u00d7 90 %"


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
])
def test_optimizer_state_of_newly_pruned_weights_does_not_leak_back(make):
    torch.manual_seed(0)
    model = Reused()  # a module used twice: one target, one optimizer state
    optimizer = make(model.parameters())
    sparsifier = Sparsifier(model).prepare(optimizer)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    for step in range(12):
        if step == 4:
            sparsifier.update(0.6)  # moments built up while dense must not move pruned weights
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        for name, param in sparsifier.params.items():
            pruned = ~sparsifier.masks[name]
            assert torch.all(param[pruned] == 0)
            for value in optimizer.state[param].values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    assert torch.all(value[pruned] == 0)
    assert list(sparsifier.params) == ["a.weight", "c.weight"]


def test_uniform_hits_every_layer_to_the_nearest_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 30), nn.Linear(30, 7))
    sparsifier = Sparsifier(model, allocation="uniform").prepare()
    for target in (0.3, 0.6, 0.9):
        for layer in sparsifier.update(target).stats().layers:
            assert abs(layer.kept - (1 - target) * layer.total) <= 0.5 + 1e-9, (target, layer)


def test_nm_conv_keeps_n_of_m_input_channels_at_every_kernel_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 3, 2), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    conv = model[0].weight.detach().abs().clone()
    mask = Sparsifier(model, granularity="2:4").prepare().update(0.5)["0.weight"]
    for o in range(3):
        for r in range(2):
            for c in range(2):
                for j in range(2):
                    block = conv[o, 4 * j:4 * j + 4, r, c]
                    expected = torch.zeros(4, dtype=torch.bool)
                    expected[block.topk(2).indices] = True
                    assert torch.equal(mask[o, 4 * j:4 * j + 4, r, c], expected)


def test_channel_is_the_conv_output_channel_and_neuron_the_linear_row():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 1.0, 4.0, 2.0]).reshape(4, 1, 1, 1).expand(4, 2, 3, 3))
        model[2].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [5, 5, 5, 5], [2, 2, 2, 2]]))
    masks = Sparsifier(model, granularity="channel", allocation="uniform").prepare().update(0.5)
    assert masks["0.weight"].flatten(1).all(1).tolist() == [True, False, True, False]
    assert not masks["0.weight"][[1, 3]].any()
    neuron = Sparsifier(model, granularity="neuron", exclude=("0",)).prepare().update(0.6)
    assert neuron["2.weight"].tolist() == [[False] * 4, [True] * 4, [False] * 4]


def test_a_lower_sparsity_is_refused_and_the_masks_never_regrow():
    torch.manual_seed(0)
    sparsifier = Sparsifier(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))).prepare()
    before = sparsifier.update(0.75)
    with pytest.raises(PrunelabError, match="raise the sparsity to >= 0.75"):
        sparsifier.update(0.5)
    assert sparsifier.masks.equal(before)


def test_fp16_weights_train_with_exact_zeros_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, granularity="2:4").prepare(optimizer)
    masks = sparsifier.update(0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8, dtype=torch.half)).float().sum().backward()
        optimizer.step()
        sparsifier.step()
    assert all(torch.all(p[~masks[n]] == 0) for n, p in sparsifier.params.items())
    save_checkpoint(tmp_path, model, sparsifier.finalize(), META)
    state = load_file(str(tmp_path / MODEL_FILE))
    assert state["0.weight"].dtype == torch.half and torch.equal(state["0.weight"], model[0].weight.detach())


def test_atomic_dir_swaps_an_existing_folder_in_one_step_where_linux_can(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", {"run": 1})
    if not prunelab.io._exchange(tmp_path / "run", tmp_path / "run"):  # no renameat2 here: nothing to check
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
    real_replace = os.replace

    def no_rename_onto_out(src, dst):  # the two-rename fallback would leave a moment without `out`
        assert os.fspath(dst) != os.fspath(out) and os.fspath(src) != os.fspath(out)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_rename_onto_out)
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", {"run": 2})
    assert (out / "results.json").read_text(encoding="utf-8") == '{\n  "run": 2\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the previous folder is deleted


def test_atomic_dir_keeps_the_old_folder_when_the_exchange_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", {"run": 1})

    def failing_exchange(a, b):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(prunelab.io, "_exchange", failing_exchange)
    with pytest.raises(OSError, match="Input/output"):
        with atomic_dir(out) as tmp:
            write_json(tmp / "results.json", {"run": 2})
    assert (out / "results.json").read_text(encoding="utf-8") == '{\n  "run": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
