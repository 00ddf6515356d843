"""Sparse attention: causal sliding-window attention computed in blocks, so the zeros are skipped.

Dense attention scores every query against every key, ``T^2`` work.  Local attention
(the "local" pattern of Child et al. 2019, "Generating Long Sequences with Sparse
Transformers"; Beltagy et al. 2020, Longformer's sliding window) lets query ``i`` see only
the keys ``i - window < j <= i``.  Masking a dense score matrix gives those outputs but
still pays ``T^2``; :func:`local_attention` never builds the masked-out scores: it cuts the
sequence into blocks of ``window`` queries, and each block attends to its own block and the
one before -- ``2 T window`` scores instead of ``T^2``, the same outputs.

:func:`block_local_attention` is the blocked variant (the local pattern of Parmar et al.
2018, Image Transformer, and of the Sparse Transformer's block layout): a query sees the
earlier keys of its own block of ``block`` positions and the whole previous block, so
between ``block`` and ``2 block`` keys.  It needs no mask inside a block pair -- each pair
is a causal sequence of ``2 block`` -- so it runs on the fused causal kernel.

:func:`local_attention_mask` / :func:`block_local_attention_mask` are the ``(T, T)``
boolean patterns (``True`` = may attend), to check against
``torch.nn.functional.scaled_dot_product_attention(..., attn_mask=mask)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prunelab.errors import PrunelabError

__all__ = ["block_local_attention", "block_local_attention_mask", "local_attention", "local_attention_mask"]


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise PrunelabError(f"window must be a positive integer (keys each query sees), got {window!r}")


def local_attention_mask(length: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """``(length, length)`` bool: query ``i`` may attend key ``j`` iff ``i - window < j <= i``."""
    _check_window(window)
    i = torch.arange(length, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    return (j <= i) & (j > i - window)


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal sliding-window attention ``softmax(q k^T / sqrt(d) + mask) v`` in ``O(T window)``.

    ``q, k, v``: ``(..., T, d)`` (e.g. ``(B, H, T, d)``).  Equal, up to summation order, to
    ``scaled_dot_product_attention(q, k, v, attn_mask=local_attention_mask(T, window))``.
    """
    _check_window(window)
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1] or q.dim() < 2:
        raise PrunelabError(f"q, k, v must be (..., T, d) with the same T, got {tuple(q.shape)}, {tuple(k.shape)}, "
                            f"{tuple(v.shape)}")
    *lead, length, dim = q.shape
    blocks = -(-length // window)
    pad = blocks * window - length  # padded positions sit after the end: causality hides them
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb = q.reshape(*lead, blocks, window, dim)  # (..., nb, w, d)

    def with_previous(t: Tensor) -> Tensor:  # (..., T', d) -> (..., nb, 2w, d): block i-1, then block i
        tb = t.reshape(*lead, blocks, window, t.shape[-1])
        previous = F.pad(tb, (0, 0, 0, 0, 1, 0))[..., :blocks, :, :]  # block -1 is zeros
        return torch.cat((previous, tb), dim=-2)

    kb, vb = with_previous(k), with_previous(v)  # (..., nb, 2w, d)
    a = torch.arange(window, device=q.device).unsqueeze(1)  # query offset in its block
    c = torch.arange(2 * window, device=q.device).unsqueeze(0)  # key offset in the two blocks
    allowed = ((c > a) & (c <= a + window)).expand(blocks, window, 2 * window).clone()  # i - window < j <= i
    allowed[0, :, :window] = False  # block 0 has no previous block
    # the blocks are a batch dimension: one fused softmax(q k^T / sqrt(d)) v over (nb, w, 2w) scores
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed)  # (..., nb, w, d)
    return out.reshape(*lead, blocks * window, dim)[..., :length, :]


def block_local_attention_mask(length: int, block: int, device: torch.device | str | None = None) -> Tensor:
    """``(length, length)`` bool: query ``i`` may attend key ``j`` iff ``j <= i`` and ``j`` lies in
    ``i``'s block of ``block`` positions or the block before it."""
    _check_window(block)
    i = torch.arange(length, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    return (j <= i) & (j >= (i // block - 1) * block)


def block_local_attention(q: Tensor, k: Tensor, v: Tensor, block: int) -> Tensor:
    """Causal attention restricted to :func:`block_local_attention_mask` in ``O(T block)``.

    ``q, k, v``: ``(..., T, d)``.  Block 0 runs causally on its own; every later block ``b``
    runs as the second half of the causal sequence ``[block b-1, block b]`` (the first half's
    outputs are discarded), all pairs batched into one fused call.
    """
    _check_window(block)
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1] or q.dim() < 2:
        raise PrunelabError(f"q, k, v must be (..., T, d) with the same T, got {tuple(q.shape)}, {tuple(k.shape)}, "
                            f"{tuple(v.shape)}")
    *lead, length, dim = q.shape
    blocks = -(-length // block)
    pad = blocks * block - length  # after the end: causality hides it
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    first = F.scaled_dot_product_attention(q[..., :block, :], k[..., :block, :], v[..., :block, :], is_causal=True)
    if blocks == 1:
        return first[..., :length, :]

    def pairs(t: Tensor) -> Tensor:  # (..., T', d) -> (..., nb-1, 2 block, d): blocks b-1 and b
        tb = t.reshape(*lead, blocks, block, t.shape[-1])
        return torch.cat((tb[..., :-1, :, :], tb[..., 1:, :, :]), dim=-2)

    rest = F.scaled_dot_product_attention(pairs(q), pairs(k), pairs(v), is_causal=True)[..., block:, :]
    out = torch.cat((first, rest.reshape(*lead, (blocks - 1) * block, dim)), dim=-2)
    return out[..., :length, :]
