"""Serve: crystal maps of live scans from bluesky's 0MQ proxy; stored runs replayed to it.

Dataflow::

    RunEngine ── bluesky Publisher ──> bluesky-0MQ-proxy ──> RemoteDispatcher (this module)
    crystalmapping publish ─(msgpack)─> in 5567 / out 5568        │  bad bytes: logged, skipped
                                                                  v
                                   DocumentServer: event_model.RunRouter([processor_factory])
                                                                  │  one StreamProcessor per run
                                                                  v
                                 out_dir/<uid>.zarr (partial, then final maps; as batch writes)
                                 a derived run in the catalog, a log line, a JSON report line

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

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import msgpack
import numpy as np
from bluesky.callbacks.zmq import RemoteDispatcher as _BlueskyRemoteDispatcher
from bluesky.run_engine import DocumentNames as _DocumentNames

from .config import ProcessConfig
from .errors import ConfigError, CrystalMappingError

__all__ = [
    "packb",
    "unpackb",
    "serialization",
    "DecodeError",
    "ProxyError",
    "RemoteDispatcher",
    "DocumentServer",
    "live_documents",
    "publish_run",
    "SERIALIZERS",
]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`serialization` (and ``--serializer``).
SERIALIZERS = ("msgpack", "pickle")

#: Default addresses: the proxy's input (publishers) and output (servers), on loopback.
DEFAULT_IN_ADDRESS = "127.0.0.1:5567"
DEFAULT_OUT_ADDRESS = "127.0.0.1:5568"

#: Exit statuses an event-model stop document may carry.
_STOP_STATUSES = ("success", "abort", "fail")


class DecodeError(CrystalMappingError, ValueError):
    """Bytes from the network that are not a document this module accepts."""


class ProxyError(CrystalMappingError, ConnectionError):
    """No 0MQ proxy answers at the address given."""


# ----------------------------------------------------------------------------- serialization


def _encode(obj):
    """msgpack ``default`` hook: numpy arrays and scalars in msgpack-numpy's layout."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(
                f"cannot send an array of Python objects (dtype {obj.dtype}) with msgpack: it "
                "would need pickle. Convert it to a numeric or string array, or a list."
            )
        if obj.dtype.kind == "V":
            return {b"nd": True, b"type": obj.dtype.descr, b"kind": b"V",
                    b"shape": list(obj.shape), b"data": np.ascontiguousarray(obj).tobytes()}
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"",
                b"shape": list(obj.shape), b"data": np.ascontiguousarray(obj).tobytes()}
    if isinstance(obj, (np.bool_, np.number)):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if isinstance(obj, complex):
        return {b"complex": True, b"data": repr(obj)}
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(
        f"cannot serialize {type(obj).__name__} {obj!r:.80} with msgpack; documents hold "
        "dicts, lists, strings, numbers, None and numpy arrays."
    )


def _dtype(descr) -> np.dtype:
    if isinstance(descr, bytes):
        descr = descr.decode()
    if isinstance(descr, (list, tuple)):
        descr = [tuple(x.decode() if isinstance(x, bytes) else _nested(x) for x in field)
                 for field in descr]
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise DecodeError(f"refused an array of Python objects (dtype {dtype}): no pickle "
                          "from the network.")
    return dtype


def _nested(x):
    if isinstance(x, list) and x and isinstance(x[0], list):
        return [tuple(_nested(y) for y in f) for f in x]
    return x.decode() if isinstance(x, bytes) else x


def _decode(obj: dict):
    """msgpack ``object_hook``: rebuild numpy arrays and scalars; never unpickles."""
    if b"nd" in obj:
        data = obj.get(b"data")
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError("a numpy entry has no bytes under 'data'.")
        if obj[b"nd"] is True:
            if obj.get(b"kind") == b"O":
                raise DecodeError("refused an array of Python objects: no pickle from the "
                                  "network.")
            dtype = _dtype(obj[b"type"])
            shape = tuple(int(n) for n in obj[b"shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if count * dtype.itemsize != len(data):
                raise DecodeError(f"an array of shape {shape} and dtype {dtype} needs "
                                  f"{count * dtype.itemsize} bytes, got {len(data)}.")
            # a writable copy, as pickle gives
            return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).copy()
        dtype = _dtype(obj[b"type"])
        if len(data) != dtype.itemsize:
            raise DecodeError(f"a {dtype} scalar needs {dtype.itemsize} bytes, got {len(data)}.")
        return np.frombuffer(data, dtype=dtype)[0]
    if b"complex" in obj:
        text = obj[b"data"]
        return complex(text.decode() if isinstance(text, bytes) else text)
    return obj


def packb(doc: Any) -> bytes:
    """Serialize a document with msgpack; numpy arrays and scalars included.

    The layout of arrays is msgpack-numpy's, so ``msgpack_numpy.unpackb`` reads
    the result. Arrays of Python objects are refused (they would need pickle).

    Examples
    --------
    >>> import numpy as np
    >>> doc = unpackb(packb({"data": {"img": np.arange(6, dtype="<u2").reshape(2, 3)}}))
    >>> doc["data"]["img"].dtype, doc["data"]["img"].shape
    (dtype('uint16'), (2, 3))
    """
    return msgpack.packb(doc, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> dict:
    """Deserialize one msgpack document (the inverse of :func:`packb`); never unpickles.

    Raises
    ------
    DecodeError
        If the bytes are not msgpack, hold an array of Python objects, or do
        not decode to a mapping.
    """
    try:
        doc = msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"not a msgpack document ({type(exc).__name__}: {exc}).") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"a document must be a mapping, got a {type(doc).__name__}.")
    return doc


def _pickle_loads(data: bytes):
    return pickle.loads(data)  # noqa: S301 - only when asked for by name


def serialization(name: Literal["msgpack", "pickle"] = "msgpack") -> tuple[Callable, Callable]:
    """The ``(dumps, loads)`` pair of a serializer name.

    Parameters
    ----------
    name : {"msgpack", "pickle"}
        ``"msgpack"``: :func:`packb` / :func:`unpackb` (safe; the default).
        ``"pickle"``: bluesky's default; only on a trusted network, since
        anyone who can reach the proxy can then run code in the receiver.
    """
    if name == "msgpack":
        return packb, unpackb
    if name == "pickle":
        return pickle.dumps, _pickle_loads
    raise ConfigError(f"serializer must be one of {list(SERIALIZERS)}, got {name!r}.")


def _prefix_bytes(prefix: bytes | str | None) -> bytes:
    if prefix is None:
        return b""
    prefix = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
    if b" " in prefix:
        raise ConfigError(f"prefix {prefix!r} may not contain a space.")
    return prefix


def _address(address: str | tuple) -> str | tuple:
    """``host:port`` (or a tuple) as bluesky takes it; ``localhost`` stays as given."""
    if isinstance(address, str) and "://" not in address and ":" not in address:
        raise ConfigError(f"address must be host:port (e.g. 127.0.0.1:5568), got {address!r}.")
    return address


# ----------------------------------------------------------------------------- receiving

class RemoteDispatcher(_BlueskyRemoteDispatcher):
    """bluesky's ``RemoteDispatcher``, safe by default: msgpack, and bad messages skipped.

    Subscribe callbacks with ``subscribe`` and call :meth:`start` (it blocks),
    as with bluesky's. The differences:

    * the default deserializer is :func:`unpackb` (no pickle);
    * a message that does not split into ``prefix name document``, names no
      bluesky document, does not decode, or is not a mapping is logged and
      skipped (bluesky's raises ``KeyError`` out of its loop on an unknown
      name); :attr:`skipped` counts them;
    * a callback that raises is logged; the next document is processed;
    * it subscribes to its prefix at the proxy, so other publishers' messages
      are not sent to it, and its receive queue is not bounded (``rcvhwm=0``),
      so a burst is queued, not dropped;
    * :meth:`request_stop` ends :meth:`start` from any thread.

    Parameters
    ----------
    address : str or tuple
        The proxy's output, ``"127.0.0.1:5568"`` or ``("localhost", 5568)``.
    prefix : bytes or str
        Only messages with this prefix are taken (``b""``: all).
    deserializer : callable
        ``bytes -> dict``; :func:`unpackb` unless told otherwise.
    loop : asyncio event loop, optional
    rcvhwm : int
        0MQ receive high-water mark (messages; 0 for no limit).

    Examples
    --------
    The tutorial's server::

    >>> rd = RemoteDispatcher(address=("localhost", 5568), prefix=b"raw")  # doctest: +SKIP
    >>> rd.subscribe(ip)                                                   # doctest: +SKIP
    >>> rd.start()                                                         # doctest: +SKIP
    """

    def __init__(self, address: str | tuple = DEFAULT_OUT_ADDRESS, *,
                 prefix: bytes | str = b"", deserializer: Callable[[bytes], Any] = unpackb,
                 loop: asyncio.AbstractEventLoop | None = None, rcvhwm: int = 0):
        super().__init__(_address(address), prefix=_prefix_bytes(prefix), loop=loop,
                         deserializer=deserializer)
        self.rcvhwm = int(rcvhwm)
        self.skipped = 0
        self.received = 0
        self._stop_requested = False
        self._last_skip_log = 0.0
        self._thread: threading.Thread | None = None
        self.started = threading.Event()  # set once the socket is set up

    def start(self) -> None:
        """Receive and dispatch documents until :meth:`request_stop` (or Ctrl-C)."""
        import zmq
        import zmq.asyncio

        if self.closed:
            raise RuntimeError("this RemoteDispatcher was started and stopped; make a new one.")
        self._thread = threading.current_thread()
        try:
            asyncio.set_event_loop(self.loop)
            self._context = zmq.asyncio.Context()
            self._socket = self._context.socket(zmq.SUB)
            self._socket.setsockopt(zmq.RCVHWM, self.rcvhwm)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self.address)
            self._socket.setsockopt(zmq.SUBSCRIBE, self._prefix + b" " if self._prefix else b"")
            self._task = self.loop.create_task(self._poll())
            if self._stop_requested:
                self._task.cancel()
            self.started.set()
            logger.info("receiving documents with prefix %r from %s", self._prefix, self.address)
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(self._task)
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Make :meth:`start` return soon; safe from any thread and before ``start``."""
        self._stop_requested = True

        def cancel():
            if self._task is not None and not self._task.done():
                self._task.cancel()

        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(cancel)

    def stop(self) -> None:
        """Close the socket and the loop (from the thread that ran :meth:`start`)."""
        if self.loop.is_running():
            if threading.current_thread() is not self._thread:
                raise RuntimeError("the dispatcher runs in another thread; call "
                                   "request_stop() there instead of stop().")
            self.request_stop()
            return
        if self._task is not None and not self._task.done() and not self.loop.is_closed():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(self._task)
        if self._socket is not None:
            self._socket.close(linger=0)
        if self._context is not None:
            self._context.destroy(linger=0)
        if not self.loop.is_closed():
            self.loop.close()
        self.closed = True

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        now = time.monotonic()
        if self.skipped <= 10 or now - self._last_skip_log > 5.0:
            self._last_skip_log = now
            logger.warning("skipped a message from %s: %s (%d skipped so far)", self.address,
                           reason, self.skipped)
        else:
            logger.debug("skipped a message: %s", reason)

    def _parse(self, message: bytes):
        parts = message.split(b" ", 2)
        if len(parts) != 3:
            self._skip(f"{len(message)} bytes that are not '<prefix> <name> <document>' "
                       f"({message[:40]!r}...)")
            return None
        prefix, name, data = parts
        if self._prefix and prefix != self._prefix:
            logger.debug("ignored a message with prefix %r", prefix)
            return None
        try:
            kind = _DocumentNames[name.decode()]
        except (UnicodeDecodeError, KeyError):
            self._skip(f"{name[:40]!r} is not a bluesky document name "
                       f"({sorted(n.name for n in _DocumentNames)})")
            return None
        try:
            doc = self._deserializer(data)
        except Exception as exc:  # noqa: BLE001 - anything on the wire
            self._skip(f"a {kind.name} document of {len(data)} bytes did not decode with "
                       f"{getattr(self._deserializer, '__name__', self._deserializer)}: {exc}")
            return None
        if not isinstance(doc, dict):
            self._skip(f"a {kind.name} document decoded to a {type(doc).__name__}, not a mapping")
            return None
        return kind, doc

    async def _poll(self):
        while True:
            message = await self._socket.recv()
            parsed = self._parse(message)
            if parsed is None:
                continue
            self.received += 1
            kind, doc = parsed
            try:
                self.process(kind, doc)
            except Exception:  # noqa: BLE001 - one bad document must not stop the server
                logger.exception("a callback failed on a %s document", kind.name)


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
            logger.error("a %s document (run %s) could not be routed: %s: %s; the server goes "
                         "on with the next document", name, str(run)[:8], type(exc).__name__, exc)
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
        """Start receiving (a dispatcher thread) and watching the runs (a monitor thread)."""
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


def _plain(value):
    """Attributes as JSON-ready Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def derived_run_documents(uid: str, path, maps, summary: Mapping | None = None) -> list:
    """The documents of the derived run that records a map store in a catalog.

    Parameters
    ----------
    uid : str
        The measured run's uid (``parent_uid``).
    path : path
        The map store.
    maps : xarray.Dataset
        The maps (``y``, ``x``, ``n_points``, ``grain_id`` per grain; attrs
        ``config``, ``grid``, ``exit_status``).
    summary : dict, optional
        Figures of the stream (points, peaks, lag...), kept under ``stream``.

    Returns
    -------
    documents : list of (name, doc)
        start (``analysis_stage="crystalmapping"``, ``parent_uid``,
        ``source_uid``, ``maps``, ``config``, ``exit_status``, ``grid``,
        ``stream``), a ``primary`` descriptor and one event per map
        (``grain``, ``y``, ``x``, ``n_points``, ``grain_id``) when there are
        maps, and stop (``abort`` with the reason for a run that ended without
        a valid stop status).
    """
    from event_model import compose_run

    status = str(maps.attrs.get("exit_status", "success"))
    stream = {k: v for k, v in dict(summary or {}).items() if k not in ("uid", "derived_uid")}
    bundle = compose_run(metadata=_plain({
        "analysis_stage": "crystalmapping",
        "parent_uid": uid,
        "source_uid": maps.attrs.get("source_uid", uid),
        "maps": str(Path(path).absolute()),
        "config": maps.attrs.get("config", {}),
        "exit_status": status,
        "failed_points": list(maps.attrs.get("failed_points", [])),
        "grid": maps.attrs.get("grid", {}),
        "stream": stream,
        "versions": maps.attrs.get("versions", {}),
    }))
    docs = [("start", bundle.start_doc)]
    n = int(maps.sizes.get("grain", 0))
    if n:
        keys = {"grain": "integer", "y": "number", "x": "number", "n_points": "integer",
                "grain_id": "integer"}
        data_keys = {k: {"source": "crystalmapping.serve", "dtype": kind, "shape": [],
                         "dtype_numpy": "<i8" if kind == "integer" else "<f8"}
                     for k, kind in keys.items()}
        desc = bundle.compose_descriptor(name="primary", data_keys=data_keys)
        docs.append(("descriptor", desc.descriptor_doc))
        columns = {"grain": maps["grain"].values.astype(np.int64),
                   "y": maps["y"].values.astype(np.float64),
                   "x": maps["x"].values.astype(np.float64),
                   "n_points": maps["n_points"].values.astype(np.int64),
                   "grain_id": maps["grain_id"].values.astype(np.int64)}
        now = time.time()
        for i in range(n):
            data = {k: v[i].item() for k, v in columns.items()}
            docs.append(("event", desc.compose_event(data=data, timestamps={k: now for k in data},
                                                     seq_num=i + 1)))
    if status in _STOP_STATUSES:
        stop = bundle.compose_stop(exit_status=status)
    else:
        stop = bundle.compose_stop(exit_status="abort",
                                   reason=f"the measured run ended as {status!r}")
    docs.append(("stop", stop))
    return docs


# ----------------------------------------------------------------------------- publishing


def live_documents(run, *, fill: bool = False, data_key: str | None = None
                   ) -> Iterator[tuple[str, dict]]:
    """A stored run's documents in the order a RunEngine emits them.

    Parameters
    ----------
    run : crystalmapping.source.Run
    fill : bool
        False: the documents as stored; frames in HDF5 files travel as
        ``stream_resource`` / ``stream_datum`` references (one datum per point,
        sent just before its event), and the receiver reads the file itself.
        True: the frames are read here and sent inside the events
        (:func:`crystalmapping.callbacks.replay`), and the descriptor no
        longer marks them external: what the tutorial's ``ImageProcessor``
        needs; 24 MB per point on the Dexela.
    data_key : str, optional
        With ``fill``: the image key to fill (default: every image key).

    Yields
    ------
    name, doc
    """
    if fill:
        from .callbacks import replay

        for name, doc in replay(run, data_key=data_key):
            if name == "descriptor":
                doc = dict(doc)
                doc["data_keys"] = {k: {kk: vv for kk, vv in v.items() if kk != "external"}
                                    if str(v.get("external", "")).startswith("STREAM:") else v
                                    for k, v in doc["data_keys"].items()}
            yield name, doc
        return
    yield from _reorder(run.documents())


def _reorder(documents: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
    """Stored documents (tiled gives events, then resources and one datum for all rows)
    in live order: resources first, each point's datum just before its event."""
    external_descriptors: set[str] = set()
    held: list[tuple[str, dict]] = []  # events of external descriptors, until the datums come
    datums: dict[tuple[str, int], list[dict]] = {}
    resources: list[dict] = []
    stop = None
    for name, doc in documents:
        if name == "start":
            yield name, doc
        elif name == "descriptor":
            if any(str(v.get("external", "")).startswith("STREAM:")
                   for v in doc.get("data_keys", {}).values()):
                external_descriptors.add(doc["uid"])
            yield name, doc
        elif name in ("event", "event_page") and doc.get("descriptor") not in external_descriptors:
            if not held:
                yield name, doc
            else:
                held.append((name, doc))
        elif name in ("event", "event_page"):
            held.append((name, doc))
        elif name == "stream_resource":
            resources.append(doc)
        elif name == "stream_datum":
            for d in _split_datum(doc):
                datums.setdefault((d["descriptor"], d["seq_nums"]["start"]), []).append(d)
        elif name == "stop":
            stop = doc
        else:
            held.append((name, doc))
    for doc in resources:
        yield "stream_resource", doc
    for key in [k for k in datums if k[1] <= 0]:  # datums that name no event: first
        for d in datums.pop(key):
            yield "stream_datum", d
    for name, doc in held:
        if name == "event":
            for d in datums.pop((doc["descriptor"], doc["seq_num"]), []):
                yield "stream_datum", d
        elif name == "event_page":
            for seq in doc["seq_num"]:
                for d in datums.pop((doc["descriptor"], seq), []):
                    yield "stream_datum", d
        yield name, doc
    for ds in datums.values():  # rows of points whose event never came (aborted scans)
        for d in ds:
            yield "stream_datum", d
    if stop is not None:
        yield "stop", stop


def _split_datum(doc: dict) -> list[dict]:
    """One stream_datum per event it covers (rows divided evenly), else the datum as is."""
    seq = doc.get("seq_nums") or {}
    s0, s1 = int(seq.get("start", 0)), int(seq.get("stop", 0))
    i0, i1 = int(doc["indices"]["start"]), int(doc["indices"]["stop"])
    n = s1 - s0
    if n <= 1 or (i1 - i0) % n:
        return [dict(doc, seq_nums={"start": s0, "stop": s1})]
    k = (i1 - i0) // n
    return [dict(doc, uid=f"{doc['uid']}/{j}",
                 indices={"start": i0 + j * k, "stop": i0 + (j + 1) * k},
                 seq_nums={"start": s0 + j, "stop": s0 + j + 1}) for j in range(n)]


def _wait_connected(socket, timeout: float) -> bool:
    """Reconnect a PUB socket with a monitor and wait for its handshake with the proxy."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    address = socket.getsockopt(zmq.LAST_ENDPOINT).decode() or None
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        if address:
            with contextlib.suppress(zmq.ZMQError):
                socket.disconnect(address)
            socket.connect(address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if monitor.poll(int(max(1, (deadline - time.monotonic()) * 1000))):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    time.sleep(0.2)  # let the proxy's subscription reach this socket
                    return True
        return False
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)


def publish_run(run, address: str | tuple = DEFAULT_IN_ADDRESS, *, prefix: bytes | str = b"raw",
                serializer: str = "msgpack", fill: bool = False, rate: float | None = None,
                data_key: str | None = None, connect_timeout: float = 10.0) -> dict:
    """Publish a stored run to a 0MQ proxy, as the RunEngine would (the tutorial's Publisher).

    Parameters
    ----------
    run : crystalmapping.source.Run
        A run of a catalog.
    address : str or tuple
        The proxy's input, ``"127.0.0.1:5567"``.
    prefix : bytes or str
        The prefix servers filter on.
    serializer : {"msgpack", "pickle"}
    fill : bool
        Send the frames inside the events (see :func:`live_documents`).
        Default: references to the HDF5 files, which the server reads (it must
        see the same paths); the server's maps then equal the batch maps of
        the run. Runs with inline frames are sent as stored either way.
    rate : float, optional
        Points (events) per second; default as fast as possible.
    connect_timeout : float
        Seconds to wait for the proxy.

    Returns
    -------
    counts : dict
        Documents sent by name, and ``seconds``.

    Raises
    ------
    ProxyError
        If no proxy answers at ``address`` (a ``ConnectionError``).

    Notes
    -----
    Start the server before publishing: a 0MQ subscriber that connects later
    misses what was sent before (the PUB/SUB "slow joiner").
    """
    from bluesky.callbacks.zmq import Publisher

    import zmq

    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be > 0 points per second (or None), got {rate!r}.")
    dumps = serialization(serializer)[0]
    publisher = Publisher(_address(address), prefix=_prefix_bytes(prefix), serializer=dumps)
    counts: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        socket = getattr(publisher, "_socket", None)
        if socket is not None:
            socket.setsockopt(zmq.LINGER, 60_000)
            if not _wait_connected(socket, connect_timeout):
                raise ProxyError(
                    f"no 0MQ proxy answered at {publisher.address} within {connect_timeout} s; "
                    "start one with: bluesky-0MQ-proxy --in-address 127.0.0.1:5567 "
                    "--out-address 127.0.0.1:5568")
        else:  # pragma: no cover - a Publisher without the attribute
            time.sleep(1.0)
        t0 = time.monotonic()
        n_events = 0
        for name, doc in live_documents(run, fill=fill, data_key=data_key):
            if rate is not None and name in ("event", "event_page"):
                delay = t0 + n_events / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                n_events += 1 if name == "event" else len(doc["seq_num"])
            publisher(name, doc)
            counts[name] = counts.get(name, 0) + 1
    finally:
        publisher.close()  # waits (up to LINGER) until every message is sent
    counts["seconds"] = round(time.monotonic() - t0, 3)
    return counts

