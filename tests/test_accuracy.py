"""The accuracy benchmark, small: the default maps are right on known truth, the tutorial's are not.

The full version is ``benchmarks/accuracy.py`` (report in ``docs/accuracy.md``);
these scenarios are smaller grids on a 256 x 256 px detector, mapped by the
batch pipeline with the same scoring.
"""

import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping.accuracy import (ideal_amplitudes, intensity_ok, pixel_noise, score_maps,
                                     summarize)

pytestmark = pytest.mark.filterwarnings("ignore:All local maxima were in the margins")

TUTORIAL = dict(locate=dict(diameter=15, percentile=80, separation=100, locator="trackpy"),
                link=dict(search_range=50, linker="trackpy"), intensity_column="mass")

SCENARIOS = {
    "rod-snake": dict(shape=(24, 8)),
    "rod-raster-5-frames-powder": dict(shape=(24, 8), snaking=False, frames_per_point=5,
                                       powder=60.0),
    "rod-weak": dict(shape=(24, 8), peak_height=200.0),
    "random-overlapping": dict(shape=(14, 14), grains=4, min_peak_distance=45.0),
    "rod-aborted": dict(shape=(24, 8), stop_after=110),
}


def _map(scan, client, **options):
    return cm.process_run(scan.to_dataset(), subtrahend=int(scan.truth.attrs["background_point"]),
                          client=client, progress=False, **options)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_default_maps_are_right(name, thread_client):
    scan = cm.simulate_scan(detector_shape=(256, 256), seed=4, **SCENARIOS[name])
    maps = _map(scan, thread_client)
    per_peak, summary = score_maps(maps, scan.truth, pixel_noise(scan), ideal=ideal_amplitudes(scan))
    scored = per_peak[per_peak["scored"]]
    assert len(scored) >= 0.5 * len(per_peak), per_peak
    assert (scored["best_iou"] >= 0.95).all(), per_peak
    # n/a only where a peak was measured at fewer than 5 points
    assert (scored["intensity_r"].notna() | (scored["n_points_r"] < 5)).all(), per_peak
    assert intensity_ok(scored).all(), per_peak
    # our heights scatter no more than the ideal measurement's, give or take
    assert (scored["intensity_r"].dropna() >= scored["ideal_r"].dropna() - 0.01).all(), per_peak
    assert summary["n_spurious"] == 0, summary
    if name == "rod-aborted":
        assert int(maps["measured"].sum()) == 110
    line = summarize(per_peak, summary)
    assert line["spurious_maps"] == 0 and line["min_best_iou"] >= 0.95


def test_tutorial_maps_are_fragmented_and_noisy(thread_client):
    """What the benchmark measures for the tutorial's algorithm on the same scan."""
    scan = cm.simulate_scan(detector_shape=(256, 256), seed=4, **SCENARIOS["rod-snake"])
    maps = _map(scan, thread_client, **TUTORIAL)
    per_peak, summary = score_maps(maps, scan.truth, pixel_noise(scan))
    scored = per_peak[per_peak["scored"]]
    assert scored["n_maps"].max() > 3  # cut at row turns
    assert scored["best_iou"].min() < 0.5
    assert summary["n_spurious"] > 0


def test_grains_group_the_reflections_of_one_grain(thread_client):
    scan = cm.simulate_scan(detector_shape=(256, 256), seed=4, peaks_per_grain=3,
                            min_peak_distance=50.0, **SCENARIOS["rod-snake"])
    maps = _map(scan, thread_client)
    per_peak, summary = score_maps(maps, scan.truth, pixel_noise(scan))
    assert summary["grains_ok"] and summary["n_grains_found"] == 3, per_peak
    assert maps.attrs["n_grains"] == 3 and maps.sizes["grain"] == 9
    assert np.bincount(maps["grain_id"].values).tolist() == [3, 3, 3]


def test_ideal_amplitudes_measure_the_true_heights():
    """The reference measurement of the intensity score: unbiased, with Poisson scatter only."""
    scan = cm.simulate_scan(detector_shape=(128, 128), shape=(8, 4), grains=2, peaks_per_grain=1,
                            min_peak_distance=30.0, seed=2)
    ideal = ideal_amplitudes(scan)
    amp = scan.truth["amplitude"].to_numpy()
    lit = amp > 0
    error = (ideal - amp)[lit]
    expected = pixel_noise(scan).mean() / np.sqrt(np.pi * scan.spot_sigma ** 2)  # MF noise
    assert abs(error.mean()) < 3 * expected / np.sqrt(error.size) + 0.5
    assert 0.5 * expected < error.std() < 1.5 * expected
    assert np.abs(ideal[~lit]).max() < 6 * expected


@pytest.mark.parametrize("seed", [1, 34, 37, 38])
def test_a_grain_inside_a_larger_ones_footprint_is_its_own_grain(seed):
    """On these scans a random grain lies inside a larger one's footprint on the grid.

    Their maps overlap and their ratio varies little, but the larger map is as
    bright around the smaller one as under it: a weaker reflection of one grain
    would hold the brightest points only. (The overlap-and-ratio rule alone
    merged them.) The maps are the true heights cut at a detection floor.
    """
    from crystalmapping.accuracy import grains_of_true_maps

    for grains, shape in ((4, (30, 30)), ("reference", (40, 12))):
        scan = cm.simulate_scan(detector_shape=(64, 64), shape=shape, grains=grains, seed=seed,
                                min_peak_distance=1.0, edge_margin=4)
        found, true = grains_of_true_maps(scan, floor=60.0)
        assert found.tolist() == true.tolist()
