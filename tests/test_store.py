"""Unit tests of crystalmapping.store: the Zarr contract, atomic writes, provenance."""

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from crystalmapping.config import ProcessConfig
from crystalmapping.errors import StoreError
from crystalmapping.grid import Grid
from crystalmapping.locate import PEAK_COLUMNS, POINT_COLUMNS
from crystalmapping.maps import reduce_scan
from crystalmapping.store import SCHEMA_VERSION, open_maps, peak_table, write_maps

CONFIG = ProcessConfig(locate={"diameter": 9, "separation": 20}, link={"search_range": 5, "linker": "trackpy"})


def _maps(scale=1.0):
    rows = [dict(y=10.0 + f, x=10.0, frame=f, mass=scale * (f + 1)) for f in range(3)]
    rows.append(dict(y=80.0, x=90.0, frame=3, mass=scale * 7))
    peaks = pd.DataFrame(rows)
    for column in PEAK_COLUMNS:
        if column not in peaks:
            peaks[column] = 0.5
    peaks = peaks[PEAK_COLUMNS]
    points = pd.DataFrame([(f, 1, 9.0, 99.0) for f in range(4)], columns=POINT_COLUMNS[:4])
    grid = Grid(shape=(2, 3), extents=((0, 1), (0, 2)), snaking=(False, True))
    return reduce_scan(peaks, points, grid, CONFIG,
                       attrs={"source_uid": "abc123", "config": CONFIG.to_dict(),
                              "versions": {"crystalmapping": "0.1.0"}})


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
    maps = _maps()
    path = tmp_path / "maps.zarr"
    assert write_maps(maps, path) == path
    out = open_maps(path)
    np.testing.assert_array_equal(out["intensity"].values, maps["intensity"].values)
    assert out["intensity"].dtype == np.float32
    for name in ("y", "x", "n_points", "total_intensity", "n_peaks", "measured",
                 "row_position", "col_position"):
        np.testing.assert_array_equal(out[name].values, maps[name].values)
        assert out[name].dtype == maps[name].dtype, name
    assert out.attrs["config"] == CONFIG.to_dict()
    assert ProcessConfig.from_dict(out.attrs["config"]) == CONFIG
    assert out.attrs["grid"] == maps.attrs["grid"]
    assert out.attrs["versions"] == {"crystalmapping": "0.1.0"}
    assert out.attrs["schema_version"] == SCHEMA_VERSION == 2
    assert out.attrs["source_uid"] == "abc123"
    assert out.attrs["n_points_measured"] == 4 and out.attrs["n_peaks_found"] == 4
    assert "created" in out.attrs
    assert _leftovers(tmp_path) == []
    # writing does not touch the caller's dataset
    assert isinstance(maps.attrs["config"], dict) and "schema_version" not in maps.attrs


def test_plain_open_zarr(tmp_path):
    maps = _maps()
    path = write_maps(maps, tmp_path / "maps.zarr")
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds["intensity"].values, maps["intensity"].values)
    assert ds["intensity"].dims == ("grain", "row", "col")
    assert json.loads(ds.attrs["config"]) == CONFIG.to_dict()
    assert ds.attrs["schema_version"] == 2


def test_existing_path_without_overwrite_raises_and_keeps_store(tmp_path):
    path = write_maps(_maps(), tmp_path / "maps.zarr")
    with pytest.raises(StoreError, match="overwrite=True") as info:
        write_maps(_maps(scale=2.0), path)
    assert isinstance(info.value, OSError)
    assert "maps.zarr" in str(info.value)
    np.testing.assert_array_equal(open_maps(path)["intensity"].values, _maps()["intensity"].values)
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces(tmp_path):
    path = write_maps(_maps(), tmp_path / "maps.zarr")
    write_maps(_maps(scale=2.0), path, overwrite=True)
    np.testing.assert_array_equal(open_maps(path)["intensity"].values,
                                  _maps(scale=2.0)["intensity"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.zarr"]


def _failing_chunk(block, block_info=None):
    if block_info[0]["chunk-location"][0] == 1:
        raise RuntimeError("detector went away")
    return block


def _bad_datasets():
    maps = _maps()
    # 1. fails midway: the store's metadata is written, then computing a chunk raises
    lazy = da.from_array(maps["intensity"].values, chunks=(1, 2, 3))
    midway = maps.assign(intensity=(maps["intensity"].dims,
                                    lazy.map_blocks(_failing_chunk, dtype=lazy.dtype)))
    # 2. a variable of arbitrary Python objects cannot be encoded
    objects = maps.assign(bad=("grain", np.array([object(), object()], dtype=object)))
    # 3. an attribute zarr cannot hold; 4. a JSON attribute that is not JSON-serialisable
    attr = maps.copy()
    attr.attrs["extra"] = object()
    json_attr = maps.copy()
    json_attr.attrs["config"] = {"background": np.zeros(2)}
    return {"midway": (midway, RuntimeError), "objects": (objects, ValueError),
            "attr": (attr, TypeError), "json_attr": (json_attr, TypeError)}


@pytest.mark.parametrize("case", ["midway", "objects", "attr", "json_attr"])
def test_failed_write_leaves_nothing(tmp_path, case):
    bad, error = _bad_datasets()[case]
    path = tmp_path / "maps.zarr"
    with pytest.raises(error):
        write_maps(bad, path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["midway", "objects"])
def test_failed_overwrite_keeps_old_store(tmp_path, case):
    bad, error = _bad_datasets()[case]
    path = write_maps(_maps(), tmp_path / "maps.zarr")
    with pytest.raises(error):
        write_maps(bad, path, overwrite=True)
    np.testing.assert_array_equal(open_maps(path)["intensity"].values, _maps()["intensity"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.zarr"]


def test_open_maps_missing(tmp_path):
    with pytest.raises(StoreError, match="no map store"):
        open_maps(tmp_path / "nothing.zarr")


def test_open_maps_not_zarr(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not a readable Zarr store"):
        open_maps(junk)
    with pytest.raises(StoreError):
        open_maps(junk / "notes.txt")


def test_open_maps_foreign_zarr(tmp_path):
    path = tmp_path / "other.zarr"
    xr.Dataset({"a": ("x", [1, 2])}).to_zarr(path, zarr_format=2, consolidated=True)
    with pytest.raises(StoreError, match="not a crystalmapping map store"):
        open_maps(path)


def test_open_maps_newer_schema(tmp_path):
    path = write_maps(_maps(), tmp_path / "maps.zarr")
    root = zarr.open_group(path, mode="r+", zarr_format=2)
    root.attrs["schema_version"] = SCHEMA_VERSION + 1
    zarr.consolidate_metadata(path, zarr_format=2)
    with pytest.raises(StoreError, match="upgrade crystalmapping"):
        open_maps(path)


PEAK_TABLE_COLUMNS = PEAK_COLUMNS + ["particle", "row", "col"]


def test_peak_table_has_trackpy_columns(tmp_path):
    maps = _maps()
    assert list(peak_table(maps).columns) == PEAK_TABLE_COLUMNS
    table = peak_table(open_maps(write_maps(maps, tmp_path / "maps.zarr")))
    assert sorted(table.columns) == sorted(PEAK_TABLE_COLUMNS)
    assert table["frame"].tolist() == [0, 1, 2, 3]
    assert table["particle"].tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(table["mass"], [1.0, 2.0, 3.0, 7.0])
    pd.testing.assert_frame_equal(table[PEAK_TABLE_COLUMNS], peak_table(maps))


def test_peak_table_column_order_survives_the_store(tmp_path):
    table = peak_table(open_maps(write_maps(_maps(), tmp_path / "maps.zarr")))
    assert list(table.columns) == PEAK_TABLE_COLUMNS


def test_a_failed_replace_keeps_the_previous_store(tmp_path):
    import dask.array as da

    path = write_maps(_maps(), tmp_path / "maps.zarr")
    before = open_maps(path)["intensity"].values.copy()

    def boom(block):
        raise RuntimeError("disk full")

    broken = _maps()
    lazy = da.from_array(broken["intensity"].values, chunks=1).map_blocks(boom, dtype="float32")
    broken["intensity"] = (broken["intensity"].dims, lazy)
    with pytest.raises(RuntimeError, match="disk full"):
        write_maps(broken, path, overwrite=True)
    np.testing.assert_array_equal(open_maps(path)["intensity"].values, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.zarr"]
