"""Inference modules whose weight is stored in a sparse format, and their CPU kernels.

``CSRLinear``, ``BSRLinear`` and ``SemiStructuredLinear`` replace an ``nn.Linear`` whose
weight holds real zeros -- or a ``transformers`` Conv1D (GPT-2; ``y = x W + b``, ``W`` stored
``(in, out)``), as the Linear of ``W^T``; ``CSRConv2d`` replaces an ``nn.Conv2d``.  Outputs equal the
dense layer's up to float summation order (``allclose(atol=1e-5)`` in fp32) for inputs
``(B, in)``, ``(B, T, in)`` or any ``(*, in)``.

Kernels, as measured on the 2-core AVX-512 EPYC this was built on (torch 2.13, MKL
2024.2; one 4096x4096 layer at one thread unless stated; ``benchmarks/cpu_speedup.py``
measures whole models):

* **csr** -- ``torch.addmv`` (batch 1) / ``torch.addmm`` (batch > 1) on a
  ``torch.sparse_csr`` matrix with **int32** indices, which ATen hands to MKL's sparse
  BLAS.  90% sparse: 5.8x faster than dense at batch 1, 2.1x at batch 64; 95%: 9.9x and
  5.4x.  int64 indices (what ``Tensor.to_sparse_csr()`` gives) cost a conversion per call,
  2.5x slower, so formats store int32.  The product is computed as ``W @ x.T`` into an
  ``(out, N)`` result, which is copied once into a contiguous ``(N, out)`` output, as
  ``nn.Linear`` returns (so ``.view`` works on it; the copy costs ~0-20% of the sparse call
  on a 4096x4096 layer at batch 64, measured).  Per-call overhead is ~6-10 us, so tiny
  layers (LeNet's 100x10) stay faster dense.
* **bsr** -- the same over ``torch.sparse_bsr``; pays only for block-pruned weights.
  MKL takes square blocks only, so on CPU a non-square block (e.g. 8x1) runs its stored
  blocks as an int32 CSR matrix (same result; storage and ``state_dict`` stay BSR).
  On unstructured sparsity most 4x4 blocks keep a nonzero (81% at 90% sparsity) and it
  is 2-4x *slower* than dense.  No autograd on CPU (torch has no BSC x dense kernel).
* **fp16 / bf16 on CPU** -- MKL's sparse BLAS has no half-precision kernels, so CSR/BSR
  layers in those dtypes run an fp32 copy of the format (cached until a buffer changes):
  the input is upcast, the product and bias add are fp32 and the result is rounded once to
  the layer's dtype, as a dense half-precision GEMM on CPU accumulates.  Storage and
  ``state_dict`` stay in the layer's dtype.
* **2:4** -- on CUDA with compute capability >= 8.0, ``torch.sparse.to_sparse_semi_structured``
  (cuSPARSELt/CUTLASS sparse tensor cores).  Elsewhere the layer decompresses its weight
  once (cached) and runs the dense matmul; ``materialise`` warns about it.
* Tried and dropped (pure torch, no MKL): a gather-based ELL kernel
  (``(x[idx] * vals).sum(-1)``, rows padded to the longest row) was 1.2x (90%) / 2.8x
  (95%) at batch 1; ``segment_reduce(vals * x[col], offsets=crow)`` 1.0x / 2.6x;
  ``index_add_`` slower than dense; COO ``torch.sparse.addmm`` slower than dense.  MKL CSR
  beats them all.  Calling ``mkl_set_num_threads_local`` through ctypes crashed.

Threads (measured): with 2 OpenMP threads on a CPU whose cores are busy with other
processes (load average above the core count), each MKL sparse call can stall for a
scheduler tick (4-8 ms) waiting for its second thread, even on tiny matrices; a dense
GEMM hides this behind its longer run.  ``GOMP_SPINCOUNT=1000`` (measured fix),
``OMP_WAIT_POLICY=PASSIVE`` or one thread avoid it.  Autotuning (``autotune.py``)
measures under the real conditions, so it picks dense where this happens.

Convolutions: ``CSRConv2d`` is im2col (``F.unfold``) + CSR matmul, for ``groups == 1``
and ``padding_mode == "zeros"`` only; other convolutions (and Conv1d/Conv3d) are kept
dense -- a documented limit.  BSR and 2:4 forms keep every convolution dense.

Saving and loading: each module's ``state_dict`` holds its format tensors
(``crow_indices``, ``col_indices``, ``values``, ``metadata``, ``bias``) plus an
``_extra_state`` dict naming the kernel and shapes.  Loading into a plain (dense)
architecture needs the same modules first: use :func:`load_materialised`, which reads
the ``_extra_state`` entries, swaps in the right modules (one module for a layer used at two
names) and loads (any nnz: buffers are resized to the stored tensors).  A materialised
``transformers`` model's ``save_pretrained`` (:func:`route_save_pretrained`) writes an
ordinary dense checkpoint instead -- each sparse layer's dense masked weight, zeros included,
so ``from_pretrained`` gives the masked model -- plus the ``_extra_state`` record as a uint8
tensor of its JSON (:func:`encode_extra_state`), from which :func:`load_materialised` rebuilds
the same sparse format (a pure function of the dense weight).  A damaged format (row pointers or column indices out of
range) is refused with a one-line error when the kernel matrix is first built (the kernels
themselves read the indices unchecked).  These modules are inference-only: the weight is a
buffer, not a trainable parameter.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise.formats import BSR, CSR, SemiStructured24, block_shape
from prunelab.oneshot.layer_targets import conv1d_as_linear, is_hf_conv1d

__all__ = [
    "SPARSE_MODULES",
    "BSRLinear",
    "CSRConv2d",
    "CSRLinear",
    "SemiStructuredLinear",
    "SparseModule",
    "build_sparse",
    "decode_extra_state",
    "encode_extra_state",
    "is_hf_conv1d",
    "kernel_unavailable_reason",
    "linear_weight",
    "load_materialised",
    "route_save_pretrained",
    "semi_structured_available",
]

_BETA_WARNING = "Sparse (CSR|BSR|CSC|BSC) tensor support is in beta state"


def semi_structured_available(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA GPU with sparse tensor cores (compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


class SparseModule(nn.Module):
    """Base class: an inference layer whose weight is a sparse format held in buffers.

    Subclasses set ``kernel``, ``format_class`` and implement ``_matmul``.  The format
    tensors are registered as buffers named like the format's ``tensors()`` keys.
    """

    kernel: ClassVar[str] = ""
    format_class: ClassVar[type] = CSR
    # True when the layer it replaced stores the weight transposed: a transformers Conv1D, ``W (in, out)``;
    # an instance sets it (build_sparse, set_extra_state), the class default keeps older pickles loadable
    transposed: bool = False

    def __init__(self, fmt: Any, bias: torch.Tensor | None, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in fmt.shape)
        self.config = dict(config)
        for key, tensor in fmt.tensors().items():
            self.register_buffer(key, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cache: tuple[tuple, Any] | None = None  # (key, built value), see _cached

    # --- format ----------------------------------------------------------------------
    def format(self) -> Any:
        """The stored format, as a :mod:`prunelab.materialise.formats` object (shares memory)."""
        tensors = {key: buf for key, buf in self._buffers.items() if key != "bias"}
        return self.format_class.from_tensors(self.weight_shape, tensors, **self.config)

    def dense_weight(self) -> torch.Tensor:
        """The exact dense weight, ``weight_shape``."""
        return self.format().to_dense()

    @property
    def nnz(self) -> int:
        return self.format().nnz

    @property
    def nbytes(self) -> int:
        """Bytes of the weight format plus the dense bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.format().nbytes + bias

    def _cached(self, build, key: tuple = ()):
        """``build()`` cached on the instance (no module-level state) until the buffers change.

        Invalidated whenever buffers are replaced (``.to()``/``.float()``/..., ``load_state_dict``,
        assignment).  CSR/BSR views share the buffers' memory, so in-place edits show through;
        a cache that copies (the 2:4 dense fallback) passes ``key`` (e.g. buffer versions).
        """
        cache = self._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        # built outside inference mode, so a model first run under torch.inference_mode() still
        # works later with autograd (inference tensors cannot be saved for backward)
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.filterwarnings("ignore", message=_BETA_WARNING)
            try:
                value = build()
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, IndexError) as exc:  # a damaged format: torch's invariant check or to_dense
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise PrunelabError(
                    f"{type(self).__name__} {self.weight_shape} holds a damaged {self.kernel} weight "
                    f"({type(exc).__name__}: {first}); reload it from an undamaged state_dict or re-create it "
                    "with prunelab materialise"
                ) from None
        self._cache = (key, value)
        return value

    def _versions(self) -> tuple:
        """The buffers' version counters: the ``key`` of a cache that copies them.

        An inference tensor (a buffer made under ``torch.inference_mode``, e.g. by ``.to()``
        there) has no counter and stands as ``None``: an in-place edit of such a buffer made
        inside inference mode is not seen -- assign a new tensor instead.
        """
        return tuple(None if buf.is_inference() else buf._version for buf in self._buffers.values() if buf is not None)

    def _kernel_operands(self, build: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` for the torch sparse kernels, cached; ``build(fmt)`` makes the torch sparse matrix.

        In the layer's dtype the matrix shares the buffers' memory (in-place edits show
        through).  fp16/bf16 on CPU (no MKL kernels) get an fp32 copy, keyed on the buffer
        versions, and an fp32 bias; :func:`_kernel_dtype` says which.
        """
        dtype = _kernel_dtype(self.values)
        if dtype == self.values.dtype:
            return self._cached(lambda: (build(self.format()), self.bias))

        def upcast() -> tuple[torch.Tensor, torch.Tensor | None]:
            tensors = {key: buf.to(dtype) if buf.is_floating_point() else buf
                       for key, buf in self._buffers.items() if key != "bias"}
            fmt = self.format_class.from_tensors(self.weight_shape, tensors, **self.config)
            return build(fmt), None if self.bias is None else self.bias.to(dtype)

        return self._cached(upcast, self._versions())

    def _apply(self, fn, recurse: bool = True):
        self._cache = None
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_buffers", {}):
            self.__dict__["_cache"] = None
        super().__setattr__(name, value)

    # --- state ----------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state = {"kernel": self.kernel, "module": type(self).__name__, "weight_shape": list(self.weight_shape),
                 "config": _plain(self.config)}
        if self.transposed:  # only then: the record of a Linear's replacement is what it always was
            state["transposed"] = True
        return state

    def set_extra_state(self, state: Any) -> None:
        state = decode_extra_state(state)
        if not isinstance(state, Mapping) or state.get("module") != type(self).__name__:
            got = state.get("module") if isinstance(state, Mapping) else type(state).__name__
            raise PrunelabError(
                f"state_dict holds a {got} layer but the model has {type(self).__name__}; load it with "
                "prunelab.materialise.load_materialised(dense_model, state_dict)"
            )
        self.weight_shape = tuple(int(s) for s in state["weight_shape"])
        self.config = _unplain(state["config"])
        self.transposed = bool(state.get("transposed", False))
        self._cache = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A format's nnz depends on the mask: resize buffers to the stored tensors before copying.
        for key, buf in list(self._buffers.items()):
            stored = state_dict.get(prefix + key)
            if isinstance(stored, torch.Tensor) and (buf is None or buf.shape != stored.shape):
                dtype = stored.dtype if buf is None else buf.dtype
                device = stored.device if buf is None else buf.device
                self._buffers[key] = torch.empty(stored.shape, dtype=dtype, device=device)
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def __getstate__(self) -> dict[str, Any]:
        # torch.sparse_csr tensors cannot be deep-copied or pickled; the cache is rebuilt on use.
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # --- compute --------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        raise NotImplementedError


def encode_extra_state(state: Mapping[str, Any]) -> torch.Tensor:
    """A sparse module's ``_extra_state`` dict as a 1-D uint8 tensor of its JSON text.

    ``state_dict()`` keeps the dict (``torch.save`` / ``torch.load(weights_only=True)`` read
    it); tensor-only writers (safetensors, ``save_pretrained``) store this tensor instead, and
    :meth:`SparseModule.set_extra_state` / :func:`load_materialised` read both.
    """
    data = json.dumps(dict(state), sort_keys=True).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)  # (len(json),)


def decode_extra_state(state: Any) -> Any:
    """``state`` itself, or the dict a uint8 tensor of :func:`encode_extra_state` holds (undecodable: unchanged)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        return state
    try:
        return json.loads(bytes(state.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return state


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _unplain(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


class _SparseLinearBase(SparseModule):
    """A Linear layer ``y = x W^T + b`` with ``W`` in a sparse format."""

    @property
    def in_features(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, name: str = "weight", **options: Any) -> _SparseLinearBase:
        fmt = cls.format_class.from_dense(linear.weight.detach(), name=name, **options)
        return cls(fmt, linear.bias, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (*, in) -> (*, out)
        if x.dim() == 2:  # the hot path: (N, in) -> (N, out)
            return self._matmul(x)
        out_features, in_features = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise RuntimeError(f"{type(self).__name__} expects inputs (*, {in_features}), got {tuple(x.shape)}")
        y = self._matmul(x.reshape(-1, in_features))  # (N, out)
        return y.reshape(*x.shape[:-1], out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, bias={self.bias is not None}"


def _kernel_dtype(values: torch.Tensor) -> torch.dtype:
    """The dtype the sparse kernels run in: fp32 for fp16/bf16 on CPU (MKL has none), else ``values.dtype``."""
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return values.dtype


def _kernel_input(x: torch.Tensor, values: torch.Tensor, layer: str) -> torch.Tensor:
    """``x`` in the kernels' dtype; a one-line error if ``x`` is not in the layer's dtype (as a dense layer refuses it)."""
    dtype = _kernel_dtype(values)
    if dtype == values.dtype:
        return x  # torch's own kernels report a dtype mismatch
    if x.dtype != values.dtype:
        raise PrunelabError(f"{layer} holds {values.dtype} weights but got a {x.dtype} input; cast the input "
                            f"(x.to({values.dtype})) or the model")
    return x.to(dtype)


def _sparse_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` for a torch sparse CSR/BSR ``W (out, in)`` and dense ``x (N, in)`` -> ``(N, out)``."""
    if x.shape[0] == 1:  # matrix-vector: MKL sparse mv
        row = x[0]  # (in,)
        y = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)  # (out,)
        return y.unsqueeze(0)
    xt = x.t()  # (in, N)
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)  # (out, N)
    return y.t().contiguous()  # (N, out) contiguous, as nn.Linear's output (a caller's .view must work)


class CSRLinear(_SparseLinearBase):
    """Linear with a CSR weight (MKL sparse BLAS on CPU, cuSPARSE on CUDA)."""

    kernel = "csr"
    format_class = CSR

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._kernel_operands(lambda fmt: fmt.to_torch())  # (out, in) sparse_csr, (out,)
        y = _sparse_linear(weight, bias, _kernel_input(x, self.values, type(self).__name__))
        return y.to(self.values.dtype)  # no-op unless run in fp32 for a half-precision layer


class BSRLinear(_SparseLinearBase):
    """Linear with a BSR weight; ``config["block_size"]`` is ``(bh, bw)``."""

    kernel = "bsr"
    format_class = BSR

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, name: str = "weight", block_size: tuple[int, int] = (4, 4),
                    **options: Any) -> BSRLinear:
        fmt = BSR.from_dense(linear.weight.detach(), block_size=block_size, name=name)
        return cls(fmt, linear.bias, {"block_size": tuple(fmt.block_size)})

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        bh, bw = self.config.get("block_size", (4, 4))
        if bh != bw and self.values.device.type == "cpu":
            # MKL takes square blocks only ("MKL Sparse doesn't support matrices with non-square
            # blocks"): run the same stored blocks as an int32 CSR matrix (a copy, so keyed on versions)
            def as_csr() -> tuple[torch.Tensor, torch.Tensor | None]:
                dtype = _kernel_dtype(self.values)
                bias = None if self.bias is None else self.bias.to(dtype)
                return CSR.from_dense(self.format().to_dense().to(dtype)).to_torch(), bias

            weight, bias = self._cached(as_csr, self._versions())
        else:
            weight, bias = self._kernel_operands(lambda fmt: fmt.to_torch())  # (out, in) sparse_bsr, (out,)
        y = _sparse_linear(weight, bias, _kernel_input(x, self.values, type(self).__name__))
        return y.to(self.values.dtype)  # no-op unless run in fp32 for a half-precision layer


class SemiStructuredLinear(_SparseLinearBase):
    """Linear with a 2:4 weight: sparse tensor cores on sm80+ CUDA, dense fallback elsewhere."""

    kernel = "2:4"
    format_class = SemiStructured24

    def __init__(self, fmt: Any, bias: torch.Tensor | None, config: Mapping[str, Any]) -> None:
        super().__init__(fmt, bias, config)
        self._gpu_failed = False  # to_sparse_semi_structured refused this weight (dtype/shape)

    @property
    def accelerated(self) -> bool:
        """Whether forward runs on sparse tensor cores (False: dense fallback).

        On a capable GPU this builds the kernel weight first: only the conversion reveals a
        dtype or shape the backend refuses (cuSPARSELt takes no fp32, for one).
        """
        if not semi_structured_available(self.values.device):
            return False
        self._kernel_weight()
        return not self._gpu_failed

    def _apply(self, fn, recurse: bool = True):
        self._gpu_failed = False  # a new device/dtype gets a new try at the sparse kernels
        return super()._apply(fn, recurse)

    def _kernel_weight(self) -> torch.Tensor:
        return self._cached(self._build_weight, self._versions())

    def _build_weight(self) -> torch.Tensor:
        dense = self.format().to_dense()  # (out, in)
        if semi_structured_available(self.values.device) and not self._gpu_failed:
            try:
                from torch.sparse import to_sparse_semi_structured

                return to_sparse_semi_structured(dense)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                self._gpu_failed = True  # unsupported dtype/shape for the GPU kernels: stay dense
        return dense

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._kernel_weight(), self.bias)


class CSRConv2d(SparseModule):
    """Conv2d as im2col (``F.unfold``) + CSR matmul; ``groups == 1``, zero padding only."""

    kernel = "csr"
    format_class = CSR

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, name: str = "weight", **options: Any) -> CSRConv2d:
        reason = _conv_limit(conv)
        if reason:
            raise PrunelabError(f"layer {name!r} cannot use the csr conv kernel: {reason}; keep it dense")
        padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)
        fmt = CSR.from_dense(conv.weight.detach(), name=name)
        config = {"stride": tuple(conv.stride), "padding": padding, "dilation": tuple(conv.dilation)}
        return cls(fmt, conv.bias, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) or (C, H, W)
        if x.dim() not in (3, 4):  # as nn.Conv2d refuses it (not an unpacking ValueError)
            raise RuntimeError(f"{type(self).__name__} expects inputs (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        out_channels, _, kh, kw = self.weight_shape
        stride, padding, dilation = self.config["stride"], self.config["padding"], self.config["dilation"]
        batch, _, height, width = x.shape
        h_out = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        w_out = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C*kh*kw, B*L)
        weight, bias = self._kernel_operands(lambda fmt: fmt.to_torch())  # (O, C*kh*kw) sparse_csr, (O,)
        y = torch.mm(weight, _kernel_input(cols, self.values, type(self).__name__))  # (O, B*L)
        y = y.reshape(out_channels, batch, h_out * w_out).transpose(0, 1)  # (B, O, L)
        if bias is not None:
            y = y + bias.view(1, -1, 1)
        y = y.reshape(batch, out_channels, h_out, w_out).to(self.values.dtype).contiguous()  # as nn.Conv2d's
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, nnz={self.nnz}, {', '.join(f'{k}={v}' for k, v in self.config.items())}"


def _conv_limit(conv: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is kept dense (only Conv2d has an im2col kernel)"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1 is supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    if conv.padding == "same":
        return "padding='same' (pass explicit padding)"
    return None


SPARSE_MODULES: dict[str, type[SparseModule]] = {
    cls.__name__: cls for cls in (CSRLinear, BSRLinear, SemiStructuredLinear, CSRConv2d)
}


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` matrix of a Linear-like layer: an ``nn.Linear``'s weight, a Conv1D's ``W^T``.

    ``transformers``' Conv1D computes ``y = x W + b`` with ``W`` stored ``(in, out)``: the map of
    an ``nn.Linear`` whose weight is ``W^T`` (a view, not a copy).
    """
    weight = module.weight.detach()
    return weight.T if is_hf_conv1d(module) else weight  # (out, in)


def kernel_unavailable_reason(
    module: nn.Module, kernel: str, *, block_size: tuple[int, int] = (4, 4)
) -> str | None:
    """Why ``kernel`` cannot replace ``module`` (None if it can). ``dense`` always can.

    A ``transformers`` Conv1D is judged as the Linear of its map (weight ``W^T``, ``(out, in)``):
    its 2:4 groups run along the input dimension, ``W``'s dim 0.
    """
    if kernel == "dense":
        return None
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        weight = linear_weight(module)  # (out, in)
        out_features, in_features = weight.shape
        if kernel == "csr":
            return None
        if kernel == "bsr":
            bh, bw = block_shape(block_size)  # a malformed block size is the caller's error, not "unavailable"
            if out_features % bh or in_features % bw:
                return f"block {bh}x{bw} does not tile {out_features}x{in_features}"
            return None
        if kernel == "2:4":
            if in_features % 4:
                return f"in_features={in_features} is not a multiple of 4"
            groups = weight.reshape(out_features, in_features // 4, 4)  # not -1: rows may be 0
            if bool(((groups != 0).sum(-1) > 2).any()):
                return "weight is not 2:4 sparse"
            return None
        return f"unknown kernel {kernel!r}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if kernel != "csr":
            return f"{kernel} keeps convolutions dense"
        return _conv_limit(module)
    return f"{type(module).__name__} has no sparse kernel"


def build_sparse(module: nn.Module, kernel: str, *, name: str = "weight",
                 block_size: tuple[int, int] = (4, 4)) -> nn.Module:
    """The ``kernel`` replacement for ``module`` (``dense``: the module itself).

    A ``transformers`` Conv1D becomes the sparse Linear of ``W^T`` (same outputs), marked
    ``transposed`` so that ``save_pretrained`` writes its dense weight back as ``W (in, out)``.
    """
    if kernel == "dense":
        return module
    sparse = _build_sparse(module, kernel, name=name, block_size=block_size)
    sparse.transposed = is_hf_conv1d(module)
    return sparse


def _build_sparse(module: nn.Module, kernel: str, *, name: str, block_size: tuple[int, int]) -> SparseModule:
    if is_hf_conv1d(module):
        name = f"{name} (as W^T, (out, in), of a Conv1D)"  # errors name rows/columns of W^T
    if kernel == "2:4" and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
        return SemiStructuredLinear.from_linear(conv1d_as_linear(module), name=name)  # the format names the bad group
    reason = kernel_unavailable_reason(module, kernel, block_size=block_size)
    if reason:
        raise PrunelabError(f"layer {name!r} cannot use kernel {kernel!r}: {reason}; keep it dense or pick another form")
    if isinstance(module, nn.Conv2d):
        return CSRConv2d.from_conv(module, name=name)
    if kernel == "csr":
        return CSRLinear.from_linear(conv1d_as_linear(module), name=name)
    return BSRLinear.from_linear(conv1d_as_linear(module), name=name, block_size=block_size)


def _prefix(layer: str) -> str:
    """The state_dict key prefix of the layer called ``layer`` (the root: none)."""
    return f"{layer}." if layer else ""


def _sparse_records(state_dict: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``layer -> record`` for each ``<layer>._extra_state`` of ``state_dict`` that names a sparse module
    (the dict of ``state_dict()`` or its uint8 tensor form, :func:`encode_extra_state`)."""
    records = {}
    for key, raw in state_dict.items():
        if key != "_extra_state" and not key.endswith("._extra_state"):
            continue
        record = decode_extra_state(raw)
        if isinstance(record, Mapping) and record.get("module") in SPARSE_MODULES:
            records[key[: -len("_extra_state")].rstrip(".")] = record
    return records


def _format_tensors(state_dict: Mapping[str, Any], layer: str) -> dict[str, torch.Tensor]:
    """The tensors directly under ``layer`` but its bias, dense weight and record: its format's (none once dense)."""
    prefix = _prefix(layer)
    return {key[len(prefix):]: value for key, value in state_dict.items()
            if key.startswith(prefix) and "." not in key[len(prefix):]
            and key[len(prefix):] not in ("bias", "weight", "_extra_state") and isinstance(value, torch.Tensor)}


def _damaged(layer: str, exc: Exception) -> PrunelabError:
    return PrunelabError(f"the materialised entry for layer {layer!r} is damaged ({type(exc).__name__}: {exc}); "
                         "re-create it with prunelab materialise")


def _record_shape(layer: str, record: Mapping[str, Any]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """``(weight_shape, config)`` of a record; a one-line error if it lacks them."""
    try:
        return tuple(int(s) for s in record["weight_shape"]), _unplain(record.get("config", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(layer, exc) from None


def _format_from_record(layer: str, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """The format a record and its tensors describe (sharing the tensors' memory)."""
    shape, config = _record_shape(layer, record)
    try:
        return SPARSE_MODULES[record["module"]].format_class.from_tensors(shape, dict(tensors), **config)
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(layer, exc) from None


def _format_from_dense(layer: str, record: Mapping[str, Any], weight: Any) -> Any:
    """The format of ``record`` rebuilt from the dense weight ``save_pretrained`` writes (:func:`_dense_state`).

    The format is a pure function of the dense weight and the record: CSR keeps the nonzeros, BSR
    the blocks holding one (``config["block_size"]``), 2:4 the kept pairs -- what ``materialise``
    built from the same masked weight.  ``weight`` is in the replaced layer's layout: a Conv1D's
    (``record["transposed"]``) ``W (in, out)`` is the ``(out, in)`` matrix ``W^T``.
    """
    shape, config = _record_shape(layer, record)
    expected = shape[::-1] if record.get("transposed") else shape
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise PrunelabError(f"the materialised state_dict does not fit: {_prefix(layer)}weight is {got}, its sparse "
                            f"record says {expected}; pass the state_dict save_pretrained wrote for this model")
    matrix = weight.T if record.get("transposed") else weight  # (out, in) or a conv's (O, I, kh, kw)
    format_class = SPARSE_MODULES[record["module"]].format_class
    options = {"block_size": config.get("block_size", (4, 4))} if format_class is BSR else {}
    return format_class.from_dense(matrix, name=f"{_prefix(layer)}weight", **options)


def _sparse_state(state_dict: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``state_dict`` with each sparse layer saved as a dense ``<layer>.weight`` (and no format tensors)
    given its format tensors instead, rebuilt by :func:`_format_from_dense`."""
    state = dict(state_dict)
    for layer, record in records.items():
        weight_key = _prefix(layer) + "weight"
        if weight_key not in state or _format_tensors(state, layer):
            continue  # the sparse form itself (state_dict()), or nothing saved under this name (a tie)
        fmt = _format_from_dense(layer, record, state.pop(weight_key))
        state.update({_prefix(layer) + key: tensor for key, tensor in fmt.tensors().items()})
    return state


def _names_by_module(model: nn.Module) -> dict[int, tuple[nn.Module, list[str]]]:
    """``id(module) -> (module, every name it has)``: a module used at two places has two names."""
    names: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), (module, []))[1].append(name)
    return names


def _build_layer(model: nn.Module, layer: str, record: Mapping[str, Any], state: Mapping[str, Any]) -> SparseModule:
    """The sparse module of ``record``, with empty buffers shaped as ``state``'s tensors under ``layer``."""
    cls = SPARSE_MODULES[record["module"]]
    prefix = _prefix(layer)
    # own buffers, filled by load_state_dict: the loaded model must not share memory with the
    # state_dict (e.g. another model's live buffers)
    tensors = {key: torch.empty_like(value) for key, value in _format_tensors(state, layer).items()}
    stored_bias = state.get(prefix + "bias")
    bias = torch.empty_like(stored_bias) if isinstance(stored_bias, torch.Tensor) else None
    if bias is None and isinstance(getattr(_submodule(model, layer), "bias", None), torch.Tensor):
        raise PrunelabError(f"the materialised state_dict does not fit this architecture: missing key "
                            f"{prefix}bias of the sparse layer {layer!r}; pass the state_dict it was saved as")
    fmt = _format_from_record(layer, record, tensors)
    try:
        return cls(fmt, bias, _unplain(record.get("config", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(layer, exc) from None


def load_materialised(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Rebuild a materialised model from a dense architecture and a materialised ``state_dict``.

    ``model`` is the plain architecture (any weights); every ``<layer>._extra_state`` entry of
    ``state_dict`` that names a sparse module (the dict of ``state_dict()``, or its uint8 tensor
    form from ``save_pretrained`` / safetensors, :func:`encode_extra_state`) swaps that layer of
    a deep copy for the module, then the whole ``state_dict`` is loaded strictly.  A sparse layer
    comes either as its format tensors (``state_dict()``) or as its dense masked weight
    ``<layer>.weight`` (what ``save_pretrained`` writes, :func:`route_save_pretrained`), from
    which the same format is rebuilt.  A layer the architecture uses at two names (one module)
    becomes ONE sparse module at both names: the tie holds.  A key missing because it is TIED to
    a key present (the same tensor or module in ``model``, e.g. an LM head tied to the embedding,
    which ``save_pretrained`` writes once) is fine.  ``model`` is not changed.  A transformers
    model comes back with the ``save_pretrained`` of :func:`route_save_pretrained`.  Reload a
    ``save_pretrained`` folder::

        state = safetensors.torch.load_file(f"{folder}/model.safetensors")
        model = load_materialised(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)), state)
    """
    if not isinstance(model, nn.Module) or not isinstance(state_dict, Mapping):
        raise PrunelabError(
            f"load_materialised needs (nn.Module, state_dict), got ({type(model).__name__}, "
            f"{type(state_dict).__name__}); pass the dense architecture and torch.load(...) of the materialised state_dict"
        )
    new = copy.deepcopy(model)
    records = _sparse_records(state_dict)
    state = _sparse_state(state_dict, records)
    names = _names_by_module(new)  # before any swap; holds the replaced modules, so no id is reused
    built: set[int] = set()
    conv1d_replacements: list[SparseModule] = []
    for layer, record in records.items():
        current = _submodule(new, layer)
        if id(current) in built:
            continue  # one module at two names: swapped at both already
        aliases = names[id(current)][1] if current is not None else [layer]
        source = next((name for name in aliases if _format_tensors(state, name)), layer)  # a tie saved once
        module = _build_layer(new, source, records.get(source, record), state)
        if is_hf_conv1d(current):
            conv1d_replacements.append(module)
        for name in aliases:
            _set_submodule(new, name, module)
        built.add(id(module))
    for missing, present in _tied_keys(new, state).items():
        state[missing] = state[present]  # loads the shared tensor once more: the tie holds
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = " ".join(lines[:2])[:300]  # "Error(s) in loading state_dict for X:" + the first problem
        raise PrunelabError(f"the materialised state_dict does not fit this architecture: {first}; pass the dense "
                            "architecture it was materialised from") from None
    for module in conv1d_replacements:  # after load_state_dict: a record written before 8a2c66d does not say so
        module.transposed = True
    return route_save_pretrained(new)


def _tied_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, str]:
    """``missing key -> present key`` for each parameter/buffer of ``model`` absent from ``state_dict``
    whose tensor is the one of another name that is present (a tied weight saved once), and each
    ``_extra_state`` of a sparse module absent under one of its names and present under another."""
    named: dict[str, Any] = {**dict(model.named_parameters(remove_duplicate=False)),
                             **dict(model.named_buffers(remove_duplicate=False))}
    named.update({_prefix(name) + "_extra_state": module for name, module in model.named_modules(remove_duplicate=False)
                  if isinstance(module, SparseModule)})
    present: dict[int, str] = {}
    for name, tensor in named.items():
        if name in state_dict:
            present.setdefault(id(tensor), name)
    return {name: present[id(tensor)] for name, tensor in named.items()
            if name not in state_dict and id(tensor) in present}


def _tensor_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each sparse module's ``_extra_state`` dict as its uint8 tensor form."""
    def is_sparse_state(key: str, value: Any) -> bool:
        return key.endswith("_extra_state") and isinstance(value, Mapping) and value.get("module") in SPARSE_MODULES

    return {key: encode_extra_state(value) if is_sparse_state(key, value) else value
            for key, value in state_dict.items()}


def _dense_weight(layer: str, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight a sparse layer holds, in the layout of the layer it replaced (a Conv1D's ``W (in, out)``)."""
    try:
        fmt = _format_from_record(layer, record, tensors)
        if hasattr(fmt, "to_torch"):
            fmt.to_torch()  # CSR / BSR invariants: a negative column would wrap around in to_dense
        weight = fmt.to_dense()  # weight_shape
    except (RuntimeError, IndexError) as exc:  # indices out of range
        raise _damaged(layer, exc) from None
    return (weight.T if record.get("transposed") else weight).contiguous()  # contiguous: safetensors needs it


def _storage_key(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> tuple:
    """Equal for the entries of ONE module saved under two names (the same tensors, the same record)."""
    return (json.dumps(dict(record), sort_keys=True),
            *((key, t.data_ptr(), t.dtype, tuple(t.shape)) for key, t in sorted(tensors.items())))


def _dense_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each sparse layer's format tensors replaced by its dense masked weight ``<layer>.weight``.

    The weight keeps its zeros and the layout of the layer the sparse module replaced, so the
    result loads into the dense architecture (``from_pretrained``); bias and record stay.  A
    module at two names gets one tensor for both, as the dense model's ``state_dict()`` has it.
    """
    weights: dict[str, tuple[set[str], torch.Tensor]] = {}
    made: dict[tuple, torch.Tensor] = {}
    for layer, record in _sparse_records(state_dict).items():
        tensors = _format_tensors(state_dict, layer)
        if not tensors:
            continue  # already dense
        key = _storage_key(record, tensors)
        if key not in made:
            made[key] = _dense_weight(layer, record, tensors)
        weights[layer] = ({*tensors, "weight"}, made[key])
    dense: dict[str, Any] = {}
    for key, value in state_dict.items():
        layer, _, leaf = key.rpartition(".")
        if layer in weights and leaf in weights[layer][0]:
            dense.setdefault(_prefix(layer) + "weight", weights[layer][1])  # where its first format tensor was
        else:
            dense[key] = value
    return dense


def _save_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``type(model).save_pretrained`` with the sparse layers as dense weights plus records (:func:`route_save_pretrained`)."""
    method = type(model).save_pretrained
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    state = bound.arguments.get("state_dict")
    bound.arguments["state_dict"] = _tensor_state(_dense_state(model.state_dict() if state is None else state))
    return method(*bound.args, **bound.kwargs)


class _RoutedSavePretrained:
    """The instance ``save_pretrained`` :func:`route_save_pretrained` installs: calls :func:`_save_pretrained`.

    An object, not a bound method: ``torch.save(model)`` / pickle store it with the model (a
    bound method pickles as ``getattr(model, "_save_pretrained")``, which fails on load), and
    ``copy.deepcopy`` rebinds it to the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _save_pretrained(self.model, *args, **kwargs)


def route_save_pretrained(model: nn.Module) -> nn.Module:
    """Give a materialised ``transformers`` model a ``save_pretrained`` whose folder loads both ways.

    When ``model`` has a ``save_pretrained`` and holds a sparse module, its instance gets one that
    passes ``state_dict=`` to the class's own ``save_pretrained`` (all its options work) with each
    sparse layer written as

    * ``<layer>.weight`` -- its dense masked weight, zeros included, in the replaced layer's
      layout (a Conv1D's ``W (in, out)``), and ``<layer>.bias``: the folder is an ordinary dense
      checkpoint, so ``AutoModel...from_pretrained(folder)`` gives the masked dense model (same
      outputs; its load report lists each ``<layer>._extra_state`` as UNEXPECTED -- harmless);
    * ``<layer>._extra_state`` -- the module's record (kernel, shape, block size) as a uint8
      tensor of its JSON (:func:`encode_extra_state`; ``huggingface_hub`` shards only tensors),
      from which :func:`load_materialised` rebuilds the same sparse format out of the weight.

    Size: the folder is as large as the dense model's (the zeros are stored), not the sparse
    format's; for a small file save ``torch.save(model.state_dict(), path)`` (the format
    tensors; :func:`load_materialised` reads it too) or use ``prunelab compress``.  Writing
    holds one dense copy of each sparse layer's weight in memory.  ``state_dict()`` itself is
    unchanged.  Returns ``model``.
    """
    if not callable(getattr(type(model), "save_pretrained", None)):
        return model
    if any(isinstance(m, SparseModule) for m in model.modules()):
        model.save_pretrained = _RoutedSavePretrained(model)
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule called ``name`` (FQN), or None."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (FQN) by ``module``."""
    if not name:
        raise PrunelabError("cannot replace the root module; materialise a model that contains the layer")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise PrunelabError(
            f"state_dict names layer {name!r} but the model has no such module; pass the architecture it was saved from"
        ) from None
    setattr(parent, child, module)
