"""A proof, without measuring, that a candidate of the ``bragg`` locator is weak.

Most candidates on a detector frame are noise: maxima a few sigma above the
background that the measurement rejects as weak (``snr < min_snr``) after
recentring them, at about 50 microseconds per position for the exact ring
medians. :func:`proven_weak` shows the same verdict from bounds that hold at
every position the recentring can reach, from the tile extremes the band-pass
already keeps, in about a microsecond; a candidate
it cannot decide is measured as before, so the locator's table and counts do
not change.

The argument, for a candidate at ``(yc, xc)``:

* Recentring moves at most ``max_iterations`` times, each time to the
  rounded centroid of the disk of radius ``radius`` around the current
  position, so every position ``p`` it reaches lies within ``reach =
  max_iterations * radius`` (Chebyshev) of the candidate, inside the image.
* At ``p`` the height is ``filtered[p] - background(p)`` with
  ``filtered[p] <= top``, the greatest tile maximum over the reachable
  positions, and the noise is at least ``global_noise``.
* ``background(p)`` is the median of ``p``'s ring, a subset of the union
  ``U`` of the windows of the reachable positions. A subset's ``k``-th
  smallest value is at least the union's, so if fewer than ``k_min + 1``
  values of ``U`` lie below ``t`` (``k_min`` the median's rank in the
  smallest ring a reachable window can hold), every background is ``>= t``.
  The values below ``t`` are counted from above by the tiles of the
  band-pass (:mod:`crystalmapping._bragg_filters`): all the pixels of every
  tile whose minimum is below ``t``.
* With ``t = top - min_snr * global_noise * (1 - 1e-6)`` that gives ``snr <
  min_snr`` at every ``p``.

It needs finite values (a NaN in a ring makes the reference's ``snr`` NaN,
which is not weak); the caller asks only then.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._bragg_filters import ROWS, TILE
from ._bragg_select import KERNEL

#: The share of ``min_snr * global_noise`` kept as a margin against rounding.
MARGIN = 1e-6


@njit(**KERNEL)
def _extent(c, reach, outer, n):
    """``(a, b, least)``: reachable positions ``a..b`` along an axis of length ``n``, and the
    fewest pixels a window of half-side ``outer`` around one of them keeps along it."""
    a, b = max(c - reach, 0), min(c + reach, n - 1)
    la = min(a + outer, n - 1) - max(a - outer, 0) + 1
    lb = min(b + outer, n - 1) - max(b - outer, 0) + 1
    return a, b, min(la, lb)


@njit(**KERNEL)
def proven_weak(tile_max, tile_min, shape, yc, xc, reach, outer, n_inner, global_noise, min_snr):
    """True when the candidate at ``(yc, xc)`` is weak at every position it can reach.

    Parameters
    ----------
    tile_max, tile_min : (ceil(M / ROWS), ceil(N / TILE)) float64 arrays
        The maximum and the minimum of the (finite) band-passed image over
        each tile of ``ROWS x TILE`` pixels.
    shape : (int, int)
        The image's ``(M, N)``.
    reach : int
        How far (Chebyshev) recentring can move the candidate.
    outer : int
        Half-side of a candidate's window.
    n_inner : int
        Pixels of a whole window that are not ring.
    global_noise, min_snr : float
        The least noise a candidate's ``snr`` is divided by, and the threshold.

    Returns
    -------
    bool
        False means only that the bounds could not show it.
    """
    M, N = shape
    ya, yb, hmin = _extent(yc, reach, outer, M)
    xa, xb, wmin = _extent(xc, reach, outer, N)
    nr_min = hmin * wmin - n_inner  # a clipped window loses ring pixels first
    if nr_min < 16:  # a ring this small is not measured by its median
        return False
    k = (nr_min - 1) // 2
    top = -np.inf
    for ty in range(ya // ROWS, yb // ROWS + 1):
        for tx in range(xa // TILE, xb // TILE + 1):
            v = tile_max[ty, tx]
            top = v if v > top else top
    t = top - min_snr * global_noise * (1.0 - MARGIN)
    # at most this many pixels of the union lie below t: every pixel of each tile whose
    # minimum does
    below = 0
    for ty in range(max(ya - outer, 0) // ROWS, min(yb + outer, M - 1) // ROWS + 1):
        for tx in range(max(xa - outer, 0) // TILE, min(xb + outer, N - 1) // TILE + 1):
            if tile_min[ty, tx] < t:
                below += ROWS * TILE
        if below > k:
            return False
    return True
