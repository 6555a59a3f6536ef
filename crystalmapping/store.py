"""Store: crystal maps in Zarr, written atomically, with their provenance.

The contract (schema version 2), which other tools rely on. A store is a Zarr
(format 2, consolidated) DataTree: the maps at the root, the peak table in
``/peaks`` and the per-point table in ``/points``::

    xr.open_datatree(path, engine="zarr")   # the tree, as written
    xr.open_zarr(path)                      # the root: maps, coordinates, attributes
    xr.open_zarr(path, group="peaks")       # one table
    crystalmapping.open_maps(path)          # one flat Dataset (see below)

Every variable and coordinate has ``units`` (CF/UDUNITS: ``counts``,
``pixel``, ``1`` for indices and counts of things, the motor's units for
positions) and ``long_name``:

============================  =====  =============  =======  ======  ==============================
path                          kind   dims           dtype    units   meaning
============================  =====  =============  =======  ======  ==============================
/intensity                    var    grain row col  float32  counts  each linked peak's intensity
                                                                     (``config.intensity_column``)
                                                                     where it was found, 0
                                                                     elsewhere
/y                            var    grain          float64  pixel   mean detector row of the peak
/x                            var    grain          float64  pixel   mean detector column of the
                                                                     peak
/n_points                     var    grain          int64    1       grid points where it was found
/total_intensity              var    row col        float64  counts  sum of each
                                                                     background-subtracted image
/max_intensity                var    row col        float64  counts  brightest pixel of that image
/n_peaks                      var    row col        int32    1       peaks found at each point
/measured                     var    row col        bool     1       point was measured (false
                                                                     after an abort)
/noise                        var    row col        float64  counts  standard deviation of the
                                                                     band-passed image's noise
/n_rejected_weak              var    row col        int32    1       candidates rejected: snr <
                                                                     min_snr
/n_rejected_elongated         var    row col        int32    1       candidates rejected: ecc >
                                                                     max_ecc
/n_rejected_close             var    row col        int32    1       candidates closer than
                                                                     separation to a brighter one
/n_rejected_masked            var    row col        int32    1       candidates touching the mask
/n_rejected_track             var    row col        int32    1       peaks rejected with their
                                                                     track
/grain                        coord  grain          int64    1       map index (the track id)
/grain_id                     coord  grain          int64    1       crystal grain of the
                                                                     reflection (maps that coincide
                                                                     share one)
/row                          coord  row            int64    1       grid row: the slow axis
/col                          coord  col            int64    1       grid column: the fast axis
/row_position                 coord  row            float64  motor   slow motor's position (attrs:
                                                                     ``motor``; units from the
                                                                     start document's
                                                                     ``motor_units``, else
                                                                     ``unknown``)
/col_position                 coord  col            float64  motor   fast motor's position (same)
/peaks/y                      var    peak           float64  pixel   detector row of the peak
/peaks/x                      var    peak           float64  pixel   detector column of the peak
/peaks/mass                   var    peak           float64  counts  integrated band-passed
                                                                     intensity
/peaks/size                   var    peak           float64  pixel   radius of gyration
/peaks/ecc                    var    peak           float64  1       eccentricity (0 round, 1 a
                                                                     line)
/peaks/signal                 var    peak           float64  counts  band-passed height
/peaks/raw_mass               var    peak           float64  counts  image minus local background,
                                                                     integrated
/peaks/ep                     var    peak           float64  pixel   position uncertainty (trackpy)
/peaks/amplitude              var    peak           float64  counts  fitted Gaussian height
/peaks/snr                    var    peak           float64  1       signal-to-noise ratio
/peaks/frame                  var    peak           int64    1       acquisition index of the point
/peaks/particle               var    peak           int64    1       track (= ``grain``); -1:
                                                                     rejected with its track
/peaks/grid_row               var    peak           int64    1       grid row of the peak's point
/peaks/grid_col               var    peak           int64    1       grid column of the peak's
                                                                     point
/points/frame                 var    point          int64    1       acquisition index of the point
/points/n_peaks               var    point          int32    1       peaks found at the point
/points/image_max             var    point          float64  counts  brightest pixel of the image
/points/image_sum             var    point          float64  counts  sum of the image
/points/noise                 var    point          float64  counts  noise of the band-passed image
/points/n_rejected_weak       var    point          int32    1       as the maps of the same name
/points/n_rejected_elongated  var    point          int32    1       as the maps of the same name
/points/n_rejected_close      var    point          int32    1       as the maps of the same name
/points/n_rejected_masked     var    point          int32    1       as the maps of the same name
/points/grid_row              var    point          int64    1       grid row of the point
/points/grid_col              var    point          int64    1       grid column of the point
============================  =====  =============  =======  ======  ==============================

(``grid_row``/``grid_col``, not ``row``/``col``: the groups inherit the root's
``row`` and ``col`` coordinates.) ``/peaks`` holds one row per located peak in
``frame, y, x`` order, ``/points`` one row per measured point in ``frame``
order; ``peak`` and ``point`` have no coordinate. Attributes:

================================  =======  ==============================================
attribute                         group    meaning
================================  =======  ==============================================
Conventions                       /        ``CF-1.10``
title                             /        what the store holds (``source_uid``: of which run)
history                           /        one line per write: when (UTC), crystalmapping's
                                           version, what was written (batch or live
                                           stream)
source_uid                        /        uid of the measured run
schema_version                    /        2 (this layout)
created                           /        first write (UTC, ISO 8601)
config                            /        the ProcessConfig (JSON)
versions                          /        versions of the packages that made the maps (JSON)
grid                              /        shape, extents, snaking, motors[, motor_units]
                                           (JSON, start-document fields)
data_key                          /        the detector's data key
n_points_measured                 /        points whose images went in
n_empty_images                    /        of those, images all zero after the background
n_peaks_found                     /        peaks located (rows of ``/peaks``)
n_peaks_mapped                    /        of those, peaks in a map
n_peaks_rejected_track            /        of those, peaks rejected with their track
n_rejected_weak                   /        candidates rejected as weak, in all
n_rejected_elongated              /        candidates rejected as elongated, in all
n_rejected_close                  /        candidates rejected as too close, in all
n_rejected_masked                 /        candidates rejected by the mask, in all
n_grains                          /        distinct ``grain_id``
exit_status                       /        live stream only: running, success, abort, ...
failed_points                     /        live stream only: points that failed
failure_reasons                   /        live stream only: why they failed
description                       /peaks   what the table holds
description                       /points  what the table holds
================================  =======  ==============================================

``row`` is the slow axis of the start document's ``shape``, ``col`` the fast
one, with snaking undone.

:func:`open_maps` gives one flat ``xarray.Dataset`` (what
:func:`crystalmapping.maps.reduce_scan` returns, and what :func:`write_maps`
takes): the root's variables and coordinates, ``/peaks/<column>`` as
``peak_<column>`` and ``/points/<column>`` as ``point_<column>`` (``grid_row``
and ``grid_col`` as ``peak_row``/``peak_col``, ``point_row``/``point_col``),
and the root's attributes. :func:`peak_table` gives ``/peaks`` as a DataFrame
with trackpy's column names (``row``, ``col`` for the grid indices).

Schema version 1 (crystalmapping before the groups): one flat group, the
peak table as ``peak_<column>`` root variables, no ``/points``, ``grain_id`` a
data variable, no ``Conventions``/``history``. :func:`open_maps` reads it
(``grain_id`` made a coordinate, ``schema_version`` left at 1);
``write_maps(open_maps(old), new)`` rewrites it as version 2.
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

__all__ = ["SCHEMA_VERSION", "CONVENTIONS", "write_maps", "open_maps", "peak_table",
           "maps_tree", "versions"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: The CF version the store's attributes follow.
CONVENTIONS = "CF-1.10"
_JSON_ATTRS = ("config", "versions", "grid")
#: The groups of the tables: flat-view prefix -> group.
_GROUPS = {"peak": "peaks", "point": "points"}
#: Table columns named otherwise in their group (the root's ``row``/``col`` are inherited there).
_RENAMED = {"row": "grid_row", "col": "grid_col"}
_GROUP_DESCRIPTIONS = {
    "peaks": "the linked peak table: one row per peak located, in frame, y, x order; "
             "particle is the peak's map (the root's grain), -1 if it was rejected with "
             "its track",
    "points": "the per-point table: one row per measured grid point, in frame order",
}


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


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crystalmapping")
    except PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


def _history_line(ds: xr.Dataset, now: str) -> str:
    """What this write adds to ``history``: when, which crystalmapping, what."""
    uid = ds.attrs.get("source_uid")
    of = f" of run {uid}" if uid else ""
    if "intensity" not in ds:
        what = f"unlinked peak and point tables{of} (a failed reduce)"
    elif "exit_status" in ds.attrs:
        what = (f"maps{of} by the live stream (exit status {ds.attrs['exit_status']}, "
                f"{ds.attrs.get('n_points_measured', '?')} points)")
    else:
        what = f"maps{of} by the batch pipeline ({ds.attrs.get('n_points_measured', '?')} points)"
    return f"{now}: crystalmapping {_own_version()} wrote the {what}"


def _encode_attrs(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    for key in _JSON_ATTRS:
        if key in ds.attrs and not isinstance(ds.attrs[key], str):
            ds.attrs[key] = json.dumps(ds.attrs[key], sort_keys=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    line = _history_line(ds, now)
    previous = ds.attrs.get("history")
    ds.attrs["history"] = f"{previous}\n{line}" if previous else line
    ds.attrs["schema_version"] = SCHEMA_VERSION
    ds.attrs["Conventions"] = CONVENTIONS
    ds.attrs.setdefault("title", "crystal maps of an X-ray diffraction grid scan"
                        if "intensity" in ds else "unlinked peak and point tables of a grid scan")
    ds.attrs.setdefault("created", now)
    return ds


def maps_tree(maps: xr.Dataset) -> xr.DataTree:
    """The store's tree of a flat maps dataset: ``peak_*``/``point_*`` to ``/peaks``/``/points``.

    The inverse of what :func:`open_maps` does; attributes are kept as they are.
    """
    tables = {}
    for prefix, group in _GROUPS.items():
        names = [n for n in maps.data_vars
                 if str(n).startswith(f"{prefix}_") and maps[n].dims == (prefix,)]
        if names:
            table = maps[names].drop_vars(list(maps[names].coords)).rename(
                {n: _RENAMED.get(str(n)[len(prefix) + 1:], str(n)[len(prefix) + 1:])
                 for n in names})
            table.attrs = {"description": _GROUP_DESCRIPTIONS[group]}
            tables[f"/{group}"] = table
            maps = maps.drop_vars(names)
    return xr.DataTree.from_dict({"/": maps, **tables})


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
        _write_tree(maps_tree(_encode_attrs(maps)), tmp)
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


def _write_tree(tree: xr.DataTree, directory: Path) -> None:
    """Write ``tree`` as a consolidated Zarr (format 2) store in the new ``directory``.

    zarr encodes the store into memory and the files are then written one
    after the other, each key as the file of that path: the layout zarr's own
    local store gives, byte for byte. A map store's hundred-odd small files
    took zarr's local store about 0.8 s (an atomic write per file through its
    event loop), against about 0.25 s this way; and a write that fails (a
    full disk) leaves no other write in flight.
    """
    import zarr

    keys: dict = {}
    tree.to_zarr(zarr.storage.MemoryStore(keys), mode="w", zarr_format=2, consolidated=True)
    directory.mkdir()
    for key, buffer in keys.items():
        _write_file(directory.joinpath(*key.split("/")), buffer.to_bytes())


def _write_file(file: Path, data: bytes) -> None:
    """One file of a store being written, with its directory."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)


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
    """Open a map store as one flat Dataset; JSON attributes (``config``, ``versions``, ``grid``)
    come back as dicts.

    ``/peaks/<column>`` comes as ``peak_<column>``, ``/points/<column>`` as
    ``point_<column>`` (``grid_row``/``grid_col`` as ``<prefix>_row``/``<prefix>_col``):
    the dataset :func:`crystalmapping.maps.reduce_scan` returns. Stores of
    schema version 1 (one flat group) are read too.

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
    inverse = {v: k for k, v in _RENAMED.items()}
    for prefix, group in _GROUPS.items():
        if not (path / group).is_dir():
            continue
        try:
            table = xr.open_zarr(path, group=group)
        except Exception as exc:
            raise StoreError(f"the {group!r} group of {str(path)!r} is not readable: {exc}. "
                             "Write the maps again (process or recover the run).") from exc
        table = table.drop_vars(list(table.coords))
        ds = ds.assign({f"{prefix}_{inverse.get(str(n), n)}": table[n] for n in table.data_vars})
    if "grain_id" in ds.data_vars:  # schema version 1: a data variable
        ds = ds.set_coords("grain_id")
    for key in _JSON_ATTRS:
        if isinstance(ds.attrs.get(key), str):
            ds.attrs[key] = json.loads(ds.attrs[key])
    return ds


def peak_table(maps: xr.Dataset | str | os.PathLike) -> pd.DataFrame:
    """The linked peak table, with trackpy's column names (``row``, ``col``: grid indices).

    ``maps`` is a maps dataset (``peak_<column>`` variables, as :func:`open_maps`
    and :func:`crystalmapping.maps.reduce_scan` give) or the path of a store,
    whose ``/peaks`` group (or, in a schema-version-1 store, ``peak_*``
    variables) is read.
    """
    from .locate import PEAK_COLUMNS

    if not isinstance(maps, xr.Dataset):
        maps = open_maps(maps)
    columns = {name[len("peak_"):]: maps[name].values for name in maps.data_vars
               if name.startswith("peak_") and maps[name].dims == ("peak",)}
    first = [c for c in PEAK_COLUMNS + ["particle", "row", "col"] if c in columns]
    return pd.DataFrame({c: columns[c] for c in first + sorted(set(columns) - set(first))})
