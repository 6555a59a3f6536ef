"""Tasks: what one Dask task does with the frames of one grid point (or a few).

Read the frames where they are (:func:`crystalmapping.frames.read_frames`: rows
of an HDF5 file, a catalog reference, or inline frames), average them minus the
background (:func:`crystalmapping.preprocess.preprocess_frames`), locate the
Bragg peaks (:func:`crystalmapping.locate.locate_block`). The batch pipeline
(:func:`crystalmapping.process_run`) and the streaming processor
(:class:`crystalmapping.StreamProcessor`) both submit :func:`process_points`,
so a point gives the same peaks whichever way it was mapped. A task's
arguments are references (a few hundred bytes), never frames; the background
image arrives as a Dask future that each worker fetches once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import ScanError
from .frames import read_frames
from .locate import locate_block
from .preprocess import preprocess_frames

__all__ = ["process_points", "process_point", "check_frames"]


def process_points(sources: Sequence[Any], subtrahend: np.ndarray | None, first: int,
                   options: dict, *, read_timeout: float = 10.0):
    """Read, preprocess and locate consecutive grid points: the work of one task.

    Parameters
    ----------
    sources : sequence
        Where each point's frames are, in acquisition order (anything
        :func:`crystalmapping.frames.read_frames` reads: ``HDF5Rows``,
        :class:`crystalmapping.source.PointFrames`, or the frames themselves).
    subtrahend : (M, N) ndarray or None
        Background image.
    first : int
        Acquisition index of the first point.
    options : dict
        Keywords of :func:`crystalmapping.locate.locate_peaks`
        (``ProcessConfig.locate.to_dict()``).
    read_timeout : float
        Seconds to wait for frames that are not visible yet.

    Returns
    -------
    peaks, points : DataFrame
        As :func:`crystalmapping.locate.locate_block` returns for these images.
    """
    images = [preprocess_frames(check_frames(read_frames(source, timeout=read_timeout),
                                             first + i), subtrahend, warn_empty=False)
              for i, source in enumerate(sources)]
    if images:
        stack = np.stack(images)
    else:
        stack = np.empty((0, 0, 0), dtype=np.float32)
    return locate_block(stack, int(first), options)


def check_frames(frames: np.ndarray, point: int) -> np.ndarray:
    """``frames`` if they can be detector counts: for float frames, finite and >= 0.

    Integer frames always can; the test costs one pass over float frames only.

    Raises
    ------
    ScanError
        Naming the point and how many pixels are NaN, infinite or negative.
    """
    frames = np.asarray(frames)
    if frames.dtype.kind == "f":
        bad_value = int(np.count_nonzero(~np.isfinite(frames)))
        negative = int(np.count_nonzero(frames < 0))
        if bad_value or negative:
            raise ScanError(
                f"the frames of point {point} hold {bad_value} NaN or infinite and {negative} "
                "negative pixel values; detector counts are finite and >= 0. Check the "
                "detector's file (a dead module, a failed dark correction) and map the other "
                "points, or replace those pixels before mapping."
            )
    return frames


def process_point(source, subtrahend: np.ndarray | None, frame: int, options: dict, *,
                  read_timeout: float = 10.0):
    """:func:`process_points` for one point (acquisition index ``frame``)."""
    return process_points([source], subtrahend, frame, options, read_timeout=read_timeout)
