"""Train a CodeGen-style tokenizer: byte-level BPE (GPT-2's rules) plus whitespace-run tokens.

As in CodeGen, runs of 2-31 spaces and 2-9 tabs are single tokens matched before BPE, so
indentation costs one token per line. The BPE merges are learnt on the text that is left once those
runs are cut out, which is exactly what the merges will see at encoding time, so no vocabulary is
wasted on whitespace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..tokenizer import CodeGenTokenizerFast
from ..tokenizer.pretokenize import added_token_pattern, split_added
from ..tokenizer.vocab import EOS_TOKEN, codegen_added_tokens
from .sources import SourceFile, read_text

N_WHITESPACE_TOKENS = len(codegen_added_tokens())


def train_tokenizer(
    files: Sequence[SourceFile],
    vocab_size: int,
    out: str | os.PathLike,
    min_frequency: int = 2,
    progress: bool = True,
) -> CodeGenTokenizerFast:
    """Learn merges from `files`, save vocab.json, merges.txt, added_tokens.json, tokenizer.json and
    the config files in `out`, and return the tokenizer (<|endoftext|> is id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    floor = 256 + 1 + N_WHITESPACE_TOKENS
    if vocab_size <= floor:
        raise ValueError(f"vocab_size must be above {floor} (256 bytes, <|endoftext|> and the "
                         f"{N_WHITESPACE_TOKENS} whitespace tokens), got {vocab_size}")
    if not files:
        raise ValueError("no source files to train the tokenizer on")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - N_WHITESPACE_TOKENS,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    bpe.train_from_iterator(_pieces(files), trainer=trainer)
    model = bpe.get_vocab(with_added_tokens=False)
    import json

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = CodeGenTokenizerFast(model, merges, codegen_added_tokens(first_id=len(model)), {EOS_TOKEN})
    tokenizer.save_pretrained(Path(out))
    return CodeGenTokenizerFast.from_pretrained(Path(out))


def _pieces(files: Sequence[SourceFile]) -> Iterator[str]:
    """The text of every file with its whitespace runs cut out (each run ends a piece)."""
    pattern = added_token_pattern(codegen_added_tokens())
    for file in files:
        text = read_text(file.path)
        if text is None:
            continue
        for piece, is_run in split_added(text, pattern):
            if not is_run:
                yield piece
