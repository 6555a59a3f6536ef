"""The ``bragg`` locator's band-pass in float32: the detector frame's pass.

:func:`bandpass32_into` is :func:`~crystalmapping._bragg_filters.bandpass_into`
(a Gaussian of weights ``w`` minus a boxcar of ``size``, ``"nearest"``
edges, the tile extremes and the noise sample on the way) for a float32
image, computed in float32 from the image minus a level ``c``. The
band-pass does not change when a constant is subtracted from the image (both
filters' weights sum to one), so ``c``, a typical value of the frame, only
keeps the sums small where float32 has the most precision.

The Gaussian is scipy's order of operations with fused multiply-adds. The
boxcar sums are not running sums (in float32 those would drift along a
3,072-pixel row) but sums of power-of-two blocks, ``size`` written in
binary: about ``2 log2(size)`` additions per pixel per axis, the same for
every pixel. Against scipy in float64, the values differ by about 1e-7
of the image's values, far below the locator's tolerances (positions 0.01
px, ``amplitude`` and ``snr`` 1e-4 relative); the tests hold it to them.

The image must be finite: the pass reports ``finite = False`` otherwise, and
the caller filters in float64 instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._bragg_filters import ROWS, _min_max, _sample, _tile_extremes

#: numba's flags for these kernels: FMA allowed, nothing else reassociated
#: (NaN and infinities keep their meaning).
KERNEL32 = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})


@njit(fastmath={"contract", "reassoc"}, cache=True, nogil=True, error_model="numpy")
def _load(dst, src, c):
    """``dst = src - c``; NaN when ``src`` holds a value that is not finite, else 0."""
    bad = np.float32(0.0)
    for j in range(dst.size):
        d = src[j] - c
        dst[j] = d
        bad += d - d
    return bad


@njit(**KERNEL32)
def _gauss_columns(g, ring, slots, w, r):
    """``g``: the Gaussian along axis 0 of the rows ``ring[slots[0..2r]]`` (``slots[r]`` the
    centre)."""
    n = g.size
    if r == 4:  # the default noise_size=1: all taps in one pass
        u4, u3, u2, u1, x = ring[slots[0]], ring[slots[1]], ring[slots[2]], ring[slots[3]], ring[slots[4]]
        d1, d2, d3, d4 = ring[slots[5]], ring[slots[6]], ring[slots[7]], ring[slots[8]]
        w4, w3, w2, w1, w0 = w[0], w[1], w[2], w[3], w[4]
        for j in range(n):
            g[j] = (x[j] * w0 + (u4[j] + d4[j]) * w4 + (u3[j] + d3[j]) * w3
                    + (u2[j] + d2[j]) * w2 + (u1[j] + d1[j]) * w1)
        return
    x, w0 = ring[slots[r]], w[r]
    for j in range(n):
        g[j] = x[j] * w0
    for k in range(r, 0, -1):
        up, dn, wk = ring[slots[r - k]], ring[slots[r + k]], w[r - k]
        for j in range(n):
            g[j] += (up[j] + dn[j]) * wk


@njit(**KERNEL32)
def _gauss_row(o, gp, w, r):
    """``o``: the Gaussian along the padded row ``gp`` (``r`` values each side)."""
    n = o.size
    if r == 4:
        w4, w3, w2, w1, w0 = w[0], w[1], w[2], w[3], w[4]
        for j in range(n):
            o[j] = (gp[j + 4] * w0 + (gp[j] + gp[j + 8]) * w4 + (gp[j + 1] + gp[j + 7]) * w3
                    + (gp[j + 2] + gp[j + 6]) * w2 + (gp[j + 3] + gp[j + 5]) * w1)
        return
    w0 = w[r]
    x = gp[r:r + n]
    for j in range(n):
        o[j] = x[j] * w0
    for k in range(r, 0, -1):
        left, right, wk = gp[r - k:r - k + n], gp[r + k:r + k + n], w[r - k]
        for j in range(n):
            o[j] += (left[j] + right[j]) * wk


@njit(**KERNEL32)
def _block_sums(levels, n):
    """``levels[l, j]``: the sum of ``levels[0, j : j + 2**l]``, for the first ``n - 2**l + 1``
    values of each level."""
    for lv in range(1, levels.shape[0]):
        # unsigned indices: numba then skips the negative-index wraparound, which keeps
        # LLVM from vectorizing
        h = np.uint64(1 << (lv - 1))
        a, b = levels[lv - 1], levels[lv]
        for j in range(np.uint64(n - 2 * h + 1)):
            b[j] = a[j] + a[j + h]


@njit(**KERNEL32)
def _pair(dst, a, b, add):
    """``dst = a + b``, or ``dst += a + b`` with ``add``."""
    if add:
        for j in range(dst.size):
            dst[j] += a[j] + b[j]
    else:
        for j in range(dst.size):
            dst[j] = a[j] + b[j]


@njit(**KERNEL32)
def _pair_at(dst, a, oa, b, ob, add):
    """``dst[j] (+)= a[j + oa] + b[j + ob]``."""
    oa, ob = np.uint64(oa), np.uint64(ob)
    if add:
        for j in range(np.uint64(dst.size)):
            dst[j] += a[j + oa] + b[j + ob]
    else:
        for j in range(np.uint64(dst.size)):
            dst[j] = a[j + oa] + b[j + ob]


@njit(**KERNEL32)
def _combine(o, g, rest, a, oa, b, ob, rcp, tmax, tmin):
    """``o = g - (rest + a[j + oa] + b[j + ob]) * rcp``, and the running maxima and minima of
    ``o`` (for the tiles)."""
    oa, ob = np.uint64(oa), np.uint64(ob)
    for j in range(np.uint64(o.size)):
        v = g[j] - (rest[j] + (a[j + oa] + b[j + ob])) * rcp
        o[j] = v
        tmax[j] = v if v > tmax[j] else tmax[j]
        tmin[j] = v if v < tmin[j] else tmin[j]


@njit(**KERNEL32)
def bandpass32_into(image, w, size, c, out, tile_max, tile_min, sample, hist):
    """Band-pass a float32 ``image`` into ``out``, in float32, with the tile extremes and the
    noise sample.

    Parameters
    ----------
    image : (M, N) float32 array
    w : (2r + 1,) float32 array
        The Gaussian's weights (scipy's, rounded to float32).
    size : int
        The boxcar's side (``<= 1``: no boxcar, as scipy skips it).
    c : float32
        Subtracted from the image first (a typical value of it).
    out : (M, N) float32 array
    tile_max, tile_min : (ceil(M / ROWS), ceil(N / TILE)) float64 arrays
        The maximum and the minimum of ``out`` over each tile.
    sample : (ceil(M / 2), ceil(N / 2)) float32 array
        Filled with ``out[::2, ::2]``.
    hist : (NBINS,) int64 array
        Zeroed, then counts ``sample`` per :func:`~crystalmapping._bragg_select.bin16`.

    Returns
    -------
    finite : bool
        False when the image holds a value that is not finite (``out`` is then
        not the band-pass).
    low, high : float
        The least and the greatest value of ``out``.
    """
    M, N = image.shape
    r = (w.size - 1) // 2
    box = size > 1
    s1 = size // 2 if box else 0
    nlev = 1
    while box and (1 << nlev) <= size:
        nlev += 1
    # virtual rows lo_k .. (clamped to the image: "nearest") kept in a ring of R rows
    ahead = max(r, size - 1 - s1)
    behind = max(r, s1)
    R = 1
    while R < ahead + behind + 2:
        R *= 2
    base = R * ((behind + R) // R + 1)  # keeps (k + base) non-negative for k >= -behind
    mask = R - 1
    rows = np.empty((nlev, R, N), np.float32)  # rows[l, k]: the sum of rows k .. k + 2**l - 1
    gp = np.empty(N + 2 * r, np.float32)
    g = gp[r:r + N]
    cp = np.empty((nlev, N + max(size, 1) - 1), np.float32)
    grow = np.empty(N, np.float32)
    tmax = np.empty(N, np.float32)
    tmin = np.empty(N, np.float32)
    slots = np.empty(2 * r + 1, np.int64)
    # size in binary, highest bit first: block b of 2**lev[b] values at offset off[b], padded
    # with a block of zeros to an even count
    lev = np.zeros(nlev + 1, np.int64)
    off = np.zeros(nlev + 1, np.int64)
    nb = 0
    for b in range(nlev - 1, -1, -1):
        if box and size >> b & 1:
            lev[nb] = b
            if nb:
                off[nb] = off[nb - 1] + (1 << lev[nb - 1])
            nb += 1
    zero = np.zeros(N + max(size, 1), np.float32)
    rest = np.zeros(N, np.float32)
    nb2 = nb + nb % 2
    c32 = np.float32(c)
    rcp = np.float32(1.0 / (size * size)) if box else np.float32(1.0)
    bad = np.float32(0.0)
    hist[:] = 0
    loaded = -behind  # the next virtual row to load
    for i0 in range(0, M, ROWS):
        nr = min(ROWS, M - i0)
        tmax[:] = -np.inf
        tmin[:] = np.inf
        for rr in range(nr):
            i = i0 + rr
            while loaded <= i + ahead:
                k = loaded
                bad += _load(rows[0, (k + base) & mask], image[min(max(k, 0), M - 1)], c32)
                for lv in range(1, nlev):  # the blocks that end at row k
                    h = 1 << (lv - 1)
                    s = k - 2 * h + 1
                    if s >= -behind:
                        _pair(rows[lv, (s + base) & mask], rows[lv - 1, (s + base) & mask],
                              rows[lv - 1, (s + h + base) & mask], False)
                loaded += 1
            for k in range(2 * r + 1):
                slots[k] = (i - r + k + base) & mask
            _gauss_columns(g, rows[0], slots, w, r)
            for j in range(r):
                gp[j] = g[0]
                gp[r + N + j] = g[N - 1]
            _gauss_row(grow, gp, w, r)
            o = out[i]
            if box:
                # the column sums of rows i - s1 .. i - s1 + size - 1, from size's blocks,
                # into the padded row cp[0]
                c0 = cp[0]
                cc = c0[s1:s1 + N]
                for b in range(0, nb2, 2):
                    ta = rows[lev[b], (i - s1 + off[b] + base) & mask]
                    tb = rows[lev[b + 1], (i - s1 + off[b + 1] + base) & mask] if b + 1 < nb else zero[:N]
                    _pair(cc, ta, tb, b > 0)
                for t in range(s1):
                    c0[t] = cc[0]
                for t in range(s1 + N, N + size - 1):
                    c0[t] = cc[N - 1]
                _block_sums(cp, N + size - 1)
                # the row sums: all blocks but the last two into rest, those in the combine
                last = nb2 - 2
                for b in range(0, last, 2):
                    _pair_at(rest, cp[lev[b]], off[b], cp[lev[b + 1]], off[b + 1], b > 0)
                tb = cp[lev[last + 1]] if last + 1 < nb else zero
                _combine(o, grow, rest, cp[lev[last]], off[last], tb, off[last + 1], rcp,
                         tmax, tmin)
            else:
                _combine(o, grow, zero, rows[0, (i + base) & mask], 0, zero, 0, rcp, tmax, tmin)
            if i % 2 == 0:
                _sample(o, sample[i // 2], hist)
        _tile_extremes(tmax, tmin, tile_max[i0 // ROWS], tile_min[i0 // ROWS])
    low, high = _min_max(tile_min, tile_max)
    return bad == 0, low, high
