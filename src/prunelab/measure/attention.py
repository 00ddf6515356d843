"""What attention computes beyond its Linear layers: ``nn.MultiheadAttention``'s projections and Q K^T, A V.

``nn.MultiheadAttention`` keeps its q/k/v in-projection as bare parameters
(``in_proj_weight`` of shape ``(3E, E)``, or ``q_proj_weight (E, E)``, ``k_proj_weight
(E, kdim)``, ``v_proj_weight (E, vdim)`` when ``kdim``/``vdim`` differ from ``E``) and
calls its ``out_proj`` functionally, so forward hooks on Linear layers see none of them.
:func:`in_projections` names the three projections and :func:`mha_call` reads one call's
shapes.  With ``N`` batch elements, ``L`` queries and ``S`` keys, one call costs

* in-projection: ``E * E * N*L`` (q) ``+ E * kdim * N*S`` (k) ``+ E * vdim * N*S`` (v) MACs
  -- ``3 * E^2`` per token for self-attention;
* out-projection: ``E * E * N*L`` MACs;
* attention products: ``2 * N * heads * L * S' * head_dim`` MACs (``L * S' * head_dim`` for
  Q K^T plus as many for A V, per head; ``heads * head_dim = E``), where ``S' = S + 1`` with
  ``add_bias_kv`` and ``+ 1`` again with ``add_zero_attn``.

Functional attention is counted by :class:`ActivationProductCounter`, a
``torch.overrides.TorchFunctionMode`` active only while it is entered:

* ``F.scaled_dot_product_attention(q, k, v)`` with ``q (..., L, E)``, ``k (..., S, E)``,
  ``v (..., S, E_v)``: ``prod(...) * L * S * (E + E_v)`` MACs (Q K^T plus A V);
* a batched ``torch.matmul``/``@``/``bmm``/``baddbmm`` of two activations (both operands
  at least 3-D, neither a parameter or buffer of the model nor a view of one), the way
  attention is often written out (``q @ k.transpose(-2, -1)``, then ``weights @ v``):
  ``out.numel() * a.shape[-1]`` MACs.

Masks (``attn_mask``, ``is_causal``, ``key_padding_mask``) do not reduce the counts: the
dense kernels compute every product.  ``torch.einsum`` is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["IN_PROJECTION_KIND", "ActivationProductCounter", "InProjection", "MhaCall", "attention_modules",
           "child_name", "in_projections", "mha_attention_macs", "mha_call"]

IN_PROJECTION_KIND = "MultiheadAttention.in_proj"

_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm})
_BADDBMMS = frozenset({torch.baddbmm, torch.Tensor.baddbmm})


def child_name(parent: str, child: str) -> str:
    """``"parent.child"``, or ``"child"`` when the parent is the model itself (``""``)."""
    return f"{parent}.{child}" if parent else child


@dataclass(frozen=True)
class InProjection:
    """One of the q/k/v in-projections of an ``nn.MultiheadAttention``: rows ``rows`` of ``weight``."""

    name: str                   # "<mha>.in_proj.q" / ".k" / ".v"
    role: str                   # "q" | "k" | "v": which input it projects
    weight_name: str            # the parameter's FQN: "<mha>.in_proj_weight" or "<mha>.q_proj_weight", ...
    weight: torch.Tensor        # the whole parameter (masks are given for it)
    rows: slice                 # this projection's rows of ``weight``
    bias: torch.Tensor | None   # the whole in_proj_bias (3E), or None
    bias_rows: slice

    def positions(self, call: MhaCall) -> int:
        """Tokens this projection is applied to in ``call`` (whole batch): ``N*L`` for q, ``N*S`` for k and v."""
        return call.batch * (call.query_len if self.role == "q" else call.key_len)


@dataclass(frozen=True)
class MhaCall:
    """Shapes of one ``nn.MultiheadAttention`` call."""

    batch: int          # N (1 for unbatched inputs)
    query_len: int      # L
    key_len: int        # S, the keys (and values) projected
    attended_len: int   # S' = S (+1 with add_bias_kv) (+1 with add_zero_attn): keys each query attends to


def attention_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Every ``nn.MultiheadAttention`` of ``model``, by FQN."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def in_projections(name: str, module: nn.MultiheadAttention) -> tuple[InProjection, ...]:
    """The q, k, v in-projections of the attention module ``name`` (packed or separate weights)."""
    e = module.embed_dim
    rows = {"q": slice(0, e), "k": slice(e, 2 * e), "v": slice(2 * e, 3 * e)}
    bias = module.in_proj_bias
    out = []
    for role, block in rows.items():
        if module.in_proj_weight is not None:
            weight_name, weight, weight_rows = "in_proj_weight", module.in_proj_weight, block
        else:
            weight_name = f"{role}_proj_weight"
            weight, weight_rows = getattr(module, weight_name), slice(0, e)
        out.append(InProjection(
            name=child_name(name, f"in_proj.{role}"), role=role, weight_name=child_name(name, weight_name),
            weight=weight, rows=weight_rows, bias=bias, bias_rows=block,
        ))
    return tuple(out)


def _argument(args: tuple, kwargs: dict[str, Any], index: int, key: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(key)


def mha_call(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any]) -> MhaCall:
    """Shapes of the call ``module(*args, **kwargs)``: ``(N, L, E)`` if batch_first, ``(L, N, E)`` if not, ``(L, E)``."""
    query, key = _argument(args, kwargs, 0, "query"), _argument(args, kwargs, 1, "key")
    if query.dim() == 3:
        batch_dim, seq_dim = (0, 1) if module.batch_first else (1, 0)
        batch, query_len, key_len = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
    else:
        batch, query_len, key_len = 1, query.shape[0], key.shape[0]
    attended = key_len + (module.bias_k is not None) + bool(module.add_zero_attn)
    return MhaCall(batch=batch, query_len=query_len, key_len=key_len, attended_len=attended)


def mha_attention_macs(module: nn.MultiheadAttention, call: MhaCall) -> int:
    """``2 * N * heads * L * S' * head_dim``: Q K^T plus A V of every head (whole batch)."""
    return 2 * call.batch * module.num_heads * call.query_len * call.attended_len * module.head_dim


def _is_weight(tensor: torch.Tensor, weight_ids: set[int]) -> bool:
    """A parameter or buffer of the model, or a view of one (``w.t()``, ``w[None]``)."""
    return id(tensor) in weight_ids or (tensor._base is not None and id(tensor._base) in weight_ids)


def _is_activation_pair(a: Any, b: Any, weight_ids: set[int]) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 3 and b.dim() >= 3
            and not _is_weight(a, weight_ids) and not _is_weight(b, weight_ids))


class ActivationProductCounter(TorchFunctionMode):
    """Adds up attention products computed functionally, while entered (``with counter: model(x)``).

    ``where()`` names the module whose forward is running (its FQN) or returns ``None`` to
    skip the call (inside an ``nn.MultiheadAttention``, counted from its shapes instead).
    ``weight_ids`` are the ``id`` of the model's parameters and buffers: a product with a
    weight is a layer's work, not attention.  ``totals`` maps ``(module FQN, kind)`` to
    ``[calls, MACs]`` over the whole batch.
    """

    def __init__(self, weight_ids: Iterable[int], where: Callable[[], str | None]) -> None:
        super().__init__()
        self.weight_ids = set(weight_ids)
        self.where = where
        self.totals: dict[tuple[str, str], list[int]] = {}

    def add(self, name: str, kind: str, macs: int) -> None:
        entry = self.totals.setdefault((name, kind), [0, 0])
        entry[0] += 1
        entry[1] += macs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _MATMULS or func in _BADDBMMS or func is F.scaled_dot_product_attention:
            name = self.where()
            if name is not None:
                self._count(func, args, kwargs, out, name)
        return out

    def _count(self, func, args: tuple, kwargs: dict[str, Any], out: Any, name: str) -> None:
        if func is F.scaled_dot_product_attention:
            query, key, value = (_argument(args, kwargs, i, k) for i, k in enumerate(("query", "key", "value")))
            # (..., L, E) x (..., S, E) -> (..., L, S), then (..., L, S) x (..., S, E_v) -> (..., L, E_v)
            macs = math.prod(out.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])
            self.add(name, "scaled_dot_product_attention", macs)
            return
        if func in _BADDBMMS:  # baddbmm(input, batch1, batch2): input + batch1 @ batch2
            a, b = _argument(args, kwargs, 1, "batch1"), _argument(args, kwargs, 2, "batch2")
        else:  # matmul(input, other), bmm(input, mat2), tensor.matmul(other)
            a = _argument(args, kwargs, 0, "input")
            b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        if _is_activation_pair(a, b, self.weight_ids):
            self.add(name, "matmul", out.numel() * a.shape[-1])  # each output element: a dot product of a.shape[-1]
