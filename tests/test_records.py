"""bench.records.publish: the record on disk, its tables printed, an optional plot beside it."""

import json

from prunelab.bench.records import publish


def _record() -> dict:
    return {"rows": [{"method": "a", "error_pct": 1.5}], "reference_rows": [{"method": "paper", "error_pct": 1.2}],
            "columns": [["method", "method"], ["error_pct", "error %"]],
            "targets": [{"name": "error", "value": 1.5, "target": "<= 1.6", "met": True}]}


def test_publish_writes_the_record_and_prints_rows_reference_rows_and_targets(tmp_path, capsys):
    path = publish("demo", _record(), tmp_path)
    assert path == tmp_path / "demo.json"
    assert json.loads(path.read_text())["benchmark"] == "demo"
    out = capsys.readouterr().out
    assert out.index("| a ") < out.index("| paper ")  # reference rows after the measured ones
    assert "| error %" in out and "| yes |" in out and f"record: {path}" in out
    assert "plot:" not in out and not (tmp_path / "demo.png").exists()


def test_publish_draws_the_plot_beside_the_record(tmp_path, capsys):
    drawn = []
    path = publish("demo", _record(), tmp_path, plot=lambda png: (drawn.append(png), png.write_bytes(b"png")))
    assert drawn == [path.with_suffix(".png")] and drawn[0].read_bytes() == b"png"
    assert f"plot: {drawn[0]}" in capsys.readouterr().out


def test_write_record_stores_non_finite_numbers_as_null_so_the_file_is_strict_json(tmp_path):
    import numpy as np
    import torch

    from prunelab.bench.records import target, write_record

    record = {"config": {"shape": (1, 2)}, "rows": [{"error_pct": float("nan"), "speedup_x": float("inf"),
                                                    "size_kb": np.float32(1.5), "n": torch.tensor(3)}],
              "targets": [target("error", float("-inf"), "<= 1.6", False)]}
    path = write_record("diverged", record, tmp_path)

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded["rows"] == [{"error_pct": None, "speedup_x": None, "size_kb": 1.5, "n": 3}]
    assert loaded["targets"][0]["value"] is None and loaded["config"] == {"shape": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["diverged.json"]  # no temporary file left


def test_plot_axes_leaves_matplotlib_global_backend_alone(tmp_path):
    import pytest

    matplotlib = pytest.importorskip("matplotlib")
    from prunelab.bench.plots import plot_axes

    old = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        with plot_axes(tmp_path / "sub" / "p.png") as ax:
            ax.plot([0, 1], [1, 0])
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(old)
    assert (tmp_path / "sub" / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
