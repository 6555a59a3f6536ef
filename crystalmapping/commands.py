"""Commands: what each ``crystalmapping`` subcommand does with its parsed options.

:mod:`crystalmapping.cli` parses the command line (and a ``--config`` file)
and calls one of these with the parsed :class:`argparse.Namespace`; each
returns the exit status and prints its one-line result (``maps: ...``,
``plot: ...``, a uid, ``published run ...``). Errors are raised, and
:func:`crystalmapping.cli.main` reports them.

========  ==========================================================
process   map a run of a catalog into a Zarr store (and a PNG)
process-new  map every finished grid scan without maps (:mod:`crystalmapping.newruns`)
simulate  write a simulated scan into a catalog, print its uid
demo      simulate, map and score a scan (:mod:`crystalmapping.demo`)
plot      plot a map store (:mod:`crystalmapping.mapfigure`)
inspect   one point's image with its candidates (:mod:`crystalmapping.inspection`)
mask      a detector mask from a background frame (:mod:`crystalmapping.mask`)
serve     map every run arriving from a 0MQ proxy (:mod:`crystalmapping.serve`)
publish   send a stored run to a 0MQ proxy (:mod:`crystalmapping.publish`)
========  ==========================================================
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

from .cli import SERVE_KEYS, build_config, quiet_dask_logs, stream_timing
from .config import load_config_file
from .demo import shape_for_points
from .errors import ConfigError

__all__ = ["process", "process_new", "simulate", "demo", "plot", "serve", "publish", "cluster"]

logger = logging.getLogger("crystalmapping")


def process(args) -> int:
    """Map the run ``--uid`` of ``--catalog`` into the store ``--out``; print its path and speed.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``crystalmapping process``, as :mod:`crystalmapping.cli` parses them.

    Returns
    -------
    status : int
        0; 1 when ``--record`` could not record the written maps in the catalog.
    """
    from .pipeline import check_out, process_run
    from .source import open_run

    file_values = load_config_file(args.config) if args.config else {}
    config = build_config(args, file_values)
    catalog = args.catalog or file_values.get("catalog")
    uid = args.uid or file_values.get("uid")
    out = args.out or file_values.get("out")
    if uid is None or out is None:
        raise ConfigError("process needs --uid UID and --out maps.zarr (or uid:/out: in --config).")
    storage = args.readable_storage or file_values.get("readable_storage") or []
    if isinstance(storage, str):
        storage = [storage]
    root_map = args.root_map or file_values.get("root_map")
    overwrite = bool(args.overwrite or file_values.get("overwrite"))
    check_out(out, overwrite)  # before the catalog is opened
    run = open_run(catalog, uid, api_key=args.api_key, readable_storage=storage, root_map=root_map)
    t0 = time.perf_counter()
    # the cluster starts once process_run has checked the inputs (the background, the grid)
    maps = process_run(run, config=config, out=out, client=lambda: cluster(args, file_values),
                       overwrite=overwrite, progress=args.progress)
    elapsed = time.perf_counter() - t0
    n = int(maps.attrs.get("n_points_measured", 0))
    print(f"maps: {Path(out).absolute()}  ({maps.sizes['grain']} maps, {n} points, "
          f"{elapsed:.1f} s, {n / elapsed if elapsed else math.nan:.1f} points/s)")
    plot = args.plot or file_values.get("plot")
    if plot:
        from .mapfigure import save_maps_plot

        print(f"plot: {save_maps_plot(maps, plot).absolute()}")
    if getattr(args, "record", None) or file_values.get("record"):
        from .derived import record_maps

        try:
            derived = record_maps(run, run.uid, out, maps, {"mapped_by": "crystalmapping process",
                                                            "seconds": round(elapsed, 3)})
        except Exception as exc:  # noqa: BLE001 - the maps are written; say why the record is not
            print(f"the maps are in {Path(out).absolute()} but were not recorded in "
                  f"{run.catalog.uri}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"recorded: derived run {derived} (parent_uid {run.uid}) in {run.catalog.uri}")
    return 0


def process_new(args) -> int:
    """Map the runs of ``--catalog`` without maps into ``--out-dir``; one line per run, a summary.

    Returns 1 if a run failed, else 0 (also when another pass holds the directory).
    """
    from .newruns import parse_since, process_new as process_new_runs
    from .source import Catalog

    file_values = load_config_file(args.config) if args.config else {}
    own = {k: file_values.pop(k) for k in ("out_dir", "since", "record", "retry_failed",
                                           "busy_grace") if k in file_values}
    config = build_config(args, file_values)
    out_dir = args.out_dir or own.get("out_dir")
    if out_dir is None:
        raise ConfigError("process-new needs --out-dir DIR (or out_dir: in --config).")
    since = parse_since(args.since or own.get("since"))
    storage = args.readable_storage or file_values.get("readable_storage") or []
    catalog = Catalog(args.catalog or file_values.get("catalog"), api_key=args.api_key,
                      readable_storage=[storage] if isinstance(storage, str) else storage,
                      root_map=args.root_map or file_values.get("root_map"), create=False)
    catalog.client  # noqa: B018 - a wrong address or path fails before any cluster starts
    report = process_new_runs(  # the cluster starts only if a run is to be mapped
        catalog, out_dir, config, cluster=lambda: cluster(args, file_values), since=since,
        uids=getattr(args, "uids", None),
        record=bool(args.record and own.get("record", True)),
        retry_failed=bool(args.retry_failed or own.get("retry_failed")),
        busy_grace=float(own.get("busy_grace", args.busy_grace)),
        echo=lambda line: print(line, flush=True))
    print(report.summary(catalog.uri, Path(out_dir).expanduser().absolute()), flush=True)
    return 1 if report.failed else 0


@contextlib.contextmanager
def cluster(args, file_values):
    """The dask client of ``--scheduler``/``--workers`` (or their ``--config`` values).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.
    file_values : dict
        The options of the ``--config`` file ({} without one).

    Returns
    -------
    client : context manager
        :func:`crystalmapping.execution.dask_client`'s: a LocalCluster's client
        unless a scheduler address is given.
    """
    from .execution import dask_client

    quiet_dask_logs(getattr(args, "verbose", 0))
    scheduler = args.scheduler or file_values.get("scheduler")
    workers = args.workers or file_values.get("workers")
    with dask_client(scheduler=scheduler, n_workers=workers) as client:
        link = getattr(client, "dashboard_link", None)
        if link:  # where to watch the tasks (bokeh draws it)
            print(f"dask dashboard: {link}", file=sys.stderr, flush=True)
        yield client


def simulate(args) -> int:
    """Write a simulated grid scan into ``--catalog``; print its uid.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``crystalmapping simulate``, as :mod:`crystalmapping.cli` parses them.

    Returns
    -------
    status : int
        0.
    """
    from .demo import simulate_into
    from .source import open_catalog

    catalog = open_catalog(args.catalog, api_key=args.api_key)
    shape = tuple(args.shape) if args.shape else shape_for_points(args.points)
    grains = int(args.grains) if args.grains.isdigit() else args.grains
    scan, uid = simulate_into(catalog, shape=shape, detector=tuple(args.detector),
                              frames=args.frames, grains=grains, seed=args.seed,
                              inline=args.inline, stop_after=args.stop_after, powder=args.powder)
    logger.info("simulated %s points, background point %d", shape, scan.truth.attrs["background_point"])
    print(uid)
    return 0


def demo(args) -> int:
    """Simulate a scan, map it and score the maps (:func:`crystalmapping.demo.run_demo`).

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``crystalmapping demo``, as :mod:`crystalmapping.cli` parses them.

    Returns
    -------
    status : int
        0.
    """
    from .demo import run_demo

    shape = tuple(args.shape) if args.shape else shape_for_points(args.points)
    run_demo(args.catalog, args.out_dir, shape=shape, detector=tuple(args.detector),
             frames=args.frames, seed=args.seed, cluster=lambda: cluster(args, {}),
             progress=args.progress)
    return 0


def inspect(args) -> int:
    """Draw point ``--point`` of run ``--uid`` with every candidate and its verdict; print
    the PNG's path and the count of each verdict."""
    from .inspection import inspect as inspect_point, plot_inspection
    from .source import open_run

    file_values = load_config_file(args.config) if args.config else {}
    config = build_config(args, file_values)
    run = open_run(args.catalog or file_values.get("catalog"), args.uid, api_key=args.api_key)
    result = inspect_point(run, args.point, config)
    fig = plot_inspection(result, zoom=args.zoom)
    fig.savefig(args.output, dpi=150, bbox_inches="tight")
    counts = ", ".join(f"{k} {n}" for k, n in result.counts().items() if n)
    print(f"inspect: {Path(args.output).absolute()}  (point {result.point}: "
          f"{counts or 'no candidates'})")
    return 0


def mask(args) -> int:
    """Write the hot and dead pixels of ``--from-background`` (joined with ``--add`` masks)
    to ``--output``; print its path and how many pixels it masks."""
    import numpy as np

    from .mask import hot_pixels, load_mask
    from .preprocess import resolve_background

    background = resolve_background(args.background)
    bad = hot_pixels(background, n_sigma=args.n_sigma)
    for extra in args.add or []:
        bad |= load_mask(extra, bad.shape)
    np.save(args.output, bad)
    print(f"mask: {Path(args.output).absolute()}  ({int(bad.sum())} of {bad.size} pixels bad)")
    return 0


def plot(args) -> int:
    """Plot the map store ``store`` into the PNG ``--output``; print its path.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``crystalmapping plot``, as :mod:`crystalmapping.cli` parses them.

    Returns
    -------
    status : int
        0.
    """
    from .mapfigure import save_maps_plot

    png = save_maps_plot(args.store, args.output, max_grains=args.max_grains)
    print(f"plot: {Path(png).absolute()}")
    return 0


def serve(args) -> int:
    """Map every run that arrives from the 0MQ proxy until SIGINT/SIGTERM.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``crystalmapping serve``, as :mod:`crystalmapping.cli` parses them.

    Returns
    -------
    status : int
        :meth:`crystalmapping.serve.DocumentServer.serve_forever`'s.
    """
    import signal

    file_values = load_config_file(args.config) if args.config else {}
    serve_values = {k: file_values.pop(k) for k in SERVE_KEYS if k in file_values}

    def pick(name, default=None):
        value = getattr(args, name, None)
        return serve_values.get(name, default) if value is None else value

    config = build_config(args, file_values)
    from .references import parse_root_map
    from .trust import parse_data_roots

    root_map = parse_root_map(pick("root_map"))  # a bad entry stops here, before any cluster
    import os

    from .liveview import API_KEY_ENV, parse_http_address

    http_key = args.http_api_key or os.environ.get(API_KEY_ENV) or None
    if args.http:
        parse_http_address(args.http, http_key)  # a public page without a key stops here
    data_roots = parse_data_roots(pick("data_roots") or ())
    catalog_uri = args.catalog or file_values.get("catalog")
    catalog = None
    if catalog_uri:
        from .source import Catalog

        catalog = Catalog(catalog_uri, api_key=pick("api_key"))
    serve_logger = logging.getLogger("crystalmapping.serve")
    if serve_logger.getEffectiveLevel() > logging.INFO:
        serve_logger.setLevel(logging.INFO)  # one line per run, even without -v
    options = stream_timing(args, serve_values)
    from .serve import DocumentServer  # after the checks above: seconds of imports

    with contextlib.ExitStack() as stack:
        # A terminal's Ctrl-C reaches the whole process group: the LocalCluster's worker
        # processes inherit an ignored SIGINT, so they keep working while the server
        # finishes the runs in flight (then it closes them).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            client = stack.enter_context(cluster(args, file_values))
        finally:
            signal.signal(signal.SIGINT, previous)
        server = DocumentServer(
            client, config, pick("out_dir", "maps"), address=pick("address", "127.0.0.1:5568"),
            prefix=pick("prefix", "raw"), serializer=pick("serializer", "msgpack"),
            catalog=catalog, report=pick("report"),
            drain_timeout=float(pick("drain_timeout", 120.0)), root_map=root_map,
            data_roots=data_roots,
            overwrite=bool(args.overwrite or file_values.get("overwrite")),
            http=args.http, http_api_key=http_key, **options)
        return server.serve_forever()


def publish(args) -> int:
    """Send the run ``--uid`` to the proxy at ``--address``; print what was sent.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``crystalmapping publish``, as :mod:`crystalmapping.cli` parses them.

    Returns
    -------
    status : int
        0.
    """
    from .publish import check_rate, connect, send_run
    from .source import open_run

    check_rate(args.rate)
    # the proxy first: seconds at most, where opening the catalog takes several
    with connect(args.address, prefix=args.prefix, serializer=args.serializer,
                 connect_timeout=args.connect_timeout) as publisher:
        run = open_run(args.catalog, args.uid, api_key=args.api_key,
                       readable_storage=args.readable_storage or [])
        t0 = time.monotonic()
        counts = send_run(publisher, run, fill=args.fill, rate=args.rate, data_key=args.data_key)
    seconds = time.monotonic() - t0  # until every message was sent
    sent = ", ".join(f"{n} {name}" for name, n in counts.items())
    print(f"published run {run.uid} to {args.address} (prefix {args.prefix!r}) in "
          f"{seconds:.1f} s: {sent}")
    return 0
