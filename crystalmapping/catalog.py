"""Catalog: where bluesky runs are kept; read runs and insert documents.

:class:`Catalog` opens any address :mod:`crystalmapping.address` knows (an
embedded directory, a tiled server URL, a tiled profile), reads runs
(:class:`crystalmapping.source.Run`) and inserts documents. Its address
travels to Dask workers as the small picklable locator of that module.
"""

from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from .address import _locator, default_catalog_dir
from .errors import ScanError
from .references import RootMap, parse_root_map

if TYPE_CHECKING:
    from .source import Run

__all__ = ["Catalog", "open_catalog", "open_run", "default_catalog_dir"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- catalog


class Catalog:
    """A catalog of bluesky runs: read runs, and insert documents.

    Parameters
    ----------
    uri : str or path, optional
        ``sqlite:///DIR/catalog.db``, a directory, ``http(s)://host:port`` of
        a tiled server with the path of a container of runs inside it if they
        are not at its root (``http://host:port/xpd/raw``, or tiled's
        ``http://host:port/api/v1/metadata/xpd/raw``), or a tiled profile
        ``profile:NAME[/xpd/raw]``. Default: :func:`default_catalog_dir`.
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
        """The catalog's address (without any key), as :class:`Catalog` accepts it."""
        return self._locator.display()

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
        from .source import Run

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

        # Every array of an event goes to an array node of its own: the writer otherwise
        # puts arrays of up to 16 values in the run's SQL table, which takes only 1-D ones
        # (the 4 x 4 map of a derived run failed there, after its start was written).
        kwargs.setdefault("max_array_size", 0)
        return TiledWriter(self.client, **kwargs)

    def ingest(self, documents: Iterable[tuple[str, dict]]) -> str:
        """Write a whole document stream in batches; return the run's uid.

        Unlike :meth:`insert` (one write per document, for live runs), events
        are written in batches, which is many times faster for a stored run.
        A stream that fails after its start was written is closed with a
        stop document (``exit_status="fail"``, the error as its ``reason``),
        so the catalog does not keep a run that looks as if it were still
        going; the error is raised.
        """
        uid = start = None
        stopped = False
        streams: dict[str, str] = {}  # descriptor uid -> stream name
        written: dict[str, int] = {}  # events written per stream
        writer = self._tiled_writer()
        try:
            for name, doc in documents:
                if name == "start":
                    uid, start = doc["uid"], doc
                stopped = stopped or name == "stop"
                writer(name, doc)
                if name == "descriptor":
                    streams[doc["uid"]] = doc.get("name", "primary")
                elif name in ("event", "event_page"):
                    stream = streams.get(doc["descriptor"], "primary")
                    n = 1 if name == "event" else len(doc["seq_num"])
                    written[stream] = written.get(stream, 0) + n
        except Exception as exc:
            if start is not None and not stopped:
                _close_failed(writer, start, written, exc)
            raise
        if uid is None:
            raise ScanError("the document stream held no start document.")
        return uid


def _close_failed(writer, start: dict, written: dict, exc: BaseException) -> None:
    """Write a ``fail`` stop for the run ``start`` opened (``written``: its events per stream),
    after ``exc`` stopped its stream."""
    import event_model

    reason = f"the run's documents could not all be written: {type(exc).__name__}: {exc}"
    try:
        # event-model's counters hold each stream's next seq_num
        counters = {stream: n + 1 for stream, n in written.items()}
        writer("stop", event_model.compose_stop(start=start, event_counters=counters,
                                                poison_pill=[], exit_status="fail",
                                                reason=reason))
    except Exception:  # noqa: BLE001 - the first error is the one to raise
        logger.exception("could not close the failed run %s with a stop document", start["uid"])


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
