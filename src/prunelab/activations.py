"""Sparse activations: make them (k-winners-take-all), measure them, and cash them in.

Weight sparsity is not the only sparsity a network has: after a ReLU most features of a
sample are often exactly zero, and the next layer need not read the weights those zeros
multiply.

* :class:`TopKActivation` -- k-winners-take-all: keep the ``k`` largest features of each
  sample, zero the rest (Makhzani & Frey 2014, "k-Sparse Autoencoders"; Ahmad &
  Scheinkman 2019, "How Can We Be So Dense? The Benefits of Using Highly Sparse
  Representations").  Gradients flow through the kept features only.  Exactly ``k``
  features of each row are kept, so the activation sparsity is at least ``1 - k / features``
  -- exactly that unless a kept feature is itself 0 (a row with fewer than ``k`` nonzeros,
  e.g. after a ReLU, keeps some zeros).
* :func:`activation_sparsity` -- the fraction of exact zeros each activation module
  outputs over some batches (ReLU's "lazy neuron" sparsity, Li et al. 2023).
* :class:`SparseInputLinear` -- a Linear that multiplies only the weight rows of the
  input features that are nonzero somewhere in the batch: with ``c`` such columns,
  ``y = x[:, c] W^T[c] + b`` costs ``c / in`` of the dense product (plus the gather), the
  same numbers up to summation order.  :func:`sparse_input_model` swaps it in after
  every activation module.  Its state_dict is an ``nn.Linear``'s (``weight`` ``(out, in)``,
  ``bias``) and the copy keeps the children's names, so the copy's state_dict loads into
  the original architecture and back.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from prunelab.criteria.base import eval_mode
from prunelab.errors import PrunelabError

__all__ = ["SparseInputLinear", "TopKActivation", "activation_sparsity", "sparse_input_model"]

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


class TopKActivation(nn.Module):
    """Keep the ``k`` largest values along the last dimension of each sample, zero the others."""

    def __init__(self, k: int) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PrunelabError(f"k must be a positive integer (features kept per sample), got {k!r}")
        self.k = k

    def forward(self, x: Tensor) -> Tensor:  # (*, F) -> (*, F), k nonzeros per row at most
        if x.dim() == 0:  # was an IndexError: a scalar has no feature dimension
            raise PrunelabError(f"TopKActivation(k={self.k}) needs inputs of shape (..., features), got a 0-d tensor")
        if self.k >= x.shape[-1]:
            return x
        index = x.topk(self.k, dim=-1).indices  # (*, k)
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index, True)
        return x.masked_fill(~keep, 0)  # not x * keep: an unkept -inf or NaN times 0 is NaN

    def extra_repr(self) -> str:
        return f"k={self.k}"


@torch.no_grad()
def activation_sparsity(model: nn.Module, batches: Iterable, *, max_batches: int | None = None,
                        types: Sequence[type[nn.Module]] = (*ACTIVATIONS, TopKActivation)) -> dict[str, float]:
    """Module name -> fraction of exact zeros in its outputs, for every module of ``types``.

    ``batches`` yields inputs or ``(inputs, targets)`` pairs, of which the first
    ``max_batches`` (all when ``None``) are read -- no batch beyond them is drawn; the model
    runs in eval mode (every module's own train/eval flag is restored afterwards).
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise PrunelabError(f"activation_sparsity got max_batches={max_batches!r}; expected a positive int or None (all)")
    zeros: dict[str, int] = {}
    total: dict[str, int] = {}

    def hook(name: str):
        def count(module: nn.Module, args: tuple, output: Tensor) -> None:
            zeros[name] = zeros.get(name, 0) + int((output == 0).sum())
            total[name] = total.get(name, 0) + output.numel()
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, tuple(types))]
    if not handles:
        raise PrunelabError(f"{type(model).__name__} has no activation module of types "
                            f"{[t.__name__ for t in types]}; activations must be modules (nn.ReLU, TopKActivation)")
    read = 0
    try:
        with eval_mode(model):  # restores every module's own train/eval flag
            for batch in itertools.islice(batches, max_batches):  # stops before drawing batch max_batches + 1
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                read += 1
    finally:
        for handle in handles:
            handle.remove()
    if not read:
        raise PrunelabError("activation_sparsity saw no batch; pass an iterable of inputs or (inputs, targets)")
    if not total:  # the modules exist, but the forward never called them (it uses F.relu / torch.relu instead?)
        names = [n for n, m in model.named_modules() if isinstance(m, tuple(types))]
        shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
        raise PrunelabError(
            f"no activation module ran in {read} forward pass(es) of {type(model).__name__}: it has {shown} of types "
            f"{[t.__name__ for t in types]}, but its forward never calls them (a functional F.relu / torch.relu is "
            "not seen); call the activation modules in forward, or measure a model that does"
        )
    empty = [name for name, count in total.items() if count == 0]
    if empty:  # was a ZeroDivisionError: only empty outputs, nothing to take a fraction of
        raise PrunelabError(f"activation module(s) {empty} produced only empty outputs in {read} batch(es); "
                            "pass batches with at least one sample")
    return {name: zeros[name] / total[name] for name in total}


class SparseInputLinear(nn.Module):
    """``linear`` computed from the input columns that are nonzero somewhere in the batch.

    Holds the weight once, transposed (``weight_t``, ``(in, out)``: the rows of the active
    inputs gather contiguously), but its state_dict is ``nn.Linear``'s: ``weight`` ``(out, in)``
    and ``bias``, saved and loaded through the transpose.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):  # was an AttributeError on .in_features
            raise PrunelabError(f"SparseInputLinear wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # (in, out), not in the state_dict: _save_to_state_dict writes it as weight (out, in)
        self.register_buffer("weight_t", linear.weight.detach().T.contiguous(), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> Tensor:  # (out, in), a view of weight_t
        return self.weight_t.T

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight_t.T.contiguous()  # nn.Linear's layout and key order
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        weight = state_dict[key]
        expected = (self.out_features, self.in_features)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != expected:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                              f"the shape in current model is {expected}.")
            return
        with torch.no_grad():
            self.weight_t.copy_(weight.T)

    def forward(self, x: Tensor) -> Tensor:  # (*, in) -> (*, out)
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # reshape(-1, in) gave "shape '[-1, in]' is invalid"
            raise PrunelabError(f"SparseInputLinear(in_features={self.in_features}) needs inputs of shape "
                                f"(..., {self.in_features}), got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)  # (N, in)
        active = rows.ne(0).any(0).nonzero().squeeze(1)  # (c,)
        out = rows.index_select(1, active) @ self.weight_t.index_select(0, active)  # (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def sparse_input_model(model: nn.Sequential, types: Sequence[type[nn.Module]] = (*ACTIVATIONS, TopKActivation)
                       ) -> nn.Sequential:
    """A copy of the ``nn.Sequential`` ``model`` whose Linears that follow an activation of
    ``types`` (directly) are :class:`SparseInputLinear`; the others are untouched.

    The children keep their names, so the copy's state_dict has the keys (and shapes) of
    ``model``'s and loads into it strictly.
    """
    if not isinstance(model, nn.Sequential):
        raise PrunelabError(f"sparse_input_model needs an nn.Sequential, got {type(model).__name__}")
    # _modules, not children(): children() skips a module object used twice, and each use is a step
    layers = [(name, layer) for name, layer in copy.deepcopy(model)._modules.items() if layer is not None]
    new = OrderedDict(
        (name, SparseInputLinear(layer)
         if isinstance(layer, nn.Linear) and i > 0 and isinstance(layers[i - 1][1], tuple(types)) else layer)
        for i, (name, layer) in enumerate(layers))
    return nn.Sequential(new).eval()

