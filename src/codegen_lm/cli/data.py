"""`codegen-lm data prepare`: source files -> deduplicated, tokenized, packed token shards."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .common import CliError, number


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", metavar="SRC", help="folders (walked) or files")
    p.add_argument("--package", action="append", default=[], metavar="NAME",
                   help="the Python source of an installed package, if its licence (read from its metadata) is "
                        "permissive (repeatable)")
    p.add_argument("--site", action="append", default=[], metavar="DIR",
                   help="look for --package distributions in DIR first (e.g. a `pip install --no-deps --target "
                        "DIR` folder of packages wanted as data only; repeatable)")
    p.add_argument("--ext", action="append", default=None, metavar="EXT",
                   help="file extensions to take (repeatable; default .py)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only paths (below their SRC) matching one of these globs (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip paths matching any of these globs, e.g. 'test/*' (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def packages(args: argparse.Namespace) -> list:
    """The --package sources, each with its licence checked (a refused one is an error, named)."""
    from ..training.packages import LicenceError, package_source

    try:
        for folder in args.site:
            if not Path(folder).is_dir():
                raise CliError(f"--site {folder}: no such folder")
        return [package_source(name, args.site) for name in dict.fromkeys(args.package)]
    except LicenceError as exc:
        raise CliError(str(exc)) from None


def find(args: argparse.Namespace, found_packages: list | None = None):
    from ..training.sources import find_sources

    if not args.sources and not args.package:
        raise CliError("name at least one SRC folder or file, or a --package")
    roots = list(args.sources)
    for package in packages(args) if found_packages is None else found_packages:
        roots.extend(package.roots)
    try:
        files = find_sources(roots, args.ext or [".py"], args.include, args.exclude)
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
    prep.add_argument("--drop-tests", action="store_true",
                      help="leave out test code (test/ and tests/ folders, test_*.py, *_test.py, conftest.py)")
    prep.add_argument("--drop-generated", action="store_true",
                      help="leave out generated files (a 'generated'/'do not edit' banner, very long lines, "
                           "mostly literals)")
    prep.add_argument("--near-duplicates", type=number(float, 0, 1, low_open=True, what="must be in (0, 1)"),
                      default=None, metavar="JACCARD",
                      help="leave out files whose word 5-grams overlap an earlier file's this much (e.g. 0.85; "
                           "needs datasketch)")
    prep.add_argument("--force", action="store_true", help="rebuild --out from scratch")
    prep.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from ..training.data import DataError, prepare

    found = packages(args)
    files = find(args, found)
    sources = [{"package": p.distribution, "version": p.version, "licence": p.licence, "licence_from": p.licence_from}
               for p in found]
    try:
        report = prepare(files, args.tokenizer, args.out, holdout=args.holdout, shard_tokens=args.shard_tokens,
                         progress=not args.no_progress, force=args.force, drop_tests=args.drop_tests,
                         drop_generated=args.drop_generated, near_duplicates=args.near_duplicates, sources=sources)
    except (DataError, ValueError, FileNotFoundError, ImportError) as exc:
        raise CliError(str(exc)) from None
    for p in found:
        print(f"package {p.distribution} {p.version}: licence {p.licence} (from its {p.licence_from})")
    reasons = Counter(reason.split(" (")[0].split(" of ")[0] for reason in report.skipped.values())
    left_out = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "none"
    print(f"{len(files)} files found: {report.new_files} tokenized, {report.already_known} already in {args.out}, "
          f"{report.duplicates} duplicates dropped, {len(report.skipped)} left out ({left_out})")
    if report.missing:
        print(f"{report.missing} files of earlier runs are no longer in the sources (their tokens stay; "
              "use --force to rebuild)")
    print(f"new tokens: train {report.new_tokens['train']:,}, val {report.new_tokens['val']:,}; "
          f"totals: train {report.totals['train']:,}, val {report.totals['val']:,} in {args.out}")
    return 0
