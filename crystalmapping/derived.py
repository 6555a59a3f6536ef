"""The derived run that records a map store in a catalog, beside the measured run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["derived_run_documents"]

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
        ``stream``), a ``primary`` descriptor (each data key with the
        store's ``units``) and one event per map (``grain``, ``y``, ``x``,
        ``n_points``, ``grain_id``) when there are maps, and stop (``abort`` with the reason for a run that ended without
        a valid stop status).
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
    if status in _STOP_STATUSES:
        stop = bundle.compose_stop(exit_status=status)
    else:
        stop = bundle.compose_stop(exit_status="abort",
                                   reason=f"the measured run ended as {status!r}")
    docs.append(("stop", stop))
    return docs
