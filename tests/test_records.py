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
