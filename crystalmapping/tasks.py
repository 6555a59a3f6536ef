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

import threading
import time
from typing import Any, Sequence

import numpy as np

from .errors import ScanError
from .frames import read_frames
from .locate import locate_block
from .preprocess import IMAGE_DTYPE, preprocess_frames

__all__ = ["process_points", "process_point", "check_frames", "warm_up"]


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
    stack = None
    stats = np.empty((len(sources), 2))  # each image's max and sum, found while preprocessing
    for i, source in enumerate(sources):
        frames = check_frames(read_frames(source, timeout=read_timeout,
                                          buffer=_workspace("frames")), first + i)
        if stack is None:
            stack = _workspace("images")((len(sources),) + frames.shape[-2:], IMAGE_DTYPE)
        preprocess_frames(frames, subtrahend, warn_empty=False, out=stack[i], stats=stats[i])
    if stack is None:
        stack = np.empty((0, 0, 0), dtype=IMAGE_DTYPE)
    return locate_block(stack, int(first), options, stats)


_WORKSPACE = threading.local()


def _workspace(name: str):
    """``buffer(shape, dtype)``: an array kept for this thread's next task, reused when it fits.

    A full detector frame is tens of MB; a fresh array of that size costs its
    page faults on every point (about 10 ms per 50 MB here), the reused one
    does not. What a task returns never refers to it (the tables are copies).
    """
    def buffer(shape, dtype):
        kept = getattr(_WORKSPACE, name, None)
        if kept is not None and kept.shape == tuple(shape) and kept.dtype == dtype:
            return kept
        setattr(_WORKSPACE, name, None)  # the old one is freed before the new is made
        kept = np.empty(shape, dtype)
        setattr(_WORKSPACE, name, kept)
        return kept
    return buffer


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


def _warm_up_frames() -> tuple[np.ndarray, np.ndarray]:
    """Two small uint16 frames with a spot, a ridge and a spot on the ridge; a background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    signal = (400 * np.exp(-((yy - 30) ** 2 + (xx - 90) ** 2) / 8.0)
              + 200 * np.exp(-((yy - 80) ** 2) / 4.5)
              + 600 * np.exp(-((yy - 80) ** 2 + (xx - 40) ** 2) / 8.0))
    frames = rng.poisson(100 + signal, (2, 128, 128)).astype(np.uint16)
    return frames, rng.poisson(100, (2, 128, 128)).astype(np.uint16).mean(axis=0)


def warm_up(executor, options: dict) -> float:
    """Run a point's task once on every worker, so the first real point pays nothing extra.

    A new worker process imports the package and loads the compiled kernels
    on its first task (about a second each; a minute the first time on a
    machine, when they compile). A live server calls this before it listens,
    so the first points of the first scan are not late. The frames are small
    and synthetic, with a spot, a ridge and a spot on the ridge, so every
    path of the locator runs, with the dtypes of a real point (``uint16``
    frames, a ``float64`` background).

    Parameters
    ----------
    executor : distributed.Client or concurrent.futures.Executor
    options : dict
        The locate options of the points to come.

    Returns
    -------
    seconds : float
    """
    t = time.perf_counter()
    frames, subtrahend = _warm_up_frames()
    if hasattr(executor, "run") and hasattr(executor, "scheduler_info"):  # distributed.Client
        executor.run(process_point, frames, subtrahend, 0, options)
    else:
        executor.submit(process_point, frames, subtrahend, 0, options).result()
    return time.perf_counter() - t

