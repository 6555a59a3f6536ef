"""Full-frame passes of the compiled ``bragg`` locator: band-pass and local maxima.

Pure numba kernels on numpy arrays. Images are ``(M, N)`` arrays indexed
``[row, column]``, pixel ``(0, 0)`` centred at ``y = x = 0``.

:func:`bandpass_into` reproduces ``scipy.ndimage`` bit for bit, in float64:
the Gaussian is scipy's ``correlate1d`` (its symmetric branch: ``x[i] *
w[0]``, then the pairs ``(x[i - k] + x[i + k]) * w[k]`` from the farthest
in), down the columns (axis 0) then along the rows (axis 1), mode
``"nearest"``; the boxcar is scipy's ``uniform_filter1d`` (a running sum
started from the first ``size`` values, each output divided by ``size``),
axis 0 then axis 1. Both run row by row in one pass over the image, without
a full-frame temporary; the same pass fills the tile maxima the
local-maximum search skips by, and the noise sample ``filtered[::2, ::2]``
with its histogram (:mod:`crystalmapping._bragg_noise`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# NBINS: the length of the histogram the band-pass fills (read by callers from here)
from ._bragg_select import _KEY_MAX, _KEY_MIN, KERNEL, NBINS, _key, _unkey, bin16, div  # noqa: F401

#: Rows filtered together (their running sums along the row interleave).
ROWS = 4
#: Columns of a tile of the tile maxima (a tile is ROWS x TILE pixels).
TILE = 64


@njit(**KERNEL)
def _gauss_columns(g, image, rows, w, r):
    """``g[j]``: the Gaussian along axis 0 from the image rows ``rows[0..2r]`` (read in their
    own type, each value converted exactly to float64 before any arithmetic)."""
    n = g.size
    w0 = w[r]
    x = image[rows[r]]
    if r == 4:  # the default noise_size=1: all taps in one pass
        u4, u3, u2, u1 = image[rows[0]], image[rows[1]], image[rows[2]], image[rows[3]]
        d1, d2, d3, d4 = image[rows[5]], image[rows[6]], image[rows[7]], image[rows[8]]
        w4, w3, w2, w1 = w[0], w[1], w[2], w[3]
        for j in range(n):
            a = np.float64(x[j]) * w0
            a += (np.float64(u4[j]) + np.float64(d4[j])) * w4
            a += (np.float64(u3[j]) + np.float64(d3[j])) * w3
            a += (np.float64(u2[j]) + np.float64(d2[j])) * w2
            a += (np.float64(u1[j]) + np.float64(d1[j])) * w1
            g[j] = a
        return
    for j in range(n):
        g[j] = np.float64(x[j]) * w0
    for k in range(r, 0, -1):
        up = image[rows[r - k]]
        dn = image[rows[r + k]]
        wk = w[r - k]
        for j in range(n):
            g[j] += (np.float64(up[j]) + np.float64(dn[j])) * wk


@njit(**KERNEL)
def _gauss_row(o, gp, w, r):
    """``o[j]``: the Gaussian along axis 1 of the padded row ``gp`` (``r`` each side)."""
    n = o.size
    w0 = w[r]
    if r == 4:
        w4, w3, w2, w1 = w[0], w[1], w[2], w[3]
        for j in range(n):
            a = gp[j + 4] * w0
            a += (gp[j] + gp[j + 8]) * w4
            a += (gp[j + 1] + gp[j + 7]) * w3
            a += (gp[j + 2] + gp[j + 6]) * w2
            a += (gp[j + 3] + gp[j + 5]) * w1
            o[j] = a
        return
    x = gp[r:r + n]
    for j in range(n):
        o[j] = x[j] * w0
    for k in range(r, 0, -1):
        left = gp[r - k:r - k + n]
        right = gp[r + k:r + k + n]
        wk = w[r - k]
        for j in range(n):
            o[j] += (left[j] + right[j]) * wk


@njit(**KERNEL)
def _scan(c, run, size):
    """Running boxcar sums along a padded row ``c`` (scipy's order), into ``run``."""
    acc = 0.0
    for t in range(size):
        acc += c[t]
    run[0] = acc
    hi = c[size - 1:]
    for j in range(1, run.size):
        acc += hi[j] - c[j - 1]
        run[j] = acc


@njit(**KERNEL)
def _scan4(cp, run, size):
    """:func:`_scan` of four rows at once: four independent chains of additions."""
    n = run.shape[1]
    c0, c1, c2, c3 = cp[0], cp[1], cp[2], cp[3]
    h0, h1, h2, h3 = c0[size - 1:], c1[size - 1:], c2[size - 1:], c3[size - 1:]
    r0, r1, r2, r3 = run[0], run[1], run[2], run[3]
    a0 = a1 = a2 = a3 = 0.0
    for t in range(size):
        a0 += c0[t]
        a1 += c1[t]
        a2 += c2[t]
        a3 += c3[t]
    r0[0], r1[0], r2[0], r3[0] = a0, a1, a2, a3
    for j in range(1, n):
        a0 += h0[j] - c0[j - 1]
        a1 += h1[j] - c1[j - 1]
        a2 += h2[j] - c2[j - 1]
        a3 += h3[j] - c3[j - 1]
        r0[j] = a0
        r1[j] = a1
        r2[j] = a2
        r3[j] = a3


@njit(**KERNEL)
def _tile_extremes(tmax, tmin, max_row, min_row):
    """Maxima of ``tmax`` and minima of ``tmin`` over tiles of TILE columns (integer
    reductions, so SIMD)."""
    n = tmax.size
    for t in range(max_row.size):
        # unsigned indices: numba then skips the negative-index wraparound, which keeps
        # LLVM from vectorizing; one reduction per loop, as selects
        a, b = np.uint64(t * TILE), np.uint64(min((t + 1) * TILE, n))
        hi, lo = _KEY_MIN, _KEY_MAX
        for j in range(a, b):
            k = _key(tmax[j])
            hi = k if k > hi else hi
        for j in range(a, b):
            k = _key(tmin[j])
            lo = k if k < lo else lo
        max_row[t] = _unkey(hi)
        min_row[t] = _unkey(lo)


@njit(**KERNEL)
def bandpass_into(image, w, size, out, tile_max, tile_min, sample, hist, exact):
    """Band-pass ``image`` into ``out``: Gaussian of weights ``w`` minus a boxcar of ``size``.

    Parameters
    ----------
    image : (M, N) float32 or float64 array
    w : (2r + 1,) float64 array
        scipy's Gaussian weights (``size <= 1``: no boxcar, as scipy skips it).
    out : (M, N) float64 array
    tile_max, tile_min : (ceil(M / ROWS), ceil(N / TILE)) float64 arrays, or empty
        Filled with the maximum and the minimum of ``out`` over each tile.
    sample : (ceil(M / 2), ceil(N / 2)) float64 array, or empty
        Filled with ``out[::2, ::2]``.
    hist : (NBINS,) int64 array, or empty
        Zeroed, then counts ``sample`` per :func:`~crystalmapping._bragg_select.bin16`.
    exact : bool
        Divide with ``/`` instead of the reciprocal and its correction (needed
        only when the image holds infinities).

    Returns
    -------
    finite : bool
        False when a running sum is not finite (the image holds inf or nan).
    low, high : float
        The least and the greatest value of ``out`` (with the extras only).
    """
    M, N = image.shape
    r = (w.size - 1) // 2
    s1 = size // 2
    fs = np.float64(size)
    rcp = 1.0 / fs if size > 1 else 1.0
    box = size > 1
    nring = 2 * r + 1
    slots = np.empty(nring, np.int64)
    gp = np.empty(N + 2 * r)
    g = gp[r:r + N]
    gb = np.empty((ROWS, N))
    col = np.zeros(N)
    cp = np.empty((ROWS, N + max(size, 1) - 1))
    run = np.empty((ROWS, N))
    tmax = np.empty(N)
    tmin = np.empty(N)
    extras = tile_max.size > 0
    hist[:] = 0
    for i0 in range(0, M, ROWS):
        nr = min(ROWS, M - i0)
        for rr in range(nr):
            i = i0 + rr
            for k in range(nring):  # the rows of the Gaussian ("nearest" edges)
                slots[k] = min(max(i - r + k, 0), M - 1)
            _gauss_columns(g, image, slots, w, r)
            for j in range(r):
                gp[j] = g[0]
                gp[r + N + j] = g[N - 1]
            _gauss_row(gb[rr], gp, w, r)
            if box:
                if i == 0:
                    for t in range(size):
                        row = image[min(max(t - s1, 0), M - 1)]
                        for j in range(N):
                            col[j] += np.float64(row[j])
                else:
                    add = image[min(i + size - s1 - 1, M - 1)]
                    sub = image[max(i - 1 - s1, 0)]
                    for j in range(N):
                        col[j] += np.float64(add[j]) - np.float64(sub[j])
                c = cp[rr]
                cc = c[s1:s1 + N]
                if exact:
                    for j in range(N):
                        cc[j] = col[j] / fs
                else:
                    for j in range(N):
                        cc[j] = div(col[j], fs, rcp)
                for t in range(s1):
                    c[t] = cc[0]
                for t in range(s1 + N, N + size - 1):
                    c[t] = cc[N - 1]
        if box:
            if nr == ROWS:
                _scan4(cp, run, size)
            else:
                for rr in range(nr):
                    _scan(cp[rr], run[rr], size)
        if extras:
            tmax[:] = -np.inf
            tmin[:] = np.inf
        for rr in range(nr):
            o = out[i0 + rr]
            gr = gb[rr]
            if box and not exact and extras:  # the usual case, in one pass
                _combine(o, gr, run[rr], fs, rcp, tmax, tmin)
            else:
                if box:
                    rn = run[rr]
                    if exact:
                        for j in range(N):
                            o[j] = gr[j] - rn[j] / fs
                    else:
                        for j in range(N):
                            o[j] = gr[j] - div(rn[j], fs, rcp)
                else:
                    row = image[i0 + rr]
                    for j in range(N):
                        o[j] = gr[j] - np.float64(row[j])
                if extras:
                    _running(o, tmax, tmin)
            if extras and (i0 + rr) % 2 == 0:
                _sample(o, sample[(i0 + rr) // 2], hist)
        if extras:
            _tile_extremes(tmax, tmin, tile_max[i0 // ROWS], tile_min[i0 // ROWS])
    finite = True
    for j in range(N):
        if not np.isfinite(col[j]):
            finite = False
    low, high = _min_max(tile_min, tile_max)
    return finite, low, high


@njit(**KERNEL)
def _combine(o, g, run, fs, rcp, tmax, tmin):
    """``o = g - run / fs``, and the running maxima (for the tiles) and minima of ``o``."""
    for j in range(o.size):
        v = g[j] - div(run[j], fs, rcp)
        o[j] = v
        tmax[j] = v if v > tmax[j] else tmax[j]
        tmin[j] = v if v < tmin[j] else tmin[j]


@njit(**KERNEL)
def _running(o, tmax, tmin):
    for j in range(o.size):
        v = o[j]
        tmax[j] = v if v > tmax[j] else tmax[j]
        tmin[j] = v if v < tmin[j] else tmin[j]


@njit(**KERNEL)
def _sample(o, srow, hist):
    """The noise sample of an even row (``o[::2]``), counted in ``hist`` per
    :func:`~crystalmapping._bragg_select.bin16`."""
    for j in range(srow.size):
        srow[j] = o[2 * j]
    for j in range(srow.size):
        hist[bin16(srow[j])] += 1


@njit(**KERNEL)
def _min_max(tile_min, tile_max):
    low = _KEY_MAX
    for v in tile_min.ravel():
        low = min(low, _key(v))
    high = _KEY_MIN
    for v in tile_max.ravel():
        high = max(high, _key(v))
    return _unkey(low), _unkey(high)


@njit(**KERNEL)
def tiles_into(filtered, tile_max, tile_min, sample, hist):
    """The extras of :func:`bandpass_into` for an image that is not band-passed."""
    M, N = filtered.shape
    hist[:] = 0
    tmax = np.empty(N)
    tmin = np.empty(N)
    for i0 in range(0, M, ROWS):
        tmax[:] = -np.inf
        tmin[:] = np.inf
        for rr in range(min(ROWS, M - i0)):
            _running(filtered[i0 + rr], tmax, tmin)
            if (i0 + rr) % 2 == 0:
                _sample(filtered[i0 + rr], sample[(i0 + rr) // 2], hist)
        _tile_extremes(tmax, tmin, tile_max[i0 // ROWS], tile_min[i0 // ROWS])
    return _min_max(tile_min, tile_max)


@njit(**KERNEL)
def local_maxima(filtered, tile_max, floor, half):
    """Pixels above ``floor`` that no pixel of their ``(2 half + 1)^2`` window exceeds.

    The same set as ``(filtered == maximum_filter(filtered, 2 half + 1,
    mode="constant", cval=-inf)) & (filtered > floor)``, in row-major order,
    as an ``(n, 2)`` int64 array of ``(row, column)``; tiles whose maximum is
    not above ``floor`` are skipped.
    """
    M, N = filtered.shape
    found = np.empty((64, 2), np.int64)
    n = 0
    for i in range(M):
        tr = tile_max[i // ROWS]
        y0, y1 = max(i - half, 0), min(i + half + 1, M)
        for t in range(tile_max.shape[1]):
            if not tr[t] > floor:
                continue
            row = filtered[i]
            for j in range(t * TILE, min((t + 1) * TILE, N)):
                v = row[j]
                if not v > floor:
                    continue
                x0, x1 = max(j - half, 0), min(j + half + 1, N)
                peak = True
                # the nearest neighbours first: most pixels fail there
                for y in range(max(i - 1, 0), min(i + 2, M)):
                    for x in range(max(j - 1, 0), min(j + 2, N)):
                        if filtered[y, x] > v:
                            peak = False
                if peak:
                    for y in range(y0, y1):
                        wrow = filtered[y]
                        for x in range(x0, x1):
                            if wrow[x] > v:
                                peak = False
                                break
                        if not peak:
                            break
                if peak:
                    if n == found.shape[0]:
                        bigger = np.empty((2 * n, 2), np.int64)
                        bigger[:n] = found
                        found = bigger
                    found[n, 0] = i
                    found[n, 1] = j
                    n += 1
    return found[:n].copy()


@njit(**KERNEL)
def apart(points, distance, shape):
    """Greedily keep the points (in order) farther than ``distance`` (Chebyshev) from the kept.

    The indices of the kept points; a grid of cells of side ``distance + 1``
    holds at most one kept point each, so each test looks at 3 x 3 cells.
    """
    cell = distance + 1
    gy = shape[0] // cell + 1
    gx = shape[1] // cell + 1
    grid = np.full((gy, gx), -1, np.int64)
    keep = np.empty(points.shape[0], np.int64)
    nk = 0
    for p in range(points.shape[0]):
        y, x = points[p, 0], points[p, 1]
        cy, cx = y // cell, x // cell
        ok = True
        for a in range(max(cy - 1, 0), min(cy + 2, gy)):
            for b in range(max(cx - 1, 0), min(cx + 2, gx)):
                q = grid[a, b]
                if q >= 0 and abs(points[q, 0] - y) <= distance and abs(points[q, 1] - x) <= distance:
                    ok = False
        if ok:
            grid[cy, cx] = p
            keep[nk] = p
            nk += 1
    return keep[:nk].copy()



@njit(fastmath={"reassoc", "nsz"}, **KERNEL)
def max_and_sum(image):
    """``(image.max(initial=0), image.sum(dtype=float64))`` of a C-contiguous image in one
    SIMD pass (the sum reassociated: not numpy's pairwise order, the same to ~1e-15
    relative). NaN still propagates into the sum; the caller then asks numpy."""
    flat = image.ravel()
    total = 0.0
    high = flat[0] - flat[0]  # zero of the image's type
    for i in range(flat.size):
        v = flat[i]
        total += np.float64(v)
        high = max(high, v)
    return np.float64(high), total


@njit(**KERNEL)
def any_nonzero(image):
    """``image.any()`` of a C-contiguous image, stopping at the first value that is not zero
    (numpy reads the whole image)."""
    flat = image.ravel()
    zero = flat[0] - flat[0] if flat.size else 0
    for i in range(flat.size):
        if flat[i] != zero:
            return True
    return False
