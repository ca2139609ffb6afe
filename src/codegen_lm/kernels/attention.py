"""Decode-step attention on the engine's slot cache: rotary + cache writes, and attention of a few
new tokens per row over the row's own slot.

K and V are `[slots, heads, capacity, head_dim]` (one layer of the slot cache). Row r is one new
token at position starts[r] of slot slots[r]; its query sees positions < ends[r]. Rows of one group
(the samples of one prompt) hold the same first `length` positions, which are then read once for
the whole group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import _numba
from ._numba import numba, set_threads

if _numba.HAVE_NUMBA:

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
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

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _write_rows_numba(key, value, K, V, slots, starts):
        for r in range(key.shape[0]):
            s, p = slots[r], starts[r]
            for h in range(key.shape[1]):
                for d in range(key.shape[2]):
                    K[s, h, p, d] = key[r, h, d]
                    V[s, h, p, d] = value[r, h, d]

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
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

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
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


def can_attend(q: torch.Tensor, K: torch.Tensor) -> bool:
    """Whether these kernels can run here: numba, fp32 CPU tensors, no autograd, not tracing."""
    return (_numba.numba_ok() and q.device.type == "cpu" and q.dtype == torch.float32 and K.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def rotary_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                 slots: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    """One new token per row, straight from the q/k/v product qkv [R, 3E] ([q; k; v], each head's
    rotary dimensions de-interleaved as in model.py): rotary on q and k (cos, sin [R, rotary/2] at
    each row's position), k and v stored at position starts[r] of cache slot slots[r]; returns q
    [R, H, D] scaled by head_dim^-0.5. Callers check can_attend first."""
    H, D = K.shape[1], K.shape[3]
    q = torch.empty(qkv.shape[0], H, D, dtype=torch.float32)
    set_threads()
    _rotary_store_numba(qkv.contiguous().numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(), K.numpy(),
                        V.numpy(), slots, starts, np.float32(D**-0.5), q.numpy())
    return q


def write_rows(key: torch.Tensor, value: torch.Tensor, K: torch.Tensor, V: torch.Tensor, slots: np.ndarray,
               starts: np.ndarray) -> None:
    """key, value [R, H, D] (one new token per row) into position starts[r] of slot slots[r]."""
    _write_rows_numba(key.numpy(), value.numpy(), K.numpy(), V.numpy(), slots, starts)


def rows_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, slots: np.ndarray, ends: np.ndarray,
                   prefix: np.ndarray, groups: Sequence[tuple[slice | torch.Tensor, int, int]]) -> torch.Tensor:
    """Attention of one new token per row over its own cache slot: q [R, H, D] (scaled); row r is slot
    slots[r] and sees positions < ends[r]. Returns [R, H*D].

    groups: (rows, slot, length) for rows holding the same first `length` positions (prefix[r] = that
    length, 0 for rows in no group). A group's prompt part is one batched product over heads against
    one slot's copy, [H, G, D] x [H, D, length]; each row's own positions (a few hundred GEMVs, mostly
    call overhead in PyTorch) go to numba kernels that read every key and value once. Callers check
    can_attend first."""
    R, H, D = q.shape
    set_threads()
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
