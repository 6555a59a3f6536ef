"""inspect: one point's image with every candidate and the rule that decided it."""

from __future__ import annotations

import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping.errors import ConfigError
from crystalmapping.inspection import inspect, inspect_image, plot_inspection
from crystalmapping.locate import locate_peaks
from crystalmapping.preprocess import preprocess_frames
from crystalmapping.sim import simulate_scan

OPTIONS = dict(diameter=9, separation=20)


def _ring_point():
    """A point of a powder-ring scan where the ring and at least one Bragg spot are lit."""
    scan = simulate_scan(shape=(5, 4), detector_shape=(256, 256), grains=2, powder=300.0,
                         peak_height=600.0, seed=4)
    amp, powder = scan.truth["amplitude"].to_numpy(), scan.truth["powder"].to_numpy()
    for p in range(scan.n_points):
        r, c = scan.grid.indices(np.array([p]))
        r, c = int(r[0]), int(c[0])
        if powder[r, c] > 0 and (amp[:, r, c] > 0).any():
            lit = amp[:, r, c] > 0
            spots = np.stack([scan.truth["y"].to_numpy()[lit], scan.truth["x"].to_numpy()[lit]], 1)
            return scan, p, spots
    raise AssertionError("the simulation has no point with the ring and a spot")


def test_ring_segments_are_rejected_as_elongated_and_the_spots_kept():
    scan, point, spots = _ring_point()
    image = preprocess_frames(scan.frames(point), scan.expected_background())
    result = inspect_image(image, OPTIONS, point=point)
    table = result.candidates
    kept = table[table["verdict"] == "kept"]
    assert result.counts()["elongated"] >= 3, result  # the ring, in segments
    # every Bragg spot is kept, and nothing else is
    d = np.hypot(kept["y"].to_numpy()[:, None] - spots[:, 0], kept["x"].to_numpy()[:, None]
                 - spots[:, 1])
    assert (d.min(axis=0) < 1.0).all() and len(kept) == len(spots)
    # elongated candidates lie on the ring (radius 0.3 * 256 about the centre)
    ring = table[table["verdict"] == "elongated"]
    radius = np.hypot(ring["y"] - 128, ring["x"] - 128)
    assert (abs(radius - 0.3 * 256) < 6).all()
    # the kept rows are what the locator returns, and the counts are its counts
    found = locate_peaks(image, **OPTIONS)
    np.testing.assert_allclose(np.sort(kept["y"]), np.sort(found["y"]))
    _, points = cm.locate.locate_block(image[None], 0, OPTIONS)
    assert points["n_rejected_elongated"].iloc[0] == result.counts()["elongated"]
    assert points["n_rejected_close"].iloc[0] == result.counts()["close"]


def test_the_figure_marks_each_verdict(tmp_path):
    scan, point, _ = _ring_point()
    result = inspect_image(preprocess_frames(scan.frames(point), scan.expected_background()),
                           OPTIONS, point=point)
    fig = plot_inspection(result)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("kept: ") for t in labels)
    assert any(t.startswith("elongated (ring or streak): ") for t in labels)
    fig.savefig(tmp_path / "frame.png")
    assert (tmp_path / "frame.png").stat().st_size > 10_000


def test_inspect_reads_a_catalog_point_with_the_configs_background(catalog, scans):
    scan, uid = scans["rod"]
    run = cm.open_run(catalog.uri, uid)
    bg = int(scan.truth.attrs["background_point"])
    config = cm.ProcessConfig(background=bg, locate=dict(diameter=15))
    rows, cols = scan.grid.indices(np.arange(scan.n_points))
    point = int(np.argmax(scan.truth["amplitude"].to_numpy().sum(axis=0)[rows, cols]))
    result = inspect(run, point, config)
    expected = preprocess_frames(scan.frames(point), scan.frames(bg).mean(axis=0))
    np.testing.assert_array_equal(result.image, expected)
    assert result.point == point and "verdict" in result.candidates
    with pytest.raises(ConfigError, match="must lie in"):
        inspect(run, 10_000, config)


def test_with_the_trackpy_locator_only_kept_peaks_are_known():
    scan, point, _ = _ring_point()
    image = preprocess_frames(scan.frames(point), scan.expected_background())
    result = inspect_image(image, dict(OPTIONS, locator="trackpy"))
    assert set(result.candidates["verdict"]) <= {"kept"} and np.isnan(result.noise)


def test_the_inspect_command_writes_the_figure_and_counts(catalog, scans, tmp_path, capsys):
    from crystalmapping.cli import main

    scan, uid = scans["rod"]
    out = tmp_path / "frame.png"
    bg = str(int(scan.truth.attrs["background_point"]))
    assert main(["inspect", "--catalog", catalog.uri, "--uid", uid, "--point", "5",
                 "--background", bg, "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert "inspect: " in capsys.readouterr().out
    # an option the locator does not read is refused on the command line...
    assert main(["inspect", "--catalog", catalog.uri, "--uid", uid, "--point", "5",
                 "--percentile", "70", "-o", str(out)]) == 2
    assert "read only with locator='trackpy'" in capsys.readouterr().err
    # ... and dropped with a warning from a config file (a site's defaults for both locators)
    config = tmp_path / "site.yaml"
    config.write_text("percentile: 70\nmemory: 3\ndiameter: 15\n")
    with pytest.warns(UserWarning, match="percentile is read only with locator='trackpy'"):
        assert main(["inspect", "--catalog", catalog.uri, "--uid", uid, "--point", "5",
                     "--config", str(config), "-o", str(out)]) == 0
