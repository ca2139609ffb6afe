"""The `tokenizers` library object of the CodeGen tokenizer, built from vocab, merges and added tokens
(used by the fast tokenizer, and to write tokenizer.json for either tokenizer)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors


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
