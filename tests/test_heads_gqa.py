"""Head pruning of LLaMA-style attention (q/k/v/o_proj, grouped key/value heads) on tiny random transformers.

Every config: hidden 32, 4 query heads of head_dim 8, 2 key/value heads (2 query heads per group), 2 layers.
Nothing is downloaded.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from prunelab.errors import PrunelabError
from prunelab.heads import attention_units, head_importance, head_magnitude, head_masks, remove_heads_

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 48, 32, 4, 2, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
              initializer_range=0.3, eos_token_id=None, bos_token_id=None, pad_token_id=0)
FAMILIES = {
    "llama": lambda kw: transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)),
    "llama-bias": lambda kw: transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=True, **kw)),
    "qwen2": lambda kw: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)),  # q/k/v bias, o without
    "mistral": lambda kw: transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=3, **kw)),
    "qwen3": lambda kw: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=HEAD_DIM, **kw)),  # q/k_norm
    "gemma3": lambda kw: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(  # sliding + full layers
        head_dim=HEAD_DIM, sliding_window=3, **kw)),
}
UNITS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def build(family: str, seed: int = 0, **kw):
    """A tiny random model; every bias random too (transformers initialises them to 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FAMILIES[family]({**COMMON, **kw}).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
    return model


def ids(rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def lm_loss(output, targets):
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def greedy(model, prompt, **kw):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, **kw)


def attn(model, layer: int):
    return model.model.layers[layer].self_attn


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_a_unit_is_one_key_value_group_of_two_query_heads(family):
    units = attention_units(build(family))
    assert list(units) == UNITS
    unit = units[UNITS[1]]
    assert (unit.num_heads, unit.head_dim, unit.group_size, unit.q_width) == (2, 8, 2, 16)
    names = tuple(f"{UNITS[1]}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert (unit.q, unit.k, unit.v, unit.o) == names


def test_an_mha_llama_config_has_one_query_head_per_group():
    unit = attention_units(build("llama", num_key_value_heads=HEADS))[UNITS[0]]
    assert (unit.num_heads, unit.head_dim, unit.group_size) == (4, 8, 1)


def test_head_magnitude_by_hand_on_a_hand_set_layer():
    model = build("llama")
    a = attn(model, 0)
    with torch.no_grad():
        for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
            p.weight.zero_()
        a.q_proj.weight[17, 3] = 2.0  # q row 17: query head 2 -> group 1
        a.q_proj.weight[15, 0] = 1.0  # q row 15: query head 1 -> group 0
        a.k_proj.weight[7, 0] = 3.0  # k row 7: kv head 0
        a.v_proj.weight[8, 1] = 1.0  # v row 8: kv head 1
        a.o_proj.weight[5, 15] = 4.0  # o column 15: query head 1 -> group 0
        a.o_proj.weight[0, 31] = -2.0  # o column 31: query head 3 -> group 1
    scores = head_magnitude(model)
    assert scores[UNITS[0]].tolist() == [1.0 + 9.0 + 16.0, 4.0 + 1.0 + 4.0]
    b = attn(model, 1)  # the untouched layer against an explicit slice-by-slice sum
    expected = [sum(float(w.detach().double().square().sum()) for w in (
        b.q_proj.weight[16 * g:16 * (g + 1)], b.k_proj.weight[8 * g:8 * (g + 1)],
        b.v_proj.weight[8 * g:8 * (g + 1)], b.o_proj.weight[:, 16 * g:16 * (g + 1)])) for g in range(2)]
    torch.testing.assert_close(scores[UNITS[1]], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_head_masks_keep_one_group_per_unit_and_cut_whole_groups(allocation):
    model = build("llama")
    scores = {UNITS[0]: torch.tensor([0.2, 0.1]), UNITS[1]: torch.tensor([0.3, 0.4])}
    choice = head_masks(model, scores, 0.99, allocation=allocation)  # asks for all four: one stays per unit
    assert choice.keep[UNITS[0]].tolist() == [True, False] and choice.keep[UNITS[1]].tolist() == [False, True]
    q = choice.masks[f"{UNITS[0]}.q_proj.weight"]
    k = choice.masks[f"{UNITS[0]}.k_proj.weight"]
    assert q.shape == (32, 32) and k.shape == (16, 32)
    assert q[:, 0].tolist() == [True] * 16 + [False] * 16 and bool((q == q[:, :1]).all())  # query heads 0, 1 kept
    assert k[:, 0].tolist() == [True] * 8 + [False] * 8 and bool((k == k[:, :1]).all())
    assert torch.equal(choice.masks[f"{UNITS[0]}.v_proj.weight"], k)
    assert f"{UNITS[0]}.o_proj.weight" not in choice.masks
    assert choice.pruned_fraction == 0.5


def test_a_pruned_group_outputs_its_value_bias_whatever_the_rotary_scores():
    # q/k rows zero leave q = b_q, k = b_k, rotated by position: the softmax is NOT uniform, but
    # every value of the group is b_v, so each of its two query heads outputs exactly b_v
    model = build("llama-bias").double()
    choice = head_masks(model, {UNITS[0]: torch.tensor([1.0, 0.0]), UNITS[1]: torch.tensor([1.0, 2.0])}, 0.25)
    assert choice.keep[UNITS[0]].tolist() == [True, False]
    choice.masks.apply_(model)
    seen = {}
    handle = attn(model, 0).o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("c", args[0]))
    logits(model, ids())
    handle.remove()
    context = seen["c"]  # (B, T, 4 heads * 8)
    b_v = attn(model, 0).v_proj.bias[8:16]
    expected = b_v.repeat(2).expand(2, 9, 16)
    torch.testing.assert_close(context[..., 16:], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("llama-bias", "eager"), ("qwen2", "sdpa"),
                                         ("mistral", "eager"), ("qwen3", "sdpa")])
def test_the_masked_model_equals_the_cut_model_in_logits_and_cached_generation(family, impl):
    model = build(family, attn_implementation=impl)
    choice = head_masks(model, {UNITS[0]: torch.tensor([0.0, 1.0]), UNITS[1]: torch.tensor([2.0, 1.0])}, 0.5)
    assert choice.keep[UNITS[0]].tolist() == [False, True] and choice.keep[UNITS[1]].tolist() == [True, False]
    if family == "qwen2":  # biased v_proj, bias-free o_proj: the pruned groups' b_v must be 0 to cut them
        with torch.no_grad():
            attn(model, 0).v_proj.bias[:8] = 0
            attn(model, 1).v_proj.bias[8:] = 0
    masked = copy.deepcopy(model)
    choice.masks.apply_(masked)
    cut = remove_heads_(model, choice.keep)
    x = ids()
    err = (logits(cut, x) - logits(masked, x)).abs().max()
    assert err <= 1e-5
    assert (logits(masked, x) - logits(build(family, attn_implementation=impl), x)).abs().max() > 1e-3  # pruning bit
    a = attn(cut, 0)
    assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == (16, 8, 8, 16)
    assert a.num_key_value_groups == 2 and cut.config.num_attention_heads == 4 and cut.config.num_key_value_heads == 2
    prompt = x[:1, :4]
    expected = greedy(masked, prompt)
    assert len(set(expected[0, 4:].tolist())) > 1  # a generation that is not one repeated token
    assert torch.equal(greedy(cut, prompt), expected)
    assert torch.equal(greedy(cut, prompt, use_cache=False), expected)


def test_gemma3_sliding_window_layers_cut_like_the_masked_model():
    model = build("gemma3", attn_implementation="eager")
    assert model.config.layer_types[0] == "sliding_attention"
    keep = {UNITS[0]: torch.tensor([False, True]), UNITS[1]: torch.tensor([True, False])}
    masked = copy.deepcopy(model)
    scores = {UNITS[0]: torch.tensor([0.0, 1.0]), UNITS[1]: torch.tensor([1.0, 0.0])}
    head_masks(model, scores, 0.5).masks.apply_(masked)
    cut = remove_heads_(model, keep)
    x = ids()
    assert (logits(cut, x) - logits(masked, x)).abs().max() <= 1e-5
    assert torch.equal(greedy(cut, x[:1, :4]), greedy(masked, x[:1, :4]))


def test_static_cache_generation_follows_the_cut_head_count():
    model = build("llama")
    keep = {UNITS[0]: torch.tensor([True, False]), UNITS[1]: torch.tensor([False, True])}
    masked = copy.deepcopy(model)
    scores = {UNITS[0]: torch.tensor([1.0, 0.0]), UNITS[1]: torch.tensor([0.0, 1.0])}
    head_masks(model, scores, 0.5).masks.apply_(masked)
    cut = remove_heads_(model, keep)
    prompt = ids()[:1, :4]
    assert torch.equal(greedy(cut, prompt, cache_implementation="static"), greedy(masked, prompt))


def test_o_proj_bias_takes_the_pruned_groups_value_bias():
    model = build("llama-bias").double()
    a = attn(model, 1)
    keep = {UNITS[1]: torch.tensor([True, False])}
    b_v = a.v_proj.bias.detach()[8:].clone()  # kv head 1
    expected = a.o_proj.bias.detach() + a.o_proj.weight.detach()[:, 16:] @ b_v.repeat(2)  # query heads 2 and 3
    remove_heads_(model, keep)
    torch.testing.assert_close(attn(model, 1).o_proj.bias.detach(), expected, rtol=0, atol=1e-12)
    assert attn(model, 0).o_proj.in_features == 32  # layers not named keep every head


def test_parameter_counts_by_hand():
    model = build("llama")
    before = sum(p.numel() for p in model.parameters())
    remove_heads_(model, {UNITS[0]: torch.tensor([False, True]), UNITS[1]: torch.tensor([True, False])})
    # per layer, one group: 16 q rows + 8 k rows + 8 v rows of 32 inputs, and 16 o columns of 32 outputs
    assert before - sum(p.numel() for p in model.parameters()) == 2 * (16 * 32 + 8 * 32 + 8 * 32 + 32 * 16)
    model = build("llama-bias")
    before = sum(p.numel() for p in model.parameters())
    remove_heads_(model, {UNITS[0]: torch.tensor([False, True])})
    assert before - sum(p.numel() for p in model.parameters()) == 1536 + 16 + 8 + 8  # + q/k/v bias entries


def _brute_force_importance(model, batches, eps=1e-3):
    """|dL/dxi_g| per group by central differences of a gate on o_proj's input columns, averaged over batches.

    transformers' RMSNorm computes in float32 even in a float64 model, so eps is not tiny: the loss carries
    ~1e-7 of float32 noise, i.e. ~1e-4 in the difference quotient (a wrong gate is off by O(1)).
    """
    units = attention_units(model)
    totals = {name: torch.zeros(2, dtype=torch.float64) for name in units}
    for x, y in batches:
        for name in units:
            for g in range(2):
                values = []
                for sign in (1.0, -1.0):
                    gate = torch.ones(32, dtype=torch.float64)
                    gate[16 * g:16 * (g + 1)] += sign * eps  # the group's two query heads, columns 16g..16g+15
                    handle = model.get_submodule(f"{name}.o_proj").register_forward_pre_hook(
                        lambda m, args, gate=gate: (args[0] * gate,))
                    with torch.no_grad():
                        values.append(float(lm_loss(model(x).logits, y)))
                    handle.remove()
                totals[name][g] += abs(values[0] - values[1]) / (2 * eps)
    return {name: total / len(batches) for name, total in totals.items()}


@pytest.mark.parametrize("family", ["llama-bias", "qwen2"])
def test_head_importance_equals_a_finite_difference_of_the_group_gate(family):
    model = build(family).double()
    x = ids(2, 6)
    batches = [(x[:, :-1], x[:, 1:]), (x[:1, 1:], x[:1, :-1])]
    got = head_importance(model, batches, lm_loss, normalise=False)
    want = _brute_force_importance(model, batches)
    for name in UNITS:
        torch.testing.assert_close(got[name], want[name], rtol=5e-3, atol=1e-4)
        assert bool((got[name] > 1e-2).all())
    normalised = head_importance(model, batches, lm_loss)
    for name in UNITS:
        torch.testing.assert_close(normalised[name], got[name] / got[name].norm(), rtol=1e-12, atol=0)


def test_a_group_gate_sums_its_query_heads_gradients_before_the_absolute_value():
    # Michel et al.'s per-head gradient dL/dxi_h on the MHA view of the same weights: the group's score
    # is |sum over its two query heads|, not the sum of their absolute values
    model = build("llama", attn_implementation="eager").double()
    x = ids(2, 6)
    batches = [(x[:, :-1], x[:, 1:])]
    per_head = {}
    handles = []
    for name in UNITS:
        gate = torch.ones(4, dtype=torch.float64, requires_grad=True)
        per_head[name] = gate
        handles.append(model.get_submodule(f"{name}.o_proj").register_forward_pre_hook(
            lambda m, args, gate=gate: (args[0] * gate.repeat_interleave(8),)))
    grads = torch.autograd.grad(lm_loss(model(x[:, :-1]).logits, x[:, 1:]), list(per_head.values()))
    for handle in handles:
        handle.remove()
    got = head_importance(model, batches, lm_loss, normalise=False)
    for name, grad in zip(UNITS, grads):
        torch.testing.assert_close(got[name], grad.reshape(2, 2).sum(1).abs(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("family", ["llama-bias", "mistral"])
def test_a_fresh_model_cut_the_same_way_reloads_the_state_dict(family):
    model = build(family)
    keep = {UNITS[0]: torch.tensor([False, True]), UNITS[1]: torch.tensor([True, False])}
    state = remove_heads_(model, keep).state_dict()
    fresh = remove_heads_(build(family, seed=7), keep)
    assert not torch.equal(logits(fresh, ids()), logits(model, ids()))  # different weights before loading
    fresh.load_state_dict(state)
    assert torch.equal(logits(fresh, ids()), logits(model, ids()))


def test_a_biased_value_with_a_bias_free_o_proj_is_refused_and_nothing_is_cut():
    model = build("qwen2")  # q/k/v_proj with bias, o_proj without: the pruned group's b_v has nowhere to go
    before = copy.deepcopy(model.state_dict())
    keep = {UNITS[0]: torch.tensor([True, False]), UNITS[1]: torch.tensor([False, True])}
    with pytest.raises(PrunelabError) as info:
        remove_heads_(model, keep)
    message = str(info.value)
    assert "\n" not in message and "has no bias" in message and "zero the pruned heads' value bias" in message
    assert attn(model, 0).q_proj.out_features == 32 and before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cut_groups_update_the_attention_module_but_not_the_shared_config():
    model = build("llama")
    remove_heads_(model, {UNITS[0]: torch.tensor([False, True])})
    assert attn(model, 0).config is model.config and model.config.num_attention_heads == 4
    assert model.config.num_key_value_heads == 2 and attn(model, 0).head_dim == 8
    assert attention_units(model)[UNITS[0]].num_heads == 1 and attention_units(model)[UNITS[1]].num_heads == 2
    with pytest.raises(PrunelabError, match=r"must be a \(1,\) bool tensor"):  # the cut unit now has one group
        remove_heads_(model, {UNITS[0]: torch.tensor([True, False])})


def _refusal(model) -> str:
    with pytest.raises(PrunelabError) as info:
        head_magnitude(model)
    message = str(info.value)
    assert "\n" not in message and "not supported" in message
    return message


def test_unsupported_llama_style_attention_is_refused_in_one_line():
    common = {k: v for k, v in COMMON.items() if k not in ("eos_token_id", "bos_token_id")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common))
        olmo2 = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
        oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **common, num_local_experts=2, num_experts_per_tok=1, head_dim=HEAD_DIM))
    assert "fused qkv_proj" in _refusal(phi3)
    assert "'q_norm' with parameters of shapes [(32,)]" in _refusal(olmo2)  # a norm over all four heads
    assert "own parameters ['sinks']" in _refusal(oss)  # per-head attention sinks
