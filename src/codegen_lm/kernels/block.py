"""Decoding one sequence (batch 1) with one compiled call per transformer block, on the CPU in fp32
(fp32 or int8 weights).

A batch-1 decode step of the 350M model reads 1.2 GB of weights; that takes ~17 ms at this
machine's memory bandwidth, but the ~25 PyTorch calls per block around the four products
(LayerNorm, rotary, cache writes, attention, residual adds, module calls) add another ~4 ms of
dispatch. `block_step` runs a whole block as one numba function instead: the same maths as
`model.CodeGenBlock` (LayerNorm, [q; k; v] and fc_in products, rotary in the de-interleaved layout
described in model.py, attention, tanh-GELU, x + out_proj + fc_out) for one token, which writes its key
and value into the cache and returns the block's output. The same source compiles for int8 weights
(quantize.py's, one fp32 scale per output row: converted in registers as they stream by; fp32 weights
come with scales of one), where the call count matters more still: ~8 kernel launches per block, each
waking the threads of one of two OpenMP runtimes (numba's and PyTorch's), cost int8 decoding in a
server's background thread about as much as reading its weights. Batched decoding does not come here:
at 20 rows the products are compute-bound and oneDNN's GEMM wins.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads
from .gelu import GELU_TANH

if _numba.HAVE_NUMBA:
    from .dots import dots4
    from .gelu import gelu_tanh

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _block_numba(x, ln_w, ln_b, eps, w_qkv, s_qkv, w_in, s_in, b_in, w_o, s_o, w_out, s_out, b_out, cos, sin,
                     K, V, pos, n_head, group, out):
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
        groups_qkv = (n_qkv + group - 1) // group  # output rows `group` (1 or 4) at a time (dots.py)
        for g in numba.prange(groups_qkv + (n_in + group - 1) // group):
            if g < groups_qkv:
                n = group * g
                count = min(group, n_qkv - n)
                sums = dots4(h, w_qkv, n, count)
                for i in range(count):
                    qkv[n + i] = sums[i] * s_qkv[n + i]
            else:
                n = group * (g - groups_qkv)
                count = min(group, n_in - n)
                sums = dots4(h, w_in, n, count)
                for i in range(count):
                    m[n + i] = gelu_tanh(sums[i] * s_in[n + i] + b_in[n + i])

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
        n_keys = pos + 1
        for hd in numba.prange(n_head):
            qh = qkv[hd * D : (hd + 1) * D] * scale
            Kh, Vh = K[hd], V[hd]
            scores = np.empty(n_keys, dtype=np.float32)
            j = 0
            while j + 4 <= n_keys:  # four keys per pass over q, four values per pass over acc
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for d in range(D):
                    qd = qh[d]
                    a0 += qd * Kh[j, d]
                    a1 += qd * Kh[j + 1, d]
                    a2 += qd * Kh[j + 2, d]
                    a3 += qd * Kh[j + 3, d]
                scores[j], scores[j + 1], scores[j + 2], scores[j + 3] = a0, a1, a2, a3
                j += 4
            for t in range(j, n_keys):
                a0 = np.float32(0.0)
                for d in range(D):
                    a0 += qh[d] * Kh[t, d]
                scores[t] = a0
            top = scores.max()
            total = np.float32(0.0)
            for t in range(n_keys):
                e = np.float32(math.exp(scores[t] - top))
                scores[t] = e
                total += e
            acc = np.zeros(D, dtype=np.float32)
            j = 0
            while j + 4 <= n_keys:
                p0, p1, p2, p3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
                for d in range(D):
                    acc[d] += p0 * Vh[j, d] + p1 * Vh[j + 1, d] + p2 * Vh[j + 2, d] + p3 * Vh[j + 3, d]
                j += 4
            for t in range(j, n_keys):
                p0 = scores[t]
                for d in range(D):
                    acc[d] += p0 * Vh[t, d]
            inv = np.float32(1.0) / total
            for d in range(D):
                att[hd * D + d] = acc[d] * inv

        for g in numba.prange((E + group - 1) // group):  # x + out_proj(att) + fc_out(m): one pass over both
            n = group * g
            count = min(group, E - n)
            ys = dots4(att, w_o, n, count)
            zs = dots4(m, w_out, n, count)
            for i in range(count):
                out[n + i] = x[n + i] + (ys[i] * s_o[n + i] + zs[i] * s_out[n + i] + b_out[n + i])


MATRICES = (2, 4, 7, 9)  # the weight matrices among block_step's tensors; the others are fp32 vectors


def can_run(weights: list[torch.Tensor], activation: str, cache_dtype: torch.dtype) -> bool:
    """Whether `block_step` computes a block with these tensors (ln_1 weight and bias; qkv and its
    scales; fc_in, its scales and bias; out_proj and its scales; fc_out, its scales and bias): numba,
    CPU tensors, fp32 or int8 matrices, fp32 everything else, a tanh GELU, inference."""
    return (_numba.numba_ok() and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and cache_dtype == torch.float32 and activation in GELU_TANH and len(weights) == 12
            and all(w is not None and w.device.type == "cpu"
                    and w.dtype in ((torch.float32, torch.int8) if i in MATRICES else (torch.float32,))
                    for i, w in enumerate(weights)))


def block_step(weights: list[torch.Tensor], eps: float, n_head: int, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, K: torch.Tensor, V: torch.Tensor, pos: int, group: int = 4) -> torch.Tensor:
    """The block's output for one token x [n_embd] at position `pos`, whose key and value go into
    K, V [heads, capacity, head_dim] (one slot of the cache; positions before `pos` already filled).
    weights: as for can_run; cos, sin: the rotary table rows for `pos`; group: weight rows per dot
    loop (1 or 4: the layout the registry measured fastest here for one row, dots.py). Callers check
    can_run first."""
    out = torch.empty_like(x)
    set_threads()
    _block_numba(x.numpy(), *(w.detach().numpy() for w in weights[:2]), eps,
                 *(w.detach().numpy() for w in weights[2:]), cos.numpy(), sin.numpy(), K.numpy(), V.numpy(), pos,
                 n_head, group, out.numpy())
    return out
