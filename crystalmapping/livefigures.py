"""Live figures: small PNGs of a map store for the live page (:mod:`crystalmapping.liveview`).

A :class:`Snapshot` is what the page needs of one store, read once per write
of the store and held in memory (a few arrays: the maps, the measured points,
the total intensity, the linked peak table), so that a store the server
replaces while the page reads it (partial maps are rewritten every few
points) is never read twice. From it:

* :func:`render_map`: one map, coloured by its grain (white to the grain's
  colour; unmeasured points grey), an image without axes in the aspect of the
  scan (milliseconds to draw, so the page keeps up with partial writes);
* :func:`render_total`: the total intensity of each point measured so far, in
  motor units (the axes the maps share);
* :func:`render_peaks`: the linked peaks of the latest point that has any,
  at their detector positions and in their grain's colour, over the peaks of
  the whole scan (grey). The frame itself is not in the store, so it is not
  drawn.

matplotlib's object API (``Figure`` + Agg), no pyplot: safe in any thread.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .store import open_maps

__all__ = ["Snapshot", "store_version", "store_attrs", "load_snapshot", "render_map",
           "render_total", "render_peaks", "store_maps", "expected_points", "STATES"]

#: The page's word for a store's ``exit_status``.
STATES = {"running": "running", "success": "finished", "abort": "aborted", "fail": "failed",
          "interrupted": "interrupted", "timeout": "timed out"}

#: A grain's colour (matplotlib's tab10, by grain id).
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]
_DPI = 80
_MAP_WIDTH = 150  # pixels of a map panel, about


def store_version(path: Path) -> str | None:
    """A token that changes with every write of the store at ``path`` (None: no store).

    Stores are replaced whole (written aside, then renamed into place), so the
    directory's inode and times change with each write.
    """
    try:
        st = os.stat(path)
        meta = os.stat(path / ".zattrs")
    except OSError:
        return None
    return f"{st.st_ino:x}{st.st_mtime_ns:x}{meta.st_mtime_ns:x}"


def store_attrs(path: Path) -> dict | None:
    """The attributes of a store (its ``.zattrs``, no array read); None if unreadable."""
    try:
        attrs = json.loads((path / ".zattrs").read_text())
        if isinstance(attrs.get("grid"), str):
            attrs["grid"] = json.loads(attrs["grid"])
        return attrs
    except (OSError, ValueError):
        return None


def store_maps(path: Path) -> int | None:
    """The number of maps in a store (the shape of its ``intensity``), no array read."""
    try:
        return int(json.loads((path / "intensity" / ".zarray").read_text())["shape"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def expected_points(attrs: dict) -> int | None:
    shape = (attrs.get("grid") or {}).get("shape")
    try:
        return int(np.prod([int(n) for n in shape]))
    except (TypeError, ValueError):
        return None


@dataclass
class Snapshot:
    """What the page shows of one write of one store."""

    uid: str
    version: str
    attrs: dict
    intensity: np.ndarray            # (grain, row, col), NaN where not measured
    total: np.ndarray                # (row, col), NaN where not measured
    grain_id: np.ndarray             # (grain,)
    n_points: np.ndarray             # (grain,)
    extent: list[float]              # imshow extent in motor units (or indices)
    labels: tuple[str, str]          # (col motor, row motor)
    peaks: dict = field(default_factory=dict)   # peak_frame, peak_y, peak_x, peak_particle

    @property
    def n_maps(self) -> int:
        return int(self.intensity.shape[0])

    def meta(self) -> dict:
        """The JSON the page reads: counts and one entry per map."""
        a = self.attrs
        return {
            "uid": self.uid, "version": self.version,
            "exit_status": a.get("exit_status"),
            "state": STATES.get(a.get("exit_status"), str(a.get("exit_status"))),
            "points": int(a.get("n_points_measured", 0)),
            "expected": expected_points(a),
            "peaks": int(a.get("n_peaks_found", 0)),
            "grains": int(a.get("n_grains", 0)),
            "n_maps": self.n_maps,
            "failed": len(a.get("failed_points") or []),
            "maps": [{"index": k, "grain": int(self.grain_id[k]),
                      "points": int(self.n_points[k]), "colour": colour(self.grain_id[k])}
                     for k in range(self.n_maps)],
        }


def colour(grain) -> str:
    return _COLOURS[int(grain) % len(_COLOURS)]


def _edges(positions: np.ndarray) -> tuple[float, float] | None:
    p = np.asarray(positions, dtype=float)
    if p.size == 0 or not np.all(np.isfinite(p)):
        return None
    if p.size == 1:
        return p[0] - 0.5, p[0] + 0.5
    step = (p[-1] - p[0]) / (p.size - 1)
    return (p[0] - step / 2, p[-1] + step / 2) if step else None


def load_snapshot(path: Path, uid: str) -> Snapshot | None:
    """Read a store into memory; None if it is not there or is being replaced."""
    version = store_version(path)
    if version is None:
        return None
    try:
        ds = open_maps(path)
        names = ["intensity", "total_intensity", "measured", "n_points"]
        names += [n for n in ("grain_id", "peak_frame", "peak_y", "peak_x", "peak_particle")
                  if n in ds]
        ds = ds[names].load()
    except Exception:  # noqa: BLE001 - replaced while read: the next poll reads the new one
        return None
    measured = ds["measured"].values.astype(bool)
    intensity = np.where(measured, ds["intensity"].values.astype(float), np.nan)
    total = np.where(measured, ds["total_intensity"].values.astype(float), np.nan)
    n_maps = intensity.shape[0]
    grain_id = (ds["grain_id"].values if "grain_id" in ds else np.arange(n_maps))
    cols, rows = ds.coords.get("col_position"), ds.coords.get("row_position")
    ce = _edges(cols.values) if cols is not None else None
    re_ = _edges(rows.values) if rows is not None else None
    if ce is None or re_ is None:
        extent = [-0.5, intensity.shape[2] - 0.5, intensity.shape[1] - 0.5, -0.5]
        labels = ("col", "row")
    else:
        extent = [ce[0], ce[1], re_[1], re_[0]]
        labels = (str(cols.attrs.get("motor", "col")), str(rows.attrs.get("motor", "row")))
    peaks = {n: ds[n].values for n in ("peak_frame", "peak_y", "peak_x", "peak_particle")
             if n in ds}
    return Snapshot(uid, version, dict(ds.attrs), intensity, total,
                    np.asarray(grain_id, dtype=np.int64),
                    np.asarray(ds["n_points"].values, dtype=np.int64), extent, labels, peaks)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)  # fixed margins: constrained layout is slow
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.62 / width, right=1 - 0.12 / width, bottom=0.5 / height,
                        top=1 - 0.3 / height)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()
    return buf.getvalue()


def _map_axes(snap: Snapshot, title: str):
    rows, cols = snap.total.shape
    aspect = abs((snap.extent[2] - snap.extent[3]) / (snap.extent[1] - snap.extent[0]))
    aspect = float(np.clip(aspect, 0.25, 4.0))
    width = 2.3
    fig = _figure(width, (width - 0.75) * aspect + 0.8)
    ax = fig.add_subplot()
    ax.set_facecolor("#d9d9d9")  # unmeasured points (NaN) show the background
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(snap.labels[0], fontsize=7)
    ax.set_ylabel(snap.labels[1], fontsize=7)
    ax.tick_params(labelsize=6)
    return fig, ax


def render_map(snap: Snapshot, k: int) -> bytes:
    """Map ``k`` from white (zero) to its grain's colour (its brightest point), grey where
    not measured yet; no axes (the total-intensity panel has them, in the same orientation
    and aspect), so that a map costs milliseconds, not a figure."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.image import imsave

    grain = int(snap.grain_id[k])
    cmap = LinearSegmentedColormap.from_list(f"grain{grain}", ["#ffffff", colour(grain)])
    cmap.set_bad("#d9d9d9")
    data = snap.intensity[k]
    top = float(np.nanmax(data)) if np.isfinite(data).any() else 0.0
    rgba = cmap(np.ma.masked_invalid(data / (top or 1.0)))
    rows, cols = data.shape
    width = abs(snap.extent[1] - snap.extent[0]) or cols
    height = abs(snap.extent[2] - snap.extent[3]) or rows
    px = max(1, round(_MAP_WIDTH / cols))                       # pixels per column
    py = max(1, min(round(px * (height / rows) / (width / cols)), 4 * _MAP_WIDTH // rows))
    rgba = np.repeat(np.repeat(rgba, py, axis=0), px, axis=1)
    buf = io.BytesIO()
    imsave(buf, rgba, format="png")
    return buf.getvalue()


def render_total(snap: Snapshot) -> bytes:
    """The total intensity of each point measured so far (grey: not measured yet)."""
    n = int(np.isfinite(snap.total).sum())
    fig, ax = _map_axes(snap, f"total intensity, {n} of {snap.total.size} points")
    if n:
        ax.imshow(snap.total, extent=snap.extent, cmap="viridis", interpolation="nearest",
                  aspect="auto")
    return _png(fig)


def render_peaks(snap: Snapshot) -> bytes:
    """The linked peaks of the latest point with peaks, on the detector, by grain."""
    fig = _figure(2.9, 2.8)
    ax = fig.add_subplot()
    ax.tick_params(labelsize=6)
    ax.set_xlabel("detector x (pixels)", fontsize=7)
    ax.set_ylabel("detector y (pixels)", fontsize=7)
    frame, y, x = (snap.peaks.get(n) for n in ("peak_frame", "peak_y", "peak_x"))
    if frame is None or len(frame) == 0:
        ax.set_title("no linked peak yet", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        return _png(fig)
    ax.scatter(x, y, s=6, c="#bbbbbb", linewidths=0, label="the scan's peaks")
    last = int(np.max(frame))
    sel = frame == last
    particle = snap.peaks.get("peak_particle")
    grains = (snap.grain_id[np.clip(particle[sel].astype(int), 0, snap.n_maps - 1)]
              if particle is not None and snap.n_maps else np.zeros(sel.sum(), int))
    ax.scatter(x[sel], y[sel], s=80, facecolors="none", linewidths=1.5,
               edgecolors=[colour(g) for g in grains])
    ax.set_title(f"peaks of point {last} (latest with peaks): {int(sel.sum())}", fontsize=8)
    ax.invert_yaxis()
    ax.set_aspect("equal", adjustable="datalim")
    return _png(fig)
