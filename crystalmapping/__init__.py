"""crystalmapping: crystal (grain) maps from X-ray diffraction grid scans.

The dataflow, one module per stage::

    source      run of a tiled catalog -> lazy xarray/dask dataset
    preprocess  mean of a point's frames - background, clipped at zero
    locate      Bragg peaks of one image -> table (trackpy.locate)
    link        peak table of the scan -> track ids
    maps        tracks + grid -> one zero-background map per track (the final reduce)
    store       Zarr contract, atomic writes, provenance
    pipeline    the batch composition on Dask

Examples
--------
>>> import crystalmapping as cm                                        # doctest: +SKIP
>>> run = cm.open_run("sqlite:///data/catalog.db", uid)                # doctest: +SKIP
>>> maps = cm.process_run(run, data_key="dexela_image", subtrahend=4523,
...                       locate=dict(diameter=15, percentile=80, separation=100),
...                       link=dict(search_range=50), out="maps.zarr")  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .config import LinkOptions, LocateOptions, ProcessConfig
from .errors import CrystalMappingError
from .grid import Grid
from .pipeline import process_run
from .plot import plot_maps, plot_real_aspect, reshape
from .sim import simulate_scan
from .source import Catalog, open_catalog, open_run
from .store import open_maps, peak_table, write_maps

try:
    __version__ = _version("crystalmapping")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0+unknown"

__all__ = [
    "Catalog",
    "CrystalMappingError",
    "Grid",
    "LinkOptions",
    "LocateOptions",
    "ProcessConfig",
    "open_catalog",
    "open_maps",
    "open_run",
    "peak_table",
    "plot_maps",
    "plot_real_aspect",
    "process_run",
    "reshape",
    "simulate_scan",
    "write_maps",
]
