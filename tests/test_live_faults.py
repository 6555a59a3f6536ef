"""The live path under faults, with the real components: bluesky's 0MQ proxy, a RunEngine
recording into a catalog, ``crystalmapping serve`` in a subprocess, real Dask workers.

* ``serve`` killed with SIGKILL during a scan and started again: the run's partial store is
  completed from the catalog and equals batch; runs the catalog cannot complete are left as
  they are, with a log line saying why and how to finish them.
* A Dask worker process killed during a scan: the maps equal batch.
* The proxy restarted during a scan: the server reconnects by itself; the points lost while
  it was down are named in the store (``failed_points``) and the rest are mapped as batch.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping.execution import local_cluster
from crystalmapping.sim import simulate_scan
from crystalmapping.wire import packb
from test_serve import (BACKGROUND, BIN, CLI, CONFIG, Process, assert_same_maps, batch_maps,
                        detector_for, free_port, handshake, wait_for_report)


#: The scans here: 20 points of 64 x 64 pixels (their point 0, the background, off the sample).
SHAPE, DETECTOR = (5, 4), (64, 64)


def small_scan(seed: int):
    scan = simulate_scan(shape=SHAPE, detector_shape=DETECTOR, grains=2, seed=seed)
    row, col = scan.grid.indices([BACKGROUND])
    assert scan.truth["amplitude"].sum("peak").values[row[0], col[0]] == 0
    return scan


def start_proxy(ports, log: Path) -> Process:
    """bluesky's own proxy command on two loopback ports; returns once it accepts."""
    p = Process([str(BIN / "bluesky-0MQ-proxy"), "--in-address", f"127.0.0.1:{ports[0]}",
                 "--out-address", f"127.0.0.1:{ports[1]}"], log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", ports[1]), timeout=0.5).close()
            return p
        except OSError:
            if time.monotonic() > deadline or p.proc.poll() is not None:
                raise RuntimeError(f"proxy did not start: {p.text()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    ports = free_port(), free_port()
    p = start_proxy(ports, tmp_path_factory.mktemp("proxy") / "proxy.log")
    yield SimpleNamespace(in_address=f"127.0.0.1:{ports[0]}",
                          out_address=f"127.0.0.1:{ports[1]}")
    p.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def scheduler():
    """One worker process behind a scheduler on loopback, shared by the ``serve`` processes
    (a killed server leaves it running, so a restarted one does not start a cluster)."""
    with local_cluster(1, processes=True) as client:
        yield client


def measured_points(path: Path) -> tuple[str | None, int]:
    """``(exit_status, measured points)`` of a store; ``(None, 0)`` while there is none."""
    try:
        maps = cm.open_maps(path)
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return None, 0
    return maps.attrs.get("exit_status"), int(maps["measured"].sum())


def wait_until(predicate, what: str, server: Process | None = None, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n"
                                 f"{server.text() if server else ''}")
        time.sleep(0.1)


def serve_args(proxy, out_dir: Path, catalog: cm.Catalog, report: Path, prefix: str,
               scheduler: str) -> list[str]:
    return CLI + ["serve", "--address", proxy.out_address, "--prefix", prefix,
                  "--scheduler", scheduler, "--out-dir", str(out_dir),
                  "--catalog", str(catalog.directory), "--report", str(report),
                  "--background", str(BACKGROUND), "--partial-every-points", "4",
                  "--partial-every-seconds", "off"]


# ----------------------------------------------------------------------------- serve killed


def test_serve_killed_mid_scan_completes_the_run_from_the_catalog(proxy, scheduler,
                                                                  batch_client, tmp_path):
    """SIGKILL during a RunEngine scan; started again, the server completes the run's store
    from the catalog (equal to batch). A run not in the catalog, and one whose stop the
    catalog does not hold yet, are left as they are with a log line saying how to finish
    them; the second is completed when its stop reaches the restarted server."""
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    raw = cm.Catalog(tmp_path / "raw")
    raw.detector_dir.mkdir(parents=True, exist_ok=True)
    out_dir, report = tmp_path / "maps", tmp_path / "report.jsonl"
    args = serve_args(proxy, out_dir, raw, report, "kill", scheduler.scheduler.address)
    t_start = time.monotonic()
    first = Process(args, tmp_path / "serve-1.log")
    publisher = Publisher(proxy.in_address, prefix=b"kill", serializer=packb)
    try:
        first.wait_for("serving: documents", timeout=120)
        handshake(lambda tag: publisher(tag, {}), first, "kill-probe")
        print(f"first server up in {time.monotonic() - t_start:.1f} s")

        # run A: published only (never stored); run B: stored live (frames in HDF5), without
        # its stop yet
        a_docs = list(small_scan(seed=21).documents(external=False))
        b_docs = list(small_scan(seed=22).documents(external=True,
                                                    directory=raw.detector_dir))
        b_writer = cm.Catalog(raw.directory)
        a_uid, b_uid = a_docs[0][1]["uid"], b_docs[0][1]["uid"]
        b_head = next(i for i, (name, doc) in enumerate(b_docs)
                      if name == "stream_datum" and doc["seq_nums"]["start"] == 9)
        for name, doc in a_docs[:10]:  # start, descriptor, 8 events
            publisher(name, doc)
        for name, doc in b_docs[:b_head]:  # ..., 8 stream_datum and events
            b_writer.insert(name, doc)
            publisher(name, doc)
        for uid in (a_uid, b_uid):
            wait_until(lambda: measured_points(out_dir / f"{uid}.zarr") == ("running", 8),
                       f"partial maps of run {uid[:8]}", first)

        print(f"runs A and B partial after {time.monotonic() - t_start:.1f} s")
        # run C: a RunEngine scan, killed at its 10th point (partial maps of 8 written)
        scan = small_scan(seed=24)
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE.subscribe(raw.insert)
        starts = []
        RE.subscribe(lambda name, doc: starts.append(doc["uid"]) if name == "start" else None)
        import bluesky.plan_stubs as bps

        def plan():
            n = 0

            def per_step(detectors, step, pos_cache):
                nonlocal n
                yield from bps.one_nd_step(detectors, step, pos_cache)
                n += 1
                yield from bps.sleep(0.02)  # points arrive slowly
                if n == 10:
                    path = out_dir / f"{starts[0]}.zarr"
                    wait_until(lambda: measured_points(path)[1] >= 8,
                               "partial maps of the RunEngine's run", first)
                    first.proc.send_signal(signal.SIGKILL)
                    first.proc.wait(10)

            yield from grid_scan_with(scan, per_step)

        (c_uid,) = RE(plan())
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
        first.stop()
    assert first.proc.returncode == -signal.SIGKILL
    c_path = out_dir / f"{c_uid}.zarr"
    status, n = measured_points(c_path)
    assert status == "running" and 8 <= n < 20, (status, n)
    assert raw[c_uid].stop["exit_status"] == "success"

    print(f"run C stored after {time.monotonic() - t_start:.1f} s")
    # started again: C completed from the catalog, A and B left as they are (logged)
    t0 = time.monotonic()
    second = Process(args, tmp_path / "serve-2.log")
    try:
        second.wait_for(f"run {c_uid[:8]}: completed from the catalog", timeout=120)
        recovered_s = time.monotonic() - t0
        for uid in (a_uid, b_uid):
            second.wait_for(f"run {uid[:8]}: its maps in", timeout=30)
        text = second.text()
        assert "left unfinished by a server that stopped during them" in text
        line = next(ln for ln in text.splitlines() if f"run {a_uid[:8]}: its maps" in ln)
        assert "is not in the catalog" in line and "left as they are" in line
        assert (f"crystalmapping process --catalog {raw.uri} --uid {a_uid} "
                f"--out {out_dir / f'{a_uid}.zarr'} --overwrite") in line
        line = next(ln for ln in text.splitlines() if f"run {b_uid[:8]}: its maps" in ln)
        assert "no stop document in the catalog" in line and "--uid " + b_uid in line
        assert measured_points(out_dir / f"{a_uid}.zarr") == ("running", 8)
        assert measured_points(out_dir / f"{b_uid}.zarr") == ("running", 8)

        print(f"C completed after {time.monotonic() - t_start:.1f} s")
        served = cm.open_maps(c_path)
        assert served.attrs["exit_status"] == "success" and served.attrs["failed_points"] == []
        assert_same_maps(served, batch_maps(raw[c_uid], batch_client, tmp_path / "c"))
        c_report = wait_for_report(report, c_uid)
        assert c_report["completed_from_catalog"] and c_report["points"] == 20
        derived = raw[c_report["derived_uid"]]
        assert derived.start["parent_uid"] == c_uid

        # the rest of run B (stored, and published: this server never saw B start)
        publisher2 = Publisher(proxy.in_address, prefix=b"kill", serializer=packb)
        handshake(lambda tag: publisher2(tag, {}), second, "kill2-probe")
        for name, doc in b_docs[b_head:]:
            b_writer.insert(name, doc)
            publisher2(name, doc)
        publisher2.close()
        second.wait_for(f"run {b_uid[:8]}: completed from the catalog", timeout=60)
        print(f"B completed after {time.monotonic() - t_start:.1f} s")
        b_maps = cm.open_maps(out_dir / f"{b_uid}.zarr")
        assert b_maps.attrs["exit_status"] == "success"
        assert_same_maps(b_maps, batch_maps(raw[b_uid], batch_client, tmp_path / "b"))
    finally:
        publisher.close()
        code = second.stop(signal.SIGINT)
    assert code == 0, second.text()
    print(f"restarted server completed the killed run in {recovered_s:.1f} s")


def grid_scan_with(scan, per_step):
    """bluesky's grid_scan (snaking) over the simulated sample with ``per_step``."""
    import bluesky.plans as bp

    det, y, x = detector_for(scan)
    (y0, y1), (x0, x1) = scan.grid.extents
    return bp.grid_scan([det], y, y0, y1, scan.grid.shape[0], x, x0, x1, scan.grid.shape[1],
                        snake_axes=True, per_step=per_step)


# ----------------------------------------------------------------------------- worker killed


def probe_until_received(publisher, server, timeout: float = 30.0) -> None:
    """Send non-document probes until the in-process server has skipped one (connected)."""
    deadline = time.monotonic() + timeout
    before, n = server.skipped, 0
    while server.skipped == before:
        assert time.monotonic() < deadline, "no probe reached the server"
        n += 1
        publisher(f"probe-{n}", {})
        time.sleep(0.2)


def test_a_worker_killed_mid_scan_changes_no_map(proxy, batch_client, tmp_path):
    """serve (in process) on 2 worker processes; one is killed with SIGKILL while it holds
    points of the scan: distributed runs them again elsewhere, and the maps equal batch."""
    from bluesky.callbacks.zmq import Publisher

    from crystalmapping.serve import DocumentServer

    raw = cm.Catalog(tmp_path / "raw")
    docs = list(small_scan(seed=31).documents(external=False))
    uid = raw.ingest(docs)
    with local_cluster(2, processes=True) as client:
        server = DocumentServer(client, CONFIG, tmp_path / "maps", address=proxy.out_address,
                                prefix="worker", partial_every_points=10).start()
        publisher = Publisher(proxy.in_address, prefix=b"worker", serializer=packb)
        try:
            probe_until_received(publisher, server)
            events = [d for d in docs if d[0] == "event"]
            head = [d for d in docs if d[0] not in ("event", "stop")]
            for name, doc in head + events[:12]:  # a burst: points queue on both workers
                publisher(name, doc)
            wait_until(lambda: len(server._factory.processors) == 1, "the run's start received")
            (processor,) = server._factory.processors
            # the victim: the worker holding the background point's mean frame (every later
            # point needs it), caught while points are queued
            who = {}
            wait_until(lambda: processor._bg_future is not None and who.update(
                client.who_has(processor._bg_future)) is None and any(who.values()),
                "the background point computed")
            (victim,) = next(w for w in who.values() if w)[:1]
            queued = processor.status()["queued"]
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            for name, doc in events[12:]:
                publisher(name, doc)
                time.sleep(0.02)
            publisher("stop", docs[-1][1])
            maps = processor.wait(60)
        finally:
            publisher.close()
            server.stop(30)
        assert pid not in client.run(os.getpid).values()  # the nanny started a new one
    assert maps.attrs["exit_status"] == "success" and maps.attrs["failed_points"] == []
    assert int(maps["measured"].sum()) == 20
    assert_same_maps(maps, batch_maps(raw[uid], batch_client, tmp_path))
    print(f"worker killed with {queued} points queued; maps equal batch")


# ----------------------------------------------------------------------------- proxy restarted


def test_proxy_restarted_mid_scan_names_the_points_it_lost(thread_client, batch_client,
                                                           tmp_path, caplog):
    """The proxy is killed during a scan and started again on the same ports: the server's
    0MQ socket reconnects by itself, the points published while the proxy was down are
    named in the store (failed_points, "never received"), and every point received is
    mapped as batch maps it."""
    from bluesky.callbacks.zmq import Publisher

    from crystalmapping.serve import DocumentServer

    ports = free_port(), free_port()
    proxy = start_proxy(ports, tmp_path / "proxy-1.log")
    raw = cm.Catalog(tmp_path / "raw")
    docs = list(small_scan(seed=25).documents(external=False))
    uid = raw.ingest(docs)
    events = [d for d in docs if d[0] == "event"]
    head = [d for d in docs if d[0] not in ("event", "stop")]
    server = DocumentServer(thread_client, CONFIG, tmp_path / "maps",
                            address=f"127.0.0.1:{ports[1]}", prefix="gap",
                            partial_every_points=4).start()
    publisher = Publisher(f"127.0.0.1:{ports[0]}", prefix=b"gap", serializer=packb)
    try:
        probe_until_received(publisher, server)
        for name, doc in head + events[:8]:
            publisher(name, doc)
        # the documents are on their way: the run's processor exists once its start arrived
        wait_until(lambda: len(server._factory.processors) == 1, "the run's start received")
        (processor,) = server._factory.processors
        wait_until(lambda: processor.status()["received"] == 8, "8 points received")
        proxy.stop(signal.SIGKILL)
        # Published while the proxy is down, from a socket closed before it is back: a
        # connecting 0MQ socket keeps what it could not send and sends it on reconnecting,
        # so a message is surely lost only when its socket goes first (a publisher that
        # restarts, or one whose queue overflows).
        import zmq

        context = zmq.Context()
        lost_socket = context.socket(zmq.PUB)
        lost_socket.setsockopt(zmq.LINGER, 0)
        lost_socket.connect(f"tcp://127.0.0.1:{ports[0]}")
        for name, doc in events[8:12]:
            lost_socket.send(b" ".join([b"gap", name.encode(), packb(doc)]))
        lost_socket.close()
        context.term()
        proxy = start_proxy(ports, tmp_path / "proxy-2.log")
        t0 = time.monotonic()
        probe_until_received(publisher, server)  # both sides reconnected by themselves
        reconnect_s = time.monotonic() - t0
        for name, doc in events[12:] + [docs[-1]]:
            publisher(name, doc)
        maps = processor.wait(60)
    finally:
        publisher.close()
        server.stop(30)
        proxy.stop(signal.SIGKILL)
    lost = maps.attrs["failed_points"]
    assert lost == [8, 9, 10, 11], lost
    assert all(r.startswith("never received") for r in maps.attrs["failure_reasons"])
    assert maps.attrs["exit_status"] == "success"
    assert any("4 of 20 points never arrived (points 8..11)" in r.message
               and f"--uid {uid}" in r.message for r in caplog.records)
    batch = batch_maps(raw[uid], batch_client, tmp_path).load()
    measured = maps["measured"].values
    assert measured.sum() == 16 and batch["measured"].values.all()
    for key in ("total_intensity", "max_intensity", "n_peaks"):  # each point's own values
        np.testing.assert_array_equal(maps[key].values[measured], batch[key].values[measured])
    print(f"proxy restarted: reconnected in {reconnect_s:.1f} s; lost points {lost}")
