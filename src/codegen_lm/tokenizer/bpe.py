"""`CodeGenTokenizer`: byte-level BPE in pure Python (no Rust, no compiled extension).

Gives the same ids as `CodeGenTokenizerFast` and `transformers` on every input; useful where the
`tokenizers` wheel is unavailable, and as a readable statement of what the tokenizer does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .base import TokenizerBase
from .pretokenize import added_token_pattern, gpt2_pattern, split_added
from .vocab import bytes_to_unicode

_CACHE_LIMIT = 200_000


class CodeGenTokenizer(TokenizerBase):
    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *args, **kwargs) -> None:
        super().__init__(vocab, merges, *args, **kwargs)
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._added_pattern = added_token_pattern(self.added_tokens.keys() | self.special_tokens)
        self._split = gpt2_pattern().findall
        # bytes -> printable stand-ins, as one str.translate table over latin-1 decoded bytes
        self._byte_table = {b: c for b, c in bytes_to_unicode().items()}
        self._char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[str, list[int]] = {}
        self._token_bytes: dict[int, bytes] = {}

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, is_added in split_added(text, self._added_pattern):
            if is_added:
                ids.append(self.added_tokens.get(piece, self.vocab.get(piece)))
                continue
            for word in self._split(piece):
                cached = self._cache.get(word)
                if cached is None:
                    cached = self._bpe(word.encode("utf-8").decode("latin-1").translate(self._byte_table))
                    if len(self._cache) >= _CACHE_LIMIT:
                        self._cache.clear()
                    self._cache[word] = cached
                ids.extend(cached)
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge adjacent symbols, lowest-ranked pair first, until no pair has a merge."""
        parts = list(word)
        ranks = self._ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in itertools.pairwise(parts):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        vocab = self.vocab
        try:
            return [vocab[p] for p in parts]
        except KeyError as exc:
            symbol = exc.args[0]
            raise ValueError(f"symbol {symbol!r} is not in the vocabulary (not a byte-level vocabulary?)") from None

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces = []
        for i in ids:
            token = self._id_to_token.get(i)
            if token is None or (skip_special_tokens and token in self.special_tokens):
                continue
            data = self._token_bytes.get(i)
            if data is None:
                data = self._bytes_of(token)
                self._token_bytes[i] = data
            pieces.append(data)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _bytes_of(self, token: str) -> bytes:
        """Bytes a token stands for: its stand-in characters mapped back, or (for added tokens such
        as whitespace runs, which are plain text) its UTF-8 encoding."""
        try:
            return bytes(self._char_to_byte[c] for c in token)
        except KeyError:
            return token.encode("utf-8")
