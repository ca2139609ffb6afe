"""The `codegen-lm` command: one module per command group, wired together here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import chat, data, evaluate, generate, info, serve, synthesize, tokenizer, train
from .common import CliError, OneLineParser, one_line

COMMANDS = (generate, evaluate, info, data, tokenizer, train, serve, chat, synthesize)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="codegen-lm", description="Run CodeGen models locally.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a problem with the input is one `codegen-lm: error:` line and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CliError as exc:
        print(f"codegen-lm: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("codegen-lm: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("codegen-lm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
