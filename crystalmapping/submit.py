"""Submit: a live point's frames -> one future on the executor, the ledger kept.

The stage of :class:`~crystalmapping.stream.StreamProcessor` between the
document router (:mod:`crystalmapping.router`) and the writer
(:mod:`crystalmapping.writer`): ONE future per grid point on the executor,
:func:`crystalmapping.tasks.process_point` as batch runs it
(frames.read_frames -> preprocess.preprocess_frames -> locate.locate_block),
giving small (peaks, points) tables kept by point index in the
:class:`~crystalmapping.ledger.PointLedger`; futures finish in any order.

Background. A background given as an array (or a ``.npy`` file) or None is
used from the first point. A background given as a point index ``b`` (as
``ProcessConfig.background``) is the float64 mean frame of point ``b``, as in
batch. Points that arrive before ``b`` wait, as small references (rows of the
HDF5 file; inline frames are scattered to the cluster with a Dask client) and
are submitted when ``b`` arrives:

* on a ``distributed.Client`` one future computes the mean frame of ``b`` and
  every point's future takes it as an argument, so the scheduler orders them
  and each worker fetches the image once;
* on any other executor (``concurrent.futures``) the waiting points are
  submitted from the background future's completion callback, with the image
  itself.

If the scan ends before ``b`` was measured, the waiting points cannot be
processed as batch would; they are reported as failed (the maps say which).
With inline frames on a ``concurrent.futures`` executor the waiting frames
stay in this process's memory: prefer a background point measured early.

Errors. A point whose future fails is recorded (log, ``status()``, the maps'
``failed_points``) and the run goes on; the maps hold every other point.
A point that cannot be placed on the grid is a failed point too.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np

from .errors import ScanError
from .frames import HDF5Rows, mean_frame
from .ledger import PointLedger
from .tasks import process_point

__all__ = ["PointSubmitter"]

# One logger for a live run's lines, whichever module says them (as before the split).
logger = logging.getLogger("crystalmapping.stream")


def _is_distributed(executor) -> bool:
    return type(executor).__module__.split(".")[0] == "distributed"


class PointSubmitter:
    """Points -> futures on ``executor``, held back for a background point if need be.

    A base of :class:`~crystalmapping.stream.StreamProcessor`, which gives it
    ``executor``, ``read_timeout``, the lock and its condition, the grid and
    the stop (:class:`~crystalmapping.router.RunDocumentRouter`), and the
    background: ``_bg_index`` (a point index, or None) or ``_subtrahend`` (an
    image, or None).
    """

    def _init_points(self) -> None:
        """The ledger and the background's state."""
        self._distributed = _is_distributed(self.executor)
        self._options = self.config.locate.to_dict()
        self._points = PointLedger()  # received, waiting, outstanding, done, failed
        self._bg_future = None
        self._bg_error: BaseException | None = None
        self._sub_arg = None  # what tasks get as subtrahend (array, scattered future, bg future)
        self._sub_ready = self._bg_index is None

    def _fail(self, point: int, reason: str) -> None:
        with self._changed:
            self._points.fail(point, reason)
            self._changed.notify_all()
        logger.error("run %s: point %d failed: %s", self.uid[:8] if self.uid else "?",
                     point, reason)

    def _fail_new(self, point: int, reason: str, received: float) -> None:
        with self._lock:
            self._points.receive(point, received)
            self._fail(point, reason)

    def _accept(self, point: int, source, received: float) -> None:
        """A point's frames are known: submit its future, or hold it for the background."""
        if self.grid is None:
            raise ScanError("frames arrived before the run's start document; send the "
                            "documents of a run in order, starting with 'start'.")
        with self._lock:
            if self.stop_doc is not None and self._finished.is_set():
                return
            if not self._points.receive(point, received):
                logger.warning("run %s: point %d arrived twice; the second is ignored",
                               self.uid[:8], point)
                return
        if not 0 <= point < self.grid.size:
            self._fail(point, f"point index {point} lies outside the {self.grid.shape} grid "
                              "of the start document")
            return
        if point == self._bg_index:
            self._start_background(source)
        if self._distributed and not self._sub_ready and not isinstance(source, HDF5Rows):
            # inline frames wait on the cluster, not in this process
            source = self.executor.scatter(np.asarray(source), hash=False)
        with self._lock:
            error = self._bg_error
            if error is None and not self._sub_ready:
                self._points.wait(point, source)
                return
        if error is not None:
            self._fail(point, f"the background point {self._bg_index} failed: {error!r}")
            return
        self._submit(point, source)

    def _submit_raw(self, fn, *args, key: str):
        if self._distributed:
            return self.executor.submit(fn, *args, key=key, pure=False)
        return self.executor.submit(fn, *args)

    def _start_background(self, source) -> None:
        """Submit the mean frame of the background point; release the points waiting for it."""
        future = self._submit_raw(partial(mean_frame, timeout=self.read_timeout), source,
                                  key=f"crystalmapping-background-{self._token}")
        with self._lock:
            self._bg_future = future
            if self._distributed:
                # the scheduler makes each point's task wait for this one
                self._sub_arg = future
                self._sub_ready = True
                self._release_waiting(None)
        future.add_done_callback(self._on_background)

    def _release_waiting(self, error) -> None:
        """Submit (or fail) the points that waited for the background point.

        Called with the lock held, so the watcher never sees them neither
        waiting nor submitted (and does not end the run in between).
        """
        for point, source in self._points.release():
            if error is None:
                self._submit(point, source)
            else:
                self._fail(point, f"the background point {self._bg_index} failed: {error!r}")

    def _on_background(self, future) -> None:
        try:
            image = future.result()
            error = None
        except BaseException as exc:  # noqa: BLE001 - recorded, reported per point
            image, error = None, exc
        if error is not None:
            logger.error("run %s: the background point %d failed: %r", self.uid[:8],
                         self._bg_index, error)
        if self._distributed:
            return  # dependents fail or succeed with it on the cluster
        with self._lock:
            if error is None:
                self._sub_arg = image
                self._sub_ready = True
            else:
                self._bg_error = error
            self._release_waiting(error)

    def _subtrahend_arg(self):
        if self._bg_index is not None:
            return self._sub_arg
        if self._subtrahend is not None and self._distributed and self._sub_arg is None:
            self._sub_arg = self.executor.scatter(self._subtrahend, broadcast=True, hash=False)
        return self._sub_arg if self._sub_arg is not None else self._subtrahend

    def _submit(self, point: int, source) -> None:
        with self._lock:
            sub = self._subtrahend_arg()
        try:
            future = self._submit_raw(partial(process_point, read_timeout=self.read_timeout),
                                      source, sub, point, self._options,
                                      key=f"crystalmapping-point-{self._token}-{point}")
        except Exception as exc:  # e.g. an executor that was shut down
            self._fail(point, f"could not be submitted: {exc!r}")
            return
        with self._lock:
            self._points.submitted(point, future)
        future.add_done_callback(partial(self._on_done, point))

    def _on_done(self, point: int, future) -> None:
        now = time.monotonic()
        try:
            result = future.result()
            error = None
        except BaseException as exc:  # noqa: BLE001 - a failed point must not stop the run
            result, error = None, exc
        with self._changed:  # one step, so the watcher sees the point either queued or done
            if error is None:
                self._points.done(point, result, now)
                self._changed.notify_all()
            else:
                reason = f"{type(error).__name__}: {error}{_hint(error)}"
                self._points.task_failed(point, reason, now)
                self._changed.notify_all()
                logger.error("run %s: point %d failed: %s", self.uid[:8], point, reason)


def _hint(error: BaseException) -> str:
    """What a failure of the cluster, not of the point, means and what to do about it.

    A worker that dies while it holds a point's task (killed, out of memory) is
    replaced and the task runs again elsewhere: distributed does it, up to
    ``distributed.scheduler.allowed-failures`` deaths (3 by default), after which
    the task fails with ``KilledWorker``. Such a point is not retried here:
    it has already brought down that many workers.
    """
    if type(error).__name__ == "KilledWorker":
        return ("; the worker processes running this point died (out of memory, or killed) "
                "more times than distributed.scheduler.allowed-failures allows. Give the "
                "workers more memory (--memory-limit of dask worker) or look at this point's "
                "frames; the other points are mapped")
    return ""
