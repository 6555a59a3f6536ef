"""Report: what the live server says of each run it maps.

One :class:`RunRecord` per run routed by
:class:`~crystalmapping.serve.DocumentServer`: its processor, the largest
queue and lag seen, when its stop came. After a run's final maps are written
(:class:`~crystalmapping.writer.MapWriter` calls back) :class:`RunReports`
makes its summary (uid, points, peaks, maps, grains, lag, latency, stop to
maps) and

* logs it in one line (a warning if the run failed or lost points),
* appends it as one JSON line to the report file,
* records a derived run in the catalog (:mod:`crystalmapping.derived`).

Finished runs are kept (the summaries of the last 1000) for :meth:`RunReports.runs`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .derived import derived_run_documents

__all__ = ["RunRecord", "RunReports"]

# The server's log (``crystalmapping serve`` shows its INFO lines), as before the split.
logger = logging.getLogger("crystalmapping.serve")


class RunRecord:
    """What the server knows about one run it routes."""

    def __init__(self, processor):
        self.processor = processor
        self.uid: str = ""
        self.max_queued = 0
        self.max_lag = 0.0
        self.stop_received: float | None = None
        self.summary: dict | None = None
        self.reported = False

    def sample(self) -> None:
        p = self.processor
        self.max_queued = max(self.max_queued, p.queued)
        self.max_lag = max(self.max_lag, p.lag_seconds)


class RunReports:
    """The runs of a server, open and finished, and their reports.

    Parameters
    ----------
    catalog : Catalog, optional
        Where each finished run's derived run is recorded.
    report : path, optional
        A file to which one JSON line per finished run is appended.
    on_written : callable, optional
        ``on_written(path, maps)``, called first on every write (partial or final).
    """

    def __init__(self, catalog=None, report: Path | None = None,
                 on_written: Callable[[Path, Any], Any] | None = None):
        self.catalog = catalog
        self.report = report
        self._user_on_written = on_written
        self._lock = threading.RLock()
        self._records: dict[str, RunRecord] = {}
        self._finished: deque = deque(maxlen=1000)
        self._catalog_lock = threading.Lock()

    def add(self, uid: str, processor) -> RunRecord:
        """Keep a record of a run that started."""
        record = RunRecord(processor)
        record.uid = uid
        with self._lock:
            self._records[record.uid] = record
        return record

    def stopped(self, uid) -> RunRecord | None:
        """Note that the stop of run ``uid`` came; its record, None if the run is unknown."""
        with self._lock:
            record = self._records.get(uid)
            if record is not None:
                record.stop_received = time.monotonic()
                if getattr(record.processor, "start_doc", True) is None:
                    # its start was refused (logged): nothing will be reported, and the
                    # record would stay among the open runs, sampled, for good
                    del self._records[uid]
        return record

    def open(self) -> list[RunRecord]:
        """The records of the runs not finished and reported yet."""
        with self._lock:
            return list(self._records.values())

    def on_written(self, path: Path, maps) -> None:
        """Each write of a processor; after the final one: log line, report, derived run."""
        if self._user_on_written is not None:
            self._user_on_written(path, maps)
        status = maps.attrs.get("exit_status")
        if status == "running":
            return
        uid = maps.attrs.get("source_uid", Path(path).name.removesuffix(".zarr"))
        written = time.monotonic()
        with self._lock:
            record = self._records.get(uid)
        if record is None:
            return
        record.sample()
        stop_to_maps = (None if record.stop_received is None
                        else round(written - record.stop_received, 4))
        record.summary = self._report(uid, path, maps, record.processor.status(),
                                      record.max_queued, record.max_lag, stop_to_maps)

    def completed(self, path: Path, maps) -> dict:
        """A run a previous server left unfinished, completed from the catalog
        (:mod:`crystalmapping.recover`): log line, report line, derived run."""
        uid = maps.attrs.get("source_uid", Path(path).name.removesuffix(".zarr"))
        p = {"received": None, "latency_median_s": None, "latency_p95_s": None}
        summary = self._report(uid, path, maps, p, 0, 0.0, None, completed=True)
        with self._lock:
            self._finished.append(_Done(summary))
        return summary

    def _report(self, uid: str, path, maps, p: dict, max_queued: int, max_lag: float,
                stop_to_maps, *, completed: bool = False) -> dict:
        status = maps.attrs.get("exit_status")
        failed = list(maps.attrs.get("failed_points", []))
        summary = {
            "uid": uid,
            "exit_status": status,
            "path": str(Path(path).absolute()),
            "points": int(maps.attrs.get("n_points_measured", 0)),
            "received": p["received"],
            "failed": len(failed),
            "peaks": int(maps.attrs.get("n_peaks_found", 0)),
            "maps": int(maps.sizes.get("grain", 0)),
            "grains": int(maps.attrs.get("n_grains", 0)),
            "max_queued": max_queued,
            "max_lag_s": round(max_lag, 4),
            "latency_median_s": p["latency_median_s"],
            "latency_p95_s": p["latency_p95_s"],
            "stop_to_maps_s": stop_to_maps,
            "derived_uid": None,
        }
        if completed:
            summary["completed_from_catalog"] = True
        if self.catalog is not None:
            summary["derived_uid"] = self._record_derived_run(uid, path, maps, summary)
        level = logging.INFO if status == "success" and not failed else logging.WARNING
        logger.log(level, "run %s: %d points (%d failed), %d peaks, %d maps of %d grains, lag "
                   "max %.1f s (%d points queued), latency median %s s, p95 %s s, maps %s s "
                   "after the stop: %s -> %s%s", uid[:8], summary["points"], summary["failed"],
                   summary["peaks"], summary["maps"], summary["grains"], summary["max_lag_s"],
                   summary["max_queued"], _fmt(summary["latency_median_s"]),
                   _fmt(summary["latency_p95_s"]), _fmt(summary["stop_to_maps_s"]), status, path,
                   " (completed from the catalog)" if completed else "")
        if self.report is not None:
            try:
                with self._catalog_lock, open(self.report, "a") as f:
                    f.write(json.dumps(summary) + "\n")
            except OSError:
                logger.exception("run %s: the report line could not be written to %s",
                                 uid[:8], self.report)
        return summary

    def _record_derived_run(self, uid: str, path, maps, summary: dict) -> str | None:
        try:
            documents = derived_run_documents(uid, path, maps, summary)
            with self._catalog_lock:
                self.catalog.ingest(documents)
            return documents[0][1]["uid"]
        except Exception:  # noqa: BLE001 - the maps are written; say why the record is not
            logger.exception("run %s: its maps are in %s but the derived run could not be "
                             "recorded in %s", uid[:8], path, self.catalog)
            return None

    def sample(self) -> None:
        """Sample queue and lag of the open runs; report runs whose final write failed;
        move the stopped, reported runs to the finished ones."""
        with self._lock:
            records = list(self._records.values())
        for record in records:
            record.sample()
            status = record.processor.exit_status
            if status is None or record.reported:
                continue
            record.reported = True
            if record.summary is None:
                try:
                    record.processor.wait(0)
                except Exception as exc:  # noqa: BLE001 - reported, the server goes on
                    logger.error("run %s: the maps could not be written: %s: %s", record.uid[:8],
                                 type(exc).__name__, exc)
            with self._lock:
                if self._records.get(record.uid) is record and record.processor.stop_doc:
                    del self._records[record.uid]
                    # the summary only: the processor (its documents, ledger, thread) is
                    # not kept for each of the last 1000 runs
                    self._finished.append(_Done(record.summary))

    def runs(self) -> list[dict]:
        """Summaries of the finished runs, oldest first (the report's lines)."""
        with self._lock:
            done = [r.summary for r in self._finished if r.summary is not None]
            done += [r.summary for r in self._records.values() if r.summary is not None]
        return done


class _Done:
    """The finished record of a run completed from the catalog (no processor)."""

    def __init__(self, summary: dict):
        self.summary = summary


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
