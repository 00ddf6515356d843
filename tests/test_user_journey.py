"""A new user's journey with their own models (README "Python API"): prune in a plain loop, save,
reload, materialise, compress.  Most tests are regressions of bugs found that way (each was a strict
xfail until fixed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunelab
from prunelab import MaskSet, OneShot, PrunelabError, Sparsifier, materialise
from prunelab.compress import read_compressed, write_compressed
from prunelab.materialise.spec import save_shrunk

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _trained_sparse_mlp(granularity: str = "unstructured", sparsity: float = 0.75):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    rules = prunelab.LayerRules(keep_last="dense") if granularity == "neuron" else None
    sparsifier = Sparsifier(model, granularity=granularity, schedule=OneShot(sparsity), rules=rules).prepare(opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
    return model.eval(), sparsifier.finalize(), x


def test_user_mlp_roundtrip_csr_matches_masked_at_every_batch(tmp_path):
    model, masks, x = _trained_sparse_mlp()
    assert masks.stats().sparsity == pytest.approx(0.75, abs=1 / 64)
    params = dict(model.named_parameters())
    assert all(int(params[n][~m].abs().sum() != 0) == 0 for n, m in masks.items())  # masked weights stay zero
    masks.save(tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    back = _mlp()
    back.load_state_dict(torch.load(tmp_path / "model.pt"))
    back_masks = MaskSet.load(tmp_path / "m.safetensors")
    assert back_masks.equal(masks)
    for form in ("csr", "bsr"):
        new = materialise(back, form, masks=back_masks, example_input=x[:8])
        with torch.no_grad():
            for batch in (x[:1], x[:3], x):
                assert torch.allclose(new(batch), model(batch), atol=1e-5)


def test_user_mlp_compressed_file_keeps_pruned_weights_zero(tmp_path):
    model, masks, _ = _trained_sparse_mlp()
    write_compressed(tmp_path / "m.plc", copy.deepcopy(model), masks)
    decoded = _mlp()
    decoded.load_state_dict(read_compressed(tmp_path / "m.plc"))
    params = dict(decoded.named_parameters())
    for name, keep in masks.items():
        assert not params[name][~keep].any(), name


def test_user_mlp_neuron_shrink_matches_masked():
    model, masks, x = _trained_sparse_mlp("neuron", 0.5)
    new = materialise(model, "shrink", masks=masks, example_input=x[:8])
    assert new[0].out_features < 32
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=1e-5)


@pytest.mark.parametrize("form", ["csr", "bsr"])
def test_transformer_encoder_layer_sparse_forms(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)).eval()
    masks = Sparsifier(model, schedule=OneShot(0.8)).prepare().finalize()
    x = torch.randn(4, 8, 32)
    new = materialise(model, form, masks=masks, example_input=x)  # linear1/linear2 are read as .weight: kept dense
    notes = {row["layer"]: row.get("note", "") for row in new.materialise_report.rows()}
    assert "TransformerEncoderLayer reads this layer's weight directly" in notes["0.linear1"]
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=1e-5)


def test_save_shrunk_sequential_is_loadable_or_refused(tmp_path):
    model, masks, x = _trained_sparse_mlp("neuron", 0.5)
    new = materialise(model, "shrink", masks=masks, example_input=x[:8])
    # type(model)() would rebuild an EMPTY Sequential: refused before anything is written
    with pytest.raises(PrunelabError, match=r"Sequential\(\) builds an empty container.*meta=\{'builder'") as info:
        save_shrunk(tmp_path / "shrunk", new, (16,), {})
    assert "\n" not in str(info.value) and not (tmp_path / "shrunk").exists()


def test_multihead_attention_in_proj_is_pruned_or_warned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = Sparsifier(model, schedule=OneShot(0.8)).prepare().finalize()
    assert not [w for w in caught if "in_proj" in str(w.message)]
    assert "0.self_attn.in_proj_weight" in masks  # 3/4 of the attention weights are pruned like a Linear's
    weight = model[0].self_attn.in_proj_weight
    assert torch.equal(masks["0.self_attn.in_proj_weight"], weight != 0)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)  # the 80% target over every weight


def test_step_before_prepare_is_a_one_line_error_not_a_silent_dense_run():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsifier = Sparsifier(model, schedule=OneShot(0.5))
    with pytest.raises(PrunelabError, match=r"step\(\) called before prepare\(\)") as info:
        sparsifier.step()  # OneShot(0.5) applies at step 0, in prepare(): it would never have pruned
    assert "\n" not in str(info.value) and sparsifier.step_count == 0
    sparsifier.prepare()
    sparsifier.step()
    assert sparsifier.masks.stats().sparsity == pytest.approx(0.5, abs=0.02)
