"""Writer: a live run's partial, final and timeout maps, through the shared finish step.

The last stage of :class:`~crystalmapping.stream.StreamProcessor`. A watcher
thread, started by the run's first document::

    every N points or T seconds   finish.finish_maps (maps.gather_tables ->
                                  maps.reduce_scan) -> store.write_maps: partial
                                  maps, ``exit_status="running"``
    every few seconds             the queue and the lag in the log (a warning
                                  past ``warn_lag_seconds``)
    no document for stop_timeout  the maps as they are, ``exit_status="timeout"``;
                                  documents arriving later reopen the run
    stop, nothing queued          the same gather, reduce and atomic write, to
                                  ``out_dir/<uid>.zarr``; on a failed reduce the
                                  tables are kept beside it (``<uid>.peaks.zarr``)

The finish step is the batch pipeline's (:mod:`crystalmapping.finish`), so
the final maps equal batch maps; the store gets ``exit_status``,
``failed_points`` and ``failure_reasons`` besides. At the stop, points that
waited for a background point never measured, and external events whose
``stream_datum`` never came, are failed points.

Backpressure. Nothing is dropped: a point is either queued (submitted and
not done, or waiting for the background) or done; the log says the queue and
the lag every few seconds while points are queued.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Mapping

import xarray as xr

from .finish import finish_maps
from .store import write_maps

__all__ = ["MapWriter"]

# One logger for a live run's lines, whichever module says them (as before the split).
logger = logging.getLogger("crystalmapping.stream")

#: Seconds between two status lines in the log while points are queued.
_LOG_EVERY = 5.0


class MapWriter:
    """The watcher thread of one run: partial maps, the lag in the log, the final maps.

    A base of :class:`~crystalmapping.stream.StreamProcessor`, which gives it
    the timing options (``partial_every_points``, ``partial_every_seconds``,
    ``stop_timeout``, ``warn_lag_seconds``), ``on_written``, the lock and its
    condition, the ledger (``_points``), the run's documents
    (:class:`~crystalmapping.router.RunDocumentRouter`) and the background
    (:class:`~crystalmapping.submit.PointSubmitter`).
    """

    def _init_writer(self) -> None:
        """The watcher's state."""
        self._finished = threading.Event()
        self._watcher: threading.Thread | None = None
        self._last_doc = time.monotonic()
        self._last_write = time.monotonic()
        self._last_log = 0.0
        self._timed_out = False
        self._exit_status: str | None = None
        self._n_writes = 0
        self._final_error: BaseException | None = None

    def _touch(self) -> None:
        """Note a document; (re)start the watcher thread if needed."""
        with self._lock:
            self._last_doc = time.monotonic()
            if self.start_doc is None:
                return
            if self._watcher is None or (self._finished.is_set() and self._timed_out
                                         and self.stop_doc is None):
                if self._watcher is not None:
                    logger.warning("run %s: documents again after the stop timeout; "
                                   "reopening it", self.uid[:8])
                self._timed_out = False
                self._exit_status = None
                self._final_error = None
                self._finished.clear()
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name=f"crystalmapping-stream-{self.uid[:8]}")
                self._watcher.start()
            elif self.stop_doc is not None and self._finished.is_set():
                logger.warning("run %s: a document after its stop was ignored", self.uid[:8])

    def _watch(self) -> None:
        """Write partial maps, log the lag, and finish the run (in its own thread)."""
        while True:
            with self._changed:
                self._changed.wait(timeout=self._tick())
                now = time.monotonic()
                if (self.stop_doc is None and not self._timed_out and self.stop_timeout
                        and now - self._last_doc > self.stop_timeout):
                    self._timed_out = True
                    logger.warning("run %s: no document for %g s and no stop; writing its "
                                   "maps as they are", self.uid[:8], self.stop_timeout)
                ending = self.stop_doc is not None or self._timed_out
                never = {}
                points = self._points
                if ending and self._bg_future is None and points.waiting:
                    never = {p: (f"the background point {self._bg_index} was not measured; "
                                 "its mean frame is the subtrahend. Process the run with a "
                                 "background point that was measured.")
                             for p, _ in points.waiting}
                    if self.stop_doc is not None:
                        points.release()
                        points.failed.update(never)
                        for p in never:
                            logger.error("run %s: point %d failed: %s", self.uid[:8], p, never[p])
                if self.stop_doc is not None:
                    for p in sorted(self._external_events - set(points.received)):
                        points.received[p] = now
                        points.failed[p] = ("its event came but no stream_datum named its "
                                            "frames' rows")
                        logger.error("run %s: point %d failed: %s", self.uid[:8], p,
                                     points.failed[p])
                    self._external_events.clear()
                    self._never_received(points, now)
                final = ending and not points.outstanding and (not points.waiting or bool(never))
                due = points.new > 0 and (
                    (self.partial_every_points is not None
                     and points.new >= self.partial_every_points)
                    or (self.partial_every_seconds is not None
                        and now - self._last_write >= self.partial_every_seconds))
                if final or due:
                    results, failed = points.snapshot()
                    failed.update(never)
                    self._last_write = now
                self._log(now)
            if final:
                status = (self.stop_doc.get("exit_status", "success")
                          if self.stop_doc is not None else "timeout")
                self._finish(results, failed, status)
                return
            if due:
                try:
                    self._write(results, failed, "running")
                except Exception:  # a partial write may fail; the final one still comes
                    logger.exception("run %s: partial maps could not be written", self.uid[:8])

    def _never_received(self, points, now: float) -> None:
        """At the stop: the points its ``num_events`` counts that never arrived are failed."""
        expected = (self.stop_doc.get("num_events") or {}).get(self.stream_name)
        if not isinstance(expected, int) or self.grid is None:
            return
        lost = sorted(set(range(min(expected, self.grid.size))) - set(points.received))
        if not lost:
            return
        reason = ("never received: the run's stop counts it, but its documents did not reach "
                  "this server (lost between the RunEngine and here: a restarted 0MQ proxy, or "
                  "a subscriber too slow for the proxy's queue)")
        for p in lost:
            points.receive(p, now)
            points.fail(p, reason)
        logger.error("run %s: %d of %d points never arrived (%s): %s. Their maps are empty and "
                     "the store lists them in failed_points. To map every point, process the "
                     "stored run: crystalmapping process --catalog URI --uid %s --out %s "
                     "--overwrite", self.uid[:8], len(lost), expected, _ranges(lost), reason,
                     self.uid, self.path)

    def _tick(self) -> float:
        ticks = [1.0]
        if self.partial_every_seconds:
            ticks.append(self.partial_every_seconds / 2)
        if self.stop_timeout:
            ticks.append(self.stop_timeout / 4)
        return max(0.05, min(ticks))

    def _log(self, now: float) -> None:
        points = self._points
        if now - self._last_log < _LOG_EVERY or not points.queued:
            return
        self._last_log = now
        lag = points.lag(now)
        level = logging.WARNING if lag > self.warn_lag_seconds else logging.INFO
        logger.log(level, "run %s: %d points received, %d done, %d failed, %d queued "
                   "(%d waiting for the background), %.1f s behind", self.uid[:8],
                   len(points.received), points.n_done, len(points.failed),
                   points.queued, len(points.waiting), lag)

    def _write(self, results: Mapping[int, tuple], failed: Mapping[int, str], status: str, *,
               rescue: bool = False) -> xr.Dataset:
        """Gather, reduce as batch does, write atomically; ``rescue``: keep the tables on failure."""
        attrs = dict(self._attrs)
        attrs.update(exit_status=status, failed_points=sorted(failed),
                     failure_reasons=[failed[p] for p in sorted(failed)])
        maps, n_points = finish_maps(results.values(), self.grid, self.config, attrs,
                                     self.path if rescue else None, quiet=status == "running")
        write_maps(maps, self.path, overwrite=True)
        with self._lock:
            self._n_writes += 1
        logger.info("run %s: wrote maps of %d points (%s) to %s", self.uid[:8], n_points,
                    status, self.path)
        if self.on_written is not None:
            try:
                self.on_written(self.path, maps)
            except Exception:
                logger.exception("run %s: the on_written callback failed", self.uid[:8])
        return maps

    def _finish(self, results, failed, status: str) -> None:
        try:
            self._write(results, failed, status, rescue=True)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            logger.exception("run %s: the final maps could not be written", self.uid[:8])
            self._final_error = exc
        finally:
            with self._lock:
                self._exit_status = status
                if self.stop_doc is not None:
                    # the run is over: let go of the background image (here or on the
                    # cluster) and, once the store holds them, of the points' tables
                    self._bg_future = None
                    self._sub_arg = None
                    if self._final_error is None:
                        self._points.release_results()
                s = self.status()
            if failed:
                logger.error("run %s: %d points failed: %s", self.uid[:8], len(failed),
                             sorted(failed))
            logger.info("run %s finished (%s): %d points mapped, %d failed, latency median "
                        "%s s, 95th percentile %s s", self.uid[:8], status, s["done"],
                        len(failed), _fmt(s["latency_median_s"]), _fmt(s["latency_p95_s"]))
            self._finished.set()


def _ranges(points: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"points 1..3, 7"``."""
    spans, start, prev = [], points[0], points[0]
    for p in points[1:] + [None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        spans.append(str(start) if start == prev else f"{start}..{prev}")
        if p is not None:
            start = prev = p
    return ("point " if len(points) == 1 else "points ") + ", ".join(spans)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
