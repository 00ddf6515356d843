"""GitHub-flavoured markdown tables for records and reports, and the number formats they use.

``markdown_table`` renders rows of flat values; numeric columns are right-aligned
(``---:``), text columns left-aligned, and cells are padded so the table also reads well
in a terminal.  ``model_cost_table`` renders a :class:`~prunelab.measure.counting.ModelCost`
per layer with a total row.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

from prunelab.errors import PrunelabError
from prunelab.measure.costs import ModelCost

__all__ = ["format_bytes", "format_float", "markdown_table", "model_cost_table"]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_float(value: float, floatfmt: str | None = None) -> str:
    """One float as text.  ``floatfmt`` is a ``format()`` spec (e.g. ``".3f"``); ``None`` picks one by size.

    By size: ``|x| >= 1000`` -> no decimals with thousands separators (``"266,200"``);
    ``|x| >= 1`` -> two decimals (``"1.58"``, ``"92.00"``); smaller -> 4 significant digits
    (``"0.9214"``); zero -> ``"0"``; nan/inf as ``"nan"``/``"inf"``.  The size is that of the
    value as printed: ``999.996`` rounds to 1000 and prints ``"1,000"`` (not ``"1000.00"``),
    ``0.99996`` prints ``"1.00"`` (not ``"1"``).
    """
    if floatfmt is not None:
        return format(value, floatfmt)
    x = float(value)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(float(f"{x:.2f}")) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 1 or abs(float(f"{x:.4g}")) >= 1:
        return f"{x:.2f}"
    return f"{x:.4g}"


def format_bytes(n: float) -> str:
    """Human-readable size in decimal (SI) units, powers of 1000: ``1024 -> "1.02 KB"``, ``999 -> "999 B"``.

    "KB" here means 1000 bytes, matching the ``size_kb = bytes / 1000`` columns of the reports.
    A size that rounds up to 1000 of a unit prints in the next one (``999.96 -> "1.00 KB"``,
    ``999_996 -> "1.00 MB"``).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n) or n < 0:
        raise PrunelabError(f"format_bytes needs a byte count >= 0, got {n!r}; pass e.g. cost.dense_bytes")
    if n < 1000:
        text = f"{int(n)}" if float(n).is_integer() else f"{n:.1f}"
        if float(text) < 1000:
            return f"{text} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        if float(f"{value:.2f}") < 1000 or unit == "PB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def _cell(value: object, floatfmt: str | None, thousands: bool) -> str:
    if value is None:
        return ""
    if _is_number(value):
        if isinstance(value, numbers.Integral):
            return f"{int(value):,}" if thousands else str(int(value))
        return format_float(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[tuple[str, str]] | None = None,
    floatfmt: str | None = None,
    thousands: bool = True,
) -> str:
    """Render ``rows`` as a GitHub markdown table (no trailing newline).

    ``columns`` is a sequence of ``(key, title)`` pairs; ``None`` uses every key in order of
    first appearance, titled by the key.  A key missing from a row (or ``None``) gives an
    empty cell.  A column whose present values are all numbers (bools excluded) is
    right-aligned.  Integers get thousands separators unless ``thousands=False``; floats
    follow ``floatfmt`` (a ``format()`` spec) or, when it is ``None``, :func:`format_float`.
    """
    if columns is None:
        keys: dict[str, None] = {}
        for row in rows:
            keys.update(dict.fromkeys(row))
        if not keys:
            raise PrunelabError(
                "markdown_table got no rows and no columns; pass rows or columns=[(key, title), ...]"
            )
        columns = [(key, key) for key in keys]
    columns = list(columns)
    if not columns:
        raise PrunelabError("markdown_table got an empty columns list; pass columns=[(key, title), ...]")
    for column in columns:
        if not (isinstance(column, (tuple, list)) and len(column) == 2):
            raise PrunelabError(
                f"markdown_table columns must be (key, title) pairs, got {column!r}; e.g. [('error_pct', 'error %')]"
            )

    numeric = []
    for key, _ in columns:
        present = [row.get(key) for row in rows if row.get(key) is not None]
        numeric.append(bool(present) and all(_is_number(v) for v in present))

    header = [_cell(title, floatfmt, thousands) for _, title in columns]
    body = [[_cell(row.get(key), floatfmt, thousands) for key, _ in columns] for row in rows]
    widths = [max(3, len(header[i]), *(len(r[i]) for r in body)) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


COST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer"), ("shape", "weight shape"), ("params", "params"), ("nonzeros", "nonzeros"),
    ("sparsity_pct", "weight sparsity %"), ("dense_mflops", "dense MFLOPs"), ("sparse_mflops", "sparse MFLOPs"),
    ("dense_kb", "dense KB"), ("csr_kb", "CSR KB"), ("bitmap_kb", "bitmap KB"),
)


def model_cost_table(cost: ModelCost) -> str:
    """Per-layer markdown table of a :class:`ModelCost` (per sample; KB = 1000 bytes, fp32).

    One row per Linear/Conv layer (``(not run)`` after the name when the forward never
    reached it; ``(tied: stored with an earlier layer)`` when its weight is another layer's,
    whose params and KB the total counts once), a row for the other parameters (stored
    dense) when there are any, one row per module that computed attention products
    (``"<module> (attention products: Q K^T, A V)"``: FLOPs only, the same dense and sparse,
    since no weight mask removes them), and a total row -- ``"total (with attention products)"``
    when there are attention rows, whose FLOPs it then includes (``dense_flops_with_attention``).
    FLOPs count 2 per multiply-accumulate; nonzeros include the dense biases.
    """
    if not isinstance(cost, ModelCost):
        raise PrunelabError(
            f"model_cost_table needs a ModelCost, got {type(cost).__name__}; pass measure_model(model, example)"
        )
    rows: list[dict[str, object]] = []
    for layer in cost.layers:
        notes = ([] if layer.reached else ["not run"]) + (["tied: stored with an earlier layer"]
                                                          if layer.shares_storage else [])
        rows.append({
            "layer": f"{layer.name} ({', '.join(notes)})" if notes else layer.name,
            "shape": "x".join(map(str, layer.weight_shape)),
            "params": layer.params, "nonzeros": layer.nonzeros, "sparsity_pct": 100.0 * layer.sparsity,
            "dense_mflops": layer.dense_flops / 1e6, "sparse_mflops": layer.sparse_flops / 1e6,
            "dense_kb": layer.dense_bytes / 1000.0, "csr_kb": layer.csr_bytes / 1000.0,
            "bitmap_kb": layer.bitmap_bytes / 1000.0,
        })
    if cost.other_params:
        kb = cost.other_bytes / 1000.0
        rows.append({"layer": "other params (dense)", "params": cost.other_params, "nonzeros": cost.other_params,
                     "dense_kb": kb, "csr_kb": kb, "bitmap_kb": kb})
    for attention in cost.attention:
        mflops = attention.flops / 1e6
        rows.append({"layer": f"{attention.name or '(model)'} (attention products: Q K^T, A V)",
                     "dense_mflops": mflops, "sparse_mflops": mflops})
    rows.append({
        "layer": "total (with attention products)" if cost.attention else "total", "shape": "",
        "params": cost.params, "nonzeros": cost.nonzeros, "sparsity_pct": 100.0 * cost.sparsity,
        "dense_mflops": cost.dense_flops_with_attention / 1e6, "sparse_mflops": cost.sparse_flops_with_attention / 1e6,
        "dense_kb": cost.dense_bytes / 1000.0, "csr_kb": cost.csr_bytes / 1000.0,
        "bitmap_kb": cost.bitmap_bytes / 1000.0,
    })
    return markdown_table(rows, COST_COLUMNS)
