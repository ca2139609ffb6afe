"""fp32 products of one row with a large weight (batch-1 decoding, the lm_head of one sequence).

At one row PyTorch reads fp32 weights at about half the memory bandwidth; this kernel streams them
once with all threads. Whether it wins for a given shape is measured per machine (registry.py).
"""

from __future__ import annotations

import torch

from . import _numba
from ._numba import set_threads

_ONES: dict[int, torch.Tensor] = {}  # unit scales by size: the shared row kernel multiplies by a scale

if _numba.HAVE_NUMBA:
    from .dots import rows_product


def f32_product(x: torch.Tensor, w: torch.Tensor, group: int = 4) -> torch.Tensor:
    """x [rows, in] @ w [out, in]^T in numba, fp32 CPU tensors (meant for one row), `group` (1 or 4)
    weight rows at a time (dots.py)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    set_threads()
    ones = _ONES.get(w.shape[0])
    if ones is None:
        ones = _ONES[w.shape[0]] = torch.ones(w.shape[0], dtype=torch.float32)
    rows_product(x.detach().contiguous().numpy(), w.detach().contiguous().numpy(), ones.numpy(), out.numpy(),
                 group)
    return out
