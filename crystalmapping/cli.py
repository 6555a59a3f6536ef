"""Command line: ``crystalmapping process | process-new | demo | simulate | plot | serve | publish``.

Option tables and shared option groups live in :mod:`crystalmapping.clioptions`.

This module parses the command line and dispatches to
:mod:`crystalmapping.commands`, which runs the command.

Every processing option can also come from a YAML file (``--config
file.yaml``, keys are the option names with ``_`` or ``-``); options given on
the command line win over the file. The configuration that ran is saved in the
output store.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from .clioptions import (_EXEC_KEYS, _LINK_HELP, _LOCATE_HELP, _OFF, _PROCESS_KEYS,  # noqa: F401
                         ROOT_MAP_HELP as _ROOT_MAP_HELP, _bool, _number_or_off,
                         _optional_number, add_execution_options as _add_execution_options,
                         add_process_new, add_processing_options as _add_processing_options)
from .config import LinkOptions, LocateOptions, ProcessConfig, drop_unused
from .errors import ConfigError, CrystalMappingError

__all__ = ["main", "build_config", "stream_timing", "SERVE_KEYS"]

def build_config(args: argparse.Namespace, file_values: dict[str, Any]) -> ProcessConfig:
    """The processing configuration: command-line options over the ``--config`` file's.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line (``None``: an option not given).
    file_values : dict
        The options of the ``--config`` file ({} without one).

    Returns
    -------
    config : ProcessConfig

    Raises
    ------
    ConfigError
        If the file holds an option that does not exist, or a value is out of range.
    """
    valid = (set(_LOCATE_HELP) | set(_LINK_HELP) | set(_PROCESS_KEYS) | set(_EXEC_KEYS))
    unknown = sorted(set(file_values) - valid)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} in {args.config}; valid options are {sorted(valid)}."
        )

    def pick(name):
        value = getattr(args, name, None)
        return file_values.get(name) if value is None else value

    file_values = drop_unused(file_values, pick("locator") or "bragg", pick("linker") or "grid",
                              args.config)
    locate = {k: pick(k) for k in _LOCATE_HELP if pick(k) is not None}
    link = {k: pick(k) for k in _LINK_HELP if pick(k) is not None}
    for k in ("diameter", "memory", "topn", "max_iterations"):
        for d in (locate, link):
            if k in d and isinstance(d[k], float) and d[k].is_integer():
                d[k] = int(d[k])
    background = pick("background")
    if isinstance(background, str) and background.strip().lstrip("-").isdigit():
        background = int(background)
    values = {k: pick(k) for k in ("data_key", "intensity_column", "points_per_chunk")
              if pick(k) is not None}
    if locate.get("mask"):  # read it here first: a bad mask is an error before any work
        from pathlib import Path

        from .mask import load_mask

        locate["mask"] = str(Path(locate["mask"]).absolute())
        load_mask(locate["mask"])
    return ProcessConfig(background=background, locate=LocateOptions(**locate),
                         link=LinkOptions(**link), **values)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("crystalmapping").setLevel(level)
    for name in ("tiled", "httpx"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def quiet_dask_logs(verbose: int) -> None:
    """dask's own INFO lines (scheduler and worker start/stop) only with ``-vv``.

    Called just before a command starts or reaches a cluster: distributed sets
    its loggers' levels when it is imported, so it is imported here first (and
    commands that need no cluster do not pay for its import).
    """
    import distributed  # noqa: F401

    logging.getLogger("distributed").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


# ----------------------------------------------------------------------------- serve, publish

#: Options of `serve` a --config file may hold besides the processing options.
SERVE_KEYS = ("address", "prefix", "out_dir", "serializer", "report", "drain_timeout", "root_map",
              "data_roots",
              "partial_every_points", "partial_every_seconds", "stop_timeout", "api_key")
_PICKLE_WARNING = ("pickle: only on a trusted network; anyone who can send to the proxy can "
                   "run code in the receiver")


def stream_timing(args, serve_values: dict) -> dict:
    """The partial-write and stop-timeout options given on the command line or in --config.

    Left out when given nowhere (the processor's defaults apply); ``none`` or
    ``off`` turns one off. On the command line ``none`` parses to the
    :data:`_OFF` marker, since ``None`` there means "not given".
    """
    options = {}
    for name in ("partial_every_points", "partial_every_seconds", "stop_timeout"):
        value = getattr(args, name, None)
        if value is None:
            value = serve_values.get(name, "default")
        if value is _OFF or str(value).lower() in ("none", "off"):
            options[name] = None
        elif value != "default":
            options[name] = value
    return options


def _add_stream_commands(sub) -> None:
    """The `serve` and `publish` subcommands (bluesky documents over 0MQ)."""
    from . import commands

    sv = sub.add_parser(
        "serve", help="map every run that arrives from a bluesky 0MQ proxy (long-running)",
        description="Receive bluesky documents from a 0MQ proxy (start it with "
                    "'bluesky-0MQ-proxy --in-address 127.0.0.1:5567 --out-address "
                    "127.0.0.1:5568'), map each run while it is measured, write its maps to "
                    "OUT_DIR/<uid>.zarr (partial maps during the scan, the batch pipeline's "
                    "maps after its stop) and record a derived run in --catalog. Stops on "
                    "SIGINT/SIGTERM after writing the maps of the runs in flight.")
    sv.add_argument("--address", default=None, metavar="HOST:PORT",
                    help="the proxy's output address (default: 127.0.0.1:5568)")
    sv.add_argument("--prefix", default=None,
                    help="take only documents published with this prefix (default: raw)")
    sv.add_argument("--out-dir", dest="out_dir", default=None, metavar="DIR",
                    help="where <uid>.zarr stores go (default: ./maps)")
    sv.add_argument("--catalog", default=None, metavar="URI",
                    help="record a derived run per mapped run here (sqlite:///DIR/catalog.db, "
                         "a directory or a tiled server URL; default: none)")
    sv.add_argument("--api-key", dest="api_key", default=None,
                    help="tiled server API key (default: $TILED_API_KEY)")
    sv.add_argument("--serializer", choices=["msgpack", "pickle"], default=None,
                    help=f"how documents are decoded (default: msgpack). {_PICKLE_WARNING}")
    sv.add_argument("--root-map", dest="root_map", action="append", default=None,
                    metavar="OLD=NEW", help=_ROOT_MAP_HELP)
    sv.add_argument("--data-root", dest="data_roots", action="append", default=None,
                    metavar="DIR", help="a directory whose HDF5 files the documents may name "
                    "(after --root-map); repeat for several. Files elsewhere are not opened, "
                    "and their points fail. Default: the --catalog's readable storage when "
                    "it is embedded, else none (inline frames only)")
    sv.add_argument("--report", default=None, metavar="FILE.jsonl",
                    help="append one JSON line per finished run (points, peaks, lag, latency)")
    sv.add_argument("--overwrite", action="store_true", default=None,
                    help="replace a run's existing store (default: skip the run, log an error)")
    sv.add_argument("--partial-every-points", dest="partial_every_points",
                    type=_number_or_off(int), default=None, metavar="N",
                    help="write partial maps after N new points (default: 50; none: off)")
    sv.add_argument("--partial-every-seconds", dest="partial_every_seconds",
                    type=_number_or_off(float), default=None, metavar="S",
                    help="write partial maps S seconds after the last write (default: 10; none: off)")
    sv.add_argument("--stop-timeout", dest="stop_timeout", type=_number_or_off(float),
                    default=None, metavar="S",
                    help="end a run that sent no document (and no stop) for S seconds "
                         "(default: 600; none: wait forever)")
    sv.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=None,
                    metavar="S", help="on SIGINT/SIGTERM, wait up to S seconds for the maps "
                                      "of the runs in flight (default: 120)")
    sv.add_argument("--http", default=None, metavar="HOST:PORT",
                    help="serve a live web page of the runs and their maps at this address "
                         "(e.g. 127.0.0.1:8050); a host other than loopback needs an API key")
    sv.add_argument("--http-api-key", dest="http_api_key", default=None,
                    help="the key every request to the live page must carry "
                         "(default: $CRYSTALMAPPING_HTTP_API_KEY)")
    _add_processing_options(sv)
    _add_execution_options(sv, progress=False)
    sv.set_defaults(func=commands.serve)

    pb = sub.add_parser(
        "publish", help="replay a stored run to a bluesky 0MQ proxy, as a RunEngine would",
        description="Send the documents of a stored run to a 0MQ proxy's input, in the order "
                    "a RunEngine emits them. By default frames in HDF5 files travel as "
                    "stream_resource/stream_datum references and the server reads the files "
                    "(it must see the same paths); its maps then equal the batch maps. "
                    "--fill sends the frames inside the events instead, as the tutorial's "
                    "Filler + Publisher do (needed by callbacks that do not read files, such "
                    "as the tutorial's ImageProcessor). Start the server first.")
    pb.add_argument("--catalog", default=None, metavar="URI",
                    help="the catalog holding the run (default: the per-user embedded catalog)")
    pb.add_argument("--api-key", dest="api_key", default=None,
                    help="tiled server API key (default: $TILED_API_KEY)")
    pb.add_argument("--readable-storage", dest="readable_storage", action="append", default=None,
                    metavar="DIR", help="extra directory an embedded catalog may read files from")
    pb.add_argument("--uid", required=True, help="run uid, partial uid, scan_id or -1")
    pb.add_argument("--address", default="127.0.0.1:5567", metavar="HOST:PORT",
                    help="the proxy's input address (default: 127.0.0.1:5567)")
    pb.add_argument("--prefix", default="raw", help="prefix of the messages (default: raw)")
    pb.add_argument("--serializer", choices=["msgpack", "pickle"], default="msgpack",
                    help=f"how documents are encoded (default: msgpack). {_PICKLE_WARNING}")
    pb.add_argument("--fill", action="store_true",
                    help="send the frames inside the events (24 MB per Dexela point)")
    pb.add_argument("--data-key", dest="data_key", default=None,
                    help="with --fill: the image key to fill (default: every image key)")
    pb.add_argument("--rate", type=float, default=None, metavar="POINTS_PER_S",
                    help="publish at most this many points per second (default: as fast as "
                         "possible)")
    pb.add_argument("--connect-timeout", dest="connect_timeout", type=float, default=10.0,
                    metavar="S", help="seconds to wait for the proxy (default: 10)")
    pb.add_argument("-v", "--verbose", action="count", default=0)
    pb.set_defaults(func=commands.publish)


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    """The simulated scan's size, shared by demo and simulate."""
    parser.add_argument("--points", type=int, default=480,
                        help="grid points, in the measured rod's 4:1 aspect (default: 480, 44 x 11)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                        help="grid shape instead of --points")
    parser.add_argument("--detector", type=int, nargs=2, metavar=("M", "N"), default=[512, 512],
                        help="detector size in pixels (default: 512 512; the Dexela is 3888 3072)")
    parser.add_argument("--frames", type=int, default=2, help="frames per point (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation (default: 0)")


def _parser() -> argparse.ArgumentParser:
    from . import commands  # the command bodies; they use build_config from here

    parser = argparse.ArgumentParser(
        prog="crystalmapping",
        description="Crystal (grain) maps from X-ray diffraction grid scans.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"crystalmapping {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("process", help="map a run of a catalog into a Zarr store",
                       description="Locate Bragg peaks in every image of a grid scan, link "
                                   "them across the scan, and write one map per linked peak.")
    p.add_argument("--catalog", default=None, metavar="URI",
                   help="sqlite:///DIR/catalog.db, a catalog directory, or a tiled server URL "
                        "(default: the per-user embedded catalog)")
    p.add_argument("--api-key", dest="api_key", default=None,
                   help="tiled server API key (default: $TILED_API_KEY); never printed or saved")
    p.add_argument("--readable-storage", dest="readable_storage", action="append", default=None,
                   metavar="DIR", help="extra directory an embedded catalog may read detector files from")
    p.add_argument("--root-map", dest="root_map", action="append", default=None, metavar="OLD=NEW",
                   help=_ROOT_MAP_HELP)
    p.add_argument("--uid", default=None, help="run uid, partial uid, scan_id, or -1 for the latest")
    p.add_argument("--out", default=None, metavar="maps.zarr", help="Zarr store to write")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing store")
    p.add_argument("--plot", default=None, metavar="maps.png", help="also save a plot of the maps")
    p.add_argument("--record", action="store_true", default=None,
                   help="record the maps as a derived run in the run's catalog (parent_uid: the "
                        "run), readable there with crystalmapping.catalog_maps")
    _add_processing_options(p)
    _add_execution_options(p)
    p.set_defaults(func=commands.process)

    d = sub.add_parser("demo", help="simulate a scan into the embedded catalog and map it")
    d.add_argument("--catalog", default=None, metavar="DIR",
                   help="embedded catalog (default: the per-user one)")
    _add_scan_options(d)
    d.add_argument("--out-dir", dest="out_dir", default="demo-output",
                   help="where maps.zarr and maps.png go (default: ./demo-output)")
    _add_execution_options(d)
    d.set_defaults(func=commands.demo)

    s = sub.add_parser("simulate", help="write a simulated grid scan into a catalog; print its uid")
    s.add_argument("--catalog", default=None, metavar="URI")
    s.add_argument("--api-key", dest="api_key", default=None)
    _add_scan_options(s)
    s.add_argument("--grains", default="reference",
                   help="'reference' (the measured rod's 3 grains), 'random', or a number")
    s.add_argument("--powder", type=float, default=0.0, help="powder ring height, counts")
    s.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                   help="abort the scan after N points")
    s.add_argument("--inline", action="store_true", help="frames inline in events, not HDF5")
    s.add_argument("-v", "--verbose", action="count", default=0)
    s.set_defaults(func=commands.simulate)

    i = sub.add_parser("inspect", help="draw one point's image with every candidate peak and "
                                       "the rule that kept or rejected it (for tuning)")
    i.add_argument("--catalog", default=None, metavar="URI",
                   help="the catalog (default: the per-user embedded catalog)")
    i.add_argument("--api-key", dest="api_key", default=None)
    i.add_argument("--uid", required=True, help="run uid, partial uid, scan_id, or -1")
    i.add_argument("--point", type=int, required=True,
                   help="acquisition index of the point (negative: from the end)")
    i.add_argument("-o", "--output", default="frame.png", help="PNG to write (default: frame.png)")
    i.add_argument("--zoom", type=int, nargs=4, default=None, metavar=("ROW0", "ROW1", "COL0",
                                                                       "COL1"))
    _add_processing_options(i)
    i.add_argument("-v", "--verbose", action="count", default=0)
    i.set_defaults(func=commands.inspect)

    m = sub.add_parser("mask", help="write a detector mask of the hot and dead pixels of a "
                                    "background frame")
    m.add_argument("--from-background", dest="background", required=True, metavar="BG.npy",
                   help="a background (dark or empty-beam) frame, .npy")
    m.add_argument("-o", "--output", default="mask.npy", help="mask to write (default: mask.npy)")
    m.add_argument("--n-sigma", dest="n_sigma", type=float, default=10.0,
                   help="a pixel this many robust sigmas above its 5x5 median is hot (default 10)")
    m.add_argument("--add", action="append", default=None, metavar="MASK.npy",
                   help="another mask to join (module gaps, the beam stop); repeatable")
    m.add_argument("-v", "--verbose", action="count", default=0)
    m.set_defaults(func=commands.mask)

    pl = sub.add_parser("plot", help="plot a map store")
    pl.add_argument("store", help="maps.zarr")
    pl.add_argument("-o", "--output", default="maps.png", help="PNG to write (default: maps.png)")
    pl.add_argument("--max-grains", dest="max_grains", type=int, default=None)
    pl.add_argument("-v", "--verbose", action="count", default=0)
    pl.set_defaults(func=commands.plot)
    _add_stream_commands(sub)
    add_process_new(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crystalmapping`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return args.func(args)
    except CrystalMappingError as exc:
        print(f"crystalmapping {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"crystalmapping {args.command}: error: {exc.args[0] if exc.args else exc}",
              file=sys.stderr)
        return 2
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            print(f"crystalmapping {args.command}: error: the tiled server refused the API key "
                  f"({status}); give the right key with --api-key or TILED_API_KEY.",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
