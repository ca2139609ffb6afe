"""fp32 products of one row with a large weight (batch-1 decoding, the lm_head of one sequence).

At one row PyTorch reads fp32 weights at about half the memory bandwidth; this kernel streams them
once with all threads.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads

F32_ROWS = 1  # one row (batch-1 decoding) is where the numba kernel beats oneDNN (measured on 2 cores)
F32_MIN_WEIGHTS = 1 << 20  # below ~4 MB of weights a product is too short to gain from a kernel launch

if _numba.HAVE_NUMBA:

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _f32_mm_numba(x, w, out):
        """fp32 x [rows, in] @ w[out, in]^T for a few rows: one pass over the weights, all threads."""
        rows, k_dim = x.shape
        n_out = w.shape[0]
        for n in numba.prange(n_out):
            for r in range(rows):
                acc = np.float32(0.0)
                for k in range(k_dim):
                    acc += x[r, k] * w[n, k]
                out[r, n] = acc


def f32_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [rows, in] @ w [out, in]^T with the numba kernel, or None where it does not apply (then use
    F.linear): fp32 CPU tensors, one row, a large weight, no autograd."""
    if (not _numba.numba_ok() or x.device.type != "cpu" or x.shape[0] > F32_ROWS or w.numel() < F32_MIN_WEIGHTS
            or torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32):
        return None
    return f32_product(x, w)


def f32_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ w [out, in]^T in numba, fp32 CPU tensors (meant for one row: see f32_matmul)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    set_threads()
    _f32_mm_numba(x.detach().contiguous().numpy(), w.detach().contiguous().numpy(), out.numpy())
    return out
