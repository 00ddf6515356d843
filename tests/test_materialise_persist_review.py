"""Review of materialised-model persistence: ``save_pretrained`` folders and ``load_materialised``.

* A materialised ``transformers`` model's ``save_pretrained`` folder used to hold only the sparse
  format tensors: ``AutoModel...from_pretrained(folder)`` reported every sparse layer's weight
  MISSING and gave it RANDOM values.  The folder now holds the dense masked weights (zeros
  included) plus each layer's record, so ``from_pretrained`` gives the masked model and
  ``load_materialised`` rebuilds exactly the same sparse formats from it.
* ``load_materialised`` built one sparse module per NAME of a layer the architecture uses at two
  names: outputs were right but the tie was lost (``buffers()`` counted it twice).

Models are tiny and built from configs (nothing is downloaded).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise import load_materialised, materialise
from prunelab.materialise.sparse_modules import CSRLinear, SparseModule, encode_extra_state

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers ---------------------------------------------------------------------------------
def _random_keep(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def _two_of_four_keep(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs of a ``(out, in)`` weight."""
    out_features, in_features = weight.shape
    groups = weight.detach().abs().reshape(out_features, in_features // 4, 4)  # (O, G, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


def _masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The dense masked model, by hand: each named weight times its keep-mask."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in masks.items():
            masked.get_parameter(name).mul_(keep)
    return masked


def _sparse_names(model: nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, SparseModule))


def _materialise(model: nn.Module, form: str, masks: dict[str, torch.Tensor], example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")
        return materialise(model, form, masks=masks, example_input=example)


class _Folder(nn.Module):
    """A stand-in for a transformers model whose ``save_pretrained`` writes ``model.safetensors``, as HF does."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
        from safetensors.torch import save_file

        save_file(state_dict, f"{save_directory}/model.safetensors")  # refuses dicts and non-contiguous tensors


def _read(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


# --- plain stand-in: every form, exact rebuild -------------------------------------------------
def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Folder(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))).eval()


def _conv() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Folder(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))).eval()


def _masks_for(model: nn.Module, form: str) -> dict[str, torch.Tensor]:
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    if form == "2:4":
        return {n: _two_of_four_keep(p) for n, p in weights.items()}
    return {n: _random_keep(tuple(p.shape), seed) for seed, (n, p) in enumerate(weights.items())}


CASES = {  # form -> (architecture, example input, sparse module type)
    "csr": (_mlp, torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), "CSRLinear"),
    "bsr": (_mlp, torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), "BSRLinear"),
    "2:4": (_mlp, torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), "SemiStructuredLinear"),
    "csr-conv": (_conv, torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(2)), "CSRConv2d"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_pretrained_writes_the_dense_masked_weights_and_load_materialised_rebuilds_the_same_formats(case, tmp_path):
    arch, x, kind = CASES[case]
    form = case.removesuffix("-conv")
    model = arch()
    masks = _masks_for(model, form)
    block = {"block_size": (2, 2)} if form == "bsr" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")
        new = materialise(model, form, masks=masks, example_input=x, **block)
    masked = _masked(model, masks)
    new.save_pretrained(str(tmp_path))
    saved = _read(tmp_path)
    # the folder is the dense model's state_dict (same keys, same shapes: masked values, zeros stored) + records
    records = {f"{name}._extra_state" for name in _sparse_names(new)}
    assert sorted(saved) == sorted({*masked.state_dict(), *records})
    for key, tensor in masked.state_dict().items():
        assert torch.equal(saved[key], tensor), key
    # ... so it loads into the plain architecture (what from_pretrained does), giving the masked model
    plain = arch()
    result = plain.load_state_dict({k: v for k, v in saved.items() if k not in records}, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    with torch.no_grad():
        assert torch.equal(plain(x), masked(x))
    # ... and load_materialised rebuilds the very same sparse buffers
    back = load_materialised(arch(), saved)
    assert [type(back.get_submodule(n)).__name__ for n in _sparse_names(back)] == [kind] * 2
    assert _sparse_names(back) == _sparse_names(new)
    assert sorted(back.state_dict()) == sorted(new.state_dict())
    for key, value in new.state_dict().items():
        other = back.state_dict()[key]
        assert other == value if isinstance(value, dict) else torch.equal(other, value), key
    with torch.no_grad():
        assert torch.equal(back(x), new(x))


def test_a_reloaded_model_saves_the_same_folder_again(tmp_path):
    model = _mlp()
    new = materialise(model, "csr", masks=_masks_for(model, "csr"), example_input=torch.zeros(1, 8))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    new.save_pretrained(str(tmp_path / "a"))
    first = _read(tmp_path / "a")
    load_materialised(_mlp(), first).save_pretrained(str(tmp_path / "b"))
    second = _read(tmp_path / "b")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_older_sparse_tensor_folders_still_load():
    # what save_pretrained wrote before: format tensors + uint8 records, no dense weight
    model = _mlp()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    new = materialise(model, "csr", masks=_masks_for(model, "csr"), example_input=x)
    old = {k: encode_extra_state(v) if isinstance(v, dict) else v for k, v in new.state_dict().items()}
    assert "body.0.crow_indices" in old and "body.0.weight" not in old
    back = load_materialised(_mlp(), old)
    with torch.no_grad():
        assert torch.equal(back(x), new(x))


def test_half_precision_weights_keep_their_dtype_through_the_folder(tmp_path):
    model = _mlp().to(torch.bfloat16)
    new = materialise(model, "csr", masks=_masks_for(model, "csr"), example_input=torch.zeros(1, 8, dtype=torch.bfloat16))
    new.save_pretrained(str(tmp_path))
    saved = _read(tmp_path)
    assert saved["body.0.weight"].dtype == torch.bfloat16
    back = load_materialised(_mlp().to(torch.bfloat16), saved)
    assert back.body[0].values.dtype == torch.bfloat16
    assert torch.equal(back.body[0].values, new.body[0].values)


def test_record_of_a_linear_replacement_is_unchanged_and_a_conv1d_one_says_transposed(monkeypatch):
    from conv1d_stand_in import register

    from prunelab.materialise.sparse_modules import build_sparse

    conv1d_type = register(monkeypatch)
    linear = nn.Linear(8, 4)
    assert build_sparse(linear, "csr").get_extra_state() == {
        "kernel": "csr", "module": "CSRLinear", "weight_shape": [4, 8], "config": {}}
    conv1d = conv1d_type(4, 8)  # W (8, 4) = (in, out)
    record = build_sparse(conv1d, "bsr", block_size=(2, 2)).get_extra_state()
    assert record == {"kernel": "bsr", "module": "BSRLinear", "weight_shape": [4, 8],
                      "config": {"block_size": [2, 2]}, "transposed": True}
    module = CSRLinear.from_linear(linear)
    module.set_extra_state(record | {"module": "CSRLinear", "config": {}})
    assert module.transposed is True


# --- damaged / mismatched dense folders: one-line errors ----------------------------------------
def _saved_mlp_state(tmp_path, form: str = "csr") -> dict[str, torch.Tensor]:
    model = _mlp()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")
        new = materialise(model, form, masks=_masks_for(model, form), example_input=torch.zeros(1, 8))
    new.save_pretrained(str(tmp_path))
    return _read(tmp_path)


def test_a_dense_weight_of_the_wrong_shape_is_a_one_line_error(tmp_path):
    state = _saved_mlp_state(tmp_path)
    state["body.0.weight"] = torch.zeros(8, 7)
    with pytest.raises(PrunelabError, match=r"body\.0\.weight is shape \(8, 7\), its sparse record says \(8, 8\)") as exc:
        load_materialised(_mlp(), state)
    assert "\n" not in str(exc.value)


def test_a_2of4_record_over_an_edited_dense_weight_is_a_one_line_error(tmp_path):
    state = _saved_mlp_state(tmp_path, "2:4")
    state["body.0.weight"] = torch.ones(8, 8)  # no longer 2:4
    with pytest.raises(PrunelabError, match=r"'body\.0\.weight' is not 2:4 sparse: row 0, group 0") as exc:
        load_materialised(_mlp(), state)
    assert "\n" not in str(exc.value)


# --- a layer used at two names -----------------------------------------------------------------
class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.b = self.a  # one Linear, two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def _shared() -> _Shared:
    model = _Shared().eval()
    with torch.no_grad():
        model.a.weight.copy_(torch.arange(16.0).reshape(4, 4) - 7.5)  # (4, 4), no zeros
        model.a.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    return model


SHARED_KEEP = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)


def _by_hand(x: torch.Tensor) -> torch.Tensor:
    w = (torch.arange(16.0).reshape(4, 4) - 7.5) * SHARED_KEEP
    b = torch.tensor([0.5, -1.0, 0.0, 2.0])
    return torch.relu(x @ w.T + b) @ w.T + b


@pytest.mark.parametrize("dropped", [None, "a", "b"])
def test_load_materialised_keeps_a_layer_used_at_two_names_one_module(dropped):
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]])
    new = materialise(_shared(), "csr", masks={"a.weight": SHARED_KEEP}, example_input=x)
    assert new.b is new.a
    state = new.state_dict()
    if dropped:  # a tie saved once (as save_pretrained writes it), whichever name is kept
        state = {k: v for k, v in state.items() if not k.startswith(f"{dropped}.")}
    back = load_materialised(_shared(), state)
    assert isinstance(back.a, CSRLinear) and back.b is back.a
    assert len(list(back.buffers())) == 4  # crow_indices, col_indices, values, bias: once
    assert sorted(back.state_dict()) == sorted(new.state_dict())
    assert torch.allclose(back(x), _by_hand(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        back.a.values.mul_(2)  # an edit through one name reaches the other use
        assert torch.equal(back.b.values, back.a.values)


def test_dense_folder_of_a_layer_used_at_two_names_holds_one_tensor_and_reloads_tied(tmp_path):
    from prunelab.materialise.sparse_modules import _dense_state

    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    new = materialise(_shared(), "csr", masks={"a.weight": SHARED_KEEP}, example_input=x)
    dense = _dense_state(new.state_dict())
    assert sorted(dense) == ["a._extra_state", "a.bias", "a.weight", "b._extra_state", "b.bias", "b.weight"]
    assert dense["a.weight"] is dense["b.weight"]  # one tensor, as a dense model with a shared layer has it
    assert torch.equal(dense["a.weight"], (torch.arange(16.0).reshape(4, 4) - 7.5) * SHARED_KEEP)
    back = load_materialised(_shared(), dense)
    assert back.b is back.a and isinstance(back.a, CSRLinear)
    assert torch.allclose(back(x), _by_hand(x), rtol=0, atol=1e-6)


# --- tiny transformers models: from_pretrained gives the masked model --------------------------
def _llama():
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)).eval()


def _gpt2():
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=3, eos_token_id=3)).eval()


IDS = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _block_masks(model: nn.Module, form: str) -> dict[str, torch.Tensor]:
    """A mask for every Linear / Conv1D inside the blocks (GPT-2's Conv1D weight is (in, out): 2:4 on W^T)."""
    masks = {}
    for seed, (name, module) in enumerate(model.named_modules()):
        in_block = ".layers." in name or ".h." in name
        if not in_block or type(module).__name__ not in ("Linear", "Conv1D"):
            continue
        weight = module.weight.detach()
        if form == "2:4":
            masks[f"{name}.weight"] = _two_of_four_keep(weight.T).T if type(module).__name__ == "Conv1D" \
                else _two_of_four_keep(weight)
        else:
            masks[f"{name}.weight"] = _random_keep(tuple(weight.shape), seed)
    return masks


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch, form", [(_llama, "csr"), (_llama, "2:4"), (_gpt2, "csr"), (_gpt2, "bsr")],
                         ids=["llama-csr", "llama-2:4", "gpt2-csr", "gpt2-bsr"])
def test_from_pretrained_of_a_materialised_folder_is_the_masked_model(arch, form, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = arch()
    masks = _block_masks(model, form)
    block = {"block_size": (4, 4)} if form == "bsr" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")
        new = materialise(model, form, masks=masks, example_input=IDS, **block)
    assert _sparse_names(new) == sorted(k.removesuffix(".weight") for k in masks)
    masked = _masked(model, masks)
    new.save_pretrained(str(tmp_path))

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    loaded.eval()
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()  # was: every sparse weight, random
    assert info["unexpected_keys"] == {f"{k.removesuffix('.weight')}._extra_state" for k in masks}
    masked_state = masked.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, masked_state[key]), key
    assert torch.equal(_logits(loaded, IDS), _logits(masked, IDS))
    assert (_logits(loaded, IDS) - _logits(new, IDS)).abs().max() <= 1e-6

    fresh = type(model)(transformers.AutoConfig.from_pretrained(str(tmp_path)))
    back = load_materialised(fresh, _read(tmp_path)).eval()
    assert _sparse_names(back) == _sparse_names(new)
    assert back.lm_head.weight is (back.model.embed_tokens.weight if hasattr(back, "model")
                                   else back.transformer.wte.weight)
    for name in _sparse_names(new):
        assert type(back.get_submodule(name)) is type(new.get_submodule(name)), name
        assert torch.equal(back.get_submodule(name).dense_weight(), new.get_submodule(name).dense_weight()), name
    assert torch.equal(_logits(back, IDS), _logits(new, IDS))
    back.save_pretrained(str(tmp_path / "again"))  # the reloaded model writes the same folder (Conv1D: W (in, out))
    first, second = _read(tmp_path), _read(tmp_path / "again")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)
