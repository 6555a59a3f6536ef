"""The demo: a simulated scan of the measured rod, mapped end to end, scored against its truth.

``crystalmapping demo`` (and ``make demo``) runs :func:`run_demo`: simulate a
grid scan of the rod's three measured grains into an embedded catalog
(detector frames in HDF5 named by StreamResource documents), map it on a
Dask cluster, draw the maps, and compare them with the simulation's ground
truth. ``crystalmapping simulate`` uses :func:`simulate_into` alone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .errors import ConfigError

__all__ = ["run_demo", "simulate_into", "shape_for_points"]


def shape_for_points(points: int) -> tuple[int, int]:
    """A grid of about ``points`` points with the measured rod's 4:1 aspect (133 x 33)."""
    rows = max(2, round(math.sqrt(points * 4)))
    return rows, max(2, round(points / rows))


def simulate_into(catalog, *, shape, detector, frames, grains, seed, inline, stop_after=None,
                  powder=0.0):
    """Simulate a scan and store it in ``catalog``; ``(scan, uid)``."""
    from .sim import simulate_scan

    if not inline and catalog.detector_dir is None:
        raise ConfigError(
            "simulating external HDF5 frames into a tiled server needs a directory the server "
            "can read; simulate into an embedded catalog, or pass --inline."
        )
    scan = simulate_scan(shape=shape, detector_shape=detector, frames_per_point=frames,
                         grains=grains, seed=seed, stop_after=stop_after, powder=powder)
    documents = scan.documents(external=not inline, directory=catalog.detector_dir)
    uid = catalog.ingest(documents)
    return scan, uid


def run_demo(catalog_uri, out_dir, *, shape, detector, frames, seed, cluster, progress=True):
    """Simulate, map, plot and score; print what happened as it goes.

    Parameters
    ----------
    catalog_uri : str or path, optional
        The catalog to simulate into (default: the per-user embedded one).
    out_dir : path
        Where ``maps.zarr`` and ``maps.png`` go.
    shape, detector : (int, int)
        The grid and the detector's size.
    frames, seed : int
    cluster : callable
        Returns a context manager giving a ``distributed.Client``.
    progress : bool

    Returns
    -------
    maps : xarray.Dataset
    """
    from .accuracy import pixel_noise, score_maps, summarize
    from .pipeline import process_run
    from .mapfigure import save_maps_plot
    from .source import open_catalog

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    catalog = open_catalog(catalog_uri)
    print(f"catalog: {catalog.uri}")
    print(f"simulating a {shape[0]} x {shape[1]} grid scan of a crystal rod "
          f"({frames} frames/point, {detector[0]} x {detector[1]} px)...")
    scan, uid = simulate_into(catalog, shape=shape, detector=detector, frames=frames,
                              grains="reference", seed=seed, inline=False)
    t1 = time.perf_counter()
    print(f"run {uid} written in {t1 - t0:.1f} s; mapping it...")
    background = int(scan.truth.attrs["background_point"])
    run = catalog[uid]
    out = out_dir / "maps.zarr"
    with cluster() as client:
        t2 = time.perf_counter()
        maps = process_run(run, subtrahend=background, out=out, overwrite=True, client=client,
                           progress=progress)
        t3 = time.perf_counter()
    png = save_maps_plot(maps, out_dir / "maps.png")
    n = scan.n_points
    print(f"mapped {n} points in {t3 - t2:.1f} s ({n / (t3 - t2):.1f} points/s): "
          f"{maps.sizes['grain']} maps of {maps.attrs['n_grains']} grains, from "
          f"{scan.truth.sizes['peak']} true Bragg peaks of 3 grains")
    line = summarize(*score_maps(maps, scan.truth, pixel_noise(scan)))
    print(f"against the truth: worst best-map IoU {line['min_best_iou']:.3f}, worst intensity "
          f"correlation {line['min_intensity_r']:.3f}, {line['spurious_maps']} spurious maps")
    print(f"maps: {out.absolute()}")
    print(f"plot: {png.absolute()}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return maps
