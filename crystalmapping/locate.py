"""Locate: the Bragg peaks of one preprocessed image, as a table.

:func:`locate_peaks` is the kernel. Two locators share its output columns:

``"bragg"`` (the default)
    Band-pass the float image, take its local maxima, and keep a peak by
    physical rules: its height over the *local* noise of the image
    (``snr >= min_snr``) and its shape: a candidate more elongated than
    ``max_ecc`` (a segment of a powder ring is, a Bragg spot is round) is
    kept only if it also stands ``min_snr`` above the ridge it lies on (a
    Bragg spot on a powder ring). Every candidate it rejects
    is counted per image (``n_rejected_weak``, ``n_rejected_elongated``,
    ``n_rejected_close``), so
    nothing vanishes silently. It works on the float image throughout, so a
    weak peak is found next to a bright one or a hot pixel.
``"trackpy"``
    ``trackpy.locate``, exactly as the tutorial runs it. trackpy rescales the
    band-passed float image to 8 bits relative to its brightest pixel before
    looking for maxima, so a peak weaker than 1/255 of the brightest pixel
    of its image is not found. Its peaks get an ``snr`` too, but none is
    rejected.

:func:`locate_block` runs the kernel on every image of a chunk and adds the
point's acquisition index (``frame``); :func:`locate_images` makes one
``dask.delayed`` task per chunk of a lazy image stack.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pandas as pd

from .config import LocateOptions

__all__ = ["PEAK_COLUMNS", "POINT_COLUMNS", "locate_peaks", "locate_block", "locate_images",
           "bandpass", "image_noise"]

logger = logging.getLogger(__name__)

#: Columns of a peak table, in order (trackpy's, the fitted amplitude, the
#: signal-to-noise ratio, the point index).
PEAK_COLUMNS = ["y", "x", "mass", "size", "ecc", "signal", "raw_mass", "ep", "amplitude", "snr",
                "frame"]
#: Columns of the per-point summary that travels with the peaks.
POINT_COLUMNS = ["frame", "n_peaks", "image_max", "image_sum", "noise",
                 "n_rejected_weak", "n_rejected_elongated", "n_rejected_close"]

#: MAD to standard deviation of a normal distribution.
_MAD_TO_STD = 1.4826


def _quiet_trackpy():
    import trackpy

    trackpy.quiet()
    return trackpy


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


def _trackpy_options(options: LocateOptions) -> dict:
    kw = options.to_dict()
    for name in ("locator", "min_snr", "max_ecc"):
        kw.pop(name, None)
    return kw


#: trackpy's numba kernels compile on their first call in a process; two threads
#: compiling the same kernel at once fail with a KeyError inside numba. The
#: first call per image type and options runs alone.
_TRACKPY_COMPILE = threading.Lock()
_trackpy_compiled: set = set()


def _trackpy_locate(trackpy, image: np.ndarray, kw: dict) -> pd.DataFrame:
    key = (np.asarray(image).dtype.str, np.ndim(image), repr(sorted(kw.items())))
    if key in _trackpy_compiled:
        return trackpy.locate(image, **kw)
    with _TRACKPY_COMPILE:
        table = trackpy.locate(image, **kw)
        _trackpy_compiled.add(key)
    return table


def _locate_trackpy(image: np.ndarray, options: LocateOptions) -> tuple[pd.DataFrame, dict]:
    trackpy = _quiet_trackpy()
    table = _trackpy_locate(trackpy, image, _trackpy_options(options)).reset_index(drop=True)
    # amplitude and snr, measured as the "bragg" locator does; nothing is rejected.
    image = np.asarray(image, dtype=np.float64)
    filtered, _, sigma, floor_noise = _filtered(image, options, preprocess=True)
    radius, outer = _windows(options.diameter)
    M, N = image.shape
    measured = [
        _measure(filtered, image, min(max(int(round(y)), 0), M - 1),
                 min(max(int(round(x)), 0), N - 1), radius, outer, floor_noise)
        for y, x in zip(table.get("y", []), table.get("x", []))
    ]
    table["amplitude"] = np.asarray([m[7] for m in measured], dtype=np.float64)
    table["snr"] = np.asarray([m[8] for m in measured], dtype=np.float64)
    return table, {"noise": sigma, "n_rejected_weak": 0, "n_rejected_elongated": 0,
                   "n_rejected_close": 0}


def _locate(image: np.ndarray, options: LocateOptions) -> tuple[pd.DataFrame, dict]:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (M, N), got shape {image.shape}.")
    if not image.any():
        table, counts = _empty_peaks(), {"noise": 0.0, "n_rejected_weak": 0,
                                         "n_rejected_elongated": 0, "n_rejected_close": 0}
    elif options.locator == "trackpy":
        table, counts = _locate_trackpy(image, options)
    else:
        table, counts = _locate_bragg(image, options)
    for column in PEAK_COLUMNS:
        if column not in table:
            table[column] = np.nan
    return table, counts


def locate_peaks(image: np.ndarray, *, diameter: int, frame: int | None = None,
                 **locate_keywords) -> pd.DataFrame:
    """Find the Bragg peaks of one image.

    Parameters
    ----------
    image : (M, N) ndarray
        A preprocessed (non-negative) image.
    diameter : int
        Odd feature size in pixels (trackpy's ``diameter``).
    frame : int, optional
        Acquisition index of the point, written into the ``frame`` column.
    **locate_keywords
        Other keywords of :class:`~crystalmapping.config.LocateOptions`:
        ``locator`` (``"bragg"`` or ``"trackpy"``), ``min_snr``, ``max_ecc``,
        ``separation``, ``minmass``, ``percentile`` (trackpy only)... validated
        there. trackpy ignores maxima closer to the image edge than
        ``separation / 2`` (50 px with the tutorial's ``separation=100``); the
        ``"bragg"`` locator does not.

    Returns
    -------
    peaks : DataFrame
        One row per peak with the columns :data:`PEAK_COLUMNS`: ``y``, ``x``
        (sub-pixel row and column, origin at the centre of pixel (0, 0)),
        ``mass`` (integrated band-passed intensity), ``size`` (radius of
        gyration), ``ecc`` (0 round, 1 a line), ``signal`` (band-passed height
        above the local background), ``raw_mass`` (integrated image minus its
        local background), ``ep`` (trackpy only), ``amplitude`` (height in
        counts of a Gaussian spot of width ``w = diameter / 6`` fitted to the
        image above its local background: the least noisy intensity of a
        faint peak; for a spot of Gaussian width ``s`` it reads
        ``2 s**2 / (s**2 + w**2)`` of the true height, a constant factor
        per peak), ``snr`` (``signal`` over the local noise of the
        band-passed image) and ``frame``. An all-zero image
        gives an empty table.

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = 100 * np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 8.0)
    >>> peaks = locate_peaks(image, diameter=7, separation=10, frame=3)
    >>> peaks[["y", "x", "frame"]].round(1).values.tolist()
    [[20.0, 40.0, 3.0]]
    """
    options = LocateOptions(diameter=diameter, **locate_keywords)
    table, _ = _locate(image, options)
    return _finish(table, frame)


def _finish(table: pd.DataFrame, frame: int | None) -> pd.DataFrame:
    table = table.copy()
    table["frame"] = -1 if frame is None else int(frame)
    table = table[PEAK_COLUMNS].astype({c: "float64" for c in PEAK_COLUMNS if c != "frame"})
    return table.astype({"frame": "int64"})


def _empty_peaks() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in PEAK_COLUMNS})


def locate_block(images: np.ndarray, first_frame: int, options: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Locate peaks on each image of a chunk.

    Parameters
    ----------
    images : (P, M, N) ndarray
        Preprocessed images of ``P`` consecutive points.
    first_frame : int
        Acquisition index of the first of them.
    options : dict
        Keywords of :func:`locate_peaks`.

    Returns
    -------
    peaks : DataFrame
        The peak tables of the ``P`` images, concatenated.
    points : DataFrame
        One row per image with :data:`POINT_COLUMNS`: ``n_peaks``,
        ``image_max``, ``image_sum`` (so all-zero images and empty points are
        counted, not lost), ``noise`` (standard deviation of the band-passed
        image's noise) and the candidates the locator rejected,
        ``n_rejected_weak`` (``snr < min_snr``), ``n_rejected_elongated``
        (``ecc > max_ecc``) and ``n_rejected_close`` (closer than
        ``separation`` to a brighter peak).
    """
    opts = options if isinstance(options, LocateOptions) else LocateOptions(**options)
    tables, points = [], []
    for i, image in enumerate(images):
        frame = first_frame + i
        table, counts = _locate(image, opts)
        tables.append(_finish(table, frame))
        points.append((frame, len(table), float(image.max(initial=0)),
                       float(image.sum(dtype=np.float64)), counts["noise"],
                       counts["n_rejected_weak"], counts["n_rejected_elongated"],
                       counts["n_rejected_close"]))
    peaks = pd.concat(tables, ignore_index=True) if tables else _finish(_empty_peaks(), None)
    return peaks, pd.DataFrame(points, columns=POINT_COLUMNS)


def locate_images(images, options: LocateOptions | dict | None = None) -> list:
    """One ``dask.delayed`` locate task per chunk of a lazy image stack.

    Parameters
    ----------
    images : (P, M, N) dask array or xarray.DataArray
        Preprocessed images, chunked along the first axis only.
    options : LocateOptions or dict

    Returns
    -------
    tasks : list of Delayed
        Each computes to ``(peaks, points)`` as :func:`locate_block` returns.
    """
    import dask
    import dask.array as da

    if options is None:
        options = LocateOptions()
    elif not isinstance(options, LocateOptions):
        options = LocateOptions.from_dict(options)
    data = getattr(images, "data", images)
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"images must be a (point, y, x) stack, got shape {data.shape}.")
    if len(data.chunks[1]) != 1 or len(data.chunks[2]) != 1:
        data = data.rechunk({1: -1, 2: -1})
    kw = options.to_dict()
    starts = np.cumsum((0,) + data.chunks[0][:-1])
    blocks = data.to_delayed().ravel()
    return [
        dask.delayed(locate_block, pure=True, name=f"locate-{data.name}-{i}")(block, int(start), kw)
        for i, (block, start) in enumerate(zip(blocks, starts))
    ]
