"""The detector mask: masked pixels never make a peak, and a peak touching one is counted."""

from __future__ import annotations

import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping.errors import ConfigError
from crystalmapping.locate import locate_block
from crystalmapping.mask import hot_pixels, load_mask
from crystalmapping.preprocess import preprocess_frames
from crystalmapping.sim import simulate_scan

DETECTOR = (128, 128)
GAP = (slice(None), slice(96, 100))  # a dead module gap, 4 columns wide
HOT = [(20, 97), (70, 98), (110, 96)]  # bright pixels inside it, at every point
OPTIONS = dict(diameter=9, separation=20)


def _scan():
    return simulate_scan(shape=(6, 4), detector_shape=DETECTOR, grains=2, peak_height=600.0,
                         seed=8)


def _with_gap(frames: np.ndarray) -> np.ndarray:
    frames = np.array(frames, copy=True)
    frames[(Ellipsis,) + GAP] = 0
    for y, x in HOT:
        frames[..., y, x] = 4000
    return frames


def _mask(tmp_path):
    mask = np.zeros(DETECTOR, bool)
    mask[GAP] = True
    path = tmp_path / "mask.npy"
    np.save(path, mask)
    return path


def _peaks(scan, frames_of, **options):
    bg = scan.frames(int(scan.truth.attrs["background_point"])).mean(axis=0)
    images = np.stack([preprocess_frames(frames_of(p), bg, warn_empty=False)
                       for p in range(scan.n_points)])
    return locate_block(images, 0, dict(OPTIONS, **options))


def test_the_gap_makes_peaks_without_the_mask_and_none_with_it(tmp_path):
    scan = _scan()
    far = (abs(scan.truth["x"].to_numpy() - 98) > 12)  # the true peaks not at the gap
    clean, clean_points = _peaks(scan, scan.frames)
    gap, _ = _peaks(scan, lambda p: _with_gap(scan.frames(p)))
    masked, points = _peaks(scan, lambda p: _with_gap(scan.frames(p)), mask=str(_mask(tmp_path)))
    in_gap = lambda t: ((t["x"] > 92) & (t["x"] < 104)).sum()  # noqa: E731
    assert in_gap(gap) >= scan.n_points  # every hot pixel of the gap is a "peak", every point
    assert in_gap(masked) == 0
    # elsewhere, the same peaks as on the detector without a gap
    keep = lambda t: t[(abs(t["x"] - 98) > 12)].sort_values(["frame", "y", "x"])  # noqa: E731
    a, b = keep(clean), keep(masked)
    assert len(a) == len(b) and far.any()
    np.testing.assert_allclose(a[["y", "x"]].to_numpy(), b[["y", "x"]].to_numpy(), atol=0.05)
    np.testing.assert_allclose(a["amplitude"].to_numpy(), b["amplitude"].to_numpy(), rtol=0.05)
    assert (points["n_rejected_masked"] >= 0).all() and clean_points["n_rejected_masked"].sum() == 0


def test_a_peak_touching_the_mask_is_rejected_and_counted(tmp_path):
    scan = _scan()
    point = int(np.argmax(scan.truth["amplitude"].to_numpy().sum(axis=0)[
        scan.grid.indices(np.arange(scan.n_points))]))
    bg = scan.frames(int(scan.truth.attrs["background_point"])).mean(axis=0)
    image = preprocess_frames(scan.frames(point), bg)
    found, _ = locate_block(image[None], point, OPTIONS)
    assert len(found)
    y, x = int(round(found["y"].iloc[0])), int(round(found["x"].iloc[0]))
    mask = np.zeros(DETECTOR, bool)
    mask[y, x + 2] = True  # one bad pixel inside the peak's disk
    np.save(tmp_path / "one.npy", mask)
    peaks, points = locate_block(image[None], point, dict(OPTIONS, mask=str(tmp_path / "one.npy")))
    assert len(peaks) == len(found) - 1
    assert points["n_rejected_masked"].iloc[0] == 1
    from crystalmapping.inspection import inspect_image

    result = inspect_image(image, dict(OPTIONS, mask=str(tmp_path / "one.npy")))
    assert result.counts()["masked"] == 1


def test_the_mask_travels_through_the_pipeline_and_is_recorded(tmp_path, thread_client):
    scan = _scan()
    ds = scan.to_dataset()
    key = scan.data_key
    ds[key] = ds[key].copy(data=ds[key].data.map_blocks(_with_gap, dtype=np.uint16))
    bg = int(scan.truth.attrs["background_point"])
    mask = str(_mask(tmp_path))
    maps = cm.process_run(ds, subtrahend=bg, locate=dict(OPTIONS, mask=mask), client=thread_client,
                          progress=False)
    assert (abs(maps["x"] - 98) > 6).all()  # no map from the gap
    assert maps.attrs["config"]["locate"]["mask"] == mask  # recorded with the maps
    assert int(maps["n_rejected_masked"].sum()) == maps.attrs["n_rejected_masked"]


def test_hot_pixels_of_a_background_frame_and_bad_mask_files(tmp_path):
    scan = _scan()
    bg = scan.frames(int(scan.truth.attrs["background_point"])).mean(axis=0)
    bg[5, 7] = 30000
    bg[60, 61] = 0
    assert {tuple(p) for p in np.argwhere(hot_pixels(bg))} == {(5, 7), (60, 61)}
    np.save(tmp_path / "bad.npy", np.arange(6).reshape(2, 3))
    with pytest.raises(ConfigError, match="must hold True/False or 0/1"):
        load_mask(tmp_path / "bad.npy")
    np.save(tmp_path / "small.npy", np.zeros((4, 4), bool))
    with pytest.raises(ConfigError, match=r"has shape \(4, 4\), the detector's images"):
        locate_block(np.ones((1, 8, 8), np.float32), 0, dict(OPTIONS, mask=str(tmp_path / "small.npy")))
    with pytest.raises(ConfigError, match="does not exist"):
        load_mask(tmp_path / "nope.npy")


def test_the_mask_command_writes_what_hot_pixels_finds(tmp_path, capsys):
    from crystalmapping.cli import main

    bg = np.full(DETECTOR, 100.0)
    bg[3, 4] = 9000
    np.save(tmp_path / "bg.npy", bg)
    gap = np.zeros(DETECTOR, bool)
    gap[GAP] = True
    np.save(tmp_path / "gap.npy", gap)
    assert main(["mask", "--from-background", str(tmp_path / "bg.npy"), "--add",
                 str(tmp_path / "gap.npy"), "-o", str(tmp_path / "mask.npy")]) == 0
    mask = np.load(tmp_path / "mask.npy")
    assert mask[3, 4] and mask[GAP].all() and mask.sum() == 1 + gap.sum()
    assert "pixels bad" in capsys.readouterr().out
