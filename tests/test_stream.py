"""The streaming processor against the batch pipeline, on real documents, files and clusters.

Each scan is fed as its bluesky documents straight into a StreamProcessor; the
same documents are ingested into an embedded catalog and mapped by
``process_run``; the two stores must hold the same maps, value for value.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
from event_model import RunRouter

import crystalmapping as cm
from crystalmapping.config import ProcessConfig
from crystalmapping.errors import ConfigError, StoreError
from crystalmapping.sim import simulate_scan
from crystalmapping.stream import StreamProcessor, processor_factory

SMALL = dict(shape=(8, 5), detector_shape=(128, 128), grains=2)
#: Attributes only the stream writes (the batch pipeline raises instead of listing failures).
STREAM_ONLY = {"exit_status", "failed_points", "failure_reasons"}


def assert_same_maps(stream: xr.Dataset, batch: xr.Dataset, *, ignore=()) -> None:
    """Every variable, coordinate and attribute equal, but the write time (and ``ignore``)."""
    s, b = stream.load().copy(), batch.load().copy()
    s.attrs = {k: v for k, v in s.attrs.items() if k not in STREAM_ONLY | {"created", "history", *ignore}}
    b.attrs = {k: v for k, v in b.attrs.items() if k not in {"created", "history", *ignore}}
    xr.testing.assert_identical(s, b)


class ShuffledExecutor:
    """An executor that holds its tasks until :meth:`run`, then runs them in a random order.

    Tasks submitted while it runs (the points that waited for the background)
    join the shuffle. Real ``concurrent.futures.Future`` objects, set as each
    task finishes.
    """

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.tasks: list = []

    def submit(self, fn, *args, **kwargs) -> Future:
        future = Future()
        self.tasks.append((future, fn, args, kwargs))
        return future

    def run(self) -> None:
        while self.tasks:
            future, fn, args, kwargs = self.tasks.pop(self.rng.randrange(len(self.tasks)))
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(*args, **kwargs))
            except Exception as exc:
                future.set_exception(exc)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture(scope="module")
def reference(catalog, batch_client, tmp_path_factory):
    """A complete scan: its documents (frames in HDF5), its run in a catalog, its batch maps.

    The background is the scan's last point, so every other point must wait for it.
    """
    scan = simulate_scan(seed=5, **SMALL)
    docs = list(scan.documents(external=True, directory=catalog.detector_dir))
    uid = catalog.ingest(docs)
    background = int(scan.truth.attrs["background_point"])
    assert background == scan.n_points - 1
    config = ProcessConfig(background=background)
    out = tmp_path_factory.mktemp("batch") / "maps.zarr"
    batch = cm.process_run(catalog[uid], config=config, client=batch_client, out=out,
                           progress=False)
    return SimpleNamespace(scan=scan, docs=docs, uid=uid, config=config, batch=batch)


@pytest.fixture(scope="module")
def aborted(catalog, batch_client, tmp_path_factory):
    """A scan aborted after 25 of 40 points, in the catalog, with its batch maps."""
    scan = simulate_scan(seed=6, stop_after=25, **SMALL)
    docs = list(scan.documents(external=True, directory=catalog.detector_dir))
    assert docs[-1][1]["exit_status"] == "abort"
    uid = catalog.ingest(docs)
    config = ProcessConfig(background=int(scan.truth.attrs["background_point"]))
    batch = cm.process_run(catalog[uid], config=config, client=batch_client,
                           out=tmp_path_factory.mktemp("batch") / "maps.zarr", progress=False)
    return SimpleNamespace(scan=scan, docs=docs, uid=uid, config=config, batch=batch)


def feed(processor, docs):
    for name, doc in docs:
        processor(name, doc)


def test_stream_writes_the_batch_maps(reference, pool, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="crystalmapping.stream")
    proc = StreamProcessor(pool, reference.config, tmp_path, partial_every_points=None,
                           partial_every_seconds=None)
    feed(proc, reference.docs)
    maps = proc.wait(60)
    assert proc.path == tmp_path / f"{reference.uid}.zarr"
    assert_same_maps(maps, reference.batch)
    assert maps.attrs["config"]["background"] == reference.scan.n_points - 1
    assert maps.attrs["exit_status"] == "success" and maps.attrs["failed_points"] == []
    status = proc.status()
    assert status["done"] == 40 and status["queued"] == 0 and status["lag_seconds"] == 0
    assert sorted(proc.latencies) == list(range(40))
    assert 0 < status["latency_median_s"] <= status["latency_p95_s"]
    assert "finished (success): 40 points mapped, 0 failed" in caplog.text


def test_inline_frames_through_a_run_router(reference, pool, tmp_path):
    """Frames inline in the events, routed as event pages by RunRouter: the same maps."""
    factory = processor_factory(pool, reference.config, tmp_path, partial_every_points=None)
    router = RunRouter([factory])
    docs = list(reference.scan.documents(external=False))  # same seed: same frames, new uid
    assert not [n for n, _ in docs if n.startswith("stream_")]
    feed(router, docs)
    (proc,) = factory.processors
    maps = proc.wait(60)
    assert maps.attrs["source_uid"] == docs[0][1]["uid"] != reference.uid
    assert_same_maps(maps, reference.batch, ignore={"source_uid"})
    # a second run through the same router gets its own processor and store
    feed(router, reference.docs)
    assert len(factory.processors) == 2
    assert_same_maps(factory.processors[1].wait(60), reference.batch)


# a partial write of the first finished point (off the sample) finds no peak, and says so
@pytest.mark.filterwarnings("ignore::crystalmapping.errors.NoPeaksWarning")
def test_points_finishing_in_any_order(reference, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="crystalmapping.stream")
    executor = ShuffledExecutor(seed=3)
    proc = StreamProcessor(executor, reference.config, tmp_path, partial_every_seconds=0.2)
    feed(proc, reference.docs)
    # Nothing ran: every point is queued, all but the background task wait for it.
    status = proc.status()
    assert status["received"] == 40 and status["queued"] == 40
    assert status["waiting_for_background"] == 40 and status["done"] == 0
    time.sleep(0.3)
    assert proc.lag_seconds >= 0.3 and proc.queued == 40
    deadline = time.time() + 5
    while "40 queued (40 waiting for the background)" not in caplog.text and time.time() < deadline:
        time.sleep(0.05)
    assert "40 queued (40 waiting for the background)" in caplog.text  # the lag is logged
    executor.run()
    maps = proc.wait(60)
    order = list(proc.latencies)  # in order of completion
    assert sorted(order) == list(range(40)) and order != sorted(order)
    assert_same_maps(maps, reference.batch)


def test_partial_maps_grow_during_the_scan(pool, tmp_path):
    scan = simulate_scan(seed=5, **SMALL)
    first_empty = 0  # a point off the sample, measured first
    assert scan.truth["amplitude"].values[:, 0, 0].sum() == 0
    written = []
    proc = StreamProcessor(
        pool, ProcessConfig(background=first_empty), tmp_path / "maps",
        partial_every_points=5, partial_every_seconds=0.2,
        on_written=lambda path, maps: written.append(
            (int(maps["measured"].sum()), maps.attrs["exit_status"])))
    docs = scan.documents(external=True, directory=tmp_path / "detector")
    n_events = 0
    for name, doc in docs:  # live: the HDF5 file is still being written
        proc(name, doc)
        n_events += name == "event"
        if n_events == 20:
            break
    deadline = time.time() + 30
    while not (written and written[-1][0] == 20) and time.time() < deadline:
        time.sleep(0.05)
    partial = cm.open_maps(proc.path)
    assert partial.attrs["exit_status"] == "running"
    assert int(partial["measured"].sum()) == 20 == partial.attrs["n_points_measured"]
    rows, cols = scan.grid.indices(np.arange(20))
    assert partial["measured"].values[rows, cols].all()
    assert not (partial["intensity"].values[:, ~partial["measured"].values]).any()
    for name, doc in docs:
        proc(name, doc)
    maps = proc.wait(60)
    assert maps.attrs["exit_status"] == "success" and int(maps["measured"].sum()) == 40
    counts = [n for n, _ in written]
    assert counts == sorted(counts) and counts[0] <= 20 and counts[-1] == 40
    assert written[-1][1] == "success" and {s for _, s in written[:-1]} == {"running"}


def test_aborted_scan_and_a_scan_that_never_stops(aborted, pool, tmp_path):
    proc = StreamProcessor(pool, aborted.config, tmp_path / "a")
    feed(proc, aborted.docs)
    maps = proc.wait(60)
    assert maps.attrs["exit_status"] == "abort"
    assert int(maps["measured"].sum()) == 25
    assert_same_maps(maps, aborted.batch)

    # No stop document at all: after stop_timeout the maps of what was measured are written.
    assert aborted.docs[-1][0] == "stop"
    lost = StreamProcessor(pool, aborted.config, tmp_path / "b", stop_timeout=0.5)
    feed(lost, aborted.docs[:-1])
    timed_out = lost.wait(30)
    assert timed_out.attrs["exit_status"] == "timeout"
    assert_same_maps(timed_out, aborted.batch)
    # ... and a stop that comes after all reopens the run and rewrites its maps
    lost(*aborted.docs[-1])
    assert lost.wait(30).attrs["exit_status"] == "abort"


def test_background_point_that_was_never_measured(aborted, pool, tmp_path, caplog):
    proc = StreamProcessor(pool, ProcessConfig(background=30), tmp_path)
    feed(proc, aborted.docs)  # stopped after 25 points
    maps = proc.wait(30)
    assert maps.attrs["failed_points"] == list(range(25))
    assert "background point 30 was not measured" in maps.attrs["failure_reasons"][0]
    assert int(maps["measured"].sum()) == 0 and maps.sizes["grain"] == 0
    assert "25 points failed" in caplog.text


def test_a_background_of_the_wrong_shape_fails_every_point(reference, pool, tmp_path, caplog):
    proc = StreamProcessor(pool, reference.config, tmp_path, subtrahend=np.zeros((4, 4)))
    feed(proc, reference.docs)
    maps = proc.wait(60)
    assert "background image has shape (4, 4)" in caplog.text  # said at the descriptor
    assert maps.attrs["failed_points"] == list(range(40)) and not maps["measured"].any()
    assert "(128, 128), got (4, 4)" in maps.attrs["failure_reasons"][0]


def test_a_failed_point_does_not_stop_the_run(reference, pool, tmp_path):
    scan = reference.scan
    docs = []
    for name, doc in scan.documents(external=False):
        if name == "event" and doc["seq_num"] == 8:  # point 7 carries frames of the wrong size
            doc = dict(doc, data=dict(doc["data"], dexela_image=np.zeros((2, 64, 64), "u2")))
        docs.append((name, doc))
    proc = StreamProcessor(pool, reference.config, tmp_path, subtrahend=scan.expected_background())
    feed(proc, docs)
    maps = proc.wait(60)
    assert maps.attrs["failed_points"] == [7] and proc.failed_points.keys() == {7}
    assert "(128, 128)" in maps.attrs["failure_reasons"][0]
    assert maps.attrs["config"]["background"] == "array"
    measured = maps["measured"].values
    r, c = scan.grid.indices([7])
    assert not measured[r[0], c[0]] and measured.sum() == 39
    assert maps.attrs["exit_status"] == "success" and maps.sizes["grain"] > 0


def test_refuses_bad_input_before_any_work(reference, pool, tmp_path):
    with pytest.raises(ConfigError, match=">= 0"):
        StreamProcessor(pool, ProcessConfig(background=-1), tmp_path)
    with pytest.raises(TypeError, match="submit"):
        StreamProcessor(object(), reference.config, tmp_path)
    start = reference.docs[0][1]
    with pytest.raises(ConfigError, match=r"\[0, 40\)"):
        StreamProcessor(pool, ProcessConfig(background=40), tmp_path)("start", start)
    (tmp_path / f"{start['uid']}.zarr").mkdir()
    with pytest.raises(StoreError, match="overwrite"):
        StreamProcessor(pool, reference.config, tmp_path)("start", start)
    # a RunRouter factory skips such a run (and says so) instead of stopping a live service
    assert processor_factory(pool, reference.config, tmp_path)("start", start) == ([], [])


def test_dask_worker_processes_give_the_batch_maps(reference, tmp_path):
    from crystalmapping.execution import local_cluster

    with local_cluster(2, processes=True) as client:
        proc = StreamProcessor(client, reference.config, tmp_path, partial_every_points=10)
        feed(proc, reference.docs)
        maps = proc.wait(120)
        status = proc.status()
    assert_same_maps(maps, reference.batch)
    assert status["done"] == 40 and status["failed"] == 0
    print(f"distributed: latency median {status['latency_median_s']:.3f} s, "
          f"95th percentile {status['latency_p95_s']:.3f} s")


def _moved(docs, old_root: str, new_root: str):
    """The documents as another machine wrote them: their files under ``new_root``."""
    out = []
    for name, doc in docs:
        if name == "stream_resource":
            doc = dict(doc, uri=doc["uri"].replace(old_root, new_root, 1))
        out.append((name, doc))
    return out


def test_a_root_map_finds_the_files_where_this_machine_mounts_them(reference, catalog, pool,
                                                                   tmp_path):
    docs = _moved(reference.docs, str(catalog.detector_dir), "/beamline/detector")
    proc = StreamProcessor(pool, reference.config, tmp_path / "mapped", read_timeout=0.2,
                           root_map=[f"/beamline/detector={catalog.detector_dir}"])
    feed(proc, docs)
    assert_same_maps(proc.wait(60), reference.batch)
    # without the map, every point fails and says where the file was looked for, and why
    lost = StreamProcessor(pool, reference.config, tmp_path / "lost", read_timeout=0.05)
    feed(lost, docs)
    maps = lost.wait(60)
    assert maps.attrs["failed_points"] == list(range(40))
    reason = maps.attrs["failure_reasons"][0]
    assert "/beamline/detector/" in reason and "no such file" in reason
    assert "--root-map OLD=NEW" in reason
    with pytest.raises(ConfigError, match="OLD=NEW"):
        StreamProcessor(pool, reference.config, tmp_path, root_map=["/beamline/detector"])


def test_an_image_background_goes_to_the_workers_once(reference, thread_client, tmp_path,
                                                      monkeypatch):
    scattered = []
    scatter = type(thread_client).scatter
    monkeypatch.setattr(type(thread_client), "scatter", lambda self, data, **kw: (
        scattered.append((getattr(data, "nbytes", 0), kw)) or scatter(self, data, **kw)))
    background = reference.scan.frames(reference.scan.n_points - 1).mean(axis=0)
    proc = StreamProcessor(thread_client, reference.config, tmp_path, subtrahend=background,
                           partial_every_points=None, partial_every_seconds=None)
    feed(proc, reference.docs)
    maps = proc.wait(60)
    # a mean of counts goes as float32, which holds it exactly: half the bytes
    assert scattered == [(background.nbytes // 2, {"broadcast": True, "hash": False})]
    assert_same_maps(maps, reference.batch, ignore={"config"})
