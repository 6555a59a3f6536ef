"""The derived run that records a map store in a catalog, beside the measured run.

The derived run carries the maps themselves, so they are readable wherever the
measured run is (over HTTP from a tiled server too):

* start: ``analysis_stage="crystalmapping"``, ``parent_uid`` (the measured
  run), ``source_uid``, ``maps`` (the store's path), ``config``, ``grid``...;
* ``primary``: one event per map with ``grain``, ``y``, ``x``, ``n_points``,
  ``grain_id`` (the table of the first records, kept for their readers);
* ``maps``: one event per map with the same keys and ``intensity``, the
  ``(row, col)`` map (float32, counts);
* ``scan``: one event with the per-point maps ``total_intensity``,
  ``max_intensity``, ``n_peaks``, ``measured`` ``(row, col)``; the grid's
  ``row``, ``col``, ``row_position``, ``col_position`` are in the start
  document's ``coords`` (tiled's writer takes no 1-D array in an event).

Array data keys name their dims in the descriptor (``dims``); tiled does not
honour them for inline data (it names them ``dim_int_<n>``, the same name for
both axes of a square map), so :func:`catalog_maps` reads each array on its own
and names its dims from the descriptor.

:func:`catalog_maps` finds the derived run of a measured run (a search by
``start.parent_uid``) and returns its maps as an ``xarray.Dataset`` like
:func:`crystalmapping.open_maps` gives (the maps and per-point maps, not the
peak tables); :func:`record_maps` records a store (what ``process --record``,
``process-new`` and ``serve`` do).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["derived_run_documents", "record_maps", "catalog_maps"]

#: The per-point maps (row, col) the ``scan`` stream carries, when the store has them.
_SCAN_MAPS = ("total_intensity", "max_intensity", "n_peaks", "measured")
#: The grid coordinates the start document carries (``coords``; tiled's writer takes no
#: 1-D array in an event): name -> dim.
_SCAN_AXES = {"row": "row", "col": "col", "row_position": "row", "col_position": "col"}
#: The per-map table (``primary`` and ``maps`` streams).
_TABLE = {"grain": np.int64, "y": np.float64, "x": np.float64, "n_points": np.int64,
          "grain_id": np.int64}

#: Exit statuses an event-model stop document may carry.
_STOP_STATUSES = ("success", "abort", "fail")


def _plain(value):
    """Attributes as JSON-ready Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _units(variable) -> dict:
    """The ``units`` of a data key, as the store records them (nothing if it does not)."""
    units = variable.attrs.get("units")
    return {"units": str(units)} if units else {}


def _array_key(variable, values: np.ndarray, dims) -> dict:
    """The data key of an array (its dims named: readers name the axes from them)."""
    return {"source": "crystalmapping", "dtype": "array", "shape": list(values.shape),
            "dims": list(dims), "dtype_numpy": values.dtype.str, **_units(variable)}


def _coords(maps) -> dict:
    """The grid's coordinates: ``{name: {"dims": [dim], "values": [...], "attrs": {...}}}``."""
    out = {}
    for name, dim in _SCAN_AXES.items():
        if name in maps.variables and maps[name].dims == (dim,):
            out[name] = {"dims": [dim], "values": _plain(np.asarray(maps[name].values)),
                         "dtype": np.asarray(maps[name].values).dtype.str,
                         "attrs": _plain(dict(maps[name].attrs))}
    return out


def _maps_stream(bundle, maps, columns: dict, now: float) -> list:
    """Stream ``maps``: one event per map, its table row and its ``(row, col)`` intensity."""
    intensity = np.asarray(maps["intensity"].values, dtype=np.float32)
    data_keys = {k: {"source": "crystalmapping", "dtype": "number" if v.dtype.kind == "f"
                     else "integer", "shape": [], "dtype_numpy": v.dtype.str, **_units(maps[k])}
                 for k, v in columns.items()}
    data_keys["intensity"] = _array_key(maps["intensity"], intensity[0], ("row", "col"))
    desc = bundle.compose_descriptor(name="maps", data_keys=data_keys)
    docs = [("descriptor", desc.descriptor_doc)]
    for i in range(intensity.shape[0]):
        data = {k: v[i].item() for k, v in columns.items()}
        data["intensity"] = intensity[i]
        docs.append(("event", desc.compose_event(data=data, timestamps={k: now for k in data},
                                                 seq_num=i + 1)))
    return docs


def _scan_stream(bundle, maps) -> list:
    """Stream ``scan``: one event with the per-point maps and the grid's coordinates."""
    data, data_keys = {}, {}
    for name in _SCAN_MAPS:
        if name in maps.variables and maps[name].dims == ("row", "col"):
            data[name] = np.asarray(maps[name].values)
            data_keys[name] = _array_key(maps[name], data[name], ("row", "col"))
    if not data:
        return []
    desc = bundle.compose_descriptor(name="scan", data_keys=data_keys)
    now = time.time()
    return [("descriptor", desc.descriptor_doc),
            ("event", desc.compose_event(data=data, timestamps={k: now for k in data},
                                         seq_num=1))]


def derived_run_documents(uid: str, path, maps, summary: Mapping | None = None) -> list:
    """The documents of the derived run that records a map store in a catalog.

    Parameters
    ----------
    uid : str
        The measured run's uid (``parent_uid``).
    path : path
        The map store.
    maps : xarray.Dataset
        The maps (``y``, ``x``, ``n_points``, ``grain_id`` per grain; attrs
        ``config``, ``grid``, ``exit_status``).
    summary : dict, optional
        Figures of the stream (points, peaks, lag...), kept under ``stream``.

    Returns
    -------
    documents : list of (name, doc)
        start (``analysis_stage="crystalmapping"``, ``parent_uid``,
        ``source_uid``, ``maps``, ``config``, ``exit_status``, ``grid``,
        ``stream``, ``coords``), a ``primary`` descriptor (each data key with the
        store's ``units``) and one event per map (``grain``, ``y``, ``x``,
        ``n_points``, ``grain_id``) when there are maps, the same with
        ``intensity`` (the ``(row, col)`` map) in stream ``maps``, one
        ``scan`` event with the per-point maps and the grid's coordinates, and
        stop (``abort`` with the reason for a run that ended without a valid
        stop status).
    """
    from event_model import compose_run

    status = str(maps.attrs.get("exit_status", "success"))
    stream = {k: v for k, v in dict(summary or {}).items() if k not in ("uid", "derived_uid")}
    bundle = compose_run(metadata=_plain({
        "analysis_stage": "crystalmapping",
        "parent_uid": uid,
        "source_uid": maps.attrs.get("source_uid", uid),
        "maps": str(Path(path).absolute()),
        "config": maps.attrs.get("config", {}),
        "exit_status": status,
        "failed_points": list(maps.attrs.get("failed_points", [])),
        "grid": maps.attrs.get("grid", {}),
        "stream": stream,
        "versions": maps.attrs.get("versions", {}),
        "coords": _coords(maps),
    }))
    docs = [("start", bundle.start_doc)]
    n = int(maps.sizes.get("grain", 0))
    if n:
        keys = {"grain": "integer", "y": "number", "x": "number", "n_points": "integer",
                "grain_id": "integer"}
        data_keys = {k: {"source": "crystalmapping.serve", "dtype": kind, "shape": [],
                         "dtype_numpy": "<i8" if kind == "integer" else "<f8",
                         **_units(maps[k])}
                     for k, kind in keys.items()}
        desc = bundle.compose_descriptor(name="primary", data_keys=data_keys)
        docs.append(("descriptor", desc.descriptor_doc))
        columns = {"grain": maps["grain"].values.astype(np.int64),
                   "y": maps["y"].values.astype(np.float64),
                   "x": maps["x"].values.astype(np.float64),
                   "n_points": maps["n_points"].values.astype(np.int64),
                   "grain_id": maps["grain_id"].values.astype(np.int64)}
        now = time.time()
        for i in range(n):
            data = {k: v[i].item() for k, v in columns.items()}
            docs.append(("event", desc.compose_event(data=data, timestamps={k: now for k in data},
                                                     seq_num=i + 1)))
        docs.extend(_maps_stream(bundle, maps, columns, now))
    docs.extend(_scan_stream(bundle, maps))
    if status in _STOP_STATUSES:
        stop = bundle.compose_stop(exit_status=status)
    else:
        stop = bundle.compose_stop(exit_status="abort",
                                   reason=f"the measured run ended as {status!r}")
    docs.append(("stop", stop))
    return docs


def record_maps(where, uid: str, path, maps=None, summary: Mapping | None = None) -> str:
    """Record the map store ``path`` of run ``uid`` as a derived run; return its uid.

    Parameters
    ----------
    where : Catalog or Run
        The catalog to record in (a run: the catalog it came from).
    uid : str
        The measured run's uid.
    path : path
        The map store.
    maps : xarray.Dataset, optional
        Its contents (default: :func:`crystalmapping.open_maps` of ``path``).
    summary : dict, optional
        Figures kept in the start document under ``stream``.
    """
    catalog = getattr(where, "catalog", where)
    if maps is None:
        from .store import open_maps

        maps = open_maps(path)
    documents = derived_run_documents(uid, path, maps, summary)
    catalog.ingest(documents)
    return documents[0][1]["uid"]


def _container(catalog, api_key):
    """The tiled container of runs of a Catalog, an address, or a tiled client."""
    if hasattr(catalog, "search") and hasattr(catalog, "items"):
        return catalog  # a tiled client
    if hasattr(catalog, "client") and hasattr(catalog, "ingest"):
        return catalog.client  # a Catalog
    from .catalog import Catalog

    return Catalog(catalog, api_key=api_key, create=False).client


def derived_runs(catalog, source_uid: str, *, api_key: str | None = None) -> list:
    """The crystalmapping derived runs of run ``source_uid`` (tiled nodes), oldest first."""
    from tiled.queries import Key

    node = _container(catalog, api_key)
    found = node.search(Key("start.parent_uid") == source_uid).search(
        Key("start.analysis_stage") == "crystalmapping")
    runs = list(found.values())
    return sorted(runs, key=lambda r: float((r.metadata.get("start") or {}).get("time", 0)))


def catalog_maps(catalog, source_uid: str, *, api_key: str | None = None):
    """The maps of run ``source_uid``, read from the derived run recorded beside it.

    Parameters
    ----------
    catalog : Catalog, str or tiled client
        Where the run is: a :class:`~crystalmapping.Catalog`, its address
        (``http://host:port[/PATH]``, ``profile:NAME``, a directory...), or a
        tiled container of runs.
    source_uid : str
        The measured run's uid (the derived run's ``parent_uid``), or the
        derived run's own uid.
    api_key : str, optional
        Of a server given by address (default: ``$TILED_API_KEY``).

    Returns
    -------
    maps : xarray.Dataset
        ``intensity(grain, row, col)``, ``y``, ``x``, ``n_points`` (per
        grain), coordinates ``grain``, ``grain_id``, ``row``, ``col``,
        ``row_position``, ``col_position``, and the per-point maps
        ``total_intensity``, ``max_intensity``, ``n_peaks``, ``measured``
        ``(row, col)``, each with its ``units``; attrs ``source_uid``,
        ``derived_uid``, ``maps`` (the store's path), ``config``, ``grid``,
        ``exit_status``, ``failed_points``. The latest derived run holding
        maps is read.

    Raises
    ------
    ScanError
        No derived run of ``source_uid`` holds maps (none was recorded, or
        only records made before the maps were kept in the catalog: the
        error names their store).

    Examples
    --------
    >>> maps = catalog_maps("http://localhost:8000/xpd/raw", uid, api_key=key)  # doctest: +SKIP
    >>> maps["intensity"].sel(grain=0).plot()                                   # doctest: +SKIP
    """
    from .errors import ScanError

    runs = derived_runs(catalog, source_uid, api_key=api_key)
    if not runs:
        node = _container(catalog, api_key)
        try:
            run = node[source_uid]
        except (KeyError, TypeError):
            run = None
        if run is not None and (run.metadata.get("start") or {}).get("analysis_stage") \
                == "crystalmapping":
            runs = [run]
    for run in reversed(runs):
        streams = set(run)
        if "scan" in streams:
            return _read_derived(run, streams)
    if runs:
        start = runs[-1].metadata.get("start") or {}
        raise ScanError(
            f"the derived run {start.get('uid')} of run {source_uid} was recorded without "
            f"its maps; they are in the store {start.get('maps')} "
            "(crystalmapping.open_maps).")
    raise ScanError(f"no crystalmapping derived run of run {source_uid} in the catalog: "
                    "map it with --record (process), process-new or serve.")


def _read_stream(stream, axis: str = "event") -> dict:
    """``{key: xarray.Variable}`` of a stream, each array read on its own, dims named by its
    descriptor (``axis`` for the events' axis) and with its units."""
    import xarray as xr

    data_keys = dict(stream.metadata.get("data_keys") or {})
    parts = {}
    base = getattr(stream, "base", None)  # the stream's table and arrays: a request each
    if base is not None:
        for name, node in base.items():
            if getattr(node, "structure_family", None) == "table":
                table = node.read()
                parts.update({c: table[c].to_numpy() for c in table.columns})
            else:
                parts[name] = node
    out = {}
    for key, meta in data_keys.items():
        values = parts[key] if key in parts else stream[key]
        values = values if isinstance(values, np.ndarray) else np.asarray(values.read())
        dims = (axis, *(meta.get("dims") or [f"{key}_dim_{i}"
                                                for i in range(values.ndim - 1)]))
        attrs = {"units": meta["units"]} if meta.get("units") else {}
        out[key] = xr.Variable(dims, values, attrs)
    return out


def _read_derived(run, streams):
    """The maps dataset of a derived run holding streams ``scan`` (and ``maps``)."""
    import xarray as xr

    start = dict(run.metadata.get("start") or {})
    stop = dict(run.metadata.get("stop") or {})
    scan = {k: v[0] for k, v in _read_stream(run["scan"]).items()}  # the one event
    nrow, ncol = next(iter(scan.values())).shape
    if "maps" in streams:
        table = _read_stream(run["maps"], "grain")
    else:  # no maps
        table = {k: xr.Variable(("grain",), np.zeros(0, dtype)) for k, dtype in _TABLE.items()}
        table["intensity"] = xr.Variable(("grain", "row", "col"),
                                         np.zeros((0, nrow, ncol), np.float32), {"units": "counts"})
    coords = {k: table.pop(k) for k in ("grain", "grain_id")}
    for name, c in dict(start.get("coords") or {}).items():
        coords[name] = xr.Variable(tuple(c["dims"]), np.asarray(c["values"], c.get("dtype")),
                                   dict(c.get("attrs") or {}))
    if "row" not in coords:
        coords["row"] = xr.Variable(("row",), np.arange(nrow))
        coords["col"] = xr.Variable(("col",), np.arange(ncol))
    attrs = {"source_uid": start.get("source_uid", start.get("parent_uid")),
             "parent_uid": start.get("parent_uid"),
             "derived_uid": start.get("uid"),
             "maps": start.get("maps"),
             "config": start.get("config", {}),
             "grid": start.get("grid", {}),
             "exit_status": start.get("exit_status", stop.get("exit_status")),
             "failed_points": list(start.get("failed_points", []))}
    return xr.Dataset({**table, **scan}, coords=coords, attrs=attrs)
