"""Shared fixtures: a real embedded catalog, a real tiled server, real dask clusters."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
TILED = Path(sys.executable).with_name("tiled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def catalog(tmp_path_factory):
    """An embedded catalog holding small simulated scans (see ``scans``)."""
    from crystalmapping import Catalog

    return Catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="session")
def scans(catalog):
    """Simulated runs in ``catalog``: name -> (SimulatedScan, uid)."""
    from crystalmapping.sim import simulate_scan

    out = {}
    specs = {
        # the measured rod's 3 grains on a snaking grid, frames in external HDF5
        "rod": dict(shape=(24, 8), detector_shape=(512, 512), grains="reference",
                    peak_height=600.0, seed=11, external=True),
        # the same kind of scan with frames inline in the events
        "inline": dict(shape=(8, 5), detector_shape=(128, 128), grains=2, seed=5,
                       external=False),
        # an aborted scan (stopped after 30 of 40 points)
        "aborted": dict(shape=(8, 5), detector_shape=(128, 128), grains=2, seed=6,
                        stop_after=30, external=True),
    }
    for name, spec in specs.items():
        external = spec.pop("external")
        scan = simulate_scan(**spec)
        uid = catalog.ingest(scan.documents(external=external, directory=catalog.detector_dir))
        out[name] = (scan, uid)
    return out


@pytest.fixture(scope="session")
def tiled_server(catalog, scans, tmp_path_factory):
    """``tiled serve config`` on 127.0.0.1 over the same catalog, with an API key.

    Yields ``(url, api_key)``.
    """
    directory = catalog.directory
    api_key = secrets.token_hex(16)
    port = free_port()
    config = tmp_path_factory.mktemp("tiled") / "config.yml"
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
    log = open(config.with_suffix(".log"), "w")
    proc = subprocess.Popen([str(TILED), "serve", "config", "--host", "127.0.0.1", "--port",
                             str(port), str(config)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"tiled server exited: {config.with_suffix('.log').read_text()}")
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("tiled server did not start in 60 s")
    yield url, api_key
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _local_client(threads: int):
    from crystalmapping.execution import local_cluster

    with local_cluster(1, threads_per_worker=threads, processes=False) as client:
        yield client


@pytest.fixture(scope="session")
def thread_client():
    """A LocalCluster of 2 threads (fast to start) with a client that is not the default."""
    yield from _local_client(2)


@pytest.fixture(scope="session")
def batch_client():
    """One worker thread, for the batch references the streaming tests compare with."""
    yield from _local_client(1)


def _spot():
    """A 64 x 64 image of one Gaussian spot: what the locator is compiled on."""
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    return 100 * np.exp(-((yy - 30) ** 2 + (xx - 20) ** 2) / 8.0)


@pytest.fixture(scope="session", autouse=True)
def _compiled_locator(tmp_path_factory):
    """Compile the bragg locator's kernels once, before any test or worker needs them.

    On a fresh clone numba's disk cache is empty: compiling takes about a minute of
    CPU, and processes that started together would each compile on their own. Done
    here once, every later process loads the cache in about a second.

    Under pytest-xdist the workers take turns, under an exclusive file lock: the first
    compiles, the others then load what it wrote. Two processes must never compile
    the same kernel at once: numba's cache names each compiled version by its rank in
    the index the process read, so two writers can leave an index whose entry points at
    the other process's machine code, and every later process that loads it crashes
    (a segmentation fault in the noise kernel, seen once in four fresh clones while
    the two first workers compiled halves side by side).
    """
    import fcntl

    import numpy as np

    from crystalmapping.locate import bandpass, locate_peaks

    shared = tmp_path_factory.getbasetemp().parent  # the same for every xdist worker
    with open(shared / "numba-compile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            spot = _spot()
            for dtype in (np.float32, np.float64):
                locate_peaks(spot.astype(dtype), diameter=7)
                bandpass(spot.astype(dtype))
            # a float32 image that is not finite: band-passed and measured in float64
            spot = spot.astype(np.float32)
            spot[0, 0] = np.nan
            locate_peaks(spot, diameter=7)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    yield
