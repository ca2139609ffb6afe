"""The engine's key/value cache: a fixed number of slots, one per running sequence.

Buffers are `[slots, heads, capacity, head_dim]` per layer. Running sequences always occupy the
lowest slots (the engine moves the last one into a slot that frees up), so a decode step attends over
a plain view `buffer[:rows, :, :length]` with no gathering. Each row has its own length; positions a
row has not written are masked out by the caller. The time dimension grows by doubling, so memory
follows the longest running sequence rather than the context size.
"""

from __future__ import annotations

import torch


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
        self._starts: torch.Tensor | None = None
        self._starts_list: list[int] = []
        self._new = 0

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

    def begin(self, rows: int, starts: list[int], new_tokens: int, first_slot: int = 0) -> int:
        """Prepare a forward pass over slots first_slot .. first_slot+rows-1 writing `new_tokens`
        tokens at each row's start position; returns the attended length (max start + new_tokens)."""
        length = max(starts) + new_tokens
        self.ensure(length)
        self._first, self._rows, self._starts_list, self._new = first_slot, rows, list(starts), new_tokens
        self._starts = torch.tensor(starts, device=self.device)
        self._length = length
        return length

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new `[rows, heads, T, head_dim]` keys/values and return views of everything
        the rows may attend to."""
        first, last = self._first, self._first + self._rows
        K, V = self.keys[layer][first:last], self.values[layer][first:last]
        if self._new == 1 and self._rows > 1:
            rows = torch.arange(self._rows, device=self.device)
            K[rows, :, self._starts] = key[:, :, 0]
            V[rows, :, self._starts] = value[:, :, 0]
        else:
            for r, start in enumerate(self._starts_list):
                K[r, :, start : start + self._new] = key[r]
                V[r, :, start : start + self._new] = value[r]
        return K[:, :, : self._length], V[:, :, : self._length]

    def copy_slot(self, src: int, dst: int | slice, length: int) -> None:
        """Give slot(s) `dst` the first `length` positions of slot `src`: the samples of one prompt
        share its prefill, and a running sequence moves down into a freed slot."""
        if src == dst:
            return
        for buffers in (self.keys, self.values):
            for t in buffers:
                t[dst, :, :length] = t[src, :, :length]
