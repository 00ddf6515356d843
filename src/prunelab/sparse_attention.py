"""Sparse attention: causal sliding-window attention computed in blocks, so the zeros are skipped.

Dense attention scores every query against every key, ``T^2`` work.  Local attention
(the "local" pattern of Child et al. 2019, "Generating Long Sequences with Sparse
Transformers"; Beltagy et al. 2020, Longformer's sliding window) lets query ``i`` see only
the keys ``i - window < j <= i``.  Masking a dense score matrix gives those outputs but
still pays ``T^2``; :func:`local_attention` never builds the masked-out scores: it cuts the
sequence into tiles of queries, and each tile scores only the ``window`` keys before its
first query and the keys up to its last -- ``T (window + tile)`` scores instead of ``T^2``,
the same outputs.

:func:`block_local_attention` is the blocked variant (the local pattern of Parmar et al.
2018, Image Transformer, and of the Sparse Transformer's block layout): a query sees the
earlier keys of its own block of ``block`` positions and the whole previous block, so
between ``block`` and ``2 block`` keys; tiles of a block's queries score only the keys up to
their last query.

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


def _check_length(length: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:  # -1 was a RuntimeError, 2.5 a 3x3 mask
        raise PrunelabError(f"length must be an integer >= 0 (the sequence length T), got {length!r}")


def local_attention_mask(length: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """``(length, length)`` bool: query ``i`` may attend key ``j`` iff ``i - window < j <= i``."""
    _check_length(length)
    _check_window(window)
    i = torch.arange(length, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    return (j <= i) & (j > i - window)


def _tile(span: int) -> int:
    """Queries per tile: a quarter of the window, at least 16 (at most the window).  Smaller
    tiles waste fewer masked scores (a tile of ``t`` queries scores ``window + t`` keys for
    ``window`` useful ones) but make smaller matrix products; a quarter measured fastest on
    2 CPU cores for windows of 128 and 256 (``benchmarks/sparse_attention.py``)."""
    return min(span, max(16, span // 4))


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        given = ", ".join(type(t).__name__ for t in (q, k, v))
        raise PrunelabError(f"q, k, v must be tensors of shape (..., T, d), got {given}")
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1] or q.dim() < 2:
        raise PrunelabError(f"q, k, v must be (..., T, d) with the same T, got {tuple(q.shape)}, {tuple(k.shape)}, "
                            f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point) or not q.device == k.device == v.device:
        raise PrunelabError(f"q, k, v must be floating-point tensors of one dtype on one device, got "
                            f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}; convert them, "
                            f"e.g. k.to(q)")


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal sliding-window attention ``softmax(q k^T / sqrt(d) + mask) v`` in ``O(T window)``.

    ``q, k``: ``(..., T, d)`` (e.g. ``(B, H, T, d)``), ``v``: ``(..., T, d_v)``; returns
    ``(..., T, d_v)``.  Equal, up to summation order, to
    ``scaled_dot_product_attention(q, k, v, attn_mask=local_attention_mask(T, window))``.

    The first ``window`` queries see every earlier key: plain causal attention.  The rest are
    cut into tiles of ``t`` queries (:func:`_tile`); the tile starting at query ``p`` scores
    the ``window + t`` keys ``p - window .. p + t - 1`` -- overlapping views of ``k`` and ``v``,
    one ``(t, window + t)`` mask shared by all tiles -- in one fused call batched over tiles.
    """
    _check_window(window)
    _check_qkv(q, k, v)
    *lead, length, dim = q.shape
    if length <= window:  # every earlier key lies inside the window
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    head = F.scaled_dot_product_attention(q[..., :window, :], k[..., :window, :], v[..., :window, :], is_causal=True)
    tile = _tile(window)
    rest = length - window
    tiles = -(-rest // tile)
    span = window + tile  # keys a tile scores
    queries = F.pad(q[..., window:, :], (0, 0, 0, tiles * tile - rest)).reshape(*lead, tiles, tile, dim)
    keys_needed = tiles * tile + window  # >= T; padded keys sit after every real query: causality hides them

    def windows(t: Tensor) -> Tensor:  # (..., T, d) -> (..., tiles, span, d): tile i sees keys i*tile + [0, span)
        return F.pad(t, (0, 0, 0, keys_needed - length)).unfold(-2, span, tile).transpose(-1, -2)

    a = torch.arange(tile, device=q.device).unsqueeze(1)  # query offset in its tile
    c = torch.arange(span, device=q.device).unsqueeze(0)  # key offset in the tile's keys
    allowed = (c > a) & (c <= a + window)  # query window + i*tile + a, key i*tile + c: i - window < j <= i
    out = F.scaled_dot_product_attention(queries, windows(k), windows(v), attn_mask=allowed)  # (..., tiles, tile, d_v)
    out = out.reshape(*lead, tiles * tile, v.shape[-1])  # v's head size may differ from q's
    return torch.cat((head, out[..., :rest, :]), dim=-2)


def block_local_attention_mask(length: int, block: int, device: torch.device | str | None = None) -> Tensor:
    """``(length, length)`` bool: query ``i`` may attend key ``j`` iff ``j <= i`` and ``j`` lies in
    ``i``'s block of ``block`` positions or the block before it."""
    _check_length(length)
    _check_window(block)
    i = torch.arange(length, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    return (j <= i) & (j >= (i // block - 1) * block)


def block_local_attention(q: Tensor, k: Tensor, v: Tensor, block: int) -> Tensor:
    """Causal attention restricted to :func:`block_local_attention_mask` in ``O(T block)``.

    ``q, k``: ``(..., T, d)``, ``v``: ``(..., T, d_v)``; returns ``(..., T, d_v)``.  Block 0
    runs causally on its own.  The queries of every later block ``b`` attend to the key pair
    ``[block b-1, block b]``; they are cut into tiles of ``t`` queries (:func:`_tile`), and the
    tile at offset ``o`` of its block scores only the ``block + o + t`` keys up to its last
    query -- one fused call per tile offset, batched over all blocks.
    """
    _check_window(block)
    _check_qkv(q, k, v)
    *lead, length, dim = q.shape
    if length <= block:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    head = F.scaled_dot_product_attention(q[..., :block, :], k[..., :block, :], v[..., :block, :], is_causal=True)
    blocks = -(-length // block)
    pad = blocks * block - length  # after the end: causality hides it
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    def pairs(t: Tensor) -> Tensor:  # (..., T', d) -> (..., nb-1, 2 block, d): blocks b-1 and b
        tb = t.reshape(*lead, blocks, block, t.shape[-1])
        return torch.cat((tb[..., :-1, :, :], tb[..., 1:, :, :]), dim=-2)

    queries = q.reshape(*lead, blocks, block, dim)[..., 1:, :, :]  # (..., nb-1, block, d)
    keys, values = pairs(k), pairs(v)
    tile = _tile(block)
    outs = []
    for start in range(0, block, tile):
        stop = min(start + tile, block)
        span = block + stop  # the previous block and this block up to the tile's last query
        a = torch.arange(stop - start, device=q.device).unsqueeze(1)
        c = torch.arange(span, device=q.device).unsqueeze(0)
        allowed = c <= block + start + a  # causal inside the pair
        outs.append(F.scaled_dot_product_attention(queries[..., start:stop, :], keys[..., :span, :],
                                                   values[..., :span, :], attn_mask=allowed))
    rest = torch.cat(outs, dim=-2).reshape(*lead, (blocks - 1) * block, v.shape[-1])  # v's head size
    return torch.cat((head, rest), dim=-2)[..., :length, :]
