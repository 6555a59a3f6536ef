"""New runs: map every finished grid scan of a catalog that has no maps yet.

``crystalmapping process-new --catalog URI --out-dir DIR`` (and
:func:`process_new`) is the batch counterpart of ``crystalmapping serve``: run
from cron, a systemd timer or a batch job, it writes each run's maps to
``DIR/<uid>.zarr`` (the layout ``serve`` uses), one pass over the catalog::

    each run of the catalog (--since: started at or after a date)
      a derived run (start has analysis_stage)        not a scan: counted, no line
      start without a 2-D grid (shape)                skip: not a grid scan
      no stop document yet                            skip: not finished (a later pass maps it)
      stop exit_status not "success"                  skip: the status and its reason
      DIR/<uid>.zarr a finished store of that run     already mapped (recorded in the
                                                      catalog now if it was not)
      a derived run records its maps elsewhere        skip: already mapped, where
      DIR/<uid>.failed.json                           skip: failed before (--retry-failed)
      a temporary store or an unfinished one          skip while it is being written
        changed less than --busy-grace seconds ago    (serve, or another writer)
      otherwise                                       map: leftovers of an interrupted pass
                                                      (DIR/.<uid>.zarr.tmp-*, .old-*,
                                                      <uid>.partial.zarr, an unfinished or
                                                      unreadable <uid>.zarr) are removed or
                                                      replaced; the store is written
                                                      atomically; a derived run records it

Idempotent: a store is only ever renamed into place whole, so a pass killed at
any moment leaves either no store (the run is mapped again next pass) or a
finished one (never mapped twice). One pass at a time per ``DIR`` (a lock file,
``DIR/.process-new.lock``, released by the kernel if the process dies): a pass
that finds it taken does nothing. A run whose mapping fails gets
``DIR/<uid>.failed.json`` (the error) and is not tried again until
``--retry-failed``; a catalog that stops answering ends the pass (nothing is
marked failed).

Recording: after each store, :func:`crystalmapping.derived.derived_run_documents`
makes a derived run (``analysis_stage="crystalmapping"``, ``parent_uid``, the
store's path ``maps``, its config and exit status, ``stream.mapped_by =
"crystalmapping process-new"``), written into the same catalog (the container
of runs the address names). A catalog that refuses writes (a read-only key) is
reported on the run's line and the maps stay; ``record=False``
(``--no-record``) writes nothing into the catalog.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ConfigError, CrystalMappingError, ScanError

__all__ = ["process_new", "NewRunsReport", "parse_since", "LOCK_NAME"]

logger = logging.getLogger(__name__)

#: The lock file of a pass in its output directory.
LOCK_NAME = ".process-new.lock"
#: Store exit statuses of a run a live server was still mapping.
_UNFINISHED = ("running", "interrupted")
_MAPPED_BY = "crystalmapping process-new"


@dataclass
class NewRunsReport:
    """What one pass did: uids by outcome, and the pass's seconds."""

    mapped: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # uid -> reason
    existing: list = field(default_factory=list)
    recorded: list = field(default_factory=list)  # existing stores recorded in this pass
    derived: int = 0
    busy: bool = False  # another pass held the lock: nothing was done
    seconds: float = 0.0

    def summary(self, catalog: str, out_dir: Path) -> str:
        if self.busy:
            return (f"process-new: another pass is mapping into {out_dir} (lock "
                    f"{out_dir / LOCK_NAME}); nothing done")
        return (f"process-new: {len(self.mapped)} mapped, {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped, {len(self.existing)} already mapped"
                f"{f' ({len(self.recorded)} recorded now)' if self.recorded else ''}, "
                f"{self.derived} derived runs ({catalog} -> {out_dir}, {self.seconds:.1f} s)")


def parse_since(text: str | None) -> float | None:
    """``--since`` as a Unix time: an ISO date or date-time (local time unless it says)."""
    if text in (None, ""):
        return None
    try:
        moment = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        raise ConfigError(f"--since must be an ISO date or date-time (2026-11-01, "
                          f"2026-11-01T08:00, 2026-11-01T08:00+01:00); got {text!r}.") from None
    return moment.timestamp()


def process_new(catalog, out_dir, config, *, client=None, cluster=None,
                since: float | None = None, uids=None, record: bool = True,
                retry_failed: bool = False, busy_grace: float = 600.0,
                echo: Callable[[str], None] = print) -> NewRunsReport:
    """Map every finished grid scan of ``catalog`` without maps into ``out_dir/<uid>.zarr``.

    Parameters
    ----------
    catalog : Catalog
    out_dir : path
    config : ProcessConfig
        The processing options of every run (a ``background`` point index is
        taken in each run).
    client : distributed.Client, optional
    cluster : callable, optional
        Without ``client``: ``cluster()`` gives a context manager of a client,
        entered only when a run is to be mapped (a pass with nothing to map
        starts no cluster).
    since : float, optional
        Only runs whose start time is at or after this Unix time (:func:`parse_since`).
    uids : list of str, optional
        Only these runs (``--uid``; what an end-of-run workflow passes): each is
        looked up by its uid, not found by listing the catalog.
    record : bool
        Record each store as a derived run in ``catalog``.
    retry_failed : bool
        Try again the runs a previous pass failed to map.
    busy_grace : float
        Seconds during which a temporary or unfinished store of a run is taken
        to be in the middle of a write by someone else (the run is left alone).
    echo : callable
        Gets one line per run (and not the summary).

    Returns
    -------
    report : NewRunsReport

    Raises
    ------
    CatalogUnavailableError
        The catalog stopped answering: the pass ends (the runs done so far stay).
    """
    import fcntl

    t0 = time.monotonic()
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_outside_catalog(catalog, out_dir)
    report = NewRunsReport()
    with open(out_dir / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.busy = True
            return report
        runs, derived = _scan(catalog, since) if uids is None else _scan_uids(catalog, uids)
        report.derived = sum(len(v) for v in derived.values())
        with contextlib.ExitStack() as stack:
            clients = [client]

            def get_client():
                if clients[0] is None:
                    if cluster is None:
                        raise ConfigError("process_new needs client= or cluster=.")
                    clients[0] = stack.enter_context(cluster())
                return clients[0]

            for uid, node, start, stop in runs:
                _one_run(catalog, out_dir, config, get_client, uid, node, start, stop,
                         derived.get(uid, []), report, record, retry_failed, busy_grace, echo)
    report.seconds = time.monotonic() - t0
    return report


def _check_outside_catalog(catalog, out_dir: Path) -> None:
    directory = getattr(catalog, "directory", None)
    if directory is None:
        return
    root = os.path.realpath(directory)
    target = os.path.realpath(out_dir)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        raise ConfigError(f"--out-dir {str(out_dir)!r} lies inside the catalog ({root!r}); "
                          "write the maps elsewhere, e.g. --out-dir maps.")


def _scan(catalog, since):
    """``([(uid, node, start, stop)] of measured runs, {parent_uid: [derived start]})``."""
    node = catalog.client
    if since is not None:
        try:
            from tiled.queries import Key

            node = node.search(Key("start.time") >= since)
        except Exception as exc:  # noqa: BLE001 - filtered below instead
            logger.info("the catalog does not search by start.time (%r); filtering here", exc)
    runs, derived = [], {}
    for key, child in node.items():
        metadata = child.metadata
        start = dict(metadata.get("start") or {})
        if since is not None and float(start.get("time", 0)) < since:
            continue
        if start.get("analysis_stage"):
            if start.get("parent_uid"):
                derived.setdefault(start["parent_uid"], []).append(start)
            continue
        runs.append((start.get("uid", key), child, start, dict(metadata.get("stop") or {})))
    return runs, derived


def _scan_uids(catalog, uids):
    """:func:`_scan` of the runs ``uids`` only (each checked before it names anything)."""
    from .trust import check_uid

    node = catalog.client
    runs, derived = [], {}
    for uid in uids:
        check_uid(uid)
        try:
            child = node[uid]
        except KeyError:
            raise ScanError(f"no run {uid} in catalog {catalog.uri}; check the uid (and that "
                            "the run was written to this catalog).") from None
        metadata = child.metadata
        start = dict(metadata.get("start") or {})
        if start.get("analysis_stage"):
            raise ScanError(f"run {uid} is a derived run ({start['analysis_stage']!r}), not a "
                            "measured scan: give the uid of the scan.")
        runs.append((start.get("uid", uid), child, start, dict(metadata.get("stop") or {})))
        try:
            from tiled.queries import Key

            found = node.search(Key("start.parent_uid") == uid)
        except Exception as exc:  # noqa: BLE001 - filtered below instead
            logger.info("the catalog does not search by start.parent_uid (%r); listing it", exc)
            found = node
        for _, other in found.items():
            other_start = dict(other.metadata.get("start") or {})
            if other_start.get("analysis_stage") and other_start.get("parent_uid") == uid:
                derived.setdefault(uid, []).append(other_start)
    return runs, derived


def _not_mappable(start: dict, stop: dict) -> str | None:
    """Why a measured run is not one process-new maps (None: it is)."""
    from .grid import Grid
    from .trust import UntrustedDocumentError, check_uid

    try:
        check_uid(start.get("uid"))
    except UntrustedDocumentError as exc:
        return f"its uid cannot name a store: {exc}"
    try:
        grid = Grid.from_start(start)
    except ScanError as exc:
        return f"not a grid scan ({exc})"
    if grid.size < 2:
        return f"not a grid scan (a grid of {grid.size} point)"
    if not stop:
        return "not finished yet (no stop document); a later pass maps it"
    status = stop.get("exit_status")
    if status != "success":
        reason = stop.get("reason")
        return f"its stop is {status!r}{f' ({reason})' if reason else ''}, not 'success'"
    return None


def _store_state(path: Path, uid: str) -> str:
    """``missing``, ``finished``, ``unfinished`` (a live server's partial maps) or ``broken``."""
    if not path.exists():
        return "missing"
    try:
        from .store import open_maps

        attrs = open_maps(path).attrs
    except Exception:  # noqa: BLE001 - a half-written or foreign store is replaced
        return "broken"
    if attrs.get("source_uid") != uid:
        return "broken"
    return "unfinished" if attrs.get("exit_status") in _UNFINISHED else "finished"


def _leftovers(out_dir: Path, uid: str) -> list[Path]:
    name = f"{uid}.zarr"
    return [*out_dir.glob(f".{name}.tmp-*"), *out_dir.glob(f".{name}.old-*"),
            *[p for p in (out_dir / f"{uid}.partial.zarr",) if p.exists()]]


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _one_run(catalog, out_dir, config, client, uid, node, start, stop, records, report,
             record, retry_failed, busy_grace, echo) -> None:
    short = uid
    why = _not_mappable(start, stop)
    if why:
        report.skipped[uid] = why
        echo(f"skip    {short}  {why}")
        return
    store = out_dir / f"{uid}.zarr"
    here = [r for r in records if _same_path(r.get("maps"), store)]
    state = _store_state(store, uid)
    if state == "finished":
        report.existing.append(uid)
        if record and not here:
            if _record(catalog, uid, store, None, echo, "recorded"):
                report.recorded.append(uid)
        logger.info("%s: maps exist at %s", uid, store)
        return
    elsewhere = [r for r in records if r.get("maps") and not _same_path(r.get("maps"), store)
                 and r.get("exit_status") == "success"]
    if state == "missing" and elsewhere:
        why = f"already mapped into {elsewhere[-1]['maps']} (derived run {elsewhere[-1]['uid']})"
        report.skipped[uid] = why
        echo(f"skip    {short}  {why}")
        return
    marker = out_dir / f"{uid}.failed.json"
    if marker.exists() and not retry_failed:
        try:
            error = json.loads(marker.read_text()).get("error", "?")
        except Exception:  # noqa: BLE001
            error = "?"
        why = f"failed before ({error}); see {marker}, or pass --retry-failed"
        report.skipped[uid] = why
        echo(f"skip    {short}  {why}")
        return
    leftovers = _leftovers(out_dir, uid)
    fresh = [p for p in leftovers + ([store] if state == "unfinished" else [])
             if _age(p) < busy_grace]
    if fresh:
        why = (f"being written by another process ({fresh[0].name} changed "
               f"{_age(fresh[0]):.0f} s ago); a later pass maps it if it is left unfinished")
        report.skipped[uid] = why
        echo(f"skip    {short}  {why}")
        return
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    redo = ""
    if leftovers or state in ("unfinished", "broken"):
        what = [p.name for p in leftovers] + ([f"{store.name} ({state})"]
                                              if state != "missing" else [])
        redo = f" (redone: {', '.join(what)} replaced)"
    _map(catalog, config, client, uid, node, store, marker, state != "missing", record, report,
         redo, echo)


def _same_path(a, b: Path) -> bool:
    return a is not None and os.path.abspath(str(a)) == os.path.abspath(str(b))


def _map(catalog, config, get_client, uid, node, store, marker, overwrite, record, report,
         redo, echo) -> None:
    from .pipeline import process_run
    from .readers import CatalogUnavailableError
    from .source import Run

    client = get_client()
    t0 = time.perf_counter()
    try:
        maps = process_run(Run(catalog, node), config=config, out=store, client=client,
                           overwrite=overwrite, progress=False)
    except CatalogUnavailableError:
        raise
    except ScanError as exc:  # the run is not one this configuration maps (no data key...)
        report.skipped[uid] = str(exc)
        echo(f"skip    {uid}  {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - one run's failure must not stop the pass
        error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            marker.write_text(json.dumps({"uid": uid, "error": error, "time": time.time()}))
        report.failed.append(uid)
        echo(f"FAILED  {uid}  {error} (marked in {marker.name}; --retry-failed tries again)")
        if not isinstance(exc, CrystalMappingError):
            logger.debug("run %s", uid, exc_info=True)
        return
    seconds = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        marker.unlink()
    report.mapped.append(uid)
    n = int(maps.attrs.get("n_points_measured", 0))
    line = (f"mapped  {uid}  {maps.sizes.get('grain', 0)} maps, {n} points, {seconds:.1f} s "
            f"-> {store}{redo}")
    if record:
        line += _record(catalog, uid, store, maps, None, "", seconds=seconds)
    echo(line)


def _record(catalog, uid, store, maps, echo, verb, *, seconds=None) -> str | bool:
    """Record the store as a derived run. With ``echo``: print a line, return success;
    else return a note for the run's line ('' when recorded)."""
    from .derived import derived_run_documents
    from .store import open_maps

    try:
        if maps is None:
            maps = open_maps(store)
        summary = {"mapped_by": _MAPPED_BY}
        if seconds is not None:
            summary["seconds"] = round(seconds, 3)
        documents = derived_run_documents(uid, store, maps, summary)
        catalog.ingest(documents)
        note, ok = f", recorded as derived run {documents[0][1]['uid']}", True
    except Exception as exc:  # noqa: BLE001 - the maps are written; say why the record is not
        note, ok = f" (not recorded in the catalog: {type(exc).__name__}: {exc})", False
    if echo is None:
        return note
    if ok:
        echo(f"{verb:<7} {uid}  maps at {store}{note}")
    else:
        echo(f"exists  {uid}  maps at {store}{note}")
    return ok
