"""Runs: the documents of many live runs -> one stream processor each, errors per run.

The router between the proxy's receiving end (:mod:`crystalmapping.dispatch`)
and the runs of :class:`~crystalmapping.serve.DocumentServer`: an
``event_model.RunRouter`` whose factory
(:func:`~crystalmapping.stream.processor_factory`) makes one
:class:`~crystalmapping.stream.StreamProcessor` per start document, each
recorded for its report (:mod:`crystalmapping.report`). A document that
breaks a run (its processor raises) is logged in the words of the document
model, at most once every 30 s for the same error, and routing goes on; a run
whose start fails is not mapped; other runs go on.
"""

from __future__ import annotations

import logging
import time

from bluesky.run_engine import DocumentNames as _DocumentNames
from event_model import RunRouter

__all__ = ["RunsRouter"]

# The server's log (``crystalmapping serve`` shows its INFO lines), as before the split.
logger = logging.getLogger("crystalmapping.serve")


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


class RunsRouter:
    """Route the documents of many runs, one stream processor each; never raise.

    Parameters
    ----------
    factory : callable
        ``factory(name, start_doc) -> (callbacks, subfactories)``, as
        :func:`~crystalmapping.stream.processor_factory` makes.
    reports : RunReports
        Where each run started is recorded, and its stop noted.
    out_dir : path
        Where the stores go (for the log).
    on_unknown_stop : callable, optional
        ``on_unknown_stop(uid) -> bool`` for a stop whose start this router
        never saw; True if it takes the run (a store left unfinished by a
        previous server, :mod:`crystalmapping.recover`), else it is logged.
    """

    def __init__(self, factory, reports, out_dir, on_unknown_stop=None):
        self._factory = factory
        self._on_unknown_stop = on_unknown_stop
        self._reports = reports
        self.out_dir = out_dir
        self._router = RunRouter([self._make], filler_class=_NoFill)
        self._errors: dict[tuple, float] = {}

    def _make(self, name, start_doc):
        callbacks, subfactories = self._factory(name, start_doc)
        for processor in callbacks:
            record = self._reports.add(start_doc["uid"], processor)
            logger.info("run %s started (scan_id %s, shape %s): mapping it to %s",
                        record.uid[:8], start_doc.get("scan_id"), start_doc.get("shape"),
                        self.out_dir / f"{record.uid}.zarr")
        return [_Guard(self, start_doc["uid"], cb) for cb in callbacks], subfactories

    def __call__(self, name: str, doc: dict) -> None:
        """Route one document to its run's processor; never raises."""
        if name == "stop":
            record = self._reports.stopped(doc.get("run_start"))
            if (record is None and isinstance(doc, dict) and self._on_unknown_stop is not None
                    and self._on_unknown_stop(doc.get("run_start"))):
                pass  # a run a previous server left unfinished: completed from the catalog
            elif record is None and isinstance(doc, dict):
                logger.error("a stop document names run %s, whose start this server never "
                             "received (started mid-run, or documents out of order); ignored",
                             str(doc.get("run_start"))[:8])
        try:
            self._router(name, doc)
        except Exception as exc:  # noqa: BLE001 - a bad document must not stop the server
            self._log_error(name, doc, exc)

    def _log_error(self, name, doc, exc) -> None:
        # events and datums name their descriptor or resource, not their run: one line per those
        field, run = "run", None
        if isinstance(doc, dict):
            field = next((f for f in ("run_start", "descriptor", "stream_resource", "uid")
                          if doc.get(f)), "uid")
            run = doc.get(field)
        key = (type(exc).__name__, name, str(run)[:36])
        now = time.monotonic()
        if now - self._errors.get(key, -1e9) > 30.0:
            self._errors[key] = now
            logger.error("a %s document (%s %s) could not be routed: %s; the server goes "
                         "on with the next document (the same error for the same %s is "
                         "logged again after 30 s at most)", name,
                         "run" if field == "run_start" else field, str(run)[:8],
                         _explain(name, doc, exc), "run" if field == "run_start" else field)
        else:
            logger.debug("a %s document could not be routed: %r", name, exc)


def _explain(name, doc, exc) -> str:
    """What went wrong with a document, in the words of the document model."""
    if isinstance(exc, AttributeError) and name not in _DOCUMENT_NAMES:
        return (f"{name!r} is not a bluesky document name (they are "
                f"{', '.join(sorted(_DOCUMENT_NAMES))})")
    if isinstance(exc, KeyError) and isinstance(doc, dict):
        missing = exc.args[0] if exc.args else None
        for field, kind in (("descriptor", "descriptor"), ("stream_resource", "stream_resource"),
                            ("resource", "resource"), ("run_start", "start")):
            if missing is not None and doc.get(field) == missing:
                return (f"it names the {kind} {str(missing)[:40]!r}, which this server never "
                        "received (documents out of order, or the server started mid-run)")
        return f"it lacks the field {missing!r} (KeyError)"
    return f"{type(exc).__name__}: {exc}"


#: The names of bluesky's documents (the RunEngine's own list).
_DOCUMENT_NAMES = tuple(n.name for n in _DocumentNames)


class _Guard:
    """One run's processor behind the router: its errors are logged once, not raised."""

    def __init__(self, runs: RunsRouter, uid: str, callback):
        self.runs, self.uid, self.callback = runs, uid, callback
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
                self.runs._log_error(name, doc, exc)
            return doc
