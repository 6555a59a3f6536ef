"""Stream: crystal maps of a scan while it runs, from its bluesky documents.

Dataflow of one run, one module per stage::

    documents (RunEngine, 0MQ RemoteDispatcher, a catalog replay)
      |
    StreamProcessor  (an event_model.DocumentRouter; routes, never holds frames)
      router.py    start, descriptor, stream_resource, stream_datum, event(_page),
                   stop -> each point's frames: inline, or rows of an HDF5 file
      submit.py    ONE future per grid point on the executor, tasks.process_point
                   (as batch): frames.read_frames -> preprocess.preprocess_frames
                   -> locate.locate_block -> (peaks, points): small tables, kept by
                   point index (seq_num - 1); futures finish in any order. A
                   background point's mean frame first, if the background is one.
      ledger.py    received, waiting, outstanding, done, failed; lag and latency
      writer.py    a watcher thread: every N points or T seconds partial maps
                   (finish.finish_maps -> store.write_maps); logs the queue and
                   the lag; ends a run whose stop never comes after
                   ``stop_timeout`` seconds; after the stop, once every future
                   is done, the same finish step and atomic write, to
                   ``out_dir/<uid>.zarr``

The kernels and the final reduce are the batch pipeline's
(:func:`crystalmapping.process_run`), with the same configuration and
attributes, so a finished stream writes the same maps as the batch pipeline
run on the same scan afterwards. The store gets three attributes more:
``exit_status`` (the stop document's, ``"running"`` in partial maps,
``"timeout"`` if no stop came), ``failed_points`` and ``failure_reasons``.

Background. An array (or a ``.npy`` file) or None is used from the first
point; a point index ``b`` is the mean frame of point ``b``, as in batch, and
points that arrive before it wait (:mod:`crystalmapping.submit` says how).

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
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import xarray as xr

from .config import ProcessConfig
from .errors import ConfigError
from .finish import with_background
from .references import parse_root_map
from .preprocess import resolve_background
from .router import RunDocumentRouter
from .store import open_maps
from .submit import PointSubmitter
from .tasks import process_point
from .trust import UntrustedDocumentError, check_uid, parse_data_roots
from .writer import MapWriter

__all__ = ["StreamProcessor", "processor_factory", "process_point"]

logger = logging.getLogger(__name__)


class StreamProcessor(RunDocumentRouter, PointSubmitter, MapWriter):
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
        self._token = _uuid.uuid4().hex[:8]
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._init_writer()
        self._init_documents()
        self._init_points()

    # ------------------------------------------------------------------ public

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
