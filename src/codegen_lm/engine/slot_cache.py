"""The engine's key/value cache: a fixed number of slots, one per running sequence (plus one where
prompts are prefilled).

Keys and values are each one tensor `[layers, places, heads, capacity, head_dim]`; `keys[layer]` is the
`[places, heads, capacity, head_dim]` view the attention kernels read (a slot's place: `phys[slot]`).
Running sequences occupy the lowest slots (the engine moves the last one into a slot that frees up).
Each slot has its own length; positions a slot has not written are masked out by the caller.

Memory follows what each slot has actually written. On the CPU the tensors span the whole context
from the start, in zero-filled memory that the operating system commits page by page on first write
(an anonymous mapping with 4 KB pages): nothing is ever reallocated or copied to grow, so a long
prompt arriving never stalls the running streams (allocating and zeroing gigabytes at once takes
seconds), and a slot only costs memory for the positions it has used. On a GPU the time dimension
grows by doubling instead.

Slot numbers are the engine's; on the CPU each maps to a place in the tensors (`phys`), so that handing
a slot's contents to another slot that frees up (a prefilled prompt to its one sample, the last running
sequence into a hole) trades the two places instead of copying hundreds of megabytes (`move`). The
CPU kernels read the places (runner.py); the model's own blocks, which want the rows of a step in
consecutive places, read a gathered copy when they are not. On a GPU, where copies are cheap and the
blocks' batching matters, slots are places and `move` copies.

Other copies between slots (a prompt's keys and values to each further sample, beams reordered to the
beams they extend) and in and out of the prefix cache's blocks are one copy per tensor, all layers at
once.
"""

from __future__ import annotations

import math
import mmap
import sys

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
        remap: bool = False,
    ) -> None:
        """remap: let `move` trade places instead of copying (the engine does on the CPU)."""
        self.slots, self.max_len = slots, max_len
        self.remap = remap
        self.phys = list(range(slots))  # slot -> its place in k and v
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        # zeros, not empty: masked positions still enter attention products (as 0 x value)
        if self.device.type == "cpu":
            shape = (n_layer, slots, n_head, max_len, head_dim)
            self.k, self.v = lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)
        else:
            capacity = min(initial_len, max_len)
            self.k = torch.zeros(n_layer, slots, n_head, capacity, head_dim, dtype=dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
        self._views()
        self._begun: tuple[int, int, list[int], int, int] | None = None

    def _views(self) -> None:
        self.keys = list(self.k.unbind(0))
        self.values = list(self.v.unbind(0))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def token_bytes(self) -> int:
        """Bytes of keys and values per token of one sequence (all layers)."""
        return 2 * self.n_layer * self.n_head * self.head_dim * self.k.element_size()

    def ensure(self, length: int) -> None:
        """Make room for `length` positions in every slot (doubling, up to max_len)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the engine's limit of {self.max_len}")
        capacity = min(self.max_len, max(length, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)
        self._views()

    def touch(self, slot: int, start: int, end: int) -> None:
        """Zero positions start..end-1 of a free slot, so that its memory is committed before a sequence
        is copied there (the engine does it a prompt chunk at a time, while the prompt is prefilled)."""
        self.ensure(end)
        p = self.phys[slot]
        self.k[:, p, :, start:end] = 0
        self.v[:, p, :, start:end] = 0

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot `dst` a copy of the first `length` positions of slot `src` (a prompt to each of its
        samples but the last)."""
        if src != dst and length:
            s, d = self.phys[src], self.phys[dst]
            self.k[:, d, :, :length] = self.k[:, s, :, :length]
            self.v[:, d, :, :length] = self.v[:, s, :, :length]

    def move(self, src: int, dst: int, length: int) -> bool:
        """Give slot `dst` the first `length` positions of slot `src`, whose contents are not needed
        after (a prompt to its last sample; a running sequence moving down into a freed slot). Returns
        True where the slots traded places (src then holds what dst held), False where it copied (src
        keeps its contents)."""
        if src == dst or not length:
            return False
        if self.remap:
            self.phys[src], self.phys[dst] = self.phys[dst], self.phys[src]
            return True
        self.copy_slot(src, dst, length)
        return False

    def gather_slots(self, dst: list[int], src: list[int], start: int, end: int) -> None:
        """Slot dst[i] takes positions start..end-1 of slot src[i], all at once (the beams of a beam
        search moving to the beams they extend: src may repeat and overlap dst, every slot is read
        before any is written). Pairs with dst[i] == src[i] cost nothing."""
        pairs = [(self.phys[d], self.phys[s]) for d, s in zip(dst, src) if d != s]
        if not pairs or end <= start:
            return
        to = torch.tensor([d for d, _ in pairs], device=self.device)
        frm = torch.tensor([s for _, s in pairs], device=self.device)
        for t in (self.k, self.v):
            t[:, to, :, start:end] = t[:, frm, :, start:end]  # the right side is a copy

    def read(self, slot: int, start: int, end: int, out: torch.Tensor) -> None:
        """Positions start..end-1 of `slot` into out [2, layers, heads, end - start, head_dim]."""
        p = self.phys[slot]
        out[0].copy_(self.k[:, p, :, start:end])
        out[1].copy_(self.v[:, p, :, start:end])

    def write(self, slot: int, start: int, data: torch.Tensor) -> None:
        """data [2, layers, heads, n, head_dim] into positions start..start+n-1 of `slot`."""
        end = start + data.shape[3]
        self.ensure(end)
        p = self.phys[slot]
        self.k[:, p, :, start:end] = data[0]
        self.v[:, p, :, start:end] = data[1]

    # ---- the model's cache protocol (its own blocks driving the slots) --------------------------------

    def begin(self, first_slot: int, rows: int, starts: list[int], new_tokens: int) -> int:
        """Before the model's blocks run over slots first_slot .. first_slot+rows-1, each row writing
        `new_tokens` tokens from its start position: returns the attended length."""
        length = max(starts) + new_tokens
        self.ensure(length)
        self._begun = (first_slot, rows, list(starts), new_tokens, length)
        return length

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new `[rows, heads, T, head_dim]` keys/values and return views of everything the
        rows may attend to (the model masks what a row may not see)."""
        first, rows, starts, new, length = self._begun
        places = self.phys[first : first + rows]
        if places != list(range(places[0], places[0] + rows)):  # scattered: write each row, read a copy
            for r, (p, start) in enumerate(zip(places, starts)):
                self.keys[layer][p, :, start : start + new] = key[r]
                self.values[layer][p, :, start : start + new] = value[r]
            at = torch.tensor(places, device=self.device)
            return self.keys[layer][at, :, :length], self.values[layer][at, :, :length]
        first = places[0]
        K, V = self.keys[layer][first : first + rows], self.values[layer][first : first + rows]
        if min(starts) == max(starts):  # rows in step (the usual case): one slice write
            K[:, :, starts[0] : starts[0] + new] = key
            V[:, :, starts[0] : starts[0] + new] = value
        else:
            for r, start in enumerate(starts):
                K[r, :, start : start + new] = key[r]
                V[r, :, start : start + new] = value[r]
        return K[:, :, :length], V[:, :, :length]


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000) if sys.platform == "linux" else 0


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose memory is committed page by page as it is written: an anonymous mapping
    (zero-filled by the kernel, not reserved up front, small pages so that commits stay fine-grained)."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape)).view(shape)  # keeps `memory` alive
