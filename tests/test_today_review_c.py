"""Fresh-eyes review (c) of 8a2c66d (save_pretrained writes dense masked weights + form records;
load_materialised rebuilds the sparse forms) and 4d98046 (DDP: taylor / APoZ reduce sums and counts,
an error on one rank is raised on every rank).

What holds is tested as it is; each bug found is a strict xfail of the expected behaviour.
Models are tiny and built from configs (nothing is downloaded).  The 2-rank cases run this file as
a worker script (``python tests/test_today_review_c.py --ddp-worker OUT RANK``, gloo over a file
store), once for the module, killed after 60 s.
"""

from __future__ import annotations

import copy
import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from prunelab.criteria import ScoreData, get_criterion
from prunelab.errors import PrunelabError
from prunelab.materialise import load_materialised, materialise
from prunelab.materialise.sparse_modules import SparseModule, encode_extra_state

pytestmark = pytest.mark.usefixtures("one_thread")


# === helpers: masks, stand-ins, folders ===========================================================
def _random_keep(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def _two_of_four_keep(matrix: Tensor) -> Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs of an ``(out, in)`` matrix."""
    out_features, in_features = matrix.shape
    groups = matrix.detach().abs().reshape(out_features, in_features // 4, 4)  # (O, G, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


def _block_keep(matrix_shape: tuple[int, int], block: tuple[int, int], seed: int) -> Tensor:
    """A keep-mask of an ``(out, in)`` matrix made of whole ``block`` tiles (about half kept)."""
    (rows, cols), (bh, bw) = matrix_shape, block
    tiles = _random_keep((rows // bh, cols // bw), seed)
    return tiles.repeat_interleave(bh, 0).repeat_interleave(bw, 1)  # (rows, cols)


def _masked(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """The dense masked model, by hand: each named weight times its keep-mask."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in masks.items():
            masked.get_parameter(name).mul_(keep)
    return masked


def _materialise(model: nn.Module, form: str, masks: dict[str, Tensor], example: Tensor, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="2:4 kernels need")
        return materialise(model, form, masks=masks, example_input=example, **options)


def _sparse_names(model: nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, SparseModule))


def _same_state(a: dict, b: dict) -> bool:
    """Same keys, same records, same tensors (dtype, shape and values)."""
    if sorted(a) != sorted(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, dict):
            if value != other:
                return False
        elif value.dtype != other.dtype or not torch.equal(value, other):
            return False
    return True


def _read_folder(folder) -> dict[str, Tensor]:
    """Every ``*.safetensors`` file of a (possibly sharded) folder, merged."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in sorted(glob.glob(f"{folder}/*.safetensors")):
        state.update(load_file(path))
    return state


def _previous_format(state: dict) -> dict:
    """What save_pretrained wrote before 8a2c66d: the format tensors (no dense weight) and each record as a
    uint8 tensor, a record without the ``transposed`` key (added in 8a2c66d)."""
    return {key: encode_extra_state({k: v for k, v in value.items() if k != "transposed"})
            if isinstance(value, dict) else value for key, value in state.items()}


class _Folder(nn.Module):
    """A stand-in for a transformers model whose ``save_pretrained`` writes config.json and model.safetensors."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
        from safetensors.torch import save_file

        Path(save_directory, "config.json").write_text("{}")
        save_file(state_dict, f"{save_directory}/model.safetensors")


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Folder(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))).eval()


def _conv() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Folder(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3, stride=2, dilation=1))).eval()


X_MLP = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
X_CONV = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(2))


def _mlp_masks(form: str, block: tuple[int, int] = (1, 1)) -> dict[str, Tensor]:
    shapes = {"body.0.weight": (8, 8), "body.2.weight": (4, 8)}
    model = _mlp()
    if form == "2:4":
        return {n: _two_of_four_keep(model.get_parameter(n)) for n in shapes}
    return {n: _block_keep(s, block, seed) for seed, (n, s) in enumerate(shapes.items())}


# === tiny transformers models ======================================================================
def _gpt2(dtype: torch.dtype = torch.float32):
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=3, eos_token_id=3))
    return model.to(dtype).eval()


def _llama_tied():
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)).eval()


IDS = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _conv1d_masks(model: nn.Module, form: str, block: tuple[int, int] = (1, 1)) -> dict[str, Tensor]:
    """A mask for every GPT-2 Conv1D (weight ``W (in, out)``), made on ``W^T (out, in)`` and stored as ``W``'s."""
    masks = {}
    for seed, (name, module) in enumerate(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        matrix = module.weight.detach().T  # (out, in)
        keep = _two_of_four_keep(matrix) if form == "2:4" else _block_keep(tuple(matrix.shape), block, seed)
        masks[f"{name}.weight"] = keep.T.contiguous()  # (in, out)
    return masks


def _logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _quiet_hf(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded


# === 8a2c66d: exact reloads =======================================================================
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpt2_2of4_half_precision_sharded_folder_reloads_exactly_both_ways(dtype, tmp_path, monkeypatch):
    import transformers

    _quiet_hf(monkeypatch)
    model = _gpt2(dtype)
    masks = _conv1d_masks(model, "2:4")
    new = _materialise(model, "2:4", masks, IDS)
    assert _sparse_names(new) == sorted(k.removesuffix(".weight") for k in masks)
    new.save_pretrained(str(tmp_path), max_shard_size="4KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # really sharded
    assert {f"{n}._extra_state" for n in _sparse_names(new)} <= set(index)
    saved = _read_folder(tmp_path)
    masked_state = _masked(model, masks).state_dict()
    for key in masks:  # the Conv1D layout W (in, out), masked, in the model's dtype
        assert saved[key].dtype == dtype and torch.equal(saved[key], masked_state[key]), key
    back = load_materialised(_gpt2(dtype), saved)
    assert _same_state(back.state_dict(), new.state_dict())
    assert torch.equal(_logits(back), _logits(new))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype).eval()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, masked_state[key]), key


@pytest.mark.parametrize("block", [(1, 1), (2, 4), (4, 2), (16, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_gpt2_bsr_of_several_block_sizes_reloads_the_same_blocks(block, tmp_path, monkeypatch):
    _quiet_hf(monkeypatch)
    model = _gpt2()
    masks = _conv1d_masks(model, "bsr", block)
    new = _materialise(model, "bsr", masks, IDS, block_size=block)
    assert {tuple(new.get_submodule(n).config["block_size"]) for n in _sparse_names(new)} == {block}
    new.save_pretrained(str(tmp_path))
    back = load_materialised(_gpt2(), _read_folder(tmp_path))
    assert _same_state(back.state_dict(), new.state_dict())  # the same stored blocks, zeros inside them included
    assert torch.equal(_logits(back), _logits(new))


@pytest.mark.parametrize("form, block", [("csr", (1, 1)), ("bsr", (2, 4)), ("bsr", (2, 1)), ("2:4", (1, 1)),
                                         ("csr-conv", (1, 1))], ids=["csr", "bsr2x4", "bsr2x1", "2:4", "csr-conv"])
def test_stand_in_folder_reloads_exactly_and_a_previous_format_folder_still_loads(form, block, tmp_path):
    conv = form == "csr-conv"
    arch, x = (_conv, X_CONV) if conv else (_mlp, X_MLP)
    kind = form.removesuffix("-conv")
    model = arch()
    if conv:
        masks = {n: _random_keep(tuple(p.shape), s) for s, (n, p) in enumerate(model.named_parameters())
                 if n.endswith("weight")}
    else:
        masks = _mlp_masks(kind, block)
    new = _materialise(model, kind, masks, x, **({"block_size": block} if kind == "bsr" else {}))
    assert len(_sparse_names(new)) == 2
    masked = _masked(model, masks)
    new.save_pretrained(str(tmp_path))
    saved = _read_folder(tmp_path)
    back = load_materialised(arch(), saved)
    assert _same_state(back.state_dict(), new.state_dict())
    with torch.no_grad():
        assert torch.equal(back(x), new(x))
        assert (back(x) - masked(x)).abs().max() <= 1e-5
    # the format written before 8a2c66d (format tensors + uint8 records) loads to the same model ...
    old = load_materialised(arch(), _previous_format(new.state_dict()))
    assert _same_state(old.state_dict(), new.state_dict())
    # ... and writes today's dense folder
    (tmp_path / "again").mkdir()
    old.save_pretrained(str(tmp_path / "again"))
    again = _read_folder(tmp_path / "again")
    assert sorted(again) == sorted(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_bsr_with_one_block_row_of_1_wide_blocks_is_written_contiguous(tmp_path):
    from prunelab.materialise.sparse_modules import _dense_state

    model = _mlp()
    masks = _mlp_masks("bsr", (4, 1))  # body.2 is (4, 8): a single row of 4x1 blocks
    new = _materialise(model, "bsr", masks, X_MLP, block_size=(4, 1))
    dense = _dense_state(new.state_dict())
    assert torch.equal(dense["body.2.weight"], model.body[2].weight.detach() * masks["body.2.weight"])  # holds
    assert dense["body.2.weight"].is_contiguous()
    new.save_pretrained(str(tmp_path))  # ValueError: You are trying to save a non contiguous tensor: `body.2.weight`
    back = load_materialised(_mlp(), _read_folder(tmp_path))
    assert _same_state(back.state_dict(), new.state_dict())


def _previous_format_gpt2():
    model = _gpt2()
    masks = _conv1d_masks(model, "csr", (1, 1))
    new = _materialise(model, "csr", masks, IDS)
    old = _previous_format(new.state_dict())
    assert all("transposed" not in json.loads(bytes(v.tolist())) for k, v in old.items() if k.endswith("_extra_state"))
    return model, masks, new, load_materialised(_gpt2(), old)


def test_previous_format_gpt2_state_loads_with_the_same_outputs():
    _, _, new, back = _previous_format_gpt2()
    assert _sparse_names(back) == _sparse_names(new)
    assert torch.equal(_logits(back), _logits(new))


def test_previous_format_gpt2_state_resaves_conv1d_weights_in_the_conv1d_layout(tmp_path, monkeypatch):
    _quiet_hf(monkeypatch)
    model, masks, _, back = _previous_format_gpt2()
    back.save_pretrained(str(tmp_path))
    saved = _read_folder(tmp_path)
    masked_state = _masked(model, masks).state_dict()
    for key in masks:  # W (in, out), as the dense GPT-2 has it
        assert saved[key].shape == masked_state[key].shape and torch.equal(saved[key], masked_state[key]), key


def test_torch_save_of_a_materialised_gpt2_state_dict_reloads_exactly(tmp_path):
    model = _gpt2()
    new = _materialise(model, "bsr", _conv1d_masks(model, "bsr", (4, 4)), IDS, block_size=(4, 4))
    torch.save(new.state_dict(), tmp_path / "m.pt")
    back = load_materialised(_gpt2(), torch.load(tmp_path / "m.pt", weights_only=True))
    assert _same_state(back.state_dict(), new.state_dict())
    assert all(back.get_submodule(n).transposed for n in _sparse_names(back))
    assert torch.equal(_logits(back), _logits(new))


def test_a_masked_tied_lm_head_reloads_with_its_embedding_masked_the_same(tmp_path, monkeypatch):
    import transformers

    _quiet_hf(monkeypatch)
    model = _llama_tied()
    keep = _random_keep((64, 16), 3)
    new = _materialise(model, "csr", {"lm_head.weight": keep}, IDS)
    assert _sparse_names(new) == ["lm_head"]
    expected = model.lm_head.weight.detach() * keep  # (vocab, hidden): one tensor for both uses
    assert torch.equal(new.model.embed_tokens.weight, expected)  # the tie masked the embedding too
    new.save_pretrained(str(tmp_path))
    saved = _read_folder(tmp_path)
    assert torch.equal(saved["lm_head.weight"], expected) and torch.equal(saved["model.embed_tokens.weight"], expected)
    back = load_materialised(_llama_tied(), saved)
    assert torch.equal(back.lm_head.dense_weight(), expected)
    assert torch.equal(back.model.embed_tokens.weight, expected)
    assert torch.equal(_logits(back), _logits(new))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(loaded.lm_head.weight, expected)
    assert (_logits(loaded) - _logits(new)).abs().max() <= 1e-5


def test_half_precision_underflow_keeps_the_outputs_and_dense_weights(tmp_path):
    # materialised in fp32, then .half(): values 1e-9 become stored zeros; the rebuilt format drops them
    model = _mlp()
    with torch.no_grad():
        model.body[0].weight[0] = 1e-9
    masks = _mlp_masks("csr")
    new = _materialise(model, "csr", masks, X_MLP).half()
    new.save_pretrained(str(tmp_path))
    back = load_materialised(_mlp().half(), _read_folder(tmp_path))
    assert torch.equal(back.body[0].dense_weight(), new.body[0].dense_weight())
    assert back.body[0].nnz == new.body[0].nnz - int(masks["body.0.weight"][0].sum())  # only the underflowed go
    with torch.no_grad():
        assert torch.equal(back(X_MLP.half()), new(X_MLP.half()))


# --- error paths ---------------------------------------------------------------------------------------
def _damaged_mlp(col: int) -> nn.Module:
    new = _materialise(_mlp(), "csr", _mlp_masks("csr"), X_MLP)
    with torch.no_grad():
        new.body[2].col_indices[0] = col
    return new


def test_save_pretrained_of_an_out_of_range_column_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(PrunelabError, match=r"the materialised entry for layer 'body\.2' is damaged") as info:
        _damaged_mlp(99).save_pretrained(str(tmp_path))
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither config nor weights


def test_save_pretrained_of_a_negative_column_is_refused_and_writes_nothing(tmp_path):
    damaged = _damaged_mlp(-1)  # edited after the build: to_dense would wrap -1 around to the last column
    with pytest.raises(PrunelabError, match=r"layer 'body\.2' is damaged"):
        damaged.save_pretrained(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_record_without_weight_shape_is_one_line(tmp_path):
    new = _materialise(_mlp(), "csr", _mlp_masks("csr"), X_MLP)
    new.save_pretrained(str(tmp_path))
    saved = _read_folder(tmp_path)
    saved["body.0._extra_state"] = encode_extra_state({"module": "CSRLinear", "kernel": "csr", "config": {}})
    with pytest.raises(PrunelabError, match=r"layer 'body\.0' is damaged \(KeyError") as info:
        load_materialised(_mlp(), saved)
    assert "\n" not in str(info.value)


# === 4d98046: world size 1, against the papers' formulas ==========================================
def _sum_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.sum()


def _mean_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.mean()


def test_world_size_1_taylor_is_the_batch_mean_of_abs_w_times_g_by_hand():
    # Molchanov et al. 2017, eq. 8 per weight, |w g| per batch then averaged over the B = 2 batches.
    # y = w . x, w = (1, -2), loss = mean_n y_n: g_b = mean_n x_n.
    # b1: x = (1, 2), (3, -4) -> g = (2, -1), |w g| = (2, 2); b2: x = (-1, 3) -> g = (-1, 3), |w g| = (1, 6)
    # s = ((2 + 1) / 2, (2 + 6) / 2) = (1.5, 4); the signed mean would be ((2 - 1) / 2, (2 - 6) / 2) = (0.5, -2)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    batches = [(torch.tensor([[1.0, 2.0], [3.0, -4.0]]), torch.zeros(2)), (torch.tensor([[-1.0, 3.0]]), torch.zeros(1))]
    got = get_criterion("taylor")(model, dict(model.named_parameters()), ScoreData(batches, loss_fn=_mean_loss))
    assert got["weight"].tolist() == [[1.5, 4.0]]


def test_world_size_1_apoz_of_a_conv_is_the_zero_fraction_over_samples_and_positions_by_hand():
    # Hu et al. 2016, eq. 1: APoZ_c = sum_k sum_j [O_c,j(k) == 0] / (N M), here the ReLU of an identity 1x1 conv,
    # N = 2 samples in two batches, M = 2 positions.  channel 0: 1, -1 | -3, -2 -> 3 zeros of 4;
    # channel 1: 0, 2 | 5, 6 -> 1 zero (relu(0) = 0) of 4.  Score = 1 - APoZ = (0.25, 0.75), per output row.
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
    x1 = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    x2 = torch.tensor([[[[-3.0, -2.0]], [[5.0, 6.0]]]])
    got = get_criterion("apoz")(model, {"0.weight": model[0].weight}, ScoreData([(x1, torch.zeros(1)), (x2, torch.zeros(1))]))
    assert got["0.weight"].reshape(2, 2).tolist() == [[0.25, 0.25], [0.75, 0.75]]


# === 4d98046: two gloo ranks ======================================================================
class Branchy(nn.Module):
    """``a(x)``, plus ``b(x)`` only for a batch whose inputs sum above 0 (a data-decided code path)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
            self.b.weight.copy_(torch.tensor([[2.0, 0.0], [-1.0, 1.0]]))

    def forward(self, x: Tensor) -> Tensor:  # (N, 2) -> (N, 2)
        out = self.a(x)
        if x.sum() > 0:
            out = out + self.b(x)
        return out


def _batch(rows: list[list[float]]) -> tuple[Tensor, Tensor]:
    return torch.tensor(rows), torch.zeros(len(rows))


BRANCH_SHARDS = (  # rank 0: both batches take the branch; rank 1: neither does
    [_batch([[1.0, 2.0], [0.0, 1.0]]), _batch([[2.0, -1.0]])],
    [_batch([[-1.0, -1.0], [-2.0, 1.0]]), _batch([[-3.0, 2.0]]), _batch([[1.0, -4.0]])],
)
NEGATIVE_SHARDS = ([_batch([[-1.0, 0.0]])], [_batch([[0.0, -2.0]])])  # b runs on no rank


def _criterion(kind: str, batches: list) -> dict:
    """``kind``'s scores of a fresh Branchy (flat lists), or the PrunelabError it raised."""
    model = Branchy()
    data = ScoreData(batches, loss_fn=_sum_loss) if kind == "taylor" else ScoreData(batches)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # apoz: Branchy cannot be traced (data-dependent branch)
            scores = get_criterion(kind)(model, dict(model.named_parameters()), data)
    except PrunelabError as error:
        return {"error": str(error)}
    return {n: s.reshape(-1).tolist() for n, s in scores.items()}


def _taylor_by_hand(batches: list) -> dict:
    """sum_b |w * dL_b/dw| / B with L_b = sum of outputs, by an independent autograd loop (0 where unused)."""
    model = Branchy()
    params = dict(model.named_parameters())
    total = {n: torch.zeros(p.shape) for n, p in params.items()}
    for x, _ in batches:
        grads = torch.autograd.grad(model(x).sum(), list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            if g is not None:
                total[n] += (p.detach() * g).abs()
    return {n: (t / len(batches)).reshape(-1).tolist() for n, t in total.items()}


def _apoz_by_hand(batches: list) -> dict:
    """1 - (outputs <= 0 per channel) / (outputs seen) for a and b (b: only on the batches it ran on)."""
    model = Branchy()
    seen = {"a": [], "b": []}
    with torch.no_grad():
        for x, _ in batches:
            seen["a"].append(model.a(x))
            if x.sum() > 0:
                seen["b"].append(model.b(x))
    out = {}
    for name, outs in seen.items():
        stacked = torch.cat(outs)  # (N, 2)
        score = 1.0 - (stacked <= 0).double().mean(0).float()  # (2,)
        out[f"{name}.weight"] = score.repeat_interleave(2).tolist()  # rows of the (2, 2) weight
    return out


def _nan_batches(batches: list) -> list:
    x, y = batches[0]
    return [(torch.full_like(x, float("nan")), y)] + batches[1:]


def _wrong_width(batches: list) -> list:
    return batches + [(torch.zeros(1, 3), torch.zeros(1))]


def _list_inputs(batches: list) -> list:
    """A batch whose inputs are a Python list: the model raises TypeError, not RuntimeError."""
    x, y = batches[0]
    return [(x.tolist(), y)] + batches[1:]


def _worker_cases(rank: int) -> list[tuple[str, object]]:
    """``(name, thunk)`` in run order; the case that breaks the collective order comes LAST."""
    own, neg = BRANCH_SHARDS[rank], NEGATIVE_SHARDS[rank]
    cases = []
    for kind in ("taylor", "apoz"):
        cases.append((f"{kind}-branch", lambda k=kind: _criterion(k, own)))
        cases.append((f"{kind}-branch-nowhere", lambda k=kind: _criterion(k, neg)))
    # errors on both ranks: rank 0's (the lowest) is the one every rank raises
    cases.append(("apoz-errors-both", lambda: _criterion("apoz", _nan_batches(own) if rank == 0 else _wrong_width(own))))
    for kind in ("taylor", "apoz"):
        cases.append((f"{kind}-typeerror-rank1", lambda k=kind: _criterion(k, _list_inputs(own) if rank == 1 else own)))
    return cases


def _worker_main(out: Path, rank: int) -> None:
    import torch.distributed as dist

    from prunelab import distributed

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=15))
    torch.set_num_threads(1)
    record: dict[str, object] = {"world_size": distributed.world_size()}
    for name, thunk in _worker_cases(rank):
        try:
            record[name] = thunk()
        except Exception as error:  # noqa: BLE001 -- what escaped the criterion, recorded
            record[name] = {"escaped": f"{type(error).__name__}: {str(error)[:200]}"}
        record[f"{name}/in_step"] = float(distributed.all_reduce_sum_(torch.tensor([rank + 1.0])).item())  # 3.0
        (out / f"rank{rank}.json").write_text(json.dumps(record))  # after each case: later hangs lose nothing
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown at finalisation


_RUN: dict[str, object] = {}


def _two_ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' records from one cached run (killed after 60 s)."""
    if "records" not in _RUN:
        out = tmp_path_factory.mktemp("ddp_c")
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
        procs = [subprocess.Popen([sys.executable, __file__, "--ddp-worker", str(out), str(r)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True) for r in (0, 1)]
        for proc in procs:
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # this worker only (its own session)
                proc.communicate()
        files = [out / f"rank{r}.json" for r in (0, 1)]
        _RUN["records"] = [json.loads(f.read_text()) if f.exists() else {} for f in files]
    return _RUN["records"]


@pytest.fixture
def ranks(tmp_path_factory) -> list[dict]:
    records = _two_ranks(tmp_path_factory)
    assert [r.get("world_size") for r in records] == [2, 2]
    return records


def _case(records: list[dict], name: str) -> list:
    assert all(name in r for r in records), f"case {name} not recorded on every rank"
    assert [r[f"{name}/in_step"] for r in records] == [3.0, 3.0], f"ranks out of step after {name}"
    return [r[name] for r in records]


@pytest.mark.parametrize("kind", ["taylor", "apoz"])
def test_a_layer_run_on_one_rank_only_gets_the_scores_of_the_union(ranks, kind):
    union = BRANCH_SHARDS[0] + BRANCH_SHARDS[1]
    expected = _taylor_by_hand(union) if kind == "taylor" else _apoz_by_hand(union)
    got = _case(ranks, f"{kind}-branch")
    assert got[0] == got[1] == expected
    assert _criterion(kind, union) == expected  # world size 1 on the union: the same numbers


def test_hand_references_of_the_branch_case_are_what_the_papers_give():
    # the references themselves, by hand: b ran on rank 0's 3 samples only
    # taylor b (w = [[2, 0], [-1, 1]]): dL/dw_ij = sum_n x_nj on the 2 batches that ran it, g = (1, 3) then (2, -1);
    # sum_b |w g_b| = [[2 + 4, 0], [1 + 2, 3 + 1]], divided by all B = 5 batches
    assert _taylor_by_hand(BRANCH_SHARDS[0] + BRANCH_SHARDS[1])["b.weight"] == [
        pytest.approx((2 * 1 + 2 * 2) / 5), 0.0, pytest.approx((1 * 1 + 1 * 2) / 5), pytest.approx((3 + 1) / 5)]
    # apoz b: outputs (2, 1), (0, 1), (4, -3): channel 0 has 1 zero of 3, channel 1 has 1 of 3
    assert _apoz_by_hand(BRANCH_SHARDS[0] + BRANCH_SHARDS[1])["b.weight"] == [pytest.approx(2 / 3)] * 4


def test_a_layer_run_on_no_rank_is_the_same_on_every_rank(ranks):
    taylor = _case(ranks, "taylor-branch-nowhere")
    assert taylor[0] == taylor[1] and taylor[0]["b.weight"] == [0.0] * 4  # no gradient anywhere: scores 0
    apoz = _case(ranks, "apoz-branch-nowhere")
    assert apoz[0] == apoz[1] == {"error": "apoz: layer(s) b did not run on the ScoreData batches; exclude them or "
                                           "check the model"}


def test_errors_on_both_ranks_raise_the_lowest_ranks_error_everywhere(ranks):
    got = _case(ranks, "apoz-errors-both")
    assert got[0] == got[1]
    assert got[0]["error"].startswith("apoz: the output of 'a' contains NaN")
    assert got[0]["error"].endswith("(on rank 0 of 2)") and "\n" not in got[0]["error"]


@pytest.mark.parametrize("kind", ["taylor", "apoz"])
def test_a_type_error_on_one_rank_is_one_error_on_every_rank_and_the_ranks_stay_in_step(ranks, kind):
    got = _case(ranks, f"{kind}-typeerror-rank1")
    assert got[0] == got[1] and "error" in got[0]
    assert got[0]["error"].endswith("(on rank 1 of 2)") and "\n" not in got[0]["error"]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--ddp-worker":
    _worker_main(Path(sys.argv[2]), int(sys.argv[3]))
