"""int8 x int8 products: int8 weights (one scale per output channel) times activations quantized to
int8 per row on the fly, with 32-bit sums (W8A8, the scheme of CTranslate2's and PyTorch's dynamic
int8). Unlike weight-only int8 (int8.py), this changes the numbers: each activation row is rounded
to ~127 levels of its largest magnitude.

Two backends of PyTorch run the product:
- fbgemm (`quantized::linear_dynamic`), on any x86 CPU with AVX2. Without VNNI its u8 x s8 pairs are
  summed in 16 bits and saturate, so there activations are quantized to 7 bits (reduce_range);
- oneDNN (`onednn::qlinear_pointwise`), only where the CPU has VNNI or AMX (on plain AVX2 it
  saturates the same way and has no 7-bit mode).

Both quantize an input per tensor. Here each row is scaled to a largest magnitude of 1 first (and
its output back), which makes the scale per row; for fbgemm, which takes its range from the tensor's
smallest and largest values, one extra row holding -1 and 1 fixes that range, so one sequence's
numbers never depend on what else is in the batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _numba, cpu
from ._numba import numba, set_threads

if _numba.HAVE_NUMBA:
    from ._numba import float_from_bits

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _quantize_rows_numba(x, bits, q, a):
        """q[r] = rint(x[r] * 127 / a[r]) + 128 as u8, a[r] = max |x[r]|, in two passes over each row
        (PyTorch's ops take six, and its round is not vectorised). The largest magnitude is found
        on the bits (x's int32 view less the sign bit, which orders as the floats do), where the
        maximum vectorises; a float maximum does not here."""
        for r in numba.prange(x.shape[0]):
            top = np.int32(0)
            for k in range(x.shape[1]):
                v = bits[r, k] & np.int32(0x7FFFFFFF)
                top = v if v > top else top
            a[r] = max(np.float32(1e-12), float_from_bits(top))
            inv = np.float32(127.0) / a[r]
            for k in range(x.shape[1]):
                q[r, k] = np.int32(np.rint(x[r, k] * inv)) + 128


def fbgemm_available() -> str | None:
    """None where the fbgemm path can run, else why not."""
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.quantized,
                                                                                 "linear_dynamic"):
        return "this PyTorch build has no fbgemm"
    if not cpu.has("avx2"):
        return "fbgemm needs AVX2"
    return None


def onednn_available() -> str | None:
    """None where oneDNN's int8 product can run without saturating, else why not."""
    if "onednn" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.onednn,
                                                                                 "qlinear_pointwise"):
        return "this PyTorch build has no oneDNN int8 products"
    if not cpu.int8_dot_products():
        return "oneDNN's int8 products saturate without VNNI or AMX"
    return None


def _per_channel(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fbgemm's packing takes a quantized tensor; PyTorch marks those as deprecated (the availability
    test notices when they are gone), so its warning is not repeated to our users."""
    zeros = torch.zeros(w8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch._make_per_channel_quantized_tensor(w8.contiguous(), scale.double(), zeros, 0)


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)


_RANGE = torch.tensor([-1.0, 1.0])


def pack_fbgemm(w8: torch.Tensor, scale: torch.Tensor) -> object:
    """fbgemm's packed copy of int8 weights [out, in] with fp32 scales [out] (no bias: added after)."""
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        return torch.ops.quantized.linear_prepack(_per_channel(w8, scale), None)
    finally:
        torch.backends.quantized.engine = engine


def fbgemm_linear(packed: object, x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 @ W^T through fbgemm, activations quantized per row."""
    rows = x.shape[0]
    a = _row_scales(x)
    scaled = torch.empty(rows + 1, x.shape[1], dtype=torch.float32)
    torch.div(x, a, out=scaled[:rows])
    scaled[rows].zero_()
    scaled[rows, :2] = _RANGE  # the range every batch is quantized over: [-1, 1]
    out = torch.ops.quantized.linear_dynamic(scaled, packed, not cpu.int8_dot_products())
    return out[:rows].mul_(a)


def pack_onednn(w8: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """oneDNN's packed copy of int8 weights, with their scales and (zero) zero points."""
    return (torch.ops.onednn.qlinear_prepack(w8.contiguous(), None), scale.float().contiguous(),
            torch.zeros(w8.shape[0], dtype=torch.int32))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u8 [rows, in], a [rows, 1]): x [rows, in] fp32 with each row scaled to 127 at its largest
    magnitude a, rounded half to even, offset by 128 (oneDNN's zero point). numba's and PyTorch's
    scales may differ in the last bit, so a value within that of a rounding tie may round apart."""
    if _numba.numba_ok():
        xc = x.detach().contiguous()
        xq = torch.empty(xc.shape, dtype=torch.uint8)
        a = torch.empty(xc.shape[0], 1, dtype=torch.float32)
        set_threads()
        _quantize_rows_numba(xc.numpy(), xc.view(torch.int32).numpy(), xq.numpy(), a.numpy()[:, 0])
        return xq, a
    a = _row_scales(x)
    return torch.round(x * (127.0 / a)).add_(128).to(torch.uint8), a


def onednn_linear(packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 @ W^T through oneDNN, activations quantized per row to u8 (zero point 128)."""
    weight, scale, zeros = packed
    xq, a = quantize_rows(x)
    out = torch.ops.onednn.qlinear_pointwise(xq, 1.0 / 127.0, 128, weight, scale, zeros, None, 1.0, 0,
                                             torch.float32, "none", [], "")
    return out.mul_(a)
