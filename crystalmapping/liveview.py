"""Live view: a web page of the runs a live server maps (``crystalmapping serve --http``).

A browser opens ``http://HOST:PORT/`` with nothing installed and sees:

* every run the server has seen, and the stores already in ``--out-dir``: state
  (running, finished, aborted, interrupted...), points measured / expected,
  lag and latency;
* for the selected run (by default the one in flight, else the latest): one
  panel per map, coloured by grain, growing as partial maps are written; the
  total intensity of the points so far; the linked peaks of the latest point
  on the detector (:mod:`crystalmapping.livefigures`).

The page polls ``/api/runs`` and ``/api/runs/<uid>`` once a second and swaps
the ``<img>`` sources when a store was rewritten (the URLs carry the store's
version, so the browser fetches each PNG once). The PNGs are drawn here with
matplotlib from the stores on disk, once per write of a store, one at a time;
the page only reads what the server writes anyway (stores, the report
records), so it cannot slow the processing down beyond that.

Security: the page binds to loopback by default; another address is refused
unless an API key is set (``--http-api-key`` or ``CRYSTALMAPPING_HTTP_API_KEY``),
which every request must then carry (``Authorization: Bearer KEY``,
``X-API-Key: KEY``, or ``?key=KEY`` once, which sets a cookie). Uids in URLs
are checked with :func:`crystalmapping.trust.check_uid`, and only stores
directly inside the output directory are read.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .errors import ConfigError
from .livefigures import (STATES, expected_points, load_snapshot, render_map, render_peaks,
                          render_total, store_attrs, store_maps, store_version)
from .trust import UntrustedDocumentError, check_uid

__all__ = ["LiveView", "parse_http_address", "API_KEY_ENV"]

logger = logging.getLogger("crystalmapping.serve")

#: The environment variable holding the page's API key.
API_KEY_ENV = "CRYSTALMAPPING_HTTP_API_KEY"
_COOKIE = "crystalmapping_key"
_PAGE = Path(__file__).with_name("data") / "liveview.html"
_MAX_STORES = 200


def parse_http_address(address: str, api_key: str | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``PORT``) -> ``(host, port)``; a host that is not loopback needs a key.

    Raises
    ------
    ConfigError
        If the address does not parse, or names a non-loopback host without ``api_key``.
    """
    text = str(address).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
        if not 0 <= port_n < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--http takes HOST:PORT (e.g. 127.0.0.1:8050), got {address!r}.")
    if not _loopback(host) and not api_key:
        raise ConfigError(
            f"--http {address!r} would serve the live page beyond this machine without a key: "
            f"set --http-api-key or ${API_KEY_ENV} (every request must then carry it), or "
            "bind to 127.0.0.1.")
    return host, port_n


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LiveView:
    """The live page of a server: an ASGI app (starlette) on uvicorn, in a daemon thread.

    Parameters
    ----------
    reports : RunReports
        The server's run records (:mod:`crystalmapping.report`): read, never changed.
    out_dir : path
        Where the server writes its stores.
    address : str
        ``HOST:PORT`` to listen on (port 0: any free port, see :attr:`url`).
    api_key : str, optional
        The key every request must carry (required off loopback).
    """

    def __init__(self, reports, out_dir, address: str = "127.0.0.1:8050",
                 api_key: str | None = None):
        self.host, self.port = parse_http_address(address, api_key)
        self.reports = reports
        self.out_dir = Path(out_dir).resolve()
        self.api_key = api_key or None
        self._lock = threading.Lock()            # one store read or PNG drawn at a time
        self._snapshots: OrderedDict = OrderedDict()
        self._pngs: OrderedDict = OrderedDict()
        self._infos: OrderedDict = OrderedDict()
        self._info_lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LiveView":
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"the live page cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror}; choose another --http address.") from exc
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="crystalmapping-liveview", daemon=True)
        self._thread.start()
        logger.info("live page: %s%s", self.url,
                    " (every request needs the API key)" if self.api_key else "")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ what the page reads

    def store_path(self, uid: str) -> Path:
        """``out_dir/<uid>.zarr`` for a plain uid, refusing anything outside ``out_dir``."""
        check_uid(uid)
        path = self.out_dir / f"{uid}.zarr"
        if path.resolve().parent != self.out_dir:  # a symbolic link out of out_dir
            raise UntrustedDocumentError(f"the store of {uid} is not inside the output directory")
        return path

    def runs(self) -> list[dict]:
        """Every run: those the server holds (in flight first), then the stores on disk."""
        rows: dict[str, dict] = {}
        for record in self.reports.open():
            row = _record_row(record)
            if row is not None:
                rows[row["uid"]] = row
        for summary in reversed(self.reports.runs()):
            uid = summary.get("uid")
            if uid and uid not in rows:
                rows[uid] = _summary_row(summary)
        try:
            stores = sorted(self.out_dir.glob("*.zarr"), key=_mtime, reverse=True)
        except OSError:
            stores = []
        for path in stores[:_MAX_STORES]:
            uid = path.name[:-len(".zarr")]
            if uid.endswith(".peaks") or uid in rows:
                continue
            try:
                check_uid(uid)
            except UntrustedDocumentError:
                continue
            info = self._store_info(path)
            if info is not None:
                rows[uid] = _store_row(uid, info["attrs"])
        for row in rows.values():
            path = self.out_dir / f"{row['uid']}.zarr"
            row["updated"] = _mtime(path)
            info = self._store_info(path)
            if info is not None:
                row["maps"] = info["maps"]
                row["expected"] = row["expected"] or info["expected"]
        return sorted(rows.values(), key=lambda r: (r["state"] != "running", -r["updated"]))

    def _store_info(self, path: Path) -> dict | None:
        """A store's attributes, maps and points expected; read once per write of it."""
        version = store_version(path)
        if version is None:
            return None
        with self._info_lock:
            cached = self._infos.get(path)
            if cached is not None and cached["version"] == version:
                return cached
            attrs = store_attrs(path)
            if attrs is None:
                return cached
            info = {"version": version, "attrs": attrs, "maps": store_maps(path),
                    "expected": expected_points(attrs)}
            self._infos[path] = info
            while len(self._infos) > 2 * _MAX_STORES:
                self._infos.popitem(last=False)
            return info

    def snapshot(self, uid: str):
        """The store of ``uid`` as last written (cached per write); None if none yet."""
        path = self.store_path(uid)
        version = store_version(path)
        with self._lock:
            snap = self._snapshots.get(uid)
            if snap is not None and (version is None or snap.version == version):
                return snap  # being replaced right now: show the previous write
            new = load_snapshot(path, uid) if version is not None else None
            if new is None:
                return snap
            self._snapshots[uid] = new
            self._snapshots.move_to_end(uid)
            while len(self._snapshots) > 8:
                self._snapshots.popitem(last=False)
            return new

    def png(self, uid: str, panel: str) -> bytes | None:
        snap = self.snapshot(uid)
        if snap is None:
            return None
        key = (uid, snap.version, panel)
        with self._lock:
            if key in self._pngs:
                return self._pngs[key]
            if panel == "total":
                data = render_total(snap)
            elif panel == "peaks":
                data = render_peaks(snap)
            elif panel.startswith("map-") and panel[4:].isdigit() and int(panel[4:]) < snap.n_maps:
                data = render_map(snap, int(panel[4:]))
            else:
                return None
            self._pngs[key] = data
            while len(self._pngs) > 400:
                self._pngs.popitem(last=False)
            return data

    # ------------------------------------------------------------------ the ASGI app

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse, JSONResponse, Response
        from starlette.routing import Route

        def page(request):
            return HTMLResponse(_PAGE.read_text(), headers={"Cache-Control": "no-store"})

        def runs(request):
            return JSONResponse({"runs": self.runs(), "time": time.time()},
                                headers={"Cache-Control": "no-store"})

        def run(request):
            uid = request.path_params["uid"]
            try:
                snap = self.snapshot(uid)
            except UntrustedDocumentError:
                return JSONResponse({"error": "not a run uid"}, status_code=404)
            if snap is None:
                return JSONResponse({"uid": uid, "version": None, "n_maps": 0, "maps": []},
                                    headers={"Cache-Control": "no-store"})
            return JSONResponse(snap.meta(), headers={"Cache-Control": "no-store"})

        def image(request):
            uid, panel = request.path_params["uid"], request.path_params["panel"]
            try:
                data = self.png(uid, panel)
            except UntrustedDocumentError:
                data = None
            if data is None:
                return Response(status_code=404)
            return Response(data, media_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400"})

        app = Starlette(routes=[Route("/", page), Route("/api/runs", runs),
                                Route("/api/runs/{uid}", run),
                                Route("/runs/{uid}/{panel}.png", image)])
        return _Guard(app, self.api_key)


class _Guard:
    """ASGI middleware: with a key, every request must carry it; loopback or not, GET only."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, RedirectResponse

        request = Request(scope)
        if request.method not in ("GET", "HEAD"):
            return await PlainTextResponse("read only", 405)(scope, receive, send)
        if self.api_key is None:
            return await self.app(scope, receive, send)
        given = request.query_params.get("key")
        if given is not None and _same(given, self.api_key):
            # the key once in the address: a cookie from now on, and an address without it
            url = request.url.remove_query_params("key")
            response = RedirectResponse(str(url), 303)
            response.set_cookie(_COOKIE, self.api_key, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        auth = request.headers.get("authorization", "")
        for candidate in (auth[7:] if auth.lower().startswith("bearer ") else None,
                          request.headers.get("x-api-key"), request.cookies.get(_COOKIE)):
            if candidate is not None and _same(candidate, self.api_key):
                return await self.app(scope, receive, send)
        await PlainTextResponse("an API key is needed: open the page once as /?key=KEY", 401,
                                headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _round(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def _record_row(record) -> dict | None:
    """A run the server holds: its processor's live counts."""
    p = record.processor
    if getattr(p, "start_doc", None) is None:
        return None
    s = p.status()
    grid = getattr(p, "grid", None)
    expected = (int(grid.shape[0]) * int(grid.shape[1]) if grid is not None
                else p.start_doc.get("num_points"))
    status = s.get("exit_status")
    if record.summary is not None:
        row = _summary_row(record.summary)
        row.update(expected=expected)
        return row
    return {"uid": record.uid, "state": "running" if status is None else STATES.get(status, status),
            "points": s["done"], "received": s["received"], "failed": s["failed"],
            "expected": expected, "queued": s["queued"], "lag_s": _round(s["lag_seconds"], 1),
            "latency_median_s": _round(s["latency_median_s"]),
            "latency_p95_s": _round(s["latency_p95_s"]), "maps": None, "source": "server"}


def _summary_row(summary: dict) -> dict:
    """A finished run's report line."""
    status = summary.get("exit_status")
    return {"uid": summary["uid"], "state": STATES.get(status, str(status)),
            "points": summary.get("points"), "received": summary.get("received"),
            "failed": summary.get("failed"), "expected": None, "queued": 0,
            "lag_s": _round(summary.get("max_lag_s"), 1),
            "latency_median_s": _round(summary.get("latency_median_s")),
            "latency_p95_s": _round(summary.get("latency_p95_s")),
            "maps": summary.get("maps"), "source": "server"}


def _store_row(uid: str, attrs: dict) -> dict:
    """A store on disk the server did not map (an earlier server's)."""
    status = attrs.get("exit_status")
    return {"uid": uid, "state": STATES.get(status, str(status)),
            "points": attrs.get("n_points_measured"), "received": None,
            "failed": len(attrs.get("failed_points") or []), "expected": expected_points(attrs),
            "queued": None, "lag_s": None, "latency_median_s": None, "latency_p95_s": None,
            "maps": None, "source": "disk"}
