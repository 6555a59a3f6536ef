"""Option tables and parser helpers of the command line (:mod:`crystalmapping.cli`).

The processing options (locate, link, data) and execution options every mapping
command shares, their help, and the ``process-new`` subcommand's parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .config import LinkOptions, LocateOptions

# Options of `process` that come from the config dataclasses, with their help.
_LOCATE_HELP = {
    "diameter": "odd feature size in pixels (trackpy.locate)",
    "minmass": "least integrated brightness of a peak",
    "maxsize": "largest radius of gyration of a peak",
    "separation": "least distance between two peaks, pixels (none: diameter + 1)",
    "noise_size": "width of the Gaussian noise filter, pixels",
    "smoothing_size": "size of the boxcar background filter, pixels",
    "threshold": "trackpy: clip the bandpass result below this value",
    "invert": "look for dark features",
    "percentile": "trackpy: peaks must be brighter than this percentile of the image",
    "topn": "keep only the N brightest peaks per image",
    "preprocess": "bandpass the image before locating (trackpy's preprocess)",
    "max_iterations": "centroid refinement iterations",
    "characterize": "compute size, ecc, signal and raw_mass",
    "engine": "trackpy engine: auto, python or numba",
    "locator": "bragg (float band-pass, physical noise rules) or trackpy (the tutorial's)",
    "min_snr": "bragg: least band-passed peak height over the local noise",
    "max_ecc": "bragg: largest eccentricity (0 round, 1 a line: powder rings); none for no limit",
    "mask": "the detector's bad pixels: a .npy of True = bad (module gaps, hot pixels, beam "
            "stop); every worker must read it",
}
_LINK_HELP = {
    "search_range": "largest detector distance a peak may move between linked points, pixels",
    "memory": "trackpy: points a peak may vanish and keep its id",
    "adaptive_stop": "trackpy's adaptive search: smallest search range",
    "adaptive_step": "trackpy's adaptive search: reduction factor",
    "neighbor_strategy": "trackpy's neighbour search: KDTree or BTree",
    "link_strategy": "trackpy's subnet solver; 'drop' skips oversize subnets",
    "linker": "grid (detector position + grid neighbours) or trackpy (acquisition order)",
    "connectivity": "grid: 4 (edge) or 8 (edge and corner) grid neighbours",
    "max_gap": "grid: missing points a track may bridge",
    "min_points": "grid: fewest grid points of a kept track (fewer: rejected as noise)",
    "grain_similarity": "least fraction of the smaller map inside the larger for one grain_id",
}
_PROCESS_KEYS = ("data_key", "background", "intensity_column", "points_per_chunk")
_EXEC_KEYS = ("catalog", "uid", "out", "plot", "scheduler", "workers", "overwrite",
              "readable_storage", "root_map", "record")
ROOT_MAP_HELP = ("where this machine and its workers see a directory the run's documents name "
                  "(the detector's HDF5 files), e.g. /detector/data=/mnt/beamline/data; repeat "
                  "for several (config file: root_map: {OLD: NEW})")


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_number(kind):
    def parse(text: str):
        if str(text).lower() in ("none", "null", ""):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


#: What ``none``/``off`` parses to for a serve option whose ``None`` means "not given".
_OFF = "off"


def _number_or_off(kind):
    def parse(text: str):
        return _OFF if str(text).lower() in ("none", "off", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_option(group, cls, name, help_text):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default
    flag = "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"default": None, "help": f"{help_text} (default: {default})"}
    if isinstance(default, bool):
        kwargs.update(type=_bool, metavar="BOOL")
    elif name in ("engine",):
        kwargs.update(choices=["auto", "python", "numba"])
    elif name == "linker":
        kwargs.update(choices=["grid", "trackpy"])
    elif name == "locator":
        kwargs.update(choices=["bragg", "trackpy"])
    elif name == "mask":
        kwargs.update(type=str, metavar="MASK.npy")
    elif name == "connectivity":
        kwargs.update(type=int, choices=[4, 8])
    elif name == "neighbor_strategy":
        kwargs.update(choices=["KDTree", "BTree"])
    elif name == "link_strategy":
        kwargs.update(choices=["recursive", "nonrecursive", "numba", "hybrid", "drop", "auto"])
    elif name in ("diameter", "memory", "topn", "max_iterations", "max_gap", "min_points"):
        kwargs.update(type=_optional_number(int), metavar="N")
    else:
        kwargs.update(type=_optional_number(float), metavar="X")
    group.add_argument(flag, dest=name, **kwargs)


def add_processing_options(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("data")
    p.add_argument("--data-key", dest="data_key", default=None,
                   help="data key of the detector images (default: dexela_image)")
    p.add_argument("--background", default=None, metavar="NPY|INDEX",
                   help="background image to subtract: a .npy file, or the index of a grid point "
                        "(acquisition order) whose mean frame is used (default: none)")
    p.add_argument("--intensity-column", dest="intensity_column", default=None,
                   choices=["amplitude", "mass", "signal", "raw_mass"],
                   help="peak column filled into the maps (default: amplitude, the fitted "
                        "peak height; mass is the tutorial's)")
    p.add_argument("--points-per-chunk", dest="points_per_chunk", default=None, type=int,
                   metavar="N", help="grid points per dask chunk and locate task (default: 1)")
    loc = parser.add_argument_group("locate (trackpy.locate keywords and the bragg locator's rules)")
    for name, text in _LOCATE_HELP.items():
        _add_option(loc, LocateOptions, name, text)
    lnk = parser.add_argument_group("link")
    for name, text in _LINK_HELP.items():
        _add_option(lnk, LinkOptions, name, text)
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="read options from a YAML file; command-line options win")


def add_execution_options(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    ex = parser.add_argument_group("execution")
    ex.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="dask scheduler address, e.g. tcp://host:8786 (default: a LocalCluster)")
    ex.add_argument("--workers", default=None, type=int, metavar="N",
                    help="worker processes of the LocalCluster (default: one per core)")
    if progress:
        ex.add_argument("--no-progress", dest="progress", action="store_false",
                        help="do not show a progress bar")
    ex.add_argument("-v", "--verbose", action="count", default=0, help="more log output")


def add_process_new(sub) -> None:
    """The ``process-new`` subcommand: map the runs of a catalog that have no maps yet."""
    from . import commands

    pn = sub.add_parser(
        "process-new", help="map every finished grid scan of a catalog that has no maps yet "
                            "(for cron, a systemd timer or a batch job)",
        description="Map every finished grid scan of --catalog that has no maps in OUT_DIR "
                    "into OUT_DIR/<uid>.zarr (the layout serve uses), and record each as a "
                    "derived run in the catalog. Runs that are not grid scans, not finished, "
                    "or whose stop is not 'success' are skipped with the reason. A rerun maps "
                    "nothing twice; what an interrupted pass left (a temporary or partial "
                    "store) is redone. One line per run, then a summary; exit status 1 if a "
                    "run failed.")
    pn.add_argument("--catalog", default=None, metavar="URI",
                    help="sqlite:///DIR/catalog.db, a directory, a tiled server URL (with a "
                         "path inside it: http://host:8000/xpd/raw), or profile:NAME[/PATH] "
                         "(default: the per-user embedded catalog)")
    pn.add_argument("--api-key", dest="api_key", default=None,
                    help="tiled server API key (default: $TILED_API_KEY); never printed or saved")
    pn.add_argument("--readable-storage", dest="readable_storage", action="append",
                    default=None, metavar="DIR",
                    help="extra directory an embedded catalog may read detector files from")
    pn.add_argument("--root-map", dest="root_map", action="append", default=None,
                    metavar="OLD=NEW", help=ROOT_MAP_HELP)
    pn.add_argument("--out-dir", dest="out_dir", default=None, metavar="DIR",
                    help="where <uid>.zarr stores go (required, or out_dir: in --config)")
    pn.add_argument("--uid", dest="uids", action="append", default=None, metavar="UID",
                    help="only this run (repeat for more): what an end-of-run workflow "
                         "passes; default: every run of the catalog")
    pn.add_argument("--since", default=None, metavar="ISO-DATE",
                    help="only runs started at or after this date or date-time "
                         "(2026-11-01, 2026-11-01T08:00; local time unless it says)")
    pn.add_argument("--no-record", dest="record", action="store_false",
                    help="do not record the maps as derived runs in the catalog")
    pn.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                    help="map again the runs a previous pass failed (<uid>.failed.json)")
    pn.add_argument("--busy-grace", dest="busy_grace", type=float, default=600.0, metavar="S",
                    help="a temporary or unfinished store changed less than S seconds ago is "
                         "being written by another process: leave its run alone (default: 600)")
    add_processing_options(pn)
    add_execution_options(pn, progress=False)
    pn.set_defaults(func=commands.process_new)
