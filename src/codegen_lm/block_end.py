"""Where the block a prompt started ends: the default stop of `codegen-lm generate`.

A completion of `def fibonacci(n):` is finished when the function is: at the first line that comes
back to the header's column. Without that rule a small model writes the body and then whatever comes
next in its training data, until the token limit. The prompt's last statement decides the rule:

- it opens a block (ends with `:`, as `def f():` or `for x in y:` do): the completion ends before the
  first line at the statement's column or left of it;
- it is inside a block (a HumanEval prompt ends in a docstring, four columns in): the completion ends
  before the first line left of it, where that block ends;
- it is top-level code (or the prompt is only a comment): the completion ends where HumanEval's stop
  sequences would end it, at a new top-level `def`, `class`, `if`, `print` or comment after its first
  line.

Lines are Python's logical lines, found with `tokenize`, so the lines of a multi-line string or of a
bracketed expression never end a block. Blank lines before the end are dropped with it.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterator

from .evaluation.humaneval import HUMANEVAL_STOP

_SKIPPED = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
_TOP_LEVEL_WORDS = tuple(s.lstrip("\n") for s in HUMANEVAL_STOP)
_LONGEST_WORD = max(map(len, _TOP_LEVEL_WORDS))
_TOP_LEVEL_STOP = re.compile("|".join(map(re.escape, _TOP_LEVEL_WORDS)))


class BlockEnd:
    """The end of the block `prompt` started, in completions of it."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    def cut(self, completion: str) -> int | None:
        """Where `completion` ends (an offset into it, trailing blank lines left out), or None while
        the block is still open."""
        text = self.prompt + completion
        starts = _line_starts(text)
        end = _position(starts, len(self.prompt))
        statement = (0, 0, False)  # (row, column, opens a block) of the prompt's last statement
        first_line = True
        for row, col, first, opens, comment in _lines(text):
            if (row, col) < end:
                if not comment:  # a comment is not a statement: `# add two numbers` opens nothing
                    statement = (row, col, opens)
                continue
            _, s_col, s_opens = statement  # ended, since a line follows it: s_opens is True or False
            if s_opens:
                ends = col <= s_col
            elif s_col > 0:
                ends = col < s_col
            else:  # top-level code goes on past its first line until a new definition (HumanEval's rule)
                ends = not first_line and col == 0 and _TOP_LEVEL_STOP.match(first) is not None
            first_line = False
            if ends:
                line_start = starts[row - 1] - len(self.prompt)
                return len(completion[: max(line_start, 0)].rstrip())
        return None

    def ended(self, completion: str, last: str) -> bool:
        """Whether the block is over now that `completion` ends with the newly generated `last`: the
        check of a stopping criterion, called after every token. A block only ends where a line's
        first characters arrive, so the text is tokenized only then."""
        content = (self.prompt + completion).rpartition("\n")[2].lstrip()
        if not 0 < len(content) <= max(len(last), _LONGEST_WORD):
            return False
        return self.cut(completion) is not None

    def certain(self, completion: str) -> str:
        """The part of `completion` that stays whatever comes next: for streaming, which cannot take
        back text it has shown. Trailing whitespace is held back (it may precede the block's end)."""
        at = self.cut(completion)
        if at is not None:
            return completion[:at]
        text = completion.rstrip()
        head, newline, last = text.rpartition("\n")
        if newline and any(stop.startswith(last) for stop in _TOP_LEVEL_WORDS):  # `d` may become `def`
            return head.rstrip()
        return text


def _line_starts(text: str) -> list[int]:
    """Offset of each line's first character (row r, counted from 1, starts at [r - 1])."""
    starts = [0]
    starts.extend(m.end() for m in re.finditer("\n", text))
    return starts


def _position(starts: list[int], offset: int) -> tuple[int, int]:
    row = next((r for r in range(len(starts) - 1, -1, -1) if starts[r] <= offset), 0)
    return row + 1, offset - starts[row]


def _lines(text: str) -> Iterator[tuple[int, int, str, bool | None, bool]]:
    """(row, column, first token, opens a block, is a comment) of each logical line and each comment
    line of `text`; opens is None for a line whose end is not in `text` yet. Text that tokenize gives up on
    (an unterminated string, a dedent to no earlier column) ends the scan at the last line it read."""
    pending = None  # the line being read: row, col, first token
    last = ""  # its last significant token so far
    depth = 0  # open brackets
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NEWLINE and pending is not None:
                yield (*pending, last == ":" and depth == 0, False)
                pending = None
            if tok.type in _SKIPPED or tok.type == tokenize.ENDMARKER:
                continue
            if tok.type == tokenize.COMMENT:
                if pending is None and depth == 0:
                    yield tok.start[0], tok.start[1], tok.string, False, True
                continue
            if pending is None:
                pending = (tok.start[0], tok.start[1], tok.string)
                depth = 0
            if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
                depth += 1
            elif tok.type == tokenize.OP and tok.string in (")", "]", "}"):
                depth = max(depth - 1, 0)
            last = tok.string
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        pass
    if pending is not None:
        yield (*pending, None, False)
