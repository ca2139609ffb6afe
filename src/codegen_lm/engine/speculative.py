"""Guesses for speculative decoding: a few tokens per running sample, which the target model then
checks in the same pass as the rest of the step (a runner.Row of the pending token plus the guesses).

Two sources:
- prompt lookup: find the latest earlier occurrence of the last few tokens in the context and propose
  what followed it. Code repeats itself (names, argument lists, whole lines of the prompt), and this
  costs nothing;
- a draft model sharing the vocabulary (e.g. codegen-350M drafting for codegen-6B/16B): its greedy
  continuation, from its own slot cache that mirrors the engine's slots.

How guesses are checked (engine.py): position by position the engine's sampler picks the token the
target would have produced there anyway, with the row's own generator, exactly as a plain step would,
and moves on to the next position while that token equals the guess. The output is therefore the
target's whatever the guesses are: greedy output is plain greedy output, seeded sampling gives the
tokens it gives without speculation, and the guesses only decide how many positions one pass yields.
(For a guess proposed with certainty this is the accept/reject rule of speculative sampling: guess x
is kept with probability p(x), and after a miss the token is drawn from p without x.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .runner import Row, run
from .slot_cache import SlotCache
from .weights import prepare


@dataclass
class SpeculativeStats:
    proposed: int = 0  # guesses checked
    accepted: int = 0  # guesses that were the target's token
    passes: int = 0  # row-steps that checked guesses

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row-step with guesses produced, on average (1 without speculation)."""
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0


def prompt_lookup(context: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens
    (longest n first). Where that occurrence ends so near the end that fewer than k tokens follow it
    (a repeating stretch: a line or token written again and again), the guesses continue the
    repetition with its period."""
    context = list(context)
    size = len(context)
    for n in range(max_ngram, min_ngram - 1, -1):
        if size <= n:
            continue
        tail = context[-n:]
        last = tail[-1]
        for end in range(size - 2, n - 2, -1):  # end: index of the last token of an earlier occurrence
            if context[end] == last and context[end - n + 1 : end + 1] == tail:
                period = size - 1 - end
                guesses: list[int] = []
                for i in range(k):
                    guesses.append(context[end + 1 + i] if end + 1 + i < size else guesses[i - period])
                return guesses
    return []


class DraftModel:
    """Greedy guesses from a draft model, batched over the rows that ask for them."""

    def __init__(self, model: nn.Module, slots: int, max_len: int, pack_weights: bool | None = None,
                 kernels: str = "auto") -> None:
        self.model = model.eval()
        prepare(self.model, pack_weights, kernels)
        c = model.config
        self.cache = SlotCache(c.n_layer, slots, c.n_head, c.head_dim, max_len, model.dtype, model.device)

    def propose(self, wants: Sequence[tuple[int, Sequence[int], int, int]]) -> list[tuple[list[int], int]]:
        """For each (slot, context, cached, k): k guesses continuing the context (whose first `cached`
        tokens the draft has in that slot), and how many context + guess tokens it then has cached."""
        rows = [Row(slot, cached, list(context[cached:])) for slot, context, cached, _ in wants]
        logits = run(self.model, self.cache, rows)
        guesses = [[int(lg.argmax())] for lg in logits]
        cached = [len(context) for _, context, _, _ in wants]
        while True:
            active = [i for i, (_, _, _, k) in enumerate(wants) if len(guesses[i]) < k]
            if not active:
                return list(zip(guesses, cached))
            rows = [Row(wants[i][0], cached[i], [guesses[i][-1]]) for i in active]
            for i, lg in zip(active, run(self.model, self.cache, rows)):
                guesses[i].append(int(lg.argmax()))
                cached[i] += 1

    def move(self, src: int, dst: int, length: int) -> None:
        """A running sample moved from slot src to dst: its cached draft positions go with it."""
        self.cache.copy_slot(src, dst, length)
