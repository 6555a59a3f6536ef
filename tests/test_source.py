"""crystalmapping.source: external HDF5 frames read from the file where it opens, through
tiled otherwise; the catalog's storage check kept; the root map; no lock around reads."""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import h5py
import hdf5plugin
import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping import frames as frames_module
from crystalmapping.frames import read_frames
from crystalmapping.sim import simulate_scan
from crystalmapping.source import PointFrames, _ArrayReader

KEY = "dexela_image"


def _tiled_frames(run, point):
    return np.asarray(run.tiled["primary"][KEY][point])


def _no_catalog_reads(monkeypatch):
    def refuse(self, rows):
        raise AssertionError("frames were read through the catalog")

    monkeypatch.setattr(_ArrayReader, "_read_catalog", refuse)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A catalog of its own (one catalog: each takes seconds to create) with small scans.

    ``plain``: external HDF5 in the catalog's detector directory; ``outside``: its file
    outside the catalog's readable storage; ``compressed``: its file rewritten with the
    bitshuffle/LZ4 filter, as area detectors write. Each is ``(scan, uid, file)``.
    """
    directory = tmp_path_factory.mktemp("small")
    catalog = cm.Catalog(directory / "catalog")
    out = {"catalog": catalog, "outside_dir": directory / "outside"}
    for name, seed in (("plain", 3), ("outside", 4), ("compressed", 5)):
        scan = simulate_scan(shape=(2, 3), detector_shape=(64, 48), grains=1, seed=seed)
        where = out["outside_dir"] if name == "outside" else catalog.detector_dir
        uid = catalog.ingest(scan.documents(external=True, directory=where))
        out[name] = (scan, uid, where / f"{uid}.h5")
    path = out["compressed"][2]
    with h5py.File(path, "r") as f:
        data = f["/entry/data"][()]
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("/entry/data", data=data, chunks=(1, *data.shape[1:]),
                         **hdf5plugin.Bitshuffle(cname="lz4"))
    return out


def test_external_frames_are_read_from_the_file_not_through_tiled(catalog, scans, monkeypatch):
    scan, uid = scans["rod"]
    run = catalog[uid]
    sources = run.frame_sources(KEY)
    assert len(sources) == scan.n_points and isinstance(sources[0], PointFrames)
    expected = {i: _tiled_frames(run, i) for i in (0, 9, scan.n_points - 1)}
    _no_catalog_reads(monkeypatch)
    for i, frames in expected.items():
        got = read_frames(sources[i])
        assert got.dtype == frames.dtype and got.shape == (2, 512, 512)
        np.testing.assert_array_equal(got, frames)
    # the notebook view reads the same way
    image = run.to_dataset(KEY, points_per_chunk=4)[KEY]
    np.testing.assert_array_equal(image[9].values, expected[9])
    np.testing.assert_array_equal(image[8:10].values[1], expected[9])


def test_references_are_small(catalog, scans):
    import pickle

    scan, uid = scans["rod"]
    sources = catalog[uid].frame_sources(KEY)
    assert len(pickle.dumps(sources[:1])) < 1000
    assert len(pickle.dumps(sources[:10])) < 1500  # the reader is shared within a task


def test_inline_frames_are_read_through_tiled(catalog, scans):
    scan, uid = scans["inline"]
    run = catalog[uid]
    sources = run.frame_sources(KEY)
    assert sources[0].reader.direct is None
    np.testing.assert_array_equal(read_frames(sources[5]), scan.frames(5))


def test_reads_from_a_tiled_server_need_no_lock(scans, tiled_server):
    """Reads through a tiled server (inline frames: always through tiled) from many threads
    at once give every point's frames; the scheduler is an argument of each read, not a
    process-wide setting."""
    import dask

    from crystalmapping import source

    url, api_key = tiled_server
    scan, uid = scans["inline"]
    sources = cm.Catalog(url, api_key=api_key)[uid].frame_sources(KEY)
    assert sources[0].reader.direct is None
    before = dask.config.get("scheduler", None)
    with source._EMBEDDED_READ_LOCK:  # held: only embedded catalogs' reads take it
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(read_frames, sources * 2))
    for i, frames in enumerate(got):
        np.testing.assert_array_equal(frames, scan.frames(i % scan.n_points))
    assert dask.config.get("scheduler", None) == before


def test_root_map_reads_the_file_where_this_machine_mounts_it(small, tmp_path, monkeypatch):
    catalog = small["catalog"]
    scan, uid, path = small["plain"]
    mount = tmp_path / "mount"
    mount.mkdir()
    shutil.copy(path, mount / path.name)
    with h5py.File(mount / path.name, "r+") as f:  # mark the copy, to see which file is read
        f["/entry/data"][4] = f["/entry/data"][4] + 1
    mapped = cm.Catalog(catalog.directory, root_map=[f"{catalog.detector_dir}={mount}"])
    source = mapped[uid].frame_sources(KEY)[4]
    assert source.reader.direct.path == str(mount / path.name)
    _no_catalog_reads(monkeypatch)
    np.testing.assert_array_equal(read_frames(source), scan.frames(4) + 1)
    # the same run opened without the map reads the detector's own file
    np.testing.assert_array_equal(read_frames(catalog[uid].frame_sources(KEY)[4]), scan.frames(4))
    # process_run's root_map overrides the catalog's
    sources = mapped[uid].frame_sources(KEY, root_map={})
    assert sources[0].reader.direct.path == str(path)


def test_a_file_the_worker_cannot_open_is_read_through_tiled(small, tmp_path, caplog):
    catalog = small["catalog"]
    scan, uid, path = small["plain"]
    nowhere = tmp_path / "not-mounted"
    run = cm.Catalog(catalog.directory, root_map={str(catalog.detector_dir): str(nowhere)})[uid]
    sources = run.frame_sources(KEY)
    with caplog.at_level(logging.WARNING, logger="crystalmapping.source"):
        for i in range(scan.n_points):
            np.testing.assert_array_equal(read_frames(sources[i]), scan.frames(i))
    warnings = [r.getMessage() for r in caplog.records if "through the catalog" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per file and process
    assert str(nowhere / path.name) in warnings[0] and "--root-map" in warnings[0]


def test_a_file_outside_the_readable_storage_is_never_opened(small, monkeypatch):
    """A document naming a file outside the catalog's readable storage: tiled refuses to
    serve it, and it is not opened directly either (with or without a root map)."""
    catalog, outside = small["catalog"], small["outside_dir"]
    scan, uid, path = small["outside"]
    opened = []
    original = frames_module.read_rows
    monkeypatch.setattr(frames_module, "read_rows",
                        lambda source, **kw: opened.append(source) or original(source, **kw))
    for root_map in (None, {str(outside): str(outside)}):
        run = cm.Catalog(catalog.directory, root_map=root_map)[uid]
        sources = run.frame_sources(KEY)
        assert sources[0].reader.direct is None
        with pytest.raises(Exception, match="outside|Refusing"):
            read_frames(sources[0])
    assert opened == []
    # adding the directory to the readable storage allows both
    run = cm.Catalog(catalog.directory, readable_storage=[outside])[uid]
    assert run.frame_sources(KEY)[0].reader.direct is not None
    np.testing.assert_array_equal(read_frames(run.frame_sources(KEY)[1]), scan.frames(1))


def test_compressed_detector_files_through_both_paths(small, monkeypatch):
    scan, uid, path = small["compressed"]
    with h5py.File(path, "r") as f:
        assert f["/entry/data"].id.get_create_plist().get_nfilters() == 1
    run = small["catalog"][uid]
    expected = [_tiled_frames(run, i) for i in range(scan.n_points)]  # tiled decompresses too
    sources = run.frame_sources(KEY)
    _no_catalog_reads(monkeypatch)
    for i in range(scan.n_points):
        np.testing.assert_array_equal(read_frames(sources[i]), expected[i])
        np.testing.assert_array_equal(expected[i], scan.frames(i))


def test_a_served_catalog_is_read_directly_when_the_server_serves_the_file(
        catalog, scans, tiled_server, tmp_path, monkeypatch):
    url, api_key = tiled_server
    scan, uid = scans["rod"]
    served = cm.Catalog(url, api_key=api_key)
    run = served[uid]
    sources = run.frame_sources(KEY)
    assert sources[0].reader.direct is not None
    expected = _tiled_frames(run, 3)
    np.testing.assert_array_equal(expected, scan.frames(3))
    with monkeypatch.context() as m:
        _no_catalog_reads(m)
        np.testing.assert_array_equal(read_frames(sources[3]), expected)
    # a run whose file the server would refuse (outside its readable storage) is not
    # opened directly either: the check stays the server's
    other = simulate_scan(shape=(2, 2), detector_shape=(32, 32), grains=1, seed=6)
    refused = catalog.ingest(other.documents(external=True, directory=tmp_path / "outside"))
    assert served[refused].frame_sources(KEY)[0].reader.direct is None
