"""A small transformer encoder for images read row by row: the bench zoo's attention model.

Each of an image's ``H`` rows is one token of ``W`` pixels (``(B, 1, H, W)`` ->
``(B, H, W)``), so MNIST gives 28 tokens of 28 features, like the row-sequence view of
the pixel-MNIST literature.  Tokens are embedded to ``dim`` and get a learned position
embedding; ``depth`` pre-LayerNorm blocks (Vaswani et al. 2017; the pre-norm order of
Xiong et al. 2020) of multi-head self-attention and a GELU MLP follow; the mean token
feeds the classifier.  With the defaults (dim 64, 8 heads, depth 2, MLP 128) it has
about 72k parameters on MNIST.

Its attention is :class:`SelfAttention`: separate ``q_proj/k_proj/v_proj/out_proj``
Linears and an int ``num_heads`` read at call time -- the attention unit that
:mod:`prunelab.heads` scores and masks and :func:`prunelab.materialise.shrink.shrink_model`
cuts whole heads from.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.errors import PrunelabError

__all__ = ["RowTransformer", "SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d)) v`` per head of ``d = dim / num_heads``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise PrunelabError(f"dim {dim} is not a multiple of num_heads {num_heads!r}; "
                                "pick num_heads among the divisors of dim")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        b, t, _ = x.shape
        heads = self.num_heads  # read now: a shrunk copy has fewer
        d = self.q_proj.out_features // heads

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, H*d) -> (B, H, T, d)
            return y.view(b, t, heads, d).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, H, T, T)
        context = (weights @ v).transpose(1, 2).reshape(b, t, heads * d)  # (B, T, H*d)
        return self.out_proj(context)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class RowTransformer(nn.Module):
    """Rows as tokens -> ``depth`` blocks -> mean token -> logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dim: int = 64, num_heads: int = 8,
                 depth: int = 2, mlp_dim: int = 128) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[0] != 1:
            raise PrunelabError(f"RowTransformer reads one-channel images (1, height, width), got input_shape "
                                f"{tuple(input_shape)!r}; use a grey-scale dataset such as mnist or digits")
        _, height, width = input_shape
        self.embed = nn.Linear(width, dim)
        self.pos = nn.Parameter(torch.zeros(1, height, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, classes)
        tokens = self.embed(x.flatten(1, 2)) + self.pos  # (B, H, C)
        for block in self.blocks:
            tokens = block(tokens)
        return self.classifier(self.ln(tokens).mean(1))  # (B, classes)
