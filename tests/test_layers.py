"""Layer pruning: ShortGPT block influence by hand, dropping blocks from lists, Sequentials and transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.layers import block_influence, drop_blocks, lowest_influence


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        return x + self.fc(x)


class Stack(nn.Module):
    def __init__(self, depth: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Residual(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_block_influence_is_one_minus_the_mean_token_cosine():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(5, 7, 4)
    with torch.no_grad():
        h = model.embed(x)
        expected = {}
        for i, block in enumerate(model.blocks):
            out = block(h)
            expected[f"blocks.{i}"] = 1.0 - float(F.cosine_similarity(h.double(), out.double(), dim=-1).mean())
            h = out
    scores = block_influence(model, [x[:2], x[2:]])  # two batches: the mean over all 35 tokens
    assert list(scores) == list(expected)
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], rel=1e-9)
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_padding_positions_are_left_out():
    torch.manual_seed(1)
    model = Stack()

    class Keyword(nn.Module):  # model(**batch) with an attention mask, like a tokenizer dict
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs, attention_mask):
            return self.inner(inputs)

    wrapped = Keyword(model)
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    with_mask = block_influence(wrapped, [{"inputs": x, "attention_mask": mask}])
    kept_only = block_influence(model, [x[0:1, :3], x[1:2, :5]])  # blocks act per token
    for name in kept_only:
        assert with_mask[f"inner.{name}"] == pytest.approx(kept_only[name], rel=1e-9)


def test_lowest_influence_and_drop_from_a_module_list():
    torch.manual_seed(2)
    model = Stack(depth=4)
    scores = {"blocks.0": 0.3, "blocks.1": 0.1, "blocks.2": 0.1, "blocks.3": 0.5}
    names = lowest_influence(scores, 2)
    assert names == ["blocks.1", "blocks.2"]  # tie broken by order, returned in block order
    kept = [model.blocks[0], model.blocks[3]]
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        expected = model.out(kept[1](kept[0](model.embed(x))))
    drop_blocks(model, names)
    assert len(model.blocks) == 2 and model.blocks[0] is kept[0] and model.blocks[1] is kept[1]
    torch.testing.assert_close(model(x), expected)
    assert list(model.state_dict())[2:4] == ["blocks.0.fc.weight", "blocks.0.fc.bias"]


def test_sequential_blocks_become_identity():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    drop_blocks(model, ["1"])
    assert isinstance(model[1], nn.Identity) and len(model) == 3


def test_chargpt_config_follows_the_dropped_blocks():
    from prunelab.bench.chargpt import CharGPT, CharGPTConfig

    model = CharGPT(CharGPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=16))
    drop_blocks(model, ["blocks.1"])
    assert model.config.n_layer == 2 and len(model.blocks) == 2
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 65)


def test_transformers_model_reloads_with_fewer_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(3)
    model = transformers.BertModel(config).eval()
    batch = {"input_ids": torch.randint(5, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    scores = block_influence(model, [batch])
    assert list(scores) == [f"encoder.layer.{i}" for i in range(3)] and all(0 <= s <= 2 for s in scores.values())
    drop_blocks(model, lowest_influence(scores, 1))
    assert model.config.num_hidden_layers == 2
    model.save_pretrained(str(tmp_path))
    reloaded = transformers.BertModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_gpt2_runs_with_its_kv_cache_after_a_block_is_dropped(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    torch.manual_seed(4)
    model = transformers.GPT2Model(config).eval()
    drop_blocks(model, ["h.1"])
    assert [block.attn.layer_idx for block in model.h] == [0, 1, 2]  # was [0, 2, 3]: IndexError in the cache
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        out = model(x)  # use_cache defaults to True
    model.save_pretrained(str(tmp_path))
    reloaded = transformers.GPT2Model.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.no_grad():
        expected = reloaded(x)
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    assert len(out.past_key_values) == 3


def test_per_layer_config_lists_lose_the_dropped_entries(tmp_path):
    transformers = pytest.importorskip("transformers")
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = transformers.Qwen2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, layer_types=types, sliding_window=3,
                                      use_sliding_window=True)
    torch.manual_seed(5)
    model = transformers.Qwen2ForCausalLM(config).eval()
    drop_blocks(model, ["model.layers.1"])
    assert model.config.num_hidden_layers == 3
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(str(tmp_path))
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert [layer.self_attn.sliding_window for layer in reloaded.model.layers] == [None, None, 3]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, out)


def test_a_module_used_twice_in_a_sequential_is_one_block_per_use():
    relu = nn.ReLU()
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.Sequential(first, relu, second, relu)
    drop_blocks(model, ["2"])
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Identity, nn.ReLU]
    assert model[0] is first and model[1] is relu and model[3] is relu


def test_bad_inputs_say_what_to_do():
    model = Stack()
    with pytest.raises(PrunelabError, match="unknown blocks"):
        drop_blocks(model, ["blocks.9"])
    with pytest.raises(PrunelabError, match="leaves none"):
        drop_blocks(model, ["blocks.0", "blocks.1", "blocks.2"])
    with pytest.raises(PrunelabError, match=r"count must be an integer in \[0, 3\)"):
        lowest_influence({"a": 0.0, "b": 1.0, "c": 2.0}, 3)
    with pytest.raises(PrunelabError, match="no calibration inputs"):
        block_influence(model, [])
    with pytest.raises(PrunelabError, match="no repeated blocks"):
        block_influence(nn.Linear(4, 4), [torch.randn(2, 4)])


def test_moe_layer_indices_follow_the_dropped_blocks(tmp_path):
    """Qwen-MoE picks dense MLP vs experts by layer index: after a drop the reloaded model must rebuild the same kinds."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(num_hidden_layers=5, hidden_size=16, intermediate_size=32,
                                         moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=2,
                                         num_experts_per_tok=1, num_attention_heads=2, num_key_value_heads=1,
                                         vocab_size=40, decoder_sparse_step=2, mlp_only_layers=[3])
    torch.manual_seed(6)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]  # experts at 1 only (3 is listed dense)
    drop_blocks(model, ["model.layers.0"])
    assert model.config.decoder_sparse_step == 1
    assert model.config.mlp_only_layers == [1, 2, 3]  # old 2, 3, 4; old 1 (experts) is now 0
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(str(tmp_path))
    reloaded = transformers.Qwen2MoeForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert [type(layer.mlp).__name__ for layer in reloaded.model.layers] == kinds[1:]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, out)


def test_block_influence_restores_each_module_mode():
    model = Stack()
    model.train()
    model.blocks[1].eval()  # a mixed-mode model (a frozen sub-module) must come back exactly so
    modes = [m.training for m in model.modules()]
    block_influence(model, [torch.randn(2, 3, 4)])
    assert [m.training for m in model.modules()] == modes  # was: model.train(True) set every module to train


@pytest.mark.parametrize("item", [(torch.randn(2, 3, 4), torch.zeros(2)), [torch.randn(2, 3, 4)], 3.0])
def test_block_influence_refuses_a_calibration_item_that_is_no_model_input(item):
    model = Stack()
    with pytest.raises(PrunelabError, match=r"calibration item 1 is a (tuple|list|float); expected model inputs") as info:
        block_influence(model, [torch.randn(2, 3, 4), item])  # a tuple was an AttributeError: no .to
    assert "\n" not in str(info.value)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lowest_influence_refuses_nan_or_non_number_scores_instead_of_dropping_the_wrong_blocks():
    nan = float("nan")
    # a NaN breaks the sort: (0.3, nan, 0.1, 0.2) dropped 'a' and 'b', not the lowest 'c' and 'd'
    with pytest.raises(PrunelabError, match=r"scores\['b'\] is nan; expected a number") as info:
        lowest_influence({"a": 0.3, "b": nan, "c": 0.1, "d": 0.2}, 2)
    assert "\n" not in str(info.value)
    with pytest.raises(PrunelabError, match=r"scores\['a'\] is 'x'; expected a number"):
        lowest_influence({"a": "x", "b": 0.5}, 1)  # was a TypeError from the sort
    assert lowest_influence({"a": 0.3, "b": torch.tensor(0.5), "c": 0.1}, 1) == ["c"]  # 0-d tensors are numbers
