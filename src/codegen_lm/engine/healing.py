"""Token healing: continuing a prompt that ends inside a token.

An editor's prompt often stops where no token boundary would be: in the middle of an identifier, after
a space, after the newline before an indented line. Tokenized as it is, the prompt ends in a token the
model rarely sees in that position (a lone "\\n" where code has "\\n    "), and the completion starts
wrong. Healing backs off the prompt's last token and lets the model choose the first new token among
those whose bytes start with the bytes taken away; the text handed back leaves out that repeated
start, so the completion still continues exactly what the user typed.

Tokens are compared as bytes (the byte-level BPE's own units), so a prompt ending inside a multi-byte
character heals too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tokenizer.vocab import bytes_to_unicode

_MASKS_KEPT = 512  # allowed-token masks kept, by removed token (an editor's prompts end in few distinct ones)


@dataclass(frozen=True)
class Healed:
    prompt_ids: list[int]  # the prompt without its last token
    removed: bytes  # that token's bytes: the first new token must start with them
    allowed: torch.Tensor  # [V] bool: the tokens that may come first


class TokenHealer:
    """Knows every token's bytes; heals prompts for one tokenizer and vocabulary size."""

    def __init__(self, tokenizer, vocab_size: int, device: torch.device | str = "cpu") -> None:
        to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        self.token_bytes: list[bytes] = [b""] * vocab_size
        special = set(getattr(tokenizer, "special_tokens", ()))
        for piece, token in tokenizer.get_vocab().items():
            if 0 <= token < vocab_size and piece not in special:
                try:
                    self.token_bytes[token] = bytes(to_byte[ch] for ch in piece)
                except KeyError:  # an added token that is not byte-level text
                    self.token_bytes[token] = piece.encode()
        self.device = torch.device(device)
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.index()

    def index(self) -> None:
        """Sort the tokens by their bytes (again, after token_bytes changed): the tokens that start with
        some bytes are then one run of that order, found by bisection."""
        self._order = sorted(range(len(self.token_bytes)), key=self.token_bytes.__getitem__)
        self._sorted = [self.token_bytes[t] for t in self._order]
        self._masks.clear()

    def heal(self, prompt_ids: Sequence[int]) -> Healed | None:
        """The prompt with its last token backed off, or None when there is nothing to heal (a one-token
        prompt, a last token that no other token extends, or one that is not whole UTF-8 characters)."""
        if len(prompt_ids) < 2:
            return None
        last = int(prompt_ids[-1])
        removed = self.token_bytes[last] if 0 <= last < len(self.token_bytes) else b""
        if not removed:
            return None
        try:
            removed.decode()
        except UnicodeDecodeError:  # the prompt ends inside a character split over tokens: leave it
            return None
        allowed = self._allowed(last, removed)
        if int(allowed.sum()) <= 1:  # only the token itself: healing would change nothing
            return None
        return Healed(list(prompt_ids[:-1]), removed, allowed)

    def _allowed(self, token: int, removed: bytes) -> torch.Tensor:
        mask = self._masks.get(token)
        if mask is None:
            lo = bisect_left(self._sorted, removed)
            stem = removed.rstrip(b"\xff")  # the first bytes after every extension of `removed`
            hi = bisect_left(self._sorted, stem[:-1] + bytes([stem[-1] + 1])) if stem else len(self._sorted)
            mask = torch.zeros(len(self.token_bytes), dtype=torch.bool, device=self.device)
            mask[torch.tensor(self._order[lo:hi], dtype=torch.long, device=self.device)] = True
            self._masks[token] = mask
            if len(self._masks) > _MASKS_KEPT:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(token)
        return mask
