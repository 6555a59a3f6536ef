"""Pipeline: the batch composition of the stages on a Dask client.

run -> one reference per point (source: HDF5 rows or catalog rows, a few
hundred bytes) -> one task per point, or per chunk of points, that reads,
preprocesses and locates (:func:`crystalmapping.tasks.process_points`, the
streaming processor's task too) -> gather -> link + maps (the final reduce)
-> Zarr (store). The background image goes to each worker once (scattered,
or computed on the cluster from its point), never inside the task graph.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import dask
import numpy as np
import xarray as xr

from .config import LinkOptions, LocateOptions, ProcessConfig
from .errors import ConfigError, CrystalMappingError, ScanError, StoreError
from .execution import dask_client
from .grid import Grid
from .frames import mean_frame
from .finish import ProcessingError, finish_maps, store_attrs, with_background
from .preprocess import (_check_subtrahend_shape, check_point_index, point_background,
                         resolve_background)
from .source import SERVER_FIX, CatalogUnavailableError, Run
from .store import open_maps, write_maps
from .tasks import process_points

__all__ = ["process_run", "ProcessingError"]

logger = logging.getLogger(__name__)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="point", desc=desc, disable=None if enabled else True,
                dynamic_ncols=True, mininterval=0.5)


def process_run(
    run: Run | xr.Dataset,
    *,
    data_key: str = "dexela_image",
    subtrahend: np.ndarray | str | os.PathLike | int | None = None,
    locate: Mapping[str, Any] | LocateOptions | None = None,
    link: Mapping[str, Any] | LinkOptions | None = None,
    out: str | os.PathLike | None = None,
    client=None,
    scheduler: str | None = None,
    config: ProcessConfig | None = None,
    grid: Grid | None = None,
    points_per_chunk: int | None = None,
    intensity_column: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    root_map: Mapping[str, str] | Any | None = None,
) -> xr.Dataset:
    """Map a run: the batch pipeline end to end.

    Parameters
    ----------
    run : Run or xarray.Dataset
        A run of a catalog (:func:`crystalmapping.open_run`), or its
        dataset from :meth:`Run.to_dataset`.
    data_key : str
        The detector image key.
    subtrahend : ndarray, .npy path, int or None
        The background image, a file holding it, or the index of a grid point
        (acquisition order) whose mean frame is used.
    locate, link : dict or options
        Keywords of ``trackpy.locate`` and of the linker
        (:class:`~crystalmapping.config.LocateOptions`, :class:`~crystalmapping.config.LinkOptions`).
    out : path, optional
        Zarr store to write (atomically; see :mod:`crystalmapping.store`).
    client : distributed.Client, or a function returning a context manager that yields one, optional
        A function is called only after the inputs are checked, so a run
        refused for bad input starts no cluster.
    scheduler : str, optional
        Scheduler address; with neither, a ``LocalCluster`` runs the work.
    config : ProcessConfig, optional
        All parameters at once (then ``data_key``, ``locate``... are ignored).
    grid : Grid, optional
        Override the grid of the start document.
    points_per_chunk : int, optional
        Grid points per chunk and per locate task (default 1).
    intensity_column : {"amplitude", "mass", "signal", "raw_mass"}, optional
    overwrite : bool
        Replace an existing store at ``out``.
    progress : bool
        Show a progress bar.
    root_map : dict or list of "OLD=NEW", optional
        Where the workers see the directories the run's documents name
        (``{"/old/root": "/new/root"}``); default: the catalog's
        (:class:`~crystalmapping.Catalog` ``root_map``).

    Returns
    -------
    maps : xarray.Dataset
        The store's contents (opened from ``out`` when given).

    Raises
    ------
    ProcessingError
        When some points fail: the maps of the points that succeeded are
        written to ``<out>.partial.zarr`` first (or kept on the exception as
        ``.maps`` without ``out``).

    Notes
    -----
    Each task gets references to its points' frames, not the frames: a
    worker reads external HDF5 frames from the file itself when it can open
    it, else through the catalog (:meth:`crystalmapping.source.Run.frame_sources`).
    A dataset (``run`` given as an ``xarray.Dataset``) is read as its chunks.
    """
    if config is None:
        config = ProcessConfig(
            data_key=data_key,
            locate=locate if isinstance(locate, LocateOptions) else LocateOptions.from_dict(locate),
            link=link if isinstance(link, LinkOptions) else LinkOptions.from_dict(link),
            intensity_column=intensity_column or "amplitude",
            points_per_chunk=points_per_chunk or 1,
        )
    if subtrahend is None:
        subtrahend = config.background
    config, record = with_background(config, subtrahend)

    if isinstance(run, Run):
        sources = run.frame_sources(config.data_key, root_map=root_map)
        uid, start = run.uid, run.start
        n_points = len(sources)
        frame_shape = sources[0].reader.shape[-2:] if sources else None
        step = config.points_per_chunk
        spans = [(i, min(i + step, n_points)) for i in range(0, n_points, step)]
        frames = None
    elif isinstance(run, xr.Dataset):
        uid, start = run.attrs.get("uid", ""), run.attrs
        if config.data_key not in run:
            raise ScanError(f"the dataset has no variable {config.data_key!r}; it has {list(run.data_vars)}.")
        frames = _frame_stack(run[config.data_key].data)
        n_points, frame_shape = frames.shape[0], frames.shape[2:]
        starts = np.cumsum((0,) + frames.chunks[0][:-1])
        spans = [(int(s), int(s + n)) for s, n in zip(starts, frames.chunks[0])]
    else:
        raise TypeError(f"run must be a crystalmapping Run or an xarray.Dataset, got {type(run).__name__}.")
    grid = grid or Grid.from_start(start)
    if grid.size < 2:
        raise ScanError(
            f"run {uid[:8]} is a grid of {grid.size} point ({grid.shape}): a map needs at "
            "least 2 points. Map a 2-D grid scan, or look at its frame with the locator."
        )
    if n_points > grid.size:
        raise ScanError(
            f"the run has {n_points} points but its grid {grid.shape} holds {grid.size}; "
            "pass the right grid."
        )
    check_out(out, overwrite)
    if out is not None and isinstance(run, Run):
        _check_out_outside_inputs(Path(out), run, sources)

    # Validate the background before any cluster starts; a point's frames are read on it.
    by_index = isinstance(record, int)
    image = None
    if by_index:
        check_point_index(record, n_points)
    else:
        image = resolve_background(subtrahend)
        if image is not None and frame_shape is not None:
            _check_subtrahend_shape(image.shape, frame_shape)

    options = config.locate.to_dict()
    token = uuid.uuid4().hex[:8]
    starting = client() if callable(client) else dask_client(client, scheduler=scheduler)
    with starting as c:
        if by_index:
            source = sources[record] if frames is None else frames[record]
            sub = _background_point(c, source, f"crystalmapping-background-{token}")
        elif image is not None:
            # once to each worker, not inside every task (nor the graph)
            sub = c.scatter(image, broadcast=True, hash=False)
        else:
            sub = None
        if frames is None:
            n = len(spans)
            futures = c.map(process_points, [sources[a:b] for a, b in spans], [sub] * n,
                            [a for a, _ in spans], [options] * n,
                            key=[f"crystalmapping-points-{token}-{a}" for a, _ in spans],
                            pure=False)
        else:
            blocks = frames.to_delayed().ravel()
            futures = c.compute([
                dask.delayed(process_points, pure=True, name=f"crystalmapping-points-{token}-{a}")(
                    block, sub, a, options)
                for block, (a, _) in zip(blocks, spans)])
        logger.info("processing %d points of run %s in %d tasks", n_points, uid[:8], len(futures))
        try:
            results, failures = _run_tasks(c, futures, spans, progress)
        except CatalogUnavailableError as exc:
            # Every other point would wait for the server too: stop the run, write nothing.
            c.cancel(futures)
            what = str(exc).removesuffix(SERVER_FIX).rstrip()
            raise CatalogUnavailableError(f"{what} {_nothing_written(out)} {SERVER_FIX}") from None
        del sub

    attrs = store_attrs(uid, config, record)
    maps, n_points = finish_maps(results, grid, config, attrs, out)
    if failures:
        first = failures[0]
        message = (f"{len(failures)} of {len(spans)} tasks failed (first: points "
                   f"{first[0]}..{first[1] - 1}: {first[2]!r}).")
        partial = None
        if out is not None:
            partial = Path(str(out).removesuffix(".zarr") + ".partial.zarr")
            write_maps(maps, partial, overwrite=True)
            message += f" The maps of the {n_points} points that succeeded are in {partial}."
        err = ProcessingError(message, partial)
        err.maps = maps
        raise err
    if out is not None:
        write_maps(maps, out, overwrite=overwrite)
        return open_maps(out)
    return maps


def _nothing_written(out) -> str:
    """What a run stopped before its maps were made left at ``out``."""
    if out is None:
        return "No maps were made."
    if Path(out).exists():
        return f"Nothing was written: the previous store at {str(out)!r} is kept as it was."
    return f"Nothing was written at {str(out)!r}."


def _check_out_outside_inputs(out: Path, run: Run, sources) -> None:
    """Refuse a store inside the run's catalog directory or beside its detector files."""
    inputs = set()
    if run.catalog.is_embedded:
        inputs.add(os.path.realpath(run.catalog.directory))
    direct = getattr(getattr(sources[0], "reader", None), "direct", None) if sources else None
    if direct is not None:
        inputs.add(os.path.realpath(os.path.dirname(direct.path)))
    target = os.path.realpath(out.absolute())
    for root in sorted(inputs):
        if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
            raise StoreError(
                f"--out {str(out)!r} lies inside the run's input data ({root!r}); a store "
                "written there could replace what the scan measured. Write the maps "
                "elsewhere, e.g. --out maps/<uid>.zarr."
            )


def check_out(out: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse, before any work, an output store that exists (unless ``overwrite``) or whose
    directory cannot be written.

    Raises
    ------
    StoreError
        Naming the path and what to do.
    """
    if out is None:
        return
    if Path(out).exists() and not overwrite:
        raise StoreError(f"{str(out)!r} already exists; pass overwrite=True (--overwrite) to "
                         "replace it, or choose another output path.")
    _check_writable(Path(out).absolute().parent)


def _check_writable(directory: Path) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        from .errors import StoreError

        raise StoreError(f"cannot write the output under {str(directory)!r}: {str(probe)!r} is "
                         "not writable; choose another --out.")


def _frame_stack(frames):
    """A (point, frame, y, x) dask stack, chunked along points only."""
    import dask.array as da

    arr = frames if isinstance(frames, da.Array) else da.asarray(frames)
    if arr.ndim != 4:
        raise ConfigError(
            f"frames must be a (point, frame, y, x) stack, got {arr.ndim} dimensions "
            f"{arr.shape}; wrap single images with [:, None]."
        )
    if any(len(c) != 1 for c in arr.chunks[1:]):
        arr = arr.rechunk({1: -1, 2: -1, 3: -1})
    return arr


def _background_point(client, source, key: str):
    """The mean frame of the background point, computed and kept on the cluster.

    Every task takes the returned future as its subtrahend, so each worker
    fetches the image once (from the worker that computed it). Raises what
    reading that point raised.
    """
    import dask.array as da
    from distributed import as_completed

    if isinstance(source, da.Array):
        future = client.compute(dask.delayed(point_background, pure=True, name=key)(source))
    else:
        future = client.submit(mean_frame, source, key=key, pure=False)
    for _ in as_completed([future], loop=client.loop):  # distributed.wait needs a default client
        pass
    if future.status != "finished":
        try:
            future.result()  # raises the task's error; the image itself never comes here
        except CrystalMappingError:
            raise
        except Exception as exc:
            from .frames import FrameReadError

            raise FrameReadError(f"the frames of the background point could not be read: "
                                 f"{type(exc).__name__}: {exc}") from None
    return future


def _run_tasks(client, futures, spans, progress):
    """Gather the tasks' results as they finish; keep going past failures."""
    from distributed import as_completed

    where = {f.key: span for f, span in zip(futures, spans)}
    results, failures = [], []
    with _progress(sum(b - a for a, b in spans), progress, "locate") as bar:
        for future in as_completed(futures, loop=client.loop):
            span = where[future.key]
            try:
                results.append(future.result())
            except CatalogUnavailableError:
                raise  # the catalog is gone: every remaining point would fail the same way
            except Exception as exc:  # a failed, cancelled or lost task: keep going
                logger.error("points %d..%d failed: %r", span[0], span[1] - 1, exc)
                failures.append((span[0], span[1], exc))
            future.release()
            bar.update(span[1] - span[0])
    failures.sort(key=lambda f: f[0])
    return results, failures
