"""Input statistics of one layer, and what every layer-wise solver shares.

A layer-wise solver sees a layer as ``Y = W X`` with ``W`` ``(rows, cols)`` and the
calibration inputs ``X`` ``(cols, n)`` (one column per token / pixel position; a conv is
unfolded first).  It needs one of two summaries of ``X``, accumulated over every
calibration sample by the engine:

* :class:`HessianAccumulator` -- the layer-wise Hessian of ``||W X - W' X||^2``,
  ``H = 2 X X^T / n`` ``(cols, cols)`` (OBS, L-OBS, SparseGPT).  It is the same for every
  output row, so one ``(cols, cols)`` matrix serves the whole layer.
* :class:`ColumnNormAccumulator` -- the squared input-feature norms ``||X_j||_2^2``
  ``(cols,)`` (Wanda).
* :class:`PairedHessianAccumulator` -- for dense targets (the engine's ``dense_targets``):
  the Hessian of the pruned model's inputs ``X~`` and the cross term ``2 X~ X^T / n`` with
  the dense model's inputs ``X`` on the same tokens, from which :func:`dense_target_weight`
  solves ``min_V ||W X - V X~||^2``.

Both sum in float64 (``n`` is large and the solvers invert ``H``).  Under
``torch.distributed`` each rank may see its own calibration shard: the sums are reduced
over ranks before a solver sees them, so every rank prunes identically.
:func:`inverse_hessian_cholesky` conditions ``H`` the way SparseGPT does (dead inputs,
relative dampening, escalated when the factorisation fails) for every Hessian solver.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from prunelab import distributed
from prunelab.errors import PrunelabError

# dampening fractions tried after the requested one fails: x10 each time, 4 times
DAMPENING_RETRIES = 4
# a Cholesky factor whose (min pivot / max pivot)^2 is below this is treated as singular
_MIN_PIVOT_RATIO_SQ = 1e-12


@dataclass
class InputStats:
    """What the engine hands a solver about one layer's calibration inputs.

    ``hessian``: ``(cols, cols)`` float64, ``2 X X^T / n`` (``None`` if not collected).
    ``sq_norms``: ``(cols,)`` float64, ``||X_j||_2^2`` summed over all ``n`` rows
    (``None`` if not collected).  ``mean``: ``(cols,)`` float64, the mean input row
    ``E[x]`` (for bias correction; ``None`` if not collected).  ``count``: ``n``, the
    number of input rows seen.  With dense targets, ``hessian`` and ``mean`` describe the
    pruned model's inputs ``X~``, ``cross`` is ``2 X~ X^T / n`` ``(cols, cols)`` and
    ``dense_mean`` the dense model's mean input row (both ``None`` otherwise).
    """

    hessian: Tensor | None = None
    sq_norms: Tensor | None = None
    mean: Tensor | None = None
    count: int = 0
    cross: Tensor | None = None
    dense_mean: Tensor | None = None


@dataclass(frozen=True)
class Solution:
    """A solver's answer for one layer: new weight, keep-mask, dampening fraction used."""

    weight: Tensor  # (rows, cols), pruned entries exactly 0
    mask: Tensor  # (rows, cols) bool, True = kept
    dampening: float | None = None  # fraction of mean diag(H) finally added (None: no Hessian)


class HessianAccumulator:
    """Running ``H = 2 X X^T / n`` (and the mean row) over batches of layer inputs ``(n_b, cols)``."""

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float64, device=device)  # (cols, cols)
        self.total = torch.zeros(cols, dtype=torch.float64, device=device)  # (cols,) sum of rows
        self.count = 0
        self.spent = False  # result() was called: the sums now hold H and the mean

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` ``(n_b, cols)``: ``sum += x^T x``."""
        x = _check_rows(self, x).to(torch.float64)  # (n_b, cols)
        self.sum.addmm_(x.T, x)
        self.total += x.sum(0)
        self.count += x.shape[0]

    def result(self) -> InputStats:
        """``H = 2 X X^T / n`` over all ranks (the accumulator is spent: ``H`` reuses its memory)."""
        _check_unspent(self, "result")
        self.spent = True
        count = _reduce_(self.sum, self.count)
        _reduce_(self.total, 0)
        scale = 1.0 / max(count, 1)
        return InputStats(hessian=self.sum.mul_(2.0 * scale), mean=self.total.mul_(scale), count=count)


class ColumnNormAccumulator:
    """Running ``||X_j||_2^2`` (and the mean row) over batches of layer inputs ``(n_b, cols)``."""

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(cols, dtype=torch.float64, device=device)  # (cols,)
        self.total = torch.zeros(cols, dtype=torch.float64, device=device)  # (cols,) sum of rows
        self.count = 0
        self.spent = False  # result() was called: the sums are reduced and the mean scaled in place

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` ``(n_b, cols)``: ``sum += x^2`` column-wise."""
        x = _check_rows(self, x).to(torch.float64)  # (n_b, cols)
        self.sum += x.square().sum(0)
        self.total += x.sum(0)
        self.count += x.shape[0]

    def result(self) -> InputStats:
        """``||X_j||^2`` summed over all rows of all ranks (the accumulator is spent)."""
        _check_unspent(self, "result")
        self.spent = True
        count = _reduce_(self.sum, self.count)
        _reduce_(self.total, 0)
        return InputStats(sq_norms=self.sum, mean=self.total.mul_(1.0 / max(count, 1)), count=count)


class PairedHessianAccumulator:
    """Running ``H~ = 2 X~ X~^T / n`` and ``C = 2 X~ X^T / n`` over pairs of row batches: the
    pruned model's layer inputs ``x~`` and the dense model's ``x`` for the same tokens,
    both ``(n_b, cols)``."""

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.pruned = HessianAccumulator(cols, device)
        self.cross = torch.zeros(cols, cols, dtype=torch.float64, device=device)  # (cols, cols)
        self.dense_total = torch.zeros(cols, dtype=torch.float64, device=device)  # (cols,)

    def add(self, pruned: Tensor, dense: Tensor) -> None:
        """Add matching rows: ``H~ += x~^T x~``, ``C += x~^T x``."""
        if pruned.shape != dense.shape:
            raise PrunelabError(
                f"dense targets need the same inputs rows in the dense and the pruned model, got {tuple(dense.shape)} "
                f"and {tuple(pruned.shape)}; the block must not depend on its weights for its shapes"
            )
        self.pruned.add(pruned)
        dense = dense.detach().to(torch.float64)  # (n_b, cols)
        self.cross.addmm_(pruned.detach().to(torch.float64).T, dense)
        self.dense_total += dense.sum(0)

    def result(self) -> InputStats:
        """``H~``, ``C``, both means, summed over all ranks (the accumulator is spent)."""
        _check_unspent(self.pruned, "result")
        count = _reduce_(self.cross, self.pruned.count)
        _reduce_(self.dense_total, 0)
        stats = self.pruned.result()
        scale = 1.0 / max(count, 1)
        stats.cross = self.cross.mul_(2.0 * scale)
        stats.dense_mean = self.dense_total.mul_(scale)
        return stats


def dense_target_weight(weight: Tensor, stats: InputStats, percdamp: float) -> Tensor:
    """The least-squares weight ``V = W C^T (H~ + lambda I)^{-1}`` ``(rows, cols)``.

    ``V`` minimises ``||W X - V X~||^2`` (dense output from pruned inputs, the asymmetric
    calibration of Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for
    Asymmetric Calibration", ICML 2025).  Its residual is orthogonal to the span of ``X~``,
    so for any ``W'``: ``||W X - W' X~||^2 = ||W X - V X~||^2 + ||(V - W') X~||^2`` -- a
    Hessian solver that prunes ``V`` on ``H~`` minimises the asymmetric objective exactly.
    ``lambda`` is the same relative dampening the solvers use (escalated if needed).
    Solved in float64; returned in float32 (float64 for a float64 ``weight``), never in a
    float16 / bfloat16 layer's dtype: ``V`` feeds the solver, and rounding it to half
    precision first would add an error of ~``2^-11 |V|`` that fp32 layers do not get --
    the layer's dtype is applied once, when the pruned weight is written back.
    """
    if stats.hessian is None or stats.cross is None:
        raise PrunelabError("dense targets need InputStats with hessian and cross (PairedHessianAccumulator)")
    chol, _, _, dead = damped_cholesky(stats.hessian, percdamp)  # (cols, cols) lower
    W = weight.detach().to(torch.float64)  # (rows, cols)
    rhs = stats.cross.to(torch.float64) @ W.T  # (cols, rows): C W^T
    target = torch.cholesky_solve(rhs, chol).T  # (rows, cols): V = W C^T H^-1 (H symmetric)
    target[:, dead] = 0.0
    return target.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)  # (rows, cols)


def _check_unspent(acc: HessianAccumulator | ColumnNormAccumulator, what: str) -> None:
    """Refuse ``add`` / ``result`` after ``result``: the sums were scaled (and reduced) in place,
    so a second ``result`` would scale ``H`` again and a later ``add`` would mix units."""
    if acc.spent:
        raise PrunelabError(
            f"{type(acc).__name__}.{what}() called after result(); the accumulator is spent (result() reuses its "
            "memory), start a new accumulator for new inputs"
        )


def _check_rows(acc: HessianAccumulator | ColumnNormAccumulator, x: Tensor) -> Tensor:
    """``x`` detached, checked to be ``(n_b, cols)`` rows for an unspent accumulator ``acc``."""
    _check_unspent(acc, "add")
    cols = acc.sum.shape[0]
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != cols:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise PrunelabError(
            f"{type(acc).__name__}({cols}) takes layer inputs as rows of shape (n, {cols}), got {got}; "
            f"flatten the leading dimensions first (x.reshape(-1, {cols}))"
        )
    return x.detach()


def _reduce_(total: Tensor, count: int) -> int:
    """Sum ``total`` over ranks in place and return the row count summed over ranks
    (DESIGN.md decision 3: every rank then decides the same masks from the same statistics;
    the identity for a single process)."""
    counts = torch.tensor([count], dtype=torch.int64, device=total.device)
    distributed.all_reduce_sum_(total)
    distributed.all_reduce_sum_(counts)  # exact: an integer sum, on any world size
    return int(counts.item())


def dampening_schedule(percdamp: float, retries: int = DAMPENING_RETRIES) -> list[float]:
    """Fractions of ``mean(diag H)`` to try: the requested one, then x10 up to ``retries``
    times, counted from ``max(percdamp, 0.1%)`` (so 0 or a tiny request makes progress:
    ``1e-5`` is followed by 1%, 10%, ...)."""
    base = max(percdamp, 1e-3)
    return [percdamp] + [base * 10.0**k for k in range(1, retries + 1)]


def condition_hessian(hessian: Tensor) -> tuple[Tensor, Tensor]:
    """``(H', dead)``: a float64 copy of ``H`` with ``H'_ii = 1`` for dead inputs.

    A dead input (``H_ii == 0``: the feature was zero on every calibration row) carries no
    information; SparseGPT's reference sets ``H_ii = 1`` and the solver zeroes ``W[:, i]``
    (it had no effect on the calibration outputs), which keeps ``H'`` invertible.
    """
    h = hessian.detach().to(torch.float64).clone()  # (cols, cols)
    dead = torch.diagonal(h) == 0  # (cols,)
    h[dead, dead] = 1.0
    return h, dead


def _factorisations(hessian: Tensor, percdamp: float) -> Iterator[tuple[float, Tensor, Tensor, Tensor]]:
    """Yield ``(frac, L, H' + lambda I, dead)`` for each dampening fraction of
    :func:`dampening_schedule` whose Cholesky factor ``L`` exists and is not numerically
    singular (pivot ratio^2 >= 1e-12); ``lambda = frac * mean(diag H')``."""
    h, dead = condition_hessian(hessian)  # (cols, cols), (cols,)
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for frac in dampening_schedule(percdamp):
        damped = h + (frac * mean_diag) * eye  # (cols, cols)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0 or not bool(torch.isfinite(chol).all()):
            continue
        pivots = torch.diagonal(chol)  # (cols,); none for a layer without inputs
        if pivots.numel() == 0 or float((pivots.min() / pivots.max()) ** 2) >= _MIN_PIVOT_RATIO_SQ:
            yield frac, chol, damped, dead


def _singular(percdamp: float) -> PrunelabError:
    last = dampening_schedule(percdamp)[-1]
    return PrunelabError(
        f"the layer Hessian stays singular even with dampening {last:g} x mean(diag H) (asked {percdamp:g}); "
        "pass more or more varied calibration samples, a larger dampening, or exclude the layer"
    )


def damped_cholesky(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor, float, Tensor]:
    """``(L, H' + lambda I, frac, dead)``: lower Cholesky factor of the damped Hessian.

    ``frac`` starts at ``percdamp`` and is raised x10 while the factorisation fails;
    raises :class:`PrunelabError` if every attempt fails.
    """
    for frac, chol, damped, dead in _factorisations(hessian, percdamp):
        return chol, damped, frac, dead
    raise _singular(percdamp)


def inverse_hessian_cholesky(hessian: Tensor, percdamp: float) -> tuple[Tensor, float, Tensor]:
    """SparseGPT's ``U``: the upper Cholesky factor of ``(H' + lambda I)^{-1}``, float64.

    ``U^T U = H^{-1}``; row ``i`` of ``U`` divided by ``U_ii`` is the OBS update direction
    for column ``i`` once columns ``< i`` are fixed (Frantar & Alistarh 2023).
    Returns ``(U, frac, dead)``; dampening escalates while either factorisation fails.
    """
    for frac, chol, _, dead in _factorisations(hessian, percdamp):
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)  # (cols, cols)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper.contiguous(), frac, dead
    raise _singular(percdamp)


def inverse_hessian(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor, float, Tensor]:
    """``((H' + lambda I)^{-1}, H' + lambda I, frac, dead)`` in float64 via Cholesky."""
    chol, damped, frac, dead = damped_cholesky(hessian, percdamp)
    return torch.cholesky_inverse(chol).contiguous(), damped, frac, dead


def require_matrix(weight: Tensor, method: str) -> tuple[int, int]:
    """``(rows, cols)`` of a solver's ``weight``, checked to be a 2-D tensor (a conv is unfolded first)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise PrunelabError(
            f"method {method!r} prunes a 2-D weight (rows, cols), got {got}; pass a Linear weight, or a conv "
            "weight reshaped to (out_channels, -1)"
        )
    rows, cols = weight.shape
    return rows, cols


def require_hessian(stats: InputStats | None, cols: int, method: str) -> Tensor:
    """``stats.hessian``, checked to be ``(cols, cols)`` and finite."""
    if stats is None or stats.hessian is None:
        raise PrunelabError(f"method {method!r} needs the layer Hessian; pass InputStats(hessian=2 X X^T / n)")
    if tuple(stats.hessian.shape) != (cols, cols):
        raise PrunelabError(
            f"method {method!r} got a Hessian of shape {tuple(stats.hessian.shape)} for a weight with {cols} "
            f"input columns; expected ({cols}, {cols})"
        )
    if not bool(torch.isfinite(stats.hessian).all()):
        raise PrunelabError(
            f"method {method!r} got a Hessian with inf/NaN entries; check the calibration inputs and the "
            "layers before this one for inf/NaN activations"
        )
    return stats.hessian
