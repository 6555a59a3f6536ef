"""Helpers of ``benchmarks/detector.py``: the scan, memory, the batch and live runs, the machine.

Also a small command of its own, run by ``detector.py`` in a child process so
that the memory of one batch run is measured alone (its client and scheduler
are that process, its workers their children)::

    python benchmarks/harness.py batch --catalog DIR --uid UID --background N \
        --workers 2 --out maps.zarr --json result.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from streaming import free_port, report_line, wait_for  # noqa: E402  (benchmarks/streaming.py)

BIN = Path(sys.executable).parent
_T0 = time.monotonic()


def log(message: str) -> None:
    """A progress line on stderr, with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the scan

#: Height (counts) of the powder ring, as in the accuracy benchmark.
POWDER = 60.0


def grid_for_points(points: int) -> tuple[int, int]:
    """A grid of ``points`` points (about, if no factors fit) near the measured rod's 4:1 aspect."""
    rows = max(2, round(math.sqrt(points * 4)))
    for r in range(rows, max(2, math.isqrt(points * 2)) - 1, -1):  # down to 2:1
        if points % r == 0:
            return r, points // r
    return rows, max(2, round(points / rows))


def simulate(shape, detector, frames, spots, seed):
    """The scan, with as many Bragg peaks per grain as give about ``spots`` on a lit frame."""
    import crystalmapping as cm
    from crystalmapping.errors import ConfigError

    kw = dict(shape=tuple(shape), detector_shape=tuple(detector), frames_per_point=frames,
              powder=POWDER, seed=seed)
    one = cm.simulate_scan(peaks_per_grain=1, **kw)  # the same grains, one peak each
    lit = lit_peaks(one)
    wanted = max(1, round(spots / lit[lit > 0].mean())) if (lit > 0).any() else spots
    # The most peaks per grain, up to that, that fit on the detector at the simulator's spacing.
    low, high, best = 1, wanted, None
    while low <= high:
        mid = (low + high) // 2
        try:
            best, low = cm.simulate_scan(peaks_per_grain=mid, **kw), mid + 1
        except ConfigError:
            high = mid - 1
    if best is None:
        raise ConfigError(f"not even one Bragg peak per grain fits on a {detector} detector")
    return best


def lit_peaks(scan) -> np.ndarray:
    """Bragg peaks on each point's frames, in acquisition order."""
    rows, cols = scan.grid.indices(np.arange(scan.n_points))
    return (scan.truth["amplitude"].to_numpy()[:, rows, cols] > 0).sum(axis=0)


def background_point(scan) -> int:
    """The first point off the sample (no Bragg peak, no powder): the background."""
    rows, cols = scan.grid.indices(np.arange(scan.n_points))
    off = (lit_peaks(scan) == 0) & (scan.truth["powder"].to_numpy()[rows, cols] == 0)
    return int(np.flatnonzero(off)[0])


def ingest(catalog, scan) -> str:
    """Write the scan into the catalog (external HDF5) unless an identical one is there."""
    tag = json.dumps({"shape": scan.grid.shape, "detector": scan.detector_shape,
                      "frames": scan.frames_per_point, "peaks": int(scan.truth.sizes["peak"]),
                      "powder": scan.powder_height, "seed": scan.seed}, sort_keys=True)
    for uid in catalog.uids():
        if catalog[uid].start.get("benchmark_scan") == tag:
            return uid
    scan.metadata["benchmark_scan"] = tag
    return catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))


def scan_figures(scan, seconds: float) -> dict:
    lit = lit_peaks(scan)
    return {"points": scan.n_points, "shape": list(scan.grid.shape),
            "detector": list(scan.detector_shape), "frames": scan.frames_per_point,
            "dtype": "uint16", "grains": int(scan.truth["grain"].max()) + 1,
            "bragg_peaks": int(scan.truth.sizes["peak"]),
            "points_with_spots": int((lit > 0).sum()),
            "spots_per_lit_frame": round(float(lit[lit > 0].mean()), 1) if (lit > 0).any() else 0,
            "powder_points": int((scan.truth["powder"] > 0).sum()), "powder_height": POWDER,
            "simulate_and_ingest_s": round(seconds, 1)}


# ----------------------------------------------------------------------------- memory


class TreeUsage:
    """Samples a process and all its descendants in a thread: memory and CPU time.

    ``peak`` is the largest resident memory summed over the tree in one
    sample (bytes); ``cpu_seconds`` the user and system time the tree spent
    while sampled; ``seconds`` how long it was sampled.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak, self.seconds = pid, interval, 0, 0.0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)

    def _sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                with p.oneshot():
                    total += p.memory_info().rss
                    cpu = p.cpu_times()
            except psutil.Error:  # exited between the listing and the read
                continue
            self._first.setdefault(p.pid, cpu.user + cpu.system)
            self._last[p.pid] = cpu.user + cpu.system
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)
        self._sample()

    def __enter__(self) -> "TreeUsage":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0


# ----------------------------------------------------------------------------- batch


def run_batch(catalog_dir: Path, uid: str, background: int, workers: int, out: Path,
              log_path: Path) -> dict:
    """``process_run`` on a LocalCluster of ``workers``, in a child process; its figures.

    Returns the child's figures: ``seconds`` of ``process_run``, after
    ``cluster_start_s`` and ``warm_up_s`` (see :func:`warm_up`), ``points``,
    ``maps``, ``peak_rss`` (bytes: the client and scheduler's process and the
    workers, during ``process_run``), ``cpu_s`` (their CPU time then) and
    ``peak_rss_with_start`` (the memory from the child's start to its end).
    """
    result = out.with_suffix(".json")
    cmd = [sys.executable, str(HERE / "harness.py"), "batch", "--catalog", str(catalog_dir),
           "--uid", uid, "--background", str(background), "--workers", str(workers),
           "--out", str(out), "--json", str(result)]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        with TreeUsage(proc.pid) as rss:
            rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"the batch run failed ({rc}):\n{log_path.read_text()[-4000:]}")
    return dict(json.loads(result.read_text()), peak_rss_with_start=rss.peak)


def _batch_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="harness.py batch")
    p.add_argument("--catalog", required=True)
    p.add_argument("--uid", required=True)
    p.add_argument("--background", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    import crystalmapping as cm
    from crystalmapping import process_run  # its modules imported before the clock starts
    from crystalmapping.execution import local_cluster

    run = cm.Catalog(args.catalog)[args.uid]
    config = cm.ProcessConfig(background=args.background)
    t = time.perf_counter()
    with local_cluster(args.workers, dashboard_address=None) as client:
        started = time.perf_counter() - t
        t = time.perf_counter()
        warm_up(client)
        warm = time.perf_counter() - t
        with TreeUsage(os.getpid()) as rss:
            t = time.perf_counter()
            maps = process_run(run, config=config, client=client, out=args.out,
                               overwrite=True, progress=False)
            seconds = time.perf_counter() - t
    Path(args.json).write_text(json.dumps({
        "seconds": seconds, "cluster_start_s": started, "warm_up_s": warm,
        "workers": args.workers, "peak_rss": rss.peak, "cpu_s": rss.cpu_seconds,
        "points": int(maps.attrs["n_points_measured"]), "maps": int(maps.sizes["grain"])}))


def warm_up_frames() -> tuple[np.ndarray, np.ndarray]:
    """The package's warm-up frames and background (small, uint16, a spot and a ridge)."""
    from crystalmapping.tasks import _warm_up_frames

    return _warm_up_frames()


def warm_up(client) -> None:
    """The kernels once on every worker (imports, compiles), as the tutorial chain is warmed
    up: what ``crystalmapping serve`` does before it listens."""
    from crystalmapping.config import LocateOptions
    from crystalmapping.tasks import warm_up as warm

    warm(client, LocateOptions(diameter=15).to_dict())


# ----------------------------------------------------------------------------- live


@contextmanager
def proxy():
    """bluesky's 0MQ proxy on loopback; yields its (in, out) ports."""
    pin, pout = free_port(), free_port()
    proc = subprocess.Popen([str(BIN / "bluesky-0MQ-proxy"), "--in-address",
                             f"127.0.0.1:{pin}", "--out-address", f"127.0.0.1:{pout}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield pin, pout
    finally:
        proc.kill()
        proc.wait()


def _wait_subscribed(pin: int, serve, serve_log: Path) -> None:
    """Publish probes until the server logs one: past the PUB/SUB slow joiner."""
    import zmq

    ctx = zmq.Context()
    probe = ctx.socket(zmq.PUB)
    probe.connect(f"tcp://127.0.0.1:{pin}")
    n = 0

    def reached():
        nonlocal n
        n += 1
        probe.send(b"raw bench-probe-%d {}" % n)
        time.sleep(0.1)
        return "bench-probe-" in serve_log.read_text()

    try:
        wait_for(reached, 60, "0MQ connection", serve, serve_log)
    finally:
        probe.close(linger=0)
        ctx.term()


def run_live(run, ports: tuple[int, int], background: int, workers: int, rate: float,
             work: Path) -> dict:
    """Start ``crystalmapping serve``, publish ``run`` at ``rate`` points/s, wait for its maps.

    Returns the server's report line for the run, with ``published`` (events
    sent), ``publish_s``, ``publish_to_maps_s`` and ``peak_rss`` (bytes: the
    server and its workers, from start to exit).
    """
    from crystalmapping.publish import publish_run

    pin, pout = ports
    shutil.rmtree(work, ignore_errors=True)  # serve skips a run whose maps exist
    work.mkdir(parents=True)
    report, serve_log = work / "report.jsonl", work / "serve.log"
    with open(serve_log, "w") as log_file:
        serve = subprocess.Popen(
            [sys.executable, "-m", "crystalmapping.cli", "serve", "--address",
             f"127.0.0.1:{pout}", "--workers", str(workers), "--out-dir", str(work / "maps"),
             "--report", str(report), "--background", str(background),
             "--data-root", str(run.catalog.detector_dir)],
            stdout=log_file, stderr=subprocess.STDOUT)
        with TreeUsage(serve.pid) as rss:
            try:
                wait_for(lambda: "serving: documents" in serve_log.read_text(), 120,
                         "server start", serve, serve_log)
                _wait_subscribed(pin, serve, serve_log)
                t0 = time.perf_counter()
                counts = publish_run(run, f"127.0.0.1:{pin}", rate=rate)
                published = time.perf_counter()
                line = wait_for(lambda: report_line(report, run.uid), 6 * 3600, "final maps",
                                serve, serve_log)
                done = time.perf_counter()
            finally:
                serve.send_signal(signal.SIGTERM)
                try:
                    serve.wait(120)
                except subprocess.TimeoutExpired:
                    serve.kill()
                    serve.wait()
    return dict(line, published=counts.get("event", 0), publish_s=published - t0,
                publish_to_maps_s=done - t0, peak_rss=rss.peak)


def same_maps(path_a: Path, path_b: Path) -> tuple[bool, str]:
    """Whether two stores hold identical maps (attributes that say how or when left out)."""
    import xarray as xr

    import crystalmapping as cm

    skip = {"exit_status", "failed_points", "failure_reasons", "created", "history"}
    a, b = cm.open_maps(path_a).load(), cm.open_maps(path_b).load()
    for ds in (a, b):
        ds.attrs = {k: v for k, v in ds.attrs.items() if k not in skip}
    try:
        xr.testing.assert_identical(a, b)
        return True, ""
    except AssertionError as exc:
        return False, str(exc)[:2000]


# ----------------------------------------------------------------------------- machine


PACKAGES = ["crystalmapping", "numpy", "scipy", "numba", "pandas", "dask", "distributed",
            "xarray", "zarr", "h5py", "tiled", "bluesky", "bluesky-tiled-plugins", "trackpy",
            "pyzmq"]


def source_hash() -> str:
    """A digest of the package's source: the tree is edited while benchmarks run."""
    import hashlib

    import crystalmapping

    digest = hashlib.sha1()
    for path in sorted(Path(crystalmapping.__file__).parent.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict:
    """What the figures were measured on."""
    import psutil

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": model, "cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "packages": versions, "commit": commit,
            "source_at_start": source_hash(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


if __name__ == "__main__":
    if sys.argv[1:2] != ["batch"]:
        sys.exit(__doc__)
    _batch_main(sys.argv[2:])
