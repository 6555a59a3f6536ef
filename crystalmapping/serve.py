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
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

from bluesky.run_engine import DocumentNames as _DocumentNames

from .config import ProcessConfig
from .errors import ConfigError
from .derived import derived_run_documents
from .dispatch import (DEFAULT_IN_ADDRESS, DEFAULT_OUT_ADDRESS, ProxyError, RemoteDispatcher,
                       _prefix_bytes)
from .publish import live_documents, publish_run
from .tasks import warm_up
from .wire import SERIALIZERS, DecodeError, _pickle_loads, packb, serialization, unpackb

# The live dataflow, one module per job: wire (bytes <-> documents), dispatch (the proxy's
# receiving end), serve (this module: routing runs to stream processors, reporting them),
# derived (the catalog record of a store), publish (stored runs back to the proxy). The
# names below stay importable from here, as the tutorial's code imports them.
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


# ----------------------------------------------------------------------------- serving


class _NoFill:
    """A pass-through ``filler_class`` for ``RunRouter``: the processor reads HDF5 itself,
    and inline frames need no filling (event-model's Filler would deep-copy each page)."""

    def __init__(self, handler_registry=None, *, root_map=None, inplace=False, **kwargs):
        pass

    def __call__(self, name, doc):
        return name, doc

    def _same(self, doc):
        return doc

    start = descriptor = event = event_page = resource = datum = datum_page = _same
    stream_resource = stream_datum = stop = _same

    def close(self):
        pass

    def clear_handler_cache(self):
        pass


class _RunRecord:
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
                 data_roots: Iterable[str | os.PathLike] | None = (), **processor_options):
        from event_model import RunRouter

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
        self._user_on_written = user_on_written
        self._factory = processor_factory(executor, self.config, self.out_dir,
                                          on_written=self._on_written, **options)
        self._router = RunRouter([self._make], filler_class=_NoFill)
        self._lock = threading.RLock()
        self._records: dict[str, _RunRecord] = {}
        self._finished: deque = deque(maxlen=1000)
        self._errors: dict[tuple, float] = {}
        self._catalog_lock = threading.Lock()
        self._closing = threading.Event()
        self._dispatcher: RemoteDispatcher | None = None
        self._thread: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        self._receive_error: BaseException | None = None

    # ------------------------------------------------------------------ routing

    def _make(self, name, start_doc):
        callbacks, subfactories = self._factory(name, start_doc)
        for processor in callbacks:
            record = _RunRecord(processor)
            record.uid = start_doc["uid"]
            with self._lock:
                self._records[record.uid] = record
            logger.info("run %s started (scan_id %s, shape %s): mapping it to %s",
                        record.uid[:8], start_doc.get("scan_id"), start_doc.get("shape"),
                        self.out_dir / f"{record.uid}.zarr")
        return [_Guard(self, start_doc["uid"], cb) for cb in callbacks], subfactories

    def __call__(self, name: str, doc: dict) -> None:
        """Route one document (what the dispatcher calls); never raises."""
        if self._closing.is_set():
            return
        if name == "stop":
            with self._lock:
                record = self._records.get(doc.get("run_start"))
                if record is not None:
                    record.stop_received = time.monotonic()
            if record is None and isinstance(doc, dict):
                logger.error("a stop document names run %s, whose start this server never "
                             "received (started mid-run, or documents out of order); ignored",
                             str(doc.get("run_start"))[:8])
        try:
            self._router(name, doc)
        except Exception as exc:  # noqa: BLE001 - a bad document must not stop the server
            self._log_error(name, doc, exc)

    def _log_error(self, name, doc, exc) -> None:
        run = doc.get("run_start") or doc.get("uid") if isinstance(doc, dict) else None
        key = (type(exc).__name__, name, str(run)[:36])
        now = time.monotonic()
        if now - self._errors.get(key, -1e9) > 30.0:
            self._errors[key] = now
            logger.error("a %s document (run %s) could not be routed: %s; the server goes "
                         "on with the next document", name, str(run)[:8],
                         _explain(name, doc, exc))
        else:
            logger.debug("a %s document could not be routed: %r", name, exc)

    # ------------------------------------------------------------- per-run output

    def _on_written(self, path: Path, maps) -> None:
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
        p = record.processor.status()
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
            "max_queued": record.max_queued,
            "max_lag_s": round(record.max_lag, 4),
            "latency_median_s": p["latency_median_s"],
            "latency_p95_s": p["latency_p95_s"],
            "stop_to_maps_s": (None if record.stop_received is None
                               else round(written - record.stop_received, 4)),
            "derived_uid": None,
        }
        if self.catalog is not None:
            summary["derived_uid"] = self._record_derived_run(uid, path, maps, summary)
        record.summary = summary
        level = logging.INFO if status == "success" and not failed else logging.WARNING
        logger.log(level, "run %s: %d points (%d failed), %d peaks, %d maps of %d grains, lag "
                   "max %.1f s (%d points queued), latency median %s s, p95 %s s, maps %s s "
                   "after the stop: %s -> %s", uid[:8], summary["points"], summary["failed"],
                   summary["peaks"], summary["maps"], summary["grains"], summary["max_lag_s"],
                   summary["max_queued"], _fmt(summary["latency_median_s"]),
                   _fmt(summary["latency_p95_s"]), _fmt(summary["stop_to_maps_s"]), status, path)
        if self.report is not None:
            try:
                with self._catalog_lock, open(self.report, "a") as f:
                    f.write(json.dumps(summary) + "\n")
            except OSError:
                logger.exception("run %s: the report line could not be written to %s",
                                 uid[:8], self.report)

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
                    self._finished.append(record)

    def runs(self) -> list[dict]:
        """Summaries of the finished runs, oldest first (the report's lines)."""
        with self._lock:
            done = [r.summary for r in self._finished if r.summary is not None]
            done += [r.summary for r in self._records.values() if r.summary is not None]
        return done

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
        with self._lock:
            records = list(self._records.values())
        for record in records:
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
        if self._monitor is not None:
            self._monitor.join(5.0)
        self._sample()
        return late

    def serve_forever(self) -> int:
        """Start, run until SIGINT or SIGTERM, then :meth:`stop`. Returns an exit code.

        A second signal while the runs in flight are finishing exits at once.
        """
        stop = threading.Event()
        received = []

        def handler(signum, frame):
            received.append(signal.Signals(signum).name)
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            logger.info("serving: documents with prefix %r from %s -> maps in %s%s",
                        self.prefix.decode(errors="replace"), self._dispatcher.address,
                        self.out_dir.absolute(),
                        f", derived runs in {self.catalog.uri}" if self.catalog else "")
            roots = self._factory.data_roots
            if roots is None:
                logger.warning("files named by documents are opened wherever they are: only "
                               "for a network where every publisher is trusted")
            else:
                logger.info("files named by documents are opened only under: %s",
                            ", ".join(roots) if roots else
                            "nothing (inline frames only; give --data-root DIR)")
            while not stop.wait(0.5):
                if not self.receiving:
                    logger.error("the dispatcher thread ended; stopping")
                    break
            if received:
                logger.warning("%s: stopping; finishing the runs in flight (up to %g s, "
                               "a second signal exits at once)", received[0], self.drain_timeout)
            late = self.stop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return 1 if late or not received else 0


def _explain(name, doc, exc) -> str:
    """What went wrong with a document, in the words of the document model."""
    if isinstance(exc, AttributeError) and name not in _DOCUMENT_NAMES:
        return (f"{name!r} is not a bluesky document name (they are "
                f"{', '.join(sorted(_DOCUMENT_NAMES))})")
    if isinstance(exc, KeyError) and isinstance(doc, dict):
        missing = exc.args[0] if exc.args else None
        for field, kind in (("descriptor", "descriptor"), ("stream_resource", "stream_resource"),
                            ("resource", "resource"), ("run_start", "start")):
            if missing is not None and doc.get(field) == missing:
                return (f"it names the {kind} {str(missing)[:40]!r}, which this server never "
                        "received (documents out of order, or the server started mid-run)")
        return f"it lacks the field {missing!r} (KeyError)"
    return f"{type(exc).__name__}: {exc}"


#: The names of bluesky's documents (the RunEngine's own list).
_DOCUMENT_NAMES = tuple(n.name for n in _DocumentNames)


class _Guard:
    """One run's processor behind the router: its errors are logged once, not raised."""

    def __init__(self, server: DocumentServer, uid: str, callback):
        self.server, self.uid, self.callback = server, uid, callback
        self.broken = False

    def __call__(self, name, doc):
        if self.broken:
            return doc
        try:
            return self.callback(name, doc)
        except Exception as exc:  # noqa: BLE001 - this run only
            if name == "start":
                self.broken = True
                logger.error("run %s is not mapped: %s: %s", self.uid[:8], type(exc).__name__, exc)
            else:
                self.server._log_error(name, doc, exc)
            return doc


def _interrupted_stop(uid: str) -> dict:
    import uuid

    return {"uid": str(uuid.uuid4()), "run_start": uid, "time": time.time(),
            "exit_status": "interrupted",
            "reason": "crystalmapping serve stopped before the run's stop document came"}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
