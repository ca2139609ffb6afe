"""The paper's multi-turn protocol: how a program is assembled from natural-language turns, and where
the model's code for a turn ends. MTPB's evaluator and conversational sessions both use it, so a
session builds exactly the programs the benchmark scores.

A program is the header, then for each turn the instruction as a comment line and the model's code
for it, cut by the per-turn rule and followed by a blank line:

    # Import libraries.

    import numpy as np

    # <instruction 1>
    <code 1>

    # <instruction 2>
    ...

The model writes turn k's code as a continuation of everything before it (the prompt ends with the
instruction's comment line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..tokenizer.truncate import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern

HEADER = "# Import libraries.\n\nimport numpy as np\n\n"

# No cut rule pattern (with the second line-initial print/def of truncate_before_pattern) is longer than
# this: text more than this far from the end cannot start a match that more text would complete.
LONGEST_PATTERN = 16


def instruction_comment(instruction: str) -> str:
    """The comment line(s) a turn's instruction becomes: `# instruction\\n`, as the original's
    `f"# {prompt}\\n"`. Further lines of a multi-line instruction are commented too unless they
    already are (so MTPB's turns that carry their own `# ` lines come out exactly as the original's)."""
    first, *rest = instruction.strip("\n").split("\n")
    lines = [f"# {first}"] + [line if line.lstrip().startswith("#") else f"# {line}" for line in rest]
    return "\n".join(lines) + "\n"


def cut_turn(completion: str) -> str:
    """Where the model's code for one turn ends (CodeGen's own per-turn truncation rule)."""
    return truncate_before_pattern(completion, DEFAULT_TRUNCATE_PATTERNS)


def turn_block(instruction: str, code: str) -> str:
    """One finished turn as it stands in the program."""
    return instruction_comment(instruction) + code + "\n\n"


def program(turns: Sequence[tuple[str, str]], header: str = HEADER) -> str:
    """The program of finished (instruction, code) turns."""
    return header + "".join(turn_block(i, c) for i, c in turns)


def prompt(turns: Sequence[tuple[str, str]], instruction: str, header: str = HEADER) -> str:
    """What the model continues to write the code for `instruction` after `turns`."""
    return program(turns, header) + instruction_comment(instruction)


class CutStream:
    """A completion arriving in pieces, cut by a rule as it comes: `push` returns the text that is
    certain to belong to the cut (so a terminal or an SSE stream can show it at once), and `done`
    turns true as soon as the cut point is known, so the generation can stop there.

    Sound for cut rules that cut at the earliest match of patterns no longer than LONGEST_PATTERN
    (the per-turn rule and MTPB's whole-program rule): once a match is in the text, more text can
    only add matches that end beyond it, which start after it."""

    def __init__(self, cut: Callable[[str], str] = cut_turn) -> None:
        self.cut, self.text, self.shown = cut, "", 0
        self.final: str | None = None  # the cut text, once known

    @property
    def done(self) -> bool:
        return self.final is not None

    def push(self, delta: str) -> str:
        """Add a piece of the completion; returns the newly certain text."""
        if self.final is not None:
            return ""
        self.text += delta
        kept = self.cut(self.text)
        if len(kept) < len(self.text):
            return self._settle(kept)
        return self._show(max(self.shown, len(self.text) - LONGEST_PATTERN))

    def finish(self) -> str:
        """The rest of the cut text once the completion has ended (at end of text or its token limit)."""
        return "" if self.final is not None else self._settle(self.cut(self.text))

    @property
    def result(self) -> str:
        """The cut text (so far, until done)."""
        return self.final if self.final is not None else self.cut(self.text)

    def _settle(self, kept: str) -> str:
        self.final = kept
        return self._show(len(kept))

    def _show(self, end: int) -> str:
        piece = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return piece
