"""Plots: per-event scalars on the grid, real-aspect images, map facet grids and PNGs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

from crystalmapping.config import ProcessConfig  # noqa: E402
from crystalmapping.errors import ConfigError, NoPeaksWarning, ScanError  # noqa: E402
from crystalmapping.grid import Grid  # noqa: E402
from crystalmapping.locate import PEAK_COLUMNS, POINT_COLUMNS  # noqa: E402
from crystalmapping.maps import reduce_scan  # noqa: E402
from crystalmapping.mapfigure import plot_maps, save_maps_plot  # noqa: E402
from crystalmapping.plot import plot_real_aspect, reshape  # noqa: E402
from crystalmapping.store import open_maps, write_maps  # noqa: E402

# 3 rows x 4 columns, the fast axis snaking; rows 0.5 mm apart, columns 1 mm apart.
GRID = Grid(shape=(3, 4), extents=((0.0, 1.0), (10.0, 13.0)), snaking=(False, True),
            motors=("sample_y", "sample_x"))
START = dict(uid="feedbeef-0000", shape=[3, 4], extents=[[0.0, 1.0], [10.0, 13.0]],
             snaking=[False, True], motors=["sample_y", "sample_x"])
N_MEASURED = 10  # an aborted scan: the last 2 points were never measured


def _peak(frame, y, x, mass):
    return dict(y=y, x=x, mass=mass, size=2.0, ecc=0.1, signal=mass / 10, raw_mass=mass + 5,
                ep=0.01, frame=frame)


def _tables(n_noise: int = 0):
    """Grain A at frames 0-2, grain B at frames 5-6, and ``n_noise`` one-point tracks."""
    rows = [_peak(f, 100.0, 200.0, 10.0 * (f + 1)) for f in (0, 1, 2)]
    rows += [_peak(f, 400.0, 50.0, 7.0) for f in (5, 6)]
    for j in range(n_noise):  # far from each other and from the previous point's peaks
        f = j % N_MEASURED
        rows.append(_peak(f, 2000.0 + 300.0 * f, 300.0 * (j // N_MEASURED), 1.0))
    peaks = pd.DataFrame(rows, columns=PEAK_COLUMNS).astype({"frame": "int64"})
    n_peaks = peaks.groupby("frame").size().reindex(range(N_MEASURED), fill_value=0)
    points = pd.DataFrame({"frame": np.arange(N_MEASURED), "n_peaks": n_peaks.to_numpy(),
                           "image_max": np.full(N_MEASURED, 5.0),
                           "image_sum": 100.0 + np.arange(N_MEASURED)}, columns=POINT_COLUMNS)
    return peaks, points


@pytest.fixture(scope="module")
def maps():
    peaks, points = _tables()
    return reduce_scan(peaks, points, GRID, ProcessConfig(link={"linker": "trackpy"}, intensity_column="mass"), attrs={"source_uid": START["uid"]})


@pytest.fixture(scope="module")
def noisy_maps():
    peaks, points = _tables(n_noise=30)
    return reduce_scan(peaks, points, GRID, ProcessConfig(link={"linker": "trackpy"}, intensity_column="mass"))


def _events(values) -> xr.Dataset:
    return xr.Dataset({"dexela_stats1_total": ("point", values),
                       "image": (("point", "image_dim_1"), np.zeros((len(values), 2)))},
                      attrs=START)


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


# ----------------------------------------------------------------------------- reshape


@pytest.mark.parametrize("lazy", [False, True])
def test_reshape_undoes_snaking_and_leaves_unmeasured_points_nan(lazy):
    values = np.arange(N_MEASURED, dtype=np.int64)
    ds = _events(da.from_array(values, chunks=3) if lazy else values)
    out = reshape(ds, "dexela_stats1_total")
    nan = np.nan
    expected = [[0, 1, 2, 3],
                [7, 6, 5, 4],  # the odd row was measured right to left
                [8, 9, nan, nan]]  # aborted after 10 of 12 points
    np.testing.assert_array_equal(out.values, expected)
    assert out.dims == ("row", "col") and out.name == "dexela_stats1_total"
    assert out.dtype == np.float64
    np.testing.assert_allclose(out["row_position"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(out["col_position"], [10.0, 11.0, 12.0, 13.0])
    assert out["row_position"].attrs["motor"] == "sample_y"
    assert out["col_position"].attrs["motor"] == "sample_x"


def test_reshape_matches_the_maps_grid(maps):
    """A per-point value reshaped lands where reduce_scan put the same point."""
    ds = _events(100.0 + np.arange(N_MEASURED))
    np.testing.assert_array_equal(reshape(ds, "dexela_stats1_total").fillna(0).values,
                                  maps["total_intensity"].values)


def test_reshape_errors_say_what_to_do():
    ds = _events(np.arange(4.0))
    with pytest.raises(ScanError, match=r"no variable 'nope'.*dexela_stats1_total"):
        reshape(ds, "nope")
    with pytest.raises(ScanError, match="one scalar per event"):
        reshape(ds, "image")
    with pytest.raises(ScanError, match="more events than"):
        reshape(_events(np.arange(13.0)), "dexela_stats1_total")
    no_grid = ds.copy()
    no_grid.attrs = {"uid": "x"}
    with pytest.raises(ScanError, match="no 'shape'"):
        reshape(no_grid, "dexela_stats1_total")
    out = reshape(no_grid, "dexela_stats1_total", grid=Grid(shape=(2, 2)))
    np.testing.assert_array_equal(out.values, [[0, 1], [2, 3]])


# ----------------------------------------------------------------------------- real aspect


def test_plot_real_aspect_uses_motor_positions():
    from matplotlib.figure import Figure

    stats1 = reshape(_events(np.arange(N_MEASURED, dtype=float)), "dexela_stats1_total")
    ax = Figure().subplots()
    assert plot_real_aspect(stats1, ax=ax) is ax
    # pixel centres on the positions: rows 0.5 mm apart, columns 1 mm apart, row 0 on top
    np.testing.assert_allclose(ax.images[0].get_extent(), [9.5, 13.5, 1.25, -0.25])
    assert ax.get_aspect() == 1.0
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("sample_x", "sample_y")
    assert ax.get_title() == "dexela_stats1_total"
    assert len(ax.figure.axes) == 2  # and a colorbar


def test_plot_real_aspect_of_an_image_is_in_pixels():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    plot_real_aspect(np.ones((4, 6)), ax=ax, title="image", vmin=0)
    np.testing.assert_allclose(ax.images[0].get_extent(), [-0.5, 5.5, 3.5, -0.5])
    assert ax.get_aspect() == 1.0 and ax.get_title() == "image"
    with pytest.raises(ConfigError, match=r"2-D array.*\(2, 3, 4\)"):
        plot_real_aspect(np.ones((2, 3, 4)), ax=ax)


def test_plot_real_aspect_default_axes_is_a_pyplot_figure():
    import matplotlib.pyplot as plt

    ax = plot_real_aspect(np.eye(3))
    try:
        assert ax.figure in [plt.figure(n) for n in plt.get_fignums()]
    finally:
        plt.close(ax.figure)


# ----------------------------------------------------------------------------- maps


def test_plot_maps_one_panel_per_grain(maps):
    assert maps.sizes["grain"] == 2
    fig = plot_maps(maps)
    axes = _image_axes(fig)
    assert len(axes) == 3
    assert axes[0].get_title().startswith("brightest pixel")
    assert "grain 0  (y=100, x=200)" in axes[1].get_title()
    assert "3 points" in axes[1].get_title()
    assert "grain 1  (y=400, x=50)" in axes[2].get_title()
    assert "2 maps" in fig.get_suptitle() and "feedbeef" in fig.get_suptitle()
    # real aspect in every panel, unmeasured points blank
    for ax in axes:
        np.testing.assert_allclose(ax.images[0].get_extent(), [9.5, 13.5, 1.25, -0.25])
        assert ax.get_aspect() == 1.0
    grain0 = axes[1].images[0].get_array()
    assert grain0[0, :3].tolist() == [10.0, 20.0, 30.0] and grain0.mask[2, 2:].all()


def test_plot_maps_shows_the_grains_seen_at_most_points(noisy_maps):
    n = noisy_maps.sizes["grain"]
    assert n == 32
    fig = plot_maps(noisy_maps)
    assert len(_image_axes(fig)) == 1 + 24
    assert f"showing 24 of {n} maps" in fig.get_suptitle()

    fig = plot_maps(noisy_maps, max_grains=2, col_wrap=2)
    axes = _image_axes(fig)
    assert len(axes) == 3
    assert "showing 2 of 32 maps" in fig.get_suptitle()
    titles = [ax.get_title() for ax in axes[1:]]
    assert "y=100, x=200" in titles[0] and "y=400, x=50" in titles[1]
    assert axes[2].get_subplotspec().get_geometry()[:2] == (2, 2)

    assert len(_image_axes(plot_maps(noisy_maps, max_grains=0))) == 1


def test_plot_maps_without_grains():
    peaks, points = _tables()
    with pytest.warns(NoPeaksWarning, match="no peak was found"):
        empty = reduce_scan(peaks.iloc[:0], points.assign(n_peaks=0), GRID, ProcessConfig(link={"linker": "trackpy"}, intensity_column="mass"))
    fig = plot_maps(empty)
    assert len(_image_axes(fig)) == 1
    assert "no peak was linked" in fig.get_suptitle()


def test_plot_maps_rejects_bad_options(maps):
    with pytest.raises(ConfigError, match="max_grains must be >= 0"):
        plot_maps(maps, max_grains=-1)
    with pytest.raises(ConfigError, match="col_wrap must be >= 1"):
        plot_maps(maps, col_wrap=0)
    with pytest.raises(ConfigError, match="figsize"):
        plot_maps(maps, figsize=(0, 3))
    with pytest.raises(ConfigError, match=r"lacks \['total_intensity'\]"):
        plot_maps(maps.drop_vars("total_intensity"))


# ----------------------------------------------------------------------------- PNG


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_maps_plot_from_a_dataset(maps, tmp_path):
    out = save_maps_plot(maps, tmp_path / "sub" / "maps.png")
    assert out == tmp_path / "sub" / "maps.png"
    _assert_png(out)


def test_save_maps_plot_from_a_store(noisy_maps, tmp_path):
    store = write_maps(noisy_maps, tmp_path / "maps.zarr")
    opened = open_maps(store)
    assert opened["row_position"].attrs["motor"] == "sample_y"
    out = save_maps_plot(store, tmp_path / "maps.png", max_grains=3)
    _assert_png(out)
    # the plot of the store is the plot of the dataset
    fig = plot_maps(opened, max_grains=3)
    assert "showing 3 of 32 maps" in fig.get_suptitle()
    assert len(_image_axes(fig)) == 4
