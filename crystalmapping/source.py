"""Source: bluesky runs from a tiled catalog, as lazy xarray/dask datasets.

Only this module knows tiled. A catalog is either

* **embedded**: a directory holding a SQLite catalog (``catalog.db``), its
  writable storage (``data/``, ``tabular.db``) and detector files
  (``detector/``), opened in-process; given as ``sqlite:///DIR/catalog.db``,
  as ``DIR``, or nothing (the per-user default, see :func:`default_catalog_dir`);
* **a tiled server**: ``http://host:port`` with an API key (``api_key=`` or the
  ``TILED_API_KEY`` environment variable, tiled's own convention).

:meth:`Run.to_dataset` gives the primary stream as an ``xarray.Dataset`` of
dask arrays; each chunk is read by a small picklable reader that reconnects to
the catalog in whichever process runs it, so the same graph runs on threads,
on a ``LocalCluster`` of processes, or on a remote scheduler (an in-process
tiled context itself cannot be pickled). :meth:`Run.frame_sources` gives the
same reads as one small reference per grid point (what the batch pipeline
sends to its tasks).

Reading at disk speed. When the detector frames are external HDF5 (written
by StreamResource/StreamDatum documents, one file per data source) the
readers open the file themselves with h5py, in the process that runs the
task, instead of asking tiled for the bytes (a request per point, through the
server's whole stack). A file is read directly only when tiled itself would
serve it: for an embedded catalog, when it lies in the catalog's readable
storage (tiled's own rule); for a server, when the server answered one read
of it. Then the *root map* of the catalog (``Catalog(root_map=...)``) says
where this machine sees it. If the file cannot be opened where the task runs
(not mounted there, a filter missing...), the rows are read through tiled as
before, with one warning per file and process. Inline frames are always read
through tiled.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import dask
import numpy as np
import xarray as xr

from .errors import ConfigError, CrystalMappingError, ScanError
from .frames import (HDF5_MIMETYPES, FrameReadError, HDF5Rows, RootMap, map_root, parse_root_map,
                     path_from_uri, read_rows)
from .grid import Grid

__all__ = ["Catalog", "Run", "PointFrames", "open_catalog", "open_run", "default_catalog_dir",
           "IMAGE_DIMS", "CatalogUnavailableError", "SERVER_GRACE_SECONDS"]

logger = logging.getLogger(__name__)

#: Dimensions of the image variable of :meth:`Run.to_dataset`: grid point
#: (acquisition order), frame within the point, detector row, detector column.
IMAGE_DIMS = ("point", "frame", "pixel_y", "pixel_x")

#: How long a read waits for a tiled server that refuses connections to come back
#: (a restart) before it gives up with :class:`CatalogUnavailableError`.
SERVER_GRACE_SECONDS = 10.0


class CatalogUnavailableError(CrystalMappingError, ConnectionError):
    """The tiled server of a catalog stopped answering while frames were read from it."""


_BLUESKY_SPECS = [{"name": "CatalogOfBlueskyRuns", "version": "3.0"}]


def default_catalog_dir() -> Path:
    """The per-user embedded catalog: ``$CRYSTALMAPPING_CATALOG``, else
    ``$XDG_DATA_HOME/crystalmapping/catalog`` (``~/.local/share/...``)."""
    if os.environ.get("CRYSTALMAPPING_CATALOG"):
        return Path(os.environ["CRYSTALMAPPING_CATALOG"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "crystalmapping" / "catalog"


# ----------------------------------------------------------------------------- locator


@dataclass(frozen=True)
class _Locator:
    """How to reach a catalog from any process (picklable; the API key is never shown)."""

    kind: str  # "embedded" or "http"
    uri: str  # directory of an embedded catalog, or the server URL
    readable_storage: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False, compare=False)

    def connect(self, *, create: bool = False):
        """A tiled client of the catalog root, cached per process."""
        key = (self.kind, self.uri, self.readable_storage, self.api_key)
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = self._open(create=create)
                _CLIENTS[key] = client
            return client

    def _open(self, *, create: bool):
        from tiled.client import from_context, from_uri

        if self.kind == "http":
            _check_reachable(self.uri)  # seconds, not tiled's retries with back-off
            try:
                return from_uri(self.uri, api_key=self.api_key)
            except Exception as exc:
                if type(exc).__name__ not in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
                    raise
                raise ConfigError(
                    f"cannot reach the tiled server at {self.uri} ({type(exc).__name__}: "
                    f"{exc}). Check the address and port, that the server runs "
                    "(tiled serve ...), and that this machine may connect to it."
                ) from None
        import tiled.catalog
        from tiled.client.context import Context
        from tiled.server.app import build_app

        directory = Path(self.uri)
        if not create and not (directory / "catalog.db").exists():
            raise ConfigError(
                f"no catalog at {str(directory)!r} (no catalog.db there). Give the directory "
                "or sqlite:///DIR/catalog.db of an existing catalog, or simulate a scan into "
                "it first (crystalmapping simulate --catalog DIR)."
            )
        for sub in ("data", "detector"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # tiled's in-process client warns about its own starlette test client on
            # every open (not a DeprecationWarning subclass); nothing for our users to do.
            warnings.simplefilter("ignore")
            tree = tiled.catalog.from_uri(
                f"sqlite:///{directory / 'catalog.db'}",
                specs=_BLUESKY_SPECS,
                init_if_not_exists=create,
                writable_storage=[str(directory / "data"), f"sqlite:///{directory / 'tabular.db'}"],
                readable_storage=[str(directory / "detector"), *self.readable_storage],
            )
            context = Context.from_app(build_app(tree, serialization_registry=_serializers()))
        return from_context(context)


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise a ConfigError now if nothing accepts a connection at the server's host and port."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the tiled server at {uri} ({exc}). Check the address and port, "
            "that the server runs (tiled serve ...), and that this machine may connect to it."
        ) from None


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


_CLIENTS: dict = {}
_NODES: dict = {}
_CLIENTS_LOCK = threading.RLock()
#: Reads through an embedded catalog's in-process server (see _ArrayReader._read_catalog).
_EMBEDDED_READ_LOCK = threading.Lock()


def _serializers():
    """tiled's serializers plus bluesky's JSON-seq document exporter for runs."""
    from tiled.media_type_registration import default_serialization_registry as registry

    try:
        from bluesky_tiled_plugins.exporters import json_seq_exporter

        registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    except Exception:  # pragma: no cover - optional exporter
        logger.debug("json-seq exporter not registered", exc_info=True)
    return registry


def _locator(uri: str | os.PathLike | None, api_key: str | None,
             readable_storage: Iterable[str | os.PathLike]) -> _Locator:
    storage = tuple(str(Path(p).absolute()) for p in readable_storage)
    if uri is None:
        return _Locator("embedded", str(default_catalog_dir().absolute()), storage)
    text = str(uri)
    if text.startswith(("http://", "https://")):
        return _Locator("http", text.rstrip("/"), storage,
                        api_key or os.environ.get("TILED_API_KEY"))
    if text.startswith("sqlite:///"):
        path = Path(text[len("sqlite:///"):])
        if path.suffix != ".db":
            raise ConfigError(
                f"an embedded catalog URI must name its .db file (sqlite:///DIR/catalog.db), "
                f"got {text!r}."
            )
        return _Locator("embedded", str(path.parent.absolute()), storage)
    if "://" in text:
        raise ConfigError(
            f"catalog must be sqlite:///DIR/catalog.db, a directory, or a tiled server "
            f"http(s)://host:port; got {text!r}. For PostgreSQL, serve the catalog with "
            "'tiled serve config' and give its URL."
        )
    return _Locator("embedded", str(Path(text).expanduser().absolute()), storage)


# ----------------------------------------------------------------------------- catalog


class Catalog:
    """A catalog of bluesky runs: read runs, and insert documents.

    Parameters
    ----------
    uri : str or path, optional
        ``sqlite:///DIR/catalog.db``, a directory, or ``http(s)://host:port``
        of a tiled server. Default: :func:`default_catalog_dir`.
    api_key : str, optional
        API key of a tiled server (default: ``$TILED_API_KEY``). Never printed.
    readable_storage : list of paths
        Extra directories an embedded catalog may read detector files from
        (``DIR/detector`` always is).
    create : bool
        Create an embedded catalog that does not exist yet.
    root_map : dict or list of "OLD=NEW", optional
        Where this machine (and its Dask workers) sees the directories the
        documents name: ``{"/old/root": "/new/root"}``, as event-model's
        ``root_map``. Used when detector files are read directly.

    Examples
    --------
    >>> DB = Catalog("sqlite:///tmp/cat/catalog.db")   # doctest: +SKIP
    >>> run = DB[uid]; run.start["shape"]              # doctest: +SKIP
    """

    def __init__(self, uri: str | os.PathLike | None = None, *, api_key: str | None = None,
                 readable_storage: Iterable[str | os.PathLike] = (), create: bool = True,
                 root_map: Mapping[str, str] | Iterable[str] | None = None):
        self._locator = _locator(uri, api_key, readable_storage)
        self._create = create
        self._writer = None
        self.root_map: RootMap = parse_root_map(root_map)

    def __repr__(self) -> str:
        return f"Catalog({self.uri!r})"

    @property
    def uri(self) -> str:
        """The catalog's address (without any key)."""
        if self._locator.kind == "http":
            return self._locator.uri
        return f"sqlite:///{Path(self._locator.uri) / 'catalog.db'}"

    @property
    def is_embedded(self) -> bool:
        return self._locator.kind == "embedded"

    @property
    def directory(self) -> Path | None:
        """Directory of an embedded catalog (None for a server)."""
        return Path(self._locator.uri) if self.is_embedded else None

    @property
    def detector_dir(self) -> Path | None:
        """Where detector files readable by an embedded catalog may be written."""
        return self.directory / "detector" if self.is_embedded else None

    def readable_roots(self) -> list[str]:
        """The directories an embedded catalog serves files from (its readable storage)."""
        directory = Path(self._locator.uri)
        roots = [directory / "detector", directory / "data", *self._locator.readable_storage]
        return [posixpath.normpath(str(Path(r).absolute())) for r in roots]

    @property
    def client(self):
        """The tiled client of the catalog root."""
        return self._locator.connect(create=self._create)

    def __getitem__(self, key: str | int) -> "Run":
        """A run by uid, partial uid, scan_id or position (``-1``: the latest)."""
        try:
            node = self.client[key]
        except KeyError:
            raise KeyError(
                f"no run {key!r} in {self.uri}; list the uids with "
                "crystalmapping.open_catalog(...).uids()."
            ) from None
        return Run(self, node)

    def __len__(self) -> int:
        return len(self.client)

    def uids(self) -> list[str]:
        """Uids of the runs, oldest first."""
        return list(self.client)

    def insert(self, name: str, doc: dict) -> None:
        """Write one bluesky document into the catalog (with bluesky's ``TiledWriter``).

        This is the ``DB.insert`` of the tutorial: subscribe it to a callback or
        a ``RunEngine`` to record runs. Events are written in batches of 100
        (and at the stop document), so a reader sees a live run grow by batches.
        """
        if self._writer is None:
            self._writer = self._tiled_writer(batch_size=100)
        self._writer(name, doc)

    def _tiled_writer(self, **kwargs):
        from bluesky_tiled_plugins import TiledWriter

        return TiledWriter(self.client, **kwargs)

    def ingest(self, documents: Iterable[tuple[str, dict]]) -> str:
        """Write a whole document stream in batches; return the run's uid.

        Unlike :meth:`insert` (one write per document, for live runs), events
        are written in batches, which is many times faster for a stored run.
        """
        uid = None
        writer = self._tiled_writer()
        for name, doc in documents:
            if name == "start":
                uid = doc["uid"]
            writer(name, doc)
        if uid is None:
            raise ScanError("the document stream held no start document.")
        return uid


def open_catalog(uri: str | os.PathLike | None = None, *, api_key: str | None = None,
                 readable_storage: Iterable[str | os.PathLike] = (),
                 root_map: Mapping[str, str] | Iterable[str] | None = None) -> Catalog:
    """Open (or create, if embedded) a catalog; see :class:`Catalog`."""
    return Catalog(uri, api_key=api_key, readable_storage=readable_storage, root_map=root_map)


def open_run(uri: str | os.PathLike | None, uid: str | int, *, api_key: str | None = None,
             readable_storage: Iterable[str | os.PathLike] = (),
             root_map: Mapping[str, str] | Iterable[str] | None = None) -> "Run":
    """Open one run of a catalog by uid, partial uid, scan_id or position.

    ``root_map`` (``{"/old/root": "/new/root"}``) says where this machine sees
    the detector files the documents name; see :class:`Catalog`.

    Examples
    --------
    >>> run = open_run("sqlite:///data/catalog.db", "3f2a")     # doctest: +SKIP
    >>> ds = run.to_dataset("dexela_image")                      # doctest: +SKIP
    """
    return Catalog(uri, api_key=api_key, readable_storage=readable_storage, create=False,
                   root_map=root_map)[uid]


# ----------------------------------------------------------------------------- run


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
        if self.locator.kind != "embedded":
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
        data = read_rows(HDF5Rows(direct.path, direct.dataset, rows.start, rows.stop), timeout=0)
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


class Run:
    """One bluesky run of a :class:`Catalog`.

    Attributes
    ----------
    uid : str
    start, stop : dict
        The start and stop documents (``stop`` is empty while the run is open).
    tiled : tiled client
        The underlying tiled node, for anything else.
    """

    def __init__(self, catalog: Catalog, node):
        self.catalog = catalog
        self.tiled = node
        metadata = node.metadata
        self.start: dict = dict(metadata.get("start") or {})
        self.stop: dict = dict(metadata.get("stop") or {})
        self.uid: str = self.start.get("uid", "")

    def __repr__(self) -> str:
        return f"<Run {self.uid[:8]} scan_id={self.start.get('scan_id')} in {self.catalog.uri}>"

    @property
    def grid(self) -> Grid:
        """The scan grid from the start document."""
        return Grid.from_start(self.start)

    def streams(self) -> list[str]:
        return list(self.tiled)

    def to_dataset(self, data_key: str | None = "dexela_image", *, stream: str = "primary",
                   points_per_chunk: int = 1) -> xr.Dataset:
        """The stream as an ``xarray.Dataset`` of dask arrays; nothing is read.

        Parameters
        ----------
        data_key : str, optional
            The detector image key. Its variable has dims
            :data:`IMAGE_DIMS` ``(point, frame, pixel_y, pixel_x)`` and
            ``points_per_chunk`` points per chunk (a 2-D image per event gets a
            ``frame`` axis of length 1). None: no image is checked.
        stream : str
        points_per_chunk : int
            Points per chunk of the image variable (the last chunk may be smaller).

        Returns
        -------
        ds : xarray.Dataset
            Every data key of the stream on dim ``point`` (other array keys get
            dims ``<key>_dim_<i>``), coordinates ``seq_num``, ``time``, and ``row``,
            ``col`` (grid indices, snaking undone) when the start document has a
            2-D grid; ``attrs`` hold the start document (``uid``, ``shape``,
            ``extents``, ``snaking``, ``motors``...). Frames in external HDF5
            files are read from the files where they open (see the module's
            notes), else through the catalog.
        """
        import dask.array as da
        from dask.base import tokenize

        if stream not in self.tiled:
            raise ScanError(f"run {self.uid[:8]} has no stream {stream!r}; it has {self.streams()}.")
        node = self.tiled[stream]
        keys = [k for k in node if not k.startswith("ts_")]
        if data_key is not None and data_key not in keys:
            raise ScanError(
                f"run {self.uid[:8]} has no data key {data_key!r} in stream {stream!r}; "
                f"its keys are {sorted(keys)}. Pass --data-key with one of them."
            )
        if points_per_chunk < 1:
            raise ConfigError(f"points_per_chunk must be >= 1, got {points_per_chunk}.")
        locator = self.catalog._locator
        variables, coords = {}, {}
        for key in keys:
            child = node[key]
            shape, dtype = tuple(child.shape), child.dtype
            is_image = key == data_key
            if is_image and len(shape) not in (3, 4):
                raise ScanError(
                    f"data key {data_key!r} must hold one (M, N) image or (K, M, N) frames per "
                    f"event, got per-event shape {shape[1:]}."
                )
            reader = _ArrayReader(locator, self.uid, stream, key, shape, dtype,
                                  add_frame_axis=is_image and len(shape) == 3,
                                  direct=self._direct(child) if is_image else None)
            chunks = ((points_per_chunk,) + reader.shape[1:]) if is_image else reader.shape
            name = f"{key}-{tokenize(locator.kind, locator.uri, self.uid, stream, key, reader.shape, chunks)}"
            arr = da.from_array(reader, chunks=chunks, name=name, lock=False, asarray=False,
                                meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
                                inline_array=False)
            dims = IMAGE_DIMS if is_image else ("point",) + tuple(
                f"{key}_dim_{i}" for i in range(1, reader.ndim))
            if key in ("seq_num", "time"):
                coords[key] = (dims, arr)
            else:
                variables[key] = (dims, arr)
        ds = xr.Dataset(variables, coords=coords, attrs=dict(self.start))
        try:
            grid = Grid.from_start(self.start)
        except ScanError:
            grid = None
        if grid is not None:
            n = ds.sizes.get("point", 0)
            if n <= grid.size:
                row, col = grid.indices(np.arange(n))
                ds = ds.assign_coords(row=("point", row), col=("point", col))
        return ds

    def frame_sources(self, data_key: str = "dexela_image", *, stream: str = "primary",
                      root_map: Mapping[str, str] | Iterable[str] | None = None
                      ) -> list[PointFrames]:
        """One small picklable reference per grid point (acquisition order) to its frames.

        ``crystalmapping.frames.read_frames(source)`` reads a point's
        ``(K, M, N)`` frames wherever it runs: from the HDF5 file when the
        frames are external and the file opens there (with the catalog's root
        map, or ``root_map`` if given), else through the catalog. The batch
        pipeline sends these to its tasks instead of arrays.

        Examples
        --------
        >>> sources = run.frame_sources("dexela_image")           # doctest: +SKIP
        >>> read_frames(sources[3]).shape                          # doctest: +SKIP
        (2, 3888, 3072)
        """
        if stream not in self.tiled:
            raise ScanError(f"run {self.uid[:8]} has no stream {stream!r}; it has {self.streams()}.")
        node = self.tiled[stream]
        if data_key not in node:
            keys = sorted(k for k in node if not k.startswith("ts_"))
            raise ScanError(
                f"run {self.uid[:8]} has no data key {data_key!r} in stream {stream!r}; "
                f"its keys are {keys}. Pass --data-key with one of them."
            )
        child = node[data_key]
        shape = tuple(child.shape)
        if len(shape) not in (3, 4):
            raise ScanError(
                f"data key {data_key!r} must hold one (M, N) image or (K, M, N) frames per "
                f"event, got per-event shape {shape[1:]}."
            )
        reader = _ArrayReader(self.catalog._locator, self.uid, stream, data_key, shape,
                              child.dtype, add_frame_axis=len(shape) == 3,
                              direct=self._direct(child, root_map))
        return [PointFrames(reader, i) for i in range(shape[0])]

    def _direct(self, node, root_map=None) -> _Direct | None:
        """Where the array's rows lie in an HDF5 file that may be read directly, if anywhere.

        The rows of a tiled array are the rows of the dataset of its single
        HDF5 asset when tiled would read nothing else (no ``slice`` or
        ``squeeze``). The file must pass the catalog's own check first: for an
        embedded catalog, lie in its readable storage; for a server, be served
        by it (one small read). Then the root map is applied.
        """
        what = f"run {self.uid[:8]}: frames read through the catalog"
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
        if self.catalog.is_embedded:
            roots = self.catalog.readable_roots()
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
        mapping = self.catalog.root_map if root_map is None else parse_root_map(root_map)
        dataset = parameters["dataset"]
        if not isinstance(dataset, str):  # tiled accepts the path as a list of names too
            dataset = "/".join(str(part) for part in dataset)
        return _Direct(map_root(path, mapping), dataset, path)

    # The tutorial's name for the same thing.
    def xarray_dask(self, data_key: str | None = "dexela_image", **kwargs) -> xr.Dataset:
        """Alias of :meth:`to_dataset` (the tutorial's ``run.xarray_dask()``)."""
        return self.to_dataset(data_key, **kwargs)

    def documents(self, fill: bool = False) -> Iterator[tuple[str, dict]]:
        """The run's bluesky documents, as stored (``fill`` is accepted for the tutorial's call)."""
        yield from self.tiled.documents(fill=fill) if fill else self.tiled.documents()
