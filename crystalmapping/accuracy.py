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
    intensity of its assigned maps, over the scored points (as for the IoU)
    where either is non-zero (at least ``min_points_r`` points, else NaN).
``n_maps``
    How many maps were assigned to it (1 is right; more means fragments).

The true support is the set of measured points where the peak's height is at
least ``min_height`` times the pixel noise of the preprocessed image. Points
where the peak is present but weaker (the faint rim of a grain) are left out
of every score: finding or missing a peak there is neither right nor wrong.
Only peaks whose brightest point reaches ``min_height`` are scored
(``scored``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["pixel_noise", "score_maps", "summarize"]


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


def _iou(a: np.ndarray, b: np.ndarray, care: np.ndarray) -> float:
    union = ((a | b) & care).sum()
    return float((a & b & care).sum() / union) if union else 1.0


def score_maps(maps: xr.Dataset, truth: xr.Dataset, noise, *, min_height: float = 5.0,
               match_distance: float = 5.0, min_points_r: int = 5) -> tuple[pd.DataFrame, dict]:
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
        ``union_iou``, ``intensity_r``, ``recovered_grain`` (the ``grain_id``
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
        where = care & (support | (summed > 0))
        if where.sum() >= min_points_r and summed[where].std() > 0 and amp[p][where].std() > 0:
            r = float(np.corrcoef(summed[where], amp[p][where])[0, 1])
        else:
            r = np.nan
        rows.append(dict(peak=p, grain=int(truth["grain"][p]), height=float(height.max()),
                         scored=bool(height.max() >= min_height and support.any()),
                         n_maps=len(mine), best_iou=best_iou, union_iou=union_iou,
                         intensity_r=r, recovered_grain=int(grain_id[best]) if best >= 0 else -1))
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


def summarize(per_peak: pd.DataFrame, summary: dict) -> dict:
    """One line of the accuracy table: the worst scored peak and the counts."""
    scored = per_peak[per_peak["scored"]]
    return dict(
        peaks_scored=f"{len(scored)}/{len(per_peak)}",
        min_best_iou=float(scored["best_iou"].min()) if len(scored) else np.nan,
        min_union_iou=float(scored["union_iou"].min()) if len(scored) else np.nan,
        min_intensity_r=float(scored["intensity_r"].min()) if len(scored) else np.nan,
        max_maps_per_peak=int(scored["n_maps"].max()) if len(scored) else 0,
        spurious_maps=summary["n_spurious"],
        maps=summary["n_maps"],
        grains=f"{summary['n_grains_found']}/{summary['n_grains_true']}",
        grains_ok=summary["grains_ok"],
    )
