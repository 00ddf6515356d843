"""bench.records.publish: the record on disk, its tables printed, an optional plot beside it."""

import json

import pytest

from prunelab.bench.records import publish, write_record
from prunelab.errors import PrunelabError


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


# --- review fixes: a record publish cannot show is refused before anything is written -------
@pytest.mark.parametrize(("record", "message"), [
    ({"rows": [{"method": "a"}]}, "needs 'targets': a list of dicts, got None"),
    ({"targets": []}, "needs 'rows': a list of dicts, got None"),
    ({"rows": [{"a": 1}], "targets": [{"name": "error", "value": 1.0}]}, "has a target without target, met"),
    ({"rows": [], "targets": []}, "markdown_table got no rows and no columns"),
])
def test_publish_of_a_record_it_cannot_print_is_one_line_error_and_writes_nothing(tmp_path, capsys, record, message):
    drawn = []
    with pytest.raises(PrunelabError, match=message) as exc:
        publish("demo", record, tmp_path, plot=drawn.append)
    assert "\n" not in str(exc.value)
    assert drawn == [] and list(tmp_path.iterdir()) == []  # before: the record was written, then KeyError


def test_publish_with_no_targets_prints_an_empty_targets_table(tmp_path, capsys):
    path = publish("demo", {"rows": [{"a": 1}], "targets": []}, tmp_path)
    assert json.loads(path.read_text()) == {"benchmark": "demo", "rows": [{"a": 1}], "targets": []}
    assert "| target | wanted | measured | met |" in capsys.readouterr().out


def test_keys_that_collide_as_json_strings_are_an_error_not_a_silently_dropped_value(tmp_path):
    with pytest.raises(PrunelabError, match="two keys that are both '1' as JSON") as exc:
        write_record("demo", {"rows": [{1: "a", "1": "b"}], "targets": []}, tmp_path)
    assert "\n" not in str(exc.value) and list(tmp_path.iterdir()) == []
    path = write_record("demo", {"rows": [{1: "a", 2: "b"}], "targets": []}, tmp_path)  # distinct keys still work
    assert json.loads(path.read_text())["rows"] == [{"1": "a", "2": "b"}]


def test_plot_axes_into_a_folder_it_cannot_create_is_a_one_line_error(tmp_path):
    pytest.importorskip("matplotlib")
    from prunelab.bench.plots import plot_axes

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PrunelabError, match="cannot create output directory") as exc:  # was NotADirectoryError
        with plot_axes(blocker / "sub" / "x.png") as ax:
            ax.plot([0, 1], [0, 1])
    assert "\n" not in str(exc.value)
    with plot_axes(tmp_path / "new" / "deeper" / "x.png") as ax:  # missing folders are still created
        ax.plot([0, 1], [0, 1])
    assert (tmp_path / "new" / "deeper" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
