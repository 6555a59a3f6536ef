"""crystalmapping: crystal (grain) maps from X-ray diffraction grid scans.

The dataflow, one module per stage::

    catalog     tiled catalogs, embedded or served: runs, documents, how any process reaches them
    source      run of a catalog -> lazy xarray/dask dataset, or one frame reference per point
    readers     those references read where a task runs (HDF5 file directly, else tiled)
    references  the file and rows a document names (StreamResource/StreamDatum, ophyd v1
                Resource/Datum, root maps), and their event-model Filler handlers
    frames      a point's frames read from those rows of the HDF5 file
    preprocess  mean of a point's frames - background, clipped at zero
    locate      Bragg peaks of one image -> table (bragg locator or trackpy.locate);
                bragg and _bragg_* are the compiled locator's kernels
    inspection  one point's image with every candidate and the rule that kept or rejected it
    tasks       one grid point: read + preprocess + locate (shared by batch and stream)
    link        peak table of the scan -> track ids (grid linker or trackpy.link)
    maps        tracks + grid -> one zero-background map per track, grain_id (the final reduce)
    store       Zarr contract, atomic writes, provenance
    finish      per-point tables -> linked, filled maps, or the tables kept (batch and live)
    pipeline    the batch composition on Dask
    stream      one live run: bluesky documents -> a future per point -> partial and final maps,
                composed of:
    router      one run's documents -> each point's frames (inline, or HDF5 rows)
    submit      a point's frames -> its future on the executor (after the background point)
    ledger      a live run's points: received, queued, done, failed; lag and latency
    writer      partial, final and timeout maps of a live run, through finish
    trust       checks on what the network sends before it names a file (uids, data roots)
    wire        documents <-> bytes on the 0MQ proxy (msgpack-numpy, never pickle)
    dispatch    the proxy's receiving end (bluesky's RemoteDispatcher, safe by default)
    runs        many runs' documents -> one stream processor each; errors logged per run
    report      each live run's summary: a log line, a JSON line, a derived run
    serve       the live server: receive, route, report; signals and draining at its stop
    derived     the catalog record of a map store, the maps in it; catalog_maps reads them
    publish     a stored run replayed to the proxy
    demo        simulate, map and score a scan end to end (``crystalmapping demo``)
    callbacks   the tutorial's ImageProcessor / PeakTracker / TrackLinker
    stage       the callbacks' base: one input run -> one derived run (subscriptions, start, stop)
    playback    a stored run's documents, frames filled in (replay: the tutorial's Filler)
    accuracy    scores of maps against the truth of a simulation
    plot        a scan's per-point values and images in motor units (reshape, plot_real_aspect)
    mapfigure   a map dataset's figure: total intensity + one panel per grain, as a PNG
    cli         the ``crystalmapping`` command line: parses the options, dispatches
    commands    what each command does (process, simulate, demo, plot, serve, publish)

Around them: grid (points on the scan grid, snaking undone), config (the
options, YAML files), errors, execution (the Dask client) and sim (scans with
their ground truth).

Examples
--------
>>> import crystalmapping as cm                                        # doctest: +SKIP
>>> run = cm.open_run("sqlite:///data/catalog.db", uid)                # doctest: +SKIP
>>> maps = cm.process_run(run, data_key="dexela_image", subtrahend=4523,
...                       locate=dict(diameter=15, percentile=80, separation=100),
...                       link=dict(search_range=50), out="maps.zarr")  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .callbacks import ImageProcessor, PeakTracker, TrackLinker
from .config import LinkOptions, LocateOptions, ProcessConfig
from .derived import catalog_maps, record_maps
from .errors import CrystalMappingError
from .grid import Grid
from .inspection import inspect, plot_inspection
from .pipeline import process_run
from .playback import replay
from .mapfigure import plot_maps
from .plot import plot_real_aspect, reshape
from .sim import simulate_scan
from .source import Catalog, open_catalog, open_run
from .store import open_maps, peak_table, write_maps
from .stream import StreamProcessor, processor_factory

try:
    __version__ = _version("crystalmapping")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0+unknown"

__all__ = [
    "ImageProcessor",
    "PeakTracker",
    "TrackLinker",
    "replay",
    "StreamProcessor",
    "processor_factory",
    "Catalog",
    "catalog_maps",
    "CrystalMappingError",
    "Grid",
    "inspect",
    "plot_inspection",
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
    "record_maps",
    "reshape",
    "simulate_scan",
    "write_maps",
]
