"""The noise of a band-passed image for the compiled ``bragg`` locator.

The median and the median absolute deviation of the sample
``filtered[::2, ::2]``, exactly as ``np.median`` gives them, without sorting
it: the band-pass pass counts the sample in 65536 bins whose order follows
the values' (:func:`~crystalmapping._bragg_select.bin16`); the wanted ranks
fall in one or two bins, whose values alone are selected exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._bragg_select import KERNEL, _bits, _select, bin16, bin_bounds


@njit(**KERNEL)
def _cross(counts, order, rank):
    """The position in ``order`` where the running count of ``counts`` first exceeds ``rank``."""
    cum = 0
    for j in range(order.size):
        cum += counts[order[j]]
        if cum > rank:
            return j
    return order.size - 1


@njit(**KERNEL)
def frame_noise(sample, hist, work):
    """``(median, median absolute deviation)`` of a flat sample, exactly as ``np.median`` gives them.

    ``hist`` counts the sample per :func:`~crystalmapping._bragg_select.bin16`
    (the band-pass pass fills it). The median's ranks lie in one or two bins:
    one pass collects those values and an exact selection finishes. Each
    bin's values lie within a known distance range from the median, so a
    second pass collects only the deviations that may hold the median
    deviation's ranks, and counts those below. ``work`` is as long as the
    sample. Returns NaNs when the bins miss (not finite values).
    """
    n = sample.size
    k = (n - 1) // 2
    k2 = k + 1 - n % 2
    cum = 0
    b1 = 0
    while cum + hist[b1] <= k:
        cum += hist[b1]
        b1 += 1
    below = cum
    b2 = b1
    cum2 = cum + hist[b1]
    while cum2 <= k2:
        b2 += 1
        cum2 += hist[b2]
    m = np.int64(0)
    nb = np.uint64(b2 - b1)
    for i in range(n):
        if np.uint64(bin16(sample[i]) - b1) <= nb:  # one test, rarely true
            work[m] = sample[i]
            m += 1
    if not below + m == cum2:
        return np.nan, np.nan
    lo, hi = bin_bounds(b1)[0], bin_bounds(b2)[1]
    x, y = _select(work, m, k - below, k2 - below, lo, hi)
    level = x if n % 2 else (x + y) / 2.0
    # the median deviation: each bin's distance range from the level
    used = np.flatnonzero(hist)
    dmin = np.empty(used.size)
    dmax = np.empty(used.size)
    counts = np.empty(used.size, np.int64)
    for j in range(used.size):
        lo, hi = bin_bounds(used[j])
        counts[j] = hist[used[j]]
        if lo < level < hi:
            dmin[j] = 0.0
            dmax[j] = max(abs(hi - level), abs(lo - level))
        elif lo >= level:
            dmin[j], dmax[j] = abs(lo - level), abs(hi - level)
        else:
            dmin[j], dmax[j] = abs(level - hi), abs(level - lo)
    by_min = np.argsort(dmin)
    by_max = np.argsort(dmax)
    t_lo = dmin[by_min[_cross(counts, by_min, k)]]
    t_hi = np.nextafter(dmax[by_max[_cross(counts, by_max, k2)]], np.inf)
    below = m = np.int64(0)
    k_lo = _bits(t_lo)  # non-negative floats order as their bits
    span = np.uint64(_bits(t_hi) - k_lo)
    for i in range(n):
        d = abs(sample[i] - level)
        below += d < t_lo
        if np.uint64(_bits(d) - k_lo) < span:
            work[m] = d
            m += 1
    if not (below <= k and below + m > k2):
        return np.nan, np.nan
    x, y = _select(work, m, k - below, k2 - below, t_lo, t_hi)
    return level, x if n % 2 else (x + y) / 2.0


@njit(**KERNEL)
def histogram(values, hist):
    """Count ``values`` per :func:`~crystalmapping._bragg_select.bin16` into ``hist``."""
    for i in range(values.size):
        hist[bin16(values[i])] += 1
