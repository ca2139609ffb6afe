"""Turn a model name into a local folder: a folder as given, or a hub repository via huggingface_hub.

The local hub cache is looked at first, so that a model downloaded once loads with no network and
no waiting on timeouts; the hub is only contacted for what the cache lacks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a folder nor a repository we can find locally or on the hub."""


def is_local(name_or_path: str | os.PathLike) -> bool:
    text = str(name_or_path)
    return Path(text).exists() or text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1)


def resolve_files(
    name_or_path: str | os.PathLike,
    patterns: list[str],
    *,
    complete: Callable[[Path], bool] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return a local folder holding the files of `name_or_path` that match `patterns`.

    `complete(folder)` says whether a cached snapshot already has all that is needed; by default,
    whether it has at least one file for each pattern without wildcards.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from .bundled import bundled_model_dir

    bundled = bundled_model_dir(str(name_or_path))
    if bundled is not None:
        return bundled
    if path.exists():
        raise ModelNotFoundError(f"{name_or_path}: not a folder (a checkpoint is a folder with config.json)")
    if is_local(name_or_path):
        raise ModelNotFoundError(f"{name_or_path}: no such folder")
    repo_id = str(name_or_path)
    if not _REPO_ID.match(repo_id):
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a hub repository name (owner/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if complete is None:
        def complete(folder: Path) -> bool:
            return all((folder / p).exists() for p in patterns if "*" not in p)

    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if complete(cached):
            return cached
    except LocalEntryNotFoundError:
        cached = None
    if _offline():
        raise ModelNotFoundError(
            f"{repo_id}: not in the local hub cache ({_cache_location(cache_dir)}) and HF_HUB_OFFLINE is set; "
            f"download it once with `hf download {repo_id}` or pass a local folder"
        )
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such repository on the Hugging Face hub (or it is private)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        if cached is not None:
            return cached
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"{repo_id}: not in the local hub cache ({_cache_location(cache_dir)}) and the hub could not be "
            f"reached ({reason}); download it where there is network, or pass a local folder"
        ) from None


def hub_blob_dir(folder: Path) -> Path | None:
    """The blob store of the hub-cache repository whose snapshot `folder` is (its files are links into
    it), or None for any other folder."""
    folder = Path(folder)
    blobs = folder.parent.parent / "blobs"
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--") and blobs.is_dir():
        return blobs
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_location(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
