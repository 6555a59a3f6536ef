"""The ``bragg`` locator, compiled: the peaks of one image by physical rules.

Band-pass the float image, take its local maxima above half the detection
threshold, recentre each on its centroid, and keep a peak by its height over
the local noise (``snr >= min_snr``) and its shape (a candidate more
elongated than ``max_ecc`` is kept only if it stands ``min_snr`` above the
ridge it lies on). See :mod:`crystalmapping.locate` for the rules and the
columns.

Every full-frame pass runs once, in numba kernels that release the GIL
(:mod:`crystalmapping._bragg_filters`, :mod:`crystalmapping._bragg_noise`),
and each candidate is measured from the square around it
(:mod:`crystalmapping._bragg_measure`). The results are those of the
original numpy/scipy implementation: a float32 image (what preprocessing
gives) is band-passed in float32 (:mod:`crystalmapping._bragg_bandpass32`),
within about 1e-7 of its values of scipy's float64 band-pass, and any other
image in float64, scipy's bit for bit. From there medians are exact order
statistics and sums are numpy's pairwise sums in numpy's order; only the
ridge fit (a 3-parameter least squares, solved by QR and SVD rather than
LAPACK), the bilinear interpolation across a ridge and ``exp`` may differ
from numpy in the last bits. The tests hold the table to the original's:
positions within 0.01 px, the other columns within 1e-4 relative, the same
rejection counts. The kernels compile on their first use on a machine
(about a minute; see the project notes) and are cached on disk; a new
process loads them in about a second.

Each thread keeps the full-frame arrays of its last image shape (the
band-passed image, its noise sample: about 70 MB for a float32 Dexela frame)
and reuses them for the next frame of that shape.

Images are ``(M, N)`` arrays indexed ``[row, column]``; pixel ``(0, 0)`` is
centred at ``y = x = 0``.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd

from . import _bragg_bandpass32 as _bandpass32
from . import _bragg_filters as _filters
from . import _bragg_noise
from ._bragg_measure import COLUMNS, MAD_TO_STD, measure
from ._bragg_rules import _COL, TABLE_COLUMNS, VERDICTS  # noqa: F401 (re-exported)
from ._bragg_rules import rules as _rules
from ._bragg_rules import verdicts as _verdicts
from .config import LocateOptions
from .mask import near_mask, touching

__all__ = ["bandpass", "image_noise", "locate_bragg", "measure_at"]

#: numba compiles a kernel on its first call with new argument types (or loads it from
#: its disk cache); two threads doing so at once can fail inside numba. The first
#: call per key runs alone.
_COMPILE = threading.Lock()
_compiled: set = set()


def _once(key, fn, *args):
    """``fn(*args)``, under the compile lock the first time ``key`` is seen."""
    if key in _compiled:
        return fn(*args)
    with _COMPILE:
        result = fn(*args)
        _compiled.add(key)
    return result


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's weights of a Gaussian filter of width ``sigma`` (``[1.0]`` when scipy skips it)."""
    if not sigma > 1e-15:
        return np.ones(1)
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return (phi / phi.sum())[::-1].copy()


def _kernel_image(image: np.ndarray) -> np.ndarray:
    """The image as float32 (when exact) or float64, C-contiguous: the kernels' two types."""
    image = np.asarray(image)
    if image.dtype == np.float32 or image.dtype == np.float64:
        return np.ascontiguousarray(image)
    if image.dtype.kind in "biu" and image.dtype.itemsize <= 2:
        return image.astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float64)


def _size(smoothing_size: float | None, diameter: int) -> int:
    """Side of the boxcar: ``smoothing_size`` (default ``diameter``), rounded as trackpy does."""
    return int(round(smoothing_size if smoothing_size is not None else diameter))


#: Per thread, the full-frame arrays of the last image shape, reused by the next frame:
#: a new 95 MB array costs its page faults on every frame.
_local = threading.local()


def _workspace(shape: tuple[int, int]):
    """``(buffers, tiles, hist, work)`` for an image of ``shape``, reused per thread.

    ``buffers``: see :func:`_buffer`. ``tiles[0]`` and ``tiles[1]``: the
    maximum and the minimum of the band-passed image over each tile of
    ``ROWS x TILE`` pixels. ``hist``: the noise sample's counts per bin.
    ``work``: as long as the noise sample.

    Only :func:`locate_bragg` and :func:`measure_at` use them, and nothing
    they return refers to them.
    """
    ws = getattr(_local, "workspace", None)
    if ws is None or ws[0] != shape:
        M, N = shape
        ws = (shape, {}, np.empty((2, -(-M // _filters.ROWS), -(-N // _filters.TILE))),
              np.empty(_filters.NBINS, np.int64), np.empty(((M + 1) // 2) * ((N + 1) // 2)))
        _local.workspace = ws
    return ws[1:]


def _buffer(kind: str, shape: tuple[int, int], dtype) -> np.ndarray:
    """The thread's ``kind`` array (``"filtered"``: a band-passed image of ``shape``;
    ``"sample"``: its noise sample ``filtered[::2, ::2]``) of ``dtype``, made on first use."""
    buffers = _workspace(shape)[0]
    key = (kind, np.dtype(dtype).str)
    if key not in buffers:
        M, N = shape
        buffers[key] = np.empty(shape if kind == "filtered" else ((M + 1) // 2, (N + 1) // 2),
                                dtype)
    return buffers[key]


#: The band-passed values (largest magnitude) a float32 band-pass is kept for: beyond,
#: its sums overflow or its values fall towards float32's subnormals; the frame is then
#: filtered again in float64.
_FLOAT32_RANGE = (1e-20, 1e30)


def _bandpass(image, noise_size, size, extras: bool):
    """``(filtered, tile_max, (sample, hist), low, high)`` of a kernel image.

    ``low, high``: the least and greatest filtered values, NaN when the image
    holds NaN or infinities. With ``extras``, the arrays are the thread's
    workspace (:func:`_workspace`), and a finite float32 image is filtered
    in float32 (:mod:`crystalmapping._bragg_bandpass32`) when its band-passed
    values lie within :data:`_FLOAT32_RANGE`; otherwise the result is
    scipy's, bit for bit, in float64.
    """
    M, N = image.shape
    w = gaussian_weights(noise_size)
    if extras:
        _, tiles, hist, _ = _workspace((M, N))
        if image.dtype == np.float32 and image.size:
            out = _buffer("filtered", (M, N), np.float32)
            sample = _buffer("sample", (M, N), np.float32)
            typical = np.float32(np.median(image[::61, ::67]))  # subtracted first
            finite, low, high = _once(("bandpass32",), _bandpass32.bandpass32_into, image,
                                      w.astype(np.float32), size, typical, out, tiles[0],
                                      tiles[1], sample, hist)
            if finite and _FLOAT32_RANGE[0] < max(abs(low), abs(high)) < _FLOAT32_RANGE[1]:
                return out, tiles, (sample, hist), low, high
            # not finite, or so large or so small that float32 overflows or loses precision
        out = _buffer("filtered", (M, N), np.float64)
        sample = _buffer("sample", (M, N), np.float64)
    else:
        out = np.empty((M, N))
        tiles = np.empty((2, 0, 0))
        sample = np.empty((0, 0))
        hist = np.empty(0, np.int64)
    key = ("bandpass", image.dtype.str)
    finite, low, high = _once(key, _filters.bandpass_into, image, w, size, out, tiles[0],
                              tiles[1], sample, hist, False)
    if not finite:  # infinities: divide as scipy does, not by the reciprocal
        _filters.bandpass_into(image, w, size, out, tiles[0], tiles[1], sample, hist, True)
        low = high = np.nan  # not finite: numpy's noise and floor (see _prepare)
    return out, tiles, (sample, hist), low, high


def bandpass(image: np.ndarray, *, noise_size: float = 1.0, smoothing_size: float | None = None,
             diameter: int = 15) -> np.ndarray:
    """Band-pass filter an image as ``trackpy.bandpass`` does, in float.

    A Gaussian of width ``noise_size`` (truncated at 4 widths) removes pixel
    noise; a boxcar of side ``smoothing_size`` (default ``diameter``)
    estimates the slowly varying background, which is subtracted; both with
    ``scipy.ndimage``'s ``"nearest"`` edges. Nothing is clipped or
    rescaled. The values are those of ``scipy.ndimage.gaussian_filter`` minus
    ``uniform_filter``, bit for bit, computed in one pass.

    Parameters
    ----------
    image : (M, N) array
    noise_size, smoothing_size : float
    diameter : int

    Returns
    -------
    filtered : (M, N) float64 ndarray
    """
    image = _kernel_image(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (M, N), got shape {image.shape}.")
    return _bandpass(image, noise_size, _size(smoothing_size, diameter), False)[0]


def _noise(sample: np.ndarray, hist: np.ndarray | None = None, finite: bool | None = None,
           work: np.ndarray | None = None) -> tuple[float, float]:
    """Level and sigma of the noise sample (``hist``: its counts per bin, if known)."""
    flat = sample.reshape(-1)
    if flat.size == 0:
        return float("nan"), float("nan")
    level = mad = float("nan")
    if finite is None:
        finite = bool(np.isfinite(flat).all())
    if finite:
        if hist is None:
            hist = np.zeros(_filters.NBINS, np.int64)
            _once(("hist", flat.dtype.str), _bragg_noise.histogram, flat, hist)
        if work is None or work.size < flat.size:
            work = np.empty(flat.size)
        level, mad = _once(("noise", flat.dtype.str), _bragg_noise.frame_noise, flat, hist,
                           work)
    if np.isnan(level) or np.isnan(mad):  # numpy's answer for values that are not finite
        flat = flat.astype(np.float64)
        level = float(np.median(flat))
        mad = float(np.median(np.abs(flat - level)))
    level, sigma = float(level), MAD_TO_STD * float(mad)
    if not sigma > 0:
        sigma = float(np.std(flat, dtype=np.float64))
    return level, sigma


def image_noise(filtered: np.ndarray) -> tuple[float, float]:
    """Robust level and standard deviation of a (band-passed) image's noise.

    The median and 1.4826 x the median absolute deviation over the image
    (subsampled by 2 along each axis): Bragg peaks cover a tiny fraction of a
    detector image, so they do not bias either. Exactly ``np.median``'s
    values, found by counting rather than sorting.
    """
    sample = np.ascontiguousarray(np.asarray(filtered, dtype=np.float64)[::2, ::2])
    return _noise(sample)


def _windows(diameter: int) -> tuple[int, int]:
    """Radius of a peak's disk, and half-side of the square its surroundings are read from."""
    radius = diameter // 2
    return radius, max(3 * diameter, 2 * radius + 4)


def _prepare(image: np.ndarray, options: LocateOptions, preprocess: bool, mask=None):
    """``(filtered, tiles, level, sigma, floor_noise, finite)`` of a kernel image.

    With a ``mask``, the noise sample leaves out the pixels the band-pass
    carries a masked pixel into.
    """
    if preprocess:
        filtered, tiles, sample, low, high = _bandpass(
            image, options.noise_size, _size(options.smoothing_size, options.diameter), True)
    else:
        filtered = np.asarray(image, dtype=np.float64)
        _, tiles, hist, _ = _workspace(filtered.shape)
        sample = (_buffer("sample", filtered.shape, np.float64), hist)
        low, high = _once(("tiles",), _filters.tiles_into, filtered, tiles[0], tiles[1], *sample)
    finite = bool(np.isfinite(low) and np.isfinite(high))
    if mask is not None:
        reach = _size(options.smoothing_size, options.diameter) // 2 + int(
            np.ceil(4 * options.noise_size)) if preprocess else 0
        good = ~near_mask(mask, reach)[::2, ::2]
        sample = (sample[0][good[:sample[0].shape[0], :sample[0].shape[1]]], None)
    level, sigma = _noise(*sample, finite=finite,
                          work=_workspace(image.shape)[3])
    floor_noise = max(sigma, 1e-6 * max(abs(low), abs(high)), 1e-300)
    return filtered, tiles, level, sigma, floor_noise, finite


def _candidates(filtered, tiles, options: LocateOptions, level: float, floor_noise: float):
    """``(n, 2)`` pixels ``(row, column)`` of the candidates, brightest first.

    Maxima within a peak's diameter, above half the detection threshold of the
    image's noise. Separation is applied later, among the peaks that pass the
    rules, so a bright powder ring or a noise spike cannot hide a Bragg peak
    beside it.
    """
    half = max(options.diameter // 2, 1)
    floor = level + 0.5 * options.min_snr * floor_noise
    cand = _once(("maxima", filtered.dtype.str), _filters.local_maxima, filtered, tiles[0], floor, half)
    if len(cand):
        order = np.argsort(-filtered[cand[:, 0], cand[:, 1]], kind="stable")
        cand = cand[order]
        cand = cand[_once(("apart",), _filters.apart, cand, half, filtered.shape)]
    return cand


def _measure(filtered, image, cand, options, level, sigma, floor_noise, recentre, tiles=None,
             finite=False):
    """One row of :data:`COLUMNS` per candidate (see :func:`~._bragg_measure.measure`).

    With ``recentre``, ``tiles`` (the tile maxima and minima of ``filtered``) and a
    ``finite`` image, candidates that bounds show weak are not measured, and
    those rejected as elongated not in full: their rows are incomplete, the
    table :func:`_rules` keeps is the same.
    """
    radius, outer = _windows(options.diameter)
    out = np.empty((len(cand), len(COLUMNS)))
    bound = bool(recentre and finite and tiles is not None and tiles.size)
    if not bound:
        tiles = np.full((2, 1, 1), np.inf)
    max_ecc = np.inf if options.max_ecc is None else float(options.max_ecc)
    if len(cand):
        key = ("measure", filtered.dtype.str, image.dtype.str, cand.dtype.str)
        _once(key, measure, filtered, image, cand, radius, outer, floor_noise, level, sigma,
              float(options.min_snr), int(options.max_iterations), recentre, out, tiles[0],
              tiles[1], max_ecc, bound)
    return out


def locate_bragg(image: np.ndarray, options: LocateOptions,
                 mask: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    """The ``bragg`` locator on one (not all-zero) image.

    Parameters
    ----------
    image : (M, N) array
    options : LocateOptions
    mask : (M, N) bool array, optional
        Bad pixels (already filled in ``image``, see
        :func:`crystalmapping.locate.masked_image`): out of the noise sample,
        and a candidate whose disk touches one is rejected as ``masked``.

    Returns
    -------
    table : DataFrame
        One row per peak: ``y``, ``x``, ``mass``, ``size``, ``ecc``,
        ``signal``, ``raw_mass``, ``amplitude``, ``snr``, ``ep`` (NaN),
        sorted by ``(y, x)``.
    counts : dict
        ``noise`` and the rejected candidates: ``n_rejected_weak``,
        ``n_rejected_elongated``, ``n_rejected_close``, ``n_rejected_masked``.
    """
    rows, cand, sigma = _measured(image, options, mask, bound=True)
    return _rules(rows, options, sigma, _touching(mask, rows, cand, options))


def _measured(image, options: LocateOptions, mask, *, bound: bool):
    """``(rows, cand, sigma)``: every candidate of ``image`` measured, one row of
    :data:`COLUMNS` each; with ``bound``, those that bounds show weak are not
    measured in full."""
    image = _kernel_image(image)
    if options.invert:
        image = np.asarray(image, dtype=np.float64)
        image = image.max() - image
    filtered, tiles, level, sigma, floor_noise, finite = _prepare(image, options,
                                                                  options.preprocess, mask)
    cand = _candidates(filtered, tiles, options, level, floor_noise)
    rows = _measure(filtered, image, cand, options, level, sigma, floor_noise, True,
                    tiles if bound else None, finite)
    return rows, cand, sigma


def _touching(mask, rows: np.ndarray, cand: np.ndarray, options: LocateOptions):
    """Whether each candidate's disk touches the mask (at its measured position, or its
    pixel when it was not measured); None without a mask."""
    if mask is None or not len(rows):
        return None
    y, x = rows[:, _COL["y"]], rows[:, _COL["x"]]
    y = np.where(np.isfinite(y), y, cand[:, 0])
    x = np.where(np.isfinite(x), x, cand[:, 1])
    return touching(mask, y, x, options.diameter // 2)


def candidates_bragg(image: np.ndarray, options: LocateOptions,
                     mask: np.ndarray | None = None) -> tuple[pd.DataFrame, float]:
    """Every candidate of the ``bragg`` locator, measured in full, with the rule that decided it.

    What :func:`locate_bragg` keeps are the rows whose ``verdict`` is
    ``"kept"``; the others say why not (:data:`VERDICTS`). Slower than
    :func:`locate_bragg` (no candidate is skipped by a bound): for looking at
    one frame while tuning.

    Returns
    -------
    table : DataFrame
        :data:`COLUMNS` plus ``row``, ``col`` (the candidate's pixel: where a
        candidate whose measurement moved off the image is drawn) and
        ``verdict``.
    noise : float
        The band-passed image's noise (``snr`` is in its units).
    """
    rows, cand, sigma = _measured(image, options, mask, bound=False)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["row"], table["col"] = cand[:, 0], cand[:, 1]
    table["verdict"] = np.asarray(VERDICTS, dtype=object)[
        _verdicts(rows, options, _touching(mask, rows, cand, options))]
    return table, sigma


def measure_at(image: np.ndarray, y, x, options: LocateOptions) -> tuple[np.ndarray, np.ndarray, float]:
    """``amplitude`` and ``snr`` of peaks found elsewhere (trackpy's), as the locator measures them.

    Parameters
    ----------
    image : (M, N) array
    y, x : (n,) arrays
        Peak positions; the nearest pixel (clamped to the image) is measured.
    options : LocateOptions

    Returns
    -------
    amplitude, snr : (n,) float64 ndarrays
    noise : float
        The band-passed image's noise.
    """
    image = _kernel_image(image)
    filtered, _, level, sigma, floor_noise, _ = _prepare(image, options, True)
    M, N = image.shape
    y = np.clip(np.rint(np.asarray(y, dtype=np.float64)), 0, M - 1).astype(np.int64)
    x = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, N - 1).astype(np.int64)
    cand = np.ascontiguousarray(np.stack([y, x], axis=1).reshape(-1, 2))
    out = _measure(filtered, image, cand, options, level, sigma, floor_noise, False)
    return out[:, 7].copy(), out[:, 8].copy(), sigma
