"""A stand-in for ``transformers.pytorch_utils.Conv1D`` (GPT-2's layers), for tests that must not need transformers.

``Conv1D(nf, nx)``: ``y = x W + b`` with ``W`` stored ``(nx, nf)`` = ``(in, out)``, as in transformers 5.
:func:`register` makes prunelab find it by type, as it finds the real one (transformers is never imported).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.zeros(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (*, nx) -> (*, nf)
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(size_out)


def register(monkeypatch) -> type[Conv1D]:
    """Expose :class:`Conv1D` as ``transformers.pytorch_utils.Conv1D`` for one test (the real one, if loaded, is hidden)."""
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", types.SimpleNamespace(Conv1D=Conv1D))
    return Conv1D
