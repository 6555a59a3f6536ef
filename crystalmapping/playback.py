"""Playback: a stored run's documents, frames filled in, as its RunEngine emitted them.

:func:`replay` is the tutorial's ``Filler`` + ``run.documents(fill=False)``:
it yields the documents of a run of a :class:`crystalmapping.Catalog` with the
detector frames read into the events, whether they are stored inline or in
external HDF5 files, a few points per read. Feed them to the callbacks of
:mod:`crystalmapping.callbacks`; :mod:`crystalmapping.publish` sends them to a
0MQ proxy.

Examples
--------
>>> from crystalmapping import Catalog, replay                      # doctest: +SKIP
>>> for name, doc in replay(Catalog()[uid]):                        # doctest: +SKIP
...     ip(name, doc)
"""

from __future__ import annotations

import uuid
from typing import Iterator

import numpy as np

from .errors import ConfigError, ScanError
from .stage import python_scalar

__all__ = ["replay"]



def replay(run, *, data_key: str | None = None, stream: str = "primary",
           points_per_read: int | None = None) -> Iterator[tuple[str, dict]]:
    """Yield a stored run's documents with the detector frames filled in.

    Parameters
    ----------
    run : crystalmapping.source.Run
        A run of a :class:`crystalmapping.Catalog`.
    data_key : str, optional
        The image key to read lazily (other keys holding arrays are read
        whole). Default: every data key holding a 2-D or 3-D array per event.
    stream : str
        The stream to replay.
    points_per_read : int, optional
        Points whose frames are read in one request (one request per point is
        slow; a few per request are read at once and yielded one by one).
        Default: as many as fit in 64 MiB, at most 16.

    Yields
    ------
    name, doc : str, dict
        ``start``; the stream's descriptor(s), as stored; one ``event`` per
        point, in acquisition order, whose ``data`` holds the frames as numpy
        arrays and the scalars as Python numbers (``filled`` is True for keys
        the descriptor marks external); ``stop`` if the run has one. Frames
        stored inline and frames in external HDF5 files (StreamResource /
        StreamDatum) are both read through the catalog; no resource documents
        are yielded.

    Raises
    ------
    ScanError
        If the run has no such stream or data key.

    Notes
    -----
    Frames are read when their events are reached, ``points_per_read`` points
    at a time, so a large scan streams in bounded memory. The scalar columns
    are read once. Events reference the first descriptor of the stream.
    Per-key timestamps come from the catalog where it has them, else the
    event time.
    """
    import dask

    start = dict(run.start)
    if not start:
        raise ScanError(f"{run!r} has no start document; it cannot be replayed.")
    descriptors = _descriptors(run, stream)
    data_keys: dict[str, dict] = {}
    for desc in descriptors:
        data_keys.update(desc.get("data_keys", {}))
    if data_key is not None and data_key not in data_keys:
        raise ScanError(
            f"replay: run {run.uid[:8]} has no data key {data_key!r} in stream {stream!r}; its "
            f"keys are {sorted(data_keys)}. Pass data_key= one of them, or None for all images."
        )
    image_keys = [data_key] if data_key is not None else [
        k for k, v in data_keys.items() if len(v.get("shape") or []) in (2, 3)]
    if points_per_read is None:
        point_bytes = sum(int(np.prod(data_keys[k].get("shape") or [1])) *
                          np.dtype(data_keys[k].get("dtype_numpy") or "<f8").itemsize
                          for k in image_keys)
        points_per_read = int(min(16, max(1, _READ_BYTES // max(point_bytes, 1))))
    if int(points_per_read) < 1:
        raise ConfigError(f"points_per_read must be >= 1, got {points_per_read}.")
    step = int(points_per_read)
    datasets = {k: run.to_dataset(k, stream=stream, points_per_chunk=step) for k in image_keys}
    ds = next(iter(datasets.values())) if datasets else run.to_dataset(None, stream=stream)
    images = {k: datasets[k][k].data for k in image_keys}
    # to_dataset gives 2-D images per event a frame axis of length 1: drop it again.
    squeeze = {k: len(data_keys[k].get("shape") or []) == 2 for k in image_keys}
    other = [k for k in ds.data_vars if k not in images]
    with dask.config.set(scheduler="synchronous"):
        columns = dict(zip(other, dask.compute(*[ds[k].data for k in other])))
        seq_num, times = dask.compute(ds["seq_num"].data, ds["time"].data)
    stamps = _timestamps(run, stream, other + image_keys)
    external = {k for k in images if data_keys[k].get("external")}
    descriptor_uid = descriptors[0]["uid"]

    yield "start", start
    for desc in descriptors:
        yield "descriptor", dict(desc)
    for first in range(0, len(seq_num), step):
        with dask.config.set(scheduler="synchronous"):
            blocks = {k: np.asarray(var[first:first + step].compute()) for k, var in images.items()}
        for i in range(first, min(first + step, len(seq_num))):
            data = {k: python_scalar(columns[k][i]) if np.ndim(columns[k][i]) == 0
                    else np.asarray(columns[k][i]) for k in other}
            for k, block in blocks.items():
                frames = block[i - first]
                data[k] = frames[0] if squeeze[k] else frames
            t = float(times[i])
            seq = int(seq_num[i])
            yield "event", {
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{descriptor_uid}/event/{seq}")),
                "descriptor": descriptor_uid,
                "seq_num": seq,
                "time": t,
                "data": data,
                "timestamps": {k: float(stamps[k][i]) if k in stamps else t for k in data},
                "filled": {k: True for k in external},
            }
        del blocks
    if run.stop:
        yield "stop", dict(run.stop)


#: Bytes of frames :func:`replay` reads per request by default.
_READ_BYTES = 64 * 2**20


def _descriptors(run, stream: str) -> list[dict]:
    node = run.tiled
    if stream not in node:
        raise ScanError(f"run {run.uid[:8]} has no stream {stream!r}; it has {list(node)}.")
    descriptors = [dict(d) for d in node[stream].descriptors]
    if not descriptors:
        raise ScanError(f"stream {stream!r} of run {run.uid[:8]} has no descriptor document.")
    return descriptors


def _timestamps(run, stream: str, keys) -> dict[str, np.ndarray]:
    node = run.tiled[stream]
    names = set(node)
    return {k: np.asarray(node[f"ts_{k}"].read()) for k in keys if f"ts_{k}" in names}
