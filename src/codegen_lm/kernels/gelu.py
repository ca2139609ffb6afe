"""The tanh approximation of GELU (CodeGen's "gelu_new") in numba: as a scalar for other kernels to
inline, and in place over a tensor for prefill in bf16 and int8 x int8 modes, where PyTorch's tanh
GELU over [512, 4096] took ~2-3.5 ms a layer on 2 cores of an Intel Xeon (AMX boot), a tenth of the
block's time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the activation names these kernels compute

if _numba.HAVE_NUMBA:
    from ._numba import float_from_bits

    @numba.njit(fastmath=True, inline="always", error_model="numpy")
    def gelu_tanh(u):
        # tanh(z) = 1 - 2 / (exp(2z) + 1): scalar exp is ~4x cheaper than scalar tanh here
        z = np.float32(0.7978845608028654) * (u + np.float32(0.044715) * u * u * u)
        t = np.float32(1.0) - np.float32(2.0) / (math.exp(np.float32(2.0) * z) + np.float32(1.0))
        return np.float32(0.5) * u * (np.float32(1.0) + t)

    # No reassociation here: it would merge the two halves of ln 2 in exp's range reduction.
    _EXACT_ORDER = {"nnan", "ninf", "nsz", "contract", "arcp"}

    @numba.njit(fastmath=_EXACT_ORDER, inline="always", error_model="numpy")
    def _exp(y):
        """e^y for y in [-87, 87], within ~2 ulp, in plain arithmetic so that a loop of it vectorises
        (numba's math.exp calls libm one value at a time): y = n ln 2 + r with |r| <= ln 2 / 2, e^r by
        its Taylor series to r^6, 2^n put straight into the exponent bits."""
        n = np.rint(y * np.float32(1.4426950408889634))
        r = (y - n * np.float32(0.693359375)) + n * np.float32(2.12194440e-4)  # ln 2 = 0.693359375 - 2.12e-4
        p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (np.float32(1.0 / 6.0) + r * (
            np.float32(1.0 / 24.0) + r * (np.float32(1.0 / 120.0) + r * np.float32(1.0 / 720.0))))))
        return p * float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))

    @numba.njit(parallel=True, fastmath=_EXACT_ORDER, cache=True, nogil=True, error_model="numpy")
    def _gelu_rows_numba(x):
        for r in numba.prange(x.shape[0]):
            for k in range(x.shape[1]):
                u = x[r, k]
                z = np.float32(1.5957691216057308) * (u + np.float32(0.044715) * u * u * u)  # 2 sqrt(2/pi) (...)
                e = _exp(min(max(z, np.float32(-87.0)), np.float32(87.0)))
                e = e if z > np.float32(-87.0) else np.float32(0.0)  # GELU(u) is -0 to float precision there
                x[r, k] = u * (e / (e + np.float32(1.0)))  # u (1 + tanh(z/2)) / 2: no cancellation for u < 0


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor | None:
    """x (fp32, contiguous, CPU) replaced by its tanh GELU and returned; None where the kernel cannot
    run (no numba, another dtype or layout): the caller applies its own activation then."""
    if (not _numba.numba_ok() or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
            or torch.is_grad_enabled() or x.dim() < 1):
        return None
    set_threads()
    _gelu_rows_numba(x.detach().view(-1, x.shape[-1]).numpy())
    return x
