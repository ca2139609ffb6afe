"""int8 weight-only products: `int8_matmul(x, w8, scale)` = x @ (scale[:, None] * w8)^T.

For a few rows (decoding) on the CPU a numba kernel streams the int8 weights once and converts them
in registers (PyTorch's own int8 paths read weights at about 1 GB/s here); for many rows (prefill), on
a GPU, or without numba, blocks of weight rows are dequantized for the ordinary matmul.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads

# Measured on 2 cores (350M shapes): up to 8 rows converting in registers wins; up to 64 rows a
# converted weight-row buffer shared by all rows is 2-10x faster than dequantizing for BLAS.
SMALL_ROWS = 64  # up to this many rows the numba kernels win; above (prefill), dequantize + BLAS
DIRECT_ROWS = 8  # up to this many rows: convert in registers; above: a converted row buffer per thread
_BLOCK = 1024  # weight rows dequantized at a time on the fallback path

if _numba.HAVE_NUMBA:
    from .dots import rows_product

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _int8_mm_rows_numba(x, w, scale, out, n_chunks):
        """Several rows: convert each weight row once into a small float buffer, then one dot per row."""
        rows, k_dim = x.shape
        n_out = w.shape[0]
        per_chunk = (n_out + n_chunks - 1) // n_chunks
        for c in numba.prange(n_chunks):
            buf = np.empty(k_dim, dtype=np.float32)
            for n in range(c * per_chunk, min(n_out, (c + 1) * per_chunk)):
                for k in range(k_dim):
                    buf[k] = np.float32(w[n, k])
                s = scale[n]
                for r in range(rows):
                    acc = np.float32(0.0)
                    for k in range(k_dim):
                        acc += x[r, k] * buf[k]
                    out[r, n] = acc * s

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _dequant_numba(w, scale, out):
        for n in numba.prange(w.shape[0]):
            s = scale[n]
            for k in range(w.shape[1]):
                out[n, k] = np.float32(w[n, k]) * s


def numba_product(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, group: int = 4) -> torch.Tensor:
    """x [rows, in] fp32 (rows <= SMALL_ROWS) @ (scale * w8)^T in numba, one pass over the weights;
    up to DIRECT_ROWS rows `group` (1 or 4) weight rows at a time (dots.py)."""
    xf = x.detach().to(torch.float32).contiguous()
    out = torch.empty(xf.shape[0], w8.shape[0], dtype=torch.float32)
    set_threads()
    args = (xf.numpy(), w8.contiguous().numpy(), scale.contiguous().numpy(), out.numpy())
    if xf.shape[0] <= DIRECT_ROWS:
        rows_product(*args, group)
    else:
        _int8_mm_rows_numba(*args, 8 * numba.get_num_threads())
    return out


def numba_dequant_product(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 @ (scale * w8)^T: blocks of weight rows dequantized by numba for BLAS."""
    out = torch.empty(x.shape[0], w8.shape[0], dtype=torch.float32)
    block = torch.empty(min(_BLOCK, w8.shape[0]), w8.shape[1], dtype=torch.float32)
    set_threads()
    for start in range(0, w8.shape[0], _BLOCK):
        n = min(_BLOCK, w8.shape[0] - start)
        _dequant_numba(w8[start : start + n].contiguous().numpy(), scale[start : start + n].contiguous().numpy(),
                       block[:n].numpy())
        torch.mm(x, block[:n].t(), out=out[:, start : start + n])
    return out


def torch_dequant_product(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ (scale * w8)^T in PyTorch alone (any device and dtype), a block of rows at a time."""
    out = torch.empty(x.shape[0], w8.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, w8.shape[0], _BLOCK):
        block = w8[start : start + _BLOCK].to(x.dtype) * scale[start : start + _BLOCK, None].to(x.dtype)
        out[:, start : start + _BLOCK] = x @ block.t()
    return out


def int8_matmul(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] (any float dtype) times int8 weights [out, in] with fp32 scales [out] -> [rows, out],
    by the default rule (an engine's measured choice, registry.py, replaces it)."""
    cpu_ok = _numba.numba_ok() and x.device.type == "cpu" and not torch.is_grad_enabled()
    if cpu_ok and x.shape[0] <= SMALL_ROWS:
        try:
            return numba_product(x, w8, scale).to(x.dtype)
        except Exception as exc:
            warnings.warn(f"numba int8 kernel failed ({exc}); using the dequantizing fallback", stacklevel=2)
            _numba.HAVE_NUMBA = False
    if cpu_ok and x.dtype == torch.float32:
        return numba_dequant_product(x, w8, scale)
    return torch_dequant_product(x, w8, scale)
