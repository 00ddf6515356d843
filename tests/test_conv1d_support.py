"""transformers' Conv1D (GPT-2's layers, ``y = x W + b`` with ``W`` stored ``(in, out)``) in
measure / materialise / compress, and ``save_pretrained`` of a materialised transformers model.

Two kinds of cases: a stand-in ``Conv1D`` registered as ``transformers.pytorch_utils.Conv1D``
(prunelab finds the type there without importing transformers), with hand-computed numbers;
and a real tiny ``GPT2LMHeadModel``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conv1d_stand_in import Conv1D, register
from prunelab.errors import PrunelabError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def conv1d(monkeypatch):
    """The stand-in, found as ``transformers.pytorch_utils.Conv1D`` (the real one, if loaded, is hidden)."""
    return register(monkeypatch)


def _layer(nf: int, nx: int, weight: list[list[float]], bias: list[float]) -> Conv1D:
    layer = Conv1D(nf, nx)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


# W (4 in, 3 out) and a mask keeping 5 of its 12 weights
W43 = [[1.0, -2.0, 3.0], [0.5, 4.0, -1.0], [2.0, 2.0, -3.0], [-0.5, 1.0, 1.5]]
KEEP43 = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)


# --- measure ---------------------------------------------------------------------------------
def test_measure_counts_a_conv1d_as_the_linear_of_its_transposed_weight(conv1d):
    from prunelab.measure.counting import measure_model

    model = nn.Sequential(_layer(3, 4, W43, [0.1, 0.2, 0.3]))
    cost = measure_model(model, torch.randn(2, 5, 4), {"0.weight": KEEP43})  # 2 samples of 5 tokens
    (layer,) = cost.layers
    assert (layer.name, layer.kind, layer.weight_shape) == ("0", "Conv1D", (4, 3))
    assert (layer.weight_params, layer.weight_nonzeros, layer.bias_params, layer.output_positions) == (12, 5, 3, 5)
    assert (layer.dense_macs, layer.sparse_macs) == (60, 25)  # 4 * 3 * 5 tokens; 5 kept * 5 tokens
    assert cost.dense_flops == 120 and cost.other_params == 0
    # CSR stores W^T (3 out rows): 5 values + 5 column indices + 3 + 1 row pointers, + 3 bias, 4 bytes each
    assert layer.csr_bytes == 4 * (5 + 5 + 4 + 3) == 68
    assert layer.bitmap_bytes == 4 * 5 + 2 + 4 * 3  # ceil(12 / 8) = 2 bytes of keep-map


def test_measure_refuses_an_input_a_conv1d_cannot_take_naming_it(conv1d):
    from prunelab.measure.counting import measure_model

    model = nn.Sequential(_layer(3, 4, W43, [0.0] * 3))
    with pytest.raises(PrunelabError, match=r"layer '0' \(Conv1D\) expects input of shape \(\.\.\., 4\) but got "
                                            r"shape \(2, 3\)") as exc:
        measure_model(model, torch.randn(2, 3))
    assert "\n" not in str(exc.value)


def test_energy_follows_the_conv1d_counts(conv1d):
    from prunelab.measure.energy import estimate_energy

    model = nn.Sequential(_layer(3, 4, W43, [0.1, 0.2, 0.3]))
    report = estimate_energy(model, torch.randn(1, 5, 4), {"0.weight": KEEP43})
    rows = {row.form: row for row in report.layers}
    assert {f: (r.macs, r.weight_bytes) for f, r in rows.items()} == {
        "dense": (60, 4 * 15), "pruned": (25, 4 * (5 + 3)), "sparse": (25, min(68, 34))}
    assert {r.activation_bytes for r in rows.values()} == {4 * (5 * 4 + 5 * 3)}  # (5, 4) in, (5, 3) out


# --- materialise -----------------------------------------------------------------------------
# W (8 in, 4 out); KEEP_24 keeps 2 of every 4 consecutive INPUTS (W's dim 0) of each output
W84 = [[float(1 + i + 8 * j) * (-1) ** (i + j) for j in range(4)] for i in range(8)]
KEEP_24 = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1],
                        [0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1]], dtype=torch.bool)


def _masked_reference(x: torch.Tensor) -> torch.Tensor:
    weight = torch.tensor(W84) * KEEP_24
    return x @ weight + torch.tensor([0.5, -0.5, 1.0, 0.0])  # (B, T, 4), the brute-force Conv1D


@pytest.mark.parametrize("form, module", [("csr", "CSRLinear"), ("bsr", "BSRLinear"), ("2:4", "SemiStructuredLinear")])
def test_materialise_swaps_a_masked_conv1d_for_the_sparse_linear_of_w_transposed(conv1d, form, module):
    from prunelab.materialise import materialise

    model = nn.Sequential(_layer(4, 8, W84, [0.5, -0.5, 1.0, 0.0]), nn.ReLU())
    x = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")  # the CPU fallback note
        new = materialise(model, form, masks={"0.weight": KEEP_24}, example_input=x, block_size=(2, 2))
    assert type(new[0]).__name__ == module
    assert new[0].weight_shape == (4, 8)  # (out, in)
    assert torch.equal(new[0].dense_weight(), (torch.tensor(W84) * KEEP_24).T)
    torch.testing.assert_close(new(x), torch.relu(_masked_reference(x)), rtol=0, atol=1e-5)
    (layer,) = new.materialise_report.layers
    assert (layer.name, layer.kind, layer.kernel, layer.sparsity, layer.dense_bytes) == ("0", "Conv1D", form, 0.5, 144)
    assert model[0].weight.count_nonzero() == 32  # the model itself is untouched


def test_two_four_on_a_conv1d_runs_along_its_input_dim_0(conv1d):
    from prunelab.materialise import materialise

    model = nn.Sequential(_layer(4, 8, W84, [0.0] * 4))
    x = torch.randn(2, 8)
    # two of every four OUTPUTS kept (W's dim 1): not 2:4 along the inputs (column 0 keeps rows 0..3)
    along_outputs = torch.tensor([[1, 1, 0, 0]] * 8, dtype=torch.bool)
    with pytest.raises(PrunelabError, match=r"'0\.weight \(as W\^T, \(out, in\), of a Conv1D\)' is not 2:4 sparse: "
                                            r"row 0, group 0 \(columns 0\.\.3\) has 4 nonzeros") as exc:
        materialise(model, "2:4", masks={"0.weight": along_outputs}, example_input=x)
    assert "\n" not in str(exc.value)


def test_oneshot_two_four_of_a_conv1d_is_what_the_materialised_two_four_takes(conv1d):
    from prunelab.materialise import materialise
    from prunelab.oneshot import OneShotConfig, prune_oneshot

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4, 8), nn.ReLU(), Conv1D(8, 4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.normal_()
    x = torch.randn(16, 8)
    masks = prune_oneshot(model, [x], OneShotConfig(method="magnitude", pattern="2:4"), progress=False).masks
    assert sorted(masks) == ["0.weight", "2.weight"]
    for key, keep in masks.items():
        nx, nf = keep.shape
        assert torch.equal(keep.T.reshape(nf, nx // 4, 4).sum(-1), torch.full((nf, nx // 4), 2)), key  # along dim 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")
        new = materialise(model, "2:4", masks=masks, example_input=x)
    assert [f.kernel for f in new.materialise_report.layers] == ["2:4", "2:4"]


def test_a_mask_materialise_cannot_run_sparse_is_named_in_one_warning(conv1d):
    from prunelab.materialise import materialise

    model = nn.Sequential(nn.Embedding(10, 8), _layer(4, 8, W84, [0.0] * 4))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    embedding_keep = torch.arange(80).reshape(10, 8) % 2 == 0
    with pytest.warns(UserWarning) as record:
        new = materialise(model, "csr", masks={"0.weight": embedding_keep, "1.weight": KEEP_24}, example_input=ids)
    messages = [str(w.message) for w in record]
    assert messages == ["1 masked parameter(s) stay dense tensors (their zeros are applied, no sparse kernel runs "
                        "them): 0.weight (its Embedding is not a layer materialise swaps)"]
    assert torch.equal(new[0].weight != 0, embedding_keep)  # applied, not dropped
    assert [f.name for f in new.materialise_report.layers] == ["1"]


def test_a_masked_layer_the_form_keeps_dense_is_named_in_the_warning():
    from prunelab.materialise import materialise

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
    keep = {"0.weight": torch.arange(18).reshape(2, 1, 3, 3) % 3 == 0, "2.weight": torch.arange(32).reshape(4, 8) % 2 == 0}
    with pytest.warns(UserWarning, match=r"^1 masked parameter\(s\) stay dense tensors \(their zeros are applied, no "
                                         r"sparse kernel runs them\): 0\.weight \(bsr keeps convolutions dense\)$"):
        materialise(model, "bsr", masks=keep, example_input=torch.randn(2, 1, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # csr takes both layers: no warning
        materialise(model, "csr", masks=keep, example_input=torch.randn(2, 1, 4, 4))


def test_auto_times_a_conv1d_and_keeps_the_faster_sparse_kernel(conv1d):
    from prunelab.materialise import materialise

    model = nn.Sequential(_layer(4, 8, W84, [0.0] * 4))
    timed = []

    def timer(trial) -> float:
        timed.append((trial.layer, trial.kernel, trial.batch_size, tuple(trial.inputs.shape)))
        return {"dense": 2.0, "csr": 1.0, "bsr": 1.5}[trial.kernel]

    new = materialise(model, "auto", masks={"0.weight": KEEP_24}, example_input=torch.randn(2, 3, 8), timer=timer,
                      batch_sizes=(1,), block_size=(2, 2))
    assert type(new[0]).__name__ == "CSRLinear"
    assert sorted(set(timed)) == [("0", k, 1, (1, 3, 8)) for k in ("bsr", "csr", "dense")]
    assert new.materialise_report.kernels.layers[0].kind == "Conv1D"


# --- save_pretrained route -------------------------------------------------------------------
class _Pretrained(nn.Module):
    """A stand-in for a transformers model: its save_pretrained records the state_dict it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.saved: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
        self.saved.append({"dir": save_directory, "state": state_dict, **kwargs})


def test_save_pretrained_of_a_materialised_model_gets_tensor_extra_state_that_reloads():
    from prunelab.materialise import load_materialised, materialise

    torch.manual_seed(0)
    model = _Pretrained().eval()
    keep = torch.arange(32).reshape(4, 8) % 3 == 0
    new = materialise(model, "csr", masks={"fc.weight": keep}, example_input=torch.randn(2, 8))
    assert isinstance(new.state_dict()["fc._extra_state"], dict)  # state_dict() is unchanged (torch.save route)
    new.save_pretrained("folder", True, None, max_shard_size="1GB")
    (saved,) = new.saved
    assert (saved["dir"], saved["max_shard_size"]) == ("folder", "1GB")
    state = saved["state"]
    extra = state["fc._extra_state"]
    assert extra.dtype == torch.uint8 and extra.dim() == 1
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # what huggingface_hub can shard
    reloaded = load_materialised(_Pretrained(), state)
    assert type(reloaded.fc).__name__ == "CSRLinear"
    x = torch.randn(3, 8)
    assert torch.equal(reloaded(x), new(x))
    reloaded.save_pretrained("again")  # the reloaded model saves the same way
    assert reloaded.saved[0]["state"]["fc._extra_state"].dtype == torch.uint8
    assert "save_pretrained" not in vars(materialise(nn.Sequential(nn.Linear(8, 4)), "csr",
                                                     example_input=torch.randn(1, 8)))  # only where it exists


def test_load_materialised_fills_only_tied_keys():
    from prunelab.materialise import load_materialised, materialise

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.mid = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    new = materialise(model, "csr", masks={"mid.weight": torch.eye(4, dtype=torch.bool)}, example_input=ids)
    state = new.state_dict()
    del state["head.weight"]  # saved once, under emb.weight (as save_pretrained writes a tied weight)
    reloaded = load_materialised(Tied(), state)
    assert reloaded.head.weight is reloaded.emb.weight
    assert torch.equal(reloaded(ids), new(ids))
    for key in ("norm.weight", "mid.bias"):  # not tied: still refused (a sparse layer's bias too)
        cut = {k: v for k, v in state.items() if k != key}
        with pytest.raises(PrunelabError, match=rf"does not fit this architecture.*{key}") as exc:
            load_materialised(Tied(), cut)
        assert "\n" not in str(exc.value)


# --- compress --------------------------------------------------------------------------------
def test_a_conv1d_is_quantised_as_an_fc_layer_and_decodes_exactly(conv1d, tmp_path):
    from prunelab.compress import read_compressed, write_compressed
    from prunelab.compress.quantize import quantizable_layers

    model = nn.Sequential(_layer(3, 4, W43, [0.1, 0.2, 0.3]))
    assert quantizable_layers(model) == {"0.weight": "fc"}
    report = write_compressed(tmp_path / "m.plc", model, {"0.weight": KEEP43})
    (layer,) = report.layers
    assert (layer.name, layer.shape, layer.kept, layer.weight_bits, layer.index_bits, layer.bias_params) == (
        "0.weight", (4, 3), 5, 5, 5, 3)
    state = read_compressed(tmp_path / "m.plc")
    assert torch.equal(state["0.weight"], torch.tensor(W43) * KEEP43)  # 5 distinct kept values <= 32: exact
    assert torch.equal(state["0.bias"], torch.tensor([0.1, 0.2, 0.3]))


# --- a real GPT-2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    from prunelab.oneshot import OneShotConfig, prune_oneshot

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=3, eos_token_id=3)).eval()
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    masks = prune_oneshot(model, [ids], OneShotConfig(method="magnitude", pattern="2:4"), progress=False).masks
    return model, ids, masks


def _conv1d_names(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D as HFConv1D

    return [n for n, m in model.named_modules() if isinstance(m, HFConv1D)]


def test_gpt2_measure_counts_every_conv1d(gpt2):
    from prunelab.measure.counting import measure_model

    model, ids, masks = gpt2
    cost = measure_model(model, ids[:1], masks)
    layers = {l.name: l for l in cost.layers}
    assert sorted(layers) == sorted(_conv1d_names(model) + ["lm_head"])
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert (c_attn.kind, c_attn.weight_shape, c_attn.output_positions) == ("Conv1D", (16, 48), 8)
    assert (c_attn.dense_macs, c_attn.sparse_macs) == (16 * 48 * 8, 8 * 48 * 8)  # 2:4 keeps half
    # weights: c_attn 16x48, c_proj 16x16, c_fc 16x64, mlp.c_proj 64x16; the tied lm_head 64x16 per token
    assert cost.dense_macs == 8 * (768 + 256 + 1024 + 1024 + 1024)


def test_gpt2_materialised_forms_equal_the_masked_model(gpt2):
    from prunelab.masks import MaskSet
    from prunelab.materialise import materialise

    model, ids, masks = gpt2
    masked = MaskSet(masks).apply_(copy.deepcopy(model))
    with torch.no_grad():
        expected = masked(ids).logits
    for form in ("csr", "2:4"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="2:4 kernels need")
            new = materialise(model, form, masks=masks, example_input=ids)
        assert sorted(f.name for f in new.materialise_report.layers) == sorted(_conv1d_names(model))
        for name in _conv1d_names(model):
            assert torch.equal(new.get_submodule(name).dense_weight(), masked.get_submodule(name).weight.T), name
        with torch.no_grad():
            torch.testing.assert_close(new(ids).logits, expected, rtol=0, atol=1e-5)


def test_gpt2_save_pretrained_folder_reloads_to_equal_outputs(gpt2, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from prunelab.materialise import load_materialised, materialise

    model, ids, masks = gpt2
    new = materialise(model, "csr", masks=masks, example_input=ids)
    new.save_pretrained(str(tmp_path / "csr"))
    state = load_file(str(tmp_path / "csr" / "model.safetensors"))
    assert "lm_head.weight" not in state  # tied to the embedding: written once
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(str(tmp_path / "csr")))
    reloaded = load_materialised(fresh, state).eval()
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, new(ids).logits)


def test_gpt2_compress_with_oneshot_masks_decodes_to_the_quantised_model(gpt2, tmp_path):
    import transformers

    from prunelab.compress import read_compressed, write_compressed
    from prunelab.compress.quantize import quantize_model

    model, ids, masks = gpt2
    report = write_compressed(tmp_path / "gpt2.plc", model, masks)
    assert {l.name: l.weight_bits for l in report.layers} == {f"{n}.weight": 5 for n in _conv1d_names(model)} | {
        "lm_head.weight": 5}
    state = read_compressed(tmp_path / "gpt2.plc")
    quantised = copy.deepcopy(model)
    quantize_model(quantised, masks)
    expected = quantised.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    for key, keep in masks.items():
        assert torch.equal(state[key] != 0, keep & (model.get_parameter(key) != 0)), key
        assert state[key][keep].unique().numel() <= 32, key
    fresh = transformers.GPT2LMHeadModel(model.config).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, quantised(ids).logits)
