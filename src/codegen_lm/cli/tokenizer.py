"""`codegen-lm tokenizer train`: a CodeGen-style byte-level BPE tokenizer for your own code."""

from __future__ import annotations

import argparse

from .common import CliError
from .data import add_source_options, find


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer", description="Tokenizer tools.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser(
        "train", help="train a byte-level BPE tokenizer with CodeGen's whitespace-run tokens",
        description="Learn a byte-level BPE (GPT-2 rules) on SRC, plus CodeGen's 38 whitespace-run tokens; the "
                    "result loads with CodeGenTokenizer, CodeGenTokenizerFast and transformers.")
    add_source_options(t)
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="total vocabulary size")
    t.add_argument("--min-frequency", type=int, default=2, help="drop merges seen fewer times (default 2)")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write the tokenizer files to")
    t.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.tokenizer_train import train_tokenizer

    files = find(args)
    try:
        tok = train_tokenizer(files, args.vocab_size, args.out, min_frequency=args.min_frequency,
                              progress=not args.no_progress)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"trained a {len(tok)}-token tokenizer on {len(files)} files: {args.out}")
    return 0
