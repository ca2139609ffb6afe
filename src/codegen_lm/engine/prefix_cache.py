"""Keys and values of earlier prompts and samples, kept for requests that start the same way.

An editor re-sends the same file prefix after every keystroke; a conversation re-sends a history that
only grows. The cache holds fixed-size blocks of `block_tokens` positions (all layers' keys and values
of those positions), each keyed by a digest of the token content of everything up to its end, so a
block is only ever reused after exactly the same tokens. A new prompt walks its own blocks from the
start and reuses the longest run that is cached; only the rest is computed.

Eviction is least-recently-used within a byte budget. A lookup or insert touches a chain from its
last block to its first, so a block is always more recent than the blocks after it and eviction takes
the ends of chains first (a prefix stays usable as long as possible). A chain longer than the whole
budget keeps its first blocks. Tensors of evicted blocks are reused for new ones.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_MB = 1024  # budget of an engine's prefix cache unless told otherwise (0 turns it off)
BLOCK_TOKENS = 16  # positions per block: what a reuse can miss at the end of a matching prefix


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # lookups that reused at least one block
    hit_tokens: int = 0  # prompt tokens whose keys and values came from the cache
    lookup_tokens: int = 0  # prompt tokens looked up (hit_tokens / lookup_tokens: the token hit rate)
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    blocks: int = 0
    bytes: int = 0
    budget_bytes: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str = "cpu", block_tokens: int = BLOCK_TOKENS) -> None:
        """block_shape: [2, layers, heads, block_tokens, head_dim] (keys and values of one block)."""
        self.block_tokens = block_tokens
        self.block_shape, self.dtype, self.device = tuple(block_shape), dtype, torch.device(device)
        self.block_bytes = int(np.prod(block_shape)) * torch.empty((), dtype=dtype).element_size()
        self.capacity = budget_bytes // self.block_bytes  # blocks
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> data, least recent first
        self._free: list[torch.Tensor] = []
        self._stats = PrefixCacheStats(budget_bytes=budget_bytes)

    def keys(self, tokens: Sequence[int], limit: int | None = None) -> list[bytes]:
        """Digests of the full blocks of tokens[:limit], each covering everything before its end."""
        n = len(tokens) if limit is None else min(limit, len(tokens))
        ids = np.asarray(tokens[: n - n % self.block_tokens], dtype=np.int64).reshape(-1, self.block_tokens)
        keys, previous = [], b""
        for block in ids:
            previous = hashlib.blake2b(previous + block.tobytes(), digest_size=16).digest()
            keys.append(previous)
        return keys

    def lookup(self, tokens: Sequence[int], limit: int) -> list[torch.Tensor]:
        """The data of the longest run of cached blocks at the start of tokens[:limit]."""
        found = []
        for key in self.keys(tokens, limit):
            data = self._blocks.get(key)
            if data is None:
                break
            found.append(key)
        self._touch(found)
        s = self._stats
        s.lookups += 1
        s.hits += bool(found)
        s.hit_tokens += len(found) * self.block_tokens
        s.lookup_tokens += len(tokens)
        return [self._blocks[key] for key in found]

    def insert(self, tokens: Sequence[int], read: Callable[[int, int, torch.Tensor], None]) -> int:
        """Cache the full blocks of `tokens` that are not cached yet; read(start, end, out) fills a
        block's tensor with the keys and values of positions start..end-1. Returns blocks added."""
        chain = self.keys(tokens)
        keep = set(chain)
        added = 0
        for i, key in enumerate(chain):
            if key in self._blocks:
                continue
            data = self._allocate(keep)
            if data is None:
                break  # the budget is full of this chain's own blocks: keep its start
            read(i * self.block_tokens, (i + 1) * self.block_tokens, data)
            self._blocks[key] = data
            added += 1
        self._touch([k for k in chain if k in self._blocks])
        self._stats.inserted_blocks += added
        return added

    def credit(self, cached: int, reused: int) -> None:
        """Count the last lookup as reusing `reused` tokens instead of the `cached` its blocks gave (the
        engine found more of the prompt in a freed slot)."""
        s = self._stats
        s.hits += cached == 0 and reused > 0
        s.hit_tokens += reused - cached

    def stats(self) -> PrefixCacheStats:
        s = self._stats
        s.blocks = len(self._blocks)
        s.bytes = s.blocks * self.block_bytes
        return PrefixCacheStats(**vars(s))

    def clear(self) -> None:
        self._blocks.clear()
        self._free.clear()

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):  # the first block ends up most recent
            self._blocks.move_to_end(key)

    def _allocate(self, keep: set[bytes]) -> torch.Tensor | None:
        if len(self._blocks) < self.capacity:
            if self._free:
                return self._free.pop()
            return torch.empty(self.block_shape, dtype=self.dtype, device=self.device)
        for key in self._blocks:  # least recent first
            if key not in keep:
                self._stats.evicted_blocks += 1
                return self._blocks.pop(key)
        return None
