"""Scheduling: which waiting request's prompt is prefilled next and how much of it per step, and how
many of its samples get slots. Policy only: the engine carries it out.

First come, first served. One prompt at a time owns the staging slot, where it is prefilled in chunks
that ride along with the decode steps of the running samples, so they keep producing tokens while a
long prompt is admitted. When nothing else runs, chunks are `solo_chunk` tokens. While samples are
decoding, a chunk is sized by measurement: the engine reports how long each step took, and the chunk
is as many tokens as cost CHUNK_BUDGET times a plain decode step, so that no running stream waits more
than ~2.2 steps' time for its next token. While other prompts wait behind the one being prefilled (a
loaded server), every step of its prefill delays all of their first tokens too, so chunks then cost
BUSY_CHUNK_BUDGET steps: prefill gets ~3/4 of the machine instead of ~1/2, and streams still get a token
at least every ~4 steps (a fixed `prefill_chunk` overrides this; until both costs
are measured, chunks are FIRST_CHUNK tokens). What a prompt
token costs against a decode step differs by an order of magnitude between CPUs (compute against
memory bandwidth: AVX2, AVX-512, AMX) and little between model sizes, so it is measured where it runs.
Once prefilled, the prompt's samples take free slots (a copy of its keys and values each; the k beams
of a beam search take k slots together, once k are free). There are
two staging slots: while the samples of a prefilled prompt wait for slots to free (`ready`), the next
prompt is already prefilled in the other (`staged`), so a full batch does not stop prefill.
"""

from __future__ import annotations

from collections import deque

from .requests import Request

CHUNK_BUDGET = 1.2  # a chunk costs this many plain decode steps
BUSY_CHUNK_BUDGET = 3.0  # ... while other prompts wait behind the one being prefilled
FIRST_CHUNK = 16  # tokens per chunk before any step has been timed
MIN_CHUNK = 8
SOLO_CHUNK = 512  # tokens per step when nothing else is running (bounds the attention scores' memory)
RESAMPLE_EVERY = 32  # while prefilling next to decoding samples, one step in this many has no chunk
_SMOOTHING = 0.3  # weight of the newest timing in the running estimates


class Scheduler:
    def __init__(self, max_batch: int, prefill_chunk: int | None = None, solo_chunk: int = SOLO_CHUNK) -> None:
        if (prefill_chunk is not None and prefill_chunk < 1) or solo_chunk < 1:
            raise ValueError(f"prefill chunks must be >= 1 token, got {prefill_chunk} and {solo_chunk}")
        self.max_batch, self.prefill_chunk, self.solo_chunk = max_batch, prefill_chunk, solo_chunk
        self.waiting: deque[Request] = deque()
        self.staged: Request | None = None  # being prefilled (or prefilled, while `ready` is taken)
        self.ready: Request | None = None  # prefilled, its samples waiting for slots
        self.decode_step_s: float | None = None  # running estimate of a plain decode step
        self.token_s: float | None = None  # running estimate of one prompt token in a chunk
        self._since_plain = 0  # mixed steps since the last plain decode step

    def __len__(self) -> int:
        """Requests not yet fully admitted."""
        return len(self.waiting) + (self.staged is not None) + (self.ready is not None)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def drop(self, request: Request) -> None:
        if self.staged is request:
            self.staged = None
        elif self.ready is request:
            self.ready = None
            self._promote()
        elif request in self.waiting:
            self.waiting.remove(request)

    def stage(self) -> Request | None:
        """The next request to take the staging slot, if the slot is free and one is waiting."""
        if self.staged is None and self.waiting:
            self.staged = self.waiting.popleft()
            return self.staged
        return None

    def observe(self, running: int, chunk_tokens: int, seconds: float) -> None:
        """How long a step took that decoded `running` samples and prefilled `chunk_tokens` tokens.

        A mixed step costs about (plain decode step) + chunk_tokens x (prompt token). Plain decode
        steps measure the first (while a prompt is being prefilled, `chunk` leaves one step in
        RESAMPLE_EVERY without a chunk to keep that figure current); mixed steps then give the second."""
        if not running:
            return
        if not chunk_tokens:
            self.decode_step_s = _blend(self.decode_step_s, seconds)
            self._since_plain = 0
            return
        self._since_plain += 1
        if self.decode_step_s is not None:
            self.token_s = _blend(self.token_s, max(seconds - self.decode_step_s, 0.0) / chunk_tokens)

    def chunk_size(self, running: int) -> int:
        """Prompt tokens to prefill in a step alongside `running` decoding samples."""
        if not running:
            return self.solo_chunk
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        if not self.decode_step_s or not self.token_s:
            return FIRST_CHUNK
        budget = BUSY_CHUNK_BUDGET if self.waiting else CHUNK_BUDGET
        return max(MIN_CHUNK, min(self.solo_chunk, int(budget * self.decode_step_s / self.token_s)))

    def chunk(self, running: int) -> tuple[int, int] | None:
        """Positions (start, end) of the staged prompt to prefill in this step, if it needs any (None
        also for the occasional plain decode step that keeps the step-time estimate current)."""
        request = self.staged
        if request is None or request.logits is not None:
            return None
        if running and self.prefill_chunk is None and (
                self.decode_step_s is None or self._since_plain >= RESAMPLE_EVERY):
            self._since_plain = 0
            return None
        return request.prefilled, min(len(request.prompt_ids), request.prefilled + self.chunk_size(running))

    def admissions(self, running: int) -> int:
        """How many samples of the ready request take slots now (the beams of a beam search all at once,
        or none)."""
        request = self.ready
        if request is None:
            return 0
        free = self.max_batch - running
        if request.beam is not None:
            return len(request.to_admit) if len(request.to_admit) <= free else 0
        return min(len(request.to_admit), free)

    def prefilled(self) -> None:
        """The staged prompt has been prefilled: it becomes ready if that place is free."""
        self._promote()

    def _promote(self) -> None:
        if self.ready is None and self.staged is not None and self.staged.logits is not None:
            self.ready, self.staged = self.staged, None

    def admitted(self) -> None:
        """The ready request's samples that got slots have been taken: free its staging slot when none
        is left (and let a prefilled staged prompt take its place)."""
        if self.ready is not None and not self.ready.to_admit:
            self.ready = None
            self._promote()


def _blend(estimate: float | None, value: float) -> float:
    return value if estimate is None else (1 - _SMOOTHING) * estimate + _SMOOTHING * value
