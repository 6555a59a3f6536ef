"""Accuracy: score crystal maps against the ground truth of a simulated scan.

Used by ``benchmarks/accuracy.py`` (the report in ``docs/accuracy.md``) and by
the tests. Each recovered map is assigned to the true Bragg peak nearest to
its mean detector position (within ``match_distance`` pixels); a map near no
true peak is *spurious*. For each true peak:

``best_iou``
    Intersection over union of the support (non-zero points) of the single
    best assigned map and the peak's true support.
``union_iou``
    The same for the union of all maps assigned to the peak.
``intensity_r``
    Pearson correlation between the true peak height and the summed
    intensity of its assigned maps, over every point where the maps hold a
    value and every point of the true support (a miss there counts as 0);
    at least ``min_points_r`` points, else NaN.
``ideal_r``
    The same correlation for an ideal measurement of the same points: the
    matched filter with the true spot shape at the true detector position, on
    the same preprocessed frames (:func:`ideal_amplitudes`). A locator, which
    must also find the spot's position and estimate its background, does not
    measure a faint peak's height with less scatter, so ``ideal_r`` is about
    the highest ``intensity_r`` those frames allow.
``n_maps``
    How many maps were assigned to it (1 is right; more means fragments).

The true support is the set of measured points where the peak's height is at
least ``min_height`` times the pixel noise of the preprocessed image. Points
where the peak is present but weaker (the faint rim of a grain) are left out
of the IoU: finding or missing a peak there is neither right nor wrong. But
a value the maps do report at such a point is scored by ``intensity_r``.
Only peaks whose brightest point reaches ``min_height`` are scored
(``scored``).

The intensity bar (:func:`intensity_ok`) is ``intensity_r >= 0.98``, except
where the ideal measurement itself falls short of it: a few points whose true
heights span a narrow range, a few times the noise, cannot correlate better
than their Poisson noise allows. There ``intensity_r`` must come within 0.01
of ``ideal_r``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["grains_of_true_maps", "ideal_amplitudes", "intensity_ok", "pixel_noise", "score_maps",
           "summarize"]


def pixel_noise(scan, background_frames: int | None = None) -> np.ndarray:
    """Standard deviation of the preprocessed image's noise at each true peak.

    The preprocessed image is the mean of ``K`` Poisson frames minus the mean
    of the background point's ``K`` frames, so its variance at a pixel of
    expected count ``lam`` is ``lam / K + lam / K``.

    Parameters
    ----------
    scan : crystalmapping.sim.SimulatedScan
    background_frames : int, optional
        Frames averaged into the background (default: the scan's frames per point).

    Returns
    -------
    noise : (n_peaks,) ndarray
    """
    background = scan.expected_background()
    k = scan.frames_per_point
    kb = background_frames or k
    y = np.clip(np.round(scan.truth["y"].to_numpy()).astype(int), 0, background.shape[0] - 1)
    x = np.clip(np.round(scan.truth["x"].to_numpy()).astype(int), 0, background.shape[1] - 1)
    lam = background[y, x]
    return np.sqrt(lam / k + lam / kb)


def ideal_amplitudes(scan, points=None, *, half_width: int | None = None) -> np.ndarray:
    """Height of each true peak at each point, measured as well as the noise allows.

    The preprocessed image of a point (the mean of its frames minus the mean
    frame of the background point, as the pipeline makes it, but without
    clipping negative pixels at zero, which would bias a faint height) is projected on
    the true spot, a Gaussian of ``scan.spot_sigma`` at the true detector
    position. Where the noise is about the same across the spot (the
    background dominates, as for faint peaks), this matched filter is the
    least-variance unbiased linear estimate of the height, knowing what a
    locator must find: the reference a locator's heights are held to.

    Parameters
    ----------
    scan : crystalmapping.sim.SimulatedScan
    points : (rows, cols) bool array, optional
        Grid points to measure (default: every measured point).
    half_width : int, optional
        Half-size of the window around each peak (default ``5 * spot_sigma``).

    Returns
    -------
    heights : (n_peaks, rows, cols) ndarray
        NaN at the points not measured.
    """
    truth = scan.truth
    n_peaks, n_rows, n_cols = truth["amplitude"].shape
    out = np.full((n_peaks, n_rows, n_cols), np.nan)
    rows, cols = scan.grid.indices(np.arange(scan.n_points))
    wanted = np.ones((n_rows, n_cols), bool) if points is None else np.asarray(points, bool)
    s = float(scan.spot_sigma)
    h = int(np.ceil(5 * s)) if half_width is None else int(half_width)
    M, N = scan.detector_shape
    windows = []
    for y, x in zip(truth["y"].to_numpy(), truth["x"].to_numpy()):
        iy, ix = int(round(y)), int(round(x))
        sl = (slice(max(iy - h, 0), min(iy + h + 1, M)), slice(max(ix - h, 0), min(ix + h + 1, N)))
        yy, xx = np.mgrid[sl]
        g = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
        windows.append((sl, g / (g * g).sum()))
    background = scan.frames(int(truth.attrs["background_point"])).astype(np.float64).mean(axis=0)
    for i, (r, c) in enumerate(zip(rows, cols)):
        if not wanted[r, c]:
            continue
        image = scan.frames(i).astype(np.float64).mean(axis=0) - background
        for p, (sl, weights) in enumerate(windows):
            out[p, r, c] = float((image[sl] * weights).sum())
    return out


def grains_of_true_maps(scan, floor: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """``grain_id`` of the scan's true maps cut at a detection floor, beside the true grains.

    Tests :func:`crystalmapping.maps.group_grains` alone, free of noise: each
    true peak's map of heights, zero below ``floor`` counts.

    Returns
    -------
    found, true : (n_peaks,) ndarray of int64
        Both numbered from 0 in order of the peaks.
    """
    from .link import first_appearance
    from .maps import group_grains

    amp = scan.truth["amplitude"].to_numpy()
    found = group_grains(np.where(amp >= floor, amp, 0.0))
    return found, first_appearance(scan.truth["grain"].to_numpy())


def _iou(a: np.ndarray, b: np.ndarray, care: np.ndarray) -> float:
    union = ((a | b) & care).sum()
    return float((a & b & care).sum() / union) if union else 1.0


def _r(a: np.ndarray, b: np.ndarray, min_points: int) -> float:
    if a.size < min_points or a.std() == 0 or b.std() == 0:
        return np.nan
    return float(np.corrcoef(a, b)[0, 1])


def score_maps(maps: xr.Dataset, truth: xr.Dataset, noise, *, ideal: np.ndarray | None = None,
               min_height: float = 5.0, match_distance: float = 5.0,
               min_points_r: int = 5) -> tuple[pd.DataFrame, dict]:
    """Score recovered maps against the truth of a simulated scan.

    Parameters
    ----------
    maps : xarray.Dataset
        The maps of :func:`crystalmapping.process_run` or
        :func:`crystalmapping.maps.reduce_scan`.
    truth : xarray.Dataset
        ``SimulatedScan.truth``.
    noise : float or (n_peaks,) array
        Pixel noise of the preprocessed image at each true peak (:func:`pixel_noise`).
    ideal : (n_peaks, rows, cols) array, optional
        :func:`ideal_amplitudes` of the same scan, for the ``ideal_r`` column
        (NaN without it).
    min_height : float
        Heights (in units of ``noise``) that count as the peak's support.
    match_distance : float
        Largest detector distance (pixels) between a map and its true peak.
    min_points_r : int
        Fewest points over which ``intensity_r`` is computed (NaN below).

    Returns
    -------
    per_peak : DataFrame
        One row per true peak: ``peak``, ``grain``, ``height`` (brightest
        point over the noise), ``scored``, ``n_maps``, ``best_iou``,
        ``union_iou``, ``intensity_r``, ``ideal_r``, ``n_points_r`` (the
        points ``intensity_r`` is computed over), ``recovered_grain`` (the ``grain_id``
        of its best map, -1 if none).
    summary : dict
        ``n_maps``, ``n_spurious`` (maps near no true peak), ``n_true``,
        ``n_grains_found`` (distinct ``grain_id`` of the matched maps) and
        ``grains_ok`` (two true peaks share a recovered grain exactly when
        they come from the same grain, over the peaks that were found).
    """
    amp = truth["amplitude"].to_numpy()
    n_true = amp.shape[0]
    noise = np.broadcast_to(np.asarray(noise, dtype=np.float64), (n_true,))
    measured = maps["measured"].to_numpy()
    intensity = maps["intensity"].to_numpy()
    my, mx = maps["y"].to_numpy(), maps["x"].to_numpy()
    grain_id = (maps["grain_id"].to_numpy() if "grain_id" in maps
                else np.arange(len(my), dtype=np.int64))
    ty, tx = truth["y"].to_numpy(), truth["x"].to_numpy()
    if len(my):
        d = np.hypot(my[:, None] - ty[None, :], mx[:, None] - tx[None, :])
        nearest = d.argmin(axis=1)
        matched = d[np.arange(len(my)), nearest] <= match_distance
    else:
        nearest = np.zeros(0, dtype=int)
        matched = np.zeros(0, dtype=bool)
    rows = []
    for p in range(n_true):
        height = amp[p] / noise[p]
        support = (height >= min_height) & measured
        care = measured & ((height >= min_height) | (amp[p] <= 0))
        mine = np.flatnonzero(matched & (nearest == p))
        best_iou, best = 0.0, -1
        for g in mine:
            iou = _iou(intensity[g] > 0, support, care)
            if iou > best_iou or best < 0:
                best_iou, best = iou, g
        summed = intensity[mine].sum(axis=0) if len(mine) else np.zeros(amp[p].shape)
        union_iou = _iou(summed > 0, support, care)
        where = support | (measured & (summed > 0))
        r = _r(summed[where], amp[p][where], min_points_r)
        r_ideal = np.nan if ideal is None else _r(ideal[p][where], amp[p][where], min_points_r)
        rows.append(dict(peak=p, grain=int(truth["grain"][p]), height=float(height.max()),
                         scored=bool(height.max() >= min_height and support.any()),
                         n_maps=len(mine), best_iou=best_iou, union_iou=union_iou,
                         intensity_r=r, ideal_r=r_ideal, n_points_r=int(where.sum()),
                         recovered_grain=int(grain_id[best]) if best >= 0 else -1))
    per_peak = pd.DataFrame(rows)
    found = per_peak[per_peak["recovered_grain"] >= 0]
    same_true = found["grain"].to_numpy()[:, None] == found["grain"].to_numpy()[None, :]
    same_found = (found["recovered_grain"].to_numpy()[:, None]
                  == found["recovered_grain"].to_numpy()[None, :])
    summary = dict(
        n_true=n_true, n_maps=int(len(my)), n_spurious=int((~matched).sum()),
        n_grains_true=int(truth["grain"].to_series().nunique()),
        n_grains_found=int(len(np.unique(grain_id[matched]))) if matched.any() else 0,
        grains_ok=bool((same_true == same_found).all()),
    )
    return per_peak, summary


def intensity_ok(per_peak: pd.DataFrame, min_r: float = 0.98, tolerance: float = 0.01) -> pd.Series:
    """Whether each peak's intensities pass the bar.

    ``intensity_r >= min_r``; where the ideal measurement of the same points
    reaches less than ``min_r`` (``ideal_r``), ``intensity_r`` within
    ``tolerance`` of it. NaN correlations (too few points) pass.
    """
    r, ideal = per_peak["intensity_r"], per_peak["ideal_r"]
    bar = np.where(ideal < min_r, ideal - tolerance, min_r)
    return (r >= bar) | r.isna()


def summarize(per_peak: pd.DataFrame, summary: dict) -> dict:
    """One line of the accuracy table: the worst scored peak and the counts.

    ``min_intensity_r`` is the lowest ``intensity_r`` and ``its_ideal_r`` the
    ``ideal_r`` of that same peak; ``intensity_ok`` applies :func:`intensity_ok`
    to every scored peak.
    """
    scored = per_peak[per_peak["scored"]]
    rs = scored["intensity_r"].dropna()
    worst = scored.loc[rs.idxmin()] if len(rs) else None
    return dict(
        peaks_scored=f"{len(scored)}/{len(per_peak)}",
        min_best_iou=float(scored["best_iou"].min()) if len(scored) else np.nan,
        min_union_iou=float(scored["union_iou"].min()) if len(scored) else np.nan,
        min_intensity_r=float(worst["intensity_r"]) if worst is not None else np.nan,
        its_ideal_r=float(worst["ideal_r"]) if worst is not None else np.nan,
        intensity_ok=bool(intensity_ok(scored).all()),
        max_maps_per_peak=int(scored["n_maps"].max()) if len(scored) else 0,
        spurious_maps=summary["n_spurious"],
        maps=summary["n_maps"],
        grains=f"{summary['n_grains_found']}/{summary['n_grains_true']}",
        grains_ok=summary["grains_ok"],
    )
