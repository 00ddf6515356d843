"""Local attention: the mask by hand, block computation equal to masked dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunelab.errors import PrunelabError
from prunelab.sparse_attention import (
    block_local_attention, block_local_attention_mask, local_attention, local_attention_mask,
)


def test_mask_is_the_causal_window():
    assert local_attention_mask(4, 2).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize(("length", "window"), [(16, 4), (13, 4), (5, 8), (7, 1), (150, 64), (201, 70), (64, 64)])
def test_blocks_equal_masked_dense_attention(length, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))  # (B, H, T, d)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=local_attention_mask(length, window))
    torch.testing.assert_close(local_attention(q, k, v, window), expected, atol=1e-5, rtol=0)


def test_gradients_flow_like_the_dense_version():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    local_attention(q, k, v, 3).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=local_attention_mask(10, 3)).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=0)


def test_bad_inputs():
    with pytest.raises(PrunelabError, match="window must be a positive integer"):
        local_attention_mask(4, 0)
    with pytest.raises(PrunelabError, match="same T"):
        local_attention(torch.zeros(1, 4, 2), torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), 2)


@pytest.mark.parametrize("attention", [local_attention, block_local_attention])
def test_non_tensor_inputs_are_a_one_line_error(attention):
    with pytest.raises(PrunelabError, match=r"q, k, v must be tensors .* got list, Tensor, Tensor"):
        attention([[0.0]], torch.zeros(4, 2), torch.zeros(4, 2), 2)  # was an AttributeError


def test_block_local_mask_by_hand():
    assert block_local_attention_mask(6, 2).int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize(("length", "block"), [(16, 4), (13, 4), (3, 8), (9, 1), (150, 64), (201, 70), (70, 70)])
def test_block_local_equals_masked_dense_attention(length, block):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=block_local_attention_mask(length, block))
    torch.testing.assert_close(block_local_attention(q, k, v, block), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("attention", "mask"), [(local_attention, local_attention_mask),
                                                 (block_local_attention, block_local_attention_mask)])
def test_values_may_have_another_head_size(attention, mask):
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 40, 8), torch.randn(2, 40, 8), torch.randn(2, 40, 4)  # d_v = 4, d = 8
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask(40, 8))
    got = attention(q, k, v, 8)
    assert got.shape == (2, 40, 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
