"""`CodeGenTokenizerFast`: the same tokenizer on the `tokenizers` library (Rust, batched, parallel)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .backend import build_fast_tokenizer
from .base import TokenizerBase
from .vocab import read_tokenizer_files


class CodeGenTokenizerFast(TokenizerBase):
    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *args: Any,
                 tokenizer_object: Tokenizer | None = None, **kwargs: Any) -> None:
        super().__init__(vocab, merges, *args, **kwargs)
        self._tok = tokenizer_object or build_fast_tokenizer(self.vocab, self.merges, self.added_tokens,
                                                            self.special_tokens)

    @classmethod
    def _from_files(cls, folder: Path, **kwargs: Any) -> CodeGenTokenizerFast:
        vocab, merges, added, special = read_tokenizer_files(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json")) if (folder / "tokenizer.json").is_file() else None
        return cls(vocab, merges, added, special, tokenizer_object=tok, **kwargs)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if len(texts) == 1:
            return [self._tok.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_tokenizer_json(self) -> str:
        return self._tok.to_str()
