"""numpy's pairwise summation, reproduced for the compiled ``bragg`` locator.

``ndarray.sum`` of a contiguous float64 array adds in a fixed order: halves
(rounded down to multiples of 8) until a block is at most 128 long, each
block with eight running sums. :func:`pairwise_sum` follows that order on a
dense array; :func:`plan` and :func:`plan_sum` follow it for an array that is
zero but at a few entries (a peak's pixels in its window), visiting only the
blocks that hold them: a zero adds nothing to a partial sum. The results are
numpy's to the last bit (up to the sign of a zero total).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._bragg_select import KERNEL


@njit(**KERNEL)
def _leaf(a, lo, n):
    # numpy's pairwise_sum for n <= 128: eight running sums, then the rest in order.
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        j = lo + i
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(**KERNEL)
def _leaf_sparse(idx, val, i0, i1, lo, n, r):
    # The same leaf over the entries idx[i0:i1] (ascending) of [lo, lo + n); the
    # others are zero, and adding zero changes no partial sum.
    if n < 8:
        res = 0.0
        for i in range(i0, i1):
            res += val[i]
        return res
    r[:] = 0.0
    stop = lo + n - n % 8
    i = i0
    while i < i1 and idx[i] < stop:
        p = idx[i] - lo
        if p < 8:
            r[p] = val[i]
        else:
            r[p % 8] += val[i]
        i += 1
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < i1:
        res += val[i]
        i += 1
    return res


def scratch():
    """Work arrays of :func:`pairwise_sum`, :func:`plan` and :func:`plan_sum3` (allocate once)."""
    return np.empty((5, 80), np.int64), np.empty(264)


@njit(**KERNEL)
def _tree(val, n, stk, fstk):
    """numpy's pairwise sum of ``val[:n]`` (halves rounded down to multiples of 8,
    leaves of at most 128), without recursion."""
    lo_s, n_s, state = stk[0], stk[1], stk[4]
    left = fstk[:80]
    sp = 0
    lo_s[0], n_s[0], state[0] = 0, n, 0
    value = 0.0
    while sp >= 0:
        lo, nn, st = lo_s[sp], n_s[sp], state[sp]
        if st == 0:
            if nn <= 128:
                value = _leaf(val, lo, nn)
                sp -= 1
                continue
            n2 = nn // 2
            n2 -= n2 % 8
            state[sp] = 1
            sp += 1
            lo_s[sp], n_s[sp], state[sp] = lo, n2, 0
        elif st == 1:
            left[sp] = value
            n2 = nn // 2
            n2 -= n2 % 8
            state[sp] = 2
            sp += 1
            lo_s[sp], n_s[sp], state[sp] = lo + n2, nn - n2, 0
        else:
            value = left[sp] + value
            sp -= 1
    return value


@njit(**KERNEL)
def pairwise_sum(a, n, stk, fstk):
    """``a[:n].sum()`` exactly as numpy adds a contiguous float64 array.

    ``stk, fstk`` are work arrays from :func:`scratch`.
    """
    return 0.0 + _tree(a, n, stk, fstk) if n > 0 else 0.0


@njit(**KERNEL)
def plan(idx, m, n, leaves, ops, stk):
    """The shape of :func:`sparse_sum` for the support ``idx[:m]`` of a length-``n`` array.

    Fills ``leaves`` (rows ``lo, length, i0, i1``: numpy's leaf blocks that
    hold entries, and which entries) and ``ops`` (postfix: a leaf's index, or
    -1 to add the two values on top); returns ``(n_leaves, n_ops)``. One plan
    serves every array with that support (:func:`plan_sum`). ``leaves`` and
    ``ops`` need ``n // 64 + 2`` and ``n // 32 + 4`` rows.
    """
    lo_s, n_s, i0_s, i1_s, state = stk[0], stk[1], stk[2], stk[3], stk[4]
    full = np.zeros(stk.shape[1], np.int64)  # non-empty children seen per frame
    sp = 0
    lo_s[0], n_s[0], i0_s[0], i1_s[0], state[0], full[0] = 0, n, 0, m, 0, 0
    nl = no = 0
    nonempty = False
    while sp >= 0:
        lo, nn, i0, i1 = lo_s[sp], n_s[sp], i0_s[sp], i1_s[sp]
        st = state[sp]
        if st == 0:
            if i0 == i1:
                nonempty = False
            elif nn <= 128:
                leaves[nl, 0], leaves[nl, 1], leaves[nl, 2], leaves[nl, 3] = lo, nn, i0, i1
                ops[no] = nl
                nl += 1
                no += 1
                nonempty = True
            else:
                n2 = nn // 2
                n2 -= n2 % 8
                mid = i0
                while mid < i1 and idx[mid] < lo + n2:
                    mid += 1
                state[sp], full[sp] = 1, 0
                i0_s[sp] = mid
                sp += 1
                lo_s[sp], n_s[sp], i0_s[sp], i1_s[sp], state[sp] = lo, n2, i0, mid, 0
                continue
        elif st == 1:
            full[sp] += nonempty
            n2 = nn // 2
            n2 -= n2 % 8
            state[sp] = 2
            sp += 1
            lo_s[sp], n_s[sp], i0_s[sp], i1_s[sp], state[sp] = lo + n2, nn - n2, i0, i1, 0
            continue
        else:
            both = full[sp] + nonempty
            if both == 2:
                ops[no] = -1
                no += 1
            nonempty = both > 0
        sp -= 1
    return nl, no


@njit(**KERNEL)
def plan_sum(idx, val, leaves, ops, no, fstk):
    """numpy's sum of the array that is ``val`` at ``idx`` and zero elsewhere, by a :func:`plan`."""
    stack = fstk[:80]
    r = fstk[80:]
    sp = 0
    for o in range(no):
        op = ops[o]
        if op >= 0:
            stack[sp] = _leaf_sparse(idx, val, leaves[op, 2], leaves[op, 3], leaves[op, 0],
                                     leaves[op, 1], r)
            sp += 1
        else:
            sp -= 1
            stack[sp - 1] = stack[sp - 1] + stack[sp]
    return 0.0 + stack[0] if sp else 0.0


@njit(**KERNEL)
def _combine8(r, o):
    return ((r[o] + r[o + 1]) + (r[o + 2] + r[o + 3])) + ((r[o + 4] + r[o + 5]) + (r[o + 6] + r[o + 7]))


@njit(**KERNEL)
def _leaf3(idx, v, i0, i1, lo, n, r):
    # _leaf_sparse of three value columns v[:, 0..2] at once
    if n < 8:
        a = b = c = 0.0
        for i in range(i0, i1):
            a += v[i, 0]
            b += v[i, 1]
            c += v[i, 2]
        return a, b, c
    r[:] = 0.0
    stop = lo + n - n % 8
    i = i0
    while i < i1 and idx[i] < stop:
        p = idx[i] - lo
        q = p % 8
        if p < 8:
            r[q], r[8 + q], r[16 + q] = v[i, 0], v[i, 1], v[i, 2]
        else:
            r[q] += v[i, 0]
            r[8 + q] += v[i, 1]
            r[16 + q] += v[i, 2]
        i += 1
    a = _combine8(r, 0)
    b = _combine8(r, 8)
    c = _combine8(r, 16)
    while i < i1:
        a += v[i, 0]
        b += v[i, 1]
        c += v[i, 2]
        i += 1
    return a, b, c


@njit(**KERNEL)
def plan_sum3(idx, v, leaves, ops, no, fstk):
    """:func:`plan_sum` of the three columns of ``v`` at once; ``fstk`` holds 264 values."""
    stack = fstk[:240]
    r = fstk[240:264]
    sp = 0
    for o in range(no):
        op = ops[o]
        if op >= 0:
            a, b, c = _leaf3(idx, v, leaves[op, 2], leaves[op, 3], leaves[op, 0], leaves[op, 1], r)
            stack[3 * sp], stack[3 * sp + 1], stack[3 * sp + 2] = a, b, c
            sp += 1
        else:
            sp -= 1
            for c in range(3):
                stack[3 * (sp - 1) + c] = stack[3 * (sp - 1) + c] + stack[3 * sp + c]
    if sp == 0:
        return 0.0, 0.0, 0.0
    return 0.0 + stack[0], 0.0 + stack[1], 0.0 + stack[2]
