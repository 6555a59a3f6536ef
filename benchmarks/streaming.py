"""Benchmark: a scan streamed through bluesky's 0MQ proxy to ``crystalmapping serve``, against batch.

Simulates a grid scan (external HDF5 frames, 512 x 512 px by default) into a
temporary embedded catalog, then in one run:

* ``stream``: starts ``bluesky-0MQ-proxy`` and ``crystalmapping serve`` (a
  LocalCluster of ``--workers`` processes) on loopback, publishes the run with
  :func:`crystalmapping.serve.publish_run` (stream_resource/stream_datum
  references; the server reads the HDF5 file) at ``--rate`` points/s or as
  fast as possible, and waits for the final maps. The server's report gives the
  per-point latency (frames known -> peaks ready: median, 95th percentile),
  the lag (most points queued, most seconds behind) and the time from the stop
  document to the maps written;
* ``batch``: :func:`crystalmapping.process_run` on the same run, on a
  LocalCluster of as many workers (started after the server has exited).

Both use the same configuration and the background of the first point off the
sample; the maps must be identical. The JSON summary gives both times and
their ratio.

    python benchmarks/streaming.py [--points 1000] [--detector 512 512] [--frames 2]
                                   [--workers 2] [--rate POINTS_PER_S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited:\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s\n{log.read_text() if log else ''}")
        time.sleep(0.05)


def report_line(report: Path, uid: str):
    if not report.exists():
        return None
    for line in report.read_text().splitlines():
        if line.strip() and json.loads(line)["uid"] == uid:
            return json.loads(line)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--detector", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=None,
                        help="points per second to publish (default: as fast as possible)")
    parser.add_argument("--partial-every-points", type=int, default=50,
                        help="the server's partial-map interval (its default: 50)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR and keep it (default: a temporary directory)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import xarray as xr
    import zmq
    from crystalmapping.execution import local_cluster

    import crystalmapping as cm
    from crystalmapping.demo import shape_for_points
    from crystalmapping.config import ProcessConfig
    from crystalmapping.publish import publish_run

    shape = shape_for_points(args.points)
    figures: dict = {"points": shape[0] * shape[1], "shape": list(shape),
                     "detector": args.detector, "frames": args.frames, "workers": args.workers,
                     "rate_points_per_s": args.rate}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        catalog = cm.Catalog(work / "catalog")
        t = time.perf_counter()
        scan = cm.simulate_scan(shape=shape, detector_shape=tuple(args.detector),
                                frames_per_point=args.frames, seed=args.seed)
        uid = catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))
        figures["simulate_and_ingest_s"] = round(time.perf_counter() - t, 2)
        # the first point off the sample, so no point waits long for its background
        occupied = scan.truth["amplitude"].sum("peak").values + scan.truth["powder"].values
        rows, cols = scan.grid.indices(np.arange(scan.n_points))
        background = int(np.flatnonzero(occupied[rows, cols] == 0)[0])
        figures["background_point"] = background
        run = catalog[uid]

        # -- stream: proxy + serve subprocesses, publish, wait for the final maps ------------
        pin, pout = free_port(), free_port()
        logs = {name: open(work / f"{name}.log", "w") for name in ("proxy", "serve")}
        proxy = subprocess.Popen([str(BIN / "bluesky-0MQ-proxy"), "--in-address",
                                  f"127.0.0.1:{pin}", "--out-address", f"127.0.0.1:{pout}"],
                                 stdout=logs["proxy"], stderr=subprocess.STDOUT)
        report = work / "report.jsonl"
        t = time.perf_counter()
        serve = subprocess.Popen(
            [sys.executable, "-m", "crystalmapping.cli", "serve", "--address",
             f"127.0.0.1:{pout}", "--workers", str(args.workers), "--out-dir", str(work / "maps"),
             "--report", str(report), "--background", str(background),
             "--partial-every-points", str(args.partial_every_points),
             "--data-root", str(catalog.detector_dir)],
            stdout=logs["serve"], stderr=subprocess.STDOUT)
        serve_log = work / "serve.log"
        try:
            wait_for(lambda: "serving: documents" in serve_log.read_text(), 120,
                     "server start", serve, serve_log)
            figures["server_start_s"] = round(time.perf_counter() - t, 2)
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

            wait_for(reached, 60, "0MQ connection", serve, serve_log)
            probe.close(linger=0)
            ctx.term()

            t0 = time.perf_counter()
            counts = publish_run(run, f"127.0.0.1:{pin}", rate=args.rate)
            t_published = time.perf_counter()
            line = wait_for(lambda: report_line(report, uid), 3600, "final maps", serve,
                            serve_log)
            t_maps = time.perf_counter()
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
            proxy.kill()
            proxy.wait()
            for f in logs.values():
                f.close()
        figures["stream"] = {
            "publish_s": round(t_published - t0, 2),
            "documents": counts,
            "publish_to_maps_s": round(t_maps - t0, 2),
            "points_per_s": round(figures["points"] / (t_maps - t0), 2),
            "latency_median_s": round(line["latency_median_s"], 3),
            "latency_p95_s": round(line["latency_p95_s"], 3),
            "max_points_queued": line["max_queued"],
            "max_seconds_behind": line["max_lag_s"],
            "stop_to_maps_s": line["stop_to_maps_s"],
            "failed_points": line["failed"],
            "peaks": line["peaks"],
            "maps": line["maps"],
        }

        # -- batch: process_run on a LocalCluster of as many workers ---------------------------
        config = ProcessConfig(background=background)
        with local_cluster(args.workers) as client:
            t = time.perf_counter()
            batch = cm.process_run(run, config=config, client=client, out=work / "batch.zarr",
                                   progress=False)
            batch_s = time.perf_counter() - t
        figures["batch"] = {"seconds": round(batch_s, 2),
                            "points_per_s": round(figures["points"] / batch_s, 2)}
        figures["stream_over_batch"] = round((t_maps - t0) / batch_s, 3)

        streamed = cm.open_maps(Path(line["path"])).load()
        stream_only = {"exit_status", "failed_points", "failure_reasons", "created", "history"}
        streamed.attrs = {k: v for k, v in streamed.attrs.items() if k not in stream_only}
        batch = batch.load()
        batch.attrs = {k: v for k, v in batch.attrs.items() if k not in {"created", "history"}}
        try:
            xr.testing.assert_identical(streamed, batch)
            figures["identical_maps"] = True
        except AssertionError as exc:
            figures["identical_maps"] = False
            figures["difference"] = str(exc)[:2000]
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(0 if figures["identical_maps"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
