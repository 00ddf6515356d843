"""Sparse attention: causal sliding-window attention computed in blocks, so the zeros are skipped.

Dense attention scores every query against every key, ``T^2`` work.  Local attention
(the "local" pattern of Child et al. 2019, "Generating Long Sequences with Sparse
Transformers"; Beltagy et al. 2020, Longformer's sliding window) lets query ``i`` see only
the keys ``i - window < j <= i``.  Masking a dense score matrix gives those outputs but
still pays ``T^2``; :func:`local_attention` never builds the masked-out scores: it cuts the
sequence into blocks of ``window`` queries, and each block attends to its own block and the
one before -- ``2 T window`` scores instead of ``T^2``, the same outputs.

:func:`local_attention_mask` is the ``(T, T)`` boolean pattern (``True`` = may attend), to
check against ``torch.nn.functional.scaled_dot_product_attention(..., attn_mask=mask)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prunelab.errors import PrunelabError

__all__ = ["local_attention", "local_attention_mask"]


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
