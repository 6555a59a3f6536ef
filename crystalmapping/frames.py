"""Frames: read one grid point's frames where the detector wrote them.

A bluesky document stream carries a point's frames either inline (an array in
the event) or by reference: a ``stream_resource`` document names an HDF5 file
and dataset, and each ``stream_datum`` document names the rows written for
some events. :class:`HDF5Rows` is that reference for one point, small enough
to travel to a Dask worker; :func:`read_frames` reads it there, so big frames
never pass through the document stream or the process that routes documents.

Files are opened read-only in SWMR mode (single writer, multiple readers), so
rows can be read while the detector still appends to the file, and stay open
in a small per-process cache. Only this module (and :mod:`crystalmapping.source`
for catalogs) knows the detector's file layout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

import numpy as np

from .errors import CrystalMappingError, ScanError

__all__ = ["HDF5Rows", "FrameReadError", "path_from_uri", "hdf5_rows", "read_frames",
           "mean_frame", "close_files", "HDF5_MIMETYPES"]

logger = logging.getLogger(__name__)

#: ``stream_resource`` mimetypes :func:`hdf5_rows` understands.
HDF5_MIMETYPES = ("application/x-hdf5", "application/x-hdf")

#: Open files kept per process (least recently used ones are closed first).
_MAX_OPEN_FILES = 16
_FILES: "OrderedDict[str, Any]" = OrderedDict()
_FILES_LOCK = threading.RLock()


class FrameReadError(CrystalMappingError, OSError):
    """The frames a document points to cannot be read (file or rows missing)."""


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
    """

    path: str
    dataset: str
    start: int
    stop: int


def path_from_uri(uri: str) -> str:
    """The local path named by a ``stream_resource`` URI.

    Parameters
    ----------
    uri : str
        ``file://localhost/abs/path``, ``file:///abs/path`` or a bare path.

    Raises
    ------
    ScanError
        For another scheme or a file on another host.

    Examples
    --------
    >>> path_from_uri("file://localhost/data/scan%201.h5")
    '/data/scan 1.h5'
    >>> path_from_uri("/data/a.h5")
    '/data/a.h5'
    """
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return uri
    if parsed.scheme != "file":
        raise ScanError(
            f"frames must be in a local file (file:// URI), got {uri!r}; mount the detector's "
            "storage on this machine and its workers."
        )
    if parsed.netloc not in ("", "localhost"):
        raise ScanError(
            f"the frames are on host {parsed.netloc!r} ({uri!r}); only file://localhost/... "
            "and file:///... can be read. Mount that storage here and on the workers."
        )
    return unquote(parsed.path)


def hdf5_rows(resource: Mapping[str, Any], datum: Mapping[str, Any]) -> list[tuple[int, HDF5Rows]]:
    """Split a ``stream_datum`` into the rows of each point it covers.

    Parameters
    ----------
    resource : dict
        The ``stream_resource`` document (``uri``, ``mimetype``,
        ``parameters["dataset"]``).
    datum : dict
        A ``stream_datum`` document of that resource: ``indices`` (rows of the
        dataset) and ``seq_nums`` (the events they belong to).

    Returns
    -------
    points : list of (int, HDF5Rows)
        ``(point, rows)`` for each event covered, where ``point`` is the
        acquisition index ``seq_num - 1``. A datum without ``seq_nums``
        (``start == stop``) numbers its points by row.

    Raises
    ------
    ScanError
        If the resource is not HDF5, names no dataset, or the rows do not
        divide evenly among the events.

    Examples
    --------
    >>> res = {"uri": "file://localhost/d/a.h5", "mimetype": "application/x-hdf5",
    ...        "parameters": {"dataset": "/entry/data"}}
    >>> datum = {"indices": {"start": 4, "stop": 6}, "seq_nums": {"start": 5, "stop": 7}}
    >>> hdf5_rows(res, datum)  # doctest: +NORMALIZE_WHITESPACE
    [(4, HDF5Rows(path='/d/a.h5', dataset='/entry/data', start=4, stop=5)),
     (5, HDF5Rows(path='/d/a.h5', dataset='/entry/data', start=5, stop=6))]
    """
    mimetype = str(resource.get("mimetype", "")).split(";")[0].strip()
    if mimetype not in HDF5_MIMETYPES:
        raise ScanError(
            f"frames stored as {mimetype!r} cannot be read; supported stream_resource "
            f"mimetypes are {list(HDF5_MIMETYPES)}."
        )
    parameters = resource.get("parameters") or {}
    dataset = parameters.get("dataset")
    if not dataset:
        raise ScanError(
            f"stream_resource {resource.get('uid', '?')!r} names no HDF5 dataset "
            f"(parameters={dict(parameters)!r}); it needs parameters['dataset'], e.g. '/entry/data'."
        )
    path = path_from_uri(str(resource["uri"]))
    start, stop = int(datum["indices"]["start"]), int(datum["indices"]["stop"])
    seq = datum.get("seq_nums") or {}
    s0, s1 = int(seq.get("start", 0)), int(seq.get("stop", 0))
    n_rows = stop - start
    if s1 <= s0:
        return [(start + i, HDF5Rows(path, dataset, start + i, start + i + 1)) for i in range(n_rows)]
    n_events = s1 - s0
    if n_rows % n_events:
        raise ScanError(
            f"stream_datum {datum.get('uid', '?')!r} gives {n_rows} rows to {n_events} events; "
            "each event must get the same whole number of rows."
        )
    k = n_rows // n_events
    return [(s0 + j - 1, HDF5Rows(path, dataset, start + j * k, start + (j + 1) * k))
            for j in range(n_events)]


def _open(path: str):
    """An open read-only (SWMR when possible) h5py.File, cached per process."""
    import h5py

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


def read_frames(source: HDF5Rows | np.ndarray | Any, *, timeout: float = 10.0) -> np.ndarray:
    """The frames of one point as a ``(K, M, N)`` array.

    Parameters
    ----------
    source : HDF5Rows or array_like
        Rows of an HDF5 file, or the frames themselves (an event's inline
        value: ``(K, M, N)`` or ``(M, N)``, array or nested lists).
    timeout : float
        Seconds to wait for a file or for rows that are not visible yet (a
        ``stream_datum`` may arrive before a network file system shows the
        data), retrying with a short pause.

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
    if not isinstance(source, HDF5Rows):
        frames = np.asarray(source)
        return frames.reshape((-1,) + frames.shape[-2:])
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        problem = None
        with _FILES_LOCK:
            try:
                f = _open(source.path)
                dset = f[source.dataset]
                if dset.shape[0] < source.stop and f.swmr_mode:
                    dset.refresh()
                if dset.shape[0] >= source.stop:
                    data = dset[source.start:source.stop]
                    return data.reshape((-1,) + data.shape[-2:])
                problem = f"it has {dset.shape[0]} rows"
                if not f.swmr_mode:
                    _forget(source.path)  # reopen to see rows written since
            except (OSError, KeyError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                _forget(source.path)
        if time.monotonic() >= deadline:
            raise FrameReadError(
                f"cannot read rows {source.start}..{source.stop - 1} of {source.dataset!r} in "
                f"{source.path!r} ({problem}) after {timeout:g} s. Check that the file is "
                "visible from this machine and that the detector wrote those rows."
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def mean_frame(source: HDF5Rows | np.ndarray | Any, *, timeout: float = 10.0) -> np.ndarray:
    """The mean frame of a point, in float64: a background (subtrahend) image.

    Computed exactly as the batch pipeline computes a background given as a
    point index (mean over the point's frames, float64).

    Returns
    -------
    image : (M, N) ndarray of float64
    """
    return read_frames(source, timeout=timeout).mean(axis=0)

