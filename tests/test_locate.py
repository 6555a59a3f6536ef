"""Unit tests of crystalmapping.locate: trackpy.locate per image, per chunk, per stack."""


import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from crystalmapping.config import LocateOptions
from crystalmapping.errors import ConfigError
from crystalmapping.locate import (PEAK_COLUMNS, POINT_COLUMNS, locate_block, locate_images,
                                   locate_peaks)

# Small images need a small separation: trackpy ignores peaks within separation/2 of the edge.
OPTIONS = dict(diameter=9, separation=20, percentile=80)


def _spot(y, x, shape=(64, 64), height=200.0, sigma=2.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def _raise_if_computes(*args, **kwargs):
    raise RuntimeError("a dask graph was computed while building the locate tasks")


def test_gaussian_spot_found_at_subpixel_position():
    peaks = locate_peaks(_spot(20.3, 40.7), frame=4, **OPTIONS)
    assert list(peaks.columns) == PEAK_COLUMNS
    assert len(peaks) == 1
    assert abs(peaks["y"].iloc[0] - 20.3) < 0.1
    assert abs(peaks["x"].iloc[0] - 40.7) < 0.1
    assert peaks["mass"].iloc[0] > 0
    assert peaks["frame"].tolist() == [4]
    assert peaks["frame"].dtype == np.int64
    assert all(peaks[c].dtype == np.float64 for c in PEAK_COLUMNS if c != "frame")


def test_float32_image_and_default_frame():
    peaks = locate_peaks(_spot(30.0, 12.0).astype(np.float32), **OPTIONS)
    assert peaks["frame"].tolist() == [-1]
    np.testing.assert_allclose(peaks[["y", "x"]].to_numpy(), [[30.0, 12.0]], atol=0.1)


def test_two_spots():
    image = _spot(20.0, 20.0) + _spot(44.0, 40.0, height=100.0)
    peaks = locate_peaks(image, frame=0, **OPTIONS).sort_values("y")
    np.testing.assert_allclose(peaks[["y", "x"]].to_numpy(), [[20, 20], [44, 40]], atol=0.1)
    assert peaks["mass"].iloc[0] > peaks["mass"].iloc[1]


def test_all_zero_image_gives_empty_table():
    peaks = locate_peaks(np.zeros((32, 32), dtype=np.float32), frame=2, **OPTIONS)
    assert peaks.empty
    assert list(peaks.columns) == PEAK_COLUMNS
    assert peaks["frame"].dtype == np.int64


def test_characterize_false_keeps_the_columns():
    peaks = locate_peaks(_spot(20.3, 40.7), frame=1, characterize=False, **OPTIONS)
    assert list(peaks.columns) == PEAK_COLUMNS and len(peaks) == 1
    assert peaks["ecc"].isna().all()


def test_options_are_validated():
    with pytest.raises(ConfigError, match="odd"):
        locate_peaks(_spot(20, 20), diameter=8)
    with pytest.raises(ValueError, match=r"\(2, 64, 64\)"):
        locate_peaks(np.zeros((2, 64, 64)), diameter=9)


def test_locate_block_summary_rows():
    images = np.stack([_spot(20.0, 20.0), np.zeros((64, 64)),
                       _spot(15.0, 15.0) + _spot(45.0, 48.0)]).astype(np.float32)
    peaks, points = locate_block(images, 10, OPTIONS)
    assert list(peaks.columns) == PEAK_COLUMNS
    assert peaks["frame"].tolist() == [10, 12, 12]
    assert list(points.columns) == POINT_COLUMNS
    assert points["frame"].tolist() == [10, 11, 12]
    assert points["n_peaks"].tolist() == [1, 0, 2]
    np.testing.assert_allclose(points["image_max"], images.max(axis=(1, 2)))
    np.testing.assert_allclose(points["image_sum"], images.astype(np.float64).sum(axis=(1, 2)),
                               rtol=1e-12)


def _stack():
    """7 images: a spot wandering across the detector, point 3 empty."""
    images = []
    for i in range(7):
        images.append(np.zeros((64, 64)) if i == 3 else _spot(20 + 2 * i, 20 + 3 * i))
    return np.stack(images).astype(np.float32)


@pytest.mark.parametrize("wrap", ["dask", "xarray"])
def test_locate_images_one_task_per_uneven_chunk(wrap):
    images = _stack()
    stack = da.from_array(images, chunks=(3, 64, 64))
    if wrap == "xarray":
        stack = xr.DataArray(stack, dims=("point", "pixel_y", "pixel_x"))
    with dask.config.set(scheduler=_raise_if_computes):
        tasks = locate_images(stack, LocateOptions(**OPTIONS))
    assert len(tasks) == 3
    results = dask.compute(*tasks, scheduler="sync")
    assert [r[1]["frame"].tolist() for r in results] == [[0, 1, 2], [3, 4, 5], [6]]
    points = pd.concat([r[1] for r in results], ignore_index=True)
    peaks = pd.concat([r[0] for r in results], ignore_index=True)
    assert points["frame"].tolist() == list(range(7))
    assert points["n_peaks"].tolist() == [1, 1, 1, 0, 1, 1, 1]
    assert sorted(peaks["frame"]) == [0, 1, 2, 4, 5, 6]
    expected = {i: (20 + 2 * i, 20 + 3 * i) for i in range(7) if i != 3}
    for _, row in peaks.iterrows():
        y, x = expected[int(row["frame"])]
        assert abs(row["y"] - y) < 0.1 and abs(row["x"] - x) < 0.1


def test_locate_images_rechunks_detector_axes_and_accepts_dict_options():
    images = _stack()
    stack = da.from_array(images, chunks=(2, 32, 64))
    with dask.config.set(scheduler=_raise_if_computes):
        tasks = locate_images(stack, OPTIONS)
    assert len(tasks) == 4
    results = dask.compute(*tasks, scheduler="sync")
    assert [r[1]["frame"].tolist() for r in results] == [[0, 1], [2, 3], [4, 5], [6]]
    assert sum(len(r[0]) for r in results) == 6


def test_locate_images_rejects_wrong_dimensions_and_options():
    with pytest.raises(ValueError, match="point, y, x"):
        locate_images(da.zeros((2, 3, 4, 5)), OPTIONS)
    with pytest.raises(TypeError, match="unknown locate keyword"):
        locate_images(da.zeros((2, 8, 8)), {"diametre": 9})
