"""Stream: crystal maps of a scan while it runs, from its bluesky documents.

Dataflow of one run::

    documents (RunEngine, 0MQ RemoteDispatcher, a catalog replay)
      |
    StreamProcessor  (an event_model.DocumentRouter; routes, never holds frames)
      start            grid, output path, and the attrs the batch pipeline records
      descriptor       which stream and data key hold the frames; inline or external
      stream_resource  the HDF5 file and dataset of the frames
      stream_datum ----+  rows of each point          (external frames)
      event(_page) ----+  the frames themselves       (inline frames)
                       |
                       v  ONE future per grid point on the executor, tasks.process_point
           (as batch): frames.read_frames -> preprocess.preprocess_frames -> locate.locate_block
                       |  -> (peaks, points): small tables, kept by point index
                       v     (seq_num - 1); futures finish in any order
      a watcher thread     every N points or T seconds: maps.gather_tables ->
                           maps.reduce_scan -> store.write_maps (partial maps);
                           logs the queue and the lag; ends a run whose stop
                           never comes after ``stop_timeout`` seconds
      stop             once every future is done: the same gather, reduce and
                       atomic write, to ``out_dir/<uid>.zarr``

The kernels and the final reduce are the batch pipeline's
(:func:`crystalmapping.process_run`), with the same configuration and
attributes, so a finished stream writes the same maps as the batch pipeline
run on the same scan afterwards. The store gets three attributes more:
``exit_status`` (the stop document's, ``"running"`` in partial maps,
``"timeout"`` if no stop came), ``failed_points`` and ``failure_reasons``.

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

Backpressure. Nothing is dropped: a point is either queued (submitted and
not done, or waiting for the background) or done. ``queued``,
``lag_seconds`` (age of the oldest queued point) and :meth:`StreamProcessor.status`
expose it, the log says it every few seconds while points are queued (a
warning past ``warn_lag_seconds``), and each point's latency (its frames known
-> its peaks here) is kept for the median and 95th percentile.

Errors. A point whose future fails is recorded (log, ``status()``, the maps'
``failed_points``) and the run goes on; the maps hold every other point.
Nothing is dropped silently: a point that cannot be placed on the grid or has
no readable frames is a failed point too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid as _uuid
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import xarray as xr
from event_model import (DocumentRouter, Event, EventDescriptor, EventPage, RunStart, RunStop,
                         StreamDatum, StreamResource)

from .config import ProcessConfig
from .errors import ConfigError, ScanError, StoreError
from .frames import HDF5Rows, hdf5_rows, mean_frame, parse_root_map
from .grid import Grid
from .ledger import PointLedger
from .finish import finish_maps, store_attrs, with_background
from .preprocess import check_point_index, resolve_background
from .store import open_maps, write_maps
from .tasks import process_point
from .trust import UntrustedDocumentError, check_uid, parse_data_roots

__all__ = ["StreamProcessor", "processor_factory", "process_point"]

logger = logging.getLogger(__name__)

#: Seconds between two status lines in the log while points are queued.
_LOG_EVERY = 5.0


def _is_distributed(executor) -> bool:
    return type(executor).__module__.split(".")[0] == "distributed"


class StreamProcessor(DocumentRouter):
    """Map one run while it is measured: a document router handed an executor.

    Call it with each ``(name, doc)`` of one run (directly, or through
    ``event_model.RunRouter([processor_factory(...)])`` for many runs). It
    returns at once; :meth:`wait` gives the final maps.

    Parameters
    ----------
    executor : distributed.Client or concurrent.futures.Executor
        Anything with ``submit(fn, *args)`` returning a future with
        ``add_done_callback`` and ``result``.
    config : ProcessConfig, optional
        Data key, background, locate and link options (the defaults if None).
    out_dir : path
        Maps go to ``out_dir/<run uid>.zarr``, as partial maps while the scan
        runs and as final maps after its stop.
    subtrahend : ndarray, .npy path, int or None, optional
        The background, overriding ``config.background`` as
        ``process_run(subtrahend=...)`` does. An int is a grid point index in
        acquisition order (not negative: the last point is not known before
        the stop).
    stream_name : str
        The event stream holding the frames.
    partial_every_points, partial_every_seconds : int or float or None
        Write partial maps after this many new points, or this many seconds
        after the last write if a point finished since; None turns either off.
        Each write links every point so far, so keep ``partial_every_points``
        a small fraction of the scan.
    stop_timeout : float or None
        Seconds without any document after which a run that sent no stop is
        ended (``exit_status="timeout"``) and its maps written; documents
        arriving later reopen it. None waits for the stop forever.
    warn_lag_seconds : float
        Log a warning while the oldest unfinished point is older than this.
    read_timeout : float
        Seconds a task waits for frames that are not visible yet.
    root_map : dict or list of "OLD=NEW", optional
        Where the workers see the directories the ``stream_resource``
        documents name (``{"/old/root": "/new/root"}``, as event-model's
        ``root_map``); paths no root matches are read as named.
    data_roots : list of paths, optional
        The only directories whose files the documents may name (after the
        root map; symbolic links and ``..`` resolved). A point whose frames lie
        elsewhere fails and its file is not opened. None (the default here)
        reads wherever the documents point: give roots whenever the documents
        come from a network (:class:`~crystalmapping.serve.DocumentServer` does).
    overwrite : bool
        Replace a store that exists at the run's path before it starts.
    on_written : callable, optional
        ``on_written(path, maps)`` after each write (partial or final), from
        the processor's thread; ``maps.attrs["exit_status"]`` tells which.

    Examples
    --------
    >>> import tempfile
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> from crystalmapping import simulate_scan
    >>> scan = simulate_scan(shape=(3, 3), detector_shape=(64, 64), grains=1, seed=1)
    >>> out = tempfile.mkdtemp()
    >>> with ThreadPoolExecutor(2) as pool:
    ...     proc = StreamProcessor(pool, ProcessConfig(background=0), out)
    ...     for name, doc in scan.documents(external=False):
    ...         _ = proc(name, doc)
    ...     maps = proc.wait(60)
    >>> int(maps["measured"].sum()), maps.attrs["exit_status"]
    (9, 'success')
    """

    def __init__(self, executor, config: ProcessConfig | None = None,
                 out_dir: str | os.PathLike = ".", *,
                 subtrahend: np.ndarray | str | os.PathLike | int | None = None,
                 stream_name: str = "primary",
                 partial_every_points: int | None = 50,
                 partial_every_seconds: float | None = 10.0,
                 stop_timeout: float | None = 600.0,
                 warn_lag_seconds: float = 30.0,
                 read_timeout: float = 10.0,
                 root_map: Mapping[str, str] | Any | None = None,
                 data_roots: Iterable[str | os.PathLike] | None = None,
                 overwrite: bool = False,
                 on_written: Callable[[Path, xr.Dataset], Any] | None = None):
        super().__init__()
        if not hasattr(executor, "submit"):
            raise TypeError(
                f"executor must have a submit method (a distributed.Client or a "
                f"concurrent.futures executor), got {type(executor).__name__}."
            )
        config = config if config is not None else ProcessConfig()
        if not isinstance(config, ProcessConfig):
            raise TypeError(f"config must be a ProcessConfig, got {type(config).__name__}.")
        for name, value in (("partial_every_points", partial_every_points),
                            ("partial_every_seconds", partial_every_seconds),
                            ("stop_timeout", stop_timeout)):
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 or None (off), got {value!r}.")
        spec = config.background if subtrahend is None else subtrahend
        config, record = with_background(config, spec)
        self._record = record
        self._bg_index: int | None = None
        self._subtrahend: np.ndarray | None = None
        if isinstance(record, int):
            if record < 0:
                raise ConfigError(
                    f"a streaming background point index must be >= 0, got {record}: the last "
                    "point of a running scan is not known. Give the index counted from the "
                    "first point, or an image."
                )
            self._bg_index = record
        else:
            self._subtrahend = resolve_background(spec)
        self.executor = executor
        self.config = config
        self.out_dir = Path(out_dir)
        self.stream_name = stream_name
        self.partial_every_points = partial_every_points
        self.partial_every_seconds = partial_every_seconds
        self.stop_timeout = stop_timeout
        self.warn_lag_seconds = warn_lag_seconds
        self.read_timeout = read_timeout
        self.root_map = parse_root_map(root_map)
        self.data_roots = parse_data_roots(data_roots)
        self.overwrite = overwrite
        self.on_written = on_written
        self._distributed = _is_distributed(executor)
        self._options = config.locate.to_dict()
        self._token = _uuid.uuid4().hex[:8]

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._finished = threading.Event()
        self._watcher: threading.Thread | None = None
        # per-run state
        self.start_doc: dict | None = None
        self.stop_doc: dict | None = None
        self.grid: Grid | None = None
        self.path: Path | None = None
        self._attrs: dict = {}
        self._descriptors: dict[str, dict] = {}  # uid -> {"external": bool}
        self._external_events: set[int] = set()  # points whose event says frames are external
        self._resources: dict[str, dict] = {}
        self._seen: set = set()  # uids of every descriptor and stream_resource received
        self._unknown: set = set()  # uids named but never received (logged once each)
        self._points = PointLedger()  # received, waiting, outstanding, done, failed
        self._bg_future = None
        self._bg_error: BaseException | None = None
        self._sub_arg = None  # what tasks get as subtrahend (array, scattered future, bg future)
        self._sub_ready = self._bg_index is None
        self._last_doc = time.monotonic()
        self._last_write = time.monotonic()
        self._last_log = 0.0
        self._timed_out = False
        self._exit_status: str | None = None
        self._n_writes = 0
        self._final_error: BaseException | None = None

    # ------------------------------------------------------------------ public

    @property
    def uid(self) -> str | None:
        """Uid of the run (None before its start document)."""
        return None if self.start_doc is None else self.start_doc["uid"]

    @property
    def queued(self) -> int:
        """Points received but not processed yet (submitted, or waiting for the background)."""
        with self._lock:
            return self._points.queued

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest point not processed yet (0 when none is queued)."""
        with self._lock:
            return self._points.lag(time.monotonic())

    @property
    def latencies(self) -> dict[int, float]:
        """Seconds from a point's frames being known (its event or stream_datum
        arriving) to its peaks being ready here, by point index."""
        with self._lock:
            return dict(self._points.latency)

    @property
    def failed_points(self) -> dict[int, str]:
        """Points that failed, with the reason."""
        with self._lock:
            return dict(self._points.failed)

    def status(self) -> dict[str, Any]:
        """A snapshot: counts, queue, lag and latency of the run.

        Returns
        -------
        status : dict
            ``uid``, ``received``, ``done``, ``failed``, ``queued``,
            ``waiting_for_background``, ``lag_seconds``, ``latency_median_s``,
            ``latency_p95_s``, ``writes`` (stores written), ``exit_status``
            (None while running) and ``path``.
        """
        with self._lock:
            return {
                "uid": self.uid,
                **self._points.counts(time.monotonic()),
                "writes": self._n_writes,
                "exit_status": self._exit_status,
                "path": None if self.path is None else str(self.path),
            }

    @property
    def exit_status(self) -> str | None:
        """The run's exit status once its final maps are written (None while running)."""
        with self._lock:
            return self._exit_status

    def wait(self, timeout: float | None = None) -> xr.Dataset:
        """Wait for the final maps (after the stop, or the stop timeout) and open them.

        Raises
        ------
        TimeoutError
            If they are not written within ``timeout`` seconds.
        Exception
            Whatever made the final reduce or write fail (the located peaks
            are then saved next to the store as ``<uid>.peaks.zarr``).
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(
                f"the maps of run {self.uid} were not finished within {timeout} s: "
                f"{self.status()}"
            )
        if self._final_error is not None:
            raise self._final_error
        return open_maps(self.path)

    # ------------------------------------------------------------- documents

    def start(self, doc: RunStart) -> RunStart:
        """Read the grid, check the output path and the background index, start the watcher."""
        if self.start_doc is not None:
            raise ScanError(
                f"a StreamProcessor maps one run; it got start {doc['uid']!r} after "
                f"{self.uid!r}. Route many runs with event_model.RunRouter([processor_factory(...)])."
            )
        check_uid(doc.get("uid"))
        grid = Grid.from_start(doc)
        if self._bg_index is not None:
            check_point_index(self._bg_index, grid.size)
        path = self.out_dir / f"{doc['uid']}.zarr"
        if path.exists() and not self.overwrite:
            raise StoreError(f"{str(path)!r} already exists; pass overwrite=True to replace it.")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.start_doc, self.grid, self.path = doc, grid, path
            self._attrs = store_attrs(doc["uid"], self.config, self._record)
            self._touch()
        logger.info("streaming run %s (%d x %d grid) to %s", doc["uid"][:8], *grid.shape, path)
        return doc

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        """Note whether the stream's frames are inline or external (``"STREAM:"``)."""
        self._touch()
        self._seen.add(doc.get("uid"))
        if doc.get("name") != self.stream_name:
            return doc
        key = self.config.data_key
        data_keys = doc.get("data_keys", {})
        if key not in data_keys:
            raise ScanError(
                f"stream {self.stream_name!r} of run {self.uid} has no data key {key!r}; its "
                f"keys are {sorted(data_keys)}. Give the detector image key as data_key."
            )
        shape = tuple(data_keys[key].get("shape") or ())
        if (self._subtrahend is not None and len(shape) >= 2
                and tuple(self._subtrahend.shape) != shape[-2:]):
            # Only logged: some detectors describe their shape wrongly; if it is right,
            # every point fails with the kernel's error, and the maps list them.
            logger.error("run %s: the background image has shape %s but the detector's frames "
                         "are described as %s; points will fail unless the description is "
                         "wrong.", self.uid[:8], tuple(self._subtrahend.shape), shape[-2:])
        # "STREAM:" frames come by stream_resource/stream_datum; anything else is in the event
        external = str(data_keys[key].get("external", "")).startswith("STREAM:")
        with self._lock:
            self._descriptors[doc["uid"]] = {"external": external}
        return doc

    def stream_resource(self, doc: StreamResource) -> StreamResource:
        self._touch()
        self._seen.add(doc.get("uid"))
        if doc.get("data_key") == self.config.data_key:
            with self._lock:
                self._resources[doc["uid"]] = doc
        return doc

    def stream_datum(self, doc: StreamDatum) -> StreamDatum:
        """Submit one future per point whose rows this datum names."""
        received = time.monotonic()
        self._touch()
        resource = self._resources.get(doc.get("stream_resource"))
        if doc.get("stream_resource") not in self._seen:
            self._out_of_order("a stream_datum", "stream_resource", doc.get("stream_resource"))
        if resource is None or doc.get("descriptor") not in self._descriptors:
            return doc
        try:
            points = hdf5_rows(resource, doc, self.root_map, self.data_roots)
        except ScanError as exc:  # e.g. not an HDF5 file: these points cannot be read
            seq = doc.get("seq_nums") or {}
            for point in range(int(seq.get("start", 1)) - 1, int(seq.get("stop", 1)) - 1):
                self._fail_new(point, str(exc), received)
            return doc
        for point, rows in points:
            self._accept(point, rows, received)
        return doc

    def event(self, doc: Event) -> Event:
        """Submit the point's future if its frames are inline."""
        received = time.monotonic()
        self._touch()
        desc = self._descriptors.get(doc["descriptor"])
        if doc["descriptor"] not in self._seen:
            self._out_of_order("an event", "descriptor", doc["descriptor"])
        if desc is not None:
            key = self.config.data_key
            if desc["external"]:
                with self._lock:
                    self._external_events.add(doc["seq_num"] - 1)
            else:
                self._accept_inline(doc["seq_num"] - 1, doc["data"].get(key),
                                    doc.get("filled", {}).get(key), received)
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        """As :meth:`event`, for each event of the page."""
        received = time.monotonic()
        self._touch()
        desc = self._descriptors.get(doc["descriptor"])
        if desc is not None and desc["external"]:
            with self._lock:
                self._external_events.update(s - 1 for s in doc["seq_num"])
        elif desc is not None:
            key = self.config.data_key
            values = doc["data"].get(key)
            filled = doc.get("filled", {}).get(key)
            for i, seq_num in enumerate(doc["seq_num"]):
                self._accept_inline(seq_num - 1, None if values is None else values[i],
                                    None if filled is None else filled[i], received)
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        """Note the stop; the final maps are written once every queued point is done."""
        self._touch()
        with self._changed:
            self.stop_doc = doc
            self._changed.notify_all()
        logger.info("run %s stopped (%s) after %d points; %d still queued",
                    self.uid[:8] if self.uid else "?", doc.get("exit_status"),
                    len(self._points.received), self.queued)
        return doc

    # -------------------------------------------------------------- internals

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

    def _out_of_order(self, what: str, kind: str, uid) -> None:
        """Log (once per uid) a document that names a document this run has not sent."""
        if uid in self._unknown:
            return
        self._unknown.add(uid)
        logger.error("run %s: %s names %s %r, which this run has not sent (documents out of "
                     "order, or the server started mid-run); it is skipped, and its points are "
                     "not mapped. Publish the documents in the order the RunEngine emits them.",
                     self.uid[:8] if self.uid else "?", what, kind, str(uid)[:40])

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

    def _accept_inline(self, point, value, filled, received) -> None:
        if value is None or isinstance(value, str) or filled is False:
            self._fail_new(point, f"event has no frames under {self.config.data_key!r} (got "
                                  f"{value!r}); fill Resource/Datum references with "
                                  "event_model.Filler before the processor.", received)
            return
        self._accept(point, value, received)

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
                self._points.task_failed(point, f"{type(error).__name__}: {error}", now)
                self._changed.notify_all()
                logger.error("run %s: point %d failed: %s: %s", self.uid[:8], point,
                             type(error).__name__, error)

    # ------------------------------------------------------------ the watcher

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
                   len(points.received), len(points.results), len(points.failed),
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
                    # the run is over: let go of the background image (here or on the cluster)
                    self._bg_future = None
                    self._sub_arg = None
                s = self.status()
            if failed:
                logger.error("run %s: %d points failed: %s", self.uid[:8], len(failed),
                             sorted(failed))
            logger.info("run %s finished (%s): %d points mapped, %d failed, latency median "
                        "%s s, 95th percentile %s s", self.uid[:8], status, s["done"],
                        len(failed), _fmt(s["latency_median_s"]), _fmt(s["latency_p95_s"]))
            self._finished.set()


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def processor_factory(executor, config: ProcessConfig | None = None,
                      out_dir: str | os.PathLike = ".", **options) -> Callable:
    """A factory for ``event_model.RunRouter``: one :class:`StreamProcessor` per run.

    Parameters
    ----------
    executor, config, out_dir, **options
        As :class:`StreamProcessor` takes them.

    Returns
    -------
    factory : callable
        ``factory(name, start_doc) -> ([processor], [])``. Its attribute
        ``processors`` holds the last 100 processors it made (for
        :meth:`StreamProcessor.wait` and :meth:`StreamProcessor.status`). A
        run whose store already exists (without ``overwrite=True``) is
        skipped with an error in the log, so a live service keeps running.

    Examples
    --------
    >>> from event_model import RunRouter                                    # doctest: +SKIP
    >>> router = RunRouter([processor_factory(client, config, "maps/")])    # doctest: +SKIP
    >>> remote_dispatcher.subscribe(router)                                 # doctest: +SKIP
    """
    made: deque = deque(maxlen=100)

    def factory(name, start_doc):
        try:
            check_uid(start_doc.get("uid"))
        except UntrustedDocumentError as exc:
            logger.error("a run is refused: %s", exc)
            return [], []
        path = Path(out_dir) / f"{start_doc['uid']}.zarr"
        if path.exists() and not options.get("overwrite", False):
            logger.error("run %s is not streamed: %s already exists (pass overwrite=True)",
                         start_doc["uid"][:8], path)
            return [], []
        processor = StreamProcessor(executor, config, out_dir, **options)
        made.append(processor)
        return [processor], []

    factory.processors = made
    factory.data_roots = parse_data_roots(options.get("data_roots"))
    return factory
