"""Readers: the frames of a catalog run, read where a task runs.

A reader is a small picklable view of one data key of a run's stream (an
:class:`_ArrayReader`, or a :class:`PointFrames` per grid point) that
reconnects to the catalog in whichever process reads it.

Reading at disk speed. When the detector frames are external HDF5 (written
by StreamResource/StreamDatum documents, one file per data source) the
readers open the file themselves with h5py, in the process that runs the
task, instead of asking tiled for the bytes (a request per point, through the
server's whole stack). A file is read directly only when tiled itself would
serve it (:func:`direct_reference`): for an embedded catalog, when it lies in
the catalog's readable storage (tiled's own rule); for a server, when the
server answered one read of it. Then the *root map* of the catalog
(``Catalog(root_map=...)``) says where this machine sees it. If the file
cannot be opened where the task runs (not mounted there, a filter
missing...), the rows are read through tiled as before, with one warning per
file and process. Inline frames are always read through tiled.

A tiled server that stops answering during reads is given
:data:`SERVER_GRACE_SECONDS` to come back, then reads fail with
:class:`CatalogUnavailableError` naming it, not after tiled's retries of
every request.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import dask
import numpy as np

from . import frames as _frames
from .address import _CLIENTS_LOCK, _NODES, _Locator
from .catalog import Catalog
from .errors import ConfigError, CrystalMappingError, ScanError
from .frames import DamagedFileError, FrameReadError, HDF5Rows
from .references import HDF5_MIMETYPES, map_root, parse_root_map, path_from_uri

__all__ = ["PointFrames", "CatalogUnavailableError", "SERVER_GRACE_SECONDS", "direct_reference"]

logger = logging.getLogger(__name__)

#: How long a read waits for a tiled server that refuses connections to come back
#: (a restart) before it gives up with :class:`CatalogUnavailableError`.
SERVER_GRACE_SECONDS = 10.0


class CatalogUnavailableError(CrystalMappingError, ConnectionError):
    """The tiled server of a catalog stopped answering while frames were read from it."""


#: The last sentence of a CatalogUnavailableError: what to do.
SERVER_FIX = ("Start the server again (or restore the network to it), then run the same "
              "command again.")


def _lost_server(uri: str, problem: str, where: str) -> str:
    return f"the tiled server at {uri} stopped answering {where} ({problem}). {SERVER_FIX}"


def _wait_answering(uri: str, grace: float, where: str) -> None:
    """Return once the server accepts a connection; raise CatalogUnavailableError after ``grace``."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + grace
    while True:
        try:
            socket.create_connection((parts.hostname, port), timeout=min(grace, 5.0) or 1.0).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise CatalogUnavailableError(_lost_server(
                    uri, f"{exc}; waited {grace:g} s for it to come back", where)) from None
            time.sleep(0.25)


def _rows_text(rows) -> str:
    if isinstance(rows, slice) and rows.stop is not None and rows.step in (None, 1):
        start, stop = rows.start or 0, rows.stop
        return f"point {start}" if stop == start + 1 else f"points {start}..{stop - 1}"
    if isinstance(rows, slice):
        return "points " + ":".join("" if v is None else str(v)
                                    for v in (rows.start, rows.stop, rows.step))
    return f"point {rows}"



#: Reads through an embedded catalog's in-process server (see _ArrayReader._read_catalog).
_EMBEDDED_READ_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Direct:
    """The HDF5 file and dataset whose rows are the rows of a catalog array."""

    path: str  # where this machine opens it (root map applied)
    dataset: str
    document_path: str  # the path the documents name


#: Files already reported as read through tiled instead (one warning per file and process).
_WARNED: set = set()


class _ArrayReader:
    """Array-like view of one data key of a stream, read on demand (for ``da.from_array``).

    Reads rows ``[start:stop]`` from the HDF5 file directly when ``direct`` is
    given and the file opens here, else through the catalog; 2-D images per
    event are given a frame axis of length 1.
    """

    def __init__(self, locator: _Locator, uid: str, stream: str, key: str, shape, dtype,
                 add_frame_axis: bool = False, direct: _Direct | None = None):
        self.locator, self.uid, self.stream, self.key = locator, uid, stream, key
        self.add_frame_axis = add_frame_axis
        self.direct = direct
        shape = tuple(int(n) for n in shape)
        self.stored_shape = shape
        self.shape = (shape[0], 1) + shape[1:] if add_frame_axis else shape
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def _node(self):
        # One metadata walk per process and array, not one per chunk.
        key = (self.locator, self.uid, self.stream, self.key)
        with _CLIENTS_LOCK:
            node = _NODES.get(key)
            if node is None:
                node = _NODES[key] = self.locator.connect()[self.uid][self.stream][self.key]
        return node

    def _read_catalog(self, rows) -> np.ndarray:
        from tiled.client.array import DaskArrayClient

        # tiled's ArrayClient.read() computes a dask array on the default scheduler, which
        # inside a dask worker is the distributed client: build the same dask array
        # (DaskArrayClient.read) and compute it synchronously, by argument.
        if self.locator.kind == "http":
            return self._read_server(rows)
        node = self._node()
        # An embedded catalog's server runs in this process: its HDF5 adapter computes a
        # dask array too, in tiled's own thread, on the default scheduler, which from a
        # read made inside a dask worker is the distributed client (the worker's context
        # reaches that thread); with every worker thread waiting on a read, that compute
        # never runs. Only the process-wide setting reaches tiled's thread, so embedded
        # reads hold it, one at a time per process. Server (HTTP) reads and direct file
        # reads need no guard.
        with _EMBEDDED_READ_LOCK, dask.config.set(scheduler="synchronous"):
            return np.asarray(DaskArrayClient.read(node, rows).compute(scheduler="synchronous"))

    def _read_server(self, rows) -> np.ndarray:
        """Rows through a tiled server; a server that stopped answering is reported as such.

        A server that refuses connections is given :data:`SERVER_GRACE_SECONDS`
        to come back (a restart), then the read fails at once instead of after
        tiled's retries of every request (tens of seconds each).
        """
        import httpx
        from tiled.client.array import DaskArrayClient

        uri = self.locator.uri
        where = f"while the frames of run {self.uid[:8]} ({_rows_text(rows)}) were read"
        _wait_answering(uri, SERVER_GRACE_SECONDS, where)
        try:
            node = self._node()
            return np.asarray(DaskArrayClient.read(node, rows).compute(scheduler="synchronous"))
        except (httpx.TransportError, ConfigError) as exc:
            if isinstance(exc, ConfigError) and "cannot reach" not in str(exc):
                raise
            raise CatalogUnavailableError(_lost_server(uri, f"{type(exc).__name__}: {exc}",
                                                       where)) from None

    def _read_direct(self, rows: slice) -> np.ndarray:
        direct = self.direct
        data = _frames.read_rows(HDF5Rows(direct.path, direct.dataset, rows.start, rows.stop), timeout=0)
        if data.shape[1:] != self.stored_shape[1:] or data.dtype != self.dtype:
            raise FrameReadError(
                f"dataset {direct.dataset!r} of {direct.path!r} holds rows of shape "
                f"{data.shape[1:]} and dtype {data.dtype}, but the catalog describes "
                f"{self.stored_shape[1:]} and {self.dtype}; is the root map pointing at "
                "another file?"
            )
        return data

    def read_rows(self, rows) -> np.ndarray:
        """Rows of the array (an int or a slice), frame axis added: from the file if it opens
        here, else through the catalog."""
        whole = rows
        single = isinstance(rows, (int, np.integer))
        if single:
            n = self.stored_shape[0]
            if not -n <= rows < n:
                raise IndexError(f"index {rows} is out of bounds for {n} points")
            whole = slice(int(rows) % n, int(rows) % n + 1)
        data = direct_error = None
        if self.direct is not None and isinstance(whole, slice) and whole.step in (None, 1):
            whole = slice(*whole.indices(self.stored_shape[0])[:2])
            try:
                data = self._read_direct(whole)
            except DamagedFileError:
                raise  # the catalog reads the same damaged file (and tiled may not say so)
            except FrameReadError as exc:
                direct_error = exc
                if self.direct.path not in _WARNED:
                    _WARNED.add(self.direct.path)
                    logger.warning("reading the frames of run %s through the catalog (slower): "
                                   "%s", self.uid[:8], exc)
        if data is None:
            try:
                data = self._read_catalog(whole)
            except Exception as exc:
                if direct_error is None:
                    raise
                # both ways failed: say why, in an error every Dask worker can send back
                raise FrameReadError(f"{direct_error} Through the catalog it failed too: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if single:
            data = data[0]
        if self.add_frame_axis:
            data = data[np.newaxis] if single else data[:, np.newaxis]
        return data

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        rows = index[0] if index else slice(None)
        data = self.read_rows(rows)
        rest = index[1:]
        if rest:
            lead = (slice(None),) if isinstance(rows, slice) else ()
            data = data[lead + rest]
        return data


@dataclass(frozen=True)
class PointFrames:
    """The frames of one grid point of a catalog run: a small picklable reference.

    ``read_frames()`` reads them (as :func:`crystalmapping.frames.read_frames`
    does for any source), from the HDF5 file when it opens where the task
    runs, else through the catalog. Made by :meth:`Run.frame_sources`.
    """

    reader: _ArrayReader = field(repr=False)
    point: int

    def read_frames(self, timeout: float = 10.0) -> np.ndarray:
        """The point's frames, ``(K, M, N)``."""
        data = self.reader.read_rows(slice(self.point, self.point + 1))
        return data.reshape((-1,) + data.shape[-2:])


def _server_refusal(node) -> str | None:
    """Why a tiled server would not serve the array (None if it serves one value of it).

    One request, not retried (tiled's client retries a refusal with back-off
    for half a minute).
    """
    ndim = len(node.shape)
    params = {"slice": ",".join(["0:1"] * ndim), "expected_shape": ",".join(["1"] * ndim)}
    try:
        response = node.context.http_client.get(
            node.item["links"]["full"], params=params,
            headers={"Accept": "application/octet-stream"})
    except Exception as exc:  # noqa: BLE001 - no answer is a refusal
        return repr(exc)
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return None


#: Parameters of an HDF5 data source under which its array's rows are the dataset's rows.
_PLAIN_HDF5 = frozenset({"dataset", "swmr", "libver", "locking"})


def _within(path: str, roots: Iterable[str]) -> bool:
    """tiled's readable-storage rule: ``path`` lies in one of ``roots``."""
    return any(posixpath.commonpath([root, path]) == root for root in roots)


def direct_reference(catalog: Catalog, uid: str, node, root_map=None) -> _Direct | None:
    """Where the array's rows lie in an HDF5 file that may be read directly, if anywhere.

    The rows of a tiled array are the rows of the dataset of its single
    HDF5 asset when tiled would read nothing else (no ``slice`` or
    ``squeeze``). The file must pass the catalog's own check first: for an
    embedded catalog, lie in its readable storage; for a server, be served
    by it (one small read). Then the root map is applied.
    """
    what = f"run {uid[:8]}: frames read through the catalog"
    try:
        sources = node.data_sources()
    except Exception as exc:  # noqa: BLE001 - an older server, no permission...
        logger.info("%s (no data sources: %r)", what, exc)
        return None
    if len(sources or []) != 1:
        return None
    source = sources[0]
    mimetype = str(source.mimetype or "").split(";")[0].strip()
    parameters = dict(source.parameters or {})
    uris = [a.data_uri for a in source.assets if a.parameter in ("data_uris", "data_uri")]
    if mimetype not in HDF5_MIMETYPES:
        return None  # inline (zarr, in the catalog's own storage) or another format
    if len(uris) != 1 or not parameters.get("dataset") or set(parameters) - _PLAIN_HDF5:
        logger.info("%s (%d files, parameters %s)", what, len(uris), sorted(parameters))
        return None
    try:
        path = posixpath.normpath(path_from_uri(uris[0]))
    except ScanError as exc:
        logger.info("%s (%s)", what, exc)
        return None
    if catalog.is_embedded:
        roots = catalog.readable_roots()
        if not _within(path, roots):
            logger.warning(
                "%s: %s lies outside the catalog's readable storage %s, so tiled will "
                "refuse it too; add its directory with --readable-storage.", what, path,
                roots)
            return None
    else:
        refusal = _server_refusal(node)
        if refusal:
            logger.warning("%s: the server did not serve one value of %s (%s); check its "
                           "readable_storage.", what, path, refusal)
            return None
    mapping = catalog.root_map if root_map is None else parse_root_map(root_map)
    dataset = parameters["dataset"]
    if not isinstance(dataset, str):  # tiled accepts the path as a list of names too
        dataset = "/".join(str(part) for part in dataset)
    return _Direct(map_root(path, mapping), dataset, path)
