"""Locate: the Bragg peaks of one preprocessed image, as a table.

:func:`locate_peaks` is the kernel. Two locators share its output columns:

``"bragg"`` (the default)
    Band-pass the float image, take its local maxima, and keep a peak by
    physical rules: its height over the *local* noise of the image
    (``snr >= min_snr``) and its shape: a candidate more elongated than
    ``max_ecc`` (a segment of a powder ring is, a Bragg spot is round) is
    kept only if it also stands ``min_snr`` above the ridge it lies on (a
    Bragg spot on a powder ring). Every candidate it rejects
    is counted per image (``n_rejected_weak``, ``n_rejected_elongated``,
    ``n_rejected_close``, ``n_rejected_masked``), so
    nothing vanishes silently. It works on the float image throughout, so a
    weak peak is found next to a bright one or a hot pixel. It runs in
    compiled kernels (:mod:`crystalmapping.bragg`) that release the GIL.
``"trackpy"``
    ``trackpy.locate``, exactly as the tutorial runs it. trackpy rescales the
    band-passed float image to 8 bits relative to its brightest pixel before
    looking for maxima, so a peak weaker than 1/255 of the brightest pixel
    of its image is not found. Its peaks get an ``snr`` too, but none is
    rejected (except those touching the mask).

With a detector mask (``mask=``, :mod:`crystalmapping.mask`) masked pixels
never make a peak (they take the image's typical value before filtering),
stay out of the noise estimate, and a peak whose disk touches one is
rejected (``n_rejected_masked``).

:func:`locate_block` runs the kernel on every image of a chunk and adds the
point's acquisition index (``frame``); :func:`locate_images` makes one
``dask.delayed`` task per chunk of a lazy image stack.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pandas as pd

from ._bragg_filters import any_nonzero, max_and_sum
from .bragg import _once, bandpass, image_noise, locate_bragg, measure_at
from .config import LocateOptions
from .mask import fill_masked, load_mask, touching

__all__ = ["PEAK_COLUMNS", "POINT_COLUMNS", "locate_peaks", "locate_block", "locate_images",
           "bandpass", "image_noise"]

logger = logging.getLogger(__name__)

#: Columns of a peak table, in order (trackpy's, the fitted amplitude, the
#: signal-to-noise ratio, the point index).
PEAK_COLUMNS = ["y", "x", "mass", "size", "ecc", "signal", "raw_mass", "ep", "amplitude", "snr",
                "frame"]
#: Columns of the per-point summary that travels with the peaks.
POINT_COLUMNS = ["frame", "n_peaks", "image_max", "image_sum", "noise",
                 "n_rejected_weak", "n_rejected_elongated", "n_rejected_close",
                 "n_rejected_masked"]
#: The counts of an image where nothing was rejected.
NO_REJECTIONS = {"n_rejected_weak": 0, "n_rejected_elongated": 0, "n_rejected_close": 0,
                 "n_rejected_masked": 0}


def _quiet_trackpy():
    import trackpy

    trackpy.quiet()
    return trackpy


def _trackpy_options(options: LocateOptions) -> dict:
    kw = options.to_dict()
    for name in ("locator", "min_snr", "max_ecc", "mask"):
        kw.pop(name, None)
    return kw


#: trackpy's numba kernels compile on their first call in a process; two threads
#: compiling the same kernel at once fail with a KeyError inside numba. The
#: first call per image type and options runs alone.
_TRACKPY_COMPILE = threading.Lock()
_trackpy_compiled: set = set()


def _trackpy_locate(trackpy, image: np.ndarray, kw: dict) -> pd.DataFrame:
    key = (np.asarray(image).dtype.str, np.ndim(image), repr(sorted(kw.items())))
    if key in _trackpy_compiled:
        return trackpy.locate(image, **kw)
    with _TRACKPY_COMPILE:
        table = trackpy.locate(image, **kw)
        _trackpy_compiled.add(key)
    return table


def _locate_trackpy(image: np.ndarray, options: LocateOptions,
                    mask: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    trackpy = _quiet_trackpy()
    table = _trackpy_locate(trackpy, image, _trackpy_options(options)).reset_index(drop=True)
    masked = 0
    if mask is not None and len(table):
        near = touching(mask, table["y"], table["x"], options.diameter // 2)
        masked = int(near.sum())
        table = table[~near].reset_index(drop=True)
    # amplitude and snr, measured as the "bragg" locator does; nothing else is rejected.
    amplitude, snr, sigma = measure_at(image, table.get("y", []), table.get("x", []), options)
    table["amplitude"] = amplitude
    table["snr"] = snr
    return table, {"noise": sigma, **NO_REJECTIONS, "n_rejected_masked": masked}


def masked_image(image: np.ndarray, options: LocateOptions):
    """``(image, mask)``: the image with its masked pixels filled (a copy), and the mask;
    the image itself and None without a mask (or one with no bad pixel)."""
    if options.mask is None:
        return image, None
    mask = load_mask(options.mask, image.shape)
    if not mask.any():
        return image, None
    return fill_masked(image, mask), mask


def _locate(image: np.ndarray, options: LocateOptions) -> tuple[pd.DataFrame, dict]:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (M, N), got shape {image.shape}.")
    image, mask = masked_image(image, options)
    if not _any(image):
        table, counts = _empty_peaks(), {"noise": 0.0, **NO_REJECTIONS}
    elif options.locator == "trackpy":
        table, counts = _locate_trackpy(image, options, mask)
    else:
        table, counts = locate_bragg(image, options, mask)
    for column in PEAK_COLUMNS:
        if column not in table:
            table[column] = np.nan
    return table, counts


def locate_peaks(image: np.ndarray, *, diameter: int, frame: int | None = None,
                 **locate_keywords) -> pd.DataFrame:
    """Find the Bragg peaks of one image.

    Parameters
    ----------
    image : (M, N) ndarray
        A preprocessed (non-negative) image.
    diameter : int
        Odd feature size in pixels (trackpy's ``diameter``).
    frame : int, optional
        Acquisition index of the point, written into the ``frame`` column.
    **locate_keywords
        Other keywords of :class:`~crystalmapping.config.LocateOptions`:
        ``locator`` (``"bragg"`` or ``"trackpy"``), ``min_snr``, ``max_ecc``,
        ``separation``, ``minmass``, ``percentile`` (trackpy only)... validated
        there. trackpy ignores maxima closer to the image edge than
        ``separation / 2`` (50 px with the tutorial's ``separation=100``); the
        ``"bragg"`` locator does not.

    Returns
    -------
    peaks : DataFrame
        One row per peak with the columns :data:`PEAK_COLUMNS`: ``y``, ``x``
        (sub-pixel row and column, origin at the centre of pixel (0, 0)),
        ``mass`` (integrated band-passed intensity), ``size`` (radius of
        gyration), ``ecc`` (0 round, 1 a line), ``signal`` (band-passed height
        above the local background), ``raw_mass`` (integrated image minus its
        local background), ``ep`` (trackpy only), ``amplitude`` (height in
        counts of a Gaussian spot of width ``w = diameter / 6`` fitted to the
        image above its local background: the least noisy intensity of a
        faint peak; for a spot of Gaussian width ``s`` it reads
        ``2 s**2 / (s**2 + w**2)`` of the true height, a constant factor
        per peak), ``snr`` (``signal`` over the local noise of the
        band-passed image) and ``frame``. An all-zero image
        gives an empty table.

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = 100 * np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 8.0)
    >>> peaks = locate_peaks(image, diameter=7, separation=10, frame=3)
    >>> peaks[["y", "x", "frame"]].round(1).values.tolist()
    [[20.0, 40.0, 3.0]]
    """
    options = LocateOptions(diameter=diameter, **locate_keywords)
    table, _ = _locate(image, options)
    return _finish(table, frame)


def _any(image: np.ndarray) -> bool:
    """``image.any()``, in a compiled pass that stops at the first value not zero when it can."""
    if image.dtype.kind in "fiu" and image.flags.c_contiguous and image.size:
        return bool(_once(("any", image.dtype.str), any_nonzero, image))
    return bool(image.any())


def _finish(table: pd.DataFrame, frame: int | None) -> pd.DataFrame:
    """The table's :data:`PEAK_COLUMNS` as float64 (``frame``: int64, set to ``frame``)."""
    data = {c: table[c].to_numpy(dtype=np.float64) for c in PEAK_COLUMNS if c != "frame"}
    data["frame"] = np.full(len(table), -1 if frame is None else int(frame), dtype=np.int64)
    return pd.DataFrame(data, columns=PEAK_COLUMNS)


def _max_and_sum(image: np.ndarray) -> tuple[float, float]:
    """``image.max(initial=0)`` and the float64 sum, in one compiled pass when it can."""
    if image.dtype.kind == "f" and image.flags.c_contiguous and image.size:
        high, total = _once(("max_and_sum", image.dtype.str), max_and_sum, image)
        if np.isfinite(total):
            return float(high), float(total)
    return float(image.max(initial=0)), float(image.sum(dtype=np.float64))


def _empty_peaks() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in PEAK_COLUMNS})


def locate_block(images: np.ndarray, first_frame: int, options: dict,
                 stats: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Locate peaks on each image of a chunk.

    Parameters
    ----------
    images : (P, M, N) ndarray
        Preprocessed images of ``P`` consecutive points.
    first_frame : int
        Acquisition index of the first of them.
    options : dict
        Keywords of :func:`locate_peaks`.
    stats : (P, 2) ndarray, optional
        Each image's ``image_max`` and ``image_sum`` if already known
        (:func:`~crystalmapping.preprocess.preprocess_frames` finds them);
        found here otherwise, or where they are not finite.

    Returns
    -------
    peaks : DataFrame
        The peak tables of the ``P`` images, concatenated.
    points : DataFrame
        One row per image with :data:`POINT_COLUMNS`: ``n_peaks``,
        ``image_max``, ``image_sum`` (so all-zero images and empty points are
        counted, not lost), ``noise`` (standard deviation of the band-passed
        image's noise) and the candidates the locator rejected,
        ``n_rejected_weak`` (``snr < min_snr``), ``n_rejected_elongated``
        (``ecc > max_ecc``), ``n_rejected_close`` (closer than
        ``separation`` to a brighter peak) and ``n_rejected_masked`` (touching
        the detector mask).
    """
    opts = options if isinstance(options, LocateOptions) else LocateOptions(**options)
    tables, points = [], []
    for i, image in enumerate(images):
        frame = first_frame + i
        table, counts = _locate(image, opts)
        tables.append(_finish(table, frame))
        if stats is not None and np.isfinite(stats[i]).all():
            high, total = float(stats[i, 0]), float(stats[i, 1])
        else:
            high, total = _max_and_sum(image)
        points.append((frame, len(table), high, total, counts["noise"],
                       counts["n_rejected_weak"], counts["n_rejected_elongated"],
                       counts["n_rejected_close"], counts["n_rejected_masked"]))
    peaks = pd.concat(tables, ignore_index=True) if tables else _finish(_empty_peaks(), None)
    return peaks, pd.DataFrame(points, columns=POINT_COLUMNS)


def locate_images(images, options: LocateOptions | dict | None = None) -> list:
    """One ``dask.delayed`` locate task per chunk of a lazy image stack.

    Parameters
    ----------
    images : (P, M, N) dask array or xarray.DataArray
        Preprocessed images, chunked along the first axis only.
    options : LocateOptions or dict

    Returns
    -------
    tasks : list of Delayed
        Each computes to ``(peaks, points)`` as :func:`locate_block` returns.
    """
    import dask
    import dask.array as da

    if options is None:
        options = LocateOptions()
    elif not isinstance(options, LocateOptions):
        options = LocateOptions.from_dict(options)
    data = getattr(images, "data", images)
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"images must be a (point, y, x) stack, got shape {data.shape}.")
    if len(data.chunks[1]) != 1 or len(data.chunks[2]) != 1:
        data = data.rechunk({1: -1, 2: -1})
    kw = options.to_dict()
    starts = np.cumsum((0,) + data.chunks[0][:-1])
    blocks = data.to_delayed().ravel()
    return [
        dask.delayed(locate_block, pure=True, name=f"locate-{data.name}-{i}")(block, int(start), kw)
        for i, (block, start) in enumerate(zip(blocks, starts))
    ]
