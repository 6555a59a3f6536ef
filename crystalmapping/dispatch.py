"""The receiving end of the 0MQ proxy: bluesky's ``RemoteDispatcher``, safe by default.

Documents arrive as ``<prefix> <name> <document>`` messages from
``bluesky-0MQ-proxy``; :class:`RemoteDispatcher` decodes them with
:func:`crystalmapping.wire.unpackb` (no pickle), skips and logs what is not a
bluesky document, and hands the rest to its subscribers (the live server's
router, or the tutorial's callbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Callable

from bluesky.callbacks.zmq import RemoteDispatcher as _BlueskyRemoteDispatcher
from bluesky.run_engine import DocumentNames as _DocumentNames

from .errors import ConfigError, CrystalMappingError
from .wire import unpackb

__all__ = ["RemoteDispatcher", "ProxyError", "DEFAULT_IN_ADDRESS", "DEFAULT_OUT_ADDRESS"]

logger = logging.getLogger(__name__)

#: Default addresses: the proxy's input (publishers) and output (servers), on loopback.
DEFAULT_IN_ADDRESS = "127.0.0.1:5567"
DEFAULT_OUT_ADDRESS = "127.0.0.1:5568"


class ProxyError(CrystalMappingError, ConnectionError):
    """No 0MQ proxy answers at the address given."""


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
