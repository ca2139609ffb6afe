"""The sampler's one-pass draw: inverse-CDF sampling of a row plus the top-p test, without PyTorch's
cumsum, search, gather and masked sum (several passes over a 51,200-entry row each)."""

from __future__ import annotations

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads

if _numba.HAVE_NUMBA:

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _draw_rows_numba(probs, u, p, tokens, accept):
        """Per row: the first index whose cumulative weight exceeds u[r] * the row's total (inverse
        CDF: block sums first, then one block scanned), and whether the weight of the tokens more
        likely than it is below p (the top-p test of rejection sampling)."""
        R, N = probs.shape
        B = 512
        blocks = (N + B - 1) // B
        for r in numba.prange(R):
            sums = np.zeros(blocks, dtype=np.float64)
            for b in range(blocks):
                acc = 0.0
                for j in range(b * B, min(N, (b + 1) * B)):
                    acc += probs[r, j]
                sums[b] = acc
            target = u[r] * sums.sum()
            below, b = 0.0, 0
            while b < blocks - 1 and below + sums[b] <= target:
                below += sums[b]
                b += 1
            t = min(N, (b + 1) * B) - 1
            for j in range(b * B, min(N, (b + 1) * B)):
                below += probs[r, j]
                if below > target:
                    t = j
                    break
            while t > 0 and probs[r, t] <= 0.0:  # rounding at the very end: the last token with weight
                t -= 1
            tokens[r] = t
            mass = 0.0
            if p < 1.0:
                chosen = probs[r, t]
                for j in range(N):
                    if probs[r, j] > chosen:
                        mass += probs[r, j]
            accept[r] = mass < p


def draw_rows(probs: torch.Tensor, u: torch.Tensor, p: float) -> tuple[list[int], list[bool]] | None:
    """For each row of probs [R, V] (>= 0, need not sum to 1) and uniform u [R]: the token the inverse
    CDF picks, and whether the tokens more likely than it hold less than p of the mass. None without
    numba (the caller then does the same in PyTorch)."""
    if not (_numba.numba_ok() and probs.device.type == "cpu" and probs.dtype == torch.float32):
        return None
    tokens = np.empty(probs.shape[0], dtype=np.int64)
    accept = np.empty(probs.shape[0], dtype=np.bool_)
    set_threads()
    _draw_rows_numba(probs.contiguous().numpy(), u.double().numpy(), float(p), tokens, accept)
    return tokens.tolist(), accept.tolist()
