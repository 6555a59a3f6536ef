"""Unit tests of crystalmapping.link and crystalmapping.maps: tracks and the final reduce."""

import warnings

import numpy as np
import pandas as pd
import pytest

from crystalmapping.config import ProcessConfig
from crystalmapping.errors import ConfigError, EmptyImageWarning, NoPeaksWarning
from crystalmapping.grid import Grid
from crystalmapping.link import link_peaks
from crystalmapping.locate import PEAK_COLUMNS, POINT_COLUMNS
from crystalmapping.maps import fill_maps, gather_tables, reduce_scan


def _peaks(rows):
    table = pd.DataFrame(rows)
    for column in PEAK_COLUMNS:
        if column not in table:
            table[column] = 1.0
    return table[PEAK_COLUMNS].astype({"frame": "int64"})


def _two_moving_and_one_far():
    rows = []
    for f in range(4):
        rows.append(dict(y=10.0 + 2 * f, x=10.0 + f, frame=f, mass=1.0 + f))   # track A
        if f >= 1:
            rows.append(dict(y=200.0, x=200.0 - f, frame=f, mass=10.0))      # track B, from 1
    rows.append(dict(y=5.0, x=300.0, frame=2, mass=3.0))                     # far spot, frame 2
    return _peaks(rows)


def test_link_moving_spots_and_far_spot():
    peaks = _two_moving_and_one_far().sample(frac=1.0, random_state=0)  # any input order
    linked = link_peaks(peaks, search_range=5, linker="trackpy")
    assert linked["frame"].is_monotonic_increasing
    assert linked["particle"].dtype == np.int64
    track = {p: g for p, g in linked.groupby("particle")}
    assert sorted(track) == [0, 1, 2]  # renumbered 0..G-1 by first appearance
    assert track[0]["frame"].tolist() == [0, 1, 2, 3] and (track[0]["x"] < 20).all()
    assert track[1]["frame"].tolist() == [1, 2, 3] and (track[1]["y"] == 200).all()
    assert track[2]["frame"].tolist() == [2] and track[2]["x"].tolist() == [300.0]
    assert "particle" not in peaks  # the input is not modified


def test_link_ids_follow_first_appearance():
    linked = link_peaks(_two_moving_and_one_far(), search_range=5, linker="trackpy")
    first = linked.groupby("particle")["frame"].min()
    assert first.tolist() == sorted(first.tolist())
    assert linked["particle"].iloc[0] == 0


def test_link_search_range_separates_tracks():
    linked = link_peaks(_two_moving_and_one_far(), search_range=1.5, linker="trackpy")
    # Track A moves by sqrt(5) > 1.5 per point: every A peak starts a new track.
    track_a = linked[linked["x"] < 20]
    assert track_a["particle"].nunique() == 4


def test_link_memory_bridges_a_gap():
    rows = [dict(y=10.0, x=10.0, frame=f) for f in (0, 1, 3)]
    rows += [dict(y=50.0, x=50.0, frame=f) for f in (0, 1, 2, 3)]
    assert link_peaks(_peaks(rows), search_range=5, linker="trackpy", memory=1)["particle"].nunique() == 2
    assert link_peaks(_peaks(rows), search_range=5, linker="trackpy", memory=0)["particle"].nunique() == 3


def test_link_empty_table():
    empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in PEAK_COLUMNS})
    linked = link_peaks(empty, search_range=5, linker="trackpy")
    assert linked.empty
    assert "particle" in linked and linked["particle"].dtype == np.int64
    assert list(linked.columns) == PEAK_COLUMNS + ["particle"]


def test_link_validates():
    with pytest.raises(ValueError, match=r"missing \['frame'\]"):
        link_peaks(pd.DataFrame({"y": [1.0], "x": [1.0]}), search_range=5, linker="trackpy")
    with pytest.raises(ConfigError, match="search_range"):
        link_peaks(_two_moving_and_one_far(), search_range=0, linker="trackpy")


def test_fill_maps_known_answer():
    row = [0, 1, 1, 0, 1, 1]
    col = [0, 2, 2, 1, 0, 2]
    particle = [5, 5, 5, 2, 2, 9]
    value = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    ids, maps = fill_maps(row, col, particle, value, (2, 3))
    assert ids.tolist() == [2, 5, 9]
    assert ids.dtype == np.int64
    assert maps.dtype == np.float32 and maps.shape == (3, 2, 3)
    np.testing.assert_array_equal(maps[0], [[0, 4, 0], [5, 0, 0]])
    np.testing.assert_array_equal(maps[1], [[1, 0, 0], [0, 0, 5]])  # 2 + 3 at (1, 2)
    np.testing.assert_array_equal(maps[2], [[0, 0, 0], [0, 0, 6]])


def test_fill_maps_empty():
    ids, maps = fill_maps([], [], [], [], (2, 3))
    assert ids.size == 0 and maps.shape == (0, 2, 3)


def test_gather_tables_sorts_chunks_in_any_order():
    a = (_peaks([dict(y=3.0, x=1.0, frame=2), dict(y=1.0, x=1.0, frame=2)]),
         pd.DataFrame([(2, 2, 5.0, 9.0)], columns=POINT_COLUMNS[:4]))
    b = (_peaks([dict(y=1.0, x=1.0, frame=0)]),
         pd.DataFrame([(0, 1, 5.0, 9.0), (1, 0, 0.0, 0.0)], columns=POINT_COLUMNS[:4]))
    peaks, points = gather_tables([a, b])
    assert peaks["frame"].tolist() == [0, 2, 2] and peaks["y"].tolist() == [1.0, 1.0, 3.0]
    assert points["frame"].tolist() == [0, 1, 2]
    peaks, points = gather_tables([])
    assert peaks.empty and list(peaks.columns) == PEAK_COLUMNS
    assert points.empty and list(points.columns) == POINT_COLUMNS


def _scan_tables():
    """An aborted scan of a snaking (2, 3) grid: points 0..4 of 6 measured, point 4 empty.

    Acquisition -> grid: 0 (0,0), 1 (0,1), 2 (0,2), 3 (1,2), 4 (1,1), 5 (1,0) never measured.
    Track A (near y=10, x=10) at points 0, 1, 2 with mass 1, 2, 3; track B (y=100, x=100)
    at point 3 with mass 7.
    """
    peaks = _peaks([
        dict(y=10.0, x=10.0, frame=0, mass=1.0, signal=0.1),
        dict(y=11.0, x=10.0, frame=1, mass=2.0, signal=0.2),
        dict(y=12.0, x=11.0, frame=2, mass=3.0, signal=0.3),
        dict(y=100.0, x=100.0, frame=3, mass=7.0, signal=0.7),
    ])
    points = pd.DataFrame(
        [(0, 1, 5.0, 50.0), (1, 1, 6.0, 60.0), (2, 1, 7.0, 70.0), (3, 1, 8.0, 80.0),
         (4, 0, 0.0, 0.0)],
        columns=POINT_COLUMNS[:4])
    grid = Grid(shape=(2, 3), extents=((0.0, 1.0), (-2.0, 2.0)), snaking=(False, True),
                motors=("sample_y", "sample_x"))
    return peaks, points, grid


def test_reduce_scan_on_snaking_grid():
    peaks, points, grid = _scan_tables()
    config = ProcessConfig(link={"search_range": 5, "linker": "trackpy"}, intensity_column="mass")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = reduce_scan(peaks, points, grid, config, attrs={"source_uid": "abc"})
    assert ds["grain"].values.tolist() == [0, 1]
    assert ds["intensity"].dims == ("grain", "row", "col")
    assert ds["intensity"].dtype == np.float32
    np.testing.assert_array_equal(ds["intensity"][0], [[1, 2, 3], [0, 0, 0]])
    np.testing.assert_array_equal(ds["intensity"][1], [[0, 0, 0], [0, 0, 7]])
    np.testing.assert_array_equal(ds["measured"], [[True, True, True], [False, True, True]])
    np.testing.assert_array_equal(ds["total_intensity"], [[50, 60, 70], [0, 0, 80]])
    np.testing.assert_array_equal(ds["n_peaks"], [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_allclose(ds["y"], [11.0, 100.0])
    np.testing.assert_allclose(ds["x"], [31.0 / 3.0, 100.0])
    assert ds["n_points"].values.tolist() == [3, 1]
    np.testing.assert_allclose(ds["row_position"], [0.0, 1.0])
    np.testing.assert_allclose(ds["col_position"], [-2.0, 0.0, 2.0])
    assert ds["row_position"].attrs["motor"] == "sample_y"
    assert ds["col_position"].attrs["motor"] == "sample_x"
    assert ds.attrs["n_points_measured"] == 5
    assert ds.attrs["n_empty_images"] == 1
    assert ds.attrs["n_peaks_found"] == 4
    assert ds.attrs["source_uid"] == "abc"
    assert ds.attrs["grid"] == grid.to_dict()
    # the linked peak table travels along the peak dimension
    assert ds["peak_frame"].values.tolist() == [0, 1, 2, 3]
    assert ds["peak_particle"].values.tolist() == [0, 0, 0, 1]
    assert ds["peak_row"].values.tolist() == [0, 0, 0, 1]
    assert ds["peak_col"].values.tolist() == [0, 1, 2, 2]


def test_reduce_scan_intensity_column():
    peaks, points, grid = _scan_tables()
    # track B seen again at point 4 = grid (1, 1)
    extra = _peaks([dict(y=101.0, x=100.0, frame=4, mass=4.0, signal=0.4)])
    peaks = pd.concat([peaks, extra], ignore_index=True)
    config = ProcessConfig(link={"search_range": 5, "linker": "trackpy"}, intensity_column="signal")
    ds = reduce_scan(peaks, points, grid, config)
    np.testing.assert_allclose(ds["intensity"][0], [[0.1, 0.2, 0.3], [0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(ds["intensity"][1], [[0, 0, 0], [0, 0.4, 0.7]], rtol=1e-6)
    assert ds["intensity"].attrs["long_name"] == "peak signal"


def test_reduce_scan_all_empty_images_warns():
    grid = Grid(shape=(2, 2))
    peaks = pd.DataFrame({c: pd.Series(dtype="float64") for c in PEAK_COLUMNS})
    points = pd.DataFrame([(i, 0, 0.0, 0.0) for i in range(4)], columns=POINT_COLUMNS[:4])
    with pytest.warns(EmptyImageWarning), pytest.warns(NoPeaksWarning):
        ds = reduce_scan(peaks, points, grid, ProcessConfig())
    assert ds["intensity"].shape == (0, 2, 2)
    assert ds.sizes["peak"] == 0
    assert ds["measured"].values.all()
    assert ds.attrs["n_empty_images"] == 4 and ds.attrs["n_peaks_found"] == 0


def test_reduce_scan_no_points():
    grid = Grid(shape=(2, 2))
    peaks, points = gather_tables([])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = reduce_scan(peaks, points, grid, ProcessConfig())
    assert not ds["measured"].values.any()
    assert ds.attrs["n_points_measured"] == 0
