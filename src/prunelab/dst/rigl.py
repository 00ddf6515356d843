"""RigL: The Rigged Lottery (Evci et al. 2020).

Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets Winners",
ICML 2020.
"""

from __future__ import annotations

import torch

from prunelab.dst.base import DynamicSparsifier


class RigL(DynamicSparsifier):
    """RigL: ERK start, magnitude drop, growth by dense-gradient magnitude (eqs. 1-3).

    Every ``delta_t`` steps (default 100) until ``T_end`` (default 75% of training), with
    ``f(t) = alpha/2 (1 + cos(pi t / T_end))`` (default ``alpha = 0.3``) and, per layer,
    ``k = f(t) (1 - s_l) N_l`` (``round(f * kept)``)::

        I_drop = ArgTopK(-|theta_l|, k)
        I_grow = ArgTopK_{i not in theta_l \\ I_drop}(|grad_{Theta_l} L_t|, k)

    i.e. among the positions not kept after the drop (one just dropped included, eq. 2) the
    ``k`` with the largest gradient of the current batch's loss with respect to *all* weights.
    Masked weights are zero, so this dense gradient is the ordinary ``.grad`` before the
    mask re-zeroes it: :meth:`step` reads it right after ``optimizer.step()`` and before
    ``enforce`` -- the same with ``optimizer.zero_grad(set_to_none=True)`` (the default) or
    ``set_to_none=False``, as long as ``zero_grad`` comes after :meth:`step`; a gradient that
    is exactly zero in every layer at an update (``zero_grad(set_to_none=False)`` before
    :meth:`step`) is refused rather than ranked.  Ties (candidates of equal ``|grad|``, e.g.
    exactly zero behind always-zero inputs or dead units) go to the lower flat index, as
    ``tf.math.top_k`` in the reference.  New connections (grown where the mask was 0) start
    at zero with zero optimizer state, so they do not change the network's output until
    trained.  A weight dropped and regrown in the same update is not new: it keeps its
    value and its optimizer state, as in the reference code (google-research/rigl, ``rigl/sparse_optimizers.py``,
    ``SparseRigLOptimizer`` -> ``_get_update_op(..., reinit_when_same=False)``:
    ``new_connections = (mask2 == 1) & (mask == 0)``, and ``reset_momentum`` zeroes the
    slots of ``new_connections`` only).
    """

    name = "rigl"
    grow_init = "zero"
    grow_signal = "the dense gradient (.grad)"

    def grow_scores(self, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._dense_grad(name, param).abs()
