"""Turning generated token ids into text as they arrive, and catching stop strings in that text.

Stop strings are matched on decoded text, not on token ids, so a stop string split across several
tokens (or inside one) is still caught, and the text handed out ends right before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (-1 if none)."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still turn out to be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Accumulates the token ids of one sequence and hands out text deltas that are final.

    Text is held back while it ends in an incomplete UTF-8 character or could be the beginning of a
    stop string; once a stop string appears, `stopped` is set and no text from it onward is ever
    handed out. `prefix`: text the sequence starts with that is neither handed out nor searched for
    stop strings (what the first token after a healed prompt repeats of the token backed off).
    """

    def __init__(self, tokenizer: Decoder, stops: Sequence[str] = (), skip_special_tokens: bool = True,
                 prefix: str = "") -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.stops = list(stops)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # decoded text of all ids (stop string and beyond cut off once stopped)
        self.emitted = 0  # characters of self.text handed out so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if self.prefix:
            text = text[len(self.prefix):] if text.startswith(self.prefix) else text
        if self.stops:
            # A new stop can only start where the previously held-back tail began.
            pos = find_stop(text, self.stops, max(0, self.emitted - max(len(s) for s in self.stops)))
            if pos >= 0:
                self.stopped = True
                self.text = text[:pos]
                return self._take(len(self.text))
        self.text = text
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":  # maybe an unfinished character
            end -= 1
        end -= _held_back(text[:end], self.stops)
        return self._take(end)

    def finish(self) -> str:
        """The rest of the text, once no more tokens will come."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
