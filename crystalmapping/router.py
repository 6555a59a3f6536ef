"""Router: one live run's bluesky documents -> its grid points' frames.

The first stage of :class:`~crystalmapping.stream.StreamProcessor`, an
``event_model.DocumentRouter`` that routes each document of one run by name
and never holds frames::

    start            grid, output path, and the attrs the batch pipeline records
    descriptor       which stream and data key hold the frames; inline or external
    stream_resource  the HDF5 file and dataset of the frames
    stream_datum ----+  rows of each point          (external frames)
    resource         the HDF5 file of an ophyd v1 area detector (AD_HDF5, AD_HDF5_SWMR)
    datum(_page)     which rows a datum_id names (point_number x frame_per_point)
    event(_page) ----+  the frames themselves       (inline frames)
                 ----+  or a datum_id -> its rows   (FILESTORE frames)
                     |
                     v  _accept(point, source, received): to the point ledger and
                        the executor (:mod:`crystalmapping.submit`)
    stop             noted; the writer (:mod:`crystalmapping.writer`) writes the
                     final maps once every queued point is done

A point is its event's ``seq_num - 1``. Events are taken one by one or in
pages; the frames come inline in the event (filled) or as rows of an HDF5
file named by ``stream_resource`` / ``stream_datum``
(:func:`crystalmapping.references.hdf5_rows`, after the root map and within the
data roots), or by the ``resource`` / ``datum`` documents of ophyd v1 area
detectors: the event holds a ``datum_id``, its datum a ``point_number``, and
the point's frames are rows ``[point_number * frame_per_point, (point_number
+ 1) * frame_per_point)`` of ``/entry/data/data`` in the resource's file
(:func:`crystalmapping.references.resource_file`, with the same root map and
data roots), as the area-detector handlers read them. Specs other than
``AD_HDF5`` and ``AD_HDF5_SWMR`` are refused: the points fail with the spec's
name and a hint to fill the events with ``event_model.Filler`` first (filled
events are inline frames). An event may come before its datum; datums are
kept until their event names them, and an event whose datum never came fails
at the stop. Rows not written yet when the event comes (SWMR files) are
waited for by the worker that reads them (:func:`crystalmapping.frames.read_rows`).

The router is the plain ``DocumentRouter``, not event-model's
``SingleRunDocumentRouter``: that one raises its own error at a second start
(this one says how to route many runs), asserts that a descriptor follows a
start, and caches every descriptor, where only whether the frames' stream is
external matters here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from event_model import (Datum, DatumPage, DocumentRouter, Event, EventDescriptor, EventPage,
                         Resource, RunStart, RunStop, StreamDatum, StreamResource,
                         unpack_datum_page)

from .errors import ScanError, StoreError
from .finish import store_attrs
from .references import ResourceFile, datum_rows, hdf5_rows, resource_file
from .grid import Grid
from .preprocess import check_point_index
from .trust import check_uid

__all__ = ["RunDocumentRouter"]

# One logger for a live run's lines, whichever module says them (as before the split).
logger = logging.getLogger("crystalmapping.stream")


class RunDocumentRouter(DocumentRouter):
    """The documents of one run -> ``_accept(point, source, received)`` for each point.

    A base of :class:`~crystalmapping.stream.StreamProcessor`, which gives it
    ``config``, ``stream_name``, ``out_dir``, ``overwrite``, ``root_map``,
    ``data_roots``, the lock, the point ledger and the background, and
    implements ``_accept``, ``_fail_new`` (:class:`~crystalmapping.submit.PointSubmitter`)
    and ``_touch`` (:class:`~crystalmapping.writer.MapWriter`).
    """

    def _init_documents(self) -> None:
        """The per-run state the documents fill in."""
        self.start_doc: dict | None = None
        self.stop_doc: dict | None = None
        self.grid: Grid | None = None
        self.path: Path | None = None
        self._attrs: dict = {}
        # uid -> {"external": bool (STREAM: frames), "filestore": bool (datum_id in the event)}
        self._descriptors: dict[str, dict] = {}
        self._external_events: set[int] = set()  # points whose event says frames are external
        self._resources: dict[str, dict] = {}
        self._seen: set = set()  # uids of every descriptor and stream_resource received
        self._unknown: set = set()  # uids named but never received (logged once each)
        self._legacy: dict[str, dict] = {}  # resource uid -> resource document
        self._legacy_files: dict[str, ResourceFile | str] = {}  # resource uid -> file, or why not
        self._datums: dict[str, dict] = {}  # datum_id -> datum, until its event names it
        self._awaiting: dict[str, tuple[int, float]] = {}  # datum_id -> (point, received)

    @property
    def uid(self) -> str | None:
        """Uid of the run (None before its start document)."""
        return None if self.start_doc is None else self.start_doc["uid"]

    def start(self, doc: RunStart) -> RunStart:
        """Read the grid, check the output path and the background index, start the watcher."""
        if self.start_doc is not None:
            raise ScanError(
                f"a StreamProcessor maps one run; it got start {doc['uid']!r} after "
                f"{self.uid!r}. Route many runs with event_model.RunRouter([processor_factory(...)])."
            )
        check_uid(doc.get("uid"))
        grid = Grid.from_start(doc)
        if self._bg_index is not None:
            check_point_index(self._bg_index, grid.size)
        path = self.out_dir / f"{doc['uid']}.zarr"
        if path.exists() and not self.overwrite:
            raise StoreError(f"{str(path)!r} already exists; pass overwrite=True to replace it.")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.start_doc, self.grid, self.path = doc, grid, path
            self._attrs = store_attrs(doc["uid"], self.config, self._record)
            self._touch()
        logger.info("streaming run %s (%d x %d grid) to %s", doc["uid"][:8], *grid.shape, path)
        return doc

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        """Note whether the stream's frames are inline or external (``"STREAM:"``)."""
        self._touch()
        self._seen.add(doc.get("uid"))
        if doc.get("name") != self.stream_name:
            return doc
        key = self.config.data_key
        data_keys = doc.get("data_keys", {})
        if key not in data_keys:
            raise ScanError(
                f"stream {self.stream_name!r} of run {self.uid} has no data key {key!r}; its "
                f"keys are {sorted(data_keys)}. Give the detector image key as data_key."
            )
        shape = tuple(data_keys[key].get("shape") or ())
        if (self._subtrahend is not None and len(shape) >= 2
                and tuple(self._subtrahend.shape) != shape[-2:]):
            # Only logged: some detectors describe their shape wrongly; if it is right,
            # every point fails with the kernel's error, and the maps list them.
            logger.error("run %s: the background image has shape %s but the detector's frames "
                         "are described as %s; points will fail unless the description is "
                         "wrong.", self.uid[:8], tuple(self._subtrahend.shape), shape[-2:])
        # "STREAM:" frames come by stream_resource/stream_datum; any other "external"
        # ("FILESTORE:") by a datum_id in the event; without "external", in the event
        where = str(data_keys[key].get("external") or "")
        external = where.startswith("STREAM:")
        with self._lock:
            self._descriptors[doc["uid"]] = {
                "external": external, "filestore": bool(where) and not external,
                # frames per event: what one stream_datum index stands for
                "frames": int(shape[0]) if len(shape) == 3 and shape[0] else 1}
        return doc

    def stream_resource(self, doc: StreamResource) -> StreamResource:
        self._touch()
        self._seen.add(doc.get("uid"))
        if doc.get("data_key") == self.config.data_key:
            with self._lock:
                self._resources[doc["uid"]] = doc
        return doc

    def stream_datum(self, doc: StreamDatum) -> StreamDatum:
        """Submit one future per point whose rows this datum names."""
        received = time.monotonic()
        self._touch()
        resource = self._resources.get(doc.get("stream_resource"))
        if doc.get("stream_resource") not in self._seen:
            self._out_of_order("a stream_datum", "stream_resource", doc.get("stream_resource"))
        desc = self._descriptors.get(doc.get("descriptor"))
        if resource is None or desc is None:
            return doc
        try:
            points = hdf5_rows(resource, doc, self.root_map, self.data_roots, desc["frames"])
        except ScanError as exc:  # e.g. not an HDF5 file: these points cannot be read
            seq = doc.get("seq_nums") or {}
            for point in range(int(seq.get("start", 1)) - 1, int(seq.get("stop", 1)) - 1):
                self._fail_new(point, str(exc), received)
            return doc
        for point, rows in points:
            self._accept(point, rows, received)
        return doc

    def event(self, doc: Event) -> Event:
        """Submit the point's future if its frames are inline."""
        received = time.monotonic()
        self._touch()
        desc = self._descriptors.get(doc["descriptor"])
        if doc["descriptor"] not in self._seen:
            self._out_of_order("an event", "descriptor", doc["descriptor"])
        if desc is not None:
            key = self.config.data_key
            if desc["external"]:
                with self._lock:
                    self._external_events.add(doc["seq_num"] - 1)
            elif desc["filestore"]:
                self._accept_reference(doc["seq_num"] - 1, doc["data"].get(key),
                                       doc.get("filled", {}).get(key), received)
            else:
                self._accept_inline(doc["seq_num"] - 1, doc["data"].get(key),
                                    doc.get("filled", {}).get(key), received)
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        """As :meth:`event`, for each event of the page."""
        received = time.monotonic()
        self._touch()
        desc = self._descriptors.get(doc["descriptor"])
        if desc is not None and desc["external"]:
            with self._lock:
                self._external_events.update(s - 1 for s in doc["seq_num"])
        elif desc is not None:
            key = self.config.data_key
            values = doc["data"].get(key)
            filled = doc.get("filled", {}).get(key)
            accept = self._accept_reference if desc["filestore"] else self._accept_inline
            for i, seq_num in enumerate(doc["seq_num"]):
                accept(seq_num - 1, None if values is None else values[i],
                       None if filled is None else filled[i], received)
        return doc

    def resource(self, doc: Resource) -> Resource:
        """Keep a legacy resource (an ophyd v1 area detector's file) until its datums come."""
        self._touch()
        self._seen.add(doc.get("uid"))
        with self._lock:
            self._legacy[doc["uid"]] = doc
        return doc

    def datum(self, doc: Datum) -> Datum:
        """Keep the datum until an event names it; map its point if the event came first."""
        received = time.monotonic()
        self._touch()
        datum_id = doc.get("datum_id")
        with self._lock:
            waiting = self._awaiting.pop(datum_id, None)
            if waiting is None:
                self._datums[datum_id] = doc
        if waiting is not None:
            self._accept_datum(waiting[0], doc, min(waiting[1], received))
        return doc

    def datum_page(self, doc: DatumPage) -> DatumPage:
        """As :meth:`datum`, for each datum of the page."""
        for datum in unpack_datum_page(doc):
            self.datum(datum)
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        """Note the stop; the final maps are written once every queued point is done."""
        self._touch()
        with self._lock:
            awaiting, self._awaiting = self._awaiting, {}
            self._datums.clear()
        for datum_id, (point, received) in sorted(awaiting.items(), key=lambda item: item[1]):
            self._fail_new(point, f"its event names datum {str(datum_id)[:80]!r}, which this "
                                  "run never sent", received)
        with self._changed:
            self.stop_doc = doc
            self._changed.notify_all()
        logger.info("run %s stopped (%s) after %d points; %d still queued",
                    self.uid[:8] if self.uid else "?", doc.get("exit_status"),
                    len(self._points.received), self.queued)
        return doc

    # -------------------------------------------------------------- internals

    def _out_of_order(self, what: str, kind: str, uid) -> None:
        """Log (once per uid) a document that names a document this run has not sent."""
        if uid in self._unknown:
            return
        self._unknown.add(uid)
        logger.error("run %s: %s names %s %r, which this run has not sent (documents out of "
                     "order, or the server started mid-run); it is skipped, and its points are "
                     "not mapped. Publish the documents in the order the RunEngine emits them.",
                     self.uid[:8] if self.uid else "?", what, kind, str(uid)[:40])

    def _accept_reference(self, point, value, filled, received) -> None:
        """An event of a FILESTORE key: its value is a datum_id (or frames, once filled).

        Without a value, the frames come by ``stream_datum`` (a run TiledWriter stored
        keeps the descriptor's ``FILESTORE:`` but converts its datums to stream_datums)."""
        if value is None and not filled:
            with self._lock:
                self._external_events.add(point)
            return
        if filled is True or not isinstance(value, str):
            self._accept_inline(point, value, filled, received)
            return
        with self._lock:
            datum = self._datums.pop(value, None)
            if datum is None:
                self._awaiting[value] = (point, received)  # its datum may come next
                return
        self._accept_datum(point, datum, received)

    def _accept_datum(self, point: int, datum: dict, received: float) -> None:
        """The point's rows, from its datum and the datum's resource (checked once per file)."""
        uid = datum.get("resource")
        with self._lock:
            file = self._legacy_files.get(uid)
            resource = self._legacy.get(uid)
        if file is None:
            if resource is None:
                self._out_of_order("a datum", "resource", uid)
                self._fail_new(point, f"its datum {str(datum.get('datum_id'))[:80]!r} names "
                                      f"resource {str(uid)[:40]!r}, which this run has not "
                                      "sent", received)
                return
            try:
                file = resource_file(resource, self.root_map, self.data_roots)
            except ScanError as exc:  # another spec, or a file outside the data roots
                file = str(exc)
                logger.error("run %s: resource %s: %s", self.uid[:8] if self.uid else "?",
                             str(uid)[:40], exc)
            with self._lock:
                self._legacy_files[uid] = file
        if isinstance(file, str):
            self._fail_new(point, file, received)
            return
        try:
            rows = datum_rows(file, datum)
        except ScanError as exc:
            self._fail_new(point, str(exc), received)
            return
        self._accept(point, rows, received)

    def _accept_inline(self, point, value, filled, received) -> None:
        if value is None or isinstance(value, str) or filled is False:
            self._fail_new(point, f"event has no frames under {self.config.data_key!r} (got "
                                  f"{value!r}); fill Resource/Datum references with "
                                  "event_model.Filler before the processor.", received)
            return
        self._accept(point, value, received)
