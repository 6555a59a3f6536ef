"""Parameters of a processing run, validated once at the edge and saved with the results.

The fields use trackpy's own names (``diameter``, ``percentile``,
``separation``, ``minmass``, ``search_range``, ``memory``...). Defaults work
on Dexela grid scans of crystal rods without tuning: the ``bragg`` locator and
the ``grid`` linker, with the tutorial's ``diameter``, ``percentile`` and
``search_range``. The tutorial's own algorithm is ``locator="trackpy",
separation=100, linker="trackpy"``.

A configuration can be built in Python, from a YAML/JSON file, or from the
command line; :meth:`ProcessConfig.to_dict` gives the JSON-ready form that the
store writes into its attributes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from .errors import ConfigError, ConfigTypeError

__all__ = ["LocateOptions", "LinkOptions", "ProcessConfig", "load_config_file", "drop_unused"]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _from_mapping(cls, values: Mapping[str, Any] | None, what: str):
    values = dict(values or {})
    unknown = sorted(set(values) - set(_fields(cls)))
    if unknown:
        raise ConfigTypeError(
            f"unknown {what} keyword(s) {unknown}; valid keywords are {_fields(cls)}."
        )
    return cls(**values)


def _check_number(name, value, *, minimum=None, maximum=None, integer=False, allow_none=False,
                  exclusive_minimum=False):
    if value is None:
        if allow_none:
            return None
        raise ConfigTypeError(f"{name} must be a number, got None.")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}.")
    if integer and float(value) != int(value):
        raise ConfigError(f"{name} must be a whole number, got {value!r}.")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        rel = ">" if exclusive_minimum else ">="
        raise ConfigError(f"{name} must be {rel} {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value!r}.")
    return int(value) if integer else value


#: Options that one locator or linker reads and the other does not, with what they do.
LOCATOR_ONLY = {
    "trackpy": {"percentile": "trackpy.locate's brightness percentile of a candidate",
                "threshold": "trackpy.locate's clip of the band-passed image",
                "engine": "trackpy.locate's python or numba engine"},
    "bragg": {"min_snr": "the bragg locator's least height over the local noise",
              "max_ecc": "the bragg locator's largest eccentricity"},
}
LINKER_ONLY = {
    "trackpy": {"memory": "trackpy.link's points a peak may vanish",
                "adaptive_stop": "trackpy.link's adaptive search range",
                "adaptive_step": "trackpy.link's adaptive search range",
                "neighbor_strategy": "trackpy.link's neighbour search",
                "link_strategy": "trackpy.link's subnet solver"},
    "grid": {"connectivity": "the grid linker's neighbours on the scan grid",
             "max_gap": "the grid linker's bridge over missing points",
             "min_points": "the grid linker's least points of a track"},
}


def unused_options(options, owners: Mapping[str, Mapping[str, str]], chosen: str,
                   what: str) -> dict[str, str]:
    """The options set away from their default that ``chosen`` does not read, each with
    the sentence that says why (for an error, or a warning)."""
    found = {}
    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    for other, names in owners.items():
        if other == chosen:
            continue
        for name, role in names.items():
            value = getattr(options, name)
            if value != defaults[name]:
                found[name] = (f"{name}={value!r} is {role}, read only with {what}={other!r}; "
                               f"{what}={chosen!r} does not use it. Leave {name} out, or set "
                               f"{what}={other!r}.")
    return found


def drop_unused(file_values: Mapping[str, Any], locator: str, linker: str,
                source) -> dict[str, Any]:
    """A config file's options less those ``locator`` or ``linker`` does not read.

    Each dropped option is warned about (a :class:`UserWarning` naming
    ``source``, the file): a config file may hold a site's defaults for both
    methods, while on the command line such an option is an error.
    """
    kept = dict(file_values)
    for owners, chosen, what in ((LOCATOR_ONLY, locator, "locator"),
                                 (LINKER_ONLY, linker, "linker")):
        for other, names in owners.items():
            for name in names:
                if other != chosen and name in kept:
                    del kept[name]
                    warnings.warn(f"{source}: {name} is read only with {what}={other!r}; "
                                  f"ignored with {what}={chosen!r}.", UserWarning, stacklevel=3)
    return kept


def _refuse_unused(options, owners, chosen: str, what: str) -> None:
    unused = unused_options(options, owners, chosen, what)
    if unused:
        raise ConfigError(" ".join(unused.values()))


@dataclass(frozen=True)
class LocateOptions:
    """Keywords of :func:`crystalmapping.locate.locate_peaks`.

    ``locator="bragg"`` (the default) keeps a peak when its band-passed
    height is at least ``min_snr`` times the local noise of the image and its
    eccentricity at most ``max_ecc`` (Bragg spots are round, powder-ring
    segments are not); ``locator="trackpy"`` runs ``trackpy.locate`` as the
    tutorial does. The other fields are trackpy's (see its documentation).
    An option that the chosen locator does not read (``percentile``,
    ``threshold``, ``engine`` for ``"bragg"``; ``min_snr``, ``max_ecc`` for
    ``"trackpy"``: :data:`LOCATOR_ONLY`) set away from its default is an
    error, never silently ignored. ``diameter``
    is in pixels and must be odd. ``mask`` is the path of the detector's mask
    (:mod:`crystalmapping.mask`: True = bad pixel), read by each worker. ``diameter=15`` and ``percentile=80`` are
    the tutorial's; ``separation`` (least distance between two peaks of one
    image) defaults to ``diameter + 1`` as in trackpy, so two Bragg peaks a
    few diameters apart are both found; the tutorial passes ``separation=100``.
    """

    diameter: int = 15
    minmass: float | None = None
    maxsize: float | None = None
    separation: float | None = None
    noise_size: float = 1
    smoothing_size: float | None = None
    threshold: float | None = None
    invert: bool = False
    percentile: float = 80
    topn: int | None = None
    preprocess: bool = True
    max_iterations: int = 10
    characterize: bool = True
    engine: Literal["auto", "python", "numba"] = "auto"
    locator: Literal["bragg", "trackpy"] = "bragg"
    min_snr: float = 10.0
    max_ecc: float | None = 0.6
    mask: str | None = None

    def __post_init__(self) -> None:
        if self.locator not in ("bragg", "trackpy"):
            raise ConfigError(f"locator must be 'bragg' or 'trackpy', got {self.locator!r}.")
        _check_number("min_snr", self.min_snr, minimum=0)
        _check_number("max_ecc", self.max_ecc, minimum=0, maximum=1, allow_none=True)
        d = _check_number("diameter", self.diameter, minimum=3, integer=True)
        if d % 2 == 0:
            raise ConfigError(
                f"diameter must be an odd number of pixels (trackpy's rule), got {d}; "
                f"use {d + 1} or {d - 1}."
            )
        object.__setattr__(self, "diameter", d)
        _check_number("minmass", self.minmass, minimum=0, allow_none=True)
        _check_number("maxsize", self.maxsize, minimum=0, allow_none=True, exclusive_minimum=True)
        _check_number("separation", self.separation, minimum=0, allow_none=True,
                      exclusive_minimum=True)
        _check_number("noise_size", self.noise_size, minimum=0, exclusive_minimum=True)
        _check_number("smoothing_size", self.smoothing_size, minimum=0, allow_none=True,
                      exclusive_minimum=True)
        _check_number("threshold", self.threshold, minimum=0, allow_none=True)
        _check_number("percentile", self.percentile, minimum=0, maximum=100)
        _check_number("topn", self.topn, minimum=1, integer=True, allow_none=True)
        _check_number("max_iterations", self.max_iterations, minimum=0, integer=True)
        for flag in ("invert", "preprocess", "characterize"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigTypeError(f"{flag} must be true or false, got {getattr(self, flag)!r}.")
        if self.engine not in ("auto", "python", "numba"):
            raise ConfigError(
                f"engine must be one of 'auto', 'python', 'numba', got {self.engine!r}."
            )
        _refuse_unused(self, LOCATOR_ONLY, self.locator, "locator")
        if isinstance(self.mask, os.PathLike):
            object.__setattr__(self, "mask", os.fspath(self.mask))
        if self.mask is not None and (not isinstance(self.mask, str) or not self.mask):
            raise ConfigTypeError(f"mask must be the path of a mask file (.npy, True = bad "
                                  f"pixel) or None, got {self.mask!r}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LocateOptions":
        """Build from a mapping, rejecting unknown keywords with the list of valid ones."""
        return _from_mapping(cls, values, "locate")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LinkOptions:
    """Keywords of :func:`crystalmapping.link.link_peaks`.

    ``linker="grid"`` (the default) links peaks at the same detector position
    (within ``search_range`` pixels) on neighbouring grid points
    (``connectivity`` 4 or 8, bridging up to ``max_gap`` missing points), so
    tracks survive row turns, gaps and aborted scans; tracks on fewer than
    ``min_points`` points are rejected as noise and counted. Reflections whose
    maps coincide (the smaller map at least ``grain_similarity`` inside the
    larger, intensities proportional there) get one
    ``grain_id``. ``linker="trackpy"`` links with ``trackpy.link`` in
    acquisition order, as the tutorial does, with ``memory`` in points and
    trackpy's ``adaptive_*``, ``neighbor_strategy``, ``link_strategy``.
    An option of the other linker (:data:`LINKER_ONLY`) set away from its
    default is an error.
    """

    search_range: float = 50
    memory: int = 0
    adaptive_stop: float | None = None
    adaptive_step: float = 0.95
    neighbor_strategy: Literal["KDTree", "BTree"] | None = None
    link_strategy: Literal["recursive", "nonrecursive", "numba", "hybrid", "drop", "auto"] | None = None
    linker: Literal["grid", "trackpy"] = "grid"
    connectivity: Literal[4, 8] = 4
    max_gap: int = 1
    min_points: int = 2
    grain_similarity: float = 0.75

    def __post_init__(self) -> None:
        _check_number("search_range", self.search_range, minimum=0, exclusive_minimum=True)
        object.__setattr__(self, "memory", _check_number("memory", self.memory, minimum=0,
                                                         integer=True))
        _check_number("adaptive_stop", self.adaptive_stop, minimum=0, allow_none=True,
                      exclusive_minimum=True)
        _check_number("adaptive_step", self.adaptive_step, minimum=0, maximum=1,
                      exclusive_minimum=True)
        if self.neighbor_strategy not in (None, "KDTree", "BTree"):
            raise ConfigError(f"neighbor_strategy must be one of None, 'KDTree', 'BTree', got "
                              f"{self.neighbor_strategy!r}.")
        strategies = (None, "recursive", "nonrecursive", "numba", "hybrid", "drop", "auto")
        if self.link_strategy not in strategies:
            raise ConfigError(f"link_strategy must be one of {list(strategies)}, got "
                              f"{self.link_strategy!r}; 'drop' skips oversize subnets.")
        if self.linker not in ("grid", "trackpy"):
            raise ConfigError(f"linker must be 'grid' or 'trackpy', got {self.linker!r}.")
        object.__setattr__(self, "connectivity", _check_number(
            "connectivity", self.connectivity, minimum=4, maximum=8, integer=True))
        if self.connectivity not in (4, 8):
            raise ConfigError(f"connectivity must be 4 (edges) or 8 (edges and corners), "
                              f"got {self.connectivity!r}.")
        object.__setattr__(self, "max_gap", _check_number("max_gap", self.max_gap, minimum=0,
                                                          integer=True))
        object.__setattr__(self, "min_points", _check_number("min_points", self.min_points,
                                                             minimum=1, integer=True))
        _check_number("grain_similarity", self.grain_similarity, minimum=0, maximum=1)
        _refuse_unused(self, LINKER_ONLY, self.linker, "linker")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LinkOptions":
        return _from_mapping(cls, values, "link")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProcessConfig:
    """Everything that decides the maps of a run.

    Parameters
    ----------
    data_key : str
        Data key of the detector images in the primary stream.
    background : str, int or None
        The subtrahend: a ``.npy`` path, or the index of a grid point (in
        acquisition order) whose mean frame is used, or None for no
        subtraction. An array can be given to :func:`crystalmapping.process_run`
        directly; it is then recorded as ``"array"``.
    locate, link : LocateOptions, LinkOptions
    intensity_column : str
        Column of the peak table filled into the maps: ``amplitude`` (the
        default, the fitted peak height: the least noisy), or ``mass`` (the
        tutorial's), ``signal``, ``raw_mass``.
    points_per_chunk : int
        Grid points per dask chunk (and per locate task).
    """

    data_key: str = "dexela_image"
    background: str | int | None = None
    locate: LocateOptions = field(default_factory=LocateOptions)
    link: LinkOptions = field(default_factory=LinkOptions)
    intensity_column: Literal["amplitude", "mass", "signal", "raw_mass"] = "amplitude"
    points_per_chunk: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.data_key, str) or not self.data_key:
            raise ConfigTypeError(f"data_key must be a non-empty string, got {self.data_key!r}.")
        if isinstance(self.locate, Mapping):
            object.__setattr__(self, "locate", LocateOptions.from_dict(self.locate))
        if isinstance(self.link, Mapping):
            object.__setattr__(self, "link", LinkOptions.from_dict(self.link))
        if self.intensity_column not in ("amplitude", "mass", "signal", "raw_mass"):
            raise ConfigError(
                "intensity_column must be one of 'amplitude', 'mass', 'signal', 'raw_mass', got "
                f"{self.intensity_column!r}."
            )
        if self.intensity_column in ("signal", "raw_mass") and not self.locate.characterize:
            raise ConfigError(
                f"intensity_column={self.intensity_column!r} needs locate characterize=True "
                "(trackpy computes that column only then); use 'mass' or characterize=True.")
        object.__setattr__(self, "points_per_chunk", _check_number(
            "points_per_chunk", self.points_per_chunk, minimum=1, integer=True))
        bg = self.background
        if bg is not None and not isinstance(bg, (str, int)) or isinstance(bg, bool):
            raise ConfigTypeError(
                f"background must be a .npy path, a grid point index or None, got {bg!r}."
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ProcessConfig":
        """Build from a nested mapping (as read from a YAML or JSON file)."""
        return _from_mapping(cls, values, "process")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dictionary of every value that runs."""
        return {
            "data_key": self.data_key,
            "background": self.background,
            "locate": self.locate.to_dict(),
            "link": self.link.to_dict(),
            "intensity_column": self.intensity_column,
            "points_per_chunk": self.points_per_chunk,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON configuration file into a dictionary.

    Keys are the command-line option names with ``_`` or ``-``
    (``search_range`` or ``search-range``); the nested form of
    :meth:`ProcessConfig.to_dict` (``locate: {diameter: 15}``) is accepted too.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give the path of a YAML file.")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of option: value, "
            f"got a {type(values).__name__}."
        )
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in ("locate", "link") and isinstance(value, dict):
            flat.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
