"""Token data sets: `prepare` turns source files into packed token shards, `TokenWindows` reads them
back as fixed-length training windows in a reproducible order.

A data folder holds `manifest.json` (the tokenizer's hash, every file with its content hash, token
count and split, every shard with its hash), the shards (`train-00000.npy`, `val-00000.npy`: one flat
array of token ids each, uint16 when the vocabulary fits, eos after every file) and a copy of the
tokenizer, so that a data folder is self-contained. Re-running `prepare` tokenizes only files whose
content it has not seen and appends them as new shards; shards already written never change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import CodeGenTokenizerFast
from .sources import SourceFile, read_text

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1
SPLITS = ("train", "val")


class DataError(ValueError):
    """A data folder that cannot be used as asked; the message says which file and why."""


@dataclass
class PrepareReport:
    new_files: int = 0
    new_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    duplicates: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    already_known: int = 0
    missing: int = 0
    shards_written: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_of(content_hash: str, holdout: float) -> str:
    """train or val, decided by the content hash: stable when files are added or reordered."""
    return "val" if int(content_hash[:8], 16) / 2**32 < holdout else "train"


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST} (prepare it with `codegen-lm data prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare(
    files: Sequence[SourceFile],
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    holdout: float = 0.01,
    shard_tokens: int = 1 << 24,
    batch_files: int = 256,
    progress: bool = True,
    force: bool = False,
    drop_tests: bool = False,
    drop_generated: bool = False,
    near_duplicates: float | None = None,
    sources: Sequence[dict[str, Any]] = (),
) -> PrepareReport:
    """Tokenize `files` into shards under `out` (see the module doc); only new content is tokenized.

    drop_tests / drop_generated leave out test code and machine-generated files (training/filters.py);
    near_duplicates (a Jaccard threshold) leaves out files that nearly repeat an earlier one. Each
    left-out file is recorded in the manifest with its reason. Filters judge new files only: tokens
    already in shards stay (rebuild with force to filter everything again). `sources` (what the files came from:
    packages with their versions and licences) are recorded in the manifest's "sources"."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    out = Path(out)
    tok = CodeGenTokenizerFast.from_pretrained(tokenizer)
    tok_json = tok.to_tokenizer_json().encode("utf-8")
    tok_hash = sha256_bytes(tok_json)
    vocab = len(tok)
    dtype = "uint16" if vocab <= 1 << 16 else "int32"

    if force and out.exists():
        for stale in [out / MANIFEST, *out.glob("*.npy"), out / TOKENIZER_DIR]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest["tokenizer"]["sha256"] != tok_hash:
            raise DataError(f"{out} was prepared with another tokenizer; use a new --out folder or --force")
        if manifest["holdout"] != holdout:
            raise DataError(f"{out} was prepared with holdout={manifest['holdout']}; pass the same value or --force")
    else:
        manifest = {"format": FORMAT, "tokenizer": {"dir": TOKENIZER_DIR, "sha256": tok_hash, "size": vocab,
                                                    "eos_token_id": tok.eos_token_id},
                    "dtype": dtype, "holdout": holdout, "files": {}, "skipped": {}, "shards": [], "totals": {}}
        tok.save_pretrained(out / TOKENIZER_DIR)

    from .filters import NearDuplicates, generated_reason, is_test_file

    near = NearDuplicates(near_duplicates) if near_duplicates is not None else None
    for source in sources:
        recorded = manifest.setdefault("sources", [])
        if source not in recorded:
            recorded.append(dict(source))
    report = PrepareReport()
    known = {entry["sha256"] for entry in manifest["files"].values() if "sha256" in entry}
    current = {f.name for f in files}
    report.missing = sum(1 for name in manifest["files"] if name not in current)
    todo: list[tuple[SourceFile, str, str]] = []  # (file, text, hash)

    def skip(name: str, reason: str) -> None:
        report.skipped[name] = reason
        manifest["skipped"][name] = reason

    from tqdm import tqdm

    for file in tqdm(files, desc="reading", unit="file", disable=not progress, leave=False):
        entry = manifest["files"].get(file.name)
        data = file.path.read_bytes()
        digest = sha256_bytes(data)
        if entry is not None and entry.get("sha256") == digest:
            report.already_known += 1
            if near is not None:  # new files are compared with it too
                near.seen(file.name, data.decode("utf-8", "replace"))  # already read: no second read
            continue
        if drop_tests and is_test_file(file.name):
            skip(file.name, "test code")
            continue
        if digest in known:
            report.duplicates += 1
            manifest["files"].setdefault(file.name, {"duplicate_of": digest})
            continue
        text = read_text(file.path)
        if text is None:
            skip(file.name, "not UTF-8")
            continue
        reason = generated_reason(text) if drop_generated else None
        if reason is None and near is not None:
            twin = near.seen(file.name, text)
            reason = None if twin is None else f"near-duplicate of {twin}"
        if reason is not None:
            skip(file.name, reason)
            continue
        known.add(digest)
        todo.append((file, text, digest))

    buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    counts = {s: sum(1 for sh in manifest["shards"] if sh["split"] == s) for s in SPLITS}

    def flush(split: str) -> None:
        if not buffers[split]:
            return
        tokens = np.concatenate(buffers[split]).astype(dtype)
        name = f"{split}-{counts[split]:05d}.npy"
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, out / name)
        manifest["shards"].append({"name": name, "split": split, "tokens": int(tokens.size),
                                   "sha256": sha256_file(out / name)})
        report.shards_written.append(name)
        counts[split] += 1
        buffers[split], sizes[split] = [], 0

    eos = tok.eos_token_id
    bar = tqdm(total=sum(len(t) for _, t, _ in todo), desc="tokenizing", unit="B", unit_scale=True,
               disable=not progress)
    for start in range(0, len(todo), batch_files):
        batch = todo[start : start + batch_files]
        encoded = tok._encode_batch([text for _, text, _ in batch])  # parallel, in the Rust library
        for (file, text, digest), ids in zip(batch, encoded):
            split = split_of(digest, holdout)
            ids.append(eos)
            buffers[split].append(np.asarray(ids, dtype=np.int64))
            sizes[split] += len(ids)
            manifest["files"][file.name] = {"sha256": digest, "tokens": len(ids), "split": split}
            report.new_files += 1
            report.new_tokens[split] += len(ids)
            bar.update(len(text))
            if sizes[split] >= shard_tokens:
                flush(split)
    bar.close()
    for split in SPLITS:
        flush(split)
    manifest["totals"] = {s: sum(sh["tokens"] for sh in manifest["shards"] if sh["split"] == s) for s in SPLITS}
    manifest["totals"]["files"] = sum(1 for e in manifest["files"].values() if "sha256" in e)
    manifest["totals"]["duplicates"] = sum(1 for e in manifest["files"].values() if "duplicate_of" in e)
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    report.totals = manifest["totals"]
    return report


class TokenWindows:
    """The token stream of one split, cut into windows of `seq_len + 1` tokens (inputs and shifted
    targets), served in a shuffled order that depends only on (seed, epoch).

    Sample k of the whole run is window `order(k // n)[k % n]`, so a batch is a pure function of the
    sample counter: resuming needs nothing but that counter, and data-parallel ranks take disjoint
    slices of the same global order.
    """

    def __init__(self, folder: str | os.PathLike, split: str, seq_len: int, seed: int = 0, shuffle: bool = True):
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.shards = []
        for shard in self.manifest["shards"]:
            if shard["split"] != split:
                continue
            path = folder / shard["name"]
            if not path.is_file():
                raise DataError(f"{folder}: shard {shard['name']} listed in {MANIFEST} is missing")
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise DataError(f"{path}: not a readable token shard ({exc})") from None
            if array.ndim != 1 or array.size != shard["tokens"]:
                raise DataError(f"{path}: holds {array.size} tokens, {MANIFEST} says {shard['tokens']}")
            self.shards.append(array)
        self.offsets = np.cumsum([0] + [a.size for a in self.shards])
        self.total = int(self.offsets[-1])
        self.n_windows = max(0, (self.total - 1) // seq_len)
        if self.n_windows == 0:
            raise DataError(f"{folder}: the {split} split has {self.total} tokens, fewer than one window of "
                            f"{seq_len + 1}")
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["size"])

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the concatenated shards."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < end:
            shard = self.shards[first]
            local = start - int(self.offsets[first])
            take = min(end - start, shard.size - local)
            parts.append(shard[local : local + take])
            start += take
            first += 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def window_index(self, sample: int) -> int:
        epoch, j = divmod(sample, self.n_windows)
        if not self.shuffle:
            return j
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_windows, generator=g))
        return int(self._order[1][j])

    def batch(self, first_sample: int, count: int) -> torch.Tensor:
        """Samples first_sample .. first_sample + count - 1 as a [count, seq_len + 1] int64 tensor."""
        rows = []
        for k in range(first_sample, first_sample + count):
            w = self.window_index(k)
            rows.append(self.tokens(w * self.seq_len, w * self.seq_len + self.seq_len + 1).astype(np.int64))
        return torch.from_numpy(np.stack(rows))
