"""The pixels around a candidate, for the compiled ``bragg`` locator's measurement.

Around a candidate at ``(yc, xc)`` of an ``(M, N)`` image (indexed ``[row,
column]``, pixel ``(0, 0)`` centred at the origin) the measurement reads the
square of half-side ``outer``, clipped to the image (the *window*). With
``r2`` the squared distance of a pixel from the candidate:

* ``disk``: ``r2 <= radius**2`` (the peak);
* ``ring``: ``r2 > (2 radius + 1)**2`` (its surroundings: background and noise);
* ``near``: the ring's pixels with ``r2 <= (3 radius + 1)**2`` (where a ridge
  is looked for).

Pixel lists are ``(p, y, x)`` rows in row-major order, ``p`` the flat index
in the window, as the reference's masks select them.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._bragg_select import KERNEL


@njit(**KERNEL)
def _isqrt(v):
    """The largest ``h >= 0`` with ``h * h <= v`` (-1 if ``v < 0``)."""
    if v < 0:
        return -1
    h = int(np.sqrt(np.float64(v)))
    while h * h > v:
        h -= 1
    while (h + 1) * (h + 1) <= v:
        h += 1
    return h


@njit(**KERNEL)
def geometry(radius, outer):
    """Offsets ``(dy, dx)`` of the disk and near pixels (row-major), and the ring's gaps.

    ``gap[dy + outer]`` is the largest ``|dx|`` that is not ring in row ``dy``
    (-1: the whole row is ring).
    """
    rd2, rr2, rn2 = radius * radius, (2 * radius + 1) ** 2, (3 * radius + 1) ** 2
    side = 2 * outer + 1
    disk = np.empty((side * side, 2), np.int64)
    near = np.empty((side * side, 2), np.int64)
    gap = np.empty(side, np.int64)
    nd = nn = 0
    for dy in range(-outer, outer + 1):
        gap[dy + outer] = _isqrt(rr2 - dy * dy)
        for dx in range(-outer, outer + 1):
            r2 = dy * dy + dx * dx
            if r2 <= rd2:
                disk[nd, 0], disk[nd, 1] = dy, dx
                nd += 1
            if rr2 < r2 <= rn2:
                near[nn, 0], near[nn, 1] = dy, dx
                nn += 1
    return disk[:nd].copy(), near[:nn].copy(), gap


@njit(**KERNEL)
def window(shape, yc, xc, outer):
    """``(y0, x0, width, size)`` of the window around ``(yc, xc)``."""
    M, N = shape
    y0, x0 = max(yc - outer, 0), max(xc - outer, 0)
    width = min(xc + outer + 1, N) - x0
    return y0, x0, width, (min(yc + outer + 1, M) - y0) * width


@njit(**KERNEL)
def ring_values(src, yc, xc, outer, gap, ring):
    """The values of ``src`` on the ring around ``(yc, xc)`` as float64; returns their number."""
    M, N = src.shape
    x0, x1 = max(xc - outer, 0), min(xc + outer + 1, N)
    n = 0
    for y in range(max(yc - outer, 0), min(yc + outer + 1, M)):
        h = gap[y - yc + outer]
        a, b = (x1, x1) if h < 0 else (min(max(xc - h, x0), x1), min(max(xc + h + 1, x0), x1))
        for lo, hi in ((x0, a), (b, x1)):
            _copy_row(src, y, lo, hi, ring, n)
            n += hi - lo
    return n


@njit(**KERNEL)
def _copy_row(src, y, lo, hi, dst, at):
    """``dst[at:at + hi - lo] = src[y, lo:hi]`` as float64, without making views (their
    reference counts cost more than the copy) and with unsigned indices (numba then
    skips the negative-index wraparound, so LLVM vectorizes the loop)."""
    uy = np.uint64(y)
    shift = np.uint64(at - lo)
    for x in range(np.uint64(lo), np.uint64(max(hi, lo))):
        dst[x + shift] = np.float64(src[uy, x])


@njit(**KERNEL)
def pixels(rel, yc, xc, outer, shape, pix):
    """Pixels ``(p, y, x)`` of the offsets ``rel`` inside the image; returns their number."""
    M, N = shape
    y0, x0, width, _ = window(shape, yc, xc, outer)
    n = 0
    for i in range(rel.shape[0]):
        y, x = yc + rel[i, 0], xc + rel[i, 1]
        if 0 <= y < M and 0 <= x < N:
            pix[n, 0] = (y - y0) * width + (x - x0)
            pix[n, 1] = y
            pix[n, 2] = x
            n += 1
    return n


@njit(**KERNEL)
def dense_weights(filtered, yc, xc, outer, background, half, rd2, p, py, px, w):
    """Every window pixel weighing ``max((disk ? f - background : 0) - half, 0) > 0``:
    its flat index, row, column and weight into ``p, py, px, w``; returns their number."""
    M, N = filtered.shape
    y0, x0, width, _ = window((M, N), yc, xc, outer)
    m = 0
    for y in range(y0, min(yc + outer + 1, M)):
        for x in range(x0, x0 + width):
            dy, dx = y - yc, x - xc
            v = (filtered[y, x] - background if dy * dy + dx * dx <= rd2 else 0.0) - half
            if v > 0:
                p[m], py[m], px[m], w[m] = (y - y0) * width + (x - x0), y, x, v
                m += 1
    return m


@njit(**KERNEL)
def near_widths(radius, outer):
    """``w[dy + outer]``: the largest ``|dx|`` of a near pixel in row ``dy`` (-1: none)."""
    rn2 = (3 * radius + 1) ** 2
    w = np.empty(2 * outer + 1, np.int64)
    for dy in range(-outer, outer + 1):
        w[dy + outer] = _isqrt(rn2 - dy * dy)
    return w


@njit(**KERNEL)
def near_values(src, yc, xc, outer, gap, widths, vals):
    """The values of ``src`` at the near pixels, in the order of :func:`pixels`; their number."""
    M, N = src.shape
    n = 0
    for y in range(max(yc - outer, 0), min(yc + outer + 1, M)):
        hn = widths[y - yc + outer]
        if hn < 0:
            continue
        h = gap[y - yc + outer]
        lo1, hi2 = max(xc - hn, 0), min(xc + hn + 1, N)
        if h < 0:
            hi1 = lo2 = hi2
        else:
            hi1, lo2 = min(max(xc - h, 0), N), min(max(xc + h + 1, 0), N)
        for lo, hi in ((lo1, max(hi1, lo1)), (max(lo2, lo1), hi2)):
            if h < 0 and lo != lo1:
                break
            _copy_row(src, y, lo, hi, vals, n)
            n += max(hi - lo, 0)
    return n


@intrinsic
def _prefetch(typingctx, arr, y, x):
    """Ask the CPU to bring ``arr[y, x]``'s cache line in (no effect on results)."""
    sig = types.void(arr, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer2(
            context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
            strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
            inds=[args[1], args[2]], wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(**KERNEL)
def prefetch_window(src, yc, xc, outer):
    """Prefetch the window around ``(yc, xc)`` of ``src``, a line of 8 values at a time."""
    M, N = src.shape
    x0, x1 = max(xc - outer, 0), min(xc + outer + 1, N)
    for y in range(max(yc - outer, 0), min(yc + outer + 1, M)):
        for x in range(x0, x1, 8):
            _prefetch(src, y, x)
        _prefetch(src, y, x1 - 1)
