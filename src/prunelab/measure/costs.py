"""The cost records :func:`~prunelab.measure.counting.measure_model` returns: per layer, per attention, per model.

Every record is frozen and stores raw per-sample counts only; every derived number
(params, MACs, FLOPs, bytes, sparsity) is a property, so a record can never be internally
inconsistent.  The formulas (see :mod:`prunelab.measure.counting` for how the counts are
taken):

* ``dense_macs  = weight_params   * output_positions``;  ``sparse_macs = weight_nonzeros * output_positions``
* FLOPs are ``2 * MACs`` (bias additions are not counted).
* dense bytes ``4 * params``; CSR ``4 * nnz + 4 * nnz + 4 * (rows + 1)`` (+ dense bias);
  bitmap ``4 * nnz + ceil(numel / 8)`` (+ dense bias).
* attention products (:class:`AttentionCost`) are products of two activations (Q K^T and
  A V), not of a weight: no weight mask removes them, so ``ModelCost.dense_macs`` and
  ``sparse_macs`` (weight MACs of Linear/Conv layers and attention projections) leave them
  out and ``attention_macs`` reports them; ``dense_macs_with_attention = dense_macs +
  attention_macs`` (and ``sparse_macs_with_attention``) is the whole count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BYTES_PER_VALUE = 4  # fp32 values
BYTES_PER_INDEX = 4  # int32 indices

__all__ = ["BYTES_PER_INDEX", "BYTES_PER_VALUE", "AttentionCost", "LayerCost", "ModelCost"]


@dataclass(frozen=True)
class LayerCost:
    """Per-sample cost of one Linear/Conv layer (or materialised sparse module, or attention in-projection).

    Stored fields are the raw counts; every derived number (params, MACs, FLOPs, bytes,
    sparsity) is a property, so a ``LayerCost`` can never be internally inconsistent.
    ``reached`` is False when the forward pass never called this layer; its MACs are 0.
    """

    name: str                       # module FQN, e.g. "features.0"
    kind: str                       # "Linear", "Conv2d", ..., "MultiheadAttention.in_proj"
    weight_shape: tuple[int, ...]
    weight_params: int
    weight_nonzeros: int            # nonzero AND kept by the mask
    bias_params: int                # counted dense
    output_positions: int           # per sample: 1 for Linear on (B, C), T on (B, T, C), H_out*W_out for Conv2d,
                                    # H_in*W_in for ConvTranspose2d (positions the whole weight is applied at)
    reached: bool = True
    tied_to: str | None = None      # the earlier layer whose weight this one uses (tied): MACs count, storage does not
    format_bytes: int | None = None  # a materialised sparse module: bytes its format + bias really store
    bias_tied_to: str | None = None  # the earlier layer whose bias this one uses (None: its own bias, or none)
    matrix_rows: int | None = None   # rows of the (out, in) matrix CSR stores when not weight_shape[0]:
                                     # a transformers Conv1D's weight is (in, out), its matrix W^T has out rows

    @property
    def shares_storage(self) -> bool:
        """Its weight is an earlier layer's (``tied_to``): stored, and counted in the model's bytes, once."""
        return self.tied_to is not None

    @property
    def params(self) -> int:
        return self.weight_params + self.bias_params

    @property
    def nonzeros(self) -> int:
        """Weight nonzeros plus the (dense) bias."""
        return self.weight_nonzeros + self.bias_params

    @property
    def sparsity(self) -> float:
        """Fraction of the weight that is zero or pruned (the bias is not included)."""
        return 1.0 - self.weight_nonzeros / self.weight_params if self.weight_params else 0.0

    @property
    def dense_macs(self) -> int:
        return self.weight_params * self.output_positions

    @property
    def sparse_macs(self) -> int:
        return self.weight_nonzeros * self.output_positions

    @property
    def dense_flops(self) -> int:
        return 2 * self.dense_macs

    @property
    def sparse_flops(self) -> int:
        return 2 * self.sparse_macs

    @property
    def dense_bytes(self) -> int:
        return BYTES_PER_VALUE * self.params

    @property
    def csr_bytes(self) -> int:
        rows = self.matrix_rows if self.matrix_rows is not None else self.weight_shape[0] if self.weight_shape else 1
        nnz = self.weight_nonzeros
        weight = BYTES_PER_VALUE * nnz + BYTES_PER_INDEX * nnz + BYTES_PER_INDEX * (rows + 1)
        return weight + BYTES_PER_VALUE * self.bias_params

    @property
    def bitmap_bytes(self) -> int:
        weight = BYTES_PER_VALUE * self.weight_nonzeros + math.ceil(self.weight_params / 8)
        return weight + BYTES_PER_VALUE * self.bias_params

    @property
    def best_sparse_bytes(self) -> int:
        """The smaller of CSR and bitmap (dense is not considered: compare with ``dense_bytes``)."""
        return min(self.csr_bytes, self.bitmap_bytes)

    @property
    def stored_bytes(self) -> int:
        """What the layer stores as it is: ``format_bytes`` when materialised, else ``dense_bytes``."""
        return self.dense_bytes if self.format_bytes is None else self.format_bytes

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready numbers; ``size_format_bytes`` only for a materialised sparse module."""
        extra = {} if self.format_bytes is None else {"size_format_bytes": self.format_bytes}
        return {
            "name": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape), "reached": self.reached,
            "params": self.params, "weight_params": self.weight_params, "weight_nonzeros": self.weight_nonzeros,
            "bias_params": self.bias_params, "nonzeros": self.nonzeros, "sparsity": self.sparsity,
            "output_positions": self.output_positions,
            "dense_macs": self.dense_macs, "sparse_macs": self.sparse_macs,
            "dense_flops": self.dense_flops, "sparse_flops": self.sparse_flops,
            "size_dense_bytes": self.dense_bytes, "size_csr_bytes": self.csr_bytes,
            "size_bitmap_bytes": self.bitmap_bytes, "size_best_sparse_bytes": self.best_sparse_bytes, **extra,
        }


@dataclass(frozen=True)
class AttentionCost:
    """Per-sample attention products (Q K^T and A V) computed inside one module.

    ``kind`` says how they were computed: ``"MultiheadAttention"`` (an
    ``nn.MultiheadAttention``, counted from its call's shapes), ``"scaled_dot_product_attention"``
    (a functional ``F.scaled_dot_product_attention`` call) or ``"matmul"`` (a batched
    ``matmul``/``@``/``bmm``/``baddbmm`` of two activations, e.g. ``q @ k.transpose(-2, -1)``).
    Per (batch element, head) with ``L`` queries, ``S`` keys, query/key width ``E`` and value
    width ``E_v``: ``L * S * E`` MACs for Q K^T plus ``L * S * E_v`` for A V; for self-attention
    with ``heads`` heads of ``head_dim``: ``2 * heads * L^2 * head_dim`` per sample.
    Attention masks and causality do not reduce the count (dense kernels compute every product).
    """

    name: str       # FQN of the innermost module whose forward computed them ("" = the model itself)
    kind: str       # "MultiheadAttention" | "scaled_dot_product_attention" | "matmul"
    calls: int      # calls in the measured forward pass (whole batch)
    macs: int       # per sample

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "calls": self.calls, "macs": self.macs, "flops": self.flops}


@dataclass(frozen=True)
class ModelCost:
    """Per-sample cost of a whole model: its Linear/Conv layers plus ``other_params`` counted dense.

    ``attention`` lists the attention products the forward pass computed (empty for a model
    without attention); they add to ``attention_macs``, never to ``dense_macs``/``sparse_macs``.
    """

    layers: tuple[LayerCost, ...]
    other_params: int = 0  # parameters outside Linear/Conv layers (norms, embeddings, ...), stored dense
    attention: tuple[AttentionCost, ...] = ()

    @property
    def stored_layers(self) -> tuple[LayerCost, ...]:
        """The layers that own their weight (a tied weight is stored, and counted, once)."""
        return tuple(l for l in self.layers if not l.shares_storage)

    @property
    def weight_params(self) -> int:
        return sum(l.weight_params for l in self.stored_layers)

    @property
    def weight_nonzeros(self) -> int:
        return sum(l.weight_nonzeros for l in self.stored_layers)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.stored_layers) + self.other_params

    @property
    def nonzeros(self) -> int:
        return sum(l.nonzeros for l in self.stored_layers) + self.other_params

    @property
    def sparsity(self) -> float:
        """Fraction of Linear/Conv weights that are zero or pruned (biases and other params excluded)."""
        total = self.weight_params
        return 1.0 - self.weight_nonzeros / total if total else 0.0

    @property
    def dense_macs(self) -> int:
        return sum(l.dense_macs for l in self.layers)

    @property
    def sparse_macs(self) -> int:
        return sum(l.sparse_macs for l in self.layers)

    @property
    def dense_flops(self) -> int:
        return 2 * self.dense_macs

    @property
    def sparse_flops(self) -> int:
        return 2 * self.sparse_macs

    @property
    def attention_macs(self) -> int:
        """Q K^T and A V products (activation by activation; no weight mask removes them)."""
        return sum(a.macs for a in self.attention)

    @property
    def attention_flops(self) -> int:
        return 2 * self.attention_macs

    @property
    def dense_macs_with_attention(self) -> int:
        """``dense_macs + attention_macs``: everything the forward multiplies, pruned or not."""
        return self.dense_macs + self.attention_macs

    @property
    def sparse_macs_with_attention(self) -> int:
        """``sparse_macs + attention_macs``: the work left when pruned weights are skipped."""
        return self.sparse_macs + self.attention_macs

    @property
    def dense_flops_with_attention(self) -> int:
        return 2 * self.dense_macs_with_attention

    @property
    def sparse_flops_with_attention(self) -> int:
        return 2 * self.sparse_macs_with_attention

    @property
    def other_bytes(self) -> int:
        return BYTES_PER_VALUE * self.other_params

    @property
    def dense_bytes(self) -> int:
        return sum(l.dense_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def csr_bytes(self) -> int:
        return sum(l.csr_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def bitmap_bytes(self) -> int:
        return sum(l.bitmap_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def best_sparse_bytes(self) -> int:
        """Each layer in the smaller of CSR and bitmap, other parameters dense."""
        return sum(l.best_sparse_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def stored_bytes(self) -> int:
        """Bytes the model stores as it is: materialised layers at their format's size, the rest dense."""
        return sum(l.stored_bytes for l in self.stored_layers) + self.other_bytes

    @property
    def compression_x(self) -> float:
        """``params / nonzeros``, the compression rate of Han et al. (2015)."""
        return self.params / self.nonzeros if self.nonzeros else math.inf

    @property
    def storage_ratio_x(self) -> float:
        """``dense_bytes / best_sparse_bytes``: how much smaller the file really gets (below 1 when sparse is bigger)."""
        best = self.best_sparse_bytes
        return self.dense_bytes / best if best else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready numbers with units in the keys, plus a ``layers`` list of per-layer dicts.

        ``size_stored_bytes`` is present only when some layer is a materialised sparse module;
        the ``attention_*``, ``*_with_attention`` keys and the ``attention`` list only when the
        forward computed attention products (a model without attention gives the same record
        as before they were counted).
        """
        materialised = any(l.format_bytes is not None for l in self.stored_layers)
        extra = {"size_stored_bytes": self.stored_bytes} if materialised else {}
        attention = {} if not self.attention else {
            "attention_macs": self.attention_macs, "attention_flops": self.attention_flops,
            "dense_macs_with_attention": self.dense_macs_with_attention,
            "sparse_macs_with_attention": self.sparse_macs_with_attention,
            "dense_flops_with_attention": self.dense_flops_with_attention,
            "sparse_flops_with_attention": self.sparse_flops_with_attention,
        }
        attention_list = {"attention": [a.to_dict() for a in self.attention]} if self.attention else {}
        return {
            "params": self.params, "nonzeros": self.nonzeros, "weight_params": self.weight_params,
            "weight_nonzeros": self.weight_nonzeros, "other_params": self.other_params, "sparsity": self.sparsity,
            "dense_macs": self.dense_macs, "sparse_macs": self.sparse_macs,
            "dense_flops": self.dense_flops, "sparse_flops": self.sparse_flops, **attention,
            "size_dense_bytes": self.dense_bytes, "size_csr_bytes": self.csr_bytes,
            "size_bitmap_bytes": self.bitmap_bytes, "size_best_sparse_bytes": self.best_sparse_bytes,
            "compression_x": self.compression_x, "storage_ratio_x": self.storage_ratio_x, **extra,
            "layers": [l.to_dict() for l in self.layers], **attention_list,
        }
