"""Benchmark: ``crystalmapping serve`` maps many runs back to back; its memory must not grow.

Starts bluesky's 0MQ proxy on loopback (free ports), a LocalCluster of
``--workers`` worker processes and one ``crystalmapping serve`` process on it
(``--scheduler``), then publishes ``--runs`` runs (default 50) back to back,
in a fixed seeded order of these kinds:

========================  ==========================================================
normal                    a complete 8 x 5 scan, frames inline in the events
normal_hdf5               the same, frames in an HDF5 file (stream_resource/datum)
aborted                   stopped with ``exit_status="abort"`` after some points
unknown_descriptor        garbage: the events name a descriptor never sent
no_grid_shape             garbage: a start document without the grid's shape
wrong_frame_shape         garbage: every third point's frames of the wrong shape
                          (one of them 1-D)
never_stops               garbage: a run cut short with no stop document (the
                          server ends it after ``--stop-timeout``)
========================  ==========================================================

Every garbage run is preceded by a few messages that are no documents at all.
After each run has been dealt with (its report line, or the log line refusing
it) the benchmark samples the resident memory (RSS) of the serve process (its
``psutil`` figure), of each worker (``client.run`` with ``psutil``), and the
serve process's threads and open files, then checks the run's store with
:func:`crystalmapping.open_maps`: a normal run's maps have every point and no
failure, an aborted one says ``abort`` and has the points sent, a garbage run
is refused (no store) or written whole with what it says (failed points,
``timeout``, no point measured); no temporary or half-written entry is ever
left in the output directory.

The verdict: the RSS growth from run 5 to the last (MB and %), for the server
and for the workers, against ``--max-growth-mb``, and whether every store is
valid. The figures are printed as JSON and written to ``--json``; ``--report``
writes a markdown page with the memory curve as a table and a PNG plot next
to it::

    python benchmarks/soak.py [--runs 50] [--workers 2] [--seed 0] \\
        [--report docs/soak.md] [--json soak.json] [--keep DIR]

``tests/test_soak.py`` runs a short version (8 runs) with the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from harness import log, machine  # noqa: E402  (benchmarks/harness.py)
from streaming import free_port, report_line, wait_for  # noqa: E402

BIN = Path(sys.executable).parent
MB = 2**20

#: What each kind of run is (the report's legend).
KINDS = {
    "normal": "a complete scan, frames inline in the events",
    "normal_hdf5": "a complete scan, frames in an HDF5 file (stream_resource / stream_datum)",
    "aborted": "stopped with exit_status 'abort' after some points",
    "unknown_descriptor": "garbage: its events name a descriptor never sent",
    "no_grid_shape": "garbage: a start document without the grid's shape",
    "wrong_frame_shape": "garbage: every third point's frames of the wrong shape (one 1-D)",
    "never_stops": "garbage: cut short with no stop document (ended by the stop timeout)",
}
GARBAGE = ("unknown_descriptor", "no_grid_shape", "wrong_frame_shape", "never_stops")
#: How often each kind is drawn (after one of each).
WEIGHTS = {"normal": 0.3, "normal_hdf5": 0.2, "aborted": 0.2, "unknown_descriptor": 0.075,
           "no_grid_shape": 0.075, "wrong_frame_shape": 0.075, "never_stops": 0.075}
#: The scans: small, so that the soak measures the server, not the kernels.
SHAPE, DETECTOR, FRAMES = (8, 5), (128, 128), 2
#: Messages that are no documents, sent before each garbage run.
JUNK = (b"raw no-document", b"raw event \xc1\xc1\xc1", b"raw start " + b"\x92\x01\x02",
        b"raw \xff\xfe {}")


def plan(n: int, seed: int) -> list[str]:
    """The kinds of ``n`` runs: one of each (when ``n`` allows), the rest drawn; shuffled."""
    rng = np.random.default_rng(seed)
    kinds = list(KINDS)[:n]
    names, p = list(WEIGHTS), np.array(list(WEIGHTS.values()))
    kinds += list(rng.choice(names, size=n - len(kinds), p=p / p.sum()))
    rng.shuffle(kinds)
    return [str(k) for k in kinds]


@dataclass
class Run:
    """One run of the soak: its documents and what its store must say."""

    index: int
    kind: str
    uid: str
    documents: list
    store: bool = True  # whether a store must be written
    exit_status: str | None = None
    measured: int = 0
    failed: list | None = field(default_factory=list)  # None: any of the run's points


def make_run(index: int, kind: str, seed: int, data_dir: Path) -> Run:
    """The documents of run ``index`` of ``kind`` (seeded by ``seed`` and ``index``)."""
    import crystalmapping as cm

    rng = np.random.default_rng([seed, index])
    n = SHAPE[0] * SHAPE[1]
    stop_after = int(rng.integers(10, n - 5)) if kind == "aborted" else None
    scan = cm.simulate_scan(shape=SHAPE, detector_shape=DETECTOR, frames_per_point=FRAMES,
                            grains=2, seed=int(rng.integers(2**31)), stop_after=stop_after)
    external = kind == "normal_hdf5"
    docs = [(name, dict(doc)) for name, doc in
            scan.documents(external=external, directory=data_dir if external else None)]
    uid = docs[0][1]["uid"]
    run = Run(index, kind, uid, docs, exit_status="success", measured=scan.n_points)
    if kind == "aborted":
        run.exit_status = "abort"
    elif kind == "unknown_descriptor":
        bogus = f"never-sent-{index}"
        run.documents = [(name, dict(doc, descriptor=bogus) if name == "event" else doc)
                         for name, doc in docs]
        run.measured = 0  # logged, skipped: a whole store of no point
        run.failed = None  # none, or the points the stop counts, as never received
    elif kind == "no_grid_shape":
        start = {k: v for k, v in docs[0][1].items() if k not in ("shape", "extents")}
        run.documents = [("start", start)] + docs[1:]
        run.store, run.exit_status, run.measured = False, None, 0
    elif kind == "wrong_frame_shape":
        out = []
        for name, doc in docs:
            if name == "event" and doc["seq_num"] % 3 == 0:
                data = dict(doc["data"])
                frames = data[scan.data_key]
                data[scan.data_key] = (np.arange(7, dtype=frames.dtype) if doc["seq_num"] == 9
                                       else frames[:, : DETECTOR[0] * 3 // 4])
                doc = dict(doc, data=data)
                run.failed.append(doc["seq_num"] - 1)
            out.append((name, doc))
        run.documents = out
        run.measured = n - len(run.failed)
    elif kind == "never_stops":
        keep = int(rng.integers(10, n - 5))
        events = 0
        out = []
        for name, doc in docs:
            if name == "stop":
                break
            if name == "event":
                if events == keep:
                    break
                events += 1
            out.append((name, doc))
        run.documents, run.exit_status, run.measured = out, "timeout", keep
    return run


def check_store(run: Run, out_dir: Path) -> list[str]:
    """What is wrong with the store of ``run`` (empty when it is as it must be)."""
    import crystalmapping as cm

    path = out_dir / f"{run.uid}.zarr"
    problems = []
    leftovers = [p.name for p in out_dir.iterdir() if run.uid in p.name and p != path]
    if leftovers:
        problems.append(f"half-written or extra entries: {leftovers}")
    if not run.store:
        if path.exists():
            problems.append("a store was written for a refused run")
        return problems
    try:
        maps = cm.open_maps(path)
        measured = int(maps["measured"].sum())
        status = maps.attrs.get("exit_status")
        failed = list(maps.attrs.get("failed_points", []))
        ok_shape = tuple(maps["measured"].shape) == SHAPE
        grains = int(maps.sizes["grain"])
        maps.close()
    except Exception as exc:  # noqa: BLE001 - reported as the run's problem
        return problems + [f"store does not open: {type(exc).__name__}: {exc}"]
    if status != run.exit_status:
        problems.append(f"exit_status {status!r}, expected {run.exit_status!r}")
    if measured != run.measured:
        problems.append(f"{measured} points measured, expected {run.measured}")
    if run.failed is None:
        if not set(failed) <= set(range(SHAPE[0] * SHAPE[1])):
            problems.append(f"failed points {failed} outside the grid")
    elif sorted(failed) != sorted(run.failed):
        problems.append(f"failed points {failed}, expected {run.failed}")
    if not ok_shape:
        problems.append("maps not on the scan's grid")
    if run.kind in ("normal", "normal_hdf5") and grains < 1:
        problems.append("no grain mapped")
    return problems


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class Soak:
    """The proxy, the cluster, ``crystalmapping serve`` and a publisher; a context manager.

    Parameters
    ----------
    work : path
        Where the stores, the report, the derived catalog, the detector files
        and the server's log go.
    workers : int
        Worker processes of the LocalCluster the server runs on.
    stop_timeout : float
        The server's ``--stop-timeout`` (how long a run that never stops stays open).
    seed : int
        Seeds the order of the runs and their scans.
    """

    def __init__(self, work: Path, *, workers: int = 2, stop_timeout: float = 3.0,
                 seed: int = 0):
        self.work, self.workers, self.stop_timeout, self.seed = Path(work), workers, stop_timeout, seed
        self.out_dir = self.work / "maps"
        self.data_dir = self.work / "detector"
        self.report = self.work / "report.jsonl"
        self.serve_log = self.work / "serve.log"
        self.records: list[dict] = []
        self.exit_code: int | None = None
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Soak":
        import zmq

        from crystalmapping.execution import local_cluster

        self.work.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stack = self._stack.__enter__()
        try:
            pin, pout = free_port(), free_port()
            proxy = subprocess.Popen([str(BIN / "bluesky-0MQ-proxy"), "--in-address",
                                      f"127.0.0.1:{pin}", "--out-address", f"127.0.0.1:{pout}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(_end, proxy, signal.SIGKILL)
            self.client = stack.enter_context(
                local_cluster(self.workers, dashboard_address=None,
                              silence_logs=logging.CRITICAL))
            log_file = stack.enter_context(open(self.serve_log, "w"))
            self.serve = subprocess.Popen(
                [sys.executable, "-m", "crystalmapping.cli", "serve",
                 "--address", f"127.0.0.1:{pout}", "--scheduler", self.client.scheduler.address,
                 "--out-dir", str(self.out_dir), "--report", str(self.report),
                 "--catalog", str(self.work / "derived"), "--data-root", str(self.data_dir),
                 "--background", "0", "--partial-every-points", "10",
                 "--stop-timeout", str(self.stop_timeout)],
                stdout=log_file, stderr=subprocess.STDOUT)
            stack.callback(self._stop_server)
            wait_for(lambda: "serving: documents" in self.log_text(), 180, "server start",
                     self.serve, self.serve_log)
            self._ctx = zmq.Context()
            stack.callback(self._ctx.term)
            self.pub = self._ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.SNDHWM, 0)  # never drop what the soak sends
            self.pub.connect(f"tcp://127.0.0.1:{pin}")
            stack.callback(self.pub.close, 2000)
            n = 0

            def reached():
                nonlocal n
                n += 1
                self.pub.send(b"raw soak-probe-%d {}" % n)
                time.sleep(0.1)
                return "soak-probe-" in self.log_text()

            wait_for(reached, 60, "0MQ connection", self.serve, self.serve_log)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def _stop_server(self) -> None:
        self.exit_code = _end(self.serve, signal.SIGINT, timeout=120)

    def log_text(self) -> str:
        return self.serve_log.read_text(errors="replace")

    # ------------------------------------------------------------------ runs

    def memory(self) -> dict:
        """RSS (MB) of the server and of each worker; the server's threads and open files."""
        import psutil

        p = psutil.Process(self.serve.pid)
        with p.oneshot():
            serve = p.memory_info().rss
            threads, fds = p.num_threads(), p.num_fds()
        workers = self.client.run(_rss)
        return {"serve_rss_mb": round(serve / MB, 1),
                "workers_rss_mb": round(sum(workers.values()) / MB, 1),
                "worker_rss_mb": [round(workers[k] / MB, 1) for k in sorted(workers)],
                "serve_threads": threads, "serve_fds": fds}

    def publish(self, run: Run) -> None:
        from crystalmapping.wire import packb

        if run.kind in GARBAGE:
            for message in JUNK:
                self.pub.send(message)
        for name, doc in run.documents:
            self.pub.send(b"raw " + name.encode() + b" " + packb(doc))

    def done(self, run: Run):
        """The run's report line, or its refusal in the log; None while neither is there."""
        if run.store:
            return report_line(self.report, run.uid)
        return f"run {run.uid[:8]} is not mapped" in self.log_text()

    def run_one(self, index: int, kind: str, settle: float = 0.5) -> dict:
        """Publish run ``index`` of ``kind``, wait until it is dealt with, sample, check."""
        run = make_run(index, kind, self.seed, self.data_dir)
        t0 = time.perf_counter()
        self.publish(run)
        line = wait_for(lambda: self.done(run), 120 + self.stop_timeout,
                        f"run {index} ({kind})", self.serve, self.serve_log)
        seconds = time.perf_counter() - t0
        time.sleep(settle)  # let the monitor move the run to the finished ones
        record = {"run": index + 1, "kind": kind, "uid": run.uid, "seconds": round(seconds, 2),
                  **self.memory()}
        problems = check_store(run, self.out_dir)
        if isinstance(line, dict) and run.store and line.get("exit_status") != run.exit_status:
            problems.append(f"reported {line.get('exit_status')!r}")
        record["outcome"] = _outcome(run)
        record["valid"] = not problems
        record["problems"] = problems
        self.records.append(record)
        return record

    def run_all(self, n: int) -> list[dict]:
        for index, kind in enumerate(plan(n, self.seed)):
            r = self.run_one(index, kind)
            log(f"run {r['run']:3d} {kind:18s} {r['seconds']:5.1f} s  serve {r['serve_rss_mb']:7.1f}"
                f" MB  workers {r['workers_rss_mb']:7.1f} MB  threads {r['serve_threads']:3d}  "
                f"{'ok' if r['valid'] else 'INVALID: ' + '; '.join(r['problems'])}")
        return self.records

    def leftovers(self) -> list[str]:
        """Entries of the output directory that are no store of a run (temporary, rescued)."""
        uids = {r["uid"] for r in self.records}
        return sorted(p.name for p in self.out_dir.iterdir()
                      if not (p.name.endswith(".zarr") and p.name[:-5] in uids))


def _outcome(run: Run) -> str:
    if not run.store:
        return "refused, no store"
    failed = f", {len(run.failed)} failed" if run.failed else ""
    return f"{run.exit_status}, {run.measured} points{failed}"


def _end(proc: subprocess.Popen, sig, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def growth(records: list[dict], key: str, baseline: int) -> dict:
    """Growth of ``key`` from run ``baseline`` (1-based) to the last: MB, %, and the slope
    of a least-squares line through those runs (MB per run)."""
    values = [r[key] for r in records if r["run"] >= baseline]
    if not values:
        return {"from_mb": None, "to_mb": None, "mb": None, "percent": None,
                "slope_mb_per_run": None}
    first, last = values[0], values[-1]
    slope = float(np.polyfit(np.arange(len(values)), values, 1)[0]) if len(values) > 1 else 0.0
    return {"from_mb": first, "to_mb": last, "mb": round(last - first, 1),
            "percent": round(100 * (last - first) / first, 1),
            "slope_mb_per_run": round(slope, 3)}


def verdict(soak: Soak, baseline: int, max_growth_mb: float) -> dict:
    records = soak.records
    serve = growth(records, "serve_rss_mb", baseline)
    workers = growth(records, "workers_rss_mb", baseline)
    invalid = [r["run"] for r in records if not r["valid"]]
    leftovers = soak.leftovers()
    flat = all(g["mb"] is not None and g["mb"] <= max_growth_mb for g in (serve, workers))
    return {"baseline_run": baseline, "max_growth_mb": max_growth_mb,
            "serve_growth": serve, "workers_growth": workers,
            "threads": [records[0]["serve_threads"], records[-1]["serve_threads"]],
            "fds": [records[0]["serve_fds"], records[-1]["serve_fds"]],
            "invalid_runs": invalid, "leftover_entries": leftovers,
            "all_stores_valid": not invalid and not leftovers,
            "memory_flat": flat, "pass": flat and not invalid and not leftovers}


# ----------------------------------------------------------------------------- report


def plot(records: list[dict], baseline: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r["run"] for r in records]
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    ax.plot(runs, [r["serve_rss_mb"] for r in records], "-", color="C0", label="serve process")
    ax.plot(runs, [r["workers_rss_mb"] for r in records], "-", color="C1",
            label=f"workers ({len(records[0]['worker_rss_mb'])}, summed)")
    markers = {"normal": "o", "normal_hdf5": "s", "aborted": "v", "unknown_descriptor": "x",
               "no_grid_shape": "+", "wrong_frame_shape": "D", "never_stops": "*"}
    for kind, m in markers.items():
        sel = [r for r in records if r["kind"] == kind]
        if sel:
            ax.scatter([r["run"] for r in sel], [r["serve_rss_mb"] for r in sel], marker=m,
                       color="k", s=22, zorder=3, label=kind)
    ax.axvline(baseline, color="0.6", ls=":", lw=1)
    ax.set_xlabel("run")
    ax.set_ylabel("RSS after the run (MB)")
    ax.set_title("crystalmapping serve: memory over back-to-back runs")
    ax.legend(fontsize=7, ncol=2, loc="center right")
    ax.set_ylim(0, None)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(figures: dict, png: str | None) -> str:
    v = figures["verdict"]
    s, w = v["serve_growth"], v["workers_growth"]
    lines = [
        "# Soak: many runs through `crystalmapping serve`",
        "",
        "Regenerate this page (table and figure) with one command:",
        "",
        "    make benchmark-soak",
        "",
        f"`benchmarks/soak.py` starts bluesky's 0MQ proxy, a LocalCluster of "
        f"{figures['workers']} worker processes and `crystalmapping serve` on it, then "
        f"publishes {figures['runs']} runs back to back ({SHAPE[0]} x {SHAPE[1]} grid, "
        f"{DETECTOR[0]} x {DETECTOR[1]} px detector, {FRAMES} frames per point, background "
        f"point 0, partial maps every 10 points, stop timeout {figures['stop_timeout_s']:g} s, "
        "a derived run recorded per run) in a fixed seeded order "
        f"(seed {figures['seed']}). After each run it samples the resident memory (RSS) of the "
        "server and its workers and checks the run's store.",
        "",
        "| kind | runs | what it is | its store must be |",
        "|---|---|---|---|",
    ]
    expected = {"normal": "success, every point, no failure",
                "normal_hdf5": "success, every point, no failure",
                "aborted": "abort, the points sent",
                "unknown_descriptor": "whole, no point measured (the events logged; points the "
                                      "stop counts listed as never received)",
                "no_grid_shape": "absent (the run refused, logged)",
                "wrong_frame_shape": "success, the wrong points listed as failed",
                "never_stops": "timeout, the points sent"}
    counts = {k: sum(r["kind"] == k for r in figures["records"]) for k in KINDS}
    for kind, text in KINDS.items():
        lines.append(f"| {kind} | {counts[kind]} | {text} | {expected[kind]} |")
    lines += [
        "",
        "## Verdict",
        "",
        f"**{'PASS' if v['pass'] else 'FAIL'}**: "
        f"server RSS {s['from_mb']} MB after run {v['baseline_run']} -> {s['to_mb']} MB after "
        f"run {figures['runs']} ({s['mb']:+} MB, {s['percent']:+}%, least-squares slope "
        f"{s['slope_mb_per_run']:+} MB per run); workers {w['from_mb']} -> {w['to_mb']} MB "
        f"({w['mb']:+} MB, {w['percent']:+}%, slope {w['slope_mb_per_run']:+} MB per run); "
        f"bound {v['max_growth_mb']:g} MB each. "
        f"{'Every store valid' if v['all_stores_valid'] else 'INVALID runs: ' + str(v['invalid_runs'])}"
        f"{', no leftover entry' if not v['leftover_entries'] else ', leftovers: ' + str(v['leftover_entries'])}. "
        f"Server threads {v['threads'][0]} -> {v['threads'][1]}, open files "
        f"{v['fds'][0]} -> {v['fds'][1]}. {figures['seconds']:.0f} s in all.",
        "",
    ]
    if png:
        lines += [f"![memory over the runs]({png})", ""]
    lines += ["## Memory after each run", "",
              "| run | kind | store | s | serve RSS MB | workers RSS MB | threads | files |",
              "|---|---|---|---|---|---|---|---|"]
    for r in figures["records"]:
        store = r["outcome"] if r["valid"] else "INVALID: " + "; ".join(r["problems"])
        lines.append(f"| {r['run']} | {r['kind']} | {store} | {r['seconds']} | "
                     f"{r['serve_rss_mb']} | {r['workers_rss_mb']} | {r['serve_threads']} | "
                     f"{r['serve_fds']} |")
    m = figures["machine"]
    lines += ["", "## Machine", "",
              f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, Python "
              f"{m['python']}; commit {m['commit']}; load average at start "
              f"{m['load_average_at_start']}; {m['date']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-timeout", type=float, default=3.0,
                        help="the server's stop timeout (a run that never stops waits this long)")
    parser.add_argument("--baseline", type=int, default=5,
                        help="growth is measured from this run (1-based) to the last")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--report", default=None, metavar="PAGE.md",
                        help="write a markdown page and a PNG plot (same name, .png)")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    figures = {"runs": args.runs, "workers": args.workers, "seed": args.seed,
               "stop_timeout_s": args.stop_timeout, "machine": machine()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        with Soak(work, workers=args.workers, stop_timeout=args.stop_timeout,
                  seed=args.seed) as soak:
            log(f"server ready in {time.perf_counter() - t0:.1f} s; {soak.memory()}")
            soak.run_all(args.runs)
        figures["serve_exit_code"] = soak.exit_code
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        figures["verdict"] = verdict(soak, args.baseline, args.max_growth_mb)
        if soak.exit_code != 0:
            figures["verdict"]["pass"] = False
        figures["records"] = soak.records
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.report:
        page = Path(args.report)
        png = page.with_suffix(".png")
        plot(soak.records, args.baseline, png)
        page.write_text(markdown(figures, png.name))
        log(f"wrote {page} and {png}")
    return 0 if figures["verdict"]["pass"] else 1


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
