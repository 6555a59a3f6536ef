"""crystalmapping.frames: HDF5 rows read where the detector wrote them, compressed or not,
through a root map; errors that say what to do."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest

from crystalmapping.errors import ConfigError
from crystalmapping.frames import (DamagedFileError, FrameReadError, HDF5Rows, close_files,
                                   read_frames)
from crystalmapping.references import hdf5_rows, map_root, parse_root_map

RESOURCE = {"uri": "file://localhost/detector/data/scan.h5", "mimetype": "application/x-hdf5",
            "parameters": {"dataset": "/entry/data"}}
DATUM = {"indices": {"start": 0, "stop": 2}, "seq_nums": {"start": 1, "stop": 3}}


def _frames(n_points=3, n_frames=2, shape=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    # detector-like counts: mostly small, a few bright pixels (compressible, not trivially)
    frames = rng.poisson(20, size=(n_points, n_frames, *shape)).astype(np.uint16)
    frames[:, :, 10, 10] = 60000
    return frames


def _write(path, frames, **compression):
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data", data=frames, chunks=(1, *frames.shape[1:]), **compression)
    return str(path)


FILTERS = {
    "blosc": lambda: hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE),
    "blosc-zstd": lambda: hdf5plugin.Blosc(cname="zstd", clevel=3,
                                           shuffle=hdf5plugin.Blosc.BITSHUFFLE),
    "lz4": lambda: hdf5plugin.LZ4(),
    "bitshuffle": lambda: hdf5plugin.Bitshuffle(cname="lz4"),
    "bitshuffle-zstd": lambda: hdf5plugin.Bitshuffle(cname="zstd"),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_compressed_area_detector_files_are_read(tmp_path, name):
    frames = _frames(seed=len(name))
    path = _write(tmp_path / f"{name}.h5", frames, **FILTERS[name]())
    with h5py.File(path, "r") as f:  # really compressed with that filter
        assert f["/entry/data"].id.get_create_plist().get_nfilters() == 1
    for point in range(frames.shape[0]):
        got = read_frames(HDF5Rows(path, "/entry/data", point, point + 1), timeout=0)
        np.testing.assert_array_equal(got, frames[point])
        assert got.dtype == np.uint16
    close_files()


def test_rows_of_several_points_and_images_without_a_frame_axis(tmp_path):
    frames = _frames(n_points=4, n_frames=1)[:, 0]  # (4, M, N): one image per row
    path = _write(tmp_path / "images.h5", frames)
    got = read_frames(HDF5Rows(path, "/entry/data", 1, 3), timeout=0)
    np.testing.assert_array_equal(got, frames[1:3])
    close_files()


def test_a_missing_file_says_where_and_how_to_map_it(tmp_path):
    source = HDF5Rows(str(tmp_path / "nowhere" / "scan.h5"), "/entry/data", 0, 1)
    with pytest.raises(FrameReadError) as info:
        read_frames(source, timeout=0)
    message = str(info.value)
    assert "scan.h5" in message and "no such file" in message
    assert "--root-map OLD=NEW" in message


def test_missing_rows_and_dataset_are_reported_after_the_timeout(tmp_path):
    path = _write(tmp_path / "short.h5", _frames(n_points=2))
    with pytest.raises(FrameReadError, match=r"rows 2\.\.2 .*it has 2 rows.*after 0\.05 s"):
        read_frames(HDF5Rows(path, "/entry/data", 2, 3), timeout=0.05)
    with pytest.raises(FrameReadError, match="'/entry/other'"):
        read_frames(HDF5Rows(path, "/entry/other", 0, 1), timeout=0)
    close_files()


def test_a_file_cut_inside_a_row_of_several_chunks_is_refused(tmp_path):
    """HDF5 reads bytes past the end of a file as zeros: the reader must see the cut."""
    frames = _frames(n_points=2, n_frames=1)[:, 0]
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w", libver="latest") as f:  # as detectors write (SWMR-ready)
        f.create_dataset("/entry/data", data=frames, chunks=(1,) + tuple(
            n // 2 for n in frames.shape[1:]))
    with h5py.File(path, "r") as f:
        d = f["/entry/data"].id
        chunks = [d.get_chunk_info(i) for i in range(d.get_num_chunks())]
    last = max(chunks, key=lambda c: c.byte_offset)
    assert last.chunk_offset[1:] != (0, 0)  # the chunk the cut spoils is not a row's first
    with open(path, "r+b") as f:
        f.truncate(last.byte_offset + last.size // 2)
    with pytest.raises(DamagedFileError, match=r"not a whole HDF5 file \(truncated file: rows"):
        read_frames(HDF5Rows(str(path), "/entry/data", last.chunk_offset[0],
                             last.chunk_offset[0] + 1), timeout=0)
    close_files()


def test_root_map_parsing_and_matching():
    assert parse_root_map(None) == ()
    assert parse_root_map("/a=/b") == (("/a", "/b"),)
    rm = parse_root_map({"/detector": "/mnt/det", "/detector/data/": "/fast"})
    assert rm == (("/detector/data", "/fast"), ("/detector", "/mnt/det"))  # longest first
    assert map_root("/detector/data/scan.h5", rm) == "/fast/scan.h5"
    assert map_root("/detector/other/scan.h5", rm) == "/mnt/det/other/scan.h5"
    assert map_root("/detectorX/scan.h5", rm) == "/detectorX/scan.h5"  # whole components only
    assert map_root("/elsewhere/scan.h5", rm) == "/elsewhere/scan.h5"
    assert parse_root_map(rm) == rm  # already parsed: unchanged


@pytest.mark.parametrize("entry, words", [
    ("/a:/b", ["OLD=NEW", "'/a:/b'"]),
    ("=/b", ["OLD=NEW"]),
    ("relative=/b", ["absolute", "'relative'"]),
    ("/a=b", ["absolute", "'b'"]),
])
def test_root_map_errors_say_the_rule_the_value_and_the_fix(entry, words):
    with pytest.raises(ConfigError) as info:
        parse_root_map([entry])
    for word in words + ["/detector/data=/mnt/beamline/data"]:
        assert word in str(info.value)
    with pytest.raises(ConfigError, match="twice"):
        parse_root_map(["/a=/b", "/a/=/c"])


def test_stream_documents_are_mapped_to_the_local_mount():
    points = hdf5_rows(RESOURCE, DATUM, parse_root_map(["/detector=/mnt/det"]))
    assert [p for p, _ in points] == [0, 1]
    assert {rows.path for _, rows in points} == {"/mnt/det/data/scan.h5"}
    # the document checks stay: only file:// URIs of this host are opened
    with pytest.raises(Exception, match="another host|on host"):
        hdf5_rows(dict(RESOURCE, uri="file://beamline-pc/detector/data/scan.h5"), DATUM)
    with pytest.raises(Exception, match="local file"):
        hdf5_rows(dict(RESOURCE, uri="https://example.org/scan.h5"), DATUM)


def test_the_filters_are_registered_by_read_frames_itself(tmp_path):
    """A worker that imported nothing but crystalmapping reads a Blosc file."""
    import subprocess
    import sys

    frames = _frames(n_points=1)
    path = _write(tmp_path / "blosc.h5", frames, **FILTERS["blosc"]())
    code = ("import sys; from crystalmapping.frames import HDF5Rows, read_frames; "
            "assert 'hdf5plugin' not in sys.modules; "
            f"print(int(read_frames(HDF5Rows({path!r}, '/entry/data', 0, 1), timeout=0)"
            ".astype('int64').sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == int(frames.astype(np.int64).sum())


def test_a_task_reuses_its_buffers_and_gets_the_same_peaks(tmp_path):
    """Rows read into a task's reused workspace (compressed or not) give the same frames,
    and consecutive tasks on one thread give each point's own peaks, not the last's."""
    from crystalmapping import sim
    from crystalmapping.config import LocateOptions
    from crystalmapping.locate import locate_block
    from crystalmapping.preprocess import preprocess_frames
    from crystalmapping.tasks import _workspace, process_point, process_points

    scan = sim.simulate_scan(shape=(2, 2), detector_shape=(96, 80), grains=2, seed=3)
    frames = np.stack([scan.frames(i) for i in range(4)]).astype(np.uint16)
    path = _write(tmp_path / "scan.h5", frames.reshape((-1,) + frames.shape[2:]),
                  **FILTERS["bitshuffle"]())
    n = frames.shape[1]
    rows = [HDF5Rows(path, "/entry/data", n * p, n * (p + 1)) for p in range(4)]
    buffer = _workspace("frames")
    for p in (0, 3, 1):
        got = read_frames(rows[p], timeout=0, buffer=buffer)
        np.testing.assert_array_equal(got, frames[p])
        assert np.shares_memory(got, buffer(got.shape, got.dtype))  # the same array, reused
    opts = LocateOptions(diameter=7).to_dict()
    for p in (2, 0, 3):
        fresh = locate_block(preprocess_frames(frames[p], None, warn_empty=False)[None], p, opts)
        reused = process_point(rows[p], None, p, opts, read_timeout=0)
        for a, b in zip(fresh, reused):
            assert a.equals(b)
    both = process_points(rows[1:3], None, 1, opts, read_timeout=0)[1]
    assert list(both["frame"]) == [1, 2]
    close_files()


def test_preprocess_writes_into_out_or_says_what_out_must_be():
    from crystalmapping.preprocess import preprocess_frames

    frames = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    out = np.full((3, 4), -1, np.float32)
    assert preprocess_frames(frames, out=out) is out
    np.testing.assert_array_equal(out, preprocess_frames(frames))
    with pytest.raises(ConfigError, match="out must be a C-contiguous float32 array"):
        preprocess_frames(frames, out=np.empty((3, 4)))
