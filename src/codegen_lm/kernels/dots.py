"""The inner loop of every numba product that streams a weight for a few rows: dot products with one
or four weight rows at once (the `group`).

Four rows side by side keep four independent sums in flight and reuse each activation load four
times; on 2 cores of an Intel Xeon (AMX boot) that took batch-1 int8 decoding of the 350M shape from
~29 to ~40 tokens/s. On 2 cores of an AMD EPYC with AVX-512 the opposite holds: one row at a time
(one stream of weights, whose vectorised sum LLVM unrolls into several accumulators) reads fp32
weights at ~26 GB/s against ~23 for four, int8 at ~22 G weights/s against ~18. So both are kept and
the registry measures which one this machine wants. Weights may be fp32 or int8 (the conversion to
fp32 happens in registers as they stream by).
"""

from __future__ import annotations

import numpy as np

from . import _numba
from ._numba import numba

if _numba.HAVE_NUMBA:

    @numba.njit(fastmath=True, inline="always", error_model="numpy")
    def dot1(v, w, n):
        """v . w[n]: a group of one row, one loop LLVM vectorises and unrolls on its own."""
        acc = np.float32(0.0)
        for k in range(v.shape[0]):
            acc += v[k] * np.float32(w[n, k])
        return acc

    @numba.njit(fastmath=True, inline="always", error_model="numpy")
    def dots4(v, w, n, count):
        """(v . w[n], v . w[n + 1], ...) for the first `count` (<= 4) of rows n..n+3; the rest are 0.
        count < 4 takes the rows one at a time (a group of 1 always does)."""
        a0 = a1 = a2 = a3 = np.float32(0.0)
        if count == 1:
            return dot1(v, w, n), a1, a2, a3
        if count == 4:
            for k in range(v.shape[0]):
                vk = v[k]
                a0 += vk * np.float32(w[n, k])
                a1 += vk * np.float32(w[n + 1, k])
                a2 += vk * np.float32(w[n + 2, k])
                a3 += vk * np.float32(w[n + 3, k])
            return a0, a1, a2, a3
        for i in range(count):
            acc = np.float32(0.0)
            for k in range(v.shape[0]):
                acc += v[k] * np.float32(w[n + i, k])
            if i == 0:
                a0 = acc
            elif i == 1:
                a1 = acc
            else:
                a2 = acc
        return a0, a1, a2, a3

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def rows_product(x, w, scale, out, group=4):
        """out[r, n] = (x[r] . w[n]) * scale[n] for a few rows x [rows, in], weights w [out, in] fp32 or
        int8: one pass over the weights, `group` (1 or 4) rows of them at a time, all threads."""
        n_out = w.shape[0]
        for g in numba.prange((n_out + group - 1) // group):
            n = group * g
            count = min(group, n_out - n)
            for r in range(x.shape[0]):
                sums = dots4(x[r], w, n, count)
                for i in range(count):
                    out[r, n + i] = sums[i] * scale[n + i]
