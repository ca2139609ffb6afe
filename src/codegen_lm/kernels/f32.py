"""fp32 products of one row with a large weight (batch-1 decoding, the lm_head of one sequence).

At one row PyTorch reads fp32 weights at about half the memory bandwidth; this kernel streams them
once with all threads. Whether it wins for a given shape is measured per machine (registry.py).
"""

from __future__ import annotations

import torch

from . import _numba
from ._numba import numba, set_threads

if _numba.HAVE_NUMBA:
    from .dots import dots4

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _f32_mm_numba(x, w, out):
        """fp32 x [rows, in] @ w[out, in]^T for a few rows: one pass over the weights, all threads."""
        n_out = w.shape[0]
        for g in numba.prange((n_out + 3) // 4):  # four weight rows at a time (dots.py)
            n = 4 * g
            count = min(4, n_out - n)
            for r in range(x.shape[0]):
                sums = dots4(x[r], w, n, count)
                for i in range(count):
                    out[r, n + i] = sums[i]


def f32_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ w [out, in]^T in numba, fp32 CPU tensors (meant for one row)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    set_threads()
    _f32_mm_numba(x.detach().contiguous().numpy(), w.detach().contiguous().numpy(), out.numpy())
    return out
