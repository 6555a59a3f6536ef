"""Source: bluesky runs from a tiled catalog, as lazy xarray/dask datasets.

Only this module and the two it is built on know tiled:
:mod:`crystalmapping.catalog` (catalogs, embedded or served, and how any
process reaches them) and :mod:`crystalmapping.readers` (the frames read
where a task runs: from the HDF5 file directly when tiled itself would serve
it, else through the catalog). Their public names are importable from here too.

:meth:`Run.to_dataset` gives the primary stream as an ``xarray.Dataset`` of
dask arrays; each chunk is read by a small picklable reader that reconnects to
the catalog in whichever process runs it, so the same graph runs on threads,
on a ``LocalCluster`` of processes, or on a remote scheduler (an in-process
tiled context itself cannot be pickled). :meth:`Run.frame_sources` gives the
same reads as one small reference per grid point (what the batch pipeline
sends to its tasks).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Mapping

import numpy as np
import xarray as xr

from .catalog import Catalog, default_catalog_dir, open_catalog, open_run
from .errors import ConfigError, ScanError
from .grid import Grid
from .readers import (_EMBEDDED_READ_LOCK, _WARNED, SERVER_FIX, SERVER_GRACE_SECONDS,  # noqa: F401
                      CatalogUnavailableError, PointFrames, _ArrayReader, _Direct,
                      direct_reference)

__all__ = ["Catalog", "Run", "PointFrames", "open_catalog", "open_run", "default_catalog_dir",
           "IMAGE_DIMS", "CatalogUnavailableError", "SERVER_GRACE_SECONDS"]

logger = logging.getLogger(__name__)

#: Dimensions of the image variable of :meth:`Run.to_dataset`: grid point
#: (acquisition order), frame within the point, detector row, detector column.
IMAGE_DIMS = ("point", "frame", "pixel_y", "pixel_x")


class Run:
    """One bluesky run of a :class:`Catalog`.

    Attributes
    ----------
    uid : str
    start, stop : dict
        The start and stop documents (``stop`` is empty while the run is open).
    tiled : tiled client
        The underlying tiled node, for anything else.
    """

    def __init__(self, catalog: Catalog, node):
        self.catalog = catalog
        self.tiled = node
        metadata = node.metadata
        self.start: dict = dict(metadata.get("start") or {})
        self.stop: dict = dict(metadata.get("stop") or {})
        self.uid: str = self.start.get("uid", "")

    def __repr__(self) -> str:
        return f"<Run {self.uid[:8]} scan_id={self.start.get('scan_id')} in {self.catalog.uri}>"

    @property
    def grid(self) -> Grid:
        """The scan grid from the start document."""
        return Grid.from_start(self.start)

    def streams(self) -> list[str]:
        return list(self.tiled)

    def to_dataset(self, data_key: str | None = "dexela_image", *, stream: str = "primary",
                   points_per_chunk: int = 1) -> xr.Dataset:
        """The stream as an ``xarray.Dataset`` of dask arrays; nothing is read.

        Parameters
        ----------
        data_key : str, optional
            The detector image key. Its variable has dims
            :data:`IMAGE_DIMS` ``(point, frame, pixel_y, pixel_x)`` and
            ``points_per_chunk`` points per chunk (a 2-D image per event gets a
            ``frame`` axis of length 1). None: no image is checked.
        stream : str
        points_per_chunk : int
            Points per chunk of the image variable (the last chunk may be smaller).

        Returns
        -------
        ds : xarray.Dataset
            Every data key of the stream on dim ``point`` (other array keys get
            dims ``<key>_dim_<i>``), coordinates ``seq_num``, ``time``, and ``row``,
            ``col`` (grid indices, snaking undone) when the start document has a
            2-D grid; ``attrs`` hold the start document (``uid``, ``shape``,
            ``extents``, ``snaking``, ``motors``...). Frames in external HDF5
            files are read from the files where they open (see the module's
            notes), else through the catalog.
        """
        import dask.array as da
        from dask.base import tokenize

        if stream not in self.tiled:
            raise ScanError(f"run {self.uid[:8]} has no stream {stream!r}; it has {self.streams()}.")
        node = self.tiled[stream]
        keys = [k for k in node if not k.startswith("ts_")]
        if data_key is not None and data_key not in keys:
            raise ScanError(
                f"run {self.uid[:8]} has no data key {data_key!r} in stream {stream!r}; "
                f"its keys are {sorted(keys)}. Pass --data-key with one of them."
            )
        if points_per_chunk < 1:
            raise ConfigError(f"points_per_chunk must be >= 1, got {points_per_chunk}.")
        locator = self.catalog._locator
        variables, coords = {}, {}
        for key in keys:
            child = node[key]
            shape, dtype = tuple(child.shape), child.dtype
            is_image = key == data_key
            if is_image and len(shape) not in (3, 4):
                raise ScanError(
                    f"data key {data_key!r} must hold one (M, N) image or (K, M, N) frames per "
                    f"event, got per-event shape {shape[1:]}."
                )
            reader = _ArrayReader(locator, self.uid, stream, key, shape, dtype,
                                  add_frame_axis=is_image and len(shape) == 3,
                                  direct=self._direct(child) if is_image else None)
            chunks = ((points_per_chunk,) + reader.shape[1:]) if is_image else reader.shape
            name = f"{key}-{tokenize(locator.kind, locator.uri, self.uid, stream, key, reader.shape, chunks)}"
            arr = da.from_array(reader, chunks=chunks, name=name, lock=False, asarray=False,
                                meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
                                inline_array=False)
            dims = IMAGE_DIMS if is_image else ("point",) + tuple(
                f"{key}_dim_{i}" for i in range(1, reader.ndim))
            if key in ("seq_num", "time"):
                coords[key] = (dims, arr)
            else:
                variables[key] = (dims, arr)
        ds = xr.Dataset(variables, coords=coords, attrs=dict(self.start))
        try:
            grid = Grid.from_start(self.start)
        except ScanError:
            grid = None
        if grid is not None:
            n = ds.sizes.get("point", 0)
            if n <= grid.size:
                row, col = grid.indices(np.arange(n))
                ds = ds.assign_coords(row=("point", row), col=("point", col))
        return ds

    def frame_sources(self, data_key: str = "dexela_image", *, stream: str = "primary",
                      root_map: Mapping[str, str] | Iterable[str] | None = None
                      ) -> list[PointFrames]:
        """One small picklable reference per grid point (acquisition order) to its frames.

        ``crystalmapping.frames.read_frames(source)`` reads a point's
        ``(K, M, N)`` frames wherever it runs: from the HDF5 file when the
        frames are external and the file opens there (with the catalog's root
        map, or ``root_map`` if given), else through the catalog. The batch
        pipeline sends these to its tasks instead of arrays.

        Examples
        --------
        >>> sources = run.frame_sources("dexela_image")           # doctest: +SKIP
        >>> read_frames(sources[3]).shape                          # doctest: +SKIP
        (2, 3888, 3072)
        """
        try:  # one request, that brings where the data lie too (direct_reference reads it)
            child = self.tiled.new_variation(include_data_sources=True)[f"{stream}/{data_key}"]
        except KeyError:
            child = None
        except Exception as exc:  # noqa: BLE001 - a server that will not give the data sources
            logger.info("run %s: %s/%s looked up without its data sources (%r)",
                        self.uid[:8], stream, data_key, exc)
            try:
                child = self.tiled[stream][data_key]
            except KeyError:
                child = None
        if child is None:
            if stream not in self.tiled:
                raise ScanError(f"run {self.uid[:8]} has no stream {stream!r}; it has "
                                f"{self.streams()}.")
            keys = sorted(k for k in self.tiled[stream] if not k.startswith("ts_"))
            raise ScanError(
                f"run {self.uid[:8]} has no data key {data_key!r} in stream {stream!r}; "
                f"its keys are {keys}. Pass --data-key with one of them."
            )
        shape = tuple(child.shape)
        if len(shape) not in (3, 4):
            raise ScanError(
                f"data key {data_key!r} must hold one (M, N) image or (K, M, N) frames per "
                f"event, got per-event shape {shape[1:]}."
            )
        reader = _ArrayReader(self.catalog._locator, self.uid, stream, data_key, shape,
                              child.dtype, add_frame_axis=len(shape) == 3,
                              direct=self._direct(child, root_map))
        return [PointFrames(reader, i) for i in range(shape[0])]

    def _direct(self, node, root_map=None) -> _Direct | None:
        """See :func:`crystalmapping.readers.direct_reference`."""
        return direct_reference(self.catalog, self.uid, node, root_map)

    # The tutorial's name for the same thing.
    def xarray_dask(self, data_key: str | None = "dexela_image", **kwargs) -> xr.Dataset:
        """Alias of :meth:`to_dataset` (the tutorial's ``run.xarray_dask()``)."""
        return self.to_dataset(data_key, **kwargs)

    def documents(self, fill: bool = False) -> Iterator[tuple[str, dict]]:
        """The run's bluesky documents, as stored (``fill`` is accepted for the tutorial's call)."""
        yield from self.tiled.documents(fill=fill) if fill else self.tiled.documents()
