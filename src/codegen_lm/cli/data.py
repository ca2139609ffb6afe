"""`codegen-lm data prepare`: source files -> deduplicated, tokenized, packed token shards."""

from __future__ import annotations

import argparse

from .common import CliError


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC", help="folders (walked) or files")
    p.add_argument("--ext", action="append", default=None, metavar="EXT",
                   help="file extensions to take (repeatable; default .py)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only paths (below their SRC) matching one of these globs (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip paths matching any of these globs, e.g. 'test/*' (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def find(args: argparse.Namespace):
    from ..training.sources import find_sources

    try:
        files = find_sources(args.sources, args.ext or [".py"], args.include, args.exclude)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    if not files:
        raise CliError("no source files matched (check SRC, --ext, --include and --exclude)")
    return files


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data", description="Prepare training data.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = actions.add_parser(
        "prepare", help="tokenize source files into token shards",
        description="Walk SRC, drop exact duplicates, tokenize (in parallel), and write packed token shards "
                    "plus manifest.json to --out. Re-running tokenizes only new files.")
    add_source_options(prep)
    prep.add_argument("--tokenizer", required=True, metavar="T", help="tokenizer folder or model name")
    prep.add_argument("--out", required=True, metavar="DIR", help="data folder to create or extend")
    prep.add_argument("--holdout", type=float, default=0.01,
                      help="fraction of files (by content hash) held out for validation (default 0.01)")
    prep.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16M)")
    prep.add_argument("--force", action="store_true", help="rebuild --out from scratch")
    prep.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from ..training.data import DataError, prepare

    files = find(args)
    try:
        report = prepare(files, args.tokenizer, args.out, holdout=args.holdout, shard_tokens=args.shard_tokens,
                         progress=not args.no_progress, force=args.force)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    print(f"{len(files)} files found: {report.new_files} tokenized, {report.already_known} already in {args.out}, "
          f"{report.duplicates} duplicates dropped, {len(report.skipped)} skipped (not UTF-8)")
    if report.missing:
        print(f"{report.missing} files of earlier runs are no longer in the sources (their tokens stay; "
              "use --force to rebuild)")
    print(f"new tokens: train {report.new_tokens['train']:,}, val {report.new_tokens['val']:,}; "
          f"totals: train {report.totals['train']:,}, val {report.totals['val']:,} in {args.out}")
    return 0
