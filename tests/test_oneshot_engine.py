"""The one-shot calibration engine on an MLP, a small CNN and tiny transformers models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot import SOLVERS, OneShotConfig, find_blocks, prune_oneshot
from prunelab.structure import NM


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def _calibration(seed: int = 0, batches: int = 3, features: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, features, generator=gen) for _ in range(batches)]


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", SOLVERS.names())
def test_mlp_every_layer_reaches_the_target(method):
    model = _mlp()
    calibration = _calibration()
    report = prune_oneshot(model, calibration, OneShotConfig(method=method, sparsity=0.25), progress=False)
    assert [row.name for row in report.rows] == ["0", "2", "4"]
    assert list(report.masks) == ["0.weight", "2.weight", "4.weight"]
    for row, (name, mask) in zip(report.rows, report.masks.items(), strict=True):
        weight = dict(model.named_parameters())[name]
        assert row.sparsity == pytest.approx(0.25) and mask.shape == weight.shape
        assert (weight[~mask] == 0).all()  # the model holds real zeros
        assert 0.0 <= row.error < 1.0 and row.seconds >= 0.0
        assert (row.dampening is None) == (SOLVERS.get(method).needs != "hessian")
    assert torch.isfinite(model(calibration[0])).all()
    assert model.training  # modes restored
    assert _no_hooks(model)
    json.dumps(report.to_dict())
    assert report.peak_rss_mb > 0 and report.wall_time_s > 0


def test_reported_error_is_the_layer_reconstruction_error():
    model = _mlp(1)
    calibration = _calibration(1)
    first_dense = model[0].weight.detach().clone()
    report = prune_oneshot(model, calibration, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    X = torch.cat(calibration)  # block 0 sees the raw inputs
    with torch.no_grad():
        delta = F.linear(X, first_dense - model[0].weight)
        expected = float(delta.square().sum() / F.linear(X, first_dense).square().sum())
    assert report.rows[0].error == pytest.approx(expected, rel=1e-5)


def test_sparsegpt_beats_magnitude_on_the_mlp_outputs():
    calibration = _calibration(2, batches=4)
    X = torch.cat(calibration)
    dense = _mlp(2)
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = _mlp(2)
        prune_oneshot(model, calibration, OneShotConfig(method=method, sparsity=0.6), progress=False)
        with torch.no_grad():
            errors[method] = float((model(X) - dense(X)).square().mean())
    assert errors["sparsegpt"] < errors["magnitude"]


def test_conv2d_layout_and_nm_pattern():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 4))
    calibration = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    conv_dense = model[0].weight.detach().clone()
    report = prune_oneshot(model, calibration, OneShotConfig(method="magnitude", pattern="2:4"), progress=False)
    nm = NM(2, 4)
    for name in ("0.weight", "2.weight", "4.weight"):
        mask = report.masks[name]
        assert (nm.to_groups(mask).sum(1) == 2).all()  # the layout of prunelab.structure.NM
    X = torch.cat(calibration)
    with torch.no_grad():
        expected = F.conv2d(X, conv_dense - model[0].weight, padding=1).square().sum() / \
            F.conv2d(X, conv_dense, padding=1).square().sum()
    assert report.rows[0].error == pytest.approx(float(expected), rel=1e-4)
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", pattern="2:4"), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_singular_inputs_get_more_dampening_and_no_nan():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 6))
    calibration = []
    for _ in range(2):
        x = torch.randn(16, 8)
        x[:, 1] = x[:, 0]  # duplicated feature
        x[:, 7] = 0.0  # dead feature
        calibration.append(x)
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", dampening=0.0), progress=False)
    row = report.rows[0]
    assert row.dampening is not None and row.dampening > 0
    assert torch.isfinite(model[0].weight).all() and (model[0].weight[:, 7] == 0).all()
    assert row.error == row.error  # not NaN


def test_hooks_are_removed_after_an_error():
    model = _mlp()
    calibration = [torch.randn(8, 16), torch.randn(8, 5)]  # item 1 does not fit Linear(16, 32)
    with pytest.raises(PrunelabError, match="calibration item 1"):
        prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt"), progress=False)
    assert _no_hooks(model)
    assert model.training


def test_calibration_and_model_errors_are_one_line():
    model = _mlp()
    cases = [
        ([], "empty"),
        (torch.randn(4, 16), "sequence"),
        ([torch.randn(4, 16), "text"], "item 1"),
        ([torch.randn(4, 7)], "item 0"),
    ]
    for calibration, text in cases:
        with pytest.raises(PrunelabError, match=text) as info:
            prune_oneshot(model, calibration, OneShotConfig(), progress=False)
        assert "\n" not in str(info.value)
        assert _no_hooks(model)
    with pytest.raises(PrunelabError, match="no Linear"):
        prune_oneshot(nn.Sequential(nn.ReLU()), _calibration(), OneShotConfig(), progress=False)
    with pytest.raises(PrunelabError, match="no Linear"):
        prune_oneshot(model, _calibration(), OneShotConfig(exclude=("*",)), progress=False)
    odd = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(PrunelabError, match="'0'"):  # names the layer whose inputs M does not divide
        prune_oneshot(odd, [torch.randn(4, 6)], OneShotConfig(pattern="2:4"), progress=False)
    with pytest.raises(PrunelabError, match="'0'.*exclude"):
        prune_oneshot(odd, [torch.randn(4, 6)], OneShotConfig(pattern="2:4", exclude=("2",)), progress=False)
    assert bool((odd[2].weight != 0).all())  # nothing was pruned before the error


def test_exclude_keeps_layers_dense():
    model = _mlp()
    report = prune_oneshot(model, _calibration(), OneShotConfig(method="wanda", exclude=("4",)), progress=False)
    assert "4" in report.dense_layers and "4.weight" not in report.masks
    assert bool((model[4].weight != 0).all())


def test_exclude_none_means_nothing_excluded():
    assert OneShotConfig(method="wanda", exclude=None).exclude == ()
    with pytest.raises(PrunelabError, match="exclude must be module-name globs"):
        OneShotConfig(method="wanda", exclude=5)


def test_a_module_used_twice_in_a_sequential_runs_at_each_use():
    torch.manual_seed(0)
    act = nn.ReLU()  # one object, two positions: named_children() would list it once
    model = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 4))
    assert [name for name, _ in find_blocks(model)] == ["0", "1", "2", "3", "4"]
    dense = [m.weight.detach().clone() for m in (model[0], model[2], model[4])]
    calibration = [torch.randn(64, 8) for _ in range(2)]
    report = prune_oneshot(model, calibration, OneShotConfig(method="sparsegpt", sparsity=0.5), progress=False)
    seen = []
    handle = model[4].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for x in calibration:
            model(x)
    handle.remove()
    inputs = torch.cat(seen)  # the last layer's real inputs: after the second ReLU, so never negative
    assert float(inputs.min()) >= 0.0
    error = float(((inputs @ (dense[2] - model[4].weight.detach()).T) ** 2).sum() / ((inputs @ dense[2].T) ** 2).sum())
    assert {row.name: row.error for row in report.rows}["4"] == pytest.approx(error, rel=1e-4)


def test_a_shared_linear_is_pruned_once():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = prune_oneshot(model, [torch.randn(32, 8)], OneShotConfig(method="wanda", sparsity=0.5), progress=False)
    assert [row.name for row in report.rows] == ["0"]
    assert int((shared.weight == 0).sum()) == 32  # exactly half, not pruned again at its second use


# --- transformers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _tiny_bert(transformers):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _tokens(batches: int = 3, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        mask = torch.ones(4, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # one padded sequence
        out.append({"input_ids": torch.randint(0, 100, (4, seq), generator=gen), "attention_mask": mask})
    return out


@pytest.mark.parametrize("config", [OneShotConfig(method="sparsegpt", sparsity=0.5),
                                    OneShotConfig(method="wanda", pattern="2:4"),
                                    OneShotConfig(method="sparsegpt", sparsity=0.5, dense_targets=True)])
def test_tiny_bert_encoder_layers_are_pruned(transformers, config):
    model = _tiny_bert(transformers)
    assert [name for name, _ in find_blocks(model)] == ["encoder.layer.0", "encoder.layer.1"]
    pooler = model.pooler.dense.weight.detach().clone()
    report = prune_oneshot(model, _tokens(), config, progress=False)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")}
    assert {row.name for row in report.rows} == linears and len(linears) == 12
    for name in linears:
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) >= 0.5 - 1e-6
        assert report.masks[f"{name}.weight"].float().mean() == pytest.approx(0.5)
    assert torch.equal(model.pooler.dense.weight, pooler)  # outside the blocks: dense
    assert report.dense_layers == ("pooler.dense",)
    output = model(**_tokens(1)[0]).last_hidden_state
    assert torch.isfinite(output).all()
    assert _no_hooks(model)


@pytest.mark.parametrize("dense_targets", [False, True])
def test_tiny_gpt2_conv1d_and_cache_are_handled(transformers, dense_targets):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    calibration = [torch.randint(0, 100, (2, 12)) for _ in range(2)]
    config = OneShotConfig(method="sparsegpt", sparsity=0.5, dense_targets=dense_targets)
    report = prune_oneshot(model, calibration, config, progress=False)
    assert len(report.rows) == 8 and "lm_head" in report.dense_layers
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D stores (in, out)
    assert report.masks["transformer.h.0.attn.c_attn.weight"].shape == c_attn.shape
    assert all(row.sparsity == pytest.approx(0.5) and row.error < 1.0 for row in report.rows)
    assert torch.isfinite(model(calibration[0]).logits).all()


def test_bert_wrong_calibration_keys_raise_and_leave_no_hooks(transformers):
    model = _tiny_bert(transformers)
    with pytest.raises(PrunelabError, match="calibration item 0"):
        prune_oneshot(model, [{"input_idz": torch.zeros(1, 4, dtype=torch.long)}], OneShotConfig(), progress=False)
    assert _no_hooks(model)


def test_an_unhashable_method_name_is_a_one_line_error():
    with pytest.raises(PrunelabError, match="unknown one-shot method|valid names"):
        OneShotConfig(method=["sparsegpt"])


# --- padding, empty and non-finite calibration data, half precision -------------------------
class _TokenModel(nn.Module):
    """Embedding + a ModuleList of two MLP blocks, called like a transformers model: padding
    token 0 has a huge embedding, so its rows would dominate any statistic they enter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 4)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(2)])
        with torch.no_grad():
            self.emb.weight[0] = 100.0

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, 4)
        for layer in self.layers:
            h = layer(h)
        return h


_IDS = torch.tensor([[1, 2, 3, 4, 5, 1], [2, 3, 0, 0, 0, 0]])  # the second sequence is padded to 6
_PADDED = [{"input_ids": _IDS, "attention_mask": (_IDS != 0).long()}]
_UNPADDED = [{"input_ids": _IDS[:1]}, {"input_ids": _IDS[1:, :2]}]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "obs"])
def test_padding_positions_are_left_out_of_the_statistics(method):
    padded, unpadded = _TokenModel(), _TokenModel()
    a = prune_oneshot(padded, _PADDED, OneShotConfig(method=method), progress=False)
    b = prune_oneshot(unpadded, _UNPADDED, OneShotConfig(method=method), progress=False)
    assert all(torch.equal(a.masks[name], b.masks[name]) for name in b.masks)
    for p, q in zip(padded.parameters(), unpadded.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert [row.error for row in a.rows] == pytest.approx([row.error for row in b.rows], rel=1e-6)


def test_reported_error_counts_real_tokens_only():
    model = _TokenModel()
    dense = model.layers[0][0].weight.detach().clone()
    report = prune_oneshot(model, _PADDED, OneShotConfig(method="magnitude", sparsity=0.5), progress=False)
    with torch.no_grad():
        X = model.emb(_IDS)[_IDS != 0]  # (8, 4): the real tokens' inputs of layers.0.0
        expected = F.linear(X, dense - model.layers[0][0].weight).square().sum() / F.linear(X, dense).square().sum()
    assert report.rows[0].name == "layers.0.0"
    assert report.rows[0].error == pytest.approx(float(expected), rel=1e-6)


def test_padded_tiny_bert_prunes_like_its_unpadded_sequences(transformers):
    gen = torch.Generator().manual_seed(0)
    lengths = [10, 6, 3]
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = torch.randint(5, 100, (3, 10), generator=gen) * mask
    padded = [{"input_ids": ids, "attention_mask": mask}]
    single = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]} for i, n in enumerate(lengths)]
    a, b = _tiny_bert(transformers), _tiny_bert(transformers)
    ra = prune_oneshot(a, padded, OneShotConfig(method="wanda"), progress=False)
    rb = prune_oneshot(b, single, OneShotConfig(method="wanda"), progress=False)
    assert all(torch.equal(ra.masks[name], rb.masks[name]) for name in rb.masks)


def test_empty_or_all_padding_calibration_is_a_one_line_error_and_nothing_is_pruned():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("sparsegpt", "magnitude"):
        with pytest.raises(PrunelabError, match=r"calibration item 1 is an empty Tensor of shape \(0, 16\)"):
            prune_oneshot(model, [torch.randn(4, 16), torch.randn(0, 16)], OneShotConfig(method=method), progress=False)
    tokens = _TokenModel()
    dense = [p.detach().clone() for p in tokens.parameters()]
    all_padding = [{"input_ids": _IDS, "attention_mask": torch.zeros_like(_IDS)}]
    with pytest.raises(PrunelabError, match="'layers.0.0' received no input rows") as info:
        prune_oneshot(tokens, all_padding, OneShotConfig(method="sparsegpt"), progress=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(tokens.parameters(), dense, strict=True))
    assert _no_hooks(model) and _no_hooks(tokens)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "lobs"])
def test_non_finite_calibration_inputs_are_a_one_line_error(method):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 16)
    x[3, 2] = float("inf")
    with pytest.raises(PrunelabError, match="'0' received non-finite inputs"):
        prune_oneshot(model, [x], OneShotConfig(method=method), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert _no_hooks(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_report_the_exact_error(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    x = torch.randn(256, 64).to(dtype)
    dense = model[0].weight.detach().double()
    report = prune_oneshot(model, [x], OneShotConfig(method="magnitude", sparsity=0.1), progress=False)
    X, pruned = x.double(), model[0].weight.detach().double()
    expected = float((X @ (dense - pruned).T).square().sum() / (X @ dense.T).square().sum())
    assert report.rows[0].error == pytest.approx(expected, rel=1e-5)


def test_find_blocks_prefers_the_list_holding_most_layers_over_a_longer_nested_one():
    """An MoE-style block holds more experts than there are blocks: the blocks are still the outer list."""

    class MoEBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(4, 4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(MoEBlock() for _ in range(2))

    assert [name for name, _ in find_blocks(Model())] == ["layers.0", "layers.1"]


# --- an N:M pattern fixes the sparsity -------------------------------------------------------------
def test_an_nm_pattern_fixes_the_sparsity_and_refuses_a_conflicting_one():
    assert OneShotConfig().sparsity == 0.5 and OneShotConfig(sparsity=None).sparsity == 0.5
    assert OneShotConfig(pattern="1:4").sparsity == 0.75  # left out: 1 - N/M, what the report records
    assert OneShotConfig(pattern="2:4", sparsity=0.5).sparsity == 0.5  # consistent: accepted (the CLI passes 1 - N/M)
    assert OneShotConfig(pattern="3:8", sparsity=1.0 - 3 / 8).sparsity == 0.625
    with pytest.raises(PrunelabError, match=r"sparsity 0\.5 conflicts with pattern '1:4', which removes .* 0\.75") as info:
        OneShotConfig(pattern="1:4", sparsity=0.5)
    assert "\n" not in str(info.value) and "leave sparsity out" in str(info.value)
    for bad in (0.6, 0.0, True, "0.5", float("nan")):
        with pytest.raises(PrunelabError, match="conflicts with pattern '2:4'"):
            OneShotConfig(pattern="2:4", sparsity=bad)
    report = prune_oneshot(_mlp(), _calibration(), OneShotConfig(method="magnitude", pattern="1:4"), progress=False)
    record = report.to_dict()
    assert record["config"]["sparsity"] == 0.75 and record["config"]["pattern"] == "1:4"
    assert record["sparsity"] == pytest.approx(0.75)


# --- the engine keeps no second copy of a block's pruned weights -----------------------------------
@pytest.mark.parametrize("method, dense_targets", [("magnitude", False), ("sparsegpt", False), ("sparsegpt", True)])
def test_each_solver_weight_is_dropped_once_written_into_its_layer(monkeypatch, method, dense_targets):
    import dataclasses
    import gc
    import weakref

    from prunelab.oneshot import engine
    from prunelab.registry import Entry
    from residual_mlp import Stack

    inner = SOLVERS.get(method)
    refs: list[weakref.ref] = []  # every solver's output weight so far (and, with dense targets, its V)

    def alive() -> int:
        gc.collect()
        return sum(ref() is not None for ref in refs)

    def solve(weight, stats, config):
        assert alive() == 0, "an earlier layer's solver weight is still referenced"
        if dense_targets:
            refs.append(weakref.ref(weight))  # the dense-target weight V, not the layer's dense W
        solution = inner.fn(weight, stats, config)
        refs.append(weakref.ref(solution.weight))
        return solution

    def propagate(*args, **kwargs):  # the block is done: only masks, dense W and stats remain
        assert alive() == 0, "a solver weight is still referenced when the block propagates"
        return real_propagate(*args, **kwargs)

    real_propagate = engine.propagate
    monkeypatch.setitem(SOLVERS._entries, method, Entry(method, dataclasses.replace(inner, fn=solve), "wrapped"))
    monkeypatch.setattr(engine, "propagate", propagate)
    torch.manual_seed(0)
    model = Stack(width=12, depth=2)
    report = prune_oneshot(model, [torch.randn(32, 12)], OneShotConfig(method=method, dense_targets=dense_targets),
                           progress=False)
    assert len(refs) == 4 * (2 if dense_targets else 1) and alive() == 0
    assert list(report.masks) == [f"blocks.{b}.{fc}.weight" for b in (0, 1) for fc in ("fc1", "fc2")]
    for name, keep in report.masks.items():
        weight = dict(model.named_parameters())[name]
        assert not bool(weight[~keep].any()) and int((~keep).sum()) == weight.numel() // 2
