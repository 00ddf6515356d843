"""Attention costs, hand-computed: nn.MultiheadAttention projections and Q K^T / A V products."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.bench.row_transformer import SelfAttention
from prunelab.errors import PrunelabError
from prunelab.measure import measure_model, model_cost_table


class _SelfMha(nn.Module):
    """``att(x, x, x)`` on ``(B, L, E)``."""

    def __init__(self, embed_dim: int = 4, heads: int = 2, **kwargs) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(embed_dim, heads, batch_first=True, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(x, x, x)[0]


class _FusedSdpa(nn.Module):
    """One Linear makes q, k, v of 2 heads x 2 dims from ``(B, T, 4)``; ``F.scaled_dot_product_attention``."""

    def __init__(self, **sdpa_kwargs) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 2).permute(2, 0, 3, 1, 4)  # 3 x (B, heads=2, T, d=2)
        return F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)  # (B, 2, T, 2)


def _no_hooks_and_no_mode(model: nn.Module) -> bool:
    hooks = all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_always_called
                for m in model.modules())
    return hooks and not torch.overrides.has_torch_function((torch.zeros(1),))


def test_self_attention_mha_counts_projections_and_products():
    # E = 4, 2 heads of head_dim 2, L = 3 tokens, batch 2 (costs per sample)
    model = _SelfMha()
    cost = measure_model(model, torch.randn(2, 3, 4))
    names = [l.name for l in cost.layers]
    assert names == ["att.in_proj.q", "att.in_proj.k", "att.in_proj.v", "att.out_proj"]
    q, k, v, out = cost.layers
    assert {l.kind for l in (q, k, v)} == {"MultiheadAttention.in_proj"}
    assert all(l.reached and l.weight_shape == (4, 4) and l.bias_params == 4 for l in cost.layers)
    # in-projection: 3 * E^2 = 48 MACs per token, 3 tokens; out_proj (called functionally): 16 * 3
    assert [l.dense_macs for l in cost.layers] == [16 * 3] * 4
    assert cost.dense_macs == 3 * 16 * 3 + 16 * 3 == 192
    # Q K^T + A V: 2 * heads * L * L * head_dim = 2 * 2 * 3 * 3 * 2 = 72 per sample
    (attention,) = cost.attention
    assert (attention.name, attention.kind, attention.calls, attention.macs) == ("att", "MultiheadAttention", 1, 72)
    assert cost.attention_macs == 72 and cost.attention_flops == 144
    assert cost.dense_macs_with_attention == 264 and cost.sparse_macs_with_attention == 264
    # in_proj_weight / in_proj_bias are layer params now, not "other params"
    assert cost.params == 48 + 12 + 16 + 4 == 80 and cost.other_params == 0 and cost.weight_params == 64
    record = json.loads(json.dumps(cost.to_dict()))
    assert record["dense_macs"] == 192 and record["attention_macs"] == 72
    assert record["dense_flops_with_attention"] == 528 and record["sparse_flops_with_attention"] == 528
    assert record["attention"] == [{"name": "att", "kind": "MultiheadAttention", "calls": 1, "macs": 72, "flops": 144}]
    assert _no_hooks_and_no_mode(model)


def test_mha_cost_table_has_an_attention_row_and_a_named_total():
    cost = measure_model(_SelfMha(), torch.randn(1, 3, 4))
    lines = model_cost_table(cost).splitlines()
    assert len(lines) == 2 + 4 + 1 + 1  # header, rule, 4 projections, attention products, total
    row = [c.strip() for c in lines[6].strip("|").split("|")]
    assert row[0] == "att (attention products: Q K^T, A V)" and row[2:5] == ["", "", ""]
    assert row[5:7] == ["0.000144", "0.000144"]  # 2 * 72 FLOPs
    total = [c.strip() for c in lines[7].strip("|").split("|")]
    assert total[0] == "total (with attention products)" and total[2] == "80"
    assert total[5] == "0.000528"  # 2 * (192 + 72)


def test_mask_on_in_proj_weight_counts_sparse_macs_per_projection():
    model = _SelfMha()
    with torch.no_grad():
        model.att.in_proj_weight.fill_(1.0)
    mask = torch.zeros(12, 4, dtype=torch.bool)
    mask[0:4] = True     # q rows: all 16 kept
    mask[8, :] = True    # v rows: one row of 4 kept; k rows: none
    cost = measure_model(model, torch.randn(1, 3, 4), {"att.in_proj_weight": mask})
    q, k, v, out = cost.layers
    assert [l.weight_nonzeros for l in (q, k, v, out)] == [16, 0, 4, 16]
    assert [l.sparse_macs for l in (q, k, v)] == [16 * 3, 0, 4 * 3]
    assert cost.sparse_macs == (16 + 0 + 4 + 16) * 3 == 108 and cost.dense_macs == 192
    assert cost.sparse_macs_with_attention == 108 + 72  # the products are not removed by weight masks
    # the k slice in CSR: no values, 4 + 1 int32 row pointers, dense bias of 4
    assert k.csr_bytes == 5 * 4 + 4 * 4
    with pytest.raises(PrunelabError, match=r"shape \(4, 4\).*\(12, 4\)"):
        measure_model(model, torch.randn(1, 3, 4), {"att.in_proj_weight": torch.ones(4, 4, dtype=torch.bool)})


def test_cross_attention_with_kdim_vdim_uses_separate_weights_and_key_length():
    # E = 4, 2 heads, kdim 3, vdim 2; L = 2 queries, S = 5 keys, batch 1
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, kdim=3, vdim=2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 5, 9): query, key, value side by side
            return self.att(x[:, :2, :4], x[:, :, 4:7], x[:, :, 7:9], need_weights=False)[0]

    model = Cross()
    with torch.no_grad():
        model.att.k_proj_weight[0].zero_()
    cost = measure_model(model, torch.randn(1, 5, 9))
    q, k, v, out = cost.layers
    assert [l.weight_shape for l in cost.layers] == [(4, 4), (4, 3), (4, 2), (4, 4)]
    assert [l.output_positions for l in cost.layers] == [2, 5, 5, 2]
    assert [l.dense_macs for l in cost.layers] == [16 * 2, 12 * 5, 8 * 5, 16 * 2]
    assert k.weight_nonzeros == 9 and k.sparse_macs == 9 * 5
    # 2 * heads * L * S * head_dim = 2 * 2 * 2 * 5 * 2
    assert cost.attention_macs == 80
    masked = measure_model(model, torch.randn(1, 5, 9), {"att.v_proj_weight": torch.zeros(4, 2, dtype=torch.bool)})
    assert masked.layers[2].weight_nonzeros == 0


def test_bias_kv_and_zero_attn_lengthen_the_keys_and_stay_other_params():
    # S' = 3 + 1 (bias_k) + 1 (zero attention) = 5: 2 * 2 * 3 * 5 * 2 = 120
    cost = measure_model(_SelfMha(add_bias_kv=True, add_zero_attn=True), torch.randn(1, 3, 4))
    assert cost.attention_macs == 120
    assert cost.other_params == 4 + 4  # bias_k, bias_v
    assert cost.dense_macs == 4 * 16 * 3


def test_functional_sdpa_counts_qk_and_av_with_and_without_masks():
    # heads 2, T = 3, d = 2: Q K^T 2*3*3*2 + A V 2*3*3*2 = 72 per sample; the qkv Linear 48 * 3
    x = torch.randn(2, 3, 4)
    mask = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}):
        model = _FusedSdpa(**kwargs)
        cost = measure_model(model, x)
        (attention,) = cost.attention
        assert (attention.name, attention.kind, attention.calls) == ("", "scaled_dot_product_attention", 1), kwargs
        assert attention.macs == 72 and cost.dense_macs == 144, kwargs  # masks do not reduce the dense count
        assert _no_hooks_and_no_mode(model)


def test_sdpa_with_other_key_length_and_value_width():
    class Shapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 5, 6)
            return F.scaled_dot_product_attention(query=x[..., :3, :4], key=x[..., :4], value=self.inner(x))

    # per batch element: 2 heads * L 3 * S 5 * (E 4 + E_v 6) = 300
    cost = measure_model(Shapes(), torch.randn(3, 2, 5, 6))
    assert [(a.name, a.macs) for a in cost.attention] == [("", 300)]


def test_attention_written_as_matmuls_is_counted_and_weight_matmuls_are_not():
    # prunelab's SelfAttention (RowTransformer): q @ k^T then weights @ v, 2 heads of 2, T = 3
    model = nn.Sequential(SelfAttention(4, 2))
    cost = measure_model(model, torch.randn(2, 3, 4))
    (attention,) = cost.attention
    assert (attention.name, attention.kind, attention.calls, attention.macs) == ("0", "matmul", 2, 72)
    assert cost.dense_macs == 4 * 16 * 3

    class WeightMatmul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 4, 4))
            self.register_buffer("b", torch.randn(2, 4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 4)
            return x @ self.w + torch.matmul(x, self.b[0]) + x @ self.b.transpose(-2, -1)[:1]

    assert measure_model(WeightMatmul(), torch.randn(2, 2, 4)).attention == ()


def test_each_module_gets_its_own_attention_row_and_calls_add_up():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = _FusedSdpa(), _FusedSdpa()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.first(x).transpose(1, 2).reshape(x.shape)
            return self.second(self.second(y).transpose(1, 2).reshape(x.shape))

    cost = measure_model(Twice(), torch.randn(1, 3, 4))
    assert [(a.name, a.calls, a.macs) for a in cost.attention] == [("first", 1, 72), ("second", 2, 144)]
    assert cost.attention_macs == 216


def test_mode_and_hooks_are_removed_when_the_forward_raises():
    class Broken(_FusedSdpa):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            super().forward(x)
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        measure_model(model, torch.randn(1, 3, 4))
    assert _no_hooks_and_no_mode(model)
    mha = _SelfMha()
    with pytest.raises(AssertionError, match="embedding dimension"):
        measure_model(mha, torch.randn(1, 3, 5))  # width 5 is not embed_dim 4
    assert _no_hooks_and_no_mode(mha)


def test_models_without_attention_get_no_attention_keys():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    cost = measure_model(model, torch.randn(1, 4))
    assert cost.attention == () and cost.attention_macs == 0
    assert cost.dense_macs_with_attention == cost.dense_macs == 18
    assert not [key for key in cost.to_dict() if "attention" in key]
    assert model_cost_table(cost).splitlines()[-1].startswith("| total ")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hugging_face_bert_attention_is_counted(implementation):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=32,
                                     attn_implementation=implementation)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    cost = measure_model(model, torch.randint(0, 50, (1, 7)))
    # per layer: 2 * heads 4 * L 7 * L 7 * head_dim 4 = 1568; sdpa: one call, eager: two matmuls
    kind, calls = ("scaled_dot_product_attention", 1) if implementation == "sdpa" else ("matmul", 2)
    assert [(a.name, a.kind, a.calls, a.macs) for a in cost.attention] == [
        (f"encoder.layer.{i}.attention.self", kind, calls, 1568) for i in range(2)
    ]
    assert cost.attention_macs == 3136 and all(l.reached for l in cost.layers)
    assert _no_hooks_and_no_mode(model)


def test_seq_first_mha_input_is_refused_not_counted_per_query_position():
    # (L=3, N=2, E=4) into a batch_first=False MHA: dividing by shape[0] = 3 gave "per sample" costs per position
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2)  # batch_first=False

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = mha

        def forward(self, x):
            return self.att(x, x, x)[0]

    with pytest.raises(PrunelabError, match=r"'att' \(batch_first=False\) ran on a batch of 2, which example_input's "
                                            r"first dimension 3 does not divide") as info:
        measure_model(SeqFirst(), torch.randn(3, 2, 4))
    assert "\n" not in str(info.value)
    batch_first = measure_model(SeqFirst(), torch.randn(1, 2, 4))  # L=1, N=2: a batch of 2 over 1 is fine
    assert batch_first.attention[0].macs > 0
