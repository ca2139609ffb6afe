"""Facts about the CodeGen vocabulary shared by both tokenizers and the build script."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
ASSETS = Path(__file__).parent / "assets"

# CodeGen adds whitespace runs as ordinary tokens after GPT-2's 50257: 31..2 spaces, then 9..2 tabs.
SPACE_RUNS = range(31, 1, -1)
TAB_RUNS = range(9, 1, -1)


def codegen_added_tokens(first_id: int = 50257) -> dict[str, int]:
    """The 38 whitespace-run tokens CodeGen appends to the GPT-2 vocabulary, with their ids."""
    runs = [" " * n for n in SPACE_RUNS] + ["\t" * n for n in TAB_RUNS]
    return {run: first_id + i for i, run in enumerate(runs)}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; every other byte is moved to a code point from
    256 upwards, so that a BPE token is always a printable string with no whitespace in it.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_tokenizer_files(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], set[str]]:
    """(vocab, merges, added tokens, special tokens) from tokenizer.json if the folder has one (as
    `transformers` prefers), else from vocab.json, merges.txt and the optional added_tokens.json."""
    if (folder / "tokenizer.json").is_file():
        return _read_tokenizer_json(folder / "tokenizer.json")
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found")
    vocab = _read_json(vocab_path)
    merges = []
    for lineno, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_path}:{lineno}: expected two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    added_path = folder / "added_tokens.json"
    added = _read_json(added_path) if added_path.is_file() else {}
    _check_ids(vocab, added, folder)
    return vocab, merges, added, {EOS_TOKEN} & (vocab.keys() | added.keys())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], set[str]]:
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported (expected byte-level BPE)")
    pre = data.get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    if "ByteLevel" not in kinds:
        raise ValueError(f"{path}: pre-tokenizer {pre.get('type')!r} is not supported (expected ByteLevel)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"{path}: malformed merge {bad!r}")
    vocab = dict(model.get("vocab", {}))
    added, special = {}, set()
    for entry in data.get("added_tokens", []):
        if vocab.get(entry["content"]) != entry["id"]:
            added[entry["content"]] = entry["id"]
        if entry.get("special"):
            special.add(entry["content"])
    _check_ids(vocab, added, path)
    return vocab, merges, added, special


def _check_ids(vocab: dict[str, int], added: dict[str, int], where: Path) -> None:
    ids = sorted([*vocab.values(), *added.values()])
    if ids != list(range(len(ids))):
        raise ValueError(f"{where}: token ids are not the dense range 0..{len(ids) - 1}")
