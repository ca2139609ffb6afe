"""The engine's key/value cache: a fixed number of slots, one per running sequence.

Buffers are `[slots, heads, capacity, head_dim]` per layer. Running sequences always occupy the
lowest slots (the engine moves the last one into a slot that frees up), so a decode step attends over
a plain view `buffer[:rows, :, :length]` with no gathering. Each row has its own length; positions a
row has not written are masked out by the caller. The time dimension grows by doubling, so memory
follows the longest running sequence rather than the context size.

Samples of one prompt hold identical keys and values for the prompt. When a decode step says which
rows share a prompt (`begin(..., shared=...)`), `attend` reads that prompt's keys and values once for
the whole group instead of once per row: with 20 samples of a 128-token prompt, most of a decode
step's attention traffic.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..model import attention


class SlotCache:
    def __init__(
        self,
        n_layer: int,
        slots: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        initial_len: int = 256,
    ) -> None:
        self.slots, self.max_len = slots, max_len
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        capacity = min(initial_len, max_len)
        # zeros, not empty: masked positions still enter the attention product (as 0 x value)
        shape = (slots, n_head, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self._rows = 0
        self._shared: list[tuple[list[int], int]] = []
        self._starts: torch.Tensor | None = None
        self._starts_list: list[int] = []
        self._new = 0
        self._plan: tuple | None = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def ensure(self, length: int) -> None:
        """Make room for `length` positions in every slot (doubling, up to max_len)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the engine's limit of {self.max_len}")
        capacity = min(self.max_len, max(length, 2 * self.capacity))
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                buffers[i] = new

    def begin(self, rows: int, starts: list[int], new_tokens: int, first_slot: int = 0,
              shared: list[tuple[list[int], int]] | None = None) -> int:
        """Prepare a forward pass over slots first_slot .. first_slot+rows-1 writing `new_tokens`
        tokens at each row's start position; returns the attended length (max start + new_tokens).

        shared: for a decode step (new_tokens 1), groups of rows (row indices, prompt length) whose
        first `prompt length` positions hold the same keys and values."""
        length = max(starts) + new_tokens
        self.ensure(length)
        self._shared = [(g, n) for g, n in (shared or []) if len(g) > 1] if new_tokens == 1 else []
        self._first, self._rows, self._starts_list, self._new = first_slot, rows, list(starts), new_tokens
        self._starts = torch.tensor(starts, device=self.device)
        self._length = length
        self._plan = None
        return length

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new `[rows, heads, T, head_dim]` keys/values and return views of everything
        the rows may attend to."""
        first, last = self._first, self._first + self._rows
        K, V = self.keys[layer][first:last], self.values[layer][first:last]
        if self._new == 1 and self._rows > 1 and min(self._starts_list) == max(self._starts_list):
            start = self._starts_list[0]  # rows in step (the usual case): a plain slice write
            K[:, :, start : start + 1] = key
            V[:, :, start : start + 1] = value
        elif self._new == 1 and self._rows > 1:
            rows = torch.arange(self._rows, device=self.device)
            K[rows, :, self._starts] = key[:, :, 0]
            V[rows, :, self._starts] = value[:, :, 0]
        else:
            for r, start in enumerate(self._starts_list):
                K[r, :, start : start + self._new] = key[r]
                V[r, :, start : start + self._new] = value[r]
        return K[:, :, : self._length], V[:, :, : self._length]

    def attend(self, layer: int, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Store the new keys/values and attend: `attention(q, K, V, mask, causal)`, except in a
        decode step of several rows, where the numba kernels read each row's own positions only and
        the rows of a shared group read their common prompt once (kernels.rows_attention). A single
        row stays with SDPA, which is faster for one query."""
        plan = self.decode_plan() if self._new == 1 and self._rows > 1 else None
        if plan is not None and kernels.can_attend(q, key):
            slots, starts, ends, prefix, groups = plan
            kernels.write_rows(key[:, :, 0], value[:, :, 0], self.keys[layer], self.values[layer], slots, starts)
            out = kernels.rows_attention(q[:, :, 0] * q.shape[-1] ** -0.5, self.keys[layer], self.values[layer],
                                         slots, ends, prefix, groups)
            return out.view(q.shape[0], 1, q.shape[1], q.shape[3]).transpose(1, 2)
        K, V = self.update(layer, key, value)
        if not self._shared or q.dtype != torch.float32:
            return attention(q, K, V, mask, causal, 0.0)
        out = torch.empty_like(q)  # no kernels: shared groups through the PyTorch version, other rows SDPA
        grouped = torch.zeros(q.shape[0], dtype=torch.bool)
        for rows, prefix in self._shared:
            index = torch.tensor(rows)
            out[index] = shared_prefix_attention(q[index], K, V, index, prefix, self._starts[index] + 1)
            grouped[index] = True
        rest = (~grouped).nonzero().flatten()
        if len(rest):
            out[rest] = attention(q[rest], K[rest], V[rest], None if mask is None else mask[rest], causal, 0.0)
        return out

    def decode_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
        """For a decode step, what the kernels need, worked out once per step rather than per layer:
        each row's slot, position, attended length and shared prompt length (0 outside groups), and the
        groups as (rows, slot holding their prompt, prompt length), rows a slice where consecutive."""
        if self._plan is None:
            slots = np.arange(self._first, self._first + self._rows, dtype=np.int64)
            starts = np.array(self._starts_list, dtype=np.int64)
            prefix = np.zeros(self._rows, dtype=np.int64)
            groups = []
            for rows, length in self._shared:
                consecutive = rows == list(range(rows[0], rows[-1] + 1))
                groups.append((slice(rows[0], rows[-1] + 1) if consecutive else torch.tensor(rows),
                               self._first + rows[0], length))
                prefix[rows] = length
            self._plan = (slots, starts, starts + 1, prefix, groups)
        return self._plan

    def copy_slot(self, src: int, dst: int | slice, length: int) -> None:
        """Give slot(s) `dst` the first `length` positions of slot `src`: the samples of one prompt
        share its prefill, and a running sequence moves down into a freed slot."""
        if src == dst:
            return
        for buffers in (self.keys, self.values):
            for t in buffers:
                t[dst, :, :length] = t[src, :, :length]


def shared_prefix_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, rows: torch.Tensor | slice,
                            prefix: int, ends: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row, for rows whose first `prefix` keys/values are identical.

    q [G, H, 1, D]; K, V [R, H, L, D] with the group's rows at `rows`; row g attends to positions
    0 .. ends[g]-1 (`rows` is a slice or an index tensor). The prompt part is one [H, G, D] x
    [H, D, prefix] product against the first row's copy; the rest (each row's own tokens) is read per
    row; one softmax over both parts. kernels.rows_attention is the faster numba version."""
    scale = q.shape[-1] ** -0.5
    longest = int(ends.max())
    first = rows.start if isinstance(rows, slice) else int(rows[0])
    k0, v0 = K[first, :, :prefix], V[first, :, :prefix]  # [H, P, D]
    qg = q[:, :, 0]  # [G, H, D]
    s_prompt = torch.matmul(qg.transpose(0, 1), k0.transpose(1, 2)).transpose(0, 1)  # [G, H, P]
    K_own, V_own = K[rows, :, prefix:longest], V[rows, :, prefix:longest]  # [G, H, S, D]
    s_own = torch.matmul(q, K_own.transpose(-1, -2))[:, :, 0]  # [G, H, S]
    positions = torch.arange(prefix, longest, device=q.device)
    s_own = s_own.masked_fill((positions[None, :] >= ends[:, None])[:, None, :], float("-inf"))
    probs = (torch.cat([s_prompt, s_own], dim=-1) * scale).softmax(dim=-1)
    p_prompt, p_own = probs[..., :prefix], probs[..., prefix:]
    out = torch.matmul(p_prompt.transpose(0, 1), v0).transpose(0, 1)  # [G, H, D]
    out = out + torch.matmul(p_own[:, :, None], V_own)[:, :, 0]
    return out[:, :, None]
