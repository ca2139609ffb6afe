"""Compute kernels that PyTorch does not provide fast enough on the CPU.

`int8_matmul(x, w8, scale)` = x @ (scale[:, None] * w8)^T. For a few rows (decoding) on the CPU it
runs a numba kernel that streams the int8 weights once and converts them in registers (PyTorch's own
int8 paths read weights at about 1 GB/s here); for many rows, on a GPU, or where numba is not
installed, it dequantizes blocks of weight rows and uses the ordinary matmul.
"""

from __future__ import annotations

import os
import warnings

import torch

# Measured on 2 cores (350M shapes): up to 8 rows converting in registers wins; up to 64 rows a
# converted weight-row buffer shared by all rows is 2-10x faster than dequantizing for BLAS.
SMALL_ROWS = 64  # up to this many rows the numba kernels win; above (prefill), dequantize + BLAS
DIRECT_ROWS = 8  # up to this many rows: convert in registers; above: a converted row buffer per thread
_BLOCK = 1024  # weight rows dequantized at a time on the fallback path

try:  # numba is optional: without it (or when disabled) every product takes the fallback path
    if os.environ.get("CODEGEN_LM_NO_NUMBA"):
        raise ImportError("disabled by CODEGEN_LM_NO_NUMBA")
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_mm_numba(x, w, scale, out):
        rows, k_dim = x.shape
        n_out = w.shape[0]
        for n in numba.prange(n_out):
            s = scale[n]
            for r in range(rows):
                acc = np.float32(0.0)
                for k in range(k_dim):
                    acc += x[r, k] * np.float32(w[n, k])
                out[r, n] = acc * s

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
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

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _dequant_numba(w, scale, out):
        for n in numba.prange(w.shape[0]):
            s = scale[n]
            for k in range(w.shape[1]):
                out[n, k] = np.float32(w[n, k]) * s

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _f32_mm_numba(x, w, out):
        """fp32 x [rows, in] @ w[out, in]^T for a few rows: one pass over the weights, two threads."""
        rows, k_dim = x.shape
        n_out = w.shape[0]
        for n in numba.prange(n_out):
            for r in range(rows):
                acc = np.float32(0.0)
                for k in range(k_dim):
                    acc += x[r, k] * w[n, k]
                out[r, n] = acc

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _shared_prefix_scores_numba(q, K, rows, prefix, ends, scale, scores):
        """scores[g, h, j] = q[g, h] . K[row g, h, j] * scale for j < ends[g] (-inf after), where the
        first `prefix` keys are read from slot rows[0] (identical in every row of the group)."""
        G, H, D = q.shape
        first = rows[0]
        for h in numba.prange(H):  # per head: the prompt's keys stay in cache across the rows
            qh = np.empty((G, D), dtype=np.float32)
            for g in range(G):
                for d in range(D):
                    qh[g, d] = q[g, h, d] * scale
            for j in range(prefix):  # one prompt key against every row's query
                for g in range(G):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qh[g, d] * K[first, h, j, d]
                    scores[g, h, j] = dot
            for g in range(G):  # each row's own keys
                r = rows[g]
                for j in range(prefix, ends[g]):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qh[g, d] * K[r, h, j, d]
                    scores[g, h, j] = dot
                for j in range(ends[g], scores.shape[2]):
                    scores[g, h, j] = -np.inf

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _shared_prefix_values_numba(probs, V, rows, prefix, ends, out):
        """out[g, h] = sum over j of probs[g, h, j] * V[row g, h, j], the prompt part from rows[0]."""
        G, H, _ = probs.shape
        D = V.shape[3]
        first = rows[0]
        for h in numba.prange(H):
            acc = np.zeros((G, D), dtype=np.float32)
            for j in range(prefix):  # one prompt value row into every row's output
                for g in range(G):
                    w = probs[g, h, j]
                    for d in range(D):
                        acc[g, d] += w * V[first, h, j, d]
            for g in range(G):
                r = rows[g]
                for j in range(prefix, ends[g]):
                    w = probs[g, h, j]
                    for d in range(D):
                        acc[g, d] += w * V[r, h, j, d]
                for d in range(D):
                    out[g, h, d] = acc[g, d]

    HAVE_NUMBA = True
except Exception as exc:
    _NUMBA_ERROR = exc
    HAVE_NUMBA = False


def _numba_ok(x: torch.Tensor) -> bool:
    return HAVE_NUMBA and x.device.type == "cpu" and x.shape[0] <= SMALL_ROWS and not torch.is_grad_enabled()


def int8_matmul(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] (any float dtype) times int8 weights [out, in] with fp32 scales [out] -> [rows, out]."""
    global HAVE_NUMBA
    if _numba_ok(x):
        try:
            xf = x.detach().to(torch.float32).contiguous()
            out = torch.empty(xf.shape[0], w8.shape[0], dtype=torch.float32)
            threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
            numba.set_num_threads(threads)
            args = (xf.numpy(), w8.contiguous().numpy(), scale.contiguous().numpy(), out.numpy())
            if xf.shape[0] <= DIRECT_ROWS:
                _int8_mm_numba(*args)
            else:
                _int8_mm_rows_numba(*args, 8 * threads)
            return out.to(x.dtype)
        except Exception as exc:
            warnings.warn(f"numba int8 kernel failed ({exc}); using the dequantizing fallback", stacklevel=2)
            HAVE_NUMBA = False
    out = torch.empty(x.shape[0], w8.shape[0], dtype=x.dtype, device=x.device)
    if HAVE_NUMBA and x.device.type == "cpu" and x.dtype == torch.float32:
        block = torch.empty(min(_BLOCK, w8.shape[0]), w8.shape[1], dtype=torch.float32)
        for start in range(0, w8.shape[0], _BLOCK):
            n = min(_BLOCK, w8.shape[0] - start)
            _dequant_numba(w8[start : start + n].contiguous().numpy(), scale[start : start + n].contiguous().numpy(),
                           block[:n].numpy())
            torch.mm(x, block[:n].t(), out=out[:, start : start + n])
        return out
    for start in range(0, w8.shape[0], _BLOCK):
        block = w8[start : start + _BLOCK].to(x.dtype) * scale[start : start + _BLOCK, None].to(x.dtype)
        out[:, start : start + _BLOCK] = x @ block.t()
    return out


F32_ROWS = 1  # fp32: one row (batch-1 decoding) is where the numba kernel beats oneDNN (measured on 2 cores)
F32_MIN_WEIGHTS = 1 << 20  # below ~4 MB of weights a product is too short to gain from a kernel launch


def f32_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [rows, in] @ w [out, in]^T with the numba kernel, or None where it does not apply (then use
    F.linear): fp32 CPU tensors, a few rows, a large weight, no autograd.

    At one row PyTorch reads fp32 weights at about half the memory bandwidth; this kernel streams
    them once with both threads."""
    if (not HAVE_NUMBA or x.device.type != "cpu" or x.shape[0] > F32_ROWS or w.numel() < F32_MIN_WEIGHTS
            or torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32):
        return None
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _f32_mm_numba(x.detach().contiguous().numpy(), w.detach().contiguous().numpy(), out.numpy())
    return out


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `weight` can get a oneDNN-packed copy (fp32 on a CPU with oneDNN)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of `weight` [out, in] in oneDNN's blocked layout (what inductor's CPU freezing uses), or
    None where this build of PyTorch cannot make one."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except (RuntimeError, AttributeError):
        return None


# activation name -> oneDNN post-op (attr, algorithm) that _linear_pointwise can fuse into the product
FUSABLE_ACTIVATIONS = {"gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "gelu_fast": ("gelu", "tanh"), "gelu": ("gelu", "none"), "relu": ("relu", "")}


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  activation: tuple[str, str] = ("none", "")) -> torch.Tensor | None:
    """act(x [rows, in] @ W^T + b) with the packed copy of W, or None if oneDNN refuses (then F.linear).

    About twice as fast as PyTorch's default BLAS on CPUs where MKL is slow (AMD), and the activation
    is applied while the output is still in cache."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, activation[0], [], activation[1])
    except RuntimeError:
        return None


def can_attend(q: torch.Tensor, K: torch.Tensor) -> bool:
    """Whether shared_prefix_attention can run here: numba, fp32 CPU tensors, no autograd, not tracing."""
    return (HAVE_NUMBA and q.device.type == "cpu" and q.dtype == torch.float32 and K.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def shared_prefix_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: list[int], prefix: int,
                            ends: list[int]) -> torch.Tensor | None:
    """Decode-step attention (one query per row) with the numba kernels, or None where they do not
    apply (see can_attend; then the caller uses PyTorch). prefix 0: rows share nothing.

    q [G, H, 1, D]; K, V [R, H, L, D]. Batched GEMVs over a few hundred (row, head) pairs are mostly
    call overhead in PyTorch; this kernel reads each key and value once, the shared prompt once per
    head."""
    if not can_attend(q, K):
        return None
    import numpy as np

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    rows_np, ends_np = np.asarray(rows, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    scores = torch.empty(q.shape[0], q.shape[1], max(ends), dtype=torch.float32)
    _shared_prefix_scores_numba(q[:, :, 0].contiguous().numpy(), K.detach().numpy(), rows_np, prefix, ends_np,
                                np.float32(q.shape[-1] ** -0.5), scores.numpy())
    probs = scores.softmax(dim=-1)  # PyTorch's vectorised exp: scalar exp in numba would cost more than the rest
    out = torch.empty(q.shape[0], q.shape[1], q.shape[3], dtype=torch.float32)
    _shared_prefix_values_numba(probs.numpy(), V.detach().numpy(), rows_np, prefix, ends_np, out.numpy())
    return out[:, :, None]
