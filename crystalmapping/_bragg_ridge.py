"""Shape kernels of the compiled ``bragg`` locator: moments, ridge path, ridge background.

Pure numba kernels. A pixel set is given as parallel arrays sorted by the
flat index ``p = (y - y0) * width + (x - x0)`` of its window (row-major
order), with absolute ``y``, ``x`` (row, column; pixel ``(0, 0)`` centred at
the origin) and a weight; every other pixel of the window weighs zero. Sums
over the window are numpy's (:func:`~crystalmapping._bragg_select.sparse_sum`),
so moments agree with ``(weights * yy).sum()`` to the last bit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._bragg_select import KERNEL, guess, median, small_median
from ._bragg_sums import plan, plan_sum3

_EPS = np.finfo(np.float64).eps
#: Adding and subtracting 1.5 * 2**52 rounds a float64 below 2**51 to an integer, half to even.
_ROUND = 6755399441055744.0


@njit(**KERNEL)
def orientation(p, y, x, w, m, size, v3, sums):
    """Eccentricity (0 round, 1 a line) and major-axis angle of a weighted pixel set.

    ``(weights * yy).sum()`` and the like over a window of ``size`` pixels
    whose weights are ``w[:m]`` at ``p[:m]`` and zero elsewhere. ``v3`` is an
    ``(m, 3)`` work array, ``sums`` is ``(leaves, ops, stk, fstk)`` (work
    arrays of :func:`~crystalmapping._bragg_select.plan`).
    """
    leaves, ops, stk, fstk = sums
    no = plan(p, m, size, leaves, ops, stk)[1]
    for i in range(m):
        v3[i, 0] = w[i]
        v3[i, 1] = w[i] * np.float64(y[i])
        v3[i, 2] = w[i] * np.float64(x[i])
    t, sy, sx = plan_sum3(p, v3, leaves, ops, no, fstk)
    if t <= 0:
        return 0.0, 0.0
    ty, tx = sy / t, sx / t
    for i in range(m):
        dy, dx = y[i] - ty, x[i] - tx
        v3[i, 0] = w[i] * (dy * dy)
        v3[i, 1] = w[i] * (dx * dx)
        v3[i, 2] = (w[i] * dy) * dx
    syy, sxx, sxy = plan_sum3(p, v3, leaves, ops, no, fstk)
    myy, mxx, mxy = syy / t, sxx / t, sxy / t
    trace = myy + mxx
    d = mxx - myy
    ecc = np.sqrt(d * d + 4 * (mxy * mxy)) / trace if trace > 0 else 0.0
    return ecc, 0.5 * math.atan2(2 * mxy, mxx - myy)


@njit(**KERNEL)
def _lstsq3(a, b, m):
    """Minimum-norm least squares ``a[:m] @ c ~ b[:m]`` for 3 unknowns, as ``np.linalg.lstsq``.

    Householder QR, then a one-sided Jacobi SVD of the 3 x 3 triangle;
    singular values below ``eps * max(m, 3)`` of the largest count as zero.
    ``a`` and ``b`` are overwritten.
    """
    for j in range(min(m, 3)):
        norm = 0.0
        for i in range(j, m):
            norm += a[i, j] * a[i, j]
        norm = np.sqrt(norm)
        if norm == 0.0:
            continue
        alpha = -norm if a[j, j] >= 0 else norm
        a[j, j] -= alpha
        vv = 0.0
        for i in range(j, m):
            vv += a[i, j] * a[i, j]
        for k in range(j + 1, 3):
            s = 0.0
            for i in range(j, m):
                s += a[i, j] * a[i, k]
            s *= 2.0 / vv
            for i in range(j, m):
                a[i, k] -= s * a[i, j]
        s = 0.0
        for i in range(j, m):
            s += a[i, j] * b[i]
        s *= 2.0 / vv
        for i in range(j, m):
            b[i] -= s * a[i, j]
        a[j, j] = alpha
    u = np.zeros((3, 3))
    qb = np.zeros(3)
    for i in range(min(m, 3)):
        qb[i] = b[i]
        for k in range(i, 3):
            u[i, k] = a[i, k]
    v = np.eye(3)
    for _ in range(60):
        rotated = False
        for pq in range(3):
            p, q = (0, 1) if pq == 0 else ((0, 2) if pq == 1 else (1, 2))
            al = u[0, p] ** 2 + u[1, p] ** 2 + u[2, p] ** 2
            be = u[0, q] ** 2 + u[1, q] ** 2 + u[2, q] ** 2
            ga = u[0, p] * u[0, q] + u[1, p] * u[1, q] + u[2, p] * u[2, q]
            if ga == 0.0 or abs(ga) <= 1e-17 * np.sqrt(al * be):
                continue
            rotated = True
            zeta = (be - al) / (2.0 * ga)
            t = (1.0 if zeta >= 0 else -1.0) / (abs(zeta) + np.sqrt(1.0 + zeta * zeta))
            c = 1.0 / np.sqrt(1.0 + t * t)
            s = c * t
            for i in range(3):
                up, uq = u[i, p], u[i, q]
                u[i, p], u[i, q] = c * up - s * uq, s * up + c * uq
                vp, vq = v[i, p], v[i, q]
                v[i, p], v[i, q] = c * vp - s * vq, s * vp + c * vq
        if not rotated:
            break
    sv = np.empty(3)
    for k in range(3):
        sv[k] = np.sqrt(u[0, k] ** 2 + u[1, k] ** 2 + u[2, k] ** 2)
    cut = _EPS * max(m, 3) * sv.max()
    coef = np.zeros(3)
    for k in range(3):
        if sv[k] > cut:
            proj = (u[0, k] * qb[0] + u[1, k] * qb[1] + u[2, k] * qb[2]) / (sv[k] * sv[k])
            for i in range(3):
                coef[i] += proj * v[i, k]
    return coef


@njit(**KERNEL)
def ridge_path(y, x, w, m, yc, xc, angle, design, rhs):
    """Fit ``across = c0 + c1 * along + c2 * along**2`` to the pixels ``y, x`` weighted by ``w``.

    In the frame of the ridge direction ``angle`` centred on ``(yc, xc)``:
    the reference's weighted least squares.
    """
    ca, sa = np.cos(angle), np.sin(angle)
    for i in range(m):
        dy, dx = np.float64(y[i] - yc), np.float64(x[i] - xc)
        along = dx * ca + dy * sa
        across = dy * ca - dx * sa
        design[i, 0] = 1.0 * w[i]
        design[i, 1] = along * w[i]
        design[i, 2] = (along * along) * w[i]
        rhs[i] = across * w[i]
    return _lstsq3(design, rhs, m)


@njit(**KERNEL)
def offsets(dyx, m, ca, sa, coef, out):
    """Whole-pixel distances across the ridge path ``coef`` (``np.rint``) of the pixels
    at offsets ``dyx[:m]`` (rows ``dy, dx``) from the candidate, into ``out``."""
    c0, c1, c2 = coef[0], coef[1], coef[2]
    for i in range(m):
        dy, dx = np.float64(dyx[i, 0]), np.float64(dyx[i, 1])
        along = dx * ca + dy * sa
        across = dy * ca - dx * sa
        d = across - ((c0 + c1 * along) + c2 * (along * along))
        d = d if abs(d) < 1e15 else 1e15  # far off any band (or nan): no band's offset
        out[i] = int((d + _ROUND) - _ROUND)  # round half to even, as np.rint


@njit(**KERNEL)
def prominence(filtered, yc, xc, angle, coef, distance):
    """How far ``filtered[yc, xc]`` stands above the ridge ``distance`` away on either side.

    Bilinear interpolation with clamped indices, as ``map_coordinates(order=1,
    mode="nearest")`` evaluates it.
    """
    M, N = filtered.shape
    ca, sa = np.cos(angle), np.sin(angle)
    best = -np.inf
    for side in range(2):
        s = -np.float64(distance) if side == 0 else np.float64(distance)
        across = coef[1] * s + coef[2] * (s * s)
        cy = (yc + s * sa) + across * ca
        cx = (xc + s * ca) - across * sa
        fy, fx = np.floor(cy), np.floor(cx)
        wy0 = 1.0 - (cy - fy)
        wx0 = 1.0 - (cx - fx)
        wy = (wy0, 1.0 - wy0)
        wx = (wx0, 1.0 - wx0)
        iy, ix = int(fy), int(fx)
        t = 0.0
        for a in range(2):
            yy = min(max(iy + a, 0), M - 1)
            for b in range(2):
                xx = min(max(ix + b, 0), N - 1)
                t += (filtered[yy, xx] * wy[a]) * wx[b]
        best = max(best, t)
    return filtered[yc, xc] - best


@njit(**KERNEL)
def band_model(vals, offs, m, radius, model, work):
    """Background per whole-pixel offset band across a ridge: the reference's ``_ridge_background``.

    ``vals[:m]`` and ``offs[:m]`` are the values and offsets of the ``near``
    pixels. ``model[d + radius + 1]`` becomes the median of the band at offset
    ``d`` (``-radius - 1 <= d <= radius + 1``) when it holds at least 4 pixels,
    else the median of all of them, which is also returned (the value of any
    other offset). ``work`` holds ``2 m + 64`` values.
    """
    flat = _median_any(vals, m, work)
    nb = 2 * radius + 3
    start = np.zeros(nb + 1, np.int64)
    for i in range(m):
        b = offs[i] + radius + 1
        if 0 <= b < nb:
            start[b + 1] += 1
    for b in range(nb):
        start[b + 1] += start[b]
    fill = start[:nb].copy()
    for i in range(m):  # the bands, one after the other (counting sort)
        b = offs[i] + radius + 1
        if 0 <= b < nb:
            work[fill[b]] = vals[i]
            fill[b] += 1
    for b in range(nb):
        k = start[b + 1] - start[b]
        model[b] = _median_any(work[start[b]:], k, work[m:]) if k >= 4 else flat
    return flat


@njit(**KERNEL)
def _median_any(a, n, work):
    """``np.median(a[:n])``: by insertion sort of a copy when short, else by counting."""
    if n <= 48:
        for i in range(n):
            work[i] = a[i]
        return small_median(work, n)
    lo, hi = guess(a, n, work)
    return median(a, n, lo, hi)


@njit(**KERNEL)
def model_at(off, radius, model, flat):
    """The band model's background of a pixel at whole-pixel offset ``off``."""
    b = off + radius + 1
    return model[b] if 0 <= b < 2 * radius + 3 else flat
