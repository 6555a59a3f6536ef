"""Callbacks: the tutorial's streaming algorithm as bluesky document callbacks.

Three callbacks, chained with ``.subscribe``, process a grid scan as its
documents arrive (from a ``RunEngine``, a 0MQ ``RemoteDispatcher``, or a stored
run replayed with :func:`crystalmapping.playback.replay`):

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

Each callback subclasses :class:`crystalmapping.stage.Stage`, an
:class:`event_model.DocumentRouter`, so it takes ``event`` and ``event_page``
documents alike (a ``RunRouter`` hands out pages), and keeps its state per run
(runs may interleave). An error while processing a
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
>>> from crystalmapping import Catalog, replay                      # doctest: +SKIP
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

import logging
import warnings

import numpy as np

from .config import LocateOptions
from .errors import ConfigError, ConfigTypeError, EmptyImageWarning, NoPeaksWarning, ScanError
from .locate import PEAK_COLUMNS, locate_peaks
from .preprocess import IMAGE_DTYPE, preprocess_frames
from .stage import Stage, filter_hints, python_scalar
from .tracklinker import TrackLinker

__all__ = ["ImageProcessor", "PeakTracker", "PeakTrackor", "TrackLinker"]

logger = logging.getLogger(__name__)


class ImageProcessor(Stage):
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
            hints=filter_hints(doc.get("hints"), data_keys))
        self.emit("descriptor", bundle.descriptor_doc)
        return bundle, scalars

    def _on_event(self, state, out, doc):
        bundle, scalars = out
        data = doc["data"]
        if self.data_key not in data:
            raise ScanError(
                f"ImageProcessor: event {doc.get('seq_num')} has no {self.data_key!r} data; its "
                f"frames are external (StreamResource/StreamDatum) and were not filled. Feed the "
                "run through crystalmapping.replay(run), which fills them."
            )
        if isinstance(data[self.data_key], str):
            raise ScanError(
                f"ImageProcessor: event {doc.get('seq_num')} holds the datum reference "
                f"{data[self.data_key][:80]!r} under {self.data_key!r}, not frames (an ophyd v1 "
                "detector's Resource/Datum). Fill the documents first: filler = "
                "event_model.Filler(crystalmapping.references.HANDLERS, inplace=False), then "
                "ip(*filler(name, doc)) for each document."
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


class PeakTracker(Stage):
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
            data = {c: python_scalar(v) for c, v in zip(peaks.columns, row)}
            self.emit("event", out.compose_event(data=data, timestamps={c: now for c in data}))
            state.n_out += 1

    def _on_stop(self, state, doc):
        if state.n_events and not state.n_out:
            warnings.warn(
                f"PeakTracker found no peak in the {state.n_events} images of run "
                f"{state.parent['uid'][:8]}; lower percentile or minmass, or check the "
                "subtrahend.", NoPeaksWarning, stacklevel=2)


#: The tutorial's spelling (``from crystalmapping.callbacks import ImageProcessor,
#: PeakTrackor, TrackLinker`` in its ``server.py``), kept so that line runs as written.
PeakTrackor = PeakTracker
