"""Scheduling: which waiting request's prompt is prefilled next and how much of it per step, and how
many of its samples get slots. Policy only: the engine carries it out.

First come, first served. One prompt at a time owns the staging slot, where it is prefilled in chunks
that ride along with the decode steps of the running samples: `prefill_chunk` tokens per step while
samples are decoding (so they keep producing tokens while a long prompt is admitted), `solo_chunk`
when nothing else runs. Once prefilled, its samples take free slots (a copy of the prompt's keys and
values each); samples that find no free slot wait, with the prompt kept in the staging slot, and the
next prompt is staged when the last of them is admitted.
"""

from __future__ import annotations

from collections import deque

from .requests import Request

# Tokens of a prompt prefilled per step while other samples decode. At 64 a step costs about twice a
# plain decode step of 8 samples on this project's 2-core machine (codegen-350M shape), so running
# streams never pause for more than ~3 steps' time while a 1,800-token prompt is admitted (README,
# "Interactive use"); smaller chunks make the prompt wait longer for little gain.
PREFILL_CHUNK = 64
SOLO_CHUNK = 512  # tokens per step when nothing else is running (bounds the attention scores' memory)


class Scheduler:
    def __init__(self, max_batch: int, prefill_chunk: int = PREFILL_CHUNK, solo_chunk: int = SOLO_CHUNK) -> None:
        if prefill_chunk < 1 or solo_chunk < 1:
            raise ValueError(f"prefill chunks must be >= 1 token, got {prefill_chunk} and {solo_chunk}")
        self.max_batch, self.prefill_chunk, self.solo_chunk = max_batch, prefill_chunk, solo_chunk
        self.waiting: deque[Request] = deque()
        self.staged: Request | None = None

    def __len__(self) -> int:
        """Requests not yet fully admitted."""
        return len(self.waiting) + (self.staged is not None)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def drop(self, request: Request) -> None:
        if self.staged is request:
            self.staged = None
        elif request in self.waiting:
            self.waiting.remove(request)

    def stage(self) -> Request | None:
        """The next request to take the staging slot, if the slot is free and one is waiting."""
        if self.staged is None and self.waiting:
            self.staged = self.waiting.popleft()
            return self.staged
        return None

    def chunk(self, running: int) -> tuple[int, int] | None:
        """Positions (start, end) of the staged prompt to prefill in this step, if it needs any."""
        request = self.staged
        if request is None or request.logits is not None:
            return None
        size = self.prefill_chunk if running else self.solo_chunk
        return request.prefilled, min(len(request.prompt_ids), request.prefilled + size)

    def admissions(self, running: int) -> int:
        """How many samples of the staged request take slots now (its prompt is prefilled)."""
        request = self.staged
        if request is None or request.logits is None:
            return 0
        return min(len(request.to_admit), self.max_batch - running)

    def admitted(self) -> None:
        """The staged request's samples that got slots have been taken: free the staging slot when
        none is left."""
        if self.staged is not None and not self.staged.to_admit:
            self.staged = None
