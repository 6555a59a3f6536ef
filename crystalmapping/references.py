"""References: which file and which rows of it a bluesky document names.

A ``stream_resource`` document names an HDF5 file and dataset and each
``stream_datum`` the rows of some events (:func:`hdf5_rows`); an ophyd v1
area detector's ``resource`` (``AD_HDF5``, ``AD_HDF5_SWMR``) names a file and
each ``datum`` one point's frames (:func:`resource_file`, :func:`datum_rows`).
Either gives a :class:`crystalmapping.frames.HDF5Rows`, which
:func:`crystalmapping.frames.read_frames` reads on a worker.
:data:`HANDLERS` are the same readers as ``event_model.Filler`` handlers, for
the tutorial's callbacks.

Paths. A document names a file where the detector wrote it; a site whose
workers see that storage under another directory gives a *root map*
(``{"/old/root": "/new/root"}``, as event-model's ``root_map``):
:func:`parse_root_map` checks it and :func:`map_root` applies it. Only
``file://`` URIs of this host are read (:func:`path_from_uri`), and only
under the data roots the caller trusts (:mod:`crystalmapping.trust`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlparse

import numpy as np

from .errors import ConfigError, ScanError
from .frames import HDF5Rows, read_rows
from .trust import check_data_path

__all__ = ["path_from_uri", "hdf5_rows", "parse_root_map", "map_root", "HDF5_MIMETYPES",
           "RESOURCE_SPECS", "ResourceFile", "resource_file", "datum_rows",
           "AreaDetectorHDF5Handler", "HANDLERS", "RootMap"]

#: ``stream_resource`` mimetypes :func:`hdf5_rows` understands.
HDF5_MIMETYPES = ("application/x-hdf5", "application/x-hdf")

#: Legacy ``resource`` specs :func:`resource_file` understands (ophyd v1 area detectors'
#: HDF5 plugin), with the dataset their handlers read.
RESOURCE_SPECS = {"AD_HDF5": "/entry/data/data", "AD_HDF5_SWMR": "/entry/data/data"}

def path_from_uri(uri: str) -> str:
    """The local path named by a ``stream_resource`` URI.

    Parameters
    ----------
    uri : str
        ``file://localhost/abs/path``, ``file:///abs/path`` or a bare path.

    Raises
    ------
    ScanError
        For another scheme or a file on another host.

    Examples
    --------
    >>> path_from_uri("file://localhost/data/scan%201.h5")
    '/data/scan 1.h5'
    >>> path_from_uri("/data/a.h5")
    '/data/a.h5'
    """
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return uri
    if parsed.scheme != "file":
        raise ScanError(
            f"frames must be in a local file (file:// URI), got {uri!r}; mount the detector's "
            "storage on this machine and its workers."
        )
    if parsed.netloc not in ("", "localhost"):
        raise ScanError(
            f"the frames are on host {parsed.netloc!r} ({uri!r}); only file://localhost/... "
            "and file:///... can be read. Mount that storage here and on the workers."
        )
    return unquote(parsed.path)


@dataclass(frozen=True)
class ResourceFile:
    """The HDF5 file of a legacy ``resource`` document, checked: where its datums' rows are."""

    path: str
    dataset: str
    frame_per_point: int

    def rows(self, point_number: int) -> HDF5Rows:
        """Rows ``[point_number * frame_per_point, (point_number + 1) * frame_per_point)``."""
        k = self.frame_per_point
        return HDF5Rows(self.path, self.dataset, point_number * k, (point_number + 1) * k)


#: A checked root map: ``((old, new), ...)``, longest ``old`` first.
RootMap = tuple[tuple[str, str], ...]


def parse_root_map(value: Mapping[str, str] | Iterable[str] | str | None) -> RootMap:
    """Check a root map and put it in the form :func:`map_root` takes.

    Parameters
    ----------
    value : dict, list of str, str or None
        ``{"/old/root": "/new/root"}``, or ``"OLD=NEW"`` strings (the
        command line's repeatable ``--root-map OLD=NEW``), or None.

    Returns
    -------
    root_map : tuple of (old, new)
        Normalised absolute paths, longest ``old`` first.

    Raises
    ------
    ConfigError
        For an entry that is not ``OLD=NEW``, a path that is not absolute, or
        one ``OLD`` mapped twice.

    Examples
    --------
    >>> parse_root_map(["/detector/data=/mnt/beamline/data"])
    (('/detector/data', '/mnt/beamline/data'),)
    >>> parse_root_map({"/a": "/b", "/a/c/": "/d"})
    (('/a/c', '/d'), ('/a', '/b'))
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for entry in value:
            if isinstance(entry, (tuple, list)) and len(entry) == 2:
                pairs.append((str(entry[0]), str(entry[1])))
                continue
            old, sep, new = str(entry).partition("=")
            if not sep or not old.strip() or not new.strip():
                raise ConfigError(
                    f"a root map entry must be OLD=NEW (the directory the documents name = "
                    f"where it is mounted here), got {entry!r}; e.g. "
                    "--root-map /detector/data=/mnt/beamline/data."
                )
            pairs.append((old.strip(), new.strip()))
    out: dict[str, str] = {}
    for old, new in pairs:
        for what, path in (("OLD", old), ("NEW", new)):
            if not posixpath.isabs(path):
                raise ConfigError(
                    f"root map {what} must be an absolute path, got {path!r} in "
                    f"{old!r}={new!r}; give both directories from the root, e.g. "
                    "/detector/data=/mnt/beamline/data."
                )
        old, new = posixpath.normpath(old), posixpath.normpath(new)
        if old in out and out[old] != new:
            raise ConfigError(
                f"root map maps {old!r} twice (to {out[old]!r} and to {new!r}); keep one."
            )
        out[old] = new
    return tuple(sorted(out.items(), key=lambda item: -len(item[0])))


def map_root(path: str, root_map: RootMap = ()) -> str:
    """``path`` with the longest matching root of ``root_map`` replaced.

    A root matches whole path components only (``/data`` maps ``/data/a.h5``,
    not ``/database/a.h5``), of the normalised path (``/data/../etc`` is
    ``/etc``: no root of it). A path no root matches is returned as it is.

    Examples
    --------
    >>> rm = parse_root_map({"/data": "/mnt/data"})
    >>> map_root("/data/scan 1.h5", rm), map_root("/database/a.h5", rm)
    ('/mnt/data/scan 1.h5', '/database/a.h5')
    >>> map_root("/data/../etc/a.h5", rm)
    '/etc/a.h5'
    """
    if not root_map:
        return path
    path = posixpath.normpath(path)
    for old, new in root_map:
        if path == old:
            return new
        prefix = old if old.endswith("/") else old + "/"
        if path.startswith(prefix):
            return posixpath.join(new, path[len(prefix):])
    return path


def hdf5_rows(resource: Mapping[str, Any], datum: Mapping[str, Any],
              root_map: RootMap = (), data_roots: tuple[str, ...] | None = None,
              frames_per_event: int = 1) -> list[tuple[int, HDF5Rows]]:
    """Split a ``stream_datum`` into the rows of each point it covers.

    Parameters
    ----------
    resource : dict
        The ``stream_resource`` document (``uri``, ``mimetype``,
        ``parameters["dataset"]``; ``parameters["multiplier"]``, rows per
        index, as TiledWriter stores a converted ``AD_HDF5`` resource's
        ``frame_per_point``).
    datum : dict
        A ``stream_datum`` document of that resource: ``indices`` (rows of the
        dataset) and ``seq_nums`` (the events they belong to).
    root_map : tuple of (old, new)
        From :func:`parse_root_map`: where this machine sees the file.
    data_roots : tuple of str, optional
        From :func:`~crystalmapping.trust.parse_data_roots`: the only
        directories the (mapped) file may lie under. ``None``: anywhere.
    frames_per_event : int
        Frames of one event (the descriptor's ``K`` of ``(K, M, N)``): what
        one index stands for if the dataset stacks frames flat
        (:attr:`HDF5Rows.per_index`), unless the resource gives a ``multiplier``.

    Returns
    -------
    points : list of (int, HDF5Rows)
        ``(point, rows)`` for each event covered, where ``point`` is the
        acquisition index ``seq_num - 1``. A datum without ``seq_nums``
        (``start == stop``) numbers its points by index.

    Raises
    ------
    ScanError
        If the resource is not HDF5, names no dataset, or the rows do not
        divide evenly among the events;
        :class:`~crystalmapping.trust.UntrustedDocumentError` if the file is
        outside ``data_roots``.

    Examples
    --------
    >>> res = {"uri": "file://localhost/d/a.h5", "mimetype": "application/x-hdf5",
    ...        "parameters": {"dataset": "/entry/data"}}
    >>> datum = {"indices": {"start": 4, "stop": 6}, "seq_nums": {"start": 5, "stop": 7}}
    >>> hdf5_rows(res, datum)  # doctest: +NORMALIZE_WHITESPACE
    [(4, HDF5Rows(path='/d/a.h5', dataset='/entry/data', start=4, stop=5, per_index=1)),
     (5, HDF5Rows(path='/d/a.h5', dataset='/entry/data', start=5, stop=6, per_index=1))]
    """
    mimetype = str(resource.get("mimetype", "")).split(";")[0].strip()
    if mimetype not in HDF5_MIMETYPES:
        raise ScanError(
            f"frames stored as {mimetype!r} cannot be read; supported stream_resource "
            f"mimetypes are {list(HDF5_MIMETYPES)}."
        )
    parameters = resource.get("parameters") or {}
    dataset = parameters.get("dataset")
    if not dataset:
        raise ScanError(
            f"stream_resource {resource.get('uid', '?')!r} names no HDF5 dataset "
            f"(parameters={dict(parameters)!r}); it needs parameters['dataset'], e.g. '/entry/data'."
        )
    path = check_data_path(map_root(path_from_uri(str(resource["uri"])), root_map), data_roots)
    # ``multiplier`` (once ``frame_per_point``: a Resource converted by TiledWriter): frames per index
    m = parameters.get("multiplier") or frames_per_event or 1
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ScanError(f"stream_resource {resource.get('uid', '?')!r} gives multiplier={m!r}; "
                        "it must be a positive integer (frames per index).")
    m = int(m)
    start, stop = int(datum["indices"]["start"]), int(datum["indices"]["stop"])
    seq = datum.get("seq_nums") or {}
    s0, s1 = int(seq.get("start", 0)), int(seq.get("stop", 0))
    n_rows = stop - start
    if s1 <= s0:
        return [(start + i, HDF5Rows(path, dataset, start + i, start + i + 1, m))
                for i in range(n_rows)]
    n_events = s1 - s0
    if n_rows % n_events:
        raise ScanError(
            f"stream_datum {datum.get('uid', '?')!r} gives {n_rows} rows to {n_events} events; "
            "each event must get the same whole number of rows."
        )
    k = n_rows // n_events
    return [(s0 + j - 1, HDF5Rows(path, dataset, start + j * k, start + (j + 1) * k, m))
            for j in range(n_events)]


def resource_file(resource: Mapping[str, Any], root_map: RootMap = (),
                  data_roots: tuple[str, ...] | None = None) -> ResourceFile:
    """The file of a legacy ``resource`` document (ophyd v1 ``AD_HDF5`` / ``AD_HDF5_SWMR``).

    As the area-detector handlers read it: the file is ``root`` joined with
    ``resource_path``, the frames are the dataset ``/entry/data/data`` (or
    ``resource_kwargs["dataset"]``), and each datum's ``point_number`` names
    ``frame_per_point`` rows (:func:`datum_rows`).

    Parameters
    ----------
    resource : dict
        The ``resource`` document (``spec``, ``root``, ``resource_path``,
        ``resource_kwargs``).
    root_map, data_roots
        As for :func:`hdf5_rows`: the root map is applied to the whole path
        (so a map of the resource's ``root`` is event-model's ``root_map``).

    Raises
    ------
    ScanError
        For a spec other than those of :data:`RESOURCE_SPECS` (naming it), a
        Windows path, or a ``frame_per_point`` that is not a positive integer;
        :class:`~crystalmapping.trust.UntrustedDocumentError` if the file is
        outside ``data_roots``.

    Examples
    --------
    >>> res = {"spec": "AD_HDF5", "root": "/d", "resource_path": "2026/a.h5",
    ...        "resource_kwargs": {"frame_per_point": 2}}
    >>> resource_file(res).rows(3)
    HDF5Rows(path='/d/2026/a.h5', dataset='/entry/data/data', start=6, stop=8, per_index=1)
    """
    spec = str(resource.get("spec", ""))
    if spec.upper() not in RESOURCE_SPECS:
        raise ScanError(
            f"the frames are in a resource of spec {spec!r}, which the live server does not "
            f"read; it reads {sorted(RESOURCE_SPECS)} resources and stream_resource HDF5 "
            "files. Fill the events with event_model.Filler and that spec's handler before "
            "the processor, or write the frames as HDF5."
        )
    if str(resource.get("path_semantics", "posix")) != "posix":
        raise ScanError(
            f"resource {resource.get('uid', '?')!r} names a {resource['path_semantics']!r} "
            "path; only posix paths can be read here."
        )
    kwargs = resource.get("resource_kwargs") or {}
    fpp = kwargs.get("frame_per_point", 1)
    if isinstance(fpp, bool) or not isinstance(fpp, (int, np.integer)) or fpp < 1:
        raise ScanError(
            f"resource {resource.get('uid', '?')!r} gives frame_per_point={fpp!r}; it must be a "
            "positive integer (the frames each datum names)."
        )
    root = str(resource.get("root") or "")
    relative = str(resource.get("resource_path", ""))
    joined = posixpath.join(root, relative.lstrip("/")) if root else relative
    if not posixpath.isabs(joined):
        raise ScanError(
            f"resource {resource.get('uid', '?')!r} names the file {joined!r}, not an absolute "
            "path (root + resource_path)."
        )
    path = check_data_path(map_root(joined, root_map), data_roots)
    dataset = str(kwargs.get("dataset") or RESOURCE_SPECS[spec.upper()])
    return ResourceFile(path, dataset, int(fpp))


def datum_rows(file: ResourceFile, datum: Mapping[str, Any]) -> HDF5Rows:
    """The rows a ``datum`` of an ``AD_HDF5`` resource names (``datum_kwargs["point_number"]``).

    Raises
    ------
    ScanError
        If the datum has no non-negative integer ``point_number``.

    Examples
    --------
    >>> f = ResourceFile("/d/a.h5", "/entry/data/data", 1)
    >>> datum_rows(f, {"datum_id": "r/4", "datum_kwargs": {"point_number": 4}})
    HDF5Rows(path='/d/a.h5', dataset='/entry/data/data', start=4, stop=5, per_index=1)
    """
    point = (datum.get("datum_kwargs") or {}).get("point_number")
    if isinstance(point, bool) or not isinstance(point, (int, np.integer)) or point < 0:
        raise ScanError(
            f"datum {datum.get('datum_id', '?')!r} gives point_number={point!r}; an AD_HDF5 "
            "datum names its frames by a non-negative integer datum_kwargs['point_number']."
        )
    return file.rows(int(point))


class AreaDetectorHDF5Handler:
    """An ``event_model.Filler`` handler of ``AD_HDF5`` / ``AD_HDF5_SWMR`` resources.

    Reads as the area-detector handlers do (rows ``[point_number *
    frame_per_point, (point_number + 1) * frame_per_point)`` of
    ``/entry/data/data``), with this module's reader: compression filters
    from ``hdf5plugin``, SWMR, and waiting up to ``timeout`` seconds for rows
    not written yet. For the tutorial's callbacks, which take frames, not
    datum references::

        from event_model import Filler
        from crystalmapping.references import HANDLERS
        filler = Filler(HANDLERS, inplace=False)   # then: ip(*filler(name, doc))

    Parameters
    ----------
    filename : str
        The resource's file (``root`` joined with ``resource_path``).
    frame_per_point : int
        ``resource_kwargs["frame_per_point"]``.
    """

    specs = set(RESOURCE_SPECS)
    #: Seconds to wait for a file or rows that are not visible yet.
    timeout = 10.0

    def __init__(self, filename: str, frame_per_point: int = 1, dataset: str | None = None,
                 **kwargs):
        self._file = ResourceFile(str(filename), dataset or "/entry/data/data",
                                  int(frame_per_point))

    def __call__(self, point_number: int) -> np.ndarray:
        return read_rows(self._file.rows(int(point_number)), timeout=self.timeout)

    def get_file_list(self, datum_kwargs_gen) -> list[str]:
        return [self._file.path]


#: ``event_model.Filler(HANDLERS)``: the handlers of the specs the live server reads.
HANDLERS = {spec: AreaDetectorHDF5Handler for spec in RESOURCE_SPECS}
