"""Faults survived in batch, with the real components.

* a Dask worker process killed while ``process_run`` computes: the maps equal
  those of an undisturbed run;
* the tiled server stopped during a run: a clear error naming the server, the
  previous store kept, and the same call finishes once the server is back;
* the disk filling up while the store is written: a clear error with the path
  and the fix, the previous store kept, no temporary store left behind.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import xarray as xr

import crystalmapping as cm
from crystalmapping.errors import StoreError
from crystalmapping.execution import local_cluster
from crystalmapping.source import CatalogUnavailableError

from conftest import TILED, free_port

LOCATE = dict(diameter=7)


@pytest.fixture(scope="module")
def fault_catalog(catalog):
    """Two small scans in the session's catalog: frames in external HDF5, and inline."""
    from crystalmapping.sim import simulate_scan

    runs = {}
    for name, seed, external in [("external", 21, True), ("inline", 22, False)]:
        scan = simulate_scan(shape=(8, 6), detector_shape=(64, 64), grains=2, seed=seed)
        uid = catalog.ingest(scan.documents(external=external, directory=catalog.detector_dir))
        runs[name] = (scan, uid)
    return catalog, runs


def _same_maps(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert a.attrs["n_peaks_found"] == b.attrs["n_peaks_found"] > 0


def _in_flight(client) -> dict[str, list[str]]:
    """Worker address -> keys of point tasks it runs now."""
    return {w: [k for k in keys if str(k).startswith("crystalmapping-points")]
            for w, keys in client.processing().items()}


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- 1. worker


def test_a_worker_killed_mid_run_changes_nothing(fault_catalog):
    catalog, runs = fault_catalog
    scan, uid = runs["external"]
    run = catalog[uid]
    background = int(scan.truth.attrs["background_point"])
    with local_cluster(2, processes=True) as client:
        kwargs = dict(subtrahend=background, locate=LOCATE, client=client, progress=False)
        reference = cm.process_run(run, **kwargs)
        pids = client.run(os.getpid)

        def holders_of_the_background(dask_scheduler):
            return [ws.address for key, ts in dask_scheduler.tasks.items()
                    if str(key).startswith("crystalmapping-background")
                    for ws in (ts.who_has or ())]

        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(cm.process_run, run, **kwargs)
            # the worker that holds the background image and runs a point task: the one
            # whose loss costs the most (its results and the image every task needs)
            victim = _wait_for(
                lambda: next((w for w in client.run_on_scheduler(holders_of_the_background)
                              if _in_flight(client).get(w)), None), 60, "a point task")
            os.kill(pids[victim], signal.SIGKILL)
            assert not job.done()  # killed mid-run
            maps = job.result(timeout=120)
        _same_maps(maps, reference)
        assert maps.attrs["n_points_measured"] == scan.n_points
        # the nanny started a new worker process in place of the dead one
        _wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 60, "the new worker")
        assert pids[victim] not in client.run(os.getpid).values()


# ----------------------------------------------------------------------------- 2. server


def _serve(directory, port: int, api_key: str, config_dir) -> subprocess.Popen:
    """``tiled serve config`` over an embedded catalog's directory, on 127.0.0.1:port."""
    config = config_dir / "config.yml"
    config.write_text(f"""
authentication:
  single_user_api_key: {api_key}
  allow_anonymous_access: false
trees:
  - path: /
    tree: catalog
    args:
      uri: sqlite:///{directory}/catalog.db
      specs: [{{name: CatalogOfBlueskyRuns, version: "3.0"}}]
      writable_storage: ["{directory}/data", "sqlite:///{directory}/tabular.db"]
      readable_storage: ["{directory}/detector"]
      init_if_not_exists: false
""")
    log = open(config_dir / "server.log", "a")
    proc = subprocess.Popen([str(TILED), "serve", "config", "--host", "127.0.0.1", "--port",
                             str(port), str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            assert proc.poll() is None, (config_dir / "server.log").read_text()
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the tiled server did not start in 60 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_the_tiled_server_stopped_mid_run(fault_catalog, thread_client, tmp_path):
    catalog, runs = fault_catalog
    scan, uid = runs["inline"]
    port, api_key = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "maps.zarr"
    server = _serve(catalog.directory, port, api_key, tmp_path)
    try:
        run = cm.Catalog(url, api_key=api_key)[uid]
        kwargs = dict(subtrahend=int(scan.truth.attrs["background_point"]), locate=LOCATE,
                      client=thread_client, progress=False, out=out, overwrite=True)
        previous = cm.process_run(run, **kwargs).load()  # the store a rerun would replace

        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(cm.process_run, run, **kwargs)
            _wait_for(lambda: any(_in_flight(thread_client).values()), 60, "a point task")
            _stop(server)
            with pytest.raises(CatalogUnavailableError) as info:
                job.result(timeout=60)
        message = str(info.value)
        print(message)
        assert url in message and "stopped answering" in message
        assert "run the same command again" in message
        assert str(out) in message and "kept" in message
        # the previous store is whole, and nothing else was left beside it
        _same_maps(cm.open_maps(out), previous)
        assert sorted(p.name for p in tmp_path.iterdir() if "maps" in p.name) == ["maps.zarr"]
        assert not any(_in_flight(thread_client).values())  # the run's tasks were cancelled

        server = _serve(catalog.directory, port, api_key, tmp_path)  # back on the same port
        again = cm.process_run(run, **kwargs)
        _same_maps(again, previous)
    finally:
        _stop(server)


# ----------------------------------------------------------------------------- 3. disk


def test_a_full_disk_while_writing_the_store(fault_catalog, thread_client, tmp_path, monkeypatch):
    catalog, runs = fault_catalog
    scan, uid = runs["external"]
    out = tmp_path / "maps.zarr"
    kwargs = dict(subtrahend=int(scan.truth.attrs["background_point"]), locate=LOCATE,
                  client=thread_client, progress=False, out=out, overwrite=True)
    previous = cm.process_run(catalog[uid], **kwargs).load()

    from crystalmapping import store

    calls = []
    original = store._write_file

    def write(file, data):
        calls.append(file)
        if len(calls) == 4:  # a store half-written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return original(file, data)

    monkeypatch.setattr(store, "_write_file", write)
    with pytest.raises(StoreError) as info:
        cm.process_run(catalog[uid], **kwargs)
    message = str(info.value)
    print(message)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert "disk" in message and "full" in message and str(out) in message
    assert "free" in message.lower() and "--out" in message
    assert len(calls) > 3  # the write did start
    monkeypatch.undo()
    # the previous store is whole; no temporary store is left beside it
    _same_maps(cm.open_maps(out), previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.zarr"]
