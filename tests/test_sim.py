"""Unit tests of crystalmapping.sim: simulated grid scans and their bluesky documents."""

import h5py
import numpy as np
import pytest

from crystalmapping.errors import ConfigError
from crystalmapping.grid import Grid
from crystalmapping.sim import simulate_scan

SMALL = dict(shape=(6, 4), detector_shape=(64, 64), grains=2, frames_per_point=3)


def test_same_seed_same_scan_other_seed_differs():
    a = simulate_scan(seed=1, **SMALL)
    b = simulate_scan(seed=1, **SMALL)
    c = simulate_scan(seed=2, **SMALL)
    assert a.truth.identical(b.truth)
    for i in (0, 5, 23):
        np.testing.assert_array_equal(a.frames(i), b.frames(i))
    assert not np.array_equal(a.frames(0), c.frames(0))
    assert not np.array_equal(a.truth["y"].values, c.truth["y"].values)


def test_frames_dtype_and_shape():
    scan = simulate_scan(seed=0, **SMALL)
    frames = scan.frames(7)
    assert frames.dtype == np.uint16 and frames.shape == (3, 64, 64)
    # Poisson noise around the noise-free image
    np.testing.assert_allclose(frames.mean(axis=0).mean(), scan.expected_image(7).mean(), rtol=0.05)
    assert not np.array_equal(frames[0], frames[1])


def test_truth_layout():
    scan = simulate_scan(seed=3, peaks_per_grain=2, **SMALL)
    assert scan.truth["amplitude"].dims == ("peak", "row", "col")
    assert scan.truth["amplitude"].shape == (4, 6, 4)
    assert scan.truth["grain"].values.tolist() == [0, 0, 1, 1]
    assert scan.grid == Grid(shape=(6, 4), extents=((0.0, 1.25), (0.0, 0.75)),
                             snaking=(False, True), motors=("sample_y", "sample_x"))
    assert (scan.truth["amplitude"].values >= 0).all()


@pytest.mark.parametrize("grains, snaking", [(2, True), (2, False), ("reference", True)])
def test_background_point_is_off_the_sample(grains, snaking):
    scan = simulate_scan(shape=(6, 4), detector_shape=(64, 64), grains=grains,
                         snaking=snaking, seed=1)
    point = scan.truth.attrs["background_point"]
    (row,), (col,) = scan.grid.indices([point])
    assert (scan.truth["amplitude"].values[:, row, col] == 0).all()
    assert scan.truth["powder"].values[row, col] == 0
    assert scan.truth["amplitude"].values.sum() > 0
    np.testing.assert_allclose(scan.expected_image(point), scan.expected_background())


def test_stop_after_aborts_with_that_many_events():
    scan = simulate_scan(seed=0, stop_after=5, **SMALL)
    assert scan.exit_status == "abort" and scan.n_points == 5
    docs = list(scan.documents(external=False))
    names = [name for name, _ in docs]
    assert names == ["start", "descriptor"] + ["event"] * 5 + ["stop"]
    start, stop = docs[0][1], docs[-1][1]
    assert stop["exit_status"] == "abort" and stop["run_start"] == start["uid"]
    assert stop["num_events"] == {"primary": 5}
    events = [doc for name, doc in docs if name == "event"]
    assert [e["seq_num"] for e in events] == [1, 2, 3, 4, 5]
    for i, event in enumerate(events):
        np.testing.assert_array_equal(event["data"]["dexela_image"], scan.frames(i))
    # motor positions follow the snaking grid: point 4 is row 1, last column
    assert events[4]["data"]["sample_y"] == 0.25 and events[4]["data"]["sample_x"] == 0.75


def test_complete_scan_succeeds_and_start_holds_the_grid():
    scan = simulate_scan(seed=0, stop_after=100, **SMALL)
    assert scan.exit_status == "success" and scan.n_points == 24
    docs = scan.documents(external=False)
    name, start = next(docs)
    assert name == "start"
    assert Grid.from_start(start) == scan.grid
    assert start["num_points"] == 24 and start["plan_name"] == "grid_scan"
    assert start["simulation"]["background_point"] == scan.truth.attrs["background_point"]


def test_external_documents_write_hdf5(tmp_path):
    scan = simulate_scan(seed=4, stop_after=3, **SMALL)
    docs = list(scan.documents(external=True, directory=tmp_path))
    names = [name for name, _ in docs]
    assert names == (["start", "descriptor", "stream_resource"]
                     + ["stream_datum", "event"] * 3 + ["stop"])
    start = docs[0][1]
    descriptor = docs[1][1]
    resource = docs[2][1]
    assert descriptor["data_keys"]["dexela_image"]["external"] == "STREAM:"
    assert descriptor["data_keys"]["dexela_image"]["shape"] == [3, 64, 64]
    assert resource["mimetype"] == "application/x-hdf5"
    assert resource["parameters"]["dataset"] == "/entry/data"
    path = tmp_path / f"{start['uid']}.h5"
    assert resource["uri"] == f"file://localhost{path.absolute()}"
    datums = [doc for name, doc in docs if name == "stream_datum"]
    assert [d["indices"] for d in datums] == [{"start": i, "stop": i + 1} for i in range(3)]
    assert all(d["stream_resource"] == resource["uid"] for d in datums)
    assert all(d["descriptor"] == descriptor["uid"] for d in datums)
    events = [doc for name, doc in docs if name == "event"]
    assert all("dexela_image" not in e["data"] for e in events)
    with h5py.File(path, "r") as f:
        data = f["/entry/data"]
        assert data.shape == (3, 3, 64, 64) and data.dtype == np.uint16
        for i in range(3):
            np.testing.assert_array_equal(data[i], scan.frames(i))


def test_stream_datum_seq_nums_match_events(tmp_path):
    scan = simulate_scan(seed=4, stop_after=3, **SMALL)
    docs = list(scan.documents(external=True, directory=tmp_path))
    datums = [doc for name, doc in docs if name == "stream_datum"]
    assert [d["seq_nums"] for d in datums] == [{"start": i + 1, "stop": i + 2} for i in range(3)]


def test_external_without_directory_fails_before_any_document():
    scan = simulate_scan(seed=0, stop_after=2, **SMALL)
    with pytest.raises(ConfigError, match="directory"):
        next(scan.documents(external=True))


def test_external_without_directory_raises():
    scan = simulate_scan(seed=0, stop_after=2, **SMALL)
    with pytest.raises(ConfigError, match="directory"):
        list(scan.documents(external=True))


def test_invalid_arguments():
    with pytest.raises(ConfigError, match=r"at least \(2, 2\)"):
        simulate_scan(shape=(1, 5), detector_shape=(64, 64))
    with pytest.raises(ConfigError, match="cannot place"):
        simulate_scan(shape=(4, 4), detector_shape=(32, 32), grains=3, peaks_per_grain=4,
                      min_peak_distance=30)
