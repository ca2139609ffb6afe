"""Which source files a data set leaves out: tests, generated code, near-duplicates.

A model trained mostly on test classes writes test methods (the first default model did, after a
standard library that is half tests); generated tables and vendored copies teach nothing and cost
training tokens. Each filter says why it drops a file, and the reason goes into the data manifest.
"""

from __future__ import annotations

import fnmatch
import re

# path patterns (below the source root, `*` crosses folders) of test code
TEST_PATTERNS = ("test/*", "tests/*", "testing/*", "*/test/*", "*/tests/*", "*/testing/*", "test_*.py",
                 "*/test_*.py", "*_test.py", "*_tests.py", "conftest.py", "*/conftest.py")
GENERATED_MARKERS = re.compile(r"auto-?generated|generated (by|with|from|automatically)|do not edit|@generated",
                               re.IGNORECASE)
HEAD_CHARS = 2000  # where a generator's banner is
LONG_LINE = 400  # characters: no hand-written line is this long
LONG_LINE_SHARE = 0.05
LITERALS = re.compile(r"\d[\w.]*|'[^'\n]*'|\"[^\"\n]*\"")
LITERAL_SHARE = 0.6  # of the non-blank characters of a file
MIN_CHARS_FOR_SHARES = 5000


def is_test_file(name: str) -> bool:
    """Whether the path `name` (below its source root) is test code by its name or folder."""
    name = name.split("/", 1)[1] if "/" in name else name  # without the root's own folder name
    return any(fnmatch.fnmatch(name, p) for p in TEST_PATTERNS)


def generated_reason(text: str) -> str | None:
    """Why `text` looks machine-generated (a banner comment, very long lines, mostly literals), or None."""
    for line in text[:HEAD_CHARS].splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and GENERATED_MARKERS.search(stripped):
            return f"generated ({stripped[:60]})"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    long_lines = sum(len(line) > LONG_LINE for line in lines)
    if long_lines and long_lines >= LONG_LINE_SHARE * len(lines):
        return f"long lines ({long_lines} of {len(lines)} over {LONG_LINE} characters)"
    if len(text) >= MIN_CHARS_FOR_SHARES:
        solid = len(text) - sum(c.isspace() for c in text)
        literal = sum(len(m.group()) for m in LITERALS.finditer(text))
        if literal > LITERAL_SHARE * solid:
            return f"mostly literals ({literal / solid:.0%} of its characters)"
    return None


class NearDuplicates:
    """Files whose word 5-grams overlap an earlier file's by at least `threshold` (Jaccard), found with
    MinHash and locality-sensitive hashing (datasketch) and confirmed on the MinHash estimate.

    `seen(name, text)` returns the earlier file's name for a near-duplicate (and forgets the new one),
    else None (and remembers it). Files are offered in a fixed order, so the first copy is kept."""

    NUM_PERM = 64
    SHINGLE = 5

    def __init__(self, threshold: float = 0.85) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise ImportError("near-duplicate detection needs datasketch: pip install 'codegen-lm[train]'") from None
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"the near-duplicate threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=self.NUM_PERM)
        self._hashes: dict[str, object] = {}

    def signature(self, text: str):
        words = re.findall(r"\w+", text)
        n = self.SHINGLE
        shingles = {" ".join(words[i : i + n]).encode() for i in range(max(len(words) - n + 1, 1))}
        m = self._minhash(num_perm=self.NUM_PERM, seed=1)
        m.update_batch(list(shingles))
        return m

    def seen(self, name: str, text: str) -> str | None:
        m = self.signature(text)
        for other in sorted(self._lsh.query(m)):
            if m.jaccard(self._hashes[other]) >= self.threshold:
                return other
        self._lsh.insert(name, m)
        self._hashes[name] = m
        return None
