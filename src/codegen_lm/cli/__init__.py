"""The `codegen-lm` command: one module per command group, wired together here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import data, evaluate, generate, info, serve, tokenizer, train
from .common import CliError, OneLineParser

COMMANDS = (generate, evaluate, info, data, tokenizer, train, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="codegen-lm", description="Run CodeGen models locally.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CliError as exc:
        print(f"codegen-lm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("codegen-lm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
