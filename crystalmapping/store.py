"""Store: crystal maps in Zarr, written atomically, with their provenance.

The contract (schema version 1), which other tools rely on::

    xr.open_zarr(path)
      intensity        (grain, row, col) float32   map of each linked peak, zero where not seen
      y, x             (grain)           float64   mean detector row / column of the peak
      n_points         (grain)           int64     grid points where the peak was found
      total_intensity  (row, col)        float64   sum of each background-subtracted image
      max_intensity    (row, col)        float64   brightest pixel of that image
      n_peaks          (row, col)        int32     peaks found at each point
      measured         (row, col)        bool      point was measured (false after an abort)
      peak_<column>    (peak)                      the linked peak table: trackpy's columns
                                                   y x mass size ecc signal raw_mass ep,
                                                   frame (acquisition index), particle
                                                   (= grain), row, col (grid indices)
      coords: grain, row, col (indices), row_position, col_position (motor positions,
              attrs["motor"] names the motor)
      attrs:  schema_version, config (JSON), versions (JSON), source_uid, grid (JSON),
              n_points_measured, n_empty_images, n_peaks_found, created

``row`` is the slow axis of the start document's ``shape``, ``col`` the fast
one, with snaking undone.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import xarray as xr

from .errors import StoreError

__all__ = ["SCHEMA_VERSION", "write_maps", "open_maps", "peak_table", "versions"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_JSON_ATTRS = ("config", "versions", "grid")


def versions() -> dict[str, str]:
    """Versions of crystalmapping and of the packages that shape its results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("crystalmapping", "numpy", "pandas", "trackpy", "dask", "distributed",
                 "xarray", "zarr", "tiled", "bluesky", "event-model"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            pass
    return out


def _encode_attrs(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    for key in _JSON_ATTRS:
        if key in ds.attrs and not isinstance(ds.attrs[key], str):
            ds.attrs[key] = json.dumps(ds.attrs[key], sort_keys=True)
    ds.attrs.setdefault("schema_version", SCHEMA_VERSION)
    ds.attrs.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    return ds


def write_maps(maps: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write maps to a Zarr store atomically.

    The store is written next to the target under a temporary name and renamed
    into place only when complete, so a failed write leaves no half-written
    store at ``path`` (and an existing store there is kept until the new one is
    whole).

    Parameters
    ----------
    maps : xarray.Dataset
        As :func:`crystalmapping.maps.reduce_scan` returns.
    path : path
        Target directory, conventionally ending in ``.zarr``.
    overwrite : bool
        Replace an existing store at ``path``.

    Raises
    ------
    StoreError
        If ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(
            f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it, "
            "or choose another output path."
        )
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _encode_attrs(maps).to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous store back
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise _disk_full(exc, path, existed, maps) from exc
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", path)
    return path


#: errno values of a write that found no room: the disk, or the user's quota, is full.
_DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e)


def _disk_full(exc: OSError, path: Path, existed: bool, maps: xr.Dataset) -> StoreError:
    """The error of a store write that ran out of room (an OSError with the same errno)."""
    kept = (f"the previous store at {str(path)!r} is kept as it was" if existed
            else f"nothing was left at {str(path)!r}")
    what = "the quota of this user" if exc.errno != errno.ENOSPC else "the disk"
    error = StoreError(
        f"{what} is full: writing the maps to {str(path)!r} failed ({exc.strerror}"
        f"{f': {exc.filename}' if exc.filename else ''}); {kept}. The maps need about "
        f"{_size_text(maps.nbytes)} before compression. Free space on the disk holding "
        f"{str(path.absolute().parent)!r}, or write the maps elsewhere (--out, out=), "
        "then run again.")
    error.errno = exc.errno  # str(error) stays the message (no strerror, no filename)
    return error


def _size_text(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def open_maps(path: str | os.PathLike) -> xr.Dataset:
    """Open a map store; JSON attributes (``config``, ``versions``, ``grid``) come back as dicts.

    Raises
    ------
    StoreError
        If ``path`` is not a crystalmapping store, or is of a newer schema.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no map store at {str(path)!r}.")
    try:
        ds = xr.open_zarr(path)
    except Exception as exc:
        raise StoreError(f"{str(path)!r} is not a readable Zarr store: {exc}") from exc
    version = ds.attrs.get("schema_version")
    if version is None or "intensity" not in ds:
        raise StoreError(f"{str(path)!r} is a Zarr store but not a crystalmapping map store.")
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"{str(path)!r} has schema version {version}, newer than this crystalmapping "
            f"reads ({SCHEMA_VERSION}); upgrade crystalmapping."
        )
    for key in _JSON_ATTRS:
        if isinstance(ds.attrs.get(key), str):
            ds.attrs[key] = json.loads(ds.attrs[key])
    return ds


def peak_table(maps: xr.Dataset) -> pd.DataFrame:
    """The linked peak table of a map dataset, with trackpy's column names."""
    from .locate import PEAK_COLUMNS

    columns = {name[len("peak_"):]: maps[name].values for name in maps.data_vars
               if name.startswith("peak_") and maps[name].dims == ("peak",)}
    first = [c for c in PEAK_COLUMNS + ["particle", "row", "col"] if c in columns]
    return pd.DataFrame({c: columns[c] for c in first + sorted(set(columns) - set(first))})
