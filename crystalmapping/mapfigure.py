"""Map figure: a map dataset as a facet grid of panels, saved as a PNG.

:func:`plot_maps` draws the total intensity and one panel per grain of a map
dataset (:mod:`crystalmapping.store`), each in real motor units
(:func:`crystalmapping.plot.plot_real_aspect`), laid out for a landscape
figure; :func:`save_maps_plot` writes that figure to a PNG (``crystalmapping
plot``, ``crystalmapping process --plot``).

matplotlib is imported inside the functions only, so importing
crystalmapping does not select a backend.

Examples
--------
>>> fig = plot_maps(open_maps("maps.zarr"), max_grains=12)   # doctest: +SKIP
>>> save_maps_plot("maps.zarr", "maps.png")                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import ConfigError, ConfigTypeError
from .plot import pixel_edges, plot_real_aspect

__all__ = ["plot_maps", "save_maps_plot", "DEFAULT_MAX_GRAINS"]

logger = logging.getLogger(__name__)

#: Grain panels :func:`plot_maps` shows when ``max_grains`` is None.
DEFAULT_MAX_GRAINS = 24

_MAP_VARIABLES = ("intensity", "total_intensity")
_GRAIN_VARIABLES = ("y", "x", "n_points")


def _check_maps(maps) -> None:
    if not isinstance(maps, xr.Dataset):
        raise ConfigTypeError(
            f"plot_maps needs a map dataset (crystalmapping.maps.reduce_scan or "
            f"crystalmapping.open_maps), got a {type(maps).__name__}; pass the dataset, or "
            "give save_maps_plot the path of a map store."
        )
    missing = [v for v in _MAP_VARIABLES + _GRAIN_VARIABLES if v not in maps.variables]
    if missing:
        raise ConfigError(
            f"a map dataset has the variables {list(_MAP_VARIABLES + _GRAIN_VARIABLES)} (see "
            f"crystalmapping.store); this one lacks {missing}. Pass the result of reduce_scan "
            "or open_maps."
        )


def _check_count(name: str, value, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigTypeError(f"{name} must be a whole number or None, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum} (or None), got {value!r}.")
    return int(value)


def _select_grains(n_points: np.ndarray, max_grains: int) -> np.ndarray:
    """Positions of the ``max_grains`` grains seen at most points, in grain order."""
    if n_points.size <= max_grains:
        return np.arange(n_points.size)
    order = np.lexsort((np.arange(n_points.size), -n_points))  # most points, then lowest id
    return np.sort(order[:max_grains])


def _slot_size(panel_aspect: float) -> tuple[float, float, float]:
    """Axes width, and panel slot (width, height) in inches, for maps of height/width ``panel_aspect``.

    The slot adds room for the tick labels, axis label and colorbar (width) and
    for the two-line title and axis label (height).
    """
    width = float(np.clip(math.sqrt(5.0 / panel_aspect), 1.4, 3.2))
    return width, width + 1.4, width * panel_aspect + 1.0


def _layout(n_panels: int, slot: tuple[float, float], col_wrap: int | None) -> tuple[int, int]:
    """(rows, cols) of panels; by default a landscape figure of about 8:5."""
    if col_wrap is not None:
        ncols = min(col_wrap, n_panels)
        return math.ceil(n_panels / ncols), ncols
    best = None
    for ncols in range(1, n_panels + 1):
        nrows = math.ceil(n_panels / ncols)
        ratio = nrows * slot[1] / (ncols * slot[0])
        score = abs(math.log(ratio / 0.62)) + 0.05 * (nrows * ncols - n_panels)
        if best is None or score < best[0]:
            best = (score, nrows, ncols)
    return best[1], best[2]


def _panel_aspect(maps: xr.Dataset) -> float:
    """Height / width of a map in motor units (pixels if no positions), clamped for layout."""
    nrows, ncols = maps.sizes["row"], maps.sizes["col"]
    height, width = float(nrows), float(ncols)
    if "row_position" in maps.coords and "col_position" in maps.coords:
        r = pixel_edges(maps["row_position"].values)
        c = pixel_edges(maps["col_position"].values)
        if r is not None and c is not None:
            height, width = abs(r[1] - r[0]), abs(c[1] - c[0])
    return float(np.clip(height / width, 0.25, 4.0))


def plot_maps(maps: xr.Dataset, *, max_grains: int | None = None, col_wrap: int | None = None,
              figsize: tuple[float, float] | None = None, cmap: str = "viridis"):
    """Facet grid of a map dataset: the total intensity, then one map per grain.

    Parameters
    ----------
    maps : xarray.Dataset
        A map dataset (:mod:`crystalmapping.store`): ``intensity(grain, row,
        col)``, ``total_intensity(row, col)``, ``y``/``x``/``n_points(grain)``,
        coordinates ``row_position``/``col_position``. May be lazy (an opened
        store); only the grains shown are read.
    max_grains : int, optional
        Largest number of grain panels. Default :data:`DEFAULT_MAX_GRAINS`
        (24). When there are more grains (noise peaks linked into hundreds of
        short tracks happen), those found at the most grid points are shown, in
        grain order, and the title says "showing 24 of 317 maps". 0 shows the
        total intensity only.
    col_wrap : int, optional
        Panels per row. Default: chosen from the number of panels and the
        aspect of the scan, for a landscape figure.
    figsize : (float, float), optional
        Figure size in inches. Default: about 3 inches per panel width.
    cmap : str or Colormap

    Returns
    -------
    fig : matplotlib.figure.Figure
        A figure not registered with pyplot (no backend, nothing to close);
        a notebook shows it when it is the cell's result. Each panel has its
        own colorbar; unmeasured points (aborted scan) are blank.

    Raises
    ------
    ConfigError
        If ``maps`` lacks a variable of the contract, or an option is out of range.
    """
    from matplotlib.figure import Figure

    _check_maps(maps)
    limit = _check_count("max_grains", max_grains, 0)
    limit = DEFAULT_MAX_GRAINS if limit is None else limit
    col_wrap = _check_count("col_wrap", col_wrap, 1)
    if figsize is not None:
        try:
            size = tuple(float(v) for v in figsize)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or not all(math.isfinite(v) and v > 0 for v in size):
            raise ConfigError(
                f"figsize must be (width, height) in inches, two positive numbers; got "
                f"{figsize!r}. Pass e.g. figsize=(12, 8) or leave it out."
            )
        figsize = size

    n_points = np.asarray(maps["n_points"].values, dtype=np.int64)
    n_grains = int(maps.sizes.get("grain", n_points.size))
    shown = _select_grains(n_points, limit)
    measured = (np.asarray(maps["measured"].values, dtype=bool)
                if "measured" in maps.variables else None)

    def _masked(da: xr.DataArray, long_name: str) -> xr.DataArray:
        da = da.astype(np.float64)
        if measured is not None:
            da = da.where(measured)
        return da.assign_attrs(long_name=long_name)

    n_panels = 1 + shown.size
    _, slot_w, slot_h = _slot_size(_panel_aspect(maps))
    nrows, ncols = _layout(n_panels, (slot_w, slot_h), col_wrap)
    if figsize is None:
        figsize = (ncols * slot_w, nrows * slot_h + 0.4)
    fig = Figure(figsize=figsize, layout="constrained")

    n_measured = int(measured.sum()) if measured is not None else maps.sizes["row"] * maps.sizes["col"]
    # The brightest pixel shows where the sample diffracts; the image sum is dominated by
    # the background's noise on small detectors. Older stores have only the sum.
    key, label = (("max_intensity", "brightest pixel") if "max_intensity" in maps
                  else ("total_intensity", "image sum"))
    total = _masked(maps[key].compute(), label)
    panels = [fig.add_subplot(nrows, ncols, 1)]
    plot_real_aspect(total, ax=panels[0], cmap=cmap,
                     title=f"{label}\n{n_measured} of {total.size} points measured")

    if shown.size:
        intensity = maps["intensity"].isel(grain=shown).compute()
        ys, xs = maps["y"].values[shown], maps["x"].values[shown]
        ids = maps["grain"].values[shown] if "grain" in maps.coords else shown
        grain_id = maps["grain_id"].values[shown] if "grain_id" in maps else None
        long_name = intensity.attrs.get("long_name", "intensity")
        for k in range(shown.size):
            ax = fig.add_subplot(nrows, ncols, k + 2)
            panels.append(ax)
            points = int(n_points[shown[k]])
            which = (f"map {int(ids[k])}, grain {int(grain_id[k])}" if grain_id is not None
                     else f"grain {int(ids[k])}")
            title = (f"{which}  (y={ys[k]:.0f}, x={xs[k]:.0f})\n"
                     f"{points} point{'s' if points != 1 else ''}")
            plot_real_aspect(_masked(intensity.isel(grain=k, drop=True), long_name), ax=ax,
                             cmap=cmap, title=title)

    for ax in fig.axes:  # panels and colorbars
        ax.title.set_fontsize("small")
        ax.xaxis.label.set_fontsize("small")
        ax.yaxis.label.set_fontsize("small")
        ax.tick_params(labelsize="x-small")
    for i, ax in enumerate(panels):  # every panel has the same extent: label the outer ones
        if i % ncols:
            ax.set_ylabel("")
        if i + ncols < n_panels:
            ax.set_xlabel("")

    uid = maps.attrs.get("source_uid")
    head = f"crystal maps of run {str(uid)[:8]}" if uid else "crystal maps"
    if n_grains == 0:
        text = f"{head}: no peak was linked into a map (0 maps); total intensity only"
    elif shown.size < n_grains:
        text = (f"{head}: showing {shown.size} of {n_grains} maps "
                "(the grains found at the most points)")
        logger.info("plotting %d of %d maps", shown.size, n_grains)
    else:
        text = f"{head}: {n_grains} map{'s' if n_grains != 1 else ''}"
    fig.suptitle(text)
    return fig


def save_maps_plot(maps_or_path, out_png: str | os.PathLike, **kwargs) -> Path:
    """Plot a map dataset or store with :func:`plot_maps` and save it as a PNG.

    Parameters
    ----------
    maps_or_path : xarray.Dataset or path
        A map dataset, or the path of a map store (opened with
        :func:`crystalmapping.store.open_maps`).
    out_png : path
        The PNG to write (100 dpi); its directory is created if needed.
    **kwargs
        Keyword options of :func:`plot_maps` (``max_grains``, ``col_wrap``,
        ``figsize``, ``cmap``).

    Returns
    -------
    path : Path
        ``out_png``.

    Raises
    ------
    StoreError
        If the path is not a map store.
    """
    from .store import open_maps

    if isinstance(maps_or_path, xr.Dataset):
        maps = maps_or_path
    elif isinstance(maps_or_path, (str, os.PathLike)):
        maps = open_maps(maps_or_path)
    else:
        raise ConfigTypeError(
            f"save_maps_plot needs a map dataset or the path of a map store, got a "
            f"{type(maps_or_path).__name__}."
        )
    out = Path(out_png)
    fig = plot_maps(maps, **kwargs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, format="png")
    finally:
        fig.clear()  # the figure is not in pyplot's registry: nothing else holds it
    logger.info("wrote %s", out)
    return out
