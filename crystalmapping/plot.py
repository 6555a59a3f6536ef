"""Plot: per-event scalars and crystal maps on the scan grid, in real motor units.

:func:`reshape` places a per-event scalar of a run (``dexela_stats1_total``...)
on the scan grid, snaking undone; :func:`plot_real_aspect` shows a 2-D array
with equal units on both axes, so a map looks like the sample (a step of
0.25 mm along one motor and 0.5 mm along the other is not a square pixel);
:func:`plot_maps` draws the total intensity and one panel per grain of a map
dataset (:mod:`crystalmapping.store`), and :func:`save_maps_plot` writes that
figure to a PNG.

matplotlib is imported inside the functions only, so importing
crystalmapping does not select a backend.

Examples
--------
>>> ds = run.to_dataset("dexela_image")                      # doctest: +SKIP
>>> stats1 = reshape(ds, "dexela_stats1_total")              # doctest: +SKIP
>>> plot_real_aspect(stats1);                                # doctest: +SKIP
>>> save_maps_plot("maps.zarr", "maps.png")                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr

from .errors import ConfigError, ConfigTypeError, ScanError
from .grid import Grid

__all__ = ["reshape", "plot_real_aspect", "plot_maps", "save_maps_plot", "DEFAULT_MAX_GRAINS"]

logger = logging.getLogger(__name__)

#: Grain panels :func:`plot_maps` shows when ``max_grains`` is None.
DEFAULT_MAX_GRAINS = 24

_MAP_VARIABLES = ("intensity", "total_intensity")
_GRAIN_VARIABLES = ("y", "x", "n_points")


# ----------------------------------------------------------------------------- reshape


def _grid_of(attrs: Mapping[str, Any]) -> Grid:
    """The grid of a run's start document, or of a map dataset's ``grid`` attribute."""
    if "shape" not in attrs and isinstance(attrs.get("grid"), Mapping):
        return Grid.from_start(attrs["grid"])
    return Grid.from_start(attrs)


def reshape(data: xr.Dataset, key: str, *, grid: Grid | None = None) -> xr.DataArray:
    """Place a per-event scalar on the scan grid, snaking undone.

    Parameters
    ----------
    data : xarray.Dataset
        As :meth:`crystalmapping.source.Run.to_dataset` returns: ``data[key]``
        has dims ``("point",)`` (point ``i`` is the ``i``-th event, in
        acquisition order) and ``data.attrs`` is the start document with
        ``shape``, ``extents``, ``snaking`` and ``motors``. The variable may be
        lazy (dask); it is computed here.
    key : str
        Name of the per-event scalar, e.g. ``"dexela_stats1_total"``.
    grid : Grid, optional
        The scan grid, for a run whose start document does not describe it.
        Default: ``Grid.from_start(data.attrs)``.

    Returns
    -------
    values : (rows, cols) xarray.DataArray of float64
        Named ``key``, dims ``("row", "col")`` (slow, fast axis), coordinates
        ``row``/``col`` (grid indices) and ``row_position``/``col_position``
        (motor positions, ``attrs["motor"]`` names the motor). Points that were
        not measured (an aborted scan) are NaN.

    Raises
    ------
    ScanError
        If ``key`` is not a variable of ``data``, is not one scalar per event,
        is not numeric, or if the run has more events than its grid.

    Examples
    --------
    >>> ds = xr.Dataset({"v": ("point", np.arange(5.0))},
    ...                 attrs=dict(shape=[2, 3], extents=[[0, 1], [0, 2]],
    ...                            snaking=[False, True], motors=["sy", "sx"]))
    >>> reshape(ds, "v").values.tolist()
    [[0.0, 1.0, 2.0], [nan, 4.0, 3.0]]
    """
    if not isinstance(data, xr.Dataset):
        raise ConfigTypeError(
            f"reshape needs the xarray.Dataset of a run (run.to_dataset()), got a "
            f"{type(data).__name__}; pass the dataset and the name of its variable."
        )
    if key not in data.variables:
        per_point = sorted(str(k) for k, v in data.variables.items() if v.dims == ("point",))
        raise ScanError(
            f"the dataset has no variable {key!r}; its per-event scalars are {per_point}. "
            "Pass one of them as key."
        )
    variable = data[key]
    if variable.dims != ("point",):
        raise ScanError(
            f"reshape places one scalar per event on the grid: {key!r} must have dims "
            f"('point',), got {variable.dims} with shape {variable.shape}. Reduce it to one "
            f"value per point first, e.g. data[{key!r}].sum(<other dims>)."
        )
    if grid is None:
        grid = _grid_of(data.attrs)
    elif not isinstance(grid, Grid):
        raise ConfigTypeError(
            f"grid must be a crystalmapping.Grid, got {type(grid).__name__}; build one with "
            "Grid(shape=(rows, cols), extents=..., snaking=..., motors=...)."
        )
    raw = variable.values  # computes a lazy variable
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScanError(
            f"reshape plots numbers: {key!r} holds {np.asarray(raw).dtype} values. "
            "Pick a numeric per-event variable."
        ) from None
    row, col = grid.indices(np.arange(values.size))
    out = np.full(grid.shape, np.nan)
    out[row, col] = values
    rows_pos, cols_pos = grid.positions()
    logger.debug("reshaped %r: %d of %d points measured", key, values.size, grid.size)
    return xr.DataArray(
        out, dims=("row", "col"), name=key,
        coords={
            "row": ("row", np.arange(grid.shape[0])),
            "col": ("col", np.arange(grid.shape[1])),
            "row_position": ("row", rows_pos, {"motor": grid.motors[0]}),
            "col_position": ("col", cols_pos, {"motor": grid.motors[1]}),
        },
        attrs=dict(variable.attrs),
    )


# ----------------------------------------------------------------------------- real aspect


def _edges(positions: np.ndarray) -> tuple[float, float] | None:
    """Outer edges of evenly spaced pixel centres, or None if they have no step."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size < 2 or not np.all(np.isfinite(positions)):
        return None
    step = (positions[-1] - positions[0]) / (positions.size - 1)
    if step == 0:
        return None
    if not np.allclose(np.diff(positions), step, rtol=1e-3, atol=0):
        logger.warning("motor positions %s... are not evenly spaced; the image assumes "
                       "they are", positions[:3])
    return positions[0] - step / 2, positions[-1] + step / 2


def _real_extent(data: xr.DataArray) -> tuple[list[float], tuple[str, str]] | None:
    """``imshow`` extent and axis labels from ``row_position``/``col_position``, if usable."""
    rp, cp = data.coords["row_position"], data.coords["col_position"]
    rows, cols = np.asarray(rp.values, dtype=np.float64), np.asarray(cp.values, dtype=np.float64)
    r_edges, c_edges = _edges(rows), _edges(cols)
    if r_edges is None and c_edges is not None and rows.size == 1:
        half = abs(c_edges[1] - c_edges[0]) / cols.size / 2
        r_edges = (rows[0] - half, rows[0] + half)
    if c_edges is None and r_edges is not None and cols.size == 1:
        half = abs(r_edges[1] - r_edges[0]) / rows.size / 2
        c_edges = (cols[0] - half, cols[0] + half)
    if r_edges is None or c_edges is None:
        logger.warning("row_position/col_position %s x %s give no pixel size (a single point "
                       "or equal extents); plotting in pixels", rows, cols)
        return None
    labels = (str(cp.attrs.get("motor", cp.name)), str(rp.attrs.get("motor", rp.name)))
    # origin="upper": row 0 is at the top, at the first row position.
    return [c_edges[0], c_edges[1], r_edges[1], r_edges[0]], labels


def _as_image(data) -> tuple[np.ndarray, xr.DataArray | None]:
    if isinstance(data, xr.DataArray):
        if data.ndim == 2 and "row_position" in data.coords and "col_position" in data.coords:
            rdims, cdims = data.coords["row_position"].dims, data.coords["col_position"].dims
            if len(rdims) == 1 and len(cdims) == 1 and {rdims[0], cdims[0]} == set(data.dims):
                data = data.transpose(rdims[0], cdims[0])
        array = data
    else:
        array = None
    values = np.asarray(getattr(data, "values", data))
    if values.ndim != 2:
        hint = (" Select one grain first, e.g. maps['intensity'].sel(grain=3)."
                if isinstance(data, xr.DataArray) and "grain" in data.dims else
                " Select or reduce it to one 2-D image first.")
        raise ConfigError(
            f"plot_real_aspect shows a 2-D array (an image or a map on the scan grid); got "
            f"shape {values.shape}.{hint}"
        )
    if values.dtype == bool:
        values = values.astype(np.float64)
    if not np.issubdtype(values.dtype, np.number):
        raise ConfigError(
            f"plot_real_aspect shows numbers; got an array of {values.dtype}. Pass numeric data."
        )
    return values, array


def plot_real_aspect(data, *, ax=None, title: str | None = None, cmap: str = "viridis",
                     **imshow_kwargs):
    """Show a 2-D array with equal units on both axes, and a colorbar.

    Parameters
    ----------
    data : (M, N) ndarray or xarray.DataArray
        An image, or a map on the scan grid (:func:`reshape`,
        ``maps["total_intensity"]``, ``maps["intensity"].sel(grain=g)``). A
        DataArray with ``row_position``/``col_position`` coordinates is drawn
        in motor units: pixel ``(r, c)`` is centred on
        ``(col_position[c], row_position[r])``, so the picture has the aspect
        of the sample, and the axes are labelled with the motor names
        (``attrs["motor"]``). Anything else is drawn in pixels. Row 0 is at the
        top; NaN (unmeasured points) is left blank.
    ax : matplotlib Axes, optional
        Where to draw. Default: a new pyplot figure (so it shows in a notebook).
    title : str, optional
        Default: the DataArray's name, if any.
    cmap : str or Colormap
    **imshow_kwargs
        Passed to ``Axes.imshow`` (``vmin``, ``vmax``, ``norm``...); they
        override the extent, ``aspect="equal"`` and ``origin="upper"`` chosen here.

    Returns
    -------
    ax : matplotlib Axes

    Raises
    ------
    ConfigError
        If ``data`` is not 2-D or not numeric.

    Examples
    --------
    >>> plot_real_aspect(reshape(ds, "dexela_stats1_total"));   # doctest: +SKIP
    """
    values, array = _as_image(data)
    extent, labels = None, None
    if (array is not None and "row_position" in array.coords and "col_position" in array.coords
            and array.coords["row_position"].dims == array.dims[:1]
            and array.coords["col_position"].dims == array.dims[1:]):
        real = _real_extent(array)
        if real is not None:
            extent, labels = real
    if labels is None:
        if array is not None:
            labels = (f"{array.dims[1]} (index)", f"{array.dims[0]} (index)")
        else:
            labels = ("column (pixel)", "row (pixel)")
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    kwargs = dict(cmap=cmap, aspect="equal", origin="upper")
    if extent is not None:
        kwargs["extent"] = extent
    kwargs.update(imshow_kwargs)
    image = ax.imshow(values, **kwargs)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title is None and array is not None and array.name is not None:
        title = str(array.name)
    if title:
        ax.set_title(title)
    label = None
    if array is not None:
        label = array.attrs.get("long_name") or (str(array.name) if array.name is not None else None)
        if label and array.attrs.get("units"):
            label = f"{label} ({array.attrs['units']})"
    ax.figure.colorbar(image, ax=ax, label=label)
    return ax


# ----------------------------------------------------------------------------- maps


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
        r = _edges(maps["row_position"].values)
        c = _edges(maps["col_position"].values)
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
