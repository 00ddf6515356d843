"""Benchmark records: one JSON convention for every script in ``benchmarks/``.

    {"benchmark": ..., "config": {...}, "seeds": [...], "environment": {...},
     "rows": [{flat numbers, units in the key}], "targets": [{"name", "value", "target", "met"}]}

The README's benchmark tables are rendered from these records (``scripts/update_readme.py``),
never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.io import write_text
from prunelab.measure.tables import markdown_table

RESULTS_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def benchmark_environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def target(name: str, value: float, target_text: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target_text, "met": bool(met)}


def benchmark_args(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark accepts: ``--out DIR`` and ``--quick``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="folder for the JSON record (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="a much shorter run to check the script works")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PRUNELAB_DATA or ../shared/data)")
    return parser


def _json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/inf become ``null`` (``json`` would write the invalid
    ``NaN``/``Infinity``), numpy scalars and one-element torch tensors (any shape) become Python
    numbers, tuples lists, other torch tensors and numpy arrays (any size) (nested) lists.
    Mapping keys become strings; two keys with the same string (``1`` and ``"1"``) are an error."""
    if isinstance(value, Mapping):
        safe: dict[str, Any] = {}
        for k, v in value.items():
            if str(k) in safe:
                raise PrunelabError(f"benchmark record has two keys that are both {str(k)!r} as JSON (one is "
                                    f"{k!r}); rename one of them")
            safe[str(k)] = _json_safe(v)
        return safe
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return _json_safe(value.item() if value.dim() == 0 or value.numel() == 1 else value.tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype") and hasattr(value, "ndim"):  # numpy scalar or array
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _record_path(name: str, out: str | os.PathLike | None) -> Path:
    return (Path(out) if out else RESULTS_DIR) / f"{name}.json"


def _record_text(name: str, record: Mapping[str, Any]) -> str:
    """The record file's text; raises before anything is written if it is not strict JSON."""
    data = _json_safe({"benchmark": name, **record})
    try:
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise PrunelabError(f"benchmark record {name!r} is not JSON data ({exc}); store plain numbers, "
                            "strings, lists and dicts in it") from None


def write_record(name: str, record: Mapping[str, Any], out: str | os.PathLike | None) -> Path:
    """Write ``{"benchmark": name, **record}`` atomically to ``<out or RESULTS_DIR>/<name>.json``.

    Non-finite numbers (a diverged run) are stored as ``null``, so the file is valid JSON.
    """
    path = _record_path(name, out)
    write_text(path, _record_text(name, record))
    return path


def publish(name: str, record: Mapping[str, Any], out: str | os.PathLike | None,
            plot: Callable[[Path], None] | None = None) -> Path:
    """Write the record (as :func:`write_record` does), then print its rows (reference rows
    after them) and targets as markdown tables and the record's path; returns the path.
    ``plot``, if given, draws the PNG beside the record (``plot(path.with_suffix(".png"))``),
    whose path is printed too.

    The record is checked (strict JSON) before the plot is drawn, and written only after
    the plot succeeded, so a failing plot never leaves a new record beside an old PNG.
    Without ``columns`` the table has every key of every row, in order of first appearance.
    """
    path = _record_path(name, out)
    text = _record_text(name, record)
    tables = _publish_tables(name, record)  # a record the tables cannot show fails before anything is written
    if plot is not None:
        plot(path.with_suffix(".png"))
    write_text(path, text)
    print()
    print(tables[0])
    print()
    print(tables[1])
    print(f"\nrecord: {path}")
    if plot is not None:
        print(f"plot: {path.with_suffix('.png')}")
    return path


def _publish_tables(name: str, record: Mapping[str, Any]) -> tuple[str, str]:
    """The rows table and the targets table :func:`publish` prints; one-line errors for a record without them."""
    for key in ("rows", "targets"):
        entries = record.get(key)
        if not isinstance(entries, (list, tuple)) or not all(isinstance(e, Mapping) for e in entries):
            raise PrunelabError(f"benchmark record {name!r} needs {key!r}: a list of dicts, got {entries!r}; "
                                f"add {key}=[{{...}}, ...] to the record")
    for entry in record["targets"]:
        missing = [k for k in ("name", "value", "target", "met") if k not in entry]
        if missing:
            raise PrunelabError(f"benchmark record {name!r} has a target without {', '.join(missing)}: {entry!r}; "
                                "make each target with records.target(name, value, target_text, met)")
    rows = [*record["rows"], *record.get("reference_rows", [])]
    columns = [tuple(c) for c in record.get("columns", [])] or None
    return rows_table(rows, columns), targets_table(record["targets"])


def rows_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] | None) -> str:
    """Markdown table of ``rows``; ``columns`` ``(key, title)`` pairs, ``None`` for every key."""
    return markdown_table(rows, columns)


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    rows = [{**t, "met": "yes" if t["met"] else "NO"} for t in targets]
    return markdown_table(rows, (("name", "target"), ("target", "wanted"), ("value", "measured"), ("met", "met")))


def resolve_data_dir(data_dir: str | None) -> str | None:
    """``--data-dir``, else ``$PRUNELAB_DATA``, else ``../shared/data`` beside the checkout."""
    if data_dir:
        return data_dir
    if os.environ.get("PRUNELAB_DATA"):
        return os.environ["PRUNELAB_DATA"]
    shared = Path(__file__).resolve().parents[4] / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def run_guarded(main, argv=None) -> int:
    """Run a benchmark's ``main``; a PrunelabError becomes one line on stderr and exit 2."""
    import sys

    try:
        return main(argv)
    except PrunelabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
