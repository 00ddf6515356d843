"""Channel pruning by LASSO regression + least-squares reconstruction (He, Zhang & Sun 2017).

For a producer layer ``A`` whose output channels feed a consumer layer ``B`` (through
channel-wise ops only: activations, BatchNorm, dropout, pooling), let ``X`` be ``B``'s
input on calibration data -- rows are samples (Linear) or sampled kernel positions
(Conv2d, via ``unfold``) -- ``X_c`` its columns for input channel ``c`` (``k = kh*kw`` of
them for a conv, 1 for a Linear), ``W_c`` the matching ``(n, k)`` slice of ``B``'s weight
and ``Y = sum_c X_c W_c^T`` the linear part of ``B``'s output.  He et al. (eq. 3) solve::

    min_beta  1/(2M) || Y - sum_c beta_c X_c W_c^T ||_F^2 + lambda ||beta||_1,   ||W_c||_F = 1

raising ``lambda`` until only the wanted number of ``beta_c`` are nonzero (channel
selection), then refit ``B`` on the kept channels by least squares (eq. 4 without the
``beta`` scaling, which least squares absorbs)::

    W_B', b_B' = argmin || Y + b_B - X_kept W'^T - b' ||_F^2

All of it is computed from the Gram matrix ``X^T X`` (accumulated over the batches, all
positions of every image -- He et al. sample 10 positions per image only to save memory),
so the LASSO is a ``C x C`` problem solved by scikit-learn's coordinate descent and the
least squares a ``(|kept| k + 1)``-square system.  Memory: one ``(C k + 1)^2`` float64 Gram
per consumer.

Two entry points:

* :func:`regression_channel_prune` -- the full method for one ``(producer, consumer)`` pair:
  returns the kept-channel mask, ``beta``, the reconstructed consumer weights and the
  relative reconstruction error; :meth:`ChannelPruneResult.apply` writes them into a model
  (nothing is changed before that).
* the ``regression`` criterion -- channel scores for every producer whose consumer is
  found automatically, for the normal Sparsifier; the reconstruction is then a separate
  call (:func:`regression_channel_prune` + ``apply`` per pair, with ``keep`` = the channels
  the mask kept).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import distributed
from prunelab.criteria.activation import owning_modules, unwrap
from prunelab.criteria.base import Criterion, ScoreData, batch_errors, eval_mode, iter_batches, no_batches_error
from prunelab.criteria.links import FALLBACKS, ChannelLinks, channel_links, out_channels, spread_channels
from prunelab.errors import PrunelabError
from prunelab.structure import Channel
from prunelab.targets import PRUNABLE_TYPES

_CHUNK_ELEMENTS = 1 << 24  # unfolded conv input elements materialised at once
_LASSO_TOL = 1e-7
_LASSO_MAX_ITER = 100_000


# --- statistics of the consumer's input ---------------------------------------------------
@dataclass
class InputGram:
    """Second moments of a consumer's input rows ``x`` (``D = C * k`` features).

    ``gram``: ``(D + 1, D + 1)`` float64 ``sum_rows [x, 1]^T [x, 1]`` (the last row and
    column are the intercept); ``rows``: how many rows were summed.
    """

    gram: Tensor
    rows: int
    channels: int
    patch: int


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A consumer's input as ``(rows, C * k)`` float64: samples (Linear) or positions (Conv2d)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).double()
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()


def _check_consumer(name: str, module: nn.Module) -> tuple[int, int]:
    """``(input channels C, patch size k)`` of a supported consumer, else PrunelabError."""
    if isinstance(module, nn.Linear):
        return module.in_features, 1
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels, math.prod(module.kernel_size)
    raise PrunelabError(
        f"regression needs the consumer {name!r} to be an nn.Linear or an nn.Conv2d with groups=1, got "
        f"{type(module).__name__}{' with groups=' + str(module.groups) if isinstance(module, nn.Conv2d) else ''}; "
        "pick another consumer or exclude its producer"
    )


def collect_input_grams(model: nn.Module, names: list[str], data: ScoreData) -> dict[str, InputGram]:
    """One pass over ``data``: the :class:`InputGram` of each consumer module in ``names``
    (Gram and row count summed over ranks -- the count exactly, as an integer -- so every
    rank decides the same channels from ``G / M`` of all ranks' rows).  Call in eval mode.

    Under ``torch.distributed`` a consumer that did not run on a rank (a rank with no batches)
    adds nothing there, so every rank gets the Grams of one process on the union of the data;
    a bad batch on one rank, no batches on any rank, a consumer that ran on no rank and NaN/inf
    inputs on one rank are the same PrunelabError on every rank (none is left waiting in a
    collective)."""
    root, _ = unwrap(model)
    modules = dict(root.named_modules())
    sums: dict[str, list] = {}

    def hook_for(name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            step = max(1, x.shape[0])  # samples per chunk; a conv's unfolded input is ~ numel * kh * kw
            if isinstance(module, nn.Conv2d):
                step = max(1, _CHUNK_ELEMENTS // max(1, x[:1].numel() * math.prod(module.kernel_size)))
            for start in range(0, x.shape[0], step):
                rows = _input_rows(module, x[start:start + step])  # (R, D)
                aug = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
                gram = aug.T @ aug  # (D + 1, D + 1)
                if name in sums:
                    sums[name][0] += gram
                    sums[name][1] += rows.shape[0]
                else:
                    sums[name] = [gram, rows.shape[0]]

        return hook

    shapes = {name: _check_consumer(name, modules[name]) for name in names}
    handles = []
    num_batches = 0
    error: PrunelabError | None = None  # this rank's bad batch: agreed on below, before any Gram travels
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(hook_for(name, modules[name])))
        device = next((p.device for p in root.parameters()), torch.device("cpu"))
        with torch.no_grad():
            for inputs, targets in iter_batches(data, device, allow_empty=True):
                with batch_errors("regression", inputs, targets):
                    root(inputs)
                num_batches += 1
    except PrunelabError as exc:
        error = exc
    finally:
        for handle in handles:
            handle.remove()
    return _grams_over_ranks(sums, {name: (modules[name], shapes[name]) for name in names}, num_batches, error)


def _grams_over_ranks(
    sums: Mapping[str, list], consumers: Mapping[str, tuple[nn.Module, tuple[int, int]]], num_batches: int,
    error: PrunelabError | None,
) -> dict[str, InputGram]:
    """``name -> InputGram`` of ``sum_r G_r`` and ``sum_r M_r`` for every consumer in ``consumers``
    (``name -> (module, (C, k))``); ``sums`` holds this rank's ``[G (D + 1, D + 1), M]`` of the
    consumers that ran here, ``error`` the PrunelabError its pass over the batches raised (or None).

    Every rank's counts -- failed or not, batches, rows and whether each consumer ran -- go in one
    integer SUM all-reduce first, so that a failure on any rank (then raised on every rank by
    :func:`~prunelab.distributed.raise_on_every_rank`), no batches anywhere and a consumer that ran
    nowhere are the same error on every rank; then each Gram is summed, zeros where it did not run.
    """
    names = list(consumers)
    local = ([int(error is not None), num_batches] + [sums[n][1] if n in sums else 0 for n in names]
             + [int(n in sums) for n in names])
    counts = distributed.all_reduce_sum_(torch.tensor(local, dtype=torch.int64))  # (2 + 2 L,): exact
    if int(counts[0]) > 0:  # some rank failed: all raise the lowest failing rank's message (its own for one process)
        distributed.raise_on_every_rank(error)
    if int(counts[1]) == 0:
        raise no_batches_error()
    rows, ran = counts[2:2 + len(names)], counts[2 + len(names):]
    missing = sorted(n for n, r in zip(names, ran.tolist()) if r == 0)
    if missing:
        raise PrunelabError(
            f"regression: consumer(s) {', '.join(missing)} did not run on the ScoreData batches; check the model"
        )
    out = {}
    for name, count in zip(names, rows.tolist()):
        module, (channels, patch) = consumers[name]
        size = channels * patch + 1  # D + 1: the features and the intercept
        gram = sums[name][0] if name in sums else torch.zeros(
            size, size, dtype=torch.float64, device=module.weight.device
        )
        distributed.all_reduce_sum_(gram)  # sum over ranks of sum_rows [x, 1]^T [x, 1]
        if not bool(torch.isfinite(gram).all()):  # NaN/inf activations: the LASSO and least squares cannot run
            raise PrunelabError(
                f"regression: the input of consumer {name!r} contains NaN/inf on the ScoreData batches; check the "
                "inputs and the weights before it for NaN/inf values"
            )
        out[name] = InputGram(gram, count, channels, patch)
    return out


# --- the LASSO over channels ----------------------------------------------------------------
@dataclass(frozen=True)
class ChannelProblem:
    """He et al.'s channel-selection LASSO in Gram form.

    With ``Z_c = X_c W_c^T / ||W_c||_F`` (unit-norm weights) and ``t_c = ||W_c||_F``,
    ``Y = sum_c t_c Z_c`` and the objective is
    ``1/(2M) (t - beta)^T G (t - beta) + lambda ||beta||_1`` with ``G_cd = <Z_c, Z_d>``.
    It is handed to scikit-learn as an equivalent ``C x C`` design ``A = sqrt(E) V^T``
    (``G / M = V E V^T``), ``y = A t``.
    """

    gram: np.ndarray  # (C, C)  G / M
    target: np.ndarray  # (C,)  t
    design: np.ndarray  # (C, C)
    response: np.ndarray  # (C,)

    @classmethod
    def build(cls, stats: InputGram, weight: Tensor) -> ChannelProblem:
        c, k = stats.channels, stats.patch
        if not bool(torch.isfinite(weight.detach()).all()):
            raise PrunelabError(
                f"regression: the consumer weight of shape {tuple(weight.shape)} contains NaN/inf; "
                "fix or exclude that layer"
            )
        w = weight.detach().double().reshape(weight.shape[0], c, k).to(stats.gram.device)  # (n, C, k)
        s = stats.gram[: c * k, : c * k].reshape(c, k, c, k)  # (C, k, C, k)
        q = torch.einsum("oci,odj->cidj", w, w)  # (C, k, C, k): sum_o W[o,c,i] W[o,d,j]
        g = (s * q).sum((1, 3)) / max(stats.rows, 1)  # (C, C): <X_c W_c^T, X_d W_d^T> / M
        norms = w.pow(2).sum((0, 2)).sqrt()  # (C,)
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        g = g * inv[:, None] * inv[None, :]
        g = 0.5 * (g + g.T)
        gram, target = g.cpu().numpy(), norms.cpu().numpy()
        evals, evecs = np.linalg.eigh(gram)
        design = np.sqrt(np.clip(evals, 0.0, None))[:, None] * evecs.T  # (C, C): A^T A = G / M
        return cls(gram, target, design, design @ target)

    @property
    def channels(self) -> int:
        return self.target.size

    @property
    def alpha_max(self) -> float:
        """The smallest ``lambda`` at which every ``beta_c`` is 0 (in scikit-learn's scaling)."""
        return float(np.abs(self.design.T @ self.response).max()) / self.channels

    def solve(self, alphas: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        """``beta`` for each alpha in ``alphas`` (descending), warm-started along the path: ``(C, len)``."""
        from sklearn.exceptions import ConvergenceWarning  # imported here: keeps `import prunelab` light
        from sklearn.linear_model import lasso_path

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, coefs, _ = lasso_path(
                self.design, self.response, alphas=np.asarray(alphas, dtype=np.float64), coef_init=init,
                max_iter=_LASSO_MAX_ITER, tol=_LASSO_TOL,
            )
        return np.where(np.abs(coefs) > 1e-12 * max(1.0, float(np.abs(self.target).max())), coefs, 0.0)

    def path_scores(self, num_alphas: int, eps: float) -> np.ndarray:
        """Per-channel importance along the LASSO path, in ``[0, 1]`` (see ``Regression``)."""
        top = self.alpha_max
        if not top > 0:
            return np.zeros(self.channels)
        alphas = top * np.geomspace(1.0, eps, num_alphas)  # (K,) descending; alphas[0]: all zero
        coefs = self.solve(alphas)  # (C, K)
        scores = np.zeros(self.channels)
        active = coefs != 0
        for c in range(self.channels):
            hits = np.flatnonzero(active[c])
            if hits.size == 0:
                continue
            j = int(hits[0])  # the largest alpha at which channel c is in the support
            level = np.abs(coefs[:, j])[active[:, j]]
            share = abs(coefs[c, j]) / level.max()  # in (0, 1]: tie-break among channels entering together
            upper = alphas[j - 1] if j > 0 else alphas[j]
            scores[c] = (alphas[j] + 0.5 * share * (upper - alphas[j])) / top
        return scores

    def select(self, keep: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``(kept (C,) bool, beta (C,), lambda)``: raise ``lambda`` until ``keep`` channels remain.

        A coarse path over 40 geometric levels brackets the count, then a log-scale
        bisection (at most 60 steps, warm-started) finds a ``lambda`` with exactly ``keep``
        nonzeros.  If channels enter together (no such ``lambda``), the support at the
        bracket's upper end is completed by ``|beta|`` at its lower end, then by channel
        energy ``G_cc t_c^2``.
        """
        c = self.channels
        top = self.alpha_max
        energy = np.diag(self.gram) * self.target**2
        if keep >= c or not top > 0:
            beta = self.solve(np.array([top * 1e-8]))[:, 0] if top > 0 else np.zeros(c)
            order = np.lexsort((np.arange(c), -energy, -np.abs(beta)))
            kept = np.zeros(c, dtype=bool)
            kept[order[:keep]] = True
            return kept, beta, top * 1e-8
        alphas = top * np.geomspace(1.0, 1e-8, 40)
        coefs = self.solve(alphas)
        counts = (coefs != 0).sum(0)
        over = np.flatnonzero(counts > keep)
        if over.size == 0:
            hi_a, hi_b, lo_b = alphas[-1], coefs[:, -1], coefs[:, -1]
        else:
            j = int(over[0])  # j >= 1: alphas[0] = alpha_max keeps nothing
            hi_a, hi_b, lo_a, lo_b = alphas[j - 1], coefs[:, j - 1], alphas[j], coefs[:, j]
            for _ in range(60):
                if np.count_nonzero(hi_b) == keep:
                    break
                mid = math.sqrt(hi_a * lo_a)
                beta = self.solve(np.array([mid]), init=hi_b)[:, 0]
                if np.count_nonzero(beta) > keep:
                    lo_a, lo_b = mid, beta
                else:
                    hi_a, hi_b = mid, beta
        order = np.lexsort((np.arange(c), -energy, -np.abs(lo_b), -(hi_b != 0).astype(np.int64)))
        kept = np.zeros(c, dtype=bool)
        kept[order[:keep]] = True
        return kept, hi_b, float(hi_a)


# --- least-squares reconstruction -------------------------------------------------------------
def reconstruct(
    stats: InputGram, weight: Tensor, bias: Tensor | None, kept: Tensor
) -> tuple[Tensor, Tensor | None, float]:
    """Least-squares refit of a consumer on its kept input channels.

    ``W', b' = argmin ||X W^T + b - X_kept W'^T - b'||^2`` (``b'`` only when the consumer
    has a bias), solved as ``Theta'_K = pinv(S_KK) S_K: Theta`` from the augmented Gram ``S``
    with ``Theta = [W^T; b^T]``.  Returns the new weight (dropped input channels exactly 0),
    bias, and the relative error ``||Y - Y'||^2 / ||Y||^2`` on the calibration data.
    """
    c, k = stats.channels, stats.patch
    d = c * k
    n = weight.shape[0]
    device = stats.gram.device
    theta = weight.detach().double().reshape(n, d).T.to(device)  # (D, n)
    columns = torch.repeat_interleave(kept.to(device), k)  # (D,) kept features
    if bias is not None:
        theta = torch.cat([theta, bias.detach().double().reshape(1, n).to(device)], 0)  # (D + 1, n)
        columns = torch.cat([columns, torch.ones(1, dtype=torch.bool, device=device)])
        s = stats.gram
    else:
        s = stats.gram[:d, :d]
    idx = torch.nonzero(columns).reshape(-1)
    solved = torch.linalg.pinv(s[idx][:, idx], hermitian=True) @ (s[idx] @ theta)  # (|K|, n)
    new = torch.zeros_like(theta)
    new[idx] = solved
    diff = theta - new
    total = float(torch.einsum("in,ij,jn->", theta, s, theta))
    error = float(torch.einsum("in,ij,jn->", diff, s, diff)) / total if total > 0 else 0.0
    new_weight = new[:d].T.reshape(weight.shape).to(dtype=weight.dtype, device=weight.device)
    new_bias = new[d].to(dtype=bias.dtype, device=bias.device) if bias is not None else None
    return new_weight, new_bias, max(error, 0.0)


# --- the full method for one pair --------------------------------------------------------------
@dataclass(frozen=True)
class ChannelPruneResult:
    """Outcome of :func:`regression_channel_prune` for one ``producer -> consumer`` pair.

    ``keep``: ``(C,)`` bool, the producer's kept output channels; ``beta``: ``(C,)`` LASSO
    coefficients at ``alpha``; ``consumer_weight`` / ``consumer_bias``: the least-squares
    reconstruction (input channels not kept are exactly 0); ``relative_error``:
    ``||Y - Y'||^2 / ||Y||^2`` of the consumer's output on the calibration data.
    """

    producer: str
    consumer: str
    keep: Tensor
    beta: Tensor
    alpha: float
    consumer_weight: Tensor
    consumer_bias: Tensor | None
    relative_error: float

    def _layers(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``(producer, consumer)`` modules of ``model``, checked to be the ones this result was computed for."""
        root, _ = unwrap(model)
        modules = dict(root.named_modules())
        producer, consumer = modules.get(self.producer), modules.get(self.consumer)
        fits = (
            producer is not None and consumer is not None
            and getattr(producer, "weight", None) is not None and getattr(consumer, "weight", None) is not None
            and out_channels(producer) == self.keep.numel()
            and consumer.weight.shape == self.consumer_weight.shape
            and (getattr(consumer, "bias", None) is None) == (self.consumer_bias is None)
        )
        if not fits:
            raise PrunelabError(
                f"this regression result ({self.producer!r} -> {self.consumer!r}, consumer weight "
                f"{tuple(self.consumer_weight.shape)}) does not fit {type(root).__name__}; apply it to the model "
                "regression_channel_prune was run on"
            )
        return producer, consumer

    def masks(self, model: nn.Module) -> dict[str, Tensor]:
        """Element masks for the two weights: producer output channels (rows ``w[c]``; a transposed
        conv's output slices ``w[:, j]`` of each group) and consumer input channels."""
        _, prefix = unwrap(model)
        producer, consumer = self._layers(model)
        rows = self._producer_mask(producer)
        cols = self.keep.to(consumer.weight.device).reshape((1, -1) + (1,) * (consumer.weight.dim() - 2))
        return {
            f"{prefix}{self.producer}.weight": rows,
            f"{prefix}{self.consumer}.weight": cols.expand(consumer.weight.shape).clone(),
        }

    def _producer_mask(self, producer: nn.Module) -> Tensor:
        """Bool mask of the producer's weight keeping the output channels ``keep`` keeps."""
        keep = self.keep.to(producer.weight.device)
        return Channel().for_layer(producer).from_groups(keep, tuple(producer.weight.shape)).contiguous().clone()

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Write the result into ``model`` in place: zero the producer's dropped rows (and
        bias entries) and load the reconstructed consumer weight and bias.

        The consumer's columns for dropped channels are exactly 0, so its output no longer
        depends on them even where an op in between (a BatchNorm shift) makes a zeroed
        channel nonzero; a later physical shrink removes those channels everywhere.
        """
        producer, consumer = self._layers(model)  # checked before anything is written
        dropped = ~self.keep.to(producer.weight.device)
        producer.weight.masked_fill_(~self._producer_mask(producer), 0)
        if getattr(producer, "bias", None) is not None:
            producer.bias[dropped] = 0
        consumer.weight.copy_(self.consumer_weight)
        if self.consumer_bias is not None:
            consumer.bias.copy_(self.consumer_bias)


def _module_name(name: str) -> str:
    return name.removesuffix(".weight")


def _keep_count(keep: int | float, channels: int, producer: str) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise PrunelabError(
            f"regression_channel_prune got keep={keep!r} for {producer!r}; "
            "expected a channel count (int) or a fraction in (0, 1]"
        )
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise PrunelabError(
                f"regression_channel_prune got keep={keep} for {producer!r}; a fraction must be in (0, 1]"
            )
        return max(1, round(keep * channels))
    if not 1 <= keep <= channels:
        raise PrunelabError(
            f"regression_channel_prune got keep={keep} for {producer!r}; expected 1..{channels} (its output channels)"
        )
    return keep


def regression_channel_prune(
    model: nn.Module, producer: str, consumer: str | None, data: ScoreData, keep: int | float,
    *, links: ChannelLinks | None = None,
) -> ChannelPruneResult:
    """He, Zhang & Sun 2017 ("Channel Pruning for Accelerating Very Deep Neural Networks")
    on one pair: LASSO channel selection, then least-squares reconstruction (module doc).

    ``producer`` / ``consumer``: module names (``"fc1"``; ``"fc1.weight"`` is accepted);
    ``consumer=None`` finds it from the graph (the Linear/Conv2d the producer's channels
    reach through channel-wise ops only).  An explicit consumer must take the producer's
    channel ``c`` as its input channel ``c``.  ``keep``: channels to keep (int) or a
    fraction of them (float in (0, 1]).  Supports Linear -> Linear and Conv2d -> Conv2d
    (groups=1).  ``links``: the model's :func:`~prunelab.criteria.links.channel_links`,
    when the caller has them (pruning several pairs then traces the model once); computed
    here when ``consumer`` is None and none are given.

    Pure: the model is run in eval mode and not modified; call ``result.apply(model)`` to
    write the masks' zeros and the reconstructed consumer weights into it.
    """
    if not isinstance(data, ScoreData):
        raise PrunelabError(
            f"regression_channel_prune got data of type {type(data).__name__}; expected ScoreData(loader, ...)"
        )
    root, _ = unwrap(model)
    modules = dict(root.named_modules())
    producer = _module_name(producer)
    if not isinstance(modules.get(producer), PRUNABLE_TYPES):
        raise PrunelabError(
            f"regression_channel_prune got producer {producer!r}, which is not a Linear/Conv module of the model; "
            f"pass one of {', '.join(n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES))}"
        )
    if consumer is None:
        links = links if links is not None else channel_links(root)
        links.check("consumer", [producer])
        found = links.consumer.get(producer)
        if found is None:
            raise PrunelabError(
                f"regression_channel_prune found no consumer for {producer!r} (no Linear/Conv2d reached through "
                "channel-wise ops only); pass consumer='<module name>' explicitly"
            )
        consumer = found
    consumer = _module_name(consumer)
    if consumer not in modules:
        raise PrunelabError(f"regression_channel_prune got consumer {consumer!r}, which is not a module of the model")
    channels, _ = _check_consumer(consumer, modules[consumer])
    produced = out_channels(modules[producer])
    if channels != produced:
        raise PrunelabError(
            f"producer {producer!r} has {produced} output channels but consumer {consumer!r} takes {channels} input "
            "channels; pick the layer that directly consumes the producer's channels"
        )
    count = _keep_count(keep, channels, producer)
    with eval_mode(root):
        stats = collect_input_grams(root, [consumer], data)[consumer]
    target = modules[consumer]
    problem = ChannelProblem.build(stats, target.weight)
    kept, beta, alpha = problem.select(count)
    kept_t = torch.from_numpy(kept)
    weight, bias, error = reconstruct(stats, target.weight, target.bias, kept_t)
    return ChannelPruneResult(
        producer, consumer, kept_t.to(target.weight.device), torch.from_numpy(beta).float(), alpha, weight, bias, error
    )


# --- the criterion -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Regression(Criterion):
    """Channel score from He, Zhang & Sun 2017's LASSO channel selection ("Channel Pruning
    for Accelerating Very Deep Neural Networks", eq. 3; module doc).

    For every scored Linear/Conv layer whose consumer is found from the graph, the LASSO
    over its output channels is solved along a path of ``num_alphas`` values
    ``lambda_j = lambda_max * eps^(j/(K-1))`` (descending).  Raising ``lambda`` removes
    channels one after another, so a channel's importance is the largest ``lambda`` at
    which ``beta_c != 0``, relative to ``lambda_max``; channels entering together are
    ordered by ``|beta_c|`` there (a fraction of the gap to the next level up)::

        s_c = (lambda_j + 1/2 |beta_c(lambda_j)| / max_d |beta_d(lambda_j)| (lambda_{j-1} - lambda_j)) / lambda_max

    in ``[0, 1]``, 0 for a channel never selected.  Keeping the top-``k`` channels by
    ``s_c`` is the paper's "increase lambda until k remain" (up to the path's resolution),
    for any ``k`` -- which the Sparsifier's allocation decides.  ``s_c`` is broadcast to
    row ``w[c]`` (and bias ``b[c]``); for a transposed conv producer, weight ``(in, out/groups, *k)``,
    to its output slice ``w[g*in/groups:(g+1)*in/groups, j]`` of ``c = g*out/groups + j``.  The least-squares reconstruction of the consumer is
    a separate step: :func:`regression_channel_prune` + ``apply``.

    Layers without a consumer (the classifier) and other parameters: ``fallback='l1'``
    (default) scores them ``|w| / max|w|`` (per parameter, so they share the ``[0, 1]``
    range of ``s_c`` and a global threshold does not empty them) with a warning naming
    them; ``fallback='error'`` raises.
    Group reduction: the mean, so a channel's score is ``s_c``.  Meant for channel
    granularity.  Runs in eval mode; one forward pass over the data.
    """

    fallback: str = "l1"
    num_alphas: int = 50
    eps: float = 1e-4
    name = "regression"
    needs_data = True

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise PrunelabError(
                f"criterion 'regression' got fallback={self.fallback!r}; expected one of {', '.join(FALLBACKS)}"
            )
        if isinstance(self.num_alphas, bool) or not isinstance(self.num_alphas, int) or self.num_alphas < 2:
            raise PrunelabError(f"criterion 'regression' got num_alphas={self.num_alphas!r}; expected an int >= 2")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 < self.eps < 1.0:
            raise PrunelabError(f"criterion 'regression' got eps={self.eps!r}; expected a number in (0, 1), e.g. 1e-4")

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        owners = owning_modules(model, params)
        layers = sorted({o.module_name for o in owners.values() if isinstance(o.module, PRUNABLE_TYPES)})
        found = channel_links(model)  # one trace for the whole pass
        found.check("consumer", layers)
        links = found.consumer
        root, _ = unwrap(model)
        modules = dict(root.named_modules())
        producers = [p for p in layers if p in links]
        grams = collect_input_grams(root, sorted({links[p] for p in producers}), data) if producers else {}
        channel_scores = {
            p: torch.from_numpy(
                ChannelProblem.build(grams[links[p]], modules[links[p]].weight).path_scores(self.num_alphas, self.eps)
            )
            for p in producers
        }
        out: dict[str, Tensor] = {}
        unscored: list[str] = []
        for fqn, param in params.items():
            owner = owners[fqn]
            values = channel_scores.get(owner.module_name)
            spread = spread_channels(values, param, owner.module, owner.attr) if values is not None else None
            if spread is not None:
                out[fqn] = spread
            else:
                magnitude = param.detach().float().abs()
                out[fqn] = magnitude / magnitude.max().clamp_min(torch.finfo(torch.float32).tiny)
                unscored.append(fqn)
        if unscored:
            message = (
                f"regression: {', '.join(unscored)} have no consumer layer reached through channel-wise ops"
                f"{', scored by |w| / max|w| (fallback=l1)' if self.fallback == 'l1' else ''}; exclude them (--exclude)"
            )
            if self.fallback == "error":
                raise PrunelabError(message + " or pass fallback='l1'")
            warnings.warn(message, stacklevel=3)
        return out

    def reduce_group(self, scores: Tensor) -> Tensor:
        """``(..., group_size)`` -> ``(...)``: the mean (a channel's score is ``s_c``)."""
        return scores.mean(-1)
