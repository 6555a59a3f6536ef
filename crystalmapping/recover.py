"""Recover: runs a live server left unfinished, completed from the catalog when it starts.

A server that dies (SIGKILL, a crash, the machine) leaves the stores of the
runs it was mapping as their last partial maps, ``exit_status="running"``
(or ``"interrupted"`` after a SIGTERM in the middle of a run). When
:class:`~crystalmapping.serve.DocumentServer` starts again it looks in its
``out_dir`` for such stores and, for each::

    store name -> trust.check_uid        not a plain uid: left alone (logged)
    attrs: source_uid, exit_status       not a crystalmapping store of that run,
                                         or finished: left alone
    catalog[uid]                         not there (yet): left as is, logged with
                                         the command that finishes it
    run.stop                             none yet: left as is, logged; completed
                                         when the run's stop reaches this server
    pipeline.process_run on the client   the batch maps of the stored run, with
                                         the stream's attrs (exit_status of the
                                         stop, failed_points []), written
                                         atomically over the partial store

so a completed store equals what the batch pipeline makes of the stored run,
and its report line, JSON line and derived run follow as for a live run.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .store import open_maps, write_maps
from .trust import UntrustedDocumentError, check_uid

__all__ = ["UNFINISHED", "unfinished_stores", "Recoverer"]

# The server's log (``crystalmapping serve`` shows its INFO lines).
logger = logging.getLogger("crystalmapping.serve")

#: The exit statuses of a store whose run the server did not see to its end.
UNFINISHED = ("running", "interrupted")


def unfinished_stores(out_dir) -> list[tuple[str, Path, str]]:
    """``(uid, path, exit_status)`` of the stores in ``out_dir`` left unfinished.

    Temporary and rescue stores (``.<name>.tmp-*``, ``*.peaks.zarr``,
    ``*.partial.zarr``) are not runs' stores; a store whose name is not a
    plain run uid (:func:`~crystalmapping.trust.check_uid`), that does not
    open, or whose ``source_uid`` is not its name is logged and left alone.
    """
    found = []
    for path in sorted(Path(out_dir).glob("*.zarr")):
        name = path.name
        if name.startswith(".") or name.endswith((".peaks.zarr", ".partial.zarr")):
            continue
        uid = name.removesuffix(".zarr")
        try:
            check_uid(uid)
        except UntrustedDocumentError as exc:
            logger.warning("store %s is left alone: %s", path, exc)
            continue
        try:
            attrs = open_maps(path).attrs
        except Exception as exc:  # noqa: BLE001 - one bad store must not stop the server
            logger.warning("store %s is left alone: it does not open as maps (%s)", path, exc)
            continue
        if attrs.get("source_uid") != uid:
            logger.warning("store %s is left alone: its source_uid %r is not its name; rename "
                           "it <source_uid>.zarr for the server to complete it", path,
                           attrs.get("source_uid"))
            continue
        status = attrs.get("exit_status")
        if status in UNFINISHED:
            found.append((uid, path, status))
    return found


class Recoverer:
    """Complete, from the catalog, the runs whose stores a previous server left unfinished.

    Parameters
    ----------
    out_dir : path
        The server's stores.
    catalog : Catalog or None
        Where the runs are stored (the RunEngine's writer); None: nothing is
        completed, each unfinished store is logged with how to finish it.
    executor : distributed.Client or other
        Where the batch pipeline runs (only a ``distributed.Client``).
    config : ProcessConfig
        The server's processing options (the stores were made with them).
    on_completed : callable, optional
        ``on_completed(path, maps)`` after a store is completed (the report).
    stop_wait : float
        Seconds to wait for the catalog to hold a run's stop after its stop
        document reached the server.
    """

    def __init__(self, out_dir, catalog, executor, config, *,
                 on_completed: Callable | None = None, stop_wait: float = 30.0):
        self.out_dir = Path(out_dir)
        self.catalog = catalog
        self.executor = executor
        self.config = config
        self.on_completed = on_completed
        self.stop_wait = float(stop_wait)
        self.pending: dict[str, Path] = {}  # uid -> store: no stop in the catalog yet
        self.completed: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ entry points

    def start(self) -> None:
        """Look for unfinished stores and complete them in a thread (the server listens)."""
        stores = unfinished_stores(self.out_dir)
        if not stores:
            return
        logger.warning("%d run(s) in %s were left unfinished by a server that stopped "
                       "during them: %s", len(stores), self.out_dir,
                       ", ".join(f"{uid[:8]} ({status})" for uid, _, status in stores))
        self._spawn(self._recover_all, stores)

    def on_stop(self, uid) -> bool:
        """The stop of a run this server never saw start; complete it if its store waits.

        Returns True if the run is one this recoverer completes."""
        with self._lock:
            path = self.pending.pop(uid, None) if isinstance(uid, str) else None
        if path is None:
            return False
        logger.info("run %s: its stop document came; completing its maps from %s once the "
                    "catalog holds the stop", uid[:8], self.catalog.uri)
        self._spawn(self._recover_after_stop, uid, path)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the completions under way; False if some are still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ internals

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name="crystalmapping-recover")
        self._threads.append(thread)
        thread.start()

    def _recover_all(self, stores) -> None:
        for uid, path, status in stores:
            try:
                self._recover(uid, path, status)
            except Exception:  # noqa: BLE001 - logged, the next store goes on
                logger.exception("run %s: its maps could not be completed; the partial "
                                 "maps in %s are left as they are. %s", uid[:8], path,
                                 self._how(uid, path))

    def _recover_after_stop(self, uid: str, path: Path) -> None:
        deadline = time.monotonic() + self.stop_wait
        while True:
            try:
                run = self.catalog[uid]
                if run.stop:
                    break
            except KeyError:
                pass
            if time.monotonic() > deadline:
                logger.error("run %s: its stop came here but the catalog %s did not hold it "
                             "within %g s; the partial maps in %s are left as they are. %s",
                             uid[:8], self.catalog.uri, self.stop_wait, path,
                             self._how(uid, path))
                return
            time.sleep(0.5)
        try:
            self._complete(uid, path, run)
        except Exception:  # noqa: BLE001
            logger.exception("run %s: its maps could not be completed; the partial maps in "
                             "%s are left as they are. %s", uid[:8], path, self._how(uid, path))

    def _how(self, uid: str, path: Path) -> str:
        where = self.catalog.uri if self.catalog is not None else "URI"
        return (f"To finish them: crystalmapping process --catalog {where} --uid {uid} "
                f"--out {path} --overwrite (with this server's processing options)")

    def _recover(self, uid: str, path: Path, status: str) -> None:
        if self.catalog is None:
            logger.warning("run %s: its maps in %s are partial (exit_status %r) and this "
                           "server has no --catalog to complete them from; left as they are. "
                           "%s", uid[:8], path, status, self._how(uid, path))
            return
        if not _is_distributed(self.executor):
            logger.warning("run %s: its maps in %s are partial (exit_status %r); this server "
                           "completes runs only on a Dask client, so they are left as they "
                           "are. %s", uid[:8], path, status, self._how(uid, path))
            return
        try:
            run = self.catalog[uid]
        except KeyError:
            logger.warning("run %s: its maps in %s are partial (exit_status %r) and the run is "
                           "not in the catalog %s (not stored there, or not yet); left as they "
                           "are. %s", uid[:8], path, status, self.catalog.uri,
                           self._how(uid, path))
            return
        if not run.stop:
            with self._lock:
                self.pending[uid] = path
            logger.warning("run %s: its maps in %s are partial (exit_status %r) and the run has "
                           "no stop document in the catalog %s yet (still measuring, or it "
                           "ended without one); left as they are until its stop reaches this "
                           "server. %s", uid[:8], path, status, self.catalog.uri,
                           self._how(uid, path))
            return
        self._complete(uid, path, run)

    def _complete(self, uid: str, path: Path, run) -> None:
        from .pipeline import process_run

        t = time.monotonic()
        logger.info("run %s: completing its partial maps in %s from the stored run in %s",
                    uid[:8], path, self.catalog.uri)
        maps = process_run(run, config=self.config, client=self.executor, progress=False)
        exit_status = (run.stop or {}).get("exit_status", "success")
        maps.attrs.update(exit_status=exit_status, failed_points=[], failure_reasons=[])
        write_maps(maps, path, overwrite=True)
        self.completed.append(uid)
        maps = open_maps(path)
        logger.info("run %s: completed from the catalog in %.1f s: maps of %d points (%s) in "
                    "%s", uid[:8], time.monotonic() - t, int(maps.attrs.get(
                        "n_points_measured", 0)), exit_status, path)
        if self.on_completed is not None:
            try:
                self.on_completed(path, maps)
            except Exception:  # noqa: BLE001
                logger.exception("run %s: its completed maps could not be reported", uid[:8])


def _is_distributed(executor) -> bool:
    return type(executor).__module__.split(".")[0] == "distributed"
