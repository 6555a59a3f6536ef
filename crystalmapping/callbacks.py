"""Callbacks: the tutorial's streaming algorithm as bluesky document callbacks.

Three callbacks, chained with ``.subscribe``, process a grid scan as its
documents arrive (from a ``RunEngine``, a 0MQ ``RemoteDispatcher``, or a stored
run replayed with :func:`replay`):

``ImageProcessor``
    averages the frames of each point, subtracts a background image and clips
    at zero (:func:`crystalmapping.preprocess.preprocess_frames`), and emits a
    new run with one image per point;
``PeakTracker``
    finds the Bragg peaks of each image (:func:`crystalmapping.locate.locate_peaks`
    with ``trackpy.locate``) and emits a new run with one event per peak;
``TrackLinker``
    collects the peaks and, at the stop document, links them into tracks
    (:func:`crystalmapping.link.link_peaks` with ``trackpy.link``) and emits a new
    run with one event per linked peak (its ``particle`` id), recorded in ``db``.

They call the batch pipeline's kernels, with the tutorial's algorithm
(``locator="trackpy"``, ``linker="trackpy"``) unless told otherwise, so a
replayed run gives exactly the peaks and tracks of those kernels run on its
frames. Each derived run's start document records ``analysis_stage`` (the
callback's name), ``parent_uid`` (the run it was made from), ``source_uid``
(the raw run), the grid (``shape``, ``extents``, ``snaking``, ``motors``) and
the ``analysis_parameters`` that ran.

Each callback subclasses :class:`event_model.DocumentRouter`, so it takes
``event`` and ``event_page`` documents alike (a ``RunRouter`` hands out pages),
and keeps its state per run (runs may interleave). An error while processing a
run is raised to the caller, and the derived run is closed with
``exit_status="fail"`` when its stop arrives.

Examples
--------
The tutorial's chain, fed here with a simulated scan's documents (frames inline)::

>>> from crystalmapping.callbacks import ImageProcessor, PeakTracker, TrackLinker
>>> from crystalmapping.sim import simulate_scan
>>> scan = simulate_scan(shape=(4, 3), detector_shape=(128, 128), grains=1, seed=1)
>>> ip = ImageProcessor("dexela_image", subtrahend=scan.expected_background())
>>> pt = PeakTracker("dexela_image", diameter=15, percentile=80, separation=100)
>>> tl = TrackLinker(search_range=50)
>>> ip.subscribe(pt).subscribe(tl)
TrackLinker(search_range=50, db=None)
>>> linked = []
>>> _ = tl.subscribe(lambda name, doc: linked.append(doc["data"]) if name == "event" else None)
>>> for name, doc in scan.documents(external=False):
...     _ = ip(name, doc)
>>> {"y", "x", "mass", "frame", "particle"} <= set(linked[0])  # one event per linked peak
True

On a stored run, with the derived runs recorded in a second catalog, as in
the tutorial (``bec`` prints a table of the processed points)::

>>> from bluesky.callbacks.best_effort import BestEffortCallback   # doctest: +SKIP
>>> from crystalmapping import Catalog                              # doctest: +SKIP
>>> from crystalmapping.callbacks import replay                     # doctest: +SKIP
>>> DB, DB2 = Catalog(), Catalog("sqlite:///analysis/catalog.db")   # doctest: +SKIP
>>> run = DB[uid]                                                   # doctest: +SKIP
>>> image = run.to_dataset()["dexela_image"][4523].values.mean(axis=0)  # doctest: +SKIP
>>> ip = ImageProcessor("dexela_image", subtrahend=image)            # doctest: +SKIP
>>> pt = PeakTracker("dexela_image", diameter=15, percentile=80, separation=100)  # doctest: +SKIP
>>> tl = TrackLinker(db=DB2, search_range=50)                       # doctest: +SKIP
>>> bec = BestEffortCallback(); bec.disable_plots()                 # doctest: +SKIP
>>> pt.subscribe(tl); pt.subscribe(DB2.insert)                      # doctest: +SKIP
>>> ip.subscribe(pt); ip.subscribe(bec)                             # doctest: +SKIP
>>> for name, doc in replay(run):                                   # doctest: +SKIP
...     ip(name, doc)
>>> DB2[-1].start["analysis_stage"]                                 # doctest: +SKIP
'TrackLinker'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
from event_model import DocumentRouter, compose_run

from .config import LinkOptions, LocateOptions
from .errors import ConfigError, ConfigTypeError, EmptyImageWarning, NoPeaksWarning, ScanError
from .grid import Grid
from .link import link_peaks
from .locate import PEAK_COLUMNS, locate_peaks
from .preprocess import IMAGE_DTYPE, preprocess_frames

__all__ = ["ImageProcessor", "PeakTracker", "PeakTrackor", "TrackLinker", "replay", "GRID_KEYS"]

logger = logging.getLogger(__name__)

#: Start-document keys of the scan grid, copied from a run to the runs derived from it.
GRID_KEYS = ("shape", "extents", "snaking", "motors", "num_points")
#: Other start-document keys copied along when present (``BestEffortCallback``'s
#: summary line reads ``plan_type``, ``plan_name`` and ``scan_id``).
_COPIED_KEYS = GRID_KEYS + ("scan_id", "plan_type", "plan_name", "sample")

DocumentCallback = Callable[[str, dict], Any]


def _python(value):
    """A numpy scalar as the Python number it holds (documents stay JSON/msgpack-ready)."""
    return value.item() if isinstance(value, np.generic) else value


def _filter_hints(hints: Mapping | None, keys) -> dict:
    """Descriptor hints restricted to the fields that are still there."""
    out = {}
    for obj, value in dict(hints or {}).items():
        if isinstance(value, Mapping) and "fields" in value:
            fields = [f for f in value["fields"] if f in keys]
            if fields:
                out[obj] = {**value, "fields": fields}
    return out


@dataclasses.dataclass
class _RunState:
    """What a callback knows about one input run while it is open."""

    parent: dict
    bundle: Any  # event_model.ComposeRunBundle of the derived run
    descriptors: dict = dataclasses.field(default_factory=dict)  # input uid -> output bundle
    n_events: int = 0
    n_out: int = 0
    n_empty: int = 0
    rows: list = dataclasses.field(default_factory=list)
    keys: list | None = None
    error: str | None = None  # the first error raised while processing this run

    @contextlib.contextmanager
    def failing(self):
        """Record the first error raised inside (and raise it): the derived run then fails."""
        try:
            yield
        except Exception as exc:
            if self.error is None:
                self.error = repr(exc)
            raise


class _Stage(DocumentRouter):
    """Base of the callbacks: subscriptions, per-run state, the derived run's start and stop."""

    #: The ``analysis_stage`` recorded in the derived run's start document.
    analysis_stage = "stage"

    def __init__(self, *, stream: str = "primary"):
        super().__init__()
        if not isinstance(stream, str) or not stream:
            raise ConfigTypeError(
                f"stream must be a stream name such as 'primary', got {stream!r}.")
        self.stream = stream
        self._callbacks: list[DocumentCallback] = []
        self._runs: dict[str, _RunState] = {}
        self._run_of_descriptor: dict[str, str] = {}  # every descriptor uid -> its run
        self._warned_unknown: set[str] = set()

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, callback: DocumentCallback) -> DocumentCallback:
        """Send every document this callback emits to ``callback(name, doc)``.

        Returns ``callback``, so chains read left to right:
        ``ip.subscribe(pt).subscribe(tl)``. References are strong (a lambda
        stays subscribed).
        """
        if not callable(callback):
            raise ConfigTypeError(
                f"subscribe takes a callable f(name, doc), e.g. another callback or "
                f"catalog.insert; got {callback!r}."
            )
        self._callbacks.append(callback)
        return callback

    def unsubscribe(self, callback: DocumentCallback) -> None:
        """Stop sending documents to ``callback``."""
        self._callbacks = [cb for cb in self._callbacks if cb is not callback and cb != callback]

    def emit(self, name: str, doc: dict) -> None:
        """Send one derived document to the subscribers, in subscription order."""
        for callback in list(self._callbacks):
            callback(name, doc)

    # -- derived run ----------------------------------------------------------------

    def _parameters(self) -> dict:
        return {}

    def start(self, doc):
        parent_uid = doc["uid"]
        metadata = {k: doc[k] for k in _COPIED_KEYS if k in doc}
        metadata.update(
            analysis_stage=self.analysis_stage,
            parent_uid=parent_uid,
            source_uid=doc.get("source_uid", parent_uid),
            analysis_parameters=self._parameters(),
        )
        metadata.update(self._extra_start_metadata(doc))
        bundle = compose_run(metadata=metadata)
        self._runs[parent_uid] = _RunState(parent=dict(doc), bundle=bundle)
        self.emit("start", bundle.start_doc)

    def _extra_start_metadata(self, doc) -> dict:
        return {}

    def _warn_unknown(self, what: str) -> None:
        if what not in self._warned_unknown:
            self._warned_unknown.add(what)
            logger.warning("%s: ignoring documents of %s, whose start document it did not "
                           "receive (subscribed mid-run?)", self.analysis_stage, what)

    def descriptor(self, doc):
        state = self._runs.get(doc["run_start"])
        if state is None:
            self._warn_unknown(f"run {doc['run_start'][:8]}")
            return
        self._run_of_descriptor[doc["uid"]] = doc["run_start"]
        if doc.get("name") != self.stream:
            return  # another stream (baseline...): its events are ignored
        with state.failing():
            state.descriptors[doc["uid"]] = self._on_descriptor(state, doc)

    def _on_descriptor(self, state: _RunState, doc: dict):
        raise NotImplementedError

    def event(self, doc):
        run_start = self._run_of_descriptor.get(doc["descriptor"])
        if run_start is None:
            self._warn_unknown(f"descriptor {doc['descriptor'][:8]}")
            return
        state = self._runs[run_start]
        out = state.descriptors.get(doc["descriptor"])
        if out is None:
            return  # a stream this callback ignores, or a descriptor it refused
        state.n_events += 1
        with state.failing():
            self._on_event(state, out, doc)

    def _on_event(self, state: _RunState, out, doc: dict) -> None:
        raise NotImplementedError

    def stop(self, doc):
        state = self._runs.pop(doc["run_start"], None)
        if state is None:
            return
        for uid in [u for u, r in self._run_of_descriptor.items() if r == doc["run_start"]]:
            del self._run_of_descriptor[uid]
        try:
            with state.failing():
                if state.error is None:
                    self._on_stop(state, doc)
        finally:
            if state.error is not None:
                self._emit_stop(state, doc, exit_status="fail",
                                reason=f"{self.analysis_stage} failed: {state.error}")
            else:
                self._emit_stop(state, doc)

    def _on_stop(self, state: _RunState, doc: dict) -> None:
        pass

    def _emit_stop(self, state: _RunState, doc: dict, exit_status: str | None = None,
                   reason: str | None = None) -> None:
        status = exit_status or doc.get("exit_status", "success")
        if reason is None:
            reason = doc.get("reason", "") or ""
        self.emit("stop", state.bundle.compose_stop(exit_status=status, reason=reason))

    # -- helpers ------------------------------------------------------------------

    def _require_key(self, doc: dict, key: str, hint: str) -> dict:
        data_keys = doc.get("data_keys", {})
        if key not in data_keys:
            raise ScanError(
                f"{self.analysis_stage}: data key {key!r} is not in the {doc.get('name')!r} "
                f"stream of run {doc.get('run_start', '?')[:8]}; its data keys are "
                f"{sorted(data_keys)}. {hint}"
            )
        return data_keys[key]


# ----------------------------------------------------------------------------- stages


class ImageProcessor(_Stage):
    """Average each point's frames, subtract a background, clip at zero; emit the images.

    Parameters
    ----------
    data_key : str
        Data key of the detector frames (``(K, M, N)`` or ``(M, N)`` per event),
        e.g. ``"dexela_image"``. The images keep this key in the derived run.
    subtrahend : (M, N) ndarray, optional
        Background image (dark current and air scattering), e.g. the mean frame
        of a point where the beam misses the sample. None: no subtraction.
    stream : str
        The stream to process; documents of other streams are ignored.

    Notes
    -----
    The derived run has one event per input event, with the same ``seq_num``:
    ``data[data_key]`` is the ``(M, N)`` float32 image (a numpy array) and the
    scalar data keys of the input (motor positions, ``dexela_stats1_total``...)
    ride along. Its start document records ``analysis_stage="ImageProcessor"``,
    ``parent_uid``, ``source_uid``, the grid and the start's ``hints``.

    Raises
    ------
    ScanError
        At the descriptor, if ``data_key`` is not one of its data keys.
    ConfigError
        If ``subtrahend``'s shape differs from the frames'.
    """

    analysis_stage = "ImageProcessor"

    def __init__(self, data_key: str, subtrahend: np.ndarray | None = None, *,
                 stream: str = "primary"):
        super().__init__(stream=stream)
        if not isinstance(data_key, str) or not data_key:
            raise ConfigTypeError(f"data_key must be a non-empty string, got {data_key!r}.")
        self.data_key = data_key
        if subtrahend is not None:
            subtrahend = np.asarray(subtrahend)
            if subtrahend.ndim != 2:
                raise ConfigError(
                    f"subtrahend must be one (M, N) image, got shape {subtrahend.shape}; "
                    "average frames first, e.g. frames.mean(axis=0)."
                )
            if not np.issubdtype(subtrahend.dtype, np.number):
                raise ConfigTypeError(
                    f"subtrahend must hold numbers, got dtype {subtrahend.dtype}.")
        self.subtrahend = subtrahend

    def __repr__(self) -> str:
        shape = None if self.subtrahend is None else self.subtrahend.shape
        return f"ImageProcessor({self.data_key!r}, subtrahend=<{shape}>)"

    def _parameters(self) -> dict:
        sub = self.subtrahend
        return {
            "data_key": self.data_key,
            "subtrahend_shape": None if sub is None else list(sub.shape),
            "subtrahend_mean": None if sub is None else float(sub.mean()),
        }

    def _extra_start_metadata(self, doc) -> dict:
        # The motor columns ride along, so the parent's dimension hints still hold.
        return {"hints": doc["hints"]} if "hints" in doc else {}

    def _on_descriptor(self, state, doc):
        key = self.data_key
        spec = self._require_key(
            doc, key, "Pass one of them: ImageProcessor('<key>', subtrahend=...).")
        shape = [int(n) for n in spec.get("shape") or []]
        if len(shape) not in (0, 2, 3):
            raise ScanError(
                f"ImageProcessor: {key!r} must hold (K, M, N) frames or one (M, N) image per "
                f"event, but the descriptor gives the shape {shape}."
            )
        if shape and self.subtrahend is not None and self.subtrahend.shape != tuple(shape[-2:]):
            raise _subtrahend_shape_error(self.subtrahend.shape, shape, key)
        scalars = [k for k, v in doc["data_keys"].items()
                   if k != key and not v.get("shape") and not v.get("external")]
        image_shape = shape[-2:] if shape else (
            list(self.subtrahend.shape) if self.subtrahend is not None else [])
        data_keys = {key: {"source": f"crystalmapping.{self.analysis_stage}", "dtype": "array",
                           "dtype_numpy": np.dtype(IMAGE_DTYPE).str, "shape": image_shape}}
        for k in scalars:
            data_keys[k] = dict(doc["data_keys"][k])
        object_keys = {obj: [k for k in keys if k in data_keys]
                       for obj, keys in (doc.get("object_keys") or {}).items()}
        object_keys = {obj: keys for obj, keys in object_keys.items() if keys}
        bundle = state.bundle.compose_descriptor(
            name=self.stream, data_keys=data_keys, object_keys=object_keys or None,
            hints=_filter_hints(doc.get("hints"), data_keys))
        self.emit("descriptor", bundle.descriptor_doc)
        return bundle, scalars

    def _on_event(self, state, out, doc):
        bundle, scalars = out
        data = doc["data"]
        if self.data_key not in data:
            raise ScanError(
                f"ImageProcessor: event {doc.get('seq_num')} has no {self.data_key!r} data; its "
                f"frames are external (StreamResource/StreamDatum) and were not filled. Feed the "
                "run through crystalmapping.callbacks.replay(run), which fills them."
            )
        frames = np.asarray(data[self.data_key])
        if self.subtrahend is not None and frames.shape[-2:] != self.subtrahend.shape:
            raise _subtrahend_shape_error(self.subtrahend.shape, frames.shape, self.data_key)
        image = preprocess_frames(frames, self.subtrahend, warn_empty=False)
        if not image.any():
            state.n_empty += 1
        out_data = {self.data_key: image}
        out_data.update((k, data[k]) for k in scalars)
        timestamps = {k: doc["timestamps"].get(k, doc["time"]) for k in out_data}
        self.emit("event", bundle.compose_event(data=out_data, timestamps=timestamps,
                                             seq_num=doc["seq_num"], filled={}))

    def _on_stop(self, state, doc):
        if state.n_events > 1 and state.n_empty == state.n_events:
            warnings.warn(
                f"ImageProcessor: all {state.n_events} images of run "
                f"{state.parent['uid'][:8]} are zero after subtracting the subtrahend; it is "
                "at least as bright as every frame. Take it from an empty point of a scan "
                "with the same exposure.", EmptyImageWarning, stacklevel=2)


def _subtrahend_shape_error(sub_shape, frames_shape, key) -> ConfigError:
    """The error for a subtrahend whose shape is not the frames' (both shapes named)."""
    return ConfigError(
        f"ImageProcessor: subtrahend has shape {tuple(sub_shape)} but the frames of {key!r} "
        f"have shape {tuple(frames_shape)} (images of {tuple(frames_shape)[-2:]}). Take the "
        "subtrahend from the same detector, e.g. the mean frame of an empty grid point."
    )


class PeakTracker(_Stage):
    """Find the Bragg peaks of each image; emit one event per peak.

    Parameters
    ----------
    data_key : str
        Data key of the ``(M, N)`` images (an :class:`ImageProcessor`'s output).
    diameter, percentile, separation
        ``trackpy.locate``'s keywords (the tutorial's defaults).
    stream : str
        The stream to process.
    **locate_keywords
        Other keywords of :class:`~crystalmapping.config.LocateOptions`
        (``minmass``, ``noise_size``, ...), checked here. ``locator`` defaults
        to ``"trackpy"``, the tutorial's.

    Notes
    -----
    Each event of the derived run holds one peak of
    :func:`crystalmapping.locate.locate_peaks`, with the columns
    :data:`crystalmapping.locate.PEAK_COLUMNS`: trackpy's ``y``, ``x`` (row and
    column, origin at the centre of pixel (0, 0)), ``mass``, ``size``, ``ecc``,
    ``signal``, ``raw_mass``, ``ep``, and ``frame``: the point's index in
    acquisition order, ``seq_num - 1``. Images without peaks emit nothing.
    """

    analysis_stage = "PeakTracker"

    def __init__(self, data_key: str, diameter: int = 15, percentile: float = 80,
                 separation: float | None = 100, *, stream: str = "primary", **locate_keywords):
        super().__init__(stream=stream)
        if not isinstance(data_key, str) or not data_key:
            raise ConfigTypeError(f"data_key must be a non-empty string, got {data_key!r}.")
        self.data_key = data_key
        keywords = dict(diameter=diameter, percentile=percentile, separation=separation,
                        **locate_keywords)
        keywords.setdefault("locator", "trackpy")  # the tutorial's algorithm
        self.options = LocateOptions.from_dict(keywords)  # validates, lists valid keywords
        self.locate_keywords = keywords

    def __repr__(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.locate_keywords.items())
        return f"PeakTracker({self.data_key!r}, {kw})"

    def _parameters(self) -> dict:
        return {"data_key": self.data_key, "locate": self.options.to_dict()}

    def _on_descriptor(self, state, doc):
        spec = self._require_key(
            doc, self.data_key,
            "PeakTracker reads the images of an ImageProcessor: subscribe it with "
            "ip.subscribe(pt), with the same data key.")
        shape = list(spec.get("shape") or [])
        if len(shape) not in (0, 2):
            raise ScanError(
                f"PeakTracker needs one (M, N) image per event in {self.data_key!r}, but the "
                f"descriptor gives the shape {shape}. Average the frames first: "
                "ImageProcessor(data_key, subtrahend=...).subscribe(pt)."
            )
        data_keys = {c: {"source": f"crystalmapping.{self.analysis_stage}", "shape": [],
                         "dtype": "number", "dtype_numpy": "<f8"} for c in PEAK_COLUMNS}
        data_keys["frame"].update(dtype="integer", dtype_numpy="<i8")
        bundle = state.bundle.compose_descriptor(name=self.stream, data_keys=data_keys)
        self.emit("descriptor", bundle.descriptor_doc)
        return bundle

    def _on_event(self, state, out, doc):
        image = np.asarray(doc["data"][self.data_key])
        if image.ndim != 2:
            raise ScanError(
                f"PeakTracker needs one (M, N) image per event, got shape {image.shape} in "
                f"event {doc.get('seq_num')}; subscribe it to an ImageProcessor."
            )
        frame = int(doc["seq_num"]) - 1
        peaks = locate_peaks(image, frame=frame, **self.locate_keywords)
        logger.debug("point %d: %d peaks", frame, len(peaks))
        now = doc["time"]
        for row in peaks.itertuples(index=False):
            data = {c: _python(v) for c, v in zip(peaks.columns, row)}
            self.emit("event", out.compose_event(data=data, timestamps={c: now for c in data}))
            state.n_out += 1

    def _on_stop(self, state, doc):
        if state.n_events and not state.n_out:
            warnings.warn(
                f"PeakTracker found no peak in the {state.n_events} images of run "
                f"{state.parent['uid'][:8]}; lower percentile or minmass, or check the "
                "subtrahend.", NoPeaksWarning, stacklevel=2)


class TrackLinker(_Stage):
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
            data = {c: _python(v) for c, v in zip(columns, row)}
            self.emit("event", bundle.compose_event(data=data,
                                                    timestamps={c: doc["time"] for c in data}))


# ----------------------------------------------------------------------------- replay


def replay(run, *, data_key: str | None = None, stream: str = "primary",
           points_per_read: int | None = None) -> Iterator[tuple[str, dict]]:
    """Yield a stored run's documents with the detector frames filled in.

    Parameters
    ----------
    run : crystalmapping.source.Run
        A run of a :class:`crystalmapping.Catalog`.
    data_key : str, optional
        The image key to read lazily (other keys holding arrays are read
        whole). Default: every data key holding a 2-D or 3-D array per event.
    stream : str
        The stream to replay.
    points_per_read : int, optional
        Points whose frames are read in one request (one request per point is
        slow; a few per request are read at once and yielded one by one).
        Default: as many as fit in 64 MiB, at most 16.

    Yields
    ------
    name, doc : str, dict
        ``start``; the stream's descriptor(s), as stored; one ``event`` per
        point, in acquisition order, whose ``data`` holds the frames as numpy
        arrays and the scalars as Python numbers (``filled`` is True for keys
        the descriptor marks external); ``stop`` if the run has one. Frames
        stored inline and frames in external HDF5 files (StreamResource /
        StreamDatum) are both read through the catalog; no resource documents
        are yielded.

    Raises
    ------
    ScanError
        If the run has no such stream or data key.

    Notes
    -----
    Frames are read when their events are reached, ``points_per_read`` points
    at a time, so a large scan streams in bounded memory. The scalar columns
    are read once. Events reference the first descriptor of the stream.
    Per-key timestamps come from the catalog where it has them, else the
    event time.
    """
    import dask

    start = dict(run.start)
    if not start:
        raise ScanError(f"{run!r} has no start document; it cannot be replayed.")
    descriptors = _descriptors(run, stream)
    data_keys: dict[str, dict] = {}
    for desc in descriptors:
        data_keys.update(desc.get("data_keys", {}))
    if data_key is not None and data_key not in data_keys:
        raise ScanError(
            f"replay: run {run.uid[:8]} has no data key {data_key!r} in stream {stream!r}; its "
            f"keys are {sorted(data_keys)}. Pass data_key= one of them, or None for all images."
        )
    image_keys = [data_key] if data_key is not None else [
        k for k, v in data_keys.items() if len(v.get("shape") or []) in (2, 3)]
    if points_per_read is None:
        point_bytes = sum(int(np.prod(data_keys[k].get("shape") or [1])) *
                          np.dtype(data_keys[k].get("dtype_numpy") or "<f8").itemsize
                          for k in image_keys)
        points_per_read = int(min(16, max(1, _READ_BYTES // max(point_bytes, 1))))
    if int(points_per_read) < 1:
        raise ConfigError(f"points_per_read must be >= 1, got {points_per_read}.")
    step = int(points_per_read)
    datasets = {k: run.to_dataset(k, stream=stream, points_per_chunk=step) for k in image_keys}
    ds = next(iter(datasets.values())) if datasets else run.to_dataset(None, stream=stream)
    images = {k: datasets[k][k].data for k in image_keys}
    # to_dataset gives 2-D images per event a frame axis of length 1: drop it again.
    squeeze = {k: len(data_keys[k].get("shape") or []) == 2 for k in image_keys}
    other = [k for k in ds.data_vars if k not in images]
    with dask.config.set(scheduler="synchronous"):
        columns = dict(zip(other, dask.compute(*[ds[k].data for k in other])))
        seq_num, times = dask.compute(ds["seq_num"].data, ds["time"].data)
    stamps = _timestamps(run, stream, other + image_keys)
    external = {k for k in images if data_keys[k].get("external")}
    descriptor_uid = descriptors[0]["uid"]

    yield "start", start
    for desc in descriptors:
        yield "descriptor", dict(desc)
    for first in range(0, len(seq_num), step):
        with dask.config.set(scheduler="synchronous"):
            blocks = {k: np.asarray(var[first:first + step].compute()) for k, var in images.items()}
        for i in range(first, min(first + step, len(seq_num))):
            data = {k: _python(columns[k][i]) if np.ndim(columns[k][i]) == 0
                    else np.asarray(columns[k][i]) for k in other}
            for k, block in blocks.items():
                frames = block[i - first]
                data[k] = frames[0] if squeeze[k] else frames
            t = float(times[i])
            seq = int(seq_num[i])
            yield "event", {
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{descriptor_uid}/event/{seq}")),
                "descriptor": descriptor_uid,
                "seq_num": seq,
                "time": t,
                "data": data,
                "timestamps": {k: float(stamps[k][i]) if k in stamps else t for k in data},
                "filled": {k: True for k in external},
            }
        del blocks
    if run.stop:
        yield "stop", dict(run.stop)


#: Bytes of frames :func:`replay` reads per request by default.
_READ_BYTES = 64 * 2**20


def _descriptors(run, stream: str) -> list[dict]:
    node = run.tiled
    if stream not in node:
        raise ScanError(f"run {run.uid[:8]} has no stream {stream!r}; it has {list(node)}.")
    descriptors = [dict(d) for d in node[stream].descriptors]
    if not descriptors:
        raise ScanError(f"stream {stream!r} of run {run.uid[:8]} has no descriptor document.")
    return descriptors


def _timestamps(run, stream: str, keys) -> dict[str, np.ndarray]:
    node = run.tiled[stream]
    names = set(node)
    return {k: np.asarray(node[f"ts_{k}"].read()) for k in keys if f"ts_{k}" in names}


#: The tutorial's spelling (``from crystalmapping.callbacks import ImageProcessor,
#: PeakTrackor, TrackLinker`` in its ``server.py``), kept so that line runs as written.
PeakTrackor = PeakTracker
