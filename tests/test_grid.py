"""Unit tests of crystalmapping.grid: acquisition order <-> scan grid."""

import numpy as np
import pytest

from crystalmapping.errors import ScanError
from crystalmapping.grid import Grid


def test_indices_raster():
    grid = Grid(shape=(2, 3))
    row, col = grid.indices(np.arange(6))
    assert row.tolist() == [0, 0, 0, 1, 1, 1]
    assert col.tolist() == [0, 1, 2, 0, 1, 2]


def test_indices_snaking_reverses_odd_rows():
    grid = Grid(shape=(3, 4), snaking=(False, True))
    row, col = grid.indices(np.arange(12))
    assert row.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert col.tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3]


def test_indices_of_unordered_subset():
    grid = Grid(shape=(3, 4), snaking=(False, True))
    row, col = grid.indices([7, 0, 4, 11])
    assert row.tolist() == [1, 0, 1, 2]
    assert col.tolist() == [0, 0, 3, 3]


def test_snaking_of_slow_axis_alone_is_raster():
    row, col = Grid(shape=(2, 3), snaking=(True, False)).indices(np.arange(6))
    assert col.tolist() == [0, 1, 2, 0, 1, 2]


def test_indices_empty():
    row, col = Grid(shape=(2, 3)).indices([])
    assert row.size == 0 and col.size == 0


@pytest.mark.parametrize("bad", [[6], [-1], [0, 2, 9]])
def test_indices_out_of_range_raises_naming_range(bad):
    grid = Grid(shape=(2, 3))
    with pytest.raises(ScanError, match=r"\[0, 6\)") as info:
        grid.indices(bad)
    assert isinstance(info.value, ValueError)
    assert "(2, 3)" in str(info.value)


def test_shape_is_normalised_to_ints():
    grid = Grid(shape=[2.0, 3], extents=[[0, 1], [2, 3]], snaking=[0, 1], motors=["a", "b"])
    assert grid.shape == (2, 3)
    assert all(type(n) is int for n in grid.shape)
    assert grid.extents == ((0.0, 1.0), (2.0, 3.0))
    assert grid.snaking == (False, True)
    assert grid.size == 6


@pytest.mark.parametrize("shape", [(0, 3), (3, -1), (4,), (2, 3, 4)])
def test_constructor_rejects_non_2d_or_empty_shapes(shape):
    with pytest.raises(ScanError, match=r"Grid\(shape=\(rows, cols\)"):
        Grid(shape=shape)


def _start(**overrides):
    start = {
        "uid": "0123abcd",
        "plan_name": "grid_scan",
        "shape": [3, 4],
        "extents": [[-1.0, 1.0], [0.0, 3.0]],
        "snaking": [False, True],
        "motors": ["sample_y", "sample_x"],
        "num_points": 12,
    }
    start.update(overrides)
    return start


def test_from_start_reads_bluesky_grid_metadata():
    grid = Grid.from_start(_start())
    assert grid == Grid(shape=(3, 4), extents=((-1.0, 1.0), (0.0, 3.0)),
                        snaking=(False, True), motors=("sample_y", "sample_x"))
    assert grid.indices([4])[1].tolist() == [3]


def test_from_start_defaults_without_optional_fields():
    grid = Grid.from_start({"shape": [2, 5]})
    assert grid.shape == (2, 5)
    assert grid.extents == ((0.0, 1.0), (0.0, 4.0))
    assert grid.snaking == (False, False)
    assert grid.motors == ("motor_0", "motor_1")


def test_to_dict_round_trips_through_from_start():
    grid = Grid.from_start(_start())
    assert Grid.from_start(grid.to_dict()) == grid


def test_from_start_without_shape_says_how_to_fix():
    start = _start()
    del start["shape"]
    with pytest.raises(ScanError) as info:
        Grid.from_start(start)
    message = str(info.value)
    assert "'0123abcd'" in message and "shape" in message
    assert "grid_scan" in message and "grid=Grid(shape=(rows, cols)" in message


@pytest.mark.parametrize("shape", [[12], [2, 3, 2]])
def test_from_start_non_2d_shape_says_how_to_fix(shape):
    start = _start(shape=shape, extents=None, snaking=None, motors=None)
    with pytest.raises(ScanError) as info:
        Grid.from_start(start)
    message = str(info.value)
    assert str(shape) in message
    assert "2-D" in message and "grid=Grid(shape=(rows, cols)" in message
    assert isinstance(info.value, ValueError)


def test_positions_from_extents():
    grid = Grid(shape=(3, 5), extents=((0.0, 1.0), (10.0, 12.0)))
    rows, cols = grid.positions()
    np.testing.assert_allclose(rows, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(cols, [10.0, 10.5, 11.0, 11.5, 12.0])


def test_positions_descending_extents():
    rows, cols = Grid(shape=(2, 3), extents=((1.0, -1.0), (4.0, 0.0))).positions()
    np.testing.assert_allclose(rows, [1.0, -1.0])
    np.testing.assert_allclose(cols, [4.0, 2.0, 0.0])
