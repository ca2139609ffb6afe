"""Compute kernels that PyTorch does not provide fast enough on the CPU.

`int8_matmul(x, w8, scale)` = x @ (scale[:, None] * w8)^T. For a few rows (decoding) on the CPU it
runs a numba kernel that streams the int8 weights once and converts them in registers (PyTorch's own
int8 paths read weights at about 1 GB/s here); for many rows, on a GPU, or where numba is not
installed, it dequantizes blocks of weight rows and uses the ordinary matmul.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
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
    def _rotary_store_numba(qkv, cos, sin, K, V, slots, starts, scale, q):
        """For each row's new token (qkv [R, 3E] in the [q; k; v] layout of model.py): q rotated and
        scaled into q [R, H, D]; k rotated and v written to position starts[r] of slot slots[r]."""
        R, H, D = q.shape
        E, half = H * D, cos.shape[1]
        for task in numba.prange(R * H):
            r, h = task // H, task % H
            s, p = slots[r], starts[r]
            q0, k0, v0 = h * D, E + h * D, 2 * E + h * D
            for i in range(half):
                c, sn = cos[r, i], sin[r, i]
                a, b = qkv[r, q0 + i], qkv[r, q0 + half + i]
                q[r, h, i], q[r, h, half + i] = (a * c - b * sn) * scale, (b * c + a * sn) * scale
                a, b = qkv[r, k0 + i], qkv[r, k0 + half + i]
                K[s, h, p, i], K[s, h, p, half + i] = a * c - b * sn, b * c + a * sn
            for d in range(2 * half, D):
                q[r, h, d] = qkv[r, q0 + d] * scale
                K[s, h, p, d] = qkv[r, k0 + d]
            for d in range(D):
                V[s, h, p, d] = qkv[r, v0 + d]

    @numba.njit(cache=True, nogil=True)
    def _write_rows_numba(key, value, K, V, slots, starts):
        for r in range(key.shape[0]):
            s, p = slots[r], starts[r]
            for h in range(key.shape[1]):
                for d in range(key.shape[2]):
                    K[s, h, p, d] = key[r, h, d]
                    V[s, h, p, d] = value[r, h, d]

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _own_scores_numba(q, K, slots, prefix, ends, scores):
        """scores[h, r, j] = q[r, h] . K[slots[r], h, j] for prefix[r] <= j < ends[r], -inf from ends[r]
        on: the keys of each row's own tokens (q comes scaled)."""
        R, H, D = q.shape
        for task in numba.prange(R * H):
            r, h = task // H, task % H
            s, j = slots[r], prefix[r]
            while j + 4 <= ends[r]:  # four keys per pass over q: ~1.5x faster than one
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for d in range(D):
                    qd = q[r, h, d]
                    a0 += qd * K[s, h, j, d]
                    a1 += qd * K[s, h, j + 1, d]
                    a2 += qd * K[s, h, j + 2, d]
                    a3 += qd * K[s, h, j + 3, d]
                scores[h, r, j], scores[h, r, j + 1], scores[h, r, j + 2], scores[h, r, j + 3] = a0, a1, a2, a3
                j += 4
            for t in range(j, ends[r]):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[r, h, d] * K[s, h, t, d]
                scores[h, r, t] = acc
            for t in range(ends[r], scores.shape[2]):
                scores[h, r, t] = -np.inf

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _own_values_numba(probs, V, slots, prefix, ends, base, out):
        """out[r, h*D:(h+1)*D] = base[h, r] + sum over prefix[r] <= j < ends[r] of probs[h, r, j] *
        V[slots[r], h, j]."""
        H, R, D = base.shape
        for task in numba.prange(R * H):
            r, h = task // H, task % H
            s = slots[r]
            acc = np.empty(D, dtype=np.float32)
            for d in range(D):
                acc[d] = base[h, r, d]
            for j in range(prefix[r], ends[r]):
                w = probs[h, r, j]
                for d in range(D):
                    acc[d] += w * V[s, h, j, d]
            for d in range(D):
                out[r, h * D + d] = acc[d]

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
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
    """Whether the decode-step kernels (rotary_store, write_rows, rows_attention) can run here: numba,
    fp32 CPU tensors, no autograd, not tracing."""
    return (HAVE_NUMBA and q.device.type == "cpu" and q.dtype == torch.float32 and K.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def rotary_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                 slots: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    """One new token per row, straight from the q/k/v product qkv [R, 3E]: rotary on q and k (cos,
    sin [R, rotary/2] at each row's position), k and v stored at position starts[r] of cache slot
    slots[r] (K, V [slots, H, L, D]); returns q [R, H, D] scaled by head_dim^-0.5 for rows_attention.
    Callers check can_attend first."""
    H, D = K.shape[1], K.shape[3]
    q = torch.empty(qkv.shape[0], H, D, dtype=torch.float32)
    _rotary_store_numba(qkv.contiguous().numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(), K.numpy(),
                        V.numpy(), slots, starts, np.float32(D**-0.5), q.numpy())
    return q


def draw_rows(probs: torch.Tensor, u: torch.Tensor, p: float) -> tuple[list[int], list[bool]] | None:
    """For each row of probs [R, V] (>= 0, need not sum to 1) and uniform u [R]: the token the inverse
    CDF picks, and whether the tokens more likely than it hold less than p of the mass. One pass
    over the row instead of PyTorch's cumsum, search, gather and masked sum; None without numba."""
    if not (HAVE_NUMBA and probs.device.type == "cpu" and probs.dtype == torch.float32):
        return None
    tokens = np.empty(probs.shape[0], dtype=np.int64)
    accept = np.empty(probs.shape[0], dtype=np.bool_)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _draw_rows_numba(probs.contiguous().numpy(), u.double().numpy(), float(p), tokens, accept)
    return tokens.tolist(), accept.tolist()


def write_rows(key: torch.Tensor, value: torch.Tensor, K: torch.Tensor, V: torch.Tensor, slots: np.ndarray,
               starts: np.ndarray) -> None:
    """key, value [R, H, D] (one new token per row) into position starts[r] of slot slots[r]."""
    _write_rows_numba(key.numpy(), value.numpy(), K.numpy(), V.numpy(), slots, starts)


def rows_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, slots: np.ndarray, ends: np.ndarray,
                   prefix: np.ndarray, groups: Sequence[tuple[slice | torch.Tensor, int, int]]) -> torch.Tensor:
    """Attention of one new token per row over its own cache slot: q [R, H, D] (scaled), K, V
    [slots, H, L, D]; row r is slot slots[r] and sees positions < ends[r]. Returns [R, H*D].

    groups: (rows, slot, length) for rows holding the same first `length` positions (the samples of
    one prompt; prefix[r] = that length, 0 for rows in no group). A group's prompt part is one
    batched product over heads against one slot's copy, [H, G, D] x [H, D, length]; each row's own
    positions (a few hundred GEMVs, mostly call overhead in PyTorch) go to numba kernels that read
    every key and value once. Callers check can_attend first."""
    R, H, D = q.shape
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    scores = torch.empty(H, R, int(ends.max()), dtype=torch.float32)
    for rows, slot, length in groups:
        scores[:, rows, :length] = torch.matmul(q[rows].transpose(0, 1), K[slot, :, :length].transpose(1, 2))
    _own_scores_numba(q.numpy(), K.numpy(), slots, prefix, ends, scores.numpy())
    probs = scores.softmax(dim=-1)  # PyTorch's vectorised exp: scalar exp in numba costs more than the rest
    base = torch.zeros(H, R, D, dtype=torch.float32)
    for rows, slot, length in groups:
        base[:, rows] = torch.matmul(probs[:, rows, :length], V[slot, :, :length])
    out = torch.empty(R, H * D, dtype=torch.float32)
    _own_values_numba(probs.numpy(), V.numpy(), slots, prefix, ends, base.numpy(), out.numpy())
    return out
