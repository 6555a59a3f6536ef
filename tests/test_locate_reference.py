"""The compiled ``bragg`` locator against the numpy/scipy implementation it replaced.

``bragg_reference`` is a verbatim copy of that implementation. Every case
runs both on the same image and asks for the same table (positions within
0.01 px, ``ecc`` within 1e-5, the other columns within 1e-4 relative), the
same rejection counts and the same noise (within 1e-6 relative: a float32
image is band-passed in float32, about 1e-7 of its values from scipy's
float64).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import bragg_reference as reference
from crystalmapping import bragg
from crystalmapping.config import LocateOptions
from crystalmapping.locate import _locate, bandpass, image_noise, locate_peaks
from crystalmapping.preprocess import preprocess_frames
from crystalmapping.sim import simulate_scan

#: The float32 band-pass's values differ from scipy's float64 ones by about 1e-7 relative.
NOISE_RTOL = 1e-6
OTHER_RTOL = 1e-4
ECC_ATOL = 1e-5
COLUMNS = ["y", "x", "mass", "size", "ecc", "signal", "raw_mass", "amplitude", "snr", "ep"]


def _agree(image, **options):
    """Run both locators; assert the same peaks, counts and noise; return the table."""
    opts = LocateOptions(**options)
    ref, ref_counts = reference.locate_bragg(image, opts)
    got, counts = _locate(image, opts)
    assert counts["noise"] == pytest.approx(ref_counts["noise"], rel=NOISE_RTOL, nan_ok=True)
    assert {**counts, "noise": 0} == {**ref_counts, "n_rejected_masked": 0, "noise": 0}
    ref = ref[COLUMNS].reset_index(drop=True)
    got = got[COLUMNS].reset_index(drop=True)
    assert len(got) == len(ref)
    np.testing.assert_allclose(got[["y", "x"]], ref[["y", "x"]], rtol=0, atol=0.01)
    np.testing.assert_allclose(got[["amplitude", "snr"]], ref[["amplitude", "snr"]], rtol=1e-4)
    other = ["mass", "size", "signal", "raw_mass", "ep"]
    np.testing.assert_allclose(got[other], ref[other], rtol=OTHER_RTOL, atol=1e-9)
    np.testing.assert_allclose(got["ecc"], ref["ecc"], rtol=0, atol=ECC_ATOL)
    return got, counts


def _spot(y, x, shape, height=300.0, sigma=2.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def _noise(shape, seed=0, level=100.0):
    """A preprocessed detector background: the mean of 2 Poisson frames minus the dark level."""
    rng = np.random.default_rng(seed)
    frames = rng.poisson(level, size=(2,) + tuple(shape))
    return np.clip(frames.mean(axis=0) - level, 0, None).astype(np.float32)


@pytest.fixture(scope="module")
def sim_frames():
    """Preprocessed frames of a simulated scan: grains, a powder ring, Poisson noise."""
    scan = simulate_scan(shape=(5, 4), detector_shape=(256, 256), grains=4, peaks_per_grain=3,
                         powder=150.0, peak_height=600.0, seed=4, min_peak_distance=40,
                         edge_margin=10)
    rng = np.random.default_rng([4, 1])
    background = rng.poisson(scan.expected_background(), size=(2, 256, 256)).mean(axis=0)
    amp = scan.truth["amplitude"].to_numpy()
    powder = scan.truth["powder"].to_numpy()
    rows, cols = scan.grid.indices(np.arange(scan.n_points))
    lit = (amp[:, rows, cols] > 0).sum(axis=0) + 10 * powder[rows, cols]
    points = [int(np.argmax(lit)), int(np.argmax(np.where(powder[rows, cols] > 0, -1, lit)))]
    return [preprocess_frames(scan.frames(p), background) for p in points]


@pytest.mark.parametrize("which", [0, 1])
def test_simulated_frames(sim_frames, which):
    table, counts = _agree(sim_frames[which])
    assert len(table) > 0


def test_simulated_frame_float64_and_options(sim_frames):
    image = sim_frames[0].astype(np.float64)
    _agree(image)
    _agree(image, max_ecc=None)
    _agree(image, min_snr=4)
    _agree(image, separation=40, minmass=50.0, topn=3)
    _agree(image, characterize=False, maxsize=2.5)


@pytest.mark.parametrize("diameter", [5, 9, 15, 21])
def test_diameters(sim_frames, diameter):
    _agree(sim_frames[0][:160, :200], diameter=diameter)


def test_hot_pixels_and_spots():
    image = _noise((200, 180), seed=1) + _spot(60.3, 70.6, (200, 180)) + _spot(150, 40, (200, 180), 40)
    image[[10, 100, 190], [20, 90, 170]] = 60000.0
    table, counts = _agree(image.astype(np.float32))
    assert counts["n_rejected_weak"] >= 0 and len(table) >= 2


def test_edges_and_corners():
    shape = (120, 140)
    image = _noise(shape, seed=2)
    for y, x in [(0, 0), (0, 139), (119, 0), (119, 139), (0.4, 70.2), (60.7, 139), (2, 3),
                 (117, 70)]:
        image = image + _spot(y, x, shape, 400.0).astype(np.float32)
    table, _ = _agree(image, separation=8)
    assert len(table) >= 6


def test_touching_spots():
    shape = (100, 100)
    image = _noise(shape, seed=3) + (_spot(50, 45, shape) + _spot(50, 53.5, shape, 200.0)
                                     + _spot(43, 50, shape, 150.0)).astype(np.float32)
    _agree(image)
    _agree(image, separation=4)


def test_powder_ring_only():
    shape = (256, 256)
    yy, xx = np.mgrid[:256, :256]
    ring = 120.0 * np.exp(-((np.hypot(yy - 128, xx - 128) - 90) / 1.5) ** 2 / 2)
    image = _noise(shape, seed=5) + ring.astype(np.float32)
    image = image + _spot(128 + 90 * np.sin(0.5), 128 + 90 * np.cos(0.5), shape, 500.0).astype(np.float32)
    table, counts = _agree(image)
    assert counts["n_rejected_elongated"] > 0


def test_candidates_that_oscillate_along_a_ring():
    """A faint, narrow powder ring in noise: recentring moves some candidates back and forth
    between the same pixels until its iterations run out (11 of the 80 here); the locator
    goes straight to where the last move lands, the reference walks there."""
    image = _noise((512, 512), seed=0)
    r = np.hypot(*(np.mgrid[:512, :512] - 256))
    image = image + (60 * np.exp(-((r - 200) / 2.0) ** 2 / 2)).astype(np.float32)
    _agree(image)
    _agree(image, max_iterations=3)


def test_empty_constant_and_tiny_images():
    _agree(np.zeros((64, 64), np.float32))
    _agree(np.full((64, 64), 7.0))
    _agree(np.full((40, 50), 3.0, np.float32) + _spot(20, 25, (40, 50)).astype(np.float32))
    for shape in [(1, 1), (3, 4), (5, 5), (12, 9), (20, 30)]:
        _agree(_noise(shape, seed=6) + _spot(shape[0] / 2, shape[1] / 2, shape).astype(np.float32),
               diameter=5)
    _agree(np.ones((1, 7)))


def test_saturated_plateaus():
    shape = (120, 120)
    image = _noise(shape, seed=7, level=50.0)
    image[30:36, 40:46] = 65535  # an even plateau: its centroid falls on a half pixel
    image[80:85, 80:85] = 65535
    image[100:102, 10:13] = 65535
    _agree(image)
    _agree(np.full((60, 60), 65535.0, np.float32))


def test_invert_and_no_preprocess():
    shape = (90, 110)
    image = (_noise(shape, seed=8) + _spot(40, 50, shape)).astype(np.float32)
    _agree(image, invert=True)
    _agree(image, preprocess=False)
    _agree(bandpass(image), preprocess=False)


def test_uint16_image():
    shape = (80, 90)
    image = np.round(_noise(shape, seed=9) * 4 + _spot(40, 45, shape, 900)).astype(np.uint16)
    _agree(image)


def test_non_finite_pixels():
    """A nan or infinite pixel: no peak and a NaN noise, as before."""
    shape = (80, 80)
    base = (_noise(shape, seed=12) + _spot(40, 30, shape)).astype(np.float64)
    for value in (np.nan, np.inf, -np.inf):
        image = base.copy()
        image[10, 60] = value
        with np.errstate(invalid="ignore"):  # the reference subtracts inf from inf
            ref, ref_counts = reference.locate_bragg(image, LocateOptions())
        got, counts = _locate(image, LocateOptions())
        assert len(got) == len(ref) == 0
        assert np.isnan(counts.pop("noise")) and np.isnan(ref_counts.pop("noise"))
        assert counts == {**ref_counts, "n_rejected_masked": 0}


def test_bandpass_and_noise_match_scipy():
    rng = np.random.default_rng(10)
    for shape in [(1, 1), (7, 3), (64, 80), (203, 131)]:
        for dtype in (np.float32, np.float64, np.uint16):
            image = (rng.poisson(30, size=shape) * rng.uniform(0.5, 2, shape)).astype(dtype)
            for kw in [{}, dict(noise_size=1.5, diameter=9), dict(noise_size=0.1, smoothing_size=10),
                       dict(smoothing_size=1), dict(noise_size=2.3, smoothing_size=0.4, diameter=21)]:
                ref = reference.bandpass(image, **kw)
                got = bandpass(image, **kw)
                assert got.dtype == np.float64
                np.testing.assert_array_equal(got, ref)
                assert image_noise(got) == reference.image_noise(ref)


def _check_extras(filtered, tiles, sample, low, high, level, sigma):
    """The tile extremes, the noise sample and the candidate maxima of a band-passed image,
    against numpy's and scipy's on the same values."""
    floor = level + 5 * sigma
    peak_max = ndimage.maximum_filter(filtered, size=15, mode="constant", cval=-np.inf)
    expected = np.argwhere((filtered == peak_max) & (filtered > floor))
    np.testing.assert_array_equal(bragg._filters.local_maxima(filtered, tiles[0], floor, 7), expected)
    rows, cols = bragg._filters.ROWS, bragg._filters.TILE
    f64 = filtered.astype(np.float64)
    pad = np.pad(f64, ((0, -f64.shape[0] % rows), (0, -f64.shape[1] % cols)), constant_values=np.nan)
    blocks = pad.reshape(pad.shape[0] // rows, rows, pad.shape[1] // cols, cols)
    np.testing.assert_array_equal(tiles[0], np.nanmax(blocks, axis=(1, 3)))
    np.testing.assert_array_equal(tiles[1], np.nanmin(blocks, axis=(1, 3)))
    assert (low, high) == (f64.min(), f64.max())
    np.testing.assert_array_equal(sample, f64[::2, ::2])
    assert (level, sigma) == reference.image_noise(f64)


def test_full_size_filter_noise_and_maxima():
    """One Dexela-sized frame: band-pass, noise and candidate maxima, in float64 bit for bit,
    in float32 within 1e-6 of the largest value."""
    image = _noise((3888, 3072), seed=11)
    image[1000:1010, 2000:2010] += 500
    ref = reference.bandpass(image)
    np.testing.assert_array_equal(bandpass(image), ref)
    filtered, tiles, (sample, hist), low, high = bragg._bandpass(image.astype(np.float64), 1.0, 15,
                                                                 True)
    np.testing.assert_array_equal(filtered, ref)
    level, sigma = bragg._noise(sample, hist, True)
    assert (level, sigma) == reference.image_noise(ref)
    _check_extras(filtered, tiles, sample, low, high, level, sigma)
    # the locator's float32 pass
    filtered, tiles, (sample, hist), low, high = bragg._bandpass(image, 1.0, 15, True)
    assert filtered.dtype == np.float32
    np.testing.assert_allclose(filtered, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    level, sigma = bragg._noise(sample, hist, True)
    assert sigma == pytest.approx(reference.image_noise(ref)[1], rel=NOISE_RTOL)
    _check_extras(filtered, tiles, sample, low, high, level, sigma)


def test_float32_bandpass_sizes_and_edges():
    """The float32 pass against scipy for every filter shape, on small, thin and tiny images;
    an image that is not finite, or whose values float32 would overflow or lose, is filtered
    in float64 instead."""
    rng = np.random.default_rng(12)
    for shape in [(1, 1), (7, 3), (2, 200), (300, 1), (203, 131)]:
        image = (rng.poisson(30, size=shape) * rng.uniform(0.5, 2, shape)).astype(np.float32)
        for noise_size, size in [(1.0, 15), (1.5, 9), (0.1, 10), (1.0, 1), (2.3, 0), (1.0, 2),
                                 (1.0, 3), (5.0, 7), (1.0, 31), (1.0, 64)]:
            ref = reference.bandpass(image, noise_size=noise_size, smoothing_size=size)
            got, tiles, (sample, hist), low, high = bragg._bandpass(image, noise_size, size, True)
            # float64 where the band-pass is zero (a 1 x 1 image): nothing for float32 to keep
            assert got.dtype == (np.float32 if np.abs(ref).max() > 1e-20 else np.float64)
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(image).max())
            np.testing.assert_array_equal(sample, got[::2, ::2].astype(np.float64))
            assert (low, high) == (got.min(), got.max())
    base = rng.poisson(30, size=(64, 80))
    for scale in (1e-12, 1e20):  # far from 1, still float32's
        image = (base * scale).astype(np.float32)
        ref = reference.bandpass(image)
        got = bragg._bandpass(image, 1.0, 15, True)[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(image).max())
    for scale in (1e36, 1e-42):  # float32 sums would overflow / values are subnormal
        image = (base * scale).astype(np.float32)
        got = bragg._bandpass(image, 1.0, 15, True)[0]
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, reference.bandpass(image))
    for bad in (np.nan, np.inf, -np.inf):
        image = rng.random((50, 70)).astype(np.float32)
        image[20, 30] = bad
        got = bragg._bandpass(image, 1.0, 15, True)[0]
        assert got.dtype == np.float64
        with np.errstate(invalid="ignore"):  # inf - inf
            np.testing.assert_array_equal(got, reference.bandpass(image))


def test_weak_bound_changes_nothing_but_the_time():
    """Candidates proven weak without measuring are the ones the measurement rejects as weak."""
    opts = LocateOptions()
    shape = (1024, 1024)
    image = _noise(shape, seed=5)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image += (40 * np.exp(-(np.hypot(yy - 1400, xx - 300) - 900) ** 2 / 8)).astype(np.float32)
    for y, x in [(200, 200), (500, 800), (900, 150), (620, 505)]:
        image += _spot(y, x, shape).astype(np.float32)
    image = bragg._kernel_image(image)
    filtered, tiles, level, sigma, floor_noise, finite = bragg._prepare(image, opts, True)
    cand = bragg._filters.local_maxima(filtered, tiles[0], level + 0.5 * opts.min_snr * floor_noise,
                                       opts.diameter // 2)
    assert finite and len(cand) > 10
    full = bragg._measure(filtered, image, cand, opts, level, sigma, floor_noise, True)
    fast = bragg._measure(filtered, image, cand, opts, level, sigma, floor_noise, True, tiles, True)
    proven = np.isneginf(fast[:, 8])
    assert proven.any()
    assert (full[proven, 8] < opts.min_snr).all()
    measured = ~proven
    np.testing.assert_array_equal(fast[measured][:, [0, 1, 3, 4, 5, 8, 9]],
                                  full[measured][:, [0, 1, 3, 4, 5, 8, 9]])
    assert bragg._rules(fast, opts, sigma)[0].equals(bragg._rules(full, opts, sigma)[0])


def test_trackpy_locator_measures_as_before(sim_frames):
    import trackpy

    trackpy.quiet()
    image = sim_frames[0]
    opts = LocateOptions(locator="trackpy", diameter=15, separation=30, percentile=80)
    got, counts = _locate(image, opts)
    table = trackpy.locate(image, **{k: v for k, v in opts.to_dict().items()
                                    if k not in ("locator", "min_snr", "max_ecc", "mask")})
    amplitude, snr, sigma = reference.trackpy_measure(image, table.reset_index(drop=True), opts)
    assert len(got) == len(table) > 0
    np.testing.assert_allclose(got["amplitude"], amplitude, rtol=1e-4)
    np.testing.assert_allclose(got["snr"], snr, rtol=1e-4)
    assert counts["noise"] == pytest.approx(sigma, rel=NOISE_RTOL)


def test_locate_peaks_columns_unchanged(sim_frames):
    peaks = locate_peaks(sim_frames[0], diameter=15, frame=2)
    assert isinstance(peaks, pd.DataFrame) and peaks["frame"].eq(2).all()


def test_concurrent_first_calls():
    """Threads calling the locator for the first time in a process all succeed, alike."""
    code = textwrap.dedent("""
        import concurrent.futures, numpy as np
        from crystalmapping.locate import locate_peaks
        yy, xx = np.mgrid[:128, :128]
        images = [(200 * np.exp(-((yy - 40 - i) ** 2 + (xx - 60) ** 2) / 8.0)).astype(dt)
                  for i, dt in enumerate([np.float32, np.float64] * 3)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            tables = list(pool.map(lambda im: locate_peaks(im, diameter=9), images))
        assert all(len(t) == 1 for t in tables), [len(t) for t in tables]
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

