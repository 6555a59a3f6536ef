"""serve and publish against a real RunEngine, the real 0MQ proxy and real dask workers.

A module-scoped ``bluesky-0MQ-proxy`` (bluesky's own command) runs on loopback
and one ``crystalmapping serve`` subprocess (a LocalCluster of 2 worker
processes) maps whatever reaches it. Runs come from a ``bluesky.RunEngine``
scanning an ``ophyd.sim`` detector that returns simulated diffraction frames,
and from ``crystalmapping publish``; each served store must equal what the
batch pipeline makes of the run read back from the catalog.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import crystalmapping as cm
from crystalmapping.config import ProcessConfig
from crystalmapping.publish import live_documents
from crystalmapping.wire import DecodeError, packb, serialization, unpackb
from crystalmapping.sim import simulate_scan

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "crystalmapping.cli"]
SMALL = dict(shape=(8, 5), detector_shape=(128, 128), grains=2)
#: Every served run subtracts the mean frame of its first point (off the sample in these scans).
BACKGROUND = 0
CONFIG = ProcessConfig(background=BACKGROUND)
#: Attributes only the stream writes (the batch pipeline raises instead of listing failures).
STREAM_ONLY = {"exit_status", "failed_points", "failure_reasons"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_maps(stream: xr.Dataset, batch: xr.Dataset) -> None:
    """Every variable, coordinate and attribute equal, but the write time and stream-only attrs."""
    s, b = stream.load().copy(), batch.load().copy()
    s.attrs = {k: v for k, v in s.attrs.items() if k not in STREAM_ONLY | {"created", "history"}}
    b.attrs = {k: v for k, v in b.attrs.items() if k not in {"created", "history"}}
    xr.testing.assert_identical(s, b)


def scan_with_empty_first_point(seed: int, **kwargs):
    scan = simulate_scan(seed=seed, **SMALL, **kwargs)
    occupied = scan.truth["amplitude"].sum("peak").values
    row, col = scan.grid.indices([BACKGROUND])
    assert occupied[row[0], col[0]] == 0, "the background point must be off the sample"
    return scan


class Process:
    """A subprocess whose output goes to a log file that tests can wait on."""

    def __init__(self, args, log: Path, **kwargs):
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT,
                                     cwd=ROOT, **kwargs)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log after {timeout} s:\n{self.text()}")
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"did not stop within {timeout} s:\n{self.text()}")
        self._file.close()
        return self.proc.returncode


def handshake(send, server: Process, tag: str, timeout: float = 60.0) -> None:
    """Send probe messages until the server logs one: both 0MQ hops are connected.

    (PUB/SUB drops what is sent before a subscriber is connected: the "slow joiner".)
    A probe is a message with the right prefix and a name that is no bluesky
    document, which the server logs and skips.
    """
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        send(f"{tag}-{n}")
        time.sleep(0.2)
        if f"{tag}-" in server.text():
            return
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited:\n{server.text()}")
    raise AssertionError(f"no probe reached the server in {timeout} s:\n{server.text()}")


def wait_for_report(report: Path, uid: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if report.exists():
            for line in report.read_text().splitlines():
                if line.strip() and json.loads(line)["uid"] == uid:
                    return json.loads(line)
        time.sleep(0.2)
    raise AssertionError(f"run {uid} not reported in {timeout} s")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """bluesky's own proxy command on two loopback ports."""
    ports = free_port(), free_port()
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    p = Process([str(BIN / "bluesky-0MQ-proxy"), "--in-address", f"127.0.0.1:{ports[0]}",
                 "--out-address", f"127.0.0.1:{ports[1]}"], log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", ports[1]), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or p.proc.poll() is not None:
                raise RuntimeError(f"proxy did not start: {p.text()}")
            time.sleep(0.1)
    yield SimpleNamespace(in_address=f"127.0.0.1:{ports[0]}", out_address=f"127.0.0.1:{ports[1]}")
    p.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def raw_catalog(tmp_path_factory):
    """The catalog the RunEngine records into (and the stored runs are read from)."""
    return cm.Catalog(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def server(proxy, raw_catalog, tmp_path_factory):
    """``crystalmapping serve`` on a LocalCluster of 2 worker processes.

    It reads detector files only under the raw catalog's detector directory."""
    d = tmp_path_factory.mktemp("serve")
    raw_catalog.detector_dir.mkdir(parents=True, exist_ok=True)
    s = Process(CLI + ["serve", "--address", proxy.out_address, "--prefix", "raw",
                       "--data-root", str(raw_catalog.detector_dir),
                       "--workers", "2", "--out-dir", str(d / "maps"),
                       "--catalog", str(d / "derived"), "--report", str(d / "report.jsonl"),
                       "--background", str(BACKGROUND), "--partial-every-points", "10"],
                d / "serve.log")
    s.out_dir, s.report, s.catalog_dir = d / "maps", d / "report.jsonl", d / "derived"
    s.wait_for("serving: documents", timeout=120)
    yield s
    assert s.stop(signal.SIGINT) == 0, s.text()


@pytest.fixture(scope="module")
def run_engine(proxy, raw_catalog, server):
    """A RunEngine publishing to the proxy (msgpack) and recording into ``raw_catalog``."""
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    RE = RunEngine({})
    publisher = Publisher(proxy.in_address, prefix=b"raw", serializer=packb)
    handshake(lambda tag: publisher(tag, {}), server, "re-probe")
    RE.subscribe(publisher)
    RE.subscribe(raw_catalog.insert)
    yield RE
    publisher.close()


def detector_for(scan):
    """Motors, and an ``ophyd.sim`` detector reading the scan's frames at the motors' point."""
    from ophyd.sim import SynAxis, SynSignal

    y, x = SynAxis(name=scan.grid.motors[0]), SynAxis(name=scan.grid.motors[1])
    (y0, y1), (x0, x1) = scan.grid.extents
    rows, cols = scan.grid.shape

    def frames():
        r = int(round((y.position - y0) / (y1 - y0) * (rows - 1)))
        c = int(round((x.position - x0) / (x1 - x0) * (cols - 1)))
        point = r * cols + (cols - 1 - c if r % 2 else c)  # snaking: odd rows go back
        return scan.frames(point)

    det = SynSignal(func=frames, name=scan.data_key, labels={"detectors"})
    return det, y, x


def grid_scan(scan, *, pause_after: int | None = None):
    """bluesky's grid_scan (snaking) over the simulated sample; pauses after N points."""
    import bluesky.plan_stubs as bps
    import bluesky.plans as bp

    det, y, x = detector_for(scan)
    (y0, y1), (x0, x1) = scan.grid.extents
    n = {"points": 0}

    def per_step(detectors, step, pos_cache):
        yield from bps.one_nd_step(detectors, step, pos_cache)
        n["points"] += 1
        if pause_after is not None and n["points"] == pause_after:
            yield from bps.pause()

    return bp.grid_scan([det], y, y0, y1, scan.grid.shape[0], x, x0, x1, scan.grid.shape[1],
                        snake_axes=True, per_step=per_step)


# ----------------------------------------------------------------------------- serialization


def test_msgpack_round_trip_and_no_pickle(tmp_path):
    import msgpack
    import msgpack_numpy

    doc = {"data": {"img": np.arange(24, dtype="<u2").reshape(2, 3, 4)[:, ::2],
                    "f": np.float32(1.5), "i": np.int64(-3), "b": np.bool_(True)},
           "shape": (8, 5), "none": None, "c": 1 + 2j, "s": np.array(["ab", "c"])}
    out = unpackb(packb(doc))
    np.testing.assert_array_equal(out["data"]["img"], doc["data"]["img"])
    assert out["data"]["img"].dtype == np.uint16 and out["data"]["img"].flags.writeable
    assert out["data"]["f"] == np.float32(1.5) and out["data"]["f"].dtype == np.float32
    assert out["data"]["i"] == -3 and out["data"]["b"] and out["shape"] == [8, 5]
    assert out["c"] == 1 + 2j and list(out["s"]) == ["ab", "c"]
    # msgpack-numpy's wire format both ways
    np.testing.assert_array_equal(msgpack_numpy.unpackb(packb(doc))["data"]["img"],
                                  doc["data"]["img"])
    np.testing.assert_array_equal(unpackb(msgpack_numpy.packb({"a": np.eye(2)}))["a"], np.eye(2))
    # arrays of Python objects would need pickle: refused both ways
    with pytest.raises(TypeError, match="pickle"):
        packb({"a": np.array([object()])})
    touched = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (touched,))

    evil = msgpack.packb({"x": {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1],
                                b"data": pickle.dumps(Evil())}}, use_bin_type=True)
    with pytest.raises(DecodeError, match="no pickle"):
        unpackb(evil)
    assert not touched.exists()
    for garbage in (b"", b"\xc1", packb([1, 2]), np.random.default_rng(1).bytes(64)):
        with pytest.raises(DecodeError):
            unpackb(garbage)
    with pytest.raises(cm.CrystalMappingError, match="msgpack"):
        serialization("json")


# ----------------------------------------------------------------------------- serve


def batch_maps(run, client, tmp_path) -> xr.Dataset:
    """The batch pipeline's store of a run, same configuration."""
    return cm.process_run(run, config=CONFIG, client=client, out=tmp_path / "batch.zarr",
                          progress=False)


def test_run_engine_scan_served_equals_batch(run_engine, server, raw_catalog, batch_client,
                                             tmp_path):
    scan = scan_with_empty_first_point(seed=3)
    t0 = time.monotonic()
    (uid,) = run_engine(grid_scan(scan))
    report = wait_for_report(server.report, uid)
    served_s = time.monotonic() - t0

    run = raw_catalog[uid]
    assert run.start["snaking"] == [False, True] and run.stop["num_events"]["primary"] == 40
    batch = batch_maps(run, batch_client, tmp_path)
    served = cm.open_maps(server.out_dir / f"{uid}.zarr")
    assert_same_maps(served, batch)
    assert served.attrs["exit_status"] == "success" and served.attrs["failed_points"] == []
    assert int(served["measured"].sum()) == 40 and served.sizes["grain"] >= 2
    assert report["points"] == 40 and report["failed"] == 0
    assert report["peaks"] == batch.attrs["n_peaks_found"]
    assert report["maps"] == batch.sizes["grain"]
    assert report["latency_median_s"] > 0 and report["stop_to_maps_s"] is not None

    # the derived run: start with the provenance, one event per map, stop
    derived = cm.Catalog(server.catalog_dir)[report["derived_uid"]]
    assert derived.start["analysis_stage"] == "crystalmapping"
    assert derived.start["parent_uid"] == uid
    assert derived.start["maps"] == str(server.out_dir / f"{uid}.zarr")
    assert derived.start["config"]["background"] == BACKGROUND
    assert derived.stop["exit_status"] == "success"
    ds = derived.to_dataset(None)
    for key in ("y", "x", "n_points", "grain_id"):
        np.testing.assert_array_equal(ds[key].values, batch[key].values)
    line = [ln for ln in server.text().splitlines() if f"run {uid[:8]}: 40 points" in ln]
    assert line and "peaks" in line[0] and "grains" in line[0] and "lag max" in line[0]
    print(f"RunEngine scan -> served maps in {served_s:.1f} s; {report}")


def test_garbage_then_an_aborted_scan(run_engine, server, proxy, raw_catalog, batch_client,
                                      tmp_path):
    import zmq
    from bluesky.utils import RunEngineInterrupted

    touched = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (touched,))

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(f"tcp://{proxy.in_address}")
    try:
        handshake(lambda tag: pub.send(b"raw " + tag.encode() + b" " + packb({})), server,
                  "garbage-probe")
        skipped_before = server.text().count("skipped a message")
        for message in (b"raw no-document", b"raw event \xc1\xc1\xc1",
                        b"raw start " + packb([1, 2]),
                        b"raw \xff\xfe " + packb({}),
                        b"raw start " + np.random.default_rng(0).bytes(500),
                        b"raw start " + pickle.dumps(Evil()),
                        b"raw descriptor " + packb({"uid": "d", "run_start": "nope"}),
                        b"raw stop " + packb({"uid": "s", "run_start": "nope"})):
            pub.send(message)
    finally:
        time.sleep(0.3)
        pub.close(linger=1000)
        ctx.term()

    scan = scan_with_empty_first_point(seed=4)
    with pytest.raises(RunEngineInterrupted):
        run_engine(grid_scan(scan, pause_after=25))
    run_engine.abort("stopped by the test")
    uid = raw_catalog.uids()[-1]
    report = wait_for_report(server.report, uid)

    assert server.proc.poll() is None
    text = server.text()
    assert text.count("skipped a message") >= skipped_before + 6
    assert "not '<prefix> <name> <document>'" in text and "not a msgpack document" in text
    assert "could not be routed" in text
    assert not touched.exists()  # the pickle was never loaded

    run = raw_catalog[uid]
    assert run.stop["exit_status"] == "abort"
    served = cm.open_maps(server.out_dir / f"{uid}.zarr")
    assert served.attrs["exit_status"] == "abort" and int(served["measured"].sum()) == 25
    assert report["exit_status"] == "abort" and report["points"] == 25
    batch = batch_maps(run, batch_client, tmp_path)
    assert_same_maps(served, batch)
    derived = cm.Catalog(server.catalog_dir)[report["derived_uid"]]
    assert derived.stop["exit_status"] == "abort"


def test_publish_a_stored_run_with_hdf5_frames(server, proxy, raw_catalog, batch_client,
                                               tmp_path):
    scan = scan_with_empty_first_point(seed=8)
    uid = raw_catalog.ingest(scan.documents(external=True, directory=raw_catalog.detector_dir))
    # stored order (events, then resources and one datum) -> the RunEngine's order
    names = [n for n, _ in live_documents(raw_catalog[uid])]
    assert names[:3] == ["start", "descriptor", "stream_resource"]
    assert names[3:7] == ["stream_datum", "event", "stream_datum", "event"] and names[-1] == "stop"
    out = subprocess.run(CLI + ["publish", "--catalog", str(raw_catalog.directory), "--uid", uid,
                                "--address", proxy.in_address, "--prefix", "raw"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "40 event" in out.stdout and "40 stream_datum" in out.stdout
    wait_for_report(server.report, uid)
    served = cm.open_maps(server.out_dir / f"{uid}.zarr")
    batch = batch_maps(raw_catalog[uid], batch_client, tmp_path)
    assert_same_maps(served, batch)


def _renamed(docs, uid):
    """The documents of a run with its uid replaced by ``uid`` (in every reference)."""
    old = None
    for name, doc in docs:
        doc = dict(doc)
        if name == "start":
            old, doc["uid"] = doc["uid"], uid
        elif doc.get("run_start") == old:
            doc["run_start"] = uid
        yield name, doc


def test_hostile_documents_write_and_open_nothing(server, proxy, tmp_path):
    """Through the real proxy: uids that are paths are refused, files outside the data roots
    are not opened, and the server maps the next honest run."""
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(f"tcp://{proxy.in_address}")
    escape = f"escaped-{os.getpid()}"
    hostile = [f"../{escape}", str(tmp_path / escape), "..", "a/b", "", "x" * 200]
    try:
        handshake(lambda tag: pub.send(b"raw " + tag.encode() + b" " + packb({})), server,
                  "hostile-probe")
        for uid in hostile:
            for name, doc in _renamed(scan_with_empty_first_point(seed=5).documents(
                    external=False), uid):
                pub.send(b"raw " + name.encode() + b" " + packb(doc))
        # a run whose frames lie outside the data root (a real, readable HDF5 file)
        outside = simulate_scan(seed=6, **SMALL)
        docs = list(outside.documents(external=True, directory=tmp_path / "elsewhere"))
        uid = docs[0][1]["uid"]
        for name, doc in docs:
            pub.send(b"raw " + name.encode() + b" " + packb(doc))
    finally:
        time.sleep(0.3)
        pub.close(linger=1000)
        ctx.term()
    report = wait_for_report(server.report, uid)
    text = server.text()
    assert text.count("is not a plain name") >= len(hostile), text
    for uid_ in hostile:  # nothing written for them, inside out_dir or out of it
        assert not list(server.out_dir.parent.rglob(f"*{escape}*"))
        assert not list(tmp_path.glob(f"{escape}*"))
    assert not (server.out_dir.parent / f"{escape}.zarr").exists()
    assert report["failed"] == outside.n_points and report["points"] == 0
    maps = cm.open_maps(server.out_dir / f"{uid}.zarr")
    reasons = set(maps.attrs["failure_reasons"])
    assert len(reasons) == 1 and "outside the data roots" in reasons.pop()
    assert server.proc.poll() is None


def test_publish_without_a_proxy_says_what_to_do(raw_catalog, tmp_path, capsys):
    """The command's exit status and message, from its entry point in this process (a
    fresh process would only add the imports; ``publish`` runs as a process above)."""
    from crystalmapping.cli import main

    scan = scan_with_empty_first_point(seed=3)
    uid = raw_catalog.ingest(scan.documents(external=False))
    code = main(["publish", "--catalog", str(raw_catalog.directory), "--uid", uid,
                 "--address", f"127.0.0.1:{free_port()}", "--connect-timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no 0MQ proxy answered" in err and "bluesky-0MQ-proxy" in err


def test_sigterm_writes_the_maps_of_the_run_in_flight(proxy, raw_catalog, tmp_path):
    """A second server, stopped while a run is open: its points so far are mapped."""
    from bluesky.callbacks.zmq import Publisher

    s = Process(CLI + ["serve", "--address", proxy.out_address, "--workers", "1",
                       "--out-dir", str(tmp_path / "maps"), "--report",
                       str(tmp_path / "report.jsonl"), "--background", str(BACKGROUND),
                       "--partial-every-points", "5", "--prefix", "other"],
                tmp_path / "serve.log")
    try:
        s.wait_for("serving: documents", timeout=120)
        scan = scan_with_empty_first_point(seed=3)
        docs = list(scan.documents(external=False))
        uid = docs[0][1]["uid"]
        publisher = Publisher(proxy.in_address, prefix=b"other", serializer=packb)
        handshake(lambda tag: publisher(tag, {}), s, "term-probe")
        sent = 0
        for name, doc in docs:
            if name == "event" and sent == 20:
                break
            sent += name == "event"
            publisher(name, doc)
        publisher.close()
        path = tmp_path / "maps" / f"{uid}.zarr"
        deadline = time.monotonic() + 60
        while not (path.exists() and int(cm.open_maps(path)["measured"].sum()) == 20):
            assert time.monotonic() < deadline, s.text()  # partial maps of the 20 points
            time.sleep(0.2)
    finally:
        code = s.stop(signal.SIGTERM)
    assert code == 0, s.text()
    maps = cm.open_maps(tmp_path / "maps" / f"{uid}.zarr")
    assert maps.attrs["exit_status"] == "interrupted"
    assert int(maps["measured"].sum()) == 20
    report = json.loads((tmp_path / "report.jsonl").read_text().splitlines()[-1])
    assert report["uid"] == uid and report["exit_status"] == "interrupted"
    assert "in flight" in s.text()


# ----------------------------------------------------------------------------- tutorial


def test_tutorial_server_and_publisher(proxy, raw_catalog, tmp_path):
    """workflows/server.py (the tutorial's, wired by hand) fed by ``publish --fill``.

    On a prefix of its own: the module's ``serve`` (prefix ``raw``) on the same proxy
    would otherwise map the run too, work this test does not look at."""
    from crystalmapping.callbacks import ImageProcessor, PeakTracker, TrackLinker
    from crystalmapping.playback import replay

    scan = scan_with_empty_first_point(seed=5)
    uid = raw_catalog.ingest(scan.documents(external=True, directory=raw_catalog.detector_dir))
    image = scan.frames(BACKGROUND).mean(axis=0)
    np.save(tmp_path / "background.npy", image)
    db2 = tmp_path / "db2"
    DB2 = cm.Catalog(db2)
    assert DB2.uids() == []  # created here, before the server opens it (one init, not two racing)
    locate = dict(diameter=9, percentile=80, separation=30)  # a 128 px detector
    env = dict(os.environ, CRYSTALMAPPING_ADDRESS=proxy.out_address,
               CRYSTALMAPPING_BACKGROUND=str(tmp_path / "background.npy"),
               CRYSTALMAPPING_DB2=str(db2))
    s = Process([sys.executable, str(ROOT / "workflows" / "server.py"), "--diameter", "9",
                 "--separation", "30", "--prefix", "tutorial"], tmp_path / "server.log",
                env=env)
    try:
        s.wait_for("Start the server", timeout=60)
        import zmq

        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.connect(f"tcp://{proxy.in_address}")
        handshake(lambda tag: pub.send(b"tutorial " + tag.encode() + b" {}"), s,
                  "tutorial-probe")
        pub.close(linger=0)
        ctx.term()
        out = subprocess.run(CLI + ["publish", "--catalog", str(raw_catalog.directory),
                                    "--uid", uid, "--address", proxy.in_address, "--fill",
                                    "--prefix", "tutorial"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 60
        stages = {}
        while time.monotonic() < deadline and not (
                len(stages) == 2 and all(run.stop for run in stages.values())):
            time.sleep(0.5)  # both derived runs recorded, up to their stop documents
            stages = {DB2[u].start.get("analysis_stage"): DB2[u] for u in DB2.uids()}
    finally:
        code = s.stop(signal.SIGTERM)
    assert code == 0, s.text()
    assert set(stages) == {"PeakTracker", "TrackLinker"}, s.text()
    tracks, peaks = stages["TrackLinker"], stages["PeakTracker"]
    assert tracks.start["parent_uid"] == peaks.uid and tracks.start["source_uid"] == uid
    assert peaks.start["analysis_parameters"]["locate"]["separation"] == 30

    # the same chain, here, on the run replayed from the catalog
    ip = ImageProcessor("dexela_image", subtrahend=image)
    pt = PeakTracker("dexela_image", **locate)
    tl = TrackLinker(search_range=50)
    linked = []
    ip.subscribe(pt).subscribe(tl)
    tl.subscribe(lambda name, doc: linked.append(doc["data"]) if name == "event" else None)
    for name, doc in replay(raw_catalog[uid]):
        ip(name, doc)
    expected = pd.DataFrame(linked)
    assert expected["particle"].nunique() >= 2
    got = tracks.to_dataset(None)
    assert got.sizes["point"] == len(expected) == peaks.stop["num_events"]["primary"]
    for column in ("frame", "y", "x", "mass", "particle"):
        np.testing.assert_array_equal(got[column].values, expected[column].values)


def test_serve_and_publish_options(capsys):
    from crystalmapping.cli import main

    for command in ("serve", "publish"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--serializer {msgpack,pickle}" in text
        assert "pickle: only on a trusted network" in text
        assert "127.0.0.1:556" in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data-key", "--background", "--diameter", "--search-range", "--config",
                 "--workers", "--scheduler", "--out-dir", "--catalog", "--prefix"):
        assert flag in text


def test_serve_timing_options_turn_off_with_none(tmp_path):
    """``--stop-timeout none`` turns the timeout off; unset options keep the defaults."""
    from crystalmapping.cli import _parser, stream_timing

    def timing(*argv, file_values=None):
        return stream_timing(_parser().parse_args(["serve", *argv]), file_values or {})

    assert timing() == {}
    assert timing("--stop-timeout", "none", "--partial-every-points", "off") == {
        "stop_timeout": None, "partial_every_points": None}
    assert timing("--partial-every-seconds", "2.5") == {"partial_every_seconds": 2.5}
    assert timing(file_values={"stop_timeout": "none", "partial_every_points": 7}) == {
        "stop_timeout": None, "partial_every_points": 7}
    assert timing("--stop-timeout", "30", file_values={"stop_timeout": None}) == {"stop_timeout": 30.0}
