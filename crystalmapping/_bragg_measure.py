"""Per-candidate measurement of the compiled ``bragg`` locator.

:func:`measure` is the reference ``_measure`` with its recentring loop, for a
batch of candidates, reading only the window around each (see
:mod:`crystalmapping._bragg_window` for the pixel sets and conventions).
Medians are exact order statistics found by counting passes
(:mod:`crystalmapping._bragg_select`); sums over the window are numpy's,
in numpy's order (:mod:`crystalmapping._bragg_sums`), so each row equals the
reference's. The full measurement (size, ecc, masses, amplitude, ridge_snr)
is made once per candidate, at its last position, and only when it is not
weak, as the reference's loop does.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._bragg_bound import proven_weak
from ._bragg_ridge import band_model, model_at, offsets, orientation, prominence, ridge_path
from ._bragg_select import KERNEL, deviations, guess, median
from ._bragg_sums import pairwise_sum, plan, plan_sum, plan_sum3
from ._bragg_window import (dense_weights, geometry, near_values, near_widths, pixels,
                             prefetch_window, ring_values, window)

#: MAD to standard deviation of a normal distribution.
MAD_TO_STD = 1.4826
#: Columns of :func:`measure`'s output.
COLUMNS = ("y", "x", "mass", "size", "ecc", "signal", "raw_mass", "amplitude", "snr", "ridge_snr")


@njit(**KERNEL)
def _skip_cycle(path, moves, max_iterations):
    """``(y, x, moves)`` to go on from, after a move to ``path[moves]``.

    A position is measured the same way whenever it is reached, so a move
    back to one visited before repeats the cycle since then until the moves
    run out: go straight to the position the last move reaches (the reference
    measures its way there).
    """
    y, x = path[moves, 0], path[moves, 1]
    for j in range(moves):
        if path[j, 0] == y and path[j, 1] == x:
            k = j + (max_iterations - j) % (moves - j)
            return path[k, 0], path[k, 1], max_iterations
    return y, x, moves


@njit(**KERNEL)
def measure(filtered, image, cand, radius, outer, global_noise, level, sigma, min_snr,
            max_iterations, recentre, out, tile_max, tile_min, max_ecc, bound):
    """Measure candidates as the reference ``_measure`` does; one row of :data:`COLUMNS` each.

    Parameters
    ----------
    filtered : (M, N) float64 array
        The band-passed image.
    image : (M, N) float32 or float64 array
        The image (``mass``, ``raw_mass`` and ``amplitude`` read it).
    cand : (n, 2) int64 array
        Candidate pixels ``(row, column)``.
    global_noise : float
        The least noise to divide by.
    level, sigma : float
        The image's noise level and spread (where the first medians are looked for).
    recentre : bool
        True: the ``bragg`` locator's loop (move to the centroid, at most
        ``max_iterations`` times); a weak candidate (``snr < min_snr``) keeps
        NaN but for ``y``, ``x``, ``signal`` and ``snr``. False: measure in full
        where the candidates are (the ``trackpy`` locator).
    out : (n, 10) float64 array
    tile_max, tile_min : 2-D float64 arrays
        The maxima and minima of ``filtered`` over tiles (see
        :func:`~crystalmapping._bragg_filters.bandpass_into`); read when ``bound``.
    max_ecc : float
        With ``recentre``, a candidate more elongated than this whose ``ridge_snr`` is
        below ``min_snr`` (rejected as elongated) keeps NaN in ``mass``, ``raw_mass``
        and ``amplitude``: they are not measured.
    bound : bool
        With ``recentre``, first try to prove a candidate weak without measuring it
        (:func:`~crystalmapping._bragg_bound.proven_weak`, for finite images only);
        such a candidate's row is NaN but ``snr``, which is ``-inf``.
    """
    M, N = filtered.shape
    shape = (M, N)
    disk_rel, near_rel, gap = geometry(radius, outer)
    widths = near_widths(radius, outer)
    side = 2 * outer + 1
    near_p = np.empty(near_rel.shape[0], np.int64)  # flat indices in an unclipped window
    for i in range(near_rel.shape[0]):
        near_p[i] = (near_rel[i, 0] + outer) * side + near_rel[i, 1] + outer
    cap = side * side
    nnear, ndisk = near_rel.shape[0], disk_rel.shape[0]
    ring = np.empty(cap)
    dev = np.empty(cap)
    near = np.empty((nnear, 3), np.int64)
    disk = np.empty((ndisk, 3), np.int64)
    ep, ey, ex = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    nv = np.empty(nnear)
    noff = np.empty(nnear, np.int64)
    doff = np.empty(ndisk, np.int64)
    dyx = np.empty((max(nnear, ndisk), 2), np.int64)
    br = np.empty(nnear, np.int64)  # bright pixels: indices into near
    bp, by, bx = np.empty(nnear, np.int64), np.empty(nnear, np.int64), np.empty(nnear, np.int64)
    bw = np.empty(nnear)
    wc = np.empty(ndisk)
    above = np.empty(ndisk)
    rest = np.empty(ndisk)
    gg = np.empty(ndisk)
    work = np.empty(2 * cap + 64)
    v3 = np.empty((cap, 3))
    design = np.empty((nnear, 3))
    rhs = np.empty(nnear)
    model = np.empty(2 * radius + 3)
    model_im = np.empty(2 * radius + 3)
    stk, fstk = np.empty((5, 80), np.int64), np.empty(264)
    leaves, ops = np.empty((cap // 64 + 2, 4), np.int64), np.empty(cap // 32 + 4, np.int64)
    sums = (leaves, ops, stk, fstk)
    dleaves, dops = np.empty((cap // 64 + 2, 4), np.int64), np.empty(cap // 32 + 4, np.int64)
    dkey = (-1, -1, -1, -1)  # the window geometry the disk's plan is for
    dno = 0
    dp = np.empty(ndisk, np.int64)
    n_inner = 0  # pixels of a whole window that are not ring
    for i in range(side):
        if gap[i] >= 0:
            n_inner += 2 * min(gap[i], outer) + 1
    reach = max_iterations * radius
    path = np.empty((max_iterations + 1, 2), np.int64)  # the positions after 0, 1, ... moves
    # In row-major order, so that neighbouring windows (along a powder ring) share the
    # cache; each candidate's row of ``out`` stays where the caller put it.
    order = np.argsort(cand[:, 0] * N + cand[:, 1], kind="mergesort")
    # the last position whose ring was measured, far from every candidate until one is
    near_y, near_x, near_bg, near_noise, near_mad = -(2 * outer + 2) * M, 0, 0.0, 0.0, 0.0
    for oi in range(order.size):
        ci = order[oi]
        yc, xc = cand[ci, 0], cand[ci, 1]
        if bound and recentre and proven_weak(tile_max, tile_min, shape, yc, xc, reach,
                                              outer, n_inner, global_noise, min_snr):
            out[ci, :] = np.nan
            out[ci, 8] = -np.inf
            continue
        if oi + 1 < order.size:  # the next window, from memory while this one is measured
            cn = order[oi + 1]
            prefetch_window(filtered, cand[cn, 0], cand[cn, 1], outer)
        moves = 0
        path[0, 0], path[0, 1] = yc, xc
        if abs(yc - near_y) <= outer and abs(xc - near_x) <= outer:
            # the last measured window overlaps this one: its medians are close to these
            g_lo, g_hi = near_bg - 0.1 * near_noise, near_bg + 0.1 * near_noise
            mad_lo, mad_hi = 0.9 * near_mad, 1.1 * near_mad
        else:
            g_lo, g_hi = level - 0.25 * sigma, level + 0.25 * sigma
            mad_lo, mad_hi = 0.75 * sigma / MAD_TO_STD, 1.25 * sigma / MAD_TO_STD
        while True:
            y0, x0, width, size = window(shape, yc, xc, outer)
            nr = ring_values(filtered, yc, xc, outer, gap, ring)
            interior = size == cap
            if not interior:
                pixels(near_rel, yc, xc, outer, shape, near)
            nn = near_values(filtered, yc, xc, outer, gap, widths, nv)
            nd = pixels(disk_rel, yc, xc, outer, shape, disk)
            key = (yc - y0, xc - x0, width, size)
            if key != dkey:
                dp[:nd] = disk[:nd, 0]
                dno = plan(dp, nd, size, dleaves, dops, stk)[1]
                dkey = key
            enough = nr >= 16
            # -- the exact measurement ---------------------------------------------------
            if enough:
                background = median(ring, nr, g_lo, g_hi)
                deviations(ring, nr, background, dev)
                mad = median(dev, nr, mad_lo, mad_hi)
                noise = MAD_TO_STD * mad
                # the next position's medians are close to these
                g_lo, g_hi = background - 0.02 * noise, background + 0.02 * noise
                mad_lo, mad_hi = 0.97 * mad, 1.03 * mad
                near_y, near_x, near_bg, near_noise, near_mad = yc, xc, background, noise, mad
            else:
                background, noise = 0.0, 0.0
            noise = global_noise if global_noise > noise else noise
            height = filtered[yc, xc] - background
            snr = height / noise if noise > 0 else np.inf
            nb = np.int64(0)  # not a literal: one compiled version of the callees
            limit = 3 * noise
            for i in range(nn):
                if nv[i] - background > limit:
                    br[nb] = i
                    nb += 1
            for j in range(nb):
                i = br[j]
                if interior:
                    bp[j], by[j], bx[j] = near_p[i], yc + near_rel[i, 0], xc + near_rel[i, 1]
                else:
                    bp[j], by[j], bx[j] = near[i, 0], near[i, 1], near[i, 2]
                bw[j] = nv[i] - background
            ridge = False
            angle = ca = sa = flat = 0.0
            coef = np.zeros(3)
            if enough and nb >= radius:
                ridge_ecc, angle = orientation(bp, by, bx, bw, nb, size,
                                               v3, sums)
                if ridge_ecc > 0.5:
                    ridge = True
                    coef = ridge_path(by, bx, bw, nb, yc, xc, angle, design, rhs)
                    ca, sa = np.cos(angle), np.sin(angle)
                    if interior:
                        offsets(near_rel, nn, ca, sa, coef, noff)
                    else:
                        for i in range(nn):
                            dyx[i, 0], dyx[i, 1] = near[i, 1] - yc, near[i, 2] - xc
                        offsets(dyx, nn, ca, sa, coef, noff)
                    for i in range(nd):
                        dyx[i, 0], dyx[i, 1] = disk[i, 1] - yc, disk[i, 2] - xc
                    offsets(dyx, nd, ca, sa, coef, doff)
                    flat = band_model(nv, noff, nn, radius, model, work)
            # the centroid of the disk above the background
            for i in range(nd):
                y, x = disk[i, 1], disk[i, 2]
                bg = background
                if ridge:
                    bg = model_at(doff[i], radius, model, flat)
                a = filtered[y, x] - bg
                above[i] = a
                wc[i] = a if a > 0 else 0.0
            for i in range(nd):
                v3[i, 0] = wc[i]
                v3[i, 1] = wc[i] * np.float64(disk[i, 1])
                v3[i, 2] = wc[i] * np.float64(disk[i, 2])
            total, sy, sx = plan_sum3(dp, v3, dleaves, dops, dno, fstk)
            if total > 0:
                cy, cx = sy / total, sx / total
            else:
                cy, cx = np.float64(yc), np.float64(xc)
            if recentre:
                ny, nx = int(np.rint(cy)), int(np.rint(cx))
                if (moves < max_iterations and (ny != yc or nx != xc)
                        and 0 <= ny < M and 0 <= nx < N):
                    yc, xc = ny, nx
                    moves += 1
                    path[moves, 0], path[moves, 1] = yc, xc
                    yc, xc, moves = _skip_cycle(path, moves, max_iterations)
                    continue
            row = out[ci]
            row[:] = np.nan
            row[0], row[1], row[5], row[8] = cy, cx, height, snr
            if recentre and snr < min_snr:
                break
            # -- the full measurement ------------------------------------------------
            if total > 0:
                for i in range(nd):
                    dy, dx = disk[i, 1] - cy, disk[i, 2] - cx
                    work[i] = wc[i] * (dy * dy + dx * dx)
                row[3] = np.sqrt(plan_sum(dp, work, dleaves, dops, dno, fstk) / total / 2)
            else:
                row[3] = 0.0
            half = 0.5 * height
            if half >= 0:  # the weights are zero off the disk
                m = np.int64(0)
                for i in range(nd):
                    w = (filtered[disk[i, 1], disk[i, 2]] - background) - half
                    if w > 0:
                        ep[m], ey[m], ex[m] = disk[i, 0], disk[i, 1], disk[i, 2]
                        dev[m] = w
                        m += 1
            else:  # every pixel of the window weighs
                m = dense_weights(filtered, yc, xc, outer, background, half, radius * radius,
                                  ep, ey, ex, dev)
            row[4] = orientation(ep, ey, ex, dev, m, size, v3,
                                 sums)[0]
            if not ridge or noise <= 0:
                row[9] = snr
            else:
                near_values(filtered, yc, xc, outer, gap, widths, nv)
                for i in range(nb):
                    j = br[i]
                    rhs[i] = nv[j] - model_at(noff[j], radius, model, flat)
                lo, hi = guess(rhs, nb, work)
                med = median(rhs, nb, lo, hi)
                deviations(rhs, nb, med, dev)
                lo, hi = guess(dev, nb, work)
                ridge_noise = MAD_TO_STD * median(dev, nb, lo, hi)
                prom = prominence(filtered, yc, xc, angle, coef, radius)
                row[9] = prom / (noise if noise >= ridge_noise else ridge_noise)
            if recentre and row[4] > max_ecc and row[9] < min_snr:
                break  # rejected as elongated: its masses are not wanted
            # the image's background: flat, or along the ridge
            if ridge:
                near_values(image, yc, xc, outer, gap, widths, nv)
                flat_im = band_model(nv, noff, nn, radius, model_im, work)
            elif enough:
                n_im = ring_values(image, yc, xc, outer, gap, ring)
                lo, hi = guess(ring, n_im, work)
                flat_im = median(ring, n_im, lo, hi)
            else:
                flat_im = 0.0
            wid = (2 * radius + 1) / 6.0
            den = 2 * wid * wid
            for i in range(nd):
                y, x = disk[i, 1], disk[i, 2]
                bgi = flat_im
                if ridge:
                    bgi = model_at(doff[i], radius, model_im, flat_im)
                rest[i] = np.float64(image[y, x]) - bgi
                dy, dx = y - cy, x - cx
                g = np.exp(-(dy * dy + dx * dx) / den)
                work[i] = g * rest[i]
                gg[i] = g * g
            row[2] = pairwise_sum(above, nd, stk, fstk)
            row[6] = pairwise_sum(rest, nd, stk, fstk)
            num = plan_sum(dp, work, dleaves, dops, dno, fstk)
            row[7] = num / max(plan_sum(dp, gg, dleaves, dops, dno, fstk), 1e-300)
            break
