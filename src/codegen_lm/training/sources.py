"""Finding the source files a tokenizer or a data set is built from."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceFile:
    path: Path  # where it is on disk
    name: str  # stable, portable name: the source root's folder name + the path below it


def find_sources(
    roots: Sequence[str | os.PathLike],
    extensions: Sequence[str] = (".py",),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[SourceFile]:
    """Files under `roots` (folders are walked, files taken as given) whose name ends with one of
    `extensions`, whose path below the root matches one of `include` (all when empty) and none of
    `exclude` (glob patterns; `*` crosses folders, so `test/*` excludes the whole test tree).

    Sorted by name, so that every later step (deduplication, splits, shard order) is reproducible.
    """
    found: dict[str, SourceFile] = {}
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions)
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"source {root} does not exist")
        for path, rel in _walk(root):
            if not rel.endswith(exts):
                continue
            if include and not any(fnmatch.fnmatch(rel, p) for p in include):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in exclude):
                continue
            name = f"{root.resolve().name}/{rel}" if root.is_dir() else rel
            found.setdefault(name, SourceFile(path, name))
    return [found[k] for k in sorted(found)]


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    if root.is_file():
        yield root, root.name
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = Path(folder) / file
            if path.is_file():
                yield path, path.relative_to(root).as_posix()


def read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None when it is not valid UTF-8 (such files are skipped)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
