"""Data-aware one-shot pruning: calibrate, then prune each layer with a layer-wise solver.

    from prunelab.oneshot import OneShotConfig, prune_oneshot
    report = prune_oneshot(model, calibration_batches, OneShotConfig(method="sparsegpt", sparsity=0.5))
    report.masks.save("masks.safetensors")        # the model itself now holds real zeros

``calibration`` is a sequence of model inputs: Tensors (``model(x)``) or dicts
(``model(**x)``, e.g. tokenizer outputs).  The engine (:mod:`prunelab.oneshot.engine`)
walks the model block by block; each layer is handed to the method registered in
:data:`SOLVERS`:

=================  ==========================================================  =========
method             what it does                                                 needs
=================  ==========================================================  =========
``sparsegpt``      Frantar & Alistarh 2023: OBS column sweep with Cholesky      H
``wanda``          Sun et al. 2023: ``|W_ij| * ||X_j||`` per output row         ||X_j||
``magnitude``      lowest ``|W_ij|`` of the whole layer                         --
``magnitude-row``  lowest ``|W_ij|`` of every output row                        --
``obs``            Hassibi & Stork 1992: greedy row-wise OBS with downdates     H
``lobs``           Dong et al. 2017: OBS saliency per layer + exact update      H
=================  ==========================================================  =========

``H = 2 X X^T / n`` is the layer-wise Hessian of ``||W X - W' X||^2``.  Every solver is a
pure function ``(W (rows, cols), InputStats, OneShotConfig) -> Solution``.
``OneShotConfig(dense_targets=True)`` makes the ``H`` solvers reconstruct the dense model's
layer output from the pruned model's inputs instead (``min ||W X - W' X~||^2``, GPTAQ);
``bias_correction=True`` lets each bias absorb the mean output change.
"""

from prunelab.oneshot.engine import LayerRow, OneShotConfig, OneShotReport, Solver, find_blocks, prune_oneshot
from prunelab.oneshot.lobs import prune_lobs
from prunelab.oneshot.magnitude import prune_magnitude, prune_magnitude_row
from prunelab.oneshot.obs import OBS_MAX_IN_FEATURES, prune_obs, woodbury_inverse
from prunelab.oneshot.sparsegpt import prune_sparsegpt
from prunelab.oneshot.stats import ColumnNormAccumulator, HessianAccumulator, InputStats, Solution
from prunelab.oneshot.wanda import prune_wanda
from prunelab.registry import Registry

SOLVERS: Registry[Solver] = Registry("one-shot method")
SOLVERS.add("sparsegpt", Solver(prune_sparsegpt, "hessian"),
            "SparseGPT (Frantar & Alistarh 2023): blocked OBS column sweep, adaptive mask, dampened Cholesky")
SOLVERS.add("wanda", Solver(prune_wanda, "norms"),
            "Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2 per output row, no weight update")
SOLVERS.add("magnitude", Solver(prune_magnitude, "none"), "lowest |W_ij| of each layer, no weight update")
SOLVERS.add("magnitude-row", Solver(prune_magnitude_row, "none"), "lowest |W_ij| of each output row, no weight update")
SOLVERS.add("obs", Solver(prune_obs, "hessian", OBS_MAX_IN_FEATURES),
            f"OBS (Hassibi & Stork 1992): greedy row-wise removal with H^-1 downdates, layers <= {OBS_MAX_IN_FEATURES} inputs")
SOLVERS.add("lobs", Solver(prune_lobs, "hessian"),
            "layer-wise OBS (Dong et al. 2017): OBS saliency per layer, then the exact compensating update")

__all__ = [
    "SOLVERS", "ColumnNormAccumulator", "HessianAccumulator", "InputStats", "LayerRow", "OneShotConfig",
    "OneShotReport", "Solution", "Solver", "find_blocks", "prune_lobs", "prune_magnitude", "prune_magnitude_row",
    "prune_obs", "prune_oneshot", "prune_sparsegpt", "prune_wanda", "woodbury_inverse",
]
