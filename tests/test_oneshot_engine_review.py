"""Review of the one-shot engine: exact masks against an independent full-model reference on tiny
transformers and hand-made models, blocks that are not called once each in order, errors that
leave the model partially pruned, calibration item messages, and the ``prunelab oneshot`` report."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot import InputStats, OneShotConfig, prune_oneshot, prune_sparsegpt

V = 64  # vocabulary of the tiny transformers models


# --- an independent reference: one full-model forward per layer ------------------------------------
def _run(model: nn.Module, item) -> None:
    model(**item) if isinstance(item, dict) else model(item)


def _matrix_layers(model: nn.Module, inside: str) -> dict[nn.Module, str]:
    """Every Linear / transformers Conv1D whose name contains ``inside``, mapped to its name."""
    conv1d = getattr(__import__("sys").modules.get("transformers.pytorch_utils"), "Conv1D", ())
    return {m: n for n, m in model.named_modules() if inside in n and isinstance(m, (nn.Linear, conv1d or ()))}


def _weight2d(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().T if not isinstance(module, nn.Linear) else module.weight.detach()  # (out, in)


def _set2d(module: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(value.T if not isinstance(module, nn.Linear) else value)


def _rows(x: torch.Tensor, item) -> torch.Tensor:
    """A layer input as float64 rows, padding positions (attention_mask 0) left out."""
    mask = item.get("attention_mask") if isinstance(item, dict) else None
    if mask is not None and x.dim() >= 3:
        x = x[mask.bool()]
    elif mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():  # OPT flattens (B*T, C)
        x = x[mask.bool().reshape(-1)]
    return x.reshape(-1, x.shape[-1]).double()


def _call_order(model: nn.Module, layers: dict[nn.Module, str], item) -> list[nn.Module]:
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, a: None if mod in order else order.append(mod)) for m in layers]
    with torch.no_grad():
        _run(model, item)
    for h in handles:
        h.remove()
    return order


def _inputs(model: nn.Module, module: nn.Module, items) -> torch.Tensor:
    """All rows ``module`` receives in full forwards of ``model`` over ``items`` (every call)."""
    rows, current = [], [None]
    handle = module.register_forward_pre_hook(lambda mod, a: rows.append(_rows(a[0], current[0])))
    with torch.no_grad():
        for item in items:
            current[0] = item
            _run(model, item)
    handle.remove()
    return torch.cat(rows)  # (n, in)


def _wanda_reference(model: nn.Module, items, inside: str, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Wanda by hand: layer by layer in call order, ``||X_j||`` from the model pruned so far."""
    model.eval()
    layers = _matrix_layers(model, inside)
    masks = {}
    for module in _call_order(model, layers, items[0]):
        norms = _inputs(model, module, items).square().sum(0).sqrt()  # (in,)
        W = _weight2d(module)
        scores = W.double().abs() * norms  # (out, in)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, scores.topk(round(sparsity * W.shape[1]), dim=1, largest=False).indices, False)
        _set2d(module, W * keep)
        masks[f"{layers[module]}.weight"] = keep if isinstance(module, nn.Linear) else keep.T
    return masks


def _dense_target_reference(model: nn.Module, items, inside: str, config: OneShotConfig) -> dict[str, torch.Tensor]:
    """SparseGPT with dense targets by hand: ``V = W C^T (H~ + lambda I)^{-1}`` from full forwards of the
    pruned model (``X~``) and of a dense copy (``X``), then the SparseGPT solver on ``V`` and ``H~``."""
    model.eval()
    dense = copy.deepcopy(model)
    layers, dense_layers = _matrix_layers(model, inside), _matrix_layers(dense, inside)
    by_name = {name: m for m, name in dense_layers.items()}
    masks = {}
    for module in _call_order(model, layers, items[0]):
        pruned_x = _inputs(model, module, items)  # (n, in)
        dense_x = _inputs(dense, by_name[layers[module]], items)  # (n, in), same tokens
        n = pruned_x.shape[0]
        H, C = 2 * pruned_x.T @ pruned_x / n, 2 * pruned_x.T @ dense_x / n  # (in, in)
        damped = H + config.dampening * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
        target = torch.linalg.solve(damped, C @ _weight2d(module).double().T).T  # (out, in): W C^T H~^-1
        solution = prune_sparsegpt(target.float(), InputStats(hessian=H, count=n), config)
        _set2d(module, solution.weight)
        masks[f"{layers[module]}.weight"] = solution.mask if isinstance(module, nn.Linear) else solution.mask.T
    return masks


def _assert_same_masks(report, reference: dict[str, torch.Tensor], model: nn.Module, ref_model: nn.Module) -> None:
    assert list(report.masks) == list(reference)
    for name, mask in reference.items():
        assert torch.equal(report.masks[name].bool(), mask.bool()), name
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


# --- tiny transformers models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _model(transformers, kind: str) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
        return transformers.LlamaForCausalLM(config), "model.layers."
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=V,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config), "transformer.h."
    if kind == "opt":
        config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                        word_embed_proj_dim=32, max_position_embeddings=32, vocab_size=V)
        return transformers.OPTForCausalLM(config), "model.decoder.layers."
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=32, vocab_size=V)
        return transformers.BertModel(config), "encoder.layer."
    if kind == "albert":  # one layer group, shared by all 3 layers: the block runs 3 times per forward
        config = transformers.AlbertConfig(hidden_size=32, embedding_size=16, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4, vocab_size=V)
        return transformers.AlbertModel(config), "encoder.albert_layer_groups."
    raise AssertionError(kind)


def _padded_items() -> list[dict[str, torch.Tensor]]:
    """Three items of different batch sizes and lengths; two padded rows, one item without a mask."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return [{"input_ids": torch.randint(0, V, (3, 7), generator=gen), "attention_mask": mask},
            {"input_ids": torch.randint(0, V, (2, 5), generator=gen), "attention_mask": torch.ones(2, 5, dtype=torch.long)},
            {"input_ids": torch.randint(0, V, (1, 9), generator=gen)}]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_wanda_masks_equal_a_reference_that_reads_norms_from_the_pruned_model(transformers, kind):
    model, inside = _model(transformers, kind)
    ref_model = copy.deepcopy(model)
    items = _padded_items()
    reference = _wanda_reference(ref_model, items, inside)
    report = prune_oneshot(model, items, OneShotConfig(method="wanda", sparsity=0.5), progress=False)
    _assert_same_masks(report, reference, model, ref_model)
    assert len(reference) == {"llama": 14, "gpt2": 8, "opt": 12, "bert": 12}[kind]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dense_targets_equal_a_reference_built_from_the_dense_models_inputs(transformers, kind):
    model, inside = _model(transformers, kind)
    ref_model = copy.deepcopy(model)
    items = _padded_items()
    config = OneShotConfig(method="sparsegpt", sparsity=0.5, dense_targets=True)
    reference = _dense_target_reference(ref_model, items, inside, config)
    report = prune_oneshot(model, items, config, progress=False)
    _assert_same_masks(report, reference, model, ref_model)


def test_bfloat16_llama_single_item_matches_the_reference(transformers):
    model, inside = _model(transformers, "llama")
    model = model.to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    items = [{"input_ids": torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3)),
              "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])}]
    reference = _wanda_reference(ref_model, items, inside)
    report = prune_oneshot(model, items, OneShotConfig(method="wanda", sparsity=0.5), progress=False)
    _assert_same_masks(report, reference, model, ref_model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# --- blocks that are not called once each, in order (regression) -------------------------------------
def test_albert_shared_layer_group_is_calibrated_on_every_call(transformers):
    model, inside = _model(transformers, "albert")
    ref_model = copy.deepcopy(model)
    items = [torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))]
    reference = _wanda_reference(ref_model, items, inside)
    with pytest.warns(UserWarning, match=r"block 'encoder\.albert_layer_groups\.0' runs 3 time\(s\) in one forward"):
        report = prune_oneshot(model, items, OneShotConfig(method="wanda", sparsity=0.5), progress=False)
    _assert_same_masks(report, reference, model, ref_model)
    # the layers outside the layer group stay dense, as without the fallback
    assert set(report.dense_layers) >= {"encoder.embedding_hidden_mapping_in", "pooler"}


class _Loop(nn.Module):
    """Three Linear blocks in a ModuleList, run in the order ``order`` (indices into the list)."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)])
        self.head = nn.Linear(6, 2)
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.order:
            x = torch.relu(self.layers[i](x))
        return self.head(x)


@pytest.mark.parametrize("order, message", [
    ([0, 2], r"block 'layers\.1' runs 0 time\(s\)"),
    ([2, 1, 0], r"the blocks run in the order 'layers\.2', 'layers\.1', 'layers\.0', not in list order"),
    ([0, 1, 1, 2], r"block 'layers\.1' runs 2 time\(s\)"),
])
def test_blocks_skipped_reordered_or_repeated_are_pruned_from_the_models_own_inputs(order, message):
    torch.manual_seed(0)
    model = _Loop(order)
    ref_model = copy.deepcopy(model)
    items = [torch.randn(5, 6, generator=torch.Generator().manual_seed(4)), torch.randn(3, 6)]
    reference = _wanda_reference(ref_model, items, "layers.")
    with pytest.warns(UserWarning, match=message):
        report = prune_oneshot(model, items, OneShotConfig(method="wanda", sparsity=0.5), progress=False)
    _assert_same_masks(report, reference, model, ref_model)
    assert "head" in report.dense_layers and ("layers.1" in report.dense_layers) == (1 not in order)


def test_a_fallback_seen_on_another_rank_is_taken_on_every_rank(monkeypatch):
    # rank 1's item 0 repeats a block, this rank's does not: both must walk the model alike (DESIGN.md, decision 3)
    from prunelab import distributed

    asked = []
    monkeypatch.setattr(distributed, "first_rank_where", lambda condition: asked.append(condition) or 1)
    torch.manual_seed(0)
    model = _Loop([0, 1, 2])
    ref_model = copy.deepcopy(model)
    items = [torch.randn(5, 6, generator=torch.Generator().manual_seed(4))]
    reference = _wanda_reference(ref_model, items, "layers.")
    with pytest.warns(UserWarning, match=r"rank 1's calibration item 0 does not call every block once, in list order; "
                                         r"the whole model is walked as one block"):
        report = prune_oneshot(model, items, OneShotConfig(method="wanda", sparsity=0.5), progress=False)
    assert asked == [False]  # this rank's own check found the blocks regular
    _assert_same_masks(report, reference, model, ref_model)  # regular blocks: the same masks either way


def test_blocks_called_once_in_order_give_no_warning_and_the_lm_head_never_runs(transformers):
    model, _ = _model(transformers, "llama")
    calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prune_oneshot(model, [torch.randint(0, V, (2, 5))], OneShotConfig(method="magnitude"), progress=False)
    handle.remove()
    assert calls == []  # no (B, T, vocab) logits: the call-order check stops at the final norm


class _WithUnused(nn.Module):
    """A block whose ``unused`` Linear never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.used(x))


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_WithUnused(), _WithUnused()])
        self.pooler = nn.Linear(6, 6)  # outside the blocks, never called either

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x))


def test_layers_that_never_run_stay_dense_and_progress_says_so(capsys):
    torch.manual_seed(0)
    model = _TwoBlocks()
    unused = model.blocks[0].unused.weight.detach().clone()
    report = prune_oneshot(model, [torch.randn(8, 6)], OneShotConfig(method="sparsegpt"), progress=True)
    assert [row.name for row in report.rows] == ["blocks.0.used", "blocks.1.used"]
    assert report.dense_layers == ("pooler", "blocks.0.unused", "blocks.1.unused")
    assert torch.equal(model.blocks[0].unused.weight, unused) and "blocks.0.unused.weight" not in report.masks
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("[oneshot sparsegpt] left dense (outside the blocks, excluded or never called): pooler, "
                    "blocks.0.unused, blocks.1.unused")


# --- errors mid-run (regression: the message says the model is partially pruned) ---------------------
class _Fails(nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.exc, self.calls, self.fail_after = exc, 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise self.exc
        return self.lin(x)


def _failing_model(exc: BaseException, fail_after: int | None) -> nn.Sequential:
    torch.manual_seed(0)
    block = _Fails(exc)
    block.fail_after = fail_after
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), block, nn.ReLU(), nn.Linear(8, 4))
    model.train()
    model[1].eval()
    return model


def test_an_error_after_block_0_was_pruned_says_the_model_is_partially_pruned():
    # calls of block 2: the call-order check, the later-block-calls probe, the layer-order probe, statistics on
    # items 0 and 1 -- then its statistics on item 2 fail, after block 0 was pruned
    model = _failing_model(RuntimeError("boom"), fail_after=5)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    items = [torch.randn(4, 8) for _ in range(3)]
    with pytest.raises(PrunelabError) as info:
        prune_oneshot(model, items, OneShotConfig(method="sparsegpt"), progress=False)
    message = str(info.value)
    assert "\n" not in message and "block '2' fails on calibration item 2 (boom)" in message
    assert message.endswith("; the model is left partially pruned (1 of 3 layers, up to '0', hold pruned weights); "
                            "reload it before pruning again")
    changed = [k for k in dense if not torch.equal(dense[k], model.state_dict()[k])]
    assert changed == ["0.weight"] and int((model[0].weight == 0).sum()) == 32
    assert [m.training for m in model] == [True, False, True, True, True]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_non_prunelab_error_mid_run_keeps_its_type_and_gets_a_note():
    model = _failing_model(ZeroDivisionError("bug"), fail_after=5)
    with pytest.raises(ZeroDivisionError, match="bug") as info:
        prune_oneshot(model, [torch.randn(4, 8) for _ in range(3)], OneShotConfig(method="sparsegpt"), progress=False)
    if hasattr(info.value, "add_note"):
        assert info.value.__notes__ == ["the model is left partially pruned (1 of 3 layers, up to '0', hold pruned "
                                        "weights); reload it before pruning again"]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_an_error_before_any_layer_is_written_has_no_partial_note():
    model = _failing_model(RuntimeError("boom"), fail_after=0)  # fails in the first forward that reaches it
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError) as info:
        prune_oneshot(model, [torch.randn(4, 8)], OneShotConfig(method="wanda"), progress=False)
    assert "partially" not in str(info.value) and "(boom)" in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())


# --- calibration item messages (regression) -------------------------------------------------------
def test_a_wrong_shaped_first_item_is_not_said_to_fail_after_block_0():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(PrunelabError) as info:
        prune_oneshot(model, [torch.randn(4, 7)], OneShotConfig(method="wanda"), progress=False)
    assert str(info.value).startswith("calibration item 0 (Tensor of shape (4, 7)) fails in the model's forward "
                                      "(mat1 and mat2 shapes cannot be multiplied (4x7 and 8x16))")


@pytest.mark.parametrize("item, what", [((torch.randn(4, 8), torch.zeros(4)), "a tuple of 2"),
                                        ([torch.randn(4, 8)], "a list of 1")])
def test_a_tuple_or_list_item_is_refused_with_the_dataloader_fix(item, what):
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(PrunelabError) as info:
        prune_oneshot(model, [item], OneShotConfig(method="wanda"), progress=False)
    assert str(info.value) == (f"calibration item 0 is {what}; expected a Tensor (model(x)) or a dict (model(**x)) -- "
                               "for (inputs, labels) batches pass the inputs alone, e.g. [x for x, _ in loader]")
    assert torch.count_nonzero(model[0].weight) == 32


# --- a second stack of blocks stays dense: said, not silent (regression) -----------------------------
def test_an_encoder_decoder_warns_that_its_encoder_stays_dense(transformers):
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=V,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    item = {"input_ids": torch.randint(0, V, (2, 6)), "decoder_input_ids": torch.randint(0, V, (2, 4))}
    with pytest.warns(UserWarning, match=r"walks the blocks of 'decoder\.block' only; the Linear/Conv layers of "
                                         r"'encoder\.block' \(12\) stay dense"):
        report = prune_oneshot(model, [item], OneShotConfig(method="wanda"), progress=False)
    assert len(report.rows) == 20 and sum(name.startswith("encoder.block.") for name in report.dense_layers) == 12
    encoder = model.encoder  # the suggested fix: prune the encoder on its own
    report = prune_oneshot(encoder, [{"input_ids": item["input_ids"]}], OneShotConfig(method="wanda"), progress=False)
    assert len(report.rows) == 12 and report.sparsity == 0.5


# --- prunelab oneshot -------------------------------------------------------------------------------
def test_cli_report_lists_the_layers_left_dense(cli, tmp_path, tiny_bert, data_dir):
    out = tmp_path / "out"
    code, _, err = cli("oneshot", "--model", str(tiny_bert), "--method", "wanda", "--calib-samples", "4",
                       "--data-dir", str(data_dir), "--out", str(out), "--no-progress")
    assert code == 0, err
    record = json.loads((out / "report.json").read_text())
    assert record["oneshot"]["dense_layers"] == ["pooler.dense"]
    assert "\nLeft dense (outside the pruned blocks, excluded, or never called): pooler.dense.\n" in \
        (out / "report.md").read_text()


@pytest.mark.parametrize("argv, expected", [
    (["--pattern", "3:2"], "--pattern '3:2' is not an N:M pattern with 0 < N < M"),
    (["--out-is-a-file"], "is a file; choose a folder for --out"),
    (["--model", "/no/such/folder"], "'/no/such/folder' is neither a known model name"),
    (["--method", "sparsgpt"], "unknown one-shot method 'sparsgpt'"),
])
def test_cli_bad_inputs_are_one_line_and_write_nothing(cli, tmp_path, tiny_bert, argv, expected):
    out = tmp_path / "out"
    if argv == ["--out-is-a-file"]:
        out.write_text("keep me")
        argv = []
    args = ["--model", str(tiny_bert), *argv] if "--model" not in argv else argv
    code, _, err = cli("oneshot", *args, "--out", str(out), "--no-progress")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if out.exists() else [])
    assert not out.exists() or out.read_text() == "keep me"
