"""Optimal Brain Damage (LeCun, Denker & Solla 1990) with two diagonal-Hessian estimates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunelab import distributed
from prunelab.criteria.base import (
    Criterion, FunctionalModel, ScoreData, batch_errors, batch_loss, eval_mode, iter_batches, leaves, no_batches_error,
)
from prunelab.errors import PrunelabError

HESSIAN_MODES = ("auto", "exact", "fisher")
_FISHER_CHUNK_ELEMENTS = 1 << 24  # per-sample gradients held at once: samples x scored weights


@dataclass(frozen=True)
class OBD(Criterion):
    """Optimal Brain Damage saliency (LeCun, Denker & Solla 1990, "Optimal Brain Damage").

    With a diagonal quadratic model of the loss around a minimum, deleting ``w_i``
    raises the loss by the saliency::

        s_i = 1/2 * h_ii * w_i^2,      h_ii = d^2 L / d w_i^2

    ``hessian`` chooses the estimate of ``h_ii``:

    * ``'exact'``: the exact diagonal of the Hessian of the batch loss ``L_b``
      (``data.loss_fn``, a batch mean), averaged over batches,
      ``h_ii = (1/B) sum_b (H_b e_i)_i``.  Each ``H_b e_i`` is a Hessian-vector product by
      double backprop, batched over ``hvp_chunk`` basis vectors at a time with
      ``torch.autograd.grad(..., is_grads_batched=True)``: cost ~ ``numel / hvp_chunk``
      vectorised backward passes per batch and parameter, memory ~ ``hvp_chunk`` copies of
      the backward graph (lower ``hvp_chunk`` for big activations).
    * ``'fisher'``: the empirical Fisher diagonal, ``h_ii ~ (1/N) sum_n (d l_n / d w_i)^2``
      over all ``N`` samples of the used batches, with ``l_n = loss_fn`` on sample ``n``
      alone (a micro-batch of one).  Per-sample gradients come from ``torch.func``
      (``vmap(grad(functional_call))``), in chunks; a model ``vmap`` cannot handle falls
      back to a plain loop over samples (same numbers, slower).  It is not LeCun et al.'s
      Levenberg-Marquardt (Gauss-Newton) diagonal: for a likelihood loss (cross-entropy)
      its expectation over targets drawn from the model is the Fisher = Gauss-Newton
      diagonal, but on the data's targets it differs (for ``mean((Xw - y)^2)`` it is
      ``4 mean r^2 x^2``, not ``2 mean x^2``); it is non-negative by construction and
      costs no second derivatives.  ``'auto'`` therefore mixes two estimates of different
      scale across layers under a global allocation; pick one ``hessian`` to compare
      layers on one footing.
    * ``'auto'`` (default): ``'exact'`` for parameters with ``numel <= exact_max_params``,
      ``'fisher'`` for larger ones.

    Sign: away from a minimum the exact diagonal can be negative.  prunelab neither clamps
    it to zero nor keeps the sign: it uses ``|h_ii|`` (curvature magnitude as
    sensitivity), so saliencies stay non-negative as the allocators expect (LAMP squares
    scores).  LeCun et al. assume a positive diagonal, i.e. a trained model.

    Groups: the default reduction sums saliencies (the diagonal model's loss increase for
    deleting the whole group).  Runs in eval mode; ``.grad`` is never written.

    Under ``torch.distributed`` both estimates are means over the batches (samples) of every
    rank: the sums and counts are all-reduced *before* ``|.|``, so every rank scores what one
    process scores on all the data (the mean of each rank's ``|h_ii|`` would differ wherever
    the ranks' curvatures have opposite signs; DESIGN.md decision 3).  A rank with no batches
    adds nothing; a bad batch or a non-scalar loss on one rank raises the same PrunelabError
    on every rank (none is left waiting in the all-reduce).
    """

    hessian: str = "auto"
    exact_max_params: int = 4096
    hvp_chunk: int = 256
    name = "obd"
    needs_data = True

    def __post_init__(self) -> None:
        if self.hessian not in HESSIAN_MODES:
            raise PrunelabError(
                f"criterion 'obd' got hessian={self.hessian!r}; expected one of {', '.join(HESSIAN_MODES)}"
            )
        for field in ("exact_max_params", "hvp_chunk"):
            value = getattr(self, field)
            minimum = 0 if field == "exact_max_params" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PrunelabError(f"criterion 'obd' got {field}={value!r}; expected an int >= {minimum}")

    def uses_exact(self, param: Tensor) -> bool:
        """Whether ``param``'s diagonal is computed exactly (else: empirical Fisher)."""
        if self.hessian == "auto":
            return param.numel() <= self.exact_max_params
        return self.hessian == "exact"

    def score(self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData | None) -> dict[str, Tensor]:
        assert data is not None
        diag = self._hessian_diagonal(model, params, data)  # already in eval mode
        return {n: 0.5 * diag[n] * params[n].detach().float().square() for n in params}

    def hessian_diagonal(
        self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData
    ) -> dict[str, Tensor]:
        """The estimate of ``|h_ii|`` (exact) or the Fisher diagonal, per parameter, float32.

        Pure like ``__call__`` (eval mode, modes restored, ``.grad`` untouched).
        """
        with eval_mode(model), torch.enable_grad():
            return self._hessian_diagonal(model, params, data)

    def _hessian_diagonal(
        self, model: nn.Module, params: Mapping[str, nn.Parameter], data: ScoreData
    ) -> dict[str, Tensor]:
        forward = FunctionalModel(model, params)
        exact = {n: p for n, p in params.items() if self.uses_exact(p)}
        fisher = {n: p for n, p in params.items() if n not in exact}
        totals = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        num_batches = num_samples = 0
        use_vmap = True  # switched off for the rest of this call once vmap fails on this model
        with distributed.errors_on_every_rank():  # one rank's bad batch: every rank raises, none waits below
            for inputs, targets in iter_batches(data, forward.device, allow_empty=True):
                if exact:
                    with batch_errors(self.name, inputs, targets):
                        diagonals = _exact_diagonal(forward, exact, data, inputs, targets, self.hvp_chunk)
                    for name, h in diagonals.items():
                        totals[name] += h
                if fisher:
                    _check_batched_tensor(inputs, targets)
                    with batch_errors(self.name, inputs, targets):  # outside the vmap -> loop fallback
                        squares, use_vmap = _fisher_sum(forward, fisher, data, inputs, targets, use_vmap)
                    for name, sq in squares.items():
                        totals[name] += sq
                    num_samples += _num_samples(inputs)
                num_batches += 1
        num_batches, num_samples = _counts_over_ranks(num_batches, num_samples)
        for total in totals.values():  # under DDP: sums over the batches / samples of every rank, before |.|
            distributed.all_reduce_sum_(total)
        out = {}
        for name in params:
            out[name] = (totals[name] / num_batches).abs() if name in exact else totals[name] / num_samples
        return out


def _counts_over_ranks(num_batches: int, num_samples: int) -> tuple[int, int]:
    """``(sum_r num_batches_r, sum_r num_samples_r)``: exact integer sums (the counts themselves
    for a single process), in one all-reduce; the same "no batches" PrunelabError on every rank
    when no rank had a batch."""
    counts = distributed.all_reduce_sum_(torch.tensor([num_batches, num_samples], dtype=torch.int64))
    if int(counts[0]) == 0:
        raise no_batches_error()
    return int(counts[0]), int(counts[1])


def _num_samples(inputs: Tensor) -> int:
    return int(inputs.shape[0])


def _check_batched_tensor(inputs: object, targets: object) -> None:
    """The empirical Fisher takes per-sample gradients along dim 0 of a tensor batch: refuse anything else."""
    for what, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, Tensor) or value.dim() == 0:
            kind = type(value).__name__ if not isinstance(value, Tensor) else "0-d tensor"
            raise PrunelabError(
                f"obd's empirical Fisher needs ScoreData {what} that are tensors with the samples along dim 0, got a "
                f"{kind}; yield (tensor, tensor) batches, or score the layers with obd(hessian='exact')"
            )


def _exact_diagonal(
    forward: FunctionalModel, params: Mapping[str, Tensor], data: ScoreData, inputs: Tensor, targets: Tensor, chunk: int
) -> dict[str, Tensor]:
    """Signed exact ``diag(H_b)`` of the batch loss for each parameter (float32)."""
    tensors = leaves(params)
    loss = batch_loss(data, forward(tensors, inputs), targets)
    grads = torch.autograd.grad(loss, list(tensors.values()), create_graph=True, allow_unused=True)
    out = {}
    for (name, weight), grad in zip(tensors.items(), grads):
        diag = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)  # (n,)
        if grad is not None and grad.requires_grad:  # else the loss is at most linear in w: H = 0
            n = weight.numel()
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(start + chunk, n), device=weight.device)  # (k,)
                basis = torch.zeros(idx.numel(), n, dtype=weight.dtype, device=weight.device)  # (k, n)
                basis[torch.arange(idx.numel(), device=weight.device), idx] = 1
                (hvp,) = torch.autograd.grad(
                    grad, weight, grad_outputs=basis.view(idx.numel(), *weight.shape),
                    retain_graph=True, is_grads_batched=True, allow_unused=True,
                )  # (k, *shape): rows H e_i
                if hvp is not None:
                    diag[idx] = hvp.reshape(idx.numel(), n).gather(1, idx[:, None]).squeeze(1).float()
        out[name] = diag.view(weight.shape)
    return out


def _fisher_sum(
    forward: FunctionalModel, params: Mapping[str, Tensor], data: ScoreData, inputs: Tensor, targets: Tensor,
    use_vmap: bool,
) -> tuple[dict[str, Tensor], bool]:
    """``sum_n (d l_n / dw)^2`` over the samples of one batch, per parameter (float32),
    and whether ``vmap`` still works on this model."""
    detached = {n: p.detach() for n, p in params.items() if forward.representative[n] == n}  # one per tied weight
    total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    size = _num_samples(inputs)
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, min(size, _FISHER_CHUNK_ELEMENTS // max(numel, 1)))

    def sample_loss(tensors: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return batch_loss(data, forward(tensors, x.unsqueeze(0)), y.unsqueeze(0))

    per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
    for start in range(0, size, chunk):
        x, y = inputs[start:start + chunk], targets[start:start + chunk]
        if use_vmap:
            try:
                grads = per_sample_grad(detached, x, y)  # name -> (k, *shape)
            except RuntimeError:
                use_vmap = False  # e.g. an op without a batching rule: loop below
        if not use_vmap:
            grads = _looped_grads(forward, params, data, x, y)
        for name in total:  # an alias of a tied weight gets its representative's gradient
            total[name] += grads[forward.representative[name]].float().square().sum(0)
    return total, use_vmap


def _looped_grads(
    forward: FunctionalModel, params: Mapping[str, Tensor], data: ScoreData, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients by a loop over micro-batches of one: name -> (k, *shape)."""
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(_num_samples(x)):
        tensors = leaves(params)
        loss = batch_loss(data, forward(tensors, x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
        for (name, weight), grad in zip(tensors.items(), grads):
            rows[name].append(torch.zeros_like(weight) if grad is None else grad)
    return {n: torch.stack(r) for n, r in rows.items()}
