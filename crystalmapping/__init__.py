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

#: Where each public name lives. Its module is imported when the name is first used
#: (``cm.process_run``, ``from crystalmapping import process_run``), not with the
#: package: a command or a worker that needs one stage does not pay seconds of imports
#: (pandas, numba, xarray, dask) for the others.
_LAZY = {
    "ImageProcessor": "callbacks", "PeakTracker": "callbacks", "TrackLinker": "callbacks",
    "LinkOptions": "config", "LocateOptions": "config", "ProcessConfig": "config",
    "catalog_maps": "derived", "record_maps": "derived",
    "CrystalMappingError": "errors",
    "Grid": "grid",
    "inspect": "inspection", "plot_inspection": "inspection",
    "process_run": "pipeline",
    "replay": "playback",
    "plot_maps": "mapfigure",
    "plot_real_aspect": "plot", "reshape": "plot",
    "simulate_scan": "sim",
    "Catalog": "source", "open_catalog": "source", "open_run": "source",
    "open_maps": "store", "peak_table": "store", "write_maps": "store",
    "StreamProcessor": "stream", "processor_factory": "stream",
}

try:
    __version__ = _version("crystalmapping")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0+unknown"


def __getattr__(name: str):
    """A public name of :data:`__all__`, imported from its module on first use; or a
    module of the package (``cm.errors.NoPeaksWarning``), imported then."""
    from importlib import import_module

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value  # later uses are plain attribute reads
        return value
    if not name.startswith("__"):
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)  # the public names; each is imported on first use
