"""Frames: read one grid point's frames where the detector wrote them.

A bluesky document stream carries a point's frames either inline (an array in
the event) or by reference: a ``stream_resource`` document names an HDF5 file
and dataset, and each ``stream_datum`` document names the rows written for
some events. :class:`HDF5Rows` is that reference for one point, small enough
to travel to a Dask worker; :func:`read_frames` reads it there, so big frames
never pass through the document stream or the process that routes documents.

Files are opened read-only in SWMR mode (single writer, multiple readers), so
rows can be read while the detector still appends to the file, and stay open
in a small per-process cache. Compressed area-detector files (Blosc, LZ4,
bitshuffle...) are read with the filters of ``hdf5plugin``. Only this module
(and :mod:`crystalmapping.source` for catalogs) knows the detector's file layout.

Which file and rows a document names (``stream_resource`` / ``stream_datum``,
ophyd v1 ``resource`` / ``datum``, root maps) is :mod:`crystalmapping.references`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CrystalMappingError

__all__ = ["HDF5Rows", "FrameReadError", "read_frames", "read_rows", "mean_frame",
           "close_files"]

logger = logging.getLogger(__name__)

#: Open files kept per process (least recently used ones are closed first).
_MAX_OPEN_FILES = 16
_FILES: "OrderedDict[str, Any]" = OrderedDict()
_FILES_LOCK = threading.RLock()


class FrameReadError(CrystalMappingError, OSError):
    """The frames a document points to cannot be read (file or rows missing)."""


class DamagedFileError(FrameReadError):
    """The file is there but is not a whole HDF5 file (truncated, or not HDF5 at all).

    Unlike a file this machine cannot reach, reading it another way (through the
    catalog) cannot give the frames the detector wrote.
    """


#: h5py's words for a file cut short or not HDF5.
_DAMAGED = ("truncated file", "file signature not found")


@dataclass(frozen=True)
class HDF5Rows:
    """Rows ``[start, stop)`` of an HDF5 dataset: the frames of one grid point.

    Parameters
    ----------
    path : str
        Absolute path of the HDF5 file.
    dataset : str
        Dataset inside the file, e.g. ``"/entry/data"``.
    start, stop : int
        Rows along the first axis of the dataset.
    per_index : int
        Frames each row stands for when the dataset stacks frames flat
        (``(n * per_index, M, N)``): a ``stream_datum``'s indices count events
        of ``per_index`` frames each (the descriptor's ``(K, M, N)`` shape, or
        a ``multiplier``), so rows ``[start * per_index, stop * per_index)``
        are read from a 3-D dataset. A 4-D ``(n, K, M, N)`` dataset is read by
        row as it is.
    """

    path: str
    dataset: str
    start: int
    stop: int
    per_index: int = 1



def _import_filters() -> None:
    """Register the compression filters of ``hdf5plugin`` (Blosc, LZ4, bitshuffle...) with
    HDF5, once per process; without it h5py cannot read compressed area-detector files."""
    global _FILTERS
    if _FILTERS is None:
        try:
            import hdf5plugin  # noqa: F401 - registers the filters on import
            _FILTERS = True
        except ImportError:  # pragma: no cover - uncompressed files still read
            logger.warning("hdf5plugin is not installed: compressed HDF5 frames cannot be read")
            _FILTERS = False


_FILTERS: bool | None = None


def _open(path: str):
    """An open read-only (SWMR when possible) h5py.File, cached per process."""
    import h5py

    _import_filters()
    f = _FILES.get(path)
    if f is not None and f.id.valid:
        _FILES.move_to_end(path)
        return f
    try:
        f = h5py.File(path, "r", swmr=True, libver="latest")
    except OSError:
        f = h5py.File(path, "r")  # a file not written for SWMR (closed, or an old layout)
    _FILES[path] = f
    while len(_FILES) > _MAX_OPEN_FILES:
        _, old = _FILES.popitem(last=False)
        old.close()
    return f


def _forget(path: str) -> None:
    f = _FILES.pop(path, None)
    if f is not None:
        f.close()


def close_files() -> None:
    """Close the HDF5 files this process keeps open."""
    with _FILES_LOCK:
        while _FILES:
            _FILES.popitem()[1].close()


def read_rows(source: HDF5Rows, *, timeout: float = 10.0, buffer=None) -> np.ndarray:
    """Rows ``[start, stop)`` of the dataset, as stored (no reshaping).

    Parameters
    ----------
    source : HDF5Rows
    timeout : float
        Seconds to wait for a file or for rows that are not visible yet,
        retrying with a short pause; 0 tries once.
    buffer : callable, optional
        ``buffer(shape, dtype)`` gives the array to read the rows into
        (see :func:`read_frames`).

    Raises
    ------
    FrameReadError
        If the file, the dataset or the rows are still missing after
        ``timeout`` (or a compression filter is missing).
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        problem = damaged = None
        # h5py runs one HDF5 call at a time per process anyway (its own global lock);
        # this lock keeps the cache of open files consistent.
        with _FILES_LOCK:
            try:
                f = _open(source.path)
                dset = f[source.dataset]
                k = source.per_index if dset.ndim == 3 else 1  # frames stacked flat
                start, stop = source.start * k, source.stop * k
                if dset.shape[0] < stop and f.swmr_mode:
                    dset.refresh()
                if dset.shape[0] >= stop:
                    _check_stored(dset, source.path, start, stop)
                    if buffer is None:
                        return dset[start:stop]
                    out = buffer((stop - start,) + dset.shape[1:], dset.dtype)
                    dset.read_direct(out, np.s_[start:stop])
                    return out
                problem = f"it has {dset.shape[0]} rows"
                if not f.swmr_mode:
                    _forget(source.path)  # reopen to see rows written since
            except DamagedFileError as exc:  # still being copied, perhaps: try again
                damaged = exc
                _forget(source.path)
            except (OSError, KeyError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                _forget(source.path)
        if time.monotonic() >= deadline:
            if damaged is not None:
                raise damaged
            if problem and any(word in problem for word in _DAMAGED):
                raise DamagedFileError(_damaged(source.path, problem))
            raise FrameReadError(_read_error(source, problem, timeout))
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _check_stored(dset, path: str, start: int, stop: int) -> None:
    """Raise :class:`DamagedFileError` if rows ``[start, stop)`` lie past the end of the file.

    HDF5 reads the bytes of a file cut short as zeros, without an error: a copy
    interrupted half-way would give empty frames, hence empty maps, silently.
    """
    size = os.path.getsize(path)
    end = None
    offset = dset.id.get_offset()
    if offset is not None:  # contiguous
        end = offset + dset.id.get_storage_size()
    elif dset.chunks is not None:  # every chunk the rows lie in (one per row, usually)
        rows = dset.chunks[0]
        corners = [range(start - start % rows, stop, rows)] + [
            range(0, n, c) for n, c in zip(dset.shape[1:], dset.chunks[1:])]
        for corner in itertools.product(*corners):
            info = dset.id.get_chunk_info_by_coord(corner)
            if info.byte_offset is not None:
                end = max(end or 0, info.byte_offset + info.size)
    if end is not None and end > size:
        raise DamagedFileError(_damaged(path, f"truncated file: rows {start}..{stop - 1} of "
                                              f"{dset.name!r} end at byte {end}, the file at "
                                              f"{size}"))


def _damaged(path: str, problem: str) -> str:
    return (f"{path!r} is not a whole HDF5 file ({problem}): it was cut short (a copy "
            "or an acquisition interrupted) or is not HDF5. Copy it again from the detector's "
            "storage; the frames of this run cannot be read until then.")


def _read_error(source: HDF5Rows, problem: str | None, timeout: float) -> str:
    frames = f" ({source.per_index} frames each)" if source.per_index > 1 else ""
    where = (f"cannot read rows {source.start}..{source.stop - 1}{frames} of "
             f"{source.dataset!r} in {source.path!r}")
    waited = f" after {timeout:g} s" if timeout > 0 else ""
    if not os.path.exists(source.path):
        return (f"{where}: no such file on this machine{waited}. Mount the detector's storage "
                "here and on every worker, or map the directory the documents name to its "
                "mount with a root map (--root-map OLD=NEW, root_map={OLD: NEW}).")
    if problem and any(word in problem.lower() for word in ("filter", "plugin")):
        return (f"{where} ({problem}): the file is compressed with an HDF5 filter this "
                "machine lacks. Install hdf5plugin (pip install hdf5plugin) on every worker.")
    return (f"{where} ({problem}){waited}. Check that the file is readable from this "
            "machine and that the detector wrote those rows.")


def read_frames(source: HDF5Rows | np.ndarray | Any, *, timeout: float = 10.0,
                buffer=None) -> np.ndarray:
    """The frames of one point as a ``(K, M, N)`` array.

    Parameters
    ----------
    source : HDF5Rows, array_like, or a frame reference
        Rows of an HDF5 file; the frames themselves (an event's inline
        value: ``(K, M, N)`` or ``(M, N)``, array or nested lists); or any
        object with a ``read_frames(timeout=...)`` method (such as the
        references :meth:`crystalmapping.source.Run.frame_sources` gives).
    timeout : float
        Seconds to wait for a file or for rows that are not visible yet (a
        ``stream_datum`` may arrive before a network file system shows the
        data), retrying with a short pause.
    buffer : callable, optional
        ``buffer(shape, dtype)`` gives an array that rows of an HDF5 file
        are read into (a task's reused workspace: a fresh 48 MB array costs
        its page faults on every point); the frames returned are then that
        array, overwritten by the next read.

    Returns
    -------
    frames : (K, M, N) ndarray
        In the detector's dtype; rows of several frames each are stacked in
        order.

    Raises
    ------
    FrameReadError
        If the file or the rows are still missing after ``timeout``.
    """
    if isinstance(source, HDF5Rows):
        frames = read_rows(source, timeout=timeout, buffer=buffer)
    elif hasattr(source, "read_frames"):
        frames = np.asarray(source.read_frames(timeout=timeout))
    else:
        frames = np.asarray(source)
    return frames.reshape((-1,) + frames.shape[-2:])


def mean_frame(source: HDF5Rows | np.ndarray | Any, *, timeout: float = 10.0) -> np.ndarray:
    """The mean frame of a point (in float64 arithmetic): a background (subtrahend) image.

    Computed exactly as the batch pipeline computes a background given as a
    point index (mean over the point's frames, float64), and kept as float32
    when that holds it exactly
    (:func:`~crystalmapping.preprocess.compact_background`).

    Returns
    -------
    image : (M, N) ndarray of float32 or float64
    """
    from .preprocess import point_background

    return point_background(read_frames(source, timeout=timeout))

