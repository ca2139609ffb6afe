"""Decoding one sequence (batch 1) with one compiled call per transformer block, on the CPU in fp32.

A batch-1 decode step of the 350M model reads 1.2 GB of weights; that takes ~17 ms at this
machine's memory bandwidth, but the ~25 PyTorch calls per block around the four products
(LayerNorm, rotary, cache writes, attention, residual adds, module calls) add another ~4 ms of
dispatch. `block_step` runs a whole block as one numba function instead: the same maths as
`model.CodeGenBlock` (LayerNorm, [q; k; v] and fc_in products, rotary in the de-interleaved layout
described in model.py, attention, tanh-GELU, x + out_proj + fc_out) for one token, which writes its key
and value into the cache and returns the block's output. Batched decoding does not come here: at 20
rows the products are compute-bound and oneDNN's GEMM wins.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads

if _numba.HAVE_NUMBA:

    @numba.njit(fastmath=True, inline="always", error_model="numpy")
    def _gelu_tanh(u):
        # tanh(z) = 1 - 2 / (exp(2z) + 1): scalar exp is ~4x cheaper than scalar tanh here
        z = np.float32(0.7978845608028654) * (u + np.float32(0.044715) * u * u * u)
        t = np.float32(1.0) - np.float32(2.0) / (math.exp(np.float32(2.0) * z) + np.float32(1.0))
        return np.float32(0.5) * u * (np.float32(1.0) + t)

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _block_numba(x, ln_w, ln_b, eps, w_qkv, w_in, b_in, w_o, w_out, b_out, cos, sin, K, V, pos, n_head, out):
        E = x.shape[0]
        D = E // n_head
        half = cos.shape[0]
        n_qkv, n_in = w_qkv.shape[0], w_in.shape[0]

        mean = 0.0  # LayerNorm, statistics in float64
        for i in range(E):
            mean += x[i]
        mean /= E
        var = 0.0
        for i in range(E):
            var += (x[i] - mean) * (x[i] - mean)
        inv = 1.0 / math.sqrt(var / E + eps)
        h = np.empty(E, dtype=np.float32)
        for i in range(E):
            h[i] = np.float32((x[i] - mean) * inv) * ln_w[i] + ln_b[i]

        qkv = np.empty(n_qkv, dtype=np.float32)  # both products of h in one pass over their weights
        m = np.empty(n_in, dtype=np.float32)
        for n in numba.prange(n_qkv + n_in):
            acc = np.float32(0.0)
            if n < n_qkv:
                for k in range(E):
                    acc += h[k] * w_qkv[n, k]
                qkv[n] = acc
            else:
                i = n - n_qkv
                for k in range(E):
                    acc += h[k] * w_in[i, k]
                m[i] = _gelu_tanh(acc + b_in[i])

        for hd in range(n_head):  # rotary on q and k; k and v into the cache
            q0, k0, v0 = hd * D, E + hd * D, 2 * E + hd * D
            for i in range(half):
                c, s = cos[i], sin[i]
                q1, q2 = qkv[q0 + i], qkv[q0 + half + i]
                qkv[q0 + i], qkv[q0 + half + i] = q1 * c - q2 * s, q2 * c + q1 * s
                k1, k2 = qkv[k0 + i], qkv[k0 + half + i]
                K[hd, pos, i], K[hd, pos, half + i] = k1 * c - k2 * s, k2 * c + k1 * s
            for d in range(2 * half, D):
                K[hd, pos, d] = qkv[k0 + d]
            for d in range(D):
                V[hd, pos, d] = qkv[v0 + d]

        att = np.empty(E, dtype=np.float32)  # attention over positions 0..pos, a head per iteration
        scale = np.float32(1.0 / math.sqrt(D))
        for hd in numba.prange(n_head):
            scores = np.empty(pos + 1, dtype=np.float32)
            top = -np.inf
            for j in range(pos + 1):
                dot = np.float32(0.0)
                for d in range(D):
                    dot += qkv[hd * D + d] * K[hd, j, d]
                scores[j] = dot * scale
                top = max(top, scores[j])
            total = np.float32(0.0)
            for j in range(pos + 1):
                scores[j] = math.exp(scores[j] - top)
                total += scores[j]
            acc = np.zeros(D, dtype=np.float32)
            for j in range(pos + 1):
                p = scores[j] / total
                for d in range(D):
                    acc[d] += p * V[hd, j, d]
            for d in range(D):
                att[hd * D + d] = acc[d]

        for n in numba.prange(E):  # x + out_proj(att) + fc_out(m): one pass over both weights
            y = np.float32(0.0)
            for k in range(E):
                y += att[k] * w_o[n, k]
            z = np.float32(0.0)
            for k in range(n_in):
                z += m[k] * w_out[n, k]
            out[n] = x[n] + (y + z + b_out[n])

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the activation the kernel computes


def can_run(weights: list[torch.Tensor], activation: str, cache_dtype: torch.dtype) -> bool:
    """Whether `block_step` computes a block with these weights (ln_1 weight and bias, qkv, fc_in and
    its bias, out_proj, fc_out and its bias): numba, fp32 CPU tensors, a tanh GELU, inference."""
    return (_numba.numba_ok() and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and cache_dtype == torch.float32 and activation in GELU_TANH and len(weights) == 8
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu" for w in weights))


def block_step(weights: list[torch.Tensor], eps: float, n_head: int, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, K: torch.Tensor, V: torch.Tensor, pos: int) -> torch.Tensor:
    """The block's output for one token x [n_embd] at position `pos`, whose key and value go into
    K, V [heads, capacity, head_dim] (one slot of the cache; positions before `pos` already filled).
    weights: as for can_run; cos, sin: the rotary table rows for `pos`. Callers check can_run first."""
    out = torch.empty_like(x)
    set_threads()
    ln_w, ln_b, w_qkv, w_in, b_in, w_o, w_out, b_out = (w.detach().numpy() for w in weights)
    _block_numba(x.numpy(), ln_w, ln_b, eps, w_qkv, w_in, b_in, w_o, w_out, b_out, cos.numpy(), sin.numpy(),
                 K.numpy(), V.numpy(), pos, n_head, out.numpy())
    return out
