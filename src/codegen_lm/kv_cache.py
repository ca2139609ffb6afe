"""Key/value cache: preallocated per-layer buffers that the attention layers append to."""

from __future__ import annotations

import torch


class KVCache:
    """Keys (after rotary) and values of every layer for the tokens seen so far.

    Buffers are `[batch, heads, capacity, head_dim]` per layer and are written in place, so a decode
    step costs no concatenation. `generate` allocates the exact capacity it needs up front; a cache
    created implicitly by `forward(use_cache=True)` grows by doubling when it fills.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_capacity: int | None = None,
    ) -> None:
        shape = (batch, n_head, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # tokens stored (the same for every row; padding is masked, not skipped)
        self.max_capacity = max_capacity

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens, growing the buffers if needed."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        if self.max_capacity is not None and needed > self.max_capacity:
            raise ValueError(
                f"sequence of {needed} tokens exceeds the model's context of {self.max_capacity} positions"
            )
        capacity = max(needed, 2 * self.capacity)
        if self.max_capacity is not None:
            capacity = min(capacity, self.max_capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `[batch, heads, T, head_dim]` new keys/values after the current length and return
        the keys/values of all tokens so far. `advance` must be called once all layers are done."""
        start, end = self.length, self.length + key.shape[2]
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def repeat_interleave(self, repeats: int) -> KVCache:
        """A cache whose rows are each row of this one repeated `repeats` times (n samples of one
        prompt share its prefill)."""
        out = object.__new__(KVCache)
        out.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        out.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]
        out.length = self.length
        out.max_capacity = self.max_capacity
        return out

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """`((key, value), ...)` per layer, trimmed to the stored length."""
        return tuple((k[:, :, : self.length], v[:, :, : self.length]) for k, v in zip(self.keys, self.values))
