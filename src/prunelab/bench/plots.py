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

    The figure is a bare :class:`matplotlib.figure.Figure` drawn by the Agg canvas, not a
    pyplot figure: matplotlib's global backend and pyplot's figure list are left alone.
    The file appears whole or not at all.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    yield ax
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:  # creates the folder; a path it cannot write is a one-line error
        fig.savefig(tmp, dpi=120, format="png")
