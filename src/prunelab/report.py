"""Human-readable results: the markdown report and the accuracy-vs-sparsity plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from prunelab.io import atomic_path
from prunelab.measure.tables import markdown_table


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Dense vs pruned: error, nonzeros, FLOPs, bytes -- one row each."""
    rows = []
    for label, key in ((result.get("dense_label", "dense"), "dense"), ("pruned", "pruned")):
        part = result[key]
        cost = part["cost"]
        rows.append({
            "model": label,
            "error_pct": part["error_pct"],
            "sparsity_pct": 100.0 * cost["sparsity"],
            "nonzeros": cost["nonzeros"],
            "flops": cost["sparse_flops"],
            "dense_kb": cost["size_dense_bytes"] / 1000.0,
            "sparse_kb": cost["size_best_sparse_bytes"] / 1000.0,
        })
    return rows


SUMMARY_COLUMNS = (
    ("model", "model"), ("error_pct", "test error %"), ("sparsity_pct", "sparsity %"), ("nonzeros", "nonzero params"),
    ("flops", "FLOPs / sample"), ("dense_kb", "fp32 dense KB"), ("sparse_kb", "sparse KB (best of CSR/bitmap)"),
)

STAGE_COLUMNS = (
    ("stage", "stage"), ("target_sparsity", "target sparsity"), ("sparsity", "achieved sparsity"),
    ("error_pct", "test error %"), ("accuracy", "accuracy"),
)


def render_report(result: Mapping[str, Any], layer_table: str) -> str:
    config = result["config"]
    lines = [
        f"# prunelab run: {config['model']} on {config['dataset']}",
        "",
        f"Method `{config['method']}`, criterion `{result.get('criterion', config['criterion'])}`, granularity `{config['granularity']}`, "
        f"allocation `{config['allocation']}`, target sparsity {config['sparsity']:.4f}, seed {config['seed']}. "
        f"Wall time {result['wall_time_s']:.1f} s on {_threads(result['environment']['threads'])}.",
        "",
        "## Dense vs pruned",
        "",
        markdown_table(summary_rows(result), SUMMARY_COLUMNS),
        "",
        "## Pruning stages",
        "",
        markdown_table(result["stages"], STAGE_COLUMNS),
        "",
        "## Layers of the pruned model",
        "",
        layer_table,
        "",
        "FLOPs count 2 per multiply-accumulate of Linear/Conv layers, with a conv's output size; "
        "sparse FLOPs skip pruned weights. Sparse KB: fp32 values + int32 CSR indices, or fp32 values + a 1-bit bitmap, "
        "whichever is smaller per layer.",
        "",
    ]
    return "\n".join(lines)


def plot_sparsity_curve(points: Sequence[tuple[float, float]], path: str | os.PathLike, title: str, dense_accuracy: float,
                        dense_label: str = "dense") -> None:
    """Accuracy vs sparsity, one marker per pruning stage, dense accuracy as a line labelled ``dense_label``
    (``"dense at init (untrained)"`` for methods that never train the dense model).

    Draws on its own Agg canvas (no pyplot): the caller's matplotlib backend and open
    figures are left as they were.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [100.0 * s for s, _ in points]
    ys = [100.0 * a for _, a in points]
    ax.plot(xs, ys, marker="o", label="pruned")
    ax.axhline(100.0 * dense_accuracy, color="gray", linestyle="--", label=dense_label)
    ax.set_xlabel("sparsity (% of weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _threads(count: int) -> str:
    """``"1 thread"`` / ``"2 threads"``."""
    return f"{count} thread{'' if count == 1 else 's'}"

