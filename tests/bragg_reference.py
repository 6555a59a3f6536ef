"""The ``bragg`` locator as it was before it was compiled: the reference of its tests.

A verbatim copy of the pure-Python (numpy/scipy) implementation that
``crystalmapping.locate`` ran until the compiled kernels of
``crystalmapping.bragg`` replaced it. The tests hold the compiled locator to
these functions: the same peaks, columns, rejection counts and noise.
Nothing here is used by the package.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from crystalmapping.config import LocateOptions

#: MAD to standard deviation of a normal distribution.
_MAD_TO_STD = 1.4826


def bandpass(image: np.ndarray, *, noise_size: float = 1.0, smoothing_size: float | None = None,
             diameter: int = 15) -> np.ndarray:
    """Band-pass filter an image as ``trackpy.bandpass`` does, in float.

    A Gaussian of width ``noise_size`` removes pixel noise; a boxcar of side
    ``smoothing_size`` (default ``diameter``) estimates the slowly varying
    background, which is subtracted. Nothing is clipped or rescaled.

    Examples
    --------
    >>> bool(bandpass(np.ones((32, 32))).max() < 1e-6)
    True
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    size = int(round(smoothing_size if smoothing_size is not None else diameter))
    smooth = ndimage.gaussian_filter(image, noise_size, mode="nearest", truncate=4.0)
    background = ndimage.uniform_filter(image, size, mode="nearest")
    return smooth - background


def image_noise(filtered: np.ndarray) -> tuple[float, float]:
    """Robust level and standard deviation of a (band-passed) image's noise.

    The median and 1.4826 x the median absolute deviation over the image
    (subsampled by 2 along each axis): Bragg peaks cover a tiny fraction of a
    detector image, so they do not bias either.
    """
    sample = np.asarray(filtered)[::2, ::2]
    level = float(np.median(sample))
    sigma = _MAD_TO_STD * float(np.median(np.abs(sample - level)))
    if not sigma > 0:
        sigma = float(np.std(sample))
    return level, sigma


def _ridge_path(bright, weights, yy, xx, yc, xc, angle):
    """Fit the path of a ridge (a powder ring curves) near ``(yc, xc)``.

    Returns the coefficients ``c`` of ``across = c0 + c1 * along + c2 * along**2``
    in the frame of the ridge's direction ``angle`` centred on the candidate.
    """
    along = (xx - xc) * np.cos(angle) + (yy - yc) * np.sin(angle)
    across = (yy - yc) * np.cos(angle) - (xx - xc) * np.sin(angle)
    w = weights[bright]
    design = np.column_stack([np.ones(w.size), along[bright], along[bright] ** 2])
    coef, *_ = np.linalg.lstsq(design * w[:, None], across[bright] * w, rcond=None)
    return coef


def _ridge_background(values, near, coef, yy, xx, yc, xc, angle, radius):
    """Background of each pixel when a ridge with path ``coef`` runs by ``(yc, xc)``.

    A pixel's background is the median of the ``near`` surrounding pixels at
    the same whole-pixel distance across the ridge's path (a flat median
    where there are too few).
    """
    along = (xx - xc) * np.cos(angle) + (yy - yc) * np.sin(angle)
    across = (yy - yc) * np.cos(angle) - (xx - xc) * np.sin(angle)
    offset = np.rint(across - (coef[0] + coef[1] * along + coef[2] * along ** 2)).astype(np.int64)
    flat = float(np.median(values[near]))
    model = np.full(values.shape, flat)
    for d in range(-radius - 1, radius + 2):
        sel = near & (offset == d)
        if sel.sum() >= 4:
            model[offset == d] = float(np.median(values[sel]))
    return model


def _prominence(filtered, yc, xc, angle, coef, distance):
    """How far the candidate stands above the ridge ``distance`` away on either side.

    Compared at the same distance across the ridge as the candidate, with
    bilinear interpolation, so a ridge reads ~0 and a spot on it its own height.
    """
    from scipy.ndimage import map_coordinates

    s = np.array([-distance, distance], dtype=np.float64)
    across = coef[1] * s + coef[2] * s ** 2
    y = yc + s * np.sin(angle) + across * np.cos(angle)
    x = xc + s * np.cos(angle) - across * np.sin(angle)
    sides = map_coordinates(filtered, [y, x], order=1, mode="nearest")
    return float(filtered[yc, xc]) - float(sides.max())


def _orientation(weights, yy, xx):
    """Eccentricity (0 round, 1 a line) and major-axis angle of a weighted pixel set."""
    t = float(weights.sum())
    if t <= 0:
        return 0.0, 0.0
    ty, tx = (weights * yy).sum() / t, (weights * xx).sum() / t
    myy = float((weights * (yy - ty) ** 2).sum() / t)
    mxx = float((weights * (xx - tx) ** 2).sum() / t)
    mxy = float((weights * (yy - ty) * (xx - tx)).sum() / t)
    trace = myy + mxx
    ecc = float(np.sqrt((mxx - myy) ** 2 + 4 * mxy ** 2) / trace) if trace > 0 else 0.0
    return ecc, 0.5 * float(np.arctan2(2 * mxy, mxx - myy))


def _measure(filtered, image, yc, xc, radius, outer, global_noise, full=True):
    """Measure one candidate at pixel ``(yc, xc)``.

    The local background and noise are the median and the scaled median
    absolute deviation of the band-passed image in a square of half-side
    ``outer`` outside the peak's surroundings (the noise is never taken below
    the image's global noise). When a ridge (a powder ring) crosses that
    square, the background under the peak follows the ridge's profile
    instead, so the peak's ``mass`` and ``raw_mass`` do not count the ring.
    The centroid and ``size`` use the band-passed pixels of the disk of
    ``radius``; ``ecc`` uses the pixels above half the peak's height, so a
    ridge reads close to 1 and a round spot close to 0 even when weak.

    Returns ``(y, x, mass, size, ecc, signal, raw_mass, amplitude, snr, ridge_snr)``
    where ``ridge_snr`` is the height above the ridge over the noise. With
    ``full=False`` only the centroid, ``signal`` and ``snr`` are measured (the
    rest is NaN): enough to recentre a candidate or reject it as weak.
    """
    M, N = filtered.shape
    y0, y1 = max(yc - outer, 0), min(yc + outer + 1, M)
    x0, x1 = max(xc - outer, 0), min(xc + outer + 1, N)
    f = filtered[y0:y1, x0:x1]
    im = image[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    r2 = (yy - yc) ** 2 + (xx - xc) ** 2
    disk = r2 <= radius * radius
    ring = r2 > (2 * radius + 1) ** 2
    enough = ring.sum() >= 16
    if enough:
        background = float(np.median(f[ring]))
        noise = _MAD_TO_STD * float(np.median(np.abs(f[ring] - background)))
    else:
        background, noise = 0.0, 0.0
    noise = max(noise, global_noise)
    height = float(filtered[yc, xc]) - background
    snr = height / noise if noise > 0 else np.inf
    # A ridge through the surroundings: enough of them well above the noise.
    bg_f = np.full(f.shape, background)
    # Only the nearest surroundings: a powder ring curves away farther out.
    near = ring & (r2 <= (3 * radius + 1) ** 2)
    bright = near & (f - background > 3 * noise)
    ridge = None
    if enough and bright.sum() >= radius:
        ridge_ecc, angle = _orientation(np.where(bright, f - background, 0.0), yy, xx)
        if ridge_ecc > 0.5:
            coef = _ridge_path(bright, np.clip(f - background, 0, None), yy, xx, yc, xc, angle)
            bg_f = _ridge_background(f, near, coef, yy, xx, yc, xc, angle, radius)
            ridge = (angle, coef)
    above = np.where(disk, f - bg_f, 0.0)
    wc = np.clip(above, 0, None)
    total = float(wc.sum())
    if total > 0:
        cy, cx = float((wc * yy).sum() / total), float((wc * xx).sum() / total)
    else:
        cy, cx = float(yc), float(xc)
    if not full:
        nan = np.nan
        return cy, cx, nan, nan, nan, height, nan, nan, snr, nan
    size = (float(np.sqrt((wc * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / total / 2))
            if total > 0 else 0.0)
    w = np.where(disk, f - background, 0.0)
    ecc, _ = _orientation(np.clip(w - 0.5 * height, 0, None), yy, xx)
    if ridge is None:
        bg_im = np.full(im.shape, float(np.median(im[ring])) if enough else 0.0)
    else:
        bg_im = _ridge_background(im, near, ridge[1], yy, xx, yc, xc, ridge[0], radius)
    mass = float(above[disk].sum())
    raw_mass = float((im - bg_im)[disk].sum())
    # Matched filter: the height of a Gaussian spot of width diameter / 6 fitted to
    # the image above its background; the least noisy intensity of a faint peak.
    width = (2 * radius + 1) / 6.0
    g = np.where(disk, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width * width)), 0.0)
    amplitude = float((g * (im - bg_im)).sum() / max(float((g * g).sum()), 1e-300))
    if ridge is None or noise <= 0:
        ridge_snr = snr
    else:
        # The ridge is noisier than the flat background (more counts, more noise).
        resid = (f - bg_f)[bright]
        ridge_noise = _MAD_TO_STD * float(np.median(np.abs(resid - np.median(resid))))
        ridge_snr = (_prominence(filtered, yc, xc, ridge[0], ridge[1], radius)
                     / max(noise, ridge_noise))
    return cy, cx, mass, size, ecc, height, raw_mass, amplitude, snr, ridge_snr


def _apart(points: np.ndarray, distance: float, *, euclidean: bool = False,
           index: bool = False) -> np.ndarray:
    """Greedily keep the points (in the given order) farther than ``distance`` from the kept."""
    keep: list[int] = []
    for i, p in enumerate(points):
        if keep:
            d = points[keep] - p
            near = (np.hypot(d[:, 0], d[:, 1]) < distance if euclidean
                    else np.abs(d).max(axis=1) <= distance)
            if near.any():
                continue
        keep.append(i)
    return np.asarray(keep, dtype=np.int64) if index else points[keep]


def _filtered(image: np.ndarray, options: LocateOptions, *, preprocess: bool | None = None):
    """The image to find peaks on, its noise level and spread, and the least noise to divide by."""
    if options.preprocess if preprocess is None else preprocess:
        filtered = bandpass(image, noise_size=options.noise_size,
                            smoothing_size=options.smoothing_size, diameter=options.diameter)
    else:
        filtered = image
    level, sigma = image_noise(filtered)
    return filtered, level, sigma, max(sigma, 1e-6 * float(np.abs(filtered).max()), 1e-300)


def _windows(diameter: int) -> tuple[int, int]:
    """Radius of a peak's disk, and half-side of the square its surroundings are read from."""
    radius = diameter // 2
    return radius, max(3 * diameter, 2 * radius + 4)


def _locate_bragg(image: np.ndarray, options: LocateOptions) -> tuple[pd.DataFrame, dict]:
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    if options.invert:
        image = image.max() - image
    filtered, level, sigma, floor_noise = _filtered(image, options)
    # Candidates: maxima within a peak's diameter, above half the detection threshold
    # of the image's noise. Separation is applied later, among the peaks that pass the
    # rules, so a bright powder ring or a noise spike cannot hide a Bragg peak beside it.
    half = max(options.diameter // 2, 1)
    peak_max = ndimage.maximum_filter(filtered, size=2 * half + 1, mode="constant", cval=-np.inf)
    min_snr = options.min_snr
    floor = level + 0.5 * min_snr * floor_noise
    cand = np.argwhere((filtered == peak_max) & (filtered > floor))
    if len(cand):
        order = np.argsort(-filtered[cand[:, 0], cand[:, 1]], kind="stable")
        cand = _apart(cand[order], half)  # plateaus give several equal maxima
    radius, outer = _windows(options.diameter)
    rows = []
    for yc, xc in cand:
        yc, xc = int(yc), int(xc)
        m = _measure(filtered, image, yc, xc, radius, outer, floor_noise, full=False)
        # Recentre while the centroid is more than half a pixel off the window centre.
        for _ in range(options.max_iterations):
            ny, nx = int(round(m[0])), int(round(m[1]))
            if (ny, nx) == (yc, xc) or not (0 <= ny < image.shape[0] and 0 <= nx < image.shape[1]):
                break
            yc, xc = ny, nx
            m = _measure(filtered, image, yc, xc, radius, outer, floor_noise, full=False)
        # The rest of the measurement only for a candidate that is not rejected as weak.
        rows.append(m if m[8] < min_snr else
                    _measure(filtered, image, yc, xc, radius, outer, floor_noise))
    cols = ["y", "x", "mass", "size", "ecc", "signal", "raw_mass", "amplitude", "snr", "ridge_snr"]
    table = pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    weak = table["snr"] < min_snr
    # An elongated candidate is a segment of a ridge (a powder ring, a streak)
    # unless it also stands min_snr above the ridge it sits on (a Bragg peak on a ring).
    if options.max_ecc is not None:
        elongated = ~weak & (table["ecc"] > options.max_ecc) & (table["ridge_snr"] < min_snr)
    else:
        elongated = weak & False
    table = table.drop(columns="ridge_snr")
    table = table[~weak & ~elongated]
    sep = options.separation if options.separation is not None else options.diameter + 1
    if len(table) > 1:
        by_signal = table.sort_values("signal", ascending=False, kind="stable")
        kept = _apart(by_signal[["y", "x"]].to_numpy(), sep, euclidean=True, index=True)
        close = len(table) - len(kept)
        table = by_signal.iloc[kept]
    else:
        close = 0
    counts = {"noise": sigma, "n_rejected_weak": int(weak.sum()),
              "n_rejected_elongated": int(elongated.sum()), "n_rejected_close": int(close)}
    if options.minmass is not None:
        table = table[table["mass"] >= options.minmass]
    if options.maxsize is not None:
        table = table[table["size"] <= options.maxsize]
    if options.topn is not None:
        table = table.nlargest(options.topn, "mass")
    table = table.sort_values(["y", "x"]).reset_index(drop=True)
    table["ep"] = np.nan
    if not options.characterize:
        table[["size", "ecc", "signal", "raw_mass"]] = np.nan
    return table, counts


def locate_bragg(image: np.ndarray, options: LocateOptions) -> tuple[pd.DataFrame, dict]:
    """The reference ``bragg`` locator with the all-zero rule of ``locate._locate``."""
    if not np.asarray(image).any():
        cols = ["y", "x", "mass", "size", "ecc", "signal", "raw_mass", "amplitude", "snr", "ep"]
        return (pd.DataFrame({c: pd.Series(dtype="float64") for c in cols}),
                {"noise": 0.0, "n_rejected_weak": 0, "n_rejected_elongated": 0,
                 "n_rejected_close": 0})
    return _locate_bragg(image, options)


def trackpy_measure(image: np.ndarray, table: pd.DataFrame,
                    options: LocateOptions) -> tuple[np.ndarray, np.ndarray, float]:
    """``amplitude``, ``snr`` and noise of trackpy's peaks, as the trackpy locator measured them."""
    image = np.asarray(image, dtype=np.float64)
    filtered, _, sigma, floor_noise = _filtered(image, options, preprocess=True)
    radius, outer = _windows(options.diameter)
    M, N = image.shape
    measured = [
        _measure(filtered, image, min(max(int(round(y)), 0), M - 1),
                 min(max(int(round(x)), 0), N - 1), radius, outer, floor_noise)
        for y, x in zip(table.get("y", []), table.get("x", []))
    ]
    return (np.asarray([m[7] for m in measured], dtype=np.float64),
            np.asarray([m[8] for m in measured], dtype=np.float64), sigma)
