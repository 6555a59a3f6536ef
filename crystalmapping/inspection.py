"""Inspection: one point's image with every candidate peak and the rule that decided it.

What a user looks at while tuning (trackpy's ``annotate``, for the ``bragg``
locator's rules): the preprocessed image of one grid point, the kept peaks,
and each rejected candidate marked with its reason (``weak``: ``snr`` below
``min_snr``; ``elongated``: a powder-ring or streak segment, ``ecc`` above
``max_ecc``; ``close``: within ``separation`` of a brighter peak; ``minmass``,
``maxsize``, ``topn``; ``masked``: its disk touches the detector mask). With
``locator="trackpy"`` only the kept peaks are known (trackpy does not say
what it dropped).

Dataflow: a run's point -> :func:`crystalmapping.frames.read_frames` ->
:func:`crystalmapping.preprocess.preprocess_frames` (the run's background as
the batch pipeline resolves it) -> :func:`crystalmapping.bragg.candidates_bragg`
-> :func:`plot_inspection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .bragg import VERDICTS, candidates_bragg
from .config import LocateOptions, ProcessConfig
from .frames import mean_frame, read_frames
from .locate import locate_peaks, masked_image
from .preprocess import check_point_index, preprocess_frames, resolve_background

__all__ = ["Inspection", "inspect", "inspect_image", "plot_inspection"]

#: How each verdict is drawn: (marker colour, label).
STYLE = {"kept": ("#00e000", "kept"), "masked": ("#ff2020", "touching the mask"),
         "weak": ("#8c8c8c", "weak (snr < min_snr)"),
         "elongated": ("#ff8c00", "elongated (ring or streak)"),
         "close": ("#ff3cff", "close to a brighter peak"), "minmass": ("#00bfff", "minmass"),
         "maxsize": ("#00bfff", "maxsize"), "topn": ("#00bfff", "beyond topn")}


@dataclass
class Inspection:
    """The image of one point and its candidates.

    Attributes
    ----------
    image : (M, N) ndarray of float32
        The preprocessed image (mean of the frames minus the background, >= 0).
    candidates : DataFrame
        One row per candidate: ``y``, ``x``, ``snr``, ``ecc``, ``amplitude``...
        and ``verdict`` (one of :data:`crystalmapping.bragg.VERDICTS`).
    noise : float
        The band-passed image's noise (NaN for ``locator="trackpy"``).
    point : int or None
        The point's acquisition index.
    options : LocateOptions
    """

    image: np.ndarray
    candidates: pd.DataFrame
    noise: float
    point: int | None
    options: LocateOptions

    def counts(self) -> dict[str, int]:
        """Candidates per verdict (every verdict, zeros included)."""
        found = self.candidates["verdict"].value_counts()
        return {v: int(found.get(v, 0)) for v in VERDICTS}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {n}" for k, n in self.counts().items() if n)
        return (f"Inspection(point={self.point}, image={self.image.shape}, "
                f"{counts or 'no candidates'})")


def inspect_image(image: np.ndarray, options: LocateOptions | dict | None = None,
                  *, point: int | None = None) -> Inspection:
    """Every candidate of a preprocessed image with the rule that decided it.

    Parameters
    ----------
    image : (M, N) ndarray
        A preprocessed (non-negative) image.
    options : LocateOptions or dict, optional
        The locate options (defaults: :class:`~crystalmapping.config.LocateOptions`).

    Returns
    -------
    Inspection

    Examples
    --------
    >>> from crystalmapping import sim
    >>> scan = sim.simulate_scan(shape=(3, 3), detector_shape=(128, 128), seed=1)
    >>> image = preprocess_frames(scan.frames(4), scan.expected_background())
    >>> result = inspect_image(image, {"diameter": 9})
    >>> set(result.candidates["verdict"]) <= set(VERDICTS)
    True
    """
    if options is None:
        options = LocateOptions()
    elif not isinstance(options, LocateOptions):
        options = LocateOptions.from_dict(options)
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"inspect_image takes one (M, N) image, got shape {image.shape}; "
                         "preprocess a point's frames first (preprocess_frames).")
    if options.locator == "trackpy":
        kw = options.to_dict()
        table = locate_peaks(image, **kw).assign(verdict="kept")
        return Inspection(image, table, float("nan"), point, options)
    filled, mask = masked_image(image, options)
    if not filled.any():
        empty = pd.DataFrame({"y": [], "x": [], "snr": [], "verdict": []})
        return Inspection(image, empty, 0.0, point, options)
    table, noise = candidates_bragg(filled, options, mask)
    return Inspection(image, table, float(noise), point, options)


def inspect(run, point: int, config: ProcessConfig | dict | None = None, *,
            background: Any = "config", data_key: str | None = None) -> Inspection:
    """The image of one grid point of a run with every candidate and its verdict.

    Parameters
    ----------
    run : crystalmapping.source.Run
        A run of a catalog (:func:`crystalmapping.open_run`).
    point : int
        Acquisition index of the point (negative counts from the end).
    config : ProcessConfig or dict, optional
        The processing options; its ``background`` and ``data_key`` are used
        unless given here.
    background : ndarray, str, int or None
        The background (an image, a ``.npy`` file, a point index, or None);
        by default the config's.
    data_key : str, optional
        The detector's data key; by default the config's.

    Returns
    -------
    Inspection

    Raises
    ------
    ConfigError
        If ``point`` or a background point index is not a point of the scan.
    """
    if config is None:
        config = ProcessConfig()
    elif not isinstance(config, ProcessConfig):
        config = ProcessConfig.from_dict(config)
    key = data_key or config.data_key
    sources = run.frame_sources(key)
    check_point_index(point, len(sources))
    point = int(point) % len(sources)
    spec = config.background if isinstance(background, str) and background == "config" \
        else background
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        check_point_index(spec, len(sources))
        subtrahend = mean_frame(sources[int(spec)])
    else:
        subtrahend = resolve_background(spec)
    image = preprocess_frames(read_frames(sources[point]), subtrahend, warn_empty=False)
    return inspect_image(image, config.locate, point=point)


def plot_inspection(result: Inspection, *, ax=None, zoom: tuple | None = None,
                    vmax_percentile: float = 99.9):
    """Draw the image with each candidate circled in the colour of its verdict.

    Parameters
    ----------
    result : Inspection
    ax : matplotlib Axes, optional
    zoom : (row0, row1, col0, col1), optional
        Show only this part of the detector.
    vmax_percentile : float
        The colour scale's top, as a percentile of the image (peaks saturate
        it, so the background stays visible).

    Returns
    -------
    fig : matplotlib Figure
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 8 * result.image.shape[0] / result.image.shape[1]))
    else:
        fig = ax.figure
    image = result.image
    vmax = float(np.percentile(image, vmax_percentile)) if image.size else 1.0
    ax.imshow(image, cmap="gray", vmin=0, vmax=max(vmax, 1e-12), origin="upper",
              interpolation="nearest")
    table = result.candidates
    radius = result.options.diameter / 2 + 2
    for verdict in reversed(VERDICTS):  # kept drawn last, on top
        rows = table[table["verdict"] == verdict]
        if not len(rows):
            continue
        y = rows["y"].to_numpy(dtype=float)
        x = rows["x"].to_numpy(dtype=float)
        if "row" in rows:  # a candidate proven weak without a position: its pixel
            y = np.where(np.isfinite(y), y, rows["row"].to_numpy(dtype=float))
            x = np.where(np.isfinite(x), x, rows["col"].to_numpy(dtype=float))
        colour, label = STYLE[verdict]
        ax.scatter(x, y, s=(2 * radius) ** 2, facecolors="none", edgecolors=colour,
                   linewidths=1.2, label=f"{label}: {len(rows)}")
        if verdict in ("kept", "elongated", "close") and "snr" in rows and len(rows) <= 60:
            for xi, yi, s in zip(x, y, rows["snr"].to_numpy(dtype=float)):
                ax.annotate(f"{s:.0f}", (xi, yi), xytext=(radius, -radius),
                            textcoords="offset points", color=colour, fontsize=7)
    if zoom is not None:
        r0, r1, c0, c1 = zoom
        ax.set_ylim(r1, r0)
        ax.set_xlim(c0, c1)
    where = f"point {result.point}: " if result.point is not None else ""
    ax.set_title(f"{where}{int((table['verdict'] == 'kept').sum())} peaks kept of "
                 f"{len(table)} candidates ({result.options.locator}, "
                 f"diameter {result.options.diameter}, min_snr {result.options.min_snr:g})")
    ax.set_xlabel("detector column (px)")
    ax.set_ylabel("detector row (px)")
    if len(table):
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    return fig
