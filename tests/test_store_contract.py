"""The store explains itself: its layout, units and attributes, against store.py's docstring."""

import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import crystalmapping.store as store
from crystalmapping.config import ProcessConfig
from crystalmapping.finish import save_tables, store_attrs
from crystalmapping.grid import Grid
from crystalmapping.locate import PEAK_COLUMNS, POINT_COLUMNS
from crystalmapping.maps import reduce_scan
from crystalmapping.store import CONVENTIONS, SCHEMA_VERSION, open_maps, peak_table, write_maps

CONFIG = ProcessConfig(locate={"diameter": 9, "separation": 20},
                       link={"search_range": 5, "linker": "trackpy"})
#: Root attributes only a live stream writes.
STREAM_ONLY = {"exit_status", "failed_points", "failure_reasons"}


def _tables():
    rows = [dict(y=10.0 + f, x=10.0, frame=f, mass=1.0 + f) for f in range(3)]
    rows.append(dict(y=80.0, x=90.0, frame=3, mass=7.0))
    peaks = pd.DataFrame(rows)
    for column in PEAK_COLUMNS:
        if column not in peaks:
            peaks[column] = 0.5
    peaks = peaks[PEAK_COLUMNS]
    points = pd.DataFrame([(f, 1, 9.0, 99.0, 0.25, 1, 0, 2, 0) for f in range(4)],
                          columns=POINT_COLUMNS)
    return peaks, points


def _maps(units=None, attrs=None):
    peaks, points = _tables()
    start = {"shape": [2, 3], "extents": [[0, 1], [0, 2]], "snaking": [False, True],
             "motors": ["sample_y", "sample_x"]}
    if units is not None:
        start["motor_units"] = units
    grid = Grid.from_start(start)
    return reduce_scan(peaks, points, grid, CONFIG,
                       attrs=store_attrs("abc123", CONFIG, None) if attrs is None else attrs)


def _rst_tables(text):
    """Each RST simple table of ``text``: a list of rows (cells of continuation lines joined)."""
    lines = text.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if re.fullmatch(r"=+( +=+)+", lines[i].strip()) and not lines[i].startswith(" "):
            spans = [m.span() for m in re.finditer(r"=+", lines[i])]
            end = next(j for j in range(i + 3, len(lines)) if lines[j] == lines[i])
            rows = []
            for line in lines[i + 3:end]:
                cells = [line[a:b if k < len(spans) - 1 else None].strip()
                         for k, (a, b) in enumerate(spans)]
                if cells[0]:
                    rows.append(cells)
                else:  # a continuation line: more of the last cell
                    rows[-1][-1] += " " + cells[-1]
            head = lines[i + 1]
            header = [head[a:b].strip() for a, b in spans[:-1]] + [head[spans[-1][0]:].strip()]
            tables.append([dict(zip(header, r)) for r in rows])
            i = end + 1
        else:
            i += 1
    return tables


def _documented():
    variables, attributes = _rst_tables(store.__doc__)
    return variables, attributes


def _written(path):
    """path -> (kind, dims, dtype, attrs) of every variable of the store, read as a tree."""
    tree = xr.open_datatree(path, engine="zarr")
    out = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        prefix = node.path.rstrip("/") + "/"
        for name, var in ds.variables.items():
            kind = "coord" if name in ds.coords else "var"
            out[prefix + str(name)] = (kind, " ".join(map(str, var.dims)), str(var.dtype),
                                       dict(var.attrs))
    return tree, out


def test_the_docstring_table_is_the_store(tmp_path):
    variables, _ = _documented()
    assert len(variables) > 40
    path = write_maps(_maps(units=["mm", "um"]), tmp_path / "maps.zarr")
    _, written = _written(path)
    documented = {row["path"]: row for row in variables}
    assert sorted(written) == sorted(documented)
    for name, (kind, dims, dtype, attrs) in written.items():
        row = documented[name]
        assert (kind, dims, dtype) == (row["kind"], row["dims"], row["dtype"]), name
        expected_units = {"/row_position": "mm", "/col_position": "um"}.get(name, row["units"])
        assert attrs.get("units") == expected_units, name
        assert attrs.get("long_name"), f"{name} has no long_name"


def test_the_docstring_attributes_are_the_store(tmp_path):
    _, attributes = _documented()
    by_group = {}
    for row in attributes:
        by_group.setdefault(row["group"], set()).add(row["attribute"])
    batch = write_maps(_maps(), tmp_path / "batch.zarr")
    tree = xr.open_datatree(batch, engine="zarr")
    assert set(tree.attrs) == by_group["/"] - STREAM_ONLY
    assert set(tree["peaks"].attrs) == by_group["/peaks"]
    assert set(tree["points"].attrs) == by_group["/points"]
    streamed = _maps()
    streamed.attrs.update(exit_status="success", failed_points=[], failure_reasons=[])
    tree = xr.open_datatree(write_maps(streamed, tmp_path / "stream.zarr"), engine="zarr")
    assert set(tree.attrs) == by_group["/"]


def test_layout_units_and_provenance(tmp_path):
    path = write_maps(_maps(units={"sample_y": "mm", "sample_x": "mm"}), tmp_path / "maps.zarr")
    tree = xr.open_datatree(path, engine="zarr")
    assert sorted(tree.children) == ["peaks", "points"]
    root = tree.to_dataset(inherit=False)
    assert {"intensity", "y", "x", "n_points", "total_intensity", "noise"} <= set(root.data_vars)
    assert "grain_id" in root.coords and root["grain_id"].dims == ("grain",)
    assert root["intensity"].attrs["units"] == "counts"
    assert root["y"].attrs["units"] == "pixel" and root["n_points"].attrs["units"] == "1"
    assert root["row_position"].attrs == {"units": "mm", "motor": "sample_y",
                                          "long_name": "position of motor sample_y"}
    assert tree["peaks"]["mass"].attrs["units"] == "counts"
    assert tree["peaks"]["grid_row"].values.tolist() == [0, 0, 0, 1]
    assert tree["points"]["frame"].values.tolist() == [0, 1, 2, 3]
    assert tree["points"]["noise"].attrs["units"] == "counts"
    assert tree.attrs["Conventions"] == CONVENTIONS == "CF-1.10"
    assert tree.attrs["source_uid"] == "abc123"
    assert tree.attrs["schema_version"] == SCHEMA_VERSION == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00: crystalmapping \S+ wrote the "
                        r"maps of run abc123 by the batch pipeline \(4 points\)",
                        tree.attrs["history"]), tree.attrs["history"]
    # the root alone, with plain xarray
    flat = xr.open_zarr(path)
    assert flat["intensity"].dims == ("grain", "row", "col") and "peak_y" not in flat


def test_motor_units_missing_say_so(tmp_path):
    maps = open_maps(write_maps(_maps(), tmp_path / "maps.zarr"))
    assert maps["col_position"].attrs["units"] == "unknown"
    assert "not given" in maps["col_position"].attrs["long_name"]
    assert "motor_units" not in maps.attrs["grid"]
    maps = open_maps(write_maps(_maps(units=["mm", "mm"]), tmp_path / "mm.zarr"))
    assert maps.attrs["grid"]["motor_units"] == ["mm", "mm"]
    assert Grid.from_start(maps.attrs["grid"]).units == ("mm", "mm")


def test_open_maps_is_the_flat_dataset(tmp_path):
    maps = _maps()
    out = open_maps(write_maps(maps, tmp_path / "maps.zarr")).load()
    assert out.attrs["source_uid"] == "abc123"
    out.attrs, maps.attrs = {}, {}
    xr.testing.assert_identical(out, maps)
    # a rewrite of what was opened is the same store, its history one line longer
    path = write_maps(open_maps(tmp_path / "maps.zarr"), tmp_path / "again.zarr")
    again = open_maps(path)
    assert len(again.attrs["history"].splitlines()) == 2
    assert again.attrs["created"] == open_maps(tmp_path / "maps.zarr").attrs["created"]
    again.attrs = {}
    xr.testing.assert_identical(again.load(), maps)


def test_peak_table_reads_the_peaks_group(tmp_path):
    path = write_maps(_maps(), tmp_path / "maps.zarr")
    table = peak_table(path)
    assert list(table.columns) == PEAK_COLUMNS + ["particle", "row", "col"]
    assert table["row"].tolist() == [0, 0, 0, 1] and table["col"].tolist() == [0, 1, 2, 2]
    pd.testing.assert_frame_equal(table, peak_table(open_maps(path)))


def _write_v1(maps, path):
    """A store as schema version 1 wrote it: one flat group, grain_id a data variable."""
    old = maps.drop_vars([n for n in maps.data_vars if str(n).startswith("point_")])
    old = old.reset_coords("grain_id")
    for name in old.variables:
        old[name].attrs = {k: v for k, v in old[name].attrs.items() if k != "units"}
    old.attrs = {**{k: v for k, v in old.attrs.items() if k not in ("config", "versions", "grid")},
                 "config": '{"a": 1}', "versions": "{}", "grid": '{"shape": [2, 3]}',
                 "schema_version": 1, "created": "2024-01-01T00:00:00+00:00"}
    old.to_zarr(path, mode="w", zarr_format=2, consolidated=True)
    return path


def test_open_maps_reads_schema_version_1(tmp_path):
    maps = _maps()
    path = _write_v1(maps, tmp_path / "old.zarr")
    old = open_maps(path)
    assert old.attrs["schema_version"] == 1 and old.attrs["grid"] == {"shape": [2, 3]}
    assert "grain_id" in old.coords
    np.testing.assert_array_equal(old["intensity"], maps["intensity"])
    pd.testing.assert_frame_equal(peak_table(old), peak_table(maps))
    pd.testing.assert_frame_equal(peak_table(path), peak_table(maps))
    # rewritten, it is a version-2 store
    new = write_maps(old, tmp_path / "new.zarr")
    tree = xr.open_datatree(new, engine="zarr")
    assert tree.attrs["schema_version"] == 2 and sorted(tree.children) == ["peaks"]
    pd.testing.assert_frame_equal(peak_table(new), peak_table(maps))


def test_the_rescued_tables_are_groups_too(tmp_path):
    peaks, points = _tables()
    path = save_tables(peaks, points, {"source_uid": "abc123"}, tmp_path / "maps.zarr")
    tree = xr.open_datatree(path, engine="zarr")
    assert sorted(tree.children) == ["peaks", "points"]
    assert tree["peaks"]["mass"].values.tolist() == [1.0, 2.0, 3.0, 7.0]
    assert tree["points"]["frame"].attrs["units"] == "1"
    assert "unlinked peak and point tables of run abc123" in tree.attrs["history"]
    with pytest.raises(store.StoreError, match="not a crystalmapping map store"):
        open_maps(path)
