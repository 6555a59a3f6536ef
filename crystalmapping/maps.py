"""Maps: the final reduce from peak tables to crystal maps on the scan grid.

:func:`fill_maps` is the kernel (linked peaks -> one zero-background map per
track); :func:`reduce_scan` is the reduce shared by the batch pipeline and the
streaming processor: gather the tables, link, fill, and return the
:mod:`~crystalmapping.store` contract as an ``xarray.Dataset``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable

import numpy as np
import pandas as pd
import xarray as xr

from .config import ProcessConfig
from .errors import EmptyImageWarning, NoPeaksWarning
from .grid import Grid
from .link import first_appearance, link_peaks
from .locate import PEAK_COLUMNS, POINT_COLUMNS

__all__ = ["fill_maps", "group_grains", "reduce_scan", "gather_tables", "table_variables",
           "MAP_ATTRS", "PEAK_ATTRS", "POINT_ATTRS"]

logger = logging.getLogger(__name__)


#: Units and long name of each per-grain and per-point map and of each grid coordinate.
MAP_ATTRS = {
    "intensity": ("counts", "peak intensity"),
    "y": ("pixel", "mean detector row of the peak"),
    "x": ("pixel", "mean detector column of the peak"),
    "n_points": ("1", "grid points where the peak was found"),
    "total_intensity": ("counts", "sum of the background-subtracted image"),
    "max_intensity": ("counts", "brightest pixel of the background-subtracted image"),
    "n_peaks": ("1", "peaks found at the point"),
    "measured": ("1", "point was measured (1) or not (0)"),
    "noise": ("counts", "noise of the band-passed image (standard deviation)"),
    "n_rejected_weak": ("1", "candidate peaks rejected as weak (snr < min_snr)"),
    "n_rejected_elongated": ("1", "candidate peaks rejected as elongated (ecc > max_ecc)"),
    "n_rejected_close": ("1", "candidate peaks closer than separation to a brighter one"),
    "n_rejected_masked": ("1", "candidate peaks touching the detector mask"),
    "n_rejected_track": ("1", "peaks rejected with their track (fewer than min_points points)"),
    "grain": ("1", "map index (track id of the linked peak)"),
    "grain_id": ("1", "crystal grain of the reflection"),
    "row": ("1", "grid row (slow axis) index"),
    "col": ("1", "grid column (fast axis) index"),
}

#: Units, long name and dtype of each column of the peak table (``peak_<column>``).
PEAK_ATTRS = {
    "y": ("pixel", "detector row of the peak (sub-pixel)", "float64"),
    "x": ("pixel", "detector column of the peak (sub-pixel)", "float64"),
    "mass": ("counts", "integrated band-passed intensity", "float64"),
    "size": ("pixel", "radius of gyration of the peak", "float64"),
    "ecc": ("1", "eccentricity (0 round, 1 a line)", "float64"),
    "signal": ("counts", "band-passed height above the local background", "float64"),
    "raw_mass": ("counts", "integrated image minus its local background", "float64"),
    "ep": ("pixel", "position uncertainty (trackpy)", "float64"),
    "amplitude": ("counts", "height of the Gaussian spot fitted to the peak", "float64"),
    "snr": ("1", "signal-to-noise ratio (signal over the image's noise)", "float64"),
    "frame": ("1", "acquisition index of the grid point", "int64"),
    "particle": ("1", "track of the peak: its map's grain coordinate (-1: rejected)", "int64"),
    "row": ("1", "grid row of the peak's point", "int64"),
    "col": ("1", "grid column of the peak's point", "int64"),
}

#: Units, long name and dtype of each column of the per-point table (``point_<column>``).
POINT_ATTRS = {
    "frame": ("1", "acquisition index of the grid point", "int64"),
    "n_peaks": ("1", "peaks found at the point", "int32"),
    "image_max": ("counts", "brightest pixel of the background-subtracted image", "float64"),
    "image_sum": ("counts", "sum of the background-subtracted image", "float64"),
    "noise": ("counts", "noise of the band-passed image (standard deviation)", "float64"),
    "n_rejected_weak": ("1", "candidate peaks rejected as weak (snr < min_snr)", "int32"),
    "n_rejected_elongated": ("1", "candidate peaks rejected as elongated (ecc > max_ecc)",
                             "int32"),
    "n_rejected_close": ("1", "candidate peaks closer than separation to a brighter one",
                         "int32"),
    "n_rejected_masked": ("1", "candidate peaks touching the detector mask", "int32"),
    "row": ("1", "grid row of the point", "int64"),
    "col": ("1", "grid column of the point", "int64"),
}

_TABLE_ATTRS = {"peak": PEAK_ATTRS, "point": POINT_ATTRS}


def table_variables(dim: str, table: pd.DataFrame) -> dict:
    """A peak (``dim="peak"``) or point table as ``<dim>_<column>`` variables along ``dim``.

    Known columns get their dtype, units and long name; others are kept as they are.
    """
    known = _TABLE_ATTRS[dim]
    out = {}
    for c in table.columns:
        values = table[c].to_numpy()
        if c in known:
            units, long_name, dtype = known[c]
            if values.dtype != np.dtype(dtype):
                values = pd.to_numeric(table[c]).fillna(0).to_numpy().astype(dtype)
            out[f"{dim}_{c}"] = (dim, values, {"units": units, "long_name": long_name})
        else:
            out[f"{dim}_{c}"] = (dim, values)
    return out


def _position_attrs(grid: Grid, axis: int) -> dict:
    """Attributes of a motor-position coordinate: the motor, its units where the start gave them."""
    motor = grid.motors[axis]
    units = grid.units[axis]
    return {"units": units if units else "unknown",
            "long_name": f"position of motor {motor}"
            + ("" if units else " (units not given by the start document)"),
            "motor": motor}


def fill_maps(row: np.ndarray, col: np.ndarray, particle: np.ndarray, value: np.ndarray,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Fill each track's intensity into a zero background on the grid.

    Parameters
    ----------
    row, col : (P,) arrays of int
        Grid indices of each peak (snaking already undone).
    particle : (P,) array of int
        Track id of each peak.
    value : (P,) array of float
        Intensity of each peak (e.g. trackpy's ``mass``).
    shape : (int, int)
        Grid shape (rows, cols).

    Returns
    -------
    ids : (G,) ndarray of int64
        Sorted track ids.
    intensity : (G, rows, cols) ndarray of float32
        ``intensity[g, r, c]`` is the intensity of track ``ids[g]`` at grid
        point ``(r, c)``, zero where it was not seen; two peaks of one track
        at one point add up.

    Examples
    --------
    >>> ids, maps = fill_maps([0, 1], [1, 0], [7, 7], [2.0, 3.0], (2, 2))
    >>> ids.tolist(), maps[0].tolist()
    ([7], [[0.0, 2.0], [3.0, 0.0]])
    """
    row, col = np.asarray(row, dtype=np.int64), np.asarray(col, dtype=np.int64)
    particle = np.asarray(particle, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    ids, g = np.unique(particle, return_inverse=True)
    flat = np.zeros((len(ids), shape[0] * shape[1]), dtype=np.float32)
    np.add.at(flat, (g, row * shape[1] + col), value.astype(np.float32))
    return ids, flat.reshape((len(ids),) + tuple(shape))


def _is_superlevel_set(small: np.ndarray, large: np.ndarray, scale: float, floor: float,
                       similarity: float, margin: float = 1.1) -> bool:
    """Whether ``small`` is found wherever ``scale * large`` says it should be.

    The weaker reflection of a grain is the stronger one's map scaled down and
    cut at the detection floor: it holds the larger map's brightest points,
    not an arbitrary part of it. ``floor`` is the smaller map's detection
    floor (its 5th percentile, :func:`_floor`); at least ``similarity`` of
    the larger map's points predicted ``margin`` times above it must be in
    the smaller map (``small``: where it is above zero). A different grain
    nested inside a larger one fails: the larger map is as bright around it.
    """
    expected = scale * large >= margin * floor
    n = np.count_nonzero(expected)
    return n == 0 or np.count_nonzero(expected & small) >= similarity * n


def _floor(values: np.ndarray) -> float:
    """A map's detection floor: the 5th percentile of its points above zero."""
    return np.quantile(values[values > 0], 0.05)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float array without NaN, bit for bit, at a fraction of its
    call's cost (group_grains takes one per pair of maps)."""
    n = values.size
    k = n // 2
    if n % 2:
        return np.partition(values, k)[k]
    part = np.partition(values, (k - 1, k))
    return (part[k - 1] + part[k]) / 2


def group_grains(intensity: np.ndarray, similarity: float = 0.75,
                 proportionality: float = 0.3) -> np.ndarray:
    """Group reflections whose maps coincide into grains.

    One grain seen through two reflections gives two maps of the same shape,
    scaled by each reflection's strength: the weaker reflection is found on
    the grain's brighter core only. So two maps are one grain when at least
    ``similarity`` of the points of the smaller map are points of the larger
    one, their intensities are proportional there (the ratio of the two
    varies by at most ``proportionality``, as a coefficient of variation),
    and the smaller map is the larger one's bright part: at least
    ``similarity`` of the points where the scaled larger map stands clearly
    above the smaller map's detection floor are in the smaller map. A small
    grain lying inside a larger one's footprint fails this last test.
    Grains are the connected groups of such pairs.

    Parameters
    ----------
    intensity : (G, rows, cols) array
        One map per reflection.
    similarity : float
        Least fraction of the smaller map inside the larger one, in [0, 1].
    proportionality : float
        Largest coefficient of variation of the ratio of the two maps.

    Returns
    -------
    grain_id : (G,) ndarray of int64
        Grain of each map, numbered from 0 in order of the maps.

    Examples
    --------
    >>> a = np.array([[1.0, 2.0], [0.0, 0.0]])
    >>> b = np.array([[0.0, 0.0], [3.0, 1.0]])
    >>> group_grains(np.stack([a, b, 2 * a])).tolist()
    [0, 1, 0]
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    intensity = np.asarray(intensity, dtype=np.float64)
    if len(intensity) == 0:
        return np.zeros(0, dtype=np.int64)
    flat = intensity.reshape(len(intensity), -1)
    support = csr_matrix(flat > 0, dtype=np.int32)
    size = np.asarray(support.sum(axis=1)).ravel()
    common = (support @ support.T).tocoo()
    upper = common.row < common.col
    rows, cols, shared = common.row[upper], common.col[upper], common.data[upper]
    smaller = np.minimum(size[rows], size[cols])
    candidate = shared >= similarity * np.maximum(smaller, 1)
    positive = flat > 0
    floors = {}  # a map's detection floor, found once however many pairs it is in
    edges = []
    for i, j in zip(rows[candidate], cols[candidate]):
        small, large = (i, j) if size[i] <= size[j] else (j, i)
        both = positive[small] & positive[large]
        ratio = flat[small][both] / flat[large][both]
        if ratio.size != 1 and not ratio.std() <= proportionality * ratio.mean():
            continue  # not proportional
        if small not in floors:
            floors[small] = _floor(flat[small])
        if _is_superlevel_set(positive[small], flat[large], _median(ratio), floors[small],
                              similarity):
            edges.append((i, j))
    n = len(flat)
    e = np.array(edges, dtype=np.int64).reshape(-1, 2)
    graph = csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    return first_appearance(connected_components(graph, directed=False)[1])


def gather_tables(results: Iterable[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate ``(peaks, points)`` pairs of locate tasks, in any order, sorted by ``frame``."""
    peaks, points = [], []
    for p, q in results:
        peaks.append(p)
        points.append(q)
    peaks_df = (pd.concat(peaks, ignore_index=True) if peaks
                else pd.DataFrame({c: pd.Series(dtype="float64") for c in PEAK_COLUMNS}))
    points_df = (pd.concat(points, ignore_index=True) if points
                 else pd.DataFrame({c: pd.Series(dtype="float64") for c in POINT_COLUMNS}))
    peaks_df = peaks_df.sort_values(["frame", "y", "x"], kind="stable").reset_index(drop=True)
    points_df = points_df.sort_values("frame", kind="stable").reset_index(drop=True)
    return peaks_df, points_df


def reduce_scan(peaks: pd.DataFrame, points: pd.DataFrame, grid: Grid,
                config: ProcessConfig, *, attrs: dict | None = None,
                warn: bool = True) -> xr.Dataset:
    """Link the peaks of a scan and fill the crystal maps: the final reduce.

    Parameters
    ----------
    peaks : DataFrame
        All peaks of the measured points (:data:`~crystalmapping.locate.PEAK_COLUMNS`).
    points : DataFrame
        One row per measured point (:data:`~crystalmapping.locate.POINT_COLUMNS`).
    grid : Grid
    config : ProcessConfig
    attrs : dict, optional
        Extra attributes (source uid, versions...) for the result.
    warn : bool
        Warn (:class:`~crystalmapping.errors.EmptyImageWarning`,
        :class:`~crystalmapping.errors.NoPeaksWarning`) when every image is empty or
        no peak was found.

    Returns
    -------
    maps : xarray.Dataset
        ``intensity(grain, row, col)``, ``y(grain)``, ``x(grain)``,
        ``n_points(grain)``, ``total_intensity(row, col)``, ``max_intensity(row, col)``,
        ``n_peaks(row, col)``, ``measured(row, col)`` and the other per-point
        maps, the coordinates ``grain_id`` (per grain) and
        ``row_position``/``col_position`` (motor positions), the peak table as
        ``peak_<column>`` variables along ``peak`` and the per-point table as
        ``point_<column>`` variables along ``point``; every variable and
        coordinate with ``units`` and ``long_name``. This is the flat view
        :func:`crystalmapping.store.open_maps` gives; the store keeps the two
        tables in the groups ``/peaks`` and ``/points`` (see
        :mod:`crystalmapping.store`).
    """
    link_opts = config.link.to_dict()
    linked = link_peaks(peaks, grid=grid, **link_opts)
    if len(points):
        prow, pcol = grid.indices(points["frame"].to_numpy())
    else:
        prow = pcol = np.zeros(0, dtype=np.int64)
    row, col = grid.indices(linked["frame"].to_numpy())
    linked["row"], linked["col"] = row, col
    column = config.intensity_column
    tracked = linked[linked["particle"] >= 0]
    ids, intensity = fill_maps(tracked["row"].to_numpy(), tracked["col"].to_numpy(),
                               tracked["particle"].to_numpy(), tracked[column].to_numpy(),
                               grid.shape)
    grain_id = group_grains(intensity, config.link.grain_similarity)

    n_empty = int((points["image_max"] <= 0).sum()) if len(points) else 0
    if warn and len(points) and n_empty == len(points):
        warnings.warn(
            f"all {len(points)} background-subtracted images are zero: the background is "
            "as bright as every frame. Use the mean frame of a point where the beam misses "
            "the sample, taken with the same exposure.", EmptyImageWarning, stacklevel=2)
    if warn and len(points) and linked.empty:
        warnings.warn(
            f"no peak was found in any of the {len(points)} images; lower minmass or "
            "percentile, or check the background.", NoPeaksWarning, stacklevel=2)

    shape = grid.shape
    per_point = {}
    for name in ("noise", "n_rejected_weak", "n_rejected_elongated", "n_rejected_close",
                 "n_rejected_masked"):
        per_point[name] = np.zeros(shape, dtype=np.float64 if name == "noise" else np.int32)
        if len(points) and name in points:
            per_point[name][prow, pcol] = pd.to_numeric(points[name]).fillna(0).to_numpy()
    rejected = linked[linked["particle"] < 0]
    n_rejected_track = np.zeros(shape, dtype=np.int32)
    np.add.at(n_rejected_track, (rejected["row"].to_numpy(), rejected["col"].to_numpy()), 1)
    total = np.zeros(shape, dtype=np.float64)
    brightest = np.zeros(shape, dtype=np.float64)
    n_peaks = np.zeros(shape, dtype=np.int32)
    measured = np.zeros(shape, dtype=bool)
    if len(points):
        total[prow, pcol] = points["image_sum"].to_numpy()
        brightest[prow, pcol] = points["image_max"].to_numpy()
        n_peaks[prow, pcol] = points["n_peaks"].to_numpy()
        measured[prow, pcol] = True

    grouped = tracked.groupby("particle", sort=True)
    rows_pos, cols_pos = grid.positions()

    def var(dims, data, name, long_name=None, **extra):
        units, default = MAP_ATTRS[name]
        return dims, data, {"units": units, "long_name": long_name or default, **extra}

    ds = xr.Dataset(
        {
            "intensity": var(("grain", "row", "col"), intensity, "intensity", f"peak {column}",
                             description="intensity of each linked Bragg peak where it was "
                             "found, zero elsewhere"),
            "y": var("grain", grouped["y"].mean().reindex(ids).to_numpy(), "y"),
            "x": var("grain", grouped["x"].mean().reindex(ids).to_numpy(), "x"),
            "n_points": var("grain", grouped.size().reindex(ids).to_numpy().astype(np.int64),
                            "n_points"),
            "total_intensity": var(("row", "col"), total, "total_intensity"),
            "max_intensity": var(("row", "col"), brightest, "max_intensity"),
            "n_peaks": var(("row", "col"), n_peaks, "n_peaks"),
            "measured": var(("row", "col"), measured, "measured"),
            "noise": var(("row", "col"), per_point["noise"], "noise"),
            **{name: var(("row", "col"), per_point[name], name)
               for name in ("n_rejected_weak", "n_rejected_elongated", "n_rejected_close",
                            "n_rejected_masked")},
            "n_rejected_track": var(("row", "col"), n_rejected_track, "n_rejected_track"),
        },
        coords={
            "grain": var("grain", ids.astype(np.int64), "grain"),
            "grain_id": var("grain", grain_id.astype(np.int64), "grain_id",
                            description="reflections whose maps coincide share a grain_id"),
            "row": var("row", np.arange(shape[0], dtype=np.int64), "row"),
            "col": var("col", np.arange(shape[1], dtype=np.int64), "col"),
            "row_position": ("row", rows_pos, _position_attrs(grid, 0)),
            "col_position": ("col", cols_pos, _position_attrs(grid, 1)),
        },
        attrs=dict(attrs or {}),
    )
    ds = ds.assign(table_variables("peak", linked.reset_index(drop=True)))
    points_table = points[[c for c in POINT_COLUMNS if c in points]].reset_index(drop=True)
    points_table = points_table.assign(row=prow, col=pcol)
    ds = ds.assign(table_variables("point", points_table))
    ds.attrs.update({
        "grid": grid.to_dict(),
        "n_points_measured": int(len(points)),
        "n_empty_images": n_empty,
        "n_peaks_found": int(len(linked)),
        "n_peaks_mapped": int(len(tracked)),
        "n_peaks_rejected_track": int(len(rejected)),
        "n_rejected_weak": int(per_point["n_rejected_weak"].sum()),
        "n_rejected_elongated": int(per_point["n_rejected_elongated"].sum()),
        "n_rejected_close": int(per_point["n_rejected_close"].sum()),
        "n_rejected_masked": int(per_point["n_rejected_masked"].sum()),
        "n_grains": int(grain_id.max()) + 1 if len(grain_id) else 0,
    })
    logger.info("reduced %d points, %d peaks into %d maps of %d grains (%d peaks rejected)",
                len(points), len(linked), len(ids), ds.attrs["n_grains"], len(rejected))
    return ds
