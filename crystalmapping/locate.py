"""Locate: the Bragg peaks of one preprocessed image, as a table.

:func:`locate_peaks` is the kernel (``trackpy.locate`` on one image);
:func:`locate_block` runs it on every image of a chunk and adds the point's
acquisition index (``frame``); :func:`locate_images` makes one
``dask.delayed`` task per chunk of a lazy image stack.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .config import LocateOptions

__all__ = ["PEAK_COLUMNS", "POINT_COLUMNS", "locate_peaks", "locate_block", "locate_images"]

logger = logging.getLogger(__name__)

#: Columns of a peak table, in order (trackpy's, then the point index).
PEAK_COLUMNS = ["y", "x", "mass", "size", "ecc", "signal", "raw_mass", "ep", "frame"]
#: Columns of the per-point summary that travels with the peaks.
POINT_COLUMNS = ["frame", "n_peaks", "image_max", "image_sum"]


def _quiet_trackpy():
    import trackpy

    trackpy.quiet()
    return trackpy


def locate_peaks(image: np.ndarray, *, diameter: int, frame: int | None = None,
                 **locate_keywords) -> pd.DataFrame:
    """Find the Bragg peaks of one image with ``trackpy.locate``.

    Parameters
    ----------
    image : (M, N) ndarray
        A preprocessed (non-negative) image.
    diameter : int
        Odd feature size in pixels (trackpy's ``diameter``).
    frame : int, optional
        Acquisition index of the point, written into the ``frame`` column.
    **locate_keywords
        Other keywords of :class:`~crystalmapping.config.LocateOptions`
        (``percentile``, ``separation``, ``minmass``, ...), validated there.
        Note that trackpy ignores maxima closer to the image edge than
        ``separation / 2`` (50 px with the tutorial's ``separation=100``).

    Returns
    -------
    peaks : DataFrame
        One row per peak with the columns :data:`PEAK_COLUMNS`: ``y``, ``x``
        (sub-pixel row and column, origin at the centre of pixel (0, 0)),
        ``mass``, ``size``, ``ecc``, ``signal``, ``raw_mass``, ``ep`` and
        ``frame``. An all-zero image gives an empty table.

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = 100 * np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 8.0)
    >>> peaks = locate_peaks(image, diameter=7, separation=10, frame=3)
    >>> peaks[["y", "x", "frame"]].round(1).values.tolist()
    [[20.0, 40.0, 3.0]]
    """
    options = LocateOptions(diameter=diameter, **locate_keywords)
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (M, N), got shape {image.shape}.")
    if not image.any():
        table = _empty_peaks()
    else:
        trackpy = _quiet_trackpy()
        table = trackpy.locate(image, **options.to_dict())
        table = table.reset_index(drop=True)
    for column in PEAK_COLUMNS:
        if column not in table:
            table[column] = np.nan
    table["frame"] = -1 if frame is None else int(frame)
    table = table[PEAK_COLUMNS].astype({c: "float64" for c in PEAK_COLUMNS if c != "frame"})
    return table.astype({"frame": "int64"})


def _empty_peaks() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in PEAK_COLUMNS})


def locate_block(images: np.ndarray, first_frame: int, options: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Locate peaks on each image of a chunk.

    Parameters
    ----------
    images : (P, M, N) ndarray
        Preprocessed images of ``P`` consecutive points.
    first_frame : int
        Acquisition index of the first of them.
    options : dict
        Keywords of :func:`locate_peaks`.

    Returns
    -------
    peaks : DataFrame
        The peak tables of the ``P`` images, concatenated.
    points : DataFrame
        One row per image with :data:`POINT_COLUMNS`: ``n_peaks``,
        ``image_max`` and ``image_sum`` (so all-zero images and empty points
        are counted, not lost).
    """
    tables, points = [], []
    for i, image in enumerate(images):
        frame = first_frame + i
        peaks = locate_peaks(image, frame=frame, **options)
        tables.append(peaks)
        points.append((frame, len(peaks), float(image.max(initial=0)), float(image.sum(dtype=np.float64))))
    peaks = pd.concat(tables, ignore_index=True) if tables else _empty_peaks()
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
