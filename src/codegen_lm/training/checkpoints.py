"""The run folder's files, written so that a `kill -9`, a torn write or a full disk costs at most the
steps since the last checkpoint, and never a checkpoint or a log line from before it.

Layout: OUT/log.jsonl (one JSON record a line, appended), OUT/checkpoints/step-N/ (HF layout plus
trainer_state.pt; a LoRA run's hold its adapter in peft's files instead of the weights),
OUT/checkpoints/latest (the name of the newest complete checkpoint), OUT/final/ (and a LoRA run's
OUT/merged/ with lora_merge).

A checkpoint is written into `step-N.tmp`, every file fsynced and listed with its SHA-256 in SHA256SUMS
(written last, so its presence means the folder is complete; `sha256sum -c SHA256SUMS` checks it by
hand), then renamed into place; only then does `latest` move (itself written to a temporary file and
renamed). Replacing an existing `step-N` renames it to `step-N.old` first and deletes that afterwards;
pruning renames a folder to `*.del` before deleting it, so a half-deleted folder never looks like a
checkpoint. On start, `recover` undoes what an interrupted save or prune left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import find_weight_files, iter_tensors
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
MERGED = "merged"  # a LoRA run's final weights with the adapter folded in
LOG = "log.jsonl"
STATE = "trainer_state.pt"
SUMS = "SHA256SUMS"
STEP_DIR = re.compile(r"step-(\d+)")
_STATE_KEYS = ("step", "optimizer", "scheduler", "rng")


class TrainingError(Exception):
    """A problem with the run's files for the user to fix (a full disk, an unwritable folder); one line."""


def warn(message: str) -> None:
    """One line on stderr: what recovery found and did, for the user to see but not to act on."""
    print(f"codegen-lm train: warning: {message}", file=sys.stderr)


# ---- errors of writing -----------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether `exc` (or what caused it) is ENOSPC/EDQUOT. torch and safetensors wrap the OSError in
    their own exceptions, sometimes without the errno, so a folder with (almost) no space left also counts."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
    if folder is not None and isinstance(exc, Exception) and not isinstance(exc, OSError):  # not a Ctrl-C
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 2**20
    return False


def as_training_error(exc: BaseException, what: str, folder: Path | None = None) -> TrainingError | None:
    """`exc` as a one-line TrainingError ("<what>: the disk is full ..."), or None if it is not an I/O error."""
    if is_disk_full(exc, folder):
        return TrainingError(f"{what}: the disk is full (no space left on device; free some space, then run "
                             "again with --resume)")
    if isinstance(exc, OSError):
        return TrainingError(f"{what}: {exc.strerror or exc}")
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an I/O error while writing `path` into a one-line TrainingError naming it."""
    try:
        yield
    except Exception as exc:
        error = as_training_error(exc, f"cannot write {path}", path.parent)
        if error is None:
            raise
        raise error from None


def fsync_dir(folder: Path) -> None:
    """Make renames and new names in `folder` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` all at once: a temporary file in the same folder, fsynced, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# ---- writing checkpoints ---------------------------------------------------------------------------


def _hash(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _seal(folder: Path) -> None:
    """fsync every file of `folder` and list it in SHA256SUMS, written last: the folder is complete."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{_hash(p, fsync=True)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    with open(folder / SUMS, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def read_pointer(root: Path) -> str | None:
    """The folder name `latest` holds, or None if there is no readable pointer."""
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def write_checkpoint(folder: Path, fill: Callable[[Path], None], update_latest: bool) -> None:
    """Write a checkpoint with `fill(tmp_folder)`, seal it, rename it into place and (if asked) point
    `latest` at it. On any failure the half-written folder is removed and whatever was there before
    (the previous checkpoints and `latest`) is left as it was; I/O errors become one-line TrainingErrors."""
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    try:
        remove(tmp)
        tmp.mkdir(parents=True)
        fill(tmp)
        _seal(tmp)
        if folder.exists():
            remove(old)
            os.replace(folder, old)
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
            remove(old)
        else:
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
        if update_latest:
            write_atomic(folder.parent / LATEST, f"{folder.name}\n".encode())
    except BaseException as exc:
        full = is_disk_full(exc, folder.parent)  # before the cleanup frees the space again
        with contextlib.suppress(OSError):
            if old.exists() and not folder.exists():
                os.replace(old, folder)  # the rename into place failed half-way: put the old one back
            remove(tmp)
        if not (full or isinstance(exc, OSError)):
            raise
        why = "the disk is full (no space left on device)" if full else (getattr(exc, "strerror", None) or str(exc))
        root = folder.parent if update_latest else folder.parent / CHECKPOINTS
        previous = read_pointer(root)
        kept = f"the last checkpoint, {root / previous}, is intact" if previous else "no checkpoint was saved yet"
        fix = "free some space" if full else "fix that"
        raise TrainingError(f"cannot save checkpoint {folder}: {why}; {kept} ({fix}, then run again with "
                            "--resume)") from None


def remove(folder: Path) -> None:
    """Delete a folder so that it is never seen half-deleted under its own name: rename, then delete."""
    if not folder.exists():
        return
    trash = folder.with_name(folder.name + ".del")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def step_of(folder: Path) -> int | None:
    """N for a `step-N` folder, None for anything else (`step-N.tmp`, `latest`, ...)."""
    match = STEP_DIR.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def step_folders(root: Path) -> list[Path]:
    """The `step-N` folders of `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def prune(root: Path, own: set[str], keep: int) -> None:
    """Keep the newest `keep` of this run's checkpoints (`own`); other folders are never touched."""
    mine = [p for p in step_folders(root) if p.name in own]
    for folder in mine[:-keep]:
        remove(folder)
        own.discard(folder.name)


def recover(out: Path) -> None:
    """Undo what an interrupted save, rotation or prune left in OUT and OUT/checkpoints.

    `X.tmp` (a save that never completed) and `X.del` (a prune) are deleted. `X.old` is the previous
    version of a folder being replaced: it is stale if `X` exists (deleted), and the only copy of that
    step if the kill came between the two renames (renamed back to `X`)."""
    root = out / CHECKPOINTS
    for folder, is_ours in ((root, lambda n: STEP_DIR.fullmatch(n) is not None), (out, lambda n: n in (FINAL, MERGED))):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            base, _, suffixes = path.name.partition(".")  # also step-N.old.del: a kill while deleting .old
            if not path.is_dir() or not is_ours(base) or suffixes.rpartition(".")[2] not in ("tmp", "old", "del"):
                continue
            target = path.with_name(base)
            if suffixes == "old" and not target.exists():
                os.replace(path, target)
                warn(f"restored {target} from {path.name}, left by a save that was interrupted")
            else:
                shutil.rmtree(path, ignore_errors=True)
    for debris in (root / (LATEST + ".tmp"), out / (LOG + ".tmp"), out / "loss.png.tmp.png"):
        with contextlib.suppress(FileNotFoundError):
            debris.unlink()


# ---- choosing the checkpoint to resume from ---------------------------------------------------------


def check_checkpoint(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(trainer state, None) for a complete, undamaged checkpoint; (None, why not, naming the file) otherwise.

    With SHA256SUMS every file is checked against its hash; an older checkpoint without it is checked by
    reading its trainer state and the headers of its weight files."""
    sums = folder / SUMS
    if sums.is_file():
        try:
            listed = [line.split("  ", 1) for line in sums.read_text(encoding="utf-8").splitlines() if line]
            if not listed or any(len(entry) != 2 or len(entry[0]) != 64 for entry in listed):
                raise ValueError
        except (OSError, UnicodeDecodeError, ValueError):
            return None, f"{sums} is unreadable"
        for digest, name in listed:
            path = folder / name
            if not path.is_file():
                return None, f"{path} is missing"
            if _hash(path) != digest:
                return None, f"{path} is corrupt (its SHA-256 differs from {SUMS})"
    elif not (folder / "config.json").is_file() and not (folder / ADAPTER_CONFIG).is_file():
        return None, f"{folder / 'config.json'} is missing"
    path = folder / STATE
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        return None, f"{path} is unreadable ({_first_line(exc)})"
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        return None, f"{path} is not a trainer state"
    if state["step"] != step_of(folder):
        return None, f"{path} holds step {state['step']}, not {step_of(folder)}"
    if not sums.is_file():
        try:
            files = [folder / ADAPTER_WEIGHTS] if (folder / ADAPTER_CONFIG).is_file() else find_weight_files(folder)
            for weights in files:
                for _ in iter_tensors(weights):
                    pass
        except Exception as exc:
            return None, _first_line(exc)
    return state, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def select_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its trainer state: the one `latest` names if it is sound, else
    the newest sound one, each problem reported as a one-line warning; None if there is none."""
    folders = step_folders(root)
    if not folders:
        return None
    name = read_pointer(root)
    if name is None:
        warn(f"{root / LATEST} is missing or empty; looking for the newest valid checkpoint")
    elif not (root / name).is_dir() or step_of(root / name) is None:
        warn(f"{root / LATEST} names {name}, which is not a checkpoint there; looking for the newest valid one")
    ordered = sorted(folders, key=lambda p: (p.name == name, step_of(p) or 0), reverse=True)
    skipped = False
    for folder in ordered:
        state, problem = check_checkpoint(folder)
        if state is not None:
            if skipped or folder.name != name:
                warn(f"resuming from {folder}")
            return folder, state
        warn(f"skipping checkpoint {folder.name}: {problem}")
        skipped = True
    warn(f"no usable checkpoint in {root}; starting fresh (the checkpoints there are kept)")
    return None


# ---- the log ---------------------------------------------------------------------------------------


def append_log(path: Path, record: dict[str, Any]) -> None:
    """One record as one line, appended: a kill can only tear this last line, which `trim_log` drops."""
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log, skipping lines that are not JSON records (a torn last line)."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def trim_log(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (logged after the checkpoint a run resumes from) and a torn
    last line, by truncating the file: the bytes kept are never rewritten, so a kill at any moment leaves
    them. (Only a log whose steps go backwards is rewritten, atomically, through a temporary file.)"""
    if not path.exists():
        return
    with writing(path):
        if step == 0:  # a fresh start: the log starts over
            os.truncate(path, 0)
            return
        data = path.read_bytes()
        lines = data.split(b"\n")
        complete = len(lines) - 1 if data.endswith(b"\n") else len(lines)  # lines[-1] is b"" after a newline
        cut: int | None = None  # byte offset of the first line to drop
        keep: list[bytes] = []
        ordered = True
        offset = 0
        for i, raw in enumerate(lines[:complete]):
            if not raw.strip():  # a blank line: kept before the cut, dropped by a rewrite
                offset += len(raw) + 1
                continue
            record_step = _record_step(raw)
            if record_step is None and i == complete - 1:
                warn(f"{path}: dropped a torn last line (the run was killed while writing it)")
                cut = offset if cut is None else cut
            elif record_step is None:
                if cut is None:
                    warn(f"{path} line {i + 1} is not a JSON log record; left as it is")
                    keep.append(raw)
            elif record_step > step:
                cut = offset if cut is None else cut
            else:
                ordered = ordered and cut is None
                keep.append(raw)
            offset += len(raw) + 1
        if cut is None:
            if data and not data.endswith(b"\n"):  # a complete last record whose newline never made it
                with open(path, "ab") as f:
                    f.write(b"\n")
        elif ordered:
            os.truncate(path, cut)
        else:
            write_atomic(path, b"".join(line + b"\n" for line in keep))


def _record_step(line: bytes) -> int | None:
    """The step of a log line, None if it is not a complete JSON record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None
