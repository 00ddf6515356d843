"""Low-rank factorisation: the dense alternative to pruning a Linear layer.

A weight ``W`` (``out x in``) is replaced by two thin Linears, ``x -> B (A x) + b`` with
``A`` ``(r x in)`` and ``B`` ``(out x r)``: ``r (in + out)`` weights instead of ``in * out``,
and two dense matmuls that are really faster when ``r < in * out / (in + out)`` -- no
sparse kernel needed.

Two ways to choose ``A`` and ``B`` (both exact minimisers of their objective over rank-``r``
matrices, by Eckart & Young 1936):

* plain truncated SVD (Denton et al. 2014, "Exploiting Linear Structure Within
  Convolutional Networks for Efficient Evaluation"): ``W = U S V^T``, keep the ``r``
  largest singular values; minimises ``||W - W'||_F``.
* data-aware, whitened SVD (SVD-LLM, Wang et al. 2024, "SVD-LLM: Truncation-aware Singular
  Value Decomposition for Large Language Model Compression", eq. 3-6): with the layer's
  input second moment ``H = X X^T / n = L L^T`` (Cholesky, dampened like SparseGPT's
  Hessian), take the SVD of ``W L = U S V^T`` and set ``W' = U_r S_r V_r^T L^{-1}``;
  since ``||(W - W') X||_F^2 = n ||(W - W') L||_F^2`` this minimises the output error on
  the calibration inputs.  An input that is zero on every calibration row (a dead ReLU
  unit) has no say in that error; its column of ``W'`` is zero (SparseGPT's convention).

:func:`low_rank_model` factorises every Linear of a model's blocks (the blocks
:func:`prunelab.oneshot.find_blocks` finds) at a parameter ``keep`` ratio, collecting ``H``
from calibration inputs when given.  The model's structure changes (``q`` becomes a
:class:`LowRankLinear` with ``first``/``second``), so its state_dict loads only into a model
factorised with the same ranks (``report.ranks``).  ``transformers``' ``Conv1D`` (GPT-2's
projections, ``y = x W + b`` with ``W`` stored ``(in, out)``) is the same map as a Linear
with weight ``W^T`` and is factorised as one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.criteria.base import eval_mode
from prunelab.errors import PrunelabError
from prunelab.oneshot.block_runs import token_masks
from prunelab.oneshot.engine import find_blocks
from prunelab.oneshot.layer_targets import conv1d_as_linear, is_hf_conv1d, real_rows
from prunelab.oneshot.stats import HessianAccumulator, damped_cholesky

__all__ = ["LowRankLinear", "LowRankReport", "factorize_linear", "low_rank_model", "rank_for"]


class LowRankLinear(nn.Module):
    """``second(first(x))``: ``first`` is ``Linear(in, r, bias=False)``, ``second`` ``Linear(r, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: Tensor) -> Tensor:  # (*, in) -> (*, out)
        return self.second(self.first(x))


def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < keep <= 1.0:
        raise PrunelabError(f"keep must be a fraction of the weights in (0, 1], got {keep!r}; e.g. 0.5")


def _check_dampening(dampening: float) -> None:
    if isinstance(dampening, bool) or not isinstance(dampening, numbers.Real) or not (
        math.isfinite(dampening) and dampening >= 0
    ):
        raise PrunelabError(
            f"dampening must be a finite number >= 0 (a fraction of the mean diagonal of X X^T / n), "
            f"got {dampening!r}; e.g. 0.01"
        )


def rank_for(in_features: int, out_features: int, keep: float) -> int:
    """The largest rank whose two factors hold at most ``keep`` of the ``in * out`` weights (at least 1).

    ``r = floor(keep * in * out / (in + out))``, floored with a relative tolerance of 1e-9 so
    that a decimal ``keep`` whose float is a hair below it (0.3 is 0.29999...) still gives
    the exact quotient (``keep=0.3``, 12 x 15: ``0.3 * 180 / 27 = 2``, not 1).
    """
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:  # 0: ZeroDivisionError
            raise PrunelabError(f"rank_for needs {what} to be a positive integer, got {size!r}")
    _check_keep(keep)
    exact = keep * in_features * out_features / (in_features + out_features)
    return max(1, math.floor(exact * (1.0 + 1e-9)))


@torch.no_grad()
def factorize_linear(linear: nn.Linear, rank: int, second_moment: Tensor | None = None,
                     dampening: float = 0.01) -> LowRankLinear:
    """A :class:`LowRankLinear` of rank ``rank`` approximating ``linear`` (see the module docs).

    ``second_moment``: ``(in, in)`` input second moment ``X X^T / n`` (any positive scale);
    ``None`` for the plain SVD.  ``dampening``: fraction of its mean diagonal added first.
    """
    if not isinstance(linear, nn.Linear):  # a Conv1d was "too many values to unpack"
        raise PrunelabError(f"factorize_linear needs an nn.Linear, got {type(linear).__name__}")
    out_f, in_f = linear.weight.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_f, out_f):
        raise PrunelabError(f"rank must be an integer in [1, {min(in_f, out_f)}] for a {out_f}x{in_f} weight, got {rank!r}")
    if second_moment is not None and (not isinstance(second_moment, Tensor)
                                      or tuple(second_moment.shape) != (in_f, in_f)):
        given = tuple(second_moment.shape) if isinstance(second_moment, Tensor) else type(second_moment).__name__
        raise PrunelabError(f"second_moment must be the ({in_f}, {in_f}) input second moment X X^T / n of this "
                            f"{out_f}x{in_f} layer, got {given}; collect it from this layer's inputs, or pass None")
    _check_dampening(dampening)
    W = linear.weight.detach().double()  # (out, in)
    if second_moment is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = S[:rank].sqrt()
        first = root[:, None] * Vh[:rank]  # (r, in)
        second = U[:, :rank] * root  # (out, r)
    else:
        L, _, _, dead = damped_cholesky(second_moment.to(W.device).double(), dampening)  # (in, in) lower, H' = L L^T
        # a dead input (zero on every calibration row) had H_ii set to 1 to keep H' invertible;
        # its column of W never reached the outputs, so, as in SparseGPT, it is zeroed rather than
        # left to take singular directions (rank) from the inputs that did
        W = W.masked_fill(dead.to(W.device).unsqueeze(0), 0.0)
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        # W' = U_r S_r V_r^T L^{-1}: first = M L^{-1} with M = S_r V_r^T (r, in), i.e. L^T first^T = M^T
        first = torch.linalg.solve_triangular(L.T, (S[:rank, None] * Vh[:rank]).T, upper=True).T  # (r, in)
        second = U[:, :rank]  # (out, r)
    module = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None)
    module.to(device=linear.weight.device, dtype=linear.weight.dtype)
    module.train(linear.training)  # the replacement keeps the layer's mode and frozen-ness
    module.first.weight.copy_(first)
    module.second.weight.copy_(second)
    module.first.weight.requires_grad_(linear.weight.requires_grad)
    module.second.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        module.second.bias.copy_(linear.bias)
        module.second.bias.requires_grad_(linear.bias.requires_grad)
    return module


@dataclass(frozen=True)
class LowRankReport:
    """What :func:`low_rank_model` did: the rank per factorised Linear, and the weights of the
    candidate Linears (those in the blocks, not excluded) before and after."""

    ranks: dict[str, int]
    weights_before: int
    weights_after: int

    @property
    def keep(self) -> float:
        return self.weights_after / self.weights_before


def _is_factorisable(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a ``transformers`` ``Conv1D`` (found by type; transformers is never imported)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _block_linears(model: nn.Module, exclude: Sequence[str]) -> tuple[dict[str, nn.Linear], dict[str, list[str]]]:
    """The candidate Linears (Conv1Ds as their equivalent Linears) by first name, and every name each
    is used under (a shared layer is replaced at all its uses, so the tie holds; excluded at one use,
    it stays dense at all)."""
    names = [name for name, _ in find_blocks(model)]
    uses: dict[int, list[str]] = {}
    inside: dict[int, bool] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_factorisable(module) and name:
            uses.setdefault(id(module), []).append(name)
            in_block = any(name == b or name.startswith(f"{b}.") for b in names) if names != [""] else True
            inside[id(module)] = inside.get(id(module), False) or in_block
    found, aliases = {}, {}
    for key, all_names in uses.items():
        if inside[key] and not any(name in exclude for name in all_names):
            found[all_names[0]] = conv1d_as_linear(model.get_submodule(all_names[0]))
            aliases[all_names[0]] = list(dict.fromkeys(all_names))
    if not found:
        raise PrunelabError(f"{type(model).__name__} has no nn.Linear (or transformers Conv1D) layer inside its "
                            "blocks to factorise")
    return found, aliases


def _check_exclude(model: nn.Module, exclude: Sequence[str]) -> tuple[str, ...]:
    """``exclude`` as a tuple of Linear names of ``model``: one name may be given as a string (it
    was split into its letters), and a name that is no Linear of the model (a typo) is refused."""
    names = (exclude,) if isinstance(exclude, str) else tuple(exclude) if isinstance(exclude, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise PrunelabError(f"exclude must be Linear names (strings), got {exclude!r}; e.g. ('lm_head',)")
    linear_names = [n for n, m in model.named_modules(remove_duplicate=False) if _is_factorisable(m) and n]
    unknown = [n for n in names if n not in linear_names]
    if unknown:
        shown = ", ".join(repr(n) for n in linear_names[:4]) + (" ..." if len(linear_names) > 4 else "")
        raise PrunelabError(f"exclude names {unknown}, which are no Linear of {type(model).__name__} "
                            f"(its Linears: {shown or 'none'}); pass Linear names as model.named_modules() gives them")
    return names


@torch.no_grad()
def _second_moments(model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Sequence[Any]) -> dict[str, Tensor]:
    accs = {name: HessianAccumulator(lin.in_features, lin.weight.device) for name, lin in linears.items()}

    current: list[Tensor | None] = [None]  # the real (not padding) positions of the item being run

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            accs[name].add(real_rows(args[0], current[0]))  # padding rows left out, as in one-shot pruning
        return record

    # on the model's own modules (a Conv1D's Linear twin never runs); a shared one hooks once, for all its uses
    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in linears]
    try:
        with eval_mode(model):  # restores every module's own train/eval flag
            for item, tokens in zip(calibration, token_masks(calibration, torch.device("cpu")), strict=True):
                current[0] = tokens
                model(**item) if isinstance(item, Mapping) else model(item)
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for name, acc in accs.items():
        if acc.count == 0:
            raise PrunelabError(f"layer {name!r} never ran on the calibration inputs; exclude it or pass other inputs")
        moments[name] = acc.result().hessian
    return moments


def low_rank_model(model: nn.Module, keep: float, calibration: Sequence[Any] | None = None, *,
                   exclude: Sequence[str] = (), dampening: float = 0.01) -> LowRankReport:
    """Factorise, in place, every Linear in ``model``'s blocks to hold ``keep`` of its weights.

    ``calibration`` (model inputs: Tensors or dicts): use the whitened, data-aware SVD with
    each layer's input second moment from one pass of the dense model (the padding positions
    of a dict item's 0/1 ``attention_mask`` left out, as in one-shot pruning); ``None``: plain SVD.
    A layer whose rank would not save weights (``keep`` close to 1) is left as it is.  A Linear
    used at several places (shared weights) is factorised once, from the inputs of all its uses,
    and replaced at each; excluding any of its names leaves it dense at all of them.
    """
    _check_keep(keep)  # before the calibration pass
    _check_dampening(dampening)
    exclude = _check_exclude(model, exclude)
    linears, aliases = _block_linears(model, exclude)
    if calibration is not None:
        calibration = list(calibration)
        for i, item in enumerate(calibration):
            if not isinstance(item, (Tensor, Mapping)):
                raise PrunelabError(
                    f"calibration item {i} is a {type(item).__name__}; expected model inputs (a Tensor, or a dict "
                    "of keyword inputs) -- drop the targets, e.g. [x for x, _ in loader]"
                )
    moments = _second_moments(model, linears, calibration) if calibration is not None else {}
    ranks, lows, before, after = {}, {}, 0, 0
    for name, linear in linears.items():
        out_f, in_f = linear.weight.shape
        before += in_f * out_f
        rank = rank_for(in_f, out_f, keep)
        if rank * (in_f + out_f) >= in_f * out_f or rank > min(in_f, out_f):
            after += in_f * out_f
            continue
        try:
            lows[name] = factorize_linear(linear, rank, moments.get(name), dampening)
        except PrunelabError as error:  # say which layer ("exclude the layer": which one?)
            raise PrunelabError(f"layer {name!r}: {error}") from None
        ranks[name] = rank
        after += rank * (in_f + out_f)
    # swapped in only once every layer factorised: a failing layer leaves the model as it was
    for name, low in lows.items():
        for use in aliases[name]:  # every use of a shared Linear gets the same factorised module
            parent_name, _, child = use.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, low)
    return LowRankReport(ranks, before, after)
