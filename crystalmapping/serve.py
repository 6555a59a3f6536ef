"""Serve: crystal maps of live scans from bluesky's 0MQ proxy; stored runs replayed to it.

Dataflow::

    RunEngine ── bluesky Publisher ──> bluesky-0MQ-proxy ──> RemoteDispatcher (dispatch.py)
    crystalmapping publish ─(msgpack)─> in 5567 / out 5568        │  bad bytes: logged, skipped
    (publish.py)           (wire.py)                              │  uids, files checked (trust.py)
                                                                  v
                                   DocumentServer: event_model.RunRouter([processor_factory])
                                                                  │  one StreamProcessor per run
                                                                  v
                                 out_dir/<uid>.zarr (partial, then final maps; as batch writes)
                                                                  │  each run's summary (report.py)
                                                                  v
                                 a derived run in the catalog (derived.py), a log line,
                                 a JSON report line

Start the proxy (bluesky's own command; addresses on loopback, as here, unless
the beamline network is trusted)::

    bluesky-0MQ-proxy --in-address 127.0.0.1:5567 --out-address 127.0.0.1:5568

then the server, then the RunEngine (``RE.subscribe(Publisher("127.0.0.1:5567",
prefix=b"raw", serializer=crystalmapping.serve.packb))``) or ``crystalmapping
publish`` for a stored run.

Serialization. The default both ways is msgpack, with numpy arrays and scalars
in msgpack-numpy's wire format (so peers using ``msgpack_numpy.packb`` /
``unpackb`` interoperate), decoded here without pickle: arrays of Python
objects are refused both ways. pickle is available only when asked for by name
(``serializer="pickle"``); anyone who can reach the proxy can then run code in
the server.

Robustness. A message that is not ``<prefix> <name> <document>``, names no
bluesky document, does not decode or is not a mapping is logged and skipped.
A document that breaks a run (its processor raises) is logged; other runs go on.
A server killed during a run leaves its partial maps (``exit_status="running"``);
started again, it completes them from ``catalog`` (:mod:`crystalmapping.recover`).
Points a run's stop counts but that never arrived (the proxy restarted: 0MQ
reconnects by itself, but what was sent meanwhile is lost) are failed points,
``"never received"``, in the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import ProcessConfig
from .errors import ConfigError
from .derived import derived_run_documents
from .dispatch import (DEFAULT_IN_ADDRESS, DEFAULT_OUT_ADDRESS, ProxyError, RemoteDispatcher,
                       _prefix_bytes)
from .publish import live_documents, publish_run
from .recover import Recoverer
from .report import RunReports
from .runs import RunsRouter
from .tasks import warm_up
from .wire import SERIALIZERS, DecodeError, _pickle_loads, packb, serialization, unpackb

# The live dataflow, one module per job: wire (bytes <-> documents), dispatch (the proxy's
# receiving end), serve (this module: routing runs to stream processors), stream (one run:
# router, submit, ledger, writer), report (each run's summary), derived (the catalog record
# of a store), publish (stored runs back to the proxy). The names below stay importable
# from here, as the tutorial's code imports them.
__all__ = [
    "packb",
    "unpackb",
    "serialization",
    "DecodeError",
    "ProxyError",
    "RemoteDispatcher",
    "DocumentServer",
    "derived_run_documents",
    "live_documents",
    "publish_run",
    "SERIALIZERS",
    "DEFAULT_IN_ADDRESS",
    "DEFAULT_OUT_ADDRESS",
]

logger = logging.getLogger(__name__)


class DocumentServer:
    """Map every run that arrives from a 0MQ proxy; the engine of ``crystalmapping serve``.

    Documents go through a :class:`RemoteDispatcher` (in a thread) into an
    ``event_model.RunRouter`` whose factory makes one
    :class:`~crystalmapping.stream.StreamProcessor` per run (see
    :func:`~crystalmapping.stream.processor_factory`): maps go to
    ``out_dir/<uid>.zarr``, partial while the scan runs, final after its stop,
    with the batch pipeline's contract. For each finished run the server logs
    one line (uid, points, peaks, maps, grains, lag, latency), appends one JSON
    line to ``report``, and records a derived run in ``catalog``.

    Parameters
    ----------
    executor : distributed.Client or concurrent.futures.Executor
        Where the points are processed.
    config : ProcessConfig, optional
        Data key, background, locate and link options, for every run.
    out_dir : path
        Where the stores go.
    address : str or tuple
        The proxy's output address.
    prefix : bytes or str
        Publisher prefix to take (``""``: every publisher).
    serializer : {"msgpack", "pickle"} or callable
        How messages are decoded (``"msgpack"``: safe; ``"pickle"`` runs code
        from anyone who can reach the proxy).
    catalog : Catalog, optional
        Where each finished run's derived run is recorded (with
        :meth:`crystalmapping.Catalog.ingest`): start with
        ``analysis_stage="crystalmapping"``, ``parent_uid``, ``maps`` (the
        store's path), ``config``, ``exit_status``, ``grid`` and ``stream``
        (the run's figures); one event per map with ``grain``, ``y``, ``x``,
        ``n_points``, ``grain_id``; stop.
        Runs are also read from it at :meth:`start`: the stores a previous
        server left unfinished in ``out_dir`` (killed during a run) are
        completed from their stored runs (:mod:`crystalmapping.recover`).
    report : path, optional
        A file to which one JSON line per finished run is appended.
    drain_timeout : float
        Seconds :meth:`stop` waits for the runs in flight to be written.
    data_roots : list of paths, or None
        The directories whose files the documents may name, besides the
        readable storage of an embedded ``catalog``; a point whose frames
        lie elsewhere fails, unopened. With neither, no document opens a
        file (inline frames still work). ``None`` lifts the rule: only on a
        network where every publisher is trusted.
    http : str, optional
        ``HOST:PORT`` of a live web page of the runs and their maps
        (:mod:`crystalmapping.liveview`); a host other than loopback is refused
        unless ``http_api_key`` is given, which every request must then carry.
    **processor_options
        Keywords of :class:`~crystalmapping.stream.StreamProcessor`
        (``partial_every_points``, ``stop_timeout``, ``overwrite``,
        ``root_map`` for detector files mounted here under another directory
        than the documents name...).

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor          # doctest: +SKIP
    >>> with ThreadPoolExecutor(2) as pool:                          # doctest: +SKIP
    ...     server = DocumentServer(pool, ProcessConfig(background=0), "maps")
    ...     server.start()
    ...     ...                      # publish runs to the proxy
    ...     server.stop()
    """

    def __init__(self, executor, config: ProcessConfig | None = None,
                 out_dir: str | os.PathLike = "maps", *,
                 address: str | tuple = DEFAULT_OUT_ADDRESS, prefix: bytes | str = b"raw",
                 serializer: str | Callable[[bytes], Any] = "msgpack",
                 catalog=None, report: str | os.PathLike | None = None,
                 drain_timeout: float = 120.0,
                 data_roots: Iterable[str | os.PathLike] | None = (),
                 http: str | None = None, http_api_key: str | None = None,
                 **processor_options):
        from .stream import StreamProcessor, processor_factory

        self.config = config if config is not None else ProcessConfig()
        self.executor = executor
        self.out_dir = Path(out_dir)
        self.catalog = catalog
        self.report = None if report is None else Path(report)
        self.drain_timeout = float(drain_timeout)
        loads = serialization(serializer)[1] if isinstance(serializer, str) else serializer
        if loads is _pickle_loads:
            logger.warning("documents are unpickled: anyone who can reach %s can run code in "
                           "this process. Use the msgpack serializer unless the network is "
                           "trusted.", address)
        self.address, self.prefix, self._loads = address, _prefix_bytes(prefix), loads
        options = dict(processor_options)
        if data_roots is not None:
            extra = catalog.readable_roots() if getattr(catalog, "is_embedded", False) else []
            data_roots = [*data_roots, *(r for r in extra if os.path.isdir(r))]
        options["data_roots"] = data_roots
        user_on_written = options.pop("on_written", None)
        # Check the options (and the background) now, not at the first run.
        StreamProcessor(executor, self.config, self.out_dir, **options)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._reports = RunReports(catalog, self.report, user_on_written)
        self._factory = processor_factory(executor, self.config, self.out_dir,
                                          on_written=self._reports.on_written, **options)
        self._recoverer = Recoverer(self.out_dir, catalog, executor, self.config,
                                    on_completed=self._reports.completed)
        self._runs = RunsRouter(self._factory, self._reports, self.out_dir,
                                on_unknown_stop=self._recoverer.on_stop)
        self._closing = threading.Event()
        self._dispatcher: RemoteDispatcher | None = None
        self._thread: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        self._receive_error: BaseException | None = None
        # the live page (liveview.py): reads the stores and the run records, never writes
        self._liveview = None
        if http:
            from .liveview import LiveView

            self._liveview = LiveView(self._reports, self.out_dir, http, http_api_key)

    def __call__(self, name: str, doc: dict) -> None:
        """Route one document (what the dispatcher calls); never raises."""
        if self._closing.is_set():
            return
        self._runs(name, doc)

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, connect_timeout: float = 10.0) -> "DocumentServer":
        """Warm the workers up, then start receiving (a dispatcher thread) and watching the
        runs (a monitor thread)."""
        seconds = warm_up(self.executor, self.config.locate.to_dict())
        logger.info("workers ready (imports and compiled kernels loaded in %.1f s)", seconds)
        self._dispatcher = RemoteDispatcher(self.address, prefix=self.prefix,
                                            deserializer=self._loads)
        self._dispatcher.subscribe(self)
        self._thread = threading.Thread(target=self._receive, name="crystalmapping-serve",
                                        daemon=True)
        self._thread.start()
        self._monitor = threading.Thread(target=self._watch, name="crystalmapping-serve-monitor",
                                         daemon=True)
        self._monitor.start()
        deadline = time.monotonic() + connect_timeout
        while not self._dispatcher.started.wait(0.05):
            if self._receive_error is not None or time.monotonic() > deadline:
                raise ConfigError(
                    f"cannot receive from {self.address!r}: {self._receive_error!r}. Give the "
                    "proxy's output address as host:port (bluesky-0MQ-proxy --out-address).")
        # stores a previous server left unfinished: completed from the catalog, in a thread
        self._recoverer.start()
        if self._liveview is not None:
            self._liveview.start()
        return self

    def _receive(self) -> None:
        try:
            self._dispatcher.start()
        except Exception as exc:
            self._receive_error = exc
            logger.exception("the dispatcher stopped with an error")

    @property
    def receiving(self) -> bool:
        """True while the dispatcher thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def skipped(self) -> int:
        """Messages skipped because they did not decode (or were not documents)."""
        return 0 if self._dispatcher is None else self._dispatcher.skipped

    def _watch(self) -> None:
        """Sample queue and lag of the open runs; report runs whose final write failed."""
        while not self._closing.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        self._reports.sample()

    def runs(self) -> list[dict]:
        """Summaries of the finished runs, oldest first (the report's lines)."""
        return self._reports.runs()

    def stop(self, drain_timeout: float | None = None) -> list[str]:
        """Stop receiving; end the runs in flight and wait for their maps.

        A run whose stop document has not come is ended as if it had stopped
        with ``exit_status="interrupted"``: its points already received are
        processed and its maps written. Runs that already stopped are waited
        for.

        Returns
        -------
        uids : list of str
            The runs whose maps were not written within ``drain_timeout``
            seconds (their latest partial maps remain).
        """
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        if self._dispatcher is not None:
            self._dispatcher.request_stop()
        if self._thread is not None:
            self._thread.join(10.0)
        records = self._reports.open()
        for record in records:
            _interrupt(record)
        self._closing.set()
        late = []
        deadline = time.monotonic() + timeout
        for record in records:
            p = record.processor
            if p.start_doc is None:
                continue
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                late.append(record.uid)
                logger.error("run %s: maps not final after %g s; its last partial maps "
                             "remain in %s", record.uid[:8], timeout, p.path)
            except Exception:  # noqa: BLE001 - already logged by the processor
                pass
        if not self._recoverer.wait(max(0.0, deadline - time.monotonic())):
            logger.error("runs left unfinished by a previous server were still being "
                         "completed after %g s; their partial maps remain", timeout)
        if self._monitor is not None:
            self._monitor.join(5.0)
        self._sample()
        if self._liveview is not None:
            self._liveview.stop()
        return late

    def serve_forever(self) -> int:
        """Start, run until SIGINT or SIGTERM, then :meth:`stop`. Returns an exit code.

        A second signal while the runs in flight are finishing exits at once.
        """
        with _signals() as (stop, received):
            self.start()
            logger.info("serving: documents with prefix %r from %s -> maps in %s%s",
                        self.prefix.decode(errors="replace"), self._dispatcher.address,
                        self.out_dir.absolute(),
                        f", derived runs in {self.catalog.uri}" if self.catalog else "")
            _log_data_roots(self._factory.data_roots)
            while not stop.wait(0.5):
                if not self.receiving:
                    logger.error("the dispatcher thread ended; stopping")
                    break
            if received:
                logger.warning("%s: stopping; finishing the runs in flight (up to %g s, "
                               "a second signal exits at once)", received[0], self.drain_timeout)
            late = self.stop()
        return 1 if late or not received else 0


@contextlib.contextmanager
def _signals():
    """``(stop, received)`` while SIGINT and SIGTERM set ``stop`` (and name themselves in
    ``received``); a second signal acts as if there were no handler. Restored after."""
    stop = threading.Event()
    received = []

    def handler(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _log_data_roots(roots) -> None:
    """Say where the documents may name files."""
    if roots is None:
        logger.warning("files named by documents are opened wherever they are: only "
                       "for a network where every publisher is trusted")
    else:
        logger.info("files named by documents are opened only under: %s",
                    ", ".join(roots) if roots else
                    "nothing (inline frames only; give --data-root DIR)")


def _interrupt(record) -> None:
    """End a run in flight (started, no stop) as if it had stopped, ``"interrupted"``."""
    p = record.processor
    if p.start_doc is not None and p.stop_doc is None and p.exit_status is None:
        logger.warning("run %s is in flight (%d points received): ending it as "
                       "'interrupted' and writing its maps", record.uid[:8],
                       p.status()["received"])
        record.stop_received = time.monotonic()
        try:
            p("stop", _interrupted_stop(record.uid))
        except Exception:  # noqa: BLE001 - its partial maps remain
            logger.exception("run %s could not be ended", record.uid[:8])


def _interrupted_stop(uid: str) -> dict:
    import uuid

    return {"uid": str(uuid.uuid4()), "run_start": uid, "time": time.time(),
            "exit_status": "interrupted",
            "reason": "crystalmapping serve stopped before the run's stop document came"}
