"""Mask: the detector's bad pixels (module gaps, dead and hot pixels, the beam stop).

A mask is a boolean ``(M, N)`` array of the detector's shape, True where a
pixel is bad (pyFAI's convention). The locators use it so that a masked
pixel never makes a peak and does not enter the noise estimate: before
filtering, masked pixels take the image's typical value (the median of a
sample of the good pixels), so they carry no signal; the noise sample leaves
out every pixel the band-pass carries a masked pixel into; and a candidate
whose disk (``diameter``) touches a masked pixel is rejected and counted
(``n_rejected_masked``), since its measurement would rest on pixels that
are not there.

Files: ``.npy`` (numpy.save of a boolean or 0/1 array), and, when ``fabio``
is installed, pyFAI's ``.edf`` / ``.tif`` masks (non-zero = bad).
:func:`hot_pixels` finds the pixels of a background frame that no X-ray
background explains (``crystalmapping mask --from-background bg.npy``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import ConfigError

__all__ = ["load_mask", "hot_pixels", "fill_masked", "near_mask", "touching"]

_CACHE: dict = {}
_LOCK = threading.Lock()


def load_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The boolean mask in ``path`` (True = bad), checked against the detector's ``shape``.

    Read once per process and file version (a worker reads it on its first
    point); the array returned is shared, read-only.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, not 2-D, not 0/1, or not of ``shape``.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ConfigError(f"mask file {str(path)!r} does not exist (on this machine or "
                          "worker); give the path of a .npy mask (True = bad pixel) that "
                          "every worker can read.") from None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _LOCK:
        mask = _CACHE.get(key)
    if mask is None:
        mask = _read(path)
        mask.setflags(write=False)
        with _LOCK:
            _CACHE.clear()  # one mask per process is the use; a new version replaces it
            _CACHE[key] = mask
    if shape is not None and mask.shape != tuple(shape):
        raise ConfigError(f"mask {str(path)!r} has shape {mask.shape}, the detector's images "
                          f"{tuple(shape)}; make the mask for this detector (rows, columns), "
                          "e.g. crystalmapping mask --from-background on one of its frames.")
    return mask


def _read(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix in (".edf", ".tif", ".tiff"):
            try:
                import fabio
            except ImportError:
                raise ConfigError(f"mask {str(path)!r} is a {suffix} file: reading it needs "
                                  "fabio (pip install fabio), or save the mask with "
                                  "numpy.save as .npy.") from None
            data = fabio.open(str(path)).data
        else:
            raise ConfigError(f"mask file must be .npy (or .edf/.tif with fabio), got "
                              f"{str(path)!r}; save it with numpy.save.")
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the mask {str(path)!r} ({exc}); it must be a 2-D "
                          "boolean array saved with numpy.save.") from None
    data = np.asarray(data)
    if data.ndim != 2:
        raise ConfigError(f"a mask is one 2-D array (rows, columns); {str(path)!r} holds "
                          f"shape {data.shape}.")
    if data.dtype != bool:
        if data.dtype.kind not in "biuf" or not np.isin(np.unique(data), (0, 1)).all():
            if data.dtype.kind in "iu" and suffix != ".npy":
                data = data != 0  # pyFAI's masks: non-zero = bad
            else:
                raise ConfigError(f"mask {str(path)!r} must hold True/False or 0/1 "
                                  f"(1 = bad pixel), got {data.dtype} values.")
        data = np.asarray(data != 0)
    return np.ascontiguousarray(data, dtype=bool)


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``image`` whose masked pixels hold the median of a sample of the others."""
    good = image[::8, ::8][~mask[::8, ::8]]
    if good.size == 0:
        good = image[~mask]
    fill = float(np.median(good)) if good.size else 0.0
    out = np.array(image, copy=True)
    out[mask] = fill
    return out


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


_DILATED: dict = {}


def _dilated(mask: np.ndarray, radius: int, shape: str) -> np.ndarray:
    key = (id(mask), mask.shape, radius, shape)
    with _LOCK:
        found = _DILATED.get(key)
    if found is None or found[0] is not mask:
        if radius <= 0:
            grown = mask
        elif shape == "disk":
            grown = ndimage.binary_dilation(mask, structure=_disk(radius))
        else:
            grown = ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant")
        found = (mask, grown)
        with _LOCK:
            if len(_DILATED) > 8:
                _DILATED.clear()
            _DILATED[key] = found
    return found[1]


def near_mask(mask: np.ndarray, reach: int) -> np.ndarray:
    """The pixels within ``reach`` (a square) of a masked one: where a filter of that
    half-width carries a masked pixel."""
    return _dilated(mask, int(reach), "square")


def touching(mask: np.ndarray, y, x, radius: int) -> np.ndarray:
    """Whether the disk of ``radius`` around each position ``(y, x)`` holds a masked pixel.

    Positions are rounded to the nearest pixel and clipped to the image.
    """
    grown = _dilated(mask, int(radius), "disk")
    M, N = mask.shape
    yi = np.clip(np.rint(np.asarray(y, dtype=np.float64)), 0, M - 1).astype(np.int64)
    xi = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, N - 1).astype(np.int64)
    return grown[yi, xi]


def hot_pixels(background: np.ndarray, *, n_sigma: float = 10.0,
               dead: bool = True) -> np.ndarray:
    """Bad pixels of a background (dark or empty-beam) frame: True = bad.

    A pixel is hot when it stands more than ``n_sigma`` robust standard
    deviations above the median of its 5 x 5 neighbourhood (an X-ray
    background varies slowly; a hot pixel does not belong to it). With
    ``dead``, pixels that read exactly 0 where their neighbourhood reads more
    than 5 robust standard deviations are bad too.

    Parameters
    ----------
    background : (M, N) array
    n_sigma : float

    Returns
    -------
    mask : (M, N) bool ndarray

    Examples
    --------
    >>> bg = np.full((20, 20), 100.0); bg[5, 7] = 5000; bg[12, 3] = 0
    >>> np.argwhere(hot_pixels(bg)).tolist()
    [[5, 7], [12, 3]]
    """
    image = np.asarray(background, dtype=np.float64)
    if image.ndim != 2:
        raise ConfigError(f"a background frame is (rows, columns), got shape {image.shape}.")
    local = ndimage.median_filter(image, size=5, mode="nearest")
    excess = image - local
    spread = 1.4826 * np.median(np.abs(excess))
    # Poisson counts: never trust a spread below the shot noise of the level
    spread = max(spread, float(np.sqrt(max(np.median(local), 1.0))))
    mask = excess > n_sigma * spread
    if dead:
        mask |= (image == 0) & (local > 5 * spread)
    return mask
