"""Plot: per-event scalars and images of a scan, in real motor units.

:func:`reshape` places a per-event scalar of a run (``dexela_stats1_total``...)
on the scan grid, snaking undone; :func:`plot_real_aspect` shows a 2-D array
with equal units on both axes, so a map looks like the sample (a step of
0.25 mm along one motor and 0.5 mm along the other is not a square pixel).
The figure of a whole map dataset is :mod:`crystalmapping.mapfigure`'s.

matplotlib is imported inside the functions only, so importing
crystalmapping does not select a backend.

Examples
--------
>>> ds = run.to_dataset("dexela_image")                      # doctest: +SKIP
>>> stats1 = reshape(ds, "dexela_stats1_total")              # doctest: +SKIP
>>> plot_real_aspect(stats1);                                # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import xarray as xr

from .errors import ConfigError, ConfigTypeError, ScanError
from .grid import Grid

__all__ = ["reshape", "plot_real_aspect", "pixel_edges"]

logger = logging.getLogger(__name__)


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


def pixel_edges(positions: np.ndarray) -> tuple[float, float] | None:
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
    r_edges, c_edges = pixel_edges(rows), pixel_edges(cols)
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
