"""`decode(..., truncate_before_pattern=...)`: cut a decoded completion where the program ends."""

from __future__ import annotations

import re
from collections.abc import Sequence

# The patterns CodeGen's own samplers cut completions with.
DEFAULT_TRUNCATE_PATTERNS = ("^#", re.escape("<|endoftext|>"), "^'''", '^"""', "\n\n\n")


def truncate_before_pattern(text: str, patterns: Sequence[str]) -> str:
    """Cut `text` in two steps, as the reference does.

    1. At the second line-initial `print` (if any), then at the second line-initial `def`.
    2. At the earliest match of any of `patterns` (regular expressions, MULTILINE).
    It applies to all of `text`, so pass only the completion, not the prompt.
    """
    for word in ("print", "def"):
        starts = [m.start() for m in re.finditer(f"^{word}", text, re.MULTILINE)]
        if len(starts) > 1:
            text = text[: starts[1]]
    cuts = []
    for pattern in patterns:
        match = re.compile(pattern, re.MULTILINE).search(text)
        if match:
            cuts.append(match.start())
    return text[: min(cuts)] if cuts else text
