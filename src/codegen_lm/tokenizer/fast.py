"""`CodeGenTokenizerFast`: the same tokenizer on the `tokenizers` library (Rust, batched, parallel)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .base import TokenizerBase
from .vocab import read_tokenizer_files


def build_fast_tokenizer(
    vocab: dict[str, int], merges: Sequence[tuple[str, str]], added: dict[str, int], special: set[str]
) -> Tokenizer:
    """A `tokenizers.Tokenizer` that is byte-level BPE with `added` matched before BPE."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    everything = {**vocab, **added}
    for content, token_id in sorted(everything.items(), key=lambda kv: kv[1]):
        if content in special:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        elif content in added:
            tok.add_tokens([AddedToken(content, special=False, normalized=True)])
        else:
            continue
        if tok.token_to_id(content) != token_id:
            raise ValueError(f"added token {content!r} should have id {token_id}, got {tok.token_to_id(content)}")
    return tok


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
