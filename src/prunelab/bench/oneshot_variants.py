"""The one-shot variants the transformer benchmarks compare, as ``(label, method, options)``.

The plain methods come first, as published (magnitude; Wanda, Sun et al. 2024; SparseGPT,
Frantar & Alistarh 2023).  Then each with the engine's ``bias_correction`` (Nagel et al.
2019), and SparseGPT with ``dense_targets`` (each layer reconstructs the dense model's
outputs from the pruned model's inputs, Li et al. 2025, GPTAQ).
"""

from __future__ import annotations

from prunelab.oneshot import OneShotConfig

VARIANTS: tuple[tuple[str, str, tuple[tuple[str, bool], ...]], ...] = (
    ("magnitude", "magnitude", ()),
    ("wanda", "wanda", ()),
    ("sparsegpt", "sparsegpt", ()),
    ("magnitude + bias corr.", "magnitude", (("bias_correction", True),)),
    ("wanda + bias corr.", "wanda", (("bias_correction", True),)),
    ("sparsegpt + bias corr.", "sparsegpt", (("bias_correction", True),)),
    ("sparsegpt + dense targets", "sparsegpt", (("dense_targets", True),)),
)


def variant_configs(sparsity: float, pattern: str | None) -> list[tuple[str, OneShotConfig]]:
    """``(label, config)`` for every variant at one setting."""
    return [(label, OneShotConfig(method=method, sparsity=sparsity, pattern=pattern, **dict(options)))
            for label, method, options in VARIANTS]
