"""One way for benchmarks to draw a PNG: a headless matplotlib axes, written atomically."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunelab.io import atomic_path


@contextlib.contextmanager
def plot_axes(path: str | Path, figsize: tuple[float, float] = (6, 4)) -> Iterator[Any]:
    """Yield a matplotlib ``Axes``; on leaving, lay out the figure and save it to ``path`` (PNG, 120 dpi).

    Uses the non-interactive ``Agg`` backend; the file appears whole or not at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
