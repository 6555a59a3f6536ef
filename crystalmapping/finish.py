"""Finish: the per-point tables of a run -> linked, filled maps, or the tables kept.

The last step of both the batch pipeline (:mod:`crystalmapping.pipeline`)
and the live processor (:mod:`crystalmapping.stream`), so that a streamed
run's maps equal the batch maps of the same run: gather the per-point
tables, link and fill the maps (:func:`crystalmapping.maps.reduce_scan`)
with the store's attributes; when that fails, write the unlinked tables next
to the store (``<out>.peaks.zarr``, its ``/peaks`` and ``/points`` groups) so nothing located is lost, and raise
:class:`ProcessingError` naming them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import xarray as xr

from .config import ProcessConfig
from .errors import CrystalMappingError
from .grid import Grid
from .maps import gather_tables, reduce_scan, table_variables
from .store import versions, write_maps

__all__ = ["ProcessingError", "finish_maps", "store_attrs", "with_background",
           "background_record", "save_tables"]

logger = logging.getLogger(__name__)


class ProcessingError(CrystalMappingError, RuntimeError):
    """Some points failed; the maps of the others were kept (see ``partial_path``)."""

    def __init__(self, message: str, partial_path: Path | None = None):
        super().__init__(message)
        self.partial_path = partial_path


def background_record(spec):
    """What the store records of a background: its path, its point index, "array" or None."""
    if spec is None or isinstance(spec, (str, os.PathLike)):
        return None if spec is None else str(spec)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, (bool, np.bool_)):
        return int(spec)
    return "array"


def with_background(config: ProcessConfig, spec) -> tuple[ProcessConfig, Any]:
    """The config with its background set to ``spec``'s record, and that record."""
    record = background_record(spec)
    if record != "array":
        config = dataclasses.replace(config, background=record)
    return config, record


def store_attrs(uid: str, config: ProcessConfig, record) -> dict:
    """The attributes of a maps store (batch and stream write the same)."""
    return {"source_uid": uid, "config": {**config.to_dict(), "background": record},
            "versions": versions(), "data_key": config.data_key}


def save_tables(peaks, points, attrs, out) -> Path | None:
    """Write unlinked peak and point tables next to ``out`` (the rescue of a failed reduce)."""
    if out is None:
        return None
    path = Path(str(out).removesuffix(".zarr") + ".peaks.zarr")
    ds = xr.Dataset(table_variables("peak", peaks))
    ds = ds.assign(table_variables("point", points))
    ds.attrs.update({k: v for k, v in attrs.items()})
    try:
        write_maps(ds, path, overwrite=True)
    except Exception:  # pragma: no cover - the original error matters more
        logger.exception("could not save the located peaks to %s", path)
        return None
    return path


def finish_maps(results: Iterable[tuple], grid: Grid, config: ProcessConfig, attrs: dict,
                out: str | os.PathLike | None = None, *, quiet: bool = False
                ) -> tuple[xr.Dataset, int]:
    """Link and fill the maps of a run's per-point results.

    Parameters
    ----------
    results : iterable of (peaks, points) tables
        What :func:`crystalmapping.tasks.process_points` returned.
    grid : Grid
    config : ProcessConfig
    attrs : dict
        The store's attributes (:func:`store_attrs`, plus the stream's status).
    out : path, optional
        Where the store will go: a failed reduce keeps the tables beside it.
    quiet : bool
        Silence the no-peak and empty-image warnings (partial maps of a live
        run say them once, with the final maps).

    Returns
    -------
    maps : xarray.Dataset
    n_points : int
        Points whose tables went in.

    Raises
    ------
    ProcessingError
        If linking or filling failed; ``partial_path`` is where the unlinked
        tables were saved (None without ``out``).
    """
    peaks, points = gather_tables(results)
    try:
        # not warnings.catch_warnings(): the filters are the whole process's, and other
        # threads (Dask workers, the embedded catalog's server) change them meanwhile
        maps = reduce_scan(peaks, points, grid, config, attrs=attrs, warn=not quiet)
    except Exception as exc:
        # Keep what was located: the unlinked tables, so nothing processed is lost.
        partial = save_tables(peaks, points, attrs, out)
        where = f" The located peaks of {len(points)} points are in {partial}." if partial else ""
        raise ProcessingError(
            f"linking or map filling failed: {exc}.{where} If trackpy reports an oversize "
            "subnet, lower --search-range or pass --link-strategy drop.", partial) from exc
    return maps, len(points)
