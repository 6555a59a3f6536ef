"""Catalog addresses: what a user names, as a locator any process can connect with.

A catalog is either

* **embedded**: a directory holding a SQLite catalog (``catalog.db``), its
  writable storage (``data/``, ``tabular.db``) and detector files
  (``detector/``), opened in-process; given as ``sqlite:///DIR/catalog.db``,
  as ``DIR``, or nothing (the per-user default, see :func:`default_catalog_dir`);
* **a tiled server**: ``http://host:port`` with an API key (``api_key=`` or the
  ``TILED_API_KEY`` environment variable, tiled's own convention), optionally
  with the path of a container of runs inside it: ``http://host:port/xpd/raw``
  or tiled's own form ``http://host:port/api/v1/metadata/xpd/raw`` (a server
  under a URL prefix needs tiled's form: ``https://host/prefix/api/v1/metadata/xpd/raw``);
* **a tiled profile**: ``profile:NAME`` or ``profile:NAME/xpd/raw``, what
  ``tiled.client.from_profile(NAME)["xpd"]["raw"]`` opens. Profiles are YAML
  files in tiled's profile directories (``$TILED_PROFILES``, else
  ``~/.config/tiled/profiles``, and the site and environment ones; ``tiled
  profile paths`` lists them).

:func:`locator` turns an address into a small picklable :class:`Locator`
that reconnects, once per process, wherever it runs (an in-process tiled
context itself cannot be pickled); :mod:`crystalmapping.catalog` holds one.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

__all__ = ["default_catalog_dir", "tiled_profiles"]

logger = logging.getLogger(__name__)

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

    kind: str  # "embedded", "http", or "profile" (an in-process server of a tiled profile)
    uri: str  # directory of an embedded catalog, the server's root URL, or the profile name
    readable_storage: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False, compare=False)
    path: tuple[str, ...] = ()  # the container of runs inside the server or profile
    profile: str | None = None  # the tiled profile the address came from, if any
    verify: bool = True  # of a profile: verify the server's TLS certificate
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # of a profile

    def connect(self, *, create: bool = False):
        """A tiled client of the catalog (the container of runs), cached per process."""
        key = (self.kind, self.uri, self.readable_storage, self.api_key, self.path,
               self.verify, self.headers)
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = _walk(self._open(create=create), self.path, self.display())
                _CLIENTS[key] = client
            return client

    def display(self) -> str:
        """The address as a user gives it (never the key)."""
        inside = "/".join(self.path)
        if self.profile is not None:
            return f"profile:{self.profile}" + (f"/{inside}" if inside else "")
        if self.kind == "http":
            if not inside:
                return self.uri
            from urllib.parse import urlsplit

            if urlsplit(self.uri).path.strip("/"):  # a server under a prefix: tiled's form
                return f"{self.uri}/api/v1/metadata/{inside}"
            return f"{self.uri}/{inside}"
        if self.kind == "profile":
            return f"profile:{self.uri}"
        return f"sqlite:///{Path(self.uri) / 'catalog.db'}"

    def _open(self, *, create: bool):
        if self.kind == "profile":
            from tiled.client import from_profile

            kwargs = {"api_key": self.api_key} if self.api_key else {}
            return from_profile(self.uri, **kwargs)
        if self.kind == "http":
            _check_reachable(self.uri)  # seconds, not tiled's retries with back-off
            from tiled.client import from_uri

            try:
                return from_uri(self.uri, api_key=self.api_key, verify=self.verify,
                                headers=dict(self.headers) or None)
            except Exception as exc:
                if type(exc).__name__ not in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
                    raise
                raise ConfigError(
                    f"cannot reach the tiled server at {self.uri} ({type(exc).__name__}: "
                    f"{exc}). Check the address and port, that the server runs "
                    "(tiled serve ...), and that this machine may connect to it."
                ) from None
        directory = Path(self.uri)
        if not create and not (directory / "catalog.db").exists():  # before seconds of imports
            raise ConfigError(
                f"no catalog at {str(directory)!r} (no catalog.db there). Give the directory "
                "or sqlite:///DIR/catalog.db of an existing catalog, or simulate a scan into "
                "it first (crystalmapping simulate --catalog DIR)."
            )
        import tiled.catalog
        from tiled.client import from_context
        from tiled.client.context import Context
        from tiled.server.app import build_app

        for sub in ("data", "detector"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        _quiet_library_noise()
        if create:
            _initialize(f"sqlite:///{directory / 'catalog.db'}")
        tree = tiled.catalog.from_uri(
            f"sqlite:///{directory / 'catalog.db'}",
            specs=_BLUESKY_SPECS,
            init_if_not_exists=False,
            writable_storage=[str(directory / "data"), f"sqlite:///{directory / 'tabular.db'}"],
            readable_storage=[str(directory / "detector"), *self.readable_storage],
        )
        context = Context.from_app(build_app(tree, serialization_registry=_serializers()))
        return from_context(context)


#: What the libraries under an embedded catalog say about themselves on every open or
#: request, with nothing for our users to do: starlette's test client, which tiled's
#: in-process client is built on, and alembic, which stamps a new catalog's schema.
_LIBRARY_NOISE = (
    (r"Using `httpx` with `starlette\.testclient` is deprecated", UserWarning),
    (r"You should not use the 'timeout' argument with the TestClient", UserWarning),
    (r"No path_separator found in configuration", DeprecationWarning),
)


def _quiet_library_noise() -> None:
    """Ignore :data:`_LIBRARY_NOISE` from now on, in the whole process.

    Filters added (once; again if a ``catch_warnings`` block dropped them), not
    ``warnings.catch_warnings()`` around the open: before Python 3.14 the
    filters are the whole process's, so that would drop what other threads
    (Dask workers, the catalog's server) warn meanwhile, and its restore could
    undo another thread's filters.
    """
    present = {f[1].pattern for f in warnings.filters if f[1] is not None}
    for message, category in _LIBRARY_NOISE:
        if message not in present:
            warnings.filterwarnings("ignore", message=message, category=category)


_INITIALIZED: set = set()


def _initialize(uri: str) -> None:
    """Create a new catalog's tables and stamp alembic's head, unless it has them.

    What ``tiled catalog init --if-not-exists`` does, done in this process:
    tiled's own ``init_if_not_exists`` starts a new Python for it on every
    open, seconds of imports each time. It runs in a thread of its own, where
    no event loop runs (a notebook's main thread has one).
    """
    if uri in _INITIALIZED:
        return

    def setup():
        import asyncio

        from sqlalchemy.ext.asyncio import create_async_engine
        from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
        from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
        from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION, initialize_database
        from tiled.utils import ensure_specified_sql_driver

        database = ensure_specified_sql_driver(uri)

        async def create() -> bool:
            engine = create_async_engine(database)
            try:
                await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
                return False
            except UninitializedDatabase:
                await initialize_database(engine)
                return True
            finally:
                await engine.dispose()

        if asyncio.run(create()):
            stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, database)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="catalog-init") as pool:
        pool.submit(setup).result()
    _INITIALIZED.add(uri)


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

def _walk(root, path: tuple[str, ...], address: str):
    """The container at ``path`` inside ``root``; a missing part is named, with what is there."""
    import itertools

    node = root
    for i, part in enumerate(path):
        where = "the root" if i == 0 else repr("/".join(path[:i]))
        try:
            child = node[part]
        except (KeyError, TypeError):
            try:
                keys = list(itertools.islice(iter(node), 21))
            except Exception:  # noqa: BLE001 - the listing is only a hint
                keys = []
            shown = ", ".join(repr(k) for k in keys[:20]) + (", ..." if len(keys) > 20 else "")
            raise ConfigError(
                f"catalog {address}: there is no {part!r} in {where} of the catalog"
                f"{f' (it holds {shown})' if keys else ' (it is empty or not a container)'}."
                " Check the path after the server address or profile name."
            ) from None
        node = child
    specs = {getattr(s, "name", s) for s in (getattr(node, "specs", None) or [])}
    if path and "BlueskyRun" in specs:
        raise ConfigError(
            f"catalog {address} is a run, not a catalog of runs: give the address of the "
            f"container holding it ({'/'.join(path[:-1]) or 'the root'}) and its uid "
            f"({path[-1]}) with --uid."
        )
    if path and getattr(node, "structure_family", "container") != "container":
        raise ConfigError(f"catalog {address} is a {node.structure_family}, not a container "
                          "of runs.")
    return node


_CLIENTS: dict = {}
_NODES: dict = {}
_CLIENTS_LOCK = threading.RLock()


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
    api_key = api_key or os.environ.get("TILED_API_KEY")
    if text.startswith("profile:"):
        return _profile_locator(text, api_key, storage)
    if text.startswith(("http://", "https://")):
        server, path, key = _split_server_url(text)
        return _Locator("http", server, storage, api_key or key, path)
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
            f"catalog must be sqlite:///DIR/catalog.db, a directory, a tiled server "
            f"http(s)://host:port[/PATH], or a tiled profile profile:NAME[/PATH]; got "
            f"{text!r}. For PostgreSQL, serve the catalog with 'tiled serve config' and give "
            "its URL."
        )
    return _Locator("embedded", str(Path(text).expanduser().absolute()), storage)


def _split_server_url(text: str) -> tuple[str, tuple[str, ...], str | None]:
    """``(server root URL, path of the container inside it, api_key of the query)``.

    ``http://h:8000/api/v1/metadata/xpd/raw`` (tiled's form; everything before
    ``/api`` is the server's prefix) and ``http://h:8000/xpd/raw`` (a server at
    the host's root) both give ``("http://h:8000", ("xpd", "raw"), None)``.
    """
    from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

    parts = urlsplit(text)
    key = (parse_qs(parts.query).get("api_key") or [None])[0]
    path = parts.path
    at = path.find("/api")
    if at >= 0 and path[at + 4:at + 5] in ("", "/"):
        prefix, rest = path[:at], [p for p in path[at + 4:].split("/") if p]
        if rest[:1] == ["v1"]:
            rest = rest[1:]
        if rest and rest[0] != "metadata":
            raise ConfigError(f"a tiled URL with /api must name a container as "
                              f"/api/v1/metadata/PATH; got {text!r}.")
        inside = "/".join(rest[1:])
    else:
        prefix, inside = "", path
    segments = tuple(unquote(p) for p in inside.split("/") if p)
    server = urlunsplit((parts.scheme, parts.netloc, prefix.rstrip("/"), "", "")).rstrip("/")
    return server, segments, key


def tiled_profiles() -> dict:
    """tiled's profiles, read now from its profile directories: name -> (file, content)."""
    import tiled.profiles as profiles

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a broken file is skipped (tiled warns), not fatal
        return profiles.resolve_precedence(profiles.gather_profiles(profiles.paths, strict=False))


def _profile_locator(text: str, api_key: str | None, storage) -> _Locator:
    """The locator of ``profile:NAME[/PATH]``: the profile's server with the path inside it."""
    import tiled.profiles

    name, _, inside = text[len("profile:"):].partition("/")
    segments = tuple(p for p in inside.split("/") if p)
    if not name:
        raise ConfigError(f"a profile address is profile:NAME or profile:NAME/PATH; got {text!r}.")
    found = tiled_profiles()
    if name not in found:
        where = ", ".join(str(p) for p in tiled.profiles.paths)
        raise ConfigError(
            f"no tiled profile {name!r}; the profiles found are "
            f"{sorted(found) or 'none'} (in {where}). Write one, e.g. a file "
            f"{name}.yml holding '{name}: {{uri: http://tiled.example.org:8000}}' in "
            "~/.config/tiled/profiles or in the directory $TILED_PROFILES names."
        )
    filepath, content = found[name]
    if "uri" in content:
        server, path, key = _split_server_url(str(content["uri"]))
        headers = tuple(sorted((str(k), str(v)) for k, v in (content.get("headers") or {}).items()))
        return _Locator("http", server, storage, api_key or key, path + segments, profile=name,
                        verify=bool(content.get("verify", True)), headers=headers)
    # an in-process server the profile configures ("direct:"): each process opens it itself
    return _Locator("profile", name, storage, api_key, segments, profile=name)
