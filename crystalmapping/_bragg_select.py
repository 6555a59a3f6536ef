"""Exact order statistics and arithmetic for the compiled ``bragg`` locator.

Pure numba kernels on 1-D float64 buffers, shared by the full-frame passes
(:mod:`crystalmapping._bragg_filters`, :mod:`crystalmapping._bragg_noise`)
and the per-candidate measurement (:mod:`crystalmapping._bragg_measure`).
Each reproduces a numpy result exactly, not approximately:

* :func:`median` is ``np.median`` (the mean of the two middle values for an
  even count), found by counting passes over the buffer instead of a sort:
  a bracket ``[lo, hi)`` holding the wanted ranks is narrowed by
  interpolation until one threshold splits them, then the values next to it
  are read off exactly. Every pass is a plain loop that compiles to SIMD.
* :func:`div` is IEEE division by a constant from its correctly rounded
  reciprocal and two fused multiply-adds (Markstein's correction: with
  ``q = x * (1 / d)`` within an ulp, ``q + (x - q d) (1 / d)`` rounded once is
  ``x / d`` correctly rounded), so scipy's ``x / d`` is reproduced bit for bit
  at a fraction of a division's cost.
* :func:`bin16` maps values to 65536 histogram bins in their order (the top
  bits of the float64 order key), for the exact noise of a whole frame.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

#: Compile on first use, cache to disk (loaded once per process), release the GIL.
KERNEL = dict(cache=True, nogil=True, error_model="numpy")

_SIGN_OFF = np.int64(0x7FFFFFFFFFFFFFFF)
_KEY_MAX = np.int64(0x7FFFFFFFFFFFFFFF)
_KEY_MIN = np.int64(-0x7FFFFFFFFFFFFFFF - 1)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` with one rounding (LLVM's ``fma``)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.DoubleType(), [ir.DoubleType()] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f64")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _bits(typingctx, x):
    """The IEEE bit pattern of a float64, as an int64."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _from_bits(typingctx, k):
    """The float64 with bit pattern ``k``."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@njit(**KERNEL)
def _key(x):
    """An int64 that orders as the float ``x`` does (-0.0 just below +0.0); a float32 is
    keyed by its (exact) float64 value."""
    b = _bits(np.float64(x))
    return b ^ ((b >> 63) & _SIGN_OFF)


@njit(**KERNEL)
def _unkey(k):
    return _from_bits(k ^ ((k >> 63) & _SIGN_OFF))


#: Bins of :func:`bin16`: the top 16 bits of a value's order key.
NBINS = 65536


@njit(**KERNEL)
def bin16(v):
    """A histogram bin of ``v`` that never decreases as ``v`` grows: the top
    16 bits of its order key (sign, exponent, 4 bits of mantissa)."""
    return (_key(v) >> 48) + 32768


@njit(**KERNEL)
def bin_bounds(b):
    """``(lo, hi)``: every value of bin ``b`` lies strictly between them."""
    k0 = np.int64(b - 32768) << 48
    lo = _unkey(k0)
    hi = _unkey(k0 + np.int64(0xFFFFFFFFFFFF))
    return np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)


@njit(**KERNEL)
def div(x, d, rcp):
    """``x / d`` correctly rounded, given ``rcp = 1.0 / d`` (finite ``x``)."""
    q = x * rcp
    return _fma(_fma(-q, d, x), rcp, q)


# -- counting passes ------------------------------------------------------------------


@njit(**KERNEL)
def _count_lt(a, n, t):
    k = 0
    for i in range(n):
        k += a[i] < t
    return k


@njit(**KERNEL)
def _count2(a, n, t1, t2):
    """``#(a < t1), #(a < t2)`` in one pass."""
    k1 = k2 = 0
    for i in range(n):
        v = a[i]
        k1 += v < t1
        k2 += v < t2
    return k1, k2


@njit(**KERNEL)
def _min_ge(a, n, t):
    """The smallest value ``>= t`` (``inf`` if none); an integer reduction, so SIMD."""
    m = _KEY_MAX
    for i in range(n):
        v = a[i]
        m = min(m, _key(v) if v >= t else _KEY_MAX)
    return np.inf if m == _KEY_MAX else _unkey(m)


@njit(**KERNEL)
def _max_lt(a, n, t):
    """The largest value ``< t`` (``-inf`` if none)."""
    m = _KEY_MIN
    for i in range(n):
        v = a[i]
        m = max(m, _key(v) if v < t else _KEY_MIN)
    return -np.inf if m == _KEY_MIN else _unkey(m)


@njit(**KERNEL)
def _sorted_select(a, n, k, k2):
    """Fallback of :func:`_select`: sort a copy."""
    v = a[:n].copy()
    v.sort()
    return v[k], v[k2]


@njit(**KERNEL)
def establish(a, n, k, k2, lo, hi, st):
    """Start a bracket of the ranks ``k`` and ``k2`` (``k2`` is ``k`` or ``k + 1``) of ``a[:n]``.

    ``[lo, hi)`` is a guess, widened when wrong. ``st`` (7 floats) becomes
    ``lo, hi, clo, chi, done, x, y`` with ``clo = #(a < lo) <= k`` and
    ``chi = #(a < hi) > k2``: the wanted values lie in ``[lo, hi)``.
    ``done`` is 1 when a sort had to find them (``x``, ``y``): values not finite.
    """
    st[4] = 0.0
    step = max(hi - lo, 1e-9 * max(abs(lo), abs(hi)), 1e-300)
    if not hi > lo:
        hi = lo + step
    clo, chi = _count2(a, n, lo, hi)
    while clo > k:
        if clo > k2:
            hi, chi = lo, clo
        lo = lo - step
        step *= 4.0
        if not lo > -np.inf:  # not finite values: leave them to a sort
            st[5], st[6] = _sorted_select(a, n, k, k2)
            st[4] = 1.0
            return
        clo = _count_lt(a, n, lo)
    while chi <= k2:
        if chi <= k:
            lo, clo = hi, chi
        hi = hi + step
        step *= 4.0
        if not hi < np.inf:
            st[5], st[6] = _sorted_select(a, n, k, k2)
            st[4] = 1.0
            return
        chi = _count_lt(a, n, hi)
    st[0], st[1], st[2], st[3] = lo, hi, clo, chi


@njit(**KERNEL)
def narrow(a, n, k, k2, st, goal):
    """Shrink the bracket ``st`` until it holds at most ``goal`` values (or the answer)."""
    lo, hi, clo, chi = st[0], st[1], int(st[2]), int(st[3])
    target = k + 1.0 if k2 > k else k + 0.5  # the count below a threshold between them
    for _ in range(64):
        if st[4] != 0.0 or chi - clo <= goal:
            break
        span = chi - clo
        e = 0.3 * np.sqrt(span) + 0.01 * span + 0.5
        t1 = lo + (hi - lo) * ((target - e - clo) / span)
        t2 = lo + (hi - lo) * ((target + e - clo) / span)
        t1 = t1 if lo < t1 < hi else lo + (hi - lo) * 0.25
        t2 = t2 if t1 < t2 < hi else t1 + (hi - t1) * 0.5
        if not (lo < t1 < t2 < hi):
            t1 = lo + (hi - lo) * 0.5
            if not lo < t1 < hi:  # no float between lo and hi: the bracket holds lo alone
                st[4], st[5], st[6] = 1.0, lo, lo
                break
            t2 = t1
        c1, c2 = _count2(a, n, t1, t2)
        if k < c1 <= k2:  # t1 splits rank k from rank k + 1
            st[4], st[5], st[6] = 1.0, _max_lt(a, n, t1), _min_ge(a, n, t1)
            break
        if k < c2 <= k2:
            st[4], st[5], st[6] = 1.0, _max_lt(a, n, t2), _min_ge(a, n, t2)
            break
        if c2 <= k:
            lo, clo = t2, c2
        elif c1 <= k:
            lo, clo, hi, chi = t1, c1, t2, c2
        else:
            hi, chi = t1, c1
        if chi - clo == span:  # ties stall the counts: step past the bracket's least value
            x = _min_ge(a, n, lo)
            cx = _count_lt(a, n, np.nextafter(x, np.inf))
            if cx > k:
                y = x if cx > k2 else _min_ge(a, n, np.nextafter(x, np.inf))
                st[4], st[5], st[6] = 1.0, x, y
                break
            lo, clo = np.nextafter(x, np.inf), cx
    st[0], st[1], st[2], st[3] = lo, hi, clo, chi


@njit(**KERNEL)
def finish(a, n, k, k2, st):
    """The values of ranks ``k`` and ``k2`` from the bracket ``st``."""
    for _ in range(64):
        if st[4] != 0.0:
            return st[5], st[6]
        lo, hi, clo, chi = st[0], st[1], int(st[2]), int(st[3])
        if clo == k:  # x_k is the smallest value in the bracket
            x = _min_ge(a, n, lo)
            if k2 == k or _count_lt(a, n, np.nextafter(x, np.inf)) > k2:
                return x, x
            return x, _min_ge(a, n, np.nextafter(x, np.inf))
        if chi == k2 + 1:  # x_k2 is the largest value in the bracket
            y = _max_lt(a, n, hi)
            if k2 == k or _count_lt(a, n, y) <= k:
                return y, y
            return _max_lt(a, n, y), y
        narrow(a, n, k, k2, st, max(chi - clo - 1, 1))
    return _sorted_select(a, n, k, k2)


@njit(**KERNEL)
def _select(a, n, k, k2, lo, hi):
    """The values of rank ``k`` and ``k2`` (0-based, ``k2`` is ``k`` or ``k + 1``) of ``a[:n]``.

    ``[lo, hi)`` is a guess of where they lie; it is widened when wrong.
    Each pass counts below two thresholds placed by interpolation a margin
    either side of the wanted rank, so the bracket shrinks from both ends.
    """
    st = np.empty(7)
    establish(a, n, k, k2, lo, hi, st)
    return finish(a, n, k, k2, st)


@njit(**KERNEL)
def median(a, n, lo, hi):
    """``np.median(a[:n])`` (``n >= 1``); ``[lo, hi)`` is a guess of where it lies."""
    k = (n - 1) // 2
    x, y = _select(a, n, k, k + 1 - n % 2, lo, hi)
    return x if n % 2 else (x + y) / 2.0


@njit(**KERNEL)
def deviations(a, n, c, out):
    """``out[:n] = np.abs(a[:n] - c)``."""
    for i in range(n):
        out[i] = abs(a[i] - c)



@njit(**KERNEL)
def small_median(a, n):
    """``np.median(a[:n])`` of a short buffer by quickselect (``a`` is reordered)."""
    h = n // 2
    lo, hi = 0, n - 1
    while lo < hi:  # Hoare partition around a median of three, until a[h] is in place
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi]
        p = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while a[i] < p:
                i += 1
            while a[j] > p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if h <= j:
            hi = j
        elif h >= i:
            lo = i
        else:
            break
    if n % 2:
        return a[h]
    below = a[0]
    for i in range(1, h):
        below = a[i] if a[i] > below else below
    return (below + a[h]) / 2.0


@njit(**KERNEL)
def guess(a, n, work):
    """A bracket ``(lo, hi)`` around the median of ``a[:n]`` from 31 evenly spread values."""
    m = min(n, 31)
    for i in range(m):
        work[i] = a[(i * n) // m]
    small_median(work, m)
    return work[m // 4], work[(3 * m) // 4]
