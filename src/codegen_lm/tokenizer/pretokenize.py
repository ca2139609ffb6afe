"""Splitting text before BPE, in pure Python: added tokens first, then GPT-2's split rule.

Both steps reproduce what the `tokenizers` library does: added tokens are matched leftmost-longest
(so 40 spaces become the 31-space token then the 9-space one), and the remaining text is cut with
GPT-2's pattern, whose \\p{L}, \\p{N} and \\s classes come from `unicode_classes` so that they agree
with `tokenizers` whatever Unicode version this Python knows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import lru_cache

from . import unicode_classes


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)


@lru_cache(maxsize=1)
def gpt2_pattern() -> re.Pattern[str]:
    """GPT-2's pre-tokenizer rule:
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    letter = _char_class(unicode_classes.LETTERS)
    number = _char_class(unicode_classes.NUMBERS)
    space = _char_class(unicode_classes.WHITESPACE)
    return re.compile(
        "'s|'t|'re|'ve|'m|'ll|'d"
        f"| ?[{letter}]+| ?[{number}]+| ?[^{space}{letter}{number}]+"
        f"|[{space}]+(?![^{space}])|[{space}]+"
    )


def added_token_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern that finds added tokens leftmost-longest (longer alternatives are tried first)."""
    ordered = sorted(set(tokens), key=lambda t: (-len(t), t))
    return re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None


def split_added(text: str, pattern: re.Pattern[str] | None) -> Iterator[tuple[str, bool]]:
    """Yield (piece, is_added_token) covering `text` in order."""
    if pattern is None:
        if text:
            yield text, False
        return
    pos = 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            yield text[pos : match.start()], False
        yield match.group(), True
        pos = match.end()
    if pos < len(text):
        yield text[pos:], False


def check_text(text: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates) with a message that says where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"text contains a lone surrogate U+{ord(bad):04X} at index {exc.start}: "
            "it is not valid Unicode and cannot be tokenized"
        ) from None
