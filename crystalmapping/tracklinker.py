"""TrackLinker: the tutorial's third callback, linking a run's peaks into tracks at its stop.

Subscribed to a :class:`~crystalmapping.callbacks.PeakTracker`, it collects the
peaks of each run, links them at the stop document
(:func:`crystalmapping.link.link_peaks`) and emits, and records in ``db``, a
derived run with one event per linked peak. :mod:`crystalmapping.callbacks`
describes the chain and exports it.
"""

from __future__ import annotations

import logging
import warnings

import pandas as pd

from .config import LinkOptions
from .errors import ConfigTypeError, NoPeaksWarning, ScanError
from .grid import Grid
from .link import link_peaks
from .locate import PEAK_COLUMNS
from .stage import Stage, python_scalar

__all__ = ["TrackLinker"]

logger = logging.getLogger(__name__)


class TrackLinker(Stage):
    """Link the peaks of a run into tracks at its stop document; emit and record them.

    Parameters
    ----------
    db : object with ``insert(name, doc)``, optional
        Where the derived run is recorded, e.g. a :class:`crystalmapping.Catalog`.
        Every document this callback emits is recorded once, even if
        ``db.insert`` is also subscribed (as in the tutorial). The run is
        written when it is complete, at the stop document: with ``db.ingest``
        (one batched write, as :meth:`crystalmapping.Catalog.ingest`) when ``db``
        has it, else one ``db.insert`` per document.
    search_range : float
        Largest detector distance (pixels) a peak moves between linked points
        (``trackpy.link``'s ``search_range``).
    stream : str
        The stream of peaks to link.
    **link_keywords
        Other keywords of :class:`~crystalmapping.config.LinkOptions`
        (``memory``, ...), checked here. ``linker`` defaults to ``"trackpy"``,
        the tutorial's.

    Notes
    -----
    The derived run's events are the peaks of the input run sorted by
    ``frame``, each with the input's columns plus ``particle`` (int, tracks
    numbered from 0 in order of first appearance), as
    :func:`crystalmapping.link.link_peaks` returns them. If linking fails, the
    derived run is closed with ``exit_status="fail"`` (and recorded) and the
    error is raised.
    """

    analysis_stage = "TrackLinker"

    def __init__(self, db=None, search_range: float = 50, *, stream: str = "primary",
                 **link_keywords):
        super().__init__(stream=stream)
        if db is not None and not callable(getattr(db, "insert", None)):
            raise ConfigTypeError(
                f"db must have an insert(name, doc) method (e.g. crystalmapping.Catalog(...)), "
                f"got {db!r}."
            )
        self.db = db
        keywords = dict(search_range=search_range, **link_keywords)
        keywords.setdefault("linker", "trackpy")  # the tutorial's algorithm
        self.options = LinkOptions.from_dict(keywords)
        self.link_keywords = keywords
        self._unrecorded: dict[str, list] = {}  # derived run uid -> its documents
        self._run_of_output: dict[str, str] = {}  # derived descriptor uid -> run uid

    def __repr__(self) -> str:
        return f"TrackLinker(search_range={self.options.search_range!r}, db={self.db!r})"

    def _parameters(self) -> dict:
        return {"link": self.options.to_dict()}

    def emit(self, name: str, doc: dict) -> None:
        insert = None if self.db is None else self.db.insert
        for callback in list(self._callbacks):
            if insert is None or callback != insert:  # db.insert subscribed too: record once
                callback(name, doc)
        if self.db is not None:
            self._record(name, doc)

    def _record(self, name: str, doc: dict) -> None:
        if not callable(getattr(self.db, "ingest", None)):
            self.db.insert(name, doc)
            return
        # Everything but the start is emitted at the stop: write the run in one batch then.
        if name == "start":
            run_uid = doc["uid"]
            self._unrecorded[run_uid] = []
        elif name == "event":
            run_uid = self._run_of_output[doc["descriptor"]]
        else:
            run_uid = doc["run_start"]
        if name == "descriptor":
            self._run_of_output[doc["uid"]] = run_uid
        self._unrecorded[run_uid].append((name, doc))
        if name == "stop":
            documents = self._unrecorded.pop(run_uid)
            for other, d in documents:
                if other == "descriptor":
                    self._run_of_output.pop(d["uid"], None)
            self.db.ingest(documents)

    def _on_descriptor(self, state, doc):
        keys = list(doc.get("data_keys", {}))
        missing = [k for k in ("y", "x", "frame") if k not in keys]
        if missing:
            raise ScanError(
                f"TrackLinker needs peaks with y, x and frame; the {doc.get('name')!r} stream of "
                f"run {doc['run_start'][:8]} lacks {missing} (its keys are {sorted(keys)}). "
                "Subscribe it to a PeakTracker: pt.subscribe(tl)."
            )
        if state.keys is None:
            state.keys = keys
        else:
            state.keys += [k for k in keys if k not in state.keys]
        return doc  # the output descriptor is composed at the stop, with the linked columns

    def _on_event(self, state, out, doc):
        state.rows.append(dict(doc["data"]))

    def _on_stop(self, state, doc):
        keys = state.keys or list(PEAK_COLUMNS)
        table = pd.DataFrame(state.rows, columns=keys)
        if "frame" in table:
            table["frame"] = table["frame"].astype("int64")
        keywords = dict(self.link_keywords)
        if self.options.linker != "trackpy":
            keywords["grid"] = Grid.from_start(state.parent)  # other linkers place peaks on it
        if not len(table):  # no peak in the run: typed columns, so the descriptor is valid
            table = table.astype({c: "int64" if c == "frame" else "float64" for c in keys})
        linked = link_peaks(table, **keywords)
        if not len(linked):
            linked = linked.astype({c: "int64" if c in ("frame", "particle") else "float64"
                                    for c in linked.columns if linked[c].dtype.kind == "O"})
        logger.info("TrackLinker: %d peaks of run %s in %d tracks", len(linked),
                    state.parent["uid"][:8], linked["particle"].nunique())
        if not len(linked):
            warnings.warn(f"TrackLinker: run {state.parent['uid'][:8]} holds no peak to link.",
                          NoPeaksWarning, stacklevel=2)
        source = f"crystalmapping.{self.analysis_stage}"
        data_keys = {}
        for column in linked.columns:
            kind = linked[column].dtype.kind
            data_keys[column] = {"source": source, "shape": [],
                                 "dtype": "integer" if kind in "iu" else "number",
                                 "dtype_numpy": linked[column].dtype.str}
        bundle = state.bundle.compose_descriptor(name=self.stream, data_keys=data_keys)
        self.emit("descriptor", bundle.descriptor_doc)
        columns = list(linked.columns)
        for row in linked.itertuples(index=False):
            data = {c: python_scalar(v) for c, v in zip(columns, row)}
            self.emit("event", bundle.compose_event(data=data,
                                                    timestamps={c: doc["time"] for c in data}))
