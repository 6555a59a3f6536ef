"""ophyd v1 area detectors: Resource/Datum documents and compressed HDF5, live and batch.

An ophyd v1-style detector (:class:`HDF5AreaDetector`, as ophyd's FileStore
mixins do it) writes each point's frames into one HDF5 file, compressed with
an ``hdf5plugin`` filter and open for SWMR, a little after the point's event
(a file plugin that lags behind), and describes them by ``resource``
(``AD_HDF5_SWMR``, ``frame_per_point``) and ``datum`` (``point_number``)
documents; its events hold datum ids. A real ``RunEngine`` scans it over two
``ophyd.sim`` motors, publishes through the real 0MQ proxy to ``crystalmapping
serve`` and records into a catalog with bluesky-tiled-plugins' ``TiledWriter``
(which converts Resource/Datum to StreamResource/StreamDatum). The served maps
must equal the batch pipeline's of the stored run.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from event_model import pack_datum_page, pack_event_page

import crystalmapping as cm
from crystalmapping.publish import live_documents
from crystalmapping.sim import simulate_scan
from crystalmapping.stream import StreamProcessor
from crystalmapping.wire import packb
import test_serve
from test_serve import (BACKGROUND, CONFIG, SMALL, assert_same_maps, batch_maps, handshake,
                        wait_for_report)

#: test_serve's module fixtures: the proxy, the catalog the RunEngine records into, and serve.
proxy, raw_catalog, server = test_serve.proxy, test_serve.raw_catalog, test_serve.server

_T0 = time.monotonic()
BLOSC_LZ4_BITSHUFFLE = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE)


class HDF5AreaDetector:
    """An ophyd v1-style area detector whose file plugin writes HDF5 (Resource/Datum).

    ``stage`` opens ``<uuid>.h5`` in ``directory`` (``/entry/data/data``, chunked
    per frame, compressed, SWMR) and caches its ``resource`` document;
    ``trigger`` takes the frames of the point under the motors, hands them to
    a writer thread that appends them ``lag`` seconds later, and caches a
    ``datum`` (``point_number`` counts triggers from 0); ``read`` gives the
    datum id; ``collect_asset_docs`` yields the cached documents (the
    RunEngine takes resource and datum documents from devices, not pages).
    """

    def __init__(self, scan, y, x, directory: Path, *, spec: str = "AD_HDF5_SWMR",
                 compression=BLOSC_LZ4_BITSHUFFLE, lag: float = 0.05):
        self.scan, self.y, self.x, self.directory = scan, y, x, Path(directory)
        self.spec, self.compression, self.lag = spec, compression, lag
        self.name, self.parent = scan.data_key, None
        self._assets: deque = deque()
        self._reading: dict = {}
        self.path: Path | None = None
        self.grid_points: list[int] = []  # the grid point of each trigger

    # ---------------------------------------------------------------- ophyd protocol
    def stage(self):
        K, (M, N) = self.scan.frames_per_point, self.scan.detector_shape
        self._uid = str(uuid.uuid4())
        self.path = self.directory / f"{self._uid}.h5"
        self._file = h5py.File(self.path, "w", libver="latest")
        self._data = self._file.create_dataset(
            "/entry/data/data", shape=(0, M, N), maxshape=(None, M, N), chunks=(1, M, N),
            dtype="<u2", **self.compression)
        self._file.swmr_mode = True
        self._points = itertools.count()
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._writer.start()
        self._assets.append(("resource", {
            "spec": self.spec, "root": str(self.directory), "resource_path": self.path.name,
            "resource_kwargs": {"frame_per_point": K}, "path_semantics": "posix",
            "uid": self._uid}))
        return [self]

    def unstage(self):
        self._queue.put(None)
        self._writer.join()
        self._file.close()
        return [self]

    def trigger(self):
        from ophyd.status import Status

        point_number = next(self._points)
        self.grid_points.append(self._grid_point())
        self._queue.put(self.scan.frames(self.grid_points[-1]))
        datum_id = f"{self._uid}/{point_number}"
        self._assets.append(("datum", {"resource": self._uid, "datum_id": datum_id,
                                       "datum_kwargs": {"point_number": point_number}}))
        self._reading = {self.name: {"value": datum_id, "timestamp": time.time()}}
        status = Status(obj=self)
        status.set_finished()
        return status

    def read(self):
        return dict(self._reading)

    def describe(self):
        K, (M, N) = self.scan.frames_per_point, self.scan.detector_shape
        return {self.name: {"source": "sim-ad-hdf5", "dtype": "array", "dtype_numpy": "<u2",
                            "shape": [K, M, N], "external": "FILESTORE:"}}

    def read_configuration(self):
        return {}

    def describe_configuration(self):
        return {}

    def collect_asset_docs(self):
        while self._assets:
            yield self._assets.popleft()

    # ---------------------------------------------------------------- internals
    def _grid_point(self) -> int:
        grid = self.scan.grid
        (y0, y1), (x0, x1) = grid.extents
        rows, cols = grid.shape
        r = int(round((self.y.position - y0) / (y1 - y0) * (rows - 1)))
        c = int(round((self.x.position - x0) / (x1 - x0) * (cols - 1)))
        return r * cols + (cols - 1 - c if r % 2 else c)  # snaking: odd rows go back

    def _write(self):
        while (frames := self._queue.get()) is not None:
            time.sleep(self.lag)  # the event has gone; its frames are not in the file yet
            n = self._data.shape[0]
            self._data.resize(n + len(frames), axis=0)
            self._data[n:] = frames
            self._data.flush()


def ad_grid_scan(scan, directory, **kwargs):
    """bluesky's grid_scan (snaking) of the area detector over two sim motors."""
    import bluesky.plans as bp
    from ophyd.sim import SynAxis

    y, x = SynAxis(name=scan.grid.motors[0]), SynAxis(name=scan.grid.motors[1])
    det = HDF5AreaDetector(scan, y, x, directory, **kwargs)
    (y0, y1), (x0, x1) = scan.grid.extents
    plan = bp.grid_scan([det], y, y0, y1, scan.grid.shape[0], x, x0, x1, scan.grid.shape[1],
                        snake_axes=True)
    return plan, det


class Paged:
    """Publish a run as the pages a RunRouter or a batching relay sends: events in pages
    of ``size``, each page sent *before* the datums it names (held, then sent as one
    ``datum_page``)."""

    def __init__(self, send, size: int = 5):
        self.send, self.size = send, size
        self.events: list = []
        self.datums: list = []

    def __call__(self, name, doc):
        if name == "datum":
            self.datums.append(doc)
        elif name == "event":
            self.events.append(doc)
            if len(self.events) == self.size:
                self.flush()
        else:
            if name == "stop":
                self.flush()
            self.send(name, doc)

    def flush(self):
        if self.events:
            self.send("event_page", pack_event_page(*self.events))
        if self.datums:
            self.send("datum_page", pack_datum_page(*self.datums))
        self.events, self.datums = [], []


@pytest.fixture(scope="module")
def connecting(raw_catalog):
    """The embedded catalog's first connection (seconds), made while serve starts."""
    thread = threading.Thread(target=lambda: raw_catalog.client, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def engine(connecting, proxy, raw_catalog, server):
    """A RunEngine recording into ``raw_catalog`` (TiledWriter) and a publisher to the proxy."""
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    t0 = time.monotonic()
    print(f"proxy and serve up {t0 - _T0:.1f} s after the module's import")
    connecting.join()
    raw_catalog.client
    t1 = time.monotonic()
    RE = RunEngine({})
    publisher = Publisher(proxy.in_address, prefix=b"raw", serializer=packb)
    handshake(lambda tag: publisher(tag, {}), server, "ad-probe")
    RE.subscribe(raw_catalog.insert)
    print(f"catalog connected in {t1 - t0:.1f} s")
    yield RE, publisher
    publisher.close()


def _scan(seed: int, **kwargs):
    scan = simulate_scan(seed=seed, **{**SMALL, **kwargs})
    row, col = scan.grid.indices([BACKGROUND])
    assert scan.truth["amplitude"].sum("peak").values[row[0], col[0]] == 0
    assert scan.frames_per_point == 2  # each datum names 2 rows of the file
    return scan


@pytest.fixture(scope="module")
def served_run(engine, server, raw_catalog, batch_client, tmp_path_factory):
    """An AD_HDF5_SWMR scan (Blosc-LZ4 + bitshuffle) mapped live; its stored run and batch maps."""
    RE, publisher = engine
    scan = _scan(seed=3)
    plan, det = ad_grid_scan(scan, raw_catalog.detector_dir)
    token = RE.subscribe(publisher)
    try:
        t0 = time.monotonic()
        (uid,) = RE(plan)
        t1 = time.monotonic()
        report = wait_for_report(server.report, uid)
        t2 = time.monotonic()
    finally:
        RE.unsubscribe(token)
    run = raw_catalog[uid]
    batch = batch_maps(run, batch_client, tmp_path_factory.mktemp("batch"))
    print(f"AD_HDF5 scan {t1 - t0:.1f} s, served maps {t2 - t1:.1f} s after the scan, batch "
          f"{time.monotonic() - t2:.1f} s")
    return uid, run, report, batch, det


def test_ad_hdf5_scan_is_served_equal_to_batch(served_run, server):
    uid, run, report, batch, det = served_run
    with h5py.File(det.path, "r") as f:  # really compressed, with frame_per_point rows per point
        assert f["/entry/data/data"].shape == (80, 128, 128)
        plist = f["/entry/data/data"].id.get_create_plist()
        assert plist.get_filter(0)[0] == hdf5plugin.BLOSC_ID
    # TiledWriter stored the Resource/Datum as a StreamResource of the same file
    names = [n for n, _ in run.documents()]
    assert "stream_resource" in names and "resource" not in names and "datum" not in names
    served = cm.open_maps(server.out_dir / f"{uid}.zarr")
    assert_same_maps(served, batch)
    assert served.attrs["exit_status"] == "success" and served.attrs["failed_points"] == []
    assert int(served["measured"].sum()) == 40 and served.sizes["grain"] >= 2
    assert report["points"] == 40 and report["failed"] == 0


def test_event_pages_before_their_datum_pages(engine, server, raw_catalog, batch_client,
                                              tmp_path):
    """Pages of events sent before the datum pages that name their frames; LZ4; AD_HDF5."""
    RE, publisher = engine
    scan = _scan(seed=11, shape=(5, 4), detector_shape=(64, 64))
    plan, _ = ad_grid_scan(scan, raw_catalog.detector_dir, spec="AD_HDF5",
                           compression=hdf5plugin.LZ4())
    paged = Paged(publisher, size=6)
    token = RE.subscribe(paged)
    try:
        (uid,) = RE(plan)
    finally:
        RE.unsubscribe(token)
    report = wait_for_report(server.report, uid)
    served = cm.open_maps(server.out_dir / f"{uid}.zarr")
    assert report["points"] == 20 and report["failed"] == 0
    assert_same_maps(served, batch_maps(raw_catalog[uid], batch_client, tmp_path))


def test_the_stored_run_replays_as_stored(served_run, raw_catalog, tmp_path):
    """publish's documents of the stored run (StreamResource/StreamDatum as TiledWriter
    converted them, frame_per_point frames per index) give the same maps."""
    uid, run, _, batch, _ = served_run
    docs = list(live_documents(run))
    assert {"stream_resource", "stream_datum"} <= {n for n, _ in docs}
    with ThreadPoolExecutor(2) as pool:
        proc = StreamProcessor(pool, CONFIG, tmp_path, data_roots=[raw_catalog.detector_dir])
        for name, doc in docs:
            proc(name, doc)
        maps = proc.wait(60)
    assert maps.attrs["failed_points"] == []
    assert_same_maps(maps, batch)


# ----------------------------------------------------------------------------- refusals


def _documents(tmp_path, **kwargs):
    """A small scan of the detector, its documents collected in order."""
    from bluesky import RunEngine

    scan = simulate_scan(seed=2, shape=(3, 2), detector_shape=(32, 32), grains=1)
    plan, det = ad_grid_scan(scan, tmp_path, lag=0.0, **kwargs)
    docs: list = []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(plan)
    return docs, det


def _process(docs, out, **kwargs):
    with ThreadPoolExecutor(1) as pool:
        proc = StreamProcessor(pool, cm.ProcessConfig(background=0), out, read_timeout=1.0,
                               **kwargs)
        for name, doc in docs:
            proc(name, doc)
        return proc.wait(60)


def test_other_specs_files_outside_the_roots_and_missing_datums_fail_their_points(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    docs, _ = _documents(data)
    ok = _process(docs, tmp_path / "ok", data_roots=[str(data)])
    assert ok.attrs["failed_points"] == [] and int(ok["measured"].sum()) == 6

    tiff = [(n, {**d, "spec": "AD_TIFF"} if n == "resource" else d) for n, d in docs]
    maps = _process(tiff, tmp_path / "tiff")
    assert len(maps.attrs["failed_points"]) == 6
    assert all("'AD_TIFF'" in r and "Filler" in r for r in maps.attrs["failure_reasons"])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    maps = _process(docs, tmp_path / "roots", data_roots=[str(elsewhere)])
    assert len(maps.attrs["failed_points"]) == 6
    assert all("outside the data roots" in r for r in maps.attrs["failure_reasons"])

    lost = [(n, d) for n, d in docs if not (n == "datum" and d["datum_kwargs"]["point_number"] == 4)]
    maps = _process(lost, tmp_path / "lost")
    assert maps.attrs["failed_points"] == [4]
    assert "never sent" in maps.attrs["failure_reasons"][0]


def test_the_tutorial_image_processor_with_a_filler(tmp_path):
    """ImageProcessor takes frames: datum references are filled first with event_model's
    Filler and crystalmapping's handlers (which read the compressed rows)."""
    from event_model import Filler

    from crystalmapping.callbacks import ImageProcessor
    from crystalmapping.errors import ScanError
    from crystalmapping.references import HANDLERS
    from crystalmapping.preprocess import preprocess_frames

    docs, det = _documents(tmp_path)
    background = det.scan.expected_background()
    images = {}

    def collect(name, doc):
        if name == "event":
            images[doc["seq_num"]] = doc["data"][det.name]

    ip = ImageProcessor(det.name, subtrahend=background)
    ip.subscribe(collect)
    with pytest.raises(ScanError, match="Filler"):
        for name, doc in docs:
            ip(name, doc)

    ip = ImageProcessor(det.name, subtrahend=background)
    ip.subscribe(collect)
    with Filler(HANDLERS, inplace=False) as filler:
        for name, doc in docs:
            ip(*filler(name, doc))
    assert sorted(images) == list(range(1, 7))
    for seq_num, image in images.items():
        frames = det.scan.frames(det.grid_points[seq_num - 1])
        np.testing.assert_array_equal(image, preprocess_frames(frames, background,
                                                               warn_empty=False))
