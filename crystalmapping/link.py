"""Link: give every peak of a scan the id of the Bragg reflection it belongs to.

This is the first half of the final reduce: it runs once on the peak table of
the whole scan (or of the points measured so far). Two linkers:

``"grid"`` (the default)
    A Bragg peak of one grain stays at (nearly) the same detector position
    wherever the grain is lit, and a grain is a connected region of the scan
    grid. So two peaks are linked when they sit on neighbouring grid points
    (snaking undone, any scan direction) at detector positions within
    ``search_range``, each matched to its mutual nearest on the other point.
    Tracks are the connected components of those links, under one rule: two
    peaks seen at the same grid point never share a track (two distinct
    reflections closer than ``search_range`` stay apart). Tracks on fewer
    than ``min_points`` grid points are rejected as noise: they keep
    ``particle = -1`` in the table, so they are counted, not lost.
``"trackpy"``
    ``trackpy.link`` in acquisition order, as the tutorial does. Every row
    turn and every gap ends a track, so one reflection comes out as many.

:func:`link_peaks` is the entry point; :func:`grid_links` and
:func:`link_on_grid` are the kernels of the grid linker.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .config import LinkOptions
from .grid import Grid

__all__ = ["link_peaks", "link_on_grid", "grid_links", "grid_offsets", "first_appearance"]

logger = logging.getLogger(__name__)

def grid_offsets(connectivity: int = 4, max_gap: int = 0) -> np.ndarray:
    """Offsets ``(d_row, d_col)`` to the grid neighbours a peak is linked across.

    Half of them (the other half is the same pairs seen from the other side):
    those within ``1 + max_gap`` steps, counted along the axes
    (``connectivity=4``) or including the diagonals (``connectivity=8``).

    Examples
    --------
    >>> grid_offsets(4, 0).tolist()
    [[0, 1], [1, 0]]
    >>> len(grid_offsets(8, 0)), len(grid_offsets(4, 1))
    (4, 6)
    """
    reach = 1 + int(max_gap)
    out = []
    for dr in range(0, reach + 1):
        for dc in range(-reach, reach + 1):
            if dr == 0 and dc <= 0:
                continue
            steps = abs(dr) + abs(dc) if connectivity == 4 else max(abs(dr), abs(dc))
            if steps <= reach:
                out.append((dr, dc))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _mutual_nearest(i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Mask of the candidate pairs ``(i, j)`` where each is the other's nearest."""
    if len(i) == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(d, kind="stable")
    k = np.arange(len(i))
    mutual = np.ones(len(i), dtype=bool)
    for ends in (i, j):
        best = np.full(int(ends.max()) + 1, -1)
        first_end, first = np.unique(ends[order], return_index=True)
        best[first_end] = order[first]
        mutual &= best[ends] == k
    return mutual


def grid_links(y, x, row, col, shape, *, search_range: float, connectivity: int = 4,
               max_gap: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidate links between peaks on neighbouring grid points.

    For each neighbour offset, the peaks of a point and of its neighbour are
    matched one to one, each to its mutual nearest within ``search_range``
    (repeated on the unmatched ones, so a third peak does not block a pair).

    Parameters
    ----------
    y, x : (P,) arrays of float
        Detector positions of the peaks.
    row, col : (P,) arrays of int
        Grid indices of their points (snaking undone).
    shape : (int, int)
        Grid shape.
    search_range : float
        Largest detector distance between linked peaks (pixels).
    connectivity, max_gap : int
        Which grid points are neighbours (see :func:`grid_offsets`).

    Returns
    -------
    a, b : (L,) arrays of int
        Indices of the linked peaks.
    distance : (L,) array of float
        Their detector distance.
    steps : (L,) array of int
        Grid steps between their points (1 for direct neighbours).
    """
    from scipy.spatial import cKDTree

    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    row, col = np.asarray(row, dtype=np.int64), np.asarray(col, dtype=np.int64)
    n_rows, n_cols = int(shape[0]), int(shape[1])
    point = row * n_cols + col
    # A third coordinate that only lets peaks of one point pair up: any two
    # points differ by at least `scale` > search_range along it.
    scale = 4.0 * float(search_range) + 1.0
    tree = cKDTree(np.column_stack([y, x, point * scale]))
    out_a, out_b, out_d, out_s = [], [], [], []
    for dr, dc in grid_offsets(connectivity, max_gap):
        r2, c2 = row + dr, col + dc
        ok = (r2 >= 0) & (r2 < n_rows) & (c2 >= 0) & (c2 < n_cols)
        src = np.flatnonzero(ok)
        if src.size == 0:
            continue
        other = cKDTree(np.column_stack([y[src], x[src], (r2[src] * n_cols + c2[src]) * scale]))
        pairs = other.sparse_distance_matrix(tree, float(search_range), output_type="ndarray")
        a, b, d = src[pairs["i"]], pairs["j"].astype(np.int64), pairs["v"]
        keep = np.zeros(len(a), dtype=bool)
        for _round in range(3):
            free = ~keep
            if not free.any():
                break
            used_a = np.zeros(len(y), dtype=bool)
            used_b = np.zeros(len(y), dtype=bool)
            used_a[a[keep]] = True
            used_b[b[keep]] = True
            cand = free & ~used_a[a] & ~used_b[b]
            idx = np.flatnonzero(cand)
            if idx.size == 0:
                break
            mutual = _mutual_nearest(a[idx], b[idx], d[idx])
            if not mutual.any():
                break
            keep[idx[mutual]] = True
        out_a.append(a[keep])
        out_b.append(b[keep])
        out_d.append(d[keep])
        out_s.append(np.full(int(keep.sum()), abs(dr) + abs(dc), dtype=np.int64))
    if not out_a:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), empty
    return (np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d),
            np.concatenate(out_s))


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _merge_apart(points: dict[int, set], pairs) -> dict[int, int]:
    """Union-find over ``pairs`` (in order) that never joins two sets sharing a grid point.

    ``points`` maps each item to the grid points it holds; returns each item's root.
    """
    parent = {k: k for k in points}
    points = {k: set(v) for k, v in points.items()}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j in pairs:
        ra, rb = find(int(i)), find(int(j))
        if ra == rb or not points[ra].isdisjoint(points[rb]):
            continue
        if len(points[ra]) < len(points[rb]):
            ra, rb = rb, ra
        parent[rb] = ra
        points[ra] |= points.pop(rb)
    return {k: find(k) for k in parent}


def first_appearance(label: np.ndarray) -> np.ndarray:
    """Renumber labels ``0..G-1`` in order of their first occurrence.

    Examples
    --------
    >>> first_appearance(np.array([7, 7, 2, 9, 2])).tolist()
    [0, 0, 1, 2, 1]
    """
    label = np.asarray(label)
    if label.size == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, first, inverse = np.unique(label, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return rank[inverse.ravel()]


def _join_fragments(label, y, x, point, link_distance, search_range) -> np.ndarray:
    """Join tracks at the same detector position that never share a grid point.

    A grain can reach the scan grid in pieces farther apart than ``max_gap``
    (an island of its rim, a row of points where its peak was too weak). Its
    pieces keep one detector position, so they are joined when their mean
    positions agree within four times the median distance between linked
    peaks (at least 1 px, at most ``search_range``) and they hold no point in
    common.
    """
    from scipy.spatial import cKDTree

    n_labels = int(label.max()) + 1
    if n_labels < 2:
        return label
    jitter = float(np.median(link_distance)) if len(link_distance) else 0.0
    tolerance = min(float(search_range), max(1.0, 4.0 * jitter))
    count = np.bincount(label, minlength=n_labels)
    cy = np.bincount(label, weights=y, minlength=n_labels) / count
    cx = np.bincount(label, weights=x, minlength=n_labels) / count
    pairs = cKDTree(np.column_stack([cy, cx])).query_pairs(tolerance, output_type="ndarray")
    if len(pairs) == 0:
        return label
    order = np.argsort(np.hypot(cy[pairs[:, 0]] - cy[pairs[:, 1]], cx[pairs[:, 0]] - cx[pairs[:, 1]]))
    involved = np.unique(pairs)
    members = {int(g): np.flatnonzero(label == g) for g in involved}
    roots = _merge_apart({g: point[m].tolist() for g, m in members.items()}, pairs[order])
    label = label.copy()
    for g, m in members.items():
        label[m] = roots[g]
    return label


def link_on_grid(y, x, row, col, shape, *, search_range: float, connectivity: int = 4,
                 max_gap: int = 1, min_points: int = 3) -> np.ndarray:
    """Track id of each peak by the grid linker (``-1``: rejected as noise).

    Parameters
    ----------
    y, x, row, col, shape, search_range, connectivity, max_gap
        As :func:`grid_links`.
    min_points : int
        Fewest grid points a track must cover to be kept.

    Returns
    -------
    particle : (P,) ndarray of int64
        Track ids ``0..G-1`` numbered in order of first peak index, ``-1``
        for peaks of rejected tracks.

    Examples
    --------
    A peak seen along a row turn of a snaking scan is one track:

    >>> link_on_grid([10, 10.2, 10.1, 80], [5, 5, 5.1, 40], [0, 0, 1, 1], [0, 1, 1, 0],
    ...              (2, 2), search_range=5, min_points=2).tolist()
    [0, 0, 0, -1]
    """
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    row, col = np.asarray(row, dtype=np.int64), np.asarray(col, dtype=np.int64)
    point = row * int(shape[1]) + col
    a, b, d, steps = grid_links(y, x, row, col, shape, search_range=search_range,
                                connectivity=connectivity, max_gap=max_gap)
    label = _components(n, a, b)
    # Components holding two peaks of one point join two reflections: rebuild
    # them link by link (nearest grid steps first, then shortest distance).
    key = label * (int(point.max()) + 1) + point
    uniq, counts = np.unique(key, return_counts=True)
    clashing = np.unique(uniq[counts > 1] // (int(point.max()) + 1))
    if clashing.size:
        in_clash = np.isin(label, clashing)
        edge_in = in_clash[a]
        ea, eb = a[edge_in], b[edge_in]
        order = np.lexsort((d[edge_in], steps[edge_in]))
        members = np.flatnonzero(in_clash)
        roots = _merge_apart({int(m): [int(point[m])] for m in members},
                             zip(ea[order], eb[order]))
        label = label.copy()
        label[members] = label.max() + 1 + np.array([roots[int(m)] for m in members])
        logger.debug("split %d components holding two peaks at one point", clashing.size)
    _, label = np.unique(label, return_inverse=True)
    label = _join_fragments(label, y, np.asarray(x, dtype=np.float64), point, d,
                            search_range)
    # Keep tracks on at least `min_points` grid points.
    _, label = np.unique(label, return_inverse=True)
    n_points = np.bincount(label, minlength=label.max() + 1)
    keep = n_points[label] >= int(min_points)
    particle = np.full(n, -1, dtype=np.int64)
    particle[keep] = first_appearance(label[keep])
    return particle


def link_peaks(peaks: pd.DataFrame, *, search_range: float = 50, linker: str = "grid",
               grid: Grid | None = None, **link_keywords) -> pd.DataFrame:
    """Link the peaks of a scan into tracks (one per Bragg reflection).

    Parameters
    ----------
    peaks : DataFrame
        Peak table with at least ``y``, ``x`` and ``frame`` (the point's
        acquisition index), as :func:`crystalmapping.locate.locate_peaks`
        makes; the grid linker also needs ``row`` and ``col`` or ``grid``.
    search_range : float
        Largest detector distance (pixels) between two linked peaks.
    linker : {"grid", "trackpy"}
        See the module docstring.
    grid : Grid, optional
        The scan grid, to place each ``frame`` on it (grid linker).
    **link_keywords
        The other fields of :class:`~crystalmapping.config.LinkOptions`
        (``connectivity``, ``max_gap``, ``min_points`` for ``"grid"``;
        ``memory``, ``adaptive_stop``, ``adaptive_step``, ``neighbor_strategy``,
        ``link_strategy`` for ``"trackpy"``); the others are ignored.

    Returns
    -------
    linked : DataFrame
        A copy of ``peaks`` sorted by ``frame``, with an int64 ``particle``
        column numbering the tracks from 0 in order of first appearance
        (``-1``: a peak of a track the grid linker rejected as noise).
    """
    options = LinkOptions(search_range=search_range, linker=linker, **link_keywords)
    missing = {"y", "x", "frame"} - set(peaks.columns)
    if missing:
        raise ValueError(
            f"the peak table needs the columns y, x and frame to be linked; missing {sorted(missing)}."
        )
    table = peaks.sort_values("frame", kind="stable").reset_index(drop=True)
    if table.empty:
        table = table.copy()
        table["particle"] = pd.Series(dtype="int64")
        return table
    if options.linker == "grid":
        return _link_grid(table, options, grid)
    return _link_trackpy(table, options)


def _link_grid(table: pd.DataFrame, options: LinkOptions, grid: Grid | None) -> pd.DataFrame:
    if grid is not None:
        row, col = grid.indices(table["frame"].to_numpy())
        shape = grid.shape
    elif {"row", "col"} <= set(table.columns):
        row, col = table["row"].to_numpy(), table["col"].to_numpy()
        shape = (int(row.max()) + 1, int(col.max()) + 1)
    else:
        raise ValueError(
            "the grid linker places peaks on the scan grid: pass grid=Grid(...) (e.g. "
            "Grid.from_start(run.start)) or add row and col columns, or use linker='trackpy'."
        )
    table = table.copy()
    table["particle"] = link_on_grid(
        table["y"].to_numpy(), table["x"].to_numpy(), row, col, shape,
        search_range=options.search_range, connectivity=options.connectivity,
        max_gap=options.max_gap, min_points=options.min_points)
    n_kept = int(table["particle"].max()) + 1 if (table["particle"] >= 0).any() else 0
    logger.debug("grid linker: %d peaks -> %d tracks, %d peaks rejected", len(table), n_kept,
                 int((table["particle"] < 0).sum()))
    return table


def _link_trackpy(table: pd.DataFrame, options: LinkOptions) -> pd.DataFrame:
    import trackpy

    trackpy.quiet()
    kw = {"memory": options.memory}
    for name in ("neighbor_strategy", "link_strategy"):
        if getattr(options, name) is not None:
            kw[name] = getattr(options, name)
    if options.adaptive_stop is not None:
        kw.update(adaptive_stop=options.adaptive_stop, adaptive_step=options.adaptive_step)
    linked = trackpy.link(table, options.search_range, t_column="frame", **kw)
    linked = linked.reset_index(drop=True)
    # Renumber tracks 0..G-1 in order of first appearance, independent of trackpy internals.
    linked["particle"] = first_appearance(linked["particle"].to_numpy())
    logger.debug("linked %d peaks into %d tracks", len(linked), linked["particle"].nunique())
    return linked
