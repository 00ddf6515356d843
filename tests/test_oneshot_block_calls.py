"""Later blocks get their own call arguments (per-layer masks), not block 0's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelab.oneshot import OneShotConfig, prune_oneshot


class _ScaledBlock(nn.Module):
    def __init__(self, width: int, scale: float | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = scale

    def forward(self, x, scale=None):
        return torch.relu(self.fc(x * (self.scale if scale is None else scale)))


class _PerLayerArgs(nn.Module):
    """Block i is called with its own ``scale`` (a tensor built in the forward, like a mask
    per layer type) -- or, with ``baked``, holds it and is called with ``x`` alone."""

    def __init__(self, scales: list[float], baked: bool, width: int = 8) -> None:
        super().__init__()
        self.scales = scales
        self.baked = baked
        self.layers = nn.ModuleList(_ScaledBlock(width, s if baked else None) for s in scales)

    def forward(self, x):
        for layer, s in zip(self.layers, self.scales):
            x = layer(x) if self.baked else layer(x, scale=torch.full((x.shape[-1],), s))
        return x


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_each_block_is_calibrated_with_its_own_call_arguments(method):
    torch.manual_seed(0)
    scales = [1.0, 3.0, 0.5]
    passed = _PerLayerArgs(scales, baked=False)
    baked = _PerLayerArgs(scales, baked=True)
    baked.load_state_dict(passed.state_dict())
    calibration = [torch.randn(16, 8) * torch.linspace(0.1, 2.0, 8) for _ in range(3)]
    config = OneShotConfig(method=method, sparsity=0.5)
    report_passed = prune_oneshot(passed, calibration, config, progress=False)
    report_baked = prune_oneshot(baked, calibration, config, progress=False)
    for name in ("layers.1.fc.weight", "layers.2.fc.weight"):  # block 0's scale 1.0 would be wrong for these
        assert torch.equal(report_passed.masks[name], report_baked.masks[name])
    for a, b in zip(passed.parameters(), baked.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [r.error for r in report_passed.rows] == pytest.approx([r.error for r in report_baked.rows], rel=1e-5)


def test_blocks_sharing_block_0s_arguments_reuse_them_and_match_the_dense_inputs():
    torch.manual_seed(0)
    model = _PerLayerArgs([2.0, 2.0], baked=False)
    dense = copy.deepcopy(model)
    calibration = [torch.randn(4, 8)]
    seen = []
    handle = dense.layers[1].fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    dense(calibration[0])
    handle.remove()
    config = OneShotConfig(method="wanda", sparsity=0.5, exclude=("layers.0.*",))  # block 1 sees dense inputs
    report = prune_oneshot(model, calibration, config, progress=False)
    norms = seen[0].double().norm(dim=0)  # (8,) ||X_j||
    scores = dense.layers[1].fc.weight.detach().double().abs() * norms  # Wanda |W_ij| ||X_j||
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(4, dim=1).indices, True)
    assert torch.equal(report.masks["layers.1.fc.weight"], expected)


def test_gemma2_full_attention_layer_is_calibrated_with_its_full_causal_mask():
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=3, max_position_embeddings=64,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    dense = copy.deepcopy(model)
    calibration = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(2)]
    seen = []  # the input of layer 1's o_proj: the attention output, which the mask shapes
    handle = dense.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for item in calibration:
            dense(**item)
    handle.remove()
    kept = ("model.layers.0.*", "model.layers.1.self_attn.[qkv]_proj")  # o_proj sees the dense model's inputs
    report = prune_oneshot(model, calibration, OneShotConfig(method="wanda", sparsity=0.5, exclude=kept), progress=False)
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()
    weight = dense.model.layers[1].self_attn.o_proj.weight.detach().double()
    scores = weight.abs() * rows.norm(dim=0)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(16, dim=1).indices, True)
    assert torch.equal(report.masks["model.layers.1.self_attn.o_proj.weight"], expected)


def test_bert_and_chargpt_blocks_share_block_0s_arguments(tiny_bert):
    # one mask object for every layer: block 0's calls are reused (no second pass per item)
    transformers = pytest.importorskip("transformers")
    from prunelab.bench.chargpt import CharGPT, CharGPTConfig
    from prunelab.oneshot.block_calls import later_block_calls
    from prunelab.oneshot.block_runs import capture_block_inputs
    from prunelab.oneshot.layer_targets import find_blocks

    bert = transformers.BertModel.from_pretrained(str(tiny_bert)).eval()
    tokenizer = transformers.BertTokenizer.from_pretrained(str(tiny_bert))
    bert_items = [dict(tokenizer(["to be or not", "to be"], return_tensors="pt", padding=True))]
    gpt = CharGPT(CharGPTConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=16)).eval()
    cpu = torch.device("cpu")
    for model, items in ((bert, bert_items), (gpt, [torch.randint(0, 65, (2, 16))])):
        blocks = find_blocks(model)
        assert len(blocks) >= 2
        with torch.no_grad():
            first = capture_block_inputs(model, blocks[0], items, cpu)
            assert later_block_calls(model, blocks, items, first, cpu) is None
