"""The grid linker and the bragg locator's noise rules, on small known tables and images."""

import numpy as np
import pandas as pd
import pytest

from crystalmapping.config import ProcessConfig
from crystalmapping.grid import Grid
from crystalmapping.link import grid_offsets, link_on_grid, link_peaks
from crystalmapping.locate import POINT_COLUMNS, locate_block, locate_peaks
from crystalmapping.maps import group_grains, reduce_scan


def _table(grid, where, y, x, rng=None, jitter=0.2):
    """Peaks at detector (y, x) on every acquisition index in `where`."""
    rng = rng or np.random.default_rng(0)
    frames = np.asarray(sorted(where))
    return pd.DataFrame({"y": y + rng.normal(0, jitter, len(frames)),
                         "x": x + rng.normal(0, jitter, len(frames)), "frame": frames,
                         "mass": 1.0})


def _frames_of(grid, mask):
    """Acquisition indices of the grid points where `mask` (rows, cols) is true."""
    row, col = grid.indices(np.arange(grid.size))
    return np.flatnonzero(mask[row, col])


@pytest.mark.parametrize("snaking", [True, False])
def test_one_reflection_is_one_track_across_row_turns(snaking):
    grid = Grid(shape=(6, 5), snaking=(False, snaking))
    mask = np.zeros(grid.shape, bool)
    mask[1:5, 1:4] = True
    linked = link_peaks(_table(grid, _frames_of(grid, mask), 100, 200), grid=grid)
    assert linked["particle"].tolist() == [0] * int(mask.sum())
    # the tutorial's linker, in acquisition order, cuts it at each row turn
    tutorial = link_peaks(_table(grid, _frames_of(grid, mask), 100, 200), linker="trackpy")
    assert tutorial["particle"].nunique() == 4


def test_a_gap_is_bridged_up_to_max_gap():
    grid = Grid(shape=(1, 9))
    left = np.zeros(grid.shape, bool)
    left[0, :4] = True
    right = np.zeros(grid.shape, bool)
    right[0, 5:] = True  # point 4 missing in a one-point-wide grain; the peak drifts 3 px
    table = pd.concat([_table(grid, _frames_of(grid, left), 50, 50),
                       _table(grid, _frames_of(grid, right), 50, 53)])
    assert link_peaks(table, grid=grid, max_gap=1)["particle"].nunique() == 1
    assert link_peaks(table, grid=grid, max_gap=0)["particle"].nunique() == 2


def test_pieces_of_a_grain_at_one_detector_position_are_one_track():
    grid = Grid(shape=(6, 6), snaking=(False, True))
    mask = np.zeros(grid.shape, bool)
    mask[0:2, 0:2] = True
    mask[4:6, 4:6] = True  # an island far away on the grid, same reflection
    linked = link_peaks(_table(grid, _frames_of(grid, mask), 300, 400), grid=grid, max_gap=0)
    assert linked["particle"].nunique() == 1


def test_two_reflections_closer_than_search_range_stay_apart():
    grid = Grid(shape=(5, 8), snaking=(False, True))
    a = np.zeros(grid.shape, bool)
    a[:, :5] = True
    b = np.zeros(grid.shape, bool)
    b[:, 3:] = True  # both present on columns 3 and 4
    rng = np.random.default_rng(1)
    table = pd.concat([_table(grid, _frames_of(grid, a), 100, 100, rng),
                       _table(grid, _frames_of(grid, b), 100, 120, rng)])  # 20 px < 50
    linked = link_peaks(table, grid=grid, search_range=50)
    assert linked["particle"].nunique() == 2
    for _, track in linked.groupby("particle"):
        assert track["frame"].is_unique  # one peak per point per track
        assert np.ptp(track["x"]) < 5  # never jumps to the other reflection


def test_noise_tracks_are_rejected_and_counted():
    grid = Grid(shape=(6, 6))
    mask = np.zeros(grid.shape, bool)
    mask[2:5, 2:5] = True
    rng = np.random.default_rng(2)
    noise = pd.DataFrame({"y": rng.uniform(0, 3000, 20), "x": rng.uniform(0, 3000, 20),
                          "frame": rng.integers(0, grid.size, 20), "mass": 1.0})
    table = pd.concat([_table(grid, _frames_of(grid, mask), 700, 800), noise])
    linked = link_peaks(table, grid=grid, min_points=3)
    assert linked["particle"].max() == 0
    assert (linked["particle"] == -1).sum() == 20
    # in the maps: one map, and every rejected peak counted at its point
    points = pd.DataFrame({"frame": np.arange(grid.size), "n_peaks": 0, "image_max": 1.0,
                           "image_sum": 1.0})
    table = table.assign(**{c: 1.0 for c in ("size", "ecc", "signal", "raw_mass", "ep", "amplitude",
                                             "snr")})
    maps = reduce_scan(table, points, grid, ProcessConfig())
    assert maps.sizes["grain"] == 1 and maps.attrs["n_peaks_rejected_track"] == 20
    assert int(maps["n_rejected_track"].sum()) == 20
    assert (maps["peak_particle"] == -1).sum() == 20  # kept in the peak table


def test_aborted_scan_links_what_was_measured():
    grid = Grid(shape=(6, 5), snaking=(False, True))
    mask = np.ones(grid.shape, bool)
    frames = _frames_of(grid, mask)[:13]  # stopped in the middle of row 2
    assert link_peaks(_table(grid, frames, 10, 10), grid=grid)["particle"].nunique() == 1


def test_link_on_grid_scales_linearly():
    rng = np.random.default_rng(3)
    n_points, n_peaks = 2000, 10
    grid = Grid(shape=(40, 50), snaking=(False, True))
    pos = rng.uniform(0, 3000, (n_peaks, 2))
    row, col = grid.indices(np.repeat(np.arange(n_points), n_peaks))
    k = np.tile(np.arange(n_peaks), n_points)
    particle = link_on_grid(pos[k, 0] + rng.normal(0, 0.3, len(k)), pos[k, 1], row, col,
                            grid.shape, search_range=50)
    assert len(np.unique(particle)) == n_peaks and (particle >= 0).all()


def test_grid_offsets_and_validation():
    assert grid_offsets(8, 0).tolist() == [[0, 1], [1, -1], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="grid=Grid"):
        link_peaks(pd.DataFrame({"y": [1.0], "x": [1.0], "frame": [0]}))
    with pytest.raises(ValueError, match="connectivity"):
        link_peaks(pd.DataFrame({"y": [1.0], "x": [1.0], "frame": [0]}), connectivity=6)


def test_group_grains_by_map_similarity():
    a = np.zeros((5, 5))
    a[1:3, 1:4] = [[1, 2, 1], [2, 4, 2]]
    b = np.zeros((5, 5))
    b[3:, :2] = 1.0
    maps = np.stack([a, 0.3 * a, b, a + 0.05 * b])
    assert group_grains(maps, 0.9).tolist() == [0, 0, 1, 0]
    assert group_grains(maps, 1.0).tolist()[2] == 1


# -- the bragg locator's noise rules ------------------------------------------------------

def _spot(image, y, x, height, sigma=2.0):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image += height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def _noisy(shape=(256, 256), sigma=10.0, seed=0):
    """A background-subtracted image: noise clipped at zero, as the preprocessing gives."""
    return np.clip(np.random.default_rng(seed).normal(0, sigma, shape), 0, None)


@pytest.mark.filterwarnings("ignore:All local maxima were in the margins")
def test_a_weak_peak_beside_a_hot_pixel_is_found():
    image = _noisy()
    _spot(image, 80.0, 90.0, 150.0)  # 15 x the pixel noise
    image[200, 40] = 60000.0  # one hot pixel, 400 x brighter
    peaks = locate_peaks(image, diameter=15)
    near = np.hypot(peaks["y"] - 80, peaks["x"] - 90) < 1
    assert near.sum() == 1 and peaks.loc[near, "snr"].item() > 10
    # trackpy rescales to 8 bits relative to the hot pixel: the peak is lost
    tp = locate_peaks(image, diameter=15, locator="trackpy")
    assert not (np.hypot(tp["y"] - 80, tp["x"] - 90) < 1).any()


def test_a_powder_ring_is_rejected_as_elongated_and_counted():
    image = _noisy(seed=1)
    yy, xx = np.mgrid[:256, :256]
    image += 150.0 * np.exp(-((np.hypot(yy - 128, xx - 128) - 90) / 1.5) ** 2 / 2)
    _spot(image, 128.0, 128.0, 150.0)
    peaks, points = locate_block(image[None], 7, dict(diameter=15, separation=30))
    assert np.hypot(peaks["y"] - 128, peaks["x"] - 128).min() < 1 and len(peaks) == 1
    assert list(points.columns) == POINT_COLUMNS
    assert points["n_rejected_elongated"].item() >= 5
    # without the roundness rule the ring gives peaks all around
    loose, _ = locate_block(image[None], 7, dict(diameter=15, separation=30, max_ecc=None))
    assert len(loose) >= 6


def test_noise_alone_gives_no_peak_and_counts_weak_candidates():
    peaks, points = locate_block(_noisy(seed=2)[None], 0, dict(diameter=15, min_snr=10))
    assert peaks.empty
    assert points["noise"].item() > 0
    _, low = locate_block(_noisy(seed=2)[None], 0, dict(diameter=15, min_snr=4))
    assert low["n_rejected_weak"].item() + low["n_peaks"].item() > 0


def test_peaks_at_the_image_edge_are_found():
    image = _noisy(seed=3)
    _spot(image, 8.0, 120.0, 200.0)
    peaks = locate_peaks(image, diameter=15)
    assert (np.hypot(peaks["y"] - 8, peaks["x"] - 120) < 1).sum() == 1
