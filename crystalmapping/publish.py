"""Publishing: a stored run's documents to the 0MQ proxy, as the RunEngine emits them.

:func:`live_documents` puts a run read back from a catalog in live order
(each point's ``stream_datum`` just before its event); :func:`publish_run`
sends them through bluesky's ``Publisher`` (``crystalmapping publish``), so
a stored scan can be replayed to ``crystalmapping serve`` or to the
tutorial's server.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator

from .dispatch import DEFAULT_IN_ADDRESS, ProxyError, _address, _prefix_bytes
from .errors import ConfigError
from .wire import serialization

__all__ = ["connect", "live_documents", "publish_run", "send_run"]


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
        (:func:`crystalmapping.playback.replay`), and the descriptor no
        longer marks them external: what the tutorial's ``ImageProcessor``
        needs; 24 MB per point on the Dexela.
    data_key : str, optional
        With ``fill``: the image key to fill (default: every image key).

    Yields
    ------
    name, doc
    """
    if fill:
        from .playback import replay

        for name, doc in replay(run, data_key=data_key):
            if name == "descriptor":
                doc = dict(doc)
                doc["data_keys"] = {k: {kk: vv for kk, vv in v.items() if kk != "external"}
                                    if v.get("external") else v
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
            if any(v.get("external") for v in doc.get("data_keys", {}).values()):
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
    check_rate(rate)
    with connect(address, prefix=prefix, serializer=serializer,
                 connect_timeout=connect_timeout) as publisher:
        t0 = time.monotonic()
        counts = send_run(publisher, run, fill=fill, rate=rate, data_key=data_key)
    counts["seconds"] = round(time.monotonic() - t0, 3)  # until every message was sent
    return counts


def check_rate(rate: float | None) -> None:
    """Raise a ConfigError unless ``rate`` is None or a positive number of points per second."""
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be > 0 points per second (or None), got {rate!r}.")


@contextlib.contextmanager
def connect(address: str | tuple = DEFAULT_IN_ADDRESS, *, prefix: bytes | str = b"raw",
            serializer: str = "msgpack", connect_timeout: float = 10.0) -> Iterator:
    """A bluesky ``Publisher`` whose handshake with the proxy at ``address`` is done.

    On exit it is closed once every message is sent (waiting up to a minute).
    Connect before opening the run to send: a missing proxy is then found in
    ``connect_timeout`` seconds, not after the seconds a catalog takes to open.

    Parameters
    ----------
    address, prefix, serializer, connect_timeout
        As :func:`publish_run` takes them.

    Yields
    ------
    publisher : bluesky.callbacks.zmq.Publisher

    Raises
    ------
    ProxyError
        If no proxy answers at ``address`` within ``connect_timeout`` seconds.
    """
    from bluesky.callbacks.zmq import Publisher

    import zmq

    dumps = serialization(serializer)[0]
    publisher = Publisher(_address(address), prefix=_prefix_bytes(prefix), serializer=dumps)
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
        yield publisher
    finally:
        publisher.close()  # waits (up to LINGER) until every message is sent


def send_run(publisher, run, *, fill: bool = False, rate: float | None = None,
             data_key: str | None = None) -> dict:
    """Send a stored run's documents through a :func:`connect`-ed publisher.

    Parameters
    ----------
    publisher : bluesky.callbacks.zmq.Publisher
    run : crystalmapping.source.Run
    fill, rate, data_key
        As :func:`publish_run` takes them.

    Returns
    -------
    counts : dict
        Documents sent by name.
    """
    check_rate(rate)
    counts: dict[str, int] = {}
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
    return counts
